"""The HunyuanVideo diffusion transformer (text-to-video and HunyuanVideo-I2V), as diffusers'
HunyuanVideoTransformer3DModel.

The LLaMA text states first pass a small "token refiner" (self-attention among the prompt's own tokens, gated by
the timestep and the prompt's mean state). The video latent is cut into patches; double-stream blocks then keep
video and text apart (own norms, projections and MLPs) but attend jointly over [video ; text], and single-stream
blocks run one shared attention + MLP over the concatenation. The timestep, the CLIP pooled text and (distilled
checkpoints) the guidance scale sum into one vector that modulates every block adaLN-style. Video tokens carry
3D rotary positions. Text tokens past each prompt's length are never attended to.

Image-to-video comes in two kinds (`image_condition_type`): "latent_concat" (the image latent is concatenated to
the noisy latent along channels) and "token_replace" (the first latent frame *is* the clean image latent; its
tokens are modulated as if at timestep 0, all other tokens with the real timestep).

Shapes: B batch, F/H/W latent frames/height/width, f/h/w the same in patches, L = f*h*w video tokens, T text
tokens, D model width, N heads, Dh head width, K modulation rows (1, or 2 for token_replace: first frame, rest).
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange

from minialg.models.wan import WHOLE, MLP, FeedForward, apply_rope, attend, split_heads, timestep_sinusoid

TIME_FREQ_DIM = 256  # sinusoid width of the timestep and guidance embeddings
EPS = 1e-6  # every norm in the model


@dataclass
class HunyuanVideoTransformerConfig:
    in_channels: int = 16  # I2V latent_concat: 33 = noisy latent 16 + image latent 16 + mask 1
    out_channels: int = 16
    num_attention_heads: int = 24
    attention_head_dim: int = 128
    num_layers: int = 20  # double-stream blocks
    num_single_layers: int = 40
    num_refiner_layers: int = 2
    mlp_ratio: float = 4.0  # the blocks' MLPs; the token refiner's is always 4 (as diffusers)
    patch_size: int = 2
    patch_size_t: int = 1
    qk_norm: str = "rms_norm"
    guidance_embeds: bool = True  # guidance-distilled: the guidance scale is an input
    text_embed_dim: int = 4096  # LLaMA hidden size
    pooled_projection_dim: int = 768  # CLIP text width
    rope_theta: float = 256.0
    rope_axes_dim: tuple[int, int, int] = (16, 56, 56)  # head channels rotated by frame, row, column
    image_condition_type: str | None = None  # None (text-to-video), "latent_concat" or "token_replace"

    def __post_init__(self):
        self.rope_axes_dim = tuple(self.rope_axes_dim)  # a list in config.json
        if self.qk_norm != "rms_norm":
            raise ValueError(f"HunyuanVideo: unsupported qk_norm {self.qk_norm!r} (only 'rms_norm')")
        if self.image_condition_type not in (None, "latent_concat", "token_replace"):
            raise ValueError(f"HunyuanVideo: unknown image_condition_type {self.image_condition_type!r}")
        if sum(self.rope_axes_dim) != self.attention_head_dim or any(d % 2 for d in self.rope_axes_dim):
            raise ValueError(f"HunyuanVideo: rope_axes_dim {self.rope_axes_dim} must be even and sum to the head "
                             f"width {self.attention_head_dim}")


def rope_cos_sin(axes_dim: tuple[int, int, int], theta: float, f: int, h: int, w: int, device: torch.device):
    """Rotation cos/sin for every video token, each (L, Dh/2) float32, tokens in (f, h, w) order.

    Each axis rotates its own slice of the head's channel pairs by position * theta^(-2i/axis_dim). Computed per
    axis over all L tokens in float32, as diffusers does, so the values agree bit for bit.
    """
    axes = [torch.arange(n, dtype=torch.float32, device=device) for n in (f, h, w)]
    grids = torch.meshgrid(*axes, indexing="ij")  # 3 x (f, h, w)
    cos, sin = [], []
    for dim, grid in zip(axes_dim, grids):
        inv_freq = 1.0 / theta ** (torch.arange(0, dim, 2, dtype=torch.float32, device=device) / dim)
        angles = torch.outer(grid.reshape(-1), inv_freq)  # (L, dim/2)
        cos.append(angles.cos())
        sin.append(angles.sin())
    return torch.cat(cos, dim=1), torch.cat(sin, dim=1)


def layer_norm(x: torch.Tensor) -> torch.Tensor:
    """LayerNorm over the last dim without affine weights, in x's dtype."""
    return F.layer_norm(x, x.shape[-1:], eps=EPS)


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, first: int) -> torch.Tensor:
    """x (B, S, D) * (1 + scale) + shift with (B, K, D) vectors: K=1 alike for all tokens; K=2 (token_replace)
    row 0 for the `first` tokens (the image frame), row 1 for the rest."""
    if shift.shape[1] == 1:
        return x * (1 + scale) + shift
    head = x[:, :first] * (1 + scale[:, :1]) + shift[:, :1]
    tail = x[:, first:] * (1 + scale[:, 1:]) + shift[:, 1:]
    return torch.cat([head, tail], dim=1)


def gated(y: torch.Tensor, gate: torch.Tensor, first: int) -> torch.Tensor:
    """y (B, S, D) * gate with a (B, K, D) gate, rows chosen as in `modulate`."""
    if gate.shape[1] == 1:
        return y * gate
    return torch.cat([y[:, :first] * gate[:, :1], y[:, first:] * gate[:, 1:]], dim=1)


class RMSNorm(nn.Module):
    """RMS norm over the last dim; statistics in float32, the product in the weight's dtype (diffusers' rule)."""

    def __init__(self, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        return (x * torch.rsqrt(variance + EPS)).to(self.weight.dtype) * self.weight


class Modulation(nn.Module):
    """adaLN vectors: linear(silu(temb)) split in `n`. Named `norm1`, `norm`, `norm_out` in the checkpoint."""

    def __init__(self, dim: int, n: int):
        super().__init__()
        self.n = n
        self.linear = nn.Linear(dim, n * dim)

    def forward(self, temb: torch.Tensor, temb_first: torch.Tensor | None = None) -> tuple[torch.Tensor, ...]:
        """temb (B, D) [, temb_first (B, D)] -> n vectors (B, K, D); with temb_first, row 0 is its own."""
        rows = [temb] if temb_first is None else [temb_first, temb]
        return torch.stack([self.linear(F.silu(r)) for r in rows], dim=1).chunk(self.n, dim=-1)


class TimeTextEmbedding(nn.Module):
    """timestep + [guidance scale] + pooled text -> one (B, D) conditioning vector."""

    def __init__(self, dim: int, pooled_dim: int, guidance_embeds: bool):
        super().__init__()
        self.timestep_embedder = MLP(TIME_FREQ_DIM, dim, nn.SiLU())
        self.text_embedder = MLP(pooled_dim, dim, nn.SiLU())
        self.guidance_embedder = MLP(TIME_FREQ_DIM, dim, nn.SiLU()) if guidance_embeds else None

    def forward(self, timestep: torch.Tensor, pooled: torch.Tensor, guidance: torch.Tensor | None = None):
        """timestep (B,), pooled (B, pooled_dim), guidance (B,) or None (then not embedded) -> (B, D)."""
        temb = self.timestep_embedder(timestep_sinusoid(timestep, TIME_FREQ_DIM).to(pooled.dtype))
        if guidance is not None:
            temb = temb + self.guidance_embedder(timestep_sinusoid(guidance, TIME_FREQ_DIM).to(pooled.dtype))
        return temb + self.text_embedder(pooled)


class SiluFeedForward(FeedForward):
    """The token refiner's MLP: the same layers, SiLU in place of GELU."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](F.silu(self.net[0].proj(x)))


class RefinerAttention(nn.Module):
    """Plain masked self-attention among the text tokens."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """x (B, T, D), mask (B, 1, T, T) boolean -> (B, T, D)"""
        q, k, v = (split_heads(proj(x), self.heads) for proj in (self.to_q, self.to_k, self.to_v))
        return self.to_out[0](attend(q, k, v, mask))


class RefinerBlock(nn.Module):
    """Pre-norm attention and SiLU MLP on the text, each added through a gate from the refiner's conditioning."""

    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=EPS)
        self.attn = RefinerAttention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=EPS)
        self.ff = SiluFeedForward(dim, 4 * dim, dim, approximate="none")
        self.norm_out = Modulation(dim, 2)

    def forward(self, x: torch.Tensor, temb: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        gate_attn, gate_ff = self.norm_out(temb)  # (B, 1, D) each
        x = x + self.attn(self.norm1(x), mask) * gate_attn
        return x + self.ff(self.norm2(x)) * gate_ff


class IndividualTokenRefiner(nn.Module):
    def __init__(self, dim: int, heads: int, num_layers: int):
        super().__init__()
        self.refiner_blocks = nn.ModuleList([RefinerBlock(dim, heads) for _ in range(num_layers)])

    def forward(self, x: torch.Tensor, temb: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        # token i sees token j when both are prompt tokens; every token sees token 0 (no row is fully masked)
        valid = text_mask.bool()  # (B, T)
        mask = valid[:, None, None, :] & valid[:, None, :, None]  # (B, 1, T, T)
        mask[..., 0] = True
        for block in self.refiner_blocks:
            x = block(x, temb, mask)
        return x


class TokenRefiner(nn.Module):
    """LLaMA states (B, T, text_embed_dim) -> text tokens (B, T, D), conditioned on the timestep and the
    prompt's mean state."""

    def __init__(self, cfg: HunyuanVideoTransformerConfig, dim: int):
        super().__init__()
        self.time_text_embed = TimeTextEmbedding(dim, cfg.text_embed_dim, guidance_embeds=False)
        self.proj_in = nn.Linear(cfg.text_embed_dim, dim)
        self.token_refiner = IndividualTokenRefiner(dim, cfg.num_attention_heads, cfg.num_refiner_layers)

    def forward(self, text: torch.Tensor, timestep: torch.Tensor, text_mask: torch.Tensor) -> torch.Tensor:
        weights = text_mask.float().unsqueeze(-1)  # (B, T, 1)
        mean = ((text * weights).sum(dim=1) / weights.sum(dim=1)).to(text.dtype)  # (B, text_embed_dim)
        temb = self.time_text_embed(timestep, mean)
        return self.token_refiner(self.proj_in(text), temb, text_mask)


class JointAttention(nn.Module):
    """Attention over [video ; text] with q/k RMS-normalised per head and rotary positions on the video tokens.
    Double-stream blocks give the text its own projections (`add_*`, `to_add_out`) and both streams an output
    projection; single-stream blocks project [video ; text] with one set and have no output projection."""

    sequence = WHOLE  # the attention hook (minialg.parallel sets a sequence-parallel one on the instance)

    def __init__(self, dim: int, heads: int, head_dim: int, double_stream: bool):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.norm_q = RMSNorm(head_dim)
        self.norm_k = RMSNorm(head_dim)
        if double_stream:
            self.add_q_proj = nn.Linear(dim, dim)
            self.add_k_proj = nn.Linear(dim, dim)
            self.add_v_proj = nn.Linear(dim, dim)
            self.norm_added_q = RMSNorm(head_dim)
            self.norm_added_k = RMSNorm(head_dim)
            self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
            self.to_add_out = nn.Linear(dim, dim)

    def qkv(self, x, to_q, to_k, to_v, norm_q, norm_k):
        """(B, S, D) -> q, k, v (B, S, N, Dh), q and k normalised."""
        q, k, v = (proj(x).unflatten(-1, (self.heads, -1)) for proj in (to_q, to_k, to_v))
        return norm_q(q), norm_k(k), v

    def forward(self, x: torch.Tensor, text: torch.Tensor | None, mask: torch.Tensor, cos: torch.Tensor,
                sin: torch.Tensor, video_len: int):
        """Double stream: x (B, L, D), text (B, T, D) -> (B, L, D), (B, T, D).
        Single stream: x = [video ; text] (B, L+T, D), text None -> (B, L+T, D) before any projection.
        mask (B, 1, 1, L+T) boolean over keys, cos/sin (L, 1, Dh/2)."""
        q, k, v = self.qkv(x, self.to_q, self.to_k, self.to_v, self.norm_q, self.norm_k)
        L = video_len
        if text is None:
            q = torch.cat([apply_rope(q[:, :L], cos, sin), q[:, L:]], dim=1)
            k = torch.cat([apply_rope(k[:, :L], cos, sin), k[:, L:]], dim=1)
        else:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            tq, tk, tv = self.qkv(text, self.add_q_proj, self.add_k_proj, self.add_v_proj, self.norm_added_q,
                                  self.norm_added_k)
            q, k, v = torch.cat([q, tq], dim=1), torch.cat([k, tk], dim=1), torch.cat([v, tv], dim=1)
        out = self.sequence.attend(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), mask,
                                   text=slice(L, None))  # (B, L+T, D)
        if text is None:
            return out
        return self.to_out[0](out[:, :L]), self.to_add_out(out[:, L:])


class DoubleStreamBlock(nn.Module):
    """Video and text each modulated by their own adaLN vectors, joint attention, then each its own MLP."""

    def __init__(self, cfg: HunyuanVideoTransformerConfig, dim: int):
        super().__init__()
        mlp_dim = int(dim * cfg.mlp_ratio)
        self.norm1 = Modulation(dim, 6)
        self.norm1_context = Modulation(dim, 6)
        self.attn = JointAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim, double_stream=True)
        self.ff = FeedForward(dim, mlp_dim, dim, approximate="tanh")
        self.ff_context = FeedForward(dim, mlp_dim, dim, approximate="tanh")

    def forward(self, x, text, temb, temb_first, mask, cos, sin, first):
        """x (B, L, D), text (B, T, D), temb (B, D), temb_first (B, D) or None, first: tokens of frame 0."""
        shift, scale, gate, ff_shift, ff_scale, ff_gate = self.norm1(temb, temb_first)  # (B, K, D) each
        t_shift, t_scale, t_gate, t_ff_shift, t_ff_scale, t_ff_gate = self.norm1_context(temb)  # (B, 1, D) each

        h = modulate(layer_norm(x), shift, scale, first)
        h_text = modulate(layer_norm(text), t_shift, t_scale, 0)
        attn, attn_text = self.attn(h, h_text, mask, cos, sin, x.shape[1])
        x = x + gated(attn, gate, first)
        text = text + gated(attn_text, t_gate, 0)

        x = x + gated(self.ff(modulate(layer_norm(x), ff_shift, ff_scale, first)), ff_gate, first)
        text = text + gated(self.ff_context(modulate(layer_norm(text), t_ff_shift, t_ff_scale, 0)), t_ff_gate, 0)
        return x, text


class SingleStreamBlock(nn.Module):
    """One modulated norm over [video ; text], attention and GELU MLP side by side, one output projection. The
    blocks pass [video ; text] on as one tensor (same values as diffusers' split and re-concatenation, and the
    same memory layout at every block, which regional compilation needs)."""

    def __init__(self, cfg: HunyuanVideoTransformerConfig, dim: int):
        super().__init__()
        mlp_dim = int(dim * cfg.mlp_ratio)
        self.attn = JointAttention(dim, cfg.num_attention_heads, cfg.attention_head_dim, double_stream=False)
        self.norm = Modulation(dim, 3)
        self.proj_mlp = nn.Linear(dim, mlp_dim)
        self.proj_out = nn.Linear(dim + mlp_dim, dim)

    def forward(self, xt, temb, temb_first, mask, cos, sin, first, video_len):
        """xt = [video ; text] (B, L+T, D), video_len = L -> (B, L+T, D)."""
        shift, scale, gate = self.norm(temb, temb_first)  # (B, K, D) each; the text takes row K-1
        h = modulate(layer_norm(xt), shift, scale, first)
        mlp = F.gelu(self.proj_mlp(h), approximate="tanh")
        attn = self.attn(h, None, mask, cos, sin, video_len)
        return xt + gated(self.proj_out(torch.cat([attn, mlp], dim=2)), gate, first)


class PatchEmbed(nn.Module):
    def __init__(self, cfg: HunyuanVideoTransformerConfig, dim: int):
        super().__init__()
        patch = (cfg.patch_size_t, cfg.patch_size, cfg.patch_size)
        self.proj = nn.Conv3d(cfg.in_channels, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, C, F, H, W) -> (B, L, D)


class HunyuanVideoTransformer(nn.Module):
    """Predicts the flow-matching velocity of a video latent from timestep, LLaMA text states (with their mask),
    the CLIP pooled text and, for guidance-distilled checkpoints, the guidance scale."""

    sequence = WHOLE  # where the video tokens live (minialg.parallel: split over ranks)

    # diffusers keeps no parameter of this model in float32 (no _keep_in_fp32_modules); in bf16 runs only the
    # RMS statistics, rotary math, sinusoids, the refiner's masked mean and the softmax run in float32
    fp32_params: tuple[str, ...] = ()

    def __init__(self, cfg: HunyuanVideoTransformerConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        out_channels = cfg.out_channels or cfg.in_channels
        self.x_embedder = PatchEmbed(cfg, dim)
        self.context_embedder = TokenRefiner(cfg, dim)
        self.time_text_embed = TimeTextEmbedding(dim, cfg.pooled_projection_dim, cfg.guidance_embeds)
        self.transformer_blocks = nn.ModuleList([DoubleStreamBlock(cfg, dim) for _ in range(cfg.num_layers)])
        self.single_transformer_blocks = nn.ModuleList(
            [SingleStreamBlock(cfg, dim) for _ in range(cfg.num_single_layers)])
        self.norm_out = Modulation(dim, 2)
        self.proj_out = nn.Linear(dim, cfg.patch_size_t * cfg.patch_size**2 * out_channels)

    def forward(self, x: torch.Tensor, timestep: torch.Tensor, text: torch.Tensor, text_mask: torch.Tensor,
                pooled: torch.Tensor, guidance: torch.Tensor | None = None) -> torch.Tensor:
        """x (B, C_in, F, H, W), timestep (B,), text (B, T, text_embed_dim), text_mask (B, T) 1/0 with each
        prompt's tokens first, pooled (B, pooled_projection_dim), guidance (B,) (scale * 1000; ignored when the
        config embeds no guidance) -> (B, C_out, F, H, W) in x's dtype."""
        cfg = self.config
        if cfg.guidance_embeds and guidance is None:
            raise ValueError("this HunyuanVideo transformer embeds the guidance scale: pass guidance (B,)")
        pt, p = cfg.patch_size_t, cfg.patch_size
        f, h, w = x.shape[2] // pt, x.shape[3] // p, x.shape[4] // p
        cos, sin = rope_cos_sin(cfg.rope_axes_dim, cfg.rope_theta, f, h, w, x.device)  # (L, Dh/2) each

        temb = self.time_text_embed(timestep, pooled, guidance if cfg.guidance_embeds else None)  # (B, D)
        temb_first = None  # token_replace: the first frame's conditioning, timestep 0 and no guidance
        if cfg.image_condition_type == "token_replace":
            temb_first = self.time_text_embed(torch.zeros_like(timestep), pooled)
        x = self.x_embedder(x)  # (B, L, D)
        text = self.context_embedder(text, timestep, text_mask)  # (B, T, D)

        # keys: all video tokens, then each prompt's first text_mask.sum() text tokens (diffusers' rule)
        L, T = x.shape[1], text.shape[1]
        lengths = L + text_mask.sum(dim=1, dtype=torch.int)  # (B,)
        mask = (torch.arange(L + T, device=x.device)[None, :] < lengths[:, None])[:, None, None, :]

        x, cos, sin = self.sequence.split((f, h, w), x, cos, sin)  # this process's video tokens (all: WHOLE)
        cos, sin = cos[:, None], sin[:, None]  # broadcast over heads of (B, L, N, Dh/2)
        L, first = x.shape[1], x.shape[1] // f  # video tokens here, those of the first latent frame
        for block in self.transformer_blocks:
            x, text = block(x, text, temb, temb_first, mask, cos, sin, first)
        xt = torch.cat([x, text], dim=1)  # (B, L+T, D)
        for block in self.single_transformer_blocks:
            xt = block(xt, temb, temb_first, mask, cos, sin, first, L)
        x = xt[:, :L]

        scale, shift = self.norm_out(temb)  # (B, 1, D) each
        x = self.proj_out(modulate(layer_norm(x), shift, scale, first))  # (B, L, C_out*pt*p*p)
        x = self.sequence.join(x, (f, h, w))  # all video tokens
        return rearrange(x, "b (f h w) (c pt ph pw) -> b c (f pt) (h ph) (w pw)", f=f, h=h, w=w, pt=pt, ph=p, pw=p)
