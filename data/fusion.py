"""Text-image data for the fusion task (contrastive retrieval, captioning, visual question
answering): image + caption pairs in one plain format, the emoji sets prepared from it, and
procedural shape scenes with balanced question/answer pairs.

The format, shared by the prepared sets and a user's own data, is a folder of images and a
JSONL manifest, one object a line::

    {"image": "noto/1f600.png", "caption": "grinning face",
     "labels": {"group": "Smileys & Emotion"}, "qa": [{"question": "...", "answer": "...",
     "type": "..."}], "id": "1f600"}

``image`` is relative to the manifest's folder (or absolute); ``labels``, ``qa`` and ``id``
are optional, other keys are ignored. ``read_pairs`` decodes it to a ``PairSet``.

Prepared sets (``prepare_emoji``), written once into the data cache:

- ``noto.jsonl``: the 3,655 fully-qualified emoji of Unicode 15.0 (Debian ``unicode-data``,
  Unicode licence), rendered from Noto Color Emoji 2.042 (Debian ``fonts-noto-color-emoji``,
  OFL-1.1), captioned with their CLDR names ("man getting massage: dark skin tone") and
  labelled with their group and subgroup.
- ``google.jsonl``: the same emoji from npm ``emoji-datasource-google@16.0.0`` (MIT code,
  Apache-2.0 art). This is Noto artwork too, of a later release: nearly the same pictures
  (mean absolute difference about 2/255 on most; flags were redrawn), so it measures
  robustness to re-rendering, not to another artist.
- ``twitter.jsonl``: the same emoji from npm ``emoji-datasource-twitter@16.0.0`` (Twemoji,
  CC-BY-4.0 art): another artist's design of every emoji, an unseen style.

The item ids agree across the three, so an emoji is the same item in each.
``near_siblings`` flags test captions whose gender or skin-tone variant was seen in
training. ``prepare_shapes`` writes coloured-shape scenes with questions (``shape_scenes``)
in the same format.
"""

from __future__ import annotations

import hashlib
import io
import json
import random
import re
import sys
import tarfile
import tempfile
import time
from collections import Counter, defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont, UnidentifiedImageError

from .cache import atomic_dir, cache_dir, npm_pack, prepare_lock
from .errors import UserError
from .images import to_8bit
from .lexicon import words_of
from .manifest import as_path, as_text, jsonl_objects
from .parallel import apt_extract

NOTO_FONT = "usr/share/fonts/truetype/noto/NotoColorEmoji.ttf"
EMOJI_TEST = "usr/share/unicode/emoji/emoji-test.txt"
EMOJI_DATASOURCE = "16.0.0"
ARTWORK = ("google", "twitter")  # emoji-datasource-<style> packages, in the 64 px size
EMOJI_SIZE = 64
_FORMAT = ('{"image": path, "caption": text, "labels": {name: text} (optional), '
           '"qa": [{"question", "answer", "type"}] (optional)}')
_WHITE = (255, 255, 255)


# ------------------------------------------------------------------------- the reader
@dataclass
class PairSet:
    """Image-caption pairs decoded once.

    Attributes:
        images: uint8 ``(N, 3, img_size, img_size)``, RGB.
        captions: one caption per image.
        labels: every label name found in the manifest -> one value per image ("" where a
            line lacks it).
        ids: the manifest's ``id``, else the image path as written.
        qa: per image, ``{"question", "answer", "type"}`` dicts (empty where none).
        files: image paths as written in the manifest (for scenes made in memory, the
            names ``prepare_shapes`` gives them within a split).
        skipped: unreadable images left out (full paths).
    """

    images: torch.Tensor
    captions: list[str]
    labels: dict[str, list[str]]
    ids: list[str]
    qa: list[list[dict[str, str]]]
    files: list[str]
    skipped: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.captions)


def load_rgb(path: str | Path, img_size: int) -> np.ndarray:
    """One image as uint8 ``(img_size, img_size, 3)``: transparency composited on white, a
    non-square image padded with white to a square (nothing cut off: a caption or question
    may be about any part of it), then resized with antialiasing."""
    with Image.open(path) as im:
        im.load()
        im = to_8bit(im)
        if im.mode in ("RGBA", "LA", "PA", "RGBa", "La") or im.has_transparency_data:
            rgba = im.convert("RGBA")
            im = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE + (255,)), rgba)
        im = im.convert("RGB")
    w, h = im.size
    if w != h:
        square = Image.new("RGB", (max(w, h),) * 2, _WHITE)
        square.paste(im, ((max(w, h) - w) // 2, (max(w, h) - h) // 2))
        im = square
    if im.size != (img_size, img_size):
        # Pillow's resize widens the filter when shrinking, so downscaling is antialiased.
        im = im.resize((img_size, img_size), Image.Resampling.BICUBIC)
    return np.asarray(im, dtype=np.uint8)


def read_pairs(manifest: str | Path, *, img_size: int, on_bad_image: str = "skip") -> PairSet:
    """Read a JSONL manifest of image-caption pairs (the format in the module docstring).

    Args:
        manifest: the ``.jsonl`` file; image paths are relative to its folder.
        img_size: side of the square images returned.
        on_bad_image: ``"skip"`` leaves a missing or unreadable image out and lists it in
            ``skipped``; ``"error"`` stops with an error naming it.

    Raises:
        UserError: a missing manifest, a line that is not a JSON object with ``image`` and
            ``caption`` (naming the file and line), a bad image with
            ``on_bad_image="error"``, or no readable image at all.
    """
    if on_bad_image not in ("skip", "error"):
        raise UserError(f"on_bad_image={on_bad_image!r}; expected 'skip' or 'error'")
    path = Path(manifest).expanduser()
    if not path.is_file():
        raise UserError(f"manifest {str(path)!r} does not exist or is not a file; expected a "
                        f"JSONL file, one line a pair: {_FORMAT}")
    rows = _manifest_rows(path)
    pixels = np.empty((len(rows), img_size, img_size, 3), dtype=np.uint8)
    kept, skipped = [], []
    for row in rows:
        try:
            pixels[len(kept)] = load_rgb(row["path"], img_size)
        except (UnidentifiedImageError, Image.DecompressionBombError, OSError, ValueError,
                SyntaxError) as exc:
            if on_bad_image == "error":
                raise UserError(f"image {row['path']} (line {row['line']} of {path}) cannot be "
                                f"read ({type(exc).__name__}); fix or remove it, or set "
                                f"on_bad_image=skip") from None
            skipped.append(str(row["path"]))
            continue
        kept.append(row)
    if not kept:
        raise UserError(f"{path} names no readable image ({len(skipped)} unreadable); expected "
                        f"image paths relative to the manifest's folder")
    names = list(dict.fromkeys(name for row in kept for name in row["labels"]))
    return PairSet(
        images=torch.from_numpy(pixels[:len(kept)]).permute(0, 3, 1, 2).contiguous(),
        captions=[row["caption"] for row in kept],
        labels={name: [row["labels"].get(name, "") for row in kept] for name in names},
        ids=[row["id"] for row in kept], qa=[row["qa"] for row in kept],
        files=[row["image"] for row in kept], skipped=skipped)


def _manifest_rows(path: Path) -> list[dict]:
    rows = []
    for n, item in jsonl_objects(path, ("image", "caption"), _FORMAT):
        where = f"{path} line {n}"
        labels = item.get("labels") or {}
        if not isinstance(labels, dict):
            raise UserError(f"{where} has labels={labels!r}; expected an object of name: text")
        qa = item.get("qa") or []
        if not isinstance(qa, list) or not all(isinstance(q, dict) and "question" in q
                                               and "answer" in q for q in qa):
            raise UserError(f"{where} has qa={json.dumps(qa)[:80]}; expected a list of "
                            f'{{"question", "answer", "type"}} objects')
        image = as_path(item["image"], where, "image")
        rows.append({"line": n, "image": image, "path": path.parent / image,
                     "caption": as_text(item["caption"], where, "caption"),
                     "id": as_text(item.get("id", image), where, "id"),
                     "labels": {k: as_text(v, where, f"labels.{k}", booleans=True)
                                for k, v in labels.items()},
                     "qa": [{k: as_text(q.get(k, ""), where, f"qa.{k}")
                             for k in ("question", "answer", "type")} for q in qa]})
    return rows


def _write_jsonl(path: Path, rows: Iterable[dict]) -> None:
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows),
                    encoding="utf-8")


# -------------------------------------------------------------------------- emoji sets
class Emoji(NamedTuple):
    """One fully-qualified emoji of ``emoji-test.txt``."""

    id: str  # code points, lower-case hex joined by "-" ("1f468-200d-1f9b0")
    text: str
    name: str
    group: str
    subgroup: str


def read_emoji_test(text: str) -> list[Emoji]:
    """The ``fully-qualified`` lines of Unicode's ``emoji-test.txt``, in file order."""
    found, group, subgroup = [], "", ""
    for line in text.splitlines():
        if line.startswith("# group:"):
            group = line.split(":", 1)[1].strip()
        elif line.startswith("# subgroup:"):
            subgroup = line.split(":", 1)[1].strip()
        elif "; fully-qualified" in line and "#" in line:
            points = line.split(";", 1)[0].split()
            # "# 😀 E1.0 grinning face": the name follows the version field.
            name = re.sub(r"^\S+\s+E\d+\.\d+\s+", "", line.split("#", 1)[1].strip())
            found.append(Emoji("-".join(p.lower() for p in points),
                               "".join(chr(int(p, 16)) for p in points), name, group, subgroup))
    return found


def prepare_emoji(root: Path | None = None) -> Path:
    """Build the emoji image-caption sets once into ``<cache>/emoji/``; returns the folder.

    It holds ``noto.jsonl``, ``google.jsonl``, ``twitter.jsonl`` (the module docstring says
    what each is), the 64x64 RGB PNGs they name under ``noto/``, ``google/``, ``twitter/``,
    and ``README.txt`` with sources, licences and counts. Everything is written into a
    staging folder that is renamed into place when complete, so a reader never sees a half
    set. Needs ``apt-get`` and ``npm`` once (about 20 MB and 140 MB of downloads); takes a
    few seconds. A second call returns at once.

    Args:
        root: the data cache (default ``cache_dir()``).
    """
    base = root or cache_dir()
    out = base / "emoji"
    if (out / "README.txt").is_file():
        return out
    with prepare_lock("emoji", base):
        if not (out / "README.txt").is_file():  # else another process wrote it meanwhile
            _write_emoji(out)
    return out


def _write_emoji(out: Path) -> None:
    start = time.perf_counter()
    with atomic_dir(out) as staging:
        with tempfile.TemporaryDirectory() as tmp:
            debs = apt_extract(["fonts-noto-color-emoji", "unicode-data"], Path(tmp) / "deb",
                               instead="give your own image-caption manifest")
            emoji = read_emoji_test((debs / EMOJI_TEST).read_text(encoding="utf-8"))
            rows, empty = _render_noto(debs / NOTO_FONT, emoji, staging / "noto")
            _write_jsonl(staging / "noto.jsonl", rows)
            rendered = {r["id"] for r in rows}
            emoji = [e for e in emoji if e.id in rendered]
            counts = {"noto": len(rows)}
            for style in ARTWORK:
                tgz = npm_pack(f"emoji-datasource-{style}@{EMOJI_DATASOURCE}", Path(tmp),
                               instead="give your own image-caption manifest")
                rows = _write_artwork(tgz, style, emoji, staging / style)
                _write_jsonl(staging / f"{style}.jsonl", rows)
                counts[style] = len(rows)
                tgz.unlink()
        seconds = time.perf_counter() - start
        (staging / "README.txt").write_text(_emoji_readme(emoji, counts, empty, seconds),
                                            encoding="utf-8")
    print(f"prepared {counts} emoji images ({empty} empty glyphs skipped) in {seconds:.1f} s "
          f"into {out}", file=sys.stderr)


def _render_noto(font_path: Path, emoji: Sequence[Emoji], dest: Path) -> tuple[list[dict], int]:
    """Render each emoji; returns the manifest rows and how many glyphs came out empty."""
    # CBDT bitmap fonts such as Noto Color Emoji have one strike: 109 pt, 136x128 glyphs.
    font = ImageFont.truetype(str(font_path), 109)
    dest.mkdir(parents=True)
    rows, empty = [], 0
    for e in emoji:
        glyph = Image.new("RGBA", (136, 128), _WHITE + (0,))
        ImageDraw.Draw(glyph).text((0, 0), e.text, font=font, embedded_color=True)
        if glyph.getchannel("A").getbbox() is None:
            empty += 1
            continue
        # The ink lies within x = 4..132 of the 136 px advance: a centred 128 px square
        # crop loses nothing.
        glyph = glyph.crop((4, 0, 132, 128))
        _save_rgb(glyph, dest / f"{e.id}.png")
        rows.append(_emoji_row(e, f"{dest.name}/{e.id}.png"))
    return rows, empty


def _save_rgb(rgba: Image.Image, path: Path) -> None:
    """RGBA composited on white, resized to ``EMOJI_SIZE``, saved as an RGB PNG."""
    rgba = rgba.convert("RGBA")
    im = Image.alpha_composite(Image.new("RGBA", rgba.size, _WHITE + (255,)), rgba)
    im = im.convert("RGB")
    if im.size != (EMOJI_SIZE, EMOJI_SIZE):
        im = im.resize((EMOJI_SIZE, EMOJI_SIZE), Image.Resampling.LANCZOS)
    im.save(path)


def _emoji_row(e: Emoji, image: str) -> dict:
    return {"image": image, "caption": e.name,
            "labels": {"group": e.group, "subgroup": e.subgroup}, "id": e.id}


def artwork_images(index: list[dict]) -> dict[str, str]:
    """Code-point sequence (lower-case hex joined by "-") -> image file, from an
    emoji-datasource ``emoji.json``: every entry and skin variation under its ``unified``
    and ``non_qualified`` forms, and each of them with FE0F removed."""
    images: dict[str, str] = {}
    for entry in index:
        for e in [entry, *(entry.get("skin_variations") or {}).values()]:
            for form in (e.get("unified"), e.get("non_qualified")):
                if form and e.get("image"):
                    images.setdefault(form.lower(), e["image"])
                    images.setdefault(form.lower().replace("-fe0f", ""), e["image"])
    return images


def _write_artwork(tgz: Path, style: str, emoji: Sequence[Emoji], dest: Path) -> list[dict]:
    """The ``style`` 64 px image of each emoji that emoji-datasource has, as ``<id>.png``."""
    prefix = f"package/img/{style}/64/"
    matched: dict[str, str] = {}  # emoji id -> image file, once emoji.json is read
    wanted: set[str] | None = None
    found: dict[str, bytes] = {}
    # One streaming pass over the 60-75 MB tarball; emoji.json comes before the images, so
    # only the images needed are read (all 64 px ones are kept if it came later).
    with tarfile.open(tgz, "r|gz") as tar:
        for member in tar:
            if member.name == "package/emoji.json":
                images = artwork_images(json.load(tar.extractfile(member)))
                for e in emoji:
                    image = images.get(e.id) or images.get(e.id.replace("-fe0f", ""))
                    if image:
                        matched[e.id] = image
                wanted = set(matched.values())
            elif member.isfile() and member.name.startswith(prefix):
                image = member.name[len(prefix):]
                if wanted is None or image in wanted:
                    found[image] = tar.extractfile(member).read()
    if wanted is None:
        raise UserError(f"{tgz.name} has no package/emoji.json; expected an emoji-datasource "
                        f"package")
    dest.mkdir(parents=True)
    rows = []
    for e in emoji:
        if matched.get(e.id) in found:
            with Image.open(io.BytesIO(found[matched[e.id]])) as im:
                _save_rgb(im, dest / f"{e.id}.png")
            rows.append(_emoji_row(e, f"{dest.name}/{e.id}.png"))
    return rows


def _emoji_readme(emoji: Sequence[Emoji], counts: dict[str, int], empty: int,
                  seconds: float) -> str:
    groups = Counter(e.group for e in emoji)
    return "\n".join([
        "Emoji image-caption pairs, 64x64 RGB PNG on white; one JSONL manifest per artwork:",
        '{"image", "caption" (CLDR name), "labels": {"group", "subgroup"}, "id" (code points)}.',
        "",
        "Sources and licences:",
        "- Names, groups, subgroups: Unicode emoji-test.txt 15.0 (Debian unicode-data),",
        "  Unicode License Agreement - Data Files and Software (Unicode-DFS-2016).",
        "- noto/: rendered from the Noto Color Emoji 2.042 font (Debian",
        "  fonts-noto-color-emoji), SIL Open Font License 1.1 (OFL-1.1).",
        f"- google/: npm emoji-datasource-google@{EMOJI_DATASOURCE}: code MIT, images Apache-2.0",
        "  (Google Noto Emoji artwork, a later release: close to noto/, flags redrawn).",
        f"- twitter/: npm emoji-datasource-twitter@{EMOJI_DATASOURCE}: code MIT, images",
        "  CC-BY-4.0 (Twemoji, https://github.com/jdecked/twemoji): another artist's design.",
        "",
        f"Counts: noto {counts['noto']} ({empty} empty glyphs skipped), "
        + ", ".join(f"{s} {counts[s]}" for s in ARTWORK) + " (those also in noto).",
        "Groups: " + ", ".join(f"{g} {n}" for g, n in groups.items()) + ".",
        f"Prepared in {seconds:.1f} s.", ""])


# ------------------------------------------------------------------------ near siblings
_GENDER = r"(?:man|woman|person|men|women|people)"
# A gendered word standing alone (not "woman’s hat", not inside "snowman"), or a pair of
# them ("woman and man holding hands").
_GENDERED = re.compile(rf"\b{_GENDER}(?:\s+and\s+{_GENDER})?\b(?![’'])")
_NAMED_AFTER_COLON = ("flag", "keycap")  # "flag: Spain", "keycap: 7": the part is the name


def sibling_key(caption: str) -> str:
    """The name an emoji shares with its gender, skin-tone and hair variants.

    The rule, on CLDR emoji names (lower-cased):

    1. After a colon come modifiers (skin tones, hair, beard, bald, the members of a
       family, kiss or couple): drop them, so "man: dark skin tone, beard" -> "man" and
       "family: woman, girl, boy" -> "family". Except after "flag" and "keycap", where
       the part after the colon is the name itself ("flag: Spain").
    2. Drop the words man, woman, person, men, women, people (or two of them joined by
       "and") where they stand alone, so "man getting massage", "woman getting massage"
       and "person getting massage" -> "getting massage", "man police officer" ->
       "police officer", "woman and man holding hands" -> "holding hands". Possessives
       stay ("man’s shoe" is not "woman’s shoe"); boy, girl, child, prince, princess,
       mermaid are different emoji, not variants. The neutral "older person" matches
       "old man" and "old woman".
    3. A name left empty ("man", "woman: red hair") is "person".
    """
    name = caption.strip().lower()
    base, _, _ = name.partition(":")
    if base.strip() in _NAMED_AFTER_COLON:
        return " ".join(name.split())
    words = _GENDERED.sub(" ", base).split()
    words = ["old" if w == "older" else w for w in words]
    return " ".join(words) or "person"


def near_siblings(train_captions: Iterable[str], test_captions: Iterable[str]) -> list[bool]:
    """Per test caption: whether a training caption has the same ``sibling_key`` (the same
    emoji in another gender, skin tone or hair style was seen in training)."""
    seen = {sibling_key(c) for c in train_captions}
    return [sibling_key(c) in seen for c in test_captions]


def caption_words(caption: str) -> set[str]:
    """Lower-cased runs of letters and digits ("snow-capped mountain" -> snow, capped,
    mountain), as the lexicon reads them (``data.lexicon.words_of``)."""
    return set(words_of(caption))


def unseen_words(train_captions: Iterable[str], test_captions: Iterable[str]
                 ) -> list[list[str]]:
    """Per test caption: its words that no training caption has (sorted). Such a word (a
    country in "flag: Niger", "pizza" when no pizza was trained on) means nothing to a model
    trained on these captions alone."""
    seen = set().union(*map(caption_words, train_captions))
    return [sorted(caption_words(c) - seen) for c in test_captions]


# ------------------------------------------------------------------------ shape scenes
COLORS = {"red": (220, 40, 40), "green": (40, 160, 60), "blue": (40, 80, 220),
          "yellow": (230, 200, 20), "purple": (140, 60, 190), "orange": (245, 135, 20)}
SHAPES = ("circle", "square", "triangle")
QA_TYPES = ("color", "shape", "count", "exists", "left_of")
COUNTS = ("0", "1", "2", "3", "4", "5")
BACKGROUND = (235, 235, 235)
_SIZE = (0.18, 0.26)  # side of a shape's box, as a fraction of the image side
_GAP = 0.03  # least space between two boxes, and to the border
_LEFT_MARGIN = 0.1  # left_of is asked only where the centres are this far apart


class ShapeObject(NamedTuple):
    """One shape of a scene; ``x``, ``y`` (its box's centre) and ``size`` (its box's side)
    are fractions of the image side, so a scene draws the same at any resolution."""

    shape: str
    color: str
    x: float
    y: float
    size: float

    @property
    def name(self) -> str:
        return f"{self.color} {self.shape}"


@dataclass
class Scene:
    """A scene's objects, its caption and its questions (``{"question", "answer", "type"}``)."""

    objects: list[ShapeObject]
    caption: str
    qa: list[dict[str, str]]


def shape_scenes(n: int, seed: int, *, questions: int = 4) -> list[Scene]:
    """``n`` random scenes of 2-5 non-overlapping coloured shapes, each with ``questions``
    questions; the same ``seed`` gives the same scenes.

    Questions are only asked where they have one answer: "what color is the circle?" needs
    a single circle, "what shape is the red object?" a single red object, "is the red
    circle left of the blue square?" a single red circle and blue square whose centres are
    clearly apart. A scene's questions are of different ``QA_TYPES`` (the least asked so
    far first) while its scene allows, then more "count" and "exists" questions, which
    every scene allows. Answers are balanced within each type: the least-used answer of the
    type that the scene allows is chosen first, then, among the questions with that
    answer, the one least often asked with it, so neither the type nor the question's
    wording gives the answer away. Scenes draw their colours from 1-n and their shapes
    from 1-3 kinds, so that "how many red shapes?" is not nearly always 0 or 1.
    """
    rng = random.Random(seed)
    balance = _Balance(rng)
    scenes = []
    for _ in range(n):
        objects = _sample_objects(rng)
        candidates = _questions(objects)
        qa: list[dict[str, str]] = []
        while len(qa) < questions:
            asked = {q["question"] for q in qa}
            open_types = [t for t in QA_TYPES if any(q not in asked for q, _ in candidates[t])]
            if not open_types:
                break
            fresh = [t for t in open_types if t not in {q["type"] for q in qa}] or open_types
            qtype = min(fresh, key=lambda t: (balance.per_type[t], rng.random()))
            qa.append(balance.pick(qtype, [(q, a) for q, a in candidates[qtype]
                                           if q not in asked]))
        qa.sort(key=lambda q: QA_TYPES.index(q["type"]))
        scenes.append(Scene(objects, _caption(objects), qa))
    return scenes


class _Balance:
    """Answer counts so far, per type and per question, to choose the next question by."""

    def __init__(self, rng: random.Random):
        self.rng = rng
        self.per_type: Counter = Counter()
        self.by_type: dict[str, Counter] = defaultdict(Counter)
        self.by_question: dict[str, Counter] = defaultdict(Counter)

    def pick(self, qtype: str, candidates: list[tuple[str, str]]) -> dict[str, str]:
        counts = self.by_type[qtype]
        answers = sorted({a for _, a in candidates})
        least = min(counts[a] for a in answers)
        answer = self.rng.choice([a for a in answers if counts[a] == least])
        asked = [q for q, a in candidates if a == answer]
        least = min(self.by_question[q][answer] for q in asked)
        question = self.rng.choice([q for q in asked if self.by_question[q][answer] == least])
        counts[answer] += 1
        self.by_question[question][answer] += 1
        self.per_type[qtype] += 1
        return {"question": question, "answer": answer, "type": qtype}


def _sample_objects(rng: random.Random) -> list[ShapeObject]:
    n = rng.randint(2, 5)
    palette = rng.sample(list(COLORS), rng.randint(1, n))
    kinds = rng.sample(SHAPES, rng.randint(1, min(n, len(SHAPES))))
    while True:  # rejection sampling of the boxes; five boxes nearly always fit at once
        boxes: list[tuple[float, float, float]] = []
        for _ in range(100 * n):
            size = round(rng.uniform(*_SIZE), 3)
            low, high = size / 2 + _GAP, 1 - size / 2 - _GAP
            x, y = round(rng.uniform(low, high), 3), round(rng.uniform(low, high), 3)
            if all(max(abs(x - bx), abs(y - by)) >= (size + bs) / 2 + _GAP
                   for bx, by, bs in boxes):
                boxes.append((x, y, size))
                if len(boxes) == n:
                    return [ShapeObject(rng.choice(kinds), rng.choice(palette), x, y, size)
                            for x, y, size in boxes]


def _questions(objects: Sequence[ShapeObject]) -> dict[str, list[tuple[str, str]]]:
    """Every question of each type that has exactly one answer in this scene."""
    shapes = Counter(o.shape for o in objects)
    colors = Counter(o.color for o in objects)
    names = Counter(o.name for o in objects)
    found: dict[str, list[tuple[str, str]]] = {t: [] for t in QA_TYPES}
    for o in objects:
        if shapes[o.shape] == 1:
            found["color"].append((f"what color is the {o.shape}?", o.color))
        if colors[o.color] == 1:
            found["shape"].append((f"what shape is the {o.color} object?", o.shape))
    found["count"].append(("how many shapes are there?", str(len(objects))))
    found["count"] += [(f"how many {c} shapes are there?", str(colors[c])) for c in COLORS]
    found["count"] += [(f"how many {s}s are there?", str(shapes[s])) for s in SHAPES]
    found["exists"] = [(f"is there {_a(f'{c} {s}')}?", "yes" if names[f"{c} {s}"] else "no")
                       for c in COLORS for s in SHAPES]
    unique = [o for o in objects if names[o.name] == 1]
    found["left_of"] = [(f"is the {a.name} left of the {b.name}?", "yes" if a.x < b.x else "no")
                        for a in unique for b in unique
                        if a is not b and abs(a.x - b.x) >= _LEFT_MARGIN]
    return found


def _a(noun: str) -> str:
    return f"an {noun}" if noun[0] in "aeiou" else f"a {noun}"


def _caption(objects: Sequence[ShapeObject]) -> str:
    """"a red circle, a blue square and an orange triangle from left to right"."""
    names = [_a(o.name) for o in sorted(objects, key=lambda o: o.x)]
    return f"{', '.join(names[:-1])} and {names[-1]} from left to right"


def draw_scene(objects: Sequence[ShapeObject], img_size: int = 64) -> Image.Image:
    """The scene as an RGB image on a plain ``BACKGROUND``; drawn at 4x and box-filtered
    down, since Pillow draws shapes without antialiasing."""
    side = img_size * 4
    im = Image.new("RGB", (side, side), BACKGROUND)
    draw = ImageDraw.Draw(im)
    for o in objects:
        x0, y0 = (o.x - o.size / 2) * side, (o.y - o.size / 2) * side
        x1, y1 = (o.x + o.size / 2) * side, (o.y + o.size / 2) * side
        fill = COLORS[o.color]
        if o.shape == "circle":
            draw.ellipse((x0, y0, x1, y1), fill=fill)
        elif o.shape == "square":
            draw.rectangle((x0, y0, x1, y1), fill=fill)
        else:
            draw.polygon([((x0 + x1) / 2, y0), (x1, y1), (x0, y1)], fill=fill)
    return im.reduce(4)


def make_shapes(n: int, seed: int, img_size: int = 64) -> PairSet:
    """``n`` scenes of ``shape_scenes(n, seed)``, drawn in memory, as a ``PairSet`` (ids
    ``"000000"``..., files ``"000000.png"``...; no labels)."""
    scenes = shape_scenes(n, seed)
    pixels = np.stack([np.asarray(draw_scene(s.objects, img_size)) for s in scenes])
    return PairSet(images=torch.from_numpy(pixels).permute(0, 3, 1, 2).contiguous(),
                   captions=[s.caption for s in scenes], labels={},
                   ids=[f"{i:06d}" for i in range(n)], qa=[s.qa for s in scenes],
                   files=[f"{i:06d}.png" for i in range(n)])


def split_seed(seed: int, split: str) -> int:
    """The scene seed of one split of ``prepare_shapes``: distinct for every split and
    seed, so no two splits share a scene."""
    return int.from_bytes(hashlib.sha256(f"shapes/{seed}/{split}".encode()).digest()[:8], "big")


def prepare_shapes(n_train: int, n_val: int, n_test: int, seed: int, root: Path | None = None,
                   img_size: int = 64) -> Path:
    """Write shape scenes once into ``<cache>/shapes-<seed>-<n_train>-<n_val>-<n_test>-
    <img_size>/`` as ``<split>/<n>.png`` with ``train.jsonl``, ``val.jsonl``, ``test.jsonl``
    in the common format (with ``qa``, and ``objects`` listing each scene's shapes) and
    ``info.json``; read them with ``read_pairs``. Each split has its own ``split_seed``.

    Args:
        n_train, n_val, n_test: scenes per split.
        seed: the data seed.
        root: the data cache (default ``cache_dir()``).
        img_size: image side in pixels.
    """
    if min(n_train, n_val, n_test) < 1 or img_size < 8:
        raise UserError(f"shapes with n_train={n_train}, n_val={n_val}, n_test={n_test}, "
                        f"img_size={img_size}; expected at least one scene per split and "
                        f"img_size >= 8")
    base = root or cache_dir()
    out = base / f"shapes-{seed}-{n_train}-{n_val}-{n_test}-{img_size}"
    if (out / "info.json").is_file():
        return out
    with prepare_lock(out.name, base):
        if not (out / "info.json").is_file():  # else another process wrote it meanwhile
            _write_shapes(out, {"train": n_train, "val": n_val, "test": n_test}, seed,
                          img_size)
    return out


def _write_shapes(out: Path, sizes: dict[str, int], seed: int, img_size: int) -> None:
    start = time.perf_counter()
    info = {"seed": seed, "img_size": img_size, "colors": list(COLORS), "shapes": list(SHAPES),
            "splits": {}}
    with atomic_dir(out) as staging:
        for split, n in sizes.items():
            scenes = shape_scenes(n, split_seed(seed, split))
            (staging / split).mkdir(parents=True)
            rows = []
            for i, scene in enumerate(scenes):
                image = f"{split}/{i:06d}.png"
                draw_scene(scene.objects, img_size).save(staging / image, compress_level=1)
                rows.append({"image": image, "caption": scene.caption, "qa": scene.qa,
                             "objects": [o._asdict() for o in scene.objects],
                             "id": f"{split}/{i:06d}"})
            _write_jsonl(staging / f"{split}.jsonl", rows)
            info["splits"][split] = {"scenes": n, "seed": split_seed(seed, split),
                                     "answers": answer_balance(s.qa for s in scenes)}
        info["seconds"] = round(time.perf_counter() - start, 2)
        (staging / "info.json").write_text(json.dumps(info, indent=2) + "\n", encoding="utf-8")


def answer_balance(pairs: PairSet | Iterable[Sequence[dict]]) -> dict[str, dict[str, int]]:
    """Question type -> answer -> how often, over a ``PairSet``'s ``qa`` or any iterable of
    per-image question lists. The majority-answer rate of a type (what a model that only
    reads the question type can reach) is ``max(counts.values()) / sum(counts.values())``."""
    qa = pairs.qa if isinstance(pairs, PairSet) else pairs
    counts: dict[str, Counter] = defaultdict(Counter)
    for questions in qa:
        for q in questions:
            counts[q.get("type", "")][q["answer"]] += 1
    return {t: dict(sorted(c.items())) for t, c in sorted(counts.items())}
