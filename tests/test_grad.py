"""Gradients (issue 22): the exact backward against torch autograd through a dense
float64 reference, torch.autograd.gradcheck, and what has no backward is refused
before any work."""

import numpy as np
import pytest

import numbarope
from numbarope import rope_attention
from numbarope.bias import ALiBi, Causal, Window
from numbarope.ops import streaming as st

torch = pytest.importorskip("torch")


def dense(q, k, v, *, scale, causal_offset=None, real=None, bias=None):
    """torch float64 softmax attention of (B, n, E) against (B, S, E) keys with
    explicit masks (a fully masked row gives 0): the reference whose autograd the
    backward must match."""
    B, n, E = q.shape
    S = k.shape[1]
    x = scale * q @ k.transpose(-1, -2)
    keep = torch.ones(B, n, S, dtype=torch.bool)
    j = torch.arange(S)
    i = torch.arange(n)[:, None]
    if causal_offset is not None:
        keep &= j[None, :] <= i + causal_offset
    if real is not None:
        keep &= real[:, None, :]
    if bias is not None:
        x = x + bias
    x = x.masked_fill(~keep, -torch.inf)
    return torch.softmax(x, -1).nan_to_num(0.0) @ v


def _grads(fn, q, k, v, dout):
    q, k, v = (t.detach().clone().requires_grad_(True) for t in (q, k, v))
    out = fn(q, k, v)
    out.backward(dout)
    return out.detach(), q.grad, k.grad, v.grad


def _rel(a, b):
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-300))


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("padded", [False, True])
def test_backward_against_dense_reference(dtype, tol, causal, padded):
    # GQA (3 query heads per key/value head), L != S, bottom-right causal, key padding
    g = torch.Generator().manual_seed(int(causal) * 2 + int(padded))
    H, Hk, L, S, E, Ev = 6, 2, 70, 150, 16, 8
    q = torch.randn(2, H, L, E, generator=g, dtype=dtype)
    k = torch.randn(2, Hk, S, E, generator=g, dtype=dtype)
    v = torch.randn(2, Hk, S, Ev, generator=g, dtype=dtype)
    dout = torch.randn(2, H, L, Ev, generator=g, dtype=dtype)
    kpm = None
    if padded:
        kpm = torch.rand(2, 1, S, generator=g) < 0.8
        kpm[..., -1] = True
    kw = dict(enable_gqa=True, is_causal=causal, causal_alignment="bottom_right",
              key_padding_mask=None if kpm is None else kpm.numpy(), scale=0.3)

    def ours(q, k, v):
        return rope_attention(q, k, v, **kw)

    def ref(q, k, v):
        q64, k64, v64 = (t.double() for t in (q, k, v))
        k64 = k64.repeat_interleave(3, dim=1)
        v64 = v64.repeat_interleave(3, dim=1)
        real = None if kpm is None else kpm.expand(2, H, S).reshape(2 * H, S)
        return dense(q64.reshape(-1, L, E), k64.reshape(-1, S, E), v64.reshape(-1, S, Ev),
                     scale=0.3, causal_offset=S - L if causal else None,
                     real=real).reshape(2, H, L, Ev)

    a = _grads(ours, q, k, v, dout)
    b = _grads(ref, q, k, v, dout.double())
    for x, y in zip(a, b):
        assert x.dtype == dtype
        assert _rel(x, y) < tol


@pytest.mark.parametrize("layout", ["half", "interleaved"])
def test_gradients_go_back_through_the_rotation(layout):
    g = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(3, 40, 8, generator=g, dtype=torch.float64) for _ in range(3))
    rot = numbarope.Rotary(layout=layout, dim=6)
    from numbarope.rotary import apply_rotary

    def rotate(x):
        # the rotation as a dense linear map, so that torch differentiates through it
        basis = torch.eye(8, dtype=torch.float64)
        cols = [torch.from_numpy(apply_rotary(np.broadcast_to(basis[c].numpy(), (40, 8)),
                                              rot)) for c in range(8)]
        R = torch.stack(cols, dim=-1)                                   # (40, 8, 8)
        return torch.einsum("nfe,bne->bnf", R, x)

    a = _grads(lambda q, k, v: rope_attention(q, k, v, rotary=rot, is_causal=True), q, k, v,
               torch.ones(3, 40, 8, dtype=torch.float64))
    b = _grads(lambda q, k, v: dense(rotate(q), rotate(k), v, scale=8 ** -0.5,
                                     causal_offset=0), q, k, v,
               torch.ones(3, 40, 8, dtype=torch.float64))
    for x, y in zip(a, b):
        assert _rel(x, y) < 1e-11


def test_gradcheck_exact_float64():
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 9, 4, generator=g, dtype=torch.float64, requires_grad=True)
               for _ in range(3))
    kpm = np.ones((2, 9), bool)
    kpm[1, 2] = False
    for kw in (dict(), dict(is_causal=True), dict(rotary=True, key_padding_mask=kpm),
               dict(bias=ALiBi(slopes=[0.5, 0.25])), dict(bias=Window(3) + Causal())):
        assert torch.autograd.gradcheck(lambda q, k, v: rope_attention(q, k, v, **kw),
                                        (q, k, v), eps=1e-6, atol=1e-8)


def test_broadcast_leading_dims_sum_their_gradients():
    g = torch.Generator().manual_seed(5)
    q = torch.randn(4, 10, 8, generator=g, dtype=torch.float64)
    k = torch.randn(1, 12, 8, generator=g, dtype=torch.float64)       # broadcast over 4
    v = torch.randn(12, 8, generator=g, dtype=torch.float64)          # and with fewer dims
    dout = torch.randn(4, 10, 8, generator=g, dtype=torch.float64)
    a = _grads(lambda q, k, v: rope_attention(q, k, v), q, k, v, dout)
    b = _grads(lambda q, k, v: dense(q, k.expand(4, 12, 8), v.expand(4, 12, 8),
                                     scale=8 ** -0.5), q, k, v, dout)
    for x, y in zip(a, b):
        assert x.shape == y.shape and _rel(x, y) < 1e-12


def test_bias_array_is_in_the_backward():
    g = torch.Generator().manual_seed(6)
    q, k, v = (torch.randn(2, 20, 4, generator=g, dtype=torch.float64) for _ in range(3))
    bias = np.random.default_rng(0).normal(size=39) * 4
    B = torch.tensor(bias)[torch.arange(20)[:, None] - torch.arange(20)[None, :] + 19]
    a = _grads(lambda q, k, v: rope_attention(q, k, v, bias=bias), q, k, v,
               torch.ones(2, 20, 4, dtype=torch.float64))
    b = _grads(lambda q, k, v: dense(q, k, v, scale=0.5, bias=B), q, k, v,
               torch.ones(2, 20, 4, dtype=torch.float64))
    for x, y in zip(a, b):
        assert _rel(x, y) < 1e-12


def test_low_precision_gradients_in_their_dtype():
    g = torch.Generator().manual_seed(7)
    q, k, v = (torch.randn(2, 30, 8, generator=g).to(torch.bfloat16).requires_grad_(True)
               for _ in range(3))
    out = rope_attention(q, k, v, is_causal=True)
    assert out.dtype == torch.bfloat16 and out.requires_grad
    out.float().sum().backward()
    assert all(t.grad.dtype == torch.bfloat16 for t in (q, k, v))


class _NoBackward(numbarope.ops.Algorithm):
    """gemm's forward under another name, without a backward."""
    name, structures = "gemm-no-backward", (numbarope.bias.NoBias,)

    def __init__(self):
        from numbarope.ops.gemm import Gemm
        self.inner = Gemm()

    def predict(self, h, degree):
        return self.inner.predict(h, degree)

    def memory(self, h, degree):
        return self.inner.memory(h, degree)

    def run(self, *args, **kwargs):
        return self.inner.run(*args, **kwargs)


def test_what_has_no_backward_is_refused_before_work():
    ops = numbarope.ops
    q = torch.randn(8, 4, requires_grad=True)
    saved = [ops.get(name) for name in ops.registry()]
    try:                          # every built-in fast algorithm has a backward now
        for alg in ops.fast_algorithms():
            ops.unregister(alg.name)
        ops.register(_NoBackward())
        with pytest.raises(numbarope.FastPathError,
                           match="gemm-no-backward has no backward yet"):
            rope_attention(q, q, q, method="fast", eps=0.5)
    finally:
        for name in ops.registry():
            ops.unregister(name)
        for alg in saved:                                 # the registry as it was
            ops.register(alg)
    with pytest.raises(NotImplementedError, match="bias requires grad"):
        rope_attention(q, q, q, bias=torch.zeros(15, requires_grad=True))
    with torch.no_grad():                       # no grad mode: no refusal
        rope_attention(q, q, q, method="fast", eps=0.5)


def test_backward_bitwise_independent_of_threads():
    rng = np.random.default_rng(8)
    q = rng.standard_normal((4, 300, 16)).astype(np.float32)
    k = rng.standard_normal((2, 300, 16)).astype(np.float32)
    v = rng.standard_normal((2, 300, 16)).astype(np.float32)
    kvidx = np.repeat(np.arange(2), 2)
    out, lse = st.exact_attention(q, k, v, 0.25, kvidx=kvidx, return_lse=True)
    dout = rng.standard_normal(out.shape)
    one = st.exact_backward(q, k, v, out, lse, dout, 0.25, kvidx=kvidx, workers=1)
    two = st.exact_backward(q, k, v, out, lse, dout, 0.25, kvidx=kvidx, workers=2)
    for a, b in zip(one, two):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("dtype, tol", [(torch.float64, 1e-12), (torch.float32, 2e-5)])
@pytest.mark.parametrize("causal", [False, True])
def test_softcap_forward_and_backward(dtype, tol, causal):
    # issue 23: logit soft-capping c·tanh(x/c) (Gemma 2), exact, with its gradient
    g = torch.Generator().manual_seed(10 + causal)
    q, k, v = (torch.randn(2, 3, 60, 16, generator=g, dtype=dtype) * 2 for _ in range(3))
    dout = torch.randn(2, 3, 60, 16, generator=g, dtype=dtype)
    c = 4.0

    def ours(q, k, v):
        return rope_attention(q, k, v, is_causal=causal, softcap=c, scale=0.5)

    def ref(q, k, v):
        x = 0.5 * q.double() @ k.double().transpose(-1, -2)
        x = c * torch.tanh(x / c)
        if causal:
            x = x.masked_fill(torch.ones(60, 60, dtype=torch.bool).triu(1), -torch.inf)
        return torch.softmax(x, -1) @ v.double()

    a = _grads(ours, q, k, v, dout)
    b = _grads(ref, q, k, v, dout.double())
    for x, y in zip(a, b):
        assert _rel(x, y) < tol
    out, info = rope_attention(q.numpy(), k.numpy(), v.numpy(), is_causal=causal,
                               softcap=c, scale=0.5, return_info=True)
    assert set(info.method.ravel()) == {"exact"}
    assert np.all(np.abs(out - b[0].numpy()).max(axis=(-2, -1)) <= info.error_bound)


def test_softcap_refusals():
    q = np.zeros((8, 4))
    for bad in (0.0, -1.0, np.inf, np.nan):
        with pytest.raises(ValueError, match="softcap"):
            rope_attention(q, q, q, softcap=bad)
    with pytest.raises(TypeError, match="softcap"):
        rope_attention(q, q, q, softcap="50")


def test_lse_is_differentiable():
    # the returned log-sum-exp carries its gradient (∂lse_i/∂x_ij = P_ij)
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(2, 30, 8, generator=g, dtype=torch.float64) for _ in range(3))

    def ours(q, k, v):
        out, lse = rope_attention(q, k, v, is_causal=True, return_lse=True)
        return out.sum() + (lse * torch.arange(30, dtype=torch.float64)).sum()

    def ref(q, k, v):
        x = q @ k.transpose(-1, -2) / np.sqrt(8)
        x = x.masked_fill(torch.ones(30, 30, dtype=torch.bool).triu(1), -torch.inf)
        out = torch.softmax(x, -1) @ v
        return out.sum() + (torch.logsumexp(x, -1) * torch.arange(30, dtype=torch.float64)).sum()

    a = _grads(ours, q, k, v, torch.tensor(1.0, dtype=torch.float64))
    b = _grads(ref, q, k, v, torch.tensor(1.0, dtype=torch.float64))
    for x, y in zip(a[1:], b[1:]):
        assert _rel(x, y) < 1e-12
    # the lse alone
    qq = q.clone().requires_grad_()
    rope_attention(qq, k, v, return_lse=True)[1].sum().backward()
    assert qq.grad is not None and qq.grad.abs().sum() > 0


def test_in_place_change_after_forward_and_second_derivatives_raise():
    g = torch.Generator().manual_seed(12)
    q, k, v = (torch.randn(2, 10, 4, generator=g, requires_grad=True) for _ in range(3))
    v2 = v * 1
    out = rope_attention(q, k, v2)
    v2.add_(1)                                  # changed after the forward
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        out.sum().backward()
    out = rope_attention(q, k, v)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(out.pow(2).sum(), q, create_graph=True)
    # the new-user case: a gradient penalty o.sum() + |∂o/∂q|² would have dropped its
    # second term silently (the first gradient did not require grad)
    out = rope_attention(q, k, v)
    with pytest.raises(RuntimeError, match="no second derivative"):
        torch.autograd.grad(out.sum(), q, create_graph=True)


def test_plan_and_info_say_why_gradients_compute_exactly():
    # a soft-capped head: the forward is fast, but no fast backward differentiates the
    # cap (dX_ij gets a factor sech²(x_ij/c), not a sum of feature products), so with
    # gradients it is computed exactly and says why; it once got fast gradients 0.017
    # off (the forward within 4e-8); gemm and prefix heads without a cap stay fast
    g = torch.Generator().manual_seed(13)
    q = (torch.randn(1, 1, 2048, 16, generator=g) * 0.1).requires_grad_()
    plain = numbarope.plan(q.detach(), q.detach(), q.detach(), softcap=0.5)
    assert set(plain.method.ravel()) == {"fast"}
    info = numbarope.plan(q, q, q, softcap=0.5)
    assert set(info.method.ravel()) == {"exact"}
    assert set(info.code.ravel()) == {"exact-for-gradients"}
    assert "soft cap" in info.heads[0].reason
    with pytest.raises(numbarope.FastPathError, match="soft cap"):
        numbarope.plan(q, q, q, softcap=0.5, method="fast")
    assert set(numbarope.plan(q, q, q, is_causal=True, method="fast").algorithm.ravel()) \
        == {"prefix"}


def test_softcap_gradients_with_method_auto_are_exact():
    g = torch.Generator().manual_seed(14)
    q, k = (torch.randn(1, 256, 4, generator=g, dtype=torch.float64) * 0.3 for _ in range(2))
    v, dout = (torch.randn(1, 256, 4, generator=g, dtype=torch.float64) for _ in range(2))
    c = 0.3

    def ours(q, k, v):
        return rope_attention(q, k, v, softcap=c, eps=1e-6)

    def ref(q, k, v):
        return torch.softmax(c * torch.tanh(0.5 * q @ k.transpose(-1, -2) / c), -1) @ v

    for x, y in zip(_grads(ours, q, k, v, dout), _grads(ref, q, k, v, dout)):
        assert _rel(x, y) < 1e-12


@pytest.mark.parametrize("causal", [False, True])
def test_fast_gradients_within_their_certified_bound(causal):
    # issue 22: method="fast" (and "auto" where it picks fast) differentiates through
    # the certified fast backward (gemm / prefix): every gradient within its bound of
    # the exact one, GQA and key padding included
    from numbarope.ops._bounds import causal_gradient_bound, gradient_bound
    g = torch.Generator().manual_seed(20 + causal)
    B, Hq, Hk, n, E = 2, 4, 2, 400, 8
    q = (torch.randn(B, Hq, n, E, generator=g, dtype=torch.float64) * 0.2).requires_grad_()
    k = (torch.randn(B, Hk, n, E, generator=g, dtype=torch.float64) * 0.2).requires_grad_()
    v = torch.randn(B, Hk, n, 5, generator=g, dtype=torch.float64).requires_grad_()
    kpm = torch.ones(B, 1, n, dtype=torch.bool)
    kpm[1, :, :30] = False
    kw = dict(is_causal=causal, enable_gqa=True, key_padding_mask=kpm)
    out, info = rope_attention(q, k, v, method="fast", eps=1e-4, return_info=True, **kw)
    assert set(info.algorithm.ravel()) == {"prefix" if causal else "gemm"}
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    assert info.gradient_bound is None                  # filled by the backward
    fast = torch.autograd.grad(out, (q, k, v), dout)
    ref = torch.autograd.grad(rope_attention(q, k, v, method="exact", **kw), (q, k, v),
                              dout)
    # the info reports the certified bounds per query head once the backward ran; a
    # key/value head's gradient error is within the sum over its query heads
    gb = info.gradient_bound
    assert gb.shape == (B, Hq, 3) and np.all(np.isfinite(gb)) and np.all(gb > 0)
    for b in range(B):
        for i in range(Hq):
            assert (fast[0] - ref[0])[b, i].abs().max().item() <= gb[b, i, 0]
        for h in range(Hk):
            for c in (1, 2):
                assert (fast[c] - ref[c])[b, h].abs().max().item() \
                    <= gb[b, 2 * h:2 * h + 2, c].sum()
    bound = causal_gradient_bound if causal else gradient_bound
    for b in range(B):
        for h in range(Hk):
            mask = kpm[b, 0].numpy()
            qs = q[b, 2 * h:2 * h + 2].detach().numpy()
            d = dout[b, 2 * h:2 * h + 2].numpy()
            hp = info.heads[b * Hq + 2 * h]
            bq, bk, bv = bound(qs, k[b, h].detach().numpy(), v[b, h].detach().numpy(), d,
                               1 / np.sqrt(E), hp.coef, hp.delta, key_mask=mask)
            eq = (fast[0] - ref[0])[b, 2 * h:2 * h + 2].abs().max().item()
            ek = (fast[1] - ref[1])[b, h].abs().max().item()
            ev = (fast[2] - ref[2])[b, h].abs().max().item()
            assert 0 < eq <= bq and 0 < ek <= bk and 0 < ev <= bv, (eq, bq, ek, bk, ev, bv)
    # "auto" takes the same fast path with gradients where it is cheaper
    _, auto = rope_attention(q, k, v, return_info=True, **kw)
    assert set(auto.method.ravel()) <= {"fast", "exact"}


def test_fast_gradients_through_rotary_match_exact():
    g = torch.Generator().manual_seed(22)
    q, k, v = (torch.randn(1, 2, 600, 16, generator=g, dtype=torch.float64) * s
               for s in (0.12, 0.12, 1.0))
    for t in (q, k, v):
        t.requires_grad_()
    out = rope_attention(q, k, v, rotary=True, is_causal=True, method="fast", eps=1e-6)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    fast = torch.autograd.grad(out, (q, k, v), dout)
    ref = torch.autograd.grad(rope_attention(q, k, v, rotary=True, is_causal=True,
                                             method="exact"), (q, k, v), dout)
    for a, b in zip(fast, ref):
        assert (a - b).abs().max().item() <= 1e-4 * b.abs().max().item()
    lse_out, lse = rope_attention(q, k, v, is_causal=True, method="fast", return_lse=True)
    with pytest.raises(NotImplementedError, match="log-sum-exp of a head computed by the"):
        lse.sum().backward()


def _torch_rope(x, pos, E, base=10000.0):
    """RoPE (rotate_half layout) in torch ops, differentiable: the reference."""
    inv = 1.0 / base ** (torch.arange(0, E, 2, dtype=torch.float64) / E)
    ang = pos[..., None].to(torch.float64) * inv                       # (..., S, E/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1), torch.cat([ang.sin()] * 2, -1)
    half = torch.cat([-x[..., E // 2:], x[..., :E // 2]], -1)
    return x * cos + half * sin


@pytest.mark.parametrize("per_row", [False, True])
def test_rotary_with_positions_has_a_backward(per_row):
    # new-user finding: cu_seqlens= with rotary (positions restarting per sequence)
    # and positions= (left padding) could not be trained
    g = torch.Generator().manual_seed(23)
    B, H, n, E = 2, 2, 40, 8
    q, k, v = (torch.randn(B, H, n, E, generator=g, dtype=torch.float64).requires_grad_()
               for _ in range(3))
    if per_row:                     # a left-padded batch: positions (B, 1, S)
        pos = torch.stack([torch.arange(n), torch.clamp(torch.arange(n) - 5, min=0)])
        pos = pos[:, None]
        kw = dict(positions=pos.numpy(), is_causal=True)
    else:                           # packed: positions restart per sequence
        cu = [0, 17, 40]
        pos = torch.cat([torch.arange(17), torch.arange(23)])
        kw = dict(cu_seqlens=cu, is_causal=True)
    out = rope_attention(q, k, v, rotary=True, method="exact", **kw)
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    ours = torch.autograd.grad(out, (q, k, v), dout)
    qr, kr = _torch_rope(q, pos, E), _torch_rope(k, pos, E)
    i, j = torch.arange(n)[:, None], torch.arange(n)[None]
    mask = j <= i
    if not per_row:
        seg = torch.tensor([0] * 17 + [1] * 23)
        mask = mask & (seg[:, None] == seg[None, :])
    ref = torch.nn.functional.scaled_dot_product_attention(qr, kr, v, attn_mask=mask)
    theirs = torch.autograd.grad(ref, (q, k, v), dout)
    assert (out - ref).abs().max().item() < 1e-12
    for a, b in zip(ours, theirs):
        assert (a - b).abs().max().item() < 1e-12


def test_apply_rotary_on_tensors_is_a_differentiable_tensor():
    # new-user finding: apply_rotary returned numpy for a tensor, and failed on one
    # that requires grad (the README's advice for rotating yourself)
    g = torch.Generator().manual_seed(24)
    x = torch.randn(2, 30, 8, generator=g, dtype=torch.float64, requires_grad=True)
    pos = torch.arange(30) * 3 + 1
    out = numbarope.apply_rotary(x, positions=pos.numpy())
    assert isinstance(out, torch.Tensor) and out.dtype == x.dtype
    ref = _torch_rope(x, pos, 8)
    assert (out - ref).abs().max().item() < 1e-12
    dout = torch.randn(out.shape, generator=g, dtype=torch.float64)
    (ours,) = torch.autograd.grad(out, x, dout)
    (theirs,) = torch.autograd.grad(ref, x, dout)
    assert (ours - theirs).abs().max().item() < 1e-12
    x32 = x.detach().float()
    assert numbarope.apply_rotary(x32).dtype == torch.float32


def test_auto_with_gradients_compares_forward_plus_backward():
    # a fast backward costs ~15-30x its forward (its states are ~E times wider), the
    # exact one ~4x: with inputs that require grad, auto weighs both
    from numbarope import _config
    q = (torch.randn(1, 1, 16384, 16, generator=torch.Generator().manual_seed(3)) * 0.25)
    for causal in (False, True):
        plain = numbarope.plan(q, q, q, is_causal=causal, rotary=True).heads[0]
        grad = numbarope.plan(q.requires_grad_(), q, q, is_causal=causal,
                              rotary=True).heads[0]
        q = q.detach()
        assert "forward+backward" in grad.reason or grad.code != "fast-cheaper"
        if plain.time_fast is not None and grad.code in ("fast-cheaper", "exact-cheaper"):
            alg = numbarope.ops.get(plain.algorithm)
            f = getattr(alg, "backward_factor", _config.FAST_BACKWARD_FACTOR)
            t_fast = plain.time_fast * (1 + f * (16 * 16 + 32) / 17)
            t_exact = plain.time_exact * _config.EXACT_BACKWARD_FACTOR
            assert (grad.method == "fast") == (t_fast * _config.AUTO_MARGIN < t_exact)


@pytest.mark.parametrize("method", ["exact", "fast"])
@pytest.mark.parametrize("case", ["bias", "causal", "window"])
def test_general_relative_matrices_have_gradients(method, case):
    # issue 22: general W_t (relative=) — exact heads by the slow dense path, fast heads
    # by toeplitz-fft's backward — against torch autograd of the dense formula
    g = torch.Generator().manual_seed(31)
    L = S = 40
    E, Ev = 4, 3
    q, k = (torch.randn(2, L, E, generator=g, dtype=torch.float64) * 0.4 for _ in range(2))
    v, dout = (torch.randn(2, S, Ev, generator=g, dtype=torch.float64) for _ in range(2))
    W = torch.randn(L + S - 1, E, E, generator=g, dtype=torch.float64) * 0.5
    b = torch.randn(L + S - 1, generator=g, dtype=torch.float64)
    kpm = torch.ones(2, S, dtype=torch.bool)
    kpm[1, 10:14] = False                   # every row still sees a key
    i, j = torch.arange(L)[:, None], torch.arange(S)[None, :]
    kw = dict(relative=W.numpy(), key_padding_mask=kpm, scale=0.5)
    hidden = ~kpm[:, None, :]
    bias = torch.zeros(L + S - 1, dtype=torch.float64)
    if case == "bias":
        kw["bias"], bias = b.numpy(), b
    elif case == "causal":
        kw["is_causal"], hidden = True, hidden | (j > i)[None]
    else:
        kw["bias"] = numbarope.bias.Window(5, 0)
        hidden = hidden | (j > i)[None] | (i - j > 5)[None]

    def ref(q, k, v):
        x = 0.5 * torch.einsum("bie,ijef,bjf->bij", q, W[i - j + S - 1], k)
        x = (x + bias[i - j + S - 1]).masked_fill(hidden, -torch.inf)
        return torch.softmax(x, -1) @ v

    def ours(q, k, v):
        return rope_attention(q, k, v, method=method, eps=1e-5, **kw)

    got, want = _grads(ours, q, k, v, dout), _grads(ref, q, k, v, dout)
    for x, y in zip(got, want):
        assert _rel(x, y) < (1e-13 if method == "exact" else 1e-4)
    _, info = rope_attention(q, k, v, method=method, eps=1e-5, return_info=True, **kw)
    assert set(info.algorithm.ravel()) == {"streaming" if method == "exact"
                                           else "toeplitz-fft"}
