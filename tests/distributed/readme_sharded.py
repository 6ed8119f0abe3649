"""The README's "sharded" block, run as written under torchrun (any number of processes); rank 0
writes the merged values to $RESULT_PATH. The user's objects it assumes come from fsdp_setup."""

import os
import re
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))
from tests.distributed.fsdp_setup import global_batches, make  # noqa: E402

if __name__ == "__main__":
    block = re.search(r"<!-- readme-test: sharded -->\s*```python\n(.*?)```", (ROOT / "README.md").read_text(), re.S)
    model, _, (x, y), val_batch, loss_rows = make("lm")
    namespace = {"model": model, "val_batch": val_batch, "loss_rows": loss_rows,
                 "global_batches": global_batches(), "rows": lambda ids: (x[ids], y[ids])}
    exec(compile(block.group(1), "README:sharded", "exec"), namespace)
    if namespace["rank"] == 0:
        np.save(os.environ["RESULT_PATH"], namespace["values"])
