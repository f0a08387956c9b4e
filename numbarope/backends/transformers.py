"""numbarope as an attention backend of Hugging Face transformers.

``import numbarope.integrations`` registers the name ``"numbarope"`` with
transformers' ``AttentionInterface`` (the attention function) and
``AttentionMaskInterface`` (the mask transformers builds for it), so that ::

    import numbarope.integrations
    model = AutoModelForCausalLM.from_pretrained(name, attn_implementation="numbarope")

runs every attention layer of the model through :func:`numbarope.rope_attention`.
Importing this module imports torch and transformers; ``import numbarope``
alone imports neither.

What the backend receives and does
----------------------------------
transformers hands over query ``(B, Hq, L, D)`` and key, value ``(B, Hkv, S, D)``
already rotated (so ``rotary=None``), ``scaling`` (``scale=``) and the mask it
built with ``sdpa_mask`` (the mask function registered here): ``None`` where
torch SDPA's ``is_causal`` would do (no padding, and L = S, L = 1 or an empty
cache), else a boolean ``(B, 1, L, S)`` mask (True = the pair takes part).

The mask is read, never trusted blindly (:func:`read_mask`): per batch row it
must equal a key padding vector AND either nothing, a causal mask with one offset
for the whole batch (query i sees keys j <= i + offset; offset = S - L is
decoding with a key/value cache, transformers' bottom-right alignment), or such a
causal mask cut to a sliding window of W keys (Mistral, Qwen2/3's sliding layers,
Gemma 2/3's local layers: ``sliding_window=W``, the query's own key included) or
to chunks of c positions (Llama 4's ``attention_chunk_size``), or to packed
sequences (padding-free batches). That structure is passed as ``is_causal``,
``causal_alignment="bottom_right"`` (or ``query_offset=``),
``bias=numbarope.bias.Window(W − 1, 0)``, ``Chunked(c)`` or
``Packed(cu_seqlens)``, and ``key_padding_mask=``; all of these stay eligible for the fast path
(``method="auto"`` takes it where it is certified and cheaper). Any other
structure (a bidirectional block, an arbitrary mask or a float bias) raises ``NotImplementedError`` naming it: nothing is computed
wrongly. The analysis costs O(B·L·S) boolean operations once per mask
(transformers passes the same mask object to every layer, or two alternating
ones; the last few are kept, per thread, and used again only for the same object
with an unchanged version counter, so threads serving different batches at once
each get their own mask's reading).

Grouped-query attention goes to ``enable_gqa=True``. Rows whose every key is
masked (the queries of left padding) return 0, as torch SDPA >= 2.5; eager
attention returns other values there, which no real token reads.

Training: with tensors that require grad the layer's result is differentiable
(numbarope's exact backward, or the certified fast one on heads the fast path
computes with gemm or prefix, :mod:`numbarope._pipeline.grad`), so ``loss.backward()``
gives the gradients ``"sdpa"`` gives (within the fast path's bound where it is taken).

Logit soft-capping (``softcap``, Gemma 2) goes to ``softcap=`` (exact, or the fast
path with a polynomial of ``exp(c·tanh(x/c))`` where that is certified and cheaper).
Not supported (``NotImplementedError``): dropout > 0, attention sinks
(``s_aux``), a ``position_bias`` (T5-style).

torch.compile: ``torch.compile(model, fullgraph=True)`` works. While the compiler
traces, :func:`attention_forward` checks its arguments in Python (shapes only) and
then calls :func:`numbarope.backends.torch_op.attention`: one opaque
``torch.library`` operator per layer, with a fake implementation for the compiler.
The mask's reading, the planner and the kernels run when the compiled code runs,
and they run this module's eager code (``_compute``; with inputs that require grad
the same exact forward, and numbarope's exact backward as the operator's
autograd), so a compiled model computes what the uncompiled one does. One
difference: the operators keep the masks they read by content, not by tensor
identity, since compiled code reuses its buffers (inductor may write a full layer's
mask into the tensor that held a sliding layer's). In eager mode the call goes
straight to the pipeline, without the operator's dispatch (cheaper per call).
"""

import threading
import warnings
import weakref
from types import MappingProxyType

import numpy as np
import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .._pipeline import attention as _attention
from ..bias import Chunked, Packed, Window
from .._pipeline.inputs import validate_options, validate_precision
from .._runtime.threads import resolve_workers

__all__ = ["register", "attention_forward", "mask_structure", "read_mask", "NAME"]

#: The name passed as ``attn_implementation=``.
NAME = "numbarope"

_DEFAULTS = MappingProxyType({"method": "auto", "eps": 1e-3, "precision": None,
                               "workers": None})
# the options of every forward: one read-only mapping, replaced whole by register()
# (one assignment) and read once per attention call, so that a call never sees half
# of one register()'s options and half of another's
_options = _DEFAULTS


def register(*, method="auto", eps=1e-3, precision=None, workers=None):
    """Register ``"numbarope"`` with transformers (idempotent) and set its options.

    Called on ``import numbarope.integrations`` with the defaults; call it again
    to change the options of every later forward (each call sets all of them).
    The options are process-wide: each attention call reads them once, so a
    forward running in another thread meanwhile computes its later layers with
    the new options.

    Parameters
    ----------
    method : {"auto", "exact", "fast"}, optional
        As :func:`numbarope.rope_attention` (default ``"auto"``: per head the
        cheaper of exact and the certified fast path that meets ``eps``).
    eps : float in (0, 1), optional
        Tolerated error of the fast path relative to ``max|value|`` of the head.
    precision : {None, "float32", "float64"}, optional
        Compute precision of the exact path (None: float32 for float32 models).
    workers : int, optional
        Threads of numbarope (scipy.fft's meaning; None: all cores or
        :func:`numbarope.set_workers`).

    Returns
    -------
    str
        ``"numbarope"``, the name to pass as ``attn_implementation=``.

    Raises
    ------
    ValueError, TypeError
        An option :func:`numbarope.rope_attention` would refuse (checked here,
        not at the model's next forward).

    Examples
    --------
    >>> import numbarope.integrations
    >>> numbarope.integrations.register(method="exact")
    'numbarope'
    >>> from transformers import AttentionInterface
    >>> "numbarope" in AttentionInterface()
    True
    >>> _ = numbarope.integrations.register()      # back to the defaults
    """
    validate_options(method, eps, None, "chebyshev", None, None)
    validate_precision(precision)
    if workers is not None:
        resolve_workers(workers)
    global _options
    _options = MappingProxyType(dict(method=method, eps=eps, precision=precision,
                                     workers=workers))
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


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


# ---------------------------------------------------------------------------
# The attention function transformers calls


def attention_forward(module, query, key, value, attention_mask, scaling=None,
                      dropout=0.0, is_causal=None, **kwargs):
    """The ``"numbarope"`` attention of transformers' ``AttentionInterface``.

    Parameters
    ----------
    module : torch.nn.Module
        The attention layer (its ``is_causal`` is used when no mask is given).
    query : (B, Hq, L, D) torch.Tensor
        Rotated queries.
    key, value : (B, Hkv, S, D), (B, Hkv, S, Dv) torch.Tensor
        Rotated keys and values; Hq % Hkv == 0 (grouped-query attention).
    attention_mask : (B, 1, L, S) torch.Tensor of bool or None
        As built by transformers for this backend (``sdpa_mask``).
    scaling : float, optional
        Logit scale (default ``1/sqrt(D)``).
    dropout : float
        Must be 0.
    is_causal : bool, optional
        Used only without a mask (as transformers' SDPA backend).

    Returns
    -------
    attn_output : (B, L, Hq, Dv) torch.Tensor
        Contiguous, the dtype of the inputs.
    attn_weights : None

    Raises
    ------
    NotImplementedError
        dropout > 0, ``s_aux``, ``position_bias``, or a mask other than key padding
        with an optional causal part and sliding window (see :func:`read_mask`).

    Notes
    -----
    Under ``torch.compile`` the attention is :func:`numbarope.backends.torch_op.attention`,
    one operator the compiler does not trace into; the mask is then read, and refused,
    when the compiled code runs.
    """
    if dropout:
        raise NotImplementedError(f"dropout={dropout}: numbarope's attention has no "
                                  f"dropout; set the model's attention_dropout to 0 "
                                  f"(or call model.eval() for inference)")
    for name in ("s_aux", "position_bias"):
        if kwargs.get(name) is not None:
            raise NotImplementedError(f"{name} is not supported by numbarope's "
                                      f"transformers backend; use 'eager' or 'sdpa'")
    # (not while the compiler traces: dynamo cannot trace warnings.warn, and
    # fullgraph=True would fail on it)
    if kwargs.get("output_attentions", False) and not torch.compiler.is_compiling():
        warnings.warn("numbarope does not return attention weights "
                      "(output_attentions=True): attn_weights is None", stacklevel=2)
    if query.ndim != 4 or key.ndim != 4 or value.ndim != 4:
        raise ValueError(f"expected query (B, Hq, L, D), key (B, Hkv, S, D), value "
                         f"(B, Hkv, S, Dv); got {tuple(query.shape)}, {tuple(key.shape)}, "
                         f"{tuple(value.shape)}")
    L, S = query.shape[2], key.shape[2]
    causal = False
    if attention_mask is None:
        # transformers skips the mask exactly where torch SDPA's is_causal is right
        # (top-left alignment); mirror its sdpa backend
        causal = is_causal if is_causal is not None else getattr(module, "is_causal", True)
        causal = bool(L > 1 and causal)
        if causal and S > L:    # an empty static cache: the keys after the prompt are unused
            key, value = key[:, :, :L], value[:, :, :L]
    else:
        if not isinstance(attention_mask, torch.Tensor):
            raise NotImplementedError(f"attention_mask of type {type(attention_mask).__name__}"
                                      f": numbarope reads 4-D tensor masks (sdpa_mask)")
        if attention_mask.shape[-2:] != (L, S):
            raise ValueError(f"attention_mask has shape {tuple(attention_mask.shape)}; "
                             f"expected (B, 1, {L}, {S}) for query {tuple(query.shape)} "
                             f"and key {tuple(key.shape)}")
    softcap = kwargs.get("softcap")        # Gemma 2's attn_logit_softcapping
    if softcap is not None:
        softcap = float(softcap)
    if torch.compiler.is_compiling():
        # one opaque operator for the compiler: it does not trace into the mask's
        # reading and the planner (torch_op runs _compute below)
        return torch_op.attention(query, key, value, attention_mask, scaling, causal,
                                  softcap), None
    return _compute(query, key, value, attention_mask, scaling, causal, softcap), None


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
    if not isinstance(local, tuple):
        out = _attention(query, key, value, **args)
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


# after the functions it runs (it imports this module)
from . import torch_op  # noqa: E402

register()
