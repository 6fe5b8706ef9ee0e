"""Every attention backend against the math reference, and the reference against a loop."""

import itertools

import pytest
import torch

from modules.attention import (
    CPU_MATH_MAX_KEYS,
    CPU_MATH_MIN_ROWS,
    _load_flash,
    attend,
    attend_math,
    causal_mask,
    check_backend,
    flash_available,
    flash_head_dim_reason,
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


def test_auto_takes_math_for_few_keys_without_gradients_on_the_cpu(monkeypatch):
    import modules.attention as attention

    q = torch.randn(CPU_MATH_MIN_ROWS // 2, 2, 4, 8)
    assert resolve_backend("auto", q, kv_len=CPU_MATH_MAX_KEYS, needs_grad=False) == "math"
    for kv_len, needs_grad, dropout in ((CPU_MATH_MAX_KEYS + 1, False, 0.0),
                                        (8, True, 0.0), (8, False, 0.1), (None, False, 0.0)):
        assert resolve_backend("auto", q, dropout_p=dropout, kv_len=kv_len,
                               needs_grad=needs_grad) == "sdpa"
    # a decoding step (one query), and too few batch x head rows, stay on SDPA
    assert resolve_backend("auto", q[:, :, :1], kv_len=8, needs_grad=False) == "sdpa"
    assert resolve_backend("auto", q[:CPU_MATH_MIN_ROWS // 2 - 1], kv_len=8,
                           needs_grad=False) == "sdpa"
    used = []
    for name in ("math", "sdpa"):
        monkeypatch.setitem(attention._KERNELS, name, lambda *a, _k=attention._KERNELS[name],
                            _n=name, **kw: used.append(_n) or _k(*a, **kw))
    q = torch.randn(CPU_MATH_MIN_ROWS // 4, 4, 26, 32, requires_grad=True)
    mask = torch.rand(CPU_MATH_MIN_ROWS // 4, 26) > 0.3
    ref = attend(q, q, q, mask=mask, backend="sdpa")
    with torch.inference_mode():
        torch.testing.assert_close(attend(q, q, q, mask=mask), ref)
        attend(q, *torch.randn(2, CPU_MATH_MIN_ROWS // 4, 4, 50, 32))
    attend(q, q, q).sum().backward()  # training keeps SDPA's backward
    assert used == ["sdpa", "math", "sdpa", "sdpa"]


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


# (q_len, kv_len, causal, heads, kv_heads, head_dim, padding, dtype): self, causal GQA,
# key padding with a sequence that is all padding (variable-length kernel), cross-attention
# with MQA, a chunk of queries against a longer cache (bottom-right causal), one decoding
# step, odd head dims, fp16. Lengths are not multiples of the kernels' tiles.
FLASH_CASES = [
    (200, 200, False, 8, 8, 64, False, "bfloat16"),
    (200, 200, True, 8, 2, 64, False, "bfloat16"),
    (200, 200, False, 8, 2, 64, True, "bfloat16"),
    (37, 200, False, 8, 1, 128, False, "bfloat16"),
    (37, 200, True, 8, 2, 64, False, "bfloat16"),
    (1, 200, True, 8, 2, 64, False, "bfloat16"),
    (150, 150, True, 4, 4, 80, False, "bfloat16"),
    (130, 130, False, 4, 2, 48, True, "bfloat16"),
    (200, 200, True, 8, 8, 64, False, "float16"),
]


def test_flash_head_dims_follow_the_installed_kernels():
    # FlashAttention-2: any multiple of 8 up to 256. FlashAttention-4: only the head dims
    # whose gradients were verified on sm90 (80 gave wrong gradients, 48 did not compile).
    assert flash_head_dim_reason(80, fa2=True) is None
    assert flash_head_dim_reason(264, fa2=True) and flash_head_dim_reason(44, fa2=True)
    assert [d for d in range(8, 257, 8) if flash_head_dim_reason(d, fa2=False) is None] == \
        [64, 96, 128]
    assert "got 80" in flash_head_dim_reason(80, fa2=False)


def test_flash_backend_refuses_an_untrusted_head_dim_at_construction(monkeypatch):
    # As if FlashAttention-4 were installed on a GPU machine: a model asking for flash with a
    # head dim it is not trusted with fails when it is built, not at its first forward.
    import modules.attention as attention
    from modules.mha import MultiHeadAttention

    def kernel(*args, **kwargs):
        raise AssertionError("not called")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(attention, "_FLASH", (kernel, kernel, False, False))
    assert check_backend("flash", 64) == "flash"
    with pytest.raises(ValueError, match="backend 'flash'.*got 80"):
        MultiHeadAttention(embed_dim=320, num_heads=4, causal=True, backend="flash")
    MultiHeadAttention(embed_dim=256, num_heads=4, causal=True, backend="flash")


@pytest.mark.gpu
@pytest.mark.parametrize("case", FLASH_CASES, ids=lambda c: "-".join(map(str, c)))
def test_flash_matches_math_on_gpu(case):
    """flash vs the float64 math reference, outputs and gradients; torch SDPA in the same
    low precision sets the error scale a correct kernel should stay near."""
    if not flash_available():
        pytest.skip("flash-attn not installed")
    Lq, Lk, causal, H, Hk, D, padding, dtype = case
    dev, dt = "cuda", getattr(torch, dtype)
    gen = torch.Generator(device=dev).manual_seed(0)
    q = torch.randn(3, H, Lq, D, device=dev, dtype=dt, generator=gen)
    k = torch.randn(3, Hk, Lk, D, device=dev, dtype=dt, generator=gen)
    v = torch.randn(3, Hk, Lk, D, device=dev, dtype=dt, generator=gen)
    g = torch.randn(3, H, Lq, D, device=dev, dtype=dt, generator=gen)
    mask = None
    if padding:
        mask = torch.ones(3, Lk, dtype=torch.bool, device=dev)
        mask[1, Lk - 57:] = False   # right padding
        mask[2, :] = False          # nothing to attend to: zeros, no NaN
    fa2 = _load_flash()[3]
    if flash_head_dim_reason(D, fa2):  # a head dim the installed kernels are not trusted with
        assert resolve_backend("auto", q, mask, causal) == "sdpa"
        with pytest.raises(ValueError, match=f"head_dim.*got {D}"):
            attend(q, k, v, mask=mask, causal=causal, backend="flash")
        return
    # auto uses FlashAttention-2 where it can run; FlashAttention-4 only when named.
    assert resolve_backend("auto", q, mask, causal) == ("flash" if fa2 else "sdpa")

    def run(backend, dtype_):
        ins = [t.to(dtype_).requires_grad_() for t in (q, k, v)]
        fn = attend_math if backend == "math" else attend
        kw = {} if backend == "math" else {"backend": backend}
        out = fn(*ins, mask=mask, causal=causal, **kw)
        return (out, *torch.autograd.grad(out, ins, g.to(dtype_)))

    ref = run("math", torch.float64)
    got, low = run("flash", dt), run("sdpa", dt)
    for name, a, b, r in zip(("out", "dq", "dk", "dv"), got, low, ref):
        assert torch.isfinite(a).all(), name
        err = ((a.double() - r).norm() / r.norm()).item()
        err_sdpa = ((b.double() - r).norm() / r.norm()).item()
        assert err < 2e-2 and err <= 2 * err_sdpa + 2e-3, (name, err, err_sdpa)
    if padding:  # the all-padding sequence: zero output, zero gradients
        assert got[0][2].abs().max() == 0 and got[1][2].abs().max() == 0
    if padding or Hk != H:
        with pytest.raises(ValueError, match="padding mask with causal"):
            attend(q, k, v, mask=torch.ones(3, Lk, dtype=torch.bool, device=dev),
                   causal=True, backend="flash")


@pytest.mark.gpu
def test_flash_layer_matches_sdpa_layer_on_gpu():
    """A causal LM with every layer on flash equals the same weights on SDPA (bf16), and its
    cached decoding equals the full forward."""
    if not flash_available():
        pytest.skip("flash-attn not installed")
    from modules.lm import CausalLM
    torch.manual_seed(0)
    kw = dict(vocab_size=97, embed_dim=256, depth=2, num_heads=4, num_kv_heads=2,
              max_seq_len=256)
    flash = CausalLM(**kw, backend="flash").cuda().bfloat16()
    sdpa = CausalLM(**kw, backend="sdpa").cuda().bfloat16()
    sdpa.load_state_dict(flash.state_dict())
    x = torch.randint(0, 97, (2, 150), device="cuda")
    a, b = flash(x).float(), sdpa(x).float()
    assert ((a - b).norm() / b.norm()).item() < 2e-2
    caches = flash.new_caches(2, 150)
    steps = [flash(x[:, :140], caches=caches)]                      # prefill on flash
    steps += [flash(x[:, i:i + 1], caches=caches) for i in range(140, 150)]
    c = torch.cat(steps, 1).float()
    assert ((c - a).norm() / a.norm()).item() < 2e-2
