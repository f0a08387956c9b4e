"""Threads of numbarope: one control, ``workers``, for numba kernels, BLAS and FFT.

Every parallel loop of numbarope is a numba ``@njit(parallel=True)`` function: a
thin ``prange`` over independent tasks (heads × row blocks, chunks, feature
blocks), each calling a serial kernel. The partition into tasks depends on the
sizes only, never on ``workers``, so results are bitwise the same for any number
of threads. The loops run on numba's threading layer, by default **tbb**
(:func:`threading_layer`): it serves several Python threads at once (Dask's
threaded workers, a threaded server) and survives ``fork``; next to torch in one
process neither slows the other (tools/threads_interop.py). If the process
already started numba's ``omp`` layer, numbarope uses it (a forked child cannot);
under ``workqueue`` it runs one parallel region at a time, because that layer
aborts on concurrent ones. One exception: exact calls with torch tensors (a
transformers model's layers: the fast lane's decoding and exact kernels) run their
tasks on torch's own OpenMP threads (:mod:`numbarope._runtime.omp_team`): they spin
between torch's operators, and tbb's workers, woken for a call of a millisecond,
shared the cores with them. :func:`show_config` prints what runs.

``workers`` has scipy.fft's meaning: ``None`` uses the default (all cores, or
what :func:`set_workers` set in this thread), a positive int that many threads,
a negative int counts from ``os.cpu_count()`` (-1: all cores); it maps onto
numba's per-thread ``set_num_threads`` (at most ``NUMBA_NUM_THREADS``, the cores)
and scipy.fft's ``workers``. A count above the cores available to the process is
accepted, as scipy.fft accepts it, and clamped to those cores (numba's pool has no
more threads, and results are the same for any count): ``set_workers(64)`` on 2
cores gives ``get_workers() == 2``.

Inside the tasks, BLAS (the GEMMs numba's ``np.dot`` hands to scipy's OpenBLAS)
runs on one thread, so ``workers`` threads never become ``workers × BLAS
threads``. The limit is counted process-wide (:func:`blas_threads`: the first
parallel section sets one BLAS thread, the last one restores the settings it
found), so concurrent calls give the results of sequential ones and leave the
BLAS settings as they were. In a child made by ``fork`` (which copies the locks
as they were), :func:`os.register_at_fork` gives the child new locks and the BLAS
settings of the parent before its sections.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Iterator

import numba
from numba.core.types.function_type import CompileResultWAP
import numpy as np

from . import omp_team

__all__ = ["get_workers", "set_workers", "resolve_workers", "blas_threads", "parallel",
           "threading_layer", "task_array", "prange_loop", "show_config"]

_local = threading.local()


def _cpu_count():
    try:
        return max(1, len(os.sched_getaffinity(0)))
    except (AttributeError, OSError):
        return max(1, os.cpu_count() or 1)


def resolve_workers(workers: int | None = None) -> int:
    """Number of threads for ``workers`` (scipy.fft's meaning, see module doc).

    A positive count above the cores available to this process (its CPU affinity,
    else ``os.cpu_count()``) is clamped to those cores, without a warning:
    scipy.fft accepts such a count silently (it then oversubscribes), numba's
    thread pool cannot exceed ``NUMBA_NUM_THREADS`` (the cores), and numbarope's
    results do not depend on the count. The clamped value is what
    :func:`get_workers`, :func:`set_workers` and ``workers=`` report and use.

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
        if isinstance(workers, np.integer):
            workers = int(workers)
        else:
            raise TypeError(f"workers must be an int or None, got {workers!r}")
    ncpu = _cpu_count()
    if workers > 0:
        return min(workers, ncpu)
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
    it is called (TypeError/ValueError as ``workers=`` of rope_attention); a count
    above the available cores is clamped to them (:func:`resolve_workers`).

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


# ---------------------------------------------------------------------------
# numba's threading layer: tbb by default

_layer_lock = threading.Lock()
_layer = None
_tbb_path = None
#: Held around every parallel region when the layer is numba's workqueue, which aborts
#: the process when two threads enter parallel regions at once.
_serial = threading.Lock()


def _tbb_candidates():
    """Where pip's ``tbb`` puts ``libtbb.so.12``: ``<prefix>/lib`` of the venv (not on
    the loader's path), or the files the distribution lists."""
    names = ("libtbb.so.12", "libtbb.12.dylib", "tbb12.dll")
    dirs = [os.path.join(sys.prefix, "lib"), os.path.join(sys.base_prefix, "lib"),
            os.path.join(sys.prefix, "Library", "bin")]
    for d in dirs:
        for n in names:
            yield os.path.join(d, n)
    try:
        from importlib import metadata
        for f in metadata.files("tbb") or ():
            if os.path.basename(str(f)) in names:
                yield str(f.locate())
    except Exception:           # no tbb distribution: numba decides
        return


def _load_tbb():
    """Load libtbb by path (RTLD_GLOBAL) so that numba finds its tbb layer; the path or
    None."""
    import ctypes
    for path in _tbb_candidates():
        if os.path.exists(path):
            try:
                ctypes.CDLL(path, mode=ctypes.RTLD_GLOBAL)
                return path
            except OSError:
                continue
    return None


def threading_layer() -> str:
    """The numba threading layer numbarope's parallel loops run on: ``"tbb"``,
    ``"omp"`` or ``"workqueue"``.

    Started on first use: unless the process already started a layer (numba
    chooses one layer per process, at its first parallel region) or
    ``NUMBA_THREADING_LAYER`` names one, numbarope makes the ``tbb`` package's
    library loadable (pip installs it where the loader does not look) so that
    numba's default choice, tbb first, finds it. tbb serves several Python threads
    at once and survives ``fork``; ``omp`` works but a forked child cannot use it;
    under ``workqueue`` numbarope runs one parallel region at a time (it aborts
    on concurrent ones).
    """
    global _layer, _tbb_path
    if _layer is None:
        with _layer_lock:
            if _layer is None:
                from numba.np.ufunc import parallel as _par
                if not _par._is_initialized and numba.config.THREADING_LAYER in (
                        "default", "tbb", "safe"):
                    _tbb_path = _load_tbb()
                _par._launch_threads()       # what numba's first parallel region does
                _layer = numba.threading_layer()
    return _layer


class parallel:
    """``with parallel(nthreads):`` numba parallel regions with ``nthreads`` threads
    (numba's per-thread ``set_num_threads``, at most ``NUMBA_NUM_THREADS``), iterations
    handed out one at a time (``set_parallel_chunksize(1)``: tasks of unequal sizes
    balance; ``balance=False`` for equal tasks), BLAS at one thread inside
    (:func:`blas_threads`; ``blas=False`` for loops that call no BLAS); under the
    workqueue layer one region at a time in the process. Restores the caller's
    settings. Entering costs a few microseconds (decoding calls take tens)."""

    __slots__ = ("n", "blas", "balance", "old", "old_chunk", "lock")

    def __init__(self, nthreads: int, blas: bool = True, balance: bool = True):
        self.n = max(1, min(int(nthreads), _MAX_THREADS))
        self.blas = blas
        self.balance = balance

    def __enter__(self):
        layer = _layer if _layer is not None else threading_layer()
        if _raw is None:
            _bind_raw()
        self.lock = _serial if layer == "workqueue" else None
        if self.lock is not None:
            self.lock.acquire()
        self.old = _get_num_threads()
        if self.old != self.n:
            _set_num_threads(self.n)
        self.old_chunk = _set_chunksize(1) if self.balance else None
        if self.blas:
            _ONE_BLAS_THREAD.__enter__()
        return None

    def __exit__(self, *exc):
        try:
            if self.blas:
                _ONE_BLAS_THREAD.__exit__(*exc)
        finally:
            if self.old_chunk is not None:
                _set_chunksize(self.old_chunk)
            if self.old != self.n:
                _set_num_threads(self.old)
            if self.lock is not None:
                self.lock.release()
        return False


_MAX_THREADS = numba.config.NUMBA_NUM_THREADS
_get_num_threads = numba.get_num_threads
_set_num_threads = numba.set_num_threads
_set_chunksize = numba.set_parallel_chunksize
_raw = None


def _bind_raw():
    """After the layer is up: numba's C functions for the thread count and chunk size
    in place of its Python wrappers, which take numba's process-wide launch lock on
    every call (~10-30 µs each inside a model's forward, several per section). The
    arguments are checked by :class:`parallel` itself (1 <= n <= NUMBA_NUM_THREADS,
    chunk 0 or 1)."""
    global _raw, _get_num_threads, _set_num_threads, _set_chunksize
    from numba.np.ufunc import parallel as _p
    raw = tuple(getattr(_p, name, None) for name in
                ("_get_num_threads", "_set_num_threads", "_set_parallel_chunksize"))
    if all(callable(f) for f in raw):
        _get_num_threads, _set_num_threads, _set_chunksize = raw
    _raw = raw


class _PrangeLoop:
    """A thin ``prange`` loop ``loop(kernel, *args)`` calling the serial numba ``kernel``
    through its address (a first-class function, numba's ``FunctionType``).

    Compiled per signature of its arguments, ``parallel=True``, ``cache=True``; the
    kernel is compiled once on its own and only called from the loop. (Called
    directly, numba would compile the kernel's code again into every loop that calls
    it: the cold compile of the package doubled.) ``kernel_args(*args)`` gives the
    arguments of one kernel call (task 0), from which the kernel's signature is
    found.
    """

    def __init__(self, pyfunc, kernel_args):
        self.pyfunc = pyfunc
        self.kernel_args = kernel_args
        self.dispatcher = numba.njit(parallel=True, cache=True)(pyfunc)
        # no compile from the call's types (that would compile the kernel into the loop):
        # only the explicit signatures of __call__ (disable_compile() wants one first)
        self.dispatcher._can_compile = False
        self._waps = {}                  # kernel -> address of its last overload used
        self.__name__ = pyfunc.__name__
        self.__doc__ = pyfunc.__doc__
        self.__wrapped__ = pyfunc

    def __call__(self, kernel, *args):
        # the kernel goes in as the address of its compiled overload (numba's wrapper
        # address protocol, typed exactly as the loop's FunctionType argument): passed
        # as a dispatcher, numba converts it on every call (~100 µs, more than a small
        # call's work). The last address per kernel is tried first; a loop compiled for
        # other argument types does not match it, and the address is looked up again.
        wap = self._waps.get(kernel)
        if wap is not None:
            try:
                return self.dispatcher(wap, *args)
            except TypeError as exc:
                if not str(exc).startswith("No matching definition"):
                    raise
        ksig = tuple(numba.typeof(a) for a in self.kernel_args(*args))
        kernel.compile(ksig)             # on its own (from the cache when there)
        wap = CompileResultWAP(kernel.overloads[ksig])
        fn = numba.types.FunctionType(wap.signature())
        try:
            out = self.dispatcher(wap, *args)
        except TypeError as exc:
            if not str(exc).startswith("No matching definition"):
                raise
            with _layer_lock:
                self.dispatcher._can_compile = True
                try:
                    self.dispatcher.compile((fn,) + tuple(numba.typeof(a) for a in args))
                finally:
                    self.dispatcher._can_compile = False
            out = self.dispatcher(wap, *args)
        self._waps[kernel] = wap
        return out


def prange_loop(kernel_args):
    """Decorator of a thin prange loop ``loop(kernel, *args)`` (see :class:`_PrangeLoop`):
    ``kernel_args(*args)`` gives the arguments of the kernel's call for task 0."""
    def wrap(pyfunc):
        return _PrangeLoop(pyfunc, kernel_args)
    return wrap


def task_array(tasks) -> np.ndarray:
    """(n, 2) int64 array of ``(start, stop)`` pairs (a parallel driver's task list)."""
    return np.asarray(list(tasks), dtype=np.int64).reshape(-1, 2)


def show_config(file=None) -> dict:
    """Print (and return) what numbarope runs on: numba's threading layer and where
    tbb was loaded from, the default threads, numba's thread limit, the BLAS
    libraries (threadpoolctl) with their threads, and torch's OpenMP team that
    exact calls with torch tensors run on (``torch_team``: its libgomp, or None
    when torch is not imported or has none; :mod:`numbarope._runtime.omp_team`).

    Examples
    --------
    >>> import numbarope
    >>> import io
    >>> cfg = numbarope.show_config(file=io.StringIO())
    >>> cfg["threading_layer"] in ("tbb", "omp", "workqueue")
    True
    """
    from threadpoolctl import threadpool_info
    layer = threading_layer()
    try:
        from importlib import metadata
        tbb_version = metadata.version("tbb")
    except Exception:
        tbb_version = None
    cfg = dict(numba=numba.__version__, threading_layer=layer, tbb=tbb_version,
               tbb_library=_tbb_path, workers=get_workers(),
               numba_num_threads=numba.config.NUMBA_NUM_THREADS,
               blas=[dict(library=d.get("internal_api"), version=d.get("version"),
                          threads=d.get("num_threads"), threading=d.get("threading_layer"))
                     for d in threadpool_info() if d.get("user_api") == "blas"])
    t = omp_team.team()
    cfg["torch_team"] = t.path if t is not None else None
    lines = [f"numba {cfg['numba']}, threading layer {layer}"
             + (f" (tbb {tbb_version}, {_tbb_path})" if layer == "tbb" and _tbb_path else
                f" (tbb {tbb_version})" if layer == "tbb" else ""),
             f"threads: workers={cfg['workers']} (default), NUMBA_NUM_THREADS="
             f"{cfg['numba_num_threads']}"]
    for b in cfg["blas"]:
        lines.append(f"BLAS: {b['library']} {b['version']}, {b['threads']} threads"
                     + (f" ({b['threading']})" if b['threading'] else ""))
    lines.append("torch's OpenMP team (exact calls with torch tensors): "
                 + (cfg["torch_team"] or ("none" if "torch" in sys.modules
                                          else "torch not imported")))
    print("\n".join(lines), file=file if file is not None else sys.stdout)
    return cfg


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
    Only scipy's BLAS, the one numba's ``np.dot`` calls, when it can be told apart
    (every BLAS library found otherwise); libraries loaded after the first parallel
    call are not limited (numbarope's kernels call none of them).
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
    blas = [lc for lc in ThreadpoolController().lib_controllers
            if lc.user_api == "blas" and lc.get_num_threads() is not None]
    # scipy's own (wheels: scipy.libs/ or the scipy-openblas32 package): numpy's and
    # torch's BLAS run no numbarope kernel, and setting each costs microseconds a call
    import scipy
    root = os.path.dirname(os.path.dirname(os.path.abspath(scipy.__file__)))
    own = [lc for lc in blas
           if os.path.abspath(lc.filepath).startswith(os.path.join(root, "scipy"))
           or "scipy_openblas32" in lc.filepath]
    for lc in own or blas:      # (a system scipy on a system BLAS: every BLAS found)
        # threadpoolctl >= 3.8 lets only one Python thread at a time set OpenBLAS's
        # (pthreads) threads, and silently ignores the others: numbarope's first
        # section and its last may run in different threads, and numbarope's lock
        # already makes its changes one at a time, so the library is set directly
        set_ = getattr(lc, "_real_set_num_threads", lc.set_num_threads)
        get_ = lc.get_num_threads
        layer = getattr(lc, "threading_layer", "")
        if lc.internal_api == "openblas" and layer == "openmp":
            per_thread.append((get_, set_))
            _blas_paths.append(lc.filepath)
            continue
        if lc.internal_api == "openblas" and layer == "pthreads":
            # its C functions, resolved once: threadpoolctl's wrappers look the symbols
            # up on every call (~50-100 µs a parallel section inside a model's forward)
            try:
                get_ = lc.dynlib.openblas_get_num_threads
                set_ = lc.dynlib.openblas_set_num_threads
                get_.restype, get_.argtypes = ctypes.c_int, []
                set_.restype, set_.argtypes = None, [ctypes.c_int]
            except AttributeError:          # pragma: no cover - not an OpenBLAS build
                get_ = lc.get_num_threads
                set_ = getattr(lc, "_real_set_num_threads", lc.set_num_threads)
        shared.append((get_, set_))
        _blas_paths.append(lc.filepath)
    return tuple(shared), tuple(per_thread)


#: Paths of the BLAS libraries limited (for tests and show_config).
_blas_paths: list = []


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
    global _libs_lock, _layer_lock, _serial
    # a lock another thread held at the fork would stay held
    _libs_lock = threading.Lock()
    _layer_lock = threading.Lock()
    _serial = threading.Lock()
    try:
        _ONE_BLAS_THREAD._after_fork_in_child()
    except Exception:        # pragma: no cover - never fail the child's start
        pass


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
