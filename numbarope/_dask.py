"""numbarope on Dask: the same attention, chunk by chunk, on a cluster (optional extra).

Two entry points (``pip install numbarope[dask]``):

* :func:`rope_attention_dask` — many heads / many sequences: query, key, value
  are dask arrays chunked along the leading (batch, head) dims; every chunk runs
  the ordinary :func:`numbarope.rope_attention` (the numba kernels, the per-head
  plan computed on the worker holding the chunk). Returns a lazy dask array
  (and, with ``return_info=True``, a ``dask.delayed`` AttentionInfo).
* :func:`long_sequence_attention` — one long sequence across workers: one task
  per (query block, key block) pair computes ``rope_attention(...,
  return_lse=True, query_offset=...)``, and the partial results of a query
  block are merged by their log-sum-exp in a binary tree.

This module imports dask only inside its functions: ``is_dask`` is cheap and
safe to call without dask installed.
"""

import dataclasses
import numbers

import numpy as np

__all__ = ["is_dask", "rope_attention_dask", "long_sequence_attention", "merge_partials"]

# keywords of rope_attention that plan() does not take (checked here instead)
_CALL_ONLY = ("verify", "return_info", "workers", "return_lse")


def is_dask(*xs):
    """True if any argument is a dask collection (without importing dask)."""
    for x in xs:
        if x is not None and hasattr(x, "__dask_graph__") and \
                type(x).__module__.split(".")[0] == "dask":
            return True
    return False


def _require_dask():
    try:
        import dask  # noqa: F401
        import dask.array  # noqa: F401
    except ImportError as e:          # pragma: no cover - exercised without the extra
        raise ImportError("numbarope on dask arrays needs the dask extra: "
                          "pip install 'numbarope[dask]'") from e


def _meta_shape(x):
    return tuple(int(d) for d in x.shape)


def _check_known_shape(x, name):
    if any(isinstance(d, float) and np.isnan(d) for d in x.shape):
        raise ValueError(f"{name} has unknown chunk sizes {x.shape}; call "
                         f"{name}.compute_chunk_sizes() first")


def _batch_shape(q, k, v, extras, enable_gqa):
    """Broadcast (batch, head) shape, by the rules of rope_attention."""
    qs, ks, vs = q.shape[:-2], k.shape[:-2], v.shape[:-2]
    group = 1
    if enable_gqa:
        if q.ndim < 3 or k.ndim < 3 or v.ndim < 3:
            raise ValueError(f"enable_gqa needs a head axis (-3) on query, key and value; got "
                             f"query {q.shape}, key {k.shape}, value {v.shape}")
        Hq, Hk, Hv = q.shape[-3], k.shape[-3], v.shape[-3]
        if Hk != Hv or Hk == 0 or Hq % Hk:
            raise ValueError(f"enable_gqa: query heads Hq={Hq} must be a multiple of the "
                             f"key/value heads (key {Hk}, value {Hv}, which must agree)")
        group = Hq // Hk
        ks, vs = k.shape[:-3] + (Hq,), v.shape[:-3] + (Hq,)
    shapes = [qs, ks, vs] + [s for _, s in extras]
    try:
        return tuple(np.broadcast_shapes(*shapes)), group
    except ValueError:
        raise ValueError(
            f"leading (batch, head) dims do not broadcast: query {q.shape}, key {k.shape}, "
            f"value {v.shape}" + "".join(f", {n} lead {s}" for n, s in extras)) from None


def _tiny(shape, dtype):
    """A zero-cost zero array of ``shape`` (broadcast view of one element)."""
    return np.broadcast_to(np.zeros((), dtype=dtype), shape)


def _validate(query, key, value, kw):
    """Refuse bad input with rope_attention's own errors, before any graph exists.

    Checks every option, dtypes, the trailing shapes (L, S, E, Ev against bias,
    relative, key_padding_mask, positions, query_offset) and the broadcast of the
    leading dims. Not checkable without computing: NaN/inf inside lazy arrays, and
    ``method="fast"`` refusals that depend on the data's logit radius; those are
    raised by the task on the worker (dask re-raises them on compute).
    """
    import numbarope
    from ._threads import resolve_workers
    verify = kw.get("verify", 0)
    if isinstance(verify, bool) or not isinstance(verify, (int, np.integer)):
        raise TypeError(f"verify must be an int >= 0 (rows checked per head), got {verify!r}")
    if verify < 0:
        raise ValueError(f"verify must be >= 0 (rows checked per head), got {verify}")
    for f in ("return_info", "return_lse"):
        if not isinstance(kw.get(f, False), (bool, np.bool_)):
            raise TypeError(f"{f} must be True or False, got {kw[f]!r}")
    resolve_workers(kw.get("workers"))
    for name, a in (("query", query), ("key", key), ("value", value)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{name}: with dask inputs, pass dask or numpy arrays "
                            f"(got {type(a).__name__})")
        _check_known_shape(a, name)
        if a.ndim < 2:
            raise ValueError(f"{name} must have shape (..., n, features), got shape {a.shape}")
    extras = []
    tails = {"bias": 1, "key_padding_mask": 1, "positions": 1, "relative": 3}
    for name, t in tails.items():
        a = kw.get(name)
        if a is None:
            continue
        if not hasattr(a, "shape"):
            a = np.asarray(a)
            kw[name] = a
        _check_known_shape(a, name)
        if a.ndim < t:
            extras.append((name, ()))      # plan() gives the error below
        else:
            extras.append((name, tuple(a.shape[:a.ndim - t])))
    enable_gqa = kw.get("enable_gqa", False)
    if enable_gqa is not True and enable_gqa is not False and not isinstance(enable_gqa, np.bool_):
        raise TypeError(f"enable_gqa must be True or False, got {enable_gqa!r}")
    batch_shape, group = _batch_shape(query, key, value,
                                      [e for e in extras if e[0] in ("bias", "relative")],
                                      bool(enable_gqa))
    for name, lead in extras:
        if name in ("key_padding_mask", "positions") and lead:
            try:
                ok = np.broadcast_shapes(batch_shape, lead) == batch_shape
            except ValueError:
                ok = False
            if not ok:
                raise ValueError(f"{name} has leading dims {lead} that do not broadcast "
                                 f"to the (batch, head) dims {batch_shape} of query, key "
                                 f"and value; give it shape (..., S)")
    # the trailing rules: plan() on zero-stride zero arrays with unit leading dims
    nl = len(batch_shape)
    ones = (1,) * max(nl, query.ndim - 2)
    qh = ones
    kh = ones
    if enable_gqa:
        qh, kh = ones[:-1] + (group,), ones[:-1] + (1,)
    L, E = query.shape[-2:]
    S = key.shape[-2]
    small = dict((k_, v_) for k_, v_ in kw.items() if k_ not in _CALL_ONLY)
    for name, t in tails.items():
        a = small.get(name)
        if a is None or a.ndim < t:
            continue
        tail = tuple(a.shape[a.ndim - t:])
        if isinstance(a, np.ndarray) and a.ndim == t:
            continue                                # numpy, no lead: the real thing
        if isinstance(a, np.ndarray):
            small[name] = a[(0,) * (a.ndim - t)][None]   # one leading row, real values
        else:
            small[name] = _tiny((1,) + tail, a.dtype)
    numbarope.plan(_tiny(qh + (L, E), query.dtype), _tiny(kh + (S, key.shape[-1]), key.dtype),
                   _tiny(kh + (value.shape[-2], value.shape[-1]), value.dtype), **small)
    return batch_shape, group


def _block(q, k, v, extras, lo, kw):
    """One chunk on a worker: the ordinary rope_attention (numpy in, numpy out)."""
    import numbarope
    kw = dict(kw, **{n: a for n, a in extras.items()})
    res = numbarope.rope_attention(np.asarray(q), np.asarray(k), np.asarray(v),
                                   return_info=True, **kw)
    res = list(res)
    info = res[-1]
    heads = [dataclasses.replace(h, head=tuple(int(a + b) for a, b in zip(lo, h.head)))
             for h in info.heads]
    return tuple(res[:-1]) + (heads,)


def _assemble(batch_shape, eps, nblocks, *head_lists):
    from .planner import AttentionInfo
    heads = sorted((h for hl in head_lists for h in hl), key=lambda h: h.head)
    return AttentionInfo(heads, tuple(batch_shape), eps,
                         extra={"dask_blocks": nblocks})


def rope_attention_dask(query, key, value, **kw):
    """:func:`numbarope.rope_attention` on dask arrays, chunked along the (batch, head) dims.

    Takes the arguments of ``rope_attention``; ``query``, ``key``, ``value`` (and
    optionally ``bias``, ``relative``, ``key_padding_mask``, ``positions``) may be
    dask or numpy arrays. Leading dims broadcast as in ``rope_attention``; the
    chunks of query's leading dims define the tasks (key/value and the per-row
    arrays are broadcast and rechunked to match: broadcast dims are not copied in
    the graph but each task receives its materialised chunk). The last two dims
    (L, E), (S, E), (S, Ev) are rechunked to single chunks: a chunk holds whole
    sequences. With ``enable_gqa`` each chunk of query heads must hold a whole
    number of groups (``Hq/Hkv`` heads); key/value heads are chunked to match.

    Everything that can be checked without the data is checked here, before a
    graph is built, with rope_attention's own errors (options, dtypes, shapes).
    NaN/inf inside lazy arrays and data-dependent ``method="fast"`` refusals
    are raised by the task (dask re-raises the worker's exception on compute).

    Returns
    -------
    out : dask.array.Array, shape batch_shape + (L, Ev)
        Lazy; same values as the in-memory call (each chunk runs the same kernels
        on the same data).
    lse : dask.array.Array, shape batch_shape + (L,), with ``return_lse=True``
    info : dask.delayed.Delayed, with ``return_info=True``
        Computes to the :class:`AttentionInfo` of the whole call (heads indexed
        in ``batch_shape``). Compute it together with ``out``
        (``dask.compute(out, info)``) so that each chunk runs once.
    """
    _require_dask()
    import dask
    import dask.array as da

    import numbarope

    unknown = set(kw) - set(_known_keywords())
    if unknown:   # rope_attention's message (it suggests the right name)
        numbarope.rope_attention(np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)),
                                 **{u: kw[u] for u in unknown})
    kw = dict(kw)
    batch_shape, group = _validate(query, key, value, kw)
    return_info = bool(kw.pop("return_info", False))
    return_lse = bool(kw.pop("return_lse", False))
    from .attention import _validate_options
    eps_f = _validate_options(kw.get("method", "auto"), kw.get("eps", 1e-3), kw.get("degree"),
                              kw.get("approx", "chebyshev"), kw.get("scale"), kw.get("radius"),
                              kw.get("is_causal", False))
    nl = len(batch_shape)
    q = da.asarray(query)
    q = da.broadcast_to(q, batch_shape + q.shape[-2:])
    # chunks of the leading dims: query's (broadcast dims of size 1 -> one chunk)
    q = q.rechunk(q.chunks[:nl] + (-1, -1))
    lead_chunks = q.chunks[:nl]

    def like_q(a, tail, heads=None):
        """Broadcast a to batch_shape (+ tail) and chunk like query's leading dims."""
        a = da.asarray(a)
        shape = batch_shape
        chunks = lead_chunks
        if heads is not None:                     # GQA: Hkv heads, chunks / group
            shape = batch_shape[:-1] + (heads,)
            chunks = lead_chunks[:-1] + (tuple(c // group for c in lead_chunks[-1]),)
        lead = a.shape[:a.ndim - tail]
        a = a.reshape((1,) * (len(shape) - len(lead)) + a.shape) if len(lead) < len(shape) else a
        a = da.broadcast_to(a, shape + a.shape[a.ndim - tail:])
        return a.rechunk(chunks + (-1,) * tail)

    if group > 1:
        if any(c % group for c in lead_chunks[-1]):
            raise ValueError(f"enable_gqa: every chunk of query heads must hold a whole "
                             f"number of groups of {group} heads (Hq/Hkv); query head "
                             f"chunks are {lead_chunks[-1]}: rechunk query's axis -3")
        k = like_q(key, 2, heads=key.shape[-3])
        v = like_q(value, 2, heads=value.shape[-3])
    else:
        k = like_q(key, 2)
        v = like_q(value, 2)
    extras = {}
    for name, t in (("bias", 1), ("key_padding_mask", 1), ("positions", 1), ("relative", 3)):
        a = kw.pop(name, None)
        if a is not None:
            extras[name] = like_q(a, t)
    qd, kd, vd = q.to_delayed(), k.to_delayed(), v.to_delayed()
    ed = {n: a.to_delayed() for n, a in extras.items()}
    starts = [np.concatenate([[0], np.cumsum(c)[:-1]]).astype(int) for c in lead_chunks]
    L, Ev = q.shape[-2], v.shape[-1]
    dtype = np.result_type(query.dtype, key.dtype, value.dtype)
    dtype = np.dtype(np.float32) if dtype == np.float32 else np.dtype(np.float64)
    block = dask.delayed(_block, pure=True)
    outs = np.empty(tuple(len(c) for c in lead_chunks), dtype=object)
    lses = np.empty(outs.shape, dtype=object)
    head_lists = []
    for idx in np.ndindex(*outs.shape):
        lo = tuple(int(starts[d][i]) for d, i in enumerate(idx))
        shp = tuple(int(lead_chunks[d][i]) for d, i in enumerate(idx))
        bidx = idx + (0, 0)
        ex = {n: a[idx + (0,) * (a.ndim - nl)] for n, a in ed.items()}
        r = block(qd[bidx], kd[bidx], vd[bidx], ex, lo,
                  dict(kw, return_lse=return_lse))
        # da.block joins the innermost list levels along the last axes: one level
        # per trailing axis, holding the block alone
        outs[idx] = [[da.from_delayed(r[0], shape=shp + (L, Ev), dtype=dtype)]]
        if return_lse:
            lses[idx] = [da.from_delayed(r[1], shape=shp + (L,), dtype=np.float64)]
        head_lists.append(r[-1])
    out = da.block(_nested(outs))
    res = (out,)
    if return_lse:
        res += (da.block(_nested(lses)),)
    if return_info:
        res += (dask.delayed(_assemble, pure=True)(batch_shape, eps_f, len(head_lists),
                                                    *head_lists),)
    return res[0] if len(res) == 1 else res


def _nested(blocks):
    """An object ndarray of (list-wrapped) blocks as nested lists for da.block."""
    if not isinstance(blocks, np.ndarray):
        return blocks
    if blocks.ndim == 0:
        return blocks[()]
    return [_nested(blocks[i]) for i in range(blocks.shape[0])]


def _known_keywords():
    import inspect

    import numbarope
    sig = inspect.signature(numbarope.rope_attention)
    return [p.name for p in sig.parameters.values()
            if p.kind == p.KEYWORD_ONLY]


# ---------------------------------------------------------------------------
# one long sequence: (query block, key block) pairs merged by log-sum-exp


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
    from .rotary import rotary_tables, rotate
    x = np.asarray(x)
    if rotary is None:
        return np.ascontiguousarray(x, dtype=np.float64)
    c, s = rotary_tables(rotary, n_total, x.shape[-1],
                         positions=np.arange(a, a + x.shape[-2]), seq_len=n_total)
    return rotate(x, rotary, c, s)


def _pair(qb, kb, vb, qa, ka, n_total, rotary, kw):
    """Attention of query rows qa.. against key rows ka.. (global positions)."""
    import numbarope
    qb, kb, vb = np.asarray(qb), np.asarray(kb), np.asarray(vb)
    if rotary is not None:     # rotate at the global positions, as the in-memory call
        qb, kb = _rotated(qb, qa, n_total, rotary), _rotated(kb, ka, n_total, rotary)
    out, lse, info = numbarope.rope_attention(qb, kb, vb, query_offset=int(qa - ka),
                                              return_lse=True, return_info=True, **dict(kw))
    return out.astype(np.float64, copy=False), lse, np.asarray(info.error_bound, float)


def _merge_pairs(*parts):
    """Tree merge of ((out, lse, bound), ...) -> (out, lse, bound)."""
    items = [((o, l), b) for o, l, b in parts]
    bound = np.max(np.stack([b for _, b in items]), axis=0)
    acc = [p for p, _ in items]
    while len(acc) > 1:
        acc = [merge_partials(acc[i], acc[i + 1]) if i + 1 < len(acc) else acc[i]
               for i in range(0, len(acc), 2)]
    return acc[0][0], acc[0][1], bound


def long_sequence_attention(query, key, value, *, query_block, key_block=None, client=None,
                            rotary=None, is_causal=False, scale=None, method="exact",
                            eps=1e-3, precision=None, return_lse=False, return_info=False,
                            workers=None, **unknown):
    """Attention of ONE long sequence over a Dask cluster, by query and key blocks.

    **Exact** (``method="exact"``, or ``"auto"`` when some head needs it): every
    (query block, key block) pair is one task computing ``rope_attention(q_i,
    k_j, v_j, query_offset=start_i − start_j, return_lse=True)`` with the
    ordinary kernels; the partial results of query block i are merged by their
    log-sum-exp, ``out = Σ_j e^{lse_j − lse} out_j``, ``lse = log Σ_j e^{lse_j}``
    (:func:`merge_partials`), in one merge task per query block. With
    ``is_causal`` the key blocks after a query block are not computed at all
    (about half the pairs). Work O(L·S), as in memory.

    **Fast** (``method="fast"``, or ``"auto"`` when every head is fast): the
    polynomial method's separable form (Alman & Song 2025, §4). One task per key
    block forms its key-side state ``(Σ_j ψ(k_j) v_jᵀ, Σ_j ψ(k_j))``, m·(Ev+1)
    floats per head (m = C(E+g, g)); the states are added in a binary tree
    (log₂ B levels for B key blocks); each query block receives, causal, the sum
    of the O(log B) tree nodes covering the blocks before it and computes its
    own block under the mask (the prefix algorithm, started at that state), or,
    non-causal, the root (gemm's query side). Work O((L + S)·m·Ev), as in
    memory. The plan (degree, polynomial, bound) is that of the whole sequence,
    from the blocks' maxima (``s·max‖q‖·max‖k‖``, ``max|v|``): the same
    HeadSpec, polynomial and certified bound as the in-memory call. With
    ``"fast"`` this is a lazy task (a head the fast path cannot serve raises
    :class:`~numbarope.FastPathError` at compute time); ``"auto"`` computes the
    maxima first (one pass, a few floats per block back) to choose the graph.
    The fast causal graph needs aligned blocks (``key_block == query_block``,
    L == S); no bias, W_t or padding here.

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
        its worker).

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
        (the checks of ``rope_attention`` on a small proxy).
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

    import numbarope
    from .attention import _validate_options
    from .rotary import Rotary
    if unknown:
        numbarope.rope_attention(np.zeros((1, 1)), np.zeros((1, 1)), np.zeros((1, 1)),
                                 **unknown)    # raises with rope_attention's message
    for name, b in (("query_block", query_block), ("key_block", key_block)):
        if b is None and name == "key_block":
            continue
        if isinstance(b, bool) or not isinstance(b, numbers.Integral) or b < 1:
            raise ValueError(f"{name} must be an int >= 1 (rows per block), got {b!r}")
    key_block = query_block if key_block is None else key_block
    for f in (return_lse, return_info):
        if not isinstance(f, (bool, np.bool_)):
            raise TypeError(f"return_lse/return_info must be True or False, got {f!r}")
    if rotary is True or rotary is np.True_:
        rotary = Rotary()
    elif rotary is False or rotary is np.False_:
        rotary = None
    kw = dict(is_causal=is_causal, scale=scale, method=method, eps=eps, precision=precision,
              workers=workers)
    for name, a in (("query", query), ("key", key), ("value", value)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{name}: pass a numpy or dask array (got {type(a).__name__})")
        if a.ndim < 2:
            raise ValueError(f"{name} must have shape (..., n, features), got shape {a.shape}")
    L, E = query.shape[-2:]
    S = key.shape[-2]
    # every check rope_attention makes without data: one small pair, full leading dims
    # replaced by ones (their broadcast is checked here)
    lead = [query.shape[:-2], key.shape[:-2], value.shape[:-2]]
    try:
        batch_shape = tuple(np.broadcast_shapes(*lead))
    except ValueError:
        raise ValueError(f"leading (batch, head) dims do not broadcast: query {query.shape}, "
                         f"key {key.shape}, value {value.shape}") from None
    ones = (1,) * len(batch_shape)
    qs, ks = min(L, query_block), min(S, key_block)
    numbarope.plan(_tiny(ones + (qs, E), query.dtype), _tiny(ones + (ks, key.shape[-1]), key.dtype),
                   _tiny(ones + (ks, value.shape[-1]), value.dtype), rotary=rotary,
                   **{k_: v_ for k_, v_ in kw.items() if k_ != "workers"})
    from ._threads import resolve_workers
    resolve_workers(workers)
    if key.shape[-2] != value.shape[-2]:
        raise ValueError(f"value has shape {value.shape}; expected (..., {S}, Ev)")
    eps_f = _validate_options(method, eps, None, "chebyshev", scale, None, is_causal)
    del eps_f
    dtype = np.result_type(query.dtype, key.dtype, value.dtype)
    if precision is None and dtype == np.float32:
        kw["precision"] = "float32"          # the pairs see float64 rotated inputs
    Ev = value.shape[-1]
    nrot = max(L, S)
    if rotary is not None and L != S:
        raise ValueError("long_sequence_attention with rotary needs L == S (self-attention)")
    aligned = not is_causal or (key_block == query_block and L == S)
    if method == "fast" and not aligned:
        raise ValueError(
            f"method='fast' with is_causal needs aligned blocks (key_block == query_block, "
            f"L == S); got query_block={query_block}, key_block={key_block}, L={L}, S={S}: "
            f"omit key_block")

    def blocks(x, size):
        n = x.shape[-2]
        cuts = list(range(0, n, size))
        if isinstance(x, np.ndarray) or not is_dask(x):
            x = np.asarray(x)
            parts = [x[..., a:a + size, :] for a in cuts]
            if client is not None:
                parts = client.scatter(parts)
            else:
                parts = [dask.delayed(p, traverse=False) for p in parts]
            return cuts, parts
        x = x.rechunk(tuple(-1 for _ in x.shape[:-2]) + (size, -1))
        d = x.to_delayed().reshape(-1)
        return cuts, list(d)

    qcuts, qparts = blocks(query, query_block)
    kcuts, kparts = blocks(key, key_block)
    _, vparts = blocks(value, key_block)
    s_val = 1.0 / np.sqrt(E) if scale is None else float(scale)
    outs, lses, bounds = [], [], []
    fast = None
    if method in ("fast", "auto") and L and S and aligned:
        fast = _fast_plans(qparts, kparts, vparts, qcuts, kcuts, method,
                           dict(batch_shape=batch_shape, scale=s_val, causal=bool(is_causal),
                                eps=float(eps), out_unit=2.0 ** -24 if dtype == np.float32
                                else 0.0, compute_dtype="float32"
                                if kw.get("precision") == "float32" else "float64"),
                           L, S, E, Ev, nrot, rotary)
    if fast is not None:
        qr, kr, plans = fast
        results, bound = _fast_long(qr, kr, vparts, plans, batch_shape=batch_shape, Ev=Ev,
                                    scale=s_val, causal=bool(is_causal), workers=workers)
        for qa, (o, lo) in zip(qcuts, results):
            Lb = min(query_block, L - qa)
            outs.append(da.from_delayed(o, shape=batch_shape + (Lb, Ev), dtype=np.float64))
            lses.append(da.from_delayed(lo, shape=batch_shape + (Lb,), dtype=np.float64))
        bounds.append(da.from_delayed(bound, shape=batch_shape, dtype=np.float64))
    else:
        if method == "auto":
            kw["method"] = "exact"        # planned for the whole sequence: exact
        pair = dask.delayed(_pair, pure=True)
        merge = dask.delayed(_merge_pairs, pure=True, nout=3)
        for qa, qp in zip(qcuts, qparts):
            Lb = min(query_block, L - qa)
            parts = []
            for ka, kp, vp in zip(kcuts, kparts, vparts):
                if is_causal and ka > qa + Lb - 1:
                    break                    # every key of this block is after every query
                parts.append(pair(qp, kp, vp, qa, ka, nrot, rotary, kw))
            if not parts:                    # S == 0
                o = dask.delayed(np.zeros)(batch_shape + (Lb, Ev))
                lo = dask.delayed(np.full)(batch_shape + (Lb,), -np.inf)
                bo = dask.delayed(np.zeros)(batch_shape)
            else:
                o, lo, bo = merge(*parts)
            outs.append(da.from_delayed(o, shape=batch_shape + (Lb, Ev), dtype=np.float64))
            lses.append(da.from_delayed(lo, shape=batch_shape + (Lb,), dtype=np.float64))
            bounds.append(da.from_delayed(bo, shape=batch_shape, dtype=np.float64))
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
    call's) of rotated q or k (``kind="norm"``, ``xr`` = (block, start, n, rotary)),
    or max|v| (``kind="abs"``, ``xr`` the block)."""
    from .exact import row_norms
    x = _flat(_rotated(*xr) if kind == "norm" else xr, batch_shape)
    if kind == "norm":
        return row_norms(np.ascontiguousarray(x)).max(axis=1, initial=0.0)
    return np.abs(x).max(axis=(1, 2), initial=0.0)


def _long_plans(qn, kn, vm, n, S, E, Ev, info, method):
    """Per head the plan of the whole sequence from its block statistics (maxima).

    The same HeadSpec as the in-memory call's (radius s·max‖q‖·max‖k‖, max|v|), so
    the same polynomial and certified bound; ``method="fast"`` raises
    :class:`~numbarope.FastPathError` for a head the fast path cannot serve.
    """
    from .attention import _value_scale, separable_head_spec
    from .planner import plan_head
    qn = np.max(np.stack(qn), axis=0)
    kn = np.max(np.stack(kn), axis=0)
    vm = np.max(np.stack(vm), axis=0)
    batch_shape = info["batch_shape"]
    plans = []
    for b in range(qn.size):
        head = tuple(int(i) for i in np.unravel_index(b, batch_shape)) if batch_shape else ()
        with np.errstate(over="ignore"):
            R = info["scale"] * float(qn[b]) * float(kn[b])
        h = separable_head_spec(head, n, S, E, Ev, R, float(vm[b]), info["causal"],
                                info["compute_dtype"], info["out_unit"])
        plans.append(plan_head(h, method=method, eps=info["eps"], degree=None,
                               approx="chebyshev"))
    # values above 2^1000 are scaled by a power of 2 (exact), as the in-memory call does
    factors = [_value_scale(None, vmax=float(x)) for x in vm.reshape(-1)]
    return {"plans": plans, "factors": factors}


def _key_block_state(kr, vb, plans, batch_shape, scale, workers):
    """Key-side states (S, s) of one key block, one per head: m·(Ev+1) floats each."""
    from .fast import key_side_state
    k, v = _flat(_rotated(*kr), batch_shape), _flat(vb, batch_shape)
    P, F = plans["plans"], plans["factors"]
    return [key_side_state(k[b], v[b].astype(np.float64) * F[b], scale, P[b].coef, workers)
            for b in range(len(P))]


def _add_states(a, b):
    """Sum of two lists of per-head states (a node of the tree reduction)."""
    return [(sa + sb, ta + tb) for (sa, ta), (sb, tb) in zip(a, b)]


def _sum_states(*nodes):
    """Sum of O(log B) tree nodes: the states of all key blocks before a query block."""
    acc = nodes[0]
    for x in nodes[1:]:
        acc = _add_states(acc, x)
    return acc


def _query_block(qr, kr, vb, state, plans, batch_shape, scale, causal, Ev, workers):
    """Output rows of one query block from the combined key-side state (and, causal, its
    own key block under the mask). Returns ``(out, lse)``, heads in batch_shape."""
    from .fast import fast_separable
    q = _flat(_rotated(*qr), batch_shape)
    B, Lb, E = q.shape
    if causal:
        k, v = _flat(_rotated(*kr), batch_shape), _flat(vb, batch_shape)
    P, F = plans["plans"], plans["factors"]
    out = np.empty((B, Lb, Ev))
    lse = np.empty((B, Lb))
    for b in range(B):
        f = F[b]
        st = None if state is None else state[b]
        if causal:
            o, den = fast_separable(q[b], k[b], v[b].astype(np.float64) * f, scale,
                                    P[b].coef, causal=True, workers=workers, state=st)
        else:
            o, den = fast_separable(q[b], np.zeros((0, E)), np.zeros((0, Ev)), scale,
                                    P[b].coef, workers=workers, state=st)
        out[b] = o / f if f != 1.0 else o
        with np.errstate(divide="ignore"):
            lse[b] = np.where(den > 0, np.log(np.where(den > 0, den, 1.0)), -np.inf)
    return (out.reshape(tuple(batch_shape) + (Lb, Ev)),
            lse.reshape(tuple(batch_shape) + (Lb,)))


def _plan_bounds(plans, batch_shape):
    return np.array([p.error_bound for p in plans["plans"]],
                    dtype=np.float64).reshape(batch_shape)


def _fast_plans(qparts, kparts, vparts, qcuts, kcuts, method, info, L, S, E, Ev, nrot,
                rotary):
    """Rotated blocks and the per-head plans of the whole sequence, or None when
    ``method="auto"`` plans exact for some head.

    ``"fast"``: the plans are one lazy task on the blocks' maxima (it raises
    FastPathError at compute time for a head the fast path cannot serve).
    ``"auto"``: the maxima are computed now (one pass over the blocks, B floats
    per block back) and planned here, to choose the graph.
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
    plans = _long_plans(*dask.compute(*stats), L, S, E, Ev, info, "auto")
    if any(p.method != "fast" for p in plans["plans"]):
        return None
    return qr, kr, plans


def _fast_long(qr, kr, vparts, plans, *, batch_shape, Ev, scale, causal, workers):
    """The lazy graph of the fast path over blocks; returns lists of (out, lse) delayed
    per query block and a delayed bound array.

    Tasks (each rotates the blocks it reads): one state task per key block (its m·(Ev+1) floats
    per head are all it sends on); a binary tree of additions over the key blocks;
    per query block, causal: the sum of the O(log B) tree nodes that cover the
    blocks before it, plus its own key block under the mask (prefix algorithm with
    that state as its start); non-causal: the root (all keys), gemm's query side.
    """
    import dask
    delayed = dask.delayed
    states = [delayed(_key_block_state, pure=True)(k, v, plans, batch_shape, scale, workers)
              for k, v in zip(kr, vparts)]
    levels = [states]                      # levels[l][j]: blocks j·2^l .. (j+1)·2^l − 1
    while len(levels[-1]) > 1:
        lv = levels[-1]
        levels.append([delayed(_add_states, pure=True)(lv[2 * j], lv[2 * j + 1])
                       for j in range(len(lv) // 2)])
    root = None
    if states:
        nodes, start = [], 0                # the whole range, as full tree nodes
        for lvl in range(len(levels) - 1, -1, -1):
            size = 1 << lvl
            while start + size <= len(states):
                nodes.append(levels[lvl][start >> lvl])
                start += size
        root = nodes[0] if len(nodes) == 1 else delayed(_sum_states, pure=True)(*nodes)
    query = delayed(_query_block, pure=True, nout=2)
    results = []
    for i, q in enumerate(qr):
        if causal:          # aligned blocks: query block i holds the keys of key block i
            cover = [levels[lvl][(i >> lvl) - 1] for lvl in range(len(levels))
                     if (i >> lvl) & 1]
            prefix = (None if not cover else cover[0] if len(cover) == 1
                      else delayed(_sum_states, pure=True)(*cover))
            results.append(query(q, kr[i], vparts[i], prefix, plans, batch_shape, scale,
                                 True, Ev, workers))
        else:
            results.append(query(q, None, None, root, plans, batch_shape, scale, False, Ev,
                                 workers))
    return results, delayed(_plan_bounds, pure=True)(plans, batch_shape)
