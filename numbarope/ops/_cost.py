"""The cost model's constants: seconds per elementary operation of each kind.

Each algorithm predicts its time as ``Σ constant × operation count`` with these
(measured on the development machine: 2 cores, x86_64;
:func:`numbarope.calibrate` re-measures them and updates this dict in place).
"""

__all__ = ["COST_CONSTANTS"]

#: The measured constants below times this factor: on the development machine (a
#: shared VM, quiet) whole calls took 1.5–2.4× less than predicted (``python
#: tools/auto_grid.py --n 4096 16384 65536 --E 16 64 --R 0.5``, 2026-12-07); with 0.7
#: the predictions are 1.05–1.7× the measured times, leaving room for the machine's busy
#: periods (the same call up to 2× slower). One factor for every constant: the planner's
#: choices depend on ratios of predictions only, so they do not change.
SCALE = 0.7

#: Seconds per elementary operation of each kind (see module docstring).
COST_CONSTANTS = {
    # exact path: medians of 3 runs of calibrate() on the development machine
    # (2 cores, x86_64, AVX-512, OpenBLAS 0.3.30 via scipy), 2 threads, 2026-11-30
    "exact_pair": 2.6e-9,    # one (i, j) pair of the exact kernel, float64: exp + passes
    "exact_flop": 3.1e-11,   # one multiply-add of its GEMMs (Q K^T, P V), float64
    "exact_pair32": 1.3e-9,  # the same in float32
    "exact_flop32": 1.4e-11,
    "exact_general_flop": 1.2e-9,    # one multiply-add of the general-W bilinear forms
    # fast path: medians of 5 calibrate() runs, 2 threads (numbarope._runtime.threads), 2026-11-30
    "feature": 8.3e-10,      # one monomial feature value (features(): full arrays, all threads)
    "gemm_flop": 4.9e-11,    # one multiply-add of the gemm path's fused feature-block GEMMs
    "fft_flop": 9.9e-10,     # one unit of N·log2(N) in scipy.fft (per column)
    "cmul": 1.3e-10,         # one complex multiply-add per frequency (block products)
    "sympow": 2.5e-9,        # one multiply-add building symmetric powers
    "elementwise": 4.6e-10,  # one intra-chunk (pair, degree) step of the prefix path (numba)
}
COST_CONSTANTS = {k: v * SCALE for k, v in COST_CONSTANTS.items()}
