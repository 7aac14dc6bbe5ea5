"""The LTX-Video diffusion transformer (0.9.0 2B through the 0.9.7/0.9.8 13B).

The video latent comes in packed: one token per latent pixel (patch size 1), the pipelines' (B, F*H*W, C) layout
(`pack`/`unpack`). A linear map lifts the channels to the model width; every block then runs self-attention over
all video tokens with 3D rotary positions, cross-attention to the projected T5 text (padding tokens masked out) and
an MLP. The timestep modulates the self-attention and the MLP PixArt adaLN-single style: one timestep MLP for the
whole model, six vectors per block from it plus a learned per-block table. There is one timestep per video, or
one per token (the image-to-video pipelines put the conditioning frame's tokens at timestep 0). Tensor names
follow the diffusers checkpoint (LTXVideoTransformer3DModel), so a checkpoint loads name for name.

Rotary positions span the whole model width, not each head: the width splits into D//6 frequencies, each
rotating three channel pairs (frame, row, column, interleaved), after D%6 unrotated leading channels. A position
is a fraction of a base size (20 frames, 2048 pixels), from the latent grid or from explicit coordinates.

Shapes: B batch, F/H/W latent frames/height/width, L = F*H*W video tokens, C latent channels, D model width,
N heads, Dh head width, T text tokens.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .wan import MLP, FeedForward, SelfAttention, attend, split_heads, timestep_sinusoid

TIME_FREQ_DIM = 256  # sinusoid width of the timestep embedding
QK_EPS = 1e-5  # the q/k RMS norms (diffusers fixes it; norm_eps is for the block norms)
ROPE_THETA = 10000.0
ROPE_BASE = (20, 2048, 2048)  # the positions rotary angles are fractions of: frames, height, width


@dataclass
class LTXVideoTransformerConfig:
    in_channels: int = 128
    out_channels: int = 128
    patch_size: int = 1  # the pipelines' patching (folded into in_channels); here it only scales grid positions
    patch_size_t: int = 1
    num_attention_heads: int = 32
    attention_head_dim: int = 64  # 13B: 128
    cross_attention_dim: int = 2048  # must equal the width: the text is projected to it; 13B: 4096
    num_layers: int = 28  # 13B: 48
    activation_fn: str = "gelu-approximate"
    qk_norm: str = "rms_norm_across_heads"
    norm_elementwise_affine: bool = False
    norm_eps: float = 1e-6
    caption_channels: int = 4096
    attention_bias: bool = True
    attention_out_bias: bool = True

    def __post_init__(self):
        dim = self.num_attention_heads * self.attention_head_dim
        supported = dict(activation_fn="gelu-approximate", qk_norm="rms_norm_across_heads",
                         norm_elementwise_affine=False, attention_bias=True, attention_out_bias=True)
        for key, value in supported.items():  # what every published LTX-Video checkpoint uses
            if getattr(self, key) != value:
                raise ValueError(f"LTX-Video: unsupported {key}={getattr(self, key)!r} (only {value!r})")
        if self.cross_attention_dim != dim:
            raise ValueError(f"LTX-Video: cross_attention_dim {self.cross_attention_dim} must equal the width {dim}")
        if self.attention_head_dim % 2:
            raise ValueError(f"LTX-Video: attention_head_dim {self.attention_head_dim} must be even (RoPE pairs)")


def pack(latents: torch.Tensor, patch_size: int = 1, patch_size_t: int = 1) -> torch.Tensor:
    """(B, C, F, H, W) latents -> (B, L, C*pt*p*p) tokens in (f, h, w) order, as the pipelines pack them."""
    return rearrange(latents, "b c (f pt) (h ph) (w pw) -> b (f h w) (c pt ph pw)",
                     pt=patch_size_t, ph=patch_size, pw=patch_size)


def unpack(tokens: torch.Tensor, grid: tuple[int, int, int], patch_size: int = 1, patch_size_t: int = 1):
    """(B, L, C*pt*p*p) tokens of a (f, h, w) patch grid -> (B, C, f*pt, h*p, w*p) latents; inverse of `pack`."""
    f, h, w = grid
    return rearrange(tokens, "b (f h w) (c pt ph pw) -> b c (f pt) (h ph) (w pw)",
                     f=f, h=h, w=w, pt=patch_size_t, ph=patch_size, pw=patch_size)


def grid_positions(
    grid: tuple[int, int, int], scale, patch_size: int, patch_size_t: int, device: torch.device
) -> torch.Tensor:
    """The (1, L, 3) float32 positions of a (F, H, W) token grid, tokens in (f, h, w) order.

    scale: diffusers' `rope_interpolation_scale`, what one step on each axis is worth in frames/pixels (the
    0.9.0/0.9.1 pipelines pass (8 / frame_rate, 32, 32)); positions are index * scale * patch / base. None leaves
    the raw indices, not divided by the base (as diffusers does).
    """
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in grid]
    if scale is not None:
        patches = (patch_size_t, patch_size, patch_size)
        axes = [a * s * p / base for a, s, p, base in zip(axes, scale, patches, ROPE_BASE)]
    return torch.stack(torch.meshgrid(*axes, indexing="ij"), dim=-1).reshape(1, -1, 3)


def coord_positions(coords: torch.Tensor) -> torch.Tensor:
    """(B, 3, L) coordinates (frame in seconds, row and column in pixels, as LTXConditionPipeline passes them)
    -> (B, L, 3) positions, each a fraction of its base."""
    return torch.stack([coords[:, i] / base for i, base in enumerate(ROPE_BASE)], dim=-1)


def rope_cos_sin(dim: int, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(B|1, L, 3) positions -> rotation cos/sin of each channel pair of the width D, (B|1, L, D/2) each.

    Frequencies theta^(i/(n-1)) * pi/2 for i < n = D//6, each applied to position * 2 - 1 of all three axes;
    pairs ordered frequency-major (f, h, w, f, h, w, ...), after (D%6)/2 leading pairs left unrotated.
    """
    freqs = ROPE_THETA ** torch.linspace(0.0, 1.0, dim // 6, dtype=torch.float32, device=positions.device)
    freqs = freqs * math.pi / 2.0
    angles = (freqs * (positions[..., None] * 2 - 1)).transpose(-1, -2).flatten(2)  # (B|1, L, 3*(D//6))
    pad = (dim % 6) // 2
    return F.pad(angles.cos(), (pad, 0), value=1.0), F.pad(angles.sin(), (pad, 0), value=0.0)


def rms_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """RMS-normalise the last dim (no weights) in float32; returned in x's dtype."""
    return (x * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


class TextAttention(SelfAttention):
    """Video tokens attend to the projected text; the same projections and q/k norms, no rotary positions."""

    def forward(self, x: torch.Tensor, text: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        """x (B, L, D), text (B, T, D), bias (B, 1, 1, T) added to the logits, or None -> (B, L, D)"""
        q = split_heads(self.norm_q(self.to_q(x)), self.heads)  # (B, N, L, Dh)
        k = split_heads(self.norm_k(self.to_k(text)), self.heads)  # (B, N, T, Dh)
        v = split_heads(self.to_v(text), self.heads)
        return self.to_out[0](attend(q, k, v, bias))


class AdaLayerNormSingle(nn.Module):
    """PixArt adaLN-single (`time_embed`): timestep -> its embedding and the blocks' six modulation vectors."""

    def __init__(self, dim: int):
        super().__init__()
        self.emb = nn.ModuleDict(dict(timestep_embedder=MLP(TIME_FREQ_DIM, dim, nn.SiLU())))
        self.linear = nn.Linear(dim, 6 * dim)

    def forward(self, timestep: torch.Tensor, batch: int, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep (B,) or (B, L) -> modulation (B, L|1, 6, D), embedding (B, L|1, D); sinusoid cast to dtype."""
        features = timestep_sinusoid(timestep.flatten(), TIME_FREQ_DIM).to(dtype)
        emb = self.emb["timestep_embedder"](features)  # (B L|B, D)
        modulation = self.linear(F.silu(emb))  # (B L|B, 6D)
        return modulation.view(batch, -1, 6, emb.shape[-1]), emb.view(batch, -1, emb.shape[-1])


class Block(nn.Module):
    """Modulated self-attention, cross-attention (unmodulated, unnormalised input), modulated MLP."""

    def __init__(self, cfg: LTXVideoTransformerConfig):
        super().__init__()
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.eps = cfg.norm_eps
        self.attn1 = SelfAttention(dim, cfg.num_attention_heads, QK_EPS)
        self.attn2 = TextAttention(dim, cfg.num_attention_heads, QK_EPS)
        self.ff = FeedForward(dim, 4 * dim, dim, approximate="tanh")
        self.scale_shift_table = nn.Parameter(torch.randn(6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        text: torch.Tensor,
        bias: torch.Tensor | None,
    ) -> torch.Tensor:
        """x (B, L, D), modulation (B, L|1, 6, D), cos/sin (B|1, N, L, Dh/2), text (B, T, D), bias (B, 1, 1, T)."""
        shift, scale, gate, ff_shift, ff_scale, ff_gate = (self.scale_shift_table + modulation).unbind(2)
        x = x + self.attn1(rms_norm(x, self.eps) * (1 + scale) + shift, cos, sin) * gate
        x = x + self.attn2(x, text, bias)
        return x + self.ff(rms_norm(x, self.eps) * (1 + ff_scale) + ff_shift) * ff_gate


class LTXVideoTransformer(nn.Module):
    """Predicts the flow-matching velocity of packed LTX-Video latent tokens, given timestep(s) and T5 text."""

    fp32_params: tuple[str, ...] = ()  # diffusers keeps no LTX-Video module in float32

    def __init__(self, cfg: LTXVideoTransformerConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.proj_in = nn.Linear(cfg.in_channels, dim)
        self.scale_shift_table = nn.Parameter(torch.randn(2, dim) / dim**0.5)
        self.time_embed = AdaLayerNormSingle(dim)
        self.caption_projection = MLP(cfg.caption_channels, dim, nn.GELU(approximate="tanh"))
        self.transformer_blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm_out = nn.LayerNorm(dim, eps=1e-6, elementwise_affine=False)
        self.proj_out = nn.Linear(dim, cfg.out_channels or cfg.in_channels)

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        text_mask: torch.Tensor | None = None,
        grid: tuple[int, int, int] | None = None,
        coords: torch.Tensor | None = None,
        rope_interpolation_scale: tuple[float, float, float] | None = None,
    ) -> torch.Tensor:
        """x (B, L, C_in) packed tokens, timestep (B,) or one per token (B, L) on the schedulers' 0-1000 scale
        (sigma * 1000), text (B, T, caption_channels), text_mask (B, T) (1/True: a real token, 0: padding) or
        None -> (B, L, C_out) in x's dtype. x and text in the weights' dtype.

        Positions, one of: grid = (F, H, W), the token grid (L = F*H*W), with rope_interpolation_scale (see
        `grid_positions`; LTXImageToVideoPipeline's way); or coords (B, 3, L) float32 per token [frame in
        seconds, row, column in pixels] (LTXConditionPipeline's `video_coords`; rope_interpolation_scale unused).
        """
        cfg = self.config
        batch, tokens, _ = x.shape
        if (grid is None) == (coords is None):
            raise ValueError("LTX-Video: give the token positions as either grid=(F, H, W) or coords (B, 3, L)")
        if grid is not None and math.prod(grid) != tokens:
            raise ValueError(f"LTX-Video: grid {tuple(grid)} does not hold the {tokens} tokens of x")
        if coords is not None and tuple(coords.shape) != (batch, 3, tokens):
            raise ValueError(f"LTX-Video: coords must be (B, 3, L) = {(batch, 3, tokens)}, got {tuple(coords.shape)}")
        if timestep.numel() not in (batch, batch * tokens):
            raise ValueError(f"LTX-Video: timestep must be (B,) or (B, L), got {tuple(timestep.shape)}")

        if grid is not None:
            positions = grid_positions(grid, rope_interpolation_scale, cfg.patch_size, cfg.patch_size_t, x.device)
        else:
            positions = coord_positions(coords)
        cos, sin = (t.unflatten(-1, (cfg.num_attention_heads, -1)).transpose(1, 2)  # (B|1, N, L, Dh/2) each
                    for t in rope_cos_sin(cfg.num_attention_heads * cfg.attention_head_dim, positions))
        bias = None if text_mask is None else ((1 - text_mask.to(x.dtype)) * -10000.0)[:, None, None, :]

        x = self.proj_in(x)  # (B, L, D)
        modulation, emb = self.time_embed(timestep, batch, x.dtype)  # (B, L|1, 6, D), (B, L|1, D)
        text = self.caption_projection(text)  # (B, T, D)
        for block in self.transformer_blocks:
            x = block(x, modulation, cos, sin, text, bias)

        shift, scale = (self.scale_shift_table + emb[:, :, None]).unbind(2)  # (B, L|1, D) each
        return self.proj_out(self.norm_out(x) * (1 + scale) + shift)
