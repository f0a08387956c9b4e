"""The exact path ("streaming"): blocked online softmax on BLAS, never an n×n matrix.

Its kernels, its per-row bias shift, its visited pairs, cost and memory, its
certified error bound (:func:`exact_error_bound`) and its registry entry
(:class:`Streaming`, which serves every structure) live in this one file.

The work is cut into tasks, one per (head, block of ``_config.EXACT_ROW_BLOCK``
query rows; blocks from the sizes only, :func:`exact_blocks`), the iterations of a
thin ``prange`` loop (:func:`_par_exact`, numba's threading layer, ``workers``
threads: :mod:`numbarope._runtime.threads`), each a serial numba kernel. Query row i of head b sees
at most the keys ``lo_i <= j < hi_i`` of its range row (``key_ranges``: the causal
mask, a window, chunked local attention, packed sequences; all keys without).
A task walks the key blocks (``_config.EXACT_KEY_BLOCK`` keys, aligned) from
``min lo`` to ``max hi`` over its rows (whole key blocks outside are skipped),
masks per row inside a block, and keeps, per row, the running maximum ``m``,
denominator ``l`` and numerator ``acc`` (Milakov & Gimelshein 2018, "Online
normalizer calculation for softmax"; Dao et al. 2022, FlashAttention, Alg. 1):

    S = s·Q_b K_bᵀ + b − rowshift          (one GEMM; bias and mask in one pass)
    m' = max(m, rowmax S);  P = exp(S − m')  (vectorised exp, see below)
    l = l·e^{m−m'} + rowsum P;  acc = acc·e^{m−m'} + P·V_b   (one GEMM)

and finally ``out = acc / l`` and the row log-sum-exp ``lse = m + log l``.

* **GEMMs** ``Q_b K_bᵀ`` and ``P V_b`` go to BLAS (numba's ``np.dot``), one BLAS
  thread per task; the threads of numbarope are the tasks.
* **exp** is the proven vectorised kernel of :mod:`numbarope.ops._exp`
  (``_exp_block``): relative error at most ``EXP_ULPS[dtype]`` units of
  roundoff; arguments below ``EXP_FLUSH[dtype]`` (weights below e^−708 in
  float64, e^−87 in float32, relative to the row's running maximum) give
  exactly 0: they would be subnormal, cost ~50× more in arithmetic, and change a
  sum of >= 1 by less than ``n·e^{EXP_FLUSH}`` (in :func:`exact_error_bound`).
* **Maximum pass skipped** where a Cauchy–Schwarz bound ``s‖q_i‖·max‖k_j‖``
  keeps the key block within ``EXACT_HEADROOM`` of the running maximum (the
  weights are then at most e^headroom: no overflow), which is most blocks of
  ordinary inputs.
* **Bias** ``b_t`` (Toeplitz, float64) enters as ``b_t − shift_i`` with
  ``shift_i`` the largest bias over the real keys row i sees
  (:func:`bias_row_shift`): biases of any finite magnitude cost no accuracy.
* **Precision**: the logits, ``exp`` and the ``P V`` product run in the compute
  dtype (float32 or float64); ``m``, ``l``, ``acc`` and the bias are float64.
* **General** ``W_t`` (``relative``): the logits ``q_iᵀ W_{i−j} k_j`` are
  per-pair bilinear forms, O(E²) each (no GEMM applies), computed for the keys
  in the row's range only; the rest is the same.

Fully masked rows (every logit ``-inf``, or an empty range) return 0, as torch
>= 2.5 does, with ``lse = -inf``. Memory: O(B·n·(E + Ev)) plus one row block ×
key block per thread.
"""

# One algorithm, one place: the exact path is this package. kernel (the blocked online
# softmax and its helpers), entry (exact_attention), decode (few rows per head),
# backward (the gradients, beside the forward), bound (pairs, cost, certified bound,
# the registry entry). Every name is importable from here, as before the split.
from .kernel import (  # noqa: F401
    EXACT_HEADROOM, _DEQUE, _DUMMY_BIAS, _DUMMY_RANGE, _DUMMY_REL, _FM, _Layout, _PROBE,
    _PROBES, _TREE,
    _block_work, _check_ranges, _index_args, _exact_tasks, _first_run_after, _key_runs, _layout,
    _layouts, _max_tree, _online_update, _par_exact, _range_row_max, _row_shifts,
    _shift_mode, _tree_max, _window_max, bias_row_shift, exact_blocks,
    gather_key_ranges, kernel_inputs, norm_bounds, row_norms
)
from .decode import (  # noqa: F401
    DecodePlan, _consecutive, _decode_call, _decode_merge, _decode_plan, _decode_stack,
    _decode_task,
    _par_decode, decode_plan, decode_run
)
from .entry import (  # noqa: F401
    ExactPlan, exact_attention, exact_plan, exact_run
)
from .backward import (  # noqa: F401
    _grad_block, _grad_kv_task, _grad_q_task, _par_grad_kv, _par_grad_q, exact_backward
)
from .bound import (  # noqa: F401
    Streaming, _gamma, exact_error_bound, exact_memory, pairs_visited, predict_exact,
    visible_pairs, visited_pairs
)

__all__ = ["exact_attention", "exact_backward", "row_norms", "bias_row_shift", "exact_blocks",
           "gather_key_ranges", "visible_pairs", "visited_pairs", "pairs_visited",
           "exact_error_bound", "predict_exact", "exact_memory", "EXACT_HEADROOM",
           "Streaming", "decode_plan", "decode_run", "ExactPlan", "exact_plan", "exact_run"]
