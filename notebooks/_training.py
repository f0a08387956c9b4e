"""A tiny causal character model whose attention stays in the bounded regime.

Shared by ``05_training.ipynb`` and ``asv_benchmarks/benchmarks/bench_training.py``
(which imports this file by its path). Needs torch.

The model (:class:`CharModel`) is a pre-norm transformer with ``layers`` blocks of
``heads`` heads of dimension :data:`HEAD_DIM` = 16 and a 4× MLP. In every head the
queries and keys are L2-normalised, then their logits multiplied by a fixed
temperature ``s`` (the attention ``scale``): the logit radius of Alman & Song
(arXiv:2505.11892), ``R = s·max‖q‖·max‖k‖``, is ``s`` (up to float32 rounding of the
norms) whatever the weights, and RoPE (``rotary=``, applied by numbarope) keeps the
norms. This is the paper's bounded-entry regime built in: a fixed polynomial degree
certifies ``eps`` at every training step, so ``method="fast"`` never falls back.
The price: with ``s = 0.5`` a head's weights differ by at most a factor
``e^(2s) = e`` within a row, a soft average rather than a sharp lookup.

The text (:func:`corpus`) ships with numbarope itself: the docstrings of its own
modules, classes and functions (a few hundred kB of English and formulas), read from the
installed package's source files. The package ships no other text long enough
(``numbarope/data`` holds Q/K/V arrays only, of 512 tokens of the GPL-3).
"""

from __future__ import annotations

import ast
import copy
import pathlib
import time
from importlib import resources

import numpy as np
import torch
from torch import nn
import torch.nn.functional as F

import numbarope

#: Head dimension (queries, keys and values).
HEAD_DIM = 16
#: Attention scale = logit radius R of unit queries and keys.
TEMPERATURE = 0.5
#: Tolerance of the fast path, relative to max|value| of a head.
EPS = 1e-3
#: The rotary embedding numbarope applies to queries and keys (base 1e4).
ROTARY = numbarope.Rotary()


def corpus() -> str:
    """The docstrings of numbarope's source (modules, classes, functions), in file
    order, separated by blank lines: the longest text that ships inside the package."""
    root = resources.files("numbarope")
    docs = []
    for path in sorted(pathlib.Path(str(root)).rglob("*.py")):
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef,
                                 ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc:
                    docs.append(doc)
    return "\n\n".join(docs)


def encode(text: str) -> tuple[np.ndarray, list[str]]:
    """``(ids, chars)``: the text as int64 character ids, and the vocabulary (sorted)."""
    chars = sorted(set(text))
    index = {c: i for i, c in enumerate(chars)}
    return np.fromiter((index[c] for c in text), np.int64, len(text)), chars


def batches(ids: np.ndarray, n: int, batch: int, steps: int, seed: int = 0) -> np.ndarray:
    """``(steps, batch, n + 1)`` windows of ``ids`` at random offsets (fixed seed):
    inputs ``[..., :-1]``, next-character targets ``[..., 1:]``."""
    if len(ids) < n + 1:
        raise ValueError(f"text of {len(ids)} characters is shorter than n + 1 = {n + 1}")
    starts = np.random.default_rng(seed).integers(0, len(ids) - n, size=(steps, batch))
    return ids[starts[..., None] + np.arange(n + 1)]


class BoundedAttention(nn.Module):
    """Causal RoPE self-attention with unit queries and keys and a fixed scale, by
    ``numbarope.rope_attention``; each call appends ``(AttentionInfo, max|V| per head)``
    to the list it is given."""

    def __init__(self, dim: int, heads: int, temperature: float = TEMPERATURE):
        super().__init__()
        self.heads, self.temperature = heads, float(temperature)
        self.qkv = nn.Linear(dim, 3 * heads * HEAD_DIM, bias=False)
        self.proj = nn.Linear(heads * HEAD_DIM, dim, bias=False)

    def forward(self, x, method: str, eps: float, infos: list):
        B, n, _ = x.shape
        q, k, v = self.qkv(x).view(B, n, 3, self.heads, HEAD_DIM).permute(2, 0, 3, 1, 4)
        q, k = F.normalize(q, dim=-1), F.normalize(k, dim=-1)
        out, info = numbarope.rope_attention(
            q, k, v.contiguous(), rotary=ROTARY, is_causal=True, scale=self.temperature,
            method=method, eps=eps, return_info=True)
        infos.append((info, v.detach().abs().amax(dim=(-2, -1)).numpy()))
        return self.proj(out.transpose(1, 2).reshape(B, n, self.heads * HEAD_DIM))


class Block(nn.Module):
    """Pre-norm transformer block: bounded attention, then a 4× GELU MLP."""

    def __init__(self, dim: int, heads: int, temperature: float = TEMPERATURE):
        super().__init__()
        self.ln1, self.ln2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
        self.attn = BoundedAttention(dim, heads, temperature)
        self.mlp = nn.Sequential(nn.Linear(dim, 4 * dim), nn.GELU(), nn.Linear(4 * dim, dim))

    def forward(self, x, method, eps, infos):
        x = x + self.attn(self.ln1(x), method, eps, infos)
        return x + self.mlp(self.ln2(x))


class CharModel(nn.Module):
    """Character embedding, ``layers`` :class:`Block`\\ s, final LayerNorm, linear head.
    No position embedding: positions enter through RoPE only."""

    def __init__(self, vocab: int, dim: int = 32, heads: int = 2, layers: int = 2,
                 temperature: float = TEMPERATURE):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, temperature) for _ in range(layers))
        self.ln = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, vocab)

    def forward(self, ids, method: str = "exact", eps: float = EPS):
        """``(logits (B, n, vocab), infos)``: one ``(AttentionInfo, max|V|)`` per layer."""
        infos: list = []
        x = self.embed(ids)
        for block in self.blocks:
            x = block(x, method, eps, infos)
        return self.head(self.ln(x)), infos


def build(vocab: int, seed: int = 0, **kwargs) -> CharModel:
    """A :class:`CharModel` with weights drawn from ``torch.manual_seed(seed)``."""
    torch.manual_seed(seed)
    return CharModel(vocab, **kwargs)


def loss_of(model, batch, method="exact", eps=EPS):
    """``(mean next-character cross-entropy in nats, infos)`` of a ``(B, n + 1)`` batch."""
    ids = torch.as_tensor(batch)
    logits, infos = model(ids[:, :-1], method, eps)
    return F.cross_entropy(logits.reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)), infos


def make_step(model, method: str, lr: float = 3e-3, eps: float = EPS):
    """A training step of ``model`` with its own Adam: ``step(batch)`` runs forward,
    backward and the optimizer step and returns ``(loss, infos)``; ``step.split`` then
    holds the wall times ``(forward and loss, backward and Adam)`` of that call."""
    opt = torch.optim.Adam(model.parameters(), lr=lr)

    def step(batch):
        t0 = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss, infos = loss_of(model, batch, method, eps)
        t1 = time.perf_counter()
        loss.backward()
        opt.step()
        step.split = (t1 - t0, time.perf_counter() - t1)
        return float(loss.detach()), infos

    step.split = (float("nan"), float("nan"))
    return step


def summarise(infos) -> dict:
    """Over the heads of all layers of one forward: the largest certified bound
    relative to its head's max|V| (``bound``, to compare with eps), the largest
    radius, and the methods, algorithms and degrees used."""
    rel = [np.asarray(info.error_bound).ravel() / np.maximum(vmax.ravel(), 1e-300)
           for info, vmax in infos]
    return dict(
        bound=float(max(r.max() for r in rel)),
        radius=float(max(np.max(info.radius) for info, _ in infos)),
        methods=sorted({str(m) for info, _ in infos for m in np.ravel(info.method)}),
        algorithms=sorted({str(a) for info, _ in infos for a in np.ravel(info.algorithm)}),
        degrees=sorted({int(d) for info, _ in infos for d in np.ravel(info.degree)
                        if d is not None and np.isfinite(d)}))


def train(model, data: np.ndarray, method: str, lr: float = 3e-3, eps: float = EPS,
          warmup: bool = True, log_every: int = 0) -> dict:
    """Train ``model`` in place on ``data`` (``(steps, B, n + 1)``, see :func:`batches`)
    with ``method``; return per step the loss, the wall time of the whole step
    (``time``: forward, backward, Adam; ``forward``: its forward and loss part) and
    :func:`summarise` of its attention (``bound``, ``radius`` per step; the sets of
    ``methods``, ``algorithms`` and ``degrees`` over all steps).

    ``warmup``: first run one step on a throwaway copy of the model (same batch), so
    that numba's compilation (or cache load) and the first touch of memory at this
    size are not in the first timed step; the model itself is not changed by it.
    """
    if warmup:
        make_step(copy.deepcopy(model), method, lr, eps)(data[0])
    step = make_step(model, method, lr, eps)
    out: dict = dict(loss=[], time=[], forward=[], bound=[], radius=[], methods=set(),
                     algorithms=set(), degrees=set())
    for i, batch in enumerate(data):
        t0 = time.perf_counter()
        loss, infos = step(batch)
        out["time"].append(time.perf_counter() - t0)
        out["forward"].append(step.split[0])
        out["loss"].append(loss)
        s = summarise(infos)
        out["bound"].append(s["bound"])
        out["radius"].append(s["radius"])
        for key in ("methods", "algorithms", "degrees"):
            out[key].update(s[key])
        if log_every and (i % log_every == 0 or i == len(data) - 1):
            print(f"  {method} step {i:4d}: loss {loss:.4f}, {out['time'][-1]:.3f} s")
    for key in ("loss", "time", "forward", "bound", "radius"):
        out[key] = np.array(out[key])
    return out


@torch.no_grad()
def evaluate(model, data: np.ndarray, method: str = "exact", eps: float = EPS) -> float:
    """Mean loss of ``model`` over the batches of ``data`` (no gradients)."""
    return float(np.mean([float(loss_of(model, batch, method, eps)[0]) for batch in data]))
