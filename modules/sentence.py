"""A frozen sentence encoder: texts -> unit vectors that place texts of similar meaning
close together, from a model trained on a billion sentence pairs.

The network is BERT's (Devlin et al., 2019): token, position and segment embeddings, then
post-norm transformer blocks (attention, add, LayerNorm; GELU feed-forward, add,
LayerNorm); a sentence is the mean of its token outputs, scaled to unit length, as in
Sentence-BERT (Reimers and Gurevych, 2019). ``SentenceEncoder`` reads a sentence-transformers
directory of that kind (``config.json``, ``model.safetensors``, ``tokenizer.json``, and
``1_Pooling/config.json`` asking for mean pooling), such as all-MiniLM-L6-v2 (Wang et al.,
2020, "MiniLM", 6 blocks of width 384). Its weights are read as safetensors and its
tokenizer as the ``tokenizers`` library's JSON: nothing in the directory is run as code.

Every attention here is the shared core's ``MultiHeadAttention``.

Shape legend: B batch, L tokens, E width.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .converters import _hf_dir, _number, _read_safetensors, _refuse
from .fusion import masked_mean
from .layers import GeluMLP
from .mha import MultiHeadAttention


class BertBlock(nn.Module):
    """Post-norm block: ``x = LN(x + attn(x)); x = LN(x + mlp(x))``."""

    def __init__(self, *, embed_dim: int, num_heads: int, mlp_hidden_dim: int,
                 norm_eps: float, backend: str = "auto"):
        super().__init__()
        self.attn = MultiHeadAttention(embed_dim=embed_dim, num_heads=num_heads,
                                       qkv_bias=True, out_bias=True, backend=backend)
        self.norm1 = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.mlp = GeluMLP(embed_dim=embed_dim, hidden_dim=mlp_hidden_dim)
        self.norm2 = nn.LayerNorm(embed_dim, eps=norm_eps)

    def forward(self, x: Tensor, mask: Tensor | None) -> Tensor:
        x = self.norm1(x + self.attn(x, mask=mask))
        return self.norm2(x + self.mlp(x))


class BertEncoder(nn.Module):
    """Ids and mask ``(B, L)`` -> token outputs ``(B, L, E)`` (one segment, id 0).

    Args:
        vocab_size, embed_dim, depth, num_heads, mlp_hidden_dim: sizes.
        max_len: learned positions. type_vocab_size: segment embeddings.
        norm_eps: LayerNorm epsilon (BERT: 1e-12).
    """

    def __init__(self, *, vocab_size: int, embed_dim: int, depth: int, num_heads: int,
                 mlp_hidden_dim: int, max_len: int = 512, type_vocab_size: int = 2,
                 norm_eps: float = 1e-12, backend: str = "auto"):
        super().__init__()
        self.token_embed = nn.Embedding(vocab_size, embed_dim)
        self.pos_embed = nn.Embedding(max_len, embed_dim)
        self.type_embed = nn.Embedding(type_vocab_size, embed_dim)
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.blocks = nn.ModuleList(
            BertBlock(embed_dim=embed_dim, num_heads=num_heads, mlp_hidden_dim=mlp_hidden_dim,
                      norm_eps=norm_eps, backend=backend) for _ in range(depth))

    def forward(self, ids: Tensor, mask: Tensor | None = None) -> Tensor:
        L = ids.shape[1]
        if L > self.pos_embed.num_embeddings:
            raise ValueError(f"{L} tokens; this encoder has {self.pos_embed.num_embeddings} "
                             f"positions")
        x = (self.token_embed(ids) + self.pos_embed.weight[:L]
             + self.type_embed.weight[0])
        x = self.norm(x)
        for block in self.blocks:
            x = block(x, mask)
        return x

    def sentences(self, ids: Tensor, mask: Tensor) -> Tensor:
        """Unit vectors ``(B, E)``: the mean of each text's token outputs."""
        return F.normalize(masked_mean(self(ids, mask), mask), dim=-1)


def bert_kwargs_from_hf(cfg: Mapping) -> dict:
    """``BertEncoder`` arguments from a Hugging Face BERT ``config.json``; a setting under
    which this network would compute something else is refused, naming it."""
    for key, want in (("model_type", "bert"), ("hidden_act", "gelu"),
                      ("position_embedding_type", "absolute")):
        got = cfg.get(key, want if key != "model_type" else None)
        if got != want:
            raise _refuse(key, got, repr(want))
    return dict(vocab_size=_number(cfg, "vocab_size"), embed_dim=_number(cfg, "hidden_size"),
                depth=_number(cfg, "num_hidden_layers"),
                num_heads=_number(cfg, "num_attention_heads"),
                mlp_hidden_dim=_number(cfg, "intermediate_size"),
                max_len=_number(cfg, "max_position_embeddings", 512),
                type_vocab_size=_number(cfg, "type_vocab_size", 2),
                norm_eps=_number(cfg, "layer_norm_eps", 1e-12, whole=False))


def bert_state_dict_from_hf(hf: Mapping[str, Tensor], depth: int) -> dict[str, Tensor]:
    """A Hugging Face ``BertModel`` state dict (with or without the ``bert.`` prefix; the
    pooler is not used) -> ``BertEncoder``'s."""
    hf = {k.removeprefix("bert."): v for k, v in hf.items()}
    e = "embeddings."
    out = {"token_embed.weight": hf[e + "word_embeddings.weight"],
           "pos_embed.weight": hf[e + "position_embeddings.weight"],
           "type_embed.weight": hf[e + "token_type_embeddings.weight"],
           "norm.weight": hf[e + "LayerNorm.weight"], "norm.bias": hf[e + "LayerNorm.bias"]}
    for i in range(depth):
        h, b = f"encoder.layer.{i}.", f"blocks.{i}."
        a = h + "attention.self."
        for part in ("weight", "bias"):
            out[b + f"attn.qkv_proj.{part}"] = torch.cat(
                [hf[a + f"{n}.{part}"] for n in ("query", "key", "value")])
            out[b + f"attn.out_proj.{part}"] = hf[h + f"attention.output.dense.{part}"]
            out[b + f"norm1.{part}"] = hf[h + f"attention.output.LayerNorm.{part}"]
            out[b + f"mlp.fc1.{part}"] = hf[h + f"intermediate.dense.{part}"]
            out[b + f"mlp.fc2.{part}"] = hf[h + f"output.dense.{part}"]
            out[b + f"norm2.{part}"] = hf[h + f"output.LayerNorm.{part}"]
    return out


class SentenceEncoder:
    """Texts -> unit vectors ``(B, E)`` from a sentence-transformers directory (see the
    module docstring); frozen, in fp32 on the CPU, and each text's vector kept once
    computed (training texts repeat every epoch).

    Args:
        path: the directory.
        max_tokens: texts are cut to this many tokens (the model's own limit if lower).
        batch: texts per forward pass.
    """

    def __init__(self, path: str | Path, max_tokens: int = 128, batch: int = 256):
        from tokenizers import Tokenizer  # reads the JSON description; runs nothing from it

        path = Path(path)
        cfg, files = _hf_dir(path, "a sentence-transformers BERT directory")
        pooling = path / "1_Pooling" / "config.json"
        if pooling.is_file():
            pool = json.loads(pooling.read_text(encoding="utf-8"))
            if not pool.get("pooling_mode_mean_tokens") or any(
                    v for k, v in pool.items() if k.startswith("pooling_mode_")
                    and k != "pooling_mode_mean_tokens"):
                raise ValueError(f"{pooling} asks for other pooling than the mean of the "
                                 f"tokens; expected pooling_mode_mean_tokens alone")
        if not (path / "tokenizer.json").is_file():
            raise ValueError(f"{path} has no tokenizer.json; expected the tokenizer of the "
                             f"model as the tokenizers library saves it")
        kwargs = bert_kwargs_from_hf(cfg)
        self.net = BertEncoder(**kwargs, backend="sdpa").eval().requires_grad_(False)
        sd = bert_state_dict_from_hf(_read_safetensors(files), kwargs["depth"])
        self.net.load_state_dict(sd)
        self.tok = Tokenizer.from_file(str(path / "tokenizer.json"))
        self.tok.no_padding()
        self.tok.enable_truncation(min(max_tokens, kwargs["max_len"]))
        self.pad_id = int(cfg.get("pad_token_id", 0))
        self.dim, self.batch = kwargs["embed_dim"], batch
        self._known: dict[str, Tensor] = {}

    @torch.no_grad()
    def __call__(self, texts: Sequence[str]) -> Tensor:
        new = [t for t in dict.fromkeys(texts) if t not in self._known]
        for s in range(0, len(new), self.batch):
            chunk = new[s:s + self.batch]
            rows = [e.ids for e in self.tok.encode_batch(chunk)]
            ids = torch.full((len(rows), max(map(len, rows))), self.pad_id, dtype=torch.long)
            mask = torch.zeros(ids.shape, dtype=torch.bool)
            for i, r in enumerate(rows):
                ids[i, :len(r)] = torch.tensor(r)
                mask[i, :len(r)] = True
            for t, v in zip(chunk, self.net.sentences(ids, mask).float()):
                self._known[t] = v
        if not texts:
            return torch.zeros(0, self.dim)
        return torch.stack([self._known[t] for t in texts])
