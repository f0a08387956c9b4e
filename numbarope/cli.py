"""Command line: ``numbarope demo | run | plan``.

``numbarope demo``   real all-MiniLM-L6-v2 heads with RoPE + a long bounded case
``numbarope run IN.npz -o OUT.npz [options]``   attention of arrays in a file
``numbarope plan IN.npz [options]``   what auto would do per head, and why

Errors in the inputs end with a one-line message on stderr and exit code 2.
"""

import argparse
import os
import sys
import time

import numpy as np

__all__ = ["main"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    res = fn(*args, **kwargs)
    return res, time.perf_counter() - t


def _best(fn, *args, repeat=3, **kwargs):
    """Result and best wall time of ``repeat`` calls (kernels already compiled)."""
    best = np.inf
    for _ in range(repeat):
        res, t = _timed(fn, *args, **kwargs)
        best = min(best, t)
    return res, best


def _warm():
    """Compile (or load from cache) every kernel the demo times, on tiny inputs."""
    import numbarope as nr
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((1, 5, 2)) * 0.1 for _ in range(3))
    b = np.zeros(9)
    rel = nr.rotary_relative_matrices(5, None, 2)
    for dt in (np.float64, np.float32):
        qd, kd, vd = (a.astype(dt) for a in (q, k, v))
        for causal in (False, True):
            nr.rope_attention(qd, kd, vd, method="exact", rotary=True, is_causal=causal)
            nr.rope_attention(qd, kd, vd, method="fast", rotary=True, is_causal=causal)
    nr.rope_attention(q, k, v, method="exact", relative=rel)
    nr.rope_attention(q, k, v, method="fast", rotary=True, bias=b)
    nr.rope_attention(q, k, v, method="fast", relative=rel)


def demo(args):
    import numbarope as nr
    out = sys.stdout
    if not 0 < args.eps < 1:
        raise CLIError(f"--eps must lie in (0, 1), got {args.eps}")
    sample = nr.load_sample()
    if args.layers is not None:
        bad = sorted(set(args.layers) - set(sample.layers))
        if bad or not args.layers:
            raise CLIError(f"--layers {bad or '(none)'}: the bundled sample holds layers "
                           f"{list(sample.layers)}")
    t0 = time.perf_counter()
    print("numbarope demo: exact vs certified fast RoPE attention "
          "(Alman & Song 2025, arXiv:2505.11892)", file=out)
    print("compiling / loading kernels ...", end=" ", flush=True, file=out)
    _, tw = _timed(_warm)
    print(f"{tw:.1f} s", file=out)

    L, H, n, E = sample.query.shape
    rot = nr.Rotary()                      # standard RoPE: base 10000, rotate_half
    layers = sample.layers if args.layers is None else tuple(args.layers)
    eps = args.eps
    print(f"\n(a) real sample: {sample.metadata.get('model_name', 'all-MiniLM-L6-v2')}, "
          f"layers {layers}, {H} heads, n={n} tokens, head_dim E={E}; RoPE {rot.layout} "
          f"base {rot.base:g}; eps={eps:g}", file=out)
    print(f"    input text fed to the model: {sample.metadata.get('text_source', '?')} "
          f"(first {n} tokens)", file=out)
    print("    columns: R = logit radius s·max|q|·max|k|; auto = method numbarope picks; "
          "deg, features = polynomial\n    degree and feature count of the fast path; "
          "err fast = measured max|fast - exact| where\n    the fast path is feasible; "
          "bound = its certified bound; t = wall time; why = the planner's reason",
          file=out)
    for scale_name, scale in (("1/sqrt(E)", 1 / np.sqrt(E)), ("1/E (paper)", 1.0 / E)):
        print(f"\n  scale = {scale_name} = {scale:.4g}", file=out)
        print(f"  {'layer':>5} {'head':>4} {'R':>7} {'auto':>5} {'deg':>4} {'features':>9} "
              f"{'err fast':>9} {'bound':>9} {'t exact':>8} {'t fast':>8}  why", file=out)
        for li, layer in enumerate(sample.layers):
            if layer not in layers:
                continue
            for h in range(H):
                q, k, v = sample.query[li, h], sample.key[li, h], sample.value[li, h]
                info = nr.plan(q, k, v, rotary=rot, scale=scale, eps=eps)
                hp = info.heads[0]
                ex, te = _timed(nr.rope_attention, q, k, v, rotary=rot, scale=scale,
                                method="exact")
                err = tf = bound = None
                try:        # feasible for the fast path (limits, eps), even if not chosen?
                    fp = nr.plan(q, k, v, rotary=rot, scale=scale, eps=eps,
                                 method="fast").heads[0]
                except ValueError:
                    fp = None
                if fp is not None:
                    hp.degree, hp.features = fp.degree, fp.features
                    (fo, finfo), tf = _timed(nr.rope_attention, q, k, v, rotary=rot,
                                             scale=scale, method="fast", eps=eps,
                                             return_info=True)
                    err = float(np.abs(fo - ex).max())
                    bound = float(finfo.heads[0].error_bound)
                    if err > bound:
                        raise RuntimeError(f"certified bound violated at layer {layer} "
                                           f"head {h}: {err} > {bound}")
                deg = "-" if hp.degree is None else hp.degree
                feat = "-" if hp.features is None else f"{hp.features:.3g}"
                print(f"  {layer:>5} {h:>4} {hp.radius:7.2f} {hp.method:>5} {deg:>4} "
                      f"{feat:>9} {_fmt(err):>9} {_fmt(bound):>9} {te * 1e3:6.1f}ms "
                      f"{_fmt_ms(tf):>8}  {hp.reason}", file=out)
    # (b) long bounded case
    nb, Eb, Evb, R = args.n, 16, 16, 0.5
    rng = np.random.default_rng(1)
    scale = 1 / np.sqrt(Eb)
    norm = np.sqrt(R / scale)              # max‖q‖·max‖k‖·s = R
    q = rng.standard_normal((nb, Eb))
    q *= norm / np.linalg.norm(q, axis=1, keepdims=True) * rng.uniform(0.5, 1, (nb, 1))
    k = rng.standard_normal((nb, Eb))
    k *= norm / np.linalg.norm(k, axis=1, keepdims=True) * rng.uniform(0.5, 1, (nb, 1))
    v = rng.standard_normal((nb, Evb))
    print(f"\n(b) long bounded case: n={nb}, E={Eb}, Ev={Evb}, RoPE, scale 1/sqrt(E), "
          f"logit radius R <= {R}, eps={eps:g}", file=out)
    print("  t exact, t fast: best of 3 calls", file=out)
    print(f"  {'mask':>7} {'algorithm':>10} {'deg':>4} {'features':>9} {'t exact':>8} "
          f"{'t fast':>8} {'speed-up':>8} {'max err':>9} {'bound':>9} {'eps*max|V|':>10}",
          file=out)
    for causal in (False, True):
        info = nr.plan(q, k, v, rotary=rot, is_causal=causal, eps=eps)
        ex, te = _best(nr.rope_attention, q, k, v, rotary=rot, is_causal=causal,
                       method="exact")
        (fo, finfo), tf = _best(nr.rope_attention, q, k, v, rotary=rot, is_causal=causal,
                                method="fast", eps=eps, return_info=True)
        hp = finfo.heads[0]
        err = float(np.abs(fo - ex).max())
        print(f"  {'causal' if causal else 'none':>7} {hp.algorithm:>10} {hp.degree:>4} "
              f"{hp.features:>9} {te:7.2f}s {tf:7.2f}s {te / tf:7.1f}x {err:9.2e} "
              f"{hp.error_bound:9.2e} {eps * np.abs(v).max():10.2e}   "
              f"(auto: {info.heads[0].method})", file=out)
        if err > hp.error_bound:
            raise RuntimeError(f"certified bound violated: err {err} > {hp.error_bound}")
    print(f"\ndone in {time.perf_counter() - t0:.1f} s. R is the logit radius "
          f"s·max|q|·max|k|; 'bound' the certified max |fast - exact|.", file=out)
    return 0


def _fmt(x):
    return "-" if x is None else f"{x:9.2e}"


def _fmt_ms(t):
    return "-" if t is None else f"{t * 1e3:6.1f}ms"


_OPTIONAL = ("relative", "bias")


def _load_npz(path):
    if not os.path.exists(path):
        raise CLIError(f"input file {path!r} does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise CLIError(f"cannot read {path!r}: it is not a .npz archive (save the inputs with "
                       f"np.savez(path, query=..., key=..., value=...))") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        raise CLIError(f"{path!r} holds a single array (.npy), not a .npz archive; save "
                       f"the inputs with np.savez(path, query=..., key=..., value=...)")
    with data:
        missing = [k for k in ("query", "key", "value") if k not in data.files]
        if missing:
            raise CLIError(f"{path!r} lacks array(s) {missing}; it has {sorted(data.files)}; "
                           f"expected 'query', 'key', 'value' (optional 'relative', 'bias')")
        unknown = sorted(set(data.files) - {"query", "key", "value", *_OPTIONAL})
        if unknown:
            raise CLIError(f"{path!r} holds array(s) {unknown} that numbarope does not use; "
                           f"expected only 'query', 'key', 'value', 'relative', 'bias'")
        arrays = {}
        for k in data.files:
            try:
                arrays[k] = data[k]
            except ValueError:
                raise CLIError(f"array {k!r} in {path!r} holds Python objects; save "
                               f"float32/float64 arrays") from None
        return arrays


def _attention_kwargs(args, arrays):
    import numbarope as nr
    kw = dict(method=args.method, eps=args.eps, degree=args.degree,
              is_causal=args.causal, scale=args.scale)
    for name in _OPTIONAL:
        if name in arrays:
            kw[name] = arrays[name]
    rotary_flags = [f for f, v in (("--rotary-base", args.rotary_base),
                                   ("--rotary-dim", args.rotary_dim),
                                   ("--layout", args.layout)) if v is not None]
    if rotary_flags and ("relative" in arrays or args.no_rotary):
        why = "the input holds 'relative'" if "relative" in arrays else "--no-rotary is given"
        raise CLIError(f"{', '.join(rotary_flags)} do not apply: {why} (no rotary "
                       f"embedding is used)")
    if "relative" not in arrays and not args.no_rotary:
        kw["rotary"] = nr.Rotary(
            base=10000.0 if args.rotary_base is None else args.rotary_base,
            layout=args.layout or "half", dim=args.rotary_dim)
    return kw


def run(args):
    import numbarope as nr
    if os.path.abspath(args.output) == os.path.abspath(args.input) or (
            os.path.exists(args.output) and os.path.samefile(args.output, args.input)):
        raise CLIError(f"the output {args.output!r} is the input file; choose another name "
                       f"(it would be overwritten)")
    arrays = _load_npz(args.input)
    outdir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(outdir) or not os.access(outdir, os.W_OK):
        raise CLIError(f"cannot write the output {args.output!r}: folder {outdir!r} "
                       f"is missing or not writable")
    kw = _attention_kwargs(args, arrays)
    out, info = nr.rope_attention(arrays["query"], arrays["key"], arrays["value"],
                                  return_info=True, verify=args.verify, **kw)
    res = {"out": out}
    for f in ("method", "algorithm", "radius", "error_bound"):
        res[f"info_{f}"] = np.asarray(getattr(info, f)).astype(
            str if f in ("method", "algorithm") else np.float64)
    res["info_degree"] = np.array([-1 if h.degree is None else h.degree for h in info.heads]
                                  ).reshape(info.batch_shape)
    if args.verify:
        res["info_observed_error"] = np.array(
            [np.nan if h.observed_error is None else h.observed_error for h in info.heads]
        ).reshape(info.batch_shape)
    try:
        with open(args.output, "wb") as fh:
            np.savez(fh, **res)
    except OSError as exc:
        raise CLIError(f"cannot write the output {args.output!r}: {exc.strerror}") from None
    if not args.quiet:
        print(info.table())
        print(f"wrote {args.output}: out {out.shape} {out.dtype}")
    return 0


def plan_cmd(args):
    import numbarope as nr
    arrays = _load_npz(args.input)
    kw = _attention_kwargs(args, arrays)
    info = nr.plan(arrays["query"], arrays["key"], arrays["value"], **kw)
    print(info.table())
    return 0


def _positive_int(s):
    v = int(s)
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {s}")
    return v


class _Parser(argparse.ArgumentParser):
    """argparse with one-line errors (exit code 2), as every other CLI error."""

    def error(self, message):
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


def _parser():
    p = _Parser(
        prog="numbarope",
        description="Exact and certified fast RoPE attention on CPUs (Alman & Song 2025).")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser("demo", help="real transformer heads + a long bounded case")
    d.add_argument("--eps", type=float, default=1e-3, help="tolerated error / max|V|")
    d.add_argument("--n", type=_positive_int, default=16384,
                   help="length of the long bounded case (default 16384)")
    d.add_argument("--layers", type=int, nargs="*", default=None,
                   help="layers of the sample to show (default: all bundled)")
    for name, fn in (("run", run), ("plan", plan_cmd)):
        r = sub.add_parser(name, help="attention of query/key/value in a .npz" if name == "run"
                           else "per-head plan (method, degree, cost) of a .npz")
        r.set_defaults(fn=fn)
        r.add_argument("input", help=".npz with query, key, value (optional relative, bias)")
        if name == "run":
            r.add_argument("-o", "--output", required=True, help="output .npz")
            r.add_argument("--verify", type=int, default=0,
                           help="rows per fast head checked exactly")
            r.add_argument("-q", "--quiet", action="store_true")
        r.add_argument("--method", default="auto", choices=("auto", "exact", "fast"))
        r.add_argument("--eps", type=float, default=1e-3)
        r.add_argument("--degree", type=int, default=None)
        r.add_argument("--causal", action="store_true")
        r.add_argument("--scale", type=float, default=None, help="default 1/sqrt(E)")
        r.add_argument("--no-rotary", action="store_true",
                       help="plain attention (rotary is applied by default unless the "
                            "file holds 'relative')")
        r.add_argument("--rotary-base", type=float, default=None, help="default 10000")
        r.add_argument("--rotary-dim", type=int, default=None,
                       help="rotate only the leading dims (partial rotary)")
        r.add_argument("--layout", default=None, choices=("half", "interleaved"),
                       help="feature pairing (default half: HF rotate_half)")
    d.set_defaults(fn=demo)
    return p


def main(argv=None):
    """Entry point of the ``numbarope`` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except (CLIError, ValueError, TypeError) as exc:
        print(f"numbarope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except MemoryError:
        print(f"numbarope {args.command}: error: out of memory", file=sys.stderr)
        return 2
    except BrokenPipeError:          # e.g. `numbarope plan x.npz | head`: not an error
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        return 0


if __name__ == "__main__":
    sys.exit(main())
