"""Deprecated alias of :mod:`numbarope.ops.streaming` (the exact kernel) and
:mod:`numbarope.ops._exp` (its exp). This alias goes in the next release."""

import warnings

from .ops._exp import EXP_FLUSH, EXP_ULPS, exp_kernel  # noqa: F401
from .ops.streaming import exact_attention, row_norms  # noqa: F401

__all__ = ["exact_attention", "row_norms", "EXP_ULPS", "EXP_FLUSH", "exp_kernel"]

warnings.warn("numbarope.exact is deprecated: use numbarope.ops.streaming",
              DeprecationWarning, stacklevel=2)
