"""RoPE, KV caches and the Llama-style LM against independent references."""

import gc
import weakref

import pytest
import torch

from modules.generation import StaticDecoder, filter_logits, generate
from modules.lm import CausalLM, bigram_index
from modules.mha import KVCache, MultiHeadAttention
from modules.rope import RotaryEmbedding
from modules.transformer import Transformer


def tiny_lm(**kw):
    args = dict(vocab_size=61, embed_dim=32, depth=2, num_heads=4, num_kv_heads=2,
                max_seq_len=64)
    return CausalLM(**(args | kw)).eval()


def test_rope_dot_product_depends_only_on_offset():
    rope = RotaryEmbedding(head_dim=16)
    q, k = torch.randn(1, 1, 1, 16, dtype=torch.float64), torch.randn(1, 1, 1, 16,
                                                                        dtype=torch.float64)
    dots = []
    for start in (0, 5, 37):
        qa, _ = rope(q, q, start + 3)
        _, kb = rope(k, k, start)
        dots.append((qa * kb).sum())
    torch.testing.assert_close(dots[0], dots[1])
    torch.testing.assert_close(dots[0], dots[2])
    qa, _ = rope(q, q, 4)
    _, kb = rope(k, k, 0)
    assert not torch.allclose(dots[0], (qa * kb).sum())  # a different offset differs


def test_rope_matches_transformers_llama():
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding, apply_rotary_pos_emb
    cfg = LlamaConfig(hidden_size=64, num_attention_heads=4, rope_theta=50000.0,
                      max_position_embeddings=128)
    hf = LlamaRotaryEmbedding(cfg)
    q, k = torch.randn(2, 4, 10, 16), torch.randn(2, 2, 10, 16)
    pos = torch.arange(7, 17)[None].expand(2, -1)
    cos, sin = hf(q, pos)
    want_q, want_k = apply_rotary_pos_emb(q, k, cos, sin)
    ours = RotaryEmbedding(head_dim=16, theta=50000.0)
    got_q, got_k = ours(q, k, 7)
    torch.testing.assert_close(got_q, want_q)
    torch.testing.assert_close(got_k, want_k)
    got_q, got_k = ours(q, k, pos)  # per-sequence positions give the same
    torch.testing.assert_close(got_q, want_q)
    # Strided views (heads split from a fused projection), and gradients through both
    qkv = torch.randn(2, 10, 3, 4, 16, requires_grad=True)
    q, k = qkv[:, :, 0].transpose(1, 2), qkv[:, :, 1].transpose(1, 2)
    want = apply_rotary_pos_emb(q, k, cos, sin)
    got = ours(q, k, 7)
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b)
    g = [torch.randn_like(t) for t in want]
    torch.testing.assert_close(torch.autograd.grad(got, qkv, g),
                               torch.autograd.grad(want, qkv, g))


def test_cached_decoding_equals_full_forward_token_by_token():
    model = tiny_lm()
    tokens = torch.randint(0, 61, (3, 12))
    full = model(tokens)
    caches = model.new_caches(3, 12)
    steps = [model(tokens[:, :5], caches=caches)]            # a prefill chunk
    steps += [model(tokens[:, i:i + 1], caches=caches) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)


def test_cross_attention_kv_computed_once_and_reused():
    dec = Transformer(embed_dim=32, depth=2, num_heads=4, num_kv_heads=1, mlp_hidden_dim=64,
                      causal=True, context_dim=24, rope_theta=10000.0).eval()
    x, ctx = torch.randn(2, 6, 32), torch.randn(2, 9, 24)
    ctx_mask = torch.ones(2, 9, dtype=torch.bool)
    ctx_mask[1, 5:] = False
    full = dec(x, context=ctx, context_mask=ctx_mask)
    caches = dec.new_caches(2, 6)
    calls = []
    hook = dec.blocks[0].cross_attn.kv_proj.register_forward_hook(lambda *a: calls.append(1))
    outs = [dec(x[:, i:i + 1], context=ctx if i == 0 else None, context_mask=ctx_mask,
                caches=caches) for i in range(6)]
    hook.remove()
    torch.testing.assert_close(torch.cat(outs, 1), full, rtol=1e-5, atol=1e-5)
    assert len(calls) == 1
    # the padded context positions do not matter
    ctx2 = ctx.clone()
    ctx2[1, 5:] = 100.0
    torch.testing.assert_close(dec(x, context=ctx2, context_mask=ctx_mask), full)


def test_mha_construction_errors():
    with pytest.raises(ValueError, match=r"num_heads \(6\) must be a multiple of num_kv_heads \(4\)"):
        MultiHeadAttention(embed_dim=48, num_heads=6, num_kv_heads=4)
    with pytest.raises(ValueError, match="cross-attention takes neither"):
        MultiHeadAttention(embed_dim=32, num_heads=4, context_dim=8, causal=True)
    with pytest.raises(ValueError, match="unknown norm 'batchnorm'"):
        Transformer(embed_dim=32, depth=1, num_heads=4, mlp_hidden_dim=8, norm="batchnorm")


def test_first_queries_equal_full_self_attention_sliced():
    """``queries=n`` (used for a ViT's class token) equals full self-attention's first n
    outputs, with a key padding mask too; orders where it has no meaning are refused."""
    torch.manual_seed(0)
    mha = MultiHeadAttention(embed_dim=32, num_heads=4, num_kv_heads=2, qkv_bias=True)
    x = torch.randn(3, 9, 32)
    mask = torch.ones(3, 9, dtype=torch.bool)
    mask[1, 5:] = False
    pairs = torch.rand(3, 1, 9, 9) > 0.3
    pairs[..., 0] = True  # every query keeps at least one key
    for m in (None, mask, pairs):
        full = mha(x, mask=m)
        torch.testing.assert_close(mha(x, mask=m, queries=2), full[:, :2])
    enc = Transformer(embed_dim=32, depth=2, num_heads=4, mlp_hidden_dim=64, norm="layernorm",
                      mlp="gelu")
    torch.testing.assert_close(enc(x, keep=1), enc(x)[:, :1])
    causal = MultiHeadAttention(embed_dim=32, num_heads=4, causal=True)
    with pytest.raises(ValueError, match="queries=1 needs bidirectional .* this call has causal"):
        causal(x, queries=1)


def test_generation_with_cache_equals_without():
    model = tiny_lm()
    prompts = [[1, 2, 3, 4], [5, 6]]
    a = generate(model, prompts, max_new_tokens=10, use_cache=True)
    b = generate(model, prompts, max_new_tokens=10, use_cache=False)
    assert a == b and all(len(s) == 10 for s in a)


def test_batched_prompts_equal_each_alone():
    model = tiny_lm()
    prompts = [[7, 8, 9, 10, 11, 12], [3], [40, 41, 42]]
    batched = generate(model, prompts, max_new_tokens=8)
    alone = [generate(model, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == alone
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    s1 = generate(model, prompts[:1], max_new_tokens=8, temperature=1.0, top_k=5, generator=g1)
    s2 = generate(model, prompts[:1], max_new_tokens=8, temperature=1.0, top_k=5, generator=g2,
                  use_cache=False)
    assert s1 == s2


def test_compiled_static_decoding_equals_eager():
    """The compiled step over a static cache gives the eager tokens (padded batch, sampling),
    and follows the weights when they change after compiling. The model has the bigram and
    value tables, whose state (each row's last token) the compiled step carries too."""
    model = tiny_lm(bigram_buckets=97, value_embeds=1)
    prompts = [[7, 8, 9, 10, 11, 12], [3], [40, 41, 42]]
    eager = generate(model, prompts, max_new_tokens=9)
    assert generate(model, prompts, max_new_tokens=9, compile=True) == eager
    (decoder,) = StaticDecoder._built[model].values()
    assert decoder.cache_len == 64 and all(c.slot is not None for c, _ in decoder.caches)
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    kw = dict(max_new_tokens=9, temperature=1.0, top_p=0.9)
    assert generate(model, prompts, compile=True, generator=g1, **kw) == \
        generate(model, prompts, generator=g2, **kw)
    with torch.no_grad():
        model.lm_head.weight.mul_(-1.0)  # frozen weights are now stale
    flipped = generate(model, prompts, max_new_tokens=9)
    assert flipped != eager
    assert generate(model, prompts, max_new_tokens=9, compile=True) == flipped
    assert StaticDecoder._built[model][(3, 64, "cpu", torch.float32)] is not decoder
    with pytest.raises(ValueError, match="needs use_cache=True"):
        generate(model, prompts, max_new_tokens=2, compile=True, use_cache=False)
    # Decoders are kept per model, weakly: the model can still be freed.
    ref = weakref.ref(model)
    del model, decoder
    gc.collect()
    assert ref() is None


@pytest.mark.gpu
def test_compiled_static_decoding_equals_eager_on_cuda():
    model = tiny_lm().cuda()
    prompts = [[7, 8, 9, 10, 11, 12], [3], [40, 41, 42]]
    eager = generate(model, prompts, max_new_tokens=9)
    assert generate(model, prompts, max_new_tokens=9, compile=True) == eager


def test_static_kv_cache_writes_at_slot():
    cache = KVCache(1, 2, 8, 4)
    k, v = torch.randn(1, 2, 1, 4), torch.randn(1, 2, 1, 4)
    cache.slot = torch.tensor([5])
    full_k, full_v = cache.append(k, v)
    assert full_k.shape == (1, 2, 8, 4) and cache.length == 0
    torch.testing.assert_close(full_k[:, :, 5:6], k)
    torch.testing.assert_close(full_v[:, :, 5:6], v)
    assert full_k[:, :, :5].abs().sum() == 0 and full_k[:, :, 6:].abs().sum() == 0


def test_generation_stops_at_eos():
    model = tiny_lm()
    greedy = generate(model, [[1, 2]], max_new_tokens=6)[0]
    eos = greedy[2]
    out = generate(model, [[1, 2], [1, 2]], max_new_tokens=6, eos_id=eos)
    assert out[0] == greedy[:greedy.index(eos) + 1]


def test_top_k_top_p_filters():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05]]))
    kept = torch.isfinite(filter_logits(logits, top_p=0.7))
    assert kept.tolist() == [[True, True, False, False]]
    kept = torch.isfinite(filter_logits(logits[:, [3, 1, 0, 2]], top_k=2))
    assert kept.tolist() == [[False, True, True, False]]


def test_hf_llama_import_matches_transformers_logits(tmp_path):
    from transformers import LlamaConfig, LlamaForCausalLM

    from modules.converters import load_hf_llama
    cfg = LlamaConfig(vocab_size=97, hidden_size=48, intermediate_size=96, num_hidden_layers=2,
                      num_attention_heads=6, num_key_value_heads=2, rope_theta=20000.0,
                      rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False)
    hf = LlamaForCausalLM(cfg).eval()
    with torch.no_grad():  # make the norms non-trivial so their import is tested too
        for n, p in hf.named_parameters():
            if "norm" in n:
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(tmp_path, safe_serialization=True)
    ours = load_hf_llama(tmp_path).eval()
    tokens = torch.randint(0, 97, (2, 20))
    with torch.no_grad():
        want = hf(tokens).logits
        got = ours(tokens)
    torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


def _count_rows(module: torch.nn.Module, seen: list) -> None:
    module.register_forward_hook(lambda m, args, out: seen.append(args[0].shape[:-1].numel()))


@pytest.mark.parametrize("block", ["transformer", "conformer"])
def test_feed_forward_layers_skip_padding_with_the_same_result(block, monkeypatch):
    """The MLPs see only the real tokens of a padded batch, and the real tokens' outputs
    and every gradient equal the computation over all rows (in training mode, so the
    Conformer's batch-norm statistics are covered too)."""
    import modules.speech
    import modules.transformer
    from modules.speech import Conformer
    torch.manual_seed(0)
    if block == "transformer":
        net = Transformer(embed_dim=32, depth=2, num_heads=4, mlp_hidden_dim=48,
                          rope_theta=10000.0, max_seq_len=64)
        mlps = [b.mlp for b in net.blocks]
    else:
        net = Conformer(embed_dim=32, depth=2, num_heads=4, mlp_hidden_dim=48, conv_kernel=5,
                        rope_theta=10000.0, max_seq_len=64)
        mlps = [b.ff1 for b in net.blocks]
    net.train()
    lengths = torch.tensor([9, 20, 14])
    keep = torch.arange(20) < lengths[:, None]
    x = torch.randn(3, 20, 32, requires_grad=True)
    seen: list = []
    for m in mlps:
        _count_rows(m, seen)
    got = net(x, mask=keep)
    assert seen == [int(lengths.sum())] * 2
    g = torch.randn_like(got) * keep[..., None]
    grads = torch.autograd.grad(got, [x, *net.parameters()], g)
    monkeypatch.setattr(modules.transformer, "kept_rows", lambda mask, x: None)
    monkeypatch.setattr(modules.speech, "kept_rows", lambda mask, x: None)
    seen.clear()
    expect = net(x, mask=keep)
    assert seen == [3 * 20] * 2
    torch.testing.assert_close(got[keep], expect[keep])
    for a, b in zip(grads, torch.autograd.grad(expect, [x, *net.parameters()], g)):
        torch.testing.assert_close(a, b)


def test_kept_rows_only_for_a_padding_mask_with_padding():
    from modules.layers import add_on_rows, kept_rows
    x = torch.randn(2, 4, 3)
    keep = torch.tensor([[True, True, False, False], [True, True, True, False]])
    assert kept_rows(keep, x).tolist() == [0, 1, 4, 5, 6]
    assert kept_rows(None, x) is None
    assert kept_rows(torch.ones(2, 4, dtype=torch.bool), x) is None
    assert kept_rows(keep[:, None, None], x) is None  # a 4-D mask is not a padding mask
    out = add_on_rows(x, lambda t: 2 * t, kept_rows(keep, x), alpha=0.5)
    torch.testing.assert_close(out[keep], 2 * x[keep])
    torch.testing.assert_close(out[~keep], x[~keep])


@pytest.mark.parametrize("block", ["transformer", "conformer", "decoder"])
def test_in_place_residuals_without_gradients_leave_the_input_alone(block):
    """Without gradients the blocks update their residual stream in place: the result
    equals the out-of-place computation, and the caller's tensor is not touched."""
    from modules.speech import Conformer
    torch.manual_seed(0)
    if block == "conformer":
        net = Conformer(embed_dim=32, depth=2, num_heads=4, mlp_hidden_dim=48, conv_kernel=5,
                        rope_theta=10000.0, max_seq_len=64).eval()
        kwargs = {}
    else:
        net = Transformer(embed_dim=32, depth=2, num_heads=4, mlp_hidden_dim=48,
                          rope_theta=10000.0, max_seq_len=64, causal=block == "decoder",
                          context_dim=16 if block == "decoder" else None).eval()
        kwargs = {"context": torch.randn(3, 7, 16)} if block == "decoder" else {}
    x = torch.randn(3, 20, 32)
    keep = torch.arange(20) < torch.tensor([9, 20, 14])[:, None]
    before = x.clone()
    expect = net(x, mask=keep, **kwargs)
    with torch.no_grad():
        got = net(x, mask=keep, **kwargs)
    assert torch.equal(x, before)
    torch.testing.assert_close(got[keep], expect[keep])


@pytest.mark.parametrize("grad", [True, False])
@pytest.mark.parametrize("block", ["transformer", "conformer"])
def test_padding_skip_under_cpu_autocast_and_strided_input(block, grad, monkeypatch):
    """An fp32 residual stream with bf16 sublayer outputs (CPU autocast), and an input that
    is a transposed view, give what the computation over every row gives."""
    import modules.speech
    import modules.transformer
    from modules.speech import Conformer
    torch.manual_seed(0)
    if block == "transformer":
        net = Transformer(embed_dim=32, depth=2, num_heads=4, mlp_hidden_dim=48)
    else:
        net = Conformer(embed_dim=32, depth=2, num_heads=4, mlp_hidden_dim=48, conv_kernel=5,
                        rope_theta=None, max_seq_len=64)
    net.eval()
    x = torch.randn(20, 3, 32).transpose(0, 1)  # (B, L, E), not contiguous
    keep = torch.arange(20) < torch.tensor([9, 20, 14])[:, None]

    def run():
        with torch.set_grad_enabled(grad):
            plain = net(x, mask=keep)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                mixed = net(x, mask=keep)
        return plain, mixed

    got = run()
    monkeypatch.setattr(modules.transformer, "kept_rows", lambda mask, x: None)
    monkeypatch.setattr(modules.speech, "kept_rows", lambda mask, x: None)
    expect = run()
    for a, b in zip(got, expect):
        assert a.dtype == b.dtype
        torch.testing.assert_close(a[keep], b[keep], atol=2e-2, rtol=2e-2)


def test_added_values_equal_a_value_bias():
    """``values`` equal to one vector b at every token is a bias b on the value projection:
    checked against the same attention with that bias, in a full pass and step by step
    through the cache (which then stores values with b added)."""
    torch.manual_seed(0)
    plain = MultiHeadAttention(embed_dim=32, num_heads=4, num_kv_heads=2, causal=True,
                               rope=RotaryEmbedding(head_dim=8, max_seq_len=16)).eval()
    biased = MultiHeadAttention(embed_dim=32, num_heads=4, num_kv_heads=2, causal=True,
                                qkv_bias=True, rope=plain.rope).eval()
    b = torch.randn(16)
    with torch.no_grad():
        biased.qkv_proj.weight.copy_(plain.qkv_proj.weight)
        biased.qkv_proj.bias.zero_()
        biased.qkv_proj.bias[-16:] = b
        biased.out_proj.weight.copy_(plain.out_proj.weight)
    x = torch.randn(2, 7, 32)
    values = b.expand(2, 7, 16)
    want = biased(x)
    assert not torch.allclose(plain(x), want, atol=1e-3)
    torch.testing.assert_close(plain(x, values=values), want)
    cache = plain.new_cache(2, 7)
    steps = [plain(x[:, i:i + 1], cache=cache, values=values[:, i:i + 1]) for i in range(7)]
    torch.testing.assert_close(torch.cat(steps, 1), want, rtol=1e-5, atol=1e-5)
    cross = MultiHeadAttention(embed_dim=32, num_heads=4, context_dim=8)
    with pytest.raises(ValueError, match="values are added in self-attention"):
        cross(x, torch.randn(2, 3, 8), values=torch.zeros(2, 7, 32))


def test_value_embeddings_reach_the_first_blocks_only():
    """With ``value_embeds=n`` blocks 0..n-1 get their table's rows for the tokens as
    ``values``, the others nothing; zero tables give the plain model's logits; cached
    decoding still equals the full pass."""
    torch.manual_seed(0)
    model = tiny_lm(depth=3, value_embeds=2)
    assert [t.weight.shape for t in model.value_embeds] == [(61, 16)] * 2
    tokens = torch.randint(0, 61, (2, 9))
    seen = {}
    hooks = [b.attn.register_forward_pre_hook(
        lambda m, args, kw, i=i: seen.__setitem__(i, kw.get("values")), with_kwargs=True)
        for i, b in enumerate(model.decoder.blocks)]
    full = model(tokens)
    for h in hooks:
        h.remove()
    torch.testing.assert_close(seen[0], model.value_embeds[0].weight[tokens])
    torch.testing.assert_close(seen[1], model.value_embeds[1].weight[tokens])
    assert seen[2] is None
    caches = model.new_caches(2, 9)
    steps = [model(tokens[:, :4], caches=caches)]
    steps += [model(tokens[:, i:i + 1], caches=caches) for i in range(4, 9)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    plain = tiny_lm(depth=3)
    plain.load_state_dict({k: v for k, v in model.state_dict().items()
                           if not k.startswith("value_embeds")})
    assert not torch.allclose(plain(tokens), full, atol=1e-4)
    with torch.no_grad():
        for t in model.value_embeds:
            t.weight.zero_()
    torch.testing.assert_close(model(tokens), plain(tokens))
    for bad in (4, -1, 1.5, True):
        with pytest.raises(ValueError, match=rf"value_embeds={bad!r}; expected a whole "
                                             rf"number of blocks from 0 to depth=3"):
            tiny_lm(depth=3, value_embeds=bad)


def test_bigram_rows_pair_each_token_with_the_one_before():
    """The decoder's input is the token's row plus the bigram row of (previous token,
    token), recomputed here with Python integers from the documented hash; a sequence
    start (position 0, also after left padding) pairs with ``vocab_size``."""
    torch.manual_seed(0)
    model = tiny_lm(bigram_buckets=97)
    tokens = torch.randint(0, 61, (2, 8))
    positions = torch.tensor([[0, 1, 2, 3, 4, 5, 6, 7], [0, 0, 0, 0, 1, 2, 3, 4]])
    for pos, rows_before in ((None, [[61] + r[:-1] for r in tokens.tolist()]),
                             (positions, [[61] + tokens[0].tolist()[:-1],
                                          [61] * 4 + tokens[1].tolist()[3:7]])):
        seen = []
        hook = model.decoder.register_forward_pre_hook(lambda m, a, seen=seen: seen.append(a[0]))
        model(tokens, positions=pos)
        hook.remove()
        rows = [[(p * 1000003 + t * 972663749) % (2**31 - 1) % 97 for p, t in zip(ps, ts)]
                for ps, ts in zip(rows_before, tokens.tolist())]
        want = model.embed.weight[tokens] + model.bigram.weight[torch.tensor(rows)]
        torch.testing.assert_close(seen[0], want)
    # ids sharing their low bits do not crowd together: 4,096 pairs of multiples of 32 in
    # 1,024 rows fill nearly all of them (a hash keeping low bits would fill 32), and all
    # pairs of a 2,048-token vocabulary spread evenly over 16,384 rows
    ids = torch.arange(64) * 32
    assert bigram_index(ids[:, None], ids[None, :], 1024).unique().numel() > 950
    ids = torch.arange(2049)
    counts = torch.bincount(bigram_index(ids[:, None], ids[None, :2048], 16384).flatten())
    assert counts.numel() == 16384 and counts.min() > 200 and counts.max() < 320


def test_bigram_drop_drops_the_bigram_rows_only_in_training():
    """``bigram_drop`` is dropout on the bigram rows alone: the decoder's input is recomputed
    from the tables with the same random stream; evaluation adds the whole rows."""
    torch.manual_seed(0)
    model = tiny_lm(bigram_buckets=97, bigram_drop=0.5)
    tokens = torch.randint(0, 61, (2, 8))
    prev = torch.cat([torch.full((2, 1), 61), tokens[:, :-1]], 1)
    rows = model.bigram.weight[bigram_index(prev, tokens, 97)]
    seen = []
    hook = model.decoder.register_forward_pre_hook(lambda m, a: seen.append(a[0]))
    model.train()
    torch.manual_seed(1)
    model(tokens)
    torch.manual_seed(1)
    dropped = torch.nn.functional.dropout(rows, 0.5, training=True)
    model.eval()
    model(tokens)
    hook.remove()
    torch.testing.assert_close(seen[0], model.embed.weight[tokens] + dropped)
    torch.testing.assert_close(seen[1], model.embed.weight[tokens] + rows)
    zeroed = (dropped == 0).float().mean().item()
    assert 0.35 < zeroed < 0.65
    for bad in (-0.1, 1.0, True, "0.1"):
        with pytest.raises(ValueError, match=rf"bigram_drop={bad!r}; expected a number in "
                                             rf"\[0, 1\)"):
            tiny_lm(bigram_buckets=97, bigram_drop=bad)


def test_bigram_and_value_tables_decode_with_the_cache_as_in_full():
    """Prefill chunks and single steps through the cache equal the full pass, and a prompt
    decodes the same in a left-padded batch as alone (its first token has no previous)."""
    torch.manual_seed(0)
    model = tiny_lm(bigram_buckets=97, value_embeds=2)
    tokens = torch.randint(0, 61, (3, 12))
    full = model(tokens)
    caches = model.new_caches(3, 12)
    steps = [model(tokens[:, :5], caches=caches)]
    steps += [model(tokens[:, i:i + 1], caches=caches) for i in range(5, 12)]
    torch.testing.assert_close(torch.cat(steps, 1), full, rtol=1e-5, atol=1e-5)
    prompts = [[7, 8, 9, 10, 11, 12], [3], [40, 41, 42]]
    batched = generate(model, prompts, max_new_tokens=8)
    assert batched == [generate(model, [p], max_new_tokens=8)[0] for p in prompts]
    assert batched == generate(model, prompts, max_new_tokens=8, use_cache=False)
    for bad in (-1, 2.5, True):
        with pytest.raises(ValueError, match=rf"bigram_buckets={bad!r}; expected a whole "
                                             rf"number >= 0"):
            tiny_lm(bigram_buckets=bad)
