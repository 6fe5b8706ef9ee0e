"""A speech encoder on the shared attention core: log-mel features, SpecAugment,
convolutional subsampling, pre-norm transformer or Conformer blocks with key padding masks
and rotary positions, and a CTC or an utterance-classification head.

- Log-mel filterbank features (torchaudio) normalised per utterance (zero mean, unit
  variance per mel bin over the utterance's frames).
- SpecAugment (Park et al., 2019, "SpecAugment: A Simple Data Augmentation Method for
  Automatic Speech Recognition"): frequency and time masks (torchaudio's masking
  transforms), training only.
- Subsampling: two stride-2 3x3 convolutions (x4 in time), as in ESPnet and NeMo.
- Blocks: ``"transformer"`` (``modules.transformer.Transformer``) or ``"conformer"``
  (Gulati et al., 2020, "Conformer: Convolution-augmented Transformer for Speech
  Recognition": half-step feed-forward, self-attention, convolution module, half-step
  feed-forward, final norm), both with RoPE and a ``(B, T)`` key padding mask, so padded
  frames never reach a kept frame and attention stays on the fused kernels.
- Heads: ``"ctc"``, per-frame logits over ``num_outputs`` symbols with the blank at id 0
  (Graves et al., 2006); ``"classify"``, logits per utterance from the mean of its kept
  frames (keyword spotting).

Shapes: B batch, S samples, T feature frames, L = T / 4 encoder frames, F mel bins,
E model width, V outputs.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import NORMS, DropPath, add_on_rows, check_sizes, kept_rows, lookup, residual_add
from .mha import MultiHeadAttention
from .rope import RotaryEmbedding
from .transformer import Transformer


class LogMel(nn.Module):
    """Waveform -> per-utterance normalised log-mel features.

    Args:
        sample_rate: input rate (resample beforehand).
        n_mels: mel bins F. win_ms, hop_ms: analysis window and hop (25 / 10 ms).
    """

    def __init__(self, *, sample_rate: int = 16000, n_mels: int = 80, win_ms: float = 25.0,
                 hop_ms: float = 10.0):
        super().__init__()
        import torchaudio
        win, hop = int(sample_rate * win_ms / 1000), int(sample_rate * hop_ms / 1000)
        n_fft = 1 << (win - 1).bit_length()
        self.hop = hop
        self.mel = torchaudio.transforms.MelSpectrogram(
            sample_rate=sample_rate, n_fft=n_fft, win_length=win, hop_length=hop,
            n_mels=n_mels, center=True, power=2.0)

    def num_frames(self, samples: int) -> int:
        return samples // self.hop + 1

    @torch.no_grad()
    def forward(self, wave_S: Tensor) -> Tensor:
        """One utterance ``(S,)`` -> ``(T, F)`` features."""
        feats_FT = (self.mel(wave_S.float()) + 1e-6).log()
        mean = feats_FT.mean(-1, keepdim=True)
        std = feats_FT.std(-1, keepdim=True).clamp(min=1e-4) if feats_FT.shape[-1] > 1 \
            else torch.ones_like(mean)
        return ((feats_FT - mean) / std).T.contiguous()


class SpecAugment(nn.Module):
    """Frequency and time masks on ``(B, T, F)`` features, each utterance its own.

    Args:
        freq_masks, freq_width: number of frequency masks and their maximum width (bins).
        time_masks, time_width: number of time masks and their maximum width (frames).
    """

    def __init__(self, *, freq_masks: int = 2, freq_width: int = 15, time_masks: int = 2,
                 time_width: int = 25):
        super().__init__()
        import torchaudio
        self.freq = nn.ModuleList(torchaudio.transforms.FrequencyMasking(freq_width, True)
                                  for _ in range(freq_masks))
        self.time = nn.ModuleList(torchaudio.transforms.TimeMasking(time_width, True)
                                  for _ in range(time_masks))

    def forward(self, feats_BTF: Tensor) -> Tensor:
        if not self.training or not (len(self.freq) or len(self.time)):
            return feats_BTF
        x_BFT = feats_BTF.transpose(1, 2)
        for mask in [*self.freq, *self.time]:
            x_BFT = mask(x_BFT)
        return x_BFT.transpose(1, 2)


def subsampled_lengths(lengths: Tensor) -> Tensor:
    """Frames after the two stride-2 convolutions (kernel 3, padding 1): ceil(ceil(T/2)/2)."""
    return (lengths + 3) // 4


class ConvSubsampling(nn.Module):
    """``(B, T, F)`` -> ``(B, ceil(T/4), E)``: two stride-2 3x3 convolutions with SiLU, then a
    linear map of (channels x F/4) to E. Frames past an utterance's end are zeroed between
    the convolutions, so a padded utterance gives the same frames as alone."""

    def __init__(self, *, n_mels: int, channels: int, embed_dim: int):
        super().__init__()
        if channels < 1:
            raise ValueError(f"subsample_channels={channels}; expected at least 1")
        self.conv1 = nn.Conv2d(1, channels, 3, 2, 1)
        self.conv2 = nn.Conv2d(channels, channels, 3, 2, 1)
        self.proj = nn.Linear(channels * ((n_mels + 3) // 4), embed_dim)

    def forward(self, feats_BTF: Tensor, lengths_B: Tensor | None = None) -> Tensor:
        x = F.silu(self.conv1(feats_BTF.unsqueeze(1)))  # (B, C, T/2, F/2)
        if lengths_B is not None:
            keep = torch.arange(x.shape[2], device=x.device) < (lengths_B[:, None] + 1) // 2
            x = x * keep[:, None, :, None]
        x = F.silu(self.conv2(x))  # (B, C, T/4, F/4)
        return self.proj(x.permute(0, 2, 1, 3).flatten(2))

    def no_muon(self) -> set[str]:
        """The input layer stays with AdamW under ``optimizer=muon``, as token tables and
        patch stems do."""
        return {"proj.weight"}


def depthwise_conv1d(x_BLE: Tensor, conv: nn.Conv1d) -> Tensor:
    """``conv`` (depthwise, odd kernel K, 'same' padding) along L of ``(B, L, E)``.

    On the CPU this is K shifted multiply-adds in the ``(B, L, E)`` layout: oneDNN's grouped
    convolution ran at about 3 GFLOP/s for the speech default (K=15, E=144) and needs the
    ``(B, E, L)`` layout, so the shifted sums are 4-5x faster and drop two transposes.
    Without gradients the sums accumulate in place. Other devices use ``F.conv1d``.
    """
    w, b = conv.weight, conv.bias
    k_size, groups = w.shape[-1], w.shape[0]
    if x_BLE.device.type != "cpu":
        return F.conv1d(x_BLE.transpose(1, 2), w, b, padding=k_size // 2,
                        groups=groups).transpose(1, 2)
    L = x_BLE.shape[1]
    taps = w[:, 0].t().to(x_BLE.dtype)  # (K, E)
    xp = F.pad(x_BLE, (0, 0, k_size // 2, k_size // 2))
    out = xp[:, :L] * taps[0] if b is None else torch.addcmul(b.to(x_BLE.dtype), xp[:, :L],
                                                              taps[0])
    in_place = not (torch.is_grad_enabled() and (x_BLE.requires_grad or w.requires_grad))
    for k in range(1, k_size):
        if in_place:
            out.addcmul_(xp[:, k:k + L], taps[k])
        else:
            out = torch.addcmul(out, xp[:, k:k + L], taps[k])
    return out


class ConvModule(nn.Module):
    """Conformer convolution module: pointwise conv + GLU, depthwise conv, norm, SiLU,
    pointwise conv. Padded frames are zeroed before the depthwise conv, so they do not
    leak into kept frames."""

    def __init__(self, *, embed_dim: int, kernel_size: int, drop: float):
        super().__init__()
        if kernel_size % 2 == 0:
            raise ValueError(f"conv_kernel ({kernel_size}) must be odd")
        self.pointwise_in = nn.Linear(embed_dim, 2 * embed_dim)
        self.depthwise = nn.Conv1d(embed_dim, embed_dim, kernel_size, padding=kernel_size // 2,
                                   groups=embed_dim)
        self.norm = nn.BatchNorm1d(embed_dim)
        self.pointwise_out = nn.Linear(embed_dim, embed_dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x_BLE: Tensor, keep_BL: Tensor | None) -> Tensor:
        x = F.glu(self.pointwise_in(x_BLE), dim=-1)
        if keep_BL is not None:
            x = x.masked_fill(~keep_BL.unsqueeze(-1), 0.0)
        x = depthwise_conv1d(x, self.depthwise)  # (B, L, E)
        # BatchNorm1d over (B * L, E) is over (B, E, L): the same statistics per channel.
        x = F.silu(self.norm(x.flatten(0, 1))).view(x.shape)
        return self.drop(self.pointwise_out(x))


class ConformerBlock(nn.Module):
    """x + FF/2, x + MHSA, x + Conv, x + FF/2, norm (each sublayer pre-normed)."""

    def __init__(self, *, embed_dim: int, num_heads: int, mlp_hidden_dim: int,
                 conv_kernel: int, rope: RotaryEmbedding | None, norm_layer: type[nn.Module],
                 attn_drop: float, drop: float, drop_path: float, backend: str):
        super().__init__()

        def ffn():
            return nn.Sequential(norm_layer(embed_dim), nn.Linear(embed_dim, mlp_hidden_dim),
                                 nn.SiLU(), nn.Dropout(drop),
                                 nn.Linear(mlp_hidden_dim, embed_dim), nn.Dropout(drop))
        self.ff1, self.ff2 = ffn(), ffn()
        self.attn_norm = norm_layer(embed_dim)
        self.attn = MultiHeadAttention(embed_dim=embed_dim, num_heads=num_heads, rope=rope,
                                       qkv_bias=True, out_bias=True, attn_drop=attn_drop,
                                       backend=backend)
        self.conv_norm = norm_layer(embed_dim)
        self.conv = ConvModule(embed_dim=embed_dim, kernel_size=conv_kernel, drop=drop)
        self.norm = norm_layer(embed_dim)
        self.drop, self.drop_path = nn.Dropout(drop), DropPath(drop_path)

    def forward(self, x: Tensor, keep_BL: Tensor | None, rows: Tensor | None = None,
                in_place: bool = False) -> Tensor:
        """``rows``: the real frames (``layers.kept_rows``); the feed-forward layers run on
        those alone. Padded frames never reach a real one, so their values do not matter.
        ``in_place``: the residual sums update ``x`` (no gradients; see ``Conformer``), so a
        hook keeping a block's output sees it change afterwards."""
        if self.drop_path.p and self.training:  # drawn per utterance: every row
            rows = None
        x = add_on_rows(x, lambda t: self.drop_path(self.ff1(t)), rows, 0.5, in_place)
        x = residual_add(x, self.drop_path(self.drop(self.attn(self.attn_norm(x), mask=keep_BL))),
                         in_place=in_place)
        x = residual_add(x, self.drop_path(self.conv(self.conv_norm(x), keep_BL)),
                         in_place=in_place)
        x = add_on_rows(x, lambda t: self.drop_path(self.ff2(t)), rows, 0.5, in_place)
        return self.norm(x)


class Conformer(nn.Module):
    """A stack of ``ConformerBlock`` sharing one rotary embedding."""

    def __init__(self, *, embed_dim: int, depth: int, num_heads: int, mlp_hidden_dim: int,
                 conv_kernel: int = 15, norm: str = "layernorm", rope_theta: float | None,
                 max_seq_len: int, attn_drop: float = 0.0, drop: float = 0.0,
                 drop_path_rate: float = 0.0, backend: str = "auto"):
        super().__init__()
        check_sizes(embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                    mlp_hidden_dim=mlp_hidden_dim, conv_kernel=conv_kernel)
        if embed_dim % num_heads:
            raise ValueError(f"embed_dim ({embed_dim}) must be divisible by num_heads "
                             f"({num_heads})")
        rope = RotaryEmbedding(head_dim=embed_dim // num_heads, theta=rope_theta,
                               max_seq_len=max_seq_len) if rope_theta is not None else None
        norm_layer = lookup(NORMS, norm, "norm")
        self.blocks = nn.ModuleList(ConformerBlock(
            embed_dim=embed_dim, num_heads=num_heads, mlp_hidden_dim=mlp_hidden_dim,
            conv_kernel=conv_kernel, rope=rope, norm_layer=norm_layer, attn_drop=attn_drop,
            drop=drop, drop_path=drop_path_rate * i / max(depth - 1, 1), backend=backend)
            for i in range(depth))

    def forward(self, x: Tensor, *, mask: Tensor | None = None) -> Tensor:
        """``(B, L, E)`` with a ``(B, L)`` padding mask -> ``(B, L, E)``; the outputs at
        padded frames are finite but unspecified (on the CPU the feed-forward layers skip
        them).
        Without gradients the blocks update one copy of ``x`` in place."""
        rows = kept_rows(mask, x)
        in_place = not torch.is_grad_enabled()
        if in_place:
            x = x.clone(memory_format=torch.contiguous_format)
        for block in self.blocks:
            x = block(x, mask, rows, in_place)
        return x


class SpeechEncoder(nn.Module):
    """Features ``(B, T, F)`` + lengths -> CTC logits ``(B, L, V)`` or class logits ``(B, V)``.

    Args:
        num_outputs: V, output symbols (CTC: including the blank at id 0) or classes.
        head: ``"ctc"`` or ``"classify"``.
        block: ``"transformer"`` (pre-norm, SwiGLU or GELU MLP) or ``"conformer"``.
        n_mels: feature bins F. subsample_channels: channels of the subsampling convs.
        embed_dim, depth, num_heads, mlp_hidden_dim: encoder sizes.
        conv_kernel: Conformer depthwise kernel. mlp, norm: transformer MLP and norm.
        rope_theta: rotary positions (None: none). max_frames: longest input in feature
            frames (the RoPE table covers it; longer input is refused).
        freq_masks, freq_width, time_masks, time_width: SpecAugment (0 masks: off).
        drop, attn_drop, drop_path_rate: regularisation. backend: attention kernel.
    """

    def __init__(self, *, num_outputs: int, head: str = "ctc", block: str = "transformer",
                 n_mels: int = 80, subsample_channels: int = 64, embed_dim: int = 144,
                 depth: int = 6, num_heads: int = 4, mlp_hidden_dim: int = 576,
                 conv_kernel: int = 15, mlp: str = "swiglu", norm: str = "layernorm",
                 rope_theta: float | None = 10000.0, max_frames: int = 3000,
                 freq_masks: int = 2, freq_width: int = 15, time_masks: int = 2,
                 time_width: int = 25, drop: float = 0.1, attn_drop: float = 0.0,
                 drop_path_rate: float = 0.0, backend: str = "auto"):
        super().__init__()
        if head not in ("ctc", "classify"):
            raise ValueError(f"head={head!r}; expected 'ctc' or 'classify'")
        if block not in ("transformer", "conformer"):
            raise ValueError(f"block={block!r}; expected 'transformer' or 'conformer'")
        if num_outputs < 2:
            raise ValueError(f"num_outputs={num_outputs}; expected at least 2")
        self.head_kind, self.max_frames, self.n_mels = head, max_frames, n_mels
        self.spec_augment = SpecAugment(freq_masks=freq_masks, freq_width=freq_width,
                                        time_masks=time_masks, time_width=time_width)
        self.subsample = ConvSubsampling(n_mels=n_mels, channels=subsample_channels,
                                         embed_dim=embed_dim)
        self.drop = nn.Dropout(drop)
        max_len = (max_frames + 3) // 4
        if block == "transformer":
            self.encoder = Transformer(
                embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                mlp_hidden_dim=mlp_hidden_dim, norm=norm, mlp=mlp, rope_theta=rope_theta,
                max_seq_len=max_len, attn_drop=attn_drop, drop=drop,
                drop_path_rate=drop_path_rate, backend=backend)
        else:
            self.encoder = Conformer(
                embed_dim=embed_dim, depth=depth, num_heads=num_heads,
                mlp_hidden_dim=mlp_hidden_dim, conv_kernel=conv_kernel, norm=norm,
                rope_theta=rope_theta, max_seq_len=max_len, attn_drop=attn_drop, drop=drop,
                drop_path_rate=drop_path_rate, backend=backend)
        self.head = nn.Linear(embed_dim, num_outputs)

    def encode(self, feats_BTF: Tensor, lengths_B: Tensor) -> tuple[Tensor, Tensor]:
        """Encoder frames ``(B, L, E)`` and their lengths ``(B,)``."""
        if feats_BTF.shape[1] > self.max_frames:
            raise ValueError(f"input of {feats_BTF.shape[1]} frames is longer than "
                             f"max_frames={self.max_frames}")
        x = self.drop(self.subsample(self.spec_augment(feats_BTF), lengths_B))
        out_lengths = subsampled_lengths(lengths_B)
        keep_BL = torch.arange(x.shape[1], device=x.device) < out_lengths[:, None]
        # No mask when nothing is padded: the unmasked kernels are the fastest.
        mask = None if bool(keep_BL.all()) else keep_BL
        return self.encoder(x, mask=mask), out_lengths

    def forward(self, feats_BTF: Tensor, lengths_B: Tensor) -> tuple[Tensor, Tensor]:
        """CTC: ``(logits (B, L, V), lengths (B,))``; classify: ``(logits (B, V), lengths)``."""
        h_BLE, out_lengths = self.encode(feats_BTF, lengths_B)
        if self.head_kind == "ctc":
            return self.head(h_BLE), out_lengths
        keep = (torch.arange(h_BLE.shape[1], device=h_BLE.device) < out_lengths[:, None])
        pooled = (h_BLE * keep.unsqueeze(-1)).sum(1) / out_lengths.clamp(min=1)[:, None]
        return self.head(pooled), out_lengths
