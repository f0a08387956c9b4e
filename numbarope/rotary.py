"""Rotary position embeddings (RoPE).

Conventions follow HF transformers: ``inv_freq[i] = base ** (-2 i / dim)`` for
``i = 0 .. dim/2 - 1``; a feature pair rotated by the angle ``p * inv_freq[i]``
(radians) at position ``p``. Two pairings exist in the wild:

* ``layout="half"`` (HF ``rotate_half``; GPT-NeoX, Llama): feature ``i`` pairs
  with feature ``i + dim/2``;
* ``layout="interleaved"`` (GPT-J, RoFormer): feature ``2i`` pairs with ``2i+1``.

With ``dim < head_dim`` only the leading ``dim`` features are rotated (partial
rotary, as GPT-NeoX's ``rotary_pct``). Angles are always computed in float64,
whatever the input dtype: a float32 angle ``p * inv_freq`` loses about 1e-3 rad
at position 32768.

References
----------
J. Su et al., "RoFormer: Enhanced Transformer with Rotary Position Embedding",
Neurocomputing 568 (2024), §3.4 (eq. 34: the block rotation R_{Θ,m}).
"""

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from numba import njit

__all__ = ["Rotary", "apply_rotary", "rotary_relative_matrices"]

LAYOUTS = ("half", "interleaved")


@dataclass(frozen=True)
class Rotary:
    """Parameters of a rotary position embedding.

    Parameters
    ----------
    dim : int or None, optional
        Number of leading features rotated; must be even and at most
        ``head_dim``. ``None`` (default) rotates all ``head_dim`` features.
    base : float, optional
        Frequency base (10000.0 in RoFormer and Llama 2; 500000.0 in Llama 3).
    layout : {"half", "interleaved"}, optional
        Feature pairing: ``"half"`` pairs ``i`` with ``i + dim/2`` (HF
        ``rotate_half``), ``"interleaved"`` pairs ``2i`` with ``2i+1``.
    scaling : float or None, optional
        Linear position interpolation factor (positions are divided by it, as
        HF ``rope_scaling={"type": "linear"}``). ``None`` means 1.

    Raises
    ------
    ValueError
        If ``layout`` is unknown, ``base`` is not finite and > 1, ``dim`` is
        not a positive even integer, or ``scaling`` is not finite and > 0.

    Examples
    --------
    >>> import numpy as np
    >>> from numbarope import Rotary, apply_rotary
    >>> x = np.array([[1.0, 2.0, 3.0, 4.0]])
    >>> np.round(apply_rotary(x, Rotary(), positions=[1]), 4)
    array([[-1.9841,  1.9599,  2.4624,  4.0198]])
    """

    dim: int | None = None
    base: float = 10000.0
    layout: str = "half"
    scaling: float | None = None

    def __post_init__(self):
        if self.layout not in LAYOUTS:
            raise ValueError(
                f"Rotary: layout={self.layout!r} is unknown; use one of {LAYOUTS}")
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
            if self.dim <= 0 or self.dim % 2:
                raise ValueError(
                    f"Rotary: dim must be a positive even integer, got {self.dim}")
            object.__setattr__(self, "dim", int(self.dim))
        if isinstance(self.scaling, (str, bytes, bool)):
            raise TypeError(f"Rotary: scaling must be a real number or None, got "
                            f"{self.scaling!r}")
        if self.scaling is not None:
            try:
                sc = float(self.scaling)
            except (TypeError, ValueError):
                raise TypeError(f"Rotary: scaling must be a real number or None, got "
                                f"{self.scaling!r}") from None
            if not np.isfinite(sc) or sc <= 0:
                raise ValueError(f"Rotary: scaling must be finite and > 0, got {self.scaling!r}")
            object.__setattr__(self, "scaling", sc)

    def rotary_dim(self, head_dim):
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
                f"dim=None; {fix}")
        return dim

    def inv_freq(self, head_dim):
        """Inverse frequencies ``base ** (-2i/dim)``, shape ``(dim/2,)``, float64, rad/position."""
        dim = self.rotary_dim(head_dim)
        inv = self.base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
        if self.scaling is not None:
            inv = inv / self.scaling
        return inv

    def angles(self, positions, head_dim):
        """Angles ``positions[:, None] * inv_freq[None, :]`` in radians, ``(n, dim/2)`` float64.

        The product is formed in extended precision (``np.longdouble``) and
        reduced modulo 2π before rounding to float64, so that the angle of a
        large position (2**20 and beyond) keeps ~1e-16 absolute accuracy and
        RoPE stays shift invariant to ~1e-14 (a float64 product alone errs by
        ~|p·θ|·2^-53, 1e-10 rad at p = 2**20).
        """
        pos = np.asarray(positions, dtype=np.longdouble).reshape(-1)
        ang = pos[:, None] * self.inv_freq(head_dim).astype(np.longdouble)[None, :]
        two_pi = 2 * np.pi if np.finfo(np.longdouble).eps >= np.finfo(np.float64).eps \
            else np.longdouble("6.283185307179586476925286766559005768")
        return np.fmod(ang, two_pi).astype(np.float64)

    def pairs(self, head_dim):
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


def _tables(rotary, positions, head_dim):
    """``cos, sin`` of the rotation angles, ``(n, dim/2)`` float64 (read-only)."""
    ang = rotary.angles(positions, head_dim)
    cos, sin = np.cos(ang), np.sin(ang)
    cos.setflags(write=False)
    sin.setflags(write=False)
    return cos, sin


@lru_cache(maxsize=2)
def _cached_tables(rotary, n, head_dim):
    return _tables(rotary, np.arange(n), head_dim)


def rotary_tables(rotary, n, head_dim, positions=None):
    """``cos, sin`` tables of positions 0..n−1 (or ``positions``), cached for the former.

    The angles are formed in extended precision (:meth:`Rotary.angles`), which
    costs more than the rotation itself: calls on sequences of the same length
    share one table pair (two pairs are kept, each of at most 64 MiB).
    """
    if positions is None:
        if n * rotary.rotary_dim(head_dim) * 8 <= _TABLE_CACHE_BYTES:
            return _cached_tables(rotary, int(n), int(head_dim))
        positions = np.arange(n)
    return _tables(rotary, positions, head_dim)


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


def apply_rotary(x, rotary=None, positions=None):
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
        ``out_a = x_a cos θ − x_b sin θ``, ``out_b = x_b cos θ + x_a sin θ``.

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


def rotary_relative_matrices(n, rotary=None, head_dim=None):
    """Relative-position matrices ``W_t`` equivalent to a rotary embedding.

    RoPE gives ``(R_i q)ᵀ (R_j k) = qᵀ R_{j−i} k``, so the relative matrix of
    offset ``t = i − j`` is ``W_t = R_{−t}`` (identity on unrotated features).

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
    n, E = int(n), int(head_dim)
    t = np.arange(-(n - 1), n, dtype=np.float64) if n else np.zeros(0)
    first, second = rotary.pairs(E)
    ang = rotary.angles(-t, E)          # W_t = R_{-t}
    cos, sin = np.cos(ang), np.sin(ang)
    W = np.zeros((t.shape[0], E, E))
    W[:, np.arange(E), np.arange(E)] = 1.0
    W[:, first, first] = cos
    W[:, second, second] = cos
    W[:, first, second] = -sin
    W[:, second, first] = sin
    return W
