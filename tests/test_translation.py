"""Encoder-decoder decoding against independent references (greedy, uncached recompute,
padding invariance) and the translation task end to end on a Genesis fixture."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from data.batching import length_batches
from data.parallel import read_pairs
from modules.mha import MultiHeadAttention
from modules.seq2seq import Seq2SeqTransformer
from tasks import translation as tr_task
from tasks.framework.errors import UserError

ROOT = Path(__file__).resolve().parents[1]
FIXTURE = ROOT / "tests" / "fixtures" / "genesis.en-es.tsv"


def tiny_model(**kw):
    torch.manual_seed(0)
    m = Seq2SeqTransformer(vocab_size=50, embed_dim=32, encoder_depth=2, decoder_depth=2,
                           num_heads=4, num_kv_heads=2, mlp_hidden_dim=64, drop=0.0,
                           max_seq_len=64, **kw).eval()
    with torch.no_grad():  # a peaked output distribution so decodes are long and varied
        m.lm_head.weight.mul_(8.0)
    return m


def sources():
    src = torch.randint(4, 50, (5, 9))
    src[1, 6:] = 0
    src[3, 3:] = 0
    src[:, -1] = torch.where(src[:, -1] == 0, 0, 3)
    return src


def test_beam_one_equals_greedy():
    m, src = tiny_model(), sources()
    greedy = m.greedy(src, max_len_a=1.0, max_len_b=5)
    assert greedy == m.beam_search(src, beam_size=1, length_penalty=0.0, max_len_a=1.0,
                                   max_len_b=5)
    assert max(len(g) for g in greedy) > 3


@pytest.mark.parametrize("beam", [1, 4])
def test_cached_decoding_equals_uncached(beam):
    m, src = tiny_model(), sources()
    kw = dict(beam_size=beam, max_len_a=1.0, max_len_b=5)
    assert m.beam_search(src, use_cache=True, **kw) == m.beam_search(src, use_cache=False, **kw)
    assert m.greedy(src, use_cache=True) == m.greedy(src, use_cache=False)


def test_padded_source_content_changes_nothing():
    m, src = tiny_model(), sources()
    a = m.beam_search(src, beam_size=3)
    with torch.no_grad():
        mem, mask = m.encode(src)
    # Padded positions are id 0; give them different content through the pad embedding.
    m.embed.weight.data[0] = torch.randn(32) * 10
    assert m.beam_search(src, beam_size=3) == a
    with torch.no_grad():
        mem2, _ = m.encode(src)
    assert not torch.allclose(mem2[~mask], mem[~mask])  # the pads' own states did change
    torch.testing.assert_close(mem2[mask], mem[mask])


def scale_queries_and_keys(m, factor):
    """Multiply every attention's query and key projections (self and cross) by factor."""
    for module in m.modules():
        if not isinstance(module, MultiHeadAttention):
            continue
        q_dim, kv_dim = module.num_heads * module.head_dim, module.num_kv_heads * module.head_dim
        if module.is_cross:
            module.q_proj.weight.mul_(factor)
            module.kv_proj.weight[:kv_dim].mul_(factor)
        else:
            module.qkv_proj.weight[:q_dim + kv_dim].mul_(factor)


@pytest.mark.parametrize("qk_norm", [True, False])
def test_query_key_norms_reach_self_and_cross_attention(qk_norm):
    """With RMSNorm on each head's queries and keys, the scale of their projections cannot
    matter; without it, it sharpens every attention."""
    m, src = tiny_model(qk_norm=qk_norm), sources()
    tgt = torch.randint(4, 50, (5, 7))
    with torch.no_grad():
        before = m(src, tgt)
        scale_queries_and_keys(m, 5.0)
        after = m(src, tgt)
    assert (torch.allclose(after, before, atol=1e-4)) is qk_norm
    assert (m.decoder.blocks[0].cross_attn.k_norm is not None) is qk_norm


def test_beam_search_scores_at_least_greedy():
    m, src = tiny_model(), sources()
    with torch.no_grad():
        def logp(hyps):
            tgt = [[m.bos_id] + h + [m.eos_id] for h in hyps]
            L = max(map(len, tgt))
            t = torch.tensor([x + [0] * (L - len(x)) for x in tgt])
            lp = torch.log_softmax(m(src, t[:, :-1]), -1).gather(-1, t[:, 1:, None])[..., 0]
            return (lp * (t[:, 1:] != 0)).sum(-1)
        g = m.greedy(src, max_len_a=1.0, max_len_b=5)
        b = m.beam_search(src, beam_size=6, length_penalty=0.0, max_len_a=1.0, max_len_b=5)
        ended = [i for i in range(5) if len(g[i]) < 14 and len(b[i]) < 14]
        assert (logp(b)[ended] >= logp(g)[ended] - 1e-4).all()


def test_token_batches_respect_budget():
    lengths = [5, 30, 7, 12, 30, 2, 19] * 20
    batches = length_batches(lengths, 64, seed=1)
    assert sorted(i for b in batches for i in b) == list(range(len(lengths)))
    assert all(max(lengths[i] for i in b) * len(b) <= 64 for b in batches)


def test_misaligned_files_name_both_counts(tmp_path):
    (tmp_path / "a.txt").write_text("one\ntwo\nthree\n")
    (tmp_path / "b.txt").write_text("uno\ndos\n")
    with pytest.raises(UserError, match=r"a.txt has 3 lines but .*b.txt has 2"):
        read_pairs(source=tmp_path / "a.txt", target=tmp_path / "b.txt")


def test_lines_break_at_line_ends_only(tmp_path):
    """U+2028, U+0085 and a form feed inside a sentence are not line ends (``str.splitlines``
    would break there, so two aligned files would not line up); a byte-order mark and CRLF
    ends are read as plain UTF-8 lines."""
    src, tgt = tmp_path / "a.en", tmp_path / "a.es"
    src.write_bytes("\ufeffone\u2028more\r\ntwo\x0cthree\r\nfour\x85five\r\n".encode())
    tgt.write_text("uno\ndos\ncuatro\n", encoding="utf-8")
    assert read_pairs(source=src, target=tgt) == [
        ("one\u2028more", "uno"), ("two\x0cthree", "dos"), ("four\x85five", "cuatro")]
    tsv = tmp_path / "a.tsv"
    tsv.write_bytes("\ufeffone\u2028more\tuno\r\ntwo\tdos\r\nx\ty\n".encode())
    assert read_pairs(tsv=tsv)[0] == ("one\u2028more", "uno")


def test_a_tsv_line_with_three_fields_is_named(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_text("a\tb\nc\td\t\ne\tf\textra\n", encoding="utf-8")  # line 2: a trailing TAB
    with pytest.raises(UserError, match=r"pairs\.tsv line 3 has 3 TAB-separated fields; "
                                        r"expected source<TAB>target"):
        read_pairs(tsv=tsv)


def make_cfg(run_dir, *overrides):
    with initialize_config_dir(str(ROOT / "conf"), version_base="1.3"):
        return compose("translation", overrides=[
            "model=seq2seq_tiny", f"data.train_file={FIXTURE}", "data.vocab_size=400",
            "data.dev_size=20", "data.test_size=20", "data.max_tokens=512",
            "trainer.max_steps=12", "trainer.val_check_interval=6", "trainer.log_every_n_steps=2",
            "scheduler.warmup_steps=2", "decode.batch_size=8", "decode.max_len_a=1.0",
            "decode.max_len_b=5", f"run_dir={run_dir}", *overrides])


def test_train_scores_and_translates(tmp_path, capsys):
    out = tmp_path / "run"
    res = tr_task.run(make_cfg(out))
    for name in ("results.json", "loss_curves.png", "test.hyp", "test.ref", "dev.tsv",
                 "test.tsv", "checkpoints/best.ckpt"):
        assert (out / name).is_file(), name
    assert res["pairs"] == {"dev": 20, "test": 20, "train": 166}
    assert "nrefs:1" in res["bleu_signature"]
    # our BLEU equals sacrebleu's own command line on the same files
    cli = subprocess.run([sys.executable, "-m", "sacrebleu", str(out / "test.ref"), "-i",
                          str(out / "test.hyp"), "-m", "bleu", "chrf", "-b", "-w", "4"],
                         capture_output=True, text=True, check=True)
    bleu, chrf = json.loads(cli.stdout)
    assert bleu == pytest.approx(res["bleu"], abs=1e-4)
    assert chrf == pytest.approx(res["chrf"], abs=1e-4)
    # the same split every run
    again = tmp_path / "again"
    tr_task.run(make_cfg(again, "trainer.max_steps=2"))
    assert (again / "test.tsv").read_text() == (out / "test.tsv").read_text()
    # decoding settings that could give no output are refused before training, not after
    with pytest.raises(UserError, match=r"decode.max_len_b=0 is not valid"):
        tr_task.run(make_cfg(tmp_path / "never", "decode.max_len_a=0", "decode.max_len_b=0"))
    assert not (tmp_path / "never" / "checkpoints").exists()
    # translate mode, from a file
    inp = tmp_path / "in.txt"
    inp.write_text("In the beginning God created the heaven and the earth.\nAnd God said.\n")
    tl = tr_task.run(make_cfg(tmp_path / "t1", "mode=translate",
                              f"ckpt={out}/checkpoints/best.ckpt", f"input={inp}"))
    assert len(tl["translations"]) == 2 and tl["langs"] == ["en", "es"] and not tl["cut_lines"]
    assert json.loads((tmp_path / "t1" / "translate.json").read_text()) == tl
    # a line longer than the model's source length is translated from its start, and said
    long = " ".join(["And God said, Let there be light: and there was light."] * 40)
    inp.write_text(f"And God said.\n{long}\n")
    tl = tr_task.run(make_cfg(tmp_path / "t2", "mode=translate",
                              f"ckpt={out}/checkpoints/best.ckpt", f"input={inp}"))
    assert len(tl["translations"]) == 2 and tl["cut_lines"] == [2]
    assert "note: 1 input line(s) have more than the model's" in capsys.readouterr().err
    # a resume with other split sizes would test on pairs it trained on
    before = (out / "test.tsv").read_bytes()
    with pytest.raises(UserError, match="was trained on another split of the data"):
        tr_task.run(make_cfg(out, "resume=auto", "data.test_size=30", "trainer.max_steps=14"))
    assert (out / "test.tsv").read_bytes() == before


def test_init_from_reads_new_text_with_the_checkpoints_tokenizer(tmp_path):
    """Fine-tuning on other pairs keeps the checkpoint's tokenizer, as its embedding rows
    stand for those pieces; a config-trained one would give the same shapes, other pieces."""
    tr_task.run(make_cfg(tmp_path / "a", "trainer.max_steps=2"))
    ckpt = tmp_path / "a" / "checkpoints" / "last.ckpt"
    res = tr_task.run(make_cfg(tmp_path / "b", f"init_from={ckpt}", "data.max_pairs=120",
                               "trainer.max_steps=2"))
    assert res["init_from"]["loaded"] > 0 and not res["init_from"]["missing"]
    first = (tmp_path / "a" / "tokenizer.model").read_bytes()
    assert (tmp_path / "b" / "tokenizer.model").read_bytes() == first
    tr_task.run(make_cfg(tmp_path / "c", "data.max_pairs=120", "trainer.max_steps=1"))
    other = tmp_path / "c" / "tokenizer.model"
    assert other.read_bytes() != first  # what the pairs alone would have given
    with pytest.raises(UserError, match=r"data.tokenizer=.*tokenizer.model is not the "
                                        r"tokenizer .*last.ckpt was trained with"):
        tr_task.run(make_cfg(tmp_path / "d", f"init_from={ckpt}", f"data.tokenizer={other}"))


def test_translate_from_stdin_cli(tmp_path):
    out = tmp_path / "run"
    tr_task.run(make_cfg(out, "trainer.max_steps=2", "trainer.val_check_interval=2"))
    env = dict(os.environ, ATTNKIT_DATA=str(tmp_path / "cache"))
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.translation", "mode=translate",
         f"ckpt={out}/checkpoints/best.ckpt", "input=-", "decode.beam_size=2",
         f"hydra.run.dir={tmp_path / 'hydra'}"],
        input="God saw the light.\u2028And\x0cthe evening\r\nAnd there\rwas light\n",
        capture_output=True, text=True, encoding="utf-8", cwd=ROOT, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.count("\n") == 3, proc.stdout  # output line N translates input line N
    saved = json.loads((tmp_path / "hydra" / "translate.json").read_text())
    assert saved["translations"] == proc.stdout.splitlines()  # and its path went to stderr
    assert f"results: {tmp_path / 'hydra' / 'translate.json'}" in proc.stderr
    latin1 = subprocess.run(
        [sys.executable, "-m", "tasks.translation", "mode=translate",
         f"ckpt={out}/checkpoints/best.ckpt", "input=-", f"hydra.run.dir={tmp_path / 'h2'}"],
        input=b"caf\xe9 ok\n", capture_output=True, cwd=ROOT, env=env, timeout=300)
    err = latin1.stderr.decode()
    assert latin1.returncode == 2 and "Traceback" not in err, err[-2000:]
    assert err.strip().splitlines()[-1].startswith("error: input=- (stdin) is not UTF-8 text")


@pytest.mark.slow
def test_ddp_two_processes_train_and_score_once(tmp_path):
    """Two CPU processes take equal numbers of training batches (no rank waits on another)
    and write one run directory, scored once on the whole test split."""
    env = dict(os.environ, ATTNKIT_DATA=str(tmp_path / "cache"))
    out = tmp_path / "run"
    proc = subprocess.run(
        [sys.executable, "-m", "tasks.translation", "trainer=ddp", "model=seq2seq_tiny",
         f"data.train_file={FIXTURE}", "data.vocab_size=400", "data.dev_size=20",
         "data.test_size=20", "data.max_tokens=512", "trainer.max_steps=8",
         "trainer.val_check_interval=4", "scheduler.warmup_steps=2", "decode.batch_size=8",
         "decode.max_len_a=1.0", "decode.max_len_b=5", f"run_dir={out}",
         f"hydra.run.dir={tmp_path / 'hydra'}"],
        cwd=ROOT, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out / "results.json").read_text())
    assert res["steps"] == 8
    assert len((out / "test.hyp").read_text().splitlines()) == 20


def test_translations_stay_one_line_each():
    one_line = tr_task.one_line
    breaks = "\n\r\x0b\x0c\x1c\x1d\x1e\x85\u2028\u2029"
    text = "a" + "b".join(breaks) + "c"
    assert len(text.splitlines()) > 1
    assert one_line(text).splitlines() == [text.translate({ord(c): " " for c in breaks})]
    assert one_line("¿Qué es esto?\tbien") == "¿Qué es esto?\tbien"



def test_corpus_files_that_are_not_utf8_or_conflict_are_named(tmp_path):
    tsv = tmp_path / "pairs.tsv"
    tsv.write_bytes(b"a\tb\n\xff\xfe\tc\n")
    with pytest.raises(UserError, match=r"pairs\.tsv is not UTF-8 text"):
        read_pairs(tsv=tsv)
    with pytest.raises(UserError, match="are both given"):
        read_pairs(tsv=tsv, source=tmp_path / "x.fr", target=tmp_path / "x.en")
