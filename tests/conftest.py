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
