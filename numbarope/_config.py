"""Knobs of numbarope in one place: numba flags, block sizes, limits.

Everything tunable lives here so that kernels contain no scattered literals.
Values may be changed at run time (``numbarope._config.MAX_DEGREE = 30``);
kernels read them at call time, not at import time, except the numba
``FASTMATH`` flags which are fixed when a kernel is compiled.
"""

import os

#: LLVM fast-math flags for numba kernels. Only re-association and fused
#: multiply-add are allowed (they let reductions vectorise); no ``nnan`` /
#: ``ninf`` because ``-inf`` is a meaningful mask value, and no ``afn``
#: (approximate functions) because exp accuracy enters certified bounds.
FASTMATH = frozenset({"reassoc", "contract", "nsz"})

#: Rows of queries handled by one task of the exact streaming kernel.
EXACT_ROW_BLOCK = 256
#: Keys whose logits are formed at once in the exact streaming kernel.
EXACT_KEY_BLOCK = 512
#: The exact kernel's row blocks are halved (down to 32 rows) until one head has at
#: least this many tasks. From the sequence length only, never the thread count or the
#: number of heads: results do not depend on ``workers`` or on batching.
EXACT_TASKS = 8
#: Query rows per key/value head (a query head's rows, times the query heads of a
#: grouped-query group) up to which the exact path takes its decoding kernel: rows
#: stacked, keys split into chunks (flash-decoding), logits and value products as
#: loops rather than BLAS calls.
DECODE_ROWS = 16
#: Keys per chunk (one task) of the decoding kernel, a multiple of DECODE_BLOCK; from
#: the sizes only: results do not depend on the threads or on batching.
DECODE_CHUNK = 512
#: Keys whose logits the decoding kernel forms at once (its key block).
DECODE_BLOCK = 256
#: Multiply-adds (rows × keys × (E + Ev)) from which the decoding kernel runs its
#: chunks on several threads (a parallel region costs a few microseconds; at S = 1024,
#: 9 heads, head_dim 64 two threads took 52–73 µs against 88–94 µs for one).
DECODE_PARALLEL = 2e5
#: Query rows × keys of a head up to which the exact kernel computes every block's
#: row maximum instead of skipping it by the norms' bound (the norms' pass costs more
#: than it saves on small heads).
EXACT_ALWAYS_MAX = 65536
#: Rows and keys of one block of the exact backward (each task: one row block of a
#: query head, or one key block of a key/value head).
BWD_BLOCK = 128
#: Multiply-adds of one group of tasks of the exact kernel (one iteration of its
#: parallel loop, sharing buffers).
EXACT_GROUP_WORK = 2e7
#: Multiply-adds per thread of one wave of a parallel section that Python hands to
#: numba at once (~0.3–1 s on the development machine; and at least 8 task groups per
#: thread, so that the tail of a wave idles little): between waves Python runs, so
#: Ctrl-C stops a long call.
WAVE_WORK = 4e9

#: Rows per chunk of the causal prefix path of the fast path: the intra-chunk
#: polynomial is formed on chunk x chunk blocks, one key-side state (m x (Ev+1))
#: is kept per chunk.
CAUSAL_CHUNK = 256
#: Most rows per feature block of the fast path.
FEATURE_CHUNK = 1024
#: Bytes of one block of features (m x rows): blocks stay in a core's L2 cache
#: between the feature recurrence and the GEMM that consumes them (measured best
#: at 0.25-0.5 MB on the development machine, 1.25 MB L2 per core, m = 969).
FEATURE_BLOCK_BYTES = 2**19
#: Most tasks of a parallel section that keep a private m x (Ev+1) state. The
#: partition into tasks depends on the sizes only, never on ``workers``, so
#: results are the same for any number of threads.
MAX_TASKS = 64
#: Bytes of m x (Ev+1) states kept at once by the gemm and prefix paths (private
#: task states, per-chunk key-side states of the causal path).
STATE_BYTES = 256 * 2**20

#: ``method="auto"`` takes the fast path only when its predicted time is below
#: the exact path's divided by this factor: on near-ties the exact answer wins,
#: and the cost model's error (~30% on a shared 2-core machine) cannot flip a tie
#: into a loss of more than this factor.
AUTO_MARGIN = 1.25

#: With inputs that require grad, ``auto`` compares forward + backward: the exact
#: path's predicted time times EXACT_BACKWARD_FACTOR (forward + FlashAttention-2's
#: backward, measured 3.8–5.2× the forward at n = 4096–16384, E = 16–64, 2 cores), a
#: fast algorithm's times ``1 + FAST_BACKWARD_FACTOR·(E·Ev + E + Ev)/(Ev + 1)`` (its
#: backward's states are that much wider than the forward's: measured 15× (prefix),
#: 23× (gemm), ~30× (window) the forward at E = Ev = 16); an algorithm may set its
#: own ``backward_factor`` (prefix: 0.85, window: 1.7).
EXACT_BACKWARD_FACTOR = 4.5
FAST_BACKWARD_FACTOR = 1.3

#: Largest polynomial degree the fast path will use (refuses above).
MAX_DEGREE = 24

#: Largest number of symmetric monomial features the fast path will use.
MAX_FEATURES = 2_000_000

#: Number of grid points for the a posteriori certification of exp bounds.
CERTIFY_GRID = 1 << 15

#: Memory limit of one fast-path call as a fraction of the available RAM.
MEMORY_FRACTION = 0.5

#: Working-memory budget (bytes) of blocked FFT products; blocks are sized to it.
FFT_BLOCK_BYTES = 256 * 2**20


def available_memory():
    """Available physical memory in bytes (``MemAvailable`` on Linux).

    Falls back to total pages * page size, or 4 GiB when neither is known.
    """
    try:
        with open("/proc/meminfo") as fh:
            for line in fh:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return 4 * 2**30


def memory_limit():
    """Bytes one call may use: ``MEMORY_FRACTION`` of the available RAM."""
    return int(MEMORY_FRACTION * available_memory())


#: Exact calls with fewer multiply-adds than this (query rows × keys × (E + Ev)) run
#: in the caller's thread: a thread hand-off costs ~0.05–0.2 ms, more than they take.
INLINE_WORK = 2e6

#: Requests below this many bytes are not checked against :func:`memory_limit`
#: (reading /proc/meminfo costs ~0.1 ms, a large share of a small call).
SMALL_REQUEST = 16 * 2**20


def exceeds_memory(need):
    """Whether ``need`` bytes exceed :func:`memory_limit` (False below SMALL_REQUEST)."""
    return need > SMALL_REQUEST and need > memory_limit()
