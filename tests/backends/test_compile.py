"""torch.compile through numbarope's transformers backend (numbarope.backends.torch_op).

Under ``torch.compile`` the backend's attention is one opaque ``torch.library``
operator per layer (a fake implementation for the compiler; at run time the eager
code itself), differentiable through numbarope's exact backward; ``fullgraph=True``
works. Checked here:

* the operators themselves (``torch.library.opcheck``: schema, fake tensors,
  autograd registration, AOT dispatch with dynamic shapes);
* one attention layer compiled: the result and the gradients equal the eager
  backend's bit for bit (the operator runs the eager code), for causal, padded,
  decoding (bottom-right) and sliding-window masks; what eager mode refuses is
  refused when the compiled code runs;
* masks are read by content: compiled code reuses its buffers, so a tensor's
  identity (the eager backend's cache key) says nothing about its values;
* a small random Llama (the one of test_transformers.py) compiled with
  ``fullgraph=True``: logits with and without a left-padded row, a Mistral with a
  sliding window, a Gemma 2 whose sliding and full layers alternate,
  ``loss.backward()`` and greedy ``generate()``.

Tolerances. Compiled and eager models differ outside attention: inductor evaluates
transformers' float32 rotary angles (cos/sin, computed in float32 even in a float64
model) its own way, which moves the logits by ~4e-6 for ``sdpa`` and ``numbarope``
alike (compiled numbarope and compiled sdpa agree to 0 in float64). So against the
eager models the logits are compared to 1e-5 (EAGER of test_transformers.py); with
``backend="aot_eager"`` (the same ATen operations as eager) a float64 model gives
the eager logits to 1e-12 (TIGHT).

Compile times. Inductor compiles C++: on a 2-core machine the three whole models it
compiles here (Llama's logits and training, Gemma 2) take 2-10 s each with its
cache warm, 15-50 s cold (the first also starts inductor); the other models use
``backend="aot_eager"`` (dynamo and AOT autograd as with inductor, then the eager
ATen operations), which compiles in seconds; the single layers compile in < 2 s.
"""

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from transformers import LlamaConfig, LlamaForCausalLM  # noqa: E402

import numbarope.backends.transformers as backend  # noqa: E402  (registers "numbarope")
from numbarope.backends import torch_op  # noqa: E402

N_TOKENS, N_PAD = 37, 5
TIGHT = 1e-12
EAGER = 1e-5


@pytest.fixture(autouse=True)
def _exact_backend():
    """Exact results (as test_transformers.py) and a fresh compiler per test: the
    models share their forward's code, whose compiled versions dynamo limits."""
    backend.register(method="exact")
    torch.compiler.reset()
    yield
    backend.register()
    torch.compiler.reset()


def _config():
    return LlamaConfig(hidden_size=64, intermediate_size=128, num_attention_heads=4,
                       num_key_value_heads=2, head_dim=16, num_hidden_layers=2,
                       vocab_size=100, max_position_embeddings=256,
                       rope_parameters={"rope_type": "default", "rope_theta": 50000.0},
                       initializer_range=0.2, pad_token_id=0)


def _llama(dtype, train=False):
    torch.manual_seed(0)
    m = LlamaForCausalLM(_config()).to(dtype)
    return m.train() if train else m.eval()


@pytest.fixture(scope="module")
def batch():
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (2, N_TOKENS), generator=g)
    mask = torch.ones(2, N_TOKENS, dtype=torch.long)
    mask[1, :N_PAD] = 0                        # row 1 left-padded
    ids[1, :N_PAD] = 0
    return ids, mask


def _maxdiff(a, b, where):
    return float((a - b)[where].abs().max())


# -- the operators -------------------------------------------------------------

class _Layer(torch.nn.Module):
    is_causal = True


def _qkv(L, S, dtype=torch.float64, grad=False):
    g = torch.Generator().manual_seed(2)
    return tuple(torch.randn(2, h, n, 16, generator=g, dtype=dtype).requires_grad_(grad)
                 for h, n in ((4, L), (2, S), (2, S)))


def _mask(kind):
    """(L, S, mask) of a kind transformers builds: row 1 left-padded by 2 keys."""
    L, S = (1, 9) if kind == "decoding" else (9, 9)
    if kind == "none":
        return L, S, None
    i, j = torch.arange(L)[:, None] + (S - L), torch.arange(S)[None]
    m = j <= i
    if kind == "window":
        m = m & (j > i - 4)
    m = m.expand(2, 1, L, S).clone()
    m[1, :, :, :2] = False
    return L, S, m


def test_operators_pass_opcheck():
    L, S, mask = _mask("padded")
    q, k, v = _qkv(L, S)
    for m, causal in ((mask, False), (None, True)):
        for op, grad in ((torch_op._attention, False), (torch_op._attention_exact, True)):
            args = [x.clone().requires_grad_(grad) for x in (q, k, v)] + [m, 0.25, causal,
                                                                          None]
            torch.library.opcheck(op, args)
        out, out64, lse, wide = torch_op._attention_exact(q, k, v, m, 0.25, causal, None)
        grad = torch.randn_like(out).transpose(1, 2)
        torch.library.opcheck(torch_op._attention_backward,
                              (grad, q, k, v, m, 0.25, causal, None, out64, lse, wide))


def _compiled_layer(**kw):
    def layer(q, k, v, m):
        return backend.attention_forward(_Layer(), q, k, v, m, **kw)[0]
    return layer, torch.compile(layer, fullgraph=True)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["none", "padded", "decoding", "window"])
def test_compiled_layer_is_the_eager_layer(kind, dtype):
    L, S, mask = _mask(kind)
    q, k, v = _qkv(L, S, dtype)
    eager, compiled = _compiled_layer(scaling=0.25)
    with torch.inference_mode():
        out = compiled(q, k, v, mask)
        ref = eager(q, k, v, mask)
    assert out.shape == (2, L, 4, 16) and out.dtype == dtype and out.is_contiguous()
    assert torch.equal(out, ref)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kind", ["none", "padded"])
def test_compiled_layer_gradients_are_the_eager_ones(kind, dtype):
    L, S, mask = _mask(kind)
    eager, compiled = _compiled_layer(scaling=0.25)
    dout = torch.randn(2, L, 4, 16, generator=torch.Generator().manual_seed(3), dtype=dtype)
    res = []
    for f in (eager, compiled):
        q, k, v = _qkv(L, S, dtype, grad=True)
        out = f(q, k, v, mask)
        out.backward(dout)
        res.append((out.detach(), q.grad, k.grad, v.grad))
    for a, b in zip(*res):
        assert torch.equal(a, b)


def test_compiled_layer_with_output_attentions():
    # eager mode warns that no weights are returned; the compiler cannot trace the
    # warning, so it is left out there (fullgraph=True would fail on it)
    L, S, mask = _mask("padded")
    eager, compiled = _compiled_layer(output_attentions=True)
    with pytest.warns(UserWarning, match="attention weights"):
        ref = eager(*_qkv(L, S), mask)
    assert torch.equal(compiled(*_qkv(L, S), mask), ref)


def test_compiled_layer_refuses_what_eager_refuses():
    L, S, mask = _mask("padded")
    _, compiled = _compiled_layer()
    arbitrary = torch.rand(2, 1, L, S, generator=torch.Generator().manual_seed(3)) < 0.7
    with pytest.raises(NotImplementedError, match="keys after the query"):
        compiled(*_qkv(L, S), arbitrary)
    backend.register(method="fast")
    with pytest.raises(NotImplementedError, match="method='fast' with inputs that require"):
        compiled(*_qkv(L, S, grad=True), mask)


def test_operator_reads_a_rewritten_mask_anew():
    # compiled code writes a later mask into the tensor of an earlier one (inductor
    # reuses buffers; an inference tensor has no version counter to tell): the
    # operators match masks by content, never by identity
    L, S, mask = _mask("padded")
    q, k, v = _qkv(L, S)
    window = _mask("window")[2]
    with torch.inference_mode():
        buf = mask.clone()
        first = torch_op.attention(q, k, v, buf, 0.25, False, None)
        buf.copy_(window)
        second = torch_op.attention(q, k, v, buf, 0.25, False, None)
        ref = backend.attention_forward(_Layer(), q, k, v, window.clone(), scaling=0.25)[0]
    assert torch.equal(second, ref) and not torch.equal(first, second)


def test_eager_mode_calls_no_operator(monkeypatch):
    # eager mode keeps the direct path (cheaper per call: decoding calls it per layer)
    def fail(*args):
        raise AssertionError("the operator was called in eager mode")

    monkeypatch.setattr(torch_op, "attention", fail)
    L, S, mask = _mask("padded")
    backend.attention_forward(_Layer(), *_qkv(L, S), mask)


# -- a whole model --------------------------------------------------------------

def _logits(model, impl, ids, mask, compile_backend=None):
    model.set_attn_implementation(impl)
    f = model if compile_backend is None else torch.compile(model, fullgraph=True,
                                                            backend=compile_backend)
    with torch.inference_mode():
        return {padded: f(input_ids=ids, attention_mask=mask if padded else None).logits
                for padded in (False, True)}


def test_compiled_model_gives_the_eager_logits(batch):
    ids, mask = batch
    model = _llama(torch.float32)
    ours = _logits(model, "numbarope", ids, mask, "inductor")
    for ref_impl in ("numbarope", "sdpa"):
        ref = _logits(model, ref_impl, ids, mask)
        for padded, real in ((False, torch.ones_like(mask, dtype=torch.bool)),
                             (True, mask.bool())):
            assert ours[padded].dtype == torch.float32
            assert _maxdiff(ours[padded], ref[padded], real) < EAGER, (ref_impl, padded)


def test_compiled_float64_model_without_inductor_gives_sdpas_logits(batch):
    ids, mask = batch
    model = _llama(torch.float64)
    ours = _logits(model, "numbarope", ids, mask, "aot_eager")
    ref = _logits(model, "sdpa", ids, mask)
    assert _maxdiff(ours[False], ref[False], slice(None)) < TIGHT
    assert _maxdiff(ours[True], ref[True], mask.bool()) < TIGHT


def test_compiled_sliding_window_model_gives_sdpas_logits():
    # Mistral (sliding_window=6): the mask transformers builds under the compiler is
    # read as a window, as in eager mode (aot_eager: the eager ATen operations, so
    # float64 logits to 1e-12)
    cfg = transformers.MistralConfig(hidden_size=64, intermediate_size=128,
                                     num_attention_heads=4, num_key_value_heads=2,
                                     head_dim=16, num_hidden_layers=2, vocab_size=100,
                                     sliding_window=6)
    torch.manual_seed(0)
    model = transformers.MistralForCausalLM(cfg).double().eval()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (2, 20), generator=g)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :4] = 0
    ours = _logits(model, "numbarope", ids, mask, "aot_eager")
    ref = _logits(model, "sdpa", ids, mask)
    assert _maxdiff(ours[True], ref[True], mask.bool()) < TIGHT
    assert _maxdiff(ours[False], ref[False], slice(None)) < TIGHT


def test_compiled_alternating_windows_give_the_eager_logits():
    # Gemma 2, sliding and full layers alternating (4 layers, soft-capped logits):
    # inductor computes each layer's mask into a buffer of its own and reuses them,
    # a full layer's mask written where a sliding layer's was (the backend's eager
    # cache by tensor identity gave logits 0.1 off here)
    cfg = transformers.Gemma2Config(hidden_size=64, intermediate_size=128,
                                    num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                                    num_hidden_layers=4, vocab_size=100, sliding_window=6,
                                    attn_logit_softcapping=1.0, query_pre_attn_scalar=16)
    torch.manual_seed(0)
    model = transformers.Gemma2ForCausalLM(cfg).float().eval()
    g = torch.Generator().manual_seed(2)
    ids = torch.randint(1, 100, (2, 20), generator=g)
    mask = torch.ones(2, 20, dtype=torch.long)
    mask[1, :3] = 0
    ours = _logits(model, "numbarope", ids, mask, "inductor")
    ref = _logits(model, "numbarope", ids, mask)
    assert _maxdiff(ours[True], ref[True], mask.bool()) < EAGER
    assert _maxdiff(ours[False], ref[False], slice(None)) < EAGER


def test_compiled_training_gives_the_eager_gradients(batch):
    # loss.backward() through the compiled model: numbarope's exact backward, as eager
    ids, mask = batch
    labels = ids.masked_fill(mask == 0, -100)
    grads = {}
    for compiled in (False, True):
        model = _llama(torch.float32, train=True)
        model.set_attn_implementation("numbarope")
        f = torch.compile(model, fullgraph=True) if compiled else model
        f(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
        grads[compiled] = {n: p.grad for n, p in model.named_parameters()
                           if p.grad is not None}
    assert grads[True].keys() == grads[False].keys()
    for name, g in grads[False].items():
        d = (grads[True][name] - g).abs().max().item()
        assert d <= EAGER * max(1.0, g.abs().max().item()), name


def test_compiled_greedy_generate_gives_the_same_tokens(batch):
    # a static cache (transformers' way to compile decoding: one shape per step), the
    # forward compiled (aot_eager: inductor's own code is tested above)
    ids, mask = batch
    model = _llama(torch.float32)

    def generate(impl):
        model.set_attn_implementation(impl)
        with torch.inference_mode():
            return model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=4,
                                  do_sample=False, cache_implementation="static")

    ref = generate("sdpa")
    model.forward = torch.compile(model.forward, fullgraph=True, backend="aot_eager")
    assert torch.equal(generate("numbarope"), ref)
