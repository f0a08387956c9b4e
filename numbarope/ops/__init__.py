"""The attention algorithms: a registry and one module per algorithm.

Each module holds one algorithm's class (what it serves, its cost, memory and
floating-point allowance) AND its kernels, and registers it when imported:

* :mod:`.streaming` — the exact path (blocked online softmax);
* :mod:`.gemm` — no bias: two GEMMs through a key-side state;
* :mod:`.prefix` — causal: chunked prefix sums of key-side states;
* :mod:`.decay` — exponential decay (ALiBi): chunked decayed scans;
* :mod:`.window` — sliding windows: a tree of chunk states;
* :mod:`.fft` — any relative bias: circulant embedding and the FFT;
* :mod:`.packed` — packed sequences: gemm or prefix on each sequence;
* :mod:`.toeplitz_fft` — general relative matrices W_t: block-Toeplitz FFT.

Shared pieces live once in ``_common`` (chunk kernels, task ranges), ``_exp``,
``_features``, ``_toeplitz``, ``_bounds`` and ``_cost``. To add an algorithm:
subclass :class:`Algorithm`, name the structure types it serves, and
:func:`register` an instance (``docs/extending.md``).

References
----------
J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
Fourier Transform", arXiv:2505.11892 (2025).
"""

from .registry import (REASONS, Algorithm, FastPathError, HeadSpec, Reason,
                       fast_algorithms, get, register, registry, unregister)
# importing each module registers its algorithm (in this order: ties in predicted
# time go to the earlier one)
from . import streaming, gemm, prefix, decay, window, fft, toeplitz_fft, packed  # noqa: E402,F401,I001

__all__ = ["Algorithm", "HeadSpec", "Reason", "REASONS", "FastPathError", "register",
           "unregister", "get", "registry", "fast_algorithms"]
