"""Step values of the zoo models in bf16 and fp16 against the same steps in fp32 (issue 22).

For each model of ``tests/engine/zoo_models.py`` and each precision of
``tests/engine/zoo_precision.py``, two steps from one seed; prints the largest value difference
relative to the largest fp32 value, the Pearson correlation, and how far the first step's
parameter update itself moved (``|Δθ − Δθ_fp32| / |Δθ_fp32|``): values cannot agree better than
the step they value.

    python -m benchmarks.precision_zoo [--optimizer sgd|adamw] [--models nanogpt gpt2 ...]
"""

from __future__ import annotations

import argparse

from tests.engine.zoo_models import ZOO
from tests.engine.zoo_precision import PRECISIONS, agreement, step_values, update_difference


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--optimizer", default="sgd", choices=("sgd", "adamw"))
    parser.add_argument("--models", nargs="*", default=list(ZOO))
    parser.add_argument("--steps", type=int, default=2)
    parser.add_argument("--warmup", type=int, default=0, help="untracked fp32 steps first (one shared state)")
    args = parser.parse_args(argv)
    print(f"optimizer {args.optimizer}, {args.warmup} fp32 warm-up steps, then {args.steps} steps, batch 4 "
          "(values of every step pooled)")
    print(f"{'model':<10} {'precision':<14} {'max rel diff':>12} {'pearson':>9} {'update diff':>11}")
    for name in args.models:
        ref, ref_update = step_values(name, "fp32", args.optimizer, steps=args.steps, warmup=args.warmup)
        for precision in PRECISIONS[1:]:
            if args.warmup and precision == "bf16-weights":
                continue
            try:
                got, update = step_values(name, precision, args.optimizer, steps=args.steps, warmup=args.warmup)
            except Exception as err:  # noqa: BLE001  (reported, not hidden)
                print(f"{name:<10} {precision:<14} failed: {type(err).__name__}: {str(err)[:90]}")
                continue
            err, r = agreement(got, ref)
            print(f"{name:<10} {precision:<14} {err:12.2e} {r:9.5f} {update_difference(update, ref_update):11.2e}")


if __name__ == "__main__":
    main()
