"""Speed table: numbarope (exact and certified fast) against torch SDPA on this CPU.

Usage::

    python -m numbarope.bench                    # the five cases, all cores, best of 3
    python -m numbarope.bench --quick            # n / 8: a smoke run
    python -m numbarope.bench --cases 1 4 --threads 2 --repeat 5 --json bench.json
    python -m numbarope.bench --with-exact-long  # also exact on the fast cases' input
    python -m numbarope.bench --no-torch         # numbarope only

A Markdown table goes to stdout (progress to stderr), ready for the README:
per case numbarope's time, torch's ``scaled_dot_product_attention`` time on
the same inputs, the speed-up, the max difference of the two outputs and, for
the fast path, the measured max ``|fast − exact|`` beside its certified bound,
with the machine it ran on (CPU, threads, library versions, date).

How it measures (the numbers mean nothing otherwise):

* torch runs in a clean interpreter of its own (``numbarope/_bench_torch.py``,
  which imports only numpy and torch), as a user without numbarope runs it;
  numbarope runs in this process, which never imports torch. (numbarope starts
  no OpenMP runtime, but torch's timing must not depend on that claim.)
* Same inputs: random float32 ``(heads=1, n, E)``, fixed seed. numbarope gets
  unrotated q, k with ``rotary=Rotary()`` (its time includes applying RoPE);
  torch gets ``apply_rotary(q, Rotary())``, ``apply_rotary(k, Rotary())``
  (rotation not timed). ``scale = 1/sqrt(E)`` for both.
* Same threads: numbarope's ``workers=`` (its kernels, the BLAS calls inside
  them and scipy.fft), BLAS outside its kernels via threadpoolctl, torch via
  ``torch.set_num_threads``.
* One warm-up call each (numba compiles or loads its cache; its outputs give
  the error columns), then ``--repeat`` rounds, each timing numbarope then
  torch back to back, so a noisy neighbour slows both alike; best and median.
* ``--precision`` is passed to the exact calls (default: numbarope's default,
  float32 compute for float32 inputs; the table says what was used).
"""

import argparse
import datetime
import fractions
import importlib.util
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

import numpy as np

import numbarope

__all__ = ["Case", "CASES", "make_inputs", "machine_info", "run_bench", "to_markdown", "main"]


@dataclass(frozen=True)
class Case:
    """One benchmark case: shapes ``(1, n, E)`` for q, k, v (``Ev = E``).

    Attributes
    ----------
    name : str
        Short name, used by ``--cases``.
    n : int
        Sequence length before ``--quick`` / size scaling.
    E : int
        Head dim of queries, keys and values.
    causal : bool
        Causal mask (SDPA ``is_causal=True``).
    method : {"exact", "fast"}
        numbarope's ``method``.
    radius : float or None
        Logit radius ``R = scale·|q_i|·|k_j|`` of every row pair (rows of q and
        k drawn with fixed norm); ``None`` for standard normal q, k.
    """

    name: str
    n: int
    E: int
    causal: bool
    method: str
    radius: float | None = None


#: The project's targets, numbered 1..5 in the table.
CASES = (
    Case("exact-E64", 8192, 64, False, "exact"),
    Case("exact-causal-E64", 16384, 64, True, "exact"),
    Case("exact-E16", 16384, 16, False, "exact"),
    Case("fast", 65536, 16, False, "fast", 0.5),
    Case("fast-causal", 65536, 16, True, "fast", 0.5),
)

_WORKER = os.path.join(os.path.dirname(os.path.abspath(__file__)), "_bench_torch.py")
_RUN_WORKER = ("import runpy, sys; sys.argv = sys.argv[1:]; "
               "runpy.run_path(sys.argv[0], run_name='__main__')")


def make_inputs(n, E, radius=None, seed=0):
    """Random float32 ``query``, ``key``, ``value`` of shape ``(1, n, E)``.

    Parameters
    ----------
    n, E : int
        Sequence length and head dim.
    radius : float or None, optional
        If given, every row of q and k has norm ``sqrt(radius / scale)`` with
        ``scale = 1/sqrt(E)`` (up to a factor ``1 − 1e-6`` against float32
        rounding), so ``scale·|q_i|·|k_j| <= radius`` for all i, j; rotation
        keeps norms. If None, q and k are standard normal.
    seed : int, optional
        Base seed; the stream also depends on ``(n, E, radius is None)``, so
        cases of the same shape and kind share their inputs.

    Returns
    -------
    q, k, v : (1, n, E) ndarray of float32
    """
    rng = np.random.default_rng([seed, n, E, int(radius is None)])
    q, k, v = (rng.standard_normal((1, n, E)) for _ in range(3))
    if radius is not None:
        r = np.sqrt(radius * np.sqrt(E)) * (1 - 1e-6)
        q *= r / np.linalg.norm(q, axis=-1, keepdims=True)
        k *= r / np.linalg.norm(k, axis=-1, keepdims=True)
    return tuple(a.astype(np.float32) for a in (q, k, v))


def _cpu_model():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.lower().startswith(("model name", "hardware", "cpu model")):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def machine_info(threads):
    """What the numbers depend on: CPU, cores, threads, library versions, date.

    Parameters
    ----------
    threads : int
        Threads given to numbarope and torch.

    Returns
    -------
    dict
        ``cpu``, ``logical_cores`` (``os.cpu_count()``), ``cores_available``
        (affinity mask), ``threads``, ``platform``, ``python``, versions of
        numbarope, numpy, scipy, numba, ``omp_wait_policy`` of this process and
        ``date`` (UTC, ISO 8601). torch's version is added by :func:`run_bench`
        from its worker.
    """
    import numba
    import scipy

    try:
        avail = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        avail = os.cpu_count()
    return {
        "cpu": _cpu_model(), "logical_cores": os.cpu_count(), "cores_available": avail,
        "threads": threads, "platform": platform.platform(),
        "python": platform.python_version(), "numbarope": numbarope.__version__,
        "numpy": np.__version__, "scipy": scipy.__version__, "numba": numba.__version__,
        "omp_wait_policy": os.environ.get("OMP_WAIT_POLICY"),
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
    }


class _TorchWorker:
    """A clean interpreter that times torch SDPA on request (see ``_bench_torch.py``)."""

    def __init__(self, threads, omp_wait_policy, tmpdir):
        env = dict(os.environ)
        # torch gets its out-of-the-box OpenMP behaviour unless asked otherwise
        env.pop("OMP_WAIT_POLICY", None)
        if omp_wait_policy != "default":
            env["OMP_WAIT_POLICY"] = omp_wait_policy.upper()
        self._err = open(os.path.join(tmpdir, "torch_worker.stderr"), "w+")
        self._proc = subprocess.Popen(
            [sys.executable, "-c", _RUN_WORKER, _WORKER, str(threads)], cwd=tmpdir, env=env,
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self._err, text=True)
        self.hello = self._read()

    def _read(self):
        line = self._proc.stdout.readline()
        if not line:
            self._err.seek(0)
            tail = self._err.read()[-2000:]
            raise RuntimeError(f"torch worker exited (code {self._proc.poll()}): {tail}")
        reply = json.loads(line)
        if "error" in reply:
            raise RuntimeError(f"torch worker: {reply['error']}")
        return reply

    @property
    def alive(self):
        return self._proc.poll() is None

    def request(self, **req):
        try:
            self._proc.stdin.write(json.dumps(req) + "\n")
            self._proc.stdin.flush()
        except OSError as exc:           # worker gone (e.g. killed for memory)
            raise RuntimeError(f"torch worker exited (code {self._proc.poll()}): "
                               f"{exc}") from None
        return self._read()

    def close(self):
        try:
            if self._proc.poll() is None:
                self.request(op="quit")
            self._proc.wait(timeout=30)
        except (RuntimeError, OSError, subprocess.TimeoutExpired):
            self._proc.kill()
            self._proc.wait()
        finally:
            self._err.close()


def _per_head(x):
    """Per-head info attribute (ndarray-like) as a plain list for JSON."""
    return [v.item() if isinstance(v, np.generic) else v for v in np.asarray(x).ravel()]


def _label(values):
    uniq = list(dict.fromkeys(str(v) for v in values))
    return "/".join(uniq)


def _timed(fn):
    t0 = time.perf_counter()
    res = fn()
    return res, time.perf_counter() - t0


def _parse_cases(spec):
    if not spec:
        return list(range(len(CASES)))
    names = {c.name: i for i, c in enumerate(CASES)}
    out = []
    for item in spec:
        for tok in str(item).split(","):
            tok = tok.strip()
            if not tok:
                continue
            if tok.isdigit() and 1 <= int(tok) <= len(CASES):
                i = int(tok) - 1
            elif tok in names:
                i = names[tok]
            else:
                raise ValueError(f"unknown case {tok!r}: use 1..{len(CASES)} or one of "
                                 f"{', '.join(names)}")
            if i not in out:
                out.append(i)
    return out


def run_bench(cases=None, *, scale_n=1, threads=None, repeat=3, use_torch=True,
              with_exact_long=False, precision="float32", eps=1e-3, seed=0,
              torch_omp_wait_policy="default", log=None):
    """Time numbarope and torch SDPA on the benchmark cases, interleaved.

    Parameters
    ----------
    cases : sequence of int or str, optional
        Case numbers (1-based) or names of :data:`CASES`; default all.
    scale_n : float or fractions.Fraction, optional
        Multiplies every ``n`` (``--quick`` is 1/8); at least 16 remains.
    threads : int, optional
        Threads for numbarope (numba and BLAS) and torch; default ``os.cpu_count()``.
    repeat : int, optional
        Timed calls per side after the warm-up call (best and median reported).
    use_torch : bool, optional
        Time torch SDPA if torch is installed.
    with_exact_long : bool, optional
        For the fast cases, also time numbarope's exact method on the same input
        (an extra row) and measure ``max|fast − exact|``.
    precision : {"float32", "float64", "default"}, optional
        Passed as ``precision=`` to numbarope's exact calls if ``rope_attention``
        has that parameter; ``"default"`` never passes it.
    eps : float, optional
        Tolerance of the fast path (``eps·max|V|``).
    seed : int, optional
        Base seed of :func:`make_inputs`.
    torch_omp_wait_policy : {"default", "passive", "active"}, optional
        ``OMP_WAIT_POLICY`` of the torch process; ``"default"`` unsets it.
    log : file-like, optional
        Progress messages (default ``sys.stderr``).

    Returns
    -------
    dict
        ``machine`` (:func:`machine_info` plus torch's version and threads),
        ``options``, ``rows`` (one dict per timed numbarope configuration: times
        in seconds, ``diff_torch`` = max |numbarope − torch|, ``err_exact`` =
        max |fast − exact|, ``bound`` = ``info.error_bound``, per-head info) and
        ``notes`` (strings).

    Raises
    ------
    ValueError
        Unknown case, ``repeat < 1``, ``threads < 1``, unknown ``precision``.
    """
    log = sys.stderr if log is None else log
    threads = os.cpu_count() if threads is None else int(threads)
    if threads < 1:
        raise ValueError(f"threads must be >= 1, got {threads}")
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    if precision not in ("float32", "float64", "default"):
        raise ValueError(f"precision={precision!r}: use float32, float64 or default")
    idx = _parse_cases(cases)
    notes = []
    machine = machine_info(threads)
    from threadpoolctl import threadpool_limits
    limiter = threadpool_limits(limits=threads)     # BLAS outside numbarope's tasks
    machine["blas_threads"] = threads
    # numbarope's one thread control: its kernels, BLAS inside them and scipy.fft
    common = {"workers": threads}
    machine["numbarope_workers"] = threads
    exact_extra = {"precision": precision} if precision != "default" else {}
    exact_precision = exact_extra.get("precision", "default")

    tmpdir = tempfile.mkdtemp(prefix="numbarope-bench-")
    worker = None
    if use_torch:
        if importlib.util.find_spec("torch") is None:
            machine["torch"] = "not installed"
            notes.append("torch is not installed: numbarope only")
        else:
            print("starting torch worker ...", file=log, flush=True)
            try:
                worker = _TorchWorker(threads, torch_omp_wait_policy, tmpdir)
                machine["torch"] = worker.hello["torch"]
                machine["torch_threads"] = worker.hello["threads"]
                machine["torch_omp_wait_policy"] = worker.hello["omp_wait_policy"]
                machine["torch_parallel_backend"] = worker.hello["parallel_backend"]
            except (RuntimeError, OSError, ValueError) as exc:
                machine["torch"] = "failed to start"
                notes.append(f"torch worker failed to start: {exc}")
                worker = None
    else:
        machine["torch"] = "not run (--no-torch)"

    live = {"worker": worker}

    def get_worker():
        """The torch worker, restarted if it died in an earlier case (e.g. out of memory)."""
        w = live["worker"]
        if w is not None and not w.alive:
            w.close()
            print("restarting torch worker ...", file=log, flush=True)
            try:
                w = _TorchWorker(threads, torch_omp_wait_policy, tmpdir)
            except (RuntimeError, OSError, ValueError):
                w = None
            live["worker"] = w
        return w

    rows = []
    rot = numbarope.Rotary()
    try:
        for i in idx:
            case = CASES[i]
            n = max(16, int(case.n * scale_n))
            print(f"case {i + 1} ({case.name}): n={n} E={case.E} causal={case.causal} "
                  f"method={case.method}", file=log, flush=True)
            rows.extend(_run_case(i + 1, case, n, numbarope, rot, get_worker, tmpdir, repeat,
                                  with_exact_long, exact_extra, exact_precision, eps, seed,
                                  common, log))
    finally:
        if live["worker"] is not None:
            live["worker"].close()
        if limiter is not None:
            limiter.restore_original_limits()
        for f in os.listdir(tmpdir):
            os.remove(os.path.join(tmpdir, f))
        os.rmdir(tmpdir)
    options = {"cases": [i + 1 for i in idx], "scale_n": str(scale_n), "threads": threads,
               "repeat": repeat, "with_exact_long": with_exact_long, "eps": eps,
               "seed": seed, "precision_requested": precision,
               "torch_omp_wait_policy": torch_omp_wait_policy}
    return {"machine": machine, "options": options, "rows": rows, "notes": notes}


def _run_case(num, case, n, nr, rot, get_worker, tmpdir, repeat, with_exact_long,
              exact_extra, exact_precision, eps, seed, common, log):
    """Warm-up, then ``repeat`` interleaved rounds of one case; the case's rows."""
    E = case.E
    scale = 1.0 / np.sqrt(E)
    q, k, v = make_inputs(n, E, case.radius, seed)
    base = dict(rotary=rot, is_causal=case.causal, scale=scale, **common)
    configs = [(case.method, dict(base, method=case.method, eps=eps,
                                  **(exact_extra if case.method == "exact" else {})))]
    if case.method == "fast" and with_exact_long:
        configs.append(("exact", dict(base, method="exact", **exact_extra)))

    worker = get_worker()
    torch_ok, torch_error, backend = worker is not None, None, None
    if torch_ok:
        path = os.path.join(tmpdir, "inputs.npz")
        np.savez(path, query=nr.apply_rotary(q, rot), key=nr.apply_rotary(k, rot), value=v)
        try:
            backend = worker.request(op="load", path=path, causal=case.causal,
                                     scale=scale).get("backend")
        except RuntimeError as exc:
            torch_ok, torch_error = False, str(exc)
            print(f"  torch failed: {exc}", file=log, flush=True)

    # warm-up: every call once; its outputs give the error columns
    outs, infos, errors = {}, {}, {}
    for label, kw in configs:
        try:
            (out, info), t = _timed(lambda: nr.rope_attention(q, k, v, return_info=True, **kw))
            outs[label], infos[label] = out, info
            print(f"  warm-up numbarope {label}: {t:.3g} s", file=log, flush=True)
        except (ValueError, TypeError, MemoryError) as exc:
            errors[label] = f"{type(exc).__name__}: {exc}"
            print(f"  numbarope {label} failed: {errors[label]}", file=log, flush=True)
    torch_out = None
    if torch_ok:
        save = os.path.join(tmpdir, "torch_out.npy")
        try:
            t = worker.request(op="run", save=save)["time"]
            torch_out = np.load(save)
            print(f"  warm-up torch: {t:.3g} s", file=log, flush=True)
        except RuntimeError as exc:
            torch_ok, torch_error = False, str(exc)
            print(f"  torch failed: {exc}", file=log, flush=True)

    # timed rounds, interleaved: numbarope config(s), then torch
    times = {label: [] for label in outs}
    torch_times = []
    for r in range(repeat):
        for label, kw in configs:
            if label in outs:
                _, t = _timed(lambda: nr.rope_attention(q, k, v, **kw))
                times[label].append(t)
        if torch_ok:
            try:
                torch_times.append(worker.request(op="run", save=None)["time"])
            except RuntimeError as exc:
                torch_ok, torch_error, torch_times = False, str(exc), []
        print(f"  round {r + 1}/{repeat}: "
              + ", ".join(f"{lb} {ts[-1]:.3g} s" for lb, ts in times.items())
              + (f", torch {torch_times[-1]:.3g} s" if torch_times else ""),
              file=log, flush=True)

    vmax = float(np.abs(v).max())
    rows = []
    for label, kw in configs:
        row = {"case": num, "name": case.name if label == case.method else f"{case.name} (exact)",
               "n": n, "E": E, "causal": case.causal, "input_radius": case.radius,
               "method_requested": label, "eps": eps if label == "fast" else None,
               "precision": exact_precision if label == "exact" else "default",
               "max_abs_value": vmax, "error": errors.get(label), "torch_error": torch_error,
               "torch_backend": backend}
        ts = times.get(label, [])
        row["numbarope_best"] = min(ts) if ts else None
        row["numbarope_median"] = statistics.median(ts) if ts else None
        row["numbarope_times"] = ts
        row["torch_best"] = min(torch_times) if torch_times else None
        row["torch_median"] = statistics.median(torch_times) if torch_times else None
        row["torch_times"] = torch_times
        row["speedup"] = (row["torch_best"] / row["numbarope_best"]
                          if ts and torch_times else None)
        info = infos.get(label)
        if info is not None:
            row["method"] = _per_head(info.method)
            row["algorithm"] = _per_head(info.algorithm)
            row["degree"] = info.to_dict()["degree"]
            row["radius"] = _per_head(info.radius)
            row["bound"] = float(np.max(np.asarray(info.error_bound, dtype=float)))
        else:
            row.update(method=None, algorithm=None, degree=None, radius=None, bound=None)
        out = outs.get(label)
        row["diff_torch"] = (float(np.abs(out.astype(np.float64) - torch_out).max())
                             if out is not None and torch_out is not None else None)
        row["err_exact"] = None
        if label == "fast" and out is not None and "exact" in outs:
            row["err_exact"] = float(np.abs(out.astype(np.float64)
                                            - outs["exact"].astype(np.float64)).max())
        rows.append(row)
    return rows


def _fmt_t(best, median):
    if best is None:
        return "—"
    return f"{best:.3g} ({median:.3g})"


def _fmt_e(x):
    return "—" if x is None else f"{x:.1e}"


def to_markdown(result):
    """Format :func:`run_bench`'s result as Markdown: machine, table, notes.

    Parameters
    ----------
    result : dict
        As returned by :func:`run_bench` (or read back from ``--json``).

    Returns
    -------
    str
        A header with the machine and versions, the table (columns: case, n, E,
        causal, numbarope method/algorithm, precision, numbarope s, torch s,
        speed-up, max |numbarope − torch|, max |fast − exact|, bound) and notes.
    """
    m, o = result["machine"], result["options"]
    torch_v = m.get("torch", "not installed")
    vmax = max((r["max_abs_value"] for r in result["rows"]), default=0.0)
    lines = [
        "### numbarope vs torch `scaled_dot_product_attention` (CPU)",
        "",
        f"* machine: {m['cpu']}, {m['logical_cores']} logical cores "
        f"({m['cores_available']} available), {m['platform']}",
        f"* threads: {m['threads']} (numbarope workers={m.get('numbarope_workers', '—')}"
        + f", BLAS: {m['blas_threads']}"
        + (f"; torch: {m['torch_threads']}, {m.get('torch_parallel_backend')}"
           if "torch_threads" in m else "") + "); OMP_WAIT_POLICY: numbarope "
        + str(m.get("omp_wait_policy") or "unset")
        + (f", torch {m.get('torch_omp_wait_policy') or 'unset'}" if "torch_threads" in m
           else ""),
        "* torch SDPA backend: "
        + (", ".join(dict.fromkeys(str(r.get("torch_backend")) for r in result["rows"]))
           if "torch_threads" in m else "—")
        + " (inputs given to torch as (1, heads, n, E))",
        f"* versions: numbarope {m['numbarope']}, numpy {m['numpy']}, scipy {m['scipy']}, "
        f"numba {m['numba']}, torch {torch_v}, Python {m['python']}",
        f"* date: {m['date']}; best (median) of {o['repeat']} calls after a warm-up call, "
        f"numbarope and torch interleaved; torch in its own process",
        f"* inputs: float32, heads = 1, Ev = E, scale = 1/√E, seed {o['seed']}, "
        f"fast eps = {o['eps']:g}; fast cases: every row pair has logit radius "
        f"scale·|q||k| ≤ 0.5",
        "",
        "| case | n | E | causal | numbarope method/algorithm | precision | numbarope s "
        "| torch s | torch/numbarope | max \\|Δ\\| vs torch | max \\|fast − exact\\| | bound |",
        "|---|--:|--:|:-:|---|---|--:|--:|--:|--:|--:|--:|",
    ]
    for r in result["rows"]:
        if r["error"]:
            what = f"{r['method_requested']}: failed"
        else:
            what = f"{_label(r['method'])}/{_label(r['algorithm'])}"
            if r.get("degree") and r["degree"][0] is not None and "fast" in r["method"]:
                what += f" (deg {_label(r['degree'])})"
        sp = "—" if r["speedup"] is None else f"{r['speedup']:.2f}×"
        lines.append(
            f"| {r['case']} {r['name']} | {r['n']} | {r['E']} | {'yes' if r['causal'] else 'no'} "
            f"| {what} | {r['precision']} | {_fmt_t(r['numbarope_best'], r['numbarope_median'])} "
            f"| {_fmt_t(r['torch_best'], r['torch_median'])} | {sp} | {_fmt_e(r['diff_torch'])} "
            f"| {_fmt_e(r['err_exact'])} | {_fmt_e(r['bound'])} |")
    lines += [
        "",
        "Times in seconds, best (median). torch/numbarope = torch best / numbarope best "
        "(> 1: numbarope faster). numbarope gets unrotated q, k with `rotary=Rotary()` "
        "(its time includes RoPE); torch gets q, k rotated by `numbarope.apply_rotary`. "
        "max |Δ| vs torch: max abs difference of the two outputs on the benchmark inputs; "
        "bound: numbarope's certified `info.error_bound` on max |out − true value| "
        f"(values have max |v| ≈ {vmax:.2g}).",
    ]
    errs = [f"case {r['case']} {r['name']}: {r['error']}" for r in result["rows"] if r["error"]]
    errs += [f"case {r['case']} torch: {r['torch_error']}" for r in result["rows"]
             if r["torch_error"] and r["name"] == CASES[r["case"] - 1].name]
    if any(r.get("torch_backend") == "MATH" for r in result["rows"]):
        errs.append("torch used its MATH backend (materializes the n×n matrix) on some "
                    "cases: its times there are not its best")
    for note in list(result["notes"]) + errs:
        lines.append(f"* {note}")
    return "\n".join(lines) + "\n"


def _scale_arg(s):
    try:
        f = fractions.Fraction(s)
    except (ValueError, ZeroDivisionError):
        raise argparse.ArgumentTypeError(f"not a number or fraction: {s!r}") from None
    if f <= 0:
        raise argparse.ArgumentTypeError(f"must be > 0, got {s}")
    return f


def _parser():
    p = argparse.ArgumentParser(
        prog="python -m numbarope.bench",
        description="Markdown speed table: numbarope exact and certified fast RoPE "
                    "attention against torch scaled_dot_product_attention (torch timed "
                    "in a clean process of its own).",
        epilog="cases: " + "; ".join(
            f"{i + 1} {c.name}: n={c.n} E={c.E} {'causal ' if c.causal else ''}{c.method}"
            + (f" R<={c.radius}" if c.radius else "") for i, c in enumerate(CASES)))
    p.add_argument("--cases", nargs="+", metavar="CASE",
                   help="case numbers (1-5) or names to run, e.g. --cases 1 4 or "
                        "--cases fast,fast-causal (default: all)")
    p.add_argument("--quick", action="store_true",
                   help="divide every n by 8 (a smoke run)")
    p.add_argument("--scale-n", type=_scale_arg, default=None, help=argparse.SUPPRESS)
    p.add_argument("--threads", type=int, default=None,
                   help="threads for numbarope (numba and BLAS) and torch "
                        f"(default: os.cpu_count() = {os.cpu_count()})")
    p.add_argument("--repeat", type=int, default=3,
                   help="timed calls per side after one warm-up call; best and median "
                        "are reported (default 3)")
    p.add_argument("--with-exact-long", action="store_true",
                   help="also time numbarope exact on the fast cases' input (n=65536: "
                        "seconds per call) and measure max|fast - exact|")
    p.add_argument("--precision", choices=("float32", "float64", "default"),
                   default="float32",
                   help="precision= passed to numbarope's exact calls when rope_attention "
                        "has that parameter; 'default' never passes it (default float32)")
    p.add_argument("--eps", type=float, default=1e-3,
                   help="tolerance of the fast path, relative to max|value| (default 1e-3)")
    p.add_argument("--seed", type=int, default=0, help="random seed of the inputs (default 0)")
    p.add_argument("--no-torch", action="store_true",
                   help="do not run torch even if it is installed")
    p.add_argument("--torch-omp-wait-policy", choices=("default", "passive", "active"),
                   default="default",
                   help="OMP_WAIT_POLICY of the torch process; 'default' unsets the "
                        "PASSIVE that numbarope's import sets (default: default)")
    p.add_argument("--json", metavar="PATH",
                   help="also write the machine, options and every measurement as JSON")
    return p


def main(argv=None):
    """Entry point of ``python -m numbarope.bench``; returns the exit code.

    Parameters
    ----------
    argv : list of str, optional
        Command-line arguments (default ``sys.argv[1:]``); see ``--help``.

    Returns
    -------
    int
        0 on success, 2 on bad options.
    """
    args = _parser().parse_args(argv)
    if args.scale_n is not None:
        scale_n = args.scale_n
    else:
        scale_n = fractions.Fraction(1, 8) if args.quick else fractions.Fraction(1)
    t0 = time.perf_counter()
    try:
        result = run_bench(args.cases, scale_n=scale_n, threads=args.threads,
                           repeat=args.repeat, use_torch=not args.no_torch,
                           with_exact_long=args.with_exact_long, precision=args.precision,
                           eps=args.eps, seed=args.seed,
                           torch_omp_wait_policy=args.torch_omp_wait_policy)
    except ValueError as exc:
        print(f"numbarope.bench: error: {exc}", file=sys.stderr)
        return 2
    result["wall_time"] = time.perf_counter() - t0
    sys.stdout.write(to_markdown(result))
    print(f"(bench wall time {result['wall_time']:.0f} s)", file=sys.stderr)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(result, f, indent=1, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
