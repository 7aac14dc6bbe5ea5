"""The Wan 2.1 diffusion transformer (DiT), image-to-video and text-to-video.

A video latent is cut into 3D patches, one token each. Every block runs self-attention over all tokens (with
3D rotary positions), cross-attention to the text (and, for image-to-video, separately to the CLIP image
tokens), and an MLP; the timestep modulates each block adaLN-style through six vectors. Tensor names follow
the diffusers checkpoint (WanTransformer3DModel), so a checkpoint loads name for name.

Shapes: B batch, F/H/W latent frames/height/width, f/h/w the same in patches, L = f*h*w video tokens,
D model width, N heads, Dh head width, T text tokens, I image tokens (257 for Wan 2.1 I2V), P distinct texts.

Step-invariant work is done once per run when the caller hands `forward` a `cache` (a dict it owns, one per run,
text and image): the rotary tables and each block's cross-attention keys and values (with the text and image
embedders before them) are computed at the first call and reused after. The batch's passes name their text by
row (`passes`), so the prompt and the negative prompt are projected once each, whatever the batch.
"""

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F
from einops import rearrange


@dataclass
class WanTransformerConfig:
    patch_size: tuple[int, int, int] = (1, 2, 2)
    num_attention_heads: int = 40
    attention_head_dim: int = 128
    in_channels: int = 16  # Wan 2.1 I2V: 36 = noisy latent 16 + frame mask 4 + image latent 16
    out_channels: int = 16
    text_dim: int = 4096
    freq_dim: int = 256
    ffn_dim: int = 13824
    num_layers: int = 40
    cross_attn_norm: bool = True
    qk_norm: str | None = "rms_norm_across_heads"  # the only kind Wan uses; diffusers ignores the value too
    eps: float = 1e-6
    image_dim: int | None = None  # CLIP width (1280) for image-to-video, None for text-to-video
    added_kv_proj_dim: int | None = None  # input width of the image key/value projections (= D)
    rope_max_seq_len: int = 1024  # size of diffusers' precomputed RoPE table; we compute only what is used
    pos_embed_seq_len: int | None = None  # learned position embedding of the image tokens (FLF2V)

    def __post_init__(self):
        self.patch_size = tuple(self.patch_size)  # a list in config.json


def fp32_layer_norm(x: torch.Tensor, eps: float, norm: nn.LayerNorm | None = None) -> torch.Tensor:
    """LayerNorm over the last dim, computed and returned in float32 (`norm` holds the affine weights, if any)."""
    weight = None if norm is None else norm.weight.float()
    bias = None if norm is None else norm.bias.float()
    return F.layer_norm(x.float(), x.shape[-1:], weight, bias, eps)


def timestep_sinusoid(timestep: torch.Tensor, dim: int) -> torch.Tensor:
    """(B,) timesteps -> (B, dim) float32 [cos | sin] features, frequencies 10000^(-i / (dim/2))."""
    half = dim // 2
    exponent = -math.log(10000.0) * torch.arange(half, dtype=torch.float32, device=timestep.device) / half
    angles = timestep.float()[:, None] * torch.exp(exponent)[None, :]  # (B, dim/2)
    return torch.cat([angles.cos(), angles.sin()], dim=-1)


def rope_cos_sin(head_dim: int, f: int, h: int, w: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Rotation cos/sin for every video token, each (L, Dh/2) float32, tokens in (f, h, w) order.

    The head is split into a frame part and equal height and width parts; each rotates its channel pairs by
    position * 10000^(-2i/part). Angles are computed in float64 (float32 on MPS), as diffusers does.
    """
    dim_h = dim_w = 2 * (head_dim // 6)
    dim_f = head_dim - dim_h - dim_w
    dtype = torch.float32 if device.type == "mps" else torch.float64

    def angles(n: int, dim: int) -> torch.Tensor:  # (n, dim/2)
        inv_freq = 1.0 / (10000.0 ** (torch.arange(0, dim, 2, dtype=dtype, device=device) / dim))
        return torch.arange(n, dtype=dtype, device=device)[:, None] * inv_freq[None, :]

    angles_f = angles(f, dim_f)[:, None, None, :].expand(f, h, w, -1)
    angles_h = angles(h, dim_h)[None, :, None, :].expand(f, h, w, -1)
    angles_w = angles(w, dim_w)[None, None, :, :].expand(f, h, w, -1)
    theta = torch.cat([angles_f, angles_h, angles_w], dim=-1).reshape(f * h * w, head_dim // 2)
    return theta.cos().float(), theta.sin().float()


def kept(cache: dict | None, key, compute):
    """compute(), or the value an earlier call stored under `key` in `cache` (a dict owned by the caller, who
    promises the same inputs to every call that shares it; None: nothing is kept)."""
    if cache is None:
        return compute()
    if key not in cache:
        cache[key] = compute()
    return cache[key]


def gather(rows: torch.Tensor | None, passes: tuple[int, ...]) -> torch.Tensor | None:
    """The batch from per-text rows (P, ...): row passes[b] for element b; a view where it can be (one row, or the
    rows in order), an exact copy otherwise."""
    if rows is None:
        return None
    if rows.shape[0] == 1:
        return rows.expand(len(passes), *rows.shape[1:])
    return rows if passes == tuple(range(rows.shape[0])) else rows[list(passes)]


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs (x[2i], x[2i+1]) of x (B, N, L, Dh) by the angles in cos/sin (L, Dh/2),
    or in any cos/sin that broadcasts to (B, N, L, Dh/2) (LTX-Video: one table per batch element)."""
    x1, x2 = x[..., 0::2], x[..., 1::2]  # (B, N, L, Dh/2) each
    rotated = torch.stack([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1)  # float32 math, as diffusers
    return rotated.flatten(-2).type_as(x)


def split_heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    """(B, L, N*Dh) -> (B, N, L, Dh)"""
    return x.unflatten(-1, (heads, -1)).transpose(1, 2)


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """Softmax attention on (B, N, L, Dh) queries and (B, N, S, Dh) keys/values -> (B, L, N*Dh); `mask`, if
    given, broadcasts to (B, N, L, S): boolean (True: may attend) or a float bias added to the logits."""
    return F.scaled_dot_product_attention(q, k, v, attn_mask=mask).transpose(1, 2).flatten(2).type_as(q)


class WholeSequence:
    """Where a transformer's video tokens live: here, all of them on this process. The transformers route their
    token sequence through these three hooks; minialg.parallel swaps in a sequence-parallel version (Ulysses)."""

    def split(self, grid: tuple[int, int, int], *tensors):
        """Per-token tensors (..., L, C) in (f, h, w) order -> this process's share of them (None stays None)."""
        return tensors

    def join(self, x: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """This process's output tokens (B, share, C) -> all of them (B, L, C)."""
        return x

    def attend(self, q, k, v, mask=None, text: slice | None = None) -> torch.Tensor:
        """Self-attention over the whole sequence, as `attend`; `text` marks where S holds the text tokens of a
        joint [text ; video] or [video ; text] attention (they are not split)."""
        return attend(q, k, v, mask)


WHOLE = WholeSequence()


class MLP(nn.Module):
    """linear_1 -> activation -> linear_2 (time and text embedders)."""

    def __init__(self, dim_in: int, dim_out: int, activation: nn.Module):
        super().__init__()
        self.linear_1 = nn.Linear(dim_in, dim_out)
        self.act = activation
        self.linear_2 = nn.Linear(dim_out, dim_out)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(x)))


class GeluLinear(nn.Module):
    """Linear then GELU; the `net.0` of a FeedForward."""

    def __init__(self, dim_in: int, dim_out: int, approximate: str):
        super().__init__()
        self.proj = nn.Linear(dim_in, dim_out)
        self.approximate = approximate

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.gelu(self.proj(x), approximate=self.approximate)


class FeedForward(nn.Module):
    """Linear -> GELU -> Linear, named as in the checkpoint: `net.0.proj`, `net.2` (`net.1` was dropout)."""

    def __init__(self, dim_in: int, hidden: int, dim_out: int, approximate: str):
        super().__init__()
        self.net = nn.ModuleList([GeluLinear(dim_in, hidden, approximate), nn.Identity(), nn.Linear(hidden, dim_out)])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net[2](self.net[0](x))


class ImageEmbedding(nn.Module):
    """CLIP image tokens (B, I, image_dim) -> (B, I, D): LayerNorm, MLP (exact GELU), LayerNorm."""

    def __init__(self, image_dim: int, dim: int, pos_embed_seq_len: int | None):
        super().__init__()
        self.norm1 = nn.LayerNorm(image_dim)
        self.ff = FeedForward(image_dim, image_dim, dim, approximate="none")
        self.norm2 = nn.LayerNorm(dim)
        self.pos_embed = None
        if pos_embed_seq_len is not None:
            self.pos_embed = nn.Parameter(torch.zeros(1, pos_embed_seq_len, image_dim))

    def forward(self, image: torch.Tensor) -> torch.Tensor:
        if self.pos_embed is not None:  # FLF2V: image holds first and last frame tokens, I = pos_embed_seq_len
            image = image + self.pos_embed
        x = fp32_layer_norm(image, self.norm1.eps, self.norm1).to(image.dtype)
        x = self.ff(x)
        return fp32_layer_norm(x, self.norm2.eps, self.norm2).to(x.dtype)


class ConditionEmbedder(nn.Module):
    """Timestep, text and image embeddings shared by all blocks."""

    def __init__(self, cfg: WanTransformerConfig):
        super().__init__()
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.freq_dim = cfg.freq_dim
        self.time_embedder = MLP(cfg.freq_dim, dim, nn.SiLU())
        self.act_fn = nn.SiLU()
        self.time_proj = nn.Linear(dim, 6 * dim)
        self.text_embedder = MLP(cfg.text_dim, dim, nn.GELU(approximate="tanh"))
        self.image_embedder = None
        if cfg.image_dim is not None:
            self.image_embedder = ImageEmbedding(cfg.image_dim, dim, cfg.pos_embed_seq_len)

    def forward(self, timestep: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """timestep (B,) or (B, F) -> temb (B, F|1, D), block modulation (B, F|1, 6, D), in `dtype` (the text's, as
        diffusers). F|1: one timestep per latent frame (Wan 2.2 TI2V) or one for the whole video."""
        timestep = timestep if timestep.ndim == 2 else timestep[:, None]  # (B, F|1)
        t_freq = timestep_sinusoid(timestep.flatten(), self.freq_dim).to(self.time_embedder.linear_1.weight.dtype)
        temb = self.time_embedder(t_freq).to(dtype)  # (B F|1, D)
        modulation = self.time_proj(self.act_fn(temb)).unflatten(1, (6, -1))  # (B F|1, 6, D)
        return temb.unflatten(0, timestep.shape), modulation.unflatten(0, timestep.shape)

    def embed_context(
        self, text: torch.Tensor, image: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """text (P, T, text_dim) -> (P, T, D); image (1|P, I, image_dim) -> (1|P, I, D), or None."""
        return self.text_embedder(text), None if image is None else self.image_embedder(image)


class SelfAttention(nn.Module):
    """Attention among video tokens, with q/k RMS-normalised across all heads and rotary positions."""

    sequence = WHOLE  # the attention hook (minialg.parallel sets a sequence-parallel one on the instance)

    def __init__(self, dim: int, heads: int, eps: float):
        super().__init__()
        self.heads = heads
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(dim, dim)
        self.to_v = nn.Linear(dim, dim)
        self.to_out = nn.ModuleList([nn.Linear(dim, dim)])
        self.norm_q = nn.RMSNorm(dim, eps=eps)
        self.norm_k = nn.RMSNorm(dim, eps=eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        q = apply_rope(split_heads(self.norm_q(self.to_q(x)), self.heads), cos, sin)  # (B, N, L, Dh)
        k = apply_rope(split_heads(self.norm_k(self.to_k(x)), self.heads), cos, sin)
        v = split_heads(self.to_v(x), self.heads)
        return self.to_out[0](self.sequence.attend(q, k, v))  # (B, L, D)


class CrossAttention(SelfAttention):
    """Video tokens attend to the text and, in a second softmax, to the image tokens; the two are summed.
    The same projections and norms as self-attention, plus the image's own k/v projections and k norm.
    Each query needs only the text and image: no hook, whatever share of the video tokens is here."""

    def __init__(self, dim: int, heads: int, eps: float, added_kv_proj_dim: int | None):
        super().__init__(dim, heads, eps)
        self.add_k_proj = self.add_v_proj = self.norm_added_k = None
        if added_kv_proj_dim is not None:
            self.add_k_proj = nn.Linear(added_kv_proj_dim, dim)
            self.add_v_proj = nn.Linear(added_kv_proj_dim, dim)
            self.norm_added_k = nn.RMSNorm(dim, eps=eps)

    def keys_values(self, text: torch.Tensor, image: torch.Tensor | None) -> tuple[torch.Tensor | None, ...]:
        """text (P, T, D), image (1|P, I, D) or None -> the text's keys and values (P, N, T, Dh) each, the
        image's (1|P, N, I, Dh) each or None: the same at every step of a run."""
        k = split_heads(self.norm_k(self.to_k(text)), self.heads)
        v = split_heads(self.to_v(text), self.heads)
        if image is None:
            return k, v, None, None
        return k, v, split_heads(self.norm_added_k(self.add_k_proj(image)), self.heads), \
            split_heads(self.add_v_proj(image), self.heads)

    def forward(self, x: torch.Tensor, kv: tuple[torch.Tensor | None, ...], passes: tuple[int, ...]) -> torch.Tensor:
        """x (B, L, D); kv from keys_values; passes (B ints): the text row each batch element attends to."""
        k, v, k_img, v_img = (gather(t, passes) for t in kv)  # (B, N, T|I, Dh)
        q = split_heads(self.norm_q(self.to_q(x)), self.heads)  # (B, N, L, Dh)
        out = attend(q, k, v)  # (B, L, D)
        if k_img is not None:
            out = out + attend(q, k_img, v_img)
        return self.to_out[0](out)


class Block(nn.Module):
    """Modulated self-attention, cross-attention, modulated MLP; norms, modulation and gates in float32."""

    def __init__(self, cfg: WanTransformerConfig):
        super().__init__()
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        self.eps = cfg.eps
        self.attn1 = SelfAttention(dim, cfg.num_attention_heads, cfg.eps)
        self.attn2 = CrossAttention(dim, cfg.num_attention_heads, cfg.eps, cfg.added_kv_proj_dim)
        self.norm2 = nn.LayerNorm(dim, eps=cfg.eps) if cfg.cross_attn_norm else None
        self.ffn = FeedForward(dim, cfg.ffn_dim, dim, approximate="tanh")
        self.scale_shift_table = nn.Parameter(torch.randn(1, 6, dim) / dim**0.5)

    def forward(
        self,
        x: torch.Tensor,
        modulation: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        passes: tuple[int, ...],
        kv: tuple[torch.Tensor | None, ...] | None = None,
        text: torch.Tensor | None = None,
        image: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, tuple[torch.Tensor | None, ...]]:
        """x (B, L, D), modulation (B, F|1, 6, D), cos/sin (L, Dh/2), passes (B ints): each element's text row;
        the cross-attention keys/values `kv` (CrossAttention.keys_values), or the embedded text (P, T, D) and
        image (1|P, I, D) or None to compute them from. Returns the new x and kv, for the caller to keep.

        The modulation holds one set of vectors per latent frame (or one for all): the elementwise steps see the
        tokens as (B, F|1, L/(F|1), D), so each frame's tokens take their frame's vectors without a copy per token.
        """
        shift, scale, gate, ffn_shift, ffn_scale, ffn_gate = (
            self.scale_shift_table + modulation.float()
        ).unsqueeze(-2).unbind(-3)  # (B, F|1, 1, D) each, float32
        frames = modulation.shape[1]

        def by_frame(t: torch.Tensor) -> torch.Tensor:  # (B, L, D) -> (B, F|1, L/(F|1), D)
            return t.unflatten(1, (frames, -1))

        h = (fp32_layer_norm(by_frame(x), self.eps) * (1 + scale) + shift).flatten(1, 2).type_as(x)
        x = (by_frame(x).float() + by_frame(self.attn1(h, cos, sin)) * gate).flatten(1, 2).type_as(x)

        if kv is None:  # computed here, where the block's weights are (they may be streamed in for this call)
            kv = self.attn2.keys_values(text, image)
        h = x if self.norm2 is None else fp32_layer_norm(x, self.eps, self.norm2).type_as(x)
        x = x + self.attn2(h, kv, passes)

        h = (fp32_layer_norm(by_frame(x), self.eps) * (1 + ffn_scale) + ffn_shift).flatten(1, 2).type_as(x)
        return (by_frame(x).float() + by_frame(self.ffn(h)).float() * ffn_gate).flatten(1, 2).type_as(x), kv


class WanTransformer(nn.Module):
    """Predicts the flow-matching velocity of a video latent, given timestep, text and (I2V) image tokens."""

    # parameters that stay float32 when the model runs in bf16: those with one of these as a dot-separated
    # part of their name (diffusers' _keep_in_fp32_modules; the norms and the time MLP)
    fp32_params: tuple[str, ...] = ("time_embedder", "scale_shift_table", "norm1", "norm2", "norm3")
    sequence = WHOLE  # where the video tokens live (minialg.parallel: split over ranks)

    def __init__(self, cfg: WanTransformerConfig):
        super().__init__()
        self.config = cfg
        dim = cfg.num_attention_heads * cfg.attention_head_dim
        out_channels = cfg.out_channels or cfg.in_channels
        self.patch_embedding = nn.Conv3d(cfg.in_channels, dim, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.condition_embedder = ConditionEmbedder(cfg)
        self.blocks = nn.ModuleList([Block(cfg) for _ in range(cfg.num_layers)])
        self.proj_out = nn.Linear(dim, out_channels * cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2])
        self.scale_shift_table = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        """The published I2V checkpoints carry unused `attn2.norm_added_q` weights; diffusers skips them too."""
        return None if ".norm_added_q." in name else name


    def forward(
        self,
        x: torch.Tensor,
        timestep: torch.Tensor,
        text: torch.Tensor,
        image: torch.Tensor | None = None,
        passes: tuple[int, ...] | None = None,
        cache: dict | None = None,
    ) -> torch.Tensor:
        """x (B, C_in, F, H, W), timestep (B,) or one per latent frame (B, F), text (P, T, text_dim), image
        (1|P, I, image_dim) or None -> (B, C_out, F, H, W) in x's dtype.

        passes (B ints): the text (and image) row of each batch element; default: row b for element b (P = B).
        cache: a dict kept by the caller across the calls of one run, all with the same text and image (see the
        module docstring); None computes everything at every call.
        """
        passes = tuple(range(x.shape[0])) if passes is None else tuple(passes)
        if len(passes) != x.shape[0] or not all(0 <= p < text.shape[0] for p in passes):
            raise ValueError(f"passes {passes} must name a text row (of {text.shape[0]}) for each of {x.shape[0]}")
        if image is not None and image.shape[0] not in (1, text.shape[0]):
            raise ValueError(f"image must have 1 row or one per text ({text.shape[0]}), got {image.shape[0]}")
        pf, ph, pw = self.config.patch_size
        f, h, w = x.shape[2] // pf, x.shape[3] // ph, x.shape[4] // pw
        cos, sin = kept(cache, ("rope", f, h, w), lambda: rope_cos_sin(
            self.config.attention_head_dim, f, h, w, x.device))  # (L, Dh/2) each

        x = self.patch_embedding(x).flatten(2).transpose(1, 2).contiguous()  # (B, L, D)
        x, cos, sin = self.sequence.split((f, h, w), x, cos, sin)  # sequence parallel: this rank's patch rows
        temb, modulation = self.condition_embedder(timestep, text.dtype)
        kv = None if cache is None else cache.get("cross_kv")  # per block, from the run's first call
        if kv is None:
            text, image = self.condition_embedder.embed_context(text, image)  # (P, T, D), (1|P, I, D) or None
            kv = [None] * len(self.blocks)
        else:
            text = image = None
        for k, block in enumerate(self.blocks):
            x, kv[k] = block(x, modulation, cos, sin, passes, kv[k], text, image)
        if cache is not None:
            cache["cross_kv"] = kv

        shift, scale = (self.scale_shift_table + temb[:, :, None]).unsqueeze(-2).unbind(-3)  # (B, F|1, 1, D) each
        by_frame = x.unflatten(1, (temb.shape[1], -1))  # (B, F|1, L/(F|1), D)
        x = (fp32_layer_norm(by_frame, self.config.eps) * (1 + scale) + shift).flatten(1, 2).type_as(x)
        x = self.sequence.join(self.proj_out(x), (f, h, w))  # (B, L, pf*ph*pw*C_out)
        return rearrange(
            x, "b (f h w) (pf ph pw c) -> b c (f pf) (h ph) (w pw)", f=f, h=h, w=w, pf=pf, ph=ph, pw=pw
        )
