"""Arrays and options in, a frozen :class:`Problem` out.

Everything a call is refused for is refused here, before any work: options,
dtypes (torch tensors and DLPack objects converted; one promotion rule), shapes
(:func:`check_shapes`, the one shape-only validator that the API, the Dask
backend and the transformers backend all call), NaN/inf, memory. Then q and k
are rotated (float64, exact angles) and every input is flattened over the
broadcast (batch, head) dims.
"""

from __future__ import annotations

import numbers
from dataclasses import dataclass

import numpy as np
from numba import njit

from .. import _config
from ..bias import Causal, NoBias, Packed, RelativeBias, Structure
from .._runtime.interop import LOW_PRECISION_UNIT, to_numpy
from ..rotary import Rotary, rotary_tables, rotate

__all__ = ["Problem", "Shapes", "check_shapes", "make_problem", "validate_options",
           "validate_precision", "validate_flag", "check_per_key_lead", "METHODS",
           "APPROXES", "PRECISIONS", "ALIGNMENTS", "KNOWN_KEYWORDS"]

METHODS = ("auto", "exact", "fast")
APPROXES = ("chebyshev", "taylor")

#: Keyword arguments of rope_attention (for the "did you mean" of unknown ones).
KNOWN_KEYWORDS = ("rotary", "relative", "bias", "is_causal", "scale", "method", "eps",
                  "degree", "approx", "radius", "verify", "return_info", "precision",
                  "workers", "enable_gqa", "query_offset", "causal_alignment",
                  "key_padding_mask", "positions", "return_lse", "softcap", "cu_seqlens")


def as_float_array(x, name):
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
    if isinstance(arr, np.matrix):      # always 2-D, * is a product: its plain array
        arr = np.asarray(arr)
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


def validate_flag(x, name):
    if not isinstance(x, (bool, np.bool_)):
        raise TypeError(f"{name} must be True or False, got {x!r}")


def validate_precision(precision):
    if precision is not None and (not isinstance(precision, str)
                                  or precision not in PRECISIONS[1:]):
        raise ValueError(f"precision={precision!r} is unknown; use None (float32 for "
                         f"float32 inputs, else float64), 'float32' or 'float64'")


def packed_arguments(cu_seqlens, key, bias, is_causal, rotary, positions):
    """``cu_seqlens=`` as the arguments it stands for: ``(bias, is_causal, positions)``
    with ``bias=Packed(cu_seqlens, is_causal)``, ``is_causal=False`` (the structure
    holds it) and, when numbarope rotates, positions that restart at every sequence
    (``Packed.positions()``, unless ``positions=`` is given). Raises naming the
    argument: cu_seqlens not a 1-D integer array from 0 to the key count, or given
    with ``bias=``."""
    if bias is not None:
        raise ValueError("pass either cu_seqlens= or bias=, not both: cu_seqlens=c is "
                         "bias=numbarope.bias.Packed(c, is_causal=is_causal)")
    cu = np.asarray(cu_seqlens.detach().cpu() if hasattr(cu_seqlens, "detach")
                    else cu_seqlens)
    if cu.ndim != 1 or cu.size == 0 or not np.issubdtype(cu.dtype, np.integer):
        raise ValueError(f"cu_seqlens must be a 1-D integer array [0, n1, n1+n2, ..., "
                         f"total] (flash-attn's cu_seqlens), got dtype {cu.dtype} and "
                         f"shape {cu.shape}")
    S = int(np.shape(key)[-2]) if len(np.shape(key)) >= 2 else -1
    if int(cu[-1]) != S:
        raise ValueError(f"cu_seqlens[-1] = {int(cu[-1])} must equal the number of keys "
                         f"S = {S} (the packed sequences cover every key, no padding)")
    packed = Packed(tuple(int(x) for x in cu), is_causal=bool(is_causal))
    if rotary not in (None, False) and positions is None:
        positions = packed.positions()
    return packed, False, positions


def as_rotary(rotary):
    """``rotary=`` as rope_attention reads it: True is ``Rotary()``, False (or None) is
    None, a :class:`~numbarope.Rotary` itself; anything else raises TypeError."""
    if rotary is True or rotary is np.True_:
        return Rotary()
    if rotary is False or rotary is np.False_:
        return None
    if rotary is not None and not isinstance(rotary, Rotary):
        raise TypeError(f"rotary must be a numbarope.Rotary, True (the default Rotary()) "
                        f"or None/False (no rotation), got {type(rotary).__name__}")
    return rotary


def validate_softcap(softcap):
    """``softcap`` as a float > 0, or None; raises naming the argument."""
    if softcap is None:
        return None
    c = _real(softcap, "softcap", "a real number > 0 (the logit cap c of c·tanh(x/c))")
    if not (np.isfinite(c) and c > 0.0):
        raise ValueError(f"softcap={softcap!r} must be a finite number > 0 (the logit cap "
                         f"c of c·tanh(x/c), e.g. Gemma 2's attn_logit_softcapping=50.0); "
                         f"None for no capping")
    return c


def validate_options(method, eps, degree, approx, scale, radius, is_causal=False):
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
        if method == "exact":
            # refused rather than ignored: the exact path has no polynomial to set
            raise ValueError(f"degree={degree} sets the fast path's polynomial; "
                             f"method='exact' uses none: omit degree, or use "
                             f"method='fast' (or 'auto')")
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
    (query head h reads key/value head h // (Hq/Hkv); nothing is copied). Shapes in."""
    for name, a in (("query", q), ("key", k), ("value", v)):
        if len(a) < 3:
            raise ValueError(f"enable_gqa=True needs a head axis: {name} must have shape "
                             f"(..., heads, n, features), got shape {a}")
    hq, hk, hv = q[-3], k[-3], v[-3]
    if hk != hv:
        raise ValueError(f"key has {hk} heads and value {hv} (axis -3); grouped-query "
                         f"attention needs the same number of key and value heads")
    if hk == 0 or hq % hk:
        raise ValueError(f"enable_gqa=True: query has {hq} heads, key/value {hk} (axis "
                         f"-3); the query heads must be a multiple of the key/value heads")
    return hq // hk


ALIGNMENTS = ("top_left", "bottom_right")


def query_offset_of(query_offset, causal_alignment, L, S):
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


def as_key_mask(x, S):
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


@dataclass(frozen=True)
class Shapes:
    """The sizes of a call, as :func:`check_shapes` found them.

    ``batch_shape``: the broadcast (batch, head) dims of the queries; ``group``:
    query heads per key/value head (1 without ``enable_gqa``); ``kv_shape``: the
    (batch, head) dims of key and value; ``L``, ``S``: query and key rows; ``E``
    head_dim; ``Ev`` value columns; ``offset``: the position of query 0 (keys at
    0 .. S−1).
    """

    batch_shape: tuple
    kv_shape: tuple
    group: int
    L: int
    S: int
    E: int
    Ev: int
    offset: int

    @property
    def heads(self) -> int:
        return int(np.prod(self.batch_shape, dtype=np.int64))


def check_shapes(query, key, value, *, enable_gqa=False, query_offset=None,
                 causal_alignment="top_left", relative=None, bias=None,
                 key_padding_mask=None, positions=None) -> Shapes:
    """Check the shapes of a call (nothing but shapes: no data is read).

    Each argument is a shape tuple (or None where the input is absent): query
    ``(..., L, E)``, key ``(..., S, E)``, value ``(..., S, Ev)``, relative
    ``(..., L+S−1, E, E)``, bias ``(..., L+S−1)``, key_padding_mask and positions
    ``(..., S)``. The message of every error gives the shapes seen and expected.
    Called by :func:`numbarope.rope_attention` and :func:`numbarope.plan`, by the
    Dask backend before it builds a graph and by the transformers backend.

    Returns
    -------
    Shapes

    Raises
    ------
    ValueError
        Shapes that do not fit together (see the message), ``query_offset`` or
        ``causal_alignment`` unknown or both given.
    TypeError
        ``query_offset`` not an int.
    """
    q, k, v = (tuple(int(d) for d in s) for s in (query, key, value))
    for name, s in (("query", q), ("key", k), ("value", v)):
        if len(s) < 2:
            raise ValueError(f"{name} must have shape (..., n, features), got shape {s}")
    group = _group_heads(q, k, v) if enable_gqa else 1
    L, E = q[-2:]
    S = k[-2]
    if k[-1] != E:
        raise ValueError(f"key has shape {k}; expected (..., S, {E}) to match "
                         f"query {q} (same head_dim E)")
    if v[-2] != S:
        raise ValueError(f"value has shape {v}; expected (..., {S}, Ev) with the "
                         f"same number of rows S as key {k}")
    off = query_offset_of(query_offset, causal_alignment, L, S)
    nt = L + S - 1 if L and S else 0         # offsets that occur: t = i + off - j
    if E < 1:
        raise ValueError(f"query has head_dim E=0 (shape {q}); E must be >= 1")
    if group > 1:                # key/value broadcast as if they had Hq heads
        shapes = [q[:-2], k[:-3] + (q[-3],), v[:-3] + (q[-3],)]
    else:
        shapes = [q[:-2], k[:-2], v[:-2]]
    if relative is not None:
        rel = tuple(relative)
        if len(rel) < 3 or rel[-3:] != (nt, E, E):
            raise ValueError(f"relative has shape {rel}; expected (..., L+S-1, E, E) = "
                             f"(..., {nt}, {E}, {E}) with relative[t - query_offset + S - 1]"
                             f" = W_t (for L = S, query_offset = 0: relative[t + n - 1])")
        shapes.append(rel[:-3])
    if bias is not None:
        bia = tuple(bias)
        if len(bia) < 1 or bia[-1] != nt:
            raise ValueError(f"bias has shape {bia}; expected (..., L+S-1) = "
                             f"(..., {nt}) with bias[t - query_offset + S - 1] = b_t (for "
                             f"L = S, query_offset = 0: bias[t + n - 1])")
        shapes.append(bia[:-1])
    try:
        batch_shape = tuple(np.broadcast_shapes(*shapes))
    except ValueError:
        gqa = (group == 1 and len(q) >= 3 and len(k) >= 3 and k[-3] > 0
               and q[-3] != k[-3] and q[-3] % k[-3] == 0)
        raise ValueError(f"leading (batch, head) dims do not broadcast: query {q}, "
                         f"key {k}, value {v}"
                         + (f", relative {tuple(relative)}" if relative is not None else "")
                         + (f", bias {tuple(bias)}" if bias is not None else "")
                         + ("; key/value have fewer heads than query: for grouped-query "
                            "attention pass enable_gqa=True" if gqa else "")) from None
    for name, s in (("key_padding_mask", key_padding_mask), ("positions", positions)):
        if s is None:
            continue
        s = tuple(s)
        if len(s) < 1 or s[-1] != S:
            what = ("one entry per key (True = real token)" if name == "key_padding_mask"
                    else "the position of every key (queries take those of keys "
                         "query_offset .. query_offset + L - 1)")
            raise ValueError(f"{name} has shape {s}; expected (..., {S}): {what}")
        check_per_key_lead(s, batch_shape, name)
    kv_shape = batch_shape[:-1] + (k[-3],) if group > 1 else batch_shape
    return Shapes(batch_shape=batch_shape, kv_shape=kv_shape, group=group, L=L, S=S, E=E,
                  Ev=v[-1], offset=off)


@dataclass(frozen=True)
class Problem:
    """One call's inputs, validated, rotated and flattened over the (batch, head) dims.

    Arrays: ``q`` (B, L, E), ``k`` (Bk, S, E), ``v`` (Bk, S, Ev) in the storage dtype
    (float64 where a rotation was computed or an input is float64, else float32);
    ``kvidx`` (B,): the key/value head of each query head (GQA). ``relative``
    (Br, L+S−1, E, E) float64 with ``ridx``; ``bias`` (Bb, L+S−1) float64 with
    ``bidx`` (the causal mask of a typed structure included as −inf); ``kmask``
    (Bk', S) 0/−inf with ``kidx`` (key padding); None where absent.
    ``structure``: the call's typed :class:`numbarope.bias.Structure` (is_causal
    folded in), or None when the bias was an array (see ``bias``) or absent (see
    ``causal``).
    ``causal``: keys after the query are masked. ``key_ranges``: ``(lo, hi)`` (L,)
    int64, the keys each query row may see at most, or None. ``dtype``: the numpy
    dtype of the result; ``out_unit``: its unit roundoff (0 for float64);
    ``precision``: the requested compute precision (None: from the inputs);
    ``rotated``: q and k were rotated here (their rotation error is in the bound);
    ``unrotated``: they should be, but were not (planning only, ``rotate=False``);
    ``positions``: the rotary positions per row, as :func:`_rotate_rows` read them
    (None: the default positions).
    """

    q: np.ndarray
    k: np.ndarray
    v: np.ndarray
    kvidx: np.ndarray
    relative: np.ndarray | None
    ridx: np.ndarray | None
    bias: np.ndarray | None
    bidx: np.ndarray | None
    kmask: np.ndarray | None
    kidx: np.ndarray | None
    structure: Structure | None
    causal: bool
    key_ranges: tuple | None
    scale: float
    shapes: Shapes
    dtype: np.dtype
    out_unit: float
    precision: str | None
    rotated: bool
    softcap: float | None = None
    unrotated: bool = False
    positions: np.ndarray | None = None

    @property
    def batch_shape(self):
        return self.shapes.batch_shape

    @property
    def n(self):
        return self.shapes.L

    @property
    def S(self):
        return self.shapes.S

    @property
    def E(self):
        return self.shapes.E

    @property
    def Ev(self):
        return self.shapes.Ev

    @property
    def offset(self):
        return self.shapes.offset


def _typed_bias(bias, is_causal, L, S, off):
    """``(values or None, causal, structure)`` of a :class:`numbarope.bias.Structure`
    given as ``bias``: is_causal folded in (``bias + Causal()``); the values over the
    offsets that occur for a relative one."""
    st = bias
    if is_causal and not bias.causal:
        st = bias + Causal() if isinstance(bias, RelativeBias) else bias._with_causal()
        if st is None:
            raise ValueError(f"is_causal=True with bias={bias!r}: this structure has no "
                             f"causal form; pass is_causal=False")
    if isinstance(st, NoBias):
        return None, False, st
    if isinstance(st, Causal):
        return None, True, st
    vals = st.values(L, S, off) if isinstance(st, RelativeBias) else None
    return vals, bool(st.causal), st


def make_problem(query, key, value, *, rotary=None, relative=None, bias=None,
                 is_causal=False, scale=None, precision=None, enable_gqa=False,
                 query_offset=None, causal_alignment="top_left", key_padding_mask=None,
                 positions=None, softcap=None, rotate=True):
    """Validate and prepare one call: ``(Problem, torch dtype name of the result or
    None)``. Options other than arrays are checked by the caller
    (:func:`validate_options`); raises as :func:`numbarope.rope_attention`.
    ``rotate=False`` (:func:`numbarope.plan`): the rotation is validated but not
    applied — every fact the planner uses (norms, hence radii; values, masks) is the
    same without it, and rotating costs time and float64 copies (``Problem.unrotated``)."""
    validate_flag(is_causal, "is_causal")
    if rotary is not None and relative is not None:
        raise ValueError("rotary and relative are exclusive: pass a rotary embedding "
                         "OR general relative matrices (rotary_relative_matrices gives "
                         "the matrices of a rotary embedding)")
    rotary = as_rotary(rotary)
    structure = bias if isinstance(bias, Structure) else None
    (q, k, v, rel, bia), out_torch, low_unit = _from_other_libraries(
        query, key, value, relative, None if structure is not None else bias)
    kpm = to_numpy(key_padding_mask, "key_padding_mask", allow_int=True)[0]
    pos = to_numpy(positions, "positions", allow_int=True)[0]
    # float16/bfloat16 inputs arrive widened (exactly) to float32 and are computed as
    # float32 inputs are (float32, float64 where the logits need it), as torch does;
    # the result's rounding to their dtype is in the bound (out_unit below)
    q = as_float_array(q, "query")
    k = as_float_array(k, "key")
    v = as_float_array(v, "value")
    if rel is not None:
        rel = as_float_array(rel, "relative")
    if bia is not None:
        bia = as_float_array(bia, "bias")
    if kpm is not None:
        kpm = np.asarray(kpm)
    if pos is not None:
        try:
            pos = np.asarray(pos)
        except ValueError:           # ragged: a tuple of arrays of different lengths
            raise ValueError("positions must be one array (..., S) of token positions "
                             "(e.g. numpy.stack of the rows), got a ragged sequence") \
                from None
        if pos.dtype == object:
            raise TypeError("positions must be an array of integer or real positions, "
                            "shape (..., S); got a sequence of objects")
    sh = check_shapes(q.shape, k.shape, v.shape, enable_gqa=enable_gqa,
                      query_offset=query_offset, causal_alignment=causal_alignment,
                      relative=None if rel is None else rel.shape,
                      bias=None if bia is None else bia.shape,
                      key_padding_mask=None if kpm is None else kpm.shape,
                      positions=None if pos is None else pos.shape)
    n, S, E, Ev, off, group = sh.L, sh.S, sh.E, sh.Ev, sh.offset, sh.group
    batch_shape = sh.batch_shape
    if structure is not None:
        bia, is_causal, structure = _typed_bias(structure, is_causal, n, S, off)
        if bia is not None:
            try:
                batch_shape = tuple(np.broadcast_shapes(batch_shape, bia.shape[:-1]))
            except ValueError:
                raise ValueError(f"bias {structure!r} has per-head parameters of shape "
                                 f"{bia.shape[:-1]}, which do not broadcast to the batch "
                                 f"(head) dims {batch_shape}") from None
            if batch_shape != sh.batch_shape:
                sh = check_shapes(q.shape, k.shape, v.shape, enable_gqa=enable_gqa,
                                  query_offset=query_offset,
                                  causal_alignment=causal_alignment,
                                  relative=None if rel is None else rel.shape,
                                  bias=bia.shape,
                                  key_padding_mask=None if kpm is None else kpm.shape,
                                  positions=None if pos is None else pos.shape)
    dtype = np.result_type(q.dtype, k.dtype, v.dtype)
    if rotary is not None:
        rotary.rotary_dim(E)      # validates dim against E
    kpm = as_key_mask(kpm, S)
    pos = _as_positions(pos, S, off, n, rotary)
    B = sh.heads
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
    if bia is not None and structure is None:
        _check_finite(bia, "bias", allow_neg_inf=True)
    s = 1.0 / np.sqrt(E) if scale is None else float(scale)
    unrotated = rotary is not None and not rotate
    if unrotated:
        rotary, pos = None, None
    q, k = _rotate(q, k, rotary, pos, n, S, E, off)
    # storage: float64 where a rotation was computed (the fast path needs its float64
    # values) or an input is float64; float32 otherwise (no copies on the float32 path)
    store = np.float64 if (rotary is not None or dtype == np.float64) else np.float32

    def flat(a, shape=batch_shape):
        count = int(np.prod(shape, dtype=np.int64))
        a = np.broadcast_to(a, shape + a.shape[-2:]).reshape((count,) + a.shape[-2:])
        return np.ascontiguousarray(a, dtype=store)

    q64 = flat(q)
    if group > 1:                # one copy per key/value head; kvidx maps query heads
        kv_shape = sh.kv_shape
        k64, v64 = flat(k, kv_shape), flat(v, kv_shape)
        ids = np.arange(int(np.prod(kv_shape, dtype=np.int64))).reshape(kv_shape)
        kvidx = np.ascontiguousarray(
            np.take(ids, np.arange(batch_shape[-1]) // group, axis=-1).reshape(-1))
    else:
        k64, v64 = flat(k), flat(v)
        kvidx = np.arange(B, dtype=np.int64)
    if pos is not None:
        q64, k64 = _rotate_rows(q64, k64, kvidx, rotary, pos, batch_shape, n, S, E, off)
    kmask = kidx = None
    if kpm is not None and not kpm.all():      # an all-True mask changes nothing
        kidx = _index_map(kpm.shape[:-1], batch_shape)
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
    ranged = structure if structure is not None else Causal() if is_causal else None
    ranges = None if ranged is None else ranged.key_ranges(n, S, off)
    out_unit = (low_unit if low_unit is not None else
                2.0 ** -24 if dtype == np.float32 else 0.0)
    p = Problem(q=q64, k=k64, v=v64, kvidx=kvidx, relative=rel, ridx=ridx, bias=bia,
                bidx=bidx, kmask=kmask, kidx=kidx, structure=structure,
                causal=bool(is_causal), key_ranges=ranges, scale=s, shapes=sh,
                dtype=np.dtype(dtype), out_unit=float(out_unit),
                precision=None if precision is None else str(precision),
                rotated=rotary is not None or unrotated, softcap=validate_softcap(softcap),
                unrotated=unrotated, positions=pos)
    return p, out_torch


def _rotate(q, k, rotary, pos, n, S, E, off, inverse=False):
    """q, k rotated at their default positions (keys 0 .. S−1, queries off .. off+L−1),
    in float64; unchanged without rotary or with per-row positions (done later).
    ``inverse``: by the transposed rotations instead (sin → −sin: each 2×2 block
    ``[[c, −s], [s, c]]``, scaled or not, transposes to ``[[c, s], [−s, c]]``), which
    takes gradients with respect to the rotated q, k back to the inputs."""
    if rotary is None or pos is not None:
        return q, k
    # one table over both, so that RoPE scalings that depend on the sequence length
    # (dynamic NTK, LongRoPE) use one length for the whole call: its largest position + 1
    lo, hi = min(0, off), max(S, off + n) if n else S
    if lo == 0 and hi == S:
        cos, sin = rotary_tables(rotary, S, E)        # cached; seq_len = S
    else:
        cos, sin = rotary_tables(rotary, hi - lo, E, positions=np.arange(lo, hi),
                                 seq_len=hi)
    if inverse:
        sin = -sin
    k = rotate(k, rotary, cos[-lo:S - lo], sin[-lo:S - lo])
    q = rotate(q, rotary, cos[off - lo:off - lo + n], sin[off - lo:off - lo + n])
    return q, k


def rotate_back(dq, dk, rotary, n, S, E, off):
    """Gradients with respect to rotated queries and keys (float64, leading dims any)
    as gradients with respect to the inputs before rotation (the transposed rotations,
    at the positions :func:`make_problem` rotated them)."""
    return _rotate(dq, dk, rotary, None, n, S, E, off, inverse=True)


def rotate_rows_back(p, dq, dk, rotary):
    """:func:`rotate_back` for a problem with per-row ``positions``: dq (B, n, E), dk
    (Bk, S, E), flattened as ``p.q``, ``p.k``."""
    return _rotate_rows(dq, dk, p.kvidx, rotary, p.positions, p.batch_shape, p.n, p.S,
                        p.E, p.offset, inverse=True)


def _rotate_rows(q64, k64, kvidx, rotary, pos, batch_shape, n, S, E, off, inverse=False):
    """Per-row positions: rotate head by head (keys once per key/value head);
    ``inverse``: by the transposed rotations (gradients back to the inputs, as
    :func:`_rotate`)."""
    pidx = _index_map(pos.shape[:-1], batch_shape)
    pos2 = pos.reshape((-1, S))
    kv_pos = np.full(k64.shape[0], -1, np.int64)
    for b in range(q64.shape[0]):
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
        if inverse:
            sin = -sin
        heads = np.flatnonzero(pidx == r)
        q64[heads] = rotate(q64[heads], rotary, cos[off:off + n], sin[off:off + n])
        kvs = np.flatnonzero(kv_pos == r)
        if kvs.size:
            k64[kvs] = rotate(k64[kvs], rotary, cos, sin)
    return q64, k64


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
