"""Text-image model (modules.fusion): our dual encoder against OpenCLIP's CLIP on the same
weights, the contrastive losses against written-out references (and their split over
ranks), hard-negative sampling, and the text encoder's padding mask."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from modules.converters import (
    clip_kwargs_from_open_clip,
    clip_state_dict_from_open_clip,
    open_clip_text_mask,
)
from modules.fusion import TextEncoder, TextImageModel, contrastive_loss, hard_negatives
from modules.memory import PairMemory, memory_scores, neighbour_mean

open_clip = pytest.importorskip("open_clip")

VOCAB, CONTEXT, EOT = 100, 16, 99  # the end-of-text token has the highest id, as in CLIP
HEADS = dict(vision_heads=2, text_heads=4)


@pytest.fixture(scope="module")
def open_clip_state(tmp_path_factory):
    """A small OpenCLIP CLIP (exact GELU) with every parameter random, LayerNorms included,
    saved and read back as a plain tensor file."""
    torch.manual_seed(0)
    model = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8,
                                           image_size=32),
        text_cfg=open_clip.CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=48,
                                       heads=4, layers=2),
        quick_gelu=False).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            scale = p.shape[-1] ** -0.5 if p.dim() > 1 else 0.3
            p.copy_(torch.randn_like(p) * scale)
            if name.endswith("weight") and p.dim() == 1:  # LayerNorm gains around 1
                p.add_(1.0)
        model.logit_scale.fill_(2.3)
    path = tmp_path_factory.mktemp("open_clip") / "clip.pt"
    torch.save(model.state_dict(), path)
    return model, torch.load(path, weights_only=True)


def padded_ids(lengths: list[int]) -> torch.Tensor:
    ids = torch.randint(1, EOT, (len(lengths), CONTEXT))
    for row, n in enumerate(lengths):
        ids[row, n - 1], ids[row, n:] = EOT, 0
    return ids


def test_matches_open_clip(open_clip_state):
    peer, state = open_clip_state
    ours = TextImageModel(**clip_kwargs_from_open_clip(state, **HEADS)).eval()
    ours.load_state_dict(clip_state_dict_from_open_clip(state, **HEADS), strict=True)
    images = torch.randn(3, 3, 32, 32)
    ids = padded_ids([16, 11, 5, 2])
    with torch.no_grad():
        img, img_tokens = ours.encode_image(images)
        txt, txt_tokens = ours.encode_text(ids, open_clip_text_mask(ids))
        ref_img = peer.encode_image(images, normalize=True)
        ref_txt = peer.encode_text(ids, normalize=True)
    assert img_tokens.shape == (3, 17, 64) and txt_tokens.shape == (4, CONTEXT, 48)
    torch.testing.assert_close(img, ref_img, atol=1e-5, rtol=0)
    torch.testing.assert_close(txt, ref_txt, atol=1e-5, rtol=0)
    assert ours.logit_scale.item() == peer.logit_scale.item()
    # The head count is not in the state dict: a wrong one loads and differs.
    wrong = TextImageModel(**clip_kwargs_from_open_clip(state, vision_heads=1, text_heads=4))
    wrong.load_state_dict(clip_state_dict_from_open_clip(state, **HEADS))
    with torch.no_grad():
        assert (wrong.eval().encode_image(images)[0] - ref_img).abs().max() > 1e-3


def test_matches_open_clip_with_layer_scale():
    """OpenCLIP towers with LayerScale (``ls_init_value``): the gammas load into both
    towers' ``ls1``/``ls2`` and the embeddings equal ``open_clip``'s."""
    torch.manual_seed(0)
    peer = open_clip.CLIP(
        embed_dim=32,
        vision_cfg=open_clip.CLIPVisionCfg(layers=2, width=64, head_width=32, patch_size=8,
                                           image_size=32, ls_init_value=0.1),
        text_cfg=open_clip.CLIPTextCfg(context_length=CONTEXT, vocab_size=VOCAB, width=48,
                                       heads=4, layers=2, ls_init_value=0.1),
        quick_gelu=False).eval()
    with torch.no_grad():
        for name, p in peer.named_parameters():
            if name.endswith("gamma"):  # each channel its own scale
                p.copy_(torch.rand_like(p) + 0.5)
    state = peer.state_dict()
    kwargs = clip_kwargs_from_open_clip(state, **HEADS)
    assert kwargs["vision"]["layer_scale"] and kwargs["text"]["layer_scale"]
    ours = TextImageModel(**kwargs).eval()
    ours.load_state_dict(clip_state_dict_from_open_clip(state, **HEADS), strict=True)
    images, ids = torch.randn(2, 3, 32, 32), padded_ids([16, 7])
    with torch.no_grad():
        torch.testing.assert_close(ours.encode_image(images)[0],
                                   peer.encode_image(images, normalize=True), atol=1e-5, rtol=0)
        torch.testing.assert_close(ours.encode_text(ids, open_clip_text_mask(ids))[0],
                                   peer.encode_text(ids, normalize=True), atol=1e-5, rtol=0)


def test_open_clip_with_fusion_encoder(open_clip_state):
    _, state = open_clip_state
    kwargs = clip_kwargs_from_open_clip(state, **HEADS) | dict(fusion_depth=1)
    missing, unexpected = TextImageModel(**kwargs).load_state_dict(
        clip_state_dict_from_open_clip(state, **HEADS), strict=False)
    assert not unexpected and missing
    assert all(k.startswith(("fusion.", "match_head.")) for k in missing)


def test_open_clip_refusals(open_clip_state):
    _, state = open_clip_state
    with pytest.raises(ValueError, match="quick_gelu"):
        clip_kwargs_from_open_clip(state, quick_gelu=True)
    with pytest.raises(ValueError, match="text_pool='eos'"):
        clip_kwargs_from_open_clip(state, text_pool="eos")
    with pytest.raises(ValueError, match="vision_heads=3"):
        clip_kwargs_from_open_clip(state, vision_heads=3)
    extra = dict(state) | {"visual.attn_pool.query": torch.zeros(4, 32)}
    with pytest.raises(ValueError, match="visual.attn_pool.query"):
        clip_state_dict_from_open_clip(extra, **HEADS)
    resnet = {k: v for k, v in state.items() if not k.startswith("visual.transformer.")}
    resnet["visual.layer1.0.conv1.weight"] = torch.zeros(8, 8, 1, 1)
    with pytest.raises(ValueError, match="visual.transformer.*ModifiedResNet"):
        clip_kwargs_from_open_clip(resnet)


# --------------------------------------------------------------------------- losses
def reference_loss(logits: torch.Tensor, kind: str) -> torch.Tensor:
    n = logits.shape[0]
    if kind == "clip":
        image_to_text = -logits.log_softmax(1).diagonal().mean()
        text_to_image = -logits.log_softmax(0).diagonal().mean()
        return (image_to_text + text_to_image) / 2
    total = logits.new_zeros(())
    for i in range(n):
        for j in range(n):
            label = 1.0 if i == j else -1.0
            total = total - torch.log(torch.sigmoid(label * logits[i, j]))
    return total / n


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_contrastive_loss_reference(kind):
    logits = torch.randn(6, 6, dtype=torch.float64) * 3
    torch.testing.assert_close(contrastive_loss(logits, kind), reference_loss(logits, kind))
    rows = torch.tensor([1, 4, 5])
    n = logits.shape[0]
    if kind == "clip":
        i2t = -logits.log_softmax(1).diagonal()[rows].mean()
        t2i = -logits.log_softmax(0).diagonal()[rows].mean()
        expected = (i2t + t2i) / 2
    else:
        sign = 2 * torch.eye(n, dtype=logits.dtype) - 1
        expected = -F.logsigmoid(sign * logits)[rows].sum(1).mean()
    torch.testing.assert_close(contrastive_loss(logits, kind, rows=rows), expected)


def test_contrastive_loss_with_duplicate_texts():
    """Items 0, 2 and 5 share one text (a template without the caption): each of their
    images has three right texts and each text three right images."""
    torch.manual_seed(2)
    n = 6
    logits = torch.randn(n, n, dtype=torch.float64) * 3
    group = torch.tensor([0, 1, 0, 2, 3, 0])
    pos = group[:, None] == group[None, :]
    i2t = t2i = 0.0
    for i in range(n):  # soft targets written out, one row at a time
        right = [j for j in range(n) if group[j] == group[i]]
        i2t = i2t - sum(logits[i].log_softmax(0)[j] for j in right) / len(right)
        t2i = t2i - sum(logits[:, i].log_softmax(0)[j] for j in right) / len(right)
    torch.testing.assert_close(contrastive_loss(logits, "clip", positive=pos),
                               (i2t + t2i) / (2 * n))
    siglip = -sum(F.logsigmoid((1.0 if pos[i, j] else -1.0) * logits[i, j])
                  for i in range(n) for j in range(n)) / n
    torch.testing.assert_close(contrastive_loss(logits, "siglip", positive=pos), siglip)
    eye = torch.eye(n, dtype=torch.bool)
    for kind in ("clip", "siglip"):
        torch.testing.assert_close(contrastive_loss(logits, kind, positive=eye),
                                   contrastive_loss(logits, kind))


@pytest.mark.parametrize("kind", ["clip", "siglip"])
def test_loss_split_over_ranks(kind):
    """Two ranks, each with half of the global batch, as with DDP: every rank gathers all
    features with gradients and averages its own rows (``rows=``); the all-gather's
    backward sums the feature gradients of every rank into each rank's half, and DDP
    averages the parameter gradients. That must be the full-batch loss and gradient."""
    torch.manual_seed(1)
    n, world, dim = 8, 2, 5
    x_img, x_txt = torch.randn(n, 7, dtype=torch.float64), torch.randn(n, 3, dtype=torch.float64)
    w_img = torch.randn(7, dim, dtype=torch.float64, requires_grad=True)
    w_txt = torch.randn(3, dim, dtype=torch.float64, requires_grad=True)
    scale = torch.tensor(2.0, dtype=torch.float64, requires_grad=True)
    params = (w_img, w_txt, scale)

    def features():
        return F.normalize(x_img @ w_img, dim=-1), F.normalize(x_txt @ w_txt, dim=-1)

    def loss_of(img, txt, rows=None):
        return contrastive_loss(scale.exp() * img @ txt.T, kind, rows=rows)

    full = loss_of(*features())
    full_grads = torch.autograd.grad(full, params)

    halves = torch.arange(n).chunk(world)
    feats = [f.detach().requires_grad_() for f in features()]  # the gathered features
    rank_losses, feat_grads, scale_grads = [], [], []
    for rows in halves:
        loss = loss_of(*feats, rows=rows)
        g_img, g_txt, g_scale = torch.autograd.grad(loss, [*feats, scale])
        rank_losses.append(loss)
        feat_grads.append((g_img, g_txt))
        scale_grads.append(g_scale)
    torch.testing.assert_close(torch.stack(rank_losses).mean(), full)

    summed = [sum(g[t] for g in feat_grads) for t in range(2)]  # all-gather backward
    rank_param_grads = []
    for r, rows in enumerate(halves):
        img, txt = features()  # rank r computes only its own half's features
        g_w = torch.autograd.grad([img[rows], txt[rows]], [w_img, w_txt],
                                  [summed[0][rows], summed[1][rows]])
        rank_param_grads.append((*g_w, scale_grads[r]))
    ddp_mean = [sum(g[p] for g in rank_param_grads) / world for p in range(3)]
    for got, want in zip(ddp_mean, full_grads):
        torch.testing.assert_close(got, want)


# --------------------------------------------------------------------------- hard negatives
def test_hard_negatives_excludes_same():
    b = 6
    same = torch.eye(b, dtype=torch.bool)
    same[0, 3] = same[3, 0] = same[2, 5] = True  # identical captions
    sim = torch.randn(b, b) * 3 + 10 * torch.eye(b)
    picks = hard_negatives(sim.repeat(200, 1), same.repeat(200, 1),
                           torch.Generator().manual_seed(0))
    assert not same.repeat(200, 1)[torch.arange(200 * b), picks].any()
    assert len(picks.unique()) == b  # every column can be drawn by some row


def test_hard_negatives_peaked_and_seeded():
    b = 8
    target = (torch.arange(b) + 3) % b
    sim = torch.randn(b, b)
    sim[torch.arange(b), target] += 30
    sim += 60 * torch.eye(b)  # the positive far above every negative (logit scale 100)
    same = torch.eye(b, dtype=torch.bool)
    assert torch.equal(hard_negatives(sim, same, torch.Generator().manual_seed(0)), target)

    flat = torch.randn(64, b)
    same = torch.zeros(64, b, dtype=torch.bool)
    a = hard_negatives(flat, same, torch.Generator().manual_seed(7))
    assert torch.equal(a, hard_negatives(flat, same, torch.Generator().manual_seed(7)))
    assert not torch.equal(a, hard_negatives(flat, same, torch.Generator().manual_seed(8)))
    # One caption, nothing to choose from: a uniform draw, not an error.
    assert hard_negatives(torch.zeros(1, 1), torch.ones(1, 1, dtype=torch.bool)).tolist() == [0]


# --------------------------------------------------------------------------- padding mask
def test_bidirectional_text_encoder_ignores_padding():
    enc = TextEncoder(vocab_size=50, embed_dim=32, depth=2, num_heads=4, max_len=20,
                      causal=False, pool="mean").eval()
    lengths = torch.tensor([7, 4, 10])
    ids = torch.randint(1, 50, (3, 10))
    mask = torch.arange(10) < lengths[:, None]
    other = torch.where(mask, ids, torch.randint(1, 50, ids.shape))
    longer = torch.cat([other, torch.randint(1, 50, (3, 6))], dim=1)
    longer_mask = torch.arange(16) < lengths[:, None]
    with torch.no_grad():
        ref = enc(ids, mask)
        changed = enc(other, mask)
        appended = enc(longer, longer_mask)
        unmasked = enc(other, None)
    torch.testing.assert_close(changed[mask], ref[mask], atol=1e-6, rtol=0)
    # More (masked) keys change only the order of the softmax sums: rounding, 1e-6 here.
    torch.testing.assert_close(appended[longer_mask], ref[mask], atol=1e-5, rtol=0)
    torch.testing.assert_close(enc.pooled(appended, longer_mask), enc.pooled(ref, mask),
                               atol=1e-5, rtol=0)
    assert (unmasked[mask] - ref[mask]).abs().max() > 1e-3  # without the mask it leaks


@pytest.mark.parametrize("image_pos", [False, True])
def test_fusion_encoder_sees_where_image_tokens_are(image_pos):
    """Cross-attention treats its keys as a set: without position embeddings added where
    the fusion encoder reads the image tokens, mirroring the tokens left to right leaves
    its output unchanged, and "is the red circle left of the blue square?" cannot be
    answered. With ``fusion_image_pos`` the output changes, and equals the fusion encoder
    run on the tokens plus the ViT's position table (with one image shared by several
    questions too)."""
    torch.manual_seed(0)
    model = TextImageModel(
        vision=dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=4,
                    pos_embed="sincos", pool="mean"),
        text=dict(vocab_size=50, embed_dim=32, depth=1, num_heads=4, max_len=8),
        embed_dim=16, fusion_depth=1, num_answers=3, fusion_image_pos=image_pos).eval()
    _, tokens = model.encode_image(torch.randn(2, 3, 16, 16))
    ids = torch.randint(1, 50, (3, 6))
    mask = torch.arange(6) < torch.tensor([6, 4, 5])[:, None]
    index = torch.tensor([0, 1, 1])
    mirrored = tokens.unflatten(1, (4, 4)).flip(2).flatten(1, 2)
    with torch.no_grad():
        text = model.text(ids, mask)
        out = model.answer_logits(text, mask, tokens, index)
        out_mirrored = model.answer_logits(text, mask, mirrored, index)
        plain = model.answer_head(model.fusion(text, mask, tokens[index]))
        with_pos = model.answer_head(model.fusion(text, mask,
                                                  tokens[index] + model.visual.pos_embed))
    if image_pos:
        assert (out - out_mirrored).abs().max() > 1e-3
        torch.testing.assert_close(out, with_pos, atol=1e-5, rtol=0)
    else:
        torch.testing.assert_close(out, out_mirrored, atol=1e-5, rtol=0)
        torch.testing.assert_close(out, plain, atol=1e-5, rtol=0)


# -- the pair memory, against loops written from its definition ----------------------------
def unit(*shape, seed):
    return F.normalize(torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                                   dtype=torch.float64), dim=-1)


def loop_neighbour_mean(q, keys, values, k, tau, skip=None):
    """One query: its k nearest keys by dot product (never row ``skip``), softmax weights."""
    sims = sorted(((float(q @ keys[j]), j) for j in range(len(keys)) if j != skip),
                  reverse=True)[:k]
    top = torch.tensor([s for s, _ in sims], dtype=torch.float64) / tau
    w = torch.exp(top - top.max())
    w = w / w.sum()
    mean = sum(wj * values[j] for wj, (_, j) in zip(w, sims))
    return mean / mean.norm()


@pytest.mark.parametrize("exclude_self", [False, True])
def test_neighbour_mean_against_a_loop(exclude_self):
    keys, values = unit(13, 6, seed=1), unit(13, 5, seed=2)
    queries = keys if exclude_self else unit(7, 6, seed=3)
    got = neighbour_mean(queries, keys, values, 4, 0.1, exclude_self=exclude_self, chunk=3)
    want = torch.stack([loop_neighbour_mean(q, keys, values, 4, 0.1,
                                            skip=i if exclude_self else None)
                        for i, q in enumerate(queries)])
    torch.testing.assert_close(got, want)
    # more neighbours than keys: all of them (all but the query itself)
    torch.testing.assert_close(
        neighbour_mean(queries, keys, values, 99, 0.1, exclude_self=exclude_self),
        torch.stack([loop_neighbour_mean(q, keys, values, 99, 0.1,
                                         skip=i if exclude_self else None)
                     for i, q in enumerate(queries)]))


@pytest.mark.parametrize("hubness", [0, 3])
def test_memory_scores_against_a_loop(hubness):
    n, d, e = 11, 6, 5
    mem = PairMemory(unit(n, d, seed=4), 2 * unit(n, d, seed=5), unit(n, e, seed=6))
    img, txt, sen = unit(4, d, seed=7), 2 * unit(5, d, seed=8), unit(5, e, seed=9)
    a, b, k, tau = 1.5, 0.5, 3, 0.07

    def score(u, q, w, p, s):  # one image (u, its neighbours' mean sentence q) and one text
        return float(u @ w + a * (u @ p) + b * (q @ s))

    p = [loop_neighbour_mean(s, mem.sentences, mem.images, k, tau) for s in sen]
    q = [loop_neighbour_mean(u, mem.images, mem.sentences, k, tau) for u in img]
    want = torch.tensor([[score(img[i], q[i], txt[t], p[t], sen[t]) for t in range(5)]
                         for i in range(4)], dtype=torch.float64)
    if hubness:
        p_mem = [loop_neighbour_mean(mem.sentences[j], mem.sentences, mem.images, k, tau, j)
                 for j in range(n)]
        q_mem = [loop_neighbour_mean(mem.images[j], mem.images, mem.sentences, k, tau, j)
                 for j in range(n)]
        r_text = [sum(sorted((score(mem.images[j], q_mem[j], txt[t], p[t], sen[t])
                              for j in range(n)), reverse=True)[:hubness]) / hubness
                  for t in range(5)]
        r_image = [sum(sorted((score(img[i], q[i], mem.texts[j], p_mem[j], mem.sentences[j])
                               for j in range(n)), reverse=True)[:hubness]) / hubness
                   for i in range(4)]
        want = want - (torch.tensor(r_text)[None, :] + torch.tensor(r_image)[:, None]) / 2
    got = memory_scores(img, txt, sen, mem, neighbours=k, temperature=tau, text_weight=a,
                        image_weight=b, hubness=hubness)
    torch.testing.assert_close(got, want)


def test_pair_memory_state_is_checked():
    mem = PairMemory(torch.zeros(3, 4), torch.zeros(3, 4), torch.zeros(3, 2))
    back = PairMemory.from_state(mem.state(), 4, 2)
    assert all(torch.equal(x, y) for x, y in zip(back.state().values(),
                                                  mem.state().values()))
    with pytest.raises(ValueError, match=r"widths \{'images': 4, 'texts': 4, 'sentences': 2\}; "
                                         r"expected one count of rows and widths "
                                         r"\{'images': 8"):
        PairMemory.from_state(mem.state(), 8, 2)
    with pytest.raises(ValueError, match="rows \\[2, 3\\]"):
        PairMemory.from_state({**mem.state(), "texts": torch.zeros(2, 4)}, 4, 2)
    with pytest.raises(ValueError, match="is not \\['images', 'sentences', 'texts'\\] as "
                                         "float matrices"):
        PairMemory.from_state({**mem.state(), "texts": "import os"}, 4, 2)
