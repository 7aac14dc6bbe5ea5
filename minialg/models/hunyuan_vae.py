"""The HunyuanVideo video VAE (HunyuanVideo and HunyuanVideo-I2V): causal 3D convolutions, 8x spatial and 4x
temporal compression, 16 latent channels.

Video (B, 3, 1 + 4k, H, W) in [-1, 1] <-> latent (B, 16, 1 + k, H/8, W/8). Every convolution is causal in time:
the input is padded on the left with copies of its first frame (k_t - 1 of them) and, in H and W, with copies of
the edge pixels (replicate padding). The temporal downsamplers are stride-2 convolutions (1 + 2m -> 1 + m
frames); the temporal upsamplers repeat every frame but the first (1 + m -> 1 + 2m). Unlike the Wan and
CogVideoX VAEs, a clip goes through the network in one pass, and the mid block attends over all pixels of all
frames at once, each pixel to those of its own and earlier frames (a block-causal mask).

Long or large clips are cut into tiles as diffusers does: frame tiles of 16 video frames (4 latent frames) every
12 frames, always on (diffusers' framewise encoding/decoding), and, with tiled=True (diffusers' enable_tiling()),
spatial tiles of 256 x 256 pixels every 192 pixels; overlapping tiles are cross-faded.

Tensor names equal those of diffusers' AutoencoderKLHunyuanVideo checkpoints (vae/diffusion_pytorch_model.safetensors).
"""

import math
from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .tiling import decode_in_tiles, encode_in_tiles, run_in_frame_tiles

TILE_SIZE = (256, 256)  # the reference's default spatial tile (pixels: height, width) and stride
TILE_STRIDE = (192, 192)
TILE_FRAMES = 16  # the reference's default frame tile (video frames) and stride
TILE_FRAME_STRIDE = 12


@dataclass
class HunyuanVideoVAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 16
    down_block_types: list[str] = field(default_factory=lambda: ["HunyuanVideoDownBlock3D"] * 4)
    up_block_types: list[str] = field(default_factory=lambda: ["HunyuanVideoUpBlock3D"] * 4)
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: int = 2
    act_fn: str = "silu"
    norm_num_groups: int = 32
    scaling_factor: float = 0.476986  # applied by the pipeline, not here
    spatial_compression_ratio: int = 8
    temporal_compression_ratio: int = 4  # only 4 is supported (as in diffusers' decoder)
    mid_block_add_attention: bool = True


class CausalConv3d(nn.Module):
    """Conv3d with a cubic kernel, padded by replication: k - 1 frames on the left, k // 2 pixels on each side."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size: int, stride: tuple[int, int, int] = (1, 1, 1)):
        super().__init__()
        half = kernel_size // 2
        self.padding = (half, half, half, half, kernel_size - 1, 0)  # (W left, right, H top, bottom, T before, after)
        self.conv = nn.Conv3d(in_dim, out_dim, kernel_size, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, T, H, W) -> (B, C_out, T', H', W')
        return self.conv(F.pad(x, self.padding, mode="replicate"))


class ResnetBlock(nn.Module):
    """(group norm, SiLU, causal 3x3x3 conv) twice, plus a (1x1x1 conv) shortcut."""

    def __init__(self, in_dim: int, out_dim: int, groups: int):
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, in_dim, eps=1e-6)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3)
        self.norm2 = nn.GroupNorm(groups, out_dim, eps=1e-6)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, T, H, W) -> (B, C_out, T, H, W)
        x = x.contiguous()
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (x if self.conv_shortcut is None else self.conv_shortcut(x))


class CausalAttention(nn.Module):
    """Single-head self-attention over every pixel of every frame; a pixel sees its own and earlier frames."""

    def __init__(self, dim: int, groups: int):
        super().__init__()
        self.group_norm = nn.GroupNorm(groups, dim, eps=1e-6)
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T, H, W) -> (B, C, T, H, W)
        b, c, t, h, w = x.shape
        x = x.permute(0, 2, 3, 4, 1).flatten(1, 3)  # (B, L, C), L = T H W in frame order
        normed = self.group_norm(x.transpose(1, 2)).transpose(1, 2)
        q, k, v = (proj(normed).unsqueeze(1) for proj in (self.to_q, self.to_k, self.to_v))  # (B, 1, L, C)
        frame = torch.arange(t, device=x.device).repeat_interleave(h * w)  # (L,)
        visible = frame[None, :] <= frame[:, None]  # (L, L): key frame <= query frame
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=visible).squeeze(1)  # (B, L, C)
        out = self.to_out[0](out) + x
        return out.unflatten(1, (t, h, w)).permute(0, 4, 1, 2, 3)


class MidBlock(nn.Module):
    """Residual block, causal attention (optional), residual block, at the coarsest level."""

    def __init__(self, dim: int, groups: int, attention: bool):
        super().__init__()
        self.resnets = nn.ModuleList([ResnetBlock(dim, dim, groups) for _ in range(2)])
        self.attentions = nn.ModuleList([CausalAttention(dim, groups) if attention else None])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.resnets[0](x)
        if self.attentions[0] is not None:
            x = self.attentions[0](x)
        return self.resnets[1](x)


class Downsample(nn.Module):
    """A causal 3x3x3 conv of stride (2 or 1, 2, 2): T = 1 + 2m -> 1 + m when time is halved, H, W halved."""

    def __init__(self, dim: int, stride: tuple[int, int, int]):
        super().__init__()
        self.conv = CausalConv3d(dim, dim, 3, stride)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest upsampling by `factor` (T, H, W), the first frame only in H and W, then a causal 3x3x3 conv."""

    def __init__(self, dim: int, factor: tuple[int, int, int]):
        super().__init__()
        self.factor = factor
        self.conv = CausalConv3d(dim, dim, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, 1 + m, H, W) -> (B, C, 1 + f_t m, f_h H, f_w W)
        first = F.interpolate(x[:, :, 0], scale_factor=self.factor[1:], mode="nearest").unsqueeze(2)
        if x.shape[2] > 1:
            rest = F.interpolate(x[:, :, 1:].contiguous(), scale_factor=self.factor, mode="nearest")
            first = torch.cat([first, rest], dim=2)
        return self.conv(first)


class DownBlock(nn.Module):
    """Residual blocks, then an optional downsampler."""

    def __init__(self, in_dim: int, out_dim: int, layers: int, groups: int, stride: tuple[int, int, int]):
        super().__init__()
        dims = [in_dim] + [out_dim] * layers
        self.resnets = nn.ModuleList(ResnetBlock(i, o, groups) for i, o in zip(dims[:-1], dims[1:]))
        self.downsamplers = nn.ModuleList([Downsample(out_dim, stride)]) if max(stride) > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.downsamplers is None else self.downsamplers[0](x)


class UpBlock(nn.Module):
    """Residual blocks, then an optional upsampler."""

    def __init__(self, in_dim: int, out_dim: int, layers: int, groups: int, factor: tuple[int, int, int]):
        super().__init__()
        dims = [in_dim] + [out_dim] * layers
        self.resnets = nn.ModuleList(ResnetBlock(i, o, groups) for i, o in zip(dims[:-1], dims[1:]))
        self.upsamplers = nn.ModuleList([Upsample(out_dim, factor)]) if max(factor) > 1 else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x)
        return x if self.upsamplers is None else self.upsamplers[0](x)


def level_factors(cfg: HunyuanVideoVAEConfig) -> list[tuple[int, int, int]]:
    """Per level (finest first in the encoder, coarsest first in the decoder): the (T, H, W) resampling factor.

    The first log2(spatial ratio) levels resample space; the log2(temporal ratio) levels before the last
    resample time.
    """
    levels = len(cfg.block_out_channels)
    space_levels = int(math.log2(cfg.spatial_compression_ratio))
    time_levels = int(math.log2(cfg.temporal_compression_ratio))
    factors = []
    for i in range(levels):
        s = 2 if i < space_levels else 1
        t = 2 if levels - 1 - time_levels <= i < levels - 1 else 1
        factors.append((t, s, s))
    return factors


class Encoder(nn.Module):
    """Video (B, 3, 1 + 4k, H, W) -> (B, 2 latent_channels, 1 + k, H/8, W/8): conv, down blocks, mid, norm, conv."""

    def __init__(self, cfg: HunyuanVideoVAEConfig):
        super().__init__()
        dims, groups = cfg.block_out_channels, cfg.norm_num_groups
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3)
        self.down_blocks = nn.ModuleList(
            DownBlock(dims[max(i - 1, 0)], dims[i], cfg.layers_per_block, groups, stride)
            for i, stride in enumerate(level_factors(cfg))
        )
        self.mid_block = MidBlock(dims[-1], groups, cfg.mid_block_add_attention)
        self.conv_norm_out = nn.GroupNorm(groups, dims[-1], eps=1e-6)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.latent_channels, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class Decoder(nn.Module):
    """Latents (B, latent_channels, 1 + k, h, w) -> (B, 3, 1 + 4k, 8h, 8w): conv, mid, up blocks, norm, conv."""

    def __init__(self, cfg: HunyuanVideoVAEConfig):
        super().__init__()
        dims, groups = cfg.block_out_channels[::-1], cfg.norm_num_groups
        self.conv_in = CausalConv3d(cfg.latent_channels, dims[0], 3)
        self.mid_block = MidBlock(dims[0], groups, cfg.mid_block_add_attention)
        self.up_blocks = nn.ModuleList(
            UpBlock(dims[max(i - 1, 0)], dims[i], cfg.layers_per_block + 1, groups, factor)
            for i, factor in enumerate(level_factors(cfg))
        )
        self.conv_norm_out = nn.GroupNorm(groups, dims[-1], eps=1e-6)
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.mid_block(self.conv_in(z))
        for block in self.up_blocks:
            x = block(x)
        return self.conv_out(F.silu(self.conv_norm_out(x)))


class HunyuanVideoVAE(nn.Module):
    """HunyuanVideo VAE: encode a video to a diagonal Gaussian posterior, decode latents to a video.

    The pipeline scales latents by config.scaling_factor; encode/decode do not.
    """

    def __init__(self, cfg: HunyuanVideoVAEConfig):
        super().__init__()
        if cfg.act_fn not in ("silu", "swish"):
            raise NotImplementedError(f"act_fn {cfg.act_fn!r} is not supported")
        if cfg.temporal_compression_ratio != 4:
            raise NotImplementedError(f"temporal_compression_ratio {cfg.temporal_compression_ratio} (only 4)")
        down_blocks_known = set(cfg.down_block_types) == {"HunyuanVideoDownBlock3D"}
        if not down_blocks_known or set(cfg.up_block_types) != {"HunyuanVideoUpBlock3D"}:
            raise NotImplementedError("only HunyuanVideoDownBlock3D / HunyuanVideoUpBlock3D blocks are supported")
        if len({len(cfg.down_block_types), len(cfg.block_out_channels), len(cfg.up_block_types)}) != 1:
            raise ValueError("down_block_types, up_block_types and block_out_channels differ in length")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.quant_conv = nn.Conv3d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = nn.Conv3d(cfg.latent_channels, cfg.latent_channels, 1)

    def encode(
        self,
        video: torch.Tensor,
        tiled: bool = False,
        tile_size: tuple[int, int] = TILE_SIZE,
        tile_stride: tuple[int, int] = TILE_STRIDE,
        tile_frames: int = TILE_FRAMES,
        tile_frame_stride: int = TILE_FRAME_STRIDE,
        framewise: bool = True,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, 1 + 4k, H, W) in [-1, 1] -> posterior mean and logvar (clamped), each (B, C_z, 1 + k, H/8, W/8).

        More than tile_frames frames are encoded in frame tiles (unless framewise=False); with tiled=True, a
        video larger than tile_size (pixels) in spatial tiles too.
        """
        encode = self._encode
        if tiled and (video.shape[3] > tile_size[0] or video.shape[4] > tile_size[1]):
            encode = partial(self._encode_in_tiles, tile_size=tile_size, tile_stride=tile_stride)
        if framewise and video.shape[2] > tile_frames:
            rt = self.config.temporal_compression_ratio
            latent_frames = (video.shape[2] - 1) // rt + 1
            extent = tile_frames // rt - tile_frame_stride // rt
            h = run_in_frame_tiles(video, encode, tile_frames, tile_frame_stride, extent, tile_frame_stride // rt)
            h = h[:, :, :latent_frames]
        else:
            h = encode(video)
        mean, logvar = h.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(
        self,
        z: torch.Tensor,
        tiled: bool = False,
        tile_size: tuple[int, int] = TILE_SIZE,
        tile_stride: tuple[int, int] = TILE_STRIDE,
        tile_frames: int = TILE_FRAMES,
        tile_frame_stride: int = TILE_FRAME_STRIDE,
        framewise: bool = True,
    ) -> torch.Tensor:
        """(B, C_z, 1 + k, h, w) latents -> video (B, 3, 1 + 4k, 8h, 8w), not clamped (about [-1, 1]).

        More than tile_frames / 4 latent frames are decoded in frame tiles (unless framewise=False); with
        tiled=True, latents larger than tile_size / 8 in spatial tiles too (tile sizes and strides in pixels).
        """
        rs, rt = self.config.spatial_compression_ratio, self.config.temporal_compression_ratio
        decode = self._decode
        if tiled and (z.shape[3] > tile_size[0] // rs or z.shape[4] > tile_size[1] // rs):
            decode = partial(self._decode_in_tiles, tile_size=tile_size, tile_stride=tile_stride)
        if framewise and z.shape[2] > tile_frames // rt:
            extent = tile_frames - tile_frame_stride
            video = run_in_frame_tiles(z, decode, tile_frames // rt, tile_frame_stride // rt, extent, tile_frame_stride)
            return video[:, :, : (z.shape[2] - 1) * rt + 1]
        return decode(z)

    def _encode(self, video: torch.Tensor) -> torch.Tensor:
        return self.quant_conv(self.encoder(video))

    def _decode(self, z: torch.Tensor) -> torch.Tensor:
        return self.decoder(self.post_quant_conv(z))

    def _encode_in_tiles(self, video: torch.Tensor, tile_size, tile_stride) -> torch.Tensor:
        return encode_in_tiles(video, self._encode, self.config.spatial_compression_ratio, tile_size, tile_stride)

    def _decode_in_tiles(self, z: torch.Tensor, tile_size, tile_stride) -> torch.Tensor:
        return decode_in_tiles(z, self._decode, self.config.spatial_compression_ratio, tile_size, tile_stride)
