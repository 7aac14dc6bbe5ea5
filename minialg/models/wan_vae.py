"""The Wan 2.1 video VAE: causal 3D convolutions, 8x spatial and 4x temporal compression.

Video (B, 3, 1 + 4k, H, W) in [-1, 1] <-> latent (B, z_dim, 1 + k, H/8, W/8). The first frame is encoded on
its own (an image is a one-frame video); the rest in chunks of 4 frames. Every causal convolution pads time on
the left only, so a chunk may be computed from the chunk before it: the last two input frames of each
convolution are kept in a per-call cache (a dict from convolution module to tensor) and prepended to the next
chunk in place of zero padding. Decoding runs one latent frame at a time the same way. With the cache, chunks
after the first give the same result as one longer chunk (up to float rounding), but the first frame must go
alone: the temporal resamplers pass the first chunk through unresampled. We chunk exactly as the reference does,
so results match it bit for bit.

Tensor names equal those of diffusers' AutoencoderKLWan checkpoints (vae/diffusion_pytorch_model.safetensors).
"""

from dataclasses import dataclass, field

import torch
import torch.nn as nn
import torch.nn.functional as F

Cache = dict[nn.Module, torch.Tensor]  # causal conv -> the last (up to) 2 frames of its previous input

_WAN21_LATENTS_MEAN = [
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
]  # fmt: skip
_WAN21_LATENTS_STD = [
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
]  # fmt: skip


@dataclass
class WanVAEConfig:
    base_dim: int = 96
    decoder_base_dim: int | None = None  # None: same as base_dim
    z_dim: int = 16
    dim_mult: list[int] = field(default_factory=lambda: [1, 2, 4, 4])
    num_res_blocks: int = 2
    attn_scales: list[float] = field(default_factory=list)  # only [] (Wan 2.1) is supported
    temperal_downsample: list[bool] = field(default_factory=lambda: [False, True, True])  # (sic) per level
    latents_mean: list[float] = field(default_factory=lambda: list(_WAN21_LATENTS_MEAN))
    latents_std: list[float] = field(default_factory=lambda: list(_WAN21_LATENTS_STD))
    is_residual: bool = False  # True: Wan 2.2's residual VAE (wan22_vae.py)
    in_channels: int = 3
    out_channels: int = 3
    patch_size: int | None = None  # Wan 2.2: pixels folded into channels in patch x patch squares
    scale_factor_temporal: int = 4
    scale_factor_spatial: int = 8



class CausalConv3d(nn.Conv3d):
    """Conv3d padded causally in time (all 2*p_t padding frames on the left), optionally continuing a cache."""

    def __init__(self, in_dim: int, out_dim: int, kernel_size, stride=1, padding=(0, 0, 0)):
        super().__init__(in_dim, out_dim, kernel_size, stride=stride)
        if isinstance(padding, int):
            padding = (padding, padding, padding)
        pt, ph, pw = padding
        self.pad_t = 2 * pt
        self.pad_hw = (pw, pw, ph, ph)

    def forward(self, x: torch.Tensor, cache: Cache | None = None) -> torch.Tensor:
        # x: (B, C, T, H, W)
        pad_t = self.pad_t
        if cache is not None:
            previous = cache.get(self)
            # keep the last 2 input frames; a 1-frame chunk borrows the frame before it from the old cache.
            # clone: a view would keep the whole chunk alive
            kept = x[:, :, -2:].clone()
            if kept.shape[2] < 2 and previous is not None:
                kept = torch.cat([previous[:, :, -1:], kept], dim=2)
            cache[self] = kept
            if previous is not None:
                x = torch.cat([previous, x], dim=2)
                pad_t -= previous.shape[2]
        x = F.pad(x, (*self.pad_hw, pad_t, 0))
        return super().forward(x)


class RMSNorm(nn.Module):
    """Normalise over channels (dim 1) to unit RMS, times a learned gain; in fp32 for half-precision inputs."""

    def __init__(self, dim: int, ndim: int = 5):
        super().__init__()
        self.scale = dim**0.5
        self.gamma = nn.Parameter(torch.ones(dim, *([1] * (ndim - 2))))  # (C, 1, 1, 1) or (C, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x32 = x.float() if x.dtype in (torch.float16, torch.bfloat16) else x
        return F.normalize(x32, dim=1).to(x.dtype) * self.scale * self.gamma


class ResidualBlock(nn.Module):
    """(RMSNorm, SiLU, causal 3x3x3 conv) twice, plus a (1x1x1 conv) shortcut."""

    def __init__(self, in_dim: int, out_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(in_dim)
        self.conv1 = CausalConv3d(in_dim, out_dim, 3, padding=1)
        self.norm2 = RMSNorm(out_dim)
        self.conv2 = CausalConv3d(out_dim, out_dim, 3, padding=1)
        self.conv_shortcut = CausalConv3d(in_dim, out_dim, 1) if in_dim != out_dim else nn.Identity()

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        # x: (B, C_in, T, H, W) -> (B, C_out, T, H, W)
        shortcut = self.conv_shortcut(x)
        x = self.conv1(F.silu(self.norm1(x)), cache)
        x = self.conv2(F.silu(self.norm2(x)), cache)
        return x + shortcut


class AttentionBlock(nn.Module):
    """Single-head self-attention over the pixels of each frame separately."""

    def __init__(self, dim: int):
        super().__init__()
        self.norm = RMSNorm(dim, ndim=4)
        self.to_qkv = nn.Conv2d(dim, dim * 3, 1)
        self.proj = nn.Conv2d(dim, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, c, t, h, w = x.shape
        residual = x
        x = x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w)
        qkv = self.to_qkv(self.norm(x))  # (BT, 3C, H, W)
        qkv = qkv.reshape(b * t, 1, 3 * c, h * w).permute(0, 1, 3, 2).contiguous()  # (BT, 1, HW, 3C)
        q, k, v = qkv.chunk(3, dim=-1)  # each (BT, 1, HW, C)
        x = F.scaled_dot_product_attention(q, k, v)  # (BT, 1, HW, C)
        x = x.squeeze(1).permute(0, 2, 1).reshape(b * t, c, h, w)
        x = self.proj(x)
        x = x.view(b, t, c, h, w).permute(0, 2, 1, 3, 4)
        return x + residual


class MidBlock(nn.Module):
    """Residual block, attention, residual block."""

    def __init__(self, dim: int):
        super().__init__()
        self.attentions = nn.ModuleList([AttentionBlock(dim)])
        self.resnets = nn.ModuleList([ResidualBlock(dim, dim), ResidualBlock(dim, dim)])

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.resnets[0](x, cache)
        x = self.attentions[0](x)
        return self.resnets[1](x, cache)


class Downsample(nn.Module):
    """Halve H and W with a stride-2 conv; if temporal, also halve time with a stride-2 causal conv.

    Temporal: the first chunk (the first frame) passes through untouched; each later chunk is prefixed with
    the last frame of the chunk before, so 4 frames + 1 become 2.
    """

    def __init__(self, dim: int, temporal: bool):
        super().__init__()
        self.resample = nn.Sequential(nn.ZeroPad2d((0, 1, 0, 1)), nn.Conv2d(dim, dim, 3, stride=2))
        self.time_conv = CausalConv3d(dim, dim, (3, 1, 1), stride=(2, 1, 1)) if temporal else None

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        x = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))  # (BT, C, H/2, W/2)
        x = x.view(b, t, c, h // 2, w // 2).permute(0, 2, 1, 3, 4)  # (B, C, T, H/2, W/2)
        if self.time_conv is None:
            return x
        previous = cache.get(self.time_conv)
        cache[self.time_conv] = x[:, :, -1:].clone()
        if previous is None:
            return x
        return self.time_conv(torch.cat([previous, x], dim=2))  # (B, C, T/2, H/2, W/2)


class Upsample2x(nn.Module):
    """Nearest-neighbour 2x upsampling of H and W, computed in fp32."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.interpolate(x.float(), scale_factor=(2.0, 2.0), mode="nearest-exact").type_as(x)


class Upsample(nn.Module):
    """Double H and W (nearest, then a conv to out_dim channels, by default half); if temporal, also double time.

    Temporal: a causal conv makes 2C channels that become two frames per input frame. The first chunk (the
    first latent frame) is not doubled, so 1 + k latent frames become 1 + 2k, then 1 + 4k.
    """

    def __init__(self, dim: int, temporal: bool, out_dim: int | None = None):
        super().__init__()
        self.resample = nn.Sequential(Upsample2x(), nn.Conv2d(dim, out_dim or dim // 2, 3, padding=1))
        self.time_conv = CausalConv3d(dim, dim * 2, (3, 1, 1), padding=(1, 0, 0)) if temporal else None

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        b, c, t, h, w = x.shape
        if self.time_conv is not None:
            if self.time_conv not in cache:
                # first chunk: no doubling; the next chunk sees zeros before it, as if zero-padded
                cache[self.time_conv] = x.new_zeros(b, c, 2, h, w)
            else:
                x = self.time_conv(x, cache)  # (B, 2C, T, H, W)
                x = x.view(b, 2, c, t, h, w).permute(0, 2, 3, 1, 4, 5).reshape(b, c, 2 * t, h, w)
                t = 2 * t
        x = self.resample(x.permute(0, 2, 1, 3, 4).reshape(b * t, c, h, w))  # (BT, C_out, 2H, 2W)
        return x.view(b, t, -1, 2 * h, 2 * w).permute(0, 2, 1, 3, 4)  # (B, C_out, T, 2H, 2W)


class UpBlock(nn.Module):
    """num_res_blocks + 1 residual blocks, then an optional upsampler."""

    def __init__(self, in_dim: int, out_dim: int, num_res_blocks: int, upsample: str | None):
        super().__init__()
        dims = [in_dim] + [out_dim] * (num_res_blocks + 1)
        self.resnets = nn.ModuleList([ResidualBlock(i, o) for i, o in zip(dims[:-1], dims[1:])])
        self.upsamplers = None
        if upsample is not None:
            self.upsamplers = nn.ModuleList([Upsample(out_dim, temporal=upsample == "3d")])

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        for resnet in self.resnets:
            x = resnet(x, cache)
        if self.upsamplers is not None:
            x = self.upsamplers[0](x, cache)
        return x


class Encoder(nn.Module):
    """Video chunk (B, C_in, T, H, W) -> (B, 2 z_dim, T', H/8, W/8): conv, down levels, mid, norm, conv."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        dims = [cfg.base_dim * m for m in [1] + cfg.dim_mult]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, padding=1)
        self.down_blocks = nn.ModuleList(self.levels(cfg, dims))
        self.mid_block = MidBlock(dims[-1])
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.z_dim * 2, 3, padding=1)

    @staticmethod
    def levels(cfg: WanVAEConfig, dims: list[int]) -> list[nn.Module]:
        """Wan 2.1: one flat list; per level num_res_blocks residual blocks, then a downsampler (not the last)."""
        layers = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                layers.append(ResidualBlock(in_dim, out_dim))
                in_dim = out_dim
            if i < len(cfg.dim_mult) - 1:
                layers.append(Downsample(out_dim, temporal=cfg.temperal_downsample[i]))
        return layers

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv_in(x, cache)
        for layer in self.down_blocks:
            x = layer(x, cache)
        x = self.mid_block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class Decoder(nn.Module):
    """Latent chunk (B, z_dim, T, h, w) -> (B, C_out, T', 8h, 8w): conv, mid, up levels, norm, conv."""

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        base = cfg.decoder_base_dim or cfg.base_dim
        dims = [base * m for m in [cfg.dim_mult[-1]] + cfg.dim_mult[::-1]]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, padding=1)
        self.mid_block = MidBlock(dims[0])
        self.up_blocks = nn.ModuleList(self.levels(cfg, dims))
        self.norm_out = RMSNorm(dims[-1])
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, padding=1)

    @staticmethod
    def levels(cfg: WanVAEConfig, dims: list[int]) -> list[nn.Module]:
        """Wan 2.1: one up block per level; every upsampler (all levels but the last) halves the channels."""
        temperal_upsample = cfg.temperal_downsample[::-1]
        blocks = []
        for i, (in_dim, out_dim) in enumerate(zip(dims[:-1], dims[1:])):
            if i > 0:
                in_dim //= 2  # the previous upsampler halved the channels
            upsample = None
            if i < len(cfg.dim_mult) - 1:
                upsample = "3d" if temperal_upsample[i] else "2d"
            blocks.append(UpBlock(in_dim, out_dim, cfg.num_res_blocks, upsample))
        return blocks

    def forward(self, x: torch.Tensor, cache: Cache) -> torch.Tensor:
        x = self.conv_in(x, cache)
        x = self.mid_block(x, cache)
        for block in self.up_blocks:
            x = block(x, cache)
        return self.conv_out(F.silu(self.norm_out(x)), cache)


class WanVAE(nn.Module):
    """Wan 2.1 VAE: encode a video to a diagonal Gaussian posterior, decode latents to a video."""

    encoder_cls, decoder_cls = Encoder, Decoder  # Wan22VAE swaps in its residual ones

    def __init__(self, cfg: WanVAEConfig):
        super().__init__()
        self.check_config(cfg)
        self.config = cfg
        self.encoder = self.encoder_cls(cfg)
        self.quant_conv = CausalConv3d(cfg.z_dim * 2, cfg.z_dim * 2, 1)
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1)
        self.decoder = self.decoder_cls(cfg)

    @staticmethod
    def check_config(cfg: WanVAEConfig) -> None:
        if cfg.is_residual:
            raise NotImplementedError("is_residual=True is the Wan 2.2 VAE: build minialg.models.wan22_vae.Wan22VAE")
        if cfg.patch_size is not None or cfg.attn_scales:
            raise NotImplementedError("the Wan 2.1 VAE takes no patch_size and no attn_scales")

    def encode(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, 3, 1 + 4k, H, W) in [-1, 1] -> posterior mean and logvar (clamped), each (B, z, 1 + k, H/8, W/8)."""
        num_frames = video.shape[2]
        if (num_frames - 1) % 4 != 0:
            raise ValueError(f"the number of frames must be 1 + 4k, got {num_frames}")
        cache: Cache = {}
        chunks = [video[:, :, :1]] + [video[:, :, i : i + 4] for i in range(1, num_frames, 4)]
        h = torch.cat([self.encoder(chunk, cache) for chunk in chunks], dim=2)  # (B, 2z, 1 + k, H/8, W/8)
        mean, logvar = self.quant_conv(h).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """(B, z_dim, 1 + k, h, w) latents -> video (B, 3, 1 + 4k, 8h, 8w) clamped to [-1, 1]."""
        cache: Cache = {}
        x = self.post_quant_conv(z)
        frames = [self.decoder(x[:, :, i : i + 1], cache) for i in range(x.shape[2])]
        return torch.cat(frames, dim=2).clamp(-1.0, 1.0)

    def _latent_stats(self, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(mean, 1 / std), each (1, z_dim, 1, 1, 1), in z's dtype; 1 / std is taken after the cast, as diffusers."""
        shape = (1, self.config.z_dim, 1, 1, 1)
        mean = torch.tensor(self.config.latents_mean).view(shape).to(z.device, z.dtype)
        inv_std = 1.0 / torch.tensor(self.config.latents_std).view(shape).to(z.device, z.dtype)
        return mean, inv_std

    def normalize(self, z: torch.Tensor) -> torch.Tensor:
        """VAE latents -> the DiT's latent space: (z - mean) / std."""
        mean, inv_std = self._latent_stats(z)
        return (z - mean) * inv_std

    def denormalize(self, z: torch.Tensor) -> torch.Tensor:
        """The DiT's latent space -> VAE latents: z * std + mean."""
        mean, inv_std = self._latent_stats(z)
        return z / inv_std + mean


def sample_posterior(mean: torch.Tensor, logvar: torch.Tensor, generator: torch.Generator | None) -> torch.Tensor:
    """Draw z = mean + std * noise from a diagonal Gaussian; the noise is drawn on the generator's device."""
    std = torch.exp(0.5 * logvar.clamp(-30.0, 20.0))
    noise_device = generator.device if generator is not None else mean.device
    noise = torch.randn(mean.shape, generator=generator, device=noise_device, dtype=mean.dtype)
    return mean + std * noise.to(mean.device)
