"""The installed environment: every package the tests use imports, and the torch trio
matches. A broken pair (e.g. a torchaudio build for another torch) fails here first, with
the package named, instead of deep inside another test."""

from __future__ import annotations

import importlib
import math

import pytest
import torch

# Every third-party package the code or the tests import (module name, pip name).
PACKAGES = [
    ("torchaudio", "torchaudio"), ("torchvision", "torchvision"), ("lightning", "lightning"),
    ("hydra", "hydra-core"), ("sentencepiece", "sentencepiece"),
    ("torchmetrics", "torchmetrics"), ("sacrebleu", "sacrebleu"), ("pysword", "pysword"),
    ("safetensors", "safetensors"), ("matplotlib", "matplotlib"), ("rich", "rich"),
    ("numpy", "numpy"), ("PIL", "pillow"), ("transformers", "transformers"),
    ("timm", "timm"), ("open_clip", "open_clip_torch"),
    ("hydra_plugins.hydra_submitit_launcher", "hydra-submitit-launcher"),
    ("espeakng_loader", "espeakng-loader"),
]


@pytest.mark.parametrize("module,package", PACKAGES, ids=[p for _, p in PACKAGES])
def test_package_imports(module, package):
    try:
        importlib.import_module(module)
    except Exception as exc:  # an ImportError, or an OSError from a shared library
        pytest.fail(f"{package} does not import ({type(exc).__name__}: {exc}); reinstall "
                    f"with `make setup` (pinned versions in constraints.txt) or refresh the "
                    f"pins with `make lock`")


def _minor(version: str) -> tuple[int, int]:
    major, minor = version.split("+")[0].split(".")[:2]
    return int(major), int(minor)


def test_torch_trio_is_one_release():
    import torchaudio
    import torchvision
    t, a, v = _minor(torch.__version__), _minor(torchaudio.__version__), \
        _minor(torchvision.__version__)
    assert a == t, f"torchaudio {torchaudio.__version__} is not built for torch {torch.__version__}"
    # torchvision 0.(N+15) goes with torch 2.N
    assert v == (0, t[1] + 15), (f"torchvision {torchvision.__version__} is not the release "
                                 f"for torch {torch.__version__}")


def _hz_to_mel(f):
    return 2595.0 * math.log10(1.0 + f / 700.0)


def test_torchaudio_filterbank_matches_the_htk_formula():
    """torchaudio's mel filterbank against triangular HTK filters written out here."""
    import torchaudio
    n_freqs, n_mels, sr = 201, 20, 16000
    fb = torchaudio.functional.melscale_fbanks(n_freqs, 0.0, sr / 2, n_mels, sr,
                                               norm=None, mel_scale="htk")
    assert fb.shape == (n_freqs, n_mels)
    mel_pts = [_hz_to_mel(0) + i * (_hz_to_mel(sr / 2) - _hz_to_mel(0)) / (n_mels + 1)
               for i in range(n_mels + 2)]
    hz_pts = [700.0 * (10 ** (m / 2595.0) - 1.0) for m in mel_pts]
    freqs = [i * (sr / 2) / (n_freqs - 1) for i in range(n_freqs)]
    ref = torch.zeros(n_freqs, n_mels, dtype=torch.float64)
    for m in range(n_mels):
        lo, mid, hi = hz_pts[m], hz_pts[m + 1], hz_pts[m + 2]
        for i, f in enumerate(freqs):
            ref[i, m] = max(0.0, min((f - lo) / (mid - lo), (hi - f) / (hi - mid)))
    torch.testing.assert_close(fb.double(), ref, atol=1e-5, rtol=1e-4)


def test_torchaudio_fbank_of_a_tone_peaks_at_its_frequency():
    import torchaudio
    sr, hz = 16000, 1000.0
    t = torch.arange(sr) / sr
    wave = torch.sin(2 * math.pi * hz * t)[None]
    feats = torchaudio.compliance.kaldi.fbank(wave, num_mel_bins=40, sample_frequency=sr)
    assert feats.shape[1] == 40 and feats.shape[0] > 90
    # Bin centres on the Kaldi mel scale (1127 ln(1 + f/700)) between 20 Hz and Nyquist.
    lo, hi = 1127 * math.log1p(20 / 700), 1127 * math.log1p(8000 / 700)
    centres = [700 * (math.exp((lo + (i + 1) * (hi - lo) / 41) / 1127) - 1) for i in range(40)]
    expected = min(range(40), key=lambda i: abs(centres[i] - hz))
    peak = int(feats.mean(0).argmax())
    assert abs(peak - expected) <= 1, (peak, expected)
