"""Relative biases: builders of arrays and typed structures.

A relative bias is a function ``b(t)`` of the offset ``t = i + query_offset − j``
(query i, key j; ``query_offset`` 0 for self-attention) added to the logits;
``-inf`` masks. For L queries and S keys it is stored as an array of length
``L+S−1`` with ``bias[e] = b(t)``, ``e = i − j + S − 1``, i.e.
``t = e − (S − 1) + query_offset``; for a square problem (``L = S = n``,
offset 0) that is ``bias[t + n − 1] = b(t)``, ``t`` in ``[−(n−1), n−1]``. This is
the storage expected by ``rope_attention(..., bias=..., query_offset=...)``.
A relative bias keeps the Toeplitz structure, so it costs the fast path nothing
in accuracy: it is applied exactly (Alman & Song 2025, §1).

Two layers:

* builders returning square arrays: :func:`causal_bias`, :func:`window_bias`,
  :func:`alibi_slopes`, :func:`alibi_bias`, :func:`t5_buckets`, :func:`t5_bias`;
* typed structures (frozen dataclasses, subclasses of :class:`Structure`; the
  relative ones of :class:`RelativeBias`) that carry their structure to the
  planner — they know no algorithm: each algorithm of :mod:`numbarope.ops`
  names the structure types it serves: :class:`NoBias`,
  :class:`Causal`, :class:`Window`, :class:`Decay`, :class:`ALiBi`,
  :class:`T5Buckets`, :class:`Dense` and their :class:`Sum`. Each gives its
  array with ``values(L, S, offset)`` (``materialize(n)`` for a square one).

Composition: ``X + Y`` adds the biases (``-inf`` wins) and keeps the most
specific structure it can: ``NoBias()`` is the identity, ``Causal() + X`` is
``X`` with the causal mask when ``X`` has one (``Decay(r) + Causal() ==
Decay(r, causal=True)``, ``Window(l, r) + Causal() == Window(l, 0)``), two
windows give their intersection, two decays the sum of their rates; anything
else is a :class:`Sum`. An array operand is a :class:`Dense`.

Every structure also says which keys a query row may see at most, as one
contiguous range per row (:meth:`Structure.key_ranges`: the causal mask,
a window; None for all keys), which the exact path uses to skip key blocks, and
gives its most specific equivalent (:meth:`Structure.canonical`). A structure
that is not a function of ``i − j`` alone (e.g. chunked local attention) is a
:class:`Structure` that is not a :class:`RelativeBias`: it has key ranges and no
bias values; ``docs/extending.md`` adds one from outside the package.

References
----------
J. Alman, Z. Song, "Fast RoPE Attention: Combining the Polynomial Method and Fast
Fourier Transform", arXiv:2505.11892 (2025), §1 (relative bias, Toeplitz structure).
O. Press, N. A. Smith, M. Lewis, "Train Short, Test Long: Attention with Linear
Biases Enables Input Length Extrapolation", ICLR 2022, §3 (ALiBi).
C. Raffel et al., "Exploring the Limits of Transfer Learning with a Unified
Text-to-Text Transformer", JMLR 21 (2020), §2.1 (T5 relative buckets).
A. Q. Jiang et al., "Mistral 7B", arXiv:2310.06825 (2023), §2 (sliding window).
"""

from __future__ import annotations

import math
from collections import Counter
from dataclasses import dataclass
from functools import reduce
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from numpy.typing import ArrayLike

__all__ = ["offsets", "causal_bias", "window_bias", "alibi_slopes", "alibi_bias",
           "t5_buckets", "t5_bias", "Structure",
           "RelativeBias", "NoBias", "Causal", "Window", "Decay", "ALiBi", "T5Buckets",
           "Dense", "Sum", "as_structure"]


def _check_int(x, name, low):
    """``x`` as a Python int >= ``low``; ValueError naming ``name`` otherwise."""
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) or x < low:
        raise ValueError(f"{name} must be an int >= {low}, got {x!r}")
    return int(x)


def _check_n(n):
    return _check_int(n, "n", 0)


def _check_bool(x, name):
    if not isinstance(x, (bool, np.bool_)):
        raise ValueError(f"{name} must be a bool, got {x!r}")
    return bool(x)


def _real_array(x: ArrayLike, name: str) -> np.ndarray:
    """``x`` as a float64 array; ValueError naming ``name`` if it is not real numbers."""
    a = np.asarray(x)
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be real numbers, got dtype {a.dtype}")
    return a.astype(np.float64, copy=False)


def _bias_array(x, name):
    """``x`` as a float64 array of biases: real, no NaN or +inf (-inf masks)."""
    a = _real_array(x, name)
    if np.isnan(a).any() or np.isposinf(a).any():
        raise ValueError(f"{name} must not contain NaN or +inf (use -inf to mask)")
    return a


def _rates(x, name):
    """Decay rates / ALiBi slopes: a finite float >= 0 or a read-only (H,) float64 array."""
    s = _real_array(x, name)
    if s.ndim > 1:
        raise ValueError(f"{name} must be a scalar or have shape (H,), got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError(f"{name} must be finite and >= 0, got {x!r}")
    return float(s) if s.ndim == 0 else _frozen(s)


def _frozen(a):
    """A read-only float64 copy of ``a`` (structures are immutable)."""
    a = np.array(a, dtype=np.float64)
    a.flags.writeable = False
    return a


def _check_offset(x, name):
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)):
        raise ValueError(f"{name} must be an int, got {x!r}")
    return int(x)


def offsets(n: int, S: int | None = None, query_offset: int = 0) -> np.ndarray:
    """Offsets ``t`` in storage order.

    Parameters
    ----------
    n : int >= 0
        Sequence length (tokens); the number of queries L if ``S`` is given.
    S : int >= 0, optional
        Number of keys (default ``n``).
    query_offset : int, optional
        Position of query 0 (keys at 0 .. S−1); default 0.

    Returns
    -------
    (n+S−1,) ndarray of int64
        ``t[e] = e − (S − 1) + query_offset``, the offset ``i + query_offset − j``
        stored at ``e = i − j + S − 1``; ``arange(−(n−1), n)`` for the square
        default. Empty if ``n = 0`` or ``S = 0``.

    Raises
    ------
    ValueError
        If ``n`` or ``S`` is not an int >= 0, or ``query_offset`` not an int.
    """
    n = _check_n(n)
    S = n if S is None else _check_int(S, "S", 0)
    query_offset = _check_offset(query_offset, "query_offset")
    if n == 0 or S == 0:
        return np.zeros(0, np.int64)
    start = query_offset - (S - 1)
    return np.arange(start, start + n + S - 1, dtype=np.int64)


def causal_bias(n: int) -> np.ndarray:
    """0 for ``t >= 0`` (keys at or before the query), ``-inf`` otherwise.

    Equivalent to ``is_causal=True``, which is cheaper (prefix sums instead of
    FFT); ``Causal().materialize(n)``.

    Parameters
    ----------
    n : int >= 0

    Returns
    -------
    (2n−1,) ndarray of float64

    Raises
    ------
    ValueError
        If ``n`` is not an int >= 0.
    """
    return Causal().materialize(_check_n(n))


def window_bias(n: int, window: int, causal: bool = True) -> np.ndarray:
    """Sliding window: 0 for ``0 <= t <= window`` (``|t| <= window`` if not causal), else -inf.

    Each query sees ``window`` keys before it (and, if not causal, ``window``
    after it) besides itself: ``window + 1`` keys in all when causal. This is
    ``Window(window, 0).materialize(n)`` (``Window(window, window)`` if not
    causal). HF/Mistral ``sliding_window=W`` counts the query itself: it is
    ``window = W − 1`` (:meth:`Window.from_hf`).

    Parameters
    ----------
    n : int >= 0
    window : int >= 0
        Number of earlier keys each query sees besides itself (tokens).
    causal : bool

    Returns
    -------
    (2n−1,) ndarray of float64

    Raises
    ------
    ValueError
        If ``n`` or ``window`` is not an int >= 0, or ``causal`` is not a bool.
    """
    window = _check_int(window, "window", 0)
    causal = _check_bool(causal, "causal")
    return Window(window, 0 if causal else window).materialize(_check_n(n))


def alibi_slopes(num_heads: int) -> np.ndarray:
    """ALiBi head slopes (Press et al. 2022, §3; their reference code for non powers of 2).

    Parameters
    ----------
    num_heads : int >= 1

    Returns
    -------
    (num_heads,) ndarray of float64
        ``2^(−8h/num_heads)``, h = 1..num_heads, for a power of two; otherwise
        the slopes of the closest smaller power of two followed by every other
        slope of the next one.

    Raises
    ------
    ValueError
        If ``num_heads`` is not an int >= 1.
    """
    num_heads = _check_int(num_heads, "num_heads", 1)

    def pow2(k):
        start = 2.0 ** (-(2.0 ** -(math.log2(k) - 3)))
        return [start * start ** i for i in range(k)]

    if math.log2(num_heads).is_integer():
        return np.array(pow2(num_heads))
    closest = 2 ** math.floor(math.log2(num_heads))
    extra = pow2(2 * closest)[0::2][:num_heads - closest]
    return np.array(pow2(closest) + extra)


def alibi_bias(n: int, slopes: ArrayLike, causal: bool = True) -> np.ndarray:
    """ALiBi bias ``b_t = −slope·t`` (``−slope·|t|`` if not causal; -inf for t < 0 if causal).

    ``ALiBi(slopes, causal).materialize(n)``.

    Parameters
    ----------
    n : int >= 0
    slopes : float or (H,) array_like of float
        Per-head slopes, finite and >= 0 (e.g. :func:`alibi_slopes`).
    causal : bool

    Returns
    -------
    (2n−1,) or (H, 2n−1) ndarray of float64

    Raises
    ------
    ValueError
        If ``n`` is not an int >= 0, ``causal`` is not a bool, or ``slopes`` is
        not a scalar or 1-d array of finite real numbers >= 0.
    """
    return ALiBi(slopes, causal).materialize(_check_n(n))


def _t5_params(num_buckets, bidirectional, max_distance):
    """Validated ``(num_buckets, bidirectional, max_distance)`` of the T5 bucketing."""
    bidirectional = _check_bool(bidirectional, "bidirectional")
    # max_exact = num_buckets // div must be >= 1, and log(max_distance / max_exact) > 0
    div, kind = (4, "bidirectional") if bidirectional else (2, "decoder")
    if isinstance(num_buckets, (bool, np.bool_)) \
            or not isinstance(num_buckets, (int, np.integer)) or num_buckets < div:
        raise ValueError(f"num_buckets must be an int >= {div} ({kind}: max_exact = "
                         f"num_buckets // {div} must be >= 1), got {num_buckets!r}")
    num_buckets = int(num_buckets)
    max_exact = num_buckets // div
    if isinstance(max_distance, (bool, np.bool_)) \
            or not isinstance(max_distance, (int, np.integer)) or max_distance <= max_exact:
        raise ValueError(f"max_distance must be an int > num_buckets // {div} = {max_exact} "
                         f"({kind}, num_buckets = {num_buckets}), got {max_distance!r}")
    return num_buckets, bidirectional, int(max_distance)


def _t5_bucket(t, num_buckets, bidirectional, max_distance):
    """T5 bucket of each offset in ``t`` (validated parameters; see :func:`t5_buckets`)."""
    nb_half = num_buckets // 2 if bidirectional else num_buckets
    max_exact = nb_half // 2
    rel = -np.asarray(t, dtype=np.int64)
    bucket = np.zeros_like(rel)
    if bidirectional:
        bucket += (rel > 0).astype(np.int64) * nb_half
        rel = np.abs(rel)
    else:
        rel = -np.minimum(rel, 0)
    is_small = rel < max_exact
    ratio = np.maximum(rel, max_exact).astype(np.float32) / np.float32(max_exact)
    scaled = (np.log(ratio) / np.float32(math.log(max_distance / max_exact))
              * np.float32(nb_half - max_exact))
    large = np.minimum(max_exact + scaled.astype(np.int64), nb_half - 1)
    bucket += np.where(is_small, rel, large)
    return bucket


def t5_buckets(n: int, num_buckets: int, bidirectional: bool = True,
               max_distance: int = 128) -> np.ndarray:
    """T5 bucket of every offset ``t = i − j``, in storage order.

    Parameters
    ----------
    n : int >= 0
    num_buckets : int
        At least 2 for a decoder, 4 if ``bidirectional`` (so that half of each
        direction's buckets, ``max_exact``, is at least one).
    bidirectional : bool
        Encoder (True) or decoder (False) bucketing.
    max_distance : int
        Distance beyond which buckets saturate (tokens); must exceed
        ``max_exact``: ``num_buckets // 4`` if ``bidirectional``, else
        ``num_buckets // 2``.

    Returns
    -------
    (2n−1,) ndarray of int64
        Buckets in ``[0, num_buckets)``.

    Raises
    ------
    ValueError
        If ``n`` is not an int >= 0, ``bidirectional`` is not a bool,
        ``num_buckets`` or ``max_distance`` is not an int in the range above.

    Notes
    -----
    HF transformers' ``T5Attention._relative_position_bucket`` (Raffel et al.
    2020, §2.1) with ``relative_position = j − i = −t``: with ``h`` buckets per
    direction (``num_buckets // 2`` if bidirectional, else ``num_buckets``)
    and ``e = h // 2``, distance ``d < e`` has bucket ``d``, larger ones
    ``min(h − 1, e + ⌊log(d/e) / log(max_distance/e) · (h − e)⌋)``; a decoder
    gives every future key (``t < 0``) bucket 0, an encoder adds ``h`` for them.
    The logarithm is taken in float32, as in the reference implementations
    (mesh-tensorflow and transformers), so that trained tables see the buckets
    they were trained with.
    """
    n = _check_n(n)
    params = _t5_params(num_buckets, bidirectional, max_distance)
    return _t5_bucket(offsets(n), *params)
def t5_bias(n: int, table: ArrayLike, bidirectional: bool = True,
            max_distance: int = 128) -> np.ndarray:
    """T5 relative-position bias from a learned per-bucket table.

    Parameters
    ----------
    n : int >= 0
    table : (num_buckets,) or (H, num_buckets) array_like of float
        Learned bias per bucket (per head); no NaN or +inf (-inf masks).
        ``num_buckets`` at least 4 if ``bidirectional``, else 2.
    bidirectional : bool
        Encoder (True) or decoder (False) bucketing.
    max_distance : int
        Distance beyond which buckets saturate (tokens); must exceed
        ``num_buckets // 4`` if ``bidirectional``, else ``num_buckets // 2``.

    Returns
    -------
    (2n−1,) or (H, 2n−1) ndarray of float64

    Raises
    ------
    ValueError
        If ``table`` is not real, has NaN or +inf or a shape other than
        ``(num_buckets,)`` or ``(H, num_buckets)``, or if ``n``,
        ``bidirectional``, ``num_buckets`` or ``max_distance`` is invalid (see
        :func:`t5_buckets`).

    Notes
    -----
    Buckets from :func:`t5_buckets`, i.e. HF transformers'
    ``T5Attention._relative_position_bucket`` (Raffel et al. 2020, §2.1) with
    ``relative_position = j − i = −t``: half the buckets exact, the rest
    logarithmic up to ``max_distance``.

    Examples
    --------
    >>> import numpy as np
    >>> from numbarope.bias import t5_bias
    >>> t5_bias(3, np.arange(8.0), bidirectional=True, max_distance=4)
    array([6., 5., 0., 1., 2.])
    """
    table = _real_array(table, "table")
    if table.ndim not in (1, 2):
        raise ValueError(f"table must have shape (num_buckets,) or (H, num_buckets), "
                         f"got {table.shape}")
    if np.isnan(table).any() or np.isposinf(table).any():
        raise ValueError("table must not contain NaN or +inf")
    bucket = t5_buckets(n, table.shape[-1], bidirectional=bidirectional,
                        max_distance=max_distance)
    return table[..., bucket]


# ---------------------------------------------------------------------------
# Typed structures
# ---------------------------------------------------------------------------

def _fmt_array(a):
    """Short readable form of a parameter array for ``repr``."""
    if a.ndim == 1 and a.size <= 8:
        return "[" + ", ".join(f"{x:.6g}" for x in a) + "]"
    return f"<{a.shape} float64>"


def _positions(L, offset):
    return np.arange(L, dtype=np.int64) + int(offset)


class Structure:
    """Base of every structure: which keys each query row sees, and with what bias.

    Subclasses are frozen dataclasses; equal parameters compare (and hash)
    equal. Common interface:

    * ``key_ranges(L, S=None, offset=0)``: the contiguous range of keys
      ``lo[i] <= j < hi[i]`` that query row i (at position ``i + offset``) may
      see at most, or None when nothing but the bias values restricts it;
    * ``causal``: True if every key after the query (``t < 0``) is masked;
    * ``heads``: None, or the size of the head axis of per-head structures;
    * ``kind``: a short name (``"none"``, ``"causal"``, ``"window"``, ``"decay"``,
      ``"alibi"``, ``"t5"``, ``"dense"``, ``"sum"``, ...);
    * ``canonical()``: the most specific equivalent structure (``Decay(0)`` is
      ``NoBias()``, ``Window(None, 0)`` is ``Causal()``);
    * ``select(index)``: the structure of one head (``index`` into the flattened
      per-head parameters; itself when there are none).

    A structure names no algorithm: the algorithms of :mod:`numbarope.ops`
    declare the structure types they serve.
    """

    __slots__ = ()
    __array_ufunc__ = None      # ndarray + structure -> structure.__radd__
    kind: ClassVar[str] = "?"
    #: True for a function of the offset t = i + query_offset − j (a Toeplitz bias)
    relative: ClassVar[bool] = False
    _fields: ClassVar[tuple[str, ...]] = ()     # parameters shown by repr and compared by ==

    def key_ranges(self, L: int, S: int | None = None,
                   offset: int = 0) -> tuple[np.ndarray, np.ndarray] | None:
        """Keys each query row may see at most: ``(lo, hi)``, each ``(L,)`` int64,
        row i sees keys ``lo[i] <= j < hi[i]`` (``0 <= lo, hi <= S``; an empty range
        when ``hi <= lo``), or None: no restriction beyond the bias values.

        Parameters
        ----------
        L, S : int >= 0
            Queries and keys (S defaults to L).
        offset : int, optional
            Position of query 0 (keys at 0 .. S−1), the ``query_offset`` of
            ``rope_attention``.
        """
        L = _check_int(L, "L", 0)
        S = L if S is None else _check_int(S, "S", 0)
        return self._key_ranges(_positions(L, _check_offset(offset, "offset")), S)

    def _key_ranges(self, pos, S):
        return None

    @property
    def causal(self) -> bool:
        """True if every key after the query (``t < 0``) is masked."""
        return False

    @property
    def _lead(self):
        """Leading (batch, head) shape of the per-head parameters."""
        return ()

    @property
    def heads(self) -> int | None:
        """None, or the size of the head axis (the last leading axis of ``values``)."""
        return self._lead[-1] if self._lead else None

    def canonical(self) -> Structure:
        """The most specific equivalent structure (itself by default)."""
        return self

    def select(self, index: int) -> Structure:
        """The structure of one head: ``index`` into the flattened per-head
        parameters (C order of ``_lead``); itself when there are none."""
        return self

    def _with_causal(self):
        """This structure with the causal mask added, or None if it has no causal form."""
        return None

    def _key(self):
        def norm(x):
            if isinstance(x, np.ndarray):
                return ("ndarray", x.shape, (x + 0.0).tobytes())     # -0.0 == 0.0
            return x
        return (type(self),) + tuple(norm(getattr(self, f)) for f in self._fields)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, Structure):
            return NotImplemented
        return self._key() == other._key()

    def __hash__(self) -> int:
        return hash(self._key())

    def __repr__(self) -> str:
        def show(x):
            return _fmt_array(x) if isinstance(x, np.ndarray) else repr(x)
        args = ", ".join(f"{f}={show(getattr(self, f))}" for f in self._fields)
        return f"{type(self).__name__}({args})"


def _range_intersection(a, b):
    if a is None:
        return b
    if b is None:
        return a
    return np.maximum(a[0], b[0]), np.minimum(a[1], b[1])


class RelativeBias(Structure):
    """Base of the typed relative biases (a function ``b(t)`` of the offset).

    A :class:`Structure` whose bias depends on ``t = i + query_offset − j`` only
    (a Toeplitz bias). Beyond the structure interface:

    * ``values(L, S=None, offset=0)``: the bias in the storage of a call with
      L queries, S keys and ``query_offset=offset`` (module docstring);
    * ``materialize(n)``: ``values(n)``, the square ``(2n−1,)`` array;
    * ``+`` composes (module docstring).
    """

    __slots__ = ()
    relative = True

    # -- the array ---------------------------------------------------------
    def values(self, L: int, S: int | None = None, offset: int = 0) -> np.ndarray:
        """The bias of a call with ``L`` queries, ``S`` keys and ``query_offset=offset``.

        Parameters
        ----------
        L : int >= 0
            Number of queries.
        S : int >= 0, optional
            Number of keys (default ``L``).
        offset : int, optional
            Position of query 0 (keys at 0 .. S−1), the ``query_offset`` of
            ``rope_attention``; default 0.

        Returns
        -------
        (L+S−1,) or (..., L+S−1) ndarray of float64
            ``out[..., e] = b(e − (S − 1) + offset)``; leading axes for per-head
            structures. Length 0 if ``L = 0`` or ``S = 0``; ``-inf`` masks.

        Raises
        ------
        ValueError
            If ``L`` or ``S`` is not an int >= 0 or ``offset`` not an int (or,
            for :class:`Dense`, if the stored length is not ``L+S−1``).
        """
        L = _check_int(L, "L", 0)
        S = L if S is None else _check_int(S, "S", 0)
        return self._values(offsets(L, S, _check_offset(offset, "offset")), L, S)

    def materialize(self, n: int) -> np.ndarray:
        """``values(n)``: the square ``(..., 2n−1)`` array, ``[..., t + n − 1] = b(t)``."""
        return self.values(n)

    def _values(self, t, L, S):
        """Bias at the offsets ``t`` ((L+S−1,) int64) of an L × S call."""
        raise NotImplementedError

    # -- composition ---------------------------------------------------------
    def __add__(self, other: RelativeBias | ArrayLike | None) -> RelativeBias:
        if other is None:
            return NotImplemented
        return _add(self, as_structure(other))

    def __radd__(self, other: RelativeBias | ArrayLike | None) -> RelativeBias:
        if other is None:
            return NotImplemented
        return _add(as_structure(other), self)


@dataclass(frozen=True, eq=False, repr=False)
class NoBias(RelativeBias):
    """No bias: ``b(t) = 0`` for every offset; every query sees every key.


    Examples
    --------
    >>> from numbarope.bias import NoBias
    >>> NoBias().values(2, 3, 1)
    array([0., 0., 0., 0.])
    """

    kind = "none"

    def _values(self, t, L, S):
        return np.zeros(t.shape)


    def _with_causal(self):
        return Causal()


@dataclass(frozen=True, eq=False, repr=False)
class Causal(RelativeBias):
    """Causal mask: ``b(t) = 0`` for ``t >= 0`` (keys at or before the query), else ``-inf``.

    The same as ``is_causal=True`` of ``rope_attention`` (keys ``j > i +
    query_offset`` masked) and as ``Window(None, 0)``. ``Causal() + X`` adds the
    mask to ``X``.

    Examples
    --------
    >>> from numbarope.bias import Causal
    >>> Causal().materialize(2)
    array([-inf,   0.,   0.])
    """

    kind = "causal"

    def _values(self, t, L, S):
        return np.where(t >= 0, 0.0, -np.inf)

    def _key_ranges(self, pos, S):
        return np.zeros(pos.size, np.int64), np.clip(pos + 1, 0, S)

    @property
    def causal(self) -> bool:
        return True


    def _with_causal(self):
        return self


def _side(x, name):
    if x is None:
        return None
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (int, np.integer)) or x < 0:
        raise ValueError(f"{name} must be an int >= 0 (keys, tokens) or None (unbounded), "
                         f"got {x!r}")
    return int(x)


@dataclass(frozen=True, eq=False, repr=False)
class Window(RelativeBias):
    """Sliding window (band): ``b(t) = 0`` for ``−right <= t <= left``, ``-inf`` outside.

    Each query sees ``left`` keys before it, ``right`` keys after it, and
    itself: ``left + right + 1`` keys away from the sequence ends.

    Parameters
    ----------
    left : int >= 0 or None
        Keys before the query that take part (tokens); None: unbounded.
    right : int >= 0 or None, optional
        Keys after the query that take part (tokens); None: unbounded.
        Default 0 (causal).

    Raises
    ------
    ValueError
        If ``left`` or ``right`` is neither None nor an int >= 0.

    Notes
    -----
    ``Window(w, 0).materialize(n) == window_bias(n, w)`` and
    ``Window(w, w).materialize(n) == window_bias(n, w, causal=False)``: the
    ``window`` of :func:`window_bias` counts the keys *besides* the query.
    HF/Mistral ``sliding_window=W`` counts the query itself: it is
    ``Window(W − 1, 0)`` (:meth:`from_hf`). ``Window(None, 0)`` is the causal
    mask, ``Window(None, None)`` no bias. Causal iff ``right == 0``.

    Examples
    --------
    >>> from numbarope.bias import Window
    >>> Window(1, 0).materialize(3)
    array([-inf, -inf,   0.,   0., -inf])
    """

    left: int | None
    right: int | None = 0
    kind = "window"
    _fields = ("left", "right")

    def __post_init__(self):
        object.__setattr__(self, "left", _side(self.left, "left"))
        object.__setattr__(self, "right", _side(self.right, "right"))

    @classmethod
    def from_hf(cls, sliding_window: int, causal: bool = True) -> Window:
        """The window of an HF transformers ``config.sliding_window`` (Mistral, Qwen2, Gemma…).

        Parameters
        ----------
        sliding_window : int >= 1
            Keys each query sees *including itself* (tokens).
        causal : bool, optional
            True (default): HF's causal sliding window
            (``masking_utils.sliding_window_causal_mask_function``: key ``kv``
            takes part iff ``q − W < kv <= q``), ``Window(W − 1, 0)``. False: HF's
            bidirectional one (``sliding_window_bidirectional_overlay``:
            ``|q − kv| <= W``), ``Window(W, W)``; note that it admits ``W`` keys
            on each side, not ``W − 1``.

        Returns
        -------
        Window

        Raises
        ------
        ValueError
            If ``sliding_window`` is not an int >= 1 or ``causal`` not a bool.

        Notes
        -----
        The Mistral 7B paper (Jiang et al. 2023, §2) describes positions
        ``i − W .. i``; HF transformers (5.x) and its models admit ``W`` keys
        including the query, which is what this follows. :func:`window_bias`
        with ``window = W − 1`` gives the same array.
        """
        w = _check_int(sliding_window, "sliding_window", 1)
        return cls(w - 1, 0) if _check_bool(causal, "causal") else cls(w, w)

    def _values(self, t, L, S):
        ok = np.ones(t.shape, bool)
        if self.left is not None:
            ok &= t <= self.left
        if self.right is not None:
            ok &= t >= -self.right
        return np.where(ok, 0.0, -np.inf)

    @property
    def causal(self) -> bool:
        return self.right == 0


    def _key_ranges(self, pos, S):
        lo = np.zeros(pos.size, np.int64) if self.left is None else np.clip(pos - self.left, 0, S)
        hi = np.full(pos.size, S, np.int64) if self.right is None else \
            np.clip(pos + self.right + 1, 0, S)
        return lo, hi

    def canonical(self) -> Structure:
        if self.left is None and self.right is None:
            return NoBias()
        if self.left is None and self.right == 0:
            return Causal()
        return self

    def _with_causal(self):
        return self if self.right == 0 else Window(self.left, 0)


@dataclass(frozen=True, eq=False, repr=False)
class Decay(RelativeBias):
    """Exponential decay: ``b(t) = −rate·|t|``, i.e. ``exp(b(t)) = γ^{|t|}``, ``γ = e^{−rate}``.

    Parameters
    ----------
    rate : float >= 0 or (H,) array_like of float >= 0
        Decay per token of distance (logit units per token), one per head for
        an array (``values`` then has shape ``(H, L+S−1)``).
    causal : bool, optional
        Also mask the keys after the query (``-inf`` for ``t < 0``). Default False.

    Raises
    ------
    ValueError
        If ``rate`` is not a finite real scalar or 1-d array >= 0, or ``causal``
        not a bool.

    Notes
    -----
    ALiBi (Press et al. 2022) is this bias with ``rate`` the head slopes
    (:class:`ALiBi`). With every rate 0 it is :class:`NoBias` (or
    :class:`Causal`): see :meth:`canonical`. The
    bias is relative, so it keeps the Toeplitz structure (Alman & Song 2025, §1).

    Examples
    --------
    >>> from numbarope.bias import Decay
    >>> Decay(0.5).materialize(2)
    array([-0.5, -0. , -0.5])
    >>> Decay(0.5) + Causal() == Decay(0.5, causal=True)
    True
    """

    rate: float | np.ndarray
    causal: bool = False
    kind = "decay"
    _fields = ("rate", "causal")

    if TYPE_CHECKING:
        # What the constructor accepts: __post_init__ stores a float or a read-only array.
        def __init__(self, rate: ArrayLike, causal: bool = False) -> None:
            ...

    def __post_init__(self):
        object.__setattr__(self, "rate", _rates(self.rate, "rate"))
        object.__setattr__(self, "causal", _check_bool(self.causal, "causal"))

    def _values(self, t, L, S):
        r = np.asarray(self.rate)
        b = -r[..., None] * np.abs(t)
        return np.where(t >= 0, b, -np.inf) if self.causal else b

    @property
    def _lead(self):
        return np.shape(self.rate)


    def _key_ranges(self, pos, S):
        return Causal()._key_ranges(pos, S) if self.causal else None

    def canonical(self) -> Structure:
        if not np.any(self.rate):
            return Causal() if self.causal else NoBias()
        return self

    def select(self, index: int) -> Structure:
        if np.ndim(self.rate) == 0:
            return self
        return Decay(float(np.asarray(self.rate).reshape(-1)[index]), self.causal)

    def _with_causal(self):
        return self if self.causal else self._replace(self.rate, True)

    def _replace(self, rate, causal):
        return Decay(rate, causal)


@dataclass(frozen=True, eq=False, repr=False, init=False)
class ALiBi(Decay):
    """ALiBi (Press et al. 2022, §3): ``b(t) = −slope·|t|`` per head, causal by default.

    A :class:`Decay` with ``rate = slopes``; ``slopes`` is an alias of ``rate``. Causal, it is
    ``alibi_bias(n, slopes)``: ``−slope·t`` for ``t >= 0``, ``-inf`` after the
    query.

    Parameters
    ----------
    slopes : float >= 0 or (H,) array_like of float >= 0
        Per-head slopes (logit units per token), e.g. :func:`alibi_slopes`.
    causal : bool, optional
        Mask the keys after the query (default True, as in the paper's decoder).

    Raises
    ------
    ValueError
        If ``slopes`` is not a finite real scalar or 1-d array >= 0, or
        ``causal`` not a bool.

    Examples
    --------
    >>> from numbarope.bias import ALiBi
    >>> ALiBi([0.5, 0.25]).materialize(2)
    array([[ -inf, -0.  , -0.5 ],
           [ -inf, -0.  , -0.25]])
    >>> ALiBi.from_heads(8).heads
    8
    """

    kind = "alibi"
    _fields = ("slopes", "causal")      # repr and equality

    def __init__(self, slopes: ArrayLike, causal: bool = True) -> None:
        object.__setattr__(self, "rate", _rates(slopes, "slopes"))
        object.__setattr__(self, "causal", _check_bool(causal, "causal"))

    @classmethod
    def from_heads(cls, num_heads: int, causal: bool = True) -> ALiBi:
        """ALiBi with the slopes of :func:`alibi_slopes` for ``num_heads`` heads.

        Raises
        ------
        ValueError
            If ``num_heads`` is not an int >= 1 or ``causal`` not a bool.
        """
        return cls(alibi_slopes(num_heads), causal)

    @property
    def slopes(self) -> float | np.ndarray:
        """The per-head slopes (``rate``)."""
        return self.rate

    def _replace(self, rate, causal):
        return ALiBi(rate, causal)


@dataclass(frozen=True, eq=False, repr=False)
class T5Buckets(RelativeBias):
    """T5 relative-position bias (Raffel et al. 2020, §2.1): ``b(t) = table[..., bucket(t)]``.

    Parameters
    ----------
    table : (..., num_buckets) array_like of float
        Learned bias per bucket (per head: ``(H, num_buckets)``); no NaN or
        +inf (-inf masks). ``num_buckets`` at least 4 if ``bidirectional``,
        else 2.
    bidirectional : bool, optional
        Encoder (True, default) or decoder (False) bucketing.
    max_distance : int, optional
        Distance beyond which buckets saturate (tokens, default 128); must
        exceed ``num_buckets // 4`` if ``bidirectional``, else ``num_buckets // 2``.

    Raises
    ------
    ValueError
        If ``table`` is not real, has NaN or +inf or no axis, or
        ``bidirectional``, ``num_buckets`` or ``max_distance`` is invalid (see
        :func:`t5_buckets`).

    Notes
    -----
    Buckets of :func:`t5_buckets` (HF ``T5Attention._relative_position_bucket``
    with ``relative_position = j − i = −t``), at any offset, so rectangular
    calls (decoding with a cache) see the buckets of the absolute positions.
    ``T5Buckets(table).materialize(n) == t5_bias(n, table)``. ``causal`` is True when the buckets of every ``t < 0`` hold
    ``-inf`` (a decoder's bucket 0 masks ``t <= 0``).
    """

    table: np.ndarray
    bidirectional: bool = True
    max_distance: int = 128
    kind = "t5"
    _fields = ("table", "bidirectional", "max_distance")

    if TYPE_CHECKING:
        # What the constructor accepts: __post_init__ stores a read-only float64 array.
        def __init__(self, table: ArrayLike, bidirectional: bool = True,
                     max_distance: int = 128) -> None:
            ...

    def __post_init__(self):
        table = _bias_array(self.table, "table")
        if table.ndim < 1:
            raise ValueError("table must have shape (..., num_buckets), got a scalar")
        _, bidirectional, max_distance = _t5_params(table.shape[-1], self.bidirectional,
                                                    self.max_distance)
        object.__setattr__(self, "table", _frozen(table))
        object.__setattr__(self, "bidirectional", bidirectional)
        object.__setattr__(self, "max_distance", max_distance)

    def _values(self, t, L, S):
        bucket = _t5_bucket(t, self.table.shape[-1], self.bidirectional, self.max_distance)
        return self.table[..., bucket]

    @property
    def _lead(self):
        return self.table.shape[:-1]

    @property
    def causal(self) -> bool:
        nb = self.table.shape[-1]
        if self.bidirectional:      # t < 0 lands in buckets h + 1 .. 2h − 1
            future = self.table[..., nb // 2 + 1:2 * (nb // 2)]
        else:                       # ... in bucket 0
            future = self.table[..., :1]
        return bool(np.isneginf(future).all())


@dataclass(frozen=True, eq=False, repr=False)
class Dense(RelativeBias):
    """Any relative bias, given as the array a call takes.

    Parameters
    ----------
    bias : (..., L+S−1) array_like of float or bool
        In the storage of one call (module docstring): ``(..., 2n−1)`` for a
        square one. No NaN or +inf (-inf masks). A boolean array is a mask as in
        ``rope_attention``: True = takes part (0), False = masked (-inf).

    Raises
    ------
    ValueError
        If ``bias`` is not real or boolean, has NaN or +inf, or has no axis.

    Notes
    -----
    The array is already laid out for one ``(L, S, query_offset)``:
    ``values(L, S, offset)`` checks its length against ``L+S−1`` (ValueError
    naming the expected length) and returns a copy; ``offset`` is not used.
    ``causal`` is False (not inferred from the array, whose offsets depend on
    the call): add ``Causal()`` for the mask.
    """

    bias: np.ndarray
    kind = "dense"
    _fields = ("bias",)

    if TYPE_CHECKING:
        # What the constructor accepts: __post_init__ stores a read-only float64 array.
        def __init__(self, bias: ArrayLike) -> None:
            ...

    def __post_init__(self):
        b = np.asarray(self.bias)
        b = np.where(b, 0.0, -np.inf) if b.dtype == bool else _bias_array(b, "bias")
        if b.ndim < 1:
            raise ValueError("bias must have shape (..., L+S-1), got a scalar")
        object.__setattr__(self, "bias", _frozen(b))

    def _values(self, t, L, S):
        if self.bias.shape[-1] != t.size:
            raise ValueError(f"Dense bias has shape {self.bias.shape}; expected length "
                             f"L+S-1 = {t.size} on its last axis for L = {L}, S = {S}")
        return np.array(self.bias)

    @property
    def _lead(self):
        return self.bias.shape[:-1]


@dataclass(frozen=True, eq=False, repr=False, init=False)
class Sum(RelativeBias):
    """Sum of relative biases: ``b(t) = Σ_k b_k(t)`` (``-inf`` wins).

    Parameters
    ----------
    *terms : RelativeBias or array_like
        At least one; arrays become :class:`Dense`. Per-head shapes must broadcast.

    Raises
    ------
    ValueError
        If there is no term or the terms' leading (head) shapes do not broadcast.

    Notes
    -----
    ``X + Y`` builds a ``Sum`` only when no simpler structure holds (module
    docstring); ``Sum(...)`` keeps its terms as given. Equal to a ``Sum`` of the
    same terms in any order. Causal if any term is.
    """

    terms: tuple[RelativeBias, ...]
    kind = "sum"

    def __init__(self, *terms: RelativeBias | ArrayLike) -> None:
        if not terms:
            raise ValueError("Sum needs at least one term")
        terms = tuple(as_structure(x) for x in terms)
        try:
            np.broadcast_shapes(*(x._lead for x in terms))  # type: ignore[union-attr]
        except ValueError:
            raise ValueError("the terms' leading (head) shapes do not broadcast: "
                             + ", ".join(f"{x!r}: {x._lead}"  # type: ignore[union-attr]
                                         for x in terms)) from None
        object.__setattr__(self, "terms", terms)

    def _values(self, t, L, S):
        return reduce(np.add, (x._values(t, L, S) for x in self.terms))

    @property
    def _lead(self):
        return np.broadcast_shapes(*(x._lead for x in self.terms))

    @property
    def causal(self) -> bool:
        return any(x.causal for x in self.terms)


    def canonical(self) -> Structure:
        """``Causal()`` or ``NoBias()`` when every term is one of them (e.g.
        ``Window(None, 0) + Decay(0, causal=True)``); else the sum itself."""
        terms = [x.canonical() for x in self.terms]
        if all(isinstance(x, (NoBias, Causal)) for x in terms):
            return Causal() if any(isinstance(x, Causal) for x in terms) else NoBias()
        return self

    def _key_ranges(self, pos, S):
        ranges = None
        for x in self.terms:
            ranges = _range_intersection(ranges, x._key_ranges(pos, S))
        return ranges

    def _key(self):       # the same terms in any order (a + b == b + a)
        return (Sum, frozenset(Counter(x._key() for x in self.terms).items()))

    def __repr__(self) -> str:
        return "Sum(" + ", ".join(map(repr, self.terms)) + ")"


def _fold(a, b):
    """``a + b`` as one structure when a simpler one holds, else None."""
    if isinstance(a, NoBias):
        return b
    if isinstance(b, NoBias):
        return a
    if isinstance(a, Causal):
        return b._with_causal()
    if isinstance(b, Causal):
        return a._with_causal()
    if isinstance(a, Window) and isinstance(b, Window):     # intersection of the bands
        def side(x, y):
            return y if x is None else x if y is None else min(x, y)
        return Window(side(a.left, b.left), side(a.right, b.right))
    if isinstance(a, Decay) and isinstance(b, Decay):       # rates add
        try:
            rate = np.asarray(a.rate) + np.asarray(b.rate)
        except ValueError:
            raise ValueError(f"cannot add {a!r} and {b!r}: their per-head rates do not "
                             "broadcast") from None
        same = type(a) is type(b)
        return a._replace(rate, a.causal or b.causal) if same \
            else Decay(rate, a.causal or b.causal)
    return None


def _add(a, b):
    for x, y in ((a, b), (b, a)):
        if not x.relative:          # a mask structure: only NoBias or the causal mask adds
            if isinstance(y, NoBias):
                return x
            folded = x._with_causal() if isinstance(y, Causal) else None
            if folded is None:
                raise TypeError(f"cannot add {x!r} and {y!r}: {type(x).__name__} is not a "
                                f"relative bias (a function of i - j); pass it alone as "
                                f"bias=")
            return folded
    terms = list(a.terms if isinstance(a, Sum) else (a,))
    for x in (b.terms if isinstance(b, Sum) else (b,)):
        for k, y in enumerate(terms):
            folded = _fold(y, x)
            if folded is not None:
                terms[k] = folded
                break
        else:
            terms.append(x)
    return terms[0] if len(terms) == 1 else Sum(*terms)


def as_structure(x: RelativeBias | ArrayLike | None) -> RelativeBias:
    """The typed structure of a ``bias`` argument.

    Parameters
    ----------
    x : None, RelativeBias or array_like
        None: :class:`NoBias`; a structure: itself; an array (float or bool, in
        the storage of one call): :class:`Dense`.

    Returns
    -------
    RelativeBias

    Raises
    ------
    ValueError
        If an array is not a valid :class:`Dense` bias.
    """
    if x is None:
        return NoBias()
    if isinstance(x, Structure):
        return x
    return Dense(x)
