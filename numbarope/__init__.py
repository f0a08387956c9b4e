"""numbarope: exact and certified fast RoPE attention on multicore CPUs.

The fast path is the algorithm of J. Alman and Z. Song, "Fast RoPE Attention:
Combining the Polynomial Method and Fast Fourier Transform", arXiv:2505.11892
(2025): exp is replaced by a polynomial with a certified relative error, the
attention matrix becomes a sum of rescaled Toeplitz matrices, and those are
multiplied by GEMMs, prefix sums or the FFT. See ``rope_attention``.

The public surface, all of it:

* attention: :func:`rope_attention`, :func:`plan`, :func:`long_sequence_attention`;
* reports: :class:`AttentionInfo`, :class:`HeadPlan`, :class:`FastPathError`;
* RoPE: :class:`Rotary`, :func:`apply_rotary`, :func:`rotary_relative_matrices`;
* the polynomial: :func:`exp_approximation`, :class:`ExpApproximation`;
* structures: :mod:`numbarope.bias`; algorithms: :mod:`numbarope.ops`;
* threads: :func:`set_workers`, :func:`get_workers`, :func:`show_config`; the cost
  model: :func:`calibrate`;
* data: :func:`load_sample`, :class:`Sample`.

The layout (``docs/architecture.md``): front-ends → :mod:`numbarope.api` →
``numbarope._pipeline`` → :mod:`numbarope.ops` → leaves (:mod:`numbarope.bias`,
:mod:`numbarope.rotary`, :mod:`numbarope.polynomial`).
"""

# The one place of the version: pyproject.toml reads it (tool.setuptools.dynamic), so
# `pip install .`, an editable install and `numbarope --version` all agree. Keep it a
# plain string literal: setuptools reads it without importing the package.
__version__ = "0.1.0"

# A read-only install (package dir and user cache dir not writable) would make
# every @njit(cache=True) fail at import; give numba a writable cache first.
from ._runtime.cache import configure_numba_cache as _configure_numba_cache  # noqa: E402

_configure_numba_cache()

from . import bias, ops  # noqa: E402
from .api import plan, rope_attention  # noqa: E402
from ._pipeline.report import AttentionInfo, HeadPlan  # noqa: E402
from .backends.long_sequence import long_sequence_attention  # noqa: E402 (dask when called)
from .calibrate import calibrate  # noqa: E402
from .datasets import Sample, load_sample  # noqa: E402
from .ops import FastPathError  # noqa: E402
from .polynomial import ExpApproximation, exp_approximation  # noqa: E402
from .rotary import Rotary, apply_rotary, rotary_relative_matrices  # noqa: E402
from ._runtime.threads import get_workers, set_workers, show_config  # noqa: E402

__all__ = [
    "rope_attention", "plan", "calibrate", "AttentionInfo", "HeadPlan",
    "Rotary", "apply_rotary", "rotary_relative_matrices",
    "exp_approximation", "ExpApproximation",
    "load_sample", "Sample", "bias", "ops", "get_workers", "set_workers", "show_config",
    "FastPathError",
    "long_sequence_attention",
    "__version__",
]
