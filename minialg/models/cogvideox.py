"""The CogVideoX diffusion transformer (1.0 and 1.5, text- and image-to-video).

The text tokens and the patched video latent run side by side through every block: each block normalises and
modulates the two streams with their own shift/scale/gate from the timestep (LayerNormZero), runs one joint
self-attention over [text ; video] (q/k LayerNorm per head, 3D rotary positions on the video tokens only) and
one shared MLP over both. Positions come from rotary embeddings, a fixed 3D sin-cos table added to the video
tokens (CogVideoX-2b), or a learned table added to text and video (CogVideoX-5b-I2V, which has both). Tensor
names follow the diffusers checkpoint (CogVideoXTransformer3DModel), so a checkpoint loads name for name.

Shapes: B batch, F/H/W latent frames/height/width, f/h/w the same in patches, L = f*h*w video tokens,
T text tokens, D model width, N heads, Dh head width, E time embedding width, P distinct texts.

Step-invariant work, done once per run when the caller hands `forward` a `cache` (a dict it owns, one per run and
text): the positional tables (rotary, sin-cos or learned) and the projected text with its positions. Nothing
inside the blocks is: the text tokens are modulated by the timestep from the first block on, so their keys and
values change at every step (joint attention), unlike Wan's cross-attention.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from .wan import WHOLE, gather, kept


@dataclass
class CogVideoXTransformerConfig:
    num_attention_heads: int = 30
    attention_head_dim: int = 64
    in_channels: int = 16  # I2V: 32 = noisy latent 16 + image latent 16
    out_channels: int = 16
    flip_sin_to_cos: bool = True
    freq_shift: int = 0
    time_embed_dim: int = 512
    ofs_embed_dim: int | None = None  # 1.5 I2V: embedding of the "ofs" scalar, added to the time embedding
    text_embed_dim: int = 4096
    num_layers: int = 30
    dropout: float = 0.0  # training only; unused here
    attention_bias: bool = True
    sample_width: int = 90  # latent size the positional tables are built for (learned one: the only size)
    sample_height: int = 60
    sample_frames: int = 49  # in video frames: (latent frames - 1) * temporal_compression_ratio + 1
    patch_size: int = 2
    patch_size_t: int | None = None  # 1.5: frames are patched too
    temporal_compression_ratio: int = 4
    max_text_seq_length: int = 226
    activation_fn: str = "gelu-approximate"
    timestep_activation_fn: str = "silu"
    norm_elementwise_affine: bool = True
    norm_eps: float = 1e-5
    spatial_interpolation_scale: float = 1.875
    temporal_interpolation_scale: float = 1.0
    use_rotary_positional_embeddings: bool = False
    use_learned_positional_embeddings: bool = False
    patch_bias: bool = True  # bias of the 1.0 patch convolution (the 1.5 patch projection always has one)

    def __post_init__(self):
        if self.activation_fn != "gelu-approximate" or self.timestep_activation_fn != "silu":
            raise ValueError(f"unsupported CogVideoX activations: {self.activation_fn}, {self.timestep_activation_fn}")
        if self.use_learned_positional_embeddings and not self.use_rotary_positional_embeddings:
            raise ValueError("CogVideoX: a learned positional embedding comes only together with rotary embeddings")
        if self.patch_size_t is not None and not self.use_rotary_positional_embeddings:
            raise ValueError("CogVideoX: temporal patching (patch_size_t) needs rotary positional embeddings")



def timestep_sinusoid(t: torch.Tensor, dim: int, flip_sin_to_cos: bool, freq_shift: float) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) float32 [sin | cos] features ([cos | sin] if flipped), 10000^(-i/(dim/2-shift))."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=t.device) / (half - freq_shift)
    angles = t.float()[:, None] * torch.exp(exponent)[None, :]  # (B, dim/2)
    parts = [angles.cos(), angles.sin()] if flip_sin_to_cos else [angles.sin(), angles.cos()]
    return torch.cat(parts, dim=-1)


def sincos_1d(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) float32 positions -> (M, dim) float64 [sin | cos] features, frequencies 10000^(-i/(dim/2))."""
    dtype = torch.float32 if positions.device.type == "mps" else torch.float64
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=dtype, device=positions.device) / (dim / 2.0))
    angles = positions.to(dtype)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def sincos_positions(cfg: CogVideoXTransformerConfig, f: int, h: int, w: int, device: torch.device) -> torch.Tensor:
    """The fixed 3D sin-cos table of the video tokens, (L, D) in float64, tokens in (f, h, w) order.

    Channels: a quarter for the frame index, then 3/8 for the column and 3/8 for the row; positions are
    divided by the interpolation scales first (in float32), the sines computed in float64, as diffusers does.
    """
    dim = cfg.num_attention_heads * cfg.attention_head_dim
    dim_t, dim_xy = dim // 4, 3 * dim // 4 // 2
    cols = torch.arange(w, dtype=torch.float32, device=device) / cfg.spatial_interpolation_scale
    rows = torch.arange(h, dtype=torch.float32, device=device) / cfg.spatial_interpolation_scale
    frames = torch.arange(f, dtype=torch.float32, device=device) / cfg.temporal_interpolation_scale
    col_emb = sincos_1d(dim_xy, cols)[None, :, :].expand(h, w, dim_xy)  # (h, w, 3D/8)
    row_emb = sincos_1d(dim_xy, rows)[:, None, :].expand(h, w, dim_xy)
    spatial = torch.cat([col_emb, row_emb], dim=-1).reshape(1, h * w, 2 * dim_xy).expand(f, -1, -1)
    temporal = sincos_1d(dim_t, frames)[:, None, :].expand(f, h * w, dim_t)
    return torch.cat([temporal, spatial], dim=-1).reshape(f * h * w, dim)


def rope_axis(dim: int, positions: torch.Tensor) -> torch.Tensor:
    """(M,) float32 positions -> (M, dim/2) float32 angles, frequencies 10000^(-2i/dim)."""
    inv_freq = 1.0 / 10000.0 ** (torch.arange(0, dim, 2, dtype=torch.float32, device=positions.device) / dim)
    return positions[:, None] * inv_freq[None, :]


def crop_region(h: int, w: int, base_h: int, base_w: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """Top-left and bottom-right corners of an h x w grid resized to cover the base grid and centre-cropped."""
    if h / w > base_h / base_w:
        resize_h, resize_w = base_h, int(round(base_h / h * w))
    else:
        resize_h, resize_w = int(round(base_w / w * h)), base_w
    top, left = int(round((base_h - resize_h) / 2.0)), int(round((base_w - resize_w) / 2.0))
    return (top, left), (top + resize_h, left + resize_w)


def rope_cos_sin(
    cfg: CogVideoXTransformerConfig, f: int, h: int, w: int, device: torch.device
) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation cos/sin of every video token, each (L, Dh/2) float32, tokens in (f, h, w) order.

    The head splits into Dh/4 frame channels and 3Dh/8 each for row and column. Positions as diffusers'
    CogVideoX pipelines compute them (`_prepare_rotary_positional_embeddings`) for latent frames F and
    patch grid h x w:
      1.0 (no patch_size_t): frames 0..F-1; rows and columns spread over the crop that an h x w grid takes when
        resized to cover the sample-size grid (sample_height/p x sample_width/p) and centre-cropped; at the
        sample size itself this is just 0..h-1 and 0..w-1.
      1.5 (patch_size_t): frame patches 0..f-1, rows 0..h-1, columns 0..w-1 (diffusers slices these from the
        sample-size grid, so it fails for a grid larger than that; here any size works).
    """
    head_dim = cfg.attention_head_dim
    dim_t, dim_xy = head_dim // 4, head_dim // 8 * 3
    if cfg.patch_size_t is None:
        (top, left), (bottom, right) = crop_region(
            h, w, cfg.sample_height // cfg.patch_size, cfg.sample_width // cfg.patch_size
        )
        rows = torch.linspace(top, bottom * (h - 1) / h, h, dtype=torch.float32, device=device)
        cols = torch.linspace(left, right * (w - 1) / w, w, dtype=torch.float32, device=device)
        frames = torch.linspace(0, f * (f - 1) / f, f, dtype=torch.float32, device=device)
    else:
        rows = torch.arange(h, dtype=torch.float32, device=device)
        cols = torch.arange(w, dtype=torch.float32, device=device)
        frames = torch.arange(f, dtype=torch.float32, device=device)
    angles_t = rope_axis(dim_t, frames)[:, None, None, :].expand(f, h, w, -1)
    angles_h = rope_axis(dim_xy, rows)[None, :, None, :].expand(f, h, w, -1)
    angles_w = rope_axis(dim_xy, cols)[None, None, :, :].expand(f, h, w, -1)
    theta = torch.cat([angles_t, angles_h, angles_w], dim=-1).reshape(f * h * w, head_dim // 2)
    return theta.cos(), theta.sin()


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) of x (B, N, L, Dh) by the angles in cos/sin (L, Dh/2)."""
    x1, x2 = x[..., 0::2].float(), x[..., 1::2].float()  # (B, N, L, Dh/2) each
    rotated = torch.stack([x1 * cos - x2 * sin, x2 * cos + x1 * sin], dim=-1)  # float32 math, as diffusers
    return rotated.flatten(-2).to(x.dtype)


class PatchEmbed(nn.Module):
    """Video latent -> patch tokens, text -> text tokens; holds the learned position table when there is one."""

    def __init__(self, cfg: CogVideoXTransformerConfig):
        super().__init__()
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        p, pt = cfg.patch_size, cfg.patch_size_t
        if pt is None:  # 1.0: a 2D convolution per frame
            self.proj = nn.Conv2d(cfg.in_channels, dim, kernel_size=p, stride=p, bias=cfg.patch_bias)
        else:  # 1.5: a linear map of each (pt, p, p) patch
            self.proj = nn.Linear(cfg.in_channels * pt * p * p, dim)
        self.text_proj = nn.Linear(cfg.text_embed_dim, dim)
        self.pos_embedding = None
        if cfg.use_learned_positional_embeddings:  # (1, T + L, D) at the sample size, text positions included
            f = (cfg.sample_frames - 1) // cfg.temporal_compression_ratio + 1
            tokens = f * (cfg.sample_height // p) * (cfg.sample_width // p)
            self.pos_embedding = nn.Parameter(torch.zeros(1, cfg.max_text_seq_length + tokens, dim))
        self.patch_size, self.patch_size_t = p, pt

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x (B, F, C_in, H, W) -> (B, L, D)"""
        p = self.patch_size
        if self.patch_size_t is None:
            tokens = self.proj(x.flatten(0, 1))  # (B*F, D, h, w)
            return rearrange(tokens, "(b f) d h w -> b (f h w) d", b=x.shape[0])
        patches = rearrange(x, "b (f pf) c (h ph) (w pw) -> b (f h w) (c pf ph pw)", pf=self.patch_size_t, ph=p, pw=p)
        return self.proj(patches)


class TimestepMLP(nn.Module):
    """linear_1 -> SiLU -> linear_2 on sinusoidal features (time and ofs embeddings)."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim_out)
        self.linear_2 = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.silu(self.linear_1(x)))


class LayerNormZero(nn.Module):
    """One LayerNorm for both streams, with separate shift/scale/gate for text and video from the time embedding."""

    def __init__(self, cfg: CogVideoXTransformerConfig, dim: int):
        super().__init__()
        self.linear = nn.Linear(cfg.time_embed_dim, 6 * dim)
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_elementwise_affine)

    def forward(
        self, x: torch.Tensor, text: torch.Tensor, temb: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
        """x (B, L, D), text (B, T, D), temb (B, E) -> modulated x, modulated text, gates (B, 1, D) of each."""
        shift, scale, gate, text_shift, text_scale, text_gate = self.linear(F.silu(temb))[:, None, :].chunk(6, dim=-1)
        x = self.norm(x) * (1 + scale) + shift
        text = self.norm(text) * (1 + text_scale) + text_shift
        return x, text, gate, text_gate


class JointAttention(nn.Module):
    """Self-attention over [text ; video]: q/k LayerNorm per head, rotary positions on the video queries/keys."""

    sequence = WHOLE  # the attention hook (minialg.parallel sets a sequence-parallel one on the instance)

    def __init__(self, cfg: CogVideoXTransformerConfig, dim: int):
        super().__init__()
        self.heads = cfg.num_attention_heads
        self.to_q = nn.Linear(dim, dim, bias=cfg.attention_bias)
        self.to_k = nn.Linear(dim, dim, bias=cfg.attention_bias)
        self.to_v = nn.Linear(dim, dim, bias=cfg.attention_bias)
        self.norm_q = nn.LayerNorm(cfg.attention_head_dim, eps=1e-6)
        self.norm_k = nn.LayerNorm(cfg.attention_head_dim, eps=1e-6)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(
        self, x: torch.Tensor, text_len: int, cos: torch.Tensor | None, sin: torch.Tensor | None
    ) -> torch.Tensor:
        """x (B, T+L, D) with the T text tokens first -> (B, T+L, D)"""
        q = self.norm_q(self.to_q(x).unflatten(-1, (self.heads, -1)).transpose(1, 2))  # (B, N, T+L, Dh)
        k = self.norm_k(self.to_k(x).unflatten(-1, (self.heads, -1)).transpose(1, 2))
        v = self.to_v(x).unflatten(-1, (self.heads, -1)).transpose(1, 2)
        if cos is not None:
            q = torch.cat([q[:, :, :text_len], apply_rope(q[:, :, text_len:], cos, sin)], dim=2)
            k = torch.cat([k[:, :, :text_len], apply_rope(k[:, :, text_len:], cos, sin)], dim=2)
        return self.to_out[0](self.sequence.attend(q, k, v, text=slice(0, text_len)))  # (B, T+L, D)


class GeluLinear(nn.Module):
    """Linear then tanh-approximate GELU; the `net.0` of the MLP."""

    def __init__(self, dim_in: int, dim_out: int):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate="tanh")


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear, named as in the checkpoint: `net.0.proj`, `net.2` (`net.1` was dropout)."""

    def __init__(self, dim: int):
        super().__init__()
        self.net = nn.ModuleList([GeluLinear(dim, 4 * dim), nn.Identity(), nn.Linear(4 * dim, dim)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class Block(nn.Module):
    """Modulated joint attention, then a modulated MLP shared by both streams; each adds back through its gate."""

    def __init__(self, cfg: CogVideoXTransformerConfig):
        super().__init__()
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.norm1 = LayerNormZero(cfg, dim)
        self.attn1 = JointAttention(cfg, dim)
        self.norm2 = LayerNormZero(cfg, dim)
        self.ff = FeedForward(dim)

    def forward(
        self,
        x: torch.Tensor,
        text: torch.Tensor,
        temb: torch.Tensor,
        cos: torch.Tensor | None,
        sin: torch.Tensor | None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """x (B, L, D), text (B, T, D), temb (B, E), cos/sin (L, Dh/2) or None -> new x, new text."""
        T = text.shape[1]
        h, h_text, gate, text_gate = self.norm1(x, text, temb)
        out = self.attn1(torch.cat([h_text, h], dim=1), T, cos, sin)  # (B, T+L, D)
        x = x + gate * out[:, T:]
        text = text + text_gate * out[:, :T]

        h, h_text, gate, text_gate = self.norm2(x, text, temb)
        out = self.ff(torch.cat([h_text, h], dim=1))
        x = x + gate * out[:, T:]
        text = text + text_gate * out[:, :T]
        return x, text


class OutputNorm(nn.Module):
    """AdaLayerNorm of the output: LayerNorm, then shift/scale from the time embedding."""

    def __init__(self, cfg: CogVideoXTransformerConfig, dim: int):
        super().__init__()
        self.linear = nn.Linear(cfg.time_embed_dim, 2 * dim)
        self.norm = nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_elementwise_affine)

    def forward(self, x: torch.Tensor, temb: torch.Tensor) -> torch.Tensor:
        shift, scale = self.linear(F.silu(temb))[:, None, :].chunk(2, dim=-1)  # (B, 1, D) each
        return self.norm(x) * (1 + scale) + shift


class CogVideoXTransformer(nn.Module):
    """Predicts the denoiser output for a CogVideoX video latent, given timestep and T5 text embeddings."""

    fp32_params: tuple[str, ...] = ()  # diffusers keeps no CogVideoX module in float32
    sequence = WHOLE  # where the video tokens live (minialg.parallel: split over ranks)

    def __init__(self, cfg: CogVideoXTransformerConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.patch_embed = PatchEmbed(cfg)
        self.time_embedding = TimestepMLP(dim, cfg.time_embed_dim)
        self.ofs_embedding = None
        if cfg.ofs_embed_dim:
            self.ofs_embedding = TimestepMLP(cfg.ofs_embed_dim, cfg.ofs_embed_dim)
        self.transformer_blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.norm_final = nn.LayerNorm(dim, eps=cfg.norm_eps, elementwise_affine=cfg.norm_elementwise_affine)
        self.norm_out = OutputNorm(cfg, dim)
        self.proj_out = nn.Linear(dim, cfg.patch_size**2 * (cfg.patch_size_t or 1) * cfg.out_channels)


    def embed_time(self, timestep: torch.Tensor, ofs: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor:
        """(B,) timesteps (and ofs, (B,) or (1,)) -> (B, E); features cast to `dtype` before the MLPs, as diffusers."""
        cfg = self.config
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        temb = self.time_embedding(timestep_sinusoid(timestep, dim, cfg.flip_sin_to_cos, cfg.freq_shift).to(dtype))
        if self.ofs_embedding is not None:
            if ofs is None:  # the value diffusers' CogVideoX 1.5 image-to-video pipeline always passes
                ofs = torch.full((1,), 2.0, device=timestep.device)
            ofs_features = timestep_sinusoid(ofs, cfg.ofs_embed_dim, cfg.flip_sin_to_cos, cfg.freq_shift)
            temb = temb + self.ofs_embedding(ofs_features.to(dtype))
        return temb

    def position_tables(
        self, f: int, h: int, w: int, device: torch.device, dtype: torch.dtype
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """What is added to the video tokens, (1, L, D) or (L, D), and to the text tokens, (1, T, D) or None:
        the learned table's two parts, or the fixed sin-cos table for the video only.

        The learned table holds the sample size only (another height/width raises in forward); for another
        frame count diffusers falls back to the sin-cos table of that size, and so do we.
        """
        cfg = self.config
        pos_embedding = self.patch_embed.pos_embedding
        if pos_embedding is not None and (f - 1) * cfg.temporal_compression_ratio + 1 == cfg.sample_frames:
            pos = pos_embedding.to(dtype)  # (1, T + L, D)
            T = cfg.max_text_seq_length
            return pos[:, T:], pos[:, :T]
        return sincos_positions(cfg, f, h, w, device).to(dtype), None

    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        ofs: torch.Tensor | None = None,
        passes: tuple[int, ...] | None = None,
        cache: dict | None = None,
    ) -> torch.Tensor:
        """x (B, F, C_in, H, W), timestep (B,), text (P, T, text_embed_dim), ofs (B,) or (1,) (1.5 I2V; None = 2.0)
        -> (B, F, C_out, H, W) in x's dtype.

        passes (B ints): the text row of each batch element; default: row b for element b (P = B). cache: a dict
        kept by the caller across the calls of one run, all with the same text (see the module docstring).
        Positional tables are computed from x's shape: for 1.0 models the frame count F (latent frames) and
        the patch grid H/p x W/p; for 1.5 the frame patches F/patch_size_t (F must divide) and the same grid.
        """
        cfg = self.config
        _, num_frames, _, height, width = x.shape
        p, pt = cfg.patch_size, cfg.patch_size_t or 1
        if cfg.use_learned_positional_embeddings and (height, width) != (cfg.sample_height, cfg.sample_width):
            raise ValueError(
                f"CogVideoX with a learned positional embedding runs only at its sample size: latent height x width "
                f"{height}x{width} given, {cfg.sample_height}x{cfg.sample_width} required"
            )
        if num_frames % pt:
            raise ValueError(f"CogVideoX: {num_frames} latent frames is not a multiple of patch_size_t={pt}")
        f, h, w = num_frames // pt, height // p, width // p
        passes = tuple(range(x.shape[0])) if passes is None else tuple(passes)
        if len(passes) != x.shape[0] or not all(0 <= i < text.shape[0] for i in passes):
            raise ValueError(f"passes {passes} must name a text row (of {text.shape[0]}) for each of {x.shape[0]}")
        tables = cfg.use_learned_positional_embeddings or not cfg.use_rotary_positional_embeddings
        video_pos, text_pos = kept(cache, ("positions", f, h, w), lambda: self.position_tables(
            f, h, w, x.device, x.dtype)) if tables else (None, None)

        def project_text() -> torch.Tensor:  # (P, T, D)
            projected = self.patch_embed.text_proj(text)
            return projected if text_pos is None else projected + text_pos

        temb = self.embed_time(timestep, ofs, x.dtype)  # (B, E)
        video = self.patch_embed(x)  # (B, L, D)
        video = video if video_pos is None else video + video_pos
        text = gather(kept(cache, "text", project_text), passes)  # (B, T, D)
        cos = sin = None
        if cfg.use_rotary_positional_embeddings:
            cos, sin = kept(cache, ("rope", f, h, w), lambda: rope_cos_sin(cfg, f, h, w, x.device))  # (L, Dh/2)
        video, cos, sin = self.sequence.split((f, h, w), video, cos, sin)  # sequence parallel: this rank's rows

        for block in self.transformer_blocks:
            video, text = block(video, text, temb, cos, sin)

        video = self.norm_out(self.norm_final(video), temb)
        video = self.sequence.join(self.proj_out(video), (f, h, w))  # (B, L, pt*p*p*C_out)
        return rearrange(
            video, "b (f h w) (c pf ph pw) -> b (f pf) c (h ph) (w pw)", f=f, h=h, w=w, pf=pt, ph=p, pw=p
        )
