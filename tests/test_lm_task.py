"""The lm task end to end on a small fixture corpus: training, results, generation,
init-from, exact resume, and the one-line errors for bad input."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from hydra import compose, initialize_config_dir
from lightning.pytorch.callbacks import Callback
from sentencepiece import sentencepiece_model_pb2 as sp_model

from data.text import Tokenizer
from tasks import lm as lm_task
from tasks.framework import runtime
from tasks.framework.errors import UserError
from tests.taskrun import run_task

ROOT = Path(__file__).resolve().parents[1]
CORPUS = ROOT / "tests" / "fixtures" / "sonnets.txt"


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ATTNKIT_DATA", str(tmp_path_factory.getbasetemp() / "data-cache"))


def make_cfg(run_dir, *overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("lm", overrides=[
            "model=lm_tiny", "data=tiny_text", f"data.train_files={CORPUS}",
            "trainer.max_steps=8", "trainer.val_check_interval=4", "trainer.log_every_n_steps=1",
            "generate.max_new_tokens=12", f"run_dir={run_dir}", *overrides])


def test_a_tokenizer_trains_on_text_written_as_one_long_line():
    """sentencepiece skips sentences over 4192 bytes: a corpus without line breaks is cut
    into pieces for training (and still encodes and decodes whole)."""
    text = " ".join(CORPUS.read_text().split())  # the sonnets as one line
    assert "\n" not in text and len(text.encode()) > 30_000
    tok = Tokenizer.train(text, 400)
    assert tok.decode(tok.encode(text)) == text
    lined = Tokenizer.train(CORPUS.read_text(), 400)  # the same text with its line breaks
    assert len(tok.encode(text)) < 1.1 * len(lined.encode(text))  # as many pieces learned


@pytest.mark.parametrize("kind", ["bpe", "unigram"])
def test_tokenizer_round_trips_text_exactly(kind):
    text = CORPUS.read_text()
    tok = Tokenizer.train(text, 400, kind=kind)
    proto = sp_model.ModelProto()
    proto.ParseFromString(tok.proto)
    assert sp_model.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type) == kind.upper()
    sample = text[:2000] + "\n  indented line, digits 1234 and ünïcödé ✓\n\n"
    assert tok.decode(tok.encode(sample)) == sample
    assert tok.encode("a\nb").count(Tokenizer.NL) == 1


def test_train_writes_results_checkpoints_and_plots(tmp_path):
    res = lm_task.run(make_cfg(tmp_path))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["steps"] == 8 and saved["val_bpc"] == pytest.approx(res["val_bpc"])
    assert 0 < saved["val_bpc"] < 10
    for name in ("checkpoints/best.ckpt", "checkpoints/last.ckpt", "loss_curves.png",
                 "val_bpc.png", "tokenizer.model", "logs/version_0/metrics.csv"):
        assert (tmp_path / name).is_file(), name
    # bits per char = nats per token / chars per token / ln 2
    ckpt = torch.load(tmp_path / "checkpoints/best.ckpt", weights_only=False)
    cpt = ckpt["attnkit"]["chars_per_token"]
    assert saved["val_bpc"] == pytest.approx(saved["val_loss"] / cpt / 0.6931471805599453,
                                             rel=1e-4)
    # generation from the checkpoint, batched prompts; each run writes generate.json
    runs = iter(range(100))

    def generate(*overrides):
        return lm_task.run(make_cfg(tmp_path / f"gen{next(runs)}", "mode=generate",
                                    f"ckpt={tmp_path}/checkpoints/best.ckpt", *overrides))

    out = generate("prompts=[From fairest,Thy]", "generate.temperature=0")
    assert len(out["completions"]) == 2 and all(out["completions"])
    assert json.loads((tmp_path / "gen0" / "generate.json").read_text()) == out
    alone = generate("prompt=Thy", "generate.temperature=0")
    assert alone["completions"][0] == out["completions"][1]
    # sampling: each prompt draws as it would alone, whatever else shares its batch (two
    # prompts of one token length decode together), and a repeated prompt draws anew
    tok = Tokenizer.load(tmp_path / "tokenizer.model")
    by_length: dict[int, list[str]] = {}
    for word in ["Thy", "The", "And", "But", "When", "From", "Love", "That", "Thou", "Then"]:
        by_length.setdefault(len(tok.encode(word)), []).append(word)
    a, b = next(words for words in by_length.values() if len(words) >= 2)[:2]
    sampled = generate(f"prompts=[{a},{b},{a}]")["completions"]
    for prompt, text in zip([a, b], sampled):
        assert generate(f"prompt={prompt}")["completions"] == [text], prompt
    assert sampled[2] != sampled[0]
    half = generate("prompt=Thy", "generate.temperature=0", "generate.dtype=bfloat16")
    assert len(half["completions"]) == 1 and half["completions"][0]
    with pytest.raises(UserError, match="generate.dtype must be float32 or bfloat16, got 'fp8'"):
        generate("generate.dtype=fp8")
    for bad, expect in [("prompt=null", "prompt holds null, which is not text"),
                        ("generate.use_cache=false", "generate.compile=True is not valid")]:
        with pytest.raises(UserError, match=expect):
            generate("generate.compile=true", bad)


def test_generation_past_the_context_slides_its_window():
    """More new tokens than the context holds: the continuation is what the model gives
    from the last half of the context, stitched on without a gap."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf

    from modules.generation import generate
    torch.manual_seed(0)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("lm", overrides=["model=lm_tiny", "data=tiny_text", "data.vocab_size=64"])
    model = instantiate(cfg.model).eval()  # random weights: end-of-text is one id in 64
    tok = SimpleNamespace(EOS=-1, PAD=0, NL=1)  # never produced: every row runs to the end
    g = OmegaConf.merge(cfg.generate, {"max_new_tokens": 70, "temperature": 0})
    prompts = [[5, 6, 7], [9, 10, 11], [12]]
    got = lm_task.sample_ids(model, tok, prompts, g)
    assert [len(x) for x in got] == [70, 70, 70]
    ctx, keep = model.max_seq_len, model.max_seq_len // 2  # 32 and 16
    for p, ids in zip(prompts, got):  # each alone, window by window
        seq, want = list(p), []
        while len(want) < 70:
            new = generate(model, [seq], max_new_tokens=min(70 - len(want), ctx - len(seq)))[0]
            want += new
            seq = (seq + new)[-keep:]
        assert ids == want
    assert got[0] != got[1]


def test_sampling_that_ends_in_a_later_window_ends_each_row_alone():
    """End-of-text drawn in the second window: that row stops there (end-of-text kept),
    the rows still going draw exactly what they drew when nothing ended."""
    from hydra.utils import instantiate
    from omegaconf import OmegaConf
    torch.manual_seed(0)
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("lm", overrides=["model=lm_tiny", "data=tiny_text", "data.vocab_size=64"])
    model = instantiate(cfg.model).eval()
    g = OmegaConf.merge(cfg.generate, {"max_new_tokens": 70, "temperature": 1.0, "top_k": 0,
                                       "top_p": 1.0})
    prompts = [[5, 6, 7], [5, 6, 7], [12]]  # the repeat draws a sample of its own
    full = lm_task.sample_ids(model, SimpleNamespace(EOS=-1, PAD=0, NL=1), prompts, g)
    first_window = model.max_seq_len - len(prompts[0])  # new tokens before the window moves
    eos = next(t for t in range(64) if t in full[0][first_window:]
               and t not in full[0][:first_window] and t not in full[1][:full[0].index(t) + 2])
    got = lm_task.sample_ids(model, SimpleNamespace(EOS=eos, PAD=0, NL=1), prompts, g)
    want = [r[:r.index(eos) + 1] if eos in r else r for r in full]
    assert got == want
    assert len(got[0]) > first_window and len(got[1]) > len(got[0])  # the batch shrank


def test_mixed_precision_with_clipping_and_fused_adamw_trains(tmp_path):
    # Lightning refuses to clip gradients of a fused optimizer under its mixed-precision
    # plugin; the GPU preset (bf16-mixed, clipping, fused AdamW) must still train.
    res = lm_task.run(make_cfg(tmp_path, "trainer.precision=bf16-mixed", "trainer.max_steps=2",
                               "trainer.val_check_interval=2", "generate.max_new_tokens=2"))
    assert res["steps"] == 2 and math.isfinite(res["val_loss"])


def _weights(path):
    return torch.load(path, weights_only=False)["state_dict"]


@pytest.mark.parametrize("overrides", [[], ["model.drop=0.2", "model.attn_drop=0.1"],
                                       ["optimizer=muon"]], ids=["plain", "dropout", "muon"])
def test_resume_continues_exactly(tmp_path, monkeypatch, overrides):
    """Stopped at step 4 and resumed, a run ends with the same weights as an uninterrupted
    one: batch order and (with dropout) the random state travel in the checkpoint."""
    straight = tmp_path / "straight"
    lm_task.run(make_cfg(straight, *overrides))

    class StopAt4(Callback):
        def on_validation_end(self, trainer, pl_module):
            if trainer.global_step == 4:
                trainer.should_stop = True

    build = runtime.build_trainer
    monkeypatch.setattr(runtime, "build_trainer",
                        lambda *a, **k: build(*a, **k, extra_callbacks=[StopAt4()]))
    split = tmp_path / "split"
    lm_task.run(make_cfg(split, *overrides))
    assert torch.load(split / "checkpoints/last.ckpt", weights_only=True)["global_step"] == 4
    monkeypatch.setattr(runtime, "build_trainer", build)
    torch.manual_seed(12345)  # a different state at restart: only the checkpoint's may count
    lm_task.run(make_cfg(split, "resume=auto", *overrides))

    a, b = _weights(straight / "checkpoints/last.ckpt"), _weights(split / "checkpoints/last.ckpt")
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0, msg=k)
    hist = [json.loads((d / "results.json").read_text()) for d in (straight, split)]
    assert hist[0]["steps"] == hist[1]["steps"] == 8
    assert hist[0]["val_loss"] == hist[1]["val_loss"]


def test_a_moved_run_resumes_its_own_checkpoints_and_a_resume_keeps_its_settings(tmp_path):
    """A run directory moved before ``resume=auto`` goes on writing its own ``last.ckpt``
    and ``best.ckpt`` (Lightning's keep the old folder's paths only when the folder is the
    same); another run's checkpoint continued in a new folder keeps a best of its own; the
    settings Lightning would silently override with the saved state are refused."""
    first, moved, other = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    lm_task.run(make_cfg(first))
    first.rename(moved)
    res = lm_task.run(make_cfg(moved, "resume=auto", "trainer.max_steps=12"))
    ckpts = moved / "checkpoints"
    assert sorted(p.name for p in ckpts.glob("*.ckpt")) == ["best.ckpt", "last.ckpt"]
    assert torch.load(ckpts / "last.ckpt", weights_only=True)["global_step"] == 12
    assert res["best_checkpoint"] == str(ckpts / "best.ckpt")
    res = lm_task.run(make_cfg(other, f"resume={ckpts / 'last.ckpt'}", "trainer.max_steps=16"))
    assert res["best_checkpoint"] == str(other / "checkpoints" / "best.ckpt")
    saved = torch.load(other / "checkpoints" / "best.ckpt", weights_only=True)
    assert saved["global_step"] == 16
    before = (moved / "results.json").read_bytes()
    for change, expect in [("optimizer.lr=0.5", r"optimizer.lr=0.003, this run has 0.5"),
                           ("data.batch_size=8", r"data.batch_size=4, this run has 8"),
                           ("seed=7", r"seed=1337, this run has 7"),
                           ("trainer.max_steps=4", r"trainer.max_steps=4 is below step 12")]:
        args = [change] + (["trainer.max_steps=16"] if "max_steps" not in change else [])
        with pytest.raises(UserError, match=expect):
            lm_task.run(make_cfg(moved, "resume=auto", *args))
    assert (moved / "results.json").read_bytes() == before
    for key in ("resume", "init_from"):  # a mode would ignore them
        with pytest.raises(UserError, match=f"{key}= is a setting of training"):
            lm_task.run(make_cfg(tmp_path / "g", "mode=generate", f"ckpt={ckpts / 'best.ckpt'}",
                                 f"{key}={ckpts / 'last.ckpt'}"))


def _kind(tokenizer_file: Path) -> str:
    proto = sp_model.ModelProto()
    proto.ParseFromString(tokenizer_file.read_bytes())
    return sp_model.TrainerSpec.ModelType.Name(proto.trainer_spec.model_type)


def test_init_from_loads_weights_and_refuses_other_shapes(tmp_path):
    """Fine-tuning keeps the checkpoint's tokenizer (its embedding rows stand for those
    pieces), whatever the config would train: here a unigram run is fine-tuned under the
    BPE setting of the test data."""
    lm_task.run(make_cfg(tmp_path / "a", "data.tokenizer_type=unigram"))
    assert _kind(tmp_path / "a" / "tokenizer.model") == "UNIGRAM"
    ckpt = tmp_path / "a" / "checkpoints" / "best.ckpt"
    res = lm_task.run(make_cfg(tmp_path / "b", f"init_from={ckpt}", "optimizer.lr=1e-4"))
    assert res["init_from"]["loaded"] > 0 and not res["init_from"]["missing"]
    assert (tmp_path / "b" / "tokenizer.model").read_bytes() == \
        (tmp_path / "a" / "tokenizer.model").read_bytes()
    bpe = tmp_path / "bpe.model"
    Tokenizer.train(CORPUS.read_text(), 400).save(bpe)
    with pytest.raises(UserError, match=r"data.tokenizer=.*bpe.model is not the tokenizer "
                                        r".*best.ckpt was trained with"):
        lm_task.run(make_cfg(tmp_path / "d", f"init_from={ckpt}", f"data.tokenizer={bpe}"))
    with pytest.raises(UserError, match="differ in shape"):
        lm_task.run(make_cfg(tmp_path / "c", f"init_from={ckpt}", "model.embed_dim=48"))


def cli(tmp_path, *args):
    env = dict(os.environ, ATTNKIT_DATA=str(tmp_path / "cache"))
    base = ["model=lm_tiny", "data=tiny_text", f"data.train_files={CORPUS}",
            "trainer.max_steps=2", f"run_dir={tmp_path / 'run'}",
            f"hydra.run.dir={tmp_path / 'hydra'}"]
    return run_task("tasks.lm", [*base, *args], env=env, timeout=300)


@pytest.mark.parametrize("args,expect", [
    (["data.train_files=/nonexistent/*.txt"], "data.train_files='/nonexistent/*.txt' matches no file"),
    (["trainer.max_steps=abc"], "trainer.max_steps='abc' is not valid: expected int"),
    (["ckpt=/nonexistent.ckpt", "mode=generate"], "checkpoint /nonexistent.ckpt does not exist"),
    (["mode=sample"], "mode='sample' is not a mode of the lm task; expected one of"),
    (["prompt=café"], "prompt=café cannot be read as an override (LexerNoViableAltException); "
                      "expected key=value, with a value that holds brackets"),
    (["ckpt=/some/best.ckpt", "prompt=KING:"],
     "ckpt= is a setting of this task's other modes (mode=generate), and mode=train trains"),
    (["model.value_embeds=3"], "value_embeds=3; expected a whole number of blocks from 0 to depth=2"),
    (["model.bigram_drop=1.0"], "bigram_drop=1.0; expected a number in [0, 1)"),
    (["data.tokenizer_type=wordpiece"],
     "data.tokenizer_type='wordpiece' is not valid: expected bpe or unigram"),
])
def test_bad_input_is_one_clear_line(tmp_path, args, expect):
    proc = cli(tmp_path, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and expect in err[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_misspelled_key_is_an_error_naming_it(tmp_path):
    proc = cli(tmp_path, "model.embed_dimm=64")
    assert proc.returncode != 0
    assert "embed_dimm" in proc.stderr and "Traceback" not in proc.stderr


def test_empty_truncated_and_foreign_inputs(tmp_path):
    empty = tmp_path / "empty.txt"
    empty.write_text("\n\n")
    with pytest.raises(UserError, match="hold no text"):
        lm_task.run(make_cfg(tmp_path / "r", f"data.train_files={empty}"))
    lm_task.run(make_cfg(tmp_path / "ok"))
    good = tmp_path / "ok" / "checkpoints" / "best.ckpt"
    truncated = tmp_path / "truncated.ckpt"
    truncated.write_bytes(good.read_bytes()[:5000])
    with pytest.raises(UserError, match="cannot be read.*truncated"):
        lm_task.run(make_cfg(tmp_path / "r", "mode=generate", f"ckpt={truncated}"))
    foreign = torch.load(good, weights_only=False)
    foreign["attnkit"]["task"] = "vit"
    torch.save(foreign, tmp_path / "vit.ckpt")
    with pytest.raises(UserError, match="is from the 'vit' task; expected a 'lm'"):
        lm_task.run(make_cfg(tmp_path / "r", f"init_from={tmp_path / 'vit.ckpt'}"))
    # another held-out share would validate on text the checkpoint trained on
    with pytest.raises(UserError, match="another split of the data"):
        lm_task.run(make_cfg(tmp_path / "r2", f"resume={good}", "data.val_fraction=0.3"))
    with pytest.raises(UserError, match=r"too little text to train a tokenizer .*"
                                        r"data.val_fraction=0.9999 holds out that share"):
        lm_task.run(make_cfg(tmp_path / "r3", "data.val_fraction=0.9999"))
    with pytest.raises(UserError, match=r"windows of data.context=32, fewer than a batch of "
                                        r"data.batch_size=\d+ \(data.val_fraction=0.999 holds"):
        lm_task.run(make_cfg(tmp_path / "r4", "data.val_fraction=0.999",
                             f"data.tokenizer={tmp_path / 'ok' / 'tokenizer.model'}"))
    # nothing the first run wrote was touched by the failed ones
    assert good.is_file() and (tmp_path / "ok" / "results.json").is_file()


def test_gpu_preset_instantiates_on_cpu(tmp_path):
    from hydra.utils import instantiate
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        cfg = compose("lm", overrides=["experiment=lm_gpu"])
    model = instantiate(lm_task.model_config(cfg, 8192))
    assert cfg.trainer.precision == "bf16-mixed" and cfg.model.max_seq_len == 1024
    assert 60e6 < model.num_params(exclude_embeddings=False) < 200e6


@pytest.mark.slow
def test_ddp_two_processes_share_one_run_dir(tmp_path):
    env = dict(os.environ, ATTNKIT_DATA=str(tmp_path / "cache"))
    out = tmp_path / "outputs"
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.lm", "model=lm_tiny", "data=tiny_text", "trainer=ddp",
         f"data.train_files={CORPUS}", "trainer.max_steps=6", "trainer.val_check_interval=3",
         f"hydra.run.dir={out}/run"], cwd=ROOT, capture_output=True, text=True, env=env,
        timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["run"]
    res = json.loads((out / "run" / "results.json").read_text())
    assert res["steps"] == 6
    assert "world_size=2" in proc.stdout + proc.stderr or "GLOBAL_RANK: 1" in proc.stdout + proc.stderr


def test_compiled_forward_and_loss_match_eager(tmp_path, monkeypatch):
    """compile=true compiles forward + cross entropy as one graph: same loss and gradients,
    with the output layer in slices (32 + 16 rows) as on the CPU."""
    from modules import losses as losses_mod
    monkeypatch.setattr(losses_mod, "MAX_LOGITS", 97 * 32)
    cfg = make_cfg(tmp_path)
    model_cfg = lm_task.model_config(cfg, 97)
    eager = lm_task.LMModule(model_cfg=model_cfg)
    compiled = lm_task.LMModule(model_cfg=model_cfg, compile=True)
    compiled.load_state_dict(eager.state_dict())
    batch = torch.randint(0, 97, (3, 17))
    batch[0, -4:] = -1  # padding targets are ignored
    losses = []
    for m in (eager, compiled):
        loss, count = m._loss(batch)
        loss.backward()
        losses.append((loss, count, m.model.embed.weight.grad))
        total, _ = m._loss(batch, reduction="sum")
        torch.testing.assert_close(total / count, loss.detach())
    torch.testing.assert_close(losses[1][0], losses[0][0])
    ref = torch.nn.functional.cross_entropy(
        eager.model(batch[:, :-1].clamp(min=0)).flatten(0, 1), batch[:, 1:].flatten(),
        ignore_index=-1)
    torch.testing.assert_close(losses[0][0], ref.detach())
    assert losses[1][1] == losses[0][1] == 3 * 16 - 4
    torch.testing.assert_close(losses[1][2], losses[0][2], rtol=1e-4, atol=1e-6)


def test_a_hf_weights_file_given_for_its_folder_names_the_folder(tmp_path):
    from tests.test_converters_llama import save_llama
    save_llama(tmp_path / "llama", vocab_size=400, max_position_embeddings=128)
    weights = next((tmp_path / "llama").glob("*.safetensors"))
    with pytest.raises(UserError, match=rf"a Hugging Face model is read from its folder: "
                                        rf"init_from={tmp_path / 'llama'}$"):
        lm_task.run(make_cfg(tmp_path / "r", f"init_from={weights}"))


def test_a_hf_directory_without_a_llama_config_key_is_one_error(tmp_path):
    from tests.test_converters_llama import save_llama
    save_llama(tmp_path / "llama", vocab_size=400, max_position_embeddings=128)
    config = json.loads((tmp_path / "llama" / "config.json").read_text())
    del config["vocab_size"]
    (tmp_path / "llama" / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="lacks 'vocab_size' of a Hugging Face Llama"):
        lm_task.run(make_cfg(tmp_path / "r", f"init_from={tmp_path / 'llama'}"))


def test_init_from_hf_llama_directory_through_the_command_line(tmp_path):
    """init_from=DIR takes rope_theta, norm eps, head split and vocabulary from config.json;
    a tokenizer of another size is a one-line error."""
    from tests.test_converters_llama import save_llama
    tok_dir = tmp_path / "tok"
    tok_dir.mkdir()
    tok = Tokenizer.train(CORPUS.read_text(), 400)
    tok.save(tok_dir / "spm.model")
    save_llama(tmp_path / "llama", vocab_size=tok.vocab_size, max_position_embeddings=128)
    proc = cli(tmp_path, f"init_from={tmp_path / 'llama'}", f"data.tokenizer={tok_dir}/spm.model",
               "trainer.val_check_interval=2")
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((tmp_path / "run" / "results.json").read_text())
    assert res["init_from"]["loaded"] > 0 and not res["init_from"]["missing"]
    model = torch.load(tmp_path / "run" / "checkpoints" / "last.ckpt",
                       weights_only=True)["attnkit"]["model"]
    assert (model["rope_theta"], model["norm_eps"], model["num_heads"], model["num_kv_heads"],
            model["embed_dim"], model["vocab_size"]) == (50000.0, 1e-5, 4, 2, 32,
                                                         tok.vocab_size)
    save_llama(tmp_path / "other", vocab_size=tok.vocab_size + 8)
    proc = cli(tmp_path / "again", f"init_from={tmp_path / 'other'}",
               f"data.tokenizer={tok_dir}/spm.model")
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: ")
    assert f"vocabulary of {tok.vocab_size + 8} tokens" in proc.stderr
