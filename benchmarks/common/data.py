"""The one digits loader of the benchmarks: the library's, shared with the demo.

:func:`load_digits_splits` shuffles the 1,797 scikit-learn digits with one seeded permutation,
scales them and cuts consecutive splits; :func:`flip_labels` adds label noise. Both live in
:mod:`inrun_shapley.app.digits` because the demo (library code) cannot import ``benchmarks``.
"""

from inrun_shapley.app.digits import N_DIGITS, SCALES, flip_labels, load_digits_splits

__all__ = ["N_DIGITS", "SCALES", "flip_labels", "load_digits_splits"]
