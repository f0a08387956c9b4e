"""numbarope on Dask: many heads or sequences, chunk by chunk, on a cluster (optional extra).

:func:`rope_attention_dask` (``pip install numbarope[dask]``; what
:func:`numbarope.rope_attention` hands dask inputs to): query, key, value are dask
arrays chunked along the leading (batch, head) dims; every chunk is one task running
the pipeline's call (:func:`numbarope._pipeline.attention`: the numba kernels, the
per-head plan computed on the worker holding the chunk). Returns a lazy dask array
(and, with ``return_info=True``, a ``dask.delayed`` AttentionInfo).

One long sequence across workers is :mod:`numbarope.backends.long_sequence`.

Everything that can be checked without the data is checked before a graph exists,
through the pipeline's validators (:func:`numbarope._pipeline.inputs.check_shapes`
on the shapes, ``validate_options`` and friends on the options), with
rope_attention's own messages. This module imports dask only inside its functions:
``import numbarope`` works without dask, and :func:`is_dask`
(:func:`numbarope._runtime.interop.is_dask`) is cheap and safe without it.
"""

import dataclasses

import numpy as np

from .._pipeline import attention
from .._pipeline.inputs import (KNOWN_KEYWORDS, _as_positions, _typed_bias, as_float_array,
                                as_key_mask, as_rotary, check_shapes, query_offset_of,
                                validate_flag, validate_options, validate_precision)
from .._pipeline.report import AttentionInfo
from .._runtime.interop import is_dask, unexpected_keywords
from .._runtime.threads import resolve_workers
from ..bias import Decay, RelativeBias, Structure

__all__ = ["is_dask", "rope_attention_dask"]

#: Options of the pipeline's call (:func:`numbarope._pipeline.attention`) and their
#: defaults, those of :func:`numbarope.rope_attention`; every other keyword of
#: rope_attention describes the arrays (make_problem's).
_OPTIONS = dict(method="auto", eps=1e-3, degree=None, approx="chebyshev", radius=None,
                verify=0, workers=None, return_lse=False, return_info=False)

#: Arrays that may come lazy, and the trailing dims that are not (batch, head) dims.
_TAILS = {"bias": 1, "key_padding_mask": 1, "positions": 1, "relative": 3}


def _require_dask():
    try:
        import dask  # noqa: F401
        import dask.array  # noqa: F401
    except ImportError as e:          # pragma: no cover - exercised without the extra
        raise ImportError("numbarope on dask arrays needs the dask extra: "
                          "pip install 'numbarope[dask]'") from e


def _fits_batch(lead, batch_shape):
    """Whether leading dims broadcast to the batch dims without enlarging them."""
    try:
        return tuple(np.broadcast_shapes(tuple(lead), tuple(batch_shape))) == tuple(batch_shape)
    except ValueError:
        return False


def _check_known_shape(x, name):
    if any(isinstance(d, float) and np.isnan(d) for d in x.shape):
        raise ValueError(f"{name} has unknown chunk sizes {x.shape}; call "
                         f"{name}.compute_chunk_sizes() first")


def _check_dtype(dtype, name):
    """rope_attention's dtype errors for an array whose values are not read here."""
    as_float_array(np.empty(0, dtype=dtype), name)


def _as_rotary(rotary, E):
    """``rotary=`` as rope_attention reads it: True is ``Rotary()``, False is None; a
    Rotary is checked against the head_dim E. Raises rope_attention's errors."""
    rotary = as_rotary(rotary)
    if rotary is not None:
        rotary.rotary_dim(E)
    return rotary


def _check_verify(verify):
    if isinstance(verify, bool) or not isinstance(verify, (int, np.integer)):
        raise TypeError(f"verify must be an int >= 0 (rows checked per head), got {verify!r}")
    if verify < 0:
        raise ValueError(f"verify must be >= 0 (rows checked per head), got {verify}")


def _check_qkv(query, key, value):
    """query, key, value: arrays (dask or numpy) of known shape and a float dtype."""
    for name, a in (("query", query), ("key", key), ("value", value)):
        if not hasattr(a, "shape") or not hasattr(a, "dtype"):
            raise TypeError(f"{name}: with dask inputs, pass dask or numpy arrays "
                            f"(got {type(a).__name__})")
        _check_known_shape(a, name)
        _check_dtype(a.dtype, name)


def _validate(query, key, value, opts, arrays, structure):
    """Refuse bad input with rope_attention's own errors, before any graph exists.

    Checks every option (``validate_options``, ``validate_precision``,
    ``validate_flag``, ``resolve_workers``), the dtypes, ``rotary``, the shapes of
    every array (:func:`~numbarope._pipeline.inputs.check_shapes`: trailing dims,
    the broadcast of the leading dims, per-key arrays), a typed bias against the
    sizes, and the values of the small numpy per-key arrays. Not checkable without
    computing: NaN/inf inside lazy arrays, and ``method="fast"`` refusals that
    depend on the data's logit radius; those are raised by the task on the worker
    (dask re-raises them on compute). Returns ``(Shapes, eps as a float)``.
    """
    _check_verify(opts["verify"])
    validate_flag(opts["return_info"], "return_info")
    validate_flag(opts["return_lse"], "return_lse")
    resolve_workers(opts["workers"])
    eps_f = validate_options(opts["method"], opts["eps"], opts["degree"], opts["approx"],
                             arrays.get("scale"), opts["radius"],
                             arrays.get("is_causal", False))
    validate_precision(arrays.get("precision"))
    validate_flag(arrays.get("enable_gqa", False), "enable_gqa")
    shapes = {}
    for name in _TAILS:
        a = arrays.get(name)
        if a is None or isinstance(a, Structure):
            continue
        if not hasattr(a, "shape"):
            a = arrays[name] = np.asarray(a)
        _check_known_shape(a, name)
        if name in ("bias", "relative"):
            _check_dtype(a.dtype, name)
        shapes[name] = tuple(a.shape)
    sh = check_shapes(query.shape, key.shape, value.shape,
                      enable_gqa=bool(arrays.get("enable_gqa", False)),
                      query_offset=arrays.get("query_offset"),
                      causal_alignment=arrays.get("causal_alignment", "top_left"), **shapes)
    rotary = arrays.get("rotary")
    if rotary is not None and arrays.get("relative") is not None:
        raise ValueError("rotary and relative are exclusive: pass a rotary embedding "
                         "OR general relative matrices (rotary_relative_matrices gives "
                         "the matrices of a rotary embedding)")
    rotary = _as_rotary(rotary, sh.E)
    kpm = arrays.get("key_padding_mask")
    if kpm is not None:      # numpy: its values (S per row); dask: its dtype
        as_key_mask(kpm if isinstance(kpm, np.ndarray) else np.empty((0, sh.S), kpm.dtype),
                    sh.S)
    pos = arrays.get("positions")
    if pos is not None:
        _as_positions(pos if isinstance(pos, np.ndarray) else np.empty((0, sh.S), pos.dtype),
                      sh.S, sh.offset, sh.L, rotary)
    if structure is not None:       # one head's structure: the causal form, its sizes
        _typed_bias(structure.select(0), bool(arrays.get("is_causal", False)), sh.L, sh.S,
                    sh.offset)
        if structure._lead and not _fits_batch(structure._lead, sh.batch_shape):
            raise ValueError(f"bias {structure!r} has per-head parameters of shape "
                             f"{structure._lead}, which do not broadcast to the batch (head) "
                             f"dims {sh.batch_shape}")
    return sh, eps_f


def _split_structure(query, key, arrays):
    """Take a typed bias out of the keywords for chunking.

    A structure without per-head parameters, or a Decay/ALiBi with per-head rates
    (sliced per chunk of heads), stays a structure (the planner keeps its algorithm):
    returned and removed from ``arrays`` (each chunk gets its own). Any other per-head
    structure becomes its array over the offsets in ``arrays`` (an array bias, chunked
    like query); None is returned then."""
    structure = None
    b = arrays.get("bias")
    if isinstance(b, Structure):
        if isinstance(b, RelativeBias) and b.heads is not None and not isinstance(b, Decay) \
                and query.ndim >= 2 and key.ndim >= 2:         # (else check_shapes refuses)
            L, S = query.shape[-2], key.shape[-2]
            off = query_offset_of(arrays.get("query_offset"),
                                  arrays.get("causal_alignment", "top_left"), L, S)
            arrays["bias"] = b.values(L, S, off)
        else:
            structure = arrays.pop("bias")
    return structure


def _chunk_structure(structure, sl):
    """The structure of one chunk of heads: per-head rates sliced on the batch axes they
    have (aligned to the right; axes of size 1 are shared)."""
    if structure.heads is None:
        return structure
    rate = np.asarray(structure.rate)
    idx = tuple(slice(None) if n == 1 else s for n, s in zip(rate.shape, sl[-rate.ndim:]))
    return structure._replace(rate[idx], structure.causal)


def _block(q, k, v, extras, lo, opts, arrays):
    """One chunk on a worker: the pipeline's call (numpy in, numpy out); its heads'
    reports re-indexed by the chunk's start ``lo`` in the batch dims."""
    opts = dict(opts, return_info=True, workers=resolve_workers(opts["workers"]))
    res = attention(np.asarray(q), np.asarray(k), np.asarray(v), **opts,
                    **dict(arrays, **extras))
    info = res[-1]
    heads = [dataclasses.replace(h, head=tuple(int(a + b) for a, b in zip(lo, h.head)))
             for h in info.heads]
    return tuple(res[:-1]) + (heads,)


def _assemble(batch_shape, eps, nblocks, *head_lists):
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
    A typed bias with per-head rates (:class:`~numbarope.bias.Decay`,
    :class:`~numbarope.bias.ALiBi`) and a per-head ``radius`` are sliced per chunk
    of heads; any other per-head structure is sent as its array over the offsets.

    Each chunk is one task calling :func:`numbarope._pipeline.attention` (what
    ``rope_attention`` calls after checking the options) on its numpy blocks.
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
        Computes to the :class:`~numbarope.AttentionInfo` of the whole call (heads
        indexed in ``batch_shape``). Compute it together with ``out``
        (``dask.compute(out, info)``) so that each chunk runs once.

    Raises
    ------
    TypeError, ValueError
        As :func:`numbarope.rope_attention`, before any task is scheduled (an
        unknown keyword: rope_attention's message, with the right name where known).
    """
    _require_dask()
    import dask
    import dask.array as da

    unknown = [u for u in kw if u not in KNOWN_KEYWORDS]
    if unknown:     # rope_attention's message (it suggests the right name)
        raise unexpected_keywords("rope_attention", {u: kw[u] for u in unknown},
                                  KNOWN_KEYWORDS)
    opts = {k_: kw.get(k_, d) for k_, d in _OPTIONS.items()}
    arrays = {k_: v_ for k_, v_ in kw.items() if k_ not in _OPTIONS}
    _check_qkv(query, key, value)
    structure = _split_structure(query, key, arrays)
    sh, eps_f = _validate(query, key, value, opts, arrays, structure)
    batch_shape, group = sh.batch_shape, sh.group
    radius = None
    if opts["radius"] is not None and np.ndim(opts["radius"]) > 0:   # per head: sliced
        radius = np.asarray(opts["radius"], dtype=np.float64)
        if not _fits_batch(radius.shape, batch_shape):
            raise ValueError(f"radius has shape {radius.shape}, which does not broadcast to "
                             f"the batch (head) dims {batch_shape}; give one radius per head "
                             f"or a scalar")
        radius = np.broadcast_to(radius, batch_shape)
    return_info = bool(opts.pop("return_info"))
    opts["return_lse"] = return_lse = bool(opts["return_lse"])
    opts["eps"] = eps_f
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
    for name, t in _TAILS.items():
        a = arrays.pop(name, None)
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
        copts, carrays = dict(opts), dict(arrays)
        sl = tuple(slice(a, a + b) for a, b in zip(lo, shp))
        if structure is not None:
            carrays["bias"] = _chunk_structure(structure, sl)
        if radius is not None:
            copts["radius"] = np.ascontiguousarray(radius[sl])
        r = block(qd[bidx], kd[bidx], vd[bidx], ex, lo, copts, carrays)
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
