"""The LTX-Video 0.9.7/0.9.8 latent upsampler (diffusers' LTXLatentUpsamplerModel) and the latent path of its
pipeline (LTXLatentUpsamplePipeline, latents in, output_type="latent").

VAE latents (B, 128, F, H, W) -> (B, 128, F, 2H, 2W): conv stem, residual blocks, a conv to 4x the channels spread
over 2 x 2 pixels per frame (depth to space), residual blocks, a conv back. Other variants of the config: 2D convs
on each frame alone (dims=2), temporal upsampling (F -> 2F - 1) with or without spatial. The pipeline runs the
model on un-normalised latents, then optionally AdaIN toward the input and the 0.9.8 tone map.

Config defaults: diffusers' scripts/convert_ltx_to_diffusers.py (get_spatial_latent_upsampler_config, the same for
0.9.7 and 0.9.8; also the class defaults). Tensor names equal diffusers' (latent_upsampler/ of
Lightricks/ltxv-spatial-upscaler-0.9.7 and -0.9.8).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cogvideox_vae import per_frame

GROUPS = 32  # group norm groups, fixed in the reference


@dataclass
class LTXLatentUpsamplerConfig:
    in_channels: int = 128
    mid_channels: int = 512
    num_blocks_per_stage: int = 4
    dims: int = 3  # 3: 3x3x3 convs; 2: 3x3 convs on each frame alone
    spatial_upsample: bool = True
    temporal_upsample: bool = False


def conv(dims: int, in_dim: int, out_dim: int) -> nn.Module:
    return (nn.Conv2d if dims == 2 else nn.Conv3d)(in_dim, out_dim, 3, padding=1)


def depth_to_space(x: torch.Tensor, factors: tuple[int, ...]) -> torch.Tensor:
    """(N, C * f1 * f2 ..., d1, d2, ...) -> (N, C, d1 * f1, d2 * f2, ...): channel c * prod(f) + (i1, i2, ...)
    lands at offset (i1, i2, ...) of its output block."""
    k = len(factors)
    size = [d * f for d, f in zip(x.shape[2:], factors)]
    x = x.unflatten(1, (-1, *factors))  # (N, C, f1, .., fk, d1, .., dk)
    order = [0, 1] + [axis for i in range(k) for axis in (2 + k + i, 2 + i)]  # (N, C, d1, f1, d2, f2, ...)
    return x.permute(order).reshape(x.shape[0], x.shape[1], *size)


class ResBlock(nn.Module):
    """x -> SiLU(x + norm(conv(SiLU(norm(conv(x))))))"""

    def __init__(self, dim: int, dims: int):
        super().__init__()
        self.conv1 = conv(dims, dim, dim)
        self.norm1 = nn.GroupNorm(GROUPS, dim)
        self.conv2 = conv(dims, dim, dim)
        self.norm2 = nn.GroupNorm(GROUPS, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.norm2(self.conv2(F.silu(self.norm1(self.conv1(x)))))
        return F.silu(h + x)


class Upsampler(nn.Sequential):
    """A conv to prod(factors) x the channels, then depth to space; `upsampler.0` is the conv, as in diffusers.

    Spatial only: a 3x3 conv on each frame, (B, C, F, H, W) -> (B, C, F, 2H, 2W). Temporal (with or without
    spatial): a 3x3x3 conv, F doubled and the first frame dropped: (B, C, F, H, W) -> (B, C, 2F - 1, sH, sW).
    """

    def __init__(self, dim: int, spatial: bool, temporal: bool):
        factors = (2,) * temporal + ((2, 2) if spatial else (1, 1) if temporal else ())  # (T,) H, W
        if not factors:
            raise ValueError("the latent upsampler needs spatial_upsample or temporal_upsample")
        super().__init__(conv(len(factors), dim, math.prod(factors) * dim))
        self.factors = factors

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if len(self.factors) == 3:  # (B, C, F, H, W) -> (B, C, 2F - 1, ..)
            return depth_to_space(self[0](x), self.factors)[:, :, 1:]
        if x.dim() == 5:
            return per_frame(self.forward, x)
        return depth_to_space(self[0](x), self.factors)  # (N, 4C, H, W) -> (N, C, 2H, 2W)


class LTXLatentUpsampler(nn.Module):
    """VAE latents (B, C, F, H, W) -> (B, C, F', 2H, 2W) (spatial) / (B, C, 2F - 1, H', W') (temporal)."""

    def __init__(self, config: LTXLatentUpsamplerConfig):
        super().__init__()
        self.config = cfg = config
        if cfg.dims == 2 and cfg.temporal_upsample:
            raise ValueError("dims=2 (per-frame convs) cannot upsample in time")
        self.initial_conv = conv(cfg.dims, cfg.in_channels, cfg.mid_channels)
        self.initial_norm = nn.GroupNorm(GROUPS, cfg.mid_channels)
        self.res_blocks = nn.ModuleList(ResBlock(cfg.mid_channels, cfg.dims) for _ in range(cfg.num_blocks_per_stage))
        self.upsampler = Upsampler(cfg.mid_channels, cfg.spatial_upsample, cfg.temporal_upsample)
        self.post_upsample_res_blocks = nn.ModuleList(
            ResBlock(cfg.mid_channels, cfg.dims) for _ in range(cfg.num_blocks_per_stage))
        self.final_conv = conv(cfg.dims, cfg.mid_channels, cfg.in_channels)

    def layers(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, F, H, W), or (N, C, H, W) frames for dims=2
        x = F.silu(self.initial_norm(self.initial_conv(x)))  # (.., mid, ..)
        for block in self.res_blocks:
            x = block(x)
        x = self.upsampler(x)  # (.., mid, .., 2H, 2W)
        for block in self.post_upsample_res_blocks:
            x = block(x)
        return self.final_conv(x)

    def forward(self, latents: torch.Tensor) -> torch.Tensor:
        return per_frame(self.layers, latents) if self.config.dims == 2 else self.layers(latents)


def adain_filter_latent(latents: torch.Tensor, reference: torch.Tensor, factor: float = 1.0) -> torch.Tensor:
    """Give each (batch, channel) slice of latents (B, C, ...) the mean and unbiased std of the same slice of
    `reference` (B, C, ...; any size), then lerp from latents by `factor` (0: latents, 1: matched)."""
    axes = tuple(range(2, latents.dim()))
    ref_std, ref_mean = torch.std_mean(reference, dim=axes, keepdim=True)  # (B, C, 1, ..)
    std, mean = torch.std_mean(latents, dim=axes, keepdim=True)
    matched = ((latents - mean) / std) * ref_std + ref_mean
    return torch.lerp(latents, matched, factor)


def tone_map_latents(latents: torch.Tensor, compression: float) -> torch.Tensor:
    """Scale each value by 1 - 0.8 s sigmoid(4 s (|x| - 1)), s = 0.75 compression (0: identity): small values by
    about 1, large ones by down to 1 - 0.6 compression."""
    s = compression * 0.75
    return latents * (1.0 - 0.8 * s * torch.sigmoid(4.0 * s * (latents.abs() - 1.0)))


def channel_stats(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A per-channel vector (C,) as (1, C, 1, 1, 1) on like's device and dtype."""
    return values.view(1, -1, 1, 1, 1).to(like.device, like.dtype)


@torch.no_grad()
def upsample(model: LTXLatentUpsampler, latents: torch.Tensor, latents_mean: torch.Tensor,
             latents_std: torch.Tensor, scaling_factor: float = 1.0, adain_factor: float = 0.0,
             tone_map_compression_ratio: float = 0.0) -> torch.Tensor:
    """Normalised latents (B, C, F, H, W) -> normalised upsampled latents in the model's dtype, as
    LTXLatentUpsamplePipeline(latents=..., output_type="latent"); latents_mean/std (C,) are the VAE's buffers,
    scaling_factor its config value (1.0 for LTX).

    In order: float32, un-normalise (x std / scaling_factor + mean), the model's dtype, upsample; AdaIN toward the
    un-normalised input if adain_factor > 0; tone map if the ratio > 0; normalise ((x - mean) scaling_factor / std).
    """
    if not 0 <= tone_map_compression_ratio <= 1:
        raise ValueError(f"tone_map_compression_ratio must be in [0, 1], got {tone_map_compression_ratio}")
    x = latents.float()
    x = x * channel_stats(latents_std, x) / scaling_factor + channel_stats(latents_mean, x)
    x = x.to(next(model.parameters()).dtype)
    up = model(x)
    if adain_factor > 0.0:
        up = adain_filter_latent(up, x, adain_factor)
    if tone_map_compression_ratio > 0.0:
        up = tone_map_latents(up, tone_map_compression_ratio)
    return (up - channel_stats(latents_mean, up)) * scaling_factor / channel_stats(latents_std, up)
