#!/usr/bin/env python
"""A whole transformers model on numbarope: logits against "sdpa"/"eager", and time.

Builds a random Llama (no download; the test suite's small config, or a longer one)
and runs one forward over a batch with each attention implementation, each in a
process of its own (clean thread pools, one implementation per process), best of
``--repeat``. Prints the largest logit difference against "sdpa" and the times.

    python tools/hf_model.py                           # small model, 2 x 37 tokens, padded row
    python tools/hf_model.py --n 4096 --dtype float32  # one 4096-token sequence
    python tools/hf_model.py --n 4096 --head-dim 16 --init 0.02 --method auto
        # a model with small logits: the fast path takes the heads it certifies

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
    cfg = LlamaConfig(hidden_size=a.heads * a.head_dim, intermediate_size=2 * a.heads * a.head_dim,
                      num_attention_heads=a.heads, num_key_value_heads=a.kv_heads,
                      head_dim=a.head_dim, num_hidden_layers=a.layers, vocab_size=100,
                      max_position_embeddings=max(256, a.n),
                      rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                      initializer_range=a.init, pad_token_id=0)
    model = LlamaForCausalLM(cfg).to(getattr(torch, a.dtype)).eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (a.batch, a.n), generator=g)
    mask = torch.ones_like(ids)
    if a.batch > 1 and a.pad:
        mask[1, :a.pad] = 0                     # left padding in the second row
    return model, ids, mask


def child(a, impl):
    import numpy as np
    import torch
    if impl == "numbarope":
        import numbarope.integrations as ni
        ni.register(method=a.method, eps=a.eps)
    model, ids, mask = _model(a)
    model.config._attn_implementation = impl
    model.set_attn_implementation(impl)
    times = []
    with torch.no_grad():
        for _ in range(a.repeat):
            t = time.perf_counter()
            logits = model(input_ids=ids, attention_mask=mask).logits
            times.append(time.perf_counter() - t)
    keep = mask.bool().numpy()
    np.save(a.out + f".{impl}.npy", logits.double().numpy()[keep])
    print(json.dumps({"impl": impl, "best": min(times), "times": times}))


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--n", type=int, default=37, help="tokens per row")
    ap.add_argument("--batch", type=int, default=None, help="rows (default 2 if n < 512 else 1)")
    ap.add_argument("--pad", type=int, default=5, help="left padding of row 2")
    ap.add_argument("--heads", type=int, default=4, help="query heads")
    ap.add_argument("--kv-heads", type=int, default=2, help="key/value heads")
    ap.add_argument("--head-dim", type=int, default=16)
    ap.add_argument("--layers", type=int, default=2)
    ap.add_argument("--init", type=float, default=0.2, help="initializer_range")
    ap.add_argument("--dtype", default="float64", choices=["float32", "float64"])
    ap.add_argument("--method", default="auto", choices=["auto", "exact", "fast"],
                    help="numbarope's method")
    ap.add_argument("--eps", type=float, default=1e-3, help="numbarope's eps")
    ap.add_argument("--repeat", type=int, default=3, help="forwards; the best is reported")
    ap.add_argument("--impls", default="eager,sdpa,numbarope")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--out", default="/tmp/hf_model", help="prefix of the logits files")
    a = ap.parse_args()
    if a.batch is None:
        a.batch = 2 if a.n < 512 else 1
    if a.child:
        return child(a, a.child)
    import numpy as np
    res = {}
    for impl in a.impls.split(","):
        cmd = [sys.executable, __file__, "--child", impl] + [x for x in sys.argv[1:]]
        r = subprocess.run(cmd, capture_output=True, text=True)
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            sys.exit(f"{impl} failed")
        res[impl] = json.loads(r.stdout.strip().splitlines()[-1])
    ref = np.load(a.out + ".sdpa.npy")
    print(f"random Llama: {a.layers} layers, {a.heads} query / {a.kv_heads} kv heads of "
          f"dim {a.head_dim}, init {a.init}, {a.dtype}, batch {a.batch} x {a.n} tokens"
          + (f" (row 2 left-padded by {a.pad})" if a.batch > 1 and a.pad else "")
          + f"; numbarope method={a.method}, eps={a.eps}")
    base = res.get("sdpa")
    for impl, r in res.items():
        d = np.abs(np.load(a.out + f".{impl}.npy") - ref).max()
        med = float(np.median(r["times"]))
        ratio = (f"   / sdpa: best {r['best'] / base['best']:.2f}x, median "
                 f"{med / np.median(base['times']):.2f}x" if base else "")
        print(f"  {impl:10s} best of {a.repeat}: {1e3 * r['best']:.2f} ms, median "
              f"{1e3 * med:.2f} ms   max|logits - sdpa| = {d:.1e}{ratio}")


if __name__ == "__main__":
    main()
