"""torch's OpenMP thread team, for kernels called between torch operators.

torch's CPU operators (its Linux wheels) run on GNU OpenMP threads, and those
threads keep spinning for a while after each operator, waiting for the next one.
A transformers model calls attention between such operators (the cache update, the
projections): numba's tbb workers, woken for a call of ~0.1-5 ms, first had to wake
and then shared the cores with torch's spinning threads (and spun themselves after
the call, next to torch's next operator). Measured on 2 cores, SmolLM2's shapes,
per call: decoding after a ``torch.cat`` of the cache 117 -> 86 µs at batch 1,
593 -> 254 µs at batch 4 (torch SDPA 94, 292-385 µs); a causal prefill of 512
tokens 6.5 -> 4.8 ms (SDPA 4.8-5.5 ms), of 128 tokens 1.09 -> 0.64 ms.

:func:`team` gives a :class:`Team` that runs a compiled task function on that
team: ``GOMP_parallel`` of the libgomp that torch loaded (the entry point every
``#pragma omp parallel`` compiles to, stable across GCC versions), with
``fn(data)`` run by each of its threads (the caller is thread 0). The task
function hands out tasks with an atomic counter, so the work is split by tasks,
never by threads: the results are bitwise those of numba's parallel loop over the
same tasks.

There is no team (``team()`` returns None) when torch is not imported, its
parallel backend is not OpenMP, the process holds no single libgomp, in a child
made by ``fork`` (GNU OpenMP does not survive it; numbarope's tbb loops do), or
with ``NUMBAROPE_TORCH_TEAM=0`` in the environment.
"""

from __future__ import annotations

import ctypes
import os
import sys
import threading

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

__all__ = ["Team", "team", "as_voidptr", "next_task"]


@intrinsic
def as_voidptr(typingctx, address):
    """(numba) The address (int64) as a ``void *``, for ``numba.carray`` in a task
    function that receives its arrays as addresses."""
    def codegen(context, builder, sig, args):
        return builder.inttoptr(args[0], ir.IntType(8).as_pointer())
    return types.voidptr(types.int64), codegen


@intrinsic
def next_task(typingctx, counter_address):
    """(numba) Atomically add 1 to the int64 at ``counter_address``; its old value: the
    next task of the thread that asked (tasks handed out one at a time)."""
    def codegen(context, builder, sig, args):
        ptr = builder.inttoptr(args[0], ir.IntType(64).as_pointer())
        return builder.atomic_rmw("add", ptr, ir.Constant(ir.IntType(64), 1), "monotonic")
    return types.int64(types.int64), codegen


class Team:
    """torch's OpenMP team: :meth:`run` ``fn(data)`` on ``nthreads`` of its threads."""

    __slots__ = ("path", "_parallel")

    def __init__(self, path: str):
        lib = ctypes.CDLL(path)
        fn = lib.GOMP_parallel
        fn.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
        fn.restype = None
        self.path = path
        self._parallel = fn

    def run(self, fn_address: int, data_address: int, nthreads: int) -> None:
        """Call the C function at ``fn_address`` (``void fn(void *data)``) once on each
        of ``nthreads`` threads of the team, the caller among them, and return when
        every call has returned. The GIL is released meanwhile (ctypes); ``fn`` must
        not touch Python objects."""
        self._parallel(fn_address, data_address, max(1, int(nthreads)), 0)


_team: Team | None = None
_checked = False
_lock = threading.Lock()
_forked = False


def _libgomp_paths():
    """The paths of every libgomp mapped into this process (Linux), or None."""
    try:
        with open("/proc/self/maps") as f:
            return {line.split(None, 5)[5].strip() for line in f
                    if "libgomp" in line and len(line.split(None, 5)) == 6}
    except OSError:
        return None


def team() -> Team | None:
    """torch's OpenMP team, or None where there is none (see the module docstring).

    Decided once per process, on the first call after torch was imported; cheap
    afterwards."""
    global _team, _checked
    if _checked:
        return None if _forked else _team
    if "torch" not in sys.modules:
        return None                          # (asked again once torch is imported)
    with _lock:
        if not _checked:
            _team = _find()
            _checked = True
    return None if _forked else _team


def _find():
    if os.environ.get("NUMBAROPE_TORCH_TEAM", "1") == "0" or _forked:
        return None
    torch = sys.modules["torch"]
    try:
        if "parallel backend: OpenMP" not in torch.__config__.parallel_info():
            return None
    except Exception:
        return None
    paths = _libgomp_paths()
    if not paths:
        return None
    own = os.path.join(os.path.dirname(torch.__file__), "lib", "libgomp.so.1")
    path = own if own in paths else next(iter(paths)) if len(paths) == 1 else None
    if path is None:
        return None
    try:
        return Team(path)
    except (OSError, AttributeError):
        return None


def _after_fork_in_child():
    global _forked
    _forked = True


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_after_fork_in_child)
