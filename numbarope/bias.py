"""Relative-bias builders: causal, sliding window, ALiBi, T5 buckets.

Every builder returns ``bias[..., t + n − 1] = b_t`` for offsets
``t = i − j`` in ``[−(n−1), n−1]`` (query i, key j), the storage expected by
``rope_attention(..., bias=...)``; ``-inf`` masks. A relative bias keeps the
Toeplitz structure, so it costs the fast path nothing in accuracy (it is
applied exactly; Alman & Song 2025, §1).
"""

import math

import numpy as np

__all__ = ["offsets", "causal_bias", "window_bias", "alibi_slopes", "alibi_bias", "t5_bias"]


def _check_n(n):
    if isinstance(n, bool) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"n must be an int >= 0, got {n!r}")
    return int(n)


def offsets(n):
    """Offsets ``t = i − j`` in storage order: ``arange(−(n−1), n)``, int64, shape (2n−1,)."""
    n = _check_n(n)
    return np.arange(-(n - 1), n, dtype=np.int64) if n else np.zeros(0, np.int64)


def causal_bias(n):
    """0 for ``t >= 0`` (keys at or before the query), ``-inf`` otherwise; (2n−1,) float64.

    Equivalent to ``is_causal=True``, which is cheaper (prefix sums instead of FFT).
    """
    t = offsets(n)
    return np.where(t >= 0, 0.0, -np.inf)


def window_bias(n, window, causal=True):
    """Sliding window: 0 for ``0 <= t <= window`` (``|t| <= window`` if not causal), else -inf.

    Parameters
    ----------
    n : int
    window : int >= 0
        Number of earlier keys each query sees besides itself (tokens).
    causal : bool
    """
    if isinstance(window, bool) or not isinstance(window, (int, np.integer)) or window < 0:
        raise ValueError(f"window must be an int >= 0, got {window!r}")
    t = offsets(n)
    ok = (t >= 0) & (t <= window) if causal else np.abs(t) <= window
    return np.where(ok, 0.0, -np.inf)


def alibi_slopes(num_heads):
    """ALiBi head slopes (Press et al. 2022, §3; their reference code for non powers of 2).

    Returns
    -------
    (num_heads,) ndarray of float64
        ``2^(−8h/num_heads)``, h = 1..num_heads, for a power of two; otherwise
        the slopes of the closest smaller power of two followed by every other
        slope of the next one.
    """
    if isinstance(num_heads, bool) or not isinstance(num_heads, (int, np.integer)) \
            or num_heads < 1:
        raise ValueError(f"num_heads must be an int >= 1, got {num_heads!r}")

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
    n : int
    slopes : float or (H,) array_like of float
        Per-head slopes (e.g. :func:`alibi_slopes`).

    Returns
    -------
    (2n−1,) or (H, 2n−1) ndarray of float64
    """
    s = np.asarray(slopes, dtype=np.float64)
    if not np.all(np.isfinite(s)) or np.any(s < 0):
        raise ValueError(f"slopes must be finite and >= 0, got {slopes!r}")
    t = offsets(n).astype(np.float64)
    b = -s[..., None] * (t if causal else np.abs(t))
    if causal:
        b = np.where(t >= 0, b, -np.inf)
    return b


def t5_bias(n, table, bidirectional=True, max_distance=128):
    """T5 relative-position bias from a learned per-bucket table.

    Parameters
    ----------
    n : int
    table : (num_buckets,) or (H, num_buckets) array_like of float
        Learned bias per bucket (per head).
    bidirectional : bool
        Encoder (True) or decoder (False) bucketing.
    max_distance : int
        Distance beyond which buckets saturate (tokens).

    Returns
    -------
    (2n−1,) or (H, 2n−1) ndarray of float64

    Notes
    -----
    Buckets follow HF transformers' ``T5Attention._relative_position_bucket``
    (Raffel et al. 2020, §2.1) with ``relative_position = j − i = −t``: half the
    buckets exact, the rest logarithmic up to ``max_distance``.
    """
    table = np.asarray(table, dtype=np.float64)
    if table.ndim not in (1, 2) or table.shape[-1] < 2:
        raise ValueError(f"table must have shape (num_buckets,) or (H, num_buckets), "
                         f"got {table.shape}")
    nb = table.shape[-1]
    rel = -offsets(n)
    bucket = np.zeros_like(rel)
    if bidirectional:
        nb_half = nb // 2
        bucket += (rel > 0).astype(np.int64) * nb_half
        rel = np.abs(rel)
    else:
        nb_half = nb
        rel = -np.minimum(rel, 0)
    max_exact = nb_half // 2
    is_small = rel < max_exact
    with np.errstate(divide="ignore"):
        large = max_exact + (np.log(np.maximum(rel, 1) / max_exact)
                             / math.log(max_distance / max_exact)
                             * (nb_half - max_exact)).astype(np.int64)
    large = np.minimum(large, nb_half - 1)
    bucket += np.where(is_small, rel, large)
    return table[..., bucket]
