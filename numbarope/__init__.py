"""numbarope (transition: the layout of issue 19 is being built; see docs/architecture.md)."""
__version__ = "0.1.0"
from ._runtime.cache import configure_numba_cache as _configure_numba_cache  # noqa: E402
_configure_numba_cache()
