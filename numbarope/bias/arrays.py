"""Relative biases as arrays: the offsets, the builders and their argument checks.

The storage of a bias (``bias[e] = b(t)``, ``t = e − (S − 1) + query_offset``) is
described in :mod:`numbarope.bias`. The typed structures
(:mod:`numbarope.bias.structures`, :mod:`numbarope.bias.parametric`) compute their
values with the kernels here (``_causal_values``, ``_window_values``,
``_decay_values``, ``_t5_bucket``), so that a builder and its structure give the
same array: ``causal_bias(n) == Causal().materialize(n)``.
"""

from __future__ import annotations

import math

import numpy as np
from numpy.typing import ArrayLike


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


def _causal_values(t):
    """The causal mask at the offsets ``t``: 0 for ``t >= 0``, ``-inf`` otherwise."""
    return np.where(t >= 0, 0.0, -np.inf)


def _window_values(t, left, right):
    """The band ``−right <= t <= left`` at the offsets ``t`` (None: unbounded side):
    0 inside, ``-inf`` outside."""
    ok = np.ones(t.shape, bool)
    if left is not None:
        ok &= t <= left
    if right is not None:
        ok &= t >= -right
    return np.where(ok, 0.0, -np.inf)


def _decay_values(t, rate, causal):
    """``−rate·|t|`` at the offsets ``t`` (one row per rate of an array), ``-inf`` for
    ``t < 0`` if ``causal``."""
    r = np.asarray(rate)
    b = -r[..., None] * np.abs(t)
    return np.where(t >= 0, b, -np.inf) if causal else b


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
    return _causal_values(offsets(_check_n(n)))


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
    return _window_values(offsets(_check_n(n)), window, 0 if causal else window)


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
    rate = _rates(slopes, "slopes")
    causal = _check_bool(causal, "causal")
    return _decay_values(offsets(_check_n(n)), rate, causal)


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
