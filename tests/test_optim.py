"""MuonAdamW: Muon on the hidden matrices, AdamW on the rest."""

import copy
import re

import pytest
import torch
from omegaconf import OmegaConf

from modules.fusion import TextImageModel
from modules.lm import CausalLM
from modules.speech import SpeechEncoder
from modules.vit import VisionTransformer
from tasks.framework.errors import UserError
from tasks.framework.optim import MuonAdamW, configure_optimization, decay_groups, newton_schulz

SCHED = OmegaConf.create({"_target_": "tasks.framework.optim.warmup_cosine",
                          "_partial_": True, "warmup_steps": 0, "min_lr_ratio": 0.1})


def lm():
    torch.manual_seed(0)
    return CausalLM(vocab_size=60, embed_dim=32, depth=2, num_heads=4, num_kv_heads=2,
                    mlp_hidden_dim=48, max_seq_len=16)


def train(model, steps, n=3):
    tokens = torch.randint(0, 60, (4, 13), generator=torch.Generator().manual_seed(1))
    torch.manual_seed(2)  # the same dropout masks
    for _ in range(n):
        model.zero_grad()
        torch.nn.functional.cross_entropy(model(tokens[:, :-1]).flatten(0, 1),
                                          tokens[:, 1:].flatten()).backward()
        for s in steps:
            s.step()


def test_hidden_matrices_are_the_blocks_linear_weights():
    """The embedding tables and the output layers stay with AdamW (ViT: the head and the
    convolutional stem too); every block's projection goes to Muon."""
    model = lm()
    hidden = decay_groups(model, 0.1, hidden_apart=True)[0]
    assert hidden["hidden"] is True
    names = {n for n, p in model.named_parameters() if any(p is q for q in hidden["params"])}
    expect = {n for n, p in model.named_parameters()
              if ".blocks." in n and p.dim() == 2 and "norm" not in n}
    assert names == expect and len(names) == 8
    vit = VisionTransformer(img_size=28, in_chans=1, num_classes=10, patch_size=4,
                            stem_channels=[8], embed_dim=32, depth=2, num_heads=2)
    vit_hidden = decay_groups(vit, 0.05, hidden_apart=True)[0]["params"]
    names = {n for n, p in vit.named_parameters() if any(p is q for q in vit_hidden)}
    linears = {f"{n}.weight" for n, m in vit.named_modules() if isinstance(m, torch.nn.Linear)}
    assert names == {n for n in linears if ".blocks." in n} and len(names) == 8


def muon_names(model) -> set[str]:
    hidden = decay_groups(model, 0.1, hidden_apart=True)[0]["params"]
    return {n for n, p in model.named_parameters() if any(p is q for q in hidden)}


def test_input_and_output_projections_stay_with_adamw():
    """The speech model's input layer (after the convolutions) and the fusion model's
    projections into the shared space (``no_muon()``) are not Muon's; the blocks' are."""
    speech = SpeechEncoder(num_outputs=6, n_mels=16, subsample_channels=4, embed_dim=32,
                           depth=2, num_heads=4, mlp_hidden_dim=48)
    names = muon_names(speech)
    assert "subsample.proj.weight" not in names and "head.weight" not in names
    linears = {f"{n}.weight" for n, m in speech.named_modules()
               if isinstance(m, torch.nn.Linear)}
    assert names == linears - {"subsample.proj.weight", "head.weight"} and len(names) == 8
    fusion = TextImageModel(
        vision=dict(img_size=16, patch_size=4, embed_dim=32, depth=1, num_heads=4),
        text=dict(vocab_size=50, embed_dim=32, depth=1, num_heads=4, max_len=8),
        embed_dim=16, fusion_depth=1, num_answers=3, sentence_dim=24)
    names = muon_names(fusion)
    outer = {"text_proj.weight", "sentence_proj.weight", "visual.head.weight",
             "match_head.weight", "answer_head.weight"}
    linears = {f"{n}.weight" for n, m in fusion.named_modules()
               if isinstance(m, torch.nn.Linear)}
    assert outer <= linears and names == linears - outer


def test_steps_as_torch_muon_beside_torch_adamw():
    """With bfloat16 Newton-Schulz products (torch.optim.Muon's), three steps equal those of
    torch.optim.Muon on the hidden matrices and torch.optim.AdamW on the rest."""
    ours, ref = lm(), lm()
    opt = MuonAdamW(decay_groups(ours, 0.1, hidden_apart=True), lr=3e-3, ns_dtype="bfloat16")
    groups = decay_groups(ref, 0.1, hidden_apart=True)
    groups[0].pop("hidden")
    ref_steps = [torch.optim.Muon(groups[:1], lr=3e-3, weight_decay=0.1,
                                  adjust_lr_fn="match_rms_adamw"),
                 torch.optim.AdamW(groups[1:], lr=3e-3, betas=(0.9, 0.95))]
    train(ours, [opt])
    train(ref, ref_steps)
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0, msg=name)


def test_newton_schulz_orthogonalises_in_float32():
    """The result keeps the matrix's singular vectors, with singular values near 1 (the
    quintic's range), against an SVD; float32 and bfloat16 agree to bfloat16's precision."""
    g = torch.randn(48, 80, dtype=torch.float64) @ torch.diag(torch.logspace(-2, 1, 80,
                                                                             dtype=torch.float64))
    u, s, vh = torch.linalg.svd(g, full_matrices=False)
    for dtype in (torch.float32, torch.bfloat16):
        for m in (g, g.T):
            out = newton_schulz(m.float(), dtype=dtype)
            assert out.dtype == dtype and out.shape == m.shape
        out = newton_schulz(g.float(), dtype=dtype).double()
        core = u.T @ out @ vh.T  # diagonal where the singular vectors are kept
        diag = core.diagonal()
        assert (core - torch.diag(diag)).abs().max() < (0.05 if dtype == torch.bfloat16 else 1e-3)
        assert diag[s > 0.05 * s[0]].min() > 0.6 and diag.max() < 1.25
    torch.testing.assert_close(newton_schulz(g.float(), dtype=torch.float32),
                               newton_schulz(g.float(), dtype=torch.bfloat16).float(),
                               atol=0.03, rtol=0)


def test_state_round_trip_continues_the_same_steps():
    """A checkpointed optimizer (both halves' state in one state_dict) restored into a fresh
    one steps exactly as the original."""
    a = lm()
    opt_a = MuonAdamW(decay_groups(a, 0.1, hidden_apart=True), lr=3e-3, ns_dtype="float32")
    sched_a = torch.optim.lr_scheduler.LinearLR(opt_a, 1.0, 0.2, total_iters=4)
    train(a, [opt_a, sched_a], n=2)
    b = copy.deepcopy(a)
    opt_b = MuonAdamW(decay_groups(b, 0.1, hidden_apart=True), lr=3e-3, ns_dtype="float32")
    sched_b = torch.optim.lr_scheduler.LinearLR(opt_b, 1.0, 0.2, total_iters=4)
    state = copy.deepcopy(opt_a.state_dict())  # as read back from a file
    assert len(state["state"]) == len(list(a.parameters()))
    opt_b.load_state_dict(state)
    sched_b.load_state_dict(sched_a.state_dict())
    train(a, [opt_a, sched_a], n=2)  # the schedule moves both halves' rates
    train(b, [opt_b, sched_b], n=2)
    assert [g["lr"] for g in opt_b.adamw.param_groups] == \
        [g["lr"] for g in opt_a.adamw.param_groups]
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_an_older_state_file_loads_as_adamw_would_load_it():
    """A file without AdamW's newer settings and with its step as a number (as older torch
    wrote it) steps as the state it came from; the products' precision is this run's, not
    the file's."""
    a = lm()
    opt_a = MuonAdamW(decay_groups(a, 0.1, hidden_apart=True), lr=3e-3, ns_dtype="float32")
    train(a, [opt_a], n=2)
    old = copy.deepcopy(opt_a.state_dict())
    assert all("ns_dtype" not in g for g in old["param_groups"])
    old["param_groups"][0]["ns_dtype"] = "bfloat16"  # as the first files kept it
    for g in old["param_groups"][opt_a._n_muon:]:
        for key in ("decoupled_weight_decay", "amsgrad", "maximize", "capturable"):
            g.pop(key)
        for i in g["params"]:
            old["state"][i]["step"] = float(old["state"][i]["step"])
    b = copy.deepcopy(a)
    opt_b = MuonAdamW(decay_groups(b, 0.1, hidden_apart=True), lr=3e-3, ns_dtype="float32")
    opt_b.load_state_dict(old)
    train(a, [opt_a], n=2)
    train(b, [opt_b], n=2)
    for (name, x), y in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(x, y, rtol=0, atol=0, msg=name)


def test_a_group_added_later_trains_with_its_half():
    """As Lightning's fine-tuning callbacks add groups: a ``hidden`` one goes to Muon, another
    to AdamW, and both train; a parameter given twice is refused."""
    model, extra = lm(), torch.nn.Linear(8, 8, bias=False)
    frozen = model.decoder.blocks[1]
    for p in frozen.parameters():
        p.requires_grad_(False)
    opt = MuonAdamW(decay_groups(model, 0.1, hidden_apart=True), lr=3e-3, ns_dtype="float32")
    n_muon = opt._n_muon
    matrices = [m.weight for m in frozen.modules() if isinstance(m, torch.nn.Linear)]
    rest = [p for p in frozen.parameters() if all(p is not q for q in matrices)]
    for p in frozen.parameters():
        p.requires_grad_(True)
    opt.add_param_group({"params": matrices, "weight_decay": 0.1, "hidden": True})
    opt.add_param_group({"params": rest + [extra.weight], "weight_decay": 0.0})
    assert opt._n_muon == n_muon + 1 and opt.param_groups[n_muon]["muon"]
    assert opt.param_groups[n_muon + 1:] == opt.adamw.param_groups
    assert opt.adamw.param_groups[-1]["params"][-1] is extra.weight
    before = {n: p.detach().clone() for n, p in frozen.named_parameters()}
    extra_before = extra.weight.detach().clone()
    extra.weight.grad = torch.ones(8, 8)
    train(model, [opt], n=1)
    assert all(not torch.equal(before[n], p) for n, p in frozen.named_parameters())
    # AdamW's first step moves each weight by the rate against its gradient's sign
    torch.testing.assert_close(extra.weight.detach(), extra_before - 3e-3)
    with pytest.raises(ValueError, match="more than one parameter group"):
        opt.add_param_group({"params": [extra.weight]})


def test_the_config_group_builds_it_and_refuses_bad_values():
    from hydra import compose, initialize_config_dir

    from tasks.framework.config import CONF_DIR
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfg = compose("lm", overrides=["optimizer=muon"])
    out = configure_optimization(lm(), cfg.optimizer, SCHED, total_steps=10)
    opt, sched = out["optimizer"], out["lr_scheduler"]["scheduler"]
    assert isinstance(opt, MuonAdamW)
    assert opt.param_groups[0]["muon"]
    assert opt.param_groups[0]["lr"] == cfg.optimizer.lr * cfg.optimizer.muon_lr_scale
    assert opt.param_groups[-1]["lr"] == pytest.approx(cfg.optimizer.lr * 10)  # the tables
    for _ in range(5):
        sched.step()  # one schedule moves both halves
    assert opt.param_groups[0]["lr"] == pytest.approx(sched.get_last_lr()[0])
    for key, value in (("adjust_lr_fn", "spectral"), ("ns_dtype", "float16"),
                       ("momentum", 1.5), ("ns_steps", 0), ("ns_steps", 2.5),
                       ("ns_steps", True), ("ns_steps", 1000), ("muon_lr_scale", -1),
                       ("muon_lr_scale", True), ("nesterov", "no"),
                       ("ns_coefficients", [1, 2])):
        bad = cfg.optimizer.copy()
        bad[key] = value
        with pytest.raises(UserError, match=re.escape(f"optimizer.{key}={value!r} is not valid")):
            configure_optimization(lm(), bad, SCHED, total_steps=10)
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        vit = compose("vit")  # Muon by default; optimizer=adamw leaves no Muon setting behind
        adamw = compose("vit", overrides=["optimizer=adamw"])
        translation = compose("translation")  # Muon with three iterations
        translation5 = compose("translation", overrides=["optimizer=muon"])
    assert vit.optimizer.ns_steps == 5 and translation5.optimizer.ns_steps == 5
    assert translation.optimizer.ns_steps == 3
    assert {k: v for k, v in translation.optimizer.items() if k != "ns_steps"} == \
        {k: v for k, v in translation5.optimizer.items() if k != "ns_steps"}
    assert vit.optimizer._target_.endswith("MuonAdamW")
    assert adamw.optimizer._target_ == "torch.optim.AdamW" and "momentum" not in adamw.optimizer
    model = VisionTransformer(img_size=28, in_chans=1, num_classes=10, patch_size=4,
                              stem_channels=[8], embed_dim=32, depth=2, num_heads=2)
    opt = configure_optimization(model, adamw.optimizer, SCHED, total_steps=10)["optimizer"]
    assert type(opt) is torch.optim.AdamW
    with pytest.raises(UserError, match="no hidden weight matrix"):
        configure_optimization(torch.nn.Sequential(torch.nn.Embedding(5, 4)), cfg.optimizer,
                               SCHED, total_steps=10)
