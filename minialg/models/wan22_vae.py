"""The Wan 2.2 video VAE (Wan2.2-TI2V-5B): residual levels over patchified pixels, 16x spatial, 4x temporal.

Video (B, 3, 1 + 4k, H, W) in [-1, 1] <-> latent (B, 48, 1 + k, H/16, W/16). Three changes from Wan 2.1
(wan_vae.py, whose causal convolutions, feature cache, blocks, chunking and latent statistics this file reuses):
- Pixels are folded into channels first: each 2x2 square of a frame becomes 3 x 2 x 2 = 12 channels, so the
  three downsampling levels give 16x in all; the decoder makes 12 channels that are unfolded the same way.
- Each encoder level is one block whose output adds a parameter-free shortcut: the level's input averaged down
  to the output's size (time, height, width folded into channels, then groups of channels averaged).
- Each decoder level likewise adds its input duplicated up to the output's size; its upsampler keeps the
  channel count instead of halving it. A temporal level does not double the first latent frame (as in Wan 2.1),
  so the shortcut keeps only the trailing frames the main path made.

Tensor names equal those of diffusers' AutoencoderKLWan with is_residual=True.
"""

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .wan_vae import Cache, Decoder, Downsample, Encoder, ResidualBlock, Upsample, WanVAE, WanVAEConfig


def patchify(video: torch.Tensor, p: int) -> torch.Tensor:
    # (B, C, T, H, W) -> (B, C p p, T, H/p, W/p); channels ordered (colour, column in square, row in square)
    return rearrange(video, "b c t (h ph) (w pw) -> b (c pw ph) t h w", ph=p, pw=p)


def unpatchify(x: torch.Tensor, p: int) -> torch.Tensor:
    # (B, C p p, T, h, w) -> (B, C, T, h p, w p), the inverse of patchify
    return rearrange(x, "b (c pw ph) t h w -> b c t (h ph) (w pw)", ph=p, pw=p)


def fold(x: torch.Tensor, factor_t: int, factor_s: int) -> torch.Tensor:
    # (B, C, T, H, W) -> (B, C ft fs fs, T/ft, H/fs, W/fs): each ft x fs x fs cell into channels (c, t, row, column)
    return rearrange(x, "b c (t ft) (h fh) (w fw) -> b (c ft fh fw) t h w", ft=factor_t, fh=factor_s, fw=factor_s)


def unfold(x: torch.Tensor, factor_t: int, factor_s: int) -> torch.Tensor:
    # (B, C ft fs fs, T, H, W) -> (B, C, T ft, H fs, W fs), the inverse of fold
    return rearrange(x, "b (c ft fh fw) t h w -> b c (t ft) (h fh) (w fw)", ft=factor_t, fh=factor_s, fw=factor_s)


def average_down(x: torch.Tensor, out_dim: int, factor_t: int, factor_s: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, out_dim, ceil(T/ft), H/fs, W/fs): fold ft x fs x fs cells into channels, average
    groups of consecutive channels. An odd frame count gets zero frames in front, like a causal conv."""
    x = fold(F.pad(x, (0, 0, 0, 0, -x.shape[2] % factor_t, 0)), factor_t, factor_s)
    b, c, t, h, w = x.shape
    return x.contiguous().view(b, out_dim, c // out_dim, t, h, w).mean(dim=2)


def duplicate_up(x: torch.Tensor, out_dim: int, factor_t: int, factor_s: int) -> torch.Tensor:
    """(B, C, T, H, W) -> (B, out_dim, T ft, H fs, W fs): repeat each channel, unfold the copies into cells."""
    repeats = out_dim * factor_t * factor_s * factor_s // x.shape[1]
    return unfold(x.repeat_interleave(repeats, dim=1), factor_t, factor_s)


class ResidualDownBlock(nn.Module):
    """num_res_blocks residual blocks and an optional downsampler, plus the averaged-down input."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, down: bool, temporal: bool):
        super().__init__()
        self.out_dim, self.factor_t, self.factor_s = out_dim, 2 if temporal else 1, 2 if down else 1
        if in_dim * self.factor_t * self.factor_s**2 % out_dim:
            raise ValueError(f"a {in_dim} -> {out_dim} channel level cannot average its input down evenly")
        dims = [in_dim] + [out_dim] * num_res_blocks
        self.resnets = nn.ModuleList([ResidualBlock(i, o) for i, o in zip(dims[:-1], dims[1:])])
        self.downsampler = Downsample(out_dim, temporal) if down else None

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        # x: (B, C_in, T, H, W) -> (B, C_out, T', H', W'), T' = T / 2 (first chunk: 1) if temporal
        shortcut = average_down(x, self.out_dim, self.factor_t, self.factor_s)
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.downsampler is not None:
            x = self.downsampler(x, cache)
        return x + shortcut


class ResidualUpBlock(nn.Module):
    """num_res_blocks + 1 residual blocks; if up, an upsampler (channels kept) plus the duplicated-up input."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, up: bool, temporal: bool):
        super().__init__()
        self.out_dim, self.factor_t = out_dim, 2 if temporal else 1
        if up and out_dim * self.factor_t * 4 % in_dim:
            raise ValueError(f"a {in_dim} -> {out_dim} channel level cannot duplicate its input up evenly")
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList([ResidualBlock(i, o) for i, o in zip(dims[:-1], dims[1:])])
        self.upsampler = Upsample(out_dim, temporal, out_dim=out_dim) if up else None

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        # x: (B, C_in, T, H, W) -> (B, C_out, T', 2H, 2W), T' = 2T (first chunk: T) if temporal
        residual = x
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsampler is None:
            return x
        x = self.upsampler(x, cache)
        shortcut = duplicate_up(residual, self.out_dim, self.factor_t, 2)  # (B, C_out, T ft, 2H, 2W)
        return x + shortcut[:, :, shortcut.shape[2] - x.shape[2] :]


class ResidualEncoder(Encoder):
    """Wan 2.1's encoder with one residual down block per level."""

    @staticmethod
    def levels(cfg: WanVAEConfig, dims: list[int]) -> list[nn.Module]:
        last = len(cfg.dim_mult) - 1
        return [ResidualDownBlock(in_dim, out_dim, cfg.num_res_blocks, down=i < last,
                                  temporal=i < last and cfg.temperal_downsample[i])
                for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))]


class ResidualDecoder(Decoder):
    """Wan 2.1's decoder with one residual up block per level."""

    @staticmethod
    def levels(cfg: WanVAEConfig, dims: list[int]) -> list[nn.Module]:
        last, temperal_upsample = len(cfg.dim_mult) - 1, cfg.temperal_downsample[::-1]
        return [ResidualUpBlock(in_dim, out_dim, cfg.num_res_blocks, up=i < last,
                                temporal=i < last and temperal_upsample[i])
                for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:]))]


class Wan22VAE(WanVAE):
    """Wan 2.2 VAE: WanVAE's chunked encode/decode and latent statistics around residual levels and patches."""

    encoder_cls, decoder_cls = ResidualEncoder, ResidualDecoder

    @staticmethod
    def check_config(cfg: WanVAEConfig) -> None:
        if not cfg.is_residual:
            raise NotImplementedError("Wan22VAE needs is_residual=True; the Wan 2.1 VAE is wan_vae.WanVAE")
        if cfg.attn_scales:
            raise NotImplementedError("the Wan 2.2 VAE takes no attn_scales")

    @property
    def patch(self) -> int:
        return self.config.patch_size or 1

    def encode(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, 1 + 4k, H, W) in [-1, 1] -> posterior mean and logvar (clamped), each (B, z, 1 + k, H/16, W/16)."""
        multiple = self.patch * 2 ** (len(self.config.dim_mult) - 1)
        if video.shape[3] % multiple or video.shape[4] % multiple:
            raise ValueError(f"height and width must be multiples of {multiple}, got {tuple(video.shape[3:])}")
        return super().encode(patchify(video, self.patch))

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z_dim, 1 + k, h, w) latents -> video (B, 3, 1 + 4k, 16h, 16w) clamped to [-1, 1]."""
        return unpatchify(super().decode(z), self.patch)  # clamping before unfolding: the same numbers
