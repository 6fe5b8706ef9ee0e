import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# Keep the two-core machine responsive and runs repeatable.
torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def covered_texts(fig) -> list[str]:
    """Titles and texts of a drawn figure that lie on another axes' image."""
    renderer = fig.canvas.get_renderer()
    found = []
    for ax in fig.axes:
        texts = [t for t in (ax.title, *ax.texts) if t.get_text()]
        for other in fig.axes:
            if other is ax:
                continue
            for img in other.images:
                box = img.get_window_extent(renderer)
                found += [t.get_text() for t in texts
                          if t.get_window_extent(renderer).overlaps(box)]
    return found


@pytest.fixture
def saved_figures(monkeypatch):
    """{file name: texts covering another axes' image} for each figure saved in the test."""
    from matplotlib.figure import Figure
    figures = {}
    save = Figure.savefig

    def record(fig, path, *args, **kwargs):
        save(fig, path, *args, **kwargs)  # draws the figure with its final layout
        figures[Path(path).name] = covered_texts(fig)

    monkeypatch.setattr(Figure, "savefig", record)
    return figures


@pytest.fixture
def saved_axes(monkeypatch):
    """{file name: [(x label, y label, x tick labels that run into each other)]} of each
    axes holding an image, for each figure saved in the test."""
    from matplotlib.figure import Figure
    found = {}
    save = Figure.savefig

    def record(fig, path, *args, **kwargs):
        save(fig, path, *args, **kwargs)
        renderer = fig.canvas.get_renderer()
        rows = []
        for ax in fig.axes:
            if not ax.images or not ax.axison:
                continue
            ticks = [t for t in ax.get_xticklabels() if t.get_text()]
            boxes = [t.get_window_extent(renderer) for t in ticks]
            clash = [f"{a.get_text()}|{b.get_text()}" for (a, ba), (b, bb) in
                     zip(zip(ticks, boxes), zip(ticks[1:], boxes[1:]))
                     if bb.x0 - ba.x1 < 2 and ba.y0 < bb.y1 and bb.y0 < ba.y1]  # < 2 px apart
            rows.append((ax.get_xlabel(), ax.get_ylabel(), clash))
        found[Path(path).name] = rows

    monkeypatch.setattr(Figure, "savefig", record)
    return found
