"""The parametrised relative biases of published models.

:class:`Window` (sliding windows: Mistral, HF ``sliding_window``), :class:`Decay` and
:class:`ALiBi` (exponential decay, per head) and :class:`T5Buckets` (T5's learned
table over logarithmic buckets): frozen dataclasses on
:class:`~numbarope.bias.RelativeBias` (:mod:`numbarope.bias.structures`). Two of a
kind fold into one in a sum (``_merge``). Import them from :mod:`numbarope.bias`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np
from numpy.typing import ArrayLike

from .arrays import (_bias_array, _check_bool, _check_int, _decay_values, _frozen, _rates,
                     _t5_bucket, _t5_params, _window_values, alibi_slopes)
from .structures import Causal, NoBias, RelativeBias, Structure


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
        return _window_values(t, self.left, self.right)

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

    def _merge(self, other):
        if not isinstance(other, Window):
            return None

        def side(x, y):         # the intersection of the bands
            return y if x is None else x if y is None else min(x, y)
        return Window(side(self.left, other.left), side(self.right, other.right))


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
        return _decay_values(t, self.rate, self.causal)

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

    def _merge(self, other):
        if not isinstance(other, Decay):
            return None
        try:                    # rates add
            rate = np.asarray(self.rate) + np.asarray(other.rate)
        except ValueError:
            raise ValueError(f"cannot add {self!r} and {other!r}: their per-head rates do "
                             "not broadcast") from None
        causal = self.causal or other.causal
        # two of one type keep it (ALiBi + ALiBi is an ALiBi), else a Decay
        return self._replace(rate, causal) if type(self) is type(other) \
            else Decay(rate, causal)


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
    ``T5Buckets(table).materialize(n) == t5_bias(n, table)``. ``causal`` is True when
    the buckets of every ``t < 0`` hold ``-inf`` (a decoder's bucket 0 masks ``t <= 0``).
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

