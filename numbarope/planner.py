"""Deprecated alias: the planner and its report before the 0.2 layout.

:class:`AttentionInfo`, :class:`HeadPlan` and :func:`calibrate` are top-level names
of ``numbarope``; the cost constants are ``numbarope.ops._cost.COST_CONSTANTS``; the
exact path's bound is ``numbarope.ops.streaming.exact_error_bound``. This alias goes
in the next release.
"""

import warnings

from ._pipeline.plan import plan_head  # noqa: F401
from ._pipeline.report import AttentionInfo, HeadPlan  # noqa: F401
from .calibrate import calibrate  # noqa: F401
from .ops._cost import COST_CONSTANTS  # noqa: F401
from .ops.streaming import exact_error_bound  # noqa: F401
from .ops.toeplitz_fft import general_features  # noqa: F401

__all__ = ["HeadPlan", "AttentionInfo", "COST_CONSTANTS", "calibrate", "exact_error_bound",
           "plan_head", "general_features"]

warnings.warn("numbarope.planner is deprecated: use numbarope.AttentionInfo, "
              "numbarope.calibrate, numbarope.ops", DeprecationWarning, stacklevel=2)
