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
structure (a bidirectional block, an arbitrary mask or a float bias) raises
``NotImplementedError`` naming it: nothing is computed wrongly. The analysis costs
O(B·L·S) boolean operations once per mask (transformers passes the same mask object to every layer,
or two alternating ones; the last few are kept, per thread, and used again only for the same object
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
and they run the eager code (:mod:`._hf_core`'s ``_compute``; with inputs that require grad
the same exact forward, and numbarope's exact backward as the operator's
autograd), so a compiled model computes what the uncompiled one does. One
difference: the operators keep the masks they read by content, not by tensor
identity, since compiled code reuses its buffers (inductor may write a full layer's
mask into the tensor that held a sliding layer's). In eager mode the call goes
straight to the pipeline, without the operator's dispatch (cheaper per call).
"""

import warnings
from types import MappingProxyType

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from .._pipeline.inputs import validate_options, validate_precision
from .._runtime.threads import resolve_workers
from . import _hf_core, torch_op
from ._hf_core import _compute, mask_structure, read_mask

__all__ = ["register", "attention_forward", "mask_structure", "read_mask", "NAME"]

#: The name passed as ``attn_implementation=``.
NAME = "numbarope"

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
    _hf_core._options = MappingProxyType(dict(method=method, eps=eps, precision=precision,
                                              workers=workers))
    AttentionInterface.register(NAME, attention_forward)
    AttentionMaskInterface.register(NAME, sdpa_mask)
    return NAME


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
        # reading and the planner (torch_op runs _compute)
        return torch_op.attention(query, key, value, attention_mask, scaling, causal,
                                  softcap), None
    return _compute(query, key, value, attention_mask, scaling, causal, softcap), None


register()
