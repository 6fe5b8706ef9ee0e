"""Import foreign checkpoints into our modules (kept apart from the model code).

- Hugging Face Llama-format directories (``config.json`` + ``*.safetensors``) into
  ``CausalLM``: our fused ``qkv_proj`` / ``gate_up_proj`` are the concatenation of their
  separate projections; RoPE already uses the same rotate-half layout.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor

from .lm import CausalLM


def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    scaling = cfg.get("rope_scaling") or {}
    kind = params.get("rope_type", scaling.get("rope_type", scaling.get("type", "default")))
    if kind not in ("default", None):
        raise ValueError(f"RoPE scaling type {kind!r} is not supported; only plain RoPE "
                         f"(rope_type 'default') checkpoints import")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def llama_kwargs_from_hf(cfg: dict) -> dict:
    """CausalLM constructor arguments from a Hugging Face LlamaConfig dict."""
    if cfg.get("model_type", "llama") != "llama":
        raise ValueError(f"expected a Llama checkpoint (model_type 'llama'), got "
                         f"{cfg.get('model_type')!r}")
    if cfg.get("attention_bias") or cfg.get("mlp_bias"):
        raise ValueError("Llama checkpoints with attention_bias or mlp_bias are not supported")
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


def load_hf_llama(path: str | Path, **overrides) -> CausalLM:
    """Build a ``CausalLM`` from a local Hugging Face Llama directory.

    Args:
        path: directory with ``config.json`` and ``model.safetensors`` (or shards).
        overrides: constructor arguments to change (e.g. ``backend``, ``drop``).
    """
    from safetensors.torch import load_file

    path = Path(path)
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise FileNotFoundError(f"{path} is not a Hugging Face model directory: "
                                f"no config.json in it")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors weights in {path}")
    kwargs = llama_kwargs_from_hf(json.loads(cfg_file.read_text())) | overrides
    hf: dict[str, Tensor] = {}
    for f in files:
        hf.update(load_file(str(f)))
    model = CausalLM(**kwargs)
    sd = llama_state_dict_from_hf(hf, kwargs["depth"], kwargs["tie_embeddings"])
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
