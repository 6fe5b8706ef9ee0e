"""Text-image data: the image-caption manifest reader and its errors, emoji names and
artwork matching, the near-sibling rule on real emoji names, and the procedural shape
scenes (deterministic, balanced, every answer true of the drawn scene)."""

import io
import json
import re
import tarfile
import time
from collections import Counter

import numpy as np
import pytest
import torch
from PIL import Image

from data import fusion
from data.errors import UserError
from data.fusion import (
    COLORS,
    SHAPES,
    answer_balance,
    artwork_images,
    draw_scene,
    make_shapes,
    near_siblings,
    prepare_shapes,
    read_emoji_test,
    read_pairs,
    shape_scenes,
    sibling_key,
)
from data.images import load_image


def _manifest(folder, lines) -> str:
    path = folder / "pairs.jsonl"
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


# ------------------------------------------------------------------------------- reader
def test_read_pairs_round_trip(tmp_path):
    Image.new("RGB", (32, 32), (200, 10, 10)).save(tmp_path / "red.png")
    rgba = np.zeros((10, 20, 4), dtype=np.uint8)  # left half opaque blue, right transparent
    rgba[:, :10] = (0, 0, 255, 255)
    Image.fromarray(rgba, "RGBA").save(tmp_path / "half.png")
    checker = (np.indices((32, 32)).sum(0) % 2 * 255).astype(np.uint8)
    Image.fromarray(checker, "L").save(tmp_path / "checker.png")
    (tmp_path / "bad.png").write_bytes(b"not a png at all")
    path = _manifest(tmp_path, [
        {"image": "red.png", "caption": "a red square", "labels": {"color": "red"},
         "id": "r1"},
        "",
        {"image": "bad.png", "caption": "broken"},
        {"image": "half.png", "caption": "half blue", "labels": {"shape": "wide"},
         "qa": [{"question": "what color?", "answer": "blue", "type": "color"}]},
        {"image": "checker.png", "caption": "a checkerboard", "extra": 1},
    ])
    got = read_pairs(path, img_size=16)
    assert got.images.shape == (3, 3, 16, 16) and got.images.dtype == torch.uint8
    assert got.captions == ["a red square", "half blue", "a checkerboard"]
    assert got.ids == ["r1", "half.png", "checker.png"]
    assert got.files == ["red.png", "half.png", "checker.png"]
    assert got.labels == {"color": ["red", "", ""], "shape": ["", "wide", ""]}
    assert got.qa == [[], [{"question": "what color?", "answer": "blue", "type": "color"}], []]
    assert got.skipped == [str(tmp_path / "bad.png")]
    assert (got.images[0].float() - torch.tensor([200.0, 10, 10])[:, None, None]).abs().max() <= 1
    half = got.images[1]  # 20x10 padded to 20x20 with white, transparent half white too
    assert half[:, 0].min() == 255 and half[:, -1].min() == 255  # top and bottom pads
    assert half[:, 8, 1].tolist() == [0, 0, 255] and half[:, 8, -2].tolist() == [255, 255, 255]
    # Antialiased: a 1 px checkerboard halved averages to grey, not to black or white.
    assert (got.images[2].float() - 127.5).abs().max() < 20


def test_read_pairs_can_stop_at_a_bad_image(tmp_path):
    (tmp_path / "bad.png").write_bytes(b"\x89PNG broken")
    path = _manifest(tmp_path, [{"image": "missing.png", "caption": "x"},
                                {"image": "bad.png", "caption": "y"}])
    with pytest.raises(UserError, match="no readable image"):
        read_pairs(path, img_size=8)
    with pytest.raises(UserError) as err:
        read_pairs(path, img_size=8, on_bad_image="error")
    assert "missing.png" in str(err.value) and "line 1" in str(err.value)


@pytest.mark.parametrize("lines, option, expected", [
    (None, "skip", r"nowhere\.jsonl.* does not exist"),
    ([{"image": "a.png", "caption": "a"}, '{"image": "b.png", caption}'], "skip",
     r"line 2 is not JSON"),
    ([{"caption": "no image"}], "skip", r"line 1 lacks 'image'"),
    (['{"image": "a.png"}'], "skip", r"line 1 lacks 'caption'"),
    (['["a.png", "a caption"]'], "skip", r"line 1 lacks 'image' and 'caption'"),
    ([{"image": "a.png", "caption": "a", "labels": ["x"]}], "skip", r"labels=\['x'\]"),
    ([{"image": "a.png", "caption": "a", "qa": [{"question": "q"}]}], "skip", r"line 1 has qa="),
    ([{"image": "a.png", "caption": "a"}], "sometimes", r"on_bad_image='sometimes'"),
    ([{"image": "a.png", "caption": ["a", "list"]}], "skip",
     r'line 1 has caption=\["a", "list"\]; expected text'),
    ([{"image": "a.png", "caption": "a", "labels": {"color": None}}], "skip",
     r"line 1 has labels.color=null; expected text"),
    ([{"image": "a.png", "caption": "a", "qa": [{"question": "q", "answer": ["x"]}]}], "skip",
     r'line 1 has qa.answer=\["x"\]; expected text'),
    ([{"image": 7, "caption": "a"}], "skip", r"line 1 has image=7; expected a file path"),
])
def test_read_pairs_errors_are_one_line(tmp_path, lines, option, expected):
    path = tmp_path / "nowhere.jsonl" if lines is None else _manifest(tmp_path, lines)
    with pytest.raises(UserError) as err:
        read_pairs(path, img_size=8, on_bad_image=option)
    assert re.search(expected, str(err.value)) and "\n" not in str(err.value)


def test_a_manifest_with_a_byte_order_mark_and_a_line_separator_in_a_caption(tmp_path):
    """Valid JSON may hold U+2028 unescaped (``json.dumps(ensure_ascii=False)`` writes it);
    it is not a line end of the manifest. A number is text where text is expected."""
    Image.new("RGB", (8, 8), "red").save(tmp_path / "a.png")
    rows = [{"image": "a.png", "caption": "one\u2028two", "labels": {"smiling": True}, "qa": [
                {"question": "how many?", "answer": 3}]},
            {"image": "a.png", "caption": "three"}]
    path = tmp_path / "pairs.jsonl"
    path.write_bytes(b"\xef\xbb\xbf" + "".join(
        json.dumps(r, ensure_ascii=False) + "\r\n" for r in rows).encode())
    got = read_pairs(path, img_size=8)
    assert got.captions == ["one\u2028two", "three"]
    assert got.qa[0] == [{"question": "how many?", "answer": "3", "type": ""}]
    assert got.labels == {"smiling": ["true", ""]}


def test_sixteen_bit_images_are_scaled_not_clipped(tmp_path):
    """Pillow clips a 16-bit grey PNG at 255 when it converts it; both image readers scale it
    to 8 bits (the top byte), as an 8-bit copy of the same picture would read."""
    ramp = (np.arange(16 * 16, dtype=np.uint16).reshape(16, 16) * 257)  # 0 ... 65535
    Image.fromarray(ramp).save(tmp_path / "deep.png")
    assert Image.open(tmp_path / "deep.png").mode.startswith("I")
    expected = torch.from_numpy((ramp >> 8).astype(np.uint8))
    assert torch.equal(load_image(tmp_path / "deep.png", 16, 1)[0], expected)
    rgb = torch.tensor(fusion.load_rgb(tmp_path / "deep.png", 16))
    assert torch.equal(rgb, expected[..., None].expand(16, 16, 3))
    # 32-bit integer grey levels (a TIFF's mode "I") within 0-255 are already 8-bit
    Image.fromarray((ramp >> 8).astype(np.int32), "I").save(tmp_path / "wide.tif")
    assert Image.open(tmp_path / "wide.tif").mode == "I"
    assert torch.equal(load_image(tmp_path / "wide.tif", 16, 1)[0], expected)


# --------------------------------------------------------------------------------- emoji
EMOJI_TEST = """\
# group: Smileys & Emotion

# subgroup: face-smiling
1F600                                                  ; fully-qualified     # 😀 E1.0 grinning face
263A FE0F                                              ; fully-qualified     # ☺️ E0.6 smiling face
263A                                                   ; unqualified         # ☺ E0.6 smiling face

# group: People & Body

# subgroup: person-resting
1F9D4 1F3FB 200D 2642 FE0F                             ; fully-qualified     # 🧔🏻‍♂️ E13.1 man: light skin tone, beard
# group: Component
1F3FB                                                  ; component           # 🏻 E1.0 light skin tone
"""


def test_read_emoji_test():
    got = read_emoji_test(EMOJI_TEST)
    assert [(e.id, e.name, e.group, e.subgroup) for e in got] == [
        ("1f600", "grinning face", "Smileys & Emotion", "face-smiling"),
        ("263a-fe0f", "smiling face", "Smileys & Emotion", "face-smiling"),
        ("1f9d4-1f3fb-200d-2642-fe0f", "man: light skin tone, beard", "People & Body",
         "person-resting")]
    assert got[2].text == "\U0001F9D4\U0001F3FB\u200d\u2642\ufe0f"


def test_artwork_matches_qualified_and_unqualified_forms():
    index = [{"unified": "1F600", "non_qualified": None, "image": "1f600.png"},
             {"unified": "263A-FE0F", "non_qualified": "263A", "image": "263a-fe0f.png"},
             {"unified": "1F9D4-200D-2642-FE0F", "non_qualified": "1F9D4-200D-2642",
              "image": "1f9d4-200d-2642-fe0f.png",
              "skin_variations": {"1F3FB": {"unified": "1F9D4-1F3FB-200D-2642-FE0F",
                                            "non_qualified": "1F9D4-1F3FB-200D-2642",
                                            "image": "1f9d4-1f3fb-200d-2642-fe0f.png"}}},
             {"unified": "1F441-FE0F-200D-1F5E8-FE0F", "image": "1f441-200d-1f5e8.png"}]
    images = artwork_images(index)
    assert images["1f600"] == "1f600.png"
    assert images["263a-fe0f"] == images["263a"] == "263a-fe0f.png"
    assert images["1f9d4-1f3fb-200d-2642-fe0f"] == "1f9d4-1f3fb-200d-2642-fe0f.png"
    assert images["1f441-200d-1f5e8"] == "1f441-200d-1f5e8.png"  # FE0F dropped


def test_artwork_is_read_from_the_tarball(tmp_path):
    index = [{"unified": "1F600", "image": "1f600.png"},
             {"unified": "263A-FE0F", "non_qualified": "263A", "image": "263a-fe0f.png"}]
    tgz = tmp_path / "emoji-datasource-test-1.0.0.tgz"
    with tarfile.open(tgz, "w:gz") as tar:
        def add(name, data):
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
        add("package/emoji.json", json.dumps(index).encode())
        for name, alpha in [("1f600.png", 0), ("263a-fe0f.png", 255), ("2b50.png", 255)]:
            png = io.BytesIO()
            Image.new("RGBA", (64, 64), (0, 0, 200, alpha)).save(png, format="PNG")
            add(f"package/img/test/64/{name}", png.getvalue())
    emoji = read_emoji_test(EMOJI_TEST)
    rows = fusion._write_artwork(tgz, "test", emoji, tmp_path / "test")
    assert [r["id"] for r in rows] == ["1f600", "263a-fe0f"]  # the beard man is not there
    assert rows[1] == {"image": "test/263a-fe0f.png", "caption": "smiling face",
                       "labels": {"group": "Smileys & Emotion", "subgroup": "face-smiling"},
                       "id": "263a-fe0f"}
    pairs = read_pairs(_manifest(tmp_path, rows), img_size=64)
    assert pairs.images[0].min() == 255  # transparent -> white
    assert pairs.images[1][:, 5, 5].tolist() == [0, 0, 200]


# ----------------------------------------------------------------------- near siblings
def test_sibling_key_on_real_emoji_names():
    same = [["man getting massage", "woman getting massage", "person getting massage",
             "man getting massage: dark skin tone"],
            ["man police officer", "police officer", "woman police officer: light skin tone"],
            ["man", "woman: red hair", "person: medium skin tone, beard", "man: bald"],
            ["men holding hands", "woman and man holding hands: light skin tone",
             "people holding hands"],
            ["old man", "older person", "old woman: dark skin tone"],
            ["family", "family: man, woman, boy", "family: woman, girl, girl"],
            ["kiss", "kiss: woman, man", "kiss: man, man"]]
    for names in same:
        assert len({sibling_key(n) for n in names}) == 1, names
    different = ["flag: Spain", "flag: Sweden", "flag: England", "keycap: 1", "keycap: 7",
                 "boy", "girl", "child", "man’s shoe", "woman’s hat", "snowman", "kiss mark",
                 "mermaid", "merman", "man dancing", "police officer", "person"]
    assert len({sibling_key(n) for n in different}) == len(different)
    assert sibling_key("flag: Spain") == "flag: spain"


def test_near_siblings():
    train = ["woman getting massage: dark skin tone", "flag: Spain", "grinning face"]
    test = ["man getting massage", "flag: France", "grinning face with big eyes",
            "person getting massage: light skin tone"]
    assert near_siblings(train, test) == [True, False, False, True]


# ------------------------------------------------------------------------------- shapes
def _answer(question: str, objects) -> str:
    """Answer a generated question from the object list, independently of the generator."""
    names = Counter(f"{o.color} {o.shape}" for o in objects)
    if m := re.fullmatch(r"what color is the (\w+)\?", question):
        (hit,) = [o for o in objects if o.shape == m[1]]
        return hit.color
    if m := re.fullmatch(r"what shape is the (\w+) object\?", question):
        (hit,) = [o for o in objects if o.color == m[1]]
        return hit.shape
    if question == "how many shapes are there?":
        return str(len(objects))
    if m := re.fullmatch(r"how many (\w+) shapes are there\?", question):
        return str(sum(o.color == m[1] for o in objects))
    if m := re.fullmatch(r"how many (\w+)s are there\?", question):
        return str(sum(o.shape == m[1] for o in objects))
    if m := re.fullmatch(r"is there an? (\w+ \w+)\?", question):
        return "yes" if names[m[1]] else "no"
    if m := re.fullmatch(r"is the (\w+ \w+) left of the (\w+ \w+)\?", question):
        assert names[m[1]] == names[m[2]] == 1
        (a,) = [o for o in objects if f"{o.color} {o.shape}" == m[1]]
        (b,) = [o for o in objects if f"{o.color} {o.shape}" == m[2]]
        assert abs(a.x - b.x) >= 0.05  # clearly apart, not a coin toss for the eye
        return "yes" if a.x < b.x else "no"
    raise AssertionError(f"unknown question {question!r}")


def test_shapes_are_deterministic_by_seed():
    a, b, c = make_shapes(12, seed=1, img_size=32), make_shapes(12, seed=1, img_size=32), \
        make_shapes(12, seed=2, img_size=32)
    assert a.images.shape == (12, 3, 32, 32) and a.images.dtype == torch.uint8
    assert torch.equal(a.images, b.images) and a.qa == b.qa and a.captions == b.captions
    assert not torch.equal(a.images, c.images) and a.captions != c.captions


def test_shape_answers_are_true_of_the_drawn_scene():
    scenes = shape_scenes(300, seed=3)
    for scene in scenes:
        objects = scene.objects
        assert 2 <= len(objects) <= 5 and len(scene.qa) == 4
        assert len({q["question"] for q in scene.qa}) == 4
        for q in scene.qa:
            assert _answer(q["question"], objects) == q["answer"], (q, objects)
        for i, a in enumerate(objects):  # boxes apart and inside the image
            assert a.size / 2 <= a.x <= 1 - a.size / 2 and a.size / 2 <= a.y <= 1 - a.size / 2
            for b in objects[i + 1:]:
                assert max(abs(a.x - b.x), abs(a.y - b.y)) >= (a.size + b.size) / 2
        left_to_right = [f"{o.color} {o.shape}" for o in sorted(objects, key=lambda o: o.x)]
        assert [w.split(" ", 1)[1] for w in re.split(r", | and ", scene.caption[:-19])] \
            == left_to_right
    for scene in scenes[:40]:  # each shape is drawn in its colour at its centre
        pixels = np.asarray(draw_scene(scene.objects, 64))
        for o in scene.objects:
            assert tuple(pixels[int(o.y * 64), int(o.x * 64)]) == COLORS[o.color]


def test_shape_answers_are_balanced():
    start = time.perf_counter()
    counts = answer_balance(s.qa for s in shape_scenes(2000, seed=0))
    assert time.perf_counter() - start < 5
    assert set(counts) == set(fusion.QA_TYPES)
    for qtype in ("exists", "left_of"):
        assert set(counts[qtype]) == {"yes", "no"}
        assert 0.45 <= counts[qtype]["yes"] / sum(counts[qtype].values()) <= 0.55
    for qtype, vocab in [("color", COLORS), ("shape", SHAPES), ("count", fusion.COUNTS)]:
        assert set(counts[qtype]) == set(vocab), qtype
        share = max(counts[qtype].values()) / sum(counts[qtype].values())
        assert share <= 2 / len(vocab), (qtype, counts[qtype])
    assert min(sum(c.values()) for c in counts.values()) > 0.15 * 2000  # every type asked


def test_prepare_shapes_round_trip(tmp_path):
    out = prepare_shapes(6, 3, 3, seed=5, root=tmp_path, img_size=32)
    assert out == tmp_path / "shapes-5-6-3-3-32"
    seen = set()
    for split, n in [("train", 6), ("val", 3), ("test", 3)]:
        pairs = read_pairs(out / f"{split}.jsonl", img_size=32)
        assert len(pairs) == n and not pairs.skipped and all(len(q) == 4 for q in pairs.qa)
        rows = [json.loads(line) for line in (out / f"{split}.jsonl").read_text().splitlines()]
        for row, image in zip(rows, pairs.images):
            objects = [fusion.ShapeObject(**o) for o in row["objects"]]
            drawn = np.asarray(draw_scene(objects, 32))
            assert np.array_equal(image.permute(1, 2, 0).numpy(), drawn)  # PNG is lossless
            seen.add(tuple(objects))
    assert len(seen) == 12  # no scene in two splits
    stamp = (out / "info.json").stat().st_mtime_ns
    assert prepare_shapes(6, 3, 3, seed=5, root=tmp_path, img_size=32) == out
    assert (out / "info.json").stat().st_mtime_ns == stamp  # prepared once
    with pytest.raises(UserError, match="n_val=0"):
        prepare_shapes(6, 0, 3, seed=5, root=tmp_path)


# -------------------------------------------------------------------- the real emoji set
@pytest.mark.slow
def test_prepare_emoji_builds_three_artworks(tmp_path):
    out = fusion.prepare_emoji(tmp_path)
    sets = {s: read_pairs(out / f"{s}.jsonl", img_size=64) for s in ("noto", "google",
                                                                       "twitter")}
    noto = sets["noto"]
    assert len(noto) > 3600 and not noto.skipped
    assert len(set(noto.labels["group"])) == 9
    i = noto.ids.index("1f600")
    assert noto.captions[i] == "grinning face" and noto.files[i] == "noto/1f600.png"
    for name in ("google", "twitter"):
        assert len(sets[name]) > 0.95 * len(noto)
        assert set(sets[name].ids) <= set(noto.ids)
    # An emoji is the same item in each: its pictures agree far more than two random ones.
    g = sets["twitter"]
    same = noto.images[[noto.ids.index(x) for x in g.ids[:200]]].float()
    assert (same - g.images[:200].float()).abs().mean() \
        < (same - g.images[200:400].float()).abs().mean()
    readme = (out / "README.txt").read_text()
    assert all(word in readme for word in ("OFL-1.1", "Unicode", "Apache-2.0", "CC-BY-4.0"))


def test_shapes_tokenizer_keeps_every_word_whole():
    """The default shapes vocabulary leaves room for whole words beside sentencepiece's 256
    byte pieces: every colour, shape and question word is one piece, so a question is a
    few tokens (at 320 pieces "purple" was five and questions ran to 22 tokens)."""
    from omegaconf import OmegaConf

    from data.text import Tokenizer

    vocab_size = OmegaConf.load("conf/data/shapes.yaml").data.vocab_size
    scenes = shape_scenes(2000, seed=0)
    lines = [s.caption for s in scenes] + [q["question"] for s in scenes for q in s.qa]
    tok = Tokenizer.train("\n".join(lines), vocab_size)
    words = {w for line in lines for w in re.findall(r"[a-z]+", line)}
    assert set(COLORS) | set(SHAPES) <= words
    split = {w: tok.encode(w) for w in words if len(tok.encode(w)) > 1}
    assert not split, split
    assert max(len(tok.encode(q["question"])) for s in scenes for q in s.qa) <= 11


def test_unseen_words():
    train = ["grinning face", "flag: Spain", "snow-capped mountain", "two o’clock"]
    test = ["grinning cat face", "flag: France", "mountain cableway", "Snow", "ten o’clock"]
    assert fusion.caption_words("snow-capped mountain") == {"snow", "capped", "mountain"}
    assert fusion.unseen_words(train, test) == [["cat"], ["france"], ["cableway"], [],
                                                 ["ten"]]


def _png_header_only(path, width: int, height: int) -> None:
    """A PNG whose header claims width x height pixels (a decompression bomb's header)."""
    import struct
    import zlib

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))


def test_a_decompression_bomb_is_a_bad_image(tmp_path):
    Image.new("RGB", (8, 8), (200, 10, 10)).save(tmp_path / "ok.png")
    _png_header_only(tmp_path / "bomb.png", 20000, 20000)
    path = _manifest(tmp_path, [{"image": "ok.png", "caption": "x"},
                                {"image": "bomb.png", "caption": "y"}])
    assert read_pairs(path, img_size=8).skipped == [str(tmp_path / "bomb.png")]
    with pytest.raises(UserError, match=r"bomb\.png .*DecompressionBombError"):
        read_pairs(path, img_size=8, on_bad_image="error")
