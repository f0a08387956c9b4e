"""Gradients through the pipeline: a torch autograd Function around the planned call.

When a torch input requires grad (and grad mode is on), :func:`attention_with_grad`
plans the call with only the algorithms that have a backward (the exact path and
every built-in fast algorithm; not a soft-capped head's fast path, whose cap's
derivative no fast backward computes) and returns a result whose backward is, per
head, :func:`numbarope.ops.streaming.exact_backward` (FlashAttention-2's,
recomputing the probabilities from the forward's log-sum-exp) or the fast
algorithm's certified backward (``Algorithm.backward``, e.g.
:func:`numbarope.ops.gemm.gemm_backward`, :func:`numbarope.ops.prefix.prefix_backward`,
:func:`numbarope.ops.window.window_backward`, :func:`numbarope.ops.decay.decay_backward`:
the exact attention's gradients with the forward's polynomial weights, within the
algorithm's ``gradient_bound``, which the call's ``AttentionInfo.gradient_bound``
reports after the backward). Gradients
reach query, key and value as given: back through the rotation numbarope applied
(its transpose), summed over the query heads of a key/value head (grouped-query) and
over broadcast leading dims, in each input's dtype.

The returned log-sum-exp (``return_lse=True``) is differentiable too
(``∂lse_i/∂x_ij = P_ij``: its gradient joins Δ). General relative matrices W_t
(``relative=``) have gradients with respect to query, key and value: exact heads by a
slow dense path (:func:`_general_exact_part`, O(L·S·E²) in numpy), fast heads by
:func:`numbarope.ops.toeplitz_fft.toeplitz_fft_backward` (no gradient bound: NaN in the
info). Not differentiated (refused with a message when they require grad): bias
arrays, relative matrices. Second
derivatives raise (``once_differentiable``); an input changed in place after the
forward makes backward raise, as torch's own operations do. Without a backward
(refused when an input requires grad): general relative matrices with a soft cap;
``method="fast"`` where the head needs an algorithm without one (a registered
algorithm without ``backward``, a soft cap); the gradient of the
returned lse of a fast head.

The same forward and backward, apart: :func:`exact_forward` returns what the
backward needs as tensors (the unrounded output, the log-sum-exp, the precision) and
:func:`exact_gradients` computes the gradients from them, for a caller whose autograd
is its own (the ``torch.library`` operators of :mod:`numbarope.backends.torch_op`,
which ``torch.compile`` traces without looking inside).
"""

from __future__ import annotations

import numpy as np

from .. import ops
from ..ops.streaming import exact_backward
from .._runtime.interop import is_torch, output_like
from .heads import head_weights
from .inputs import as_rotary, make_problem, rotate_back, rotate_rows_back

__all__ = ["attention_with_grad", "exact_forward", "exact_gradients"]


def _refuse(method, arrays):
    """Raise, before any work, for what has no backward."""
    for name in ("relative", "bias"):
        x = arrays.get(name)
        if is_torch(x) and x.requires_grad:
            raise NotImplementedError(
                f"{name} requires grad: numbarope differentiates with respect to query, "
                f"key and value only; pass {name}.detach() (or compute a learnable bias "
                f"with torch attention)")
    if arrays.get("relative") is not None and arrays.get("softcap") is not None:
        raise NotImplementedError(
            "general relative matrices (relative=) with softcap= have no backward pass; "
            "call under torch.no_grad() or leave out one of them")


def attention_with_grad(query, key, value, *, method, eps, degree, approx, radius, verify,
                        workers, return_lse, return_info, attend, stacklevel, **arrays):
    """The pipeline's result for inputs that require grad: a differentiable torch
    tensor (see the module docstring); ``attend`` is the pipeline's plan-and-run."""
    p, out64, lse, info, out_torch, cd = _forward(
        query, key, value, method=method, eps=eps, approx=approx, radius=radius,
        verify=verify, workers=workers, attend=attend, stacklevel=stacklevel + 1,
        arrays=arrays)
    saved = _saved(p, out64, lse, cd, arrays, workers, (query, key, value))
    saved["heads"] = info.heads          # which heads were computed fast, and how
    saved["info"] = info                 # the backward writes the gradient bounds there
    out_t, lse_t = _results(p, out64, lse, out_torch)
    result, lse_r = _ExactAttention.apply(query, key, value, out_t, lse_t, saved)
    res = (result,)
    if return_lse:
        res += (lse_r,)
    if return_info:
        res += (info,)
    return res[0] if len(res) == 1 else res


def exact_forward(query, key, value, *, method, eps, workers, attend, stacklevel=3,
                  **arrays):
    """The forward :func:`attention_with_grad` computes, without the autograd Function:
    for a caller that differentiates by itself with :func:`exact_gradients`
    (:mod:`numbarope.backends.torch_op`, the operator ``torch.compile`` sees).

    Parameters
    ----------
    query, key, value : torch.Tensor
        As :func:`numbarope.rope_attention` (``requires_grad`` is not looked at).
    method, eps, workers, **arrays
        As :func:`numbarope._pipeline.attention`; ``method="auto"`` computes exactly
        (the fast backward is reached through :func:`attention_with_grad` only).
    attend : callable
        The pipeline's plan-and-run, :func:`numbarope._pipeline.attend` (passed in:
        the pipeline imports this module).

    Returns
    -------
    out : (..., L, Ev) torch.Tensor
        The result, as :func:`attention_with_grad` returns it (the inputs' promoted
        dtype).
    out64 : (..., L, Ev) torch.Tensor of float64
        The same before its rounding to that dtype (what the backward reads), in
        memory of its own.
    lse : (..., L) torch.Tensor of float64
        The rows' log-sum-exps (−inf on rows that see no key).
    compute_dtype : numpy.dtype
        float32 or float64: the exact path's precision, which the backward repeats.

    Raises
    ------
    NotImplementedError
        What has no backward (see the module docstring), and ``method="fast"``.
    ValueError, TypeError
        As :func:`numbarope.rope_attention`.
    """
    import torch

    if method == "fast":
        raise NotImplementedError(
            "method='fast' with inputs that require grad is served by rope_attention's "
            "autograd path, not by the compiled operator: call the model uncompiled, "
            "or use method='exact' or 'auto' (which computes exactly here)")
    p, out64, lse, _, out_torch, cd = _forward(
        query, key, value, method="exact", eps=eps, approx="chebyshev", radius=None,
        verify=0, workers=workers, attend=attend, stacklevel=stacklevel + 1, arrays=arrays)
    out, lse_t = _results(p, out64, lse, out_torch)
    # a copy: float64 results are out64 itself, and the two are returned separately
    out64_t = torch.from_numpy(out64.reshape(p.batch_shape + (p.n, p.Ev)).copy())
    return out, out64_t, lse_t, cd


def exact_gradients(query, key, value, out64, lse, grad, *, compute_dtype, workers,
                    **arrays):
    """The gradients of a call :func:`exact_forward` computed: what the backward of
    :func:`attention_with_grad` returns for the same call (same bits).

    Parameters
    ----------
    query, key, value : torch.Tensor
        The forward's inputs, unchanged since.
    out64, lse, compute_dtype
        :func:`exact_forward`'s ``out64``, ``lse`` and ``compute_dtype``.
    grad : (..., L, Ev) torch.Tensor
        The gradient of the loss with respect to the forward's ``out``.
    workers, **arrays
        The forward's (without ``method`` and ``eps``).

    Returns
    -------
    dquery, dkey, dvalue : torch.Tensor
        Shaped like query, key and value, in their dtypes, C-contiguous.
    """
    detached = [x.detach() for x in (query, key, value)]
    p, _ = make_problem(*detached, **arrays)
    B = p.q.shape[0]
    saved = _saved(p, out64.detach().numpy().reshape(B, p.n, p.Ev),
                   lse.detach().numpy().reshape(B, p.n), np.dtype(compute_dtype), arrays,
                   workers, (query, key, value))
    grads = _backward(saved, grad, None, (True, True, True))
    return tuple(_tensors(grads, [x.dtype for x in (query, key, value)]))


def _forward(query, key, value, *, method, eps, approx, radius, verify, workers, attend,
             stacklevel, arrays):
    """The exact forward of a call whose gradients will be needed, refused first where
    there is no backward: ``(Problem, out (B, n, Ev) float64, lse (B, n) float64,
    AttentionInfo, the torch dtype name of the result, the compute dtype)``."""
    _refuse(method, arrays)
    detached = [x.detach() if is_torch(x) else x for x in (query, key, value)]
    p, out_torch = make_problem(*detached, **arrays)
    out64, lse, info = attend(p, method=method, eps=eps, degree=None, approx=approx,
                              radius=radius, verify=verify, workers=workers,
                              stacklevel=stacklevel + 1, grad=True)
    precisions = set(np.asarray(info.precision).ravel())
    cd = np.dtype(np.float32 if precisions == {"float32"} else np.float64)
    return p, out64, lse, info, out_torch, cd


def _saved(p, out64, lse, cd, arrays, workers, inputs):
    """What :func:`_backward` reads of a forward."""
    return {"p": p, "out": out64, "lse": lse, "cd": cd,
            "rotary": as_rotary(arrays.get("rotary")),
            "workers": workers, "shapes": tuple(tuple(x.shape) for x in inputs),
            "heads": None}


def _results(p, out64, lse, out_torch):
    """The forward's result as the pipeline returns it (the inputs' promoted dtype) and
    its lse, torch tensors."""
    out = out64.reshape(p.batch_shape + (p.n, p.Ev)).astype(p.dtype, copy=False)
    return (output_like(out, (out_torch,)),
            output_like(lse.reshape(p.batch_shape + (p.n,)), ("float64",)))


def _tensors(grads, dtypes):
    """numpy gradients as torch tensors of the given dtypes (None stays None)."""
    import torch

    return [None if g is None or dt is None else
            torch.from_numpy(np.ascontiguousarray(g)).to(dt)
            for g, dt in zip(grads, dtypes)]


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
    heads = saved["heads"]
    fast = [] if heads is None else [b for b, h in enumerate(heads) if h.method == "fast"]
    if fast and dlse is not None and np.any(dlse[fast]):
        raise NotImplementedError(
            "the log-sum-exp of a head computed by the fast path has no backward yet: "
            "with return_lse=True and a loss that uses it, pass method='exact'")
    exact = np.setdiff1d(np.arange(B), fast)
    if p.relative is not None:          # general W_t: the slow dense path, per diagonal
        dq = np.zeros((B, p.n, p.E))
        dk, dv = np.zeros(p.k.shape), np.zeros(p.v.shape)
        if exact.size:
            dq[exact] = _general_exact_part(p, saved, dout, dlse, exact, dk, dv)
        bounds = np.full((B, 3), np.nan)
        for b in fast:
            bounds[b] = _fast_part(p, saved, heads[b], b, dout, dq, dk, dv)
        if saved.get("info") is not None and fast:
            saved["info"].extra["gradient_bound"] = bounds.reshape(p.batch_shape + (3,))
    elif exact.size == B:
        dq, dk, dv = _exact_part(p, saved, cd, dout, dlse, None)
    else:
        dq = np.zeros((B, p.n, p.E))
        dk, dv = np.zeros(p.k.shape), np.zeros(p.v.shape)
        if exact.size:
            dq[exact], dk, dv = _exact_part(p, saved, cd, dout, dlse, exact)
        bounds = np.full((B, 3), np.nan)
        for b in fast:
            bounds[b] = _fast_part(p, saved, heads[b], b, dout, dq, dk, dv)
        info = saved.get("info")
        if info is not None:
            info.extra["gradient_bound"] = bounds.reshape(p.batch_shape + (3,))
    if saved["rotary"] is not None and p.positions is not None:
        dq, dk = rotate_rows_back(p, dq, dk, saved["rotary"])
    sh = p.shapes
    kv_shape = sh.kv_shape if sh.group > 1 else sh.batch_shape
    dq = dq.reshape(sh.batch_shape + (p.n, p.E))
    dk = dk.reshape(kv_shape + (p.S, p.E))
    dv = dv.reshape(kv_shape + (p.S, p.Ev))
    if saved["rotary"] is not None and p.positions is None:
        dq, dk = rotate_back(dq, dk, saved["rotary"], p.n, p.S, p.E, p.offset)
    return [_sum_to(a, shape) if need else None
            for a, shape, need in zip((dq, dk, dv), saved["shapes"], needs)]


def _exact_part(p, saved, cd, dout, dlse, heads):
    """exact_backward on the query heads ``heads`` (None: all): ``(dq of those heads,
    dk, dv of every key/value head)``."""
    sub = slice(None) if heads is None else heads
    B = p.q[sub].shape[0]
    ranges = None
    if p.key_ranges is not None:
        lo, hi = p.key_ranges
        ranges = (lo[None], hi[None], np.zeros(B, np.int64))
    return exact_backward(
        np.ascontiguousarray(p.q[sub], dtype=cd), np.ascontiguousarray(p.k, dtype=cd),
        np.ascontiguousarray(p.v, dtype=cd), np.ascontiguousarray(saved["out"][sub]),
        np.ascontiguousarray(saved["lse"][sub]), np.ascontiguousarray(dout[sub]), p.scale,
        bias=p.bias, bidx=None if p.bidx is None else p.bidx[sub], key_ranges=ranges,
        key_mask=p.kmask, kidx=None if p.kidx is None else p.kidx[sub],
        kvidx=p.kvidx[sub], workers=saved["workers"], softcap=p.softcap,
        dlse=None if dlse is None else np.ascontiguousarray(dlse[sub]))


def _general_exact_part(p, saved, dout, dlse, heads, dk, dv):
    """The exact gradients of heads with general relative matrices W_t, by the dense
    formulas one diagonal t = i − j at a time (``x_ij = s·q_iᵀW_t k_j``; FlashAttention-2's
    backward with the forward's lse, Dao 2023, §3.2): O(L·S·E²) work, O((L+S)·E) memory,
    numpy — the slow path of issue 22. Returns dq of ``heads``; dk, dv added in place."""
    if p.softcap is not None:
        raise NotImplementedError("general relative matrices with a soft cap have no "
                                  "exact backward; call under torch.no_grad()")
    L, S, s = p.n, p.S, p.scale
    lo, hi = (None, None) if p.key_ranges is None else p.key_ranges   # row i: lo <= j < hi
    dq = np.zeros((len(heads), L, p.E))
    for r, b in enumerate(heads):
        kv = int(p.kvidx[b])
        W = p.relative[p.ridx[b]]
        _, T, shift = head_weights(p, b)
        q, k, v = p.q[b], p.k[kv], p.v[kv]
        lse, g = saved["lse"][b], dout[b]
        km = None if p.kmask is None else p.kmask[p.kidx[b]]
        delta = np.einsum("ic,ic->i", g, saved["out"][b])
        if dlse is not None:
            delta = delta - dlse[b]                  # ∂lse_i/∂x_ij = A_ij joins Δ
        for d in range(L + S - 1):
            t = d - (S - 1)                          # i − j
            i = np.arange(max(0, t), min(L, S + t))
            if i.size == 0 or (T is not None and T[d] == 0.0):
                continue
            j = i - t
            if lo is not None:
                i = i[(lo[i] <= j) & (j < hi[i])]
                j = i - t
                if i.size == 0:
                    continue
            u = k[j] @ W[d].T                        # W_t k_j
            with np.errstate(invalid="ignore", over="ignore", divide="ignore"):
                logw = s * np.einsum("ie,ie->i", q[i], u) + shift - lse[i]
                if T is not None:
                    logw += np.log(T[d])
                if km is not None:
                    logw += km[j]                    # rows that see nothing: lse = −inf
                A = np.where(np.isfinite(lse[i]), np.exp(logw), 0.0)
            dX = A * (np.einsum("ic,ic->i", g[i], v[j]) - delta[i])
            dq[r, i] += s * dX[:, None] * u
            dk[kv, j] += s * dX[:, None] * (q[i] @ W[d])
            dv[kv, j] += A[:, None] * g[i]
    return dq


def _fast_part(p, saved, hp, b, dout, dq, dk, dv):
    """The certified fast backward of head ``b`` (planned fast: ``hp``), into ``dq[b]``
    and added to ``dk``, ``dv`` of its key/value head. The forward's denominators are
    ``exp(lse − shift)`` (the shift: the head's largest visible bias, 0 without one),
    and the algorithm gets the structure and Toeplitz weights its forward got.
    Returns the algorithm's certified bounds ``(bq, bk, bv)`` on this head's
    contributions (NaN where it gives none)."""
    kv = int(p.kvidx[b])
    key_mask = None if p.kmask is None else np.isfinite(p.kmask[p.kidx[b]])
    structure, T, shift = head_weights(p, b)
    with np.errstate(under="ignore"):
        den = np.exp(saved["lse"][b] - shift)
    alg = ops.get(hp.algorithm)
    q = np.ascontiguousarray(p.q[b], dtype=np.float64)
    k = np.ascontiguousarray(p.k[kv], dtype=np.float64)
    v = np.ascontiguousarray(p.v[kv], dtype=np.float64)
    general = {} if p.relative is None else {"relative": p.relative[p.ridx[b]]}
    g_q, g_k, g_v = alg.backward(
        q, k, v, saved["out"][b], den, dout[b], p.scale, hp.coef, structure=structure, T=T,
        offset=p.offset, key_mask=key_mask, workers=saved["workers"], **general)
    dq[b] = g_q
    dk[kv] += g_k
    dv[kv] += g_v
    bound = getattr(alg, "gradient_bound", None)
    if not callable(bound):
        return np.nan, np.nan, np.nan
    return bound(q, k, v, dout[b], p.scale, hp.coef, hp.delta, structure=structure, T=T,
                 offset=p.offset, key_mask=key_mask, radius=hp.radius)


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
        def backward(ctx, grad, grad_lse):
            if torch.is_grad_enabled():
                # create_graph=True: the gradients are computed outside torch, so a
                # graph through them would silently miss their dependence on the
                # inputs (once_differentiable catches it only when grad requires grad)
                raise RuntimeError(
                    "numbarope's attention has no second derivative: backward with "
                    "create_graph=True (e.g. a gradient penalty) is not supported; use "
                    "torch attention for higher-order gradients")
            return _first_order(ctx, grad, grad_lse)

    @once_differentiable           # a second derivative raises (none is built yet)
    def _first_order(ctx, grad, grad_lse):
        ctx.saved_tensors          # raises if an input was changed in place since
        needs = ctx.needs_input_grad[:3]
        if grad is None and grad_lse is None:
            return (None,) * 6
        grads = _backward(ctx.saved, grad, grad_lse, needs)
        return (*_tensors(grads, ctx.dtypes), None, None, None)

    return ExactAttention


class _Lazy:
    """The autograd Function, built on first use (torch is imported only then)."""

    fn = None

    def apply(self, *args):
        if _Lazy.fn is None:
            _Lazy.fn = _function()
        return _Lazy.fn.apply(*args)


_ExactAttention = _Lazy()
