"""Values as a column of a Hugging Face dataset, the pruned dataset, the log as Arrow/Parquet."""

from __future__ import annotations

import sys

import numpy as np
import pytest

from inrun_shapley.errors import ConfigurationError, SampleIdError
from inrun_shapley.export import add_values_column, select_kept, to_arrow, to_parquet, values_column
from inrun_shapley.log import ShapleyLog, ShapleyLogWriter
from inrun_shapley.pruning import prune

NAN = np.nan


@pytest.fixture
def log(tmp_path):
    with ShapleyLogWriter(tmp_path / "run.shapley", group_names=["a", "b"], metadata={"run": "t"}) as w:
        w.add_step(1, np.array([0, 2, 3]), np.array([0.4, -0.3, 0.1]), np.array([[0.3, 0.1], [-0.1, -0.2], [0, 0.1]]))
        w.add_step(2, np.array([2, 0]), np.array([0.05, 0.2]), np.array([[0.05, 0.0], [0.1, 0.1]]))
    return ShapleyLog.load(tmp_path / "run.shapley")


def test_values_column_from_log_and_documents(log):
    col = values_column(log, 5)
    expected = np.full(5, NAN)
    expected[log.ids] = log.helpfulness(ids=log.ids)
    np.testing.assert_array_equal(col, expected)  # rows 1 and 4 never seen: NaN
    doc_vals = np.array([1.5, -0.5])
    assert values_column(doc_vals, 4, doc_ids=[1, 0, 0, 1]).tolist() == [-0.5, 1.5, 1.5, -0.5]
    with pytest.raises(SampleIdError, match="another"):
        values_column(log, 3)
    with pytest.raises(SampleIdError, match="doc_ids must be in"):
        values_column(doc_vals, 2, doc_ids=[0, 2])
    with pytest.raises(SampleIdError, match="one per row"):
        values_column(doc_vals, 3, doc_ids=[0, 1])
    with pytest.raises(ConfigurationError, match="1-D numeric"):
        values_column(np.ones((2, 2)), 2)


def test_dataset_column_and_selection(log):
    datasets = pytest.importorskip("datasets")
    ds = datasets.Dataset.from_dict({"text": [f"row {i}" for i in range(5)], "doc": [0, 0, 1, 1, 1]})
    with_values = add_values_column(ds, log)
    assert with_values.column_names == ["text", "doc", "value"] and ds.column_names == ["text", "doc"]
    np.testing.assert_allclose(np.array(with_values["value"], dtype=float), values_column(log, 5))
    kept = select_kept(with_values, prune(log, fraction="auto", ids=5))
    assert kept["text"] == ["row 0", "row 1", "row 3", "row 4"]  # row 2 is the one negative
    by_doc = add_values_column(ds, np.array([2.0, -1.0]), name="doc_value", doc_column="doc")
    assert by_doc["doc_value"] == [2.0, 2.0, -1.0, -1.0, -1.0]
    with pytest.raises(ConfigurationError, match="already has a column"):
        add_values_column(with_values, log)
    with pytest.raises(ConfigurationError, match="doc_column"):
        add_values_column(ds, log, doc_column="nope")
    with pytest.raises(SampleIdError, match="row indices in"):
        select_kept(ds, [0, 5])


def test_arrow_and_parquet_export(log, tmp_path):
    pq = pytest.importorskip("pyarrow.parquet")
    table = to_arrow(log)
    assert table.column_names == ["id", "value", "count", "std_value", "helpfulness", "group_a", "group_b"]
    frame = log.to_pandas()
    np.testing.assert_array_equal(table["id"].to_numpy(), frame["id"].to_numpy())
    np.testing.assert_allclose(table["value"].to_numpy(), frame["value"].to_numpy())
    np.testing.assert_allclose(table["group_b"].to_numpy(), frame["group_b"].to_numpy())
    np.testing.assert_allclose(table["helpfulness"].to_numpy(), log.helpfulness(ids=log.ids))
    path = to_parquet(log, tmp_path / "values.parquet")
    back = pq.read_table(path)
    assert back.equals(table) and b'"inrun_shapley"' in back.schema.metadata[b"inrun_shapley.score"]


def test_missing_extra_names_it(log, monkeypatch):
    monkeypatch.setitem(sys.modules, "pyarrow", None)
    with pytest.raises(ImportError, match=r"inrun-shapley\[datasets\]"):
        to_arrow(log)
