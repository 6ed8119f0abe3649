"""A recording's manifest is untrusted input: data-file names are checked against the format and
must stay inside the folder, and a damaged manifest is a LogError, never a KeyError/TypeError."""

from __future__ import annotations

import json
import os
import shutil

import pytest

from inrun_shapley import LogError
from inrun_shapley.trajectory import Recording
from tests.posthoc.adjoint.test_adjoint import train


@pytest.fixture(scope="module")
def recorded(tmp_path_factory):
    root = tmp_path_factory.mktemp("rec")
    _, _, path = train(root, "adamw", steps=4)
    return path


def copy_with(tmp_path, src, edit):
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    m = json.loads((dst / "manifest.json").read_text())
    m = edit(m, dst) or m
    (dst / "manifest.json").write_text(json.dumps(m))
    return dst


def _chunk0(m, key, value):
    m["chunks"][0][key] = value


def test_a_chunk_outside_the_folder_is_refused(tmp_path, recorded):
    """Before: ``../x`` was read, so a file outside the recording loaded silently."""
    outside = tmp_path / "outside.npz"

    def edit(m, dst):
        shutil.copy(dst / m["chunks"][0]["file"], outside)
        m["chunks"][0]["file"] = "../outside.npz"

    path = copy_with(tmp_path, recorded, edit)
    with pytest.raises(LogError, match="not a data file name"):
        Recording.load(path).state(1)


def test_an_absolute_chunk_path_is_refused(tmp_path, recorded):
    def edit(m, dst):
        m["chunks"][0]["file"] = str((dst / m["chunks"][0]["file"]).resolve())

    with pytest.raises(LogError, match="not a data file name"):
        Recording.load(copy_with(tmp_path, recorded, edit)).state(1)


def test_a_symlinked_chunk_is_refused(tmp_path, recorded):
    target = tmp_path / "elsewhere.npz"

    def edit(m, dst):
        f = dst / m["chunks"][0]["file"]
        shutil.move(f, target)
        os.symlink(target, f)

    with pytest.raises(LogError, match="symbolic link"):
        Recording.load(copy_with(tmp_path, recorded, edit)).state(1)


CORRUPTIONS = [
    ("not_an_object", lambda m, d: [1, 2], "not a trajectory recording"),
    ("no_params", lambda m, d: m.pop("params") and None, "params is missing"),
    ("params_not_a_list", lambda m, d: m.update(params="w"), "params is missing"),
    ("param_shape_string", lambda m, d: m["params"][0].update(shape="3"), r"params\[0\]"),
    ("param_no_group", lambda m, d: m["params"][0].pop("group") and None, r"params\[0\]"),
    ("bad_optimizer", lambda m, d: m.update(optimizer="lion"), "optimizer 'lion'"),
    ("no_optimizer", lambda m, d: m.pop("optimizer") and None, "optimizer None"),
    ("every_string", lambda m, d: m.update(every="1"), "every is missing"),
    ("every_zero", lambda m, d: m.update(every=0), "every is missing"),
    ("dtype_int", lambda m, d: m.update(dtype="int64"), "not a torch floating dtype"),
    ("dtype_unknown", lambda m, d: m.update(dtype="quux"), "not a torch floating dtype"),
    ("dtype_number", lambda m, d: m.update(dtype=3), "not a torch floating dtype"),
    ("no_chunks", lambda m, d: m.pop("chunks") and None, "chunks is missing"),
    ("chunks_dict", lambda m, d: m.update(chunks={}), "chunks is missing"),
    ("chunk_no_bytes", lambda m, d: m["chunks"][0].pop("bytes") and None, r"chunks\[0\].bytes"),
    ("chunk_step_string", lambda m, d: _chunk0(m, "first_step", "1"), r"chunks\[0\].first_step"),
    ("chunk_crc_float", lambda m, d: _chunk0(m, "crc32", 1.5), r"chunks\[0\].crc32"),
    ("chunk_file_number", lambda m, d: _chunk0(m, "file", 7), r"chunks\[0\].file"),
    ("chunk_not_object", lambda m, d: m["chunks"].__setitem__(0, "chunk-000000001.npz"), "not an object"),
    ("chunks_overlap", lambda m, d: _chunk0(m, "last_step", 4), "overlapping"),
    ("checkpoint_no_step", lambda m, d: m.update(checkpoints=[{"file": "ckpt-000000001.npz", "bytes": 1,
                                                               "crc32": 1}]), r"checkpoints\[0\].step"),
    ("checkpoints_string", lambda m, d: m.update(checkpoints="x"), "checkpoints is not a list"),
    ("format_version_string", lambda m, d: m.update(format_version="1"), "format_version '1'"),
    ("no_format_version", lambda m, d: m.pop("format_version") and None, "format_version None"),
    ("no_run_id", lambda m, d: m.pop("run_id") and None, "run_id"),
    ("first_step_float", lambda m, d: m.update(first_step=1.0), "first_step"),
    ("hyper_fields_other", lambda m, d: m.update(hyper_fields=["lr"]), "hyper_fields"),
    ("bytes_per_step_string", lambda m, d: m.update(bytes_per_step="many"), "bytes_per_step"),
]


@pytest.mark.parametrize("name,edit,message", CORRUPTIONS, ids=[c[0] for c in CORRUPTIONS])
def test_damaged_manifest_is_a_log_error(tmp_path, recorded, name, edit, message):
    path = copy_with(tmp_path, recorded, edit)
    with pytest.raises(LogError, match=message):
        r = Recording.load(path)
        r.state(r.first_step)


def test_a_chunk_without_its_arrays_is_a_log_error(tmp_path, recorded):
    import io
    import zlib

    import numpy as np

    def edit(m, dst):
        buf = io.BytesIO()
        np.savez(buf, step=np.arange(2))
        data = buf.getvalue()
        (dst / m["chunks"][0]["file"]).write_bytes(data)
        m["chunks"][0].update(bytes=len(data), crc32=zlib.crc32(data) & 0xFFFFFFFF)

    with pytest.raises(LogError, match="arrays .* missing"):
        Recording.load(copy_with(tmp_path, recorded, edit)).state(1)
