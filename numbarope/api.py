"""The public API: :func:`rope_attention` and :func:`plan`.

Thin wrappers: they check the options, hand the arrays to the pipeline
(:mod:`numbarope._pipeline`: inputs → heads → plan → run → report) and package
the result (numpy or torch, the row log-sum-exp, the :class:`AttentionInfo`).
"""

from __future__ import annotations

from typing import Any, Literal

import numpy as np

from ._pipeline import AttentionInfo, attention, make_problem, plan_problem
from ._pipeline.inputs import (KNOWN_KEYWORDS, packed_arguments, validate_flag,
                               validate_options,
                               validate_softcap,
                               validate_precision)
from ._runtime.interop import is_dask, requires_grad, unexpected_keywords
from ._runtime.threads import resolve_workers
from .rotary import Rotary

__all__ = ["rope_attention", "plan"]


_COMMON_DOC = """
    Parameters
    ----------
    query : (..., L, E) array_like of float32 or float64
        Queries (L = n for self-attention); leading (batch, head) dims broadcast
        with those of key, value, relative and bias. torch CPU tensors are
        accepted (float16 and bfloat16 too: computed as float32 inputs, returned in
        their dtype, the final rounding in ``info.error_bound``); when any of
        query, key, value is a torch tensor, the result is a torch tensor of the dtype torch
        promotes the three to (``torch.promote_types``, numpy inputs taken by their dtype: a float16
        tensor with float32 arrays gives float32), with that dtype's rounding
        in the bound; differentiable when one requires grad (README "Gradients":
        exact heads by FlashAttention-2's backward, fast heads by their algorithm's
        certified fast backward, bounded in ``info.gradient_bound`` after the backward;
        ``method="auto"`` then weighs forward + backward). Objects with ``__dlpack__``
        or ``__array__`` are read as numpy arrays. Dask arrays (chunked along the
        leading dims) give a lazy dask array, each chunk computed by this function
        on a worker (``pip install "numbarope[dask]"``; README, "Dask").
    key : (..., S, E) array_like of float32 or float64
        Keys (S = n for self-attention), at positions 0 .. S−1.
    value : (..., S, Ev) array_like of float32 or float64
    rotary : Rotary or True, optional
        Rotary embedding applied to the keys at positions 0 .. S−1 and the queries
        at ``query_offset`` .. ``query_offset + L − 1`` (``True`` means
        ``Rotary()``). Exclusive with ``relative``. RoPE scalings that depend on
        the sequence length (dynamic NTK, LongRoPE) use one length for the whole
        call, its largest position + 1 (queries and keys alike), as transformers
        does for the positions it is given.
    relative : (..., L+S−1, E, E) array_like of float, optional
        General relative-position matrices, ``relative[t + n − 1] = W_t`` for
        offset ``t = i − j`` (Alman & Song 2025, §1); rectangular:
        ``relative[t − query_offset + S − 1] = W_t``, ``t = i + query_offset − j``.
    bias : (..., L+S−1) array_like of float or bool, optional
        Relative bias ``bias[t + n − 1] = b_t`` added to the logits (rectangular:
        ``bias[t − query_offset + S − 1]``); ``-inf``
        masks (see :mod:`numbarope.bias` for causal, window, ALiBi builders).
        A boolean array is a mask with torch SDPA's meaning: True = the pair
        takes part (bias 0), False = masked (−inf). Any finite magnitude is
        exact: softmax is invariant to a constant per row, so each row's bias
        is shifted by its largest visible value (``finfo.min`` used as a mask
        behaves like −inf).
    is_causal : bool, optional
        Mask keys after the query's position (j > i + query_offset); with the
        default alignment this is torch SDPA's ``is_causal`` (top-left).
    key_padding_mask : (..., S) array_like of bool, optional
        True = a real key that takes part, False = padding (torch's
        ``key_padding_mask`` inverted to "take part", as SDPA's boolean masks;
        HF's ``attention_mask`` of a padded batch, given as ``(B, 1, S)`` next to
        ``(B, H, L, E)`` queries: an array with fewer leading dims than the
        batch dims, not shared by all heads, is refused rather than read per
        head). Rows that see no real key return 0. Padded keys enter neither
        the per-row bias shift nor the logit radius nor max|value|. On the fast
        path the padded keys take no part (removed, or zero rows of the FFT's
        right-hand side): the Toeplitz structure is kept.
    cu_seqlens : (N+1,) array_like of int, optional
        Packed sequences (flash-attn's varlen ``cu_seqlens``): ``[0, n₁, n₁+n₂, …,
        S]``, the keys (and queries at the same positions) of N sequences laid end to
        end; a query sees only the keys of its own sequence, causally with
        ``is_causal=True``. Shorthand for ``bias=numbarope.bias.Packed(cu_seqlens,
        is_causal=is_causal)``, and with ``rotary`` the positions restart at every
        sequence (``positions=`` overrides). Exact and fast (each sequence by the
        gemm or prefix algorithm); exclusive with ``bias=``.
    positions : (..., S) array_like of int or float, optional
        Positions of the keys for the rotary angles (default 0 .. S−1; e.g. HF
        ``position_ids`` of a left-padded batch); query i takes the position of
        key ``i + query_offset``. Only with ``rotary``. The causal mask and a
        relative bias stay index based. RoPE scalings that depend on the
        sequence length (dynamic NTK, LongRoPE) use the largest position of the
        whole call plus one, as transformers does for a batch.
    query_offset : int, optional
        Position of query 0 (keys are at 0 .. S−1; negative: queries before the
        first key, which see no key when causal); query i is at
        ``i + query_offset`` for the causal mask and the rotary angle. Default 0,
        or S − L with ``causal_alignment="bottom_right"``. Rectangular problems
        (L ≠ S or an offset) run on every path (the fast path's Toeplitz
        products are L × S).
    causal_alignment : {"top_left", "bottom_right"}, optional
        ``"top_left"`` (default, torch SDPA): query i at position i;
        ``"bottom_right"`` (decoding with a key/value cache, HF, flash-attn): the
        last query at the last key's position. L = 1, S = 4, causal: top-left
        attends key 0 only, bottom-right all four.
    scale : float, optional
        Logit scale s > 0; default ``1/sqrt(E)`` (torch SDPA). The paper uses 1/E.
    method : {"auto", "exact", "fast"}, optional
        ``"exact"``: streaming exact kernel. ``"fast"``: polynomial method +
        Toeplitz/FFT, refused (``ValueError``, nothing computed) where ``eps``
        needs a degree or memory beyond the limits. ``"auto"`` (default): per head,
        the cheaper by predicted time of the two that meet ``eps``.
    eps : float in (0, 1), optional
        Tolerated error of the fast path, relative to ``max|value|`` of the head:
        ``max|out − exact| <= eps · max|value|`` (default 1e-3).
    degree : int, optional
        Polynomial degree to use instead of choosing it from ``eps``, on the
        heads the fast path computes (``method="fast"``, or ``"auto"`` where it
        picks fast). With ``method="exact"`` it would have no effect and is
        refused (``ValueError``) rather than ignored.
    approx : {"chebyshev", "taylor"}, optional
        Approximant of exp (default Chebyshev, far better at equal degree).
    radius : float or array_like of float, optional
        A caller-known bound ``R >= max |s·q_iᵀW_t k_j|`` per head (broadcast to the
        batch dims); default: ``s·max‖q‖·max_t‖W_t‖₂·max‖k‖``. Positions and bias
        do not enter R (bias is exact in the algorithm). A radius below the true
        one voids the certificate of the fast path (the exact path's bound always
        uses the computed radius): one below a logit of the call's diagonal or of a
        sample of its visible pairs (evenly spaced rows and keys, the largest norms)
        is refused (``ValueError``); ``verify=`` checks rows beyond that sample.
    enable_gqa : bool, optional
        Grouped-query / multi-query attention, as torch SDPA: query has Hq heads
        on axis -3, key and value Hkv with Hq % Hkv == 0; query head h reads
        key/value head ``h // (Hq/Hkv)``.
    precision : {None, "float32", "float64"}, optional
        Compute precision of the exact path (logits, exp, the value product;
        the softmax state is always float64). None (default): float32 when all
        of query, key and value are float32 (torch's speed; its rounding,
        typically ~1e-6 relative, is in ``info.error_bound``), else float64.
        The fast path always computes in float64.
"""


def rope_attention(query: Any, key: Any, value: Any, *, rotary: Rotary | bool | None = None,
                   relative: Any = None, bias: Any = None, is_causal: bool = False,
                   scale: float | None = None,
                   method: Literal["auto", "exact", "fast"] = "auto", eps: float = 1e-3,
                   degree: int | None = None,
                   approx: Literal["chebyshev", "taylor"] = "chebyshev",
                   radius: Any = None, verify: int = 0, return_info: bool = False,
                   precision: Literal["float32", "float64"] | None = None,
                   workers: int | None = None, enable_gqa: bool = False,
                   query_offset: int | None = None,
                   causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
                   key_padding_mask: Any = None, positions: Any = None,
                   return_lse: bool = False, softcap: float | None = None,
                   cu_seqlens: Any = None, **unknown: Any) -> Any:
    """RoPE / relative-position softmax attention, exact or certified fast.

    ``A[i, j] = exp(s·q_iᵀ W_{i−j} k_j + b_{i−j})``, ``out = D⁻¹ A V`` with
    ``D = diag(A·1)`` (Alman & Song 2025, eq. (1); rotary gives ``W_t = R_{−t}``,
    Su et al. 2024). Rows whose every key is masked return 0 (as torch >= 2.5).
    {common}
    verify : int, optional
        For every head computed by the fast path, compute ``verify`` random rows
        exactly (O(verify·n·E²)) and report the observed max error in
        ``info.observed_error`` beside the bound.
    return_info : bool, optional
        Also return an :class:`AttentionInfo` (per head: method, algorithm,
        degree, features, logit radius, certified error bound, predicted times).
    return_lse : bool, optional
        Also return the row log-sum-exp (see Returns), to merge partial results.
    softcap : float > 0, optional
        Logit soft-capping (Gemma 2, Grok): each logit ``x = s·q_iᵀW k_j`` becomes
        ``c·tanh(x/c)`` before the bias is added. Exact path, and the fast path:
        its polynomial approximates ``exp(c·tanh(x/c))`` on ``[-R, R]`` with the
        same certificate (:func:`numbarope.exp_approximation` with ``softcap=``),
        so every weight is within ``1 ± δ`` of the capped one and the bound below
        holds unchanged. Differentiable through the exact backward
        (``d/dx c·tanh(x/c) = 1 − tanh²(x/c)``). The error bound adds
        ``6·c·u`` per logit (u the compute dtype's unit roundoff; libm's tanh is
        taken to be within 4 ulp, which glibc's is).
    workers : int, optional
        Threads used by the kernels, BLAS and scipy.fft, with scipy.fft's
        meaning: None (default) all cores or what :func:`numbarope.set_workers`
        set; a negative count is counted from ``os.cpu_count()`` (-1: all cores).
        A count above the cores available to the process is accepted, as
        scipy.fft accepts it, and clamped to those cores (numba's thread pool
        has no more; results do not depend on the count).

    Returns
    -------
    out : (..., L, Ev) ndarray, or torch.Tensor for torch inputs
        The promoted dtype of query, key and value: float32 if all are float32,
        else float64 (numpy); for torch tensors the promoted torch dtype
        (float16/bfloat16 included). Compute precision: see ``precision``.
    lse : (..., L) ndarray of float64, or a float64 torch.Tensor for torch inputs
        Only with ``return_lse=True``: per row, the log-sum-exp of the weights,
        ``log Σ_j exp(s·q_iᵀW_t k_j + b_t)`` (−inf for rows that see no key); on the
        fast path ``log Σ_j p(s·q_iᵀW_t k_j)·exp(b_t)``, within ``−log(1 − δ − ρ)``
        of it (δ, ρ: the certified relative error of the weights). With it, partial
        results over disjoint key blocks merge exactly: ``out = Σ_b e^{lse_b − lse}
        out_b``, ``lse = log Σ_b e^{lse_b}``.
    info : AttentionInfo
        Only with ``return_info=True`` (after ``lse`` when both are asked).

    Raises
    ------
    TypeError
        Non-float inputs (integer, complex, object, numpy float16: cast to
        float32 — torch float16/bfloat16 tensors are accepted; bool except in
        ``bias``), options of the wrong type (``workers`` not an int); unknown
        keyword arguments (with the name to use, e.g. ``attn_mask`` → ``bias``).
    ValueError
        Shapes that disagree (the message gives the shapes seen and expected),
        NaN/inf inputs (bias: NaN/+inf), unknown method/approx/precision, eps
        outside (0, 1), degree outside [0, MAX_DEGREE] or given with
        ``method="exact"``, scale <= 0, workers = 0;
        with ``method="fast"``, a request the limits refuse (degree, features, memory).

    Notes
    -----
    Inputs are taken as exact values; rotary angles are computed in extended
    precision; the fast path computes in float64 and the exact path in
    ``precision``. ``info.error_bound`` bounds ``max|out − o|`` where ``o`` is
    the mathematical value of the formula for the given inputs, on every path:
    for the exact path it is the floating-point rounding of logits, exp, sums
    and the final division (:func:`numbarope.ops.streaming.exact_error_bound`); float32
    results add their final rounding (at most ``2^-24·max|V|``). The fast path's error
    bound is ``max|out − exact| <= 2δ'/(1−δ')·max|V|`` where δ' is the certified
    relative error δ of the polynomial on ``[−R, R]`` plus a floating-point
    allowance (Alman & Song 2025, §4; see :func:`numbarope.exp_approximation`). Every weight
    ``p(x)T`` is within a factor ``1 ± δ'`` of ``eˣT``, and a ratio of such sums moves by at most
    ``δ'/(1−δ')·(max v − min v)``.

    Examples
    --------
    >>> import numpy as np, numbarope
    >>> rng = np.random.default_rng(0)
    >>> q, k, v = (rng.standard_normal((2, 64, 8)) * 0.3 for _ in range(3))
    >>> out, info = numbarope.rope_attention(q, k, v, rotary=True, method="fast",
    ...                                      eps=1e-4, return_info=True)
    >>> exact = numbarope.rope_attention(q, k, v, rotary=True, method="exact")
    >>> bool(np.abs(out - exact).max() <= info.error_bound.max())
    True
    """
    if cu_seqlens is not None:
        bias, is_causal, positions = packed_arguments(cu_seqlens, key, bias, is_causal,
                                                      rotary, positions)
    if is_dask(query, key, value, bias, relative, key_padding_mask, positions):
        # lazy: the Dask backend (and dask) are imported only for dask inputs
        from .backends.dask import rope_attention_dask
        return rope_attention_dask(
            query, key, value, rotary=rotary, relative=relative, bias=bias,
            is_causal=is_causal, scale=scale, method=method, eps=eps, degree=degree,
            approx=approx, radius=radius, verify=verify, return_info=return_info,
            precision=precision, workers=workers, enable_gqa=enable_gqa,
            query_offset=query_offset, causal_alignment=causal_alignment,
            key_padding_mask=key_padding_mask, positions=positions,
            return_lse=return_lse, **({} if softcap is None else {"softcap": softcap}),
            **unknown)
    if unknown:
        raise unexpected_keywords("rope_attention", unknown, KNOWN_KEYWORDS)
    eps_f = validate_options(method, eps, degree, approx, scale, radius, is_causal)
    validate_precision(precision)
    validate_flag(enable_gqa, "enable_gqa")
    nthreads = resolve_workers(workers)
    if isinstance(verify, bool) or not isinstance(verify, (int, np.integer)):
        raise TypeError(f"verify must be an int >= 0 (rows checked per head), got {verify!r}")
    if verify < 0:
        raise ValueError(f"verify must be >= 0 (rows checked per head), got {verify}")
    validate_flag(return_info, "return_info")
    validate_flag(return_lse, "return_lse")
    return attention(query, key, value, method=method, eps=eps_f, degree=degree,
                     approx=approx, radius=radius, verify=verify, workers=nthreads,
                     return_lse=return_lse, return_info=return_info, stacklevel=3,
                     rotary=rotary, relative=relative, bias=bias, is_causal=is_causal,
                     scale=scale, precision=precision, enable_gqa=enable_gqa,
                     query_offset=query_offset, causal_alignment=causal_alignment,
                     key_padding_mask=key_padding_mask, positions=positions,
                     softcap=validate_softcap(softcap))


def plan(query: Any, key: Any, value: Any, *, rotary: Rotary | bool | None = None,
         relative: Any = None, bias: Any = None, is_causal: bool = False,
         scale: float | None = None, method: Literal["auto", "exact", "fast"] = "auto",
         eps: float = 1e-3, degree: int | None = None,
         approx: Literal["chebyshev", "taylor"] = "chebyshev", radius: Any = None,
         precision: Literal["float32", "float64"] | None = None, enable_gqa: bool = False,
         query_offset: int | None = None,
         causal_alignment: Literal["top_left", "bottom_right"] = "top_left",
         key_padding_mask: Any = None, positions: Any = None,
         softcap: float | None = None, cu_seqlens: Any = None,
         **unknown: Any) -> AttentionInfo:
    """Plan ``rope_attention`` without computing it: per head, what and why.

    Takes the arguments of :func:`rope_attention` (the arrays are validated the
    same way) and returns its :class:`AttentionInfo`: per head the logit radius
    R, degree, features, algorithm, predicted time of exact and fast (seconds),
    fast-path memory (bytes), the choice and the reason in one line.
    ``print(plan(...))`` shows it as a table.
    {common}

    Returns
    -------
    AttentionInfo

    Raises
    ------
    TypeError, ValueError
        As :func:`rope_attention`.

    Examples
    --------
    >>> import numpy as np, numbarope
    >>> q = k = v = np.full((1, 4096, 4), 0.25)
    >>> info = numbarope.plan(q, k, v, rotary=True, scale=1.0)
    >>> info.method.tolist(), info.algorithm.tolist()
    (['fast'], ['gemm'])
    """
    if unknown:
        raise unexpected_keywords("plan", unknown,
                                  [k for k in KNOWN_KEYWORDS if k not in (
                                      "verify", "return_info", "workers",
                                      "return_lse")])
    if cu_seqlens is not None:
        bias, is_causal, positions = packed_arguments(cu_seqlens, key, bias, is_causal,
                                                      rotary, positions)
    eps_f = validate_options(method, eps, degree, approx, scale, radius, is_causal)
    validate_precision(precision)
    validate_flag(enable_gqa, "enable_gqa")
    p, _ = make_problem(query, key, value, rotary=rotary, relative=relative, bias=bias,
                        is_causal=is_causal, scale=scale, precision=precision,
                        enable_gqa=enable_gqa, query_offset=query_offset,
                        causal_alignment=causal_alignment,
                        key_padding_mask=key_padding_mask, positions=positions,
                        softcap=validate_softcap(softcap), rotate=False)
    _, pl = plan_problem(p, method=method, eps=eps_f, degree=degree, approx=approx,
                         radius=radius, grad=requires_grad(query, key, value))
    return AttentionInfo(list(pl.heads), p.batch_shape, eps_f)


for _f in (rope_attention, plan):
    _f.__doc__ = _f.__doc__.replace("    {common}\n", _COMMON_DOC)
del _f
