"""The typed structures: their base classes, the masks, and composition.

:class:`Structure` (which keys each query row may see) and :class:`RelativeBias` (a
bias that is a function of the offset ``t``), :class:`NoBias`, :class:`Causal`,
:class:`Dense` (any relative bias, as the array of one call) and :class:`Sum`;
``X + Y`` (``_add``) and :func:`as_structure`. The parametrised biases
(``Window``, ``Decay``, ``ALiBi``, ``T5Buckets``) are in
:mod:`numbarope.bias.parametric`: two of a kind fold into one through their
``_merge``, so composition names no parametrised type. Import every structure from
:mod:`numbarope.bias`.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass
from functools import reduce
from typing import TYPE_CHECKING, ClassVar

import numpy as np
from numpy.typing import ArrayLike

from .arrays import _bias_array, _causal_values, _check_int, _check_offset, _frozen, offsets


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

    def _merge(self, other):
        """``self + other`` as one structure of this kind (two windows intersect, two
        decays add their rates), or None when they have no simpler form than a sum."""
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
        return _causal_values(t)

    def _key_ranges(self, pos, S):
        return np.zeros(pos.size, np.int64), np.clip(pos + 1, 0, S)

    @property
    def causal(self) -> bool:
        return True


    def _with_causal(self):
        return self



@dataclass(frozen=True, eq=False, repr=False)
class Chunked(Structure):
    """Chunked local attention (Llama 4's ``attention_chunk_size``): the query at
    position p sees the keys j with ``a + c·⌊(p − a)/c⌋ <= j <= p`` — its own chunk
    of ``size`` c positions, chunks starting at ``start`` a (mod c), causally.

    Not a relative bias (which keys a query sees depends on its absolute position,
    not only on ``i − j``): computed by the exact path on per-row key ranges; an
    algorithm for its fast path can be added from outside (``docs/extending.md``,
    ``docs/examples/chunked_attention.py``).

    Parameters
    ----------
    size : int >= 1
        Positions per chunk.
    start : int, optional
        A position where a chunk starts (default 0). transformers counts Llama 4's
        chunks from a row's first real token: ``start`` = its left padding.

    Raises
    ------
    ValueError
        ``size`` is not an int >= 1.

    Examples
    --------
    >>> from numbarope.bias import Chunked
    >>> lo, hi = Chunked(4).key_ranges(6)
    >>> lo.tolist(), hi.tolist()
    ([0, 0, 0, 0, 4, 4], [1, 2, 3, 4, 5, 6])
    """

    size: int
    start: int = 0
    kind = "chunked"
    _fields = ("size", "start")

    def __post_init__(self):
        if isinstance(self.size, bool) or not isinstance(self.size, (int, np.integer)) \
                or self.size < 1:
            raise ValueError(f"Chunked: size must be an int >= 1, got {self.size!r}")
        if isinstance(self.start, bool) or not isinstance(self.start, (int, np.integer)):
            raise ValueError(f"Chunked: start must be an int, got {self.start!r}")
        object.__setattr__(self, "size", int(self.size))
        object.__setattr__(self, "start", int(self.start) % int(self.size))

    def cu_seqlens(self, total):
        """The chunk boundaries over positions 0 .. total−1 as packed sequences'
        ``[0, …, total]`` (:class:`Packed`)."""
        cuts = range(self.start or self.size, max(total, 0), self.size)
        return (0,) + tuple(cuts) + ((total,) if total > 0 else ())

    @property
    def causal(self) -> bool:
        return True

    def _with_causal(self):
        return self

    def _key_ranges(self, pos, S):
        lo = np.clip((pos - self.start) // self.size * self.size + self.start, 0, S)
        hi = np.clip(pos + 1, 0, S)
        return lo, hi


@dataclass(frozen=True, eq=False, repr=False)
class Packed(Structure):
    """Packed sequences (variable-length batches without padding; flash-attn's
    ``cu_seqlens``, xformers' ``BlockDiagonalMask``, transformers' padding-free
    path): the positions ``cu_seqlens[s] <= p < cu_seqlens[s+1]`` form sequence s,
    and a query sees the keys of its own sequence only (causally by default).

    Not a relative bias (the blocks sit at absolute positions): computed by the
    exact path on per-row key ranges. A rotary embedding's positions restart at
    every sequence: pass ``positions=packed.positions()`` with ``rotary=`` (models
    that rotate q and k themselves already did).

    Parameters
    ----------
    cu_seqlens : sequence of int
        Cumulative sequence lengths ``[0, n₁, n₁+n₂, …, total]``: non-decreasing,
        starting at 0 (empty sequences allowed).
    is_causal : bool, optional
        Queries see the keys of their sequence up to themselves (default), or all
        of them (``False``, bidirectional within a sequence).

    Raises
    ------
    ValueError
        ``cu_seqlens`` does not start at 0, decreases, or holds non-integers.

    Examples
    --------
    >>> from numbarope.bias import Packed
    >>> lo, hi = Packed([0, 3, 5]).key_ranges(5)
    >>> lo.tolist(), hi.tolist()
    ([0, 0, 0, 3, 3], [1, 2, 3, 4, 5])
    >>> Packed([0, 3, 5]).positions().tolist()
    [0, 1, 2, 0, 1]
    """

    cu_seqlens: tuple
    is_causal: bool = True
    kind = "packed"
    _fields = ("cu_seqlens", "is_causal")

    def __post_init__(self):
        try:
            cu = tuple(int(x) for x in self.cu_seqlens)
            ok = all(float(x) == int(x) for x in self.cu_seqlens)
        except (TypeError, ValueError):
            cu, ok = (), False
        if not ok or not cu or cu[0] != 0 or any(b < a for a, b in zip(cu, cu[1:])):
            raise ValueError(f"Packed: cu_seqlens must be non-decreasing integers from 0 "
                             f"([0, n1, n1+n2, ..., total]), got {self.cu_seqlens!r}")
        object.__setattr__(self, "cu_seqlens", cu)
        if not isinstance(self.is_causal, (bool, np.bool_)):
            raise ValueError(f"Packed: is_causal must be True or False, got "
                             f"{self.is_causal!r}")

    @property
    def causal(self) -> bool:
        return bool(self.is_causal)

    def _with_causal(self):
        return self if self.is_causal else Packed(self.cu_seqlens, True)

    def positions(self) -> np.ndarray:
        """(total,) int64: each position's index inside its own sequence (RoPE's)."""
        cu = np.asarray(self.cu_seqlens, np.int64)
        p = np.arange(cu[-1], dtype=np.int64)
        return p - cu[np.searchsorted(cu, p, side="right") - 1]

    def _key_ranges(self, pos, S):
        cu = np.asarray(self.cu_seqlens, np.int64)
        seg = np.clip(np.searchsorted(cu, pos, side="right") - 1, 0, len(cu) - 1)
        lo = np.clip(cu[seg], 0, S)
        if self.is_causal:
            hi = np.clip(pos + 1, 0, S)
        else:
            hi = np.clip(cu[np.minimum(seg + 1, len(cu) - 1)], 0, S)
        hi = np.where((pos >= 0) & (pos < cu[-1]), hi, lo)     # outside: no key
        return lo, np.maximum(hi, lo)


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
    return a._merge(b)      # two windows: their intersection; two decays: rates add


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
