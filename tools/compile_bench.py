#!/usr/bin/env python
"""A transformers model's forward under torch.compile against the uncompiled one.

Builds a random Llama (no download) and times its forward (inference mode) with each
attention implementation, uncompiled and ``torch.compile(model, fullgraph=True)``
(inductor): per implementation a process of its own (clean thread pools), which
compiles, warms both up, then alternates uncompiled and compiled forwards
``--repeat`` times and keeps the best of each (alternating, so that the load of a
shared machine falls on both alike); ``--rounds`` such processes per implementation,
interleaved. Prints the best times of each process, their ratio, the compile time
(first call) and the largest logit difference between compiled and uncompiled.

    python tools/compile_bench.py                    # 4 layers, hidden 256, 2 x 512 tokens
    python tools/compile_bench.py --n 256 --batch 1 --rounds 5
    python tools/compile_bench.py --impls numbarope --pad 7 --dtype float64

Needs the ``compat`` extra (torch, transformers).
"""
import argparse
import json
import subprocess
import sys
import time


def _model(a):
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM
    torch.manual_seed(0)
    cfg = LlamaConfig(hidden_size=a.hidden, intermediate_size=2 * a.hidden,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      head_dim=a.hidden // a.heads, num_hidden_layers=a.layers,
                      vocab_size=1000, max_position_embeddings=max(256, a.n),
                      initializer_range=0.02, pad_token_id=0)
    model = LlamaForCausalLM(cfg).to(getattr(torch, a.dtype)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 1000, (a.batch, a.n), generator=g)
    mask = torch.ones_like(ids)
    if a.batch > 1 and a.pad:
        mask[1, :a.pad] = 0                     # left padding in the second row
    return model, ids, mask


def child(a, impl):
    import torch
    if impl == "numbarope":
        import numbarope.integrations as ni
        ni.register(method=a.method)
    model, ids, mask = _model(a)
    model.set_attn_implementation(impl)
    kw = {"input_ids": ids, "attention_mask": mask} if a.pad else {"input_ids": ids}
    compiled = torch.compile(model, fullgraph=True)
    best = {"eager": float("inf"), "compiled": float("inf")}
    with torch.inference_mode():
        ref = model(**kw).logits
        t = time.perf_counter()
        logits = compiled(**kw).logits          # compiles
        first = time.perf_counter() - t
        for i in range(a.warmup + a.repeat):
            for name, f in (("eager", model), ("compiled", compiled)):
                t = time.perf_counter()
                f(**kw)
                if i >= a.warmup:
                    best[name] = min(best[name], time.perf_counter() - t)
    real = mask.bool()
    diff = float((logits - ref)[real].abs().max())
    print(json.dumps(dict(best, impl=impl, first=first, diff=diff)))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=512, help="tokens per row")
    ap.add_argument("--batch", type=int, default=2, help="rows")
    ap.add_argument("--pad", type=int, default=0,
                    help="left padding of row 2 (0: no attention_mask is passed)")
    ap.add_argument("--hidden", type=int, default=256, help="hidden size")
    ap.add_argument("--heads", type=int, default=4, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=4, help="key/value heads")
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--dtype", default="float32", choices=["float32", "float64"])
    ap.add_argument("--method", default="auto", choices=["auto", "exact"],
                    help="numbarope's method")
    ap.add_argument("--warmup", type=int, default=3, help="untimed forwards of each first")
    ap.add_argument("--repeat", type=int, default=10,
                    help="timed forwards of each; the best counts")
    ap.add_argument("--rounds", type=int, default=3, help="processes per configuration")
    ap.add_argument("--impls", default="numbarope,sdpa")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.child:
        return child(a, a.child)
    impls = a.impls.split(",")
    results = {impl: [] for impl in impls}
    for _ in range(a.rounds):
        for impl in impls:
            out = subprocess.run([sys.executable, __file__] + sys.argv[1:] + ["--child", impl],
                                 check=False, capture_output=True, text=True)
            if out.returncode:
                sys.exit(f"{impl} failed:\n{out.stderr[-3000:]}")
            results[impl].append(json.loads(out.stdout.strip().splitlines()[-1]))
    print(f"Llama {a.layers} layers, hidden {a.hidden}, {a.heads}/{a.kv_heads} heads, "
          f"{a.batch} x {a.n} tokens (pad {a.pad}), {a.dtype}; forward in inference mode; "
          f"per process the best of {a.repeat} alternating calls; {a.rounds} processes")
    for impl in impls:
        rs = results[impl]
        for name in ("eager", "compiled"):
            print(f"{impl:>10} {name:>8}: "
                  + " ".join(f"{x[name] * 1e3:7.1f}" for x in rs) + " ms")
        print(f"{impl:>10} compiled/eager: "
              + " ".join(f"{x['compiled'] / x['eager']:7.2f}" for x in rs)
              + f"; compile (first call) {min(x['first'] for x in rs):.1f}-"
              f"{max(x['first'] for x in rs):.1f} s; max|logits compiled - eager| "
              f"{max(x['diff'] for x in rs):.1e}")


if __name__ == "__main__":
    main()
