"""Every attention backend against the math reference, and the reference against a loop."""

import itertools

import pytest
import torch

from modules.attention import (
    attend,
    attend_math,
    causal_mask,
    check_backend,
    flash_available,
    resolve_backend,
)

# (q_len, kv_len, causal): self, cross, causal self, a chunk of queries against a longer
# cache, and more queries than keys (the first rows then see nothing).
SHAPES = [(7, 7, False), (5, 11, False), (9, 9, True), (3, 10, True), (1, 6, True), (6, 4, True)]
HEADS = [(4, 4), (4, 2), (4, 1)]
MASKS = ["none", "padding", "full"]


def _mask(kind, B, H, Lq, Lk):
    if kind == "none":
        return None
    if kind == "padding":
        m = torch.ones(B, Lk, dtype=torch.bool)
        m[0, Lk // 2:] = False          # right padding
        m[1, :] = False                 # a sequence that is all padding
        return m
    m = torch.rand(B, H, Lq, Lk) > 0.4
    m[0, 0, 0] = False                  # a row with nothing to attend to
    return m


def _loop_reference(q, k, v, allowed, scale):
    """Attention one query row at a time, straight from the definition."""
    B, H, Lq, D = q.shape
    group = H // k.shape[1]
    out = torch.zeros_like(q)
    for b, h, i in itertools.product(range(B), range(H), range(Lq)):
        keys = [j for j in range(k.shape[2]) if allowed[b, h, i, j]]
        if not keys:
            continue
        s = torch.stack([q[b, h, i] @ k[b, h // group, j] * scale for j in keys])
        w = torch.softmax(s, 0)
        out[b, h, i] = sum(w[n] * v[b, h // group, j] for n, j in enumerate(keys))
    return out


@pytest.mark.parametrize("Lq,Lk,causal", SHAPES)
@pytest.mark.parametrize("mask_kind", MASKS)
def test_math_reference_matches_loop(Lq, Lk, causal, mask_kind):
    B, H, Hk, D = 2, 4, 2, 8
    q, k, v = torch.randn(B, H, Lq, D), torch.randn(B, Hk, Lk, D), torch.randn(B, Hk, Lk, D)
    mask = _mask(mask_kind, B, H, Lq, Lk)
    allowed = torch.ones(B, H, Lq, Lk, dtype=torch.bool)
    if mask is not None:
        allowed &= mask[:, None, None, :] if mask.dim() == 2 else mask
    if causal:
        for i, j in itertools.product(range(Lq), range(Lk)):
            allowed[:, :, i, j] &= j <= i + (Lk - Lq)
    out = attend_math(q, k, v, mask=mask, causal=causal, scale=0.3)
    torch.testing.assert_close(out, _loop_reference(q, k, v, allowed, 0.3))


@pytest.mark.parametrize("Lq,Lk,causal", SHAPES)
@pytest.mark.parametrize("heads", HEADS)
@pytest.mark.parametrize("mask_kind", MASKS)
@pytest.mark.parametrize("head_dim", [48, 80])
def test_sdpa_equals_math_float64(Lq, Lk, causal, heads, mask_kind, head_dim):
    H, Hk = heads
    B = 2
    q = torch.randn(B, H, Lq, head_dim, dtype=torch.float64, requires_grad=True)
    k = torch.randn(B, Hk, Lk, head_dim, dtype=torch.float64, requires_grad=True)
    v = torch.randn(B, Hk, Lk, head_dim, dtype=torch.float64, requires_grad=True)
    mask = _mask(mask_kind, B, H, Lq, Lk)
    grad_out = torch.randn(B, H, Lq, head_dim, dtype=torch.float64)
    results = []
    for backend in ("math", "sdpa"):
        out = attend(q, k, v, mask=mask, causal=causal, backend=backend)
        grads = torch.autograd.grad(out, (q, k, v), grad_out)
        results.append((out, *grads))
    for ref, got in zip(*results):
        assert torch.isfinite(got).all()
        torch.testing.assert_close(got, ref, rtol=1e-9, atol=1e-9)


def test_rows_with_nothing_to_attend_are_zero_with_zero_grad():
    q = torch.randn(2, 2, 4, 16, requires_grad=True)
    k = torch.randn(2, 2, 4, 16)
    v = torch.randn(2, 2, 4, 16)
    mask = torch.tensor([[True, True, False, False], [False] * 4])
    for backend in ("math", "sdpa"):
        out = attend(q, k, v, mask=mask, backend=backend)
        assert torch.equal(out[1], torch.zeros_like(out[1]))
        assert out[0].abs().sum() > 0
        (g,) = torch.autograd.grad(out.sum(), q)
        assert torch.isfinite(g).all() and torch.equal(g[1], torch.zeros_like(g[1]))


def test_causal_mask_is_bottom_right_aligned():
    m = causal_mask(2, 4)
    assert m.tolist() == [[True, True, True, False], [True, True, True, True]]
    m = causal_mask(4, 2)  # more queries than keys: the first two see nothing
    assert m.tolist() == [[False, False], [False, False], [True, False], [True, True]]


def test_scale_and_dropout():
    q, k, v = torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8), torch.randn(1, 2, 5, 8)
    a = attend(q, k, v, scale=0.1, backend="sdpa")
    b = attend(q * 0.1 / 8 ** -0.5, k, v, backend="sdpa")
    torch.testing.assert_close(a, b)
    torch.manual_seed(1)
    d1 = attend(q, k, v, dropout_p=0.5, backend="math")
    assert not torch.allclose(d1, attend(q, k, v, backend="math"))


def test_bad_inputs_are_clear_errors():
    q, k = torch.randn(1, 3, 4, 8), torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match=r"query heads \(3\) must be a multiple"):
        attend(q, k, k)
    q = torch.randn(1, 4, 4, 8)
    with pytest.raises(ValueError, match="torch.bool"):
        attend(q, k, k, mask=torch.ones(1, 4))
    with pytest.raises(ValueError, match=r"\(batch, kv_len\) = \(1, 4\), got \(1, 5\)"):
        attend(q, k, k, mask=torch.ones(1, 5, dtype=torch.bool))
    with pytest.raises(ValueError, match="one of"):
        check_backend("flashy")


@pytest.mark.skipif(flash_available(), reason="flash-attn is usable here")
def test_flash_backend_is_a_clear_error_when_unavailable():
    with pytest.raises(ValueError, match="flash"):
        check_backend("flash")
    q = torch.randn(1, 2, 4, 8)
    with pytest.raises(ValueError, match="CUDA"):
        attend(q, q, q, backend="flash")
    # auto never picks flash on the CPU
    assert resolve_backend("auto", q) == "sdpa"
    assert resolve_backend("auto", q.bfloat16()) == "sdpa"


@pytest.mark.gpu
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("heads", [(8, 8), (8, 2)])
@pytest.mark.parametrize("padding", [False, True])
def test_flash_matches_math_on_gpu(causal, heads, padding):
    if not flash_available():
        pytest.skip("flash-attn not installed")
    if padding and causal:
        pytest.skip("flash refuses padding + causal (tested below)")
    H, Hk = heads
    dev = "cuda"
    q = torch.randn(2, H, 200, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(2, Hk, 200, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(2, Hk, 200, 64, device=dev, dtype=torch.bfloat16, requires_grad=True)
    mask = None
    if padding:
        mask = torch.ones(2, 200, dtype=torch.bool, device=dev)
        mask[1, 150:] = False
    g = torch.randn_like(q)
    out = attend(q, k, v, mask=mask, causal=causal, backend="flash")
    grads = torch.autograd.grad(out, (q, k, v), g)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attend_math(*ref_in, mask=mask, causal=causal)
    ref_grads = torch.autograd.grad(ref, ref_in, g.double())
    for got, want in zip((out, *grads), (ref, *ref_grads)):
        err = (got.double() - want).norm() / want.norm()
        assert err < 2e-2, err
    with pytest.raises(ValueError, match="padding mask with causal"):
        attend(q, k, v, mask=torch.ones(2, 200, dtype=torch.bool, device=dev), causal=True,
               backend="flash")
