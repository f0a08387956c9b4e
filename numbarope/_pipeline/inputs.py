"""``rope_attention`` and ``plan``: validation, batching, per-head dispatch."""

from __future__ import annotations

import numbers
from typing import Any, Literal
import warnings
from dataclasses import dataclass, field, replace

import numpy as np
from numba import njit

from . import _config
from .exact import exact_attention, row_norms
from . import algorithms
from .algorithms import HeadSpec
from .fast import visible_keys
from .planner import AttentionInfo, _pairs, exact_error_bound, plan_head
from ._interop import (LOW_PRECISION_UNIT, is_torch, output_like, requires_grad, to_numpy,
                       unexpected_keywords)
from .rotary import Rotary, rotary_tables, rotate, rotation_logit_error

__all__ = ["rope_attention", "plan"]

METHODS = ("auto", "exact", "fast")
APPROXES = ("chebyshev", "taylor")


@dataclass
class _Problem:
    q: np.ndarray          # (B, n, E) float64, rotated
    k: np.ndarray
    v: np.ndarray          # (B, n, Ev)
    relative: np.ndarray | None   # (Br, 2n−1, E, E)
    ridx: np.ndarray | None
    bias: np.ndarray | None       # (Bb, 2n−1)
    bidx: np.ndarray | None
    causal: bool
    scale: float
    batch_shape: tuple
    dtype: np.dtype
    n: int
    E: int
    Ev: int
    compute_dtype: np.dtype = np.dtype(np.float64)   # exact path's logits, exp, P·V
    computed_radius: np.ndarray | None = None        # proven radii (set by _radii)
    computed_radius1: np.ndarray | None = None
    precision_given: bool = False
    rotated: bool = False          # q, k were rotated here (their rotation error counts)
    out_unit: float = 0.0          # unit roundoff of the returned dtype (0: float64)
    S: int = -1                    # key rows (n when square)
    offset: int = 0                # position of query 0 (keys at 0..S-1)
    kmask: np.ndarray | None = None     # (Bk, S) 0 / -inf: key padding
    kidx: np.ndarray | None = None
    kvidx: np.ndarray | None = None     # key/value head of each query head (GQA)
    structure: object = None            # the numbarope.bias structure bias came from
    qnorms: np.ndarray | None = None    # row norm bounds (set by _radii)
    knorms: np.ndarray | None = None
    _vmax: np.ndarray | None = field(default=None, repr=False)
    _weights: dict = field(default_factory=dict, repr=False)
    _cuts: dict = field(default_factory=dict, repr=False)

    def value_maxima(self):
        """max|v| of every key/value head (float64), computed once."""
        if self._vmax is None:
            self._vmax = np.abs(self.v).max(axis=(1, 2), initial=0.0).astype(np.float64)
        return self._vmax

    def visible_maxima(self, per_key):
        """Per flattened query head b, the max over the keys it can see (real keys of its
        key mask) of ``per_key[kvidx[b], j]``, a (Bk, S) array (float64; 0 with no key).
        Padded keys hold junk that must not enlarge the logit radius or max|v|."""
        full = per_key.max(axis=1, initial=0.0)
        if self.kmask is None:
            return full[self.kvidx]
        out = np.empty(self.kvidx.shape[0])
        seen = {}
        for b in range(out.size):
            key = (int(self.kvidx[b]), int(self.kidx[b]))
            if key not in seen:
                real = np.isfinite(self.kmask[key[1]])
                seen[key] = (float(per_key[key[0]][real].max(initial=0.0)) if not real.all()
                             else float(full[key[0]]))
            out[b] = seen[key]
        return out

    def weights(self, b):
        """Toeplitz weights T of head b (:func:`_toeplitz_weights`), computed once."""
        if b not in self._weights:
            self._weights[b] = _toeplitz_weights(self, b)
        return self._weights[b][0]

    def weight_shift(self, b):
        """The max b_t that T of head b was normalised by (0 without a bias)."""
        self.weights(b)
        return self._weights[b][1]


def _as_float_array(x, name):
    if x is None:
        raise TypeError(f"{name} is required, got None")
    if isinstance(x, np.ndarray):
        arr = x
    else:
        try:
            arr = np.asarray(x)
        except Exception as exc:  # ragged lists etc.
            raise TypeError(f"{name} could not be converted to an array: {exc}") from None
    dt = arr.dtype
    if dt.kind == "f" and dt.itemsize in (4, 8) and not dt.isnative:
        arr = arr.astype(dt.newbyteorder("="))       # non-native byte order: same values
        dt = arr.dtype
    if isinstance(arr, np.ma.MaskedArray):
        raise TypeError(f"{name} is a masked array; numbarope ignores no entries: pass "
                        f"np.ma.getdata({name}) and express the mask as bias=-inf")
    if dt == np.float16:
        raise TypeError(f"{name} has dtype float16, which numbarope does not compute in; "
                        f"cast it with {name}.astype(np.float32)")
    if dt.kind == "b":
        if name == "bias":      # torch SDPA's boolean attn_mask: True = take part
            return np.where(arr, 0.0, -np.inf)
        raise TypeError(f"{name} is a boolean array, which holds no attention values; "
                        f"pass float32 or float64 {name} (a mask goes in bias=, where "
                        f"True means 'take part', as torch SDPA's boolean attn_mask)")
    if dt not in (np.float32, np.float64):
        advice = ""
        if dt.kind in "iu":
            advice = f"; cast it with {name}.astype(np.float64)"
            if name == "bias":
                advice += (" (bias is added to the logits; a mask is a boolean array "
                           "with True = take part, or np.where(keep, 0.0, -np.inf))")
        raise TypeError(f"{name} must be a float32 or float64 array, got dtype {dt}"
                        + advice)
    return arr


@njit(cache=True, nogil=True)
def _no_inf_nan_bits(u, mask):
    # the IEEE bits: an all-ones exponent is inf or NaN. One pass, no temporary, and an
    # integer OR-reduction the compiler vectorises (2-3x np.isfinite(x).all())
    bad = 0
    for i in range(u.size):
        bad |= (u[i] & mask) == mask
    return bad == 0


_EXP_MASK = {np.dtype(np.float32): (np.uint32, np.uint32(0x7F800000)),
             np.dtype(np.float64): (np.uint64, np.uint64(0x7FF0000000000000))}


def _all_finite(x):
    """Whether a C-contiguous float32/float64 array holds no inf or NaN."""
    ut, mask = _EXP_MASK[x.dtype]
    return bool(_no_inf_nan_bits(x.reshape(-1).view(ut), mask))


def _check_finite(arr, name, allow_neg_inf=False):
    if not allow_neg_inf and arr.flags.c_contiguous and arr.size and arr.dtype in _EXP_MASK:
        if _all_finite(arr):
            return
    if allow_neg_inf:
        bad = np.isnan(arr) | (arr == np.inf)
        if bad.any():
            raise ValueError(f"{name} contains NaN or +inf ({int(bad.sum())} entries); "
                             f"only -inf (a mask) is allowed")
    elif not np.isfinite(arr).all():
        raise ValueError(f"{name} contains NaN or inf ({int((~np.isfinite(arr)).sum())} "
                         f"entries); attention needs finite inputs")


def _index_map(lead_shape, batch_shape):
    """Flat index into an array of leading shape lead_shape for each broadcast head."""
    size = int(np.prod(lead_shape, dtype=np.int64))
    ids = np.arange(size, dtype=np.int64).reshape(lead_shape)
    return np.ascontiguousarray(np.broadcast_to(ids, batch_shape).reshape(-1))


def _real(x, name, what):
    if isinstance(x, (bool, np.bool_)) or not isinstance(x, (numbers.Real, np.floating,
                                                           np.integer)):
        raise TypeError(f"{name} must be {what}, got {x!r} of type {type(x).__name__}")
    return float(x)


PRECISIONS = (None, "float32", "float64")


def _validate_flag(x, name):
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {x!r}")


def _validate_precision(precision):
    if precision is not None and (not isinstance(precision, str)
                                  or precision not in PRECISIONS[1:]):
        raise ValueError(f"precision={precision!r} is unknown; use None (float32 for "
                         f"float32 inputs, else float64), 'float32' or 'float64'")


def _validate_options(method, eps, degree, approx, scale, radius, is_causal=False):
    if not isinstance(method, str) or method not in METHODS:
        raise ValueError(f"method={method!r} is unknown; use one of {METHODS}")
    if not isinstance(approx, str) or approx not in APPROXES:
        raise ValueError(f"approx={approx!r} is unknown; use one of {APPROXES}")
    if not isinstance(is_causal, (bool, np.bool_)):
        raise TypeError(f"is_causal must be True or False, got {is_causal!r}")
    eps_f = _real(eps, "eps", "a real number in (0, 1)")
    if not (0.0 < eps_f < 1.0):
        raise ValueError(f"eps={eps!r} must lie in (0, 1): it is the tolerated error "
                         f"relative to max|value|")
    if degree is not None:
        if isinstance(degree, bool) or not isinstance(degree, (int, np.integer)):
            raise TypeError(f"degree must be an int or None, got {degree!r}")
        if degree < 0 or degree > _config.MAX_DEGREE:
            raise ValueError(f"degree={degree} must lie in [0, {_config.MAX_DEGREE}] "
                             f"(numbarope._config.MAX_DEGREE)")
    if scale is not None:
        sf = _real(scale, "scale", "a positive real number")
        if not np.isfinite(sf) or sf <= 0:
            raise ValueError(f"scale={scale!r} must be finite and > 0")
    if radius is not None:
        try:
            r = np.asarray(radius)
            if r.dtype.kind not in "fiu":
                raise TypeError
            r = r.astype(np.float64)
        except (TypeError, ValueError):
            raise TypeError(f"radius must be a real number or an array of them (one per "
                            f"head), got {radius!r}") from None
        if not np.all(np.isfinite(r)) or np.any(r < 0):
            raise ValueError(f"radius must be finite and >= 0, got {radius!r}")
    return eps_f


def _group_heads(q, k, v):
    """Grouped-query attention (torch SDPA's ``enable_gqa``): the group size Hq/Hkv
    (query head h reads key/value head h // (Hq/Hkv); nothing is copied)."""
    for name, a in (("query", q), ("key", k), ("value", v)):
        if a.ndim < 3:
            raise ValueError(f"enable_gqa=True needs a head axis: {name} must have shape "
                             f"(..., heads, n, features), got shape {a.shape}")
    hq, hk, hv = q.shape[-3], k.shape[-3], v.shape[-3]
    if hk != hv:
        raise ValueError(f"key has {hk} heads and value {hv} (axis -3); grouped-query "
                         f"attention needs the same number of key and value heads")
    if hk == 0 or hq % hk:
        raise ValueError(f"enable_gqa=True: query has {hq} heads, key/value {hk} (axis "
                         f"-3); the query heads must be a multiple of the key/value heads")
    return hq // hk


ALIGNMENTS = ("top_left", "bottom_right")


def _query_offset(query_offset, causal_alignment, L, S):
    """Position of query 0 relative to key 0 (see rope_attention)."""
    if not isinstance(causal_alignment, str) or causal_alignment not in ALIGNMENTS:
        raise ValueError(f"causal_alignment={causal_alignment!r} is unknown; use "
                         f"'top_left' (torch SDPA's is_causal) or 'bottom_right' "
                         f"(decoding with a key/value cache, HF, flash-attn)")
    if query_offset is None:
        return 0 if causal_alignment == "top_left" else S - L
    if isinstance(query_offset, (bool, np.bool_)) or not isinstance(query_offset,
                                                                     (int, np.integer)):
        raise TypeError(f"query_offset must be an int (the position of query 0; keys "
                        f"are at 0..S-1), got {query_offset!r}")
    if causal_alignment != "top_left":
        raise ValueError("give query_offset or causal_alignment='bottom_right', not both "
                         "(bottom_right means query_offset = S - L)")
    return int(query_offset)


def _as_key_mask(x, S):
    if x is None:
        return None
    m = np.asarray(x)
    if m.dtype.kind in "iu":       # HF attention_mask: 1 = real token, 0 = padding
        if not np.isin(m, (0, 1)).all():
            raise ValueError("key_padding_mask holds integers other than 0 and 1; pass "
                             "a boolean mask (True = a real token that takes part)")
        m = m.astype(bool)
    if m.dtype != np.bool_:
        raise TypeError(f"key_padding_mask must be a boolean array (True = a real token "
                        f"that takes part; 0/1 integers are read the same way), got dtype "
                        f"{m.dtype}; an additive float mask over offsets goes in bias=")
    if m.ndim < 1 or m.shape[-1] != S:
        raise ValueError(f"key_padding_mask has shape {m.shape}; expected (..., {S}): one "
                         f"entry per key (True = real token)")
    return m


def _as_positions(x, S, off, n, rotary):
    if x is None:
        return None
    if rotary is None:
        raise ValueError("positions set the rotary angles: pass rotary= too (with "
                         "relative= or no rotary, positions have no effect)")
    pos = np.asarray(x)
    if pos.dtype.kind not in "iuf":
        raise TypeError(f"positions must be integer or real (token positions), got "
                        f"dtype {pos.dtype}")
    if pos.ndim < 1 or pos.shape[-1] != S:
        raise ValueError(f"positions has shape {pos.shape}; expected (..., {S}): the "
                         f"position of every key (queries take those of keys "
                         f"query_offset .. query_offset + L - 1)")
    if not (0 <= off and off + n <= S):
        raise ValueError(f"positions gives key positions; the queries must be among the "
                         f"keys (0 <= query_offset and query_offset + L <= S), got "
                         f"query_offset={off}, L={n}, S={S}")
    pos = pos.astype(np.float64)
    if not np.isfinite(pos).all():
        raise ValueError("positions contains NaN or inf")
    return pos


def check_per_key_lead(shape, batch_shape, name):
    """Refuse a per-key array ``(..., S)`` (``key_padding_mask``, ``positions``) whose
    leading dims do not line up with the (batch, head) dims of query, key and value.

    Its leading dims must broadcast to ``batch_shape`` without enlarging it, and,
    when it has fewer leading dims than ``batch_shape`` but is not shared by every
    head (a leading dim > 1), it is refused: numpy broadcasting would line its first
    dim up with the *head* axis, so transformers' ``attention_mask`` of shape (B, S)
    would be read per head (silently, when B equals the number of heads). The
    message gives the shapes to use: ``(B, 1, S)`` per batch row or ``(1, H, S)`` per
    head. Shared by every front end (rope_attention, plan, Dask).
    """
    shape, batch_shape = tuple(shape), tuple(batch_shape)
    lead, S = shape[:-1], shape[-1]
    try:
        ok = tuple(np.broadcast_shapes(batch_shape, lead)) == batch_shape
    except ValueError:
        ok = False
    per_row = (batch_shape[:-1] + (1, S)) if len(batch_shape) >= 2 else None
    per_head = ((1,) * (len(batch_shape) - 1) + batch_shape[-1:] + (S,)) \
        if len(batch_shape) >= 2 else None
    sdpa = (" (from an SDPA mask (B, 1, 1, S): mask[:, :, 0, :]; from transformers' "
            "attention_mask (B, S): mask[:, None, :])" if name == "key_padding_mask" else
            " (from transformers' position_ids (B, S): position_ids[:, None, :])")
    if not ok:
        want = (batch_shape[:-1] + (1,)) if batch_shape else ()
        raise ValueError(
            f"{name} has shape {shape}, whose leading dims {lead} do not broadcast to the "
            f"(batch, head) dims {batch_shape} of query, key and value; give it shape "
            f"(..., S), e.g. {want + (S,)} for one row per batch entry shared by the heads"
            + sdpa)
    if 0 < len(lead) < len(batch_shape) and any(d > 1 for d in lead):
        raise ValueError(
            f"{name} has shape {shape}: fewer leading dims than the (batch, head) dims "
            f"{batch_shape} of query, key and value, so broadcasting would line its first "
            f"dim up with the head axis and apply it per head. Give it shape "
            f"{per_row} (one row per batch entry, shared by the heads) or {per_head} "
            f"(one row per head)" + sdpa)


def _prepare(query, key, value, rotary, relative, bias, is_causal, scale, precision=None,
             enable_gqa=False, query_offset=None, causal_alignment="top_left",
             key_padding_mask=None, positions=None):
    q = _as_float_array(query, "query")
    k = _as_float_array(key, "key")
    v = _as_float_array(value, "value")
    for name, a in (("query", q), ("key", k), ("value", v)):
        if a.ndim < 2:
            raise ValueError(f"{name} must have shape (..., n, features), got shape {a.shape}")
    group = _group_heads(q, k, v) if enable_gqa else 1
    n, E = q.shape[-2:]          # n = L query rows
    S = k.shape[-2]              # key rows
    if k.shape[-1] != E:
        raise ValueError(f"key has shape {k.shape}; expected (..., S, {E}) to match "
                         f"query {q.shape} (same head_dim E)")
    if v.shape[-2] != S:
        raise ValueError(f"value has shape {v.shape}; expected (..., {S}, Ev) with the "
                         f"same number of rows S as key {k.shape}")
    off = _query_offset(query_offset, causal_alignment, n, S)
    nt = n + S - 1 if n and S else 0         # offsets that occur: t = i + off - j
    if E < 1:
        raise ValueError(f"query has head_dim E=0 (shape {q.shape}); E must be >= 1")
    Ev = v.shape[-1]
    dtype = np.result_type(q.dtype, k.dtype, v.dtype)
    if rotary is not None and relative is not None:
        raise ValueError("rotary and relative are exclusive: pass a rotary embedding "
                         "OR general relative matrices (rotary_relative_matrices gives "
                         "the matrices of a rotary embedding)")
    if rotary is True or rotary is np.True_:
        rotary = Rotary()
    elif rotary is False or rotary is np.False_:
        rotary = None
    if rotary is not None and not isinstance(rotary, Rotary):
        raise TypeError(f"rotary must be a numbarope.Rotary, True (the default Rotary()) "
                        f"or None/False (no rotation), got {type(rotary).__name__}")
    if rotary is not None:
        rotary.rotary_dim(E)      # validates dim against E
    if group > 1:                # key/value broadcast as if they had Hq heads
        shapes = [q.shape[:-2], k.shape[:-3] + (q.shape[-3],), v.shape[:-3] + (q.shape[-3],)]
    else:
        shapes = [q.shape[:-2], k.shape[:-2], v.shape[:-2]]
    kpm = _as_key_mask(key_padding_mask, S)
    pos = _as_positions(positions, S, off, n, rotary)
    rel = bia = None
    if relative is not None:
        rel = _as_float_array(relative, "relative")
        if rel.ndim < 3 or rel.shape[-3:] != (nt, E, E):
            raise ValueError(f"relative has shape {rel.shape}; expected (..., L+S-1, E, E) = "
                             f"(..., {nt}, {E}, {E}) with relative[t - query_offset + S - 1]"
                             f" = W_t (for L = S, query_offset = 0: relative[t + n - 1])")
        shapes.append(rel.shape[:-3])
    if bias is not None:
        bia = _as_float_array(bias, "bias")
        if bia.ndim < 1 or bia.shape[-1] != nt:
            raise ValueError(f"bias has shape {bia.shape}; expected (..., L+S-1) = "
                             f"(..., {nt}) with bias[t - query_offset + S - 1] = b_t (for "
                             f"L = S, query_offset = 0: bias[t + n - 1])")
        shapes.append(bia.shape[:-1])
    try:
        batch_shape = np.broadcast_shapes(*shapes)
    except ValueError:
        gqa = (group == 1 and q.ndim >= 3 and k.ndim >= 3 and k.shape[-3] > 0
               and q.shape[-3] != k.shape[-3] and q.shape[-3] % k.shape[-3] == 0)
        raise ValueError(f"leading (batch, head) dims do not broadcast: query {q.shape}, "
                         f"key {k.shape}, value {v.shape}"
                         + (f", relative {rel.shape}" if rel is not None else "")
                         + (f", bias {bia.shape}" if bia is not None else "")
                         + ("; key/value have fewer heads than query: for grouped-query "
                            "attention pass enable_gqa=True" if gqa else "")) from None
    for name, a in (("key_padding_mask", kpm), ("positions", pos)):
        if a is not None:
            check_per_key_lead(a.shape, batch_shape, name)
    B = int(np.prod(batch_shape, dtype=np.int64))
    need = 8 * B * (n * (E + Ev) + S * (2 * E + Ev))   # float64 copies of q, k, v, out
    if rel is not None:
        need += 8 * rel.size
    if _config.exceeds_memory(need):
        fix = ("split the batch into smaller calls" if B > 1 else
               "one head of this length does not fit: shorten the sequence, or free "
               "memory (or raise numbarope._config.MEMORY_FRACTION)")
        raise ValueError(
            f"this call needs about {need / 2**30:.2f} GiB of working memory (float64 "
            f"copies of {B} head(s) of n={n}), more than the limit "
            f"{_config.memory_limit() / 2**30:.2f} GiB (numbarope._config.MEMORY_FRACTION "
            f"of the available RAM); {fix}")
    _check_finite(q, "query")
    _check_finite(k, "key")
    _check_finite(v, "value")
    if rel is not None:
        _check_finite(rel, "relative")
    if bia is not None:
        _check_finite(bia, "bias", allow_neg_inf=True)
    s = 1.0 / np.sqrt(E) if scale is None else float(scale)
    if rotary is not None and pos is None:     # rotate in float64 (no rounding to float32)
        # keys at positions 0 .. S-1, queries at off .. off + L - 1: one table over both,
        # so that RoPE scalings that depend on the sequence length (dynamic NTK,
        # LongRoPE) use one length for the whole call, its largest position + 1
        lo, hi = min(0, off), max(S, off + n) if n else S
        if lo == 0 and hi == S:
            cos, sin = rotary_tables(rotary, S, E)        # cached; seq_len = S
        else:
            cos, sin = rotary_tables(rotary, hi - lo, E, positions=np.arange(lo, hi),
                                     seq_len=hi)
        k = rotate(k, rotary, cos[-lo:S - lo], sin[-lo:S - lo])
        q = rotate(q, rotary, cos[off - lo:off - lo + n], sin[off - lo:off - lo + n])

    # storage: float64 where a rotation was computed (the fast path needs its float64
    # values) or an input is float64; float32 otherwise (no copies on the float32 path)
    store = np.float64 if (rotary is not None or dtype == np.float64) else np.float32

    def flat(a, shape=batch_shape):
        count = int(np.prod(shape, dtype=np.int64))
        a = np.broadcast_to(a, shape + a.shape[-2:]).reshape((count,) + a.shape[-2:])
        return np.ascontiguousarray(a, dtype=store)

    q64 = flat(q)
    if group > 1:                # one copy per key/value head; kvidx maps query heads
        kv_shape = batch_shape[:-1] + (k.shape[-3],)
        k64, v64 = flat(k, kv_shape), flat(v, kv_shape)
        ids = np.arange(int(np.prod(kv_shape, dtype=np.int64))).reshape(kv_shape)
        kvidx = np.ascontiguousarray(
            np.take(ids, np.arange(batch_shape[-1]) // group, axis=-1).reshape(-1))
    else:
        k64, v64 = flat(k), flat(v)
        kvidx = np.arange(B, dtype=np.int64)
    if pos is not None:              # per-row positions: rotate head by head
        lead = pos.shape[:-1]
        pidx = _index_map(lead, batch_shape)
        pos2 = pos.reshape((-1, S))
        kv_pos = np.full(k64.shape[0], -1, np.int64)
        for b in range(B):
            if kv_pos[kvidx[b]] >= 0 and not np.array_equal(pos2[kv_pos[kvidx[b]]],
                                                             pos2[pidx[b]]):
                raise ValueError("positions differ between query heads that share a "
                                 "key/value head (enable_gqa): give positions per batch "
                                 "row, shape (batch, 1, S)")
            kv_pos[kvidx[b]] = pidx[b]
        q64, k64 = q64.copy(), k64.copy()      # may be read-only broadcast views
        # sequence-length dependent RoPE (dynamic NTK, LongRoPE) uses the largest
        # position of the whole call, as transformers does for a batch
        seq_len = float(pos2.max()) + 1 if pos2.size else None
        for r in np.unique(pidx):
            cos, sin = rotary_tables(rotary, S, E, positions=pos2[r], seq_len=seq_len)
            heads = np.flatnonzero(pidx == r)
            q64[heads] = rotate(q64[heads], rotary, cos[off:off + n], sin[off:off + n])
            kvs = np.flatnonzero(kv_pos == r)
            if kvs.size:
                k64[kvs] = rotate(k64[kvs], rotary, cos, sin)
    kmask = kidx = None
    if kpm is not None and not kpm.all():      # an all-True mask changes nothing
        lead = kpm.shape[:-1]
        kidx = _index_map(lead, batch_shape)
        kmask = np.where(kpm.reshape((-1, S)), 0.0, -np.inf)
    ridx = bidx = None
    if rel is not None:
        lead = rel.shape[:-3]
        ridx = _index_map(lead, batch_shape)
        rel = np.ascontiguousarray(
            rel.reshape((int(np.prod(lead, dtype=np.int64)),) + rel.shape[-3:]),
            dtype=np.float64)
    if bia is not None:
        lead = bia.shape[:-1]
        bidx = _index_map(lead, batch_shape)
        bia = np.ascontiguousarray(
            bia.reshape((int(np.prod(lead, dtype=np.int64)), bia.shape[-1])),
            dtype=np.float64)
    compute = np.dtype(precision if precision is not None else
                       ("float32" if dtype == np.float32 else "float64"))
    out_unit = 2.0 ** -24 if dtype == np.float32 else 0.0
    return _Problem(q64, k64, v64, rel, ridx, bia, bidx, bool(is_causal), s,
                    tuple(batch_shape), dtype, n, E, Ev, compute,
                    precision_given=precision is not None, out_unit=out_unit,
                    rotated=rotary is not None,
                    S=S, offset=off, kmask=kmask, kidx=kidx, kvidx=kvidx)


def _causal_cut(L, S, off):
    """Entries ``e = i − j + S − 1`` of a generating sequence with j > i + off (masked
    by is_causal) are ``e < S − 1 − off``; returns that count, clipped to 0 .. L+S−1."""
    return int(min(max(S - 1 - off, 0), L + S - 1))


def _visible_entries(p, b):
    """(L+S−1,) bool: entries e = i − j + S − 1 of the bias that some query row of head b
    sees, i.e. with a real key j (key padding) and, with is_causal, j <= i + offset; or
    None when every entry is seen."""
    L, S = p.n, p.S
    w = _key_weights(p, b)
    cut = _causal_cut(L, S, p.offset) if p.causal else 0
    if w is None and not cut:
        return None
    vis = np.ones(L + S - 1, bool)
    if w is not None:     # entry e is seen iff a real key lies in j = S-1-e .. S-1-e+L-1
        cs = np.concatenate([[0], np.cumsum(w > 0)])
        e = np.arange(L + S - 1)
        j0 = np.clip(S - 1 - e, 0, S)
        j1 = np.clip(S - 1 - e + L, 0, S)
        vis = cs[j1] - cs[j0] > 0
    vis[:cut] = False
    return vis


def _toeplitz_weights(p, b):
    """``(T, max b)``: T[i − j + S − 1] = exp(b_t − max b) with the causal zeros (None
    when T ≡ 1) and the shift max b (0 then), the maximum taken over the entries some
    row sees (real keys, the causal cut): a padded key's large bias must not make the
    real keys' weights underflow. Entries no row sees are 0."""
    L, S = p.n, p.S
    if L == 0 or S == 0 or (p.bias is None and not (p.causal and p.relative is not None)):
        return None, 0.0
    cut = _causal_cut(L, S, p.offset) if p.causal else 0
    T = np.ones(L + S - 1)
    shift = 0.0
    if p.bias is not None:
        bt = p.bias[p.bidx[b]]
        vis = _visible_entries(p, b)
        if vis is not None:
            bt = np.where(vis, bt, -np.inf)
        finite = np.isfinite(bt)
        shift = float(bt[finite].max()) if finite.any() else 0.0
        T = np.exp(bt - shift) if finite.any() else np.zeros_like(bt)
    else:
        T[:cut] = 0.0
    return T, shift


def _key_weights(p, b):
    """(S,) float64 1/0 weights of head b's real/padded keys, or None (no padding)."""
    if p.kmask is None:
        return None
    w = np.isfinite(p.kmask[p.kidx[b]]).astype(np.float64)
    return None if w.all() else w


def _row_masses(T, L, S=None, w=None):
    """``Σ_j T(i − j)·w_j`` for every row i (T normalised so that max T = 1).

    Without key weights ``w`` the sums are exact prefix-sum differences. With them
    they are one FFT convolution, returned as a lower bound: the convolution minus
    its rounding allowance ``8u·log2(N)·‖T‖₂‖w‖₂`` (Higham 2002, §24.1), clipped at 0.
    """
    S = L if S is None else S
    if w is None:
        cs = np.concatenate([[0.0], np.cumsum(T)])
        i = np.arange(L)
        return cs[i + S] - cs[i]          # T[i .. i+S−1] holds the row's S offsets
    from scipy.signal import fftconvolve
    full = fftconvolve(T, w)[S - 1:S - 1 + L]
    N = L + 2 * S - 2
    err = 8 * 2.0 ** -53 * np.log2(max(N, 2)) * np.linalg.norm(T) * np.linalg.norm(w)
    return np.maximum(full - err, 0.0)


def _sees_keys(p, b):
    """(L,) bool: rows of head b that see at least one key (mask, bias −inf, causal)."""
    L, S = p.n, p.S
    vis = np.ones(L + S - 1)
    if p.bias is not None:
        vis = np.isfinite(p.bias[p.bidx[b]]).astype(np.float64)
    if p.causal:
        vis[:_causal_cut(L, S, p.offset)] = 0.0
    w = _key_weights(p, b)
    if w is None:
        return _row_masses(vis, L, S) > 0
    from scipy.signal import fftconvolve
    return np.rint(fftconvolve(vis, w)[S - 1:S - 1 + L]) > 0     # counts of 0/1 pairs


def _row_mass(p, b, T):
    """Smallest row mass of head b over rows that see at least one key.

    Returns 0 when a row that sees a key (finite logit) has mass 0 because
    ``exp(b_t − max b)`` underflowed (or, with key padding, its mass is below the
    rounding of the convolution that measures it): the fast path cannot represent
    it, so its bound becomes infinite and the planner refuses it.
    """
    if T is None:
        return 1.0
    mass = _row_masses(T, p.n, p.S, _key_weights(p, b))
    seen = _sees_keys(p, b)
    if np.any(seen & (mass <= 0)):
        return 0.0
    pos = mass[seen]
    return float(pos.min()) if pos.size else 1.0


def _radii(p, radius):
    """Logit radius R (and R₁ for the rounding term) of every flattened head."""
    p.qnorms, p.knorms = row_norms(p.q), row_norms(p.k)    # reused by the exact kernel
    qn = p.qnorms.max(axis=1, initial=0.0)
    kn = p.visible_maxima(p.knorms)          # over the keys each head sees (not padding)
    if p.relative is not None:
        wn = np.linalg.norm(p.relative, ord=2, axis=(-2, -1)).max(axis=1, initial=0.0)[p.ridx]
        wf = np.sqrt((p.relative ** 2).sum(axis=(2, 3))).max(axis=1, initial=0.0)[p.ridx]
    else:
        wn = wf = np.ones(qn.shape)
    with np.errstate(over="ignore"):     # inf: _check_logit_range refuses, naming it
        R = p.scale * qn * wn * kn
        # Σ_α |φ_α(q)ψ_α(k)| = Σ_k |a_k| (s Σ_e |q_e k_e|)^k <= Σ_k |a_k| R^k
        # (Cauchy–Schwarz); general W: (Σ_ab |q_a W_ab k_b|)^k <= (‖q‖ ‖W‖_F ‖k‖)^k.
        R1 = p.scale * qn * wf * kn
    p.computed_radius, p.computed_radius1 = R, R1
    if radius is not None:
        r = np.asarray(radius, dtype=np.float64)
        try:
            R = np.broadcast_to(r, p.batch_shape).reshape(-1)
        except ValueError:
            raise ValueError(f"radius has shape {r.shape}, which does not broadcast to the "
                             f"batch (head) dims {p.batch_shape}; give one radius per "
                             f"head or a scalar") from None
        R1 = np.maximum(R1, R)
    return R, R1


#: Logit bounds (s·Σ|q_e k_e|) above which a compute dtype could overflow in the
#: logits, their GEMM's partial sums or exp's argument handling.
_LOGIT_LIMIT = {np.dtype(np.float32): 1e36, np.dtype(np.float64): 1e306}


def _check_logit_range(p):
    """Upgrade float32 compute to float64 (or refuse) where the logits could overflow."""
    R1 = float(np.max(p.computed_radius1, initial=0.0))
    if p.n == 0 or not R1 > _LOGIT_LIMIT[p.compute_dtype]:
        return
    if p.compute_dtype == np.float32 and R1 <= _LOGIT_LIMIT[np.dtype(np.float64)]:
        if p.precision_given:
            raise ValueError(
                f"precision='float32' cannot hold these logits: s·max‖q‖·max‖k‖ = {R1:.3g} "
                f"overflows float32; use precision='float64' (or None) or smaller inputs")
        p.compute_dtype = np.dtype(np.float64)
        return
    raise ValueError(
        f"the logits of these inputs overflow float64 (s·max‖q‖·max‖k‖ = {R1:.3g}); "
        f"softmax attention has no finite float64 evaluation here: scale query and key "
        f"down (or pass a smaller scale)")


def _window(p):
    """(left, right) of a Window bias (the exact path skips key blocks outside), or None."""
    from .bias import Window
    if p.bias is not None and isinstance(p.structure, Window):
        return (p.structure.left, p.structure.right)
    return None


def _structure(p, b):
    """Relative structure of head b for the planner: ``(kind, parameters)``, kind
    "none", "causal" (the causal mask hides a real key from some query), "decay"
    (``rate``, from a Decay/ALiBi bias), "window" (``window=(left, right)``) or
    "dense" (any other bias)."""
    from .bias import Decay, Window
    st = p.structure
    if p.bias is not None and st is not None and p.relative is None:
        if isinstance(st, Decay) and "decay" in st.algorithms:
            rate = np.asarray(st.rate, dtype=np.float64)
            r = float(rate.reshape(-1)[p.bidx[b]]) if rate.ndim else float(rate)
            return "decay", dict(rate=r)
        if isinstance(st, Window) and "window" in st.algorithms:
            return "window", dict(window=(st.left, st.right))
    if p.bias is not None:
        return "dense", {}
    if p.causal and (p.relative is not None or _causal_cuts(p, b)):
        return "causal", {}
    return "none", {}


def _head_specs(p, radius):
    """One :class:`~numbarope.algorithms.HeadSpec` per flattened head: everything the
    planner needs, built here and nowhere else."""
    R, R1 = _radii(p, radius)
    _check_logit_range(p)
    vmaxes = (p.visible_maxima(np.abs(p.v).max(axis=2)) if p.kmask is not None
              else p.value_maxima()[p.kvidx])
    pairs = _pairs(p.n, p.S, p.causal, p.offset)
    win = _window(p)
    if win is not None:      # the exact kernel visits whole blocks around the band
        span = sum(w for w in win if w is not None) + _config.EXACT_ROW_BLOCK \
            + _config.EXACT_KEY_BLOCK
        if None not in win:
            pairs = min(pairs, float(p.n) * min(p.S, span))
    specs = []
    for b in range(p.q.shape[0]):
        vmax = float(vmaxes[b])
        out_rounding = p.out_unit * vmax
        structure, params = _structure(p, b)
        rot = rotation_logit_error(p.computed_radius[b]) if p.rotated else 0.0
        specs.append(HeadSpec(
            head=tuple(int(i) for i in np.unravel_index(b, p.batch_shape))
            if p.batch_shape else (),
            n=p.n, S=p.S, offset=p.offset, E=p.E, Ev=p.Ev, radius=float(R[b]),
            radius1=float(R1[b]), vmax=vmax, general=p.relative is not None,
            structure=structure, causal=p.causal,
            row_mass=_row_mass(p, b, p.weights(b)), out_rounding=out_rounding,
            exact_bound=exact_error_bound(p.S, p.E, p.computed_radius[b],
                                          p.computed_radius1[b], vmax, p.compute_dtype,
                                          p.relative is not None, p.bias is not None,
                                          logit_error=rot)
            + out_rounding,
            radius_given=radius is not None, compute_dtype=p.compute_dtype.name,
            pairs=pairs, logit_error=rot, **params))
    return specs


def separable_head_spec(head, n, S, E, Ev, radius, vmax, causal, compute_dtype, out_unit,
                        rate=None, key_mask=None, rotated=False):
    """HeadSpec of a head without W_t, built from its statistics alone.

    For data that is never in one place (one long sequence in blocks on a Dask
    cluster, ``numbarope._dask``): ``radius`` R = s·max‖q_i‖·max‖k_j‖ over the
    rotated blocks (R₁ = R without W_t), ``vmax`` = max|v|; n query rows at
    positions 0..n−1 against S keys at 0..S−1. ``rate``: a
    :class:`~numbarope.bias.Decay` (ALiBi) bias of this rate (square, causal:
    every row sees its own key, so the row mass is 1). ``key_mask``: (S,) bool
    of real keys (no bias). The same fields as :func:`_head_specs` gives the
    in-memory call for these inputs.
    """
    cd = np.dtype(compute_dtype)
    out_rounding = out_unit * vmax
    if rate is not None:
        structure, params = "decay", dict(rate=float(rate))
    else:
        cuts = bool(causal) and visible_keys(n, S, 0, True, key_mask) is not None
        structure, params = ("causal" if cuts else "none"), {}
    rot = rotation_logit_error(radius) if rotated else 0.0
    return HeadSpec(head=tuple(head), n=n, S=S, offset=0, E=E, Ev=Ev, radius=float(radius),
                    radius1=float(radius), vmax=float(vmax), general=False,
                    structure=structure, causal=bool(causal), row_mass=1.0,
                    out_rounding=out_rounding,
                    exact_bound=exact_error_bound(S, E, radius, radius, vmax, cd, False,
                                                  rate is not None, logit_error=rot)
                    + out_rounding,
                    compute_dtype=cd.name, pairs=_pairs(n, S, causal, 0), logit_error=rot,
                    **params)


def _plans(p, method, eps, degree, approx, radius):
    specs = _head_specs(p, radius)
    opts = dict(method=method, eps=eps, degree=degree, approx=approx)
    heads = [plan_head(h, **opts) for h in specs]
    for members in _fast_groups(p, heads, method):
        if not _share_key_side(heads, specs, members, opts):
            # heads of equal degree still share (one polynomial: their largest radius)
            by_degree = {}
            for b in members:
                if heads[b].method == "fast":
                    by_degree.setdefault(heads[b].degree, []).append(b)
            for sub in by_degree.values():
                if len(sub) > 1:
                    _share_key_side(heads, specs, sub, opts)
    return heads


def _causal_cuts(p, b):
    """Whether is_causal hides a real key from some query of head b (else, e.g. when
    decoding at the end of a cache, the head is non-causal attention: "gemm")."""
    # the same for every head sharing a key mask (all heads without padding): once
    key = -1 if p.kmask is None else int(p.kidx[b])
    if key not in p._cuts:
        w = _key_weights(p, b)
        p._cuts[key] = visible_keys(p.n, p.S, p.offset, True,
                                    None if w is None else w > 0) is not None
    return p._cuts[key]


def _share_groups(p):
    """Query heads that may share one fast key side: same key/value head, key mask
    and bias (so the same keys, values and Toeplitz weights), separable logits."""
    if p.relative is not None or p.n == 0:
        return []
    groups = {}
    for b in range(p.q.shape[0]):
        key = (int(p.kvidx[b]), -1 if p.kidx is None else int(p.kidx[b]),
               -1 if p.bidx is None else int(p.bidx[b]))
        groups.setdefault(key, []).append(b)
    return [g for g in groups.values() if len(g) > 1]


def _fast_groups(p, heads, method):
    if method == "exact":
        return []
    return [g for g in _share_groups(p) if any(heads[b].method == "fast" for b in g)]


def _share_key_side(heads, specs, members, opts):
    """Re-plan a group of query heads on one key/value head with one polynomial (that of
    the group's largest radius, valid for all since the radii are upper bounds) and the
    key side computed once; kept when every head is then fast, on one algorithm, and
    the group's predicted time drops."""
    Rg = max(specs[b].radius for b in members)
    trial = []
    try:
        for b in members:
            trial.append(plan_head(replace(specs[b], radius=Rg,
                                           radius1=max(specs[b].radius1, Rg),
                                           heads=len(members)), **opts))
    except ValueError:       # method="fast" with a bound a smaller head cannot meet
        return False
    if any(h.method != "fast" for h in trial) or len({h.algorithm for h in trial}) > 1:
        return False
    before = sum(h.time_fast if h.method == "fast" else h.time_exact
                 for h in (heads[b] for b in members))
    if sum(h.time_fast for h in trial) >= before:
        return False
    for b, h in zip(members, trial):
        heads[b] = h
    return True


def _exact_rows(p, b, rows):
    """Exact output of rows ``rows`` of head b (dense NumPy; O(len(rows)·S·E²))."""
    S = p.S
    j = np.arange(S)
    kb = p.k[p.kvidx[b]].astype(np.float64)
    out = np.zeros((len(rows), p.Ev))
    real = np.ones(S, bool) if p.kmask is None else np.isfinite(p.kmask[p.kidx[b]])
    for r, i in enumerate(rows):
        e = i - j + S - 1                                      # index of t = i + off − j
        if p.relative is not None:
            W = p.relative[p.ridx[b], e]                        # (S, E, E)
            logit = np.einsum("e,jef,jf->j", p.q[b, i], W, kb)
        else:
            logit = kb @ p.q[b, i].astype(np.float64)
        logit = logit * p.scale
        vis = real & (j <= i + p.offset) if p.causal else real
        if p.bias is not None:      # shifted by the row's largest visible bias (exact)
            bt = p.bias[p.bidx[b], e]
            fin = bt[vis & np.isfinite(bt)]
            logit = logit + (bt - (fin.max() if fin.size else 0.0))
        logit = np.where(vis, logit, -np.inf)
        mx = logit.max(initial=-np.inf)
        if mx == -np.inf:
            continue
        w = np.exp(logit - mx)
        out[r] = (w / w.sum()) @ p.v[p.kvidx[b]]  # convex combination: cannot overflow
    return out


def _value_scale(v, dtype=np.float64, vmax=None):
    """A power of two f with max|f·v| <= 2**1000 (float64) or 2**100 (float32), so that
    sums of weighted values cannot overflow (values near the dtype's maximum); 1.0
    for all ordinary inputs. Exact to undo."""
    vmax = float(np.abs(v).max(initial=0.0)) if vmax is None else float(vmax)
    top = 1000 if np.dtype(dtype) == np.float64 else 100
    return 2.0 ** -(int(np.ceil(np.log2(vmax))) - top) if vmax > 2.0 ** top else 1.0


def _decode_group(p):
    """Group size g > 1 when grouped-query decoding can stack each key/value head's g
    query heads into one task, else 0: one query per head that sees every key (not
    causal, or causal with the query at or after the last key), no bias or relative
    matrices, query heads in key/value order, and one key mask per group."""
    B, Bk = p.q.shape[0], p.k.shape[0]
    if p.n != 1 or Bk >= B or B % Bk or p.bias is not None or p.relative is not None:
        return 0
    if p.causal and p.offset < p.S - 1:
        return 0
    g = B // Bk
    if not np.array_equal(p.kvidx, np.arange(B) // g):
        return 0
    if p.kidx is not None and not np.all(p.kidx.reshape(Bk, g) == p.kidx[::g, None]):
        return 0
    return g


def _fast_batches(p, heads):
    """Fast heads in batches that share one key side: a batch is one head, or query heads
    of one key/value head planned with one polynomial (see _share_key_side)."""
    if p.n == 0:
        return []
    done, batches = set(), []
    for g in _share_groups(p):
        fast = [b for b in g if heads[b].method == "fast"]
        while fast:
            c, a = heads[fast[0]].coef, heads[fast[0]].algorithm
            same = [b for b in fast if np.array_equal(heads[b].coef, c)
                    and heads[b].algorithm == a]
            if len(same) > 1:
                batches.append(same)
                done.update(same)
            fast = [b for b in fast if b not in same]
    batches += [[b] for b, h in enumerate(heads) if h.method == "fast" and b not in done]
    return batches


def _run(p, heads, verify, workers=None):
    """Outputs (B, n, Ev) and row log-sum-exps (B, n) of every head, by its plan."""
    B = p.q.shape[0]
    out = np.empty((B, p.n, p.Ev))
    lse = np.full((B, p.n), -np.inf)
    exact_ids = np.array([b for b, h in enumerate(heads) if h.method == "exact"], np.int64)
    if exact_ids.size:
        cd = p.compute_dtype
        every = exact_ids.size == B

        def take(a):
            a = a if every else a[exact_ids]
            return np.ascontiguousarray(a, dtype=cd)

        f = _value_scale(p.v, cd, p.value_maxima().max(initial=0.0))
        v = np.ascontiguousarray(p.v * f if f != 1.0 else p.v, dtype=cd)
        group = _decode_group(p) if every else 0
        if group:
            # one query per head, every key visible: the query heads of a key/value head
            # are rows of one task, so its keys and values are read once, not g times
            Bk = p.k.shape[0]
            qg = take(p.q).reshape(Bk, group, p.E)
            og, lg = exact_attention(
                qg, np.ascontiguousarray(p.k, dtype=cd), v, p.scale, causal=False,
                workers=workers, key_mask=p.kmask,
                norms=(p.qnorms.reshape(Bk, group), p.knorms),
                kidx=None if p.kidx is None else np.ascontiguousarray(p.kidx[::group]),
                return_lse=True)
            out[:] = og.reshape(B, 1, p.Ev)
            lse[:] = lg.reshape(B, 1)
            if f != 1.0:
                out /= f
            exact_ids = exact_ids[:0]
    if exact_ids.size:
        out[exact_ids], lse[exact_ids] = exact_attention(
            take(p.q), np.ascontiguousarray(p.k, dtype=cd), v, p.scale,
            kvidx=p.kvidx[exact_ids],
            relative=None if p.relative is None else np.ascontiguousarray(p.relative,
                                                                          dtype=cd),
            ridx=None if p.ridx is None else p.ridx[exact_ids],
            bias=p.bias, bidx=None if p.bidx is None else p.bidx[exact_ids],
            causal=p.causal, workers=workers, offset=p.offset,
            key_mask=p.kmask, kidx=None if p.kidx is None else p.kidx[exact_ids],
            norms=None if p.qnorms is None else (p.qnorms if every else p.qnorms[exact_ids],
                                                 p.knorms), return_lse=True,
            window=_window(p))
        if f != 1.0:
            out[exact_ids] /= f
    rng = np.random.default_rng(0)
    for members in _fast_batches(p, heads):
        b0 = members[0]
        coef = heads[b0].coef
        T = p.weights(b0)
        w = _key_weights(p, b0)
        kb = p.k[p.kvidx[b0]].astype(np.float64)
        vb = p.v[p.kvidx[b0]].astype(np.float64)
        f = _value_scale(vb)
        vb = vb * f if f != 1.0 else vb
        mask = None if w is None else w > 0
        alg = algorithms.get(heads[b0].algorithm)
        if p.relative is not None:
            res, den = alg.run(p.q[b0].astype(np.float64), kb, vb, p.scale, coef, T=T,
                               causal=p.causal, offset=p.offset, key_mask=mask,
                               relative=p.relative[p.ridx[b0]], workers=workers)
            res, den = res[None], den[None]
        else:
            res, den = alg.run(p.q[members].astype(np.float64), kb, vb, p.scale, coef,
                               T=T, causal=p.causal, offset=p.offset, key_mask=mask,
                               workers=workers, **_structure(p, b0)[1])
        # den ≈ Σ_j exp(logit_ij + b_t − max b): the log-sum-exp up to that shift
        with np.errstate(divide="ignore", invalid="ignore"):
            lse[members] = np.where(den > 0, np.log(np.where(den > 0, den, 1.0))
                                    + p.weight_shift(b0), -np.inf)
        if f != 1.0:
            res /= f
        if T is not None:
            # rows that see no key: exactly 0 (the FFT leaves rounding noise there)
            blind = ~_sees_keys(p, b0)
            res[:, blind] = 0.0
            lse[np.ix_(members, np.flatnonzero(blind))] = -np.inf
        out[members] = res
    for b, h in enumerate(heads):
        if h.method != "fast" or p.n == 0:
            continue
        if verify and p.n:
            rows = np.sort(rng.choice(p.n, size=min(int(verify), p.n), replace=False))
            h.observed_error = float(np.abs(out[b, rows] - _exact_rows(p, b, rows))
                                     .max(initial=0.0))
            if h.observed_error > h.error_bound:
                if h.radius_given:
                    why = (f"the radius={h.radius:.4g} given for this head must be below "
                           f"its true logit radius (omit radius= to use the computed "
                           f"one, which is a proven upper bound)")
                else:
                    why = (f"the computed logit radius R={h.radius:.4g} is a proven upper "
                           f"bound, so this points at a numbarope defect: please report "
                           f"it with the inputs")
                warnings.warn(
                    f"head {h.head}: verify found an error {h.observed_error:.3e} above the "
                    f"certified bound {h.error_bound:.3e}; {why}", RuntimeWarning,
                    stacklevel=3)
    return out, lse


_COMMON_DOC = """
    Parameters
    ----------
    query : (..., L, E) array_like of float32 or float64
        Queries (L = n for self-attention); leading (batch, head) dims broadcast with those of key, value,
        relative and bias. torch CPU tensors are accepted (float16 and bfloat16
        too: computed in float64, returned in their dtype, the final rounding in
        ``info.error_bound``); when any of query, key, value is a torch tensor, the
        result is a torch tensor of the dtype torch promotes the three to
        (``torch.promote_types``, numpy inputs taken by their dtype: a float16
        tensor with float32 arrays gives float32), with that dtype's rounding
        in the bound (no autograd). Objects with ``__dlpack__``
        or ``__array__`` are read as numpy arrays. Dask arrays (chunked along the
        leading dims) give a lazy dask array, each chunk computed by this function
        on a worker (``pip install "numbarope[dask]"``; README, "Dask").
    key : (..., S, E) array_like of float32 or float64
        Keys (S = n for self-attention), at positions 0 .. S−1.
    value : (..., S, Ev) array_like of float32 or float64
    rotary : Rotary or True, optional
        Rotary embedding applied to the keys at positions 0 .. S−1 and the queries
        at ``query_offset`` .. ``query_offset + L − 1`` (``True`` means
        ``Rotary()``). Exclusive with ``relative``. RoPE scalings that depend on
        the sequence length (dynamic NTK, LongRoPE) use one length for the whole
        call, its largest position + 1 (queries and keys alike), as transformers
        does for the positions it is given.
    relative : (..., L+S−1, E, E) array_like of float, optional
        General relative-position matrices, ``relative[t + n − 1] = W_t`` for
        offset ``t = i − j`` (Alman & Song 2025, §1); rectangular:
        ``relative[t − query_offset + S − 1] = W_t``, ``t = i + query_offset − j``.
    bias : (..., L+S−1) array_like of float or bool, optional
        Relative bias ``bias[t + n − 1] = b_t`` added to the logits (rectangular:
        ``bias[t − query_offset + S − 1]``); ``-inf``
        masks (see :mod:`numbarope.bias` for causal, window, ALiBi builders).
        A boolean array is a mask with torch SDPA's meaning: True = the pair
        takes part (bias 0), False = masked (−inf). Any finite magnitude is
        exact: softmax is invariant to a constant per row, so each row's bias
        is shifted by its largest visible value (``finfo.min`` used as a mask
        behaves like −inf).
    is_causal : bool, optional
        Mask keys after the query's position (j > i + query_offset); with the
        default alignment this is torch SDPA's ``is_causal`` (top-left).
    key_padding_mask : (..., S) array_like of bool, optional
        True = a real key that takes part, False = padding (torch's
        ``key_padding_mask`` inverted to "take part", as SDPA's boolean masks;
        HF's ``attention_mask`` of a padded batch, given as ``(B, 1, S)`` next to
        ``(B, H, L, E)`` queries: an array with fewer leading dims than the
        batch dims, not shared by all heads, is refused rather than read per
        head). Rows that see no real key return 0. Padded keys enter neither
        the per-row bias shift nor the logit radius nor max|value|. On the fast path the padded keys take no part (removed, or zero
        rows of the FFT's right-hand side): the Toeplitz structure is kept.
    positions : (..., S) array_like of int or float, optional
        Positions of the keys for the rotary angles (default 0 .. S−1; e.g. HF
        ``position_ids`` of a left-padded batch); query i takes the position of
        key ``i + query_offset``. Only with ``rotary``. The causal mask and a
        relative bias stay index based. RoPE scalings that depend on the
        sequence length (dynamic NTK, LongRoPE) use the largest position of the
        whole call plus one, as transformers does for a batch.
    query_offset : int, optional
        Position of query 0 (keys are at 0 .. S−1; negative: queries before the
        first key, which see no key when causal); query i is at
        ``i + query_offset`` for the causal mask and the rotary angle. Default 0,
        or S − L with ``causal_alignment="bottom_right"``. Rectangular problems
        (L ≠ S or an offset) run on every path (the fast path's Toeplitz
        products are L × S).
    causal_alignment : {"top_left", "bottom_right"}, optional
        ``"top_left"`` (default, torch SDPA): query i at position i;
        ``"bottom_right"`` (decoding with a key/value cache, HF, flash-attn): the
        last query at the last key's position. L = 1, S = 4, causal: top-left
        attends key 0 only, bottom-right all four.
    scale : float, optional
        Logit scale s > 0; default ``1/sqrt(E)`` (torch SDPA). The paper uses 1/E.
    method : {"auto", "exact", "fast"}, optional
        ``"exact"``: streaming exact kernel. ``"fast"``: polynomial method +
        Toeplitz/FFT, refused (``ValueError``, nothing computed) where ``eps``
        needs a degree or memory beyond the limits. ``"auto"`` (default): per head,
        the cheaper by predicted time of the two that meet ``eps``.
    eps : float in (0, 1), optional
        Tolerated error of the fast path, relative to ``max|value|`` of the head:
        ``max|out − exact| <= eps · max|value|`` (default 1e-3).
    degree : int, optional
        Polynomial degree to use instead of choosing it from ``eps``.
    approx : {"chebyshev", "taylor"}, optional
        Approximant of exp (default Chebyshev, far better at equal degree).
    radius : float or array_like of float, optional
        A caller-known bound ``R >= max |s·q_iᵀW_t k_j|`` per head (broadcast to the
        batch dims); default: ``s·max‖q‖·max_t‖W_t‖₂·max‖k‖``. Positions and bias
        do not enter R (bias is exact in the algorithm). A radius below the true
        one voids the certificate of the fast path (the exact path's bound always
        uses the computed radius).
    enable_gqa : bool, optional
        Grouped-query / multi-query attention, as torch SDPA: query has Hq heads
        on axis -3, key and value Hkv with Hq % Hkv == 0; query head h reads
        key/value head ``h // (Hq/Hkv)``.
    precision : {None, "float32", "float64"}, optional
        Compute precision of the exact path (logits, exp, the value product;
        the softmax state is always float64). None (default): float32 when all
        of query, key and value are float32 (torch's speed; its rounding,
        typically ~1e-6 relative, is in ``info.error_bound``), else float64.
        The fast path always computes in float64.
"""


def _from_other_libraries(query, key, value, relative, bias):
    """numpy arrays of the inputs, the torch dtype of the result (None: no torch input)
    and the unit roundoff of the result's dtype where it is float16/bfloat16.

    One promotion rule over query, key and value, torch's (``torch.promote_types``),
    whether each is a torch tensor or a numpy array: a torch float16 query with
    numpy float32 keys and values gives a float32 result, as torch would.
    """
    arrays, tdt = [], []
    for name, x in (("query", query), ("key", key), ("value", value),
                    ("relative", relative), ("bias", bias)):
        a, _, dt = to_numpy(x, name)
        arrays.append(a)
        tdt.append(dt)
    if all(d is None for d in tdt[:3]):
        return arrays, None, None
    import torch
    dt = None
    for a, d in zip(arrays[:3], tdt[:3]):
        if d is None:           # a numpy (or array-like) input: its dtype as torch's
            kind = np.asarray(a).dtype
            if kind.kind != "f" or kind.itemsize not in (4, 8):
                continue        # refused with its own message by _prepare
            d = kind.name
        t = getattr(torch, d)
        dt = t if dt is None else torch.promote_types(dt, t)
    name = None if dt is None else str(dt).replace("torch.", "")
    return arrays, name, LOW_PRECISION_UNIT.get(name)


#: Predicted seconds of a call above which rope_attention warns before starting.
LONG_CALL_SECONDS = 3600.0


def _warn_long(heads):
    """Warn before a call the cost model predicts to take over LONG_CALL_SECONDS."""
    total = sum(h.time_fast if h.method == "fast" else h.time_exact for h in heads)
    if total > LONG_CALL_SECONDS:
        h = max(heads, key=lambda h: h.time_exact if h.method == "exact" else h.time_fast)
        warnings.warn(
            f"this call is predicted to take {total / 3600:.3g} hours on this machine "
            f"({len(heads)} heads; head {h.head}: {h.method}, {h.reason}); interrupt with "
            f"Ctrl-C, or check numbarope.plan(...) first", RuntimeWarning, stacklevel=3)


def _typed_bias(bias, query, key, is_causal, query_offset, causal_alignment):
    """A :class:`numbarope.bias.RelativeBias` given as ``bias``: ``(array or None,
    is_causal, structure)``, the array in the storage of ``bias`` over the offsets that
    occur, the causal mask taken into ``is_causal`` (the exact path then skips the
    masked blocks), and the structure kept for the planner (decay, window)."""
    from .bias import Causal, NoBias
    _validate_flag(is_causal, "is_causal")
    st = bias + Causal() if is_causal else bias
    if isinstance(st, NoBias):
        return None, False, None
    if isinstance(st, Causal):
        return None, True, None
    shape_q, shape_k = getattr(query, "shape", None), getattr(key, "shape", None)
    if shape_q is None or shape_k is None or len(shape_q) < 2 or len(shape_k) < 2:
        raise ValueError("a typed bias needs query and key arrays of shape (..., L, E), "
                         "(..., S, E) to know the offsets")
    L, S = int(shape_q[-2]), int(shape_k[-2])
    off = _query_offset(query_offset, causal_alignment, L, S)
    vals = st.values(L, S, off)
    return vals, bool(st.causal), st


def _setup(query, key, value, rotary, relative, bias, is_causal, scale, precision,
           enable_gqa, query_offset=None, causal_alignment="top_left",
           key_padding_mask=None, positions=None):
    from .bias import RelativeBias
    structure = None
    if isinstance(bias, RelativeBias):
        bias, is_causal, structure = _typed_bias(bias, query, key, is_causal, query_offset,
                                                 causal_alignment)
    (q, k, v, rel, b), out_torch, low_unit = _from_other_libraries(query, key, value,
                                                                    relative, bias)
    key_padding_mask = to_numpy(key_padding_mask, "key_padding_mask", allow_int=True)[0]
    positions = to_numpy(positions, "positions", allow_int=True)[0]
    if low_unit is not None and precision is None:
        precision = "float64"        # float16/bfloat16 inputs: computed in float64
    p = _prepare(q, k, v, rotary, rel, b, is_causal, scale, precision, enable_gqa,
                 query_offset, causal_alignment, key_padding_mask, positions)
    p.structure = structure
    if low_unit is not None:
        p.out_unit = low_unit
        p.precision_given = False
    return p, out_torch


_KNOWN = ("rotary", "relative", "bias", "is_causal", "scale", "method", "eps", "degree",
          "approx", "radius", "verify", "return_info", "precision", "workers", "enable_gqa",
          "query_offset", "causal_alignment", "key_padding_mask", "positions", "return_lse")


def rope_attention(query: Any, key: Any, value: Any, *, rotary: Rotary | bool | None = None,
                   relative: Any = None, bias: Any = None, is_causal: bool = False,
                   scale: float | None = None,
                   method: Literal["auto", "exact", "fast"] = "auto", eps: float = 1e-3,
                   degree: int | None = None,
                   approx: Literal["chebyshev", "taylor"] = "chebyshev",
                   radius: Any = None, verify: int = 0, return_info: bool = False,
                   precision: Literal["float32", "float64"] | None = None,
                   workers: int | None = None, enable_gqa: bool = False,
                   query_offset: int | None = None,
                   causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
                   key_padding_mask: Any = None, positions: Any = None,
                   return_lse: bool = False, **unknown: Any) -> Any:
    """RoPE / relative-position softmax attention, exact or certified fast.

    ``A[i, j] = exp(s·q_iᵀ W_{i−j} k_j + b_{i−j})``, ``out = D⁻¹ A V`` with
    ``D = diag(A·1)`` (Alman & Song 2025, eq. (1); rotary gives ``W_t = R_{−t}``,
    Su et al. 2024). Rows whose every key is masked return 0 (as torch >= 2.5).
    {common}
    verify : int, optional
        For every head computed by the fast path, compute ``verify`` random rows
        exactly (O(verify·n·E²)) and report the observed max error in
        ``info.observed_error`` beside the bound.
    return_info : bool, optional
        Also return an :class:`AttentionInfo` (per head: method, algorithm,
        degree, features, logit radius, certified error bound, predicted times).
    return_lse : bool, optional
        Also return the row log-sum-exp (see Returns), to merge partial results.
    workers : int, optional
        Threads used by the kernels, BLAS and scipy.fft, with scipy.fft's
        meaning: None (default) all cores or what :func:`numbarope.set_workers`
        set; a negative count is counted from ``os.cpu_count()`` (-1: all cores).

    Returns
    -------
    out : (..., L, Ev) ndarray, or torch.Tensor for torch inputs
        The promoted dtype of query, key and value: float32 if all are float32,
        else float64 (numpy); for torch tensors the promoted torch dtype
        (float16/bfloat16 included). Compute precision: see ``precision``.
    lse : (..., L) ndarray of float64, or a float64 torch.Tensor for torch inputs
        Only with ``return_lse=True``: per row, the log-sum-exp of the weights,
        ``log Σ_j exp(s·q_iᵀW_t k_j + b_t)`` (−inf for rows that see no key); on the
        fast path ``log Σ_j p(s·q_iᵀW_t k_j)·exp(b_t)``, within ``−log(1 − δ − ρ)``
        of it (δ, ρ: the certified relative error of the weights). With it, partial
        results over disjoint key blocks merge exactly: ``out = Σ_b e^{lse_b − lse}
        out_b``, ``lse = log Σ_b e^{lse_b}``.
    info : AttentionInfo
        Only with ``return_info=True`` (after ``lse`` when both are asked).

    Raises
    ------
    TypeError
        Non-float inputs (integer, complex, object, numpy float16: cast to
        float32 — torch float16/bfloat16 tensors are accepted; bool except in
        ``bias``), options of the wrong type (``workers`` not an int); unknown
        keyword arguments (with the name to use, e.g. ``attn_mask`` → ``bias``).
    ValueError
        Shapes that disagree (the message gives the shapes seen and expected),
        NaN/inf inputs (bias: NaN/+inf), unknown method/approx/precision, eps
        outside (0, 1), degree outside [0, MAX_DEGREE], scale <= 0, workers = 0;
        with ``method="fast"``, a request the limits refuse (degree, features, memory).

    Notes
    -----
    Inputs are taken as exact values; rotary angles are computed in extended
    precision; the fast path computes in float64 and the exact path in
    ``precision``. ``info.error_bound`` bounds ``max|out − o|`` where ``o`` is
    the mathematical value of the formula for the given inputs, on every path:
    for the exact path it is the floating-point rounding of logits, exp, sums
    and the final division (:func:`numbarope.planner.exact_error_bound`); float32
    results add their final rounding (at most ``2^-24·max|V|``). The fast path's error bound is ``max|out − exact| <= 2δ'/(1−δ')·max|V|``
    where δ' is the certified relative error δ of the polynomial on ``[−R, R]``
    plus a floating-point allowance (Alman & Song 2025, §4; see
    :func:`numbarope.exp_approximation`). Every weight ``p(x)T`` is within
    a factor ``1 ± δ'`` of ``eˣT``, and a ratio of such sums moves by at most
    ``δ'/(1−δ')·(max v − min v)``.

    Examples
    --------
    >>> import numpy as np, numbarope
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 64, 8)) * 0.3 for _ in range(3))
    >>> out, info = numbarope.rope_attention(q, k, v, rotary=True, method="fast",
    ...                                      eps=1e-4, return_info=True)
    >>> exact = numbarope.rope_attention(q, k, v, rotary=True, method="exact")
    >>> bool(np.abs(out - exact).max() <= info.error_bound.max())
    True
    """
    from ._dask import is_dask
    if is_dask(query, key, value, bias, relative, key_padding_mask, positions):
        from ._dask import rope_attention_dask      # lazy: one task per chunk of heads
        return rope_attention_dask(
            query, key, value, rotary=rotary, relative=relative, bias=bias,
            is_causal=is_causal, scale=scale, method=method, eps=eps, degree=degree,
            approx=approx, radius=radius, verify=verify, return_info=return_info,
            precision=precision, workers=workers, enable_gqa=enable_gqa,
            query_offset=query_offset, causal_alignment=causal_alignment,
            key_padding_mask=key_padding_mask, positions=positions,
            return_lse=return_lse, **unknown)
    if unknown:
        raise unexpected_keywords("rope_attention", unknown, _KNOWN)
    eps_f = _validate_options(method, eps, degree, approx, scale, radius, is_causal)
    _validate_precision(precision)
    _validate_flag(enable_gqa, "enable_gqa")
    from ._threads import resolve_workers
    nthreads = resolve_workers(workers)
    if isinstance(verify, bool) or not isinstance(verify, (int, np.integer)):
        raise TypeError(f"verify must be an int >= 0 (rows checked per head), got {verify!r}")
    if verify < 0:
        raise ValueError(f"verify must be >= 0 (rows checked per head), got {verify}")
    if not isinstance(return_info, (bool, np.bool_)):
        raise TypeError(f"return_info must be True or False, got {return_info!r}")
    if not isinstance(return_lse, (bool, np.bool_)):
        raise TypeError(f"return_lse must be True or False, got {return_lse!r}")
    p, out_torch = _setup(query, key, value, rotary, relative, bias, is_causal, scale,
                          precision, enable_gqa, query_offset, causal_alignment,
                          key_padding_mask, positions)
    heads = _plans(p, method, eps_f, degree, approx, radius)
    _warn_long(heads)
    for h in heads:
        if h.method == "fast" and not np.isfinite(h.error_bound):
            warnings.warn(
                f"head {h.head}: degree={h.degree} certifies no accuracy at logit radius "
                f"R={h.radius:.3g} (error_bound=inf): the output may lie far outside the "
                f"range of value; use method='exact' or 'auto', or omit degree=",
                RuntimeWarning, stacklevel=2)
    out, lse = _run(p, heads, verify, nthreads)
    out = out.reshape(p.batch_shape + (p.n, p.Ev)).astype(p.dtype, copy=False)
    grads = [x for x in (query, key, value, relative, bias)
             if is_torch(x) and x.requires_grad] if requires_grad(query, key, value,
                                                                  relative, bias) else []
    out = output_like(out, (out_torch,), grads)
    res = (out,)
    if return_lse:
        res += (output_like(lse.reshape(p.batch_shape + (p.n,)),
                            ("float64",) if out_torch is not None else ()),)
    if return_info:
        res += (AttentionInfo(heads, p.batch_shape, eps_f),)
    return res[0] if len(res) == 1 else res


def plan(query: Any, key: Any, value: Any, *, rotary: Rotary | bool | None = None,
         relative: Any = None, bias: Any = None, is_causal: bool = False,
         scale: float | None = None, method: Literal["auto", "exact", "fast"] = "auto",
         eps: float = 1e-3, degree: int | None = None,
         approx: Literal["chebyshev", "taylor"] = "chebyshev", radius: Any = None,
         precision: Literal["float32", "float64"] | None = None, enable_gqa: bool = False,
         query_offset: int | None = None,
         causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
         key_padding_mask: Any = None, positions: Any = None,
         **unknown: Any) -> AttentionInfo:
    """Plan ``rope_attention`` without computing it: per head, what and why.

    Takes the arguments of :func:`rope_attention` (the arrays are validated the
    same way) and returns its :class:`AttentionInfo`: per head the logit radius
    R, degree, features, algorithm, predicted time of exact and fast (seconds),
    fast-path memory (bytes), the choice and the reason in one line.
    ``print(plan(...))`` shows it as a table.
    {common}

    Returns
    -------
    AttentionInfo

    Raises
    ------
    TypeError, ValueError
        As :func:`rope_attention`.

    Examples
    --------
    >>> import numpy as np, numbarope
    >>> q = k = v = np.full((1, 4096, 4), 0.25)
    >>> info = numbarope.plan(q, k, v, rotary=True, scale=1.0)
    >>> info.method.tolist(), info.algorithm.tolist()
    (['fast'], ['gemm'])
    """
    if unknown:
        raise unexpected_keywords("plan", unknown,
                                  [k for k in _KNOWN if k not in ("verify", "return_info",
                                                                  "workers", "return_lse")])
    eps_f = _validate_options(method, eps, degree, approx, scale, radius, is_causal)
    _validate_precision(precision)
    _validate_flag(enable_gqa, "enable_gqa")
    p, _ = _setup(query, key, value, rotary, relative, bias, is_causal, scale, precision,
                  enable_gqa, query_offset, causal_alignment, key_padding_mask, positions)
    return AttentionInfo(_plans(p, method, eps_f, degree, approx, radius), p.batch_shape,
                         eps_f)


for _f in (rope_attention, plan):
    _f.__doc__ = _f.__doc__.replace("    {common}\n", _COMMON_DOC)
del _f
