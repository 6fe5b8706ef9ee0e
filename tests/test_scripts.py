"""The benchmark scripts' shared timing and their command lines."""

from __future__ import annotations

import statistics
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))

from timing import Timing  # noqa: E402

SCRIPTS = sorted(p.name for p in (ROOT / "scripts").glob("*.py") if p.name != "timing.py")


def test_paired_quartiles_stay_within_the_measured_ratios():
    """Two or one repeats: the quartiles are the measured ratios' own range (the default
    quartile method extrapolated past two points, down to negative ratios)."""
    two = Timing({"peer": [1.0, 4.0], "ours": [2.0, 2.0]})
    assert two.paired("peer", "ours") == (0.5, 1.25, 2.0)
    one = Timing({"peer": [3.0], "ours": [2.0]})
    assert one.paired("peer", "ours") == (1.5, 1.5, 1.5)
    many = Timing({"peer": [1.0, 2.0, 3.0, 4.0, 5.0], "ours": [1.0] * 5})
    assert many.paired("peer", "ours") == tuple(statistics.quantiles([1, 2, 3, 4, 5], n=4))


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_shows_the_whole_description(script):
    doc = (ROOT / "scripts" / script).read_text().split('"""')[1]
    first_paragraph = " ".join(doc.split("\n\n")[0].split())
    proc = subprocess.run([sys.executable, f"scripts/{script}", "--help"], cwd=ROOT,
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert first_paragraph in " ".join(proc.stdout.split())
