"""Rotary position embeddings (RoPE).

Conventions follow HF transformers: ``inv_freq[i] = base ** (-2 i / dim)`` for
``i = 0 .. dim/2 - 1``; a feature pair rotated by the angle ``p * inv_freq[i]``
(radians) at position ``p``. Two pairings exist in the wild:

* ``layout="half"`` (HF ``rotate_half``; GPT-NeoX, Llama): feature ``i`` pairs
  with feature ``i + dim/2``;
* ``layout="interleaved"`` (GPT-J, RoFormer): feature ``2i`` pairs with ``2i+1``.

With ``dim < head_dim`` only the leading ``dim`` features are rotated (partial
rotary, as GPT-NeoX's ``rotary_pct``).

Context-extension variants (``Rotary(scaling=...)``) follow the formulas of HF
transformers 5.24, ``transformers/modeling_rope_utils.py``
(``ROPE_INIT_FUNCTIONS``): :class:`LinearScaling`, :class:`DynamicNTKScaling`,
:class:`Llama3Scaling`, :class:`YarnScaling` and :class:`LongRopeScaling`;
:meth:`Rotary.from_hf` builds a ``Rotary`` from a model's
``config.rope_parameters``. YaRN and LongRoPE multiply cos and sin by an
*attention factor* ``a`` (logits of the rotated features grow by ``a**2``);
:func:`rotary_tables` and :func:`apply_rotary` include it, :meth:`Rotary.angles`
does not. Angles are always computed in float64,
whatever the input dtype (a float32 angle ``p * inv_freq`` loses about 1e-3 rad
at position 32768), from the exact product of position and inverse frequency
reduced modulo 2π (:meth:`Rotary.angles`: within :data:`ANGLE_ERROR` = 2.2e-16
rad at any position up to ``2**60 / inv_freq``).

References
----------
J. Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding",
Neurocomputing 568 (2024), §3.4 (eq. 34: the block rotation R_{Θ,m}).
S. Chen et al., "Extending Context Window of Large Language Models via Positional
Interpolation", arXiv:2306.15595 (2023) (linear scaling; also kaiokendev 2023).
bloc97, "NTK-Aware Scaled RoPE", r/LocalLLaMA (2023), and emozilla's dynamic
variant, as ``rope_type="dynamic"`` in transformers.
B. Peng, J. Quesnelle, H. Fan, E. Shippole, "YaRN: Efficient Context Window
Extension of Large Language Models", arXiv:2309.00071 (2023), §3.2-3.4
(eq. 17-20: the ramp γ and the attention factor 0.1 ln s + 1).
Meta, Llama 3.1 rope scaling (``apply_scaling`` in meta-llama/llama-models
``llama3/model.py``; A. Grattafiori et al., "The Llama 3 Herd of Models",
arXiv:2407.21783, 2024).
Y. Ding et al., "LongRoPE: Extending LLM Context Window Beyond 2 Million Tokens",
arXiv:2402.13753 (2024).
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
from numba import njit
from numpy.typing import ArrayLike

__all__ = ["Rotary", "apply_rotary", "rotary_relative_matrices",
           "LinearScaling", "DynamicNTKScaling", "Llama3Scaling", "YarnScaling",
           "LongRopeScaling", "ANGLE_ERROR", "MAX_ANGLE", "ROTATION_ERROR",
           "rotation_logit_error"]

LAYOUTS = ("half", "interleaved")
#: Accepted spellings of the layouts; each maps to its canonical name.
LAYOUT_ALIASES = {"neox": "half", "rotate_half": "half",
                  "gptj": "interleaved", "rotate_every_two": "interleaved"}


# ------------------------------------------------- exact angle reduction mod 2π
# The angle of position p and inverse frequency θ (both float64) is reduced as
# r = p·θ − k·2π, |r| <= π, without rounding p·θ first:
#
# 1. p·θ = hi + lo exactly (Dekker's two-product with Veltkamp's split; the
#    operands are first scaled to their frexp mantissas so that the split can
#    neither overflow nor lose bits to underflow; the two parts are scaled back
#    with ldexp, exact unless they fall below 2**-1022).
# 2. 2π = _C1 + _C2 + _C3 + δ, |δ| < 2**-161; k = k1 + k2 with k1 = rint(hi / 2π)
#    and k2 = rint(r1 / 2π) of the first remainder r1 (|k2| <= 62), and one more
#    2π off when the rounded result lies beyond ±fl(π) (k2 misjudged by the
#    rounding of r1 / 2π, within 1e-13 of ±π); every k_i·C_j is formed exactly
#    as a two-product.
# 3. hi + lo − Σ k_i·C_j is summed with Ogita-Rump-Oishi's Sum2 (a cascade of
#    two-sums, the errors accumulated), hi − k1·C1 first, and rounded once.
#
# _C1, _C2, _C3 are the float64 rounded-to-nearest of 2π and of the successive
# remainders (Python integers: π from Machin's formula to 420 bits; the test
# test_two_pi_constants recomputes them):
#     one = 1 << 420
#     def atan_inv(x):                      # arctan(1/x) * one
#         s = t = one // x; n, sign = 1, -1
#         while t:
#             t //= x * x; n += 2; s += sign * (t // n); sign = -sign
#         return s
#     r = Fraction(8 * (4 * atan_inv(5) - atan_inv(239)), one)    # 2π, error < 2**-400
#     for i in range(3): c = float(r); print(c.hex()); r -= Fraction(c)
_C1 = float.fromhex("0x1.921fb54442d18p+2")       # 6.283185307179586
_C2 = float.fromhex("0x1.1a62633145c07p-52")      # 2.4492935982947064e-16
_C3 = float.fromhex("-0x1.f1976b7ed8fbcp-108")    # -5.989539619436679e-33
_INV_2PI = float.fromhex("0x1.45f306dc9c883p-3")  # float64 nearest 1/(2π)
_PI = _C1 / 2                                     # fl(π) (halving is exact)
_SPLITTER = 134217729.0                           # 2**27 + 1 (Veltkamp)

#: Largest |position × inverse frequency| (radians) :meth:`Rotary.angles` reduces:
#: beyond it the analysis of :data:`ANGLE_ERROR` does not hold and a ValueError is raised.
MAX_ANGLE = 2.0 ** 60

#: Proven bound (radians) on |computed − exact| for the reduced angles of
#: :meth:`Rotary.angles`, "exact" being the product of the float64 position and
#: the float64 inverse frequency reduced modulo 2π (compared modulo 2π). Derivation
#: (u = 2**-53, |p·θ| < MAX_ANGLE = 2**60, so |k1| < 2**57.4 and
#: |k1 − hi/2π| <= 2u·|hi/2π| + 1/2 < 41.2): the result is fl(z), the rounding of
#: a double-double z in [−π − 2**-40, π + 2**-40] ⊂ (−4, 4), so fl(z) is within
#: half an ulp, 2**-52, of z. z differs from p·θ − k·2π by (a) the Sum2 error of
#: its at most 20 terms, <= γ18·γ19·Σ|terms| (Ogita, Rump, Oishi 2005, Prop. 4.5
#: and Lemma 4.3; γn = n u / (1 − n u)) with Σ|terms| < 1400 (|hi − fl(k1 C1)| <
#: 41.2·2π + |k1|·|2π − C1| + 2**8 < 561, |lo| <= 2**7, |k1 C1 − fl(k1 C1)| <=
#: 2**8, |k1 C2| < 45, |k2 C1| < 390, |C1| < 6.3 for the last 2π, the rest
#: < 2**-40), i.e. < 2**-87; (b) |k|·|δ| < 2**58 · 2**-161 = 2**-103 for the tail
#: of 2π; (c) <= 2**-1073 when p·θ is subnormal. Hence 2**-52 + 2**-86 (about
#: 2.2204e-16: the float64 result is the correctly rounded reduced angle but for
#: ties within 2**-86 of a rounding boundary). Every result lies in [−fl(π), fl(π)].
#: cos and sin of it come from numpy (glibc's libm: < 1 ulp each, <= 2**-53 on
#: values below 1; an assumption on the platform's libm, not part of ANGLE_ERROR).
ANGLE_ERROR = 2.0 ** -52 + 2.0 ** -86

#: Bound on ``‖x̂' − R_p x‖₂ / ‖x‖₂`` for a vector rotated by :func:`rotate` in
#: float64 (x̂' computed, R_p the exact rotation by the float64 angles p·θ):
#: per pair (a, b), ``a·cos − b·sin`` with cos, sin of the reduced angle within
#: ANGLE_ERROR + u of the exact ones (ANGLE_ERROR for the angle, the assumed 1-ulp
#: libm <= 2u near 1, the attention factor's product u) and the products and the
#: sum (2u + u): each component errs by at most (|a| + |b|)(ANGLE_ERROR + 6u);
#: summed over pairs in quadrature, ``<= √2·‖x‖·(ANGLE_ERROR + 6u)``.
#: A logit s·q'ᵀk' of rotated q', k' then errs by at most
#: ``(2η + η²)·R`` (η this constant, R = s‖q‖‖k‖): the rotation term of the
#: certified bounds (``numbarope.ops.streaming.exact_error_bound``, ``numbarope._pipeline.plan``).
ROTATION_ERROR = math.sqrt(2.0) * (ANGLE_ERROR + 6 * 2.0 ** -53)


def rotation_logit_error(radius):
    """Absolute error bound of a logit ``s·q'ᵀk'`` (``|·| <= radius``) of vectors
    rotated in float64 by numbarope, against the exact rotation: ``(2η + η²)·R``,
    η = :data:`ROTATION_ERROR`."""
    eta = ROTATION_ERROR
    return (2 * eta + eta * eta) * float(radius)


def _veltkamp(a):
    c = _SPLITTER * a
    hi = c - (c - a)
    return hi, a - hi


_C1_HI, _C1_LO = _veltkamp(_C1)
_C2_HI, _C2_LO = _veltkamp(_C2)
_C3_HI, _C3_LO = _veltkamp(_C3)


@njit(cache=True, nogil=True)
def _two_sum(a, b):
    # Knuth: s + e == a + b exactly
    s = a + b
    bb = s - a
    return s, (a - (s - bb)) + (b - bb)


@njit(cache=True, nogil=True)
def _two_prod(a, a_hi, a_lo, b, b_hi, b_lo):
    # Dekker: x + y == a * b exactly (a_hi + a_lo == a split in 26-bit halves;
    # no fma is used: numba compiles without fastmath, so no contraction)
    x = a * b
    y = a_lo * b_lo - (((x - a_hi * b_hi) - a_lo * b_hi) - a_hi * b_lo)
    return x, y


@njit(cache=True, nogil=True)
def _split(a):
    c = _SPLITTER * a
    hi = c - (c - a)
    return hi, a - hi


@njit(cache=True, nogil=True)
def _subtract_k_two_pi(s, c, k):
    # Continue the Sum2 cascade (s, c) with the six exact parts of −k·(C1 + C2 + C3).
    k_hi, k_lo = _split(k)
    p, e = _two_prod(k, k_hi, k_lo, _C1, _C1_HI, _C1_LO)
    s, t = _two_sum(s, -p)
    c += t
    s, t = _two_sum(s, -e)
    c += t
    p, e = _two_prod(k, k_hi, k_lo, _C2, _C2_HI, _C2_LO)
    s, t = _two_sum(s, -p)
    c += t
    s, t = _two_sum(s, -e)
    c += t
    p, e = _two_prod(k, k_hi, k_lo, _C3, _C3_HI, _C3_LO)
    s, t = _two_sum(s, -p)
    c += t
    s, t = _two_sum(s, -e)
    c += t
    return s, c


@njit(cache=True, nogil=True)
def _reduce_two_pi(hi, lo):
    """hi + lo (a double-double) reduced modulo 2π to [−π, π], rounded to float64."""
    k1 = np.rint(hi * _INV_2PI)
    if k1 == 0.0:
        s, c = _two_sum(hi, lo)
    else:
        k_hi, k_lo = _split(k1)
        p, e = _two_prod(k1, k_hi, k_lo, _C1, _C1_HI, _C1_LO)
        s, c = _two_sum(hi, -p)           # exact (Sterbenz) but for small k1
        s, t = _two_sum(s, lo)
        c += t
        s, t = _two_sum(s, -e)
        c += t
        p, e = _two_prod(k1, k_hi, k_lo, _C2, _C2_HI, _C2_LO)
        s, t = _two_sum(s, -p)
        c += t
        s, t = _two_sum(s, -e)
        c += t
        p, e = _two_prod(k1, k_hi, k_lo, _C3, _C3_HI, _C3_LO)
        s, t = _two_sum(s, -p)
        c += t
        s, t = _two_sum(s, -e)
        c += t
    k2 = np.rint((s + c) * _INV_2PI)
    if k2 != 0.0:
        s, c = _subtract_k_two_pi(s, c, k2)
    r = s + c
    # fl(z) > fl(π) means z > π + 1e-16 (fl(π) < π, ties to its even mantissa):
    # one more 2π off lands in (−π, −π + 1e-13] (and symmetrically)
    if r > _PI:
        s, c = _subtract_k_two_pi(s, c, 1.0)
        r = s + c
    elif r < -_PI:
        s, c = _subtract_k_two_pi(s, c, -1.0)
        r = s + c
    return r


@njit(cache=True, nogil=True)
def _reduced_angles_kernel(pos, inv, out):
    # out[i, j] = (pos[i] · inv[j]) mod 2π in [−π, π], from the exact product
    m = inv.shape[0]
    t_m = np.empty(m)
    t_hi = np.empty(m)
    t_lo = np.empty(m)
    t_e = np.empty(m, dtype=np.int64)
    for j in range(m):
        f, e = math.frexp(inv[j])
        t_m[j] = f
        t_hi[j], t_lo[j] = _split(f)
        t_e[j] = e
    for i in range(pos.shape[0]):
        f, ep = math.frexp(pos[i])
        f_hi, f_lo = _split(f)
        for j in range(m):
            x, y = _two_prod(f, f_hi, f_lo, t_m[j], t_hi[j], t_lo[j])
            e = ep + t_e[j]
            out[i, j] = _reduce_two_pi(math.ldexp(x, e), math.ldexp(y, e))


def _reduced_angles(pos, inv):
    """``(pos[:, None] · inv[None, :]) mod 2π`` in [−π, π], float64, from the exact products.

    ``pos`` and ``inv`` are finite float64 with ``max|pos| · max|inv| < MAX_ANGLE``
    (checked by the caller). Error <= :data:`ANGLE_ERROR`.
    """
    pos = np.ascontiguousarray(pos, dtype=np.float64)
    inv = np.ascontiguousarray(inv, dtype=np.float64)
    out = np.empty((pos.shape[0], inv.shape[0]))
    if out.size:
        _reduced_angles_kernel(pos, inv, out)
    return out


# ------------------------------------------------------------------ scalings
def _real(owner, name, value, *, lo=None, lo_open=True, allow_none=False):
    """``float(value)``, finite and above ``lo``; ValueError naming ``owner.name`` otherwise."""
    if value is None and allow_none:
        return None
    if isinstance(value, (str, bytes, bool)) or value is None:
        raise ValueError(f"{owner}: {name} must be a real number, got {value!r}")
    try:
        v = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{owner}: {name} must be a real number, got {value!r}") from None
    if not math.isfinite(v) or (lo is not None and (v <= lo if lo_open else v < lo)):
        bound = "" if lo is None else f" and {'>' if lo_open else '>='} {lo:g}"
        raise ValueError(f"{owner}: {name} must be finite{bound}, got {value!r}")
    return v


def _length(owner, name, value):
    """A positive int (a context length in tokens)."""
    if isinstance(value, (bool, float)) and not (isinstance(value, float) and value.is_integer()):
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    if isinstance(value, bool) or not isinstance(value, (int, np.integer, float)) or value < 1:
        raise ValueError(f"{owner}: {name} must be a positive int, got {value!r}")
    return int(value)


def _default_inv_freq(base, dim):
    return base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)


class _Scaling:
    """Common interface: ``inv_freq(base, dim, seq_len)`` and ``attention_factor``."""

    #: True when the frequencies depend on the sequence length of the call.
    depends_on_seq_len = False

    if TYPE_CHECKING:   # defined by every subclass
        def inv_freq(self, base: float, dim: int, seq_len: float | None = None) -> np.ndarray:
            ...

    @property
    def effective_attention_factor(self) -> float:
        """Factor multiplying cos and sin (1.0: none)."""
        return 1.0


@dataclass(frozen=True)
class LinearScaling(_Scaling):
    """Linear position interpolation: ``inv_freq / factor`` (transformers ``"linear"``).

    Parameters
    ----------
    factor : float
        Positions are divided by ``factor`` (> 0).

    References
    ----------
    Chen et al. 2023, arXiv:2306.15595, eq. (4).
    """

    factor: float

    def __post_init__(self):
        object.__setattr__(self, "factor", _real("LinearScaling", "factor", self.factor, lo=0))

    def inv_freq(self, base: float, dim: int, seq_len: float | None = None) -> np.ndarray:
        return _default_inv_freq(base, dim) / self.factor


@dataclass(frozen=True)
class DynamicNTKScaling(_Scaling):
    """Dynamic NTK-aware scaling (transformers ``"dynamic"``).

    For a call on ``seq_len`` positions (``max position + 1``) longer than
    ``original_max_position_embeddings`` = L, the base grows to
    ``base · (factor · seq_len / L − (factor − 1)) ** (dim / (dim − 2))``; up to
    L the frequencies are the unscaled ones. Unlike transformers'
    ``LlamaRotaryEmbedding`` no state is kept between calls: each call uses the
    frequencies of its own length (transformers keeps the longest length seen
    until a call shorter than L resets it).

    Parameters
    ----------
    factor : float
        Scaling factor (> 0).
    original_max_position_embeddings : int
        L, the length trained on (transformers uses ``config.max_position_embeddings``).

    References
    ----------
    bloc97 (NTK-aware) and emozilla (dynamic), r/LocalLLaMA 2023; Peng et al.
    2023 (YaRN), §3.3.
    """

    factor: float
    original_max_position_embeddings: int

    depends_on_seq_len = True

    def __post_init__(self):
        object.__setattr__(self, "factor", _real("DynamicNTKScaling", "factor", self.factor, lo=0))
        object.__setattr__(self, "original_max_position_embeddings",
                           _length("DynamicNTKScaling", "original_max_position_embeddings",
                                   self.original_max_position_embeddings))

    def inv_freq(self, base: float, dim: int, seq_len: float | None = None) -> np.ndarray:
        L = self.original_max_position_embeddings
        seq_len = L if seq_len is None else max(float(seq_len), L)
        if dim > 2:       # with one pair the frequency is base**0 = 1 whatever the base
            base = base * (self.factor * seq_len / L - (self.factor - 1)) ** (dim / (dim - 2))
        return _default_inv_freq(base, dim)


@dataclass(frozen=True)
class Llama3Scaling(_Scaling):
    """Llama 3.1 frequency-dependent scaling (transformers ``"llama3"``).

    With wavelength ``λ = 2π / inv_freq``: ``λ < L / high_freq_factor`` are
    kept, ``λ > L / low_freq_factor`` are divided by ``factor``, and in between
    ``(1 − s) inv_freq / factor + s inv_freq`` with ``s = (L / λ −
    low_freq_factor) / (high_freq_factor − low_freq_factor)``.

    Parameters
    ----------
    factor : float
        Scaling of the low frequencies (> 0; 8 in Llama 3.1).
    low_freq_factor, high_freq_factor : float
        Bounds of the smoothed band (1 and 4 in Llama 3.1); ``0 < low < high``.
    original_max_position_embeddings : int
        L, the pretraining length (8192 in Llama 3.1).

    References
    ----------
    Meta, Llama 3.1 ``apply_scaling`` (meta-llama/llama-models); Grattafiori
    et al. 2024, arXiv:2407.21783.
    """

    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def __post_init__(self):
        for name in ("factor", "low_freq_factor", "high_freq_factor"):
            object.__setattr__(self, name, _real("Llama3Scaling", name, getattr(self, name), lo=0))
        if self.high_freq_factor <= self.low_freq_factor:
            raise ValueError(
                f"Llama3Scaling: high_freq_factor must be > low_freq_factor, got "
                f"high_freq_factor={self.high_freq_factor} and low_freq_factor={self.low_freq_factor}")
        object.__setattr__(self, "original_max_position_embeddings",
                           _length("Llama3Scaling", "original_max_position_embeddings",
                                   self.original_max_position_embeddings))

    def inv_freq(self, base: float, dim: int, seq_len: float | None = None) -> np.ndarray:
        inv = _default_inv_freq(base, dim)
        L = self.original_max_position_embeddings
        wavelen = 2 * np.pi / inv
        out = np.where(wavelen > L / self.low_freq_factor, inv / self.factor, inv)
        smooth = (L / wavelen - self.low_freq_factor) / (self.high_freq_factor - self.low_freq_factor)
        smoothed = (1 - smooth) * out / self.factor + smooth * out
        medium = ~(wavelen < L / self.high_freq_factor) & ~(wavelen > L / self.low_freq_factor)
        return np.where(medium, smoothed, out)


def _yarn_mscale(scale, mscale=1.0):
    return 1.0 if scale <= 1 else 0.1 * mscale * math.log(scale) + 1.0


@dataclass(frozen=True)
class YarnScaling(_Scaling):
    """YaRN: NTK-by-parts interpolation and attention temperature (transformers ``"yarn"``).

    Pair ``i`` gets ``inv_freq · ((1 − γ_i) / factor + γ_i)`` with the ramp
    ``γ_i = 1 − clip((i − low) / (high − low), 0, 1)``, where ``low``/``high``
    are the pair indices that turn ``beta_fast``/``beta_slow`` times in
    ``original_max_position_embeddings`` positions (floored/ceiled when
    ``truncate``). cos and sin are multiplied by :attr:`attention_factor`.

    Parameters
    ----------
    factor : float
        Context extension factor s (> 0).
    original_max_position_embeddings : int
        Pretraining length L.
    beta_fast, beta_slow : float, optional
        Ramp bounds in rotations (32 and 1 as in the paper).
    attention_factor : float or None, optional
        Explicit factor on cos and sin; default ``0.1 ln s + 1`` (1 for s <= 1),
        or ``mscale(s, mscale) / mscale(s, mscale_all_dim)`` when both are set
        (DeepSeek-V2/V3).
    mscale, mscale_all_dim : float or None, optional
        See ``attention_factor``.
    truncate : bool, optional
        Round the ramp bounds to integers (default True, as transformers).

    References
    ----------
    Peng et al. 2023, arXiv:2309.00071, §3.2 (eq. 17-18, ramp) and §3.4 (eq. 22,
    ``sqrt(1/t) = 0.1 ln s + 1``).
    """

    factor: float
    original_max_position_embeddings: int
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    attention_factor: float | None = None
    mscale: float | None = None
    mscale_all_dim: float | None = None
    truncate: bool = True

    def __post_init__(self):
        o = "YarnScaling"
        s = object.__setattr__
        s(self, "factor", _real(o, "factor", self.factor, lo=0))
        s(self, "original_max_position_embeddings",
          _length(o, "original_max_position_embeddings", self.original_max_position_embeddings))
        s(self, "beta_fast", _real(o, "beta_fast", self.beta_fast, lo=0))
        s(self, "beta_slow", _real(o, "beta_slow", self.beta_slow, lo=0))
        if self.beta_fast < self.beta_slow:
            raise ValueError(f"YarnScaling: beta_fast must be >= beta_slow, got beta_fast="
                             f"{self.beta_fast!r} and beta_slow={self.beta_slow!r}")
        s(self, "attention_factor", _real(o, "attention_factor", self.attention_factor, lo=0,
                                          allow_none=True))
        s(self, "mscale", _real(o, "mscale", self.mscale, allow_none=True))
        s(self, "mscale_all_dim", _real(o, "mscale_all_dim", self.mscale_all_dim, allow_none=True))
        if not isinstance(self.truncate, (bool, np.bool_)):
            raise ValueError(f"YarnScaling: truncate must be a bool, got {self.truncate!r}")
        s(self, "truncate", bool(self.truncate))

    @property
    def effective_attention_factor(self) -> float:
        """Factor on cos and sin: ``attention_factor``, else from ``factor`` (and mscales)."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.mscale and self.mscale_all_dim:
            return _yarn_mscale(self.factor, self.mscale) / _yarn_mscale(self.factor, self.mscale_all_dim)
        return _yarn_mscale(self.factor)

    def inv_freq(self, base: float, dim: int, seq_len: float | None = None) -> np.ndarray:
        L = self.original_max_position_embeddings

        def correction_dim(rotations):
            return dim * math.log(L / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = correction_dim(self.beta_fast), correction_dim(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        low, high = max(low, 0), min(high, dim - 1)
        if low == high:
            high += 0.001     # as transformers: avoid 0/0
        ramp = np.clip((np.arange(dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        extrapolation = 1.0 - ramp
        inv = _default_inv_freq(base, dim)
        return inv / self.factor * (1 - extrapolation) + inv * extrapolation


@dataclass(frozen=True)
class LongRopeScaling(_Scaling):
    """LongRoPE per-frequency rescaling (transformers ``"longrope"``, Phi-3).

    ``inv_freq[i] / ext[i]`` with ``ext = long_factor`` when the call's
    ``seq_len`` (max position + 1) exceeds ``original_max_position_embeddings``,
    ``short_factor`` otherwise. cos and sin are multiplied by
    :attr:`attention_factor`, default ``sqrt(1 + ln factor / ln L)`` (1 when
    ``factor <= 1``).

    Parameters
    ----------
    short_factor, long_factor : sequence of float
        One positive factor per rotated pair (``dim / 2`` each).
    original_max_position_embeddings : int
        L, the pretraining length.
    factor : float, optional
        Extension factor, used only for the default attention factor (transformers
        uses ``max_position_embeddings / L`` when it is missing).
    attention_factor : float or None, optional
        Explicit factor on cos and sin.

    References
    ----------
    Ding et al. 2024, arXiv:2402.13753.
    """

    short_factor: tuple
    long_factor: tuple
    original_max_position_embeddings: int
    factor: float = 1.0
    attention_factor: float | None = None

    depends_on_seq_len = True

    def __post_init__(self):
        o = "LongRopeScaling"
        s = object.__setattr__
        for name in ("short_factor", "long_factor"):
            val = getattr(self, name)
            if isinstance(val, (str, bytes)) or not hasattr(val, "__len__") or len(val) == 0:
                raise ValueError(f"{o}: {name} must be a non-empty sequence of numbers, got {val!r}")
            s(self, name, tuple(_real(o, f"{name}[{i}]", v, lo=0) for i, v in enumerate(val)))
        if len(self.short_factor) != len(self.long_factor):
            raise ValueError(f"{o}: short_factor and long_factor must have the same length, got "
                             f"{len(self.short_factor)} and {len(self.long_factor)}")
        s(self, "original_max_position_embeddings",
          _length(o, "original_max_position_embeddings", self.original_max_position_embeddings))
        s(self, "factor", _real(o, "factor", self.factor, lo=0))
        s(self, "attention_factor", _real(o, "attention_factor", self.attention_factor, lo=0,
                                          allow_none=True))

    @property
    def effective_attention_factor(self) -> float:
        """Factor on cos and sin: ``attention_factor``, else ``sqrt(1 + ln factor / ln L)``."""
        if self.attention_factor is not None:
            return self.attention_factor
        if self.factor <= 1.0:
            return 1.0
        return math.sqrt(1 + math.log(self.factor) / math.log(self.original_max_position_embeddings))

    def inv_freq(self, base: float, dim: int, seq_len: float | None = None) -> np.ndarray:
        if len(self.short_factor) != dim // 2:
            raise ValueError(
                f"LongRopeScaling: short_factor and long_factor have {len(self.short_factor)} "
                f"entries, the rotary dim {dim} needs {dim // 2}")
        long = seq_len is not None and seq_len > self.original_max_position_embeddings
        ext = np.array(self.long_factor if long else self.short_factor, dtype=np.float64)
        return _default_inv_freq(base, dim) / ext


_SCALINGS = (LinearScaling, DynamicNTKScaling, Llama3Scaling, YarnScaling, LongRopeScaling)

#: transformers ``rope_parameters`` keys (5.24 ``RopeParameters``, plus the legacy "type").
_HF_KEYS = frozenset({
    "rope_theta", "rope_type", "type", "partial_rotary_factor", "factor",
    "original_max_position_embeddings", "attention_factor", "beta_fast", "beta_slow",
    "short_factor", "long_factor", "low_freq_factor", "high_freq_factor", "mscale",
    "mscale_all_dim", "truncate", "mrope_section"})
_HF_TYPES = ("default", "linear", "dynamic", "llama3", "yarn", "longrope")


def _scaling_from_hf(params, max_position_embeddings):
    """The scaling object of a transformers ``rope_parameters`` dict (None for "default")."""
    kind = params.get("rope_type", params.get("type", "default"))
    where = "Rotary.from_hf"
    if kind not in _HF_TYPES:
        raise ValueError(f"{where}: rope_type={kind!r} is not supported; use one of {_HF_TYPES}")
    if params.get("mrope_section") is not None:
        raise ValueError(f"{where}: mrope_section (multimodal RoPE) is not supported")

    def need(key):
        if params.get(key) is None:
            raise ValueError(f"{where}: rope_type={kind!r} needs rope_parameters[{key!r}]")
        return params[key]

    def original():
        if params.get("original_max_position_embeddings") is not None:
            return params["original_max_position_embeddings"]
        if max_position_embeddings is None:
            raise ValueError(f"{where}: rope_type={kind!r} needs rope_parameters"
                             "['original_max_position_embeddings'] or max_position_embeddings")
        return max_position_embeddings      # as transformers' standardize_rope_params

    def implicit_factor(L):
        if params.get("factor") is not None:
            return params["factor"]
        if max_position_embeddings is None:
            raise ValueError(f"{where}: rope_type={kind!r} needs rope_parameters['factor'] or "
                             "max_position_embeddings (factor = max_position_embeddings / "
                             "original_max_position_embeddings)")
        return _length(where, "max_position_embeddings", max_position_embeddings) / _length(
            where, "original_max_position_embeddings", L)

    if kind == "default":
        return None
    if kind == "linear":
        return LinearScaling(need("factor"))
    if kind == "dynamic":
        # transformers 5.24 compares the length with config.max_position_embeddings
        L = max_position_embeddings
        if L is None:
            L = params.get("original_max_position_embeddings")
        if L is None:
            raise ValueError(f"{where}: rope_type='dynamic' needs max_position_embeddings")
        return DynamicNTKScaling(need("factor"), L)
    if kind == "llama3":
        return Llama3Scaling(need("factor"), need("low_freq_factor"), need("high_freq_factor"),
                             original())
    if kind == "yarn":
        L = original()
        # transformers reads beta_fast/beta_slow with `or`: 0 and None mean the default
        return YarnScaling(implicit_factor(L), L, beta_fast=params.get("beta_fast") or 32.0,
                           beta_slow=params.get("beta_slow") or 1.0,
                           attention_factor=params.get("attention_factor"),
                           mscale=params.get("mscale"), mscale_all_dim=params.get("mscale_all_dim"),
                           truncate=params.get("truncate", True))
    L = original()     # longrope
    return LongRopeScaling(need("short_factor"), need("long_factor"), L,
                           factor=implicit_factor(L),
                           attention_factor=params.get("attention_factor"))


def _odd_dim_equivalent(d, base, layout, scaling):
    """The even-dim ``Rotary`` rotating as transformers' running models do for an odd
    rotary dim ``d`` (None when no ``Rotary`` does: dynamic NTK, YaRN, LongRoPE with
    a factor count other than (d+1)/2)."""
    nf = (d + 1) // 2
    if isinstance(scaling, (DynamicNTKScaling, YarnScaling)) or (
            isinstance(scaling, LongRopeScaling) and len(scaling.short_factor) != nf):
        return None
    # base**(-2i/d) == (base**((d+1)/d))**(-2i/(d+1)): same frequencies on d+1 features
    return Rotary(dim=d + 1, base=base ** ((d + 1) / d), layout=layout, scaling=scaling)


def _odd_dim_message(d, base, layout, scaling):
    """Why an odd rotary dim ``d`` is refused: what transformers 5.24 does with it, and
    the nearest working choice."""
    nf = (d + 1) // 2
    msg = (f"transformers 5.24 has no consistent rotation for an odd rotary dim: its "
           f"frequencies (modeling_rope_utils._compute_default_rope_parameters) are the "
           f"{nf} values base**(-2i/{d}), i < {nf}; GPT-NeoX, Phi-3, Nemotron (rotate_half) "
           f"and GLM, GLM-4 (interleaved) rotate {d + 1} features with them (their "
           f"apply_rotary_pos_emb slices cos.shape[-1] = {d + 1} features), while Phi, "
           f"StableLM, Persimmon (rotary_ndims = {d}), GPT-J and CodeGen (rotary_dim = {d}) "
           f"fail with a shape error ({d} features against {d + 1} cos/sin columns), and "
           f"its YaRN fails for every model ({d // 2} ramp entries against {nf} frequencies)")
    eq = _odd_dim_equivalent(d, base, layout, scaling)
    if eq is not None:
        msg += (f". The rotation of the models that run is Rotary(dim={d + 1}, "
                f"base=base**({d + 1}/{d})), here {eq!r}")
    else:
        why = ("its base growth uses the exponent dim/(dim-2)"
               if isinstance(scaling, DynamicNTKScaling) else
               "transformers fails with it" if isinstance(scaling, YarnScaling) else
               f"transformers needs {nf} short/long factors")
        msg += f". No Rotary reproduces it with {type(scaling).__name__} ({why})"
    even = f"{d - 1} or {d + 1}" if d > 1 else f"{d + 1}"
    return msg + f"; otherwise use an even rotary dim: {even}"


@dataclass(frozen=True)
class Rotary:
    """Parameters of a rotary position embedding.

    Parameters
    ----------
    dim : int or None, optional
        Number of leading features rotated; must be even and at most
        ``head_dim``. ``None`` (default) rotates all ``head_dim`` features. An
        odd dim is refused: transformers 5.24 has no consistent rotation for it
        (GPT-NeoX, Phi-3, Nemotron, GLM rotate ``dim + 1`` features with the
        frequencies ``base**(-2i/dim)``, which ``Rotary(dim=dim + 1,
        base=base**((dim + 1)/dim))`` reproduces; Phi, StableLM, Persimmon,
        GPT-J, CodeGen and its YaRN fail), and the error says so.
    base : float, optional
        Frequency base (10000.0 in RoFormer and Llama 2; 500000.0 in Llama 3).
    layout : {"half", "interleaved"}, optional
        Feature pairing: ``"half"`` pairs ``i`` with ``i + dim/2`` (HF
        ``rotate_half``), ``"interleaved"`` pairs ``2i`` with ``2i+1``. Aliases:
        ``"neox"`` and ``"rotate_half"`` for ``"half"``; ``"gptj"`` and
        ``"rotate_every_two"`` for ``"interleaved"`` (stored as the canonical name).
    scaling : float, LinearScaling, DynamicNTKScaling, Llama3Scaling, YarnScaling, LongRopeScaling or None, optional
        Context-extension variant. A float ``s`` means ``LinearScaling(s)``
        (positions divided by ``s``, as HF ``rope_type="linear"``). ``None``:
        plain RoPE. To use a transformers ``config.rope_parameters`` dict, see
        :meth:`from_hf`.

    Raises
    ------
    ValueError
        If ``layout`` is unknown, ``base`` is not finite and > 1, ``dim`` is
        not a positive even integer, or ``scaling`` is not finite and > 0.
    TypeError
        If ``base`` or ``dim`` is not a number, or ``scaling`` is not one of the
        types above.

    Notes
    -----
    The scaling formulas are those of HF transformers 5.24
    (``modeling_rope_utils.ROPE_INIT_FUNCTIONS``), computed in float64.
    Frequencies of :class:`DynamicNTKScaling` and :class:`LongRopeScaling`
    depend on the sequence length of each call, ``max(positions) + 1`` (``n``
    for the default positions), with no state kept between calls. YaRN and
    LongRoPE multiply cos and sin by :attr:`attention_factor`, which
    :func:`rotary_tables`, :func:`apply_rotary` and ``rope_attention`` apply to
    the rotated features (the logits of those features grow by its square).

    Examples
    --------
    >>> import numpy as np
    >>> from numbarope import Rotary, apply_rotary
    >>> x = np.array([[1.0, 2.0, 3.0, 4.0]])
    >>> np.round(apply_rotary(x, Rotary(), positions=[1]), 4)
    array([[-1.9841,  1.9599,  2.4624,  4.0198]])
    >>> rot = Rotary.from_hf({"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
    ...                       "original_max_position_embeddings": 2048})
    >>> round(rot.attention_factor, 6)
    1.138629
    """

    dim: int | None = None
    base: float = 10000.0
    layout: Literal["half", "interleaved"] = "half"
    scaling: _Scaling | None = None

    if TYPE_CHECKING:
        # What the constructor accepts: __post_init__ maps the layout aliases to the
        # canonical names and a float scaling s to LinearScaling(s).
        def __init__(self, dim: int | None = None, base: float = 10000.0,
                     layout: Literal["half", "interleaved", "neox", "rotate_half", "gptj",
                                     "rotate_every_two"] = "half",
                     scaling: float | _Scaling | None = None) -> None:
            ...

    def __post_init__(self):
        layout = LAYOUT_ALIASES.get(self.layout, self.layout) if isinstance(self.layout, str) \
            else self.layout
        if layout not in LAYOUTS:
            raise ValueError(
                f"Rotary: layout={self.layout!r} is unknown; use one of {LAYOUTS} or the "
                f"aliases {', '.join(f'{a!r} ({c})' for a, c in LAYOUT_ALIASES.items())}")
        object.__setattr__(self, "layout", layout)
        if isinstance(self.base, (str, bytes, bool)):
            raise TypeError(f"Rotary: base must be a real number, got {self.base!r}")
        try:
            base = float(self.base)
        except (TypeError, ValueError):
            raise TypeError(f"Rotary: base must be a real number, got {self.base!r}") from None
        if not np.isfinite(base) or base <= 1.0:
            raise ValueError(f"Rotary: base must be finite and > 1, got {self.base!r}")
        object.__setattr__(self, "base", base)
        if self.dim is not None:
            if isinstance(self.dim, bool) or not isinstance(self.dim, (int, np.integer)):
                raise TypeError(f"Rotary: dim must be an int or None, got {self.dim!r}")
            if self.dim <= 0:
                raise ValueError(
                    f"Rotary: dim must be a positive even integer, got {self.dim}")
            object.__setattr__(self, "dim", int(self.dim))
        if isinstance(self.scaling, Mapping):
            raise TypeError("Rotary: scaling does not take a dict; use Rotary.from_hf("
                            "config.rope_parameters, ...) for transformers' rope_parameters")
        if isinstance(self.scaling, (str, bytes, bool)) or not (
                self.scaling is None or isinstance(self.scaling, _SCALINGS)
                or isinstance(self.scaling, (int, float, np.integer, np.floating))):
            raise TypeError(f"Rotary: scaling must be a real number, one of "
                            f"{', '.join(c.__name__ for c in _SCALINGS)} or None, got "
                            f"{self.scaling!r}")
        if self.scaling is not None and not isinstance(self.scaling, _SCALINGS):
            try:
                sc = LinearScaling(self.scaling)
            except ValueError:
                raise ValueError(f"Rotary: scaling must be finite and > 0, got "
                                 f"{self.scaling!r}") from None
            object.__setattr__(self, "scaling", sc)
        if self.dim is not None and self.dim % 2:
            raise ValueError(
                f"Rotary: dim must be a positive even integer, got {self.dim}. "
                + _odd_dim_message(self.dim, base, layout, self.scaling))

    @classmethod
    def from_hf(cls, rope_parameters: Mapping[str, Any] | Any, head_dim: int | None = None,
                max_position_embeddings: int | None = None,
                partial_rotary_factor: float | None = None,
                layout: Literal["half", "interleaved", "neox", "rotate_half", "gptj",
                                "rotate_every_two"] = "half") -> Rotary:
        """``Rotary`` of a transformers model, from its ``config.rope_parameters``.

        Parameters
        ----------
        rope_parameters : dict or transformers config
            ``config.rope_parameters`` as in transformers 5.24 (keys
            ``"rope_type"`` (or legacy ``"type"``), ``"rope_theta"``,
            ``"factor"``, ``"original_max_position_embeddings"``,
            ``"low_freq_factor"``, ``"high_freq_factor"``, ``"beta_fast"``,
            ``"beta_slow"``, ``"attention_factor"``, ``"mscale"``,
            ``"mscale_all_dim"``, ``"truncate"``, ``"short_factor"``,
            ``"long_factor"``, ``"partial_rotary_factor"``), for rope types
            ``{"default", "linear", "dynamic", "llama3", "yarn", "longrope"}``.
            A config object is also accepted: its ``rope_parameters``,
            ``head_dim`` (or ``hidden_size // num_attention_heads``),
            ``max_position_embeddings`` and ``partial_rotary_factor`` are read
            unless given here.
        head_dim : int, optional
            Features per head; needed with a partial rotary factor < 1.
        max_position_embeddings : int, optional
            ``config.max_position_embeddings``: the length threshold of
            ``"dynamic"``, the default of ``original_max_position_embeddings``,
            and (divided by the latter) the default ``factor`` of ``"yarn"`` and
            ``"longrope"``, as transformers does.
        partial_rotary_factor : float, optional
            Fraction of ``head_dim`` rotated (overrides the dict's); the rotated
            dim is ``int(head_dim * partial_rotary_factor)``. An odd rotated dim
            is refused (see ``dim`` in :class:`Rotary`; the message gives the
            equivalent ``Rotary`` when there is one).
        layout : {"half", "interleaved"}, optional
            Feature pairing (transformers' Llama family uses ``"half"``).

        Returns
        -------
        Rotary

        Raises
        ------
        ValueError
            On an unknown key or rope type, a missing required key, a bad
            value (the message names it), or an odd rotated dim.
        """
        if not isinstance(rope_parameters, Mapping) and hasattr(rope_parameters, "rope_parameters"):
            config = rope_parameters
            rope_parameters = config.rope_parameters or {}
            if head_dim is None:
                head_dim = getattr(config, "head_dim", None) or (
                    config.hidden_size // config.num_attention_heads)
            if max_position_embeddings is None:
                max_position_embeddings = getattr(config, "max_position_embeddings", None)
            if partial_rotary_factor is None:
                partial_rotary_factor = getattr(config, "partial_rotary_factor", None)
        if not isinstance(rope_parameters, Mapping):
            raise TypeError(f"Rotary.from_hf: rope_parameters must be a dict, got "
                            f"{type(rope_parameters).__name__}")
        unknown = sorted(set(rope_parameters) - _HF_KEYS)
        if unknown:
            raise ValueError(f"Rotary.from_hf: unknown rope_parameters keys {unknown}; "
                             f"known: {sorted(_HF_KEYS)}")
        base = rope_parameters.get("rope_theta")
        base = 10000.0 if base is None else base    # transformers' default_theta
        prf = partial_rotary_factor if partial_rotary_factor is not None else \
            rope_parameters.get("partial_rotary_factor")
        dim = None
        if prf is not None:
            prf = _real("Rotary.from_hf", "partial_rotary_factor", prf, lo=0)
            if prf > 1:
                raise ValueError(f"Rotary.from_hf: partial_rotary_factor must be in (0, 1], "
                                 f"got {prf}")
            if prf < 1:
                if head_dim is None:
                    raise ValueError("Rotary.from_hf: partial_rotary_factor < 1 needs head_dim")
                dim = int(_length("Rotary.from_hf", "head_dim", head_dim) * prf)
                if dim < 1:
                    raise ValueError(
                        f"Rotary.from_hf: partial_rotary_factor={prf} of head_dim={head_dim} "
                        f"rotates {dim} features (transformers rotates none); use rotary=None")
        if max_position_embeddings is not None:
            max_position_embeddings = _length("Rotary.from_hf", "max_position_embeddings",
                                              max_position_embeddings)
        scaling = _scaling_from_hf(rope_parameters, max_position_embeddings)
        if dim is not None and dim % 2:
            ref = cls(base=base, layout=layout, scaling=scaling)   # validates base, layout
            raise ValueError(
                f"Rotary.from_hf: partial_rotary_factor={prf} of head_dim={head_dim} "
                f"rotates {dim} features, an odd number. "
                + _odd_dim_message(dim, ref.base, ref.layout, scaling))
        return cls(dim=dim, base=base, layout=layout, scaling=scaling)

    @property
    def attention_factor(self) -> float:
        """Factor on cos and sin (YaRN, LongRoPE; 1.0 otherwise)."""
        return 1.0 if self.scaling is None else self.scaling.effective_attention_factor

    def rotary_dim(self, head_dim: int) -> int:
        """Number of rotated features for a given ``head_dim`` (validated)."""
        dim = head_dim if self.dim is None else self.dim
        if dim > head_dim:
            raise ValueError(
                f"Rotary: dim={dim} is larger than head_dim={head_dim}; "
                f"use dim <= {head_dim}")
        if dim % 2:
            fix = (f"pass Rotary(dim={dim - 1}) for a partial rotary" if dim > 1 else
                   "a single feature cannot be rotated: use rotary=None")
            raise ValueError(
                f"Rotary: the rotated dim must be even, got head_dim={head_dim} with "
                f"dim=None; {fix} (transformers 5.24 refuses a fully rotated odd head_dim "
                f"> 4 too: modeling_rope_utils.RotaryEmbeddingConfigMixin.validate_rope)")
        return dim

    def inv_freq(self, head_dim: int, seq_len: float | None = None) -> np.ndarray:
        """Inverse frequencies, shape ``(dim/2,)``, float64, in rad/position.

        ``base ** (-2i/dim)`` modified by ``scaling``. ``seq_len`` (max
        position + 1 of the call) matters only to dynamic NTK and LongRoPE;
        ``None`` gives their frequencies at the pretraining length.
        """
        dim = self.rotary_dim(head_dim)
        if self.scaling is None:
            return _default_inv_freq(self.base, dim)
        return self.scaling.inv_freq(self.base, dim, seq_len)

    def angles(self, positions: ArrayLike, head_dim: int,
               seq_len: float | None = None) -> np.ndarray:
        """Angles ``positions[:, None] * inv_freq[None, :]`` reduced modulo 2π, ``(n, dim/2)``.

        float64 radians in [−π, π] (the float64 nearest π at most). ``seq_len``
        defaults to ``max(positions) + 1`` (see :meth:`inv_freq`). The
        attention factor is not included.

        Each angle is within :data:`ANGLE_ERROR` = 2**-52 + 2**-86 rad (half
        an ulp of π; the float64 result is the correctly rounded value but for
        near-ties) of the exact reduced angle of the float64 position times the
        float64 inverse frequency, at any position: the product is formed
        exactly as a double-double (Dekker's two-product) and reduced with 2π
        held to 161 bits (three float64 constants, each ``k·C_i`` an exact
        two-product, summed with compensated two-sums). So RoPE is shift
        invariant to rounding: the angles of positions ``p0 + i`` and ``i``
        differ by ``p0·θ`` mod 2π to 2·ANGLE_ERROR = 4.5e-16 rad whatever
        ``p0`` (a rounded float64 or 80-bit ``np.longdouble`` product errs by up
        to ``|p·θ|·2**-53`` or ``|p·θ|·2**-64``: 5e-7 or 2e-10 rad at p =
        2**32). Positions are converted to float64 (integers beyond 2**53 are
        rounded).

        Raises
        ------
        ValueError
            If ``positions`` has NaN or inf, or ``|position| · max(inv_freq)``
            reaches :data:`MAX_ANGLE` = 2**60 rad (the range of the exact
            reduction; the message gives the largest position supported).
        """
        pos = np.asarray(positions, dtype=np.float64).reshape(-1)
        if pos.size and not np.isfinite(pos).all():
            raise ValueError("Rotary.angles: positions contain NaN or inf")
        if seq_len is None and pos.size:
            seq_len = float(pos.max()) + 1
        inv = np.asarray(self.inv_freq(head_dim, seq_len), dtype=np.float64)
        if pos.size and inv.size:
            p_max, t_max = float(np.abs(pos).max()), float(np.abs(inv).max())
            if p_max * t_max >= MAX_ANGLE or not math.isfinite(t_max):
                p_txt = str(int(p_max)) if p_max.is_integer() else repr(p_max)
                raise ValueError(
                    f"Rotary.angles: positions up to |p| = {p_txt} give rotary angles "
                    f"|p| · inv_freq up to {p_max * t_max:.4g} rad (largest inverse frequency "
                    f"{t_max:.6g}); the exact reduction modulo 2π supports angles below "
                    f"2**60 rad, i.e. positions |p| < {MAX_ANGLE / t_max:.6g} for this Rotary")
        return _reduced_angles(pos, inv)

    def pairs(self, head_dim: int) -> tuple[np.ndarray, np.ndarray]:
        """Index arrays ``(first, second)`` of the rotated feature pairs, each ``(dim/2,)``."""
        dim = self.rotary_dim(head_dim)
        if self.layout == "half":
            first = np.arange(dim // 2)
            second = first + dim // 2
        else:
            first = np.arange(0, dim, 2)
            second = first + 1
        return first, second


#: Largest cos/sin table pair (bytes) kept by the cache of default positions.
_TABLE_CACHE_BYTES = 64 * 2**20


def _tables(rotary, positions, head_dim, seq_len=None):
    """``a·cos, a·sin`` of the rotation angles (a: attention factor), ``(n, dim/2)`` float64
    (read-only)."""
    ang = rotary.angles(positions, head_dim, seq_len)
    cos, sin = np.cos(ang), np.sin(ang)
    a = rotary.attention_factor
    if a != 1.0:
        cos *= a
        sin *= a
    cos.setflags(write=False)
    sin.setflags(write=False)
    return cos, sin


@lru_cache(maxsize=2)
def _cached_tables(rotary, n, head_dim):
    return _tables(rotary, np.arange(n), head_dim, seq_len=n)


def rotary_tables(rotary, n, head_dim, positions=None, seq_len=None):
    """``cos, sin`` tables of positions 0..n−1 (or ``positions``), cached for the former.

    Both are multiplied by ``rotary.attention_factor`` (YaRN, LongRoPE), so
    that :func:`rotate` needs no other input. Frequencies that depend on the
    sequence length use ``n`` for the default positions and
    ``max(positions) + 1`` otherwise (as transformers' ``max(position_ids) + 1``),
    or ``seq_len`` when given (a batch of rows shares transformers' batch maximum).

    The angles are the exact products ``p · inv_freq`` reduced modulo 2π
    (:meth:`Rotary.angles`): each within :data:`ANGLE_ERROR` = 2**-52 + 2**-86
    rad (half an ulp of π) of the exact reduced angle of the float64 position
    times the float64 inverse frequency, at any position. cos and sin are
    numpy's of that float64 angle: assumed within 1 ulp (glibc's libm; numpy's
    own SIMD paths on other platforms may differ), so each table entry is
    within ``a · (ANGLE_ERROR + 2**-53)`` of the exact ``a·cos``/``a·sin``
    (plus the rounding of the product by ``a`` when ``a != 1``). The exact
    reduction costs more than the rotation itself: calls on sequences of the
    same length share one table pair (two pairs are kept, each of at most 64 MiB).

    Raises
    ------
    ValueError
        If ``positions`` holds NaN, inf, or positions beyond the range of the
        reduction (``|p| · max(inv_freq) >= 2**60``; see :meth:`Rotary.angles`).
    """
    if positions is None:
        if n * rotary.rotary_dim(head_dim) * 8 <= _TABLE_CACHE_BYTES:
            return _cached_tables(rotary, int(n), int(head_dim))
        positions = np.arange(n)
    return _tables(rotary, positions, head_dim, seq_len)


def _pair_slices(rotary, head_dim):
    dim = rotary.rotary_dim(head_dim)
    if rotary.layout == "half":
        return slice(0, dim // 2), slice(dim // 2, dim)
    return slice(0, dim, 2), slice(1, dim, 2)


@njit(cache=True, nogil=True)
def _rotate_kernel(x, cos, sin, a0, b0, step, out):
    # one pass: copy the row in float64, rotate its pairs (a0 + p·step, b0 + p·step)
    B, n, E = x.shape
    half = cos.shape[1]
    for b in range(B):
        for i in range(n):
            for e in range(E):
                out[b, i, e] = x[b, i, e]
            for p in range(half):
                ia = a0 + p * step
                ib = b0 + p * step
                xa = out[b, i, ia]
                xb = out[b, i, ib]
                c = cos[i, p]
                s = sin[i, p]
                out[b, i, ia] = xa * c - xb * s
                out[b, i, ib] = xb * c + xa * s


def rotate(x, rotary, cos, sin, dtype=np.float64):
    """Rotated copy of a validated ``x`` (..., n, E) in ``dtype``, C-contiguous.

    ``out_a = x_a cos θ − x_b sin θ``, ``out_b = x_b cos θ + x_a sin θ`` for the
    feature pairs of ``rotary``, computed in float64 in one pass (numba).
    """
    n, E = x.shape[-2:]
    if x.size == 0:
        return np.zeros(x.shape, dtype=dtype)
    x3 = x.reshape((-1, n, E))
    out = np.empty(x3.shape, dtype=np.float64)
    if out.size:
        a, b = _pair_slices(rotary, E)
        _rotate_kernel(x3, np.ascontiguousarray(cos), np.ascontiguousarray(sin),
                       a.start, b.start, a.step or 1, out)
    out = out.reshape(x.shape)
    return out if dtype == np.float64 else out.astype(dtype)


def apply_rotary(x: ArrayLike, rotary: Rotary | None = None,
                 positions: ArrayLike | None = None) -> np.ndarray:
    """Rotate features of ``x`` by their positions (RoPE).

    Parameters
    ----------
    x : (..., n, E) array_like of float32 or float64
        Queries or keys; the last axis holds the features of one head.
    rotary : Rotary, optional
        Rotary parameters; default ``Rotary()`` (all features, base 10000,
        ``layout="half"``).
    positions : (n,) array_like of int or float, optional
        Position of each row (default ``0 .. n-1``), in tokens.

    Returns
    -------
    out : (..., n, E) ndarray
        Rotated copy of ``x`` (same dtype; ``x`` is not modified). For each
        pair ``(a, b)`` of features and angle ``θ = p · inv_freq``:
        ``out_a = m (x_a cos θ − x_b sin θ)``, ``out_b = m (x_b cos θ + x_a
        sin θ)`` with ``m = rotary.attention_factor`` (1 but for YaRN and
        LongRoPE; unrotated features are copied unscaled, as transformers).

    Raises
    ------
    ValueError
        If ``x`` has fewer than 2 dimensions, ``positions`` has the wrong
        length or non-finite values, or the rotary dim does not fit ``E``.
    TypeError
        If ``x`` is not a real floating array.

    References
    ----------
    Su et al., RoFormer, §3.4.2, eq. (34).
    """
    rotary = Rotary() if rotary is None else rotary
    if not isinstance(rotary, Rotary):
        raise TypeError(f"apply_rotary: rotary must be a numbarope.Rotary, got {type(rotary).__name__}")
    x = np.asarray(x)
    if x.dtype not in (np.float32, np.float64):
        raise TypeError(
            f"apply_rotary: x must be float32 or float64, got dtype {x.dtype}; "
            "cast with x.astype(np.float32)")
    if x.ndim < 2:
        raise ValueError(f"apply_rotary: x must have shape (..., n, E), got shape {x.shape}")
    if not np.isfinite(x).all():
        raise ValueError("apply_rotary: x contains NaN or inf; rotary needs finite inputs")
    n, E = x.shape[-2:]
    if positions is None:
        positions = np.arange(n)
    positions = np.asarray(positions, dtype=np.float64).reshape(-1)
    if positions.shape[0] != n:
        raise ValueError(
            f"apply_rotary: positions has {positions.shape[0]} entries, x has n={n} rows")
    if not np.all(np.isfinite(positions)):
        raise ValueError("apply_rotary: positions contain NaN or inf")
    if np.array_equal(positions, np.arange(n)):
        cos, sin = rotary_tables(rotary, n, E)
    else:
        cos, sin = rotary_tables(rotary, n, E, positions)
    return rotate(x, rotary, cos, sin, dtype=x.dtype)


def rotary_relative_matrices(n: int, rotary: Rotary | None = None,
                             head_dim: int | None = None) -> np.ndarray:
    """Relative-position matrices ``W_t`` equivalent to a rotary embedding.

    RoPE gives ``(R_i q)ᵀ (R_j k) = qᵀ R_{j−i} k``, so the relative matrix of
    offset ``t = i − j`` is ``W_t = R_{−t}`` (identity on unrotated features).
    With an attention factor ``m`` (YaRN, LongRoPE) the rotated block is
    ``m² R_{−t}``. Length-dependent frequencies use the length ``n``.

    Parameters
    ----------
    n : int
        Sequence length (n >= 0).
    rotary : Rotary, optional
        Rotary parameters (default ``Rotary()``).
    head_dim : int
        Features per head, E.

    Returns
    -------
    relative : (2n−1, E, E) ndarray of float64
        ``relative[t + n − 1] = W_t`` for ``t = −(n−1) .. n−1``, the storage
        convention of ``rope_attention(..., relative=...)``.

    Raises
    ------
    ValueError
        If ``n < 0`` or ``head_dim`` is missing or < 1.

    References
    ----------
    Alman & Song 2025, §1 (RoPE as W_{i−j}); Su et al., RoFormer, eq. (16).
    """
    rotary = Rotary() if rotary is None else rotary
    for name, val, lo in (("n", n, 0), ("head_dim", head_dim, 1)):
        if isinstance(val, bool) or not isinstance(val, (int, np.integer)) or val < lo:
            raise ValueError(f"rotary_relative_matrices: {name} must be an int >= {lo}, "
                             f"got {val!r}")
    n, E = int(n), int(head_dim)  # type: ignore[arg-type]  # head_dim checked above
    t = np.arange(-(n - 1), n, dtype=np.float64) if n else np.zeros(0)
    first, second = rotary.pairs(E)
    ang = rotary.angles(-t, E, seq_len=n)          # W_t = R_{-t}
    m2 = rotary.attention_factor ** 2
    cos, sin = m2 * np.cos(ang), m2 * np.sin(ang)
    W = np.zeros((t.shape[0], E, E))
    W[:, np.arange(E), np.arange(E)] = 1.0
    W[:, first, first] = cos
    W[:, second, second] = cos
    W[:, first, second] = -sin
    W[:, second, first] = sin
    return W
