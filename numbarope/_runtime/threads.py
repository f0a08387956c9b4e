"""Threads of numbarope: one control, ``workers``, for numba kernels, BLAS and FFT.

numbarope runs its parallel work on a pool of ordinary Python threads, each
calling a serial numba kernel compiled with ``nogil=True`` (the GIL is released
for the whole kernel), and never through numba's ``parallel=True`` threading
layer. The reasons, measured on the development machine (2 cores):

* numba's OpenMP layer and torch's (a second OpenMP runtime in the same
  process) slow each other down 3-4x: whichever started second has its threads
  competing with the other's spinning workers, and ``OMP_WAIT_POLICY`` cannot be
  changed once a runtime has started. Python threads start no runtime.
* numba's ``workqueue`` layer avoids that but aborts when two Python threads
  call parallel kernels at once (Dask's threaded workers do); a pool of Python
  threads running nogil kernels has no such limit.
* Within each task, BLAS calls (the GEMMs of the exact kernel) run on a single
  thread (threadpoolctl), so ``workers`` threads never become
  ``workers × BLAS threads``.

``workers`` has scipy.fft's meaning: ``None`` uses the default (all cores, or
what :func:`set_workers` set in this thread), a positive int that many threads,
a negative int counts from ``os.cpu_count()`` (-1: all cores).

Several Python threads may call numbarope at once: they share one pool (each
call runs at most ``workers`` of its chunks at a time), and the BLAS limit is
counted process-wide (:func:`blas_threads`: the first parallel section sets one
BLAS thread, the last one restores the settings it found), so concurrent calls
give the results of sequential ones and leave the BLAS settings as they were.
In a child made by ``fork`` (which inherits the pool object but not its threads,
and the locks as they were), :func:`os.register_at_fork` gives the child a new
pool, new locks and the BLAS settings of the parent before its sections.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor

__all__ = ["get_workers", "set_workers", "resolve_workers", "run_tasks", "blas_threads"]

_local = threading.local()
_pool_lock = threading.Lock()
_pool = None
_pool_size = 0


def _cpu_count():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int | None = None) -> int:
    """Number of threads for ``workers`` (scipy.fft's meaning, see module doc).

    Raises
    ------
    TypeError
        ``workers`` is not an int or None.
    ValueError
        ``workers`` is 0, or negative beyond ``-os.cpu_count()``.
    """
    if workers is None:
        workers = getattr(_local, "workers", None)
        if workers is None:
            return _cpu_count()
    if isinstance(workers, bool) or not isinstance(workers, int):
        try:
            import numpy as np
            if isinstance(workers, np.integer):
                workers = int(workers)
            else:
                raise TypeError
        except TypeError:
            raise TypeError(f"workers must be an int or None, got {workers!r}") from None
    ncpu = _cpu_count()
    if workers == 0:
        raise ValueError("workers=0 is not allowed; use a positive count, or a negative "
                         "one counted from the number of cores (-1: all cores)")
    if workers < 0:
        if workers < -ncpu:
            raise ValueError(f"workers={workers} asks for fewer than one thread on "
                             f"{ncpu} cores; use -1 .. -{ncpu} or a positive count")
        return ncpu + 1 + workers
    return workers


def get_workers() -> int:
    """The default number of threads in this thread (see :func:`set_workers`)."""
    return resolve_workers(None)


def set_workers(workers: int | None) -> contextlib.AbstractContextManager[None]:
    """Context manager setting the default ``workers`` in the calling thread.

    Like ``scipy.fft.set_workers``: thread-local, restored on exit; use it in a
    ``with`` statement (a bare call changes nothing). ``workers`` is checked when
    it is called (TypeError/ValueError as ``workers=`` of rope_attention).

    Examples
    --------
    >>> import numbarope
    >>> with numbarope.set_workers(1):
    ...     numbarope.get_workers()
    1
    """
    return _set_workers(resolve_workers(workers))


@contextlib.contextmanager
def _set_workers(n: int) -> Iterator[None]:
    old = getattr(_local, "workers", None)
    _local.workers = n
    try:
        yield
    finally:
        _local.workers = old


def _pool_thread_init():
    # runs once in every thread of the pool: those threads run numbarope's kernels only
    _local.in_pool = True
    try:
        for get, set_ in _blas_libs()[1]:   # BLAS whose thread limit is per thread
            if get() != 1:
                set_(1)
    except Exception:        # pragma: no cover - a failing initializer breaks the pool
        pass


def _submit(fn, k):
    """Submit ``fn`` ``k`` times to the shared pool (grown to at least ``k`` threads).

    Under the pool's lock: a concurrent call that grows the pool shuts the old one
    down (its queued work still runs), which must not fall between getting the pool
    and submitting to it."""
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < k:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=k, thread_name_prefix="numbarope",
                                       initializer=_pool_thread_init)
            _pool_size = k
        return [_pool.submit(fn) for _ in range(k)]


def run_tasks(fn, chunks, workers):
    """Call ``fn(chunk)`` for every chunk on ``workers`` threads; returns the results.

    ``fn`` should be (or call) a ``nogil`` numba kernel, so that the threads run
    in parallel. With one worker or one chunk everything runs in the caller's
    thread (so does a call from inside a task: waiting there for the pool's other
    threads could deadlock). Exceptions propagate (the first one raised).
    """
    chunks = list(chunks)
    if workers <= 1 or len(chunks) <= 1 or getattr(_local, "in_pool", False):
        return [fn(c) for c in chunks]
    # at most `workers` chunks in flight: a shared pool may be larger than this call
    # asked for, and the call must not use more threads than it was given
    results = [None] * len(chunks)
    it = iter(range(len(chunks)))
    lock = threading.Lock()
    cancel = threading.Event()

    def worker():
        while not cancel.is_set():
            with lock:
                i = next(it, None)
            if i is None:
                return
            results[i] = fn(chunks[i])

    futs = _submit(worker, min(workers, len(chunks)))
    try:
        for f in futs:
            f.result()
    except BaseException:
        # KeyboardInterrupt (or a worker's error): start no further chunk, and wait for
        # the running ones, so that no kernel keeps a core busy after we return and
        # the pool is free for the next call (a numba kernel cannot be interrupted)
        cancel.set()
        while True:
            try:
                for f in futs:
                    f.exception()
                break
            except KeyboardInterrupt:      # a second Ctrl-C while the chunks finish
                continue
        raise
    return results


# ---------------------------------------------------------------------------
# BLAS at one thread inside numbarope's parallel sections
#
# The BLAS thread count is (for OpenBLAS with pthreads, MKL, BLIS) one setting of
# the whole process, so a per-call save/set/restore interleaves across Python
# threads: two concurrent calls A, B; A saves 2 and sets 1; B saves 1; A restores
# 2 (B's kernels now run with 2 BLAS threads each); B restores 1, for good. Hence one
# process-wide limiter, counted: the first section to enter saves the settings and
# sets 1, concurrent ones only count, the last to leave restores what was saved.

_libs_lock = threading.Lock()
_libs = None


def _blas_libs():
    """``(shared, per_thread)``: ``(get, set)`` of every BLAS library's thread count.

    Found once (threadpoolctl scans the loaded libraries: too slow for every call).
    ``shared``: a limit of the whole process; ``per_thread``: a limit of the calling
    thread only (OpenBLAS built with OpenMP, limited through ``omp_set_num_threads``).
    scipy's BLAS, the one numba's ``np.dot`` calls, is loaded first; libraries loaded
    after the first parallel call are not limited (numbarope's kernels call neither).
    """
    global _libs
    libs = _libs
    if libs is None:
        with _libs_lock:
            if _libs is None:
                _libs = _find_blas_libs()
            libs = _libs
    return libs


def _find_blas_libs():
    try:
        import scipy.linalg.cython_blas  # noqa: F401  (numba's np.dot calls this BLAS)
        from threadpoolctl import ThreadpoolController
    except ImportError:      # pragma: no cover - threadpoolctl is a dependency
        return (), ()
    shared, per_thread = [], []
    for lc in ThreadpoolController().lib_controllers:
        if lc.user_api != "blas" or lc.get_num_threads() is None:
            continue
        # threadpoolctl >= 3.8 lets only one Python thread at a time set OpenBLAS's
        # (pthreads) threads, and silently ignores the others: numbarope's first
        # section and its last may run in different threads, and numbarope's lock
        # already makes its changes one at a time, so the library is set directly
        set_ = getattr(lc, "_real_set_num_threads", lc.set_num_threads)
        if lc.internal_api == "openblas" and getattr(lc, "threading_layer", "") == "openmp":
            per_thread.append((lc.get_num_threads, set_))
        else:
            shared.append((lc.get_num_threads, set_))
    return tuple(shared), tuple(per_thread)


class _OneBlasThread:
    """``with _ONE_BLAS_THREAD:`` BLAS at one thread while any such block is active.

    Process-wide (BLAS libraries whose limit is per thread: in the calling thread,
    nested like threadpoolctl's limit; numbarope's pool threads keep 1 for good).
    Entering and leaving cost a lock and a counter, plus two calls per library for
    the first section in and the last out.

    Another thread that changes the BLAS threads while a section is active (a
    ``threadpoolctl.threadpool_limits`` of the user) changes them for numbarope's
    kernels too, until it restores them. When the last section leaves, a library
    still at the 1 numbarope set gets its saved count back; one another thread set
    to something else keeps that setting. So a user's ``threadpool_limits`` block
    that starts inside a numbarope call and ends after it restores the 1 it found
    there (nothing can tell that 1 from a user's own), and a user thread's numpy
    calls run on one BLAS thread while any numbarope call is in a parallel section.
    """

    __slots__ = ("lock", "active", "saved")

    def __init__(self):
        self.lock = threading.Lock()
        self.active = 0          # sections inside, in all threads
        self.saved = ()          # the shared libraries' counts before the first one

    def __enter__(self):
        shared, per_thread = _blas_libs()
        if per_thread:
            saved = tuple(get() for get, _ in per_thread)
            for (_, set_), n in zip(per_thread, saved):
                if n != 1:
                    set_(1)
            _local.__dict__.setdefault("blas_saved", []).append(saved)
        if shared:
            with self.lock:
                if self.active == 0:
                    saved = tuple(get() for get, _ in shared)
                    for (_, set_), n in zip(shared, saved):
                        if n != 1:
                            set_(1)
                    self.saved = saved
                self.active += 1
                _local.depth = getattr(_local, "depth", 0) + 1
        return None

    def __exit__(self, *exc):
        shared, per_thread = _blas_libs()
        if shared:
            with self.lock:
                _local.depth -= 1
                self.active -= 1
                if self.active == 0:
                    for (get, set_), n in zip(shared, self.saved):
                        if n != 1 and get() == 1:
                            set_(n)
                    self.saved = ()
        if per_thread:
            for (get, set_), n in zip(per_thread, _local.blas_saved.pop()):
                if n != 1 and get() == 1:
                    set_(n)
        return False

    def _after_fork_in_child(self):
        # the threads of the parent's other sections do not exist here: what they set
        # is restored now (or when this thread's own open sections leave)
        self.lock = threading.Lock()
        own = getattr(_local, "depth", 0)
        if self.active > own:
            self.active = own
            if own == 0:
                for (get, set_), n in zip(_blas_libs()[0], self.saved):
                    if n != 1 and get() == 1:
                        set_(n)
                self.saved = ()


_ONE_BLAS_THREAD = _OneBlasThread()


def blas_threads(n=1):
    """Context manager: BLAS libraries at one thread inside numbarope's parallel work.

    numba's ``np.dot`` calls scipy's BLAS; numpy's ``@`` calls numpy's. Both are
    limited. Safe in concurrent threads: the limit is counted process-wide (the
    first section in sets it, the last out restores the settings saved; see
    :class:`_OneBlasThread`), and cheap to enter.
    """
    if n != 1:
        raise ValueError(f"blas_threads({n!r}): numbarope limits BLAS to 1 thread only")
    return _ONE_BLAS_THREAD


# ---------------------------------------------------------------------------
# fork: a child has only the thread that forked, and copies of the locks as they were


def _after_fork_in_child():
    global _pool, _pool_size, _pool_lock, _libs_lock
    # the pool's threads did not come along (a submit to it would wait forever);
    # a lock another thread held at the fork would stay held
    _pool, _pool_size = None, 0
    _pool_lock = threading.Lock()
    _libs_lock = threading.Lock()
    try:
        _ONE_BLAS_THREAD._after_fork_in_child()
    except Exception:        # pragma: no cover - never fail the child's start
        pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
