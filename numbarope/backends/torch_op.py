"""numbarope's transformers attention as ``torch.library`` operators, for ``torch.compile``.

While ``torch.compile`` traces, :func:`numbarope.backends.transformers.attention_forward`
calls :func:`attention` instead of computing: the compiler sees one opaque operator
per attention layer, with a fake implementation that gives the result's shape and
dtype, and never traces into the reading of the mask, the planner or the numba
kernels (which it cannot compile: it broke the graph there and recompiled until its
limit). ``fullgraph=True`` works. When the compiled code runs, the operators run the
eager backend's code (``_compute``, or the same exact forward and backward apart), so
each layer's attention is what the uncompiled backend computes from the same inputs,
bit for bit. They read masks by content (``_read_mask_by_content``), not by tensor
identity as eager mode does: compiled code reuses its buffers.

The operators (namespace ``numbarope``):

``numbarope::attention(query, key, value, attention_mask, scaling, is_causal, softcap)``
    The result ``(B, L, Hq, Dv)``, contiguous: for calls without gradients.
``numbarope::attention_exact(...)``
    The same arguments; ``(out, out64, lse, wide)``: the result computed exactly, as
    with inputs that require grad, and what its backward reads (the result in
    float64, the row log-sum-exps, whether the exact path computed in float64).
    Differentiable (``torch.library.register_autograd``) through
``numbarope::attention_backward(grad, query, key, value, attention_mask, scaling,
is_causal, softcap, out64, lse, wide)``
    ``(dquery, dkey, dvalue)``: numbarope's exact backward
    (:func:`numbarope._pipeline.grad.exact_gradients`), the gradients eager numbarope
    gives.

The options of :func:`numbarope.integrations.register` are read when an operator
runs, not when the model is compiled: registering other options needs no recompile.
"""

# typing.Optional in the operators' signatures, not `X | None`: the documentation
# build mocks torch, and a mock class has no `|`
from typing import Optional

import numpy as np
import torch

from .._pipeline import attend
from .._pipeline.grad import exact_forward, exact_gradients
from . import _hf_core as _hf

__all__ = ["attention"]


def attention(query, key, value, attention_mask, scaling, is_causal, softcap):
    """numbarope's attention of one checked transformers call, as one operator.

    Parameters
    ----------
    query : (B, Hq, L, D) torch.Tensor
        Rotated queries.
    key, value : (B, Hkv, S, D), (B, Hkv, S, Dv) torch.Tensor
        Rotated keys and values; Hq % Hkv == 0.
    attention_mask : (B, 1, L, S) torch.Tensor of bool or float, or None
        As transformers builds it for this backend (checked to be a 4-D tensor of
        the right (L, S); its values are read when the operator runs).
    scaling : float or None
        Logit scale (None: ``1/sqrt(D)``).
    is_causal : bool
        Without a mask: whether the call is causal (top-left).
    softcap : float or None
        Logit soft-capping.

    Returns
    -------
    (B, L, Hq, Dv) torch.Tensor
        Contiguous, the inputs' promoted dtype; differentiable when an input requires
        grad and grad mode is on (then computed exactly, as in eager mode).

    Raises
    ------
    NotImplementedError, ValueError
        When the operator runs: a mask numbarope does not read
        (:func:`numbarope.backends.transformers.read_mask`), ``method="fast"`` with
        inputs that require grad.
    """
    args = (query, key, value, attention_mask, scaling, is_causal, softcap)
    if torch.is_grad_enabled() and (query.requires_grad or key.requires_grad
                                    or value.requires_grad):
        return _attention_exact(*args)[0]
    return _attention(*args)


def _empty_result(query, key, value):
    """An empty tensor shaped and typed as the result, contiguous."""
    dtype = torch.promote_types(torch.promote_types(query.dtype, key.dtype), value.dtype)
    B, Hq, L = query.shape[:3]
    return query.new_empty((B, L, Hq, value.shape[-1]), dtype=dtype)


@torch.library.custom_op("numbarope::attention", mutates_args=())
def _attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
               attention_mask: Optional[torch.Tensor], scaling: Optional[float],
               is_causal: bool, softcap: Optional[float]) -> torch.Tensor:
    """``numbarope::attention``: the eager backend's result (see the module docstring)."""
    return _hf._compute(query, key, value, attention_mask, scaling, is_causal, softcap,
                        read=_hf._read_mask_by_content)


@_attention.register_fake
def _(query, key, value, attention_mask, scaling, is_causal, softcap):
    return _empty_result(query, key, value)


@torch.library.custom_op("numbarope::attention_exact", mutates_args=())
def _attention_exact(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor,
                     attention_mask: Optional[torch.Tensor], scaling: Optional[float],
                     is_causal: bool, softcap: Optional[float]
                     ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """``numbarope::attention_exact``: the exact forward eager mode runs for inputs that
    require grad, and what its backward reads (see the module docstring)."""
    args = _hf._arguments(query, key, attention_mask, scaling, is_causal, softcap,
                          read=_hf._read_mask_by_content)
    if isinstance(args.get("bias"), tuple):
        raise NotImplementedError(
            "chunked attention whose chunks start at different positions in different "
            "batch rows (left padding of different lengths mod the chunk size) has no "
            "compiled backward; train uncompiled, or pad the rows to equal lengths")
    out, out64, lse, cd = exact_forward(query, key, value, attend=attend, **args)
    return (out.transpose(1, 2).contiguous(), out64, lse,
            torch.tensor(cd == np.float64))


@_attention_exact.register_fake
def _(query, key, value, attention_mask, scaling, is_causal, softcap):
    B, Hq, L = query.shape[:3]
    return (_empty_result(query, key, value),
            query.new_empty((B, Hq, L, value.shape[-1]), dtype=torch.float64),
            query.new_empty((B, Hq, L), dtype=torch.float64),
            query.new_empty((), dtype=torch.bool))


@torch.library.custom_op("numbarope::attention_backward", mutates_args=())
def _attention_backward(grad: torch.Tensor, query: torch.Tensor, key: torch.Tensor,
                        value: torch.Tensor, attention_mask: Optional[torch.Tensor],
                        scaling: Optional[float], is_causal: bool, softcap: Optional[float],
                        out64: torch.Tensor, lse: torch.Tensor, wide: torch.Tensor
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``numbarope::attention_backward``: the gradients eager mode's backward gives
    (``grad``: the loss's gradient with respect to the result, (B, Hq, L, Dv))."""
    args = _hf._arguments(query, key, attention_mask, scaling, is_causal, softcap,
                          read=_hf._read_mask_by_content)
    del args["method"], args["eps"]          # the forward's choice: exact
    return exact_gradients(query, key, value, out64, lse, grad,
                           compute_dtype=np.float64 if bool(wide) else np.float32, **args)


@_attention_backward.register_fake
def _(grad, query, key, value, attention_mask, scaling, is_causal, softcap, out64, lse,
      wide):
    return (query.new_empty(query.shape), key.new_empty(key.shape),
            value.new_empty(value.shape))


def _setup_context(ctx, inputs, output):
    """Keep what ``numbarope::attention_backward`` reads."""
    query, key, value, attention_mask, scaling, is_causal, softcap = inputs
    _, out64, lse, wide = output
    ctx.save_for_backward(query, key, value, attention_mask, out64, lse, wide)
    ctx.options = (scaling, is_causal, softcap)
    ctx.mark_non_differentiable(out64, lse, wide)


def _backward(ctx, grad, *_):
    """The gradients of query, key and value (out64, lse and wide are not
    differentiated: only the result leaves :func:`attention`)."""
    query, key, value, attention_mask, out64, lse, wide = ctx.saved_tensors
    scaling, is_causal, softcap = ctx.options
    dq, dk, dv = _attention_backward(grad.transpose(1, 2), query, key, value,
                                     attention_mask, scaling, is_causal, softcap, out64,
                                     lse, wide)
    return dq, dk, dv, None, None, None, None


_attention_exact.register_autograd(_backward, setup_context=_setup_context)
