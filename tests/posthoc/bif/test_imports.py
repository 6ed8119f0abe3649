"""Import weight: a bare ``import inrun_shapley`` loads no post-hoc package and no heavy optional
dependency, and the post-hoc packages load matplotlib only when a plot is drawn.

Checked in a fresh interpreter, since the test process has long imported everything.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest

HEAVY = [
    "scipy",
    "lightning",
    "accelerate",
    "matplotlib",
    "inrun_shapley.posthoc.bif",
    "inrun_shapley.posthoc.weighting",
]

PROBE = textwrap.dedent(
    """
    import json, sys, tempfile, os
    heavy = {heavy!r}
    seen = {{}}
    def loaded():
        return [m for m in heavy if m in sys.modules]
    import inrun_shapley
    seen["inrun_shapley"] = loaded()
    import inrun_shapley.posthoc.bif
    seen["bif"] = loaded()
    import inrun_shapley.posthoc.weighting as w
    seen["weighting"] = loaded()
    with tempfile.TemporaryDirectory() as tmp:
        w.plot_group_weights(w.GroupWeights(("a", "b"), [0.5, 1.5]), os.path.join(tmp, "w.png"))
    seen["after_plot"] = loaded()
    seen["pyplot"] = "matplotlib.pyplot" in sys.modules
    print(json.dumps(seen))
    """
)


def _probe() -> dict:
    env = {k: v for k, v in os.environ.items() if k != "MPLBACKEND"}
    done = subprocess.run(
        [sys.executable, "-c", PROBE.format(heavy=HEAVY)],
        capture_output=True, text=True, env=env, timeout=120,
    )
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout.strip().splitlines()[-1])


@pytest.mark.slow
def test_import_weight_of_the_core_and_the_posthoc_packages():
    seen = _probe()
    assert seen["inrun_shapley"] == [], f"import inrun_shapley loaded {seen['inrun_shapley']}"
    assert "matplotlib" not in seen["bif"], "import inrun_shapley.posthoc.bif loaded matplotlib"
    assert "inrun_shapley.posthoc.weighting" not in seen["bif"]
    assert "matplotlib" not in seen["weighting"], "import inrun_shapley.posthoc.weighting loaded matplotlib"
    # The probe does see matplotlib once a plot is drawn, so the checks above can fail.
    assert "matplotlib" in seen["after_plot"]
    # Drawing a plot neither pulls in pyplot nor forces a backend.
    assert seen["pyplot"] is False
