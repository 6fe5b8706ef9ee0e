"""Preparing a cache entry once when processes start together, and atomic writes."""

import multiprocessing
import time
from pathlib import Path

import pytest

from data.cache import atomic_path, atomic_write_text, prepare_lock


def _prepare(root: str, start) -> str:
    """A prepare function shaped like data.*.prepare_*: check, lock, check again, write."""
    root = Path(root)
    target = root / "entry" / "result.txt"
    start.wait()  # both processes reach the check together
    if not target.is_file():
        with prepare_lock("entry", root):
            if not target.is_file():
                with open(root / "runs", "a") as f:
                    f.write("run\n")
                time.sleep(0.5)  # long enough for the other process to find the lock taken
                atomic_write_text(target, "prepared")
    return target.read_text()


def test_two_processes_prepare_once(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    start = ctx.Manager().Barrier(2)
    with ctx.Pool(2) as pool:
        results = pool.starmap(_prepare, [(str(tmp_path), start)] * 2)
    assert results == ["prepared", "prepared"]
    assert (tmp_path / "runs").read_text() == "run\n"


def test_interrupted_write_leaves_no_file(tmp_path):
    target = tmp_path / "tokens.npy"
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of it")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []
    target.write_text("old")
    with pytest.raises(RuntimeError):
        with atomic_path(target) as tmp:
            tmp.write_text("half of the new one")
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == [target] and target.read_text() == "old"


def test_writers_get_their_own_temporary_files(tmp_path):
    target = tmp_path / "a.txt"
    with atomic_path(target) as first, atomic_path(target) as second:
        assert first != second and first.parent == second.parent == tmp_path
        first.write_text("1")
        second.write_text("2")
    assert target.read_text() == "1"  # the outer block ends last
    assert list(tmp_path.iterdir()) == [target]


def test_the_lock_can_be_taken_again_inside_itself(tmp_path):
    with prepare_lock("x", tmp_path), prepare_lock("x", tmp_path):
        pass
    assert (tmp_path / "x.lock").is_file()


def test_tokenizer_is_trained_once_then_loaded(tmp_path, monkeypatch):
    from data.text import Tokenizer, train_or_load_tokenizer
    text = (Path(__file__).parent / "fixtures" / "sonnets.txt").read_text(encoding="utf-8")
    tok = train_or_load_tokenizer(text, 400, tmp_path)
    assert [p.name for p in tmp_path.glob("spm-*.model")] and tok.vocab_size == 400

    def no_training(*args, **kwargs):
        raise AssertionError("trained again although the model is cached")

    monkeypatch.setattr(Tokenizer, "train", no_training)
    assert train_or_load_tokenizer(text, 400, tmp_path).proto == tok.proto
    assert not list(tmp_path.glob("*.tmp"))
    # the other kind is a model of its own, not the cached BPE one
    with pytest.raises(AssertionError, match="trained again"):
        train_or_load_tokenizer(text, 400, tmp_path, "unigram")


def test_cache_keys_keep_their_parts_apart():
    """Parts that run into each other name different entries: a corpus "a1" at size 23 is
    not the corpus "a12" at size 3."""
    import hashlib

    from data.text import digest
    assert digest("a1", 23) != digest("a12", 3)
    assert digest(b"x", "y") != digest("xy") and digest("a", "b") == digest("a", "b")
    one = b"".join(len(p).to_bytes(8, "little") + p for p in (b"a1", b"23"))
    assert digest("a1", 23) == hashlib.sha1(one).hexdigest()[:12]


def test_atomic_dir_replaces_on_success_and_keeps_the_old_folder_on_error(tmp_path):
    from data.cache import atomic_dir
    out = tmp_path / "set"
    (tmp_path / ".set.partial-99999").mkdir()  # left by a killed run
    with atomic_dir(out) as staging:
        (staging / "a.txt").write_text("one")
        assert not out.exists()  # nothing visible until the block ends
    assert (out / "a.txt").read_text() == "one"
    with pytest.raises(RuntimeError):
        with atomic_dir(out) as staging:
            (staging / "a.txt").write_text("two")
            raise RuntimeError("interrupted")
    assert (out / "a.txt").read_text() == "one"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["set"]


@pytest.mark.slow
def test_the_bible_pairs_read_each_compressed_block_once(tmp_path, monkeypatch):
    """The KJV / RV 1909 pairs from the Debian packages: every verse aligned, and each
    compressed block of the modules inflated once (per verse, it took about a minute)."""
    import zlib

    from data import parallel
    calls = []
    inflate = zlib.decompress
    monkeypatch.setattr(zlib, "decompress", lambda data, *a: calls.append(1) or inflate(data, *a))
    lines = parallel.prepare_bible(tmp_path).read_text(encoding="utf-8").splitlines()
    assert len(lines) == 31_084
    assert lines[0] == ("In the beginning God created the heaven and the earth.\t"
                        "En el principio crió Dios los cielos y la tierra.")
    assert all(line.count("\t") == 1 for line in lines)
    assert 0 < len(calls) < 2_000, len(calls)  # one per block read: 62,204 verses
