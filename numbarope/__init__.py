"""numbarope: exact and certified fast RoPE attention on multicore CPUs.

The fast path is the algorithm of J. Alman and Z. Song, "Fast RoPE Attention:
Combining the Polynomial Method and Fast Fourier Transform", arXiv:2505.11892
(2025): exp is replaced by a polynomial with a certified relative error, the
attention matrix becomes a sum of rescaled Toeplitz matrices, and those are
multiplied by GEMMs, prefix sums or the FFT. See ``rope_attention``.
"""

# The one place of the version: pyproject.toml reads it (tool.setuptools.dynamic), so
# `pip install .`, an editable install and `numbarope --version` all agree. Keep it a
# plain string literal: setuptools reads it without importing the package.
__version__ = "0.1.0"

# numbarope runs its parallel work on Python threads calling nogil numba kernels
# (numbarope._threads): it starts no OpenMP runtime and changes no environment
# variable, so it neither slows nor is slowed by torch's OpenMP in one process.

# A read-only install (package dir and user cache dir not writable) would make
# every @njit(cache=True) fail at import; give numba a writable cache first.
from ._cache import configure_numba_cache as _configure_numba_cache  # noqa: E402

_configure_numba_cache()

from . import bias  # noqa: E402
from .algorithms import FastPathError  # noqa: E402
from .attention import plan, rope_attention  # noqa: E402
from .datasets import Sample, load_sample  # noqa: E402
from .planner import AttentionInfo, HeadPlan, calibrate  # noqa: E402
from .polynomial import ExpApproximation, exp_approximation  # noqa: E402
from .rotary import Rotary, apply_rotary, rotary_relative_matrices  # noqa: E402
from ._threads import get_workers, set_workers  # noqa: E402
from ._dask import long_sequence_attention  # noqa: E402  (imports dask only when called)

__all__ = [
    "rope_attention", "plan", "calibrate", "AttentionInfo", "HeadPlan",
    "Rotary", "apply_rotary", "rotary_relative_matrices",
    "exp_approximation", "ExpApproximation",
    "load_sample", "Sample", "bias", "get_workers", "set_workers", "FastPathError",
    "long_sequence_attention",
    "__version__",
]
