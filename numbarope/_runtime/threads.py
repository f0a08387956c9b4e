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


def _get_pool(n):
    global _pool, _pool_size
    with _pool_lock:
        if _pool is None or _pool_size < n:
            if _pool is not None:
                _pool.shutdown(wait=False)
            _pool = ThreadPoolExecutor(max_workers=n, thread_name_prefix="numbarope")
            _pool_size = n
        return _pool


def run_tasks(fn, chunks, workers):
    """Call ``fn(chunk)`` for every chunk on ``workers`` threads; returns the results.

    ``fn`` should be (or call) a ``nogil`` numba kernel, so that the threads run
    in parallel. With one worker or one chunk everything runs in the caller's
    thread. Exceptions propagate (the first one raised).
    """
    chunks = list(chunks)
    if workers <= 1 or len(chunks) <= 1:
        return [fn(c) for c in chunks]
    pool = _get_pool(workers)
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

    futs = [pool.submit(worker) for _ in range(min(workers, len(chunks)))]
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


_controller = None


def _threadpool_controller():
    global _controller
    if _controller is None:
        try:
            import scipy.linalg.cython_blas  # noqa: F401  (numba's np.dot calls this BLAS)
            from threadpoolctl import ThreadpoolController
        except ImportError:      # pragma: no cover - threadpoolctl is a dependency
            return None
        _controller = ThreadpoolController()
    return _controller


@contextlib.contextmanager
def blas_threads(n):
    """Limit the BLAS libraries loaded in the process to ``n`` threads (threadpoolctl).

    numba's ``np.dot`` calls scipy's BLAS; numpy's ``@`` calls numpy's. Both are
    limited. Libraries loaded after the controller was created are picked up on
    scipy's BLAS is loaded before the controller is made.
    """
    ctl = _threadpool_controller()
    if ctl is None:
        yield
        return
    with ctl.limit(limits=int(n), user_api="blas"):
        yield
