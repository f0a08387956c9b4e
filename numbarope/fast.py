"""Deprecated alias: the separable fast path before the 0.2 layout.

Each algorithm now lives in its own module of :mod:`numbarope.ops` (``gemm``,
``prefix``, ``decay``, ``window``, ``fft``, ``toeplitz_fft``); the key-side state of
a block of keys is :func:`numbarope.ops.gemm.key_state`. This alias goes in the next
release.
"""

import warnings

from .ops._common import key_side_state, visible_keys  # noqa: F401
from .ops.toeplitz_fft import fast_general  # noqa: F401

__all__ = ["key_side_state", "visible_keys", "fast_general"]

warnings.warn("numbarope.fast is deprecated: use the algorithm modules of numbarope.ops",
              DeprecationWarning, stacklevel=2)
