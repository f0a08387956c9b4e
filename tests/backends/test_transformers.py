"""numbarope.backends.transformers (short name ``numbarope.integrations``): numbarope
as transformers' attention backend (``attn_implementation="numbarope"``).

A small random Llama (hidden 64, 4 query / 2 key-value heads of dim 16, 2 layers,
rope_theta 50000, vocabulary 100; no download) against transformers' own "sdpa"
and "eager" backends: one attention layer, the whole model's logits, cached
decoding and generate(), on a batch of 2 x 37 tokens whose second row is
left-padded. Unsupported masks must raise, never compute something else.

Tolerances. The references are torch's: "sdpa" (torch's math kernel on the CPU,
the inputs' dtype throughout) and "eager" (transformers' matmul + softmax, the
softmax always in float32). In float64, numbarope's exact path and sdpa agree to
rounding, ~1e-16 relative per layer; amplified through 2 layers and the head
(logits ~7) that stays below 1e-12. Eager's float32 softmax limits its agreement
to ~1e-6 even in float64 (we allow 1e-5), and eager in float64 turns a left-padded
row into NaN (transformers adds finfo(float64).min, which is -inf in the float32
softmax), so padded float64 batches are compared with sdpa only. In float32 both
sides round at ~6e-8 relative; through the model 1e-5 absolute on logits ~7.

Weights are initialised with std 0.2 (transformers' default 0.02 makes attention
contribute almost nothing to the logits, and a wrong mask would go unseen):
here a missing padding mask changes the logits by ~7.
"""

import threading
import time
import types
import weakref

import numpy as np
import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

import numbarope.backends.transformers as backend  # noqa: E402  (registers "numbarope")
from numbarope.backends import _hf_core as core  # noqa: E402  (the mask reading)
import numbarope.integrations  # noqa: E402  (the short name of the backend)
from numbarope.bias import Chunked, Packed, Window  # noqa: E402
from transformers import (AttentionInterface, DynamicCache, LlamaConfig,  # noqa: E402
                          LlamaForCausalLM)
from transformers.masking_utils import (AttentionMaskInterface,  # noqa: E402
                                        create_causal_mask)

N_TOKENS, N_PAD = 37, 5
TIGHT = 1e-12      # float64, numbarope exact vs sdpa (see the module docstring)
EAGER = 1e-5       # against eager's float32 softmax, and any float32 model


@pytest.fixture(autouse=True)
def _exact_backend():
    """The comparisons to 1e-12 need the exact path: reset options after each test."""
    backend.register(method="exact")
    yield
    backend.register()


def _config(**kw):
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                       vocab_size=100, max_position_embeddings=256,
                       rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                       initializer_range=0.2, pad_token_id=0, **kw)


@pytest.fixture(scope="module")
def model64():
    torch.manual_seed(0)
    return LlamaForCausalLM(_config()).double().eval()


@pytest.fixture(scope="module")
def model32():
    torch.manual_seed(0)
    return LlamaForCausalLM(_config()).float().eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (2, N_TOKENS), generator=g)
    mask = torch.ones(2, N_TOKENS, dtype=torch.long)
    mask[1, :N_PAD] = 0                        # row 1 left-padded
    ids[1, :N_PAD] = 0
    return ids, mask


def _logits(model, impl, ids, **kw):
    model.set_attn_implementation(impl)
    with torch.inference_mode():
        return model(input_ids=ids, **kw).logits


def _maxdiff(a, b, where=None):
    d = (a - b).abs()
    return float((d[where] if where is not None else d).max())


# -- registration -------------------------------------------------------------

def test_registered_with_both_interfaces_and_idempotent():
    assert "numbarope" in AttentionInterface()
    assert "numbarope" in AttentionMaskInterface()
    assert backend.register() == backend.register() == "numbarope"
    assert AttentionInterface()["numbarope"] is backend.attention_forward
    # numbarope.integrations is the backend's short name
    for name in ("register", "attention_forward", "mask_structure", "NAME"):
        assert getattr(numbarope.integrations, name) is getattr(backend, name)


def test_one_line_use_with_from_pretrained(model32, tmp_path, batch):
    model32.save_pretrained(tmp_path)
    m = LlamaForCausalLM.from_pretrained(tmp_path, attn_implementation="numbarope")
    assert m.config._attn_implementation == "numbarope"
    ids, mask = batch
    with torch.inference_mode():
        out = m(input_ids=ids, attention_mask=mask).logits
    ref = _logits(model32, "sdpa", ids, attention_mask=mask)
    assert _maxdiff(out, ref, mask.bool()) < EAGER


# -- (a) one attention layer --------------------------------------------------

@pytest.mark.parametrize("padded", [False, True])
def test_one_attention_layer(model64, batch, padded):
    ids, mask = batch
    pad = mask if padded else None
    real = mask.bool() if padded else torch.ones_like(mask, dtype=torch.bool)
    layer = model64.model.layers[0].self_attn
    with torch.inference_mode():
        h = model64.model.embed_tokens(ids)
        pos = torch.arange(N_TOKENS)[None].expand(2, -1)
        cos_sin = model64.model.rotary_emb(h, pos)
        outs = {}
        for impl in ("numbarope", "sdpa", "eager"):
            model64.set_attn_implementation(impl)
            m4 = create_causal_mask(config=model64.config, inputs_embeds=h,
                                    attention_mask=pad, cache=None, position_ids=pos)
            outs[impl] = layer(hidden_states=h, position_embeddings=cos_sin,
                               attention_mask=m4)[0]
    assert _maxdiff(outs["numbarope"], outs["sdpa"], real) < TIGHT
    if not padded:                       # eager: NaN rows with float64 padding
        assert _maxdiff(outs["numbarope"], outs["eager"], real) < EAGER


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_attention_forward_returns_the_full_pipelines_values_heads_last(dtype):
    # the fast lane writes transformers' (B, L, H, D) directly (the backend's transpose
    # is then free): the values of the full pipeline, contiguous, in the input dtype
    import numbarope
    from numbarope.backends.transformers import attention_forward

    class _Layer:
        is_causal = True

    g = torch.Generator().manual_seed(1)
    dt = getattr(torch, dtype)
    q = torch.randn(2, 37, 9, 64, generator=g).transpose(1, 2).to(dt)
    k, v = (torch.randn(2, 3, 37, 64, generator=g).to(dt) for _ in range(2))
    with torch.inference_mode():
        out, _ = attention_forward(_Layer(), q, k, v, None, scaling=0.125)
        ref = numbarope.rope_attention(q, k, v, is_causal=True, enable_gqa=True,
                                       scale=0.125, return_info=True)[0]
    assert out.shape == (2, 37, 9, 64) and out.is_contiguous() and out.dtype == dt
    assert torch.equal(out, ref.transpose(1, 2))


def test_compiled_mask_reading_agrees_with_the_operators(monkeypatch):
    # padding alone and causal-with-padding masks are read in one compiled pass
    # (_causal_padding); every mask gets the reading of torch's operators (the general
    # path, forced by making the compiled pass decline)
    rng = np.random.default_rng(0)
    masks = []
    for L, S in ((7, 7), (3, 12), (1, 9), (6, 6)):
        i, j = np.arange(L)[:, None], np.arange(S)[None, :]
        for off in (S - L, 0, 2):
            causal = j <= i + off
            for kind in range(4):
                pad = np.ones((2, 1, S), bool)
                if kind >= 1:
                    pad[1, 0, :rng.integers(1, S)] = False          # left padding
                if kind == 3:
                    pad[0, 0, :] = False                            # a row of nothing
                base = causal if kind != 2 else np.ones((L, S), bool)
                masks.append(pad[:, :, None, :] & base)
            masks.append(causal & (j > i + off - 3))                # a window: declined
    masks.append(np.broadcast_to(np.tril(np.ones((5, 5), bool)), (2, 1, 5, 5)))  # stride 0
    declined = 0
    for m in masks:
        t = torch.from_numpy(np.ascontiguousarray(m) if m.ndim == 4 else m[None, None])
        if m.ndim == 4 and m.strides[0] == 0:
            t = torch.from_numpy(np.tril(np.ones((5, 5), bool)))[None, None].expand(2, 1, 5, 5)
        kind = core._causal_padding(t.numpy())[0]
        declined += kind < 0
        fast = core._analyse(t)
        with monkeypatch.context() as mp:
            mp.setattr(core, "_causal_padding", lambda x: (-1, 0, None))
            slow = core._analyse(t)
        assert fast[0] == slow[0] and fast[2] == slow[2]
        assert (fast[1] is None) == (slow[1] is None)
        if fast[1] is not None:
            assert np.array_equal(fast[1], slow[1])
    assert 0 < declined < len(masks)


# -- (b) the whole model ------------------------------------------------------

@pytest.mark.parametrize("padded", [False, True])
def test_model_logits_float64(model64, batch, padded):
    ids, mask = batch
    kw = {"attention_mask": mask} if padded else {}
    real = mask.bool() if padded else torch.ones_like(mask, dtype=torch.bool)
    ours = _logits(model64, "numbarope", ids, **kw)
    assert _maxdiff(ours, _logits(model64, "sdpa", ids, **kw), real) < TIGHT
    if not padded:
        assert _maxdiff(ours, _logits(model64, "eager", ids), real) < EAGER
    if padded:                           # the mask matters: ignoring it is far off
        assert _maxdiff(ours, _logits(model64, "sdpa", ids), real) > 1e-2


def test_model_logits_float32_left_padded(model32, batch):
    ids, mask = batch
    real = mask.bool()
    ours = _logits(model32, "numbarope", ids, attention_mask=mask)
    assert ours.dtype == torch.float32
    for ref in ("sdpa", "eager"):
        assert _maxdiff(ours, _logits(model32, ref, ids, attention_mask=mask), real) < EAGER


# -- (c) decoding with a key/value cache --------------------------------------

@pytest.mark.parametrize("padded", [False, True])
@pytest.mark.parametrize("step", [1, 7])
def test_cached_decoding_is_bottom_right(model64, batch, padded, step):
    """Prefill 37 - step tokens, then `step` queries against all 37 cached keys:
    the last query at the last key (bottom-right); equal to the full forward."""
    ids, mask = batch
    cut = N_TOKENS - step
    real = mask.bool() if padded else torch.ones_like(mask, dtype=torch.bool)
    model64.set_attn_implementation("numbarope")
    with torch.inference_mode():
        cache = DynamicCache(config=model64.config)
        # positions as generate() gives them: counted from the first real token
        pos = (mask.cumsum(-1) - 1).clamp(min=0) if padded else torch.arange(N_TOKENS)[None]
        kw = {"attention_mask": mask[:, :cut]} if padded else {}
        model64(input_ids=ids[:, :cut], cache=cache, position_ids=pos[:, :cut], **kw)
        kw = {"attention_mask": mask} if padded else {}
        ours = model64(input_ids=ids[:, cut:], cache=cache, position_ids=pos[:, cut:],
                       **kw).logits
    full = _logits(model64, "sdpa", ids, position_ids=pos, **kw)
    assert _maxdiff(ours, full[:, cut:], real[:, cut:]) < TIGHT


@pytest.mark.parametrize("cache", [None, "static"])
def test_generate_left_padded(model64, batch, cache):
    """A static cache has S = its size (40) > the keys in use: prefill reads as
    causal at offset 0 (37 x 40, not bottom-right), decoding as 1 x 40 without a
    causal part; the unused slots read as key padding."""
    ids, mask = batch

    def generate(impl):
        model64.set_attn_implementation(impl)
        with torch.inference_mode():
            return model64.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                    do_sample=False, output_logits=True,
                                    return_dict_in_generate=True,
                                    cache_implementation=cache)

    ours, ref = generate("numbarope"), generate("sdpa")
    assert torch.equal(ours.sequences, ref.sequences)
    assert max(_maxdiff(a, b) for a, b in zip(ours.logits, ref.logits)) < TIGHT


# -- what reaches the pipeline (numbarope._pipeline.attention) -----------------

class _Layer(torch.nn.Module):
    is_causal = True


def _spy(monkeypatch):
    seen = {}

    def fake(q, k, v, **kw):
        seen.update(kw, L=q.shape[-2], S=k.shape[-2])
        return torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)

    monkeypatch.setattr(core, "_attention", fake)
    return seen


def _qkv(L, S, hq=4, hk=2):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(2, hq, L, 16, generator=g, dtype=torch.float64),
            torch.randn(2, hk, S, 16, generator=g, dtype=torch.float64),
            torch.randn(2, hk, S, 16, generator=g, dtype=torch.float64))


def test_square_causal_without_padding_keeps_the_fast_path_open(monkeypatch):
    seen = _spy(monkeypatch)
    backend.register()                                 # method "auto"
    out, w = backend.attention_forward(_Layer(), *_qkv(37, 37), None, scaling=0.25)
    assert out.shape == (2, 37, 4, 16) and w is None
    assert seen["is_causal"] and seen["enable_gqa"] and seen["method"] == "auto"
    assert "key_padding_mask" not in seen and "causal_alignment" not in seen
    assert "query_offset" not in seen and seen["scale"] == 0.25


def test_mask_structure_causal_offsets_and_padding():
    L, S = 3, 9
    i, j = torch.arange(L)[:, None], torch.arange(S)[None]
    pad = torch.ones(2, S, dtype=torch.bool)
    pad[1, :4] = False
    for off in (S - L, 2, 0):
        m = ((j <= i + off) & pad[:, None, None, :])
        got, kpm = backend.mask_structure(m)
        assert got == off              # keys no query reaches may read as padding
        np.testing.assert_array_equal(torch.from_numpy(kpm)[:, :, None, :]
                                      & (j <= i + off), m)
    got, kpm = backend.mask_structure(pad[:, None, None, :].expand(2, 1, L, S).clone())
    assert got is None and kpm is not None          # padding, no causal part
    got, kpm = backend.mask_structure(torch.ones(2, 1, L, S, dtype=torch.bool))
    assert got is None and kpm is None
    additive = torch.where(j <= i + S - L, 0.0, torch.finfo(torch.float32).min)
    assert backend.mask_structure(additive.expand(2, 1, L, S).clone()) == (S - L, None)


# -- threads ------------------------------------------------------------------

class _YieldingRef:
    """A ``weakref.ref`` whose dereference lets other threads run: it widens any
    window between reading a shared cache entry and using it (the old shared
    ``_last`` dict was read in three steps: ref, version, result)."""

    __slots__ = ("_ref",)

    def __init__(self, obj):
        self._ref = weakref.ref(obj)

    def __call__(self):
        time.sleep(0)
        return self._ref()


def _padded_causal(pad, L=6, S=6):
    keep = torch.ones(len(pad), S, dtype=torch.bool)
    for b, p in enumerate(pad):
        keep[b, :p] = False
    return (keep[:, None, None, :] & torch.ones(L, S, dtype=torch.bool).tril()).contiguous()


def test_mask_structure_threads_get_their_own_padding(monkeypatch):
    """Two threads (a threaded server) read their own masks of one shape, different
    padding, over and over: each must always get its own mask's padding (the shared
    cache handed one thread the other's, silently; with the yielding weakref about
    1 call in 5, naturally about 1 in 1.2 million)."""
    monkeypatch.setattr(core, "weakref", types.SimpleNamespace(ref=_YieldingRef))
    masks = [_padded_causal([0, 2]), _padded_causal([3, 0])]
    expected = [core._analyse(m) for m in masks]
    assert not np.array_equal(expected[0][1], expected[1][1])
    wrong, calls = [0, 0], [0, 0]
    stop = time.perf_counter() + 2.0

    def serve(t):
        mask, (offset, kpm, _) = masks[t], expected[t]
        while time.perf_counter() < stop:
            got, got_kpm = backend.mask_structure(mask)
            calls[t] += 1
            if got != offset or not np.array_equal(got_kpm, kpm):
                wrong[t] += 1

    threads = [threading.Thread(target=serve, args=(t,)) for t in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert min(calls) > 1000
    assert wrong == [0, 0], f"{wrong} of {calls} calls got the other thread's padding"


def test_mask_structure_reads_each_mask_once_per_thread(monkeypatch):
    """The cache still works: a mask is analysed once (per thread at most), and
    again after an in-place change (its version counter)."""
    analysed = []
    analyse = core._analyse
    monkeypatch.setattr(core, "_analyse", lambda m: analysed.append(m) or analyse(m))
    mask = _padded_causal([0, 2])
    first = backend.read_mask(mask)
    assert backend.read_mask(mask) is first and len(analysed) == 1
    other = []
    t = threading.Thread(target=lambda: other.append(backend.mask_structure(mask)))
    t.start()
    t.join(30)
    assert len(analysed) <= 2 and np.array_equal(other[0][1], first[1])
    n = len(analysed)
    assert np.array_equal(backend.mask_structure(mask)[1], first[1]) and len(analysed) == n
    mask[0, 0, :, 0] = False                  # in place: key 0 of row 0 now padding
    offset, kpm = backend.mask_structure(mask)
    assert len(analysed) == n + 1 and not kpm[0, 0, 0] and first[1][0, 0, 0]


def test_register_in_one_thread_forward_in_another(monkeypatch):
    """Each attention call gets the whole of one register()'s options, never a mix,
    while another thread re-registers (options are replaced whole, read once)."""
    seen = []

    def fake(q, k, v, **kw):
        seen.append((kw["method"], kw["eps"], kw["precision"], kw["workers"]))
        return torch.zeros(q.shape[:-1] + (v.shape[-1],), dtype=q.dtype)

    monkeypatch.setattr(core, "_attention", fake)
    sets = [("exact", 1e-3, "float64", 1), ("fast", 1e-2, None, 2)]
    stop = threading.Event()

    def registrar():
        while not stop.is_set():
            for method, eps, precision, workers in sets:
                backend.register(method=method, eps=eps, precision=precision, workers=workers)

    t = threading.Thread(target=registrar)
    t.start()
    try:
        q, k, v = _qkv(3, 3)
        deadline = time.perf_counter() + 0.5
        while time.perf_counter() < deadline:
            backend.attention_forward(_Layer(), q, k, v, None)
    finally:
        stop.set()
        t.join(30)
    assert seen and set(seen) <= set(sets)


# -- what it refuses ----------------------------------------------------------

def _sliding(L, S, window):
    i, j = torch.arange(L)[:, None], torch.arange(S)[None]
    off = S - L
    return ((j <= i + off) & (j > i + off - window)).expand(2, 1, L, S).clone()


@pytest.mark.parametrize("mask, match", [
    (torch.rand(2, 1, 37, 37, generator=torch.Generator().manual_seed(3)) < 0.7,
     "keys after the query"),
    (torch.ones(2, 1, 37, 37).tril() - torch.ones(2, 1, 37, 37).triu(1) * 3.0,
     "additive float bias"),
])
def test_unsupported_mask_structure_raises(mask, match):
    with pytest.raises(NotImplementedError, match=match):
        backend.attention_forward(_Layer(), *_qkv(37, 37), mask)


@pytest.mark.parametrize("L, S, W", [(37, 37, 8), (1, 50, 8), (5, 50, 12), (10, 10, 30)])
def test_read_mask_reads_sliding_windows(L, S, W):
    # what read_mask returns rebuilds the mask exactly (a key no query sees may come
    # back as padding: the same pairs take part)
    m = _sliding(L, S, W)
    m[1, :, :, :3] = False                               # row 1 left-padded
    offset, kpm, local = backend.read_mask(m)
    window = None if local is None else local.left + 1
    assert local is None or isinstance(local, Window)
    i, j = torch.arange(L)[:, None], torch.arange(S)[None]
    rebuilt = torch.ones(L, S, dtype=torch.bool) if offset is None else j <= i + offset
    if window is not None:
        rebuilt = rebuilt & (j > i + offset - window)
    if kpm is not None:
        rebuilt = rebuilt & torch.from_numpy(kpm)[:, :, None, :]
    assert torch.equal(rebuilt.expand_as(m), m)
    if L == S == 37:
        assert (offset, window) == (0, 8)
        with pytest.raises(NotImplementedError, match="sliding window of 8 keys"):
            backend.mask_structure(m)


def _chunked(L, S, c):
    i, j = torch.arange(L)[:, None] + (S - L), torch.arange(S)[None]
    return ((j <= i) & (j // c == i // c)).expand(2, 1, L, S).clone()


@pytest.mark.parametrize("L, S, c", [(37, 37, 8), (1, 50, 8), (5, 50, 16), (40, 40, 40)])
def test_read_mask_reads_chunks_and_the_backend_computes_them(L, S, c):
    # Llama 4's chunked attention (attention_chunk_size = c), prefill and decoding,
    # row 1 left-padded: read back exactly, and computed as the dense reference
    m = _chunked(L, S, c)
    m[1, :, :, :3] = False
    offset, kpm, local = backend.read_mask(m)
    assert local is None or isinstance(local, Chunked)
    chunk = None if local is None else local.size
    i, j = torch.arange(L)[:, None], torch.arange(S)[None]
    rebuilt = torch.ones(L, S, dtype=torch.bool) if offset is None else j <= i + offset
    if chunk is not None:
        rebuilt = rebuilt & (j // chunk == (i + offset) // chunk)
    if kpm is not None:
        rebuilt = rebuilt & torch.from_numpy(kpm)[:, :, None, :]
    assert torch.equal(rebuilt.expand_as(m), m)
    if L == S == 37:
        assert (offset, chunk) == (0, 8)
    q, k, v = _qkv(L, S)
    out, _ = backend.attention_forward(_Layer(), q, k, v, m, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=m, scale=0.25)
    seen = m.any(-1).expand(2, 4, L)                       # rows with a visible key
    d = (out.transpose(1, 2) - ref)[seen].abs().max().item()
    assert d < 1e-12


def _mistral(window, layers=2):
    cfg = transformers.MistralConfig(hidden_size=64, intermediate_size=128,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     head_dim=16, num_hidden_layers=layers, vocab_size=100,
                                     sliding_window=window)
    torch.manual_seed(0)
    return transformers.MistralForCausalLM(cfg).double().eval()


def test_sliding_window_model_gives_sdpas_logits():
    # issue 23: Mistral (sliding_window=6) on a left-padded batch, prefill and cached
    # greedy decoding past the window, against "sdpa"
    m = _mistral(6)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (2, 20), generator=g)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :4] = 0
    out = {}
    for impl in ("sdpa", "numbarope"):
        m.set_attn_implementation(impl)
        with torch.inference_mode():
            logits = m(input_ids=ids, attention_mask=mask).logits
            gen = m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=8,
                             do_sample=False)
        out[impl] = (logits, gen)
    m.set_attn_implementation("sdpa")
    real = mask.bool()
    d = (out["numbarope"][0] - out["sdpa"][0])[real].abs().max().item()
    assert d < 1e-10
    assert torch.equal(out["numbarope"][1], out["sdpa"][1])


def test_dropout_refused_and_the_layer_differentiable(model32):
    with pytest.raises(NotImplementedError, match="dropout"):
        backend.attention_forward(_Layer(), *_qkv(5, 5), None, dropout=0.1)
    q, k, v = (t.requires_grad_() for t in _qkv(5, 5))
    out, _ = backend.attention_forward(_Layer(), q, k, v, None)
    out.sum().backward()
    assert all(t.grad is not None and t.grad.shape == t.shape for t in (q, k, v))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-10), (torch.float32, 1e-5)])
def test_training_gives_sdpas_gradients_and_losses(dtype, tol, batch):
    # issue 22: loss.backward() through attn_implementation="numbarope" on a small
    # Llama (left-padded batch, GQA) gives the gradients "sdpa" gives, and a few
    # optimizer steps the same losses
    ids, mask = batch
    labels = ids.masked_fill(mask == 0, -100)      # no loss on the padding
    losses, grads = {}, {}
    for impl in ("sdpa", "numbarope"):
        torch.manual_seed(0)
        m = LlamaForCausalLM(_config()).to(dtype).train()
        m.set_attn_implementation(impl)
        opt = torch.optim.SGD(m.parameters(), lr=0.1)
        losses[impl] = []
        for step in range(3):
            opt.zero_grad()
            loss = m(input_ids=ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            if step == 0:
                grads[impl] = {n: p.grad.clone() for n, p in m.named_parameters()
                               if p.grad is not None}
            opt.step()
            losses[impl].append(loss.item())
    assert grads["sdpa"].keys() == grads["numbarope"].keys()
    for name, g in grads["sdpa"].items():
        d = (grads["numbarope"][name] - g).abs().max().item()
        assert d <= tol * max(1.0, g.abs().max().item()), name
    np.testing.assert_allclose(losses["numbarope"], losses["sdpa"], rtol=tol * 10, atol=0)


def test_register_checks_its_options():
    for kw, exc in ((dict(method="bogus"), ValueError), (dict(eps=5), ValueError),
                    (dict(workers="x"), TypeError), (dict(workers=0), ValueError),
                    (dict(precision="float16"), ValueError)):
        with pytest.raises(exc):
            backend.register(**kw)
    backend.register()


def test_gemma2_softcap_and_alternating_windows_give_eagers_logits():
    # issue 23: Gemma 2 (logit soft-capping, sliding and full layers alternating)
    # against transformers' "eager" (sdpa has no soft-capping; eager turns a padded
    # row into NaN, so the batch has no padding here)
    cfg = transformers.Gemma2Config(hidden_size=64, intermediate_size=128,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    num_hidden_layers=2, vocab_size=100, sliding_window=6,
                                    attn_logit_softcapping=1.0, query_pre_attn_scalar=16)
    torch.manual_seed(0)
    m = transformers.Gemma2ForCausalLM(cfg).double().eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 100, (2, 20), generator=g)
    mask = torch.ones(2, 20, dtype=torch.long)
    out = _logits_and_tokens(m, ids, mask, ("eager", "numbarope"))
    # Gemma 2's eager attention takes its softmax in float32 (dtype=torch.float32): its
    # logits are within ~1e-7 of float64 ones; a misread window or cap errs by ~1e-2
    d = (out["numbarope"][0] - out["eager"][0])[mask.bool()].abs().max().item()
    assert d < 1e-6
    # and through cached greedy decoding past the window (issue 23)
    assert torch.equal(out["numbarope"][1], out["eager"][1])


def test_read_mask_reads_packed_sequences():
    cu = (0, 5, 12, 20)
    seg = torch.bucketize(torch.arange(20), torch.tensor(cu[1:]), right=True)
    i, j = torch.arange(20)[:, None], torch.arange(20)[None]
    m = ((j <= i) & (seg[:, None] == seg[None, :])).expand(2, 1, 20, 20).clone()
    offset, kpm, local = backend.read_mask(m)
    assert (offset, kpm, local) == (0, None, Packed(cu))
    q, k, v = _qkv(20, 20)
    out, _ = backend.attention_forward(_Layer(), q, k, v, m, scaling=0.25)
    ref = torch.nn.functional.scaled_dot_product_attention(
        q, k.repeat_interleave(2, 1), v.repeat_interleave(2, 1), attn_mask=m, scale=0.25)
    assert (out.transpose(1, 2) - ref).abs().max().item() < 1e-12


def test_padding_free_batch_gives_each_sequences_logits(model64):
    # issue 23: three sequences packed into one row (position_ids restart, no padding:
    # transformers' padding-free path) give each sequence's own logits, as "sdpa" does
    # (transformers detects packing without a cache: a training setup)
    g = torch.Generator().manual_seed(4)
    lens = (5, 7, 8)
    ids = torch.randint(1, 100, (1, sum(lens)), generator=g)
    pos = torch.cat([torch.arange(n) for n in lens])[None]
    model64.set_attn_implementation("numbarope")
    try:
        with torch.inference_mode():
            packed = model64(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
            alone = torch.cat([model64(input_ids=part).logits[0]
                               for part in ids.split(list(lens), dim=1)])
        model64.set_attn_implementation("sdpa")
        with torch.inference_mode():
            sdpa = model64(input_ids=ids, position_ids=pos, use_cache=False).logits[0]
    finally:
        model64.set_attn_implementation("sdpa")
    assert (packed - alone).abs().max().item() < 1e-10
    assert (packed - sdpa).abs().max().item() < 1e-10


def _logits_and_tokens(m, ids, mask, impls):
    out = {}
    for impl in impls:
        m.set_attn_implementation(impl)
        with torch.inference_mode():
            out[impl] = (m(input_ids=ids, attention_mask=mask).logits,
                         m.generate(input_ids=ids, attention_mask=mask, max_new_tokens=10,
                                    do_sample=False))
    m.set_attn_implementation(impls[0])
    return out


def test_qwen2_sliding_layers_give_sdpas_logits_and_tokens():
    # issue 23: Qwen2 with use_sliding_window (a full layer, then a sliding one),
    # left-padded batch, prefill and cached greedy decoding past the window
    cfg = transformers.Qwen2Config(hidden_size=64, intermediate_size=128,
                                   num_attention_heads=4, num_key_value_heads=2,
                                   num_hidden_layers=2, vocab_size=100,
                                   use_sliding_window=True, sliding_window=6,
                                   max_window_layers=1)
    torch.manual_seed(0)
    m = transformers.Qwen2ForCausalLM(cfg).double().eval()
    assert m.config.layer_types == ["full_attention", "sliding_attention"]
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(1, 100, (2, 20), generator=g)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :4] = 0
    out = _logits_and_tokens(m, ids, mask, ("sdpa", "numbarope"))
    d = (out["numbarope"][0] - out["sdpa"][0])[mask.bool()].abs().max().item()
    assert d < 1e-10
    assert torch.equal(out["numbarope"][1], out["sdpa"][1])


def test_llama4_chunked_attention_gives_sdpas_logits_and_tokens():
    # issue 23: Llama 4 text (attention_chunk_size = 8), rows left-padded by 0, 4 and 8
    # tokens: transformers counts each row's chunks from its first real token, so the
    # rows' chunks start at different positions (one Chunked(8, start) per row)
    cfg = transformers.Llama4TextConfig(hidden_size=64, intermediate_size=128,
                                        intermediate_size_mlp=128, num_attention_heads=4,
                                        num_key_value_heads=2, head_dim=16,
                                        num_hidden_layers=2, vocab_size=100,
                                        attention_chunk_size=8, num_local_experts=2)
    torch.manual_seed(0)
    m = transformers.Llama4ForCausalLM(cfg).double().eval()
    g = torch.Generator().manual_seed(6)
    ids = torch.randint(1, 100, (3, 20), generator=g)
    mask = torch.ones(3, 20, dtype=torch.long)
    mask[1, :4] = 0
    mask[2, :8] = 0
    out = _logits_and_tokens(m, ids, mask, ("sdpa", "numbarope"))
    d = (out["numbarope"][0] - out["sdpa"][0])[mask.bool()].abs().max().item()
    assert d < 1e-10
    assert torch.equal(out["numbarope"][1], out["sdpa"][1])
    # the mask of the padded batch reads as one chunk start per row
    i, j = torch.arange(20)[:, None], torch.arange(20)[None]
    pads = torch.tensor([0, 4, 3])
    sb = pads[:, None, None]
    rows = ((j <= i) & ((j - sb) // 8 == (i - sb) // 8) & (j >= sb))[:, None]
    _, kpm, local = backend.read_mask(rows)
    assert local == (Chunked(8), Chunked(8, 4), Chunked(8, 3))

