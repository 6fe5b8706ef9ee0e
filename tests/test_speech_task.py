"""The speech task end to end on a tiny data set in the user format (WAV + JSONL): training,
results and pictures, transcription, keyword spotting, and the one-line errors."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from data.speech import write_wav
from data.text import Tokenizer
from tasks import speech as speech_task
from tasks.framework.errors import UserError
from tests.taskrun import run_task

ROOT = Path(__file__).resolve().parents[1]
WORDS = ["yes", "no", "up", "down"]


@pytest.fixture(autouse=True)
def data_cache(tmp_path_factory, monkeypatch):
    monkeypatch.setenv("ATTNKIT_DATA", str(tmp_path_factory.getbasetemp() / "data-cache"))


def _tone(word: str, i: int, seconds: float) -> torch.Tensor:
    """A word as a chord whose pitches depend on the word: learnable, and quick to make."""
    t = torch.arange(int(16000 * seconds)) / 16000
    base = 200 + 150 * WORDS.index(word) + 7 * i
    return 0.3 * sum(torch.sin(2 * math.pi * base * k * t) for k in (1, 2, 3)) / 3


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    root = tmp_path_factory.mktemp("speech")
    for split, n in (("train", 24), ("val", 8), ("test", 8)):
        lines = []
        for i in range(n):
            word = WORDS[i % len(WORDS)]
            wav = root / split / f"{i}.wav"
            wav.parent.mkdir(parents=True, exist_ok=True)
            write_wav(wav, _tone(word, i, 0.6 + 0.05 * (i % 5)))
            voice = {"voice": f"v{i % 2}"} if split == "test" else {}  # two speakers
            lines.append(json.dumps({"audio": f"{split}/{i}.wav", "text": word} | voice))
        (root / f"{split}.jsonl").write_text("\n".join(lines) + "\n")
    (root / "broken.wav").write_bytes(b"not audio at all")
    return root


def make_cfg(run_dir, corpus, *overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("speech", overrides=[
            "model=speech_tiny", f"data.train={corpus}/train.jsonl",
            f"data.val={corpus}/val.jsonl",
            f"data.test={{test: {corpus}/test.jsonl}}",  # the README's form
            "data.max_frames_per_batch=2000", "trainer.max_steps=6",
            "trainer.val_check_interval=3", "trainer.log_every_n_steps=1",
            "scheduler.warmup_steps=1", "decode.beam_size=4", f"run_dir={run_dir}", *overrides])


def test_ctc_train_results_pictures_and_transcribe(tmp_path, corpus, saved_figures, saved_axes,
                                                   capsys):
    res = speech_task.run(make_cfg(tmp_path, corpus))
    saved = json.loads((tmp_path / "results.json").read_text())
    assert saved["steps"] == 6 and saved["labels"] == "chars"
    assert saved["utterances"] == {"train": 24, "val": 8, "test": 8}
    for name in ("val", "test"):
        f = saved[name]
        assert set(f) >= {"greedy", "beam", "utterances"}
        assert 0 <= f["greedy"]["cer"] and 0 <= f["beam"]["cer"]
    assert saved["text_normalizer"]
    # the beam fuses a character 8-gram of the four distinct training transcripts
    assert saved["lm"]["order"] == 8 and saved["lm"]["sentences"] == 4
    assert saved["lm"]["characters"] == len("down" "no" "up" "yes")
    ckpt_meta = torch.load(tmp_path / "checkpoints" / "best.ckpt", weights_only=True)
    assert ckpt_meta["attnkit"]["lm_text"] == "down\nno\nup\nyes"  # training transcripts
    for name in ("loss_curves.png", "val_cer.png", "utterance.png",
                 "checkpoints/best.ckpt"):
        assert (tmp_path / name).is_file(), name
    assert {k: v for k, v in saved_figures.items() if v} == {}  # no title on an image
    assert [(x, y) for x, y, _ in saved_axes["utterance.png"]] == [
        ("feature frame (10 ms)", "mel bin"), ("encoder frame (40 ms)", "output label")]
    assert res["test"] == saved["test"]
    ckpt = tmp_path / "checkpoints" / "best.ckpt"
    out = speech_task.run(make_cfg(tmp_path / "s1", corpus, "mode=transcribe", f"ckpt={ckpt}",
                                   f"audio={corpus}/test/*.wav"))
    assert len(out["transcripts"]) == 8 and not out["skipped"]
    assert json.loads((tmp_path / "s1" / "transcribe.json").read_text()) == out
    # the test set by voice (its manifest names two) equals the files transcribed one by one
    lines = {str(corpus / x["audio"]): x for x in map(json.loads, (
        corpus / "test.jsonl").read_text().splitlines())}
    for voice in ("v0", "v1"):
        got = [t for t in out["transcripts"] if lines[t["file"]]["voice"] == voice]
        want = speech_task.error_rates([t["text"] for t in got],
                                       [lines[t["file"]]["text"] for t in got])
        assert saved["test"]["by_voice"][voice] == want | {"utterances": 4}
    assert "by_voice" not in saved["val"]  # its manifest names no voice
    out = speech_task.run(make_cfg(tmp_path / "s2", corpus, "mode=transcribe", f"ckpt={ckpt}",
                                   f"audio=[{corpus}/broken.wav,{corpus}/test/0.wav]"))
    assert len(out["transcripts"]) == 1 and "broken.wav" in out["skipped"][0]["reason"]
    assert f"{corpus}/broken.wav: skipped, " in capsys.readouterr().out  # each one named
    with pytest.raises(UserError, match=r"none of the 1 files could be read .*broken.wav"):
        speech_task.run(make_cfg(tmp_path / "s3", corpus, "mode=transcribe", f"ckpt={ckpt}",
                                 f"audio={corpus}/broken.wav"))
    with pytest.raises(UserError, match="broken.wav"):
        speech_task.run(make_cfg(tmp_path / "s4", corpus, "mode=transcribe", f"ckpt={ckpt}",
                                 f"audio={corpus}/broken.wav", "data.on_bad_audio=error"))


def test_hypotheses_are_scored_with_the_references_whitespace():
    labels = speech_task.Labels("chars")
    space = labels.encode("a b")[1]
    # a CTC path may emit a space first, last, or twice with a blank between them
    ids = [space, *labels.encode("hi"), space, 0, space, *labels.encode("there"), space]
    assert labels.decode(ids) == "hi there"
    assert speech_task.error_rates([labels.decode(ids)], ["hi there"]) == {"cer": 0.0,
                                                                          "wer": 0.0}


def test_every_evaluation_utterance_is_scored(tmp_path, corpus):
    from data.speech import load_audio
    from modules.speech import LogMel
    frames = [len(LogMel()(load_audio(corpus / "test" / f"{i}.wav"))) for i in range(8)]
    limit = sorted(frames)[4]  # the longest test utterances do not fit the model
    long = [WORDS[i % 4] for i in range(8) if frames[i] > limit]
    assert 0 < len(long) < 8
    res = speech_task.run(make_cfg(tmp_path / "ctc", corpus, f"data.max_frames={limit}",
                                   "decode.beam_size=1"))
    assert res["dropped"]["too_long_scored_as_errors"]["test"] == len(long)
    test = res["test"]
    assert test["utterances"] == 8
    # each too-long utterance is every one of its characters deleted
    refs = sum(len(WORDS[i % 4]) for i in range(8))
    assert test["greedy"]["cer"] >= round(sum(map(len, long)) / refs, 4)
    assert sum(v["utterances"] for v in test["by_voice"].values()) == 8
    res = speech_task.run(make_cfg(tmp_path / "kws", corpus, f"data.max_frames={limit}",
                                   "model.head=classify"))
    test = res["test"]
    assert test["utterances"] == 8 and test["accuracy"] <= (8 - len(long)) / 8
    assert sum(map(sum, test["confusion"])) == 8 - len(long)  # classified ones only


def test_transcribe_any_rate_and_stereo(tmp_path, corpus):
    """A 44.1 kHz stereo file transcribes as its 16 kHz mono original does."""
    import wave

    import torchaudio
    speech_task.run(make_cfg(tmp_path / "run", corpus, "trainer.max_steps=2"))
    ckpt = tmp_path / "run" / "checkpoints" / "last.ckpt"
    mono = _tone("up", 1, 0.8)
    hi = torchaudio.functional.resample(mono, 16000, 44100)
    pcm = (hi.clamp(-1, 1) * 32767).round().to(torch.int16)
    with wave.open(str(tmp_path / "stereo.wav"), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(2)
        w.setframerate(44100)
        w.writeframes(torch.stack([pcm, pcm], 1).numpy().tobytes())
    write_wav(tmp_path / "mono.wav", mono)
    a = speech_task.run(make_cfg(tmp_path / "a", corpus, "mode=transcribe", f"ckpt={ckpt}",
                                 f"audio={tmp_path}/stereo.wav", "decode.beam_size=1"))
    b = speech_task.run(make_cfg(tmp_path / "b", corpus, "mode=transcribe", f"ckpt={ckpt}",
                                 f"audio={tmp_path}/mono.wav", "decode.beam_size=1"))
    assert len(a["transcripts"]) == 1
    assert a["transcripts"][0]["text"] == b["transcripts"][0]["text"]


def test_keyword_spotting_learns_and_draws_its_confusion(tmp_path, corpus, saved_figures):
    res = speech_task.run(make_cfg(tmp_path, corpus, "model.head=classify",
                                   "trainer.max_steps=30", "trainer.val_check_interval=15",
                                   "optimizer.lr=3e-3"))
    assert res["test"]["accuracy"] >= 0.75, res["test"]  # chance is 0.25
    by = res["test"]["by_voice"]
    assert sum(v["accuracy"] * v["utterances"] for v in by.values()) == pytest.approx(
        res["test"]["accuracy"] * 8) and sum(v["utterances"] for v in by.values()) == 8
    assert len(res["test"]["confusion"]) == 4
    assert (tmp_path / "confusion_test.png").is_file() and saved_figures["confusion_test.png"] == []
    # fine-tuning with "up" renamed "stop": the other keywords keep their rows of the head
    renamed = tmp_path / "renamed"
    renamed.mkdir()
    for split in ("train", "val", "test"):
        rows = [json.loads(r) for r in (corpus / f"{split}.jsonl").read_text().splitlines()]
        (renamed / f"{split}.jsonl").write_text("".join(json.dumps(dict(
            r, audio=str(corpus / r["audio"]), text={"up": "stop"}.get(r["text"], r["text"])))
            + "\n" for r in rows))
    ckpt = tmp_path / "checkpoints" / "best.ckpt"
    speech_task.run(make_cfg(tmp_path / "tuned", renamed, "model.head=classify",
                             f"init_from={ckpt}", "trainer.max_steps=1", "optimizer.lr=1e-9"))
    old = torch.load(ckpt, weights_only=True)
    new = torch.load(tmp_path / "tuned" / "checkpoints" / "last.ckpt", weights_only=True)
    assert old["attnkit"]["classes"] == ["down", "no", "up", "yes"]
    assert new["attnkit"]["classes"] == ["down", "no", "stop", "yes"]
    w0, w1 = old["state_dict"]["model.head.weight"], new["state_dict"]["model.head.weight"]
    assert torch.allclose(w1[[0, 1, 3]], w0[[0, 1, 3]], atol=1e-6)
    assert not torch.allclose(w1[2], w0[2], atol=1e-3)  # "stop" is not "up"


def test_conformer_block_and_sentencepiece_units_train(tmp_path, corpus):
    # sentencepiece needs varied text: the same audio with sonnet lines as transcripts
    lines = [ln.strip() for ln in (ROOT / "tests/fixtures/sonnets.txt").read_text().splitlines()
             if len(ln.split()) >= 6][:40]
    for split in ("train", "val"):
        rows = [json.loads(r) for r in (corpus / f"{split}.jsonl").read_text().splitlines()]
        rows = [dict(r, text=" ".join(lines[i % len(lines)].split()[:2]))
                for i, r in enumerate(rows * 2)]
        (tmp_path / f"{split}.jsonl").write_text(
            "\n".join(json.dumps(dict(r, audio=str(corpus / r["audio"]))) for r in rows))
    res = speech_task.run(make_cfg(tmp_path, corpus, "model.block=conformer",
                                   f"data.train={tmp_path}/train.jsonl",
                                   f"data.val={tmp_path}/val.jsonl", "data.max_frames=1200",
                                   "data.units=sentencepiece", "data.vocab_size=300",
                                   "trainer.max_steps=2", "trainer.val_check_interval=2"))
    assert res["labels"] == "sentencepiece" and math.isfinite(res["val_loss"])
    # fine-tuning keeps the checkpoint's pieces (its output rows stand for them), whatever
    # vocabulary the config would train
    ckpt = tmp_path / "checkpoints" / "last.ckpt"
    tuned = tmp_path / "tuned"
    res = speech_task.run(make_cfg(tuned, corpus, "model.block=conformer",
                                   f"data.train={tmp_path}/train.jsonl",
                                   f"data.val={tmp_path}/val.jsonl", "data.max_frames=1200",
                                   "data.units=sentencepiece", "data.vocab_size=320",
                                   f"init_from={ckpt}", "trainer.max_steps=1"))
    assert res["init_from"]["loaded"] > 0 and not res["init_from"]["missing"]
    spm = [torch.load(p / "checkpoints" / "last.ckpt", weights_only=True)["attnkit"]["spm"]
           for p in (tmp_path, tuned)]
    assert spm[0] == spm[1] and Tokenizer(spm[1]).vocab_size == 300


def cli(tmp_path, corpus, *args):
    env = dict(os.environ, ATTNKIT_DATA=str(tmp_path / "cache"))
    base = ["model=speech_tiny", f"data.train={corpus}/train.jsonl",
            f"data.val={corpus}/val.jsonl", "trainer.max_steps=2",
            f"run_dir={tmp_path / 'run'}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    return run_task("tasks.speech", [*base, *args], env=env, timeout=300)


@pytest.mark.parametrize("args,expect", [
    (["data.train=/nonexistent.jsonl"], "/nonexistent.jsonl does not exist"),
    (["model.head=rnnt"], "head='rnnt'"),
    (["data.units=phones"], "data.units='phones'"),
    (["mode=transcribe", "ckpt=/nonexistent.ckpt", "audio=x.wav"],
     "checkpoint /nonexistent.ckpt does not exist"),
    (["decode.lm_text=/nonexistent.txt"], "decode.lm_text=/nonexistent.txt is not a file"),
    (["decode.lm_text=/tmp"], "decode.lm_text=/tmp is not a file"),
    (["model.head=classify", "decode.lm_text=x.txt"], "null for keyword spotting"),
    (["decode.lm_bonus=nan"], "decode.lm_bonus=nan is not valid"),
    (["decode.lm_order=-1"], "decode.lm_order=-1 is not valid"),
    (["decode.lm_weight=-0.5"], "decode.lm_weight=-0.5 is not valid"),
])
def test_bad_input_is_one_clear_line(tmp_path, corpus, args, expect):
    proc = cli(tmp_path, corpus, *args)
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and expect in err[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_a_keyword_no_training_utterance_has_is_named(tmp_path, corpus):
    val = json.loads((corpus / "val.jsonl").read_text().splitlines()[0])
    (tmp_path / "val.jsonl").write_text(json.dumps(val | {
        "audio": str(corpus / val["audio"]), "text": "banana"}) + "\n")
    proc = cli(tmp_path, corpus, "model.head=classify", f"data.val={tmp_path / 'val.jsonl'}")
    assert proc.returncode == 2, proc.stderr[-2000:]
    err = proc.stderr.strip().splitlines()
    assert err[-1].startswith("error: ") and "has the label 'banana', which no training " \
        "utterance has" in err[-1], proc.stderr[-2000:]
    assert "Traceback" not in proc.stderr


def test_init_from_and_resume(tmp_path, corpus):
    """Fine-tuning from a speech checkpoint, and resume=auto finishing an extended run."""
    first = tmp_path / "first"
    speech_task.run(make_cfg(first, corpus, "trainer.max_steps=3"))
    ckpt = first / "checkpoints" / "last.ckpt"
    res = speech_task.run(make_cfg(tmp_path / "tuned", corpus, f"init_from={ckpt}",
                                   "optimizer.lr=1e-4", "trainer.max_steps=2"))
    assert res["init_from"]["loaded"] > 0 and not res["init_from"]["missing"]
    with pytest.raises(UserError, match="differ in shape"):
        speech_task.run(make_cfg(tmp_path / "bad", corpus, f"init_from={ckpt}",
                                 "model.embed_dim=48", "model.num_heads=2"))
    # the same run on a training manifest without its last utterance: other data
    fewer = tmp_path / "fewer.jsonl"
    rows = [json.loads(line) for line in (corpus / "train.jsonl").read_text().splitlines()]
    fewer.write_text("".join(json.dumps(r | {"audio": str(corpus / r["audio"])}) + "\n"
                             for r in rows[:-1]))
    with pytest.raises(UserError, match="was trained on another split of the data"):
        speech_task.run(make_cfg(first, corpus, "resume=auto", "trainer.max_steps=6",
                                 f"data.train={fewer}"))
    res = speech_task.run(make_cfg(first, corpus, "resume=auto", "trainer.max_steps=6"))
    assert res["steps"] == 6


@pytest.mark.slow
def test_ddp_two_processes_train_and_evaluate_once(tmp_path, corpus):
    env = dict(os.environ, ATTNKIT_DATA=str(tmp_path / "cache"))
    out = tmp_path / "outputs"
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.speech", "model=speech_tiny", "trainer=ddp",
         f"data.train={corpus}/train.jsonl", f"data.val={corpus}/val.jsonl",
         f"+data.test.test={corpus}/test.jsonl", "data.max_frames=200",
         "data.max_frames_per_batch=400",
         "trainer.max_steps=4", "trainer.val_check_interval=2", f"hydra.run.dir={out}/run"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert sorted(p.name for p in out.iterdir()) == ["run"]
    res = json.loads((out / "run" / "results.json").read_text())
    assert res["steps"] == 4 and res["test"]["utterances"] == 8


def test_features_from_worker_processes_hold_no_open_file(tmp_path, monkeypatch):
    """The feature workers' results come back as plain arrays: returned as tensors, each
    held a shared-memory file open in this process, and a manifest with more utterances
    than the open-file limit hung the run."""
    import resource

    from omegaconf import OmegaConf

    from data.speech import Utterance, load_audio, write_manifest
    from modules.speech import LogMel
    n = 300
    gen = torch.Generator().manual_seed(0)
    for i in range(n):
        write_wav(tmp_path / f"{i}.wav", 0.1 * torch.randn(1600, generator=gen))
    write_manifest(tmp_path / "m.jsonl", [Utterance(tmp_path / f"{i}.wav", 0.1, "a b")
                                          for i in range(n)])
    cfg = OmegaConf.create({"seed": 0, "data": {"on_bad_audio": "error", "n_mels": 40,
                                                "num_feature_workers": 2}})
    monkeypatch.setenv("ATTNKIT_DATA", str(tmp_path / "cache"))
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    # fewer files may be opened than there are utterances
    resource.setrlimit(resource.RLIMIT_NOFILE, (len(os.listdir("/proc/self/fd")) + 150, hard))
    try:
        feats, texts, _, skipped = speech_task._features(tmp_path / "m.jsonl", cfg)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert len(feats) == len(texts) == n and skipped == 0
    for i in (0, 7, n - 1):  # equal to the features computed here
        assert torch.equal(feats[i], LogMel(n_mels=40)(load_audio(tmp_path / f"{i}.wav")).half())


def test_narrowband_share_of_training_features(tmp_path, monkeypatch):
    """data.narrowband: that share of the training utterances (drawn by the seed) has the
    features of its audio with nothing above 4 kHz; the rest are untouched."""
    from omegaconf import OmegaConf

    from data.speech import Utterance, load_audio, narrowband, write_manifest
    from modules.speech import LogMel
    t = torch.arange(16000) / 16000
    for i in range(40):  # a 1 kHz tone and a 6 kHz tone
        write_wav(tmp_path / f"{i}.wav", 0.3 * torch.sin(2 * math.pi * 1000 * t)
                  + 0.3 * torch.sin(2 * math.pi * 6000 * t) + 0.01 * torch.randn(16000))
    write_manifest(tmp_path / "m.jsonl", [Utterance(tmp_path / f"{i}.wav", 1.0, "a b")
                                          for i in range(40)])
    clip = load_audio(tmp_path / "0.wav")
    spec = torch.fft.rfft(narrowband(clip)).abs()  # 1 Hz bins: 1 s of audio
    assert narrowband(clip).shape == clip.shape
    assert spec[1000] > 0.5 * torch.fft.rfft(clip).abs()[1000]
    assert spec[4200:].max() < 1e-3 * spec[1000]
    monkeypatch.setenv("ATTNKIT_DATA", str(tmp_path / "cache"))
    fe = LogMel(n_mels=40)
    cfg = OmegaConf.create({"seed": 0, "data": {"on_bad_audio": "error", "n_mels": 40,
                                                "num_feature_workers": 1}})
    plain, *_ = speech_task._features(tmp_path / "m.jsonl", cfg)
    mixed, *_ = speech_task._features(tmp_path / "m.jsonl", cfg, narrow=0.5)
    again, *_ = speech_task._features(tmp_path / "m.jsonl", cfg, narrow=0.5)  # the cache
    other, *_ = speech_task._features(tmp_path / "m.jsonl", OmegaConf.merge(cfg, {"seed": 1}),
                                      narrow=0.5)
    narrow = [i for i in range(40) if not torch.equal(plain[i], mixed[i])]
    assert narrow != [i for i in range(40) if not torch.equal(plain[i], other[i])]
    assert 10 <= len(narrow) <= 30 and all(torch.equal(a, b) for a, b in zip(mixed, again))
    for i in range(40):
        audio = load_audio(tmp_path / f"{i}.wav")
        want = fe(narrowband(audio) if i in narrow else audio).half()
        assert torch.equal(mixed[i], want) and torch.equal(plain[i], fe(audio).half())


def test_figures_by_voice_follow_the_utterances(tmp_path, corpus, monkeypatch):
    """Evaluation runs in length-sorted batches; each voice's figures come from its own
    utterances. Hypotheses right for v0's words and empty for v1's give v0 CER 0 and v1
    CER 1 only if every voice stays with its utterance."""
    real = speech_task.transcribe_batches

    def v0_right(module, loader, beam_size, lm=None):
        # the beam fuses the n-gram of the checkpoint's transcripts; no n-gram for keywords
        assert (lm.lm.sentences == 4) if module.ctc else lm is None
        res = real(module, loader, beam_size, lm)
        if not module.ctc:  # right for v0's words (even utterances: yes, up)
            keep = {module.labels.classes.index(w) for w in ("yes", "up")}
            res["pred"] = [t if t in keep else (t + 1) % 4 for t in res["true"]]
            return res
        hyps = [r if r in ("yes", "up") else "" for r in res["refs"]]
        return res | {"greedy": hyps, "beam": hyps}

    monkeypatch.setattr(speech_task, "transcribe_batches", v0_right)
    res = speech_task.run(make_cfg(tmp_path / "ctc", corpus, "trainer.max_steps=2"))
    by = res["test"]["by_voice"]
    assert by["v0"] == {"cer": 0.0, "wer": 0.0, "utterances": 4}
    assert by["v1"] == {"cer": 1.0, "wer": 1.0, "utterances": 4}
    res = speech_task.run(make_cfg(tmp_path / "kws", corpus, "trainer.max_steps=2",
                                   "model.head=classify"))
    assert res["test"]["by_voice"] == {"v0": {"accuracy": 1.0, "utterances": 4},
                                       "v1": {"accuracy": 0.0, "utterances": 4}}


def test_lm_reads_the_distinct_transcripts_and_the_given_lines(tmp_path, monkeypatch):
    from omegaconf import OmegaConf
    assert speech_task.lm_sentences(["Yes!", "yes", "no", "?"]) == "no\nyes"
    extra = tmp_path / "more.txt"
    extra.write_text("Up there!\n\nno\n")
    settings = {"lm_order": 3, "beam_size": 4, "lm_weight": 1.0, "lm_bonus": 0.0,
                "lm_text": str(extra)}
    decode = OmegaConf.create(settings)
    lm = speech_task.language_model(speech_task.Labels("chars"), "no\nyes", decode)
    assert (lm.lm.sentences, lm.lm.characters) == (3, len("no" "up there" "yes"))
    assert speech_task.language_model(speech_task.Labels("chars"), "",
                                      OmegaConf.create(settings | {"lm_text": None})) is None
    assert speech_task.language_model(speech_task.Labels("chars"), "no",
                                      OmegaConf.create(settings | {"beam_size": 1})) is None
    blank = tmp_path / "blank.txt"  # nothing a transcript could hold: an error, not no LM
    blank.write_text("\n 1234 \n\n")
    with pytest.raises(UserError, match=r"decode.lm_text=.*blank.txt holds no words"):
        speech_task.language_model(speech_task.Labels("chars"), "no",
                                   OmegaConf.create(settings | {"lm_text": str(blank)}))
    # text too big for the memory is one line naming the order and the size
    with monkeypatch.context() as m, pytest.raises(
            UserError, match=r"decode.lm_order=3 over 13 characters .* GiB"):
        m.setattr(speech_task, "available_memory", lambda: 4000)
        speech_task.language_model(speech_task.Labels("chars"), "no\nyes", decode)
    extra.write_bytes(b"caf\xe9\n")
    with pytest.raises(UserError, match="is not UTF-8"):
        speech_task.language_model(speech_task.Labels("chars"), "no", decode)


def test_label_pieces_spell_the_text_for_the_lm():
    """The LM reads a label sequence as its pieces joined: for sentencepiece ids that is the
    decoded text with the word-start space in front, for characters the text itself."""
    from data.text import Tokenizer
    lines = [" ".join(ln.lower().split()) for ln in
             (ROOT / "tests/fixtures/sonnets.txt").read_text().splitlines() if ln.strip()][:400]
    lines = [speech_task.normalize_text(ln) for ln in lines]
    for labels in (speech_task.Labels("chars"),
                   speech_task.Labels("sentencepiece",
                                      spm=Tokenizer.train("\n".join(lines), 300).proto)):
        pieces = labels.pieces()
        assert len(pieces) == labels.size
        for ln in lines[:50]:
            ids = labels.encode(ln)
            assert "".join(pieces[i] for i in ids).strip() == labels.decode(ids) == ln
