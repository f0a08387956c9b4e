"""Relative-bias builders: causal, sliding window, ALiBi, T5 buckets.

Every builder returns ``bias[..., t + n − 1] = b_t`` for offsets
``t = i − j`` in ``[−(n−1), n−1]`` (query i, key j), the storage expected by
``rope_attention(..., bias=...)``; ``-inf`` masks. A relative bias keeps the
Toeplitz structure, so it costs the fast path nothing in accuracy (it is
applied exactly; Alman & Song 2025, §1).
"""

import math

import numpy as np

__all__ = ["offsets", "causal_bias", "window_bias", "alibi_slopes", "alibi_bias",
           "t5_buckets", "t5_bias"]


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


def _real_array(x, name):
    """``x`` as a float64 array; ValueError naming ``name`` if it is not real numbers."""
    a = np.asarray(x)
    if a.dtype.kind not in "iuf":
        raise ValueError(f"{name} must be real numbers, got dtype {a.dtype}")
    return a.astype(np.float64, copy=False)


def offsets(n):
    """Offsets ``t = i − j`` in storage order.

    Parameters
    ----------
    n : int >= 0
        Sequence length (tokens).

    Returns
    -------
    (2n−1,) ndarray of int64
        ``arange(−(n−1), n)``; empty for ``n = 0``.

    Raises
    ------
    ValueError
        If ``n`` is not an int >= 0.
    """
    n = _check_n(n)
    return np.arange(-(n - 1), n, dtype=np.int64) if n else np.zeros(0, np.int64)


def causal_bias(n):
    """0 for ``t >= 0`` (keys at or before the query), ``-inf`` otherwise.

    Equivalent to ``is_causal=True``, which is cheaper (prefix sums instead of FFT).

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
    t = offsets(n)
    return np.where(t >= 0, 0.0, -np.inf)


def window_bias(n, window, causal=True):
    """Sliding window: 0 for ``0 <= t <= window`` (``|t| <= window`` if not causal), else -inf.

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
    t = offsets(n)
    ok = (t >= 0) & (t <= window) if causal else np.abs(t) <= window
    return np.where(ok, 0.0, -np.inf)


def alibi_slopes(num_heads):
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


def alibi_bias(n, slopes, causal=True):
    """ALiBi bias ``b_t = −slope·t`` (``−slope·|t|`` if not causal; -inf for t < 0 if causal).

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
    s = _real_array(slopes, "slopes")
    if s.ndim > 1:
        raise ValueError(f"slopes must be a scalar or have shape (H,), got shape {s.shape}")
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError(f"slopes must be finite and >= 0, got {slopes!r}")
    causal = _check_bool(causal, "causal")
    t = offsets(n).astype(np.float64)
    b = -s[..., None] * (t if causal else np.abs(t))
    if causal:
        b = np.where(t >= 0, b, -np.inf)
    return b


def t5_buckets(n, num_buckets, bidirectional=True, max_distance=128):
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
    bidirectional = _check_bool(bidirectional, "bidirectional")
    # max_exact = num_buckets // div must be >= 1, and log(max_distance / max_exact) > 0
    div, kind = (4, "bidirectional") if bidirectional else (2, "decoder")
    if isinstance(num_buckets, (bool, np.bool_)) \
            or not isinstance(num_buckets, (int, np.integer)) or num_buckets < div:
        raise ValueError(f"num_buckets must be an int >= {div} ({kind}: max_exact = "
                         f"num_buckets // {div} must be >= 1), got {num_buckets!r}")
    num_buckets = int(num_buckets)
    nb_half = num_buckets // 2 if bidirectional else num_buckets
    max_exact = nb_half // 2
    if isinstance(max_distance, (bool, np.bool_)) \
            or not isinstance(max_distance, (int, np.integer)) or max_distance <= max_exact:
        raise ValueError(f"max_distance must be an int > num_buckets // {div} = {max_exact} "
                         f"({kind}, num_buckets = {num_buckets}), got {max_distance!r}")
    rel = -offsets(n)
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


def t5_bias(n, table, bidirectional=True, max_distance=128):
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
