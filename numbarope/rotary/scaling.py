"""RoPE scaling variants (context extension) and transformers' ``rope_parameters``.

:class:`LinearScaling`, :class:`DynamicNTKScaling`, :class:`Llama3Scaling`,
:class:`YarnScaling` and :class:`LongRopeScaling` give the inverse frequencies and
the attention factor of HF transformers 5.24 (``modeling_rope_utils.ROPE_INIT_FUNCTIONS``);
``_scaling_from_hf`` builds one from a model's ``config.rope_parameters``, for
:meth:`numbarope.Rotary.from_hf`. References: :mod:`numbarope.rotary`, where they
are imported from.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np


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
                f"high_freq_factor={self.high_freq_factor} and "
                f"low_freq_factor={self.low_freq_factor}")
        object.__setattr__(self, "original_max_position_embeddings",
                           _length("Llama3Scaling", "original_max_position_embeddings",
                                   self.original_max_position_embeddings))

    def inv_freq(self, base: float, dim: int, seq_len: float | None = None) -> np.ndarray:
        inv = _default_inv_freq(base, dim)
        L = self.original_max_position_embeddings
        wavelen = 2 * np.pi / inv
        out = np.where(wavelen > L / self.low_freq_factor, inv / self.factor, inv)
        smooth = ((L / wavelen - self.low_freq_factor)
                  / (self.high_freq_factor - self.low_freq_factor))
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
            return (_yarn_mscale(self.factor, self.mscale)
                    / _yarn_mscale(self.factor, self.mscale_all_dim))
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
                raise ValueError(f"{o}: {name} must be a non-empty sequence of numbers, "
                                 f"got {val!r}")
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
        return math.sqrt(1 + math.log(self.factor)
                         / math.log(self.original_max_position_embeddings))

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
