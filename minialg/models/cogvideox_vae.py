"""The CogVideoX video VAE: causal 3D convolutions, 8x spatial and 4x temporal compression.

Video (B, 3, T, H, W) in [-1, 1] <-> latent (B, 16, T', H/8, W/8). Time is cut into frame batches, as the
reference does: 8 video frames per batch when encoding and 2 latent frames when decoding, the first batch also
taking the leftover frames (49 video frames: 9 + 5 x 8; 13 latent frames: 3 + 5 x 2). Each causal convolution
pads time on the left with the last k - 1 frames of the previous batch (kept in a per-call cache, a dict from
convolution to tensor), or, in the first batch, with copies of the first frame. The temporal down- and
upsamplers act within a batch: an odd batch keeps its first frame apart (9 -> 5 -> 3 frames, 3 -> 5 -> 9), an
even one is halved or doubled whole (8 -> 4 -> 2, 2 -> 4 -> 8). So 13 latent frames decode to 9 + 5 x 8 = 49
frames and an even count 2k to 8k. The group norms normalise each group over all frames of a batch at once.

The decoder's norms are spatial norms: a group norm whose scale and shift are 1x1x1 convolutions of the batch's
latents, resized (nearest) to the feature map.

Tensor names equal those of diffusers' AutoencoderKLCogVideoX checkpoints (vae/diffusion_pytorch_model.safetensors).
"""

from dataclasses import dataclass, field
from typing import Callable

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tiling import run_in_tiles

Cache = dict[nn.Module, torch.Tensor]  # causal conv -> the last k - 1 frames of its previous (padded) input

MAX_CONV_ELEMENTS = 2**30  # a larger conv input is convolved in slices of time, as the reference does
SAMPLE_FRAMES_PER_BATCH = 8  # video frames per encoder batch
LATENT_FRAMES_PER_BATCH = 2  # latent frames per decoder batch
TILE_OVERLAP = (1 / 6, 1 / 5)  # the reference's tile overlap factors (height, width)


@dataclass
class CogVideoXVAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    down_block_types: list[str] = field(default_factory=lambda: ["CogVideoXDownBlock3D"] * 4)
    up_block_types: list[str] = field(default_factory=lambda: ["CogVideoXUpBlock3D"] * 4)
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 256, 512])
    latent_channels: int = 16
    layers_per_block: int = 3
    act_fn: str = "silu"
    norm_eps: float = 1e-6
    norm_num_groups: int = 32
    temporal_compression_ratio: int = 4
    sample_height: int = 480  # default tile size for tiling: half of these
    sample_width: int = 720
    scaling_factor: float = 1.15258426  # applied by the pipeline, not here
    shift_factor: float | None = None  # unused by CogVideoX
    latents_mean: list[float] | None = None  # unused by CogVideoX
    latents_std: list[float] | None = None  # unused by CogVideoX
    force_upcast: bool = True
    use_quant_conv: bool = False  # only False (every CogVideoX checkpoint) is supported
    use_post_quant_conv: bool = False  # only False is supported
    invert_scale_latents: bool = False  # applied by the pipeline, not here



class ChunkedConv3d(nn.Conv3d):
    """nn.Conv3d that convolves an input of over MAX_CONV_ELEMENTS elements in time slices (same result).

    Each slice after the first also reads the k_t - 1 frames before it.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.numel() <= MAX_CONV_ELEMENTS or self.stride[0] != 1:  # slices would need stride-aligned overlaps
            return super().forward(x)
        overlap = self.kernel_size[0] - 1
        num_frames = x.shape[2]
        step = -(-num_frames // (x.numel() // MAX_CONV_ELEMENTS + 1))  # ceil: the slices torch.chunk would make
        slices = [x[:, :, max(start - overlap, 0) : start + step] for start in range(0, num_frames, step)]
        return torch.cat([self._conv_forward(s, self.weight, self.bias) for s in slices], dim=2)


class CausalConv3d(nn.Module):
    """Conv3d, zero-padded in H and W, padded in time with k_t - 1 frames on the left.

    The time padding is the cached end of the previous batch's input, or copies of the first frame. With
    causal=False (LTX-Video's decoder) time is padded symmetrically instead, (k_t - 1) / 2 copies of the first
    frame before and of the last frame after, and no cache is used.
    """

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, stride: int = 1, causal: bool = True):
        super().__init__()
        self.causal = causal
        self.time_pad = kernel_size - 1 if causal else (kernel_size - 1) // 2
        pad = (0, kernel_size // 2, kernel_size // 2)
        self.conv = ChunkedConv3d(in_dim, out_dim, kernel_size, stride=stride, padding=pad)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        # x: (B, C_in, T, H, W) -> (B, C_out, T / stride, H / stride, W / stride)
        if self.time_pad > 0 and not self.causal:
            repeat = (1, 1, self.time_pad, 1, 1)
            x = torch.cat([x[:, :, :1].repeat(repeat), x, x[:, :, -1:].repeat(repeat)], dim=2)
        elif self.time_pad > 0:
            previous = cache.get(self) if cache is not None else None
            if previous is None:
                previous = x[:, :, :1].repeat(1, 1, self.time_pad, 1, 1)
            x = torch.cat([previous, x], dim=2)
            if cache is not None:
                cache[self] = x[:, :, -self.time_pad :].clone()  # clone: a view would keep the whole batch
        return self.conv(x)


class SpatialNorm3D(nn.Module):
    """Group norm of f, scaled and shifted per pixel by 1x1x1 convolutions of the latents zq resized to f."""

    def __init__(self, dim: int, latent_dim: int, groups: int):
        super().__init__()
        self.norm_layer = nn.GroupNorm(groups, dim, eps=1e-6)
        self.conv_y = CausalConv3d(latent_dim, dim, 1)
        self.conv_b = CausalConv3d(latent_dim, dim, 1)

    def forward(self, f: torch.Tensor, zq: torch.Tensor) -> torch.Tensor:
        # f: (B, C, T, H, W), zq: (B, C_z, t, h, w) -> (B, C, T, H, W)
        t, h, w = f.shape[-3:]
        if t > 1 and t % 2 == 1:  # the first frame is resized on its own, like the upsamplers treat it
            first = F.interpolate(zq[:, :, :1], size=(1, h, w))
            rest = F.interpolate(zq[:, :, 1:], size=(t - 1, h, w))
            zq = torch.cat([first, rest], dim=2)
        else:
            zq = F.interpolate(zq, size=(t, h, w))
        return self.norm_layer(f) * self.conv_y(zq) + self.conv_b(zq)


class ResnetBlock(nn.Module):
    """(norm, SiLU, causal 3x3x3 conv) twice, plus a (1x1x1 conv) shortcut.

    The norms are group norms, or spatial norms on the latents when latent_dim is given (the decoder).
    """

    def __init__(self, in_dim: int, out_dim: int, groups: int, eps: float, latent_dim: int | None = None):
        super().__init__()
        if latent_dim is None:
            self.norm1 = nn.GroupNorm(groups, in_dim, eps=eps)
            self.norm2 = nn.GroupNorm(groups, out_dim, eps=eps)
        else:
            self.norm1 = SpatialNorm3D(in_dim, latent_dim, groups)
            self.norm2 = SpatialNorm3D(out_dim, latent_dim, groups)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3)
        self.conv_shortcut = ChunkedConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor, cache: Cache, zq: torch.Tensor | None = None) -> torch.Tensor:
        # x: (B, C_in, T, H, W) -> (B, C_out, T, H, W)
        h = self.conv1(F.silu(self.norm(self.norm1, x, zq)), cache)
        h = self.conv2(F.silu(self.norm(self.norm2, h, zq)), cache)
        shortcut = x if self.conv_shortcut is None else self.conv_shortcut(x)
        return h + shortcut

    @staticmethod
    def norm(norm: nn.Module, x: torch.Tensor, zq: torch.Tensor | None) -> torch.Tensor:
        return norm(x) if zq is None else norm(x, zq)


def per_frame(op: Callable[[torch.Tensor], torch.Tensor], x: torch.Tensor) -> torch.Tensor:
    """Apply a 2D op, (N, C, H, W) -> (N, C', H', W'), to every frame of x: (B, C, T, H, W) -> (B, C', T, H', W')."""
    b, c, t, h, w = x.shape
    y = op(x.transpose(1, 2).reshape(b * t, c, h, w))
    return y.view(b, t, *y.shape[1:]).transpose(1, 2)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 conv (padded right and bottom); if compress_time, first halve time.

    Time is halved by averaging pairs of frames; an odd batch keeps its first frame as it is.
    """

    def __init__(self, dim: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(dim, dim, 3, stride=2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T, H, W) -> (B, C, T', H/2, W/2), T' = T, or T/2 (even T), or 1 + (T - 1)/2 (odd T)
        t = x.shape[2]
        if self.compress_time and t > 1:
            keep = t % 2
            x = torch.cat([x[:, :, :keep], F.avg_pool3d(x[:, :, keep:], kernel_size=(2, 1, 1))], dim=2)
        return per_frame(lambda f: self.conv(F.pad(f, (0, 1, 0, 1))), x)


class Upsample(nn.Module):
    """Double H and W (nearest, then a 3x3 conv); if compress_time, first double time (nearest).

    An odd batch of more than one frame keeps its first frame single; a one-frame batch stays one frame.
    """

    def __init__(self, dim: int, compress_time: bool):
        super().__init__()
        self.compress_time = compress_time
        self.conv = nn.Conv2d(dim, dim, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T, H, W) -> (B, C, T', 2H, 2W), T' = T, or 2T (even T), or 1 + 2(T - 1) (odd T)
        t = x.shape[2]
        if self.compress_time and t > 1:
            keep = t % 2
            x = torch.cat([x[:, :, :keep], x[:, :, keep:].repeat_interleave(2, dim=2)], dim=2)
        return per_frame(lambda f: self.conv(F.interpolate(f, scale_factor=2.0, mode="nearest")), x)


class DownBlock(nn.Module):
    """Residual blocks, then an optional downsampler."""

    def __init__(self, in_dim: int, out_dim: int, cfg: CogVideoXVAEConfig, downsample: bool, compress_time: bool):
        super().__init__()
        dims = [in_dim] + [out_dim] * cfg.layers_per_block
        self.resnets = nn.ModuleList(
            [ResnetBlock(i, o, cfg.norm_num_groups, cfg.norm_eps) for i, o in zip(dims[:-1], dims[1:])]
        )
        self.downsamplers = nn.ModuleList([Downsample(out_dim, compress_time)]) if downsample else None

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x


class UpBlock(nn.Module):
    """layers_per_block + 1 residual blocks with spatial norms, then an optional upsampler."""

    def __init__(self, in_dim: int, out_dim: int, cfg: CogVideoXVAEConfig, upsample: bool, compress_time: bool):
        super().__init__()
        dims = [in_dim] + [out_dim] * (cfg.layers_per_block + 1)
        self.resnets = nn.ModuleList(
            [
                ResnetBlock(i, o, cfg.norm_num_groups, cfg.norm_eps, latent_dim=cfg.latent_channels)
                for i, o in zip(dims[:-1], dims[1:])
            ]
        )
        self.upsamplers = nn.ModuleList([Upsample(out_dim, compress_time)]) if upsample else None

    def forward(self, x: torch.Tensor, cache: Cache, zq: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache, zq)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        return x


class MidBlock(nn.Module):
    """Two residual blocks at the coarsest level (spatial norms in the decoder)."""

    def __init__(self, dim: int, cfg: CogVideoXVAEConfig, latent_dim: int | None = None):
        super().__init__()
        self.resnets = nn.ModuleList(
            [ResnetBlock(dim, dim, cfg.norm_num_groups, cfg.norm_eps, latent_dim) for _ in range(2)]
        )

    def forward(self, x: torch.Tensor, cache: Cache, zq: torch.Tensor | None = None) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache, zq)
        return x


def temporal_levels(cfg: CogVideoXVAEConfig) -> int:
    """How many levels (the finest in the encoder, the coarsest in the decoder) halve or double time."""
    return int(math.log2(cfg.temporal_compression_ratio))


class Encoder(nn.Module):
    """Video batch (B, 3, T, H, W) -> (B, 2 latent_channels, T', H/8, W/8): conv, down blocks, mid, norm, conv."""

    def __init__(self, cfg: CogVideoXVAEConfig):
        super().__init__()
        dims = cfg.block_out_channels
        levels, time_levels = len(dims), temporal_levels(cfg)
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3)
        self.down_blocks = nn.ModuleList(
            DownBlock(dims[max(i - 1, 0)], dims[i], cfg, downsample=i < levels - 1, compress_time=i < time_levels)
            for i in range(levels)
        )
        self.mid_block = MidBlock(dims[-1], cfg)
        self.norm_out = nn.GroupNorm(cfg.norm_num_groups, dims[-1], eps=1e-6)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.latent_channels, 3)

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv_in(x, cache)
        for block in self.down_blocks:
            x = block(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class Decoder(nn.Module):
    """Latent batch z (B, C_z, t, h, w) -> (B, 3, T, 8h, 8w): conv, mid, up blocks, norm, conv; norms see z."""

    def __init__(self, cfg: CogVideoXVAEConfig):
        super().__init__()
        dims = cfg.block_out_channels[::-1]
        levels, time_levels = len(dims), temporal_levels(cfg)
        self.conv_in = CausalConv3d(cfg.latent_channels, dims[0], 3)
        self.mid_block = MidBlock(dims[0], cfg, latent_dim=cfg.latent_channels)
        self.up_blocks = nn.ModuleList(
            UpBlock(dims[max(i - 1, 0)], dims[i], cfg, upsample=i < levels - 1, compress_time=i < time_levels)
            for i in range(levels)
        )
        self.norm_out = SpatialNorm3D(dims[-1], cfg.latent_channels, cfg.norm_num_groups)
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3)

    def forward(self, z: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv_in(z, cache)
        x = self.mid_block(x, cache, z)
        for block in self.up_blocks:
            x = block(x, cache, z)
        return self.conv_out(F.silu(self.norm_out(x, z)), cache)


def frame_batches(x: torch.Tensor, batch_size: int) -> tuple[torch.Tensor, ...]:
    """Split time into batches of batch_size frames, the leftover frames joining the first batch."""
    num_frames = x.shape[2]
    count = max(num_frames // batch_size, 1)
    return x.split([num_frames - (count - 1) * batch_size] + [batch_size] * (count - 1), dim=2)


class CogVideoXVAE(nn.Module):
    """CogVideoX VAE: encode a video to a diagonal Gaussian posterior, decode latents to a video.

    The pipeline scales latents by config.scaling_factor (see config.invert_scale_latents); encode/decode do not.
    """

    def __init__(self, cfg: CogVideoXVAEConfig):
        super().__init__()
        if cfg.use_quant_conv or cfg.use_post_quant_conv:
            raise NotImplementedError("use_quant_conv / use_post_quant_conv are not supported")
        if cfg.act_fn not in ("silu", "swish"):
            raise NotImplementedError(f"act_fn {cfg.act_fn!r} is not supported")
        if set(cfg.down_block_types) != {"CogVideoXDownBlock3D"} or set(cfg.up_block_types) != {"CogVideoXUpBlock3D"}:
            raise NotImplementedError("only CogVideoXDownBlock3D / CogVideoXUpBlock3D blocks are supported")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)

    @property
    def spatial_compression(self) -> int:
        return 2 ** (len(self.config.block_out_channels) - 1)

    def encode(
        self,
        video: torch.Tensor,
        tiled: bool = False,
        tile_size: tuple[int, int] | None = None,
        tile_overlap: tuple[float, float] = TILE_OVERLAP,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, T, H, W) in [-1, 1] -> posterior mean and logvar (clamped), each (B, C_z, T', H/8, W/8).

        T should be 1, 8k or 8k + 1 (T' = 1, 2k, 2k + 1). With tiled=True, a video larger than tile_size (in
        pixels; default half of the config's sample size) is encoded in overlapping, blended tiles.
        """
        tile_size = tile_size or (self.config.sample_height // 2, self.config.sample_width // 2)
        if tiled and (video.shape[3] > tile_size[0] or video.shape[4] > tile_size[1]):
            latent_tile = [size // self.spatial_compression for size in tile_size]
            stride = [int(size * (1 - f)) for size, f in zip(tile_size, tile_overlap)]
            extent = [int(size * f) for size, f in zip(latent_tile, tile_overlap)]
            keep = [size - e for size, e in zip(latent_tile, extent)]
            h = run_in_tiles(video, self._encode, tile_size, stride, extent, keep)
        else:
            h = self._encode(video)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(
        self,
        z: torch.Tensor,
        tiled: bool = False,
        tile_size: tuple[int, int] | None = None,
        tile_overlap: tuple[float, float] = TILE_OVERLAP,
    ) -> torch.Tensor:
        """(B, C_z, T', h, w) latents -> video (B, 3, T, 8h, 8w), not clamped (about [-1, 1]).

        T = 8 T' for even T', 1 + 4 (T' - 1) for odd T' (frame batches: 1 -> 1, 2 -> 8, 3 -> 9, 13 -> 49).
        With tiled=True, latents larger than tile_size / 8 (tile_size in pixels; default half of the config's
        sample size) are decoded in overlapping, blended tiles.
        """
        tile_size = tile_size or (self.config.sample_height // 2, self.config.sample_width // 2)
        latent_tile = [size // self.spatial_compression for size in tile_size]
        if tiled and (z.shape[3] > latent_tile[0] or z.shape[4] > latent_tile[1]):
            stride = [int(size * (1 - f)) for size, f in zip(latent_tile, tile_overlap)]
            extent = [int(size * f) for size, f in zip(tile_size, tile_overlap)]
            keep = [size - e for size, e in zip(tile_size, extent)]
            return run_in_tiles(z, self._decode, latent_tile, stride, extent, keep)
        return self._decode(z)

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        cache: Cache = {}
        return torch.cat([self.encoder(x, cache) for x in frame_batches(video, SAMPLE_FRAMES_PER_BATCH)], dim=2)

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        cache: Cache = {}
        return torch.cat([self.decoder(x, cache) for x in frame_batches(z, LATENT_FRAMES_PER_BATCH)], dim=2)
