"""numbarope: exact and certified fast RoPE attention on multicore CPUs.

The fast path is the algorithm of J. Alman and Z. Song, "Fast RoPE Attention:
Combining the Polynomial Method and Fast Fourier Transform", arXiv:2505.11892
(2025): exp is replaced by a polynomial with a certified relative error, the
attention matrix becomes a sum of rescaled Toeplitz matrices, and those are
multiplied by GEMMs, prefix sums or the FFT. See ``rope_attention``.
"""

from . import bias
from .attention import plan, rope_attention
from .datasets import Sample, load_sample
from .planner import AttentionInfo, HeadPlan
from .polynomial import ExpApproximation, exp_approximation
from .rotary import Rotary, apply_rotary, rotary_relative_matrices

__version__ = "0.1.0"

__all__ = [
    "rope_attention", "plan", "AttentionInfo", "HeadPlan",
    "Rotary", "apply_rotary", "rotary_relative_matrices",
    "exp_approximation", "ExpApproximation",
    "load_sample", "Sample", "bias",
    "__version__",
]
