"""Deprecated alias of :mod:`numbarope.ops` (the registry before the 0.2 layout).

The registry and the algorithm base class are in :mod:`numbarope.ops`; each
algorithm in its own module (``numbarope.ops.gemm``, ...). This alias goes in the
next release.
"""

import warnings

from .ops import (REASONS, Algorithm, FastPathError, HeadSpec, Reason,  # noqa: F401
                  fast_algorithms, get, register, registry, unregister)
from .ops.toeplitz_fft import general_features  # noqa: F401

__all__ = ["FastPathError", "Reason", "REASONS", "HeadSpec", "Algorithm", "register",
           "unregister", "get", "registry", "fast_algorithms", "general_features"]

warnings.warn("numbarope.algorithms is deprecated: use numbarope.ops", DeprecationWarning,
              stacklevel=2)
