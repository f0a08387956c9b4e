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
import uuid
import warnings

import numpy as np

__all__ = ["is_dask", "rope_attention_dask"]

#: More (query block, key block) pairs than this draws a warning: the scheduler's cost
#: per task (~1 ms) would exceed the work of blocks that small.
_MANY_PAIRS = 20000

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
    from .attention import check_per_key_lead
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
    from .bias import RelativeBias
    for name, t in tails.items():
        a = kw.get(name)
        if a is None or isinstance(a, RelativeBias):
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
            check_per_key_lead(lead + (key.shape[-2],), batch_shape, name)
    # the commonest shape errors, with the caller's shapes (plan() below sees stand-ins)
    if key.shape[-1] != query.shape[-1]:
        raise ValueError(f"key has shape {tuple(key.shape)}; expected (..., S, "
                         f"{query.shape[-1]}): the head_dim of query {tuple(query.shape)}")
    if value.shape[-2] != key.shape[-2]:
        raise ValueError(f"value has shape {tuple(value.shape)}; expected (..., "
                         f"{key.shape[-2]}, Ev): one row per key of key {tuple(key.shape)}")
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
        if a is None or isinstance(a, RelativeBias) or a.ndim < t:
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


def _split_per_head(query, key, kw):
    """Take a typed bias and a per-head radius out of ``kw`` for chunking.

    A structure without per-head parameters, or a Decay/ALiBi with per-head rates
    (sliced per chunk of heads), stays a structure (the planner keeps its algorithm);
    any other per-head structure becomes its array over the offsets. The proxy
    validation sees one head's structure and the largest radius. Returns
    ``(structure or None, radius array or None)``."""
    from .attention import _query_offset
    from .bias import Decay, RelativeBias
    structure = radius = None
    b = kw.get("bias")
    if isinstance(b, RelativeBias):
        if b.heads is not None and not isinstance(b, Decay):
            L, S = query.shape[-2], key.shape[-2]
            off = _query_offset(kw.get("query_offset"), kw.get("causal_alignment", "top_left"),
                                L, S)
            kw["bias"] = b.values(L, S, off)
        else:
            structure = b
            if b.heads is not None:
                kw["bias"] = b._replace(float(np.asarray(b.rate).reshape(-1)[0]), b.causal)
    r = kw.get("radius")
    if r is not None and np.ndim(r) > 0:
        radius = np.asarray(r, dtype=np.float64)
        kw["radius"] = float(np.max(radius, initial=0.0)) if radius.size else 0.0
    return structure, radius


def _chunk_structure(structure, sl, batch_shape):
    """The structure for one chunk of heads (per-head rates sliced on the head axis)."""
    if structure.heads is None or structure.heads == 1:
        return structure
    rate = np.asarray(structure.rate)
    return structure._replace(rate[sl[-1]], structure.causal)


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
    structure, radius = _split_per_head(query, key, kw)
    batch_shape, group = _validate(query, key, value, kw)
    if structure is not None:
        kw.pop("bias")
        if structure._lead and not _fits_batch(structure._lead, batch_shape):
            raise ValueError(f"bias {structure!r} has per-head parameters of shape "
                             f"{structure._lead}, which do not broadcast to the batch (head) "
                             f"dims {batch_shape}")
    if radius is not None:
        if not _fits_batch(radius.shape, batch_shape):
            raise ValueError(f"radius has shape {radius.shape}, which does not broadcast to "
                             f"the batch (head) dims {batch_shape}; give one radius per head "
                             f"or a scalar")
        radius = np.broadcast_to(radius, batch_shape)
        kw.pop("radius")
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
        ckw = dict(kw, return_lse=return_lse)
        sl = tuple(slice(a, a + b) for a, b in zip(lo, shp))
        if structure is not None:
            ckw["bias"] = _chunk_structure(structure, sl, batch_shape)
        if radius is not None:
            ckw["radius"] = np.ascontiguousarray(radius[sl])
        r = block(qd[bidx], kd[bidx], vd[bidx], ex, lo, ckw)
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


