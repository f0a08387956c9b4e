"""Gradients through the pipeline: a torch autograd Function around the exact path.

When a torch input requires grad (and grad mode is on), :func:`attention_with_grad`
runs the forward exactly (``method="auto"`` included: the certified fast backward is
not built yet; ``method="fast"`` is refused before any work) and returns a result
whose backward is :func:`numbarope.ops.streaming.exact_backward`, FlashAttention-2's
backward recomputing the probabilities from the forward's log-sum-exp. Gradients
reach query, key and value as given: back through the rotation numbarope applied
(its transpose), summed over the query heads of a key/value head (grouped-query) and
over broadcast leading dims, in each input's dtype.

The returned log-sum-exp (``return_lse=True``) is differentiable too
(``∂lse_i/∂x_ij = P_ij``: its gradient joins Δ). Not differentiated (refused with
a message when they require grad): bias arrays, relative matrices. Second
derivatives raise (``once_differentiable``); an input changed in place after the
forward makes backward raise, as torch's own operations do. Without a backward (refused when an input requires grad):
``method="fast"``, general relative matrices, rotary with per-row ``positions``.
"""

from __future__ import annotations

import numpy as np

from ..ops.streaming import exact_backward
from ..rotary import Rotary
from .._runtime.interop import is_torch, output_like
from .inputs import make_problem, rotate_back

__all__ = ["attention_with_grad"]


def _refuse(method, arrays):
    """Raise, before any work, for what has no backward."""
    if method == "fast":
        raise NotImplementedError(
            "method='fast' has no backward pass yet: with inputs that require grad use "
            "method='exact' or 'auto' (which then computes exactly), or call under "
            "torch.no_grad()")
    for name in ("relative", "bias"):
        x = arrays.get(name)
        if is_torch(x) and x.requires_grad:
            raise NotImplementedError(
                f"{name} requires grad: numbarope differentiates with respect to query, "
                f"key and value only; pass {name}.detach() (or compute a learnable bias "
                f"with torch attention)")
    if arrays.get("relative") is not None:
        raise NotImplementedError(
            "general relative matrices (relative=) have no backward pass; with inputs "
            "that require grad use rotary= (its backward rotates the gradients back) "
            "or call under torch.no_grad()")
    if arrays.get("positions") is not None and arrays.get("rotary") not in (None, False):
        raise NotImplementedError(
            "rotary with per-row positions= has no backward pass yet; rotate query and "
            "key yourself (numbarope.apply_rotary or your model's code) and pass "
            "rotary=None, or call under torch.no_grad()")


def attention_with_grad(query, key, value, *, method, eps, degree, approx, radius, verify,
                        workers, return_lse, return_info, attend, stacklevel, **arrays):
    """The pipeline's result for inputs that require grad: a differentiable torch
    tensor (see the module docstring); ``attend`` is the pipeline's plan-and-run."""
    import torch

    _refuse(method, arrays)
    detached = [x.detach() if is_torch(x) else x for x in (query, key, value)]
    p, out_torch = make_problem(*detached, **arrays)
    out64, lse, info = attend(p, method=method, eps=eps, degree=None, approx=approx,
                              radius=radius, verify=verify, workers=workers,
                              stacklevel=stacklevel + 1, grad=True)
    rotary = arrays.get("rotary")
    rotary = Rotary() if rotary is True or rotary is np.True_ else (
        None if rotary is False or rotary is np.False_ else rotary)
    precisions = set(np.asarray(info.precision).ravel())
    cd = np.dtype(np.float32 if precisions == {"float32"} else np.float64)
    saved = dict(p=p, out=out64, lse=lse, cd=cd, rotary=rotary, workers=workers,
                 shapes=tuple(tuple(x.shape) for x in (query, key, value)))
    out = out64.reshape(p.batch_shape + (p.n, p.Ev)).astype(p.dtype, copy=False)
    out_t = output_like(out, (out_torch,))
    lse_t = output_like(lse.reshape(p.batch_shape + (p.n,)), ("float64",))
    result, lse_r = _ExactAttention.apply(query, key, value, out_t, lse_t, saved)
    res = (result,)
    if return_lse:
        res += (lse_r,)
    if return_info:
        res += (info,)
    return res[0] if len(res) == 1 else res


def _backward(saved, grad, grad_lse, needs):
    """(dquery, dkey, dvalue) numpy float64 arrays shaped like the inputs (None where
    not needed); ``grad_lse``: the gradient with respect to the returned lse, or None."""
    import torch

    p, cd = saved["p"], saved["cd"]
    B = p.q.shape[0]
    if grad is None:
        dout = np.zeros((B, p.n, p.Ev))
    else:
        g = grad.detach().to(device="cpu", dtype=torch.float64).numpy()
        dout = np.ascontiguousarray(
            np.broadcast_to(g, p.batch_shape + (p.n, p.Ev)).reshape(B, p.n, p.Ev))
    dlse = None
    if grad_lse is not None:
        dlse = np.ascontiguousarray(grad_lse.detach().to(device="cpu", dtype=torch.float64)
                                    .numpy().reshape(B, p.n))
    ranges = None
    if p.key_ranges is not None:
        lo, hi = p.key_ranges
        ranges = (lo[None], hi[None], np.zeros(B, np.int64))
    dq, dk, dv = exact_backward(
        np.ascontiguousarray(p.q, dtype=cd), np.ascontiguousarray(p.k, dtype=cd),
        np.ascontiguousarray(p.v, dtype=cd), saved["out"], saved["lse"], dout, p.scale,
        bias=p.bias, bidx=p.bidx, key_ranges=ranges, key_mask=p.kmask, kidx=p.kidx,
        kvidx=p.kvidx, workers=saved["workers"], softcap=p.softcap, dlse=dlse)
    sh = p.shapes
    kv_shape = sh.kv_shape if sh.group > 1 else sh.batch_shape
    dq = dq.reshape(sh.batch_shape + (p.n, p.E))
    dk = dk.reshape(kv_shape + (p.S, p.E))
    dv = dv.reshape(kv_shape + (p.S, p.Ev))
    if saved["rotary"] is not None:
        dq, dk = rotate_back(dq, dk, saved["rotary"], p.n, p.S, p.E, p.offset)
    return [_sum_to(a, shape) if need else None
            for a, shape, need in zip((dq, dk, dv), saved["shapes"], needs)]


def _sum_to(a, shape):
    """``a`` summed over the leading dims that broadcasting added or expanded."""
    lead = a.ndim - len(shape)
    if lead:
        a = a.sum(axis=tuple(range(lead)))
    axes = tuple(i for i, (m, n) in enumerate(zip(shape, a.shape)) if m == 1 and n != 1)
    return a.sum(axis=axes, keepdims=True) if axes else a


def _function():
    import torch
    from torch.autograd.function import once_differentiable

    class ExactAttention(torch.autograd.Function):
        """numbarope's exact attention with its backward (see the module docstring)."""

        @staticmethod
        def forward(ctx, query, key, value, out, lse, saved):
            ctx.saved = saved
            ctx.dtypes = (query.dtype if is_torch(query) else None,
                          key.dtype if is_torch(key) else None,
                          value.dtype if is_torch(value) else None)
            # the inputs, for torch's in-place check only: numbarope's own arrays may
            # share their memory (float32 inputs are read without a copy), so an input
            # changed in place after the forward must make backward raise, as torch's
            ctx.save_for_backward(*[x for x in (query, key, value) if is_torch(x)])
            ctx.set_materialize_grads(False)
            return out.clone(), lse.clone()

        @staticmethod
        @once_differentiable           # a second derivative raises (none is built yet)
        def backward(ctx, grad, grad_lse):
            ctx.saved_tensors          # raises if an input was changed in place since
            needs = ctx.needs_input_grad[:3]
            if grad is None and grad_lse is None:
                return (None,) * 6
            grads = _backward(ctx.saved, grad, grad_lse, needs)
            res = []
            for gr, dt in zip(grads, ctx.dtypes):
                res.append(None if gr is None or dt is None else
                           torch.from_numpy(np.ascontiguousarray(gr)).to(dt))
            return (*res, None, None, None)

    return ExactAttention


class _Lazy:
    """The autograd Function, built on first use (torch is imported only then)."""

    fn = None

    def apply(self, *args):
        if _Lazy.fn is None:
            _Lazy.fn = _function()
        return _Lazy.fn.apply(*args)


_ExactAttention = _Lazy()
