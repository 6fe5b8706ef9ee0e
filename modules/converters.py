"""Import foreign checkpoints into our modules (kept apart from the model code).

- Hugging Face Llama and Qwen3 directories (``config.json`` + ``*.safetensors``) into
  ``CausalLM``: our fused ``qkv_proj`` / ``gate_up_proj`` are the concatenation of their
  separate projections; RoPE already uses the same rotate-half layout; Qwen3's per-head
  query and key norms are ``qk_norm``. ``hf_llama_init``
  takes every architecture setting from ``config.json`` and refuses what ``CausalLM``
  cannot express (RoPE scaling, biases, another model type) instead of loading it wrong.
- timm ``VisionTransformer`` state dicts into ``modules.vit.VisionTransformer``.
- torchaudio ``Conformer`` state dicts into ``modules.speech.Conformer``.
- OpenCLIP ``CLIP`` state dicts (ViT image tower, built-in text transformer) into
  ``modules.fusion.TextImageModel``: ``clip_kwargs_from_open_clip`` reads the sizes from
  the tensor shapes and takes what no tensor stores (heads, activation, pooling) as
  arguments, refusing QuickGELU and other towers; ``clip_state_dict_from_open_clip``
  renames the keys (``nn.MultiheadAttention``'s ``in_proj`` is our fused ``qkv_proj``).
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Mapping
from pathlib import Path

import torch
from torch import Tensor

from .lm import CausalLM

log = logging.getLogger(__name__)


def _refuse(key: str, value, expected: str) -> ValueError:
    return ValueError(f"config.json has {key}={value!r}; expected {expected}")


def _number(cfg: dict, key: str, default=None, whole: bool = True):
    """``cfg[key]`` (``default`` where absent or null) if it is a positive whole number (or,
    with ``whole=False``, any positive number); else a ``ValueError`` naming it."""
    value = cfg.get(key)
    if value is None:
        if default is None:
            raise KeyError(key)
        return default
    kinds = int if whole else (int, float)
    if not isinstance(value, kinds) or isinstance(value, bool) or value <= 0:
        raise _refuse(key, value, "a positive whole number" if whole else "a positive number")
    return value


def _rope_theta(cfg: dict) -> float:
    # transformers 5 writes rope_parameters; earlier versions rope_theta and rope_scaling.
    for key in ("rope_parameters", "rope_scaling"):
        params = cfg.get(key) or {}
        if not isinstance(params, dict):
            raise _refuse(key, params, "an object of RoPE settings, or null")
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ("default", None):
            raise _refuse(key, params, "plain RoPE (rope_type 'default'); RoPE scaling is "
                                       "not supported")
    params = cfg.get("rope_parameters") or {}
    return float(_number(params, "rope_theta", _number(cfg, "rope_theta", 10000.0, False),
                         whole=False))


def llama_kwargs_from_hf(cfg: dict) -> dict:
    """CausalLM constructor arguments from a Hugging Face LlamaConfig or Qwen3Config dict.

    Raises:
        ValueError: naming the key and value for what ``CausalLM`` cannot express: another
            model_type, biases, an activation other than SiLU, RoPE scaling, sliding-window
            attention.
    """
    if not isinstance(cfg, dict):
        raise ValueError(f"config.json holds a {type(cfg).__name__}; expected an object of "
                         f"settings")
    model_type = cfg.get("model_type", "llama")
    if model_type not in ("llama", "qwen3"):
        raise _refuse("model_type", model_type, "'llama' or 'qwen3'")
    if cfg.get("use_sliding_window"):
        raise _refuse("use_sliding_window", cfg["use_sliding_window"],
                      "false (CausalLM attends to the whole context)")
    for key in ("attention_bias", "mlp_bias"):
        if cfg.get(key):
            raise _refuse(key, cfg[key], "false (CausalLM projections have no bias)")
    if cfg.get("hidden_act", "silu") != "silu":
        raise _refuse("hidden_act", cfg["hidden_act"], "'silu' (the SwiGLU of Llama)")
    heads = _number(cfg, "num_attention_heads")
    return dict(
        vocab_size=_number(cfg, "vocab_size"), embed_dim=_number(cfg, "hidden_size"),
        depth=_number(cfg, "num_hidden_layers"), num_heads=heads,
        num_kv_heads=_number(cfg, "num_key_value_heads", heads),
        head_dim=None if cfg.get("head_dim") is None else _number(cfg, "head_dim"),
        mlp_hidden_dim=_number(cfg, "intermediate_size"),
        max_seq_len=_number(cfg, "max_position_embeddings", 2048), rope_theta=_rope_theta(cfg),
        tie_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        qk_norm=model_type == "qwen3", bigram_buckets=0, value_embeds=0,
        norm_eps=_number(cfg, "rms_norm_eps", 1e-6, whole=False))


def llama_state_dict_from_hf(hf: dict[str, Tensor], depth: int,
                             tie_embeddings: bool = False) -> dict[str, Tensor]:
    """Rename and fuse a Hugging Face Llama (or Qwen3) state dict into ``CausalLM`` keys."""
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
        for n in "qk":  # Qwen3's per-head norms
            if a + f"{n}_norm.weight" in hf:
                sd[dst + f"attn.{n}_norm.weight"] = hf.pop(a + f"{n}_norm.weight")
        sd[dst + "mlp.gate_up_proj.weight"] = torch.cat(
            [hf.pop(m + "gate_proj.weight"), hf.pop(m + "up_proj.weight")])
        sd[dst + "mlp.down_proj.weight"] = hf.pop(m + "down_proj.weight")
        sd[dst + "norm1.weight"] = hf.pop(src + "input_layernorm.weight")
        sd[dst + "norm2.weight"] = hf.pop(src + "post_attention_layernorm.weight")
    leftover = [k for k in hf if not k.endswith("rotary_emb.inv_freq")]
    if leftover:
        raise ValueError(f"unexpected keys in the Llama/Qwen3 checkpoint: {leftover[:5]}")
    return sd


def _hf_dir(path: str | Path, kind: str = "a Hugging Face Llama directory"
            ) -> tuple[dict, list[Path]]:
    """config.json (parsed) and the safetensors files of a Hugging Face model directory
    (``kind`` names what was expected, for the error)."""
    path = Path(path)
    if not (path / "config.json").is_file():
        raise ValueError(f"{path} has no config.json; expected {kind} with config.json and "
                         f"*.safetensors weights")
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickled = sorted(f.name for f in path.glob("*.bin"))
        note = f" ({pickled[0]} is not read: loading it would unpickle)" if pickled else ""
        raise ValueError(f"{path} has no *.safetensors weights{note}; expected "
                         f"model.safetensors or its shards")
    try:
        config = json.loads((path / "config.json").read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise ValueError(f"{path / 'config.json'} is not valid JSON ({exc}); expected a "
                         f"Hugging Face config.json") from None
    return config, files


def _read_safetensors(files: list[Path]) -> dict[str, Tensor]:
    from safetensors.torch import load_file  # plain tensors, never unpickled

    hf: dict[str, Tensor] = {}
    for f in files:
        try:
            hf.update(load_file(str(f)))
        except Exception as exc:  # safetensors' own error types
            raise ValueError(f"{f} cannot be read as safetensors ({type(exc).__name__}: "
                             f"{str(exc)[:100]}); it may be truncated") from None
    return hf


def hf_llama_init(path: str | Path, model_kwargs: Mapping) -> tuple[dict, dict[str, Tensor]]:
    """``CausalLM`` arguments and weights for starting from a Hugging Face Llama or Qwen3
    directory.

    Every architecture field comes from ``config.json``: vocab_size, embed_dim, depth,
    num_heads, num_kv_heads, head_dim, mlp_hidden_dim, rope_theta, norm_eps,
    tie_embeddings and qk_norm (Qwen3) replace the caller's values (each change is logged). The caller's
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
    """Build a ``CausalLM`` from a local Hugging Face Llama or Qwen3 directory.

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
def vit_state_dict_from_timm(sd: dict[str, Tensor], depth: int,
                             grid: int | None = None) -> dict[str, Tensor]:
    """Rename a timm ``VisionTransformer`` state dict into ``modules.vit`` keys.

    timm's fused ``qkv`` is laid out (q, k, v) like our ``qkv_proj``; its final ``norm``
    maps to the encoder's, its ``fc_norm`` (after mean pooling, in place of ``norm``) to
    ours (``fc_norm=True``). Its layer scale (``ls1``/``ls2``), register tokens
    (``reg_token``) and ``norm_pre`` (ours with ``pre_norm=True``) keep their keys. A
    position table without rows for the class and register tokens (timm's
    ``no_embed_class``, as DeiT III and DINOv2) gets zero rows for them. ``grid``, the
    patch grid of the model it goes into, tells the two layouts apart when the table is of
    that grid; otherwise (a table to be resized) it is read as a square grid alone or a
    square grid plus those tokens' rows, and one that reads both ways (a 3x3 grid without
    the rows of a class token and four registers, or a 2x2 grid with them) is an error.
    """
    sd = dict(sd)
    w = sd.pop("patch_embed.proj.weight")
    out = {"patch_embed.proj.weight": w,  # no bias beside norm_pre (CLIP's): zeros
           "patch_embed.proj.bias": sd.pop("patch_embed.proj.bias", w.new_zeros(w.shape[0])),
           "head.weight": sd.pop("head.weight"), "head.bias": sd.pop("head.bias")}
    norm = "fc_norm" if "fc_norm.weight" in sd else "norm"
    for p in ("weight", "bias"):
        out[f"encoder.norm.{p}" if norm == "norm" else f"fc_norm.{p}"] = sd.pop(f"{norm}.{p}")
    for name in ("cls_token", "reg_token", "pos_embed", "norm_pre.weight", "norm_pre.bias"):
        if name in sd:
            out[name] = sd.pop(name)
    prefix = ("cls_token" in out) + (out["reg_token"].shape[1] if "reg_token" in out else 0)
    rows = out["pos_embed"].shape[1] if out.get("pos_embed", torch.empty(0)).dim() == 3 else 0

    def square(n: int) -> bool:
        return n > 0 and math.isqrt(n) ** 2 == n

    if grid is not None and rows in (grid * grid, grid * grid + prefix):
        patches_only = prefix > 0 and rows == grid * grid
    elif prefix and square(rows) and square(rows - prefix):
        patch = w.shape[-1]
        raise ValueError(f"its position table of {rows} rows reads both as a grid alone and "
                         f"as a grid with the rows of its {prefix} class and register tokens; "
                         f"expected the image size it was trained at, "
                         f"{math.isqrt(rows) * patch} or {math.isqrt(rows - prefix) * patch} "
                         f"px, which tells them apart")
    else:
        patches_only = prefix > 0 and square(rows)
    if patches_only:
        # timm's ``no_embed_class``: the table covers the patches only and the class and
        # register tokens join after it is added; zero rows for them compute the same.
        pos = out["pos_embed"]
        out["pos_embed"] = torch.cat([pos.new_zeros(pos.shape[0], prefix, pos.shape[2]), pos], 1)
    names = {"norm1": "norm1", "attn.qkv": "attn.qkv_proj", "attn.proj": "attn.out_proj",
             "norm2": "norm2", "mlp.fc1": "mlp.fc1", "mlp.fc2": "mlp.fc2"}
    for i in range(depth):
        for src, dst in names.items():
            for p in ("weight", "bias"):
                key = f"blocks.{i}.{src}.{p}"
                if key in sd:
                    out[f"encoder.blocks.{i}.{dst}.{p}"] = sd.pop(key)
        for ls in ("ls1", "ls2"):  # layer scale (timm's init_values)
            if f"blocks.{i}.{ls}.gamma" in sd:
                out[f"encoder.blocks.{i}.{ls}.gamma"] = sd.pop(f"blocks.{i}.{ls}.gamma")
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


# --------------------------------------------------------------------------- OpenCLIP CLIP
# What a state dict cannot tell: the activation, the heads and the pooling. Each is an
# argument; values ``TextImageModel`` has no counterpart for are refused.
_OTHER_TOWERS = (("visual.layer1.", "a ModifiedResNet image tower"),
                 ("visual.trunk.", "a timm image tower"),
                 ("text.", "a separate text tower: CustomTextCLIP or Hugging Face"))
_OPEN_CLIP_BLOCK = {"ln_1": "norm1", "attn.in_proj": "attn.qkv_proj",
                    "attn.out_proj": "attn.out_proj", "ln_2": "norm2", "mlp.c_fc": "mlp.fc1",
                    "mlp.c_proj": "mlp.fc2"}


# The starting value of a tower's layer scale is not stored; the loaded gammas replace it.
OPEN_CLIP_LAYER_SCALE = 1e-5


def _open_clip_layer_scale(state: Mapping[str, Tensor], prefix: str) -> float | None:
    return (OPEN_CLIP_LAYER_SCALE if f"{prefix}transformer.resblocks.0.ls_1.gamma" in state
            else None)


def _open_clip_depth(state: Mapping[str, Tensor], prefix: str) -> int:
    head = prefix + "transformer.resblocks."
    return len({k[len(head):].split(".")[0] for k in state if k.startswith(head)})


def mlp_ratio_for(hidden: int, width: int) -> float:
    """The ``mlp_ratio`` that sizes a block's MLP at ``hidden`` for ``width``: the blocks
    take int(width * mlp_ratio), and a ratio such as 8192 / 1664 can round down by one,
    half a unit more cannot."""
    ratio = hidden / width
    return ratio if int(width * ratio) == hidden else (hidden + 0.5) / width


def _open_clip_mlp_ratio(state: Mapping[str, Tensor], prefix: str, width: int) -> float:
    return mlp_ratio_for(state[prefix + "transformer.resblocks.0.mlp.c_fc.weight"].shape[0],
                         width)


def _open_clip_heads(heads: int | None, width: int, name: str) -> int:
    heads = width // 64 if heads is None else heads
    if heads < 1 or width % heads:
        raise ValueError(f"{name}={heads} does not divide the width {width}; expected a "
                         f"divisor of {width} (OpenCLIP's default is width // 64)")
    return heads


def clip_kwargs_from_open_clip(state: Mapping[str, Tensor], *, vision_heads: int | None = None,
                               text_heads: int | None = None, quick_gelu: bool = False,
                               vision_pool: str = "tok", text_pool: str = "argmax") -> dict:
    """``modules.fusion.TextImageModel`` arguments for an OpenCLIP ``CLIP`` (ViT image tower,
    built-in text transformer), sizes read from the tensor shapes; no fusion encoder.

    Args:
        state: the ``open_clip.CLIP`` state dict.
        vision_heads, text_heads: attention heads (no tensor stores them); default
            width // 64, as OpenCLIP's configs and its OpenAI loader use.
        quick_gelu: whether the checkpoint was trained with QuickGELU (the OpenAI weights
            and the ``-quickgelu`` configs); refused, as our MLPs use exact GELU.
        vision_pool: OpenCLIP's ``vision_cfg.pool_type``; only ``"tok"`` (class token).
        text_pool: OpenCLIP's ``text_cfg.pool_type``; only ``"argmax"`` (the end-of-text
            token, which has the highest id), our ``pool="last"`` with the mask of
            ``open_clip_text_mask``.

    Raises:
        ValueError: naming the key or argument ``TextImageModel`` cannot express: QuickGELU,
            another pooling, a ModifiedResNet / timm / Hugging Face tower, a non-square
            position grid.
    """
    if quick_gelu:
        raise ValueError("quick_gelu=True: TextImageModel's MLPs use exact GELU, so "
                         "QuickGELU weights would load but compute something else; "
                         "expected quick_gelu=False")
    if vision_pool != "tok":
        raise ValueError(f"vision_pool={vision_pool!r}: expected 'tok' (class-token pooling)")
    if text_pool != "argmax":
        raise ValueError(f"text_pool={text_pool!r}: expected 'argmax' (end-of-text pooling)")
    for key in ("visual.conv1.weight", "visual.transformer.resblocks.0.ln_1.weight",
                "token_embedding.weight"):
        if key not in state:
            other = next((f"{k} ({what})" for k in state for prefix, what in _OTHER_TOWERS
                          if k.startswith(prefix)), "")
            raise ValueError(f"state dict has no {key}: expected an open_clip.CLIP with a ViT "
                             f"image tower and its own text transformer"
                             + (f"; it has {other}" if other else ""))
    pos = state["visual.positional_embedding"]
    conv = state["visual.conv1.weight"]
    width, in_chans, patch = conv.shape[0], conv.shape[1], conv.shape[-1]
    grid = math.isqrt(pos.shape[0] - 1)
    if grid * grid != pos.shape[0] - 1 or conv.shape[-2] != patch:
        raise ValueError(f"visual.positional_embedding has {pos.shape[0] - 1} patches with "
                         f"{tuple(conv.shape[-2:])} patches; expected a square grid of "
                         f"square patches")
    text_width = state["token_embedding.weight"].shape[1]
    vision = dict(img_size=grid * patch, patch_size=patch, in_chans=in_chans, embed_dim=width,
                  depth=_open_clip_depth(state, "visual."),
                  num_heads=_open_clip_heads(vision_heads, width, "vision_heads"),
                  mlp_ratio=_open_clip_mlp_ratio(state, "visual.", width), pool="token",
                  pos_embed="learned", pre_norm="visual.ln_pre.weight" in state,
                  qkv_bias=True, norm_eps=1e-5,
                  layer_scale=_open_clip_layer_scale(state, "visual."))
    text = dict(vocab_size=state["token_embedding.weight"].shape[0], embed_dim=text_width,
                depth=_open_clip_depth(state, ""),
                num_heads=_open_clip_heads(text_heads, text_width, "text_heads"),
                mlp_ratio=_open_clip_mlp_ratio(state, "", text_width),
                max_len=state["positional_embedding"].shape[0], pos_embed="learned",
                causal=True, pool="last", norm_eps=1e-5, qkv_bias=True,
                layer_scale=_open_clip_layer_scale(state, ""))
    return dict(vision=vision, text=text, embed_dim=state["visual.proj"].shape[1],
                fusion_depth=0, proj_bias=False,
                loss="siglip" if "logit_bias" in state else "clip")


def _open_clip_tower(sd: dict[str, Tensor], src: str, dst: str, depth: int) -> dict:
    out = {}
    for i in range(depth):
        for theirs, ours in _OPEN_CLIP_BLOCK.items():
            a, b = f"{src}transformer.resblocks.{i}.{theirs}", f"{dst}encoder.blocks.{i}.{ours}"
            # nn.MultiheadAttention's in_proj is (q; k; v) stacked, as our fused qkv_proj.
            sep = "_" if theirs == "attn.in_proj" else "."
            for p in ("weight", "bias"):
                out[f"{b}.{p}"] = sd.pop(f"{a}{sep}{p}")
        for theirs, ours in (("ls_1", "ls1"), ("ls_2", "ls2")):  # layer scale
            key = f"{src}transformer.resblocks.{i}.{theirs}.gamma"
            if key in sd:
                out[f"{dst}encoder.blocks.{i}.{ours}.gamma"] = sd.pop(key)
    return out


def clip_state_dict_from_open_clip(state: Mapping[str, Tensor], **kwargs
                                   ) -> dict[str, Tensor]:
    """Rename an OpenCLIP ``CLIP`` state dict into ``TextImageModel`` keys.

    ``TextImageModel(**clip_kwargs_from_open_clip(state, **kwargs))`` loads the result
    strictly. With ``fusion_depth > 0`` it loads with ``strict=False``, the fusion encoder
    and its heads (``fusion.``, ``match_head.``, ``answer_head.``) being the only keys missing.
    OpenCLIP's patch convolution has no bias: ours is set to zeros. Its ``proj`` and
    ``text_projection`` (``x @ proj``) are our ``Linear`` weights transposed.

    Args:
        state: the ``open_clip.CLIP`` state dict (read it with
            ``torch.load(path, weights_only=True)``).
        kwargs: as ``clip_kwargs_from_open_clip`` (checked the same way).

    Raises:
        ValueError: what ``clip_kwargs_from_open_clip`` refuses, and any key left over
            (an attentional pooler, a projection bias, qk-norm, ...).
    """
    arch = clip_kwargs_from_open_clip(state, **kwargs)
    sd = dict(state)
    width = arch["vision"]["embed_dim"]
    conv = sd.pop("visual.conv1.weight")
    out = {"visual.patch_embed.proj.weight": conv,
           "visual.patch_embed.proj.bias": conv.new_zeros(width),
           "visual.cls_token": sd.pop("visual.class_embedding").reshape(1, 1, width),
           "visual.pos_embed": sd.pop("visual.positional_embedding")[None],
           "visual.head.weight": sd.pop("visual.proj").T.contiguous(),
           "text.token_embed.weight": sd.pop("token_embedding.weight"),
           "text.pos_embed": sd.pop("positional_embedding")[None],
           "text_proj.weight": sd.pop("text_projection").T.contiguous(),
           "logit_scale": sd.pop("logit_scale").reshape(())}
    if "logit_bias" in sd:
        out["logit_bias"] = sd.pop("logit_bias").reshape(())
    for p in ("weight", "bias"):
        if arch["vision"]["pre_norm"]:
            out[f"visual.norm_pre.{p}"] = sd.pop(f"visual.ln_pre.{p}")
        out[f"visual.encoder.norm.{p}"] = sd.pop(f"visual.ln_post.{p}")
        out[f"text.encoder.norm.{p}"] = sd.pop(f"ln_final.{p}")
    out.update(_open_clip_tower(sd, "visual.", "visual.", arch["vision"]["depth"]))
    out.update(_open_clip_tower(sd, "", "text.", arch["text"]["depth"]))
    if sd:
        raise ValueError(f"the OpenCLIP state dict has {sorted(sd)[0]} (and {len(sd) - 1} more "
                         f"keys) that TextImageModel cannot express; expected a plain ViT "
                         f"CLIP (no attentional pooler, projection bias, qk-norm)")
    return out


def open_clip_text_mask(ids: Tensor) -> Tensor:
    """Padding mask ``(B, L)`` for OpenCLIP token ids: True up to and including the
    end-of-text token (the highest id of each row), False on the zeros after it."""
    return torch.arange(ids.shape[1], device=ids.device) <= ids.argmax(-1, keepdim=True)
