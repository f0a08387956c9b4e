"""One long sequence on Dask: blocks of rows across workers (optional extra).

:func:`long_sequence_attention` splits one sequence into blocks of rows. Exact: one
task per (query block, key block) pair runs the pipeline's call
(:func:`numbarope._pipeline.attention`), the partial results of a query block are
merged by their log-sum-exp (:func:`merge_partials`). Fast: the algorithms compose
through their key-side states (:mod:`numbarope.ops.gemm`, :mod:`numbarope.ops.prefix`,
:mod:`numbarope.ops.decay`: ``key_state``, ``add_states``, ``initial_state=``): one
state per key block, summed in a tree and sent to the query blocks, planned for the
whole sequence from the blocks' statistics
(:func:`numbarope._pipeline.heads.separable_head_spec`,
:func:`numbarope._pipeline.plan.plan_head`). Imports dask only when called.
"""

import dataclasses
import math
import numbers
import uuid
import warnings

import numpy as np

from .._pipeline import attention
from .._pipeline.heads import separable_head_spec
from .._pipeline.inputs import (KNOWN_KEYWORDS, _check_finite, as_float_array, as_key_mask,
                                check_per_key_lead, check_shapes, validate_flag,
                                validate_options, validate_precision)
from .._pipeline.plan import plan_head
from .._pipeline.run import _value_scale
from .._runtime.interop import is_dask
from .._runtime.threads import resolve_workers
from ..bias import Causal, Decay, NoBias, RelativeBias, Window
from ..ops import FastPathError, decay, gemm, prefix
from ..ops.streaming import row_norms
from ..rotary import rotary_tables, rotate
from .dask import _as_rotary, _check_dtype, _check_known_shape, _fits_batch, _require_dask

__all__ = ["long_sequence_attention", "merge_partials"]

#: More (query block, key block) pairs than this draws a warning: the scheduler's cost
#: per task (~1 ms) would exceed the work of blocks that small.
_MANY_PAIRS = 20000


def merge_partials(a, b):
    """Merge two partial results ``(out, lse)`` over disjoint key sets.

    ``lse = logaddexp(lse_a, lse_b)``, ``out = e^{lse_a − lse} out_a +
    e^{lse_b − lse} out_b``; rows that see no key in either (−inf) stay 0.
    """
    oa, la = a
    ob, lb = b
    lse = np.logaddexp(la, lb)
    fin = np.isfinite(lse)
    safe = np.where(fin, lse, 0.0)
    wa = np.where(fin, np.exp(la - safe), 0.0)[..., None]
    wb = np.where(fin, np.exp(lb - safe), 0.0)[..., None]
    return oa * wa + ob * wb, lse


def _rotated(x, a, n_total, rotary):
    """Block ``x`` (..., b, E) rotated at global positions a .. a+b−1, float64, with the
    tables of the in-memory call (bitwise the same rotated values); a float64 copy
    without rotary."""
    x = np.asarray(x)
    if rotary is None:
        return np.ascontiguousarray(x, dtype=np.float64)
    c, s = rotary_tables(rotary, n_total, x.shape[-1],
                         positions=np.arange(a, a + x.shape[-2]), seq_len=n_total)
    return rotate(x, rotary, c, s)


def _pair(qb, kb, vb, qa, ka, n_total, rotary, kw, bias=None, mask=None, L=None, S=None):
    """Attention of query rows qa.. against key rows ka.. (global positions): the
    pipeline's call (:func:`numbarope._pipeline.attention`) at ``query_offset = qa − ka``.

    ``kw``: its options and is_causal, scale, precision. ``bias``: a typed structure
    (evaluated by the call at this pair's offset) or the whole sequence's
    ``(..., L+S−1)`` array, sliced here to the pair's offsets. Returns ``(out float64,
    lse, the pair's bound per head, max|v| per head)``."""
    qb, kb, vb = np.asarray(qb), np.asarray(kb), np.asarray(vb)
    if rotary is not None:     # rotate at the global positions, as the in-memory call
        qb, kb = _rotated(qb, qa, n_total, rotary), _rotated(kb, ka, n_total, rotary)
    off = int(qa - ka)
    if isinstance(bias, np.ndarray):
        Lb, Sb = qb.shape[-2], kb.shape[-2]
        a = off + S - Sb                     # offset t = e − (Sb−1) + off at index t + S − 1
        bias = bias[..., a:a + Lb + Sb - 1]
    extra = {}
    if bias is not None:
        extra["bias"] = bias
    if mask is not None:
        extra["key_padding_mask"] = mask
    kw = dict(kw, workers=resolve_workers(kw.get("workers")))
    out, lse, info = attention(qb, kb, vb, query_offset=off, return_lse=True,
                               return_info=True, **kw, **extra)
    vmax = np.broadcast_to(np.abs(vb).max(axis=(-2, -1), initial=0.0), out.shape[:-2])
    return (out.astype(np.float64, copy=False), lse, np.asarray(info.error_bound, float),
            np.asarray(vmax, dtype=np.float64))


def _merge_pairs(*parts, out_unit=0.0):
    """Tree merge of ((out, lse, bound, vmax), ...) -> (out, lse, bound).

    Bound of the merged rows (exact pairs), per head, from the pairs' bounds B_a and
    max|v|: each pair's weights are within ρ_a <= B_a/(2 max|v|) of their sum (its
    bound is >= 2ρ_a·max|v|), so its lse errs by at most ε_a = −log(1−ρ_a) plus the
    rounding of log and of the shift, <= 2u·(|lse|+1) (u = 2⁻⁵³). The merge weights
    ``e^{lse_a − lse}`` are then within a factor ``e^{±x}``, ``x = 2 max ε_a +
    4u(max|lse| + 2) + 2u·P`` (P pairs: one rescaling and one addition per merge
    level), so ``|out − exact| <= max B_a + expm1(x)·max|v|`` (a convex combination of
    the pairs' outputs with perturbed weights; Higham 2002 §3 for the float64 steps),
    plus ``out_unit·max|v|`` for a float32 result.
    """
    items = [((o, l), b) for o, l, b, _ in parts]
    bmax = np.max(np.stack([b for _, b in items]), axis=0)
    vmax = np.max(np.stack([m for *_, m in parts]), axis=0)
    acc = [p for p, _ in items]
    while len(acc) > 1:
        acc = [merge_partials(acc[i], acc[i + 1]) if i + 1 < len(acc) else acc[i]
               for i in range(0, len(acc), 2)]
    out, lse = acc[0]
    u = 2.0 ** -53
    lmax = max([float(np.max(np.abs(l[np.isfinite(l)]), initial=0.0)) for (_, l), _ in items]
               + [0.0])
    bound = np.empty_like(bmax, dtype=np.float64)
    for idx in np.ndindex(bmax.shape):
        vm, b = float(vmax[idx]), float(bmax[idx])
        if vm == 0.0:
            bound[idx] = 0.0
            continue
        rho = min(b / (2 * vm), 0.5)
        eps = -math.log1p(-rho) + 2 * u * (lmax + 1)
        x = 2 * eps + 4 * u * (lmax + 2) + 2 * u * len(parts)
        bound[idx] = (b + math.expm1(x) * vm + out_unit * vm) * (1 + 1e-12) \
            if rho < 0.5 else np.inf
    return out, lse, bound


def _long_bias(bias, is_causal, L, S, batch_shape):
    """``(bias, is_causal, rates, window)`` of long_sequence_attention's ``bias``: None;
    a typed structure (Causal() becomes is_causal; a causal Decay/ALiBi gives per-head
    rates for the fast graph; a Window its band, to skip pairs; Decay and Window are
    evaluated by each pair, any other structure is materialised over the whole
    sequence's offsets); or an array over the offsets, ``(..., L+S−1)``, read as
    rope_attention reads it (a boolean array is a mask), validated here and sliced
    per pair."""
    if bias is None:
        return None, is_causal, None, None
    if isinstance(bias, RelativeBias):
        if isinstance(bias, NoBias):
            return None, is_causal, None, None
        if isinstance(bias, Causal):
            return None, True, None, None
        if bias._lead and not _fits_batch(bias._lead, batch_shape):
            raise ValueError(f"bias {bias!r} has per-head parameters of shape {bias._lead}, "
                             f"which do not broadcast to the batch (head) dims "
                             f"{batch_shape}")
        causal = bool(is_causal) or bool(bias.causal)
        if isinstance(bias, Decay) and causal:
            return bias, causal, _rates_of(bias, batch_shape), None
        if isinstance(bias, (Decay, Window)):
            window = (bias.left, bias.right) if isinstance(bias, Window) else None
            return bias, is_causal, None, window
        return _long_bias(bias.values(L, S), is_causal, L, S, batch_shape)
    if is_dask(bias):
        raise TypeError("bias: pass a numpy array (L+S−1 values per head) or a "
                        "numbarope.bias structure, not a dask array")
    b = np.asarray(bias)
    if b.dtype == np.bool_:            # a mask, as rope_attention: True = takes part
        b = np.where(b, 0.0, -np.inf)
    b = as_float_array(b, "bias").astype(np.float64)
    if b.ndim < 1 or b.shape[-1] != L + S - 1:
        raise ValueError(f"bias has shape {b.shape}; expected (..., {L + S - 1}): one value "
                         f"per offset t = i − j (index t + S − 1)")
    if not _fits_batch(b.shape[:-1], batch_shape):
        raise ValueError(f"bias has shape {b.shape}, whose leading dims do not broadcast to "
                         f"the batch (head) dims {batch_shape}")
    if np.isnan(b).any() or np.isposinf(b).any():
        raise ValueError("bias holds NaN or +inf; use finite values (-inf masks an offset)")
    return b, is_causal, None, None


def _long_key_mask(kpm, S, batch_shape):
    """The (..., S) bool key_padding_mask (a dask one computed: S booleans per sequence),
    checked as rope_attention checks it; None without one."""
    if kpm is None:
        return None
    if is_dask(kpm):
        kpm = kpm.compute()          # S booleans per sequence
    m = as_key_mask(kpm, S)
    check_per_key_lead(m.shape, batch_shape, "key_padding_mask")
    return m


def _outside(window, tmin, tmax):
    """Whether a pair with offsets tmin..tmax lies wholly outside the band
    −right <= t <= left of ``window = (left, right)`` (None: unbounded)."""
    left, right = window
    return (left is not None and tmin > left) or (right is not None and tmax < -right)


def long_sequence_attention(query, key, value, *, query_block, key_block=None, client=None,
                            rotary=None, is_causal=False, scale=None, bias=None,
                            key_padding_mask=None, method="auto",
                            eps=1e-3, precision=None, return_lse=False, return_info=False,
                            workers=None, **unknown):
    """Attention of ONE long sequence over a Dask cluster, by query and key blocks.

    **Exact** (``method="exact"``, or ``"auto"`` when some head needs it): every
    (query block, key block) pair is one task computing the call of
    ``rope_attention(q_i, k_j, v_j, query_offset=start_i − start_j,
    return_lse=True)`` (:func:`numbarope._pipeline.attention`, the ordinary
    kernels); the partial results of query block i are merged by their
    log-sum-exp, ``out = Σ_j e^{lse_j − lse} out_j``, ``lse = log Σ_j e^{lse_j}``
    (:func:`merge_partials`), in one merge task per query block. With
    ``is_causal`` the key blocks after a query block are not computed at all
    (about half the pairs). Work O(L·S), as in memory.

    **Fast** (``method="fast"``, or ``"auto"`` when every head is fast): the
    polynomial method's separable form (Alman & Song 2025, §4), composed from the
    algorithms' key-side states. One task per key block forms its state ``(Σ_j
    ψ(k_j) v_jᵀ, Σ_j ψ(k_j))`` (:func:`numbarope.ops.gemm.key_state`), m·(Ev+1)
    floats per head (m = C(E+g, g)); the states are added in a binary tree
    (:func:`numbarope.ops.gemm.add_states`; log₂ B levels for B key blocks); each
    query block receives, causal, the sum of the O(log B) tree nodes covering the
    blocks before it and computes its own block under the mask started at that
    state (:func:`numbarope.ops.prefix.prefix_attention`, ``initial_state=``), or,
    non-causal, the root (gemm's query side,
    :func:`numbarope.ops.gemm.apply_state`). Work O((L + S)·m·Ev), as in memory.
    The plan (degree, polynomial, bound) is that of the whole sequence, from the
    blocks' maxima (``s·max‖q‖·max‖k‖``, ``max|v|``): the same HeadSpec
    (:func:`numbarope._pipeline.heads.separable_head_spec`), polynomial and
    certified bound (:func:`numbarope._pipeline.plan.plan_head`) as the in-memory
    call. With
    ``"fast"`` this is a lazy task (a head the fast path cannot serve raises
    :class:`~numbarope.FastPathError` at compute time); ``"auto"`` computes the
    maxima first (one pass, a few floats per block back) to choose the graph.
    The fast causal graph needs aligned blocks (``key_block == query_block``,
    L == S).

    **Decay** (a causal :class:`~numbarope.bias.Decay` or
    :class:`~numbarope.bias.ALiBi` bias, fast): each block state is
    ``Σ_j γ^{e − j} ψ(k_j)[v_j, 1]``, referenced at its last position e
    (:func:`numbarope.ops.decay.key_state`); joining node a to node b decays a by
    ``γ^{e_b − e_a}`` (:func:`numbarope.ops.decay.add_states`); a query block runs
    the decayed scan of its own block started at the state P of the keys before it,
    referenced at the position before the block
    (:func:`numbarope.ops.decay.decay_attention`, ``initial_state=P``). Every
    factor spans two positions, so the factors of a key's path telescope to
    ``γ^{i − j}`` exactly as in memory, through at most ``1 + 2⌊log₂(B−1)⌋ +
    ⌈b/C⌉`` of them (blocks of b rows, chunks of C keys): the in-memory bound
    (which counts ``⌈S/C⌉ + 2``) covers it when that is ``<= ⌈S/C⌉ + 2``, checked
    (else ValueError at compute).

    With ``rotary`` each block is rotated at its global positions with the same
    tables as the in-memory call, so every task sees bitwise the same rotated
    values.

    Parameters
    ----------
    query : (..., L, E) numpy or dask array
    key, value : (..., S, E), (..., S, Ev) numpy or dask arrays
        Keys at positions 0..S−1, queries at 0..L−1. Leading dims are carried by
        every task (each task computes all heads of its pair).
    query_block, key_block : int
        Rows per query block and per key block (``key_block`` defaults to
        ``query_block``).
    client : distributed.Client, optional
        With numpy inputs and a client, the blocks are scattered to the workers
        (``client.scatter``) instead of being embedded in the graph.
    rotary, is_causal, scale, method, eps, precision, workers
        As :func:`numbarope.rope_attention` (``workers``: threads per task on
        its worker). ``method`` defaults to ``"auto"``.
    bias : numbarope.bias structure or (..., L+S−1) ndarray, optional
        As ``rope_attention``'s: a typed structure is evaluated by each pair at
        its offsets (a :class:`~numbarope.bias.Window` also skips the pairs
        outside its band; ``Causal()`` is ``is_causal``; a causal Decay/ALiBi
        runs on the fast graph); an array over the offsets (index ``t + S − 1``
        for ``t = i − j``) is sent once and sliced by each pair. The fast graph
        takes no bias but Causal and causal Decay/ALiBi.
    key_padding_mask : (..., S) bool array, optional
        True = a real key (0/1 integers read alike), leading dims broadcasting
        to the batch dims; sliced per key block. Fast: padded keys leave the key
        block states (not with decay).

    Returns
    -------
    out : dask.array.Array (..., L, Ev)
    lse : dask.array.Array (..., L) float64, with ``return_lse=True``
    error_bound : dask.array.Array of the leading shape, with ``return_info=True``
        The certified bound on ``max|out − exact|`` per head (fast: the whole
        sequence's plan; exact: the max over pairs, rounding only).

    Raises
    ------
    ValueError, TypeError
        Bad shapes, dtypes, blocks or options, before any task is scheduled
        (rope_attention's checks of the shapes and options:
        :func:`numbarope._pipeline.inputs.check_shapes`, ``validate_options``).
    numbarope.FastPathError
        At compute time, ``method="fast"`` for a head the fast path cannot serve.

    Notes
    -----
    Bytes per task (float64, B heads): a pair or state task reads its q, k, v
    blocks (``8·B·block·(2E + Ev)``); a state is ``8·B·m·(Ev+1)``; a query task
    sends back ``8·B·block·(Ev+1)`` (out and lse). The tree moves each state
    once per level.
    """
    _require_dask()
    import dask
    import dask.array as da

    if unknown:
        here = sorted(set(unknown) & set(KNOWN_KEYWORDS))
        if here:      # rope_attention options this function does not implement: refuse
            raise TypeError(
                f"long_sequence_attention does not take {', '.join(here)} (options of "
                f"rope_attention it does not implement: blocks are at positions 0..n−1, "
                f"no GQA, the plan is its own); call numbarope.rope_attention for them")
        raise TypeError(f"long_sequence_attention got unexpected keyword(s) "
                        f"{', '.join(sorted(unknown))}")
    if client is not None and not hasattr(client, "scatter"):
        raise TypeError(f"client must be a distributed.Client (or None: the default "
                        f"scheduler), got {type(client).__name__}; for an address use "
                        f"client=distributed.Client({client!r})")
    for name, b in (("query_block", query_block), ("key_block", key_block)):
        if b is None and name == "key_block":
            continue
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1:
            raise ValueError(f"{name} must be an int >= 1 (rows per block), got {b!r}")
    key_block = query_block if key_block is None else key_block
    validate_flag(return_lse, "return_lse")
    validate_flag(return_info, "return_info")
    # every check rope_attention makes without the data: options, dtypes, shapes, rotary
    eps_f = validate_options(method, eps, None, "chebyshev", scale, None, is_causal)
    validate_precision(precision)
    resolve_workers(workers)
    for name, a in (("query", query), ("key", key), ("value", value)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{name}: pass a numpy or dask array (got {type(a).__name__})")
        _check_known_shape(a, name)
        _check_dtype(a.dtype, name)
    sh = check_shapes(query.shape, key.shape, value.shape)
    batch_shape, L, S, E, Ev = sh.batch_shape, sh.L, sh.S, sh.E, sh.Ev
    rotary = _as_rotary(rotary, E)
    kw = dict(is_causal=is_causal, scale=scale, method=method, eps=eps_f, precision=precision,
              workers=workers)
    dtype = np.result_type(query.dtype, key.dtype, value.dtype)
    if precision is None and dtype == np.float32:
        kw["precision"] = "float32"          # the pairs see float64 rotated inputs
    for name, a in (("query", query), ("key", key), ("value", value)):
        if isinstance(a, np.ndarray):        # in memory: checked now (lazy: by the tasks)
            _check_finite(np.ascontiguousarray(a), name)
    nrot = max(L, S)
    if rotary is not None and L != S:
        raise ValueError("long_sequence_attention with rotary needs L == S (self-attention)")
    bias, is_causal, rates, window = _long_bias(bias, is_causal, L, S, batch_shape)
    kw["is_causal"] = is_causal
    kpm = _long_key_mask(key_padding_mask, S, batch_shape)
    fast_ok = bias is None or rates is not None          # no bias, Causal, causal Decay
    if rates is not None and kpm is not None:
        fast_ok = False       # decay weights are relative to a row's nearest real key
    if method == "fast" and not fast_ok:
        raise ValueError(
            "method='fast' in long_sequence_attention serves no bias, Causal() and causal "
            "Decay/ALiBi (without key_padding_mask); got "
            f"bias={bias!r}{', key_padding_mask' if kpm is not None else ''}: use "
            "method='exact' (or 'auto')")
    aligned = not is_causal or (key_block == query_block and L == S)
    if method == "fast" and not aligned:
        raise ValueError(
            f"method='fast' with is_causal needs aligned blocks (key_block == query_block, "
            f"L == S); got query_block={query_block}, key_block={key_block}, L={L}, S={S}"
            + (": omit key_block" if L == S else ": use method='exact' for L != S"))
    call = uuid.uuid4().hex           # keys of this call's blocks (see below)

    def blocks(x, size, name):
        """Cuts, graph blocks and (numpy inputs) the local blocks."""
        n = x.shape[-2]
        cuts = list(range(0, n, size))
        if isinstance(x, np.ndarray) or not is_dask(x):
            x = np.asarray(x)
            local = [x[..., a:a + size, :] for a in cuts]
            if client is not None:
                parts = client.scatter(local, hash=False)   # keys of this call
            else:
                # keys of our own, not tokens of the data: a distributed scheduler that
                # is still forgetting an earlier identical call's keys would otherwise
                # cancel this one's tasks ("lost dependencies")
                parts = [dask.delayed(p, traverse=False, name=f"numbarope-{name}-{call}-{i}")
                         for i, p in enumerate(local)]
            return cuts, parts, local
        x = x.rechunk(tuple(-1 for _ in x.shape[:-2]) + (size, -1))
        d = x.to_delayed().reshape(-1)
        return cuts, list(d), None

    qcuts, qparts, qlocal = blocks(query, query_block, "query")
    kcuts, kparts, klocal = blocks(key, key_block, "key")
    _, vparts, vlocal = blocks(value, key_block, "value")
    mparts = [None if kpm is None else kpm[..., a:a + key_block] for a in kcuts]
    s_val = 1.0 / np.sqrt(E) if scale is None else float(scale)
    outs, lses, bounds = [], [], []
    fast = None
    if method in ("fast", "auto") and L and S and aligned and fast_ok:
        fast = _fast_plans(qparts, kparts, vparts, qcuts, kcuts, method,
                           dict(batch_shape=batch_shape, scale=s_val, causal=bool(is_causal),
                                eps=eps_f, out_unit=2.0 ** -24 if dtype == np.float32
                                else 0.0, compute_dtype="float32"
                                if kw.get("precision") == "float32" else "float64",
                                rates=rates, nblocks=len(kcuts),
                                block=min(query_block, L),
                                rotated=rotary is not None),
                           L, S, E, Ev, nrot, rotary,
                           local=None if qlocal is None or klocal is None or vlocal is None
                           else (qlocal, klocal, vlocal))
    if fast is not None:
        qr, kr, plans = fast
        results, bound = _fast_long(qr, kr, vparts, mparts, qcuts, kcuts, plans,
                                    batch_shape=batch_shape, Ev=Ev, scale=s_val,
                                    causal=bool(is_causal), rates=rates, workers=workers)
        for qa, (o, lo) in zip(qcuts, results):
            Lb = min(query_block, L - qa)
            outs.append(da.from_delayed(o, shape=batch_shape + (Lb, Ev), dtype=np.float64))
            lses.append(da.from_delayed(lo, shape=batch_shape + (Lb,), dtype=np.float64))
        bounds.append(da.from_delayed(bound, shape=batch_shape, dtype=np.float64))
    else:
        npairs = -(-L // query_block) * -(-S // key_block)
        if npairs > _MANY_PAIRS:
            warnings.warn(f"long_sequence_attention: {npairs} (query block, key block) "
                          f"pairs for the exact graph (blocks of {query_block}/{key_block} "
                          f"rows): a graph this size costs the scheduler more than the "
                          f"work; use larger blocks (thousands of rows)", RuntimeWarning,
                          stacklevel=2)
        if method == "auto":
            kw["method"] = "exact"        # planned for the whole sequence: exact
        pair = dask.delayed(_pair, pure=True)
        merge = dask.delayed(_merge_pairs, pure=True, nout=3)
        out_unit = 2.0 ** -24 if dtype == np.float32 else 0.0
        if isinstance(bias, np.ndarray):     # one copy in the graph, sliced by each pair
            bias = (client.scatter(bias, broadcast=True, hash=False) if client is not None
                    else dask.delayed(bias, traverse=False, name=f"numbarope-bias-{call}"))
        for qa, qp in zip(qcuts, qparts):
            Lb = min(query_block, L - qa)
            parts = []
            for ka, kp, vp, mp in zip(kcuts, kparts, vparts, mparts):
                Sb = min(key_block, S - ka)
                if is_causal and ka > qa + Lb - 1:
                    break                    # every key of this block is after every query
                if window is not None and _outside(window, qa - ka - Sb + 1, qa + Lb - 1 - ka):
                    continue                 # the band misses the whole pair
                parts.append(pair(qp, kp, vp, qa, ka, nrot, rotary, kw, bias, mp, L, S))
            if not parts:                    # S == 0
                o = dask.delayed(np.zeros)(batch_shape + (Lb, Ev))
                lo = dask.delayed(np.full)(batch_shape + (Lb,), -np.inf)
                bo = dask.delayed(np.zeros)(batch_shape)
            else:
                o, lo, bo = merge(*parts, out_unit=out_unit)
            outs.append(da.from_delayed(o, shape=batch_shape + (Lb, Ev), dtype=np.float64))
            lses.append(da.from_delayed(lo, shape=batch_shape + (Lb,), dtype=np.float64))
            bounds.append(da.from_delayed(bo, shape=batch_shape, dtype=np.float64))
    if not outs:                               # L == 0: nothing to compute
        out = da.zeros(batch_shape + (0, Ev), dtype=np.float32 if dtype == np.float32
                       else np.float64)
        lses = [da.zeros(batch_shape + (0,))]
        bounds = [da.zeros(batch_shape)]
        outs = [out]
    out = da.concatenate(outs, axis=-2).astype(np.float32 if dtype == np.float32
                                               else np.float64)
    res = (out,)
    if return_lse:
        res += (da.concatenate(lses, axis=-1),)
    if return_info:
        res += (da.stack(bounds).max(axis=0),)
    return res[0] if len(res) == 1 else res


# ---------------------------------------------------------------------------
# one long sequence, fast path: key-side states of key blocks, combined by a tree
# reduction, broadcast to the query blocks (Alman & Song 2025, §4: the separable
# case; gemm without a mask, prefix with the causal mask)


def _flat(x, batch_shape):
    """(..., b, E) block broadcast to the batch dims and flattened: (B, b, E)."""
    x = np.asarray(x)
    return np.broadcast_to(x, tuple(batch_shape) + x.shape[-2:]).reshape((-1,) + x.shape[-2:])


def _row_max(xr, batch_shape, kind):
    """Per head of a block: the largest row norm (an upper bound, as the in-memory
    call's: :func:`numbarope.ops.streaming.row_norms`) of rotated q or k
    (``kind="norm"``, ``xr`` = (block, start, n, rotary)), or max|v| (``kind="abs"``,
    ``xr`` the block)."""
    x = _flat(_rotated(*xr) if kind == "norm" else xr, batch_shape)
    if kind == "norm":
        return row_norms(np.ascontiguousarray(x)).max(axis=1, initial=0.0)
    return np.abs(x).max(axis=(1, 2), initial=0.0)


def _long_plans(qn, kn, vm, n, S, E, Ev, info, method):
    """Per head the plan of the whole sequence from its block statistics (maxima).

    The same HeadSpec as the in-memory call's
    (:func:`numbarope._pipeline.heads.separable_head_spec`: radius s·max‖q‖·max‖k‖,
    max|v|, decay rate), so :func:`numbarope._pipeline.plan.plan_head` gives the same
    polynomial and certified bound; ``method="fast"`` raises
    :class:`~numbarope.FastPathError` for a head the fast path cannot serve.
    """
    qn = np.max(np.stack(qn), axis=0)
    kn = np.max(np.stack(kn), axis=0)
    vm = np.max(np.stack(vm), axis=0)
    batch_shape = info["batch_shape"]
    rates = info.get("rates")
    want = "decay" if rates is not None else ("prefix" if info["causal"] else "gemm")
    plans = []
    for b in range(qn.size):
        head = tuple(int(i) for i in np.unravel_index(b, batch_shape)) if batch_shape else ()
        with np.errstate(over="ignore"):
            R = info["scale"] * float(qn[b]) * float(kn[b])
        h = separable_head_spec(head, n, S, E, Ev, R, float(vm[b]), info["causal"],
                                info["compute_dtype"], info["out_unit"],
                                rate=None if rates is None else rates[b],
                                rotated=info.get("rotated", False))
        pl = plan_head(h, method=method, eps=info["eps"], degree=None, approx="chebyshev")
        if pl.method == "fast" and pl.algorithm != want:
            if method == "fast":
                raise FastPathError(
                    f"head {head}: the planner chose {pl.algorithm!r}; one long sequence's "
                    f"fast graph runs {want!r} only: use method='exact' or 'auto'",
                    code="structure", head=head)
            pl = dataclasses.replace(pl, method="exact")   # "auto": the exact pairs
        if pl.method == "fast" and want == "decay":
            _check_decay_tree(pl, info["nblocks"], info["block"], S, E, Ev)
        plans.append(pl)
    # values above 2^1000 are scaled by a power of 2 (exact), as the in-memory call does
    factors = [_value_scale(None, vmax=float(x)) for x in vm.reshape(-1)]
    return {"plans": plans, "factors": factors, "rates": rates}


def _decay_tree_factors(nblocks, S, block, C):
    """The most decay factors on the path of a key to a row of a later block (0 for one
    block: no state passes), blocks of ``block`` rows over S, chunks of C keys.

    Block i receives the sum of the covering tree nodes of blocks 0 .. i−1, one per set
    bit of i: a key in the first (highest, level l₀ = ⌊log2 i⌋) node passes <= l₀ tree
    additions as the earlier operand and popcount(i) − 1 <= l₀ fold steps; a key in a
    later node t passes <= l₀ − t levels and popcount(i) − 1 − t steps. With its block
    state's factor: <= 1 + 2⌊log2(B−1)⌋. Then the scan of the receiving block (state
    in as a chunk ending before it): one factor per earlier task and chunk of the
    block, and the row's factor: <= ⌈b/C⌉ for a receiving block of b rows (with two
    blocks only the second, S − block rows, receives one)."""
    if nblocks <= 1:
        return 0
    recv = min(block, S - block) if nblocks == 2 else block
    return 1 + 2 * ((nblocks - 1).bit_length() - 1) + -(-recv // C)


def _check_decay_tree(pl, nblocks, block, S, E, Ev):
    """Refuse a decay graph whose rounding the in-memory bound does not cover.

    The in-memory bound (:func:`numbarope.ops._bounds.recurrence_rounding`) counts
    ``nch + 2`` decay factors and ``nch + 4`` additions on a key's path to a row,
    nch = ⌈S/C⌉ chunks of C = :func:`numbarope.ops.decay.decay_chunk` keys. Here a
    key of an earlier block passes its block state's factor
    (:func:`numbarope.ops.decay.key_state`), tree levels and fold steps over the
    covering nodes (:func:`numbarope.ops.decay.add_states`), then, as the
    ``initial_state`` of its query block's scan
    (:func:`numbarope.ops.decay.decay_attention`: a chunk ending at the position
    before the block), one factor per chunk of the block before the row's and the
    row's factor: at most :func:`_decay_tree_factors`, as many additions (+ 3 joining
    the row's own chunk and the output division). Within the count when that is
    <= nch + 2; otherwise refuse (blocks that small do not pay anyway).
    """
    C = decay.decay_chunk(pl.features, E, Ev, pl.degree)
    nch = -(-S // C)
    need = _decay_tree_factors(nblocks, S, block, C)
    if need > nch + 2:
        fits = [(-(-S // bs), bs) for bs in (-(-S // B) for B in range(nblocks - 1, 0, -1))
                if _decay_tree_factors(-(-S // bs), S, bs, C) <= nch + 2]
        fix = (f"use at most {fits[0][0]} blocks (query_block >= {fits[0][1]})" if fits
               else "use fewer, larger blocks")
        raise ValueError(
            f"decay over {nblocks} blocks of a {S}-key sequence: the certified bound counts "
            f"{nch + 2} decay steps on a key's path and the tree needs {need}; {fix} "
            f"or method='exact'")


def _rates_of(bias, batch_shape):
    """Per flattened head the decay rate of a Decay/ALiBi structure."""
    r = np.asarray(bias.rate, dtype=np.float64)
    return [float(x) for x in np.broadcast_to(r, batch_shape).reshape(-1)] if batch_shape \
        else [float(r)]


def _key_block_state(kr, vb, mb, ka, plans, batch_shape, scale, workers):
    """Key-side state of one key block (keys at ka ..), one (S, s) per head: m·(Ev+1)
    floats each (:func:`numbarope.ops.gemm.key_state`). Decay: ``Σ_j γ^{e − j}
    ψ(k_j)[v_j, 1]``, referenced at the block's last position e
    (:func:`numbarope.ops.decay.key_state`). Padded keys (``mb`` False) take no part."""
    k, v = _flat(_rotated(*kr), batch_shape), _flat(vb, batch_shape)
    msk = None if mb is None else _flat(np.asarray(mb)[..., None], batch_shape)[..., 0]
    P, F, rates = plans["plans"], plans["factors"], plans["rates"]
    nw = resolve_workers(workers)
    out = []
    for b in range(len(P)):
        vv = v[b].astype(np.float64) * F[b]
        mk = None if msk is None else msk[b]
        if rates is None:
            out.append(gemm.key_state(k[b], vv, scale, P[b].coef, key_mask=mk, workers=nw))
        else:
            out.append(decay.key_state(k[b], vv, scale, P[b].coef, rates[b], key_mask=mk,
                                       workers=nw))
    return {"st": out, "e": int(ka + v.shape[1] - 1)}


def _add_states(a, b, rates=None):
    """Sum of two nodes (blocks a then b) of the tree reduction, referenced at b's last
    position (:func:`numbarope.ops.gemm.add_states`); decay: a's state first decays by
    ``γ^{e_b − e_a}`` (:func:`numbarope.ops.decay.add_states`)."""
    if rates is None:
        st = [gemm.add_states(x, y) for x, y in zip(a["st"], b["st"])]
    else:
        st = [decay.add_states(x, y, rates[h], b["e"] - a["e"])
              for h, (x, y) in enumerate(zip(a["st"], b["st"]))]
    return {"st": st, "e": b["e"]}


def _sum_states(*nodes, rates=None):
    """Sum of O(log B) tree nodes in position order: the keys before a query block."""
    acc = nodes[0]
    for x in nodes[1:]:
        acc = _add_states(acc, x, rates)
    return acc


def _query_block(qr, kr, vb, mb, qa, state, plans, batch_shape, scale, causal, Ev, workers):
    """Output rows of one query block (rows at qa ..) from the combined key-side state
    ``state`` of the keys before it (non-causal: of every key). Returns ``(out, lse)``.

    Non-causal: gemm's query side (:func:`numbarope.ops.gemm.apply_state`). Causal: its
    own key block under the mask, started at the state
    (:func:`numbarope.ops.prefix.prefix_attention` with ``initial_state``); decay:
    :func:`numbarope.ops.decay.decay_attention` with ``initial_state`` the decayed state
    referenced at qa − 1, the position before the block (den relative to the row's own
    key, as in memory)."""
    q = _flat(_rotated(*qr), batch_shape)
    B, Lb, E = q.shape
    if causal:
        k, v = _flat(_rotated(*kr), batch_shape), _flat(vb, batch_shape)
    msk = None if mb is None else _flat(np.asarray(mb)[..., None], batch_shape)[..., 0]
    P, F, rates = plans["plans"], plans["factors"], plans["rates"]
    assert rates is None or state is None or state["e"] == qa - 1    # aligned blocks
    nw = resolve_workers(workers)
    out = np.empty((B, Lb, Ev))
    lse = np.empty((B, Lb))
    for b in range(B):
        f = F[b]
        st = None if state is None else state["st"][b]
        mk = None if msk is None else msk[b]
        coef = P[b].coef
        if rates is not None:
            o, den = decay.decay_attention(q[b], k[b], v[b].astype(np.float64) * f, scale,
                                           coef, rates[b], True, key_mask=mk, workers=nw,
                                           initial_state=st)
        elif causal:
            o, den = prefix.prefix_attention(q[b], k[b], v[b].astype(np.float64) * f, scale,
                                             coef, key_mask=mk, workers=nw, initial_state=st)
        else:
            o, den = gemm.apply_state(q[b], st, scale, coef, workers=nw)
        out[b] = o / f if f != 1.0 else o
        with np.errstate(divide="ignore"):
            lse[b] = np.where(den > 0, np.log(np.where(den > 0, den, 1.0)), -np.inf)
    return (out.reshape(tuple(batch_shape) + (Lb, Ev)),
            lse.reshape(tuple(batch_shape) + (Lb,)))


def _plan_bounds(plans, batch_shape):
    return np.array([p.error_bound for p in plans["plans"]],
                    dtype=np.float64).reshape(batch_shape)


def _fast_plans(qparts, kparts, vparts, qcuts, kcuts, method, info, L, S, E, Ev, nrot,
                rotary, local=None):
    """Blocks to rotate and the per-head plans of the whole sequence, or None when
    ``method="auto"`` plans exact for some head.

    ``"fast"``: the plans are one lazy task on the blocks' maxima (it raises
    FastPathError at compute time for a head the fast path cannot serve).
    ``"auto"``: the maxima are computed now (one pass over the blocks, B floats
    per block back; ``local``: the numpy blocks of numpy inputs, read here without
    a round trip) and planned here, to choose the graph.
    """
    import dask
    delayed = dask.delayed
    # a block to rotate where it is used: (block, start, n, rotary). Rotation is O(b·E),
    # cheaper than sending a rotated copy between workers
    qr = [(p, a, nrot, rotary) for p, a in zip(qparts, qcuts)]
    kr = [(p, a, nrot, rotary) for p, a in zip(kparts, kcuts)]
    mx = delayed(_row_max, pure=True)
    bs = info["batch_shape"]
    stats = ([mx(x, bs, "norm") for x in qr], [mx(x, bs, "norm") for x in kr],
             [mx(x, bs, "abs") for x in vparts])
    if method == "fast":
        return qr, kr, delayed(_long_plans, pure=True)(*stats, L, S, E, Ev, info, "fast")
    if local is not None:
        ql, kl, vl = local
        got = ([_row_max((x, a, nrot, rotary), bs, "norm") for x, a in zip(ql, qcuts)],
               [_row_max((x, a, nrot, rotary), bs, "norm") for x, a in zip(kl, kcuts)],
               [_row_max(x, bs, "abs") for x in vl])
    else:
        got = dask.compute(*stats)
    plans = _long_plans(*got, L, S, E, Ev, info, "auto")
    if any(p.method != "fast" for p in plans["plans"]):
        return None
    return qr, kr, plans


def _fast_long(qr, kr, vparts, mparts, qcuts, kcuts, plans, *, batch_shape, Ev, scale, causal,
               rates, workers):
    """The lazy graph of the fast path over blocks; returns lists of (out, lse) delayed
    per query block and a delayed bound array.

    Tasks (each rotates the blocks it reads): one state task per key block (its
    m·(Ev+1) floats per head are all it sends on); a binary tree of additions over
    the key blocks; per query block, causal: the sum of the O(log B) tree nodes
    that cover the blocks before it, plus its own key block under the mask
    (prefix/decay scan with that state); non-causal: the root (all keys), gemm's
    query side.
    """
    import dask
    delayed = dask.delayed
    states = [delayed(_key_block_state, pure=True)(k, v, m, ka, plans, batch_shape, scale,
                                                   workers)
              for k, v, m, ka in zip(kr, vparts, mparts, kcuts)]
    add = delayed(_add_states, pure=True)
    total = delayed(_sum_states, pure=True)
    levels = [states]                      # levels[l][j]: blocks j·2^l .. (j+1)·2^l − 1
    while len(levels[-1]) > 1:
        lv = levels[-1]
        levels.append([add(lv[2 * j], lv[2 * j + 1], rates) for j in range(len(lv) // 2)])
    root = None
    if states:
        nodes, start = [], 0                # the whole range, as full tree nodes
        for lvl in range(len(levels) - 1, -1, -1):
            size = 1 << lvl
            while start + size <= len(states):
                nodes.append(levels[lvl][start >> lvl])
                start += size
        root = nodes[0] if len(nodes) == 1 else total(*nodes, rates=rates)
    query = delayed(_query_block, pure=True, nout=2)
    results = []
    for i, (q, qa) in enumerate(zip(qr, qcuts)):
        if causal:          # aligned blocks: query block i holds the keys of key block i
            cover = [levels[lvl][(i >> lvl) - 1] for lvl in range(len(levels) - 1, -1, -1)
                     if (i >> lvl) & 1]                       # in position order
            prefix = (None if not cover else cover[0] if len(cover) == 1
                      else total(*cover, rates=rates))
            results.append(query(q, kr[i], vparts[i], mparts[i], qa, prefix, plans,
                                 batch_shape, scale, True, Ev, workers))
        else:
            results.append(query(q, None, None, None, qa, root, plans, batch_shape, scale,
                                 False, Ev, workers))
    return results, delayed(_plan_bounds, pure=True)(plans, batch_shape)
