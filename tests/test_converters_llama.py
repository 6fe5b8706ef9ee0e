"""Starting from a Hugging Face Llama directory: every architecture setting comes from its
config.json (checked against transformers' logits on the same weights), and what CausalLM
cannot express is refused with the key and value named."""

import json
import pickle
import shutil

import pytest
import torch

from modules.converters import hf_llama_init
from modules.lm import CausalLM

# The caller's config: every architecture field differs from the checkpoints below.
USER = dict(_target_="modules.lm.CausalLM", vocab_size=100, embed_dim=48, depth=3,
            num_heads=6, num_kv_heads=3, head_dim=None, mlp_hidden_dim=96, max_seq_len=32,
            rope_theta=10000.0, tie_embeddings=False, norm_eps=1e-6, drop=0.0,
            attn_drop=0.0, backend="math")


def save_llama(path, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = dict(vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
               num_attention_heads=4, num_key_value_heads=2, rope_theta=50000.0,
               rms_norm_eps=1e-5, max_position_embeddings=64, tie_word_embeddings=False)
    hf = LlamaForCausalLM(LlamaConfig(**(cfg | overrides))).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:  # non-trivial norm weights, so their import is tested too
                p.uniform_(0.5, 1.5)
            if name.endswith(("q_proj.weight", "k_proj.weight")):
                p.mul_(4.0)  # peaked attention, which depends visibly on rope_theta
    hf.save_pretrained(path, safe_serialization=True)
    return hf


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("llama")
    save_llama(path)
    return path


@pytest.mark.parametrize("overrides", [{}, {"tie_word_embeddings": True, "head_dim": 16}],
                         ids=["untied", "tied-head_dim16"])
def test_init_takes_architecture_from_config_and_matches_transformers(
        tmp_path, monkeypatch, overrides):
    hf = save_llama(tmp_path, **overrides)

    def refuse(*args, **kwargs):
        raise AssertionError("checkpoint weights must not be unpickled")
    for mod, name in ((torch, "load"), (pickle, "load"), (pickle, "loads")):
        monkeypatch.setattr(mod, name, refuse)
    kwargs, state = hf_llama_init(tmp_path, USER)
    monkeypatch.undo()

    assert USER["vocab_size"] == 100  # the caller's dict is left alone
    assert {k: kwargs[k] for k in ("vocab_size", "embed_dim", "depth", "num_heads",
                                   "num_kv_heads", "mlp_hidden_dim", "rope_theta",
                                   "norm_eps")} == dict(
        vocab_size=64, embed_dim=32, depth=2, num_heads=4, num_kv_heads=2, mlp_hidden_dim=64,
        rope_theta=50000.0, norm_eps=1e-5)
    assert kwargs["tie_embeddings"] == bool(overrides)
    assert kwargs["head_dim"] == overrides.get("head_dim", 8)
    # not architecture: the caller's values stay (a shorter context is allowed)
    assert {k: kwargs[k] for k in ("_target_", "backend", "drop", "max_seq_len")} == dict(
        _target_="modules.lm.CausalLM", backend="math", drop=0.0, max_seq_len=32)

    kwargs.pop("_target_")
    tokens = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        want = hf(tokens).logits
        ours = CausalLM(**kwargs).eval()
        ours.load_state_dict(state, strict=True)
        torch.testing.assert_close(ours(tokens), want, rtol=0, atol=1e-5)
        # the comparison has teeth: the caller's rope_theta or norm_eps would not match
        for key in ("rope_theta", "norm_eps"):
            wrong = CausalLM(**(kwargs | {key: USER[key]})).eval()
            wrong.load_state_dict(state, strict=True)
            assert (wrong(tokens) - want).abs().max() > 1e-3, key


def test_missing_max_seq_len_comes_from_checkpoint(llama_dir):
    kwargs, _ = hf_llama_init(llama_dir, USER | {"max_seq_len": None})
    assert kwargs["max_seq_len"] == 64


def edited(src, dst, **changes):
    shutil.copytree(src, dst)
    cfg = json.loads((dst / "config.json").read_text())
    (dst / "config.json").write_text(json.dumps(cfg | changes))
    return dst


@pytest.mark.parametrize("changes,message", [
    ({"model_type": "mistral"}, r"model_type='mistral'; expected 'llama' or 'qwen3'"),
    ({"use_sliding_window": True}, r"use_sliding_window=True; expected false"),
    ({"attention_bias": True}, r"attention_bias=True; expected false"),
    ({"mlp_bias": True}, r"mlp_bias=True; expected false"),
    ({"hidden_act": "gelu"}, r"hidden_act='gelu'; expected 'silu'"),
    ({"rope_parameters": {"rope_type": "llama3", "factor": 8.0, "rope_theta": 50000.0}},
     r"rope_parameters=\{'rope_type': 'llama3'.*\}; expected plain RoPE"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}},
     r"rope_scaling=\{'type': 'linear'.*\}; expected plain RoPE"),
    ({"rope_scaling": "yes"}, r"rope_scaling='yes'; expected an object of RoPE settings"),
    ({"num_hidden_layers": "2"}, r"num_hidden_layers='2'; expected a positive whole number"),
    ({"vocab_size": 0}, r"vocab_size=0; expected a positive whole number"),
    ({"rms_norm_eps": "small"}, r"rms_norm_eps='small'; expected a positive number"),
], ids=["model_type", "sliding_window", "attention_bias", "mlp_bias", "hidden_act", "rope_parameters",
        "rope_scaling", "rope_scaling_text", "depth_text", "vocab_zero", "eps_text"])
def test_refuses_what_causal_lm_cannot_express(llama_dir, tmp_path, changes, message):
    path = edited(llama_dir, tmp_path / "ckpt", **changes)
    with pytest.raises(ValueError, match=message):
        hf_llama_init(path, USER)


def test_a_config_that_is_not_an_object_or_lacks_a_size_is_named(llama_dir, tmp_path):
    path = shutil.copytree(llama_dir, tmp_path / "ckpt")
    (path / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config.json holds a list; expected an object"):
        hf_llama_init(path, USER)
    path = edited(llama_dir, tmp_path / "ckpt2", num_hidden_layers=None)
    with pytest.raises(KeyError, match="num_hidden_layers"):  # named as lacking by the task
        hf_llama_init(path, USER)


def test_refuses_longer_context_than_checkpoint(llama_dir):
    with pytest.raises(ValueError, match=r"max_seq_len=128 is longer than config.json's "
                                         r"max_position_embeddings=64; expected at most 64"):
        hf_llama_init(llama_dir, USER | {"max_seq_len": 128})


def test_refuses_directory_without_config(llama_dir, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(llama_dir, path)
    (path / "config.json").unlink()
    with pytest.raises(ValueError, match=r"ckpt has no config.json; expected a Hugging Face"):
        hf_llama_init(path, USER)


def test_refuses_pickled_weights(llama_dir, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(llama_dir, path)
    (path / "model.safetensors").unlink()
    (path / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(ValueError, match=r"no \*\.safetensors weights \(pytorch_model.bin is "
                                         r"not read: loading it would unpickle\); expected"):
        hf_llama_init(path, USER)


def test_qwen3_directory_sets_qk_norm_and_matches_transformers(tmp_path):
    """Queries and keys normalised per head before RoPE, as Qwen3 does; the flag comes from
    config.json (and a Llama directory turns a caller's qk_norm off)."""
    from transformers import Qwen3Config, Qwen3ForCausalLM

    torch.manual_seed(0)
    hf = Qwen3ForCausalLM(Qwen3Config(
        vocab_size=64, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, rope_theta=50000.0,
        # an eps near the queries' and keys' mean square, so the q/k norms must use it too
        rms_norm_eps=0.05, max_position_embeddings=64, tie_word_embeddings=False,
        attention_bias=False, use_sliding_window=False)).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:  # non-trivial norm weights, the q/k ones included
                p.uniform_(0.5, 1.5)
            if name.endswith(("v_proj.weight", "o_proj.weight")):
                p.mul_(10.0)  # attention outputs that weigh in the logits
    hf.save_pretrained(tmp_path / "qwen3", safe_serialization=True)
    kwargs, state = hf_llama_init(tmp_path / "qwen3", USER)
    assert kwargs["qk_norm"] is True and "decoder.blocks.1.attn.k_norm.weight" in state
    kwargs.pop("_target_")
    ours = CausalLM(**kwargs).eval()
    ours.load_state_dict(state, strict=True)
    tokens = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        want = hf(tokens).logits
        torch.testing.assert_close(ours(tokens), want, rtol=0, atol=1e-5)
        # incremental decoding on the cache normalises the new keys the same way
        caches = ours.new_caches(2, 32)
        steps = [ours(tokens[:, :12], caches=caches)] + [
            ours(tokens[:, t:t + 1], caches=caches) for t in range(12, 20)]
        torch.testing.assert_close(torch.cat(steps, 1), want, rtol=0, atol=1e-5)
        # the comparison has teeth: the same weights without the norms differ
        plain = CausalLM(**(kwargs | {"qk_norm": False})).eval()
        plain.load_state_dict({k: v for k, v in state.items() if "_norm." not in k},
                              strict=True)
        assert (plain(tokens) - want).abs().max() > 1e-3
    save_llama(tmp_path / "llama")
    kwargs, _ = hf_llama_init(tmp_path / "llama", USER | {"qk_norm": True, "value_embeds": 2,
                                                         "bigram_buckets": 4096})
    # nor does it have our extra tables: a caller's are turned off, so the weights load
    assert kwargs["qk_norm"] is False
    assert kwargs["value_embeds"] == 0 and kwargs["bigram_buckets"] == 0
