"""The rotary embedding: :class:`Rotary`, its cos/sin tables and the rotation.

:class:`Rotary` (rotated dim, base, layout, scaling; :meth:`Rotary.from_hf` reads a
transformers config), :func:`rotary_tables` (cos and sin of the exact angles, cached
for the default positions), :func:`rotate` (the one-pass numba kernel),
:func:`apply_rotary` and :func:`rotary_relative_matrices`. Conventions and
references: :mod:`numbarope.rotary`, where they are imported from.
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

from .angles import MAX_ANGLE, _reduced_angles
from .scaling import (_HF_KEYS, _SCALINGS, DynamicNTKScaling, LinearScaling, LongRopeScaling,
                      YarnScaling, _default_inv_freq, _length, _real, _Scaling,
                      _scaling_from_hf)

LAYOUTS = ("half", "interleaved")
#: Accepted spellings of the layouts; each maps to its canonical name.
LAYOUT_ALIASES = {"neox": "half", "rotate_half": "half",
                  "gptj": "interleaved", "rotate_every_two": "interleaved"}


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
    out : (..., n, E) ndarray, or torch.Tensor for a torch ``x``
        Rotated copy of ``x`` (same dtype; ``x`` is not modified; a torch tensor
        gives a tensor, differentiable when ``x`` requires grad). For each
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
        raise TypeError(f"apply_rotary: rotary must be a numbarope.Rotary, got "
                        f"{type(rotary).__name__}")
    tensor = None
    if type(x).__module__.startswith("torch") and hasattr(x, "detach"):
        tensor, x = x, x.detach().cpu().numpy()      # validated as numpy, rotated below
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
    if tensor is not None:
        return _rotate_tensor(tensor, rotary, cos, sin)
    return rotate(x, rotary, cos, sin, dtype=x.dtype)


def _rotate_tensor(t, rotary, cos, sin):
    """:func:`apply_rotary` of a torch tensor: a tensor of its dtype and device,
    differentiable (the rotation is linear; its backward is the transposed rotation,
    ``sin → −sin``, the scaling m and the unrotated features being symmetric)."""
    import torch

    def turn(a, s):
        return torch.from_numpy(rotate(a.detach().cpu().numpy(), rotary, cos, s,
                                       dtype=np.dtype(str(a.dtype).replace("torch.", ""))))

    class Rotation(torch.autograd.Function):
        @staticmethod
        def forward(ctx, a):
            return turn(a, sin).to(a.device)

        @staticmethod
        def backward(ctx, g):
            return turn(g, -sin).to(g.device)

    return Rotation.apply(t)


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
