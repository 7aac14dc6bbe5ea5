"""The LTX-Video video VAE (0.9.0 to 0.9.8): 32x spatial and 8x temporal compression, 128 latent channels.

Video (B, 3, 1 + 8k, H, W) in [-1, 1] <-> latent (B, 128, 1 + k, H/32, W/32). Pixels are first folded into
channels in 4 x 4 squares (3 -> 48 channels at H/4, W/4), the decoder's 48 output channels unfolded the same way.
Convolutions pad H and W with zeros; in time the encoder pads causally (k - 1 copies of the first frame on the
left), the decoder symmetrically (copies of the first and last frames). The norms are RMS norms over channels
without weights. Three generations:
- 0.9.0: each encoder level halves T, H and W with a stride-2 conv; each decoder level doubles them by a conv to
  8x the channels unfolded into 2 x 2 x 2 cells (the first of each frame pair dropped: 1 + m -> 1 + 2m).
- 0.9.1 adds to the decoder: timestep conditioning (a sinusoid-MLP embedding scales and shifts every norm),
  noise injection (per-pixel noise, the same for all frames, times a learned per-channel scale, after the
  convolutions of the marked levels), and residual upsamplers that also add their input unfolded and repeated.
- 0.9.5+ encoder levels (LTXVideo095DownBlock3D) downsample in space, time or both by folding cells into
  channels: a conv to fewer channels folded, plus the input folded and averaged in channel groups.
The encoder's last conv makes latent_channels + 1 channels: the means and one log-variance shared by all channels.

With tiled=True (diffusers' enable_tiling()), large inputs run in spatial tiles of 512 x 512 pixels every 448,
cross-faded. The pipeline normalises latents with the latents_mean / latents_std buffers; encode/decode do not.

Tensor names equal those of diffusers' AutoencoderKLLTXVideo checkpoints (vae/diffusion_pytorch_model.safetensors).
"""

from dataclasses import dataclass, field
from functools import partial

import torch
import torch.nn as nn
import torch.nn.functional as F

from .cogvideox_vae import CausalConv3d
from .tiling import decode_in_tiles, encode_in_tiles
from .wan import MLP, timestep_sinusoid
from .wan22_vae import average_down, fold, patchify, unfold, unpatchify

TILE_SIZE = (512, 512)  # the reference's default spatial tile (pixels: height, width) and stride
TILE_STRIDE = (448, 448)
TIME_FREQ_DIM = 256  # sinusoidal features of the decoder's timestep
DOWNSAMPLE_STRIDES = {"spatial": (1, 2), "temporal": (2, 1), "spatiotemporal": (2, 2)}  # (time, space)


@dataclass
class LTXVideoVAEConfig:
    in_channels: int = 3
    out_channels: int = 3
    latent_channels: int = 128
    block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    down_block_types: list[str] = field(default_factory=lambda: ["LTXVideoDownBlock3D"] * 4)
    decoder_block_out_channels: list[int] = field(default_factory=lambda: [128, 256, 512, 512])
    layers_per_block: list[int] = field(default_factory=lambda: [4, 3, 3, 3, 4])  # per level, then the mid block
    decoder_layers_per_block: list[int] = field(default_factory=lambda: [4, 3, 3, 3, 4])
    spatio_temporal_scaling: list[bool] = field(default_factory=lambda: [True, True, True, False])
    decoder_spatio_temporal_scaling: list[bool] = field(default_factory=lambda: [True, True, True, False])
    decoder_inject_noise: list[bool] = field(default_factory=lambda: [False] * 5)  # per level, mid block last
    downsample_type: list[str] = field(default_factory=lambda: ["conv"] * 4)  # 0.9.5+ down blocks only
    upsample_residual: list[bool] = field(default_factory=lambda: [False] * 4)
    upsample_factor: list[int] = field(default_factory=lambda: [1] * 4)  # channel reduction of each upsampler
    timestep_conditioning: bool = False
    patch_size: int = 4
    patch_size_t: int = 1  # only 1 is supported (as in diffusers)
    resnet_norm_eps: float = 1e-6
    scaling_factor: float = 1.0  # applied by the pipeline, not here
    encoder_causal: bool = True
    decoder_causal: bool = False
    spatial_compression_ratio: int | None = None  # None: patch_size * 2 ** sum(spatio_temporal_scaling)
    temporal_compression_ratio: int | None = None  # None: patch_size_t * 2 ** sum(spatio_temporal_scaling)


def rms_norm(x: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalise (B, C, ...) over channels to unit RMS (statistics in float32), no weight."""
    x = x.movedim(1, -1)
    variance = x.float().pow(2).mean(-1, keepdim=True)
    return (x * torch.rsqrt(variance + eps)).to(x.dtype).movedim(-1, 1)


def spatial_noise(x: torch.Tensor, scale: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """(H, W) standard noise drawn in x's dtype (on the generator's device) times a per-channel scale (C, 1, 1):
    (1, C, 1, H, W), the same for every frame and batch item. generator None: the global RNG, as diffusers."""
    device = generator.device if generator is not None else x.device
    noise = torch.randn(x.shape[-2:], generator=generator, device=device, dtype=x.dtype).to(x.device)
    return (noise[None] * scale)[None, :, None]


class TimeEmbedder(nn.Module):
    """Timestep (B,) -> (B, dim, 1, 1, 1): 256 sinusoidal features [cos | sin], then linear, SiLU, linear."""

    def __init__(self, dim: int):
        super().__init__()
        self.timestep_embedder = MLP(TIME_FREQ_DIM, dim, nn.SiLU())

    def forward(self, timestep: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        features = timestep_sinusoid(timestep.flatten(), TIME_FREQ_DIM).to(x.dtype)
        return self.timestep_embedder(features).view(x.shape[0], -1, 1, 1, 1)


class ResnetBlock(nn.Module):
    """(RMS norm, [timestep scale and shift], SiLU, 3x3x3 conv, [noise]) twice, plus the input, through a layer
    norm and a 1x1x1 conv when the width changes."""

    def __init__(self, in_dim: int, out_dim: int, eps: float, causal: bool, noise: bool = False, time: bool = False):
        super().__init__()
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, causal=causal)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, causal=causal)
        self.norm3 = nn.LayerNorm(in_dim, eps=eps) if in_dim != out_dim else None
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1, causal=causal) if in_dim != out_dim else None
        self.per_channel_scale1 = nn.Parameter(torch.zeros(in_dim, 1, 1)) if noise else None
        self.per_channel_scale2 = nn.Parameter(torch.zeros(in_dim, 1, 1)) if noise else None
        self.scale_shift_table = nn.Parameter(torch.zeros(4, in_dim)) if time else None

    def forward(self, x: torch.Tensor, temb: torch.Tensor | None, generator: torch.Generator | None) -> torch.Tensor:
        # x: (B, C_in, T, H, W), temb: (B, 4 C_in, 1, 1, 1) when timestep-conditioned -> (B, C_out, T, H, W)
        h = rms_norm(x)
        if self.scale_shift_table is not None:
            table = self.scale_shift_table[None, :, :, None, None, None]  # (1, 4, C, 1, 1, 1)
            shift1, scale1, shift2, scale2 = (temb.unflatten(1, (4, -1)) + table).unbind(dim=1)
            h = h * (1 + scale1) + shift1
        h = self.conv1(F.silu(h))
        if self.per_channel_scale1 is not None:
            h = h + spatial_noise(h, self.per_channel_scale1, generator)
        h = rms_norm(h)
        if self.scale_shift_table is not None:
            h = h * (1 + scale2) + shift2
        h = self.conv2(F.silu(h))
        if self.per_channel_scale2 is not None:
            h = h + spatial_noise(h, self.per_channel_scale2, generator)
        if self.norm3 is not None:  # contiguous: the layout the reference's 1x1x1 conv gets (same roundings)
            x = self.conv_shortcut(self.norm3(x.movedim(1, -1)).movedim(-1, 1).contiguous())
        return h + x


class Downsampler(nn.Module):
    """Fold (ft, fs, fs) cells into channels, in_dim -> out_dim: a 3x3x3 conv to out_dim / (ft fs fs) channels,
    folded, plus the input folded and averaged in groups of channels. The first ft - 1 frames are repeated in
    front first, so 1 + 2m frames become 1 + m."""

    def __init__(self, in_dim: int, out_dim: int, stride: tuple[int, int], causal: bool):
        super().__init__()
        self.out_dim, self.stride = out_dim, stride
        self.conv = CausalConv3d(in_dim, out_dim // (stride[0] * stride[1] ** 2), 3, causal=causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C_in, T, H, W) -> (B, C_out, (T + ft - 1) / ft, H / fs, W / fs)
        x = torch.cat([x[:, :, : self.stride[0] - 1], x], dim=2)
        return fold(self.conv(x), *self.stride) + average_down(x, self.out_dim, *self.stride)


class Upsampler(nn.Module):
    """Double T, H and W, in_dim -> in_dim / factor channels: a 3x3x3 conv to 8 in_dim / factor channels unfolded
    into 2 x 2 x 2 cells, the first frame dropped (1 + m -> 1 + 2m); if residual, plus the input unfolded the
    same way and tiled along channels."""

    def __init__(self, in_dim: int, causal: bool, residual: bool, factor: int):
        super().__init__()
        self.residual, self.factor = residual, factor
        self.conv = CausalConv3d(in_dim, in_dim * 8 // factor, 3, causal=causal)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (B, C, T, H, W) -> (B, C / factor, 2T - 1, 2H, 2W)
        h = unfold(self.conv(x), 2, 2)[:, :, 1:]
        if self.residual:
            h = h + unfold(x, 2, 2).repeat(1, 8 // self.factor, 1, 1, 1)[:, :, 1:]
        return h


class DownBlock(nn.Module):
    """Residual blocks at in_dim, then a downsampler, then (0.9.0 blocks, conv_out) a residual block to out_dim.

    downsample: None, "conv" (a stride-2 3x3x3 conv, all 0.9.0 blocks) or a DOWNSAMPLE_STRIDES key (to out_dim).
    """

    def __init__(
        self, in_dim: int, out_dim: int, layers: int, eps: float, causal: bool, downsample: str | None, conv_out: bool
    ):
        super().__init__()
        self.resnets = nn.ModuleList(ResnetBlock(in_dim, in_dim, eps, causal) for _ in range(layers))
        self.downsamplers = None
        if downsample == "conv":
            self.downsamplers = nn.ModuleList([CausalConv3d(in_dim, in_dim, 3, stride=2, causal=causal)])
        elif downsample is not None:
            self.downsamplers = nn.ModuleList([Downsampler(in_dim, out_dim, DOWNSAMPLE_STRIDES[downsample], causal)])
        self.conv_out = ResnetBlock(in_dim, out_dim, eps, causal) if conv_out and in_dim != out_dim else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, None, None)
        if self.downsamplers is not None:
            x = self.downsamplers[0](x)
        return x if self.conv_out is None else self.conv_out(x, None, None)


class UpBlock(nn.Module):
    """[A residual block in_dim -> out_dim], [an upsampler from out_dim x factor channels], residual blocks; each
    block timestep-conditioned by its own embedding and with noise if asked. Also the mid blocks (neither)."""

    def __init__(
        self, in_dim: int, out_dim: int, layers: int, eps: float, causal: bool, noise: bool = False,
        time: bool = False, upsample: bool = False, residual: bool = False, factor: int = 1,
    ):  # fmt: skip
        super().__init__()
        self.time_embedder = TimeEmbedder(in_dim * 4) if time else None
        self.conv_in = ResnetBlock(in_dim, out_dim, eps, causal, noise, time) if in_dim != out_dim else None
        self.upsamplers = None
        if upsample:
            self.upsamplers = nn.ModuleList([Upsampler(out_dim * factor, causal, residual, factor)])
        self.resnets = nn.ModuleList(ResnetBlock(out_dim, out_dim, eps, causal, noise, time) for _ in range(layers))

    def forward(self, x: torch.Tensor, timestep: torch.Tensor | None, generator: torch.Generator | None):
        if self.conv_in is not None:
            x = self.conv_in(x, timestep, generator)  # the raw timestep, as diffusers (fails if conditioned)
        temb = None if self.time_embedder is None else self.time_embedder(timestep, x)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x)
        for resnet in self.resnets:
            x = resnet(x, temb, generator)
        return x


class Encoder(nn.Module):
    """Video (B, 3, 1 + 8k, H, W) -> (B, C_z + 1, 1 + k, H/32, W/32): patchify, conv, down blocks, mid, norm, conv."""

    def __init__(self, cfg: LTXVideoVAEConfig):
        super().__init__()
        dims, eps, causal = cfg.block_out_channels, cfg.resnet_norm_eps, cfg.encoder_causal
        self.patch = cfg.patch_size
        self.conv_in = CausalConv3d(cfg.in_channels * self.patch**2, dims[0], 3, causal=causal)
        v095 = cfg.down_block_types[-1] == "LTXVideo095DownBlock3D"  # 0.9.5+: one level fewer than widths
        blocks, out_dim = [], dims[0]
        for i in range(len(dims) - 1 if v095 else len(dims)):
            in_dim, out_dim = out_dim, dims[min(i + 1, len(dims) - 1)]
            old = cfg.down_block_types[i] == "LTXVideoDownBlock3D"
            downsample = ("conv" if old else cfg.downsample_type[i]) if cfg.spatio_temporal_scaling[i] else None
            blocks.append(DownBlock(in_dim, out_dim, cfg.layers_per_block[i], eps, causal, downsample, old))
        self.down_blocks = nn.ModuleList(blocks)
        self.mid_block = UpBlock(out_dim, out_dim, cfg.layers_per_block[-1], eps, causal)
        self.conv_out = CausalConv3d(out_dim, cfg.latent_channels + 1, 3, causal=causal)

    def forward(self, video: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(patchify(video, self.patch))  # (B, 3 p p, T, H/p, W/p) in
        for block in self.down_blocks:
            x = block(x)
        x = self.mid_block(x, None, None)
        return self.conv_out(F.silu(rms_norm(x)))


class Decoder(nn.Module):
    """Latents (B, C_z, 1 + k, h, w) -> (B, 3, 1 + 8k, 32h, 32w): conv, mid, up blocks, norm, [timestep scale and
    shift], conv, unpatchify."""

    def __init__(self, cfg: LTXVideoVAEConfig):
        super().__init__()
        dims, layers = cfg.decoder_block_out_channels[::-1], cfg.decoder_layers_per_block[::-1]
        noise, factors = cfg.decoder_inject_noise[::-1], cfg.upsample_factor[::-1]
        upsample, residual = cfg.decoder_spatio_temporal_scaling[::-1], cfg.upsample_residual[::-1]
        eps, causal, time = cfg.resnet_norm_eps, cfg.decoder_causal, cfg.timestep_conditioning
        self.patch = cfg.patch_size
        self.conv_in = CausalConv3d(cfg.latent_channels, dims[0], 3, causal=causal)
        self.mid_block = UpBlock(dims[0], dims[0], layers[0], eps, causal, noise[0], time)
        blocks, out_dim = [], dims[0]
        for i in range(len(dims)):
            in_dim, out_dim = out_dim // factors[i], dims[i] // factors[i]
            blocks.append(UpBlock(in_dim, out_dim, layers[i + 1], eps, causal, noise[i + 1], time, upsample[i],
                                  residual[i], factors[i]))
        self.up_blocks = nn.ModuleList(blocks)
        self.conv_out = CausalConv3d(out_dim, cfg.out_channels * self.patch**2, 3, causal=causal)
        self.timestep_scale_multiplier = self.time_embedder = self.scale_shift_table = None
        if time:
            self.timestep_scale_multiplier = nn.Parameter(torch.tensor(1000.0))
            self.time_embedder = TimeEmbedder(out_dim * 2)
            self.scale_shift_table = nn.Parameter(torch.zeros(2, out_dim))

    def forward(self, z: torch.Tensor, timestep: torch.Tensor | None, generator: torch.Generator | None):
        x = self.conv_in(z)
        if self.timestep_scale_multiplier is not None:
            timestep = timestep * self.timestep_scale_multiplier
        x = self.mid_block(x, timestep, generator)
        for block in self.up_blocks:
            x = block(x, timestep, generator)
        x = rms_norm(x)
        if self.time_embedder is not None:
            table = self.scale_shift_table[None, :, :, None, None, None]  # (1, 2, C, 1, 1, 1)
            shift, scale = (self.time_embedder(timestep, x).unflatten(1, (2, -1)) + table).unbind(dim=1)
            x = x * (1 + scale) + shift
        return unpatchify(self.conv_out(F.silu(x)), self.patch)  # (B, 3 p p, T, H/p, W/p) out


class LTXVideoVAE(nn.Module):
    """LTX-Video VAE: encode a video to a diagonal Gaussian posterior, decode latents to a video.

    latents_mean / latents_std (checkpoint buffers) are for the pipeline's normalisation; encode/decode ignore them.
    """

    def __init__(self, cfg: LTXVideoVAEConfig):
        super().__init__()
        if cfg.patch_size_t != 1:
            raise NotImplementedError(f"patch_size_t {cfg.patch_size_t} (only 1)")
        known = {"LTXVideoDownBlock3D", "LTXVideo095DownBlock3D"}
        if not set(cfg.down_block_types) <= known:
            raise NotImplementedError(f"down_block_types {cfg.down_block_types} (only {sorted(known)})")
        types = [t for t, b in zip(cfg.downsample_type, cfg.down_block_types) if b == "LTXVideo095DownBlock3D"]
        if not set(types) <= {"conv", *DOWNSAMPLE_STRIDES}:
            allowed = ", ".join(["conv", *DOWNSAMPLE_STRIDES])
            raise NotImplementedError(f"downsample_type {cfg.downsample_type} (only {allowed})")
        self.config = cfg
        self.encoder = Encoder(cfg)
        self.decoder = Decoder(cfg)
        self.register_buffer("latents_mean", torch.zeros(cfg.latent_channels))
        self.register_buffer("latents_std", torch.ones(cfg.latent_channels))

    @property
    def spatial_compression(self) -> int:
        cfg = self.config
        return cfg.spatial_compression_ratio or cfg.patch_size * 2 ** sum(cfg.spatio_temporal_scaling)

    @property
    def temporal_compression(self) -> int:
        cfg = self.config
        return cfg.temporal_compression_ratio or cfg.patch_size_t * 2 ** sum(cfg.spatio_temporal_scaling)

    def _latent_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, std), each (1, C_z, 1, 1, 1) in z's dtype and device."""
        return tuple(stat.view(1, -1, 1, 1, 1).to(z.device, z.dtype) for stat in (self.latents_mean, self.latents_std))

    def normalize(self, z: torch.Tensor, scaling_factor: float | None = None) -> torch.Tensor:
        """VAE latents -> the DiT's latent space, as the pipelines: (z - mean) * scaling_factor / std, the
        statistics cast to z's dtype first. scaling_factor: None for the config's (the image-to-video pipeline
        passes none when it normalises the encoded image, so 1.0; every published config has 1.0)."""
        mean, std = self._latent_stats(z)
        return (z - mean) * (self.config.scaling_factor if scaling_factor is None else scaling_factor) / std

    def denormalize(self, z: torch.Tensor, scaling_factor: float | None = None) -> torch.Tensor:
        """The DiT's latent space -> VAE latents: z * std / scaling_factor + mean (None: the config's)."""
        mean, std = self._latent_stats(z)
        return z * std / (self.config.scaling_factor if scaling_factor is None else scaling_factor) + mean

    def encode(
        self,
        video: torch.Tensor,
        tiled: bool = False,
        tile_size: tuple[int, int] = TILE_SIZE,
        tile_stride: tuple[int, int] = TILE_STRIDE,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, 1 + 8k, H, W) in [-1, 1] -> posterior mean and logvar (clamped), each (B, C_z, 1 + k, H/32, W/32).

        Every logvar channel is the same (the encoder's last channel). With tiled=True, a video larger than
        tile_size (pixels) is encoded in overlapping, blended tiles.
        """
        encode = self.encoder
        if tiled and (video.shape[3] > tile_size[0] or video.shape[4] > tile_size[1]):
            encode = partial(encode_in_tiles, encode=self.encoder, ratio=self.spatial_compression,
                             tile_size=tile_size, tile_stride=tile_stride)
        h = encode(video)  # (B, C_z + 1, ...)
        channels = self.config.latent_channels
        return h[:, :channels], h[:, channels:].clamp(-30.0, 20.0).repeat(1, channels, 1, 1, 1)

    def decode(
        self,
        z: torch.Tensor,
        timestep: torch.Tensor | float | None = None,
        generator: torch.Generator | None = None,
        tiled: bool = False,
        tile_size: tuple[int, int] = TILE_SIZE,
        tile_stride: tuple[int, int] = TILE_STRIDE,
    ) -> torch.Tensor:
        """(B, C_z, 1 + k, h, w) latents -> video (B, 3, 1 + 8k, 32h, 32w), not clamped (about [-1, 1]).

        timestep: (B,) or a number, required by a timestep-conditioned decoder (0.9.1+), else ignored. generator:
        the decoder's injected noise (0.9.1), None for the global RNG (as diffusers). With tiled=True, latents
        larger than tile_size / 32 are decoded in overlapping, blended tiles (tile sizes and strides in pixels).
        """
        if not self.config.timestep_conditioning:
            timestep = None
        elif timestep is None:
            raise ValueError("this VAE's decoder is timestep-conditioned: pass a timestep (official configs: 0.05)")
        elif not torch.is_tensor(timestep) or timestep.ndim == 0:
            timestep = torch.as_tensor(timestep, dtype=z.dtype, device=z.device).expand(z.shape[0])
        decode = partial(self.decoder, timestep=timestep, generator=generator)
        ratio = self.spatial_compression
        if tiled and (z.shape[3] > tile_size[0] // ratio or z.shape[4] > tile_size[1] // ratio):
            return decode_in_tiles(z, decode, ratio, tile_size, tile_stride)
        return decode(z)
