"""Deprecated alias of :mod:`numbarope.api` (the module before the 0.2 layout).

``numbarope.attention.rope_attention`` is :func:`numbarope.rope_attention`; import it
from ``numbarope`` instead. This alias goes in the next release.
"""

import warnings

from .api import plan, rope_attention  # noqa: F401

__all__ = ["rope_attention", "plan"]

warnings.warn("numbarope.attention is deprecated: use numbarope.rope_attention / "
              "numbarope.plan (numbarope.api)", DeprecationWarning, stacklevel=2)
