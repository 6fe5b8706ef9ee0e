"""Import foreign checkpoints into our modules (kept apart from the model code).

- Hugging Face Llama-format directories (``config.json`` + ``*.safetensors``) into
  ``CausalLM``: our fused ``qkv_proj`` / ``gate_up_proj`` are the concatenation of their
  separate projections; RoPE already uses the same rotate-half layout. ``hf_llama_init``
  takes every architecture setting from ``config.json`` and refuses what ``CausalLM``
  cannot express (RoPE scaling, biases, another model type) instead of loading it wrong.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .lm import CausalLM

log = logging.getLogger(__name__)


def _refuse(key: str, value, expected: str) -> ValueError:
    return ValueError(f"config.json has {key}={value!r}; expected {expected}")


def _rope_theta(cfg: dict) -> float:
    # transformers 5 writes rope_parameters; earlier versions rope_theta and rope_scaling.
    for key in ("rope_parameters", "rope_scaling"):
        params = cfg.get(key) or {}
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", None):
            raise _refuse(key, params, "plain RoPE (rope_type 'default'); RoPE scaling is "
                                       "not supported")
    params = cfg.get("rope_parameters") or {}
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def llama_kwargs_from_hf(cfg: dict) -> dict:
    """CausalLM constructor arguments from a Hugging Face LlamaConfig dict.

    Raises:
        ValueError: naming the key and value for what ``CausalLM`` cannot express: another
            model_type, biases, an activation other than SiLU, RoPE scaling.
    """
    if cfg.get("model_type", "llama") != "llama":
        raise _refuse("model_type", cfg.get("model_type"), "'llama'")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise _refuse(key, cfg[key], "false (CausalLM projections have no bias)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", cfg["hidden_act"], "'silu' (the SwiGLU of Llama)")
    return dict(
        vocab_size=cfg["vocab_size"], embed_dim=cfg["hidden_size"],
        depth=cfg["num_hidden_layers"], num_heads=cfg["num_attention_heads"],
        num_kv_heads=cfg.get("num_key_value_heads") or cfg["num_attention_heads"],
        head_dim=cfg.get("head_dim"), mlp_hidden_dim=cfg["intermediate_size"],
        max_seq_len=cfg.get("max_position_embeddings", 2048), rope_theta=_rope_theta(cfg),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        norm_eps=cfg.get("rms_norm_eps", 1e-6))


def llama_state_dict_from_hf(hf: dict[str, Tensor], depth: int,
                             tie_embeddings: bool = False) -> dict[str, Tensor]:
    """Rename and fuse a Hugging Face Llama state dict into ``CausalLM`` keys."""
    hf = {k.removeprefix("model."): v for k, v in hf.items()}
    sd = {"embed.weight": hf.pop("embed_tokens.weight"),
          "decoder.norm.weight": hf.pop("norm.weight")}
    lm_head = hf.pop("lm_head.weight", None)
    sd["lm_head.weight"] = sd["embed.weight"] if tie_embeddings or lm_head is None else lm_head
    for i in range(depth):
        src, dst = f"layers.{i}.", f"decoder.blocks.{i}."
        a, m = src + "self_attn.", src + "mlp."
        sd[dst + "attn.qkv_proj.weight"] = torch.cat(
            [hf.pop(a + f"{p}_proj.weight") for p in "qkv"])
        sd[dst + "attn.out_proj.weight"] = hf.pop(a + "o_proj.weight")
        sd[dst + "mlp.gate_up_proj.weight"] = torch.cat(
            [hf.pop(m + "gate_proj.weight"), hf.pop(m + "up_proj.weight")])
        sd[dst + "mlp.down_proj.weight"] = hf.pop(m + "down_proj.weight")
        sd[dst + "norm1.weight"] = hf.pop(src + "input_layernorm.weight")
        sd[dst + "norm2.weight"] = hf.pop(src + "post_attention_layernorm.weight")
    leftover = [k for k in hf if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"unexpected keys in the Llama checkpoint: {leftover[:5]}")
    return sd


def _hf_dir(path: str | Path) -> tuple[dict, list[Path]]:
    """config.json (parsed) and the safetensors files of a Hugging Face model directory."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json; expected a Hugging Face Llama "
                         f"directory with config.json and *.safetensors weights")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(f.name for f in path.glob("*.bin"))
        note = f" ({pickled[0]} is not read: loading it would unpickle)" if pickled else ""
        raise ValueError(f"{path} has no *.safetensors weights{note}; expected "
                         f"model.safetensors or its shards")
    return json.loads((path / "config.json").read_text()), files


def _read_safetensors(files: list[Path]) -> dict[str, Tensor]:
    from safetensors.torch import load_file  # plain tensors, never unpickled

    hf: dict[str, Tensor] = {}
    for f in files:
        hf.update(load_file(str(f)))
    return hf


def hf_llama_init(path: str | Path, model_kwargs: Mapping) -> tuple[dict, dict[str, Tensor]]:
    """``CausalLM`` arguments and weights for starting from a Hugging Face Llama directory.

    Every architecture field comes from ``config.json``: vocab_size, embed_dim, depth,
    num_heads, num_kv_heads, head_dim, mlp_hidden_dim, rope_theta, norm_eps and
    tie_embeddings replace the caller's values (each change is logged). The caller's
    ``max_seq_len`` is kept when it is at most the checkpoint's max_position_embeddings
    (a shorter context only sizes the RoPE table and caches; taken from the checkpoint when
    missing or None); a longer one is refused, as the checkpoint's positions were never
    trained past it. Other fields (backend, drop, attn_drop, ``_target_``) are kept.

    Args:
        path: directory with ``config.json`` and ``*.safetensors`` (one file or shards);
            weights are read with safetensors only, never unpickled.
        model_kwargs: the caller's ``CausalLM`` arguments (not modified).

    Returns:
        ``(kwargs, state_dict)``: ``CausalLM(**kwargs)`` loads ``state_dict`` strictly.

    Raises:
        ValueError: one sentence naming the key, the checkpoint's value and what is
            expected: no config.json, no safetensors, model_type, biases, activation,
            RoPE scaling, or a max_seq_len past the checkpoint's.
    """
    cfg, files = _hf_dir(path)
    arch = llama_kwargs_from_hf(cfg)
    ckpt_len = arch.pop("max_seq_len")
    kwargs = dict(model_kwargs)
    if kwargs.get("max_seq_len") is None:
        kwargs["max_seq_len"] = ckpt_len
    elif kwargs["max_seq_len"] > ckpt_len:
        raise ValueError(f"max_seq_len={kwargs['max_seq_len']} is longer than config.json's "
                         f"max_position_embeddings={ckpt_len}; expected at most {ckpt_len}")
    changed = {k: (kwargs[k], v) for k, v in arch.items() if k in kwargs and kwargs[k] != v}
    if changed:
        log.info("init from %s: taken from its config.json: %s", path,
                 ", ".join(f"{k} {old!r} -> {new!r}" for k, (old, new) in changed.items()))
    kwargs.update(arch)
    state = llama_state_dict_from_hf(_read_safetensors(files), kwargs["depth"],
                                     kwargs["tie_embeddings"])
    return kwargs, state


def load_hf_llama(path: str | Path, **overrides) -> CausalLM:
    """Build a ``CausalLM`` from a local Hugging Face Llama directory.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` (or shards).
        overrides: constructor arguments to change (e.g. ``backend``, ``drop``).
    """
    cfg, files = _hf_dir(path)
    kwargs = llama_kwargs_from_hf(cfg) | overrides
    model = CausalLM(**kwargs)
    sd = llama_state_dict_from_hf(_read_safetensors(files), kwargs["depth"],
                                  kwargs["tie_embeddings"])
    model.load_state_dict(sd, strict=True)
    return model


# --------------------------------------------------------------------------- timm ViT
def vit_state_dict_from_timm(sd: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """Rename a timm ``VisionTransformer`` state dict into ``modules.vit`` keys.

    timm's fused ``qkv`` is laid out (q, k, v) like our ``qkv_proj``; ``fc_norm`` (used by
    timm with mean pooling) is not supported, timm's final ``norm`` maps to ours.
    """
    sd = dict(sd)
    out = {"patch_embed.proj.weight": sd.pop("patch_embed.proj.weight"),
           "patch_embed.proj.bias": sd.pop("patch_embed.proj.bias"),
           "encoder.norm.weight": sd.pop("norm.weight"), "encoder.norm.bias": sd.pop("norm.bias"),
           "head.weight": sd.pop("head.weight"), "head.bias": sd.pop("head.bias")}
    for name in ("cls_token", "pos_embed"):
        if name in sd:
            out[name] = sd.pop(name)
    names = {"norm1": "norm1", "attn.qkv": "attn.qkv_proj", "attn.proj": "attn.out_proj",
             "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(depth):
        for src, dst in names.items():
            for p in ("weight", "bias"):
                key = f"blocks.{i}.{src}.{p}"
                if key in sd:
                    out[f"encoder.blocks.{i}.{dst}.{p}"] = sd.pop(key)
    leftover = list(sd)
    if leftover:
        raise ValueError(f"unsupported keys in the timm checkpoint: {leftover[:5]}")
    return out


# --------------------------------------------------------------------------- torchaudio Conformer
def conformer_state_dict_from_torchaudio(sd: dict[str, Tensor], depth: int) -> dict[str, Tensor]:
    """Rename a ``torchaudio.models.Conformer`` state dict into ``modules.speech.Conformer``
    keys (its convolutions of kernel 1 become our linear maps; its ``in_proj`` is our fused
    ``qkv_proj``). Only torchaudio's BatchNorm convolution module (``use_group_norm=False``)
    and ``convolution_first=False`` have a counterpart."""
    out: dict[str, Tensor] = {}
    for i in range(depth):
        src, dst = f"conformer_layers.{i}.", f"blocks.{i}."
        for ours, theirs in (("ff1", "ffn1"), ("ff2", "ffn2")):
            for j in (0, 1, 4):
                for p in ("weight", "bias"):
                    out[f"{dst}{ours}.{j}.{p}"] = sd[f"{src}{theirs}.sequential.{j}.{p}"]
        for p in ("weight", "bias"):
            out[f"{dst}attn_norm.{p}"] = sd[f"{src}self_attn_layer_norm.{p}"]
            out[f"{dst}attn.out_proj.{p}"] = sd[f"{src}self_attn.out_proj.{p}"]
            out[f"{dst}conv_norm.{p}"] = sd[f"{src}conv_module.layer_norm.{p}"]
            out[f"{dst}conv.depthwise.{p}"] = sd[f"{src}conv_module.sequential.2.{p}"]
            out[f"{dst}conv.norm.{p}"] = sd[f"{src}conv_module.sequential.3.{p}"]
            out[f"{dst}norm.{p}"] = sd[f"{src}final_layer_norm.{p}"]
        out[f"{dst}attn.qkv_proj.weight"] = sd[f"{src}self_attn.in_proj_weight"]
        out[f"{dst}attn.qkv_proj.bias"] = sd[f"{src}self_attn.in_proj_bias"]
        for stat in ("running_mean", "running_var", "num_batches_tracked"):
            out[f"{dst}conv.norm.{stat}"] = sd[f"{src}conv_module.sequential.3.{stat}"]
        for ours, theirs in (("pointwise_in", 0), ("pointwise_out", 5)):
            out[f"{dst}conv.{ours}.weight"] = sd[f"{src}conv_module.sequential.{theirs}.weight"][..., 0]
            out[f"{dst}conv.{ours}.bias"] = sd[f"{src}conv_module.sequential.{theirs}.bias"]
    return out
