"""The fusion task end to end on small data in the user format (training, figures, pictures,
the inference modes, init_from from OpenCLIP weights, errors), the retrieval metrics against
a direct count, and (slow) two DDP processes against one process at the same global batch."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from hydra import compose, initialize_config_dir
from PIL import Image

from tasks import fusion as fusion_task
from tasks.framework.checkpoints import model_state
from tasks.framework.errors import UserError
from tests.test_sentence import save_sentence_dir

ROOT = Path(__file__).resolve().parents[1]
COLORS = {"red": (220, 30, 30), "green": (30, 180, 40), "blue": (30, 60, 220),
          "yellow": (230, 210, 20), "black": (10, 10, 10), "purple": (140, 40, 170)}


@pytest.fixture()
def pairs_dir(tmp_path):
    """72 images in the user format: a coloured square or disc on white, captioned with its
    colour and shape; one broken file."""
    from PIL import ImageDraw
    root = tmp_path / "pairs"
    (root / "img").mkdir(parents=True)
    rows, g = [], torch.Generator().manual_seed(0)
    for i in range(72):
        color = list(COLORS)[i % 6]
        shape = ["square", "disc"][(i // 6) % 2]
        img = Image.new("RGB", (24, 24), "white")
        x, y = torch.randint(0, 8, (2,), generator=g).tolist()
        box = (x, y, x + 14, y + 14)
        draw = ImageDraw.Draw(img)
        (draw.rectangle if shape == "square" else draw.ellipse)(box, fill=COLORS[color])
        img.save(root / "img" / f"{i}.png")
        rows.append({"image": f"img/{i}.png", "caption": f"a {color} {shape} number {i}",
                     "labels": {"color": color, "shape": shape}})
    (root / "img" / "broken.png").write_bytes(b"not an image")
    rows.append({"image": "img/broken.png", "caption": "broken", "labels": {}})
    (root / "pairs.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    return root


def make_cfg(run_dir, *overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("fusion", overrides=[
            "model=fusion_tiny", "data.img_size=16", "data.batch_size=16", "data.vocab_size=300",
            "data.templates=['{caption}','{color} {shape}: {caption}']",
            "data.zero_shot_labels=[color,shape]", "trainer.max_steps=40",
            "trainer.val_check_interval=20", "trainer.log_every_n_steps=5",
            "data.sentence_encoder=null",
            "scheduler.warmup_steps=3", "optimizer.lr=3e-3",
            f"run_dir={run_dir}", *overrides])


def test_train_figures_pictures_and_modes(tmp_path, pairs_dir, saved_figures, capsys):
    out = tmp_path / "run"
    res = fusion_task.run(make_cfg(out, f"data.manifest={pairs_dir}/pairs.jsonl"))
    t2i = res["test"]["retrieval"]["reranked"]["t2i"]
    printed = capsys.readouterr().out  # the test figures are in the printed summary too
    assert f"test: text -> image R@1/5/10 {t2i['r1']:.3f}/{t2i['r5']:.3f}/{t2i['r10']:.3f}" \
        in printed
    assert f"zero-shot color {res['test']['zero_shot']['color']['accuracy']:.3f}" in printed
    assert res["skipped_images"] == 1 and res["train_items"] + res["val_items"] + res["test_items"] == 72
    test = res["test"]
    for kind in ("contrastive", "reranked"):
        for way in ("t2i", "i2t"):
            r = test["retrieval"][kind][way]
            assert 0 <= r["r1"] <= r["r5"] <= r["r10"] <= 1
    assert set(test["zero_shot"]) == {"color", "shape"}
    assert test["zero_shot"]["color"]["classes"] == 6
    for name in ("results.json", "retrieval_grid.png", "similarity.png", "loss_curves.png",
                 "split.json", "tokenizer.model", "checkpoints/best.ckpt"):
        assert (out / name).is_file(), name
    ckpt = out / "checkpoints" / "best.ckpt"
    texts = tmp_path / "texts.txt"
    texts.write_text("a red square\na blue disc\n"
                     "a long description of one red square in the middle of a white picture\n"
                     "a red square\n")
    capsys.readouterr()
    got = fusion_task.run(make_cfg(tmp_path / "m", "mode=retrieve", f"ckpt={ckpt}",
                                   f"images={pairs_dir}/img/*.png", f"texts={texts}",
                                   "eval.rerank_alpha=0"))
    printed = capsys.readouterr().out
    assert got["skipped_images"] == [{"file": str(pairs_dir / "img" / "broken.png"),
                                      "reason": "cannot be read (UnidentifiedImageError)"}]
    assert f"{pairs_dir / 'img' / 'broken.png'}: skipped, cannot be read" in printed
    assert "note: texts gives 1 item(s) more than once (such as 'a red square')" in printed
    assert len(got["text_to_image"]) == 3 and len(got["text_to_image"]["a red square"]) == 5
    assert len(got["image_to_text"]) == 72
    assert got["ranking"].startswith("the contrastive top 10 re-scored by the fusion encoder")
    # ranked as the closing evaluation ranks: with alpha 0, by the match logit alone
    module = fusion_task.FusionModule.from_checkpoint(ckpt)
    top = got["text_to_image"]["a blue disc"]
    files, x, _ = fusion_task._read_images(module, [t["item"] for t in top], "skip")
    with torch.no_grad():
        _, tok, mask = fusion_task.embed_texts(module, ["a blue disc"] * len(top))
        match = module.model.match_logits(tok, mask, module.model.encode_image(x)[1])
    expected = dict(zip(files, match.tolist()))  # files come back sorted by name
    assert [t["score"] for t in top] == pytest.approx([expected[t["item"]] for t in top],
                                                      abs=1e-3)
    assert [t["score"] for t in top] == sorted((t["score"] for t in top), reverse=True)
    assert [t["rescored"] for t in top] == [True] * 5  # within the re-ranked top 16
    assert json.loads((tmp_path / "m" / "retrieve.json").read_text())["text_to_image"] == \
        got["text_to_image"]
    assert (tmp_path / "m" / "retrieve.png").is_file()
    for name in ("retrieval_grid.png", "similarity.png", "retrieve.png"):
        assert saved_figures[name] == [], name  # no caption or title on an image
    cls = fusion_task.run(make_cfg(tmp_path / "m", "mode=classify", f"ckpt={ckpt}",
                                   f"images={pairs_dir}/img/1*.png", "classes=[red,blue,red]"))
    assert len(cls["predictions"]) == 11  # 1.png, 10.png ... 19.png
    assert cls["classes"] == ["red", "blue"]  # a repeat would split a class's probability
    assert all(sum(p for _, p in pred["top"]) == pytest.approx(1) for pred in cls["predictions"])
    assert json.loads((tmp_path / "m" / "classify.json").read_text()) == json.loads(
        json.dumps(cls))
    # a setting of another mode would be ignored: it is refused before any work
    with pytest.raises(UserError, match=r"questions= is a setting of mode=answer, which "
                                        r"mode=classify does not read; expected it left out"):
        fusion_task.run(make_cfg(tmp_path / "m4", "mode=classify", f"ckpt={ckpt}",
                                 f"images={pairs_dir}/img/1.png", "classes=[red]",
                                 "questions=[what?]"))
    assert not (tmp_path / "m4" / "classify.json").exists()
    with pytest.raises(UserError, match="no answer head"):
        fusion_task.run(make_cfg(tmp_path / "m", "mode=answer", f"ckpt={ckpt}",
                                 f"images={pairs_dir}/img/1.png", "questions=[what?]"))
    before = (tmp_path / "m" / "classify.json").read_bytes()
    with pytest.raises(UserError, match=r"already holds classify.json of an earlier "
                                        r"mode=classify; expected a new folder"):
        fusion_task.run(make_cfg(tmp_path / "m", "mode=classify", f"ckpt={ckpt}",
                                 f"images={pairs_dir}/img/2*.png", "classes=[green]"))
    assert (tmp_path / "m" / "classify.json").read_bytes() == before
    with pytest.raises(UserError, match="broken.png cannot be read"):
        fusion_task.run(make_cfg(tmp_path / "m2", "mode=classify", f"ckpt={ckpt}",
                                 f"images={pairs_dir}/img/*.png", "classes=[red]",
                                 "data.on_bad_image=error"))
    # a resume with another seed would test on pairs it trained on
    with pytest.raises(UserError, match="was trained on another split of the data"):
        fusion_task.run(make_cfg(out, f"data.manifest={pairs_dir}/pairs.jsonl", "resume=auto",
                                 "seed=7", "trainer.max_steps=44"))


def test_shapes_question_answering_and_answer_mode(tmp_path, monkeypatch, saved_figures):
    monkeypatch.setenv("ATTNKIT_DATA", str(tmp_path / "cache"))
    out = tmp_path / "run"
    shapes = ["data=shapes", "data.templates=['{caption}']", "data.zero_shot_labels=[]"]
    res = fusion_task.run(make_cfg(out, *shapes, "data.train_scenes=64",
                                   "data.val_scenes=16", "data.test_scenes=16",
                                   "data.img_size=32", "data.vocab_size=320",
                                   "trainer.max_steps=6", "trainer.val_check_interval=3"))
    ans = res["test"]["answer"]
    assert ans["questions"] == 16 * 4 and 0 <= ans["accuracy"] <= 1
    assert set(ans["per_type"]) <= {"color", "shape", "count", "exists", "left_of"}
    assert set(res["test"]["answer_image_blanked"]["per_type"]) == set(ans["per_type"])
    assert (out / "answers.png").is_file() and saved_figures["answers.png"] == []
    scene = sorted((tmp_path / "cache").glob("shapes-*/test/*.png"))[0]
    got = fusion_task.run(make_cfg(tmp_path / "m", *shapes, "mode=answer",
                                   f"ckpt={out}/checkpoints/best.ckpt", f"images={scene}",
                                   "questions=[how many shapes are there?]"))
    answer = got["answers"][0]["answers"]["how many shapes are there?"]
    best = out / "checkpoints" / "best.ckpt"
    # trained on questions alone: its joint text-image space never learned anything
    for mode, given in [("classify", "classes=[red,blue]"), ("retrieve", "texts=[a red disc]")]:
        with pytest.raises(UserError, match=r"trained without the contrastive objective "
                                            r"\(data.objectives=\['answer'\]\)"):
            fusion_task.run(make_cfg(tmp_path / "m3", *shapes, f"mode={mode}", f"ckpt={best}",
                                     f"images={scene}", given))
    module = fusion_task.FusionModule.from_checkpoint(best)
    assert answer in module.meta["answers"] and "yes" in module.meta["answers"]
    # init_from moves the answer head's rows by answer: here to the answers in reverse
    old = model_state(best, "fusion")["answer_head.weight"]
    module.meta["answers"] = module.meta["answers"][::-1]
    moved = model_state(best, "fusion", module,
                        fusion_task.FusionTask.named_rows)["answer_head.weight"]
    assert len(old) > 2 and torch.equal(moved, old.flip(0))


def test_each_data_set_sets_its_token_table_rate(tmp_path):
    """The emoji's token table learns at 10 x optimizer.lr, the scenes' at optimizer.lr, and
    optimizer.embedding_lr_scale on the command line still wins: read from the optimizer's
    parameter groups."""
    from tasks.framework.optim import configure_optimization
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 4))
    shapes = ["data=shapes", "data.templates=['{caption}']", "data.zero_shot_labels=[]"]
    for overrides, scale in (([], 10.0), (shapes, 1.0),
                             (["optimizer.embedding_lr_scale=3"], 3.0)):
        cfg = make_cfg(tmp_path, *overrides)
        opt = configure_optimization(model, cfg.optimizer, cfg.scheduler, 10)["optimizer"]
        table = next(g for g in opt.param_groups if any(p is model[0].weight for p in g["params"]))
        matrix = next(g for g in opt.param_groups if any(p is model[1].weight for p in g["params"]))
        assert matrix["initial_lr"] == pytest.approx(3e-3)
        assert table["initial_lr"] == pytest.approx(3e-3 * scale)


def test_recall_and_rerank_against_a_direct_count():
    torch.manual_seed(1)
    scores = torch.randn(30, 30)
    positive = torch.eye(30, dtype=torch.bool)
    positive[3, 7] = True  # a query with two right answers
    got = fusion_task.recall_at(scores, positive, ks=(1, 5))
    for k in (1, 5):
        direct = sum(any(positive[q, c] for c in scores[q].topk(k).indices.tolist())
                     for q in range(30)) / 30
        assert got[f"r{k}"] == pytest.approx(direct)

    class Stub:  # a match head preferring the candidate with the highest index
        class model:
            @staticmethod
            def match_logits(t, m, i):
                return i[:, 0, 0] * 100.0
    img_tok = torch.arange(30.0).view(30, 1, 1)
    txt_tok, txt_mask = torch.zeros(30, 2, 1), torch.ones(30, 2, dtype=torch.bool)
    new = fusion_task.rerank(Stub, scores, True, txt_tok, txt_mask, img_tok, k=4, alpha=0.0)
    for q in range(30):
        top4 = set(scores[q].topk(4).indices.tolist())
        assert new[q].argmax().item() == max(top4)  # re-ordered by the match head
        assert set(new[q].topk(4).indices.tolist()) == top4  # the same four on top
        rest = [c for c in scores[q].argsort(descending=True).tolist() if c not in top4]
        assert new[q, rest].argsort(descending=True).tolist() == list(range(26))


def test_ties_with_a_wrong_candidate_count_as_misses():
    """Pixel-identical images under different names score the same: a caption is first only
    if no wrong image scores as high, in the whole-split recall and in the sibling
    breakdown alike."""
    scores = torch.tensor([[0.5, 0.5, 0.1],     # the right one (0) tied with a wrong one
                           [0.2, 0.9, 0.9],     # the right one (1) tied with a wrong one
                           [0.1, 0.2, 0.3]])    # the right one (2) alone on top
    positive = torch.eye(3, dtype=torch.bool)
    assert fusion_task.positive_rank(scores, positive).tolist() == [1, 1, 0]
    assert fusion_task.recall_at(scores, positive, ks=(1, 2)) == {
        "r1": pytest.approx(1 / 3), "r2": pytest.approx(1.0)}
    flat = torch.zeros(5, 5)  # a collapsed model: every image scores the same
    assert fusion_task.recall_at(flat, torch.eye(5, dtype=torch.bool), ks=(1, 5)) == {
        "r1": 0.0, "r5": 1.0}
    out = fusion_task._sibling_split(flat, [True, True, False, False, False],
                                     [[], [], [], ["x"], []])["siblings"]
    assert out["r1_t2i_with_sibling"] == out["r1_t2i_without_sibling"] == 0.0
    assert out["r10_t2i_with_sibling"] == 1.0
    # two right candidates: the better one counts
    two = torch.tensor([[0.1, 0.8, 0.3]])
    assert fusion_task.positive_rank(two, torch.tensor([[True, False, True]])).item() == 1


def test_reranking_keeps_close_scores_below_the_top_k_in_order():
    """Candidates outside the re-ranked top k keep their order however close their scores
    are (shifting them far down in float32 merged scores 3e-4 apart)."""
    scores = torch.tensor([[50.0, 30.0003, 30.0006, 30.0009, -50.0]])

    class Stub:
        class model:
            @staticmethod
            def match_logits(t, m, i):
                return torch.zeros(len(i))
    tok, mask = torch.zeros(1, 2, 1), torch.ones(1, 2, dtype=torch.bool)
    new = fusion_task.rerank(Stub, scores, True, tok, mask, torch.zeros(5, 1, 1), k=1,
                             alpha=1.0)
    assert new[0].argsort(descending=True).tolist() == [0, 3, 2, 1, 4]
    right = torch.tensor([[False, False, False, True, False]])
    assert fusion_task.recall_at(new, right, ks=(2,))["r2"] == 1.0


def test_zero_shot_majority_rate_counts_labelled_images_only():
    """Images without the label are left out of the accuracy and of the majority rate
    beside it alike."""
    class Tok:
        EOS, PAD = 1, 0

        def encode(self, text):
            return [2 + ["a", "b"].index(text.split()[-1])]

    class Model:
        @staticmethod
        def encode_text(ids, mask):  # class a -> (1, 0), class b -> (0, 1)
            return F.one_hot(ids[:, 0] - 2, 2).float(), torch.zeros(len(ids), 2, 4)

        @staticmethod
        def retrieval_text(emb, vectors):  # no sentence head
            return emb

    class Stub:
        meta = {"label_classes": {"g": ["a", "b"]}, "zero_shot_template": "{label}",
                "max_text_len": 4}
        tok, model, sentences, device = Tok(), Model(), None, torch.device("cpu")

    img = torch.tensor([[1.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0]])
    out = fusion_task.zero_shot(Stub, img, {"g": ["a", "a", "b", ""]})["g"]
    assert out["accuracy"] == 1.0 and out["classes"] == 2
    assert out["majority_rate"] == pytest.approx(2 / 3)  # of the three labelled images


def test_fine_tuning_on_other_texts_keeps_the_checkpoints_tokenizer(tmp_path, pairs_dir):
    """The token table's rows stand for the checkpoint's pieces: fine-tuning on other texts
    (other templates) reads them with its tokenizer, and keeps the table."""
    data = f"data.manifest={pairs_dir}/pairs.jsonl"
    fusion_task.run(make_cfg(tmp_path / "a", data, "trainer.max_steps=2"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    other = "data.templates=['{caption}','a picture of {color}: {caption}']"
    res = fusion_task.run(make_cfg(tmp_path / "b", data, other, f"init_from={ckpt}",
                                   "trainer.max_steps=1"))
    assert not res["init_from"]["missing"]  # the token table too
    first = (tmp_path / "a" / "tokenizer.model").read_bytes()
    assert (tmp_path / "b" / "tokenizer.model").read_bytes() == first
    fusion_task.run(make_cfg(tmp_path / "c", data, other, "trainer.max_steps=1"))
    assert (tmp_path / "c" / "tokenizer.model").read_bytes() != first  # what they would give


def test_open_clip_weights_as_init_from(tmp_path, pairs_dir):
    open_clip = pytest.importorskip("open_clip")
    from tasks.framework.checkpoints import safe_load
    ref = open_clip.CLIP(embed_dim=32, vision_cfg=open_clip.CLIPVisionCfg(
        layers=1, width=32, head_width=16, patch_size=8, image_size=16, mlp_ratio=2.0),
        text_cfg=open_clip.CLIPTextCfg(context_length=32, vocab_size=300, width=32, heads=2,
                                       layers=1, mlp_ratio=2.0))
    torch.save(ref.state_dict(), tmp_path / "clip.pt")
    res = fusion_task.run(make_cfg(
        tmp_path / "r", f"data.manifest={pairs_dir}/pairs.jsonl", f"init_from={tmp_path}/clip.pt",
        "model.vision.pool=token", "model.vision.pre_norm=true", "model.vision.pos_embed=learned",
        "model.vision.norm_eps=1e-5", "model.text.causal=true", "model.text.pool=last",
        "model.proj_bias=false", "trainer.max_steps=1"))
    missing = res["init_from"]["missing"]
    assert missing and all(k.startswith(("fusion.", "match_head.")) for k in missing)
    assert res["init_from"]["loaded"] >= 20
    # edited: a value that is no tensor, a patch kernel of no image shape
    for key, value, expect in [("visual.proj", [1.0], "whose 'visual.proj' is a list"),
                               ("visual.conv1.weight", torch.zeros(3),
                                "is not an OpenCLIP CLIP state dict this model can read")]:
        torch.save(ref.state_dict() | {key: value}, tmp_path / "bad.pt")
        with pytest.raises(UserError, match=expect):
            fusion_task.run(make_cfg(tmp_path / "r3", f"data.manifest={pairs_dir}/pairs.jsonl",
                                     f"init_from={tmp_path}/bad.pt", "trainer.max_steps=1"))
    # with another shape and init_strict=false: one line naming a tensor
    with pytest.raises(UserError, match="differ in shape"):
        fusion_task.run(make_cfg(tmp_path / "r2", f"data.manifest={pairs_dir}/pairs.jsonl",
                                 f"init_from={tmp_path}/clip.pt", "model.embed_dim=48",
                                 "init_strict=false", "trainer.max_steps=1"))
    assert safe_load(tmp_path / "clip.pt", "x")  # the file itself is untouched


@pytest.mark.parametrize("layer_scale", [None, 0.1])
def test_open_clip_weights_with_the_settings_the_error_names_give_its_embeddings(tmp_path,
                                                                                 layer_scale):
    """``init_from`` an OpenCLIP model under other settings names every override it needs;
    with them, the task's model embeds images and texts as ``open_clip`` does (position
    table, pre-norm, LayerNorm epsilon, causal text pooled at the end-of-text token, and
    with ``ls_init_value`` the towers' layer scale)."""
    import re
    from types import SimpleNamespace

    from hydra.utils import instantiate

    from modules.converters import open_clip_text_mask
    from tasks.framework import training
    open_clip = pytest.importorskip("open_clip")
    torch.manual_seed(0)
    ref = open_clip.CLIP(embed_dim=32, vision_cfg=open_clip.CLIPVisionCfg(
        layers=1, width=32, head_width=16, patch_size=8, image_size=16, mlp_ratio=2.0,
        ls_init_value=layer_scale),
        text_cfg=open_clip.CLIPTextCfg(context_length=32, vocab_size=300, width=32, heads=2,
                                       layers=1, mlp_ratio=2.0, ls_init_value=layer_scale)).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():  # every LayerNorm and bias away from 1 and 0
            p.copy_(torch.randn_like(p) * (p.shape[-1] ** -0.5 if p.dim() > 1 else 0.3)
                    + (1.0 if name.endswith("weight") and p.dim() == 1 else 0.0))
    torch.save(ref.state_dict(), tmp_path / "clip.pt")

    def module_for(*overrides):
        cfg = make_cfg(tmp_path / "r", f"init_from={tmp_path}/clip.pt", *overrides)
        m = training.model_config(cfg, num_answers=0)
        m["text"]["vocab_size"] = 300
        model = instantiate({**m, "fusion_depth": 0}, _convert_="all").eval()
        return SimpleNamespace(model=model, model_cfg=m), cfg

    with pytest.raises(UserError) as err:
        fusion_task.apply_init_from(*module_for())
    overrides = re.search(r"add (.*) \(or init_strict", str(err.value)).group(1).split()
    assert sorted(overrides) == sorted([
        "model.vision.pool=token", "model.vision.pos_embed=learned",
        "model.vision.pre_norm=true", "model.vision.norm_eps=1e-05",
        "model.text.causal=true", "model.text.pool=last", "model.proj_bias=false",
        *(["model.vision.layer_scale=1e-05", "model.text.layer_scale=1e-05"] if layer_scale
          else [])])
    # the starting value is not stored: any other is taken too, the gammas being loaded
    module, cfg = module_for(*[o.replace("layer_scale=1e-05", "layer_scale=0.5")
                               for o in overrides])
    fusion_task.apply_init_from(module, cfg)
    images = torch.randn(2, 3, 16, 16)
    ids = torch.randint(1, 299, (3, 32))
    for row, n in enumerate([32, 9, 2]):
        ids[row, n - 1], ids[row, n:] = 299, 0  # end-of-text: the highest id, as in CLIP
    with torch.no_grad():  # 1e-7 apart; with the ViT's own LayerNorm epsilon (1e-6), 5e-6
        torch.testing.assert_close(module.model.encode_image(images)[0],
                                   ref.encode_image(images, normalize=True), atol=1e-6, rtol=0)
        torch.testing.assert_close(module.model.encode_text(ids, open_clip_text_mask(ids))[0],
                                   ref.encode_text(ids, normalize=True), atol=1e-6, rtol=0)


@pytest.mark.parametrize("override, message", [
    ("data.objectives=[contrastive,caption]", "data.objectives has \\['caption'\\]"),
    ("data.templates=['{caption} {colour}']", "names 'colour'"),
    ("data.objectives=[answer]", "no 'qa' questions"),
    ("model.loss=softmax", "loss must be 'clip' or 'siglip'"),
    ("data.table_lr_scale=0", "data.table_lr_scale=0 is not valid: expected a number > 0"),
    ("data.lexicon.name=babelnet", "data.lexicon.name='babelnet'; expected wordnet or null"),
    ("data.lexicon=wordnet", "data.lexicon=wordnet; expected its fields"),
    (("data.lexicon.name=wordnet", "data.lexicon.depth=0"),
     "data.lexicon.depth=0; expected an integer >= 1"),
    (("data.lexicon.name=wordnet", "data.lexicon.kinds_only=1.5"),
     "data.lexicon.kinds_only=1.5; expected a share in"),
])
def test_user_errors_name_the_value(tmp_path, pairs_dir, override, message):
    overrides = override if isinstance(override, tuple) else (override,)
    with pytest.raises(UserError, match=message):
        fusion_task.run(make_cfg(tmp_path / "r", f"data.manifest={pairs_dir}/pairs.jsonl",
                                 *overrides))


def test_checkpoint_with_a_nested_target_is_refused(tmp_path, pairs_dir):
    out = tmp_path / "run"
    fusion_task.run(make_cfg(out, f"data.manifest={pairs_dir}/pairs.jsonl",
                             "trainer.max_steps=1"))
    ckpt = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    victim = tmp_path / "written"
    ckpt["attnkit"]["model"]["text"] = {"_target_": "builtins.open", "file": str(victim),
                                        "mode": "w"}
    torch.save(ckpt, tmp_path / "bad.ckpt")
    with pytest.raises(UserError, match="builtins.open.*model.text"):
        fusion_task.run(make_cfg(tmp_path / "m", "mode=classify", f"ckpt={tmp_path}/bad.ckpt",
                                 f"images={pairs_dir}/img/1.png", "classes=[red]"))
    assert not victim.exists()


SENTENCE_WORDS = [*COLORS, "square", "disc", "a", "number", *map(str, range(10))]


def test_a_sentence_encoder_head_is_trained_and_adds_its_cosine_to_the_scores(
        tmp_path, pairs_dir):
    """With data.sentence_encoder the training loss is the text tower's contrastive loss plus
    the sentence head's (own temperature), and every retrieval and zero-shot score is the
    text tower's cosine plus sentence_weight x the sentence head's; the checkpoint names the
    encoder and its weights, and a changed or missing encoder is refused by the modes."""
    enc_dir = tmp_path / "sentence"
    enc_dir.mkdir()
    save_sentence_dir(enc_dir, SENTENCE_WORDS)
    out = tmp_path / "run"
    res = fusion_task.run(make_cfg(out, f"data.manifest={pairs_dir}/pairs.jsonl",
                                   f"data.sentence_encoder={enc_dir}",
                                   "model.sentence_weight=0.5"))
    ckpt = out / "checkpoints" / "best.ckpt"
    module = fusion_task.FusionModule.from_checkpoint(ckpt)
    m = module.model
    assert module.meta["sentence_encoder"]["name"] == str(enc_dir.resolve())
    assert m.sentence_proj.in_features == 32 and m.sentence_weight == 0.5

    # the loss of one batch against a direct computation (unique captions: plain CLIP)
    from modules.sentence import SentenceEncoder
    fresh = SentenceEncoder(enc_dir)  # another instance: its own vectors
    captions = [f"a {c} square number {i}" for i, c in enumerate(COLORS)]
    collate = fusion_task.Collate(
        fusion_task._subset(fusion_task.read_pairs(pairs_dir / "pairs.jsonl", img_size=16),
                            list(range(6))), module.tok, 32, module.meta["mean"],
        module.meta["std"], sentences=module.sentences)
    batch = collate([(i, captions[i], []) for i in range(6)])
    module.objectives = {"contrastive": 1.0}
    module.log = lambda *a, **k: None
    module._gather = lambda x, grads=True: x
    with torch.no_grad():
        loss = module.training_step(batch, 0)
        img = m.encode_image(batch["images"])[0]
        own = m.encode_text(batch["ids"], batch["mask"])[0]
        sen = F.normalize(m.sentence_proj(fresh(captions)), dim=-1)

        def clip(scale, a, b):
            logits = scale.exp() * a @ b.T
            target = torch.arange(len(a))
            return (F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target)) / 2
        expected = clip(m.logit_scale, img, own) + clip(m.sentence_logit_scale, img, sen)
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-5)
    assert abs(float(clip(m.logit_scale, img, own)) - float(loss)) > 1e-3  # the head counts

    # the test figures from scores recomputed here: own cosine + 0.5 x the head's
    test_ids = json.loads((out / "split.json").read_text())["test"]
    pairs = fusion_task.read_pairs(pairs_dir / "pairs.jsonl", img_size=16)
    test = fusion_task._subset(pairs, [pairs.ids.index(i) for i in test_ids])
    collate = fusion_task.Collate(test, module.tok, 32, module.meta["mean"],
                                  module.meta["std"])
    with torch.no_grad():
        img = fusion_task.embed_images(module, collate, len(test.captions))[0]
        ids, mask = fusion_task.encode_texts(module.tok, test.captions, 32)
        own = m.encode_text(ids, mask)[0]
        sen = F.normalize(m.sentence_proj(fresh(test.captions)), dim=-1)
        emb = fusion_task.embed_texts(module, test.captions)[0]
    torch.testing.assert_close(emb, own + 0.5 * sen)
    assert (emb - own).norm(dim=-1).min() > 0.4  # half a unit vector: the head is in it
    positive = torch.eye(len(test.captions), dtype=torch.bool)
    assert fusion_task.recall_at((own + 0.5 * sen) @ img.T, positive) == pytest.approx(
        res["test"]["retrieval"]["contrastive"]["t2i"], abs=1e-6)

    # fine-tuning keeps the head when the encoder is the same, starts it afresh otherwise
    other = tmp_path / "sentence2"
    other.mkdir()
    save_sentence_dir(other, SENTENCE_WORDS, num_hidden_layers=1)  # other weights, width 32
    for folder, fresh in ((enc_dir, []), (other, ["sentence_logit_scale",
                                                   "sentence_proj.bias",
                                                   "sentence_proj.weight"])):
        tuned = fusion_task.run(make_cfg(
            tmp_path / f"ft_{folder.name}", f"data.manifest={pairs_dir}/pairs.jsonl",
            f"data.sentence_encoder={folder}", f"init_from={ckpt}", "trainer.max_steps=1"))
        assert sorted(tuned["init_from"]["missing"]) == fresh

    # the modes rebuild the encoder; changed weights or a missing folder are refused
    texts = tmp_path / "texts.txt"
    texts.write_text("a red square\na blue disc\n")
    got = fusion_task.run(make_cfg(tmp_path / "m", "mode=retrieve", f"ckpt={ckpt}",
                                   f"images={pairs_dir}/img/1*.png", f"texts={texts}"))
    assert len(got["text_to_image"]) == 2
    weights = enc_dir / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:-4] + b"\0\0\0\0")
    with pytest.raises(UserError, match="model.safetensors has changed .*; expected the "
                                        "weights the model was trained with"):
        fusion_task.run(make_cfg(tmp_path / "m2", "mode=classify", f"ckpt={ckpt}",
                                 f"images={pairs_dir}/img/1.png", "classes=[red]"))
    enc_dir.rename(tmp_path / "moved")
    with pytest.raises(UserError, match=f"data.sentence_encoder={enc_dir.resolve()} is "
                                        f"neither"):
        fusion_task.run(make_cfg(tmp_path / "m3", "mode=classify", f"ckpt={ckpt}",
                                 f"images={pairs_dir}/img/1.png", "classes=[red]"))
    assert not list(tmp_path.glob("m[23]/*.json"))  # nothing written by a refused mode


def test_retrieval_through_the_pair_memory(tmp_path, pairs_dir):
    """With a sentence encoder, a checkpoint keeps the training pairs' embeddings under its
    weights; the test figures 'memory' (and re-ranking) come from memory_scores over them,
    recomputed here from the saved split with another encoder instance; mode=retrieve
    scores alike; eval.memory.enabled=false gives the contrastive scores; a checkpoint whose
    memory does not fit its model is refused in one line."""
    from modules.memory import PairMemory, memory_scores
    from modules.sentence import SentenceEncoder
    enc_dir = tmp_path / "sentence"
    enc_dir.mkdir()
    save_sentence_dir(enc_dir, SENTENCE_WORDS)
    out = tmp_path / "run"
    settings = dict(neighbours=3, temperature=0.1, text_weight=2.0, image_weight=0.5,
                    hubness=2)
    memory_cfg = [f"eval.memory.{k}={v}" for k, v in settings.items()]
    res = fusion_task.run(make_cfg(out, f"data.manifest={pairs_dir}/pairs.jsonl",
                                   f"data.sentence_encoder={enc_dir}", *memory_cfg))
    ckpt = out / "checkpoints" / "best.ckpt"
    module = fusion_task.FusionModule.from_checkpoint(ckpt)
    m, fresh = module.model, SentenceEncoder(enc_dir)
    split = json.loads((out / "split.json").read_text())
    pairs = fusion_task.read_pairs(pairs_dir / "pairs.jsonl", img_size=16)
    train, test = (fusion_task._subset(pairs, [pairs.ids.index(i) for i in split[k]])
                   for k in ("train", "test"))

    def embedded(ps):
        collate = fusion_task.Collate(ps, module.tok, 32, module.meta["mean"],
                                      module.meta["std"])
        with torch.no_grad():
            img = fusion_task.embed_images(module, collate, len(ps.captions))[0]
            ids, mask = fusion_task.encode_texts(module.tok, ps.captions, 32)
            sen = fresh(ps.captions)
            txt = m.encode_text(ids, mask)[0] + F.normalize(m.sentence_proj(sen), dim=-1)
        return img, txt, sen
    memory = PairMemory(*embedded(train))
    assert res["memory_pairs"] == len(train.captions) == len(module.memory.images)
    for got, want in zip(module.memory.state().values(), memory.state().values()):
        torch.testing.assert_close(got, want)
    img, txt, sen = embedded(test)
    scores = memory_scores(img, txt, sen, memory, **settings)
    positive = torch.eye(len(test.captions), dtype=torch.bool)
    figures = res["test"]["retrieval"]["memory"]
    assert fusion_task.recall_at(scores.T, positive) == pytest.approx(figures["t2i"], abs=1e-6)
    assert fusion_task.recall_at(scores, positive) == pytest.approx(figures["i2t"], abs=1e-6)

    # mode=retrieve: below the re-scored top 1, each score is the scaled memory score
    texts = tmp_path / "texts.txt"
    texts.write_text("".join(c + "\n" for c in test.captions))
    images = tmp_path / "test_images"
    images.mkdir()
    for f in test.files:
        (images / Path(f).name).write_bytes((pairs_dir / f).read_bytes())
    got = fusion_task.run(make_cfg(tmp_path / "m", "mode=retrieve", f"ckpt={ckpt}",
                                   f"images={images}/*.png", f"texts={texts}",
                                   "eval.rerank_k=1", *memory_cfg))
    assert got["ranking"].startswith(f"the memory ({len(train.captions)} training pairs) top 1")
    column = {Path(f).name: i for i, f in enumerate(test.files)}
    logits = m.logit_scale.exp() * scores
    checked = 0
    for t, (caption, ranked) in enumerate(got["text_to_image"].items()):
        assert caption == test.captions[t]
        for item in ranked[1:]:
            assert not item["rescored"]
            assert item["score"] == pytest.approx(float(logits[column[Path(item["item"]).name],
                                                              t]), abs=2e-4)
            checked += 1
    assert checked >= 4 * len(test.captions)
    off = fusion_task.run(make_cfg(tmp_path / "m2", "mode=retrieve", f"ckpt={ckpt}",
                                   f"images={images}/*.png", f"texts={texts}",
                                   "eval.memory.enabled=false"))
    assert off["ranking"].startswith("the contrastive top 10")

    # a memory that does not fit the model's widths is named, and nothing is written
    state = torch.load(ckpt, weights_only=True)
    state[fusion_task.MEMORY_KEY]["texts"] = torch.zeros(len(train.captions), 7)
    bad = tmp_path / "bad.ckpt"
    torch.save(state, bad)
    with pytest.raises(UserError, match=f"checkpoint {bad}: its pair memory has rows "
                                        f"\\[{len(train.captions)}\\] and widths"):
        fusion_task.run(make_cfg(tmp_path / "m3", "mode=retrieve", f"ckpt={bad}",
                                 f"images={images}/*.png", f"texts={texts}"))
    assert not (tmp_path / "m3" / "retrieve.json").exists()

    # the settings search reads the run's validation split and prints the grid's best
    proc = subprocess.run([sys.executable, str(ROOT / "scripts" / "tune_fusion_memory.py"),
                           str(ckpt), "--manifest", str(pairs_dir / "pairs.jsonl"),
                           "--top", "3"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    lines = proc.stdout.strip().splitlines()
    assert lines[0].startswith(f"324 settings on {len(split['val'])} validation pairs, "
                               f"memory of {len(train.captions)} training pairs")
    assert len(lines) == 5 and lines[-1].endswith("no memory")


def test_a_checkpoint_keeps_the_memory_of_the_weights_it_holds(tmp_path, pairs_dir):
    """With weight averaging (trainer.ema_decay) a checkpoint holds the averaged weights, and
    its pair memory is built under those, not the live ones; eval.memory.max_pairs keeps a
    seeded choice of the training pairs."""
    enc_dir = tmp_path / "sentence"
    enc_dir.mkdir()
    save_sentence_dir(enc_dir, SENTENCE_WORDS)
    out = tmp_path / "run"
    res = fusion_task.run(make_cfg(out, f"data.manifest={pairs_dir}/pairs.jsonl",
                                   f"data.sentence_encoder={enc_dir}", "trainer.ema_decay=0.5",
                                   "eval.memory.max_pairs=20"))
    assert res["memory_pairs"] == 20
    split = json.loads((out / "split.json").read_text())
    pairs = fusion_task.read_pairs(pairs_dir / "pairs.jsonl", img_size=16)
    train = fusion_task._subset(pairs, [pairs.ids.index(i) for i in split["train"]])
    g = torch.Generator().manual_seed(1337)
    rows = sorted(torch.randperm(len(train.captions), generator=g)[:20].tolist())
    for name in ("best.ckpt", "last.ckpt"):
        module = fusion_task.FusionModule.from_checkpoint(out / "checkpoints" / name)
        kept = module.memory
        module.memory_source = fusion_task.Collate(
            fusion_task._subset(train, rows), module.tok, 32, module.meta["mean"],
            module.meta["std"])
        rebuilt = module.build_memory()  # under the weights the file holds
        for got, want in zip(kept.state().values(), rebuilt.state().values()):
            torch.testing.assert_close(got, want)

    # resuming from a file whose memory does not fit is one line naming the file
    state = torch.load(out / "checkpoints" / "last.ckpt", weights_only=True)
    state[fusion_task.MEMORY_KEY]["images"] = torch.zeros(20, 3)
    bad = tmp_path / "bad.ckpt"
    torch.save(state, bad)
    with pytest.raises(UserError, match=f"checkpoint {bad}: its pair memory has rows"):
        fusion_task.run(make_cfg(tmp_path / "resumed", f"data.manifest={pairs_dir}/pairs.jsonl",
                                 f"data.sentence_encoder={enc_dir}", "trainer.ema_decay=0.5",
                                 "eval.memory.max_pairs=20", f"resume={bad}",
                                 "trainer.max_steps=60"))


@pytest.mark.slow
def test_ddp_two_processes_equal_one_process_at_the_same_global_batch(tmp_path, pairs_dir):
    """The contrastive losses (the text tower's and the sentence head's) gather features
    across ranks with gradients: two processes at batch 8 train the same weights as one
    process at batch 16."""
    common = ["model=fusion_tiny", f"data.manifest={pairs_dir}/pairs.jsonl", "data.img_size=16",
              "data.vocab_size=300", "data.objectives=[contrastive]", "data.templates=['{caption}']",
              "data.shift=0", "model.vision.drop_path_rate=0", "trainer.max_steps=6",
              "trainer.val_check_interval=3", "scheduler.warmup_steps=2", "optimizer.lr=3e-3",
              "data.zero_shot_labels=[color]"]
    (tmp_path / "sentence").mkdir()
    save_sentence_dir(tmp_path / "sentence", SENTENCE_WORDS)  # its head's loss gathers too
    common.append(f"data.sentence_encoder={tmp_path / 'sentence'}")
    env = dict(os.environ, ATTNKIT_DATA=str(tmp_path / "cache"))
    weights = {}
    for name, extra in (("ddp", ["trainer=ddp", "data.batch_size=8"]),
                        ("one", ["data.batch_size=16"])):
        out = tmp_path / name
        proc = subprocess.run([sys.executable, "-m", "tasks.fusion", *common, *extra,
                               f"run_dir={out}", f"hydra.run.dir={tmp_path / 'hydra'}"],
                              cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
        assert proc.returncode == 0, proc.stderr[-3000:]
        weights[name] = torch.load(out / "checkpoints" / "last.ckpt",
                                   weights_only=True)["state_dict"]
        assert json.loads((out / "results.json").read_text())["steps"] == 6
    for k, v in weights["one"].items():
        got = weights["ddp"][k]
        if k.endswith("qkv_proj.bias"):
            # The key bias's gradient is zero in exact arithmetic (a softmax does not change
            # when every score of a query moves by the same amount), so AdamW turns the
            # round-off of two summation orders into steps of the learning rate's size.
            keep = torch.ones_like(v, dtype=torch.bool)
            keep[v.numel() // 3: 2 * v.numel() // 3] = False
            got, v = got[keep], v[keep]
        torch.testing.assert_close(got, v, rtol=1e-4, atol=1e-5, msg=k)


NOUNS = ("cockroach", "pizza", "lemon", "snake", "bison", "candle", "banana", "burrito",
         "television", "motorway", "luggage", "falafel", "violin", "tractor", "penguin",
         "hammer", "tomato", "octopus", "umbrella", "kangaroo", "trumpet", "mushroom",
         "helicopter", "pineapple")


def test_wordnet_kinds_reach_training_evaluation_and_the_modes(tmp_path, pairs_dir):
    """With data.lexicon.name=wordnet a text the model reads carries the WordNet kinds of
    its words that no training text has, in validation and in the inference modes (from
    the checkpoint, which keeps the training words), while training texts stay as they
    are or, at the kinds_only rate, are their kinds alone."""
    from data.lexicon import load_lexicon
    from data.text import Tokenizer
    # every third caption names a thing no other caption names: unseen where it is held out
    rows = [json.loads(x) for x in (pairs_dir / "pairs.jsonl").read_text().splitlines()]
    for i, row in enumerate(rows[:72]):
        if i % 3 == 0:
            row["caption"] += f" and a {NOUNS[i // 3]}"
    manifest = pairs_dir / "nouns.jsonl"
    manifest.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "sentence").mkdir()
    save_sentence_dir(tmp_path / "sentence", SENTENCE_WORDS)
    common = [f"data.manifest={manifest}", "data.lexicon.name=wordnet",
              "data.lexicon.kinds_only=0.5", f"data.sentence_encoder={tmp_path / 'sentence'}"]
    out = tmp_path / "run"
    fusion_task.run(make_cfg(out, *common, "trainer.max_steps=2"))
    module = fusion_task.FusionModule.from_checkpoint(out / "checkpoints" / "last.ckpt")
    spec = module.meta["lexicon"]
    assert spec["name"] == "wordnet" and spec["max_kinds"] == 4
    assert {"red", "disc", "square", "number"} <= set(spec["known"])
    lexicon = load_lexicon(spec)
    assert lexicon("a red disc") == "a red disc"  # every word was read in training
    plain = Tokenizer((out / "tokenizer.model").read_bytes())
    held_out = [n for n in NOUNS if n not in spec["known"]]
    assert held_out  # some captions with a named thing are in validation or test
    for noun in held_out:
        text = f"a red {noun}"
        assert lexicon(text).startswith(f"{text}; ") and lexicon(text) != text
        assert module.tok.encode(text) == plain.encode(lexicon(text))
    assert module.tok.encode("a red disc") == plain.encode("a red disc")
    texts = tmp_path / "texts.txt"
    texts.write_text(f"a red {held_out[0]}\na blue disc\n")
    got = fusion_task.run(make_cfg(tmp_path / "m", *common, "mode=retrieve",
                                   f"ckpt={out}/checkpoints/last.ckpt",
                                   f"images={pairs_dir}/img/*.png", f"texts={texts}"))
    assert len(got["text_to_image"][f"a red {held_out[0]}"]) == 5
    # the sentence encoder reads a text as training gave it: with its kinds
    from modules.sentence import SentenceEncoder
    enc, text = SentenceEncoder(tmp_path / "sentence"), f"a red {held_out[0]}"
    with torch.no_grad():
        ids, mask = fusion_task.encode_texts(module.tok, [text], 32)
        own = module.model.encode_text(ids, mask)[0]
        want = own + module.model.encode_sentences(enc([lexicon(text)]))
        torch.testing.assert_close(fusion_task.embed_texts(module, [text])[0], want)
        bare = own + module.model.encode_sentences(enc([text]))
    assert (want - bare).abs().max() > 1e-3

    (tmp_path / "prep").mkdir()
    prep = fusion_task.FusionTask().prepare(make_cfg(out, *common), tmp_path / "prep")
    ds = prep.train_loader.dataset
    torch.manual_seed(0)
    alone = 0
    for i in range(len(ds)):
        text = ds[i][1]
        labels = {k: v[i] for k, v in ds.pairs.labels.items()}
        filled = [fusion_task.fill(x, ds.pairs.captions[i], labels) for x in ds.templates]
        kinds = [ds.lexicon.kinds_text(f) for f in filled]
        assert text in filled + kinds, text
        alone += text in kinds
    assert 0.3 < alone / len(ds) < 0.7  # about half
    assert ds.lexicon.kinds_text("a red disc") == "; sound recording, recording, memory device"
    val = prep.val_loader.dataset
    val_texts = [val[i][1] for i in range(len(val))]
    assert val_texts == [lexicon(c) for c in val.pairs.captions]
    assert sum(t != c for t, c in zip(val_texts, val.pairs.captions)) == \
        sum(any(n in c for n in held_out) for c in val.pairs.captions) > 0


def test_pair_dataset_kinds_only_rate_and_questions():
    class Kinds:
        def kinds_text(self, text):
            return "; thing, stuff"

        def __call__(self, text):
            return f"{text}; other"

    pairs = fusion_task.PairSet(images=torch.zeros(1, 3, 4, 4, dtype=torch.uint8),
                                files=["a.png"], captions=["a cat"], labels={}, ids=["a"],
                                qa=[[{"question": "what is it?", "answer": "cat"}]])
    ds = fusion_task.PairDataset(pairs, ["{caption}"], {"cat": 0}, None, Kinds(), 0.3)
    torch.manual_seed(0)
    texts = [ds[0][1] for _ in range(2000)]
    assert set(texts) == {"a cat; other", "; thing, stuff"}
    assert texts.count("; thing, stuff") / 2000 == pytest.approx(0.3, abs=0.03)
    assert ds[0][2] == [("what is it?; other", 0)]  # questions are read the same way
    plain = fusion_task.PairDataset(pairs, ["{caption}"], {"cat": 0})
    assert plain[0][1] == "a cat" and plain[0][2] == [("what is it?", 0)]


def test_sibling_breakdown_against_a_direct_count():
    """R@1 and R@10 per group of test captions (near sibling in training; without one,
    every word seen or not), checked against ranks counted one caption at a time."""
    g = torch.Generator().manual_seed(0)
    n = 40
    sim = torch.randn(n, n, generator=g)  # (images, texts)
    sim[torch.arange(0, n, 3), torch.arange(0, n, 3)] += 3.0  # some right images on top
    siblings = [i % 2 == 0 for i in range(n)]
    unseen = [["pizza"] if i % 5 == 0 else [] for i in range(n)]
    out = fusion_task._sibling_split(sim, siblings, unseen)["siblings"]

    def direct(member):
        idx = [i for i in range(n) if member(i)]
        ranks = [sum(float(sim[j, i]) > float(sim[i, i]) for j in range(n)) for i in idx]
        return len(idx), sum(r < 1 for r in ranks) / len(idx), sum(r < 10 for r in ranks) / len(idx)

    for name, member in [("with_sibling", lambda i: siblings[i]),
                         ("without_sibling", lambda i: not siblings[i]),
                         ("without_sibling_words_seen", lambda i: not siblings[i] and not unseen[i]),
                         ("without_sibling_unseen_word", lambda i: not siblings[i] and unseen[i])]:
        count, r1, r10 = direct(member)
        assert out[f"count_{name}"] == count
        assert out[f"r1_t2i_{name}"] == pytest.approx(r1)
        assert out[f"r10_t2i_{name}"] == pytest.approx(r10)
    assert 0 < out["r1_t2i_with_sibling"] < out["r10_t2i_with_sibling"] < 1


def test_the_modes_read_images_as_training_does(tmp_path):
    """A transparent and a non-square image reach ``mode=retrieve/classify/answer`` with the
    pixels training and evaluation read (transparency on white, padded to a square), not
    stretched or on black."""
    from types import SimpleNamespace

    from data.fusion import read_pairs
    rgba = np.zeros((12, 24, 4), dtype=np.uint8)
    rgba[:, :12] = (200, 30, 30, 255)  # left half opaque red, right half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    (tmp_path / "pairs.jsonl").write_text(json.dumps({"image": "a.png", "caption": "x"}) + "\n")
    pixels = read_pairs(tmp_path / "pairs.jsonl", img_size=16).images.float() / 255
    module = SimpleNamespace(model_cfg={"vision": {"img_size": 16}},
                             meta={"mean": [0.5, 0.4, 0.3], "std": [0.2, 0.25, 0.3]})
    files, x, skipped = fusion_task._read_images(module, str(tmp_path / "*.png"), "error")
    mean, std = (torch.tensor(module.meta[k]).view(1, 3, 1, 1) for k in ("mean", "std"))
    assert files == [str(tmp_path / "a.png")] and skipped == []
    assert torch.allclose(x, (pixels - mean) / std)


def test_a_test_split_of_fewer_than_five_pairs_draws_its_retrieval_grid(tmp_path):
    from data.fusion import read_pairs
    rows = []
    for i, color in enumerate(["red", "blue", "green"]):
        Image.new("RGB", (8, 8), color).save(tmp_path / f"{i}.png")
        rows.append(json.dumps({"image": f"{i}.png", "caption": color}) + "\n")
    (tmp_path / "pairs.jsonl").write_text("".join(rows))
    pairs = read_pairs(tmp_path / "pairs.jsonl", img_size=8)
    path = fusion_task.plot_retrieval(pairs, torch.eye(3), tmp_path / "grid.png")
    assert Image.open(path).size[0] > 0


def test_text_lists_name_a_missing_or_unreadable_file(tmp_path):
    with pytest.raises(UserError, match="texts=/nonexistent/captions.txt does not exist"):
        fusion_task._as_list("/nonexistent/captions.txt", "texts")
    (tmp_path / "c.txt").write_bytes(b"\xff\xfe bad\n")
    with pytest.raises(UserError, match="is not UTF-8 text"):
        fusion_task._as_list(str(tmp_path / "c.txt"), "texts")
    assert fusion_task._as_list("a red square", "texts") == ["a red square"]


def test_a_number_given_as_texts_is_one_text():
    assert fusion_task._as_list(5, "texts") == ["5"]  # texts=5 on the command line
