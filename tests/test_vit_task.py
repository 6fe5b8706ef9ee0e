"""The ViT: timm parity on the same weights, position-embedding interpolation, and the vit
task end to end on a small image folder (training, plots, prediction, init-from, errors)."""

import json
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from PIL import Image

from modules.converters import vit_state_dict_from_timm
from modules.vit import VisionTransformer, resize_pos_embed, sincos_2d
from tasks import vit as vit_task
from tasks.framework.errors import UserError
from tasks.framework.optim import decay_groups

ROOT = Path(__file__).resolve().parents[1]


# timm's ways of pooling: its class token; the mean of the patch tokens beside a class
# token, normalised after pooling (fc_norm, timm's default with "avg", as in MAE); the mean
# with no class token and the tokens normalised (fc_norm=False, the "_gap" models); and
# the layouts of DeiT III and of the models with register tokens
TIMM_POOLS = {"token": dict(global_pool="token"), "avg_fc_norm": dict(global_pool="avg"),
              "avg_no_class_token": dict(global_pool="avg", class_token=False, fc_norm=False),
              # DeiT III: layer scale, and a position table without the class token's row
              "deit3": dict(global_pool="token", no_embed_class=True, init_values=1e-6),
              # register tokens with a position row each, as timm lays them out by default
              "reg4": dict(global_pool="token", reg_tokens=4),
              # timm's "_reg4_gap" models: registers, no class token, a table for the patches
              "reg4_gap": dict(global_pool="avg", class_token=False, fc_norm=False,
                               reg_tokens=4, no_embed_class=True),
              # DINOv2 with registers: both, layer scale from 1e-5
              "dinov2_reg4": dict(global_pool="token", reg_tokens=4, no_embed_class=True,
                                  init_values=1e-5),
              # CLIP's image tower: a LayerNorm before the blocks (ln_pre), epsilon 1e-5
              "clip": dict(global_pool="token", pre_norm=True,
                           norm_layer=partial(torch.nn.LayerNorm, eps=1e-5))}


def saved_timm_vit(path: Path, mlp_ratio: float, img_size: int = 28, **pool):
    """A timm ViT (28 px by default, 7 px patches, d48 x 2, 4 heads, by default with
    class-token pooling: ``pool`` gives other ``TIMM_POOLS``) with non-trivial norms, biases
    and class token, its state dict saved at ``path``."""
    timm = pytest.importorskip("timm")
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=img_size, patch_size=7, in_chans=1, num_classes=10, embed_dim=48, depth=2,
        num_heads=4, mlp_ratio=mlp_ratio, qkv_bias=True, **(pool or TIMM_POOLS["token"])).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    torch.save(ref.state_dict(), path)
    return ref


# each of TIMM_POOLS and the settings of ours that compute the same
OUR_POOLS = [("token", dict(pool="token")),
             ("avg_fc_norm", dict(pool="mean", class_token=True, fc_norm=True)),
             ("avg_no_class_token", dict(pool="mean")),
             ("deit3", dict(pool="token", layer_scale=1e-6)),
             ("reg4", dict(pool="token", registers=4)),
             ("reg4_gap", dict(pool="mean", registers=4)),
             ("dinov2_reg4", dict(pool="token", registers=4, layer_scale=1e-5)),
             ("clip", dict(pool="token", pre_norm=True, norm_eps=1e-5))]


def our_twin(ours_pool: dict) -> VisionTransformer:
    """Ours in the shape of ``saved_timm_vit``'s model."""
    return VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10,
                             embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0, **ours_pool)


@pytest.mark.parametrize("pool, ours_pool", OUR_POOLS)
def test_matches_timm_logits_on_the_same_weights(tmp_path, pool, ours_pool):
    ref = saved_timm_vit(tmp_path / "timm_vit.pth", 2.0, **TIMM_POOLS[pool])
    ours = our_twin(ours_pool).eval()
    sd = torch.load(tmp_path / "timm_vit.pth")
    ours.load_state_dict(vit_state_dict_from_timm(sd, depth=2))
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("pool, ours_pool", OUR_POOLS)
def test_weight_decay_falls_where_timm_puts_it(tmp_path, pool, ours_pool):
    """The tensors the optimizer decays are those timm's ``param_groups_weight_decay``
    decays with the model's ``no_weight_decay()`` (class token, registers, learned
    positions, besides norms and biases): each timm tensor, filled with 1 where timm
    decays it and 0 where not, goes through the converter onto our parameter."""
    from timm.optim import param_groups_weight_decay
    ref = saved_timm_vit(tmp_path / "timm_vit.pth", 2.0, **TIMM_POOLS[pool])
    decayed = {id(p) for g in param_groups_weight_decay(ref, 0.05,
                                                        no_weight_decay_list=ref.no_weight_decay())
               if g["weight_decay"] for p in g["params"]}
    flags = vit_state_dict_from_timm(
        {k: torch.full_like(p, float(id(p) in decayed)) for k, p in ref.named_parameters()}, 2)
    ours = our_twin(ours_pool)
    groups = decay_groups(ours, 0.05)
    ours_decayed = {id(p) for g in groups if g["weight_decay"] for p in g["params"]}
    assert sum(len(g["params"]) for g in groups) == len(list(ours.parameters()))
    for name, p in ours.named_parameters():
        assert torch.all(flags[name] == float(id(p) in ours_decayed)), name
    assert ours.pos_embed.dim() == 3 and id(ours.pos_embed) not in ours_decayed


def test_a_position_table_that_reads_two_ways_is_told_apart_by_the_grid(tmp_path):
    """A class token and four registers with a table for a 3x3 grid alone (9 rows) read
    also as a 2x2 grid with their rows (4 + 5): the model's grid decides, giving timm's
    logits; with no grid to go by (a table to be resized) it is an error, not a guess."""
    ref = saved_timm_vit(tmp_path / "timm_vit.pth", 2.0, img_size=21, reg_tokens=4,
                         no_embed_class=True)
    ours = VisionTransformer(img_size=21, patch_size=7, in_chans=1, num_classes=10,
                             embed_dim=48, depth=2, num_heads=4, mlp_ratio=2.0, pool="token",
                             registers=4).eval()
    ours.load_state_dict(vit_state_dict_from_timm(ref.state_dict(), 2, grid=3))
    x = torch.randn(3, 1, 21, 21)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=1e-4, atol=1e-5)
    with pytest.raises(ValueError, match="9 rows reads both as a grid alone and as a grid "
                                         ".*trained at, 21 or 14 px"):
        vit_state_dict_from_timm(ref.state_dict(), 2, grid=4)


def test_class_token_gradients_match_timm(tmp_path):
    """Class-token pooling runs the last block for the class token alone: the loss and
    every parameter gradient still equal timm's, which encodes every token."""
    timm = pytest.importorskip("timm")
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=7, in_chans=1, num_classes=10, embed_dim=48, depth=3,
        num_heads=4, mlp_ratio=2.0, qkv_bias=True, global_pool="token")
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ours = VisionTransformer(img_size=28, patch_size=7, in_chans=1, num_classes=10,
                             embed_dim=48, depth=3, num_heads=4, mlp_ratio=2.0, pool="token")
    ours.load_state_dict(vit_state_dict_from_timm(ref.state_dict(), depth=3))
    x, y = torch.randn(4, 1, 28, 28), torch.tensor([0, 3, 7, 9])
    loss = F.cross_entropy(ours(x), y)
    loss.backward()
    ref_loss = F.cross_entropy(ref(x), y)
    ref_loss.backward()
    torch.testing.assert_close(loss, ref_loss, rtol=1e-5, atol=1e-6)
    ref_grads = vit_state_dict_from_timm({k: p.grad for k, p in ref.named_parameters()}, 3)
    for name, p in ours.named_parameters():
        torch.testing.assert_close(p.grad, ref_grads[name], rtol=1e-4, atol=1e-6, msg=name)
    with torch.no_grad():  # and equal to encoding every token, then taking the first
        torch.testing.assert_close(ours.head(ours.features(x)[:, 0]), ours(x))


def test_pos_embed_interpolation_keeps_prefix_and_grid():
    pos = torch.randn(1, 1 + 16, 8)
    out = resize_pos_embed(pos, 8, num_prefix=1)
    assert out.shape == (1, 1 + 64, 8)
    torch.testing.assert_close(out[:, :1], pos[:, :1])
    torch.testing.assert_close(resize_pos_embed(pos, 4, 1), pos)
    # a constant grid stays constant under bicubic resizing
    const = torch.ones(1, 16, 8)
    torch.testing.assert_close(resize_pos_embed(const, 6, 0), torch.ones(1, 36, 8))


def test_sincos_table_shape_and_distinct_rows():
    t = sincos_2d(4, 4, 16)
    assert t.shape == (16, 16)
    assert torch.cdist(t, t).fill_diagonal_(1).min() > 0.1


def test_register_tokens_take_no_position_and_no_part_in_the_mean():
    """Registers sit after the class token with zero rows in the sin-cos table, attend with
    the patches, and mean pooling reads the patch tokens alone."""
    torch.manual_seed(0)
    m = VisionTransformer(img_size=16, patch_size=4, in_chans=1, num_classes=3, embed_dim=16,
                          depth=1, num_heads=2, pool="mean", class_token=True, registers=2,
                          pos_embed="sincos").eval()
    assert m.num_prefix == 3 and m.pos_embed.shape == (1, 3 + 16, 16)
    torch.testing.assert_close(m.pos_embed[0, :3], torch.zeros(3, 16))
    torch.testing.assert_close(m.pos_embed[0, 3:], sincos_2d(4, 4, 16))
    x = torch.randn(2, 1, 16, 16)
    with torch.no_grad():
        tokens = m.features(x)
        assert tokens.shape == (2, 3 + 16, 16)
        torch.testing.assert_close(m(x), m.head(tokens[:, 3:].mean(1)))
        before = m(x)
        m.reg_token.add_(torch.randn_like(m.reg_token))  # attended to: the logits move
        assert not torch.allclose(m(x), before)



def test_strided_stem_tokens_see_their_patch_and_the_overlap_only():
    """Two stride-2 3x3 convolutions then a 2x2 patchify: token column p sees pixel columns
    8p-3 .. 8p+7 (receptive-field arithmetic), so column 1 reads pixel 5 of its left
    neighbour's patch; column 0 never reads pixel 8, nor column 1 pixel 16."""
    from modules.vit import PatchEmbed

    torch.manual_seed(0)
    pe = PatchEmbed(img_size=32, patch_size=8, in_chans=1, embed_dim=16,
                    stem_channels=(4, 8), stem_stride=2).eval()
    assert pe.proj.kernel_size == (2, 2) and pe.grid == 4
    x = torch.randn(1, 1, 32, 32)
    base = pe(x).view(4, 4, 16)  # (row, column, E)

    def moved(column):
        y = x.clone()
        y[..., column] += 5.0
        return (pe(y).view(4, 4, 16) - base).abs().amax(dim=(0, 2))  # per token column

    assert moved(5)[1] > 1e-3 and moved(5)[0] > 1e-3
    assert moved(8)[0] == 0 and moved(8)[1] > 1e-3
    assert moved(16)[1] == 0 and moved(16)[2] > 1e-3
    with pytest.raises(ValueError, match="multiple of 4"):
        PatchEmbed(img_size=36, patch_size=6, in_chans=1, embed_dim=16,
                   stem_channels=(4, 8), stem_stride=2)


@pytest.fixture()
def image_folder(tmp_path):
    """Three classes of noisy 16x16 images, told apart by their brightness."""
    root = tmp_path / "imgs"
    g = torch.Generator().manual_seed(0)
    for c, name in enumerate(["left", "middle", "right"]):
        (root / name).mkdir(parents=True)
        for i in range(40):
            img = (torch.rand(16, 16, generator=g) * 60 + 90 * c).to(torch.uint8)
            Image.fromarray(img.numpy(), mode="L").save(root / name / f"{i}.png")
    (root / "left" / "broken.png").write_bytes(b"not a png")
    return root


def make_cfg(run_dir, root, *overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("vit", overrides=[
            "model=vit_tiny", "model.patch_size=4", f"data.root={root}", "data.img_size=16",
            "data.batch_size=16", "trainer.max_steps=30", "trainer.val_check_interval=15",
            "trainer.log_every_n_steps=5", "scheduler.warmup_steps=3", "optimizer.lr=3e-3",
            f"run_dir={run_dir}", *overrides])


def test_train_predict_and_outputs(tmp_path, image_folder, monkeypatch):
    out = tmp_path / "run"
    res = vit_task.run(make_cfg(out, image_folder))
    assert res["skipped_images"] == 1 and res["classes"] == 3
    assert res["test_acc"] > 0.8  # the classes are easy; chance is 0.33
    for name in ("results.json", "confusion.png", "loss_curves.png", "split.json",
                 "checkpoints/best.ckpt"):
        assert (out / name).is_file(), name
    split = json.loads((out / "split.json").read_text())
    assert not set(split["train"]) & set(split["test"])
    pred = vit_task.run(make_cfg(tmp_path / "p1", image_folder, "mode=predict",
                                 f"ckpt={out}/checkpoints/best.ckpt",
                                 f"images={image_folder}/right/1*.png"))
    tops = [p["top"][0][0] for p in pred["predictions"]]
    assert len(tops) == 11 and tops.count("right") >= 9
    saved = json.loads((tmp_path / "p1" / "predict.json").read_text())
    assert saved == json.loads(json.dumps(pred)) and saved["predictions"][0]["top"][0][1] > 0
    broken = next(image_folder.rglob("broken.png"))  # skipped and named, or it stops
    pred = vit_task.run(make_cfg(tmp_path / "p2", image_folder, "mode=predict",
                                 f"ckpt={out}/checkpoints/best.ckpt",
                                 f"images=[{image_folder}/right/1*.png,{broken}]"))
    assert len(pred["predictions"]) == 11
    assert pred["skipped"] == [{"file": str(broken),
                                "reason": "cannot be read (UnidentifiedImageError)"}]
    monkeypatch.setattr(vit_task, "PREDICT_BATCH", 4)  # 11 images in batches of 4, 4, 3
    chunked = vit_task.run(make_cfg(tmp_path / "p4", image_folder, "mode=predict",
                                    f"ckpt={out}/checkpoints/best.ckpt",
                                    f"images={image_folder}/right/1*.png"))
    for a, b in zip(chunked["predictions"], saved["predictions"], strict=True):
        assert a["file"] == b["file"] and [c for c, _ in a["top"]] == [c for c, _ in b["top"]]
        assert [v for _, v in a["top"]] == pytest.approx([v for _, v in b["top"]], abs=1e-5)
    with pytest.raises(UserError, match="broken.png cannot be read"):
        vit_task.run(make_cfg(tmp_path / "p3", image_folder, "mode=predict",
                              "data.on_bad_image=error",
                              f"ckpt={out}/checkpoints/best.ckpt", f"images={broken}"))


def test_mistake_grid_keeps_titles_off_the_images(tmp_path, saved_figures):
    n = 40  # 11 mistakes: a second row, whose titles sat on the first row's images
    data = SimpleNamespace(images=torch.rand(n, 1, 28, 28), labels=torch.arange(n) % 10,
                           classes=[str(i) for i in range(10)])
    preds = torch.arange(n) % 10
    preds[:11] = (preds[:11] + 1) % 10
    path = vit_task.plot_mistakes([(torch.arange(n), preds)], data, list(range(n)),
                                  tmp_path / "misclassified.png")
    assert path.is_file()
    assert saved_figures["misclassified.png"] == []


@pytest.mark.parametrize("classes", [["left", "middle", "right"], list("0123456789"),
                                     [f"class {i}" for i in range(12)]])
def test_confusion_matrix_labels_do_not_run_into_each_other(tmp_path, saved_axes, classes):
    from tasks.framework.reporting import plot_confusion
    cm = torch.randint(0, 30, (len(classes), len(classes)))
    plot_confusion(cm, classes, tmp_path / "confusion.png", "test")
    assert saved_axes["confusion.png"] == [("predicted", "true", [])]


def test_shifted_views_move_the_image_and_repeat_its_border():
    x = torch.arange(2 * 3 * 5 * 6, dtype=torch.float32).view(2, 3, 5, 6)
    views = vit_task.shifted_views(x, 2)
    assert len(views) == 5 and views[0] is x and vit_task.shifted_views(x, 0) == [x]
    # view at offset (dy, dx) shows pixel (i + dy, j + dx), clamped to the image
    for view, (dy, dx) in zip(views[1:], [(-2, 0), (2, 0), (0, -2), (0, 2)]):
        for i in range(5):
            for j in range(6):
                src = x[..., min(max(i + dy, 0), 4), min(max(j + dx, 0), 5)]
                assert torch.equal(view[..., i, j], src), (dy, dx, i, j)


def test_test_time_views_average_the_probabilities(tmp_path, image_folder):
    out = tmp_path / "run"
    res = vit_task.run(make_cfg(out, image_folder, "test_time_shifts=1"))
    assert res["test_time_shifts"] == 1 and 0 <= res["test_acc_one_view"] <= 1
    module = vit_task.ViTModule.from_checkpoint(out / "checkpoints/best.ckpt",
                                                test_time_shifts=1)
    x = torch.randn(3, 1, 16, 16)
    with torch.no_grad():
        log_probs, one = module.predict_log_probs(x)
        probs = torch.zeros(3, 3)
        for dy, dx in [(0, 0), (-1, 0), (1, 0), (0, -1), (0, 1)]:
            rows = torch.arange(16).add(dy).clamp(0, 15)
            cols = torch.arange(16).add(dx).clamp(0, 15)
            probs += module.model(x[:, :, rows][:, :, :, cols]).softmax(-1) / 5
        torch.testing.assert_close(log_probs.exp(), probs)
        torch.testing.assert_close(one, module.model(x))
        module.test_time_shifts = 0
        torch.testing.assert_close(module.predict_log_probs(x)[0],
                                   module.model(x).log_softmax(-1))
    pred = vit_task.run(make_cfg(out, image_folder, "mode=predict", "test_time_shifts=1",
                                 f"ckpt={out}/checkpoints/best.ckpt",
                                 f"images={image_folder}/right/1.png"))
    img = vit_task.load_image(image_folder / "right/1.png", 16, 1)
    tf = vit_task.build_transforms(None, module.meta["mean"], module.meta["std"], train=False)
    module.test_time_shifts = 1
    with torch.no_grad():
        expected = module.predict_log_probs(tf(img)[None])[0].exp()[0].max().item()
    assert pred["predictions"][0]["top"][0][1] == pytest.approx(expected, abs=1e-6)


@pytest.mark.parametrize("value", ["-1", "8", "1.5", "true", "one"])
def test_bad_test_time_shifts_is_one_line(tmp_path, image_folder, value):
    with pytest.raises(UserError, match=r"test_time_shifts=.* is not valid: expected an "
                                        r"integer from 0 to 7 \(pixels, for 16 px images"):
        vit_task.run(make_cfg(tmp_path / "r", image_folder, f"test_time_shifts={value}"))
    assert not (tmp_path / "r" / "split.json").exists()  # refused before the data is read


def test_a_class_folder_without_an_image_is_named(tmp_path, image_folder):
    """An empty class folder would be an output class no image teaches (with one real class
    beside it, a run that reports 100%)."""
    (image_folder / "empty").mkdir()
    (image_folder / "empty" / "broken.png").write_bytes(b"not a png")
    with pytest.raises(UserError, match=r"class folder '.*empty' holds no readable image; "
                                        r"expected images .* in every class folder"):
        vit_task.run(make_cfg(tmp_path / "r", image_folder))


def test_bad_image_can_stop_the_run(tmp_path, image_folder):
    with pytest.raises(UserError, match="broken.png cannot be read"):
        vit_task.run(make_cfg(tmp_path / "r", image_folder, "data.on_bad_image=error"))


def test_init_from_new_classes_and_image_size(tmp_path, image_folder):
    """The head's rows follow the class names: "middle" renamed "centre" (as many classes,
    a different list) starts fresh, "left" and "right" keep their trained rows."""
    out = tmp_path / "a"
    vit_task.run(make_cfg(out, image_folder))
    other = tmp_path / "other"
    for old, new in (("left", "left"), ("middle", "centre"), ("right", "right")):
        (other / new).mkdir(parents=True)
        for f in sorted((image_folder / old).glob("[0-9]*.png")):
            Image.open(f).resize((32, 32)).save(other / new / f.name)
    ckpt = out / "checkpoints" / "best.ckpt"
    res = vit_task.run(make_cfg(tmp_path / "b", other, f"init_from={ckpt}",
                                "data.img_size=32", "trainer.max_steps=2", "optimizer.lr=1e-9"))
    assert not res["init_from"]["missing"] and res["init_from"]["loaded"] >= 10

    def head(path):
        state = torch.load(path, weights_only=True)["state_dict"]
        return state["model.head.weight"], state["model.head.bias"]

    (w0, b0), (w1, b1) = head(ckpt), head(tmp_path / "b" / "checkpoints" / "last.ckpt")
    for new, old in ((1, 0), (2, 2)):  # centre, left, right <- left, middle, right
        assert torch.allclose(w1[new], w0[old], atol=1e-6) and abs(b1[new] - b0[old]) < 1e-6
    assert not torch.allclose(w1[0], w0[0], atol=1e-3)  # centre is not left's row
    assert not torch.allclose(w1[0], w0[1], atol=1e-3)  # nor middle's
    # resuming on other classes is one error naming them
    with pytest.raises(UserError, match=r"resume=.*last.ckpt was trained on other classes "
                                        r"than this run's data gives \('left' vs 'centre'\)"):
        vit_task.run(make_cfg(tmp_path / "c", other, f"resume={out}/checkpoints/last.ckpt",
                              "trainer.max_steps=40"))


def test_a_resume_that_does_not_fit_leaves_the_run_as_it_was(tmp_path, image_folder):
    import shutil
    out = tmp_path / "a"
    vit_task.run(make_cfg(out, image_folder))
    before = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()}
    # another split rewrites split.json before the model is found not to fit
    with pytest.raises(UserError, match="does not fit this model"):
        vit_task.run(make_cfg(out, image_folder, "resume=auto", "model.depth=3",
                              "data.split=[0.6,0.2,0.2]", "trainer.max_steps=40"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # and so does one whose new split leaves no training batch
    with pytest.raises(UserError, match="the training set gives no batch"):
        vit_task.run(make_cfg(out, image_folder, "resume=auto", "data.split=[0.1,0.45,0.45]",
                              "trainer.max_steps=40"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # another seed or split of the same model would test on images it trained on
    for change in ("seed=7", "data.split=[0.6,0.2,0.2]"):
        with pytest.raises(UserError, match=r"last.ckpt was trained on another split of the "
                                            r"data than this run makes"):
            vit_task.run(make_cfg(out, image_folder, "resume=auto", change,
                                  "trainer.max_steps=40"))
        assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # a checkpoint from before the split was recorded, and trainer settings that fail after
    # the data was prepared: the files are put back too
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    del ckpt["attnkit"]["split_digest"]
    torch.save(ckpt, out / "checkpoints" / "last.ckpt")
    with pytest.raises(UserError, match=r"trainer.gradient_clip_val=-1"):
        vit_task.run(make_cfg(out, image_folder, "resume=auto", "data.split=[0.6,0.2,0.2]",
                              "trainer.gradient_clip_val=-1", "trainer.max_steps=40"))
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file()} == before
    # another run's checkpoint does not continue into a folder holding a finished run
    shutil.copytree(out, tmp_path / "b")
    with pytest.raises(UserError, match="already holds a run"):
        vit_task.run(make_cfg(tmp_path / "b", image_folder,
                              f"resume={out}/checkpoints/last.ckpt", "trainer.max_steps=40"))
    assert (tmp_path / "b" / "results.json").read_bytes() == before["results.json"]


def test_an_incomplete_timm_state_dict_is_one_error(tmp_path, image_folder):
    bad = tmp_path / "partial.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(32, 1, 4, 4)}, bad)
    with pytest.raises(UserError, match="is not a timm VisionTransformer state dict this "
                                        "model can take .*; expected the tensors of timm's "
                                        "VisionTransformer"):
        vit_task.run(make_cfg(tmp_path / "r", image_folder, f"init_from={bad}"))
    timm = pytest.importorskip("timm")
    attention_pool = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2,
        global_pool="map")
    torch.save(attention_pool.state_dict(), bad)
    with pytest.raises(UserError, match=r"unsupported keys .*'attn_pool.*attention pooling"):
        vit_task.run(make_cfg(tmp_path / "r", image_folder, f"init_from={bad}"))


def test_timm_state_dict_as_init_from(tmp_path, image_folder):
    timm = pytest.importorskip("timm")
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=16, patch_size=4, in_chans=1, num_classes=1000, embed_dim=32, depth=2,
        num_heads=2, mlp_ratio=2.0, qkv_bias=True, global_pool="token")
    torch.save(ref.state_dict(), tmp_path / "timm.pth")
    res = vit_task.run(make_cfg(tmp_path / "r", image_folder, f"init_from={tmp_path}/timm.pth",
                                "trainer.max_steps=2"))
    assert res["init_from"]["missing"] == ["head.bias", "head.weight"]
    # edited: a value that is no tensor, position embeddings of no grid
    for key, value, expect in [("blocks.0.norm1.weight", "text", "whose 'blocks.0.norm1.weight' "
                                "is a str; expected the tensors of a timm VisionTransformer"),
                               ("pos_embed", torch.zeros(5), r"position embeddings \(5,\) "
                                "cannot be resized")]:
        torch.save(ref.state_dict() | {key: value}, tmp_path / "bad.pth")
        with pytest.raises(UserError, match=expect):
            vit_task.run(make_cfg(tmp_path / "r2", image_folder,
                                  f"init_from={tmp_path}/bad.pth", "trainer.max_steps=2"))


@pytest.mark.parametrize("pool, pool_overrides", [
    ("token", ["model.pool=token"]),
    ("avg_fc_norm", ["model.class_token=true", "model.fc_norm=true"]),
    ("avg_no_class_token", []),
    ("deit3", ["model.pool=token", "model.layer_scale=1e-06"]),
    ("reg4", ["model.pool=token", "model.registers=4"]),
    ("reg4_gap", ["model.registers=4"]),
    ("dinov2_reg4", ["model.pool=token", "model.layer_scale=1e-06", "model.registers=4"]),
    ("clip", ["model.pool=token", "model.pre_norm=true", "model.norm_eps=1e-05"])])
def test_timm_weights_with_the_settings_the_error_names_give_its_logits(tmp_path, pool,
                                                                         pool_overrides):
    """``init_from`` a timm ViT under the default model's settings (a convolutional stem,
    sin-cos positions, mean pooling, no class token) names the overrides it needs; with
    them, the task's model gives timm's logits, whichever way timm pools."""
    import re

    from hydra.utils import instantiate
    torch.manual_seed(0)
    ref = saved_timm_vit(tmp_path / "timm_vit.pth", 3.0, **TIMM_POOLS[pool])

    def module_for(*overrides):
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("vit", overrides=[f"init_from={tmp_path}/timm_vit.pth",
                                            "model.num_heads=4", *overrides])
        m = vit_task.model_config(cfg, 10)
        return SimpleNamespace(model=instantiate(m, _convert_="all").eval(), model_cfg=m), cfg

    with pytest.raises(UserError) as err:
        vit_task.apply_init_from(*module_for())
    overrides = re.search(r"add (.*) \(the head count", str(err.value)).group(1).split()
    assert sorted(overrides) == sorted([
        "model.patch_size=7", "model.embed_dim=48", "model.depth=2", "model.stem_channels=[]",
        "model.pos_embed=learned", "model.mlp_ratio=3.0", *pool_overrides])
    # the layer scale's starting value is not stored: any other is taken too
    module, cfg = module_for(*[o.replace("layer_scale=1e-06", "layer_scale=0.5")
                               for o in overrides])
    vit_task.apply_init_from(module, cfg)
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        torch.testing.assert_close(module.model(x), ref(x), rtol=1e-4, atol=1e-5)


def test_a_two_way_table_through_the_task_names_the_overrides_then_gives_timms_logits(
        tmp_path):
    """The task reads the grid under the checkpoint's own patch size: a 3x3 table without
    the rows of a class token and four registers (21 px, 7 px patches) under the default
    model's 4 px patches still gets the list of overrides, and with them timm's logits."""
    import re

    from hydra.utils import instantiate
    ref = saved_timm_vit(tmp_path / "timm_vit.pth", 2.0, img_size=21, reg_tokens=4,
                         no_embed_class=True)

    def module_for(*overrides):
        with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
            cfg = compose("vit", overrides=[f"init_from={tmp_path}/timm_vit.pth",
                                            "data.img_size=21", "model.num_heads=4",
                                            *overrides])
        m = vit_task.model_config(cfg, 10)
        return SimpleNamespace(model=instantiate(m, _convert_="all").eval(), model_cfg=m), cfg

    with pytest.raises(UserError) as err:
        vit_task.apply_init_from(*module_for("model.patch_size=3"))
    overrides = re.search(r"add (.*) \(the head count", str(err.value)).group(1).split()
    assert "model.patch_size=7" in overrides and "model.registers=4" in overrides
    module, cfg = module_for(*overrides)
    vit_task.apply_init_from(module, cfg)
    x = torch.randn(3, 1, 21, 21)
    with torch.no_grad():
        torch.testing.assert_close(module.model(x), ref(x), rtol=1e-4, atol=1e-5)


def test_timm_mlp_ratio_rebuilds_the_hidden_size():
    """The blocks take int(width * mlp_ratio): 115 / 56 rounds down to 114."""
    from modules.converters import mlp_ratio_for
    state = {"patch_embed.proj.weight": torch.zeros(56, 3, 8, 8),
             "blocks.0.mlp.fc1.weight": torch.zeros(115, 56)}
    ratio = vit_task.timm_settings(state, 1)["mlp_ratio"]
    assert int(56 * ratio) == 115 and int(768 * mlp_ratio_for(3072, 768)) == 3072


@pytest.mark.slow
def test_ddp_two_processes_test_every_image_once(tmp_path, image_folder):
    """Two CPU processes: one run directory, and the test metrics cover the whole test split
    (each rank tests a share; the confusion matrix and mistakes are combined)."""
    import os
    import subprocess
    import sys
    env = dict(os.environ, ATTNKIT_DATA=str(tmp_path / "cache"))
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.vit", "trainer=ddp", "model=vit_tiny", "model.patch_size=4",
         f"data.root={image_folder}", "data.img_size=16", "data.batch_size=16",
         "trainer.max_steps=2", "trainer.val_check_interval=2", "scheduler.warmup_steps=1",
         f"run_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    cm = torch.tensor(res["test_confusion"])
    assert cm.sum() == res["test"] == len(json.loads((out / "split.json").read_text())["test"])
    assert res["test_acc"] == pytest.approx(float(cm.trace() / cm.sum()), abs=1e-6)
    assert res["steps"] == 2 and (out / "confusion.png").is_file()
    assert (out / "misclassified.png").is_file() == bool(cm.sum() > cm.trace())


def test_batch_affine_equals_torchvision_affine_per_image():
    """The whole-batch crop + rotation + scaling samples each image as torchvision's
    ``affine`` does alone (bilinear, zero fill, about the centre), on non-square images."""
    from torchvision.transforms.v2 import InterpolationMode
    from torchvision.transforms.v2 import functional as TF

    from data.images import BatchAffine
    g = torch.Generator().manual_seed(0)
    x = torch.rand(4, 3, 20, 28, generator=g)
    angles = torch.tensor([0.0, 10.0, -7.5, 3.0])
    scales = torch.tensor([1.0, 1.1, 0.9, 1.0])
    shifts = torch.tensor([[2.0, -1.0], [0.0, 0.0], [-2.0, 1.0], [1.0, 2.0]])
    for mode in ("bilinear", "nearest"):
        ours = BatchAffine.apply(x, angles, scales, shifts, mode)
        for i in range(4):
            ref = TF.affine(x[i], angle=float(angles[i]), scale=float(scales[i]),
                            translate=[int(shifts[i, 0]), int(shifts[i, 1])],
                            shear=[0.0, 0.0], interpolation=InterpolationMode(mode))
            torch.testing.assert_close(ours[i], ref, atol=1e-5, rtol=0)
    # a whole-pixel shift alone is exact: the image moves, zeros come in
    moved = BatchAffine.apply(x[:1], torch.zeros(1), torch.ones(1), torch.tensor([[2.0, 0.0]]),
                              "bilinear")
    torch.testing.assert_close(moved[0, :, :, 2:], x[0, :, :, :-2], atol=1e-6, rtol=0)
    assert moved[0, :, :, :2].abs().max() < 1e-6
    drawn = BatchAffine(shift=2, degrees=10, scale=0.1)(x)
    assert drawn.shape == x.shape and not torch.equal(drawn, x)
    with pytest.raises(UserError, match="affine_scale=1.5"):
        BatchAffine(2, 10, 1.5)


def test_batch_elastic_distortion_matches_torchvision():
    """The elastic displacements are torchvision's Gaussian blur of the noise, scaled, and
    sampling with them alone is torchvision's ``elastic`` image by image."""
    from torchvision.transforms.v2 import functional as TF

    from data.images import BatchAffine
    g = torch.Generator().manual_seed(0)
    x = torch.rand(3, 1, 28, 28, generator=g)
    aug = BatchAffine(elastic_alpha=30.0, elastic_sigma=4.0)
    noise = torch.rand(3, 2, 28, 28, generator=g) * 2 - 1
    disp = aug.displacements(noise)
    ref = TF.gaussian_blur(noise, kernel_size=[33, 33], sigma=[4.0, 4.0]) * 30.0
    torch.testing.assert_close(disp, ref, atol=1e-5, rtol=0)
    assert 0.3 < disp.std() < 3  # about a pixel or two: strokes bend, digits stay digits
    ours = BatchAffine.apply(x, torch.zeros(3), torch.ones(3), torch.zeros(3, 2), "bilinear",
                             disp)
    for i in range(3):  # torchvision: (1, H, W, 2) displacements in grid units
        grid_disp = disp[i].permute(1, 2, 0)[None] * torch.tensor([2 / 28, 2 / 28])
        want = TF.elastic(x[i], grid_disp, interpolation=TF.InterpolationMode.BILINEAR)
        torch.testing.assert_close(ours[i], want, atol=1e-5, rtol=0)
    drawn = aug(x)
    assert drawn.shape == x.shape and not torch.equal(drawn, x)
    with pytest.raises(UserError, match="elastic_sigma=0"):
        BatchAffine(elastic_alpha=30.0, elastic_sigma=0)
