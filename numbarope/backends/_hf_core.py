"""The transformers backend's core, without transformers: how a mask transformers
builds is read (:func:`read_mask`) and one attention call's arguments
(:func:`_arguments`) and result (:func:`_compute`). :mod:`.transformers` (the
backend transformers calls) and :mod:`.torch_op` (the operators ``torch.compile``
sees) both run these; the options of :func:`numbarope.integrations.register` live
here (``_options``).
"""

import threading
import weakref
from types import MappingProxyType

import numpy as np
import torch
from numba import njit

from .._pipeline import attention as _attention
from .._runtime.threads import resolve_workers
from ..bias import Chunked, Packed, Window

__all__ = ["mask_structure", "read_mask"]

_DEFAULTS = MappingProxyType({"method": "auto", "eps": 1e-3, "precision": None,
                               "workers": None})
# the options of every forward: one read-only mapping, replaced whole by register()
# (one assignment) and read once per attention call, so that a call never sees half
# of one register()'s options and half of another's
_options = _DEFAULTS


# ---------------------------------------------------------------------------
# Reading the mask

# The last mask read, per thread: one (weakref to the mask, its version counter,
# result) tuple, assigned whole and read once. Per thread: threads serving different
# batches at once (a threaded server) would otherwise evict each other's entry, and
# a shared entry read in several steps could pair one's mask with another's result.
_cache = threading.local()


def mask_structure(mask):
    """Causal offset and key padding of a transformers attention mask, or raise.

    Parameters
    ----------
    mask : (B, 1 or H, L, S) torch.Tensor of bool or float
        True (or 0.0) = the pair takes part; False (or -inf / ``finfo.min``) =
        masked, as transformers' ``sdpa_mask`` and ``eager_mask`` build them.

    Returns
    -------
    offset : int or None
        None: no causal mask. Else query i sees keys j <= i + offset (S - L is
        transformers' bottom-right alignment).
    key_padding_mask : (B, 1 or H, S) ndarray of bool or None
        True = a real key; None when no key is padded.

    Raises
    ------
    NotImplementedError
        The mask is not key padding AND (nothing or one causal offset): the
        message names what it found (sliding window, chunks, packed sequences,
        a float bias, an arbitrary mask).
    """
    offset, kpm, local = read_mask(mask)
    if local is not None:
        raise NotImplementedError(
            f"attention_mask of shape {tuple(mask.shape)} is a causal mask with "
            f"{_name(local)}; mask_structure reads key padding and causal masks only: "
            f"read_mask reads windows, chunks and packed sequences too")
    return offset, kpm


def _name(local):
    if isinstance(local, Window):
        return f"a sliding window of {local.left + 1} keys ({local!r})"
    if isinstance(local, Chunked):
        return f"chunks of {local.size} positions ({local!r})"
    return f"packed sequences ({local!r})"


#: Masks kept per thread (models with alternating sliding and full layers, such as
#: Gemma 2/3 or Qwen2 with max_window_layers, hand over two masks per forward).
_KEPT = 4


def read_mask(mask):
    """Causal offset, key padding and sliding window of a transformers attention mask,
    or raise: :func:`mask_structure` plus windows.

    Returns
    -------
    offset : int or None
        As :func:`mask_structure`.
    key_padding_mask : (B, 1 or H, S) ndarray of bool or None
        As :func:`mask_structure`.
    local : numbarope.bias.Structure or None
        None, or what cuts the causal mask further, at positions ``i + offset``:
        ``Window(W − 1, 0)``, query i sees at most the W keys ``i + offset − W < j
        <= i + offset`` (transformers' ``sliding_window=W``, the query's own key
        included); ``Chunked(c, start)``, the keys of its own chunk of c positions (Llama
        4's ``attention_chunk_size``; chunks counted from a row's first real token, so
        a tuple of one ``Chunked`` per batch row when left padding differs between
        rows modulo c); ``Packed(cu_seqlens)``, the keys of its own
        sequence (padding-free batches: ``position_ids`` that restart, transformers'
        ``DataCollatorWithFlattening``), the same in every batch row.

    Raises
    ------
    NotImplementedError
        Any other mask (see :func:`mask_structure`).
    """
    # inference tensors keep no version counter (and are rarely edited in place)
    version = None if mask.is_inference() else mask._version
    kept = getattr(_cache, "kept", None)
    if kept is None:
        kept = _cache.kept = []
    for entry in kept:
        if entry[0]() is mask and entry[1] == version:
            return entry[2]
    result = _analyse(mask)
    kept.insert(0, (weakref.ref(mask), version, result))
    del kept[_KEPT:]
    return result


def _read_mask_by_content(mask):
    """:func:`read_mask` for compiled code, which keeps the last masks by content.

    Compiled code reuses its buffers: inductor writes a later mask (a full layer's)
    into the tensor that held an earlier one (a sliding layer's) without moving a
    version counter, and computes one mask again into a buffer per layer, so a
    tensor's identity says nothing about its values. A boolean mask is kept as its
    bits (``np.packbits``, an eighth of its bytes) with its reading: a mask read
    before costs one pass to match, a new one the analysis. Other masks are analysed
    at every call.
    """
    m = mask.detach()
    if m.dtype != torch.bool:
        return _analyse(mask)
    bits = np.packbits(m.numpy())
    kept = getattr(_cache, "by_content", None)
    if kept is None:
        kept = _cache.by_content = []
    for shape, known, result in kept:
        if shape == m.shape and np.array_equal(known, bits):
            return result
    result = _analyse(mask)
    kept.insert(0, (m.shape, bits, result))
    del kept[_KEPT:]
    return result


def _analyse(mask):
    if mask.ndim != 4:
        raise ValueError(f"attention_mask has shape {tuple(mask.shape)}; expected a 4-D "
                         f"(batch, 1 or heads, L, S) mask")
    m = mask.detach()
    if m.dtype != torch.bool:
        if not m.is_floating_point():
            raise NotImplementedError(f"attention_mask of dtype {m.dtype}: numbarope reads "
                                      f"boolean or additive float masks")
        take = m == 0
        masked = m <= torch.finfo(m.dtype).min / 2     # finfo.min and -inf
        if not bool((take | masked).all()):
            raise NotImplementedError(
                "attention_mask is an additive float bias (values other than 0 and "
                "-inf/finfo.min): numbarope's transformers backend reads masks only; "
                "a relative (Toeplitz) bias goes to numbarope.rope_attention(bias=)")
        m = take
    # the common masks (padding alone, or causal with one offset and padding) in one
    # compiled pass over the booleans; the rest below, with torch's operators
    kind, off, padn = _causal_padding(m.numpy())
    if kind >= 0:
        return (None if kind == 0 else int(off)), (None if padn.all() else padn), None
    L, S = m.shape[-2:]
    pad = m.any(dim=-2)                                     # (B, h, S)
    if bool(torch.equal(m, pad[..., None, :].expand_as(m))):
        return None, _padding_or_none(pad), None
    # causal with one offset: the last visible key of row i is i + offset
    # wherever key i + offset is real (every real query's own key)
    rows = m.any(dim=-1)                                     # (B, h, L)
    j = torch.arange(S)
    last = torch.where(m, j, -1).amax(dim=-1)                # (B, h, L)
    i = torch.arange(L)
    offset = int((last - i)[rows].max()) if bool(rows.any()) else 0
    causal = j[None, :] <= i[:, None] + offset              # (L, S)
    if bool(torch.equal(m, pad[..., None, :] & causal)):
        return offset, _padding_or_none(pad), None
    # a sliding window: the first visible key of a row with a full window is
    # i + offset − W + 1 (rows near the start, or after padding, see fewer)
    first = torch.where(m, j, S).amin(dim=-1)                # (B, h, L)
    width = int((i + offset - first + 1)[rows].max()) if bool(rows.any()) else S
    window = causal & (j[None, :] > i[:, None] + offset - width)
    if 0 < width and bool(torch.equal(m, pad[..., None, :] & window)):
        return offset, _padding_or_none(pad), Window(width - 1, 0)
    # chunks of c positions: the last row of a whole chunk sees c keys (width);
    # transformers counts Llama 4's chunks from each row's first real token, so a
    # left-padded row's chunks start at its padding length (mod c)
    if 0 < width:
        p = i[:, None] + offset
        starts = []
        for b in range(m.shape[0]):        # candidates: 0, the first real key, the
            # last query's first visible key (each mod c); the one that rebuilds the row
            real = pad[b].int().argmax(dim=-1)
            cands = [0, int(real[0]) % width, int(first[b, 0, -1]) % width]
            for a in dict.fromkeys(cands):
                chunked = causal & ((j - a) // width == (p - a) // width)
                if bool(torch.equal(m[b], pad[b][..., None, :] & chunked)):
                    starts.append(a)
                    break
            else:
                break
        if len(starts) == m.shape[0]:
            local = (Chunked(width, starts[0]) if len(set(starts)) == 1 else
                     tuple(Chunked(width, a) for a in starts))
            return offset, _padding_or_none(pad), local
    packed = _packed(m, pad, first, rows, offset, S)
    if packed is not None:
        return offset, None, packed
    raise NotImplementedError(_describe(m, pad, offset))


def _packed(m, pad, first, rows, offset, S):
    """Packed(cu_seqlens) when the mask is causal within sequences that start where a
    row's first visible key jumps forward, the same in every batch row and head, no
    key padding; else None."""
    if not bool(pad.all()) or not bool(rows.all()):
        return None
    f = first.reshape(-1, first.shape[-1])
    if not bool((f == f[:1]).all()):
        return None
    f = f[0]
    L = f.shape[0]
    pos = torch.arange(L) + offset
    if not bool((f[1:] >= f[:-1]).all()):      # sequences follow one another
        return None
    starts = sorted(set(int(x) for x in f.tolist()) | {0})
    packed = Packed(tuple(starts) + (max(S, int(pos[-1]) + 1),))
    lo, hi = packed.key_ranges(L, S, offset)
    j = torch.arange(S)
    rebuilt = (j[None, :] >= torch.from_numpy(lo)[:, None]) & \
        (j[None, :] < torch.from_numpy(hi)[:, None])
    return packed if bool(torch.equal(m, rebuilt.expand_as(m))) else None


@njit(cache=True, nogil=True)
def _causal_padding(m):
    # m (B, h, L, S) bool, any strides: (kind, offset, pad (B, h, S) = m.any over rows).
    # kind 0: every row of m is its padding vector; 1: m = padding & (j <= i + offset),
    # the offset the largest (last visible key − i) over rows that see a key (0 if
    # none), as the operators below find it; -1: neither
    B, H, L, S = m.shape
    pad = np.zeros((B, H, S), np.bool_)
    for b in range(B):
        for h in range(H):
            for i in range(L):
                for j in range(S):
                    pad[b, h, j] |= m[b, h, i, j]
    full = True
    for b in range(B):
        for h in range(H):
            for i in range(L):
                for j in range(S):
                    full &= m[b, h, i, j] == pad[b, h, j]
    if full:
        return 0, 0, pad
    off = -(L + S)
    have = False
    for b in range(B):
        for h in range(H):
            for i in range(L):
                for j in range(S - 1, -1, -1):
                    if m[b, h, i, j]:
                        off = max(off, j - i)
                        have = True
                        break
    if not have:
        off = 0
    for b in range(B):
        for h in range(H):
            for i in range(L):
                for j in range(S):
                    if m[b, h, i, j] != (pad[b, h, j] and j <= i + off):
                        return -1, off, pad
    return 1, off, pad


def _padding_or_none(pad):
    return None if bool(pad.all()) else pad.numpy().copy()


def _describe(m, pad, offset):
    """A sentence naming the structure of a mask numbarope's backend does not take."""
    L, S = m.shape[-2:]
    offset = min(offset, S - L)        # transformers aligns queries bottom-right
    i = torch.arange(L)[:, None]
    j = torch.arange(S)[None, :]
    causal = j <= i + offset
    if bool((m & ~causal).any()):
        kind = ("an arbitrary mask: keys after the query's position take part (a "
                "bidirectional block, prefix-LM or custom mask)")
    else:
        first = torch.where(m, j, S).amin(dim=-1)                   # (B, h, L)
        rows = m.any(dim=-1)
        width = int((i[:, 0] + offset - first + 1)[rows].max()) if bool(rows.any()) else S
        window = causal & (j > i + offset - width)
        if bool(torch.equal(m, pad[..., None, :] & window)):
            kind = f"a causal mask with a sliding window of {width} keys"
        else:
            kind = ("a causal mask that also hides earlier keys (chunked attention, "
                    "packed sequences or custom)")
    return (f"attention_mask of shape {tuple(m.shape)} is {kind}; numbarope's "
            f"transformers backend computes key padding combined with a causal mask "
            f"(any offset) or no mask only. Use attn_implementation='sdpa' or 'eager' "
            f"for this model, or call numbarope.rope_attention with bias= (a Toeplitz "
            f"window, numbarope.bias) for a sliding window.")


def _arguments(query, key, attention_mask, scaling, causal, softcap, read=read_mask):
    """The keyword arguments of numbarope's pipeline for one checked call of
    :func:`attention_forward`: the options (read once) and the mask, read.

    Parameters
    ----------
    query, key : (B, Hq, L, D), (B, Hkv, S, D) torch.Tensor
        As :func:`attention_forward` received them (key cut to L for an empty
        static cache).
    attention_mask : (B, 1, L, S) torch.Tensor of bool or float, or None
        The mask; checked to be a 4-D tensor of the right (L, S).
    scaling : float or None
        Logit scale (None: ``1/sqrt(D)``).
    causal : bool
        Without a mask: whether the call is causal (top-left); ignored with one.
    softcap : float or None
        Logit soft-capping ``c·tanh(x/c)``.
    read : callable, optional
        Reads the mask: :func:`read_mask` (eager mode), or ``_read_mask_by_content``
        (the operators of compiled code).

    Returns
    -------
    dict
        For :func:`numbarope._pipeline.attention`: scale, enable_gqa, method, eps,
        precision, workers, and as needed is_causal, causal_alignment, query_offset,
        bias (a :mod:`numbarope.bias` structure), key_padding_mask, softcap.

    Raises
    ------
    NotImplementedError, ValueError
        A mask :func:`read_mask` does not read.
    """
    L, S = query.shape[2], key.shape[2]
    options = _options                  # read once (register() may replace it)
    args = dict(scale=scaling, enable_gqa=query.shape[1] != key.shape[1],
                method=options["method"], eps=float(options["eps"]),
                precision=options["precision"],
                workers=resolve_workers(options["workers"]))
    if softcap is not None:
        args["softcap"] = softcap
    if attention_mask is None:
        if causal:
            args["is_causal"] = True
    else:
        offset, kpm, local = read(attention_mask)
        if local is not None:          # causal and local (window, chunks, packed)
            args["bias"] = local
            if offset:
                args["query_offset"] = offset
        elif offset is not None:
            args["is_causal"] = True
            if offset == S - L:
                args["causal_alignment"] = "bottom_right"
            elif offset:
                args["query_offset"] = offset
        if kpm is not None:
            args["key_padding_mask"] = kpm
    return args


def _compute(query, key, value, attention_mask, scaling, causal, softcap, read=read_mask):
    """The attention of one checked call of :func:`attention_forward`: what it returns
    in eager mode, and what the operator ``torch.compile`` sees runs
    (:mod:`numbarope.backends.torch_op`).

    Parameters
    ----------
    query, key, attention_mask, scaling, causal, softcap, read
        As :func:`_arguments`.
    value : (B, Hkv, S, Dv) torch.Tensor
        Values.

    Returns
    -------
    (B, L, Hq, Dv) torch.Tensor
        Contiguous, the inputs' promoted dtype; differentiable when an input
        requires grad (and grad mode is on).

    Raises
    ------
    NotImplementedError, ValueError
        As :func:`_arguments`; ``method="fast"`` with inputs that require grad.
    """
    # the pipeline directly (options were checked by register()): the public
    # rope_attention would check them again on every layer of every step; inputs that
    # require grad get a differentiable result there
    args = _arguments(query, key, attention_mask, scaling, causal, softcap, read)
    local = args.get("bias")
    if not isinstance(local, tuple):      # (the fast lane writes (B, L, H, Dv): the
        out = _attention(query, key, value, heads_last=True, **args)   # copy below free)
    else:           # one structure per batch row (chunks from each row's first token)
        rows = {}
        for b, st in enumerate(local):
            rows.setdefault(st, []).append(b)
        outs, order = [], []
        for st, idx in rows.items():
            part = dict(args, bias=st)
            if part.get("key_padding_mask") is not None:
                part["key_padding_mask"] = part["key_padding_mask"][idx]
            t = torch.tensor(idx)
            outs.append(_attention(query[t], key[t], value[t], **part))
            order += idx
        out = torch.cat(outs)[torch.argsort(torch.tensor(order))]
    return out.transpose(1, 2).contiguous()
