"""The task framework: no code runs from files a user points at, exact resume with the
random state, and the error contract (one line, exit status 2) through the command line."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tasks import lm as lm_task
from tasks.framework import checkpoints, runtime
from tasks.framework.config import check_command_line
from tasks.framework.errors import UserError
from tests.taskrun import run_task
from tests.test_lm_task import CORPUS, ROOT, data_cache, make_cfg  # noqa: F401 (fixture)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("trained")
    os.environ.setdefault("ATTNKIT_DATA", str(tmp_path_factory.getbasetemp() / "data-cache"))
    lm_task.run(make_cfg(out))
    return out / "checkpoints" / "best.ckpt"


class _CreatesFile:
    """Unpickling this calls ``open(path, "w")``: what a malicious checkpoint would do."""

    def __init__(self, path: str):
        self.path = path

    def __reduce__(self):
        return (open, (self.path, "w"))


def cli(tmp_path, task, *args, base=None):
    env = dict(os.environ, ATTNKIT_DATA=str(tmp_path / "cache"), ATTNKIT_SECRET="hunter2")
    if base is None:
        base = ["model=lm_tiny", "data=tiny_text", f"data.train_files={CORPUS}",
                "trainer.max_steps=2"] if task == "lm" else []
    base = [*base, f"run_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    return run_task(f"tasks.{task}", [*base, *args], env=env, timeout=300)


def one_line_error(proc, expect: str) -> None:
    assert proc.returncode == 2, (proc.returncode, proc.stderr[-2000:])
    err = [line for line in proc.stderr.strip().splitlines() if line.strip()]
    assert len(err) == 1 and err[0].startswith("error: "), proc.stderr[-2000:]
    assert expect in err[0], err[0]
    assert "Traceback" not in proc.stderr + proc.stdout


# --------------------------------------------------------------------------- no code runs
@pytest.mark.parametrize("key", ["ckpt", "init_from", "resume"])
def test_a_pickle_that_runs_code_is_refused_and_creates_nothing(tmp_path, key):
    victim = tmp_path / "created_by_pickle"
    evil = tmp_path / "evil.ckpt"
    torch.save({"attnkit": {"task": "lm"}, "state_dict": {}, "x": _CreatesFile(str(victim))},
               evil)
    args = [f"{key}={evil}"] + (["mode=generate"] if key == "ckpt" else [])
    proc = cli(tmp_path, "lm", *args)
    one_line_error(proc, "not loaded (they could run code)")
    assert not victim.exists()


def test_timm_pth_that_runs_code_is_refused(tmp_path):
    victim = tmp_path / "created_by_pickle"
    evil = tmp_path / "vit_small.pth"
    torch.save({"patch_embed.proj.weight": torch.zeros(1), "x": _CreatesFile(str(victim))}, evil)
    with pytest.raises(UserError, match="could run code"):
        checkpoints.safe_load(evil, "init_from")
    assert not victim.exists()


@pytest.mark.parametrize("content", [
    b"\x80\x02\xb0 random bytes that start like a pickle",  # torch: "Unsupported operand"
    b"plain text, not a checkpoint\n",
])
def test_an_unreadable_checkpoint_is_not_called_a_code_risk(tmp_path, content):
    bad = tmp_path / "not_a.ckpt"
    bad.write_bytes(content)
    with pytest.raises(UserError) as err:
        checkpoints.safe_load(bad, "ckpt")
    unreadable = "is not a PyTorch file" if content[:1] != b"\x80" else "cannot be read"
    assert unreadable in str(err.value) and "could run code" not in str(err.value)
    assert "Weights only load failed" not in str(err.value)  # the cause, not torch's advice


def test_a_raw_pickle_naming_a_function_is_refused_as_code(tmp_path):
    victim = tmp_path / "created_by_pickle"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps({"x": _CreatesFile(str(victim))}, protocol=2))
    with pytest.raises(UserError, match="could run code"):
        checkpoints.safe_load(evil, "ckpt")
    assert not victim.exists()


@pytest.mark.parametrize("target", ["builtins.open", "torch.save", "os.mkdir"])
def test_checkpoint_naming_a_foreign_model_class_is_refused(tmp_path, trained, target):
    ckpt = torch.load(trained, weights_only=True)
    victim = tmp_path / "made_by_target"
    ckpt["attnkit"]["model"] = {"_target_": target, "_args_": [str(victim), "w"]}
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    proc = cli(tmp_path, "lm", "mode=generate", f"ckpt={bad}")
    one_line_error(proc, f"names model '{target}'; expected one of")
    assert not victim.exists()


@pytest.mark.parametrize("where,value,expect", [
    ("model", {"_partial_": True}, "holds '_partial_' at attnkit.model._partial_"),
    ("model", {"backend": "${oc.env:ATTNKIT_SECRET}"},
     "holds '${oc.env:ATTNKIT_SECRET}' at attnkit.model.backend"),
])
def test_checkpoint_settings_are_never_interpolated(tmp_path, trained, where, value, expect):
    ckpt = torch.load(trained, weights_only=True)
    ckpt["attnkit"][where] |= value
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    proc = cli(tmp_path, "lm", "mode=generate", f"ckpt={bad}")
    one_line_error(proc, expect)
    assert "hunter2" not in proc.stdout + proc.stderr


@pytest.mark.parametrize("value,expect", [(None, "holds nothing as its 'tokenizer'"),
                                          ("text", "holds a str as its 'tokenizer'")])
def test_checkpoint_metadata_of_the_wrong_kind_is_one_error(tmp_path, trained, value, expect):
    ckpt = torch.load(trained, weights_only=True)
    if value is None:
        del ckpt["attnkit"]["tokenizer"]
    else:
        ckpt["attnkit"]["tokenizer"] = value
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    one_line_error(cli(tmp_path, "lm", "mode=generate", f"ckpt={bad}"), expect)


@pytest.mark.parametrize("edit, expect", [
    (lambda sd: [1, 2], "has a state dict that is a list; expected tensors by name"),
    (lambda sd: sd | {"model.embed.weight": 3}, "whose 'model.embed.weight' is a int"),
])
@pytest.mark.parametrize("key", ["ckpt", "init_from", "resume"])
def test_a_state_dict_that_is_not_tensors_is_one_error(tmp_path, trained, edit, expect, key):
    ckpt = torch.load(trained.parent / "last.ckpt", weights_only=True)
    ckpt["state_dict"] = edit(ckpt["state_dict"])
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    extra = ["mode=generate"] if key == "ckpt" else []
    with pytest.raises(UserError, match=expect):
        lm_task.run(make_cfg(tmp_path / "r", f"{key}={bad}", *extra))


def test_a_checkpoint_with_a_tensor_of_another_shape_names_it(tmp_path, trained):
    ckpt = torch.load(trained, weights_only=True)
    name = next(k for k, v in ckpt["state_dict"].items() if v.dim() == 2)
    ckpt["state_dict"][name] = torch.zeros(3, 3)
    bad = tmp_path / "bad.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(UserError, match=rf"1 tensors differ in shape \(checkpoint vs model\), "
                                        rf"e.g. {re.escape(name)} \(3, 3\) vs"):
        lm_task.run(make_cfg(tmp_path / "r", "mode=generate", f"ckpt={bad}"))


def test_lightning_resume_loads_weights_only(tmp_path, trained):
    # resume= goes through Lightning's own loader: it must refuse pickled objects too.
    split = tmp_path / "split"
    ckpt = torch.load(trained.parent / "last.ckpt", weights_only=True)
    victim = tmp_path / "created_on_resume"
    ckpt["loops"]["evil"] = _CreatesFile(str(victim))
    bad = tmp_path / "last.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(UserError):
        lm_task.run(make_cfg(split, f"resume={bad}"))
    assert not victim.exists()


def test_a_moment_buffer_of_another_shape_is_one_error_not_a_crash(tmp_path, trained):
    """The fused AdamW step read past the end of the edited buffer: a segfault."""
    ckpt = torch.load(trained.parent / "last.ckpt", weights_only=True)
    ckpt["optimizer_states"][0]["state"][0]["exp_avg"] = torch.zeros(3)
    torch.save(ckpt, tmp_path / "edited.ckpt")
    one_line_error(cli(tmp_path, "lm", f"resume={tmp_path / 'edited.ckpt'}",
                       "trainer.max_steps=12"),
                   "its optimizer state cannot be restored (exp_avg of parameter 0 has shape "
                   "(3,), the parameter (64, 32))")


@pytest.mark.parametrize("edit,expect", [
    (lambda c: c["optimizer_states"][0].pop("state"), "no 'state' and 'param_groups'"),
    (lambda c: c["optimizer_states"][0]["param_groups"][0].pop("lr"),
     "parameter group 0 has no ['lr']"),
    (lambda c: c.pop("lr_schedulers"), "its scheduler state cannot be restored (NoneType; "
                                       "expected a list"),
    (lambda c: c.__setitem__("lr_schedulers", [{"last_epoch": 3}]),
     "(KeyError: 'lr_lambdas')"),
    (lambda c: c.__setitem__("loops", {"fit_loop": 5}), "'loops' is not a mapping"),
    (lambda c: c["callbacks"]["RNGState"]["python"].pop(), "its random state cannot be restored"),
    (lambda c: c["callbacks"]["RNGState"].__setitem__("torch", torch.zeros(3)),
     "its random state cannot be restored"),
    (lambda c: c["callbacks"]["History"]["rows"].append(7), "its history of curves cannot be"),
])
def test_a_cut_or_edited_training_state_is_one_error(tmp_path, trained, edit, expect):
    ckpt = torch.load(trained.parent / "last.ckpt", weights_only=True)
    edit(ckpt)
    bad = tmp_path / "edited.ckpt"
    torch.save(ckpt, bad)
    with pytest.raises(UserError, match=re.escape(expect)):
        lm_task.run(make_cfg(tmp_path / "run", f"resume={bad}", "trainer.max_steps=12"))


# --------------------------------------------------------------------------- exact resume
def test_rng_state_round_trips_through_a_weights_only_checkpoint(tmp_path):
    import random

    import numpy as np
    cb = checkpoints.RNGState()
    torch.manual_seed(3)
    random.seed(3)
    np.random.seed(3)
    torch.save({"rng": cb.state_dict()}, tmp_path / "s.pt")
    expect = (torch.rand(3), random.random(), np.random.rand())
    torch.manual_seed(99)
    random.seed(99)
    np.random.seed(99)
    cb.load_state_dict(torch.load(tmp_path / "s.pt", weights_only=True)["rng"])
    assert torch.equal(torch.rand(3), expect[0])
    assert random.random() == expect[1] and np.random.rand() == expect[2]


# --------------------------------------------------------------------------- error contract
def _image_folder(root: Path) -> Path:
    from PIL import Image
    for c in ("a", "b"):
        (root / c).mkdir(parents=True)
        for i in range(4):
            Image.new("L", (16, 16), 60 * i).save(root / c / f"{i}.png")
    return root


@pytest.mark.parametrize("task,args,expect", [
    ("lm", ["model.embed_dimm=64"], "model.embed_dimm is not a setting of this task; "
     "expected model.embed_dim, or +model.embed_dimm=... to add a new one"),
    ("speech", ["data.pico_utterance=5"], "expected data.pico_utterances"),
    ("lm", [f"data.tokenizer={ROOT / 'README.md'}"], "is not a sentencepiece model"),
    ("fusion", ["eval.rerank_k=0"], "eval.rerank_k=0 is not valid: expected a count >= 1"),
    ("fusion", ["eval.memory.temperature=0"],
     "eval.memory.temperature=0 is not valid: expected a finite temperature > 0"),
    ("fusion", ["eval.memory.enabled=maybe"],
     "eval.memory.enabled='maybe' is not valid: expected bool like the default True"),
    ("vit", ["data.channels=0"], "data.channels=0 is not valid: expected 1 (grey) or 3"),
    ("speech", ["mode=transcribe", "ckpt=x.ckpt", "audio=x.wav", "data.on_bad_audio=foo"],
     "data.on_bad_audio='foo' is not valid: expected one of ['skip', 'error']"),
    ("lm", ["model=lm_huge"], "lm_huge"),
    ("lm", ["trainer.max_steps=abc"], "trainer.max_steps='abc' is not valid: expected int"),
    ("lm", ["model.backend=flash"], "model (modules.lm.CausalLM) cannot be built"),
    ("lm", ["model.num_heads=5"], "cannot be built"),
    ("lm", ["optimizer.lr=-1"], "optimizer/scheduler settings are not valid"),
    ("lm", ["optimizer.embedding_lr_scale=0"],
     "optimizer.embedding_lr_scale=0 is not valid: expected a number > 0"),
    ("lm", ["optimizer.embedding_lr_scale=ten"],
     "optimizer.embedding_lr_scale='ten' is not valid: expected float"),
    ("lm", ["optimizer.embedding_weight_decay=-0.1"],
     "optimizer.embedding_weight_decay=-0.1 is not valid: expected a number >= 0"),
    ("lm", ["data.context=0"], "data.context=0 is not valid"),
    ("lm", ["trainer.max_steps=0"], "trainer.max_steps=0 must be a positive"),
    ("lm", ["trainer.accelerator=gpu"], "trainer settings are not valid"),
    ("lm", ["trainer.ema_decay=1.5"], "trainer.ema_decay=1.5; expected a number between"),
    ("lm", ["trainer.ema_decay=abc"], "trainer.ema_decay='abc'; expected a number between"),
    ("lm", ["optimizer=muon", "optimizer.adjust_lr_fn=spectral"],
     "optimizer.adjust_lr_fn='spectral' is not valid: expected original or match_rms_adamw"),
    ("lm", ["optimizer=muon", "optimizer.ns_steps=0"],
     "optimizer.ns_steps=0 is not valid: expected a whole number"),
    ("vit", ["optimizer=muon", "trainer=fsdp", "trainer.accelerator=cpu"],
     "optimizer=muon is not supported with trainer.strategy=fsdp"),
    ("vit", ["trainer.strategy=deepspeed_stage_2", "trainer.accelerator=cpu"],
     "optimizer=muon is not supported with trainer.strategy=deepspeed_stage_2"),
    ("speech", ["data.gnuspeech_utterances=-5"], "data.gnuspeech_utterances=-5 is not valid"),
    ("speech", ["data.kokoro_repeats=0"], "data.kokoro_repeats=0 is not valid"),
    ("speech", ["data.narrowband=1.5"], "data.narrowband=1.5 is not valid"),
    ("speech", ["data.narrowband=abc"], "data.narrowband='abc' is not valid"),
    ("vit", ["data.augment.elastic_alpha=30", "data.augment.elastic_sigma=8"],
     "data.augment.elastic_sigma=8 is not valid"),
    ("speech", ["data.pico_utterances=-1"], "data.pico_utterances=-1 is not valid"),
    ("vit", ["model.pool=max"], "cannot be built"),
    ("vit", ["data.root=/nonexistent-images"], "/nonexistent-images"),
    ("translation", ["data.train_file=/nonexistent.tsv"], "/nonexistent.tsv"),
    ("translation", ["mode=translate", "ckpt=/nonexistent.ckpt", "input=-"],
     "checkpoint /nonexistent.ckpt does not exist"),
    ("lm", ["seed=abc"], "seed='abc' is not valid: expected int"),
    ("lm", ["compile=maybe"], "compile='maybe' is not valid: expected bool"),
    ("vit", ["label_smoothing=2"], "label_smoothing=2 is not valid: expected a number in [0, 1)"),
    ("vit", ["top_k=-1"], "top_k=-1 is not valid: expected a count >= 1"),
    ("lm", ["trainer.val_check_interval=0"], "trainer.val_check_interval=0 is not valid"),
    ("lm", ["trainer.val_check_interval=0.5"],
     "trainer.val_check_interval=0.5 is not valid: expected a whole number of steps (a "
     "fraction of an epoch needs trainer.check_val_every_n_epoch=N"),
    ("lm", ["trainer.val_check_interval=1.5", "trainer.check_val_every_n_epoch=1"],
     "trainer.val_check_interval=1.5 is not valid: expected a whole number of steps or a "
     "fraction of an epoch in (0, 1]"),
    ("lm", ["mode=generate", "ckpt=x.ckpt", "generate.top_p=2"], "generate.top_p=2 is not valid"),
    ("lm", ["model.depth=-1"], "depth=-1; expected >= 0"),
    ("lm", ["model.embed_dim=30", "model.num_heads=4", "model.num_kv_heads=2"],
     "embed_dim (30) must be divisible by num_heads (4)"),
    ("speech", ["data.train=a.jsonl", "data.val=b.jsonl", "data.test=c.jsonl"],
     "data.test='c.jsonl' is not valid: expected named evaluation sets"),
    ("speech", ["data.train=a.jsonl", "data.val=b.jsonl", "data.test={train: c.jsonl}"],
     "data.test names a set 'train'"),
    ("vit", ["run_dir=/proc/version"], "run_dir='/proc/version' cannot be used"),
    ("vit", ["seed=-1"], "seed=-1; expected a whole number from 0"),
    ("vit", ["trainer.accumulate_grad_batches=0", "data.batch_size=2"],
     "trainer.accumulate_grad_batches=0; expected a whole number of at least 1"),
    ("vit", ["trainer.log_every_n_steps=0", "data.batch_size=2"],
     "trainer.log_every_n_steps=0; expected a whole number of at least 1"),
    ("vit", ["data.batch_size=1000"], "the training set gives no batch"),
    ("vit", ["data.split=abc"], "data.split='abc' is not valid: expected list"),
    ("vit", ["model.img_size=abc"], "model.img_size='abc' is not valid: expected int"),
    ("lm", ["scheduler._target_=bogus.thing"], "optimizer/scheduler settings are not valid"),
    ("translation", [f"data.train_file={ROOT / 'tests/fixtures/genesis.en-es.tsv'}",
                     "data.test_size=0"], "data.test_size=0: expected at least one pair"),
    ("vit", ["data.split=[0.98,0.01,0.01]"], "of 8 images leaves a part empty"),
    ("vit", ["model.attn_drop=1.5"], "attn_drop=1.5; expected a probability in [0, 1)"),
    ("vit", ["model.drop_path_rate=2"], "expected a probability in [0, 1)"),
    ("vit", ["model.registers=-1"], "registers=-1; expected a count of tokens >= 0"),
    ("vit", ["model.registers=null"], "registers=None; expected a count of tokens >= 0"),
    ("lm", ["model.rope_theta=0"], "rope_theta=0; expected a positive base"),
    ("lm", ["mode=generate", f"ckpt={ROOT / 'conf'}"], "is a folder; expected a checkpoint"),
    ("lm", ["mode=generate", f"ckpt={ROOT / 'README.md'}"],
     "README.md is not a PyTorch file (a file that starts with b'# attnk"),
    ("lm", ["optimizer.weight_decay=-1"], "optimizer.weight_decay=-1 is not valid"),
    ("lm", ["trainer.gradient_clip_val=-1"], "trainer.gradient_clip_val=-1; expected a norm"),
    ("vit", ["model.patch_size=0"], "model.patch_size=0 is not valid: expected a patch size"),
    ("vit", ["data.augment.mix_prob=1.5"], "data.augment.mix_prob=1.5 is not valid"),
    ("translation", ["decode.max_len_a=-1"], "decode.max_len_a=-1 is not valid"),
    ("fusion", ["eval.rerank_alpha=-1"], "eval.rerank_alpha=-1 is not valid"),
    ("fusion", ["model.sentence_weight=-1"], "model.sentence_weight=-1 is not valid"),
    ("speech", ["model.freq_width=-3"], "model.freq_width=-3 is not valid"),
    ("lm", ["optimizer.betas=[0.9]"], "optimizer.betas=[0.9] is not valid: expected two"),
    ("lm", ["optimizer.betas=[0.9,abc]"], "optimizer.betas=[0.9, 'abc'] is not valid"),
    ("lm", ["data.train_files=[]"], "data.train_files=[] names no file"),
    ("vit", ["data.batch_size=null"], "data.batch_size=null is not valid: expected a positive"),
    ("lm", ["~trainer.max_steps"], "~trainer.max_steps removes the setting trainer.max_steps"),
    ("lm", ["trainr=gpu"], "trainr is not a setting of this task; expected trainer,"),
    ("lm", ["trainer.limit_val_batches=0"], "trainer.limit_val_batches=0 is not valid"),
    ("lm", ["trainer.devices=true"], "trainer.devices=True is not valid: expected int or str"),
    ("lm", ["init_strict=null"], "init_strict=null is not valid: expected true or false"),
    ("vit", ["model.qkv_bias=null"], "model.qkv_bias=null is not valid: expected true or false"),
])
def test_user_errors_are_one_line_with_status_2(tmp_path, task, args, expect):
    base = None
    if task == "vit" and not any(a.startswith("data.root") for a in args):
        base = [f"data.root={_image_folder(tmp_path / 'imgs')}", "data.img_size=16",
                "data.batch_size=2", "trainer.max_steps=1"]
    if task == "translation" and "mode=translate" not in args:
        base = ["model=seq2seq_tiny"]
    proc = cli(tmp_path, task, *args, base=base)
    one_line_error(proc, expect)


@pytest.mark.parametrize("task,args", [
    ("fusion", ["optimizer.embedding_lr_scale=1"]),  # the default is ${data.table_lr_scale}
    ("vit", ["model.img_size=32"]), ("speech", ["model.max_frames=1600"]),
    ("lm", ["data.train_files=a.txt"]), ("lm", ["data.train_files=[a.txt,b.txt]"]),
    # Lightning's settings of more than one type, as the README's scaling commands give them
    ("lm", ["experiment=lm_gpu", "trainer.strategy=ddp", "trainer.devices=8"]),
    ("lm", ["optimizer.fused=null"]),  # null: torch's choice for the device
    ("lm", ["-m", "hydra/launcher=slurm", "experiment=lm_gpu", "trainer=fsdp",
            "trainer.num_nodes=2", "trainer.devices=8"]),
    ("lm", ["trainer=ddp", "trainer.devices=auto"]),
    ("lm", ["trainer.val_check_interval=0.5", "trainer.check_val_every_n_epoch=1"]),
    ("vit", ["trainer=gpu", "trainer.devices=[0,1]", "trainer.precision=16"])])
def test_overrides_of_interpolated_and_list_defaults_are_accepted(task, args):
    check_command_line(task, args)  # raises a UserError if refused


def test_a_safetensors_file_as_a_checkpoint_is_named_as_one(tmp_path):
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, tmp_path / "model.safetensors")
    with pytest.raises(UserError, match="model.safetensors is a safetensors file; expected an "
                                        "attnkit checkpoint"):
        checkpoints.load_checkpoint(tmp_path / "model.safetensors", "lm")


def test_a_tokenizer_or_file_list_of_the_wrong_kind_is_one_error():
    from data.text import Tokenizer, expand_files
    for bad in (b"not a model", "a string, not bytes"):
        with pytest.raises(UserError, match="the checkpoint's tokenizer is not a sentencepiece"):
            Tokenizer(bad)
    with pytest.raises(UserError, match=r"images=5 is not a path; expected a path or glob"):
        expand_files(5, "images", "image files")


def test_a_run_shorter_than_the_logging_interval_draws_its_training_curve():
    from types import SimpleNamespace

    from tasks.framework.reporting import History

    def steps_recorded(max_steps: int, every: int) -> list[int]:
        history = History()
        for step in range(1, max_steps + 1):
            trainer = SimpleNamespace(global_step=step, log_every_n_steps=every,
                                      max_steps=max_steps,
                                      callback_metrics={"train/loss": torch.tensor(1 / step)})
            history.on_train_batch_end(trainer, None, None, None, step - 1)
        return history.series("train/loss")[0]
    assert steps_recorded(6, 25) == [1, 2, 3, 4, 5, 6]
    assert steps_recorded(40, 25) == [4 * i for i in range(1, 11)]
    assert steps_recorded(1010, 25) == [25 * i for i in range(1, 41)] + [1010]


def test_a_folder_given_for_files_says_so(tmp_path):
    from data.text import expand_files
    (tmp_path / "corpus").mkdir()
    with pytest.raises(UserError, match=r"data.train_files='.*corpus' is a folder; expected a "
                                        r"path or glob of UTF-8 text files \(such as '.*corpus/\*'"):
        expand_files(str(tmp_path / "corpus"), "data.train_files")


def test_a_file_named_with_glob_characters_is_found_by_its_path(tmp_path):
    from data.text import expand_files
    named = tmp_path / "[a] draft.png"
    named.write_bytes(b"x")
    (tmp_path / "a draft.png").write_bytes(b"y")  # what the name matches as a glob
    assert expand_files(str(named), "images") == [named]
    assert expand_files(str(tmp_path / "[a]*.png"), "images") == [tmp_path / "a draft.png"]


def test_a_folder_given_as_a_tokenizer_or_a_text_list_says_so(tmp_path):
    from data.text import Tokenizer
    from tasks.fusion import _as_list
    with pytest.raises(UserError, match=r"tokenizer file .* is a folder; expected a "
                                        r"sentencepiece"):
        Tokenizer.load(tmp_path)
    with pytest.raises(UserError, match=r"texts=.* is a folder; expected a file with one item"):
        _as_list(str(tmp_path), "texts")


def test_text_files_are_read_without_their_byte_order_mark(tmp_path):
    from data.text import read_text
    a, b = tmp_path / "a.txt", tmp_path / "b.txt"
    a.write_bytes(b"\xef\xbb\xbfFirst line\r\n")
    b.write_bytes(b"\xef\xbb\xbfSecond line\n")
    assert read_text([a, b], "data.train") == "First line\nSecond line\n"


def test_a_finished_run_directory_is_not_overwritten(tmp_path):
    assert cli(tmp_path, "lm").returncode == 0
    before = (tmp_path / "run" / "results.json").read_bytes()
    one_line_error(cli(tmp_path, "lm", "seed=7"), "already holds a run (results.json and "
                   "checkpoints); expected a new folder, or resume=auto")
    assert (tmp_path / "run" / "results.json").read_bytes() == before
    assert cli(tmp_path, "lm", "resume=auto", "trainer.max_steps=3").returncode == 0


def test_a_raw_pickle_is_refused_in_one_line(tmp_path):
    victim = tmp_path / "created_by_pickle"
    evil = tmp_path / "evil.ckpt"
    evil.write_bytes(pickle.dumps({"state_dict": _CreatesFile(str(victim))}, protocol=4))
    one_line_error(cli(tmp_path, "lm", f"init_from={evil}"), "not loaded (they could run code)")
    assert not victim.exists()


def test_resume_needs_the_same_model(tmp_path):
    assert cli(tmp_path, "lm").returncode == 0
    last = tmp_path / "run" / "checkpoints" / "last.ckpt"
    proc = cli(tmp_path, "lm", f"resume={last}", "model.embed_dim=48", "trainer.max_steps=3")
    one_line_error(proc, f"resume={last} does not fit this model")
    # the same model, but the token table no longer in a group of its own
    proc = cli(tmp_path, "lm", f"resume={last}", "optimizer.embedding_lr_scale=1",
               "optimizer.embedding_weight_decay=null", "trainer.max_steps=3")
    one_line_error(proc, "was trained with optimizer.embedding_lr_scale=10.0, this run has 1")
    # another optimizer (the ViT and translation defaults moved from AdamW to Muon)
    proc = cli(tmp_path, "lm", f"resume={last}", "optimizer=muon", "trainer.max_steps=3")
    one_line_error(proc, "was trained with the optimizer torch.optim.AdamW, this run has "
                   "tasks.framework.optim.MuonAdamW; expected the optimizer of the run it came "
                   "from (optimizer=adamw)")
    # the same settings in two processes: each step would take twice the data, and the
    # saved position (steps taken) would skip past data never trained on
    proc = cli(tmp_path, "lm", f"resume={last}", "trainer=ddp", "trainer.max_steps=3")
    one_line_error(proc, "was trained in 1 processes (trainer.devices x trainer.num_nodes), "
                   "this run has 2")


def test_a_run_prints_no_advertising(tmp_path):
    proc = cli(tmp_path, "lm", "trainer.val_check_interval=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "litlogger" not in proc.stdout + proc.stderr
    assert "litmodels" not in proc.stdout + proc.stderr
    assert json.loads((tmp_path / "run" / "results.json").read_text())["steps"] == 2


@pytest.mark.parametrize("env,zero", [({"SLURM_PROCID": "1"}, False),
                                       ({"SLURM_PROCID": "0"}, True), ({"RANK": "3"}, False),
                                       ({}, True)])
def test_rank_zero_follows_slurm_and_torchrun(env, zero):
    # Under SLURM only SLURM_PROCID tells the ranks apart before the process group exists.
    clean = {k: v for k, v in os.environ.items()
             if k not in ("RANK", "LOCAL_RANK", "SLURM_PROCID", "JSM_NAMESPACE_RANK")}
    proc = subprocess.run([sys.executable, "-c", "from tasks.framework.runtime import "
                           "is_rank_zero; print(is_rank_zero())"], cwd=ROOT, text=True,
                          capture_output=True, env=clean | env, timeout=120)
    assert proc.stdout.strip() == str(zero), proc.stderr[-1000:]


def test_ema_weights_are_the_recomputed_average(tmp_path, monkeypatch):
    """trainer.ema_decay: a checkpoint's weights (what validation and the closing evaluation
    use) are the exponential average of the weights after each step, recomputed here; the
    trained weights ride along for resuming."""
    from lightning.pytorch.callbacks import Callback

    steps: list[dict] = []

    class Record(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            steps.append({k: v.detach().clone() for k, v in pl_module.state_dict().items()})

    build = runtime.build_trainer
    monkeypatch.setattr(runtime, "build_trainer",
                        lambda *a, **k: build(*a, **k, extra_callbacks=[Record()]))
    decay = 0.6
    lm_task.run(make_cfg(tmp_path, f"trainer.ema_decay={decay}"))
    assert len(steps) == 8
    expect = {k: v.float() for k, v in steps[0].items()}
    for w in steps[1:]:
        expect = {k: decay * expect[k] + (1 - decay) * w[k].float() for k in expect}
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    current = ckpt["current_model_state"]
    for k in expect:
        torch.testing.assert_close(ckpt["state_dict"][k].float(), expect[k], msg=k)
        torch.testing.assert_close(current[k], steps[-1][k], rtol=0, atol=0, msg=k)
    moved = [k for k in expect if not torch.equal(expect[k], steps[-1][k].float())]
    assert moved, "the average equals the last step's weights: nothing was averaged"
    with pytest.raises(UserError, match="trainer.ema_decay=1.5"):
        lm_task.run(make_cfg(tmp_path / "bad", "trainer.ema_decay=1.5"))


def _cpu_flags() -> set[str]:
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return set()
    return next((set(line.split(":", 1)[1].split()) for line in text.splitlines()
                 if line.startswith("flags")), set())


def test_the_bf16_kernel_check_follows_the_cpu_flags():
    """oneDNN's bf16 kernels need AVX512 (BW/VL/DQ) or the AVX bf16 conversions; an
    AVX2-only CPU has none (bf16 products measured at 0.87 GFLOP/s there)."""
    flags = _cpu_flags()
    if "avx2" not in flags:
        pytest.skip("not an x86 CPU with /proc/cpuinfo")
    if {"avx512_bf16", "amx_bf16"} & flags:
        assert runtime.cpu_has_bf16_kernels()
    if not {"avx512bw", "avx_ne_convert", "avx512_bf16", "amx_bf16"} & flags:
        assert not runtime.cpu_has_bf16_kernels()


@pytest.mark.parametrize("precision, kernels, rank, warned", [
    ("bf16-mixed", False, 0, True), ("bf16-true", False, 0, True),
    ("bf16-mixed", True, 0, False), ("32-true", False, 0, False),
    ("bf16-mixed", False, 1, False)])
def test_bf16_on_a_cpu_without_bf16_kernels_is_named_once(tmp_path, monkeypatch, caplog,
                                                          precision, kernels, rank, warned):
    """Named once per run: by rank zero alone, not by every DDP process."""
    from lightning.fabric.utilities.rank_zero import rank_zero_only
    monkeypatch.setattr(runtime, "cpu_has_bf16_kernels", lambda: kernels)
    monkeypatch.setattr(rank_zero_only, "rank", rank)
    cfg = make_cfg(tmp_path, f"trainer.precision={precision}")
    with caplog.at_level(logging.WARNING, logger="attnkit"):
        runtime.build_trainer(cfg, tmp_path, monitor="val/loss")
    lines = [r.getMessage() for r in caplog.records if "no bf16 matrix kernels" in r.getMessage()]
    assert lines == ([f"trainer.precision={precision}: this CPU has no bf16 matrix kernels "
                      "(AVX2 only), so bf16 is emulated and runs many times slower than fp32; "
                      "trainer.precision=32-true is the fast setting here"] if warned else [])


@pytest.mark.parametrize("tie", [False, True])
def test_embedding_group_steps_like_a_separate_optimizer(tie):
    """The embedding tables' own learning rate and decay: one AdamW step over the groups
    equals two AdamW optimizers, one for the tables and one for the rest, run by hand."""
    from omegaconf import OmegaConf

    from modules.lm import CausalLM
    from tasks.framework.optim import configure_optimization

    def model():
        torch.manual_seed(0)
        return CausalLM(vocab_size=50, embed_dim=16, depth=2, num_heads=2, max_seq_len=16,
                        tie_embeddings=tie)
    cfg = OmegaConf.create({"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-2,
                            "weight_decay": 0.1, "embedding_lr_scale": 10.0,
                            "embedding_weight_decay": 0.0, "fused": None})
    sched = OmegaConf.create({"_target_": "tasks.framework.optim.warmup_cosine",
                              "_partial_": True, "warmup_steps": 0, "min_lr_ratio": 0.1})
    ours, ref = model(), model()
    opt = configure_optimization(ours, cfg, sched, total_steps=10)["optimizer"]
    table = ref.embed.weight
    rest = [p for p in ref.parameters() if p is not table]
    ref_opts = [torch.optim.AdamW([table], lr=0.1, weight_decay=0.0),
                torch.optim.AdamW([p for p in rest if p.dim() >= 2], lr=1e-2,
                                  weight_decay=0.1),
                torch.optim.AdamW([p for p in rest if p.dim() < 2], lr=1e-2,
                                  weight_decay=0.0)]
    assert [g["lr"] for g in opt.param_groups][-1] == pytest.approx(0.1)
    assert sum(len(g["params"]) for g in opt.param_groups) == len(list(ours.parameters()))
    tokens = torch.randint(0, 50, (3, 12))
    for m, step in ((ours, [opt.step]), (ref, [o.step for o in ref_opts])):
        for _ in range(2):
            m.zero_grad()
            torch.nn.functional.cross_entropy(m(tokens[:, :-1]).flatten(0, 1),
                                              tokens[:, 1:].flatten()).backward()
            for s in step:
                s()
    for (name, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6, msg=name)
    # the default (scale 1, decay as the matrices) keeps the two groups of before
    cfg.embedding_lr_scale, cfg.embedding_weight_decay = 1.0, None
    assert len(configure_optimization(model(), cfg, sched, 10)["optimizer"].param_groups) == 2


def test_a_multirun_sweep_is_checked_value_by_value_before_anything_launches(tmp_path):
    from tasks.framework.config import _sweep_jobs
    jobs = _sweep_jobs(["optimizer.lr=0.001,0.003", "model.depth=range(1,4)", "+x=a,b", "seed=5"])
    for value in ("optimizer.lr=0.001", "optimizer.lr=0.003", "model.depth=1", "model.depth=2",
                  "model.depth=3", "+x=a", "+x=b"):
        assert any(value in job for job in jobs), value
    assert all(len(job) == 4 and "seed=5" in job for job in jobs)
    sweep = tmp_path / "sweep"
    for args, expect in [
            (["optimizer.lr=1e-3,abc"], "optimizer.lr='abc' is not valid: expected float"),
            (["model.dpth=1,2"], "model.dpth is not a setting of this task; expected model.depth"),
            (["model=lm_tiny,lm_cpux"], "Could not find 'model/lm_cpux'; Available options in "
                                        "'model': fusion_cpu; fusion_tiny; lm_cpu"),
            (["trainer.val_check_interval=10,0"], "trainer.val_check_interval=0 is not valid")]:
        one_line_error(cli(tmp_path, "lm", "-m", *args, f"hydra.sweep.dir={sweep}"), expect)
        assert not sweep.exists()


def test_every_checked_range_names_a_real_setting():
    """A key misspelled in SHARED_RANGES would make its check silently dead."""
    from hydra import compose, initialize_config_dir
    from omegaconf import OmegaConf

    from tasks.framework.config import CONF_DIR, SHARED_CHOICES, SHARED_RANGES
    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        cfgs = [compose(t) for t in ("lm", "vit", "translation", "speech", "fusion")]
    absent = object()
    for key in [k for k, *_ in SHARED_RANGES] + [k for k, _ in SHARED_CHOICES]:
        assert any(OmegaConf.select(c, key, default=absent) is not absent for c in cfgs), key


def test_legitimate_multiruns_are_accepted():
    from tasks.framework.config import _sweep_jobs
    for args in (["model=lm_tiny,lm_cpu", "model.depth=2,3"], ["model=glob(lm_t*)"],
                 ["model=glob(*,exclude=lm_gpu)"], ["prompt='a,b','c'"], ["+foo=a,b"],
                 ["generate.seed=0,1", "seed=range(0,3)"], ["experiment=lm_smoke,lm_gpu"],
                 ["hydra/launcher=slurm_cpu", "optimizer.lr=interval(0.001,0.01)"]):
        check_command_line("lm", ["-m", *args])  # raises a UserError if refused
    assert {j[0] for j in _sweep_jobs(["model=glob(lm_*,exclude=lm_gpu)"])} == {
        "model=lm_cpu", "model=lm_tiny"}


def test_a_training_state_torch_accepts_from_an_older_file_resumes(tmp_path, trained):
    """A ``step`` stored as a number and a parameter group without a newer AdamW setting
    (``decoupled_weight_decay``) are what torch fills in itself."""
    ckpt = torch.load(trained.parent / "last.ckpt", weights_only=True)
    opt = ckpt["optimizer_states"][0]
    for g in opt["param_groups"]:
        g.pop("decoupled_weight_decay", None)
    for s in opt["state"].values():
        s["step"] = float(s["step"])
    old = tmp_path / "old.ckpt"
    torch.save(ckpt, old)
    results = lm_task.run(make_cfg(tmp_path / "run", f"resume={old}", "trainer.max_steps=12"))
    assert results["steps"] == 12


def test_a_training_state_keyed_by_parameter_names_is_matched_by_position():
    """FSDP saves the optimizer state keyed by parameter names, not indices."""
    from omegaconf import OmegaConf

    from tasks.framework.optim import configure_optimization
    model = torch.nn.Sequential(torch.nn.Embedding(5, 4), torch.nn.Linear(4, 3))
    opt_cfg = OmegaConf.create({"_target_": "torch.optim.AdamW", "_partial_": True, "lr": 1e-3})
    sched_cfg = OmegaConf.create({"_target_": "tasks.framework.optim.warmup_cosine",
                                  "_partial_": True, "warmup_steps": 1})

    def optimization():
        return configure_optimization(model, opt_cfg, sched_cfg, 10)

    first = optimization()
    model(torch.tensor([1, 2])).sum().backward()
    first["optimizer"].step()
    first["lr_scheduler"]["scheduler"].step()
    state = first["optimizer"].state_dict()
    names = {i: f"param{i}" for i in state["state"]}  # as FSDP's names stand in for indices
    state["state"] = {names[i]: s for i, s in state["state"].items()}
    for g in state["param_groups"]:
        g["params"] = [names[i] for i in g["params"]]
    ckpt = {"optimizer_states": [state], "loops": {},
            "lr_schedulers": [first["lr_scheduler"]["scheduler"].state_dict()]}
    fresh = optimization()
    checkpoints.check_training_state(ckpt, "x.ckpt", fresh["optimizer"],
                                     fresh["lr_scheduler"]["scheduler"])
    assert len(fresh["optimizer"].state) == 3
    params = [p for g in fresh["optimizer"].param_groups for p in g["params"]]
    linear = names[next(i for i, p in enumerate(params) if p.shape == (3, 4))]
    state["state"][linear]["exp_avg"] = torch.zeros(4, 4)
    fresh = optimization()
    with pytest.raises(UserError, match=rf"exp_avg of parameter {linear} has shape \(4, 4\), "
                                        r"the parameter \(3, 4\)"):
        checkpoints.check_training_state(ckpt, "x.ckpt", fresh["optimizer"],
                                         fresh["lr_scheduler"]["scheduler"])


def test_a_number_given_for_text_says_to_quote_it():
    with pytest.raises(UserError, match=r"prompt=5 is not valid: expected str like the default "
                                        r"'ROMEO:' \(text that reads as a number goes in quotes"):
        check_command_line("lm", ["prompt=5"])
    check_command_line("lm", ['prompt="5"'])  # quoted, it is text


def test_run_dir_holds_hydras_record_and_a_mode_keeps_the_runs(tmp_path):
    """``run_dir=`` is Hydra's output folder too: no second folder under ``outputs/`` in the
    working directory, and the config record sits beside the results; a mode run in that
    folder writes its record beside the training run's, not over it."""
    env = dict(os.environ, ATTNKIT_DATA=str(tmp_path / "cache"), PYTHONPATH=str(ROOT))
    work, run = tmp_path / "work", tmp_path / "run"
    work.mkdir()

    def cli_in(*args):
        return subprocess.run([sys.executable, "-m", "tasks.lm", "model=lm_tiny", "data=tiny_text",
                               f"data.train_files={CORPUS}", f"run_dir={run}", *args], cwd=work,
                              capture_output=True, text=True, env=env, timeout=300)

    proc = cli_in("trainer.max_steps=2", "trainer.val_check_interval=2")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert not (work / "outputs").exists() and (run / "results.json").is_file()
    record = (run / ".hydra" / "config.yaml").read_bytes()
    assert b"max_steps: 2" in record
    proc = cli_in("mode=generate", f"ckpt={run / 'checkpoints' / 'last.ckpt'}",
                  "generate.max_new_tokens=4")
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert (run / ".hydra" / "config.yaml").read_bytes() == record
    assert b"mode: generate" in (run / ".hydra-generate" / "config.yaml").read_bytes()
    assert (run / "generate.json").is_file() and not (work / "outputs").exists()
