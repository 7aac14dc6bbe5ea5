"""CLIP: the vision tower (ViT) and the text encoder, which share one transformer block.

Vision: the penultimate hidden states of an image, as Wan 2.1 I2V and LLaVA use them; equal to transformers'
CLIPVisionModelWithProjection minus the projection head, plus the image preprocessing of CLIPImageProcessor (the
Pillow path: resize shortest edge, center crop, rescale, normalize).
Text: the pooled output of transformers' CLIPTextModel (causal blocks, final layer norm, the state at the end of
text token), as HunyuanVideo uses it.
"""

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from minialg.media import PIL_FILTERS, resize


@dataclass
class CLIPVisionConfig:
    hidden_size: int = 768
    intermediate_size: int = 3072
    num_hidden_layers: int = 12
    num_attention_heads: int = 12
    num_channels: int = 3
    image_size: int = 224
    patch_size: int = 32
    hidden_act: str = "quick_gelu"  # "gelu" (erf) or "quick_gelu"
    layer_norm_eps: float = 1e-5


@dataclass
class CLIPTextConfig:
    """Keys of a CLIPTextModel config.json; defaults are transformers' CLIPTextConfig defaults."""

    vocab_size: int = 49408
    hidden_size: int = 512
    intermediate_size: int = 2048
    num_hidden_layers: int = 12
    num_attention_heads: int = 8
    max_position_embeddings: int = 77
    hidden_act: str = "quick_gelu"  # "gelu" (erf) or "quick_gelu"
    layer_norm_eps: float = 1e-5
    eos_token_id: int = 49407  # 2 (older configs): the pooled token is the one with the largest id


class Embeddings(nn.Module):
    """Patchify with a strided conv, prepend the class token, add learned positions."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        num_positions = (cfg.image_size // cfg.patch_size) ** 2 + 1
        self.class_embedding = nn.Parameter(torch.empty(cfg.hidden_size))
        self.patch_embedding = nn.Conv2d(
            cfg.num_channels, cfg.hidden_size, kernel_size=cfg.patch_size, stride=cfg.patch_size, bias=False
        )
        self.position_embedding = nn.Embedding(num_positions, cfg.hidden_size)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        weight = self.patch_embedding.weight
        patches = self.patch_embedding(pixel_values.to(weight.dtype))  # (B, C, S/p, S/p)
        patches = patches.flatten(2).transpose(1, 2)  # (B, N, C)
        cls = self.class_embedding.expand(patches.shape[0], 1, -1)  # (B, 1, C)
        return torch.cat([cls, patches], dim=1) + self.position_embedding.weight  # (B, 1 + N, C)


class Attention(nn.Module):
    """Multi-head self-attention; the text encoder's is causal (each token sees itself and the tokens before)."""

    def __init__(self, cfg: CLIPVisionConfig | CLIPTextConfig):
        super().__init__()
        self.num_heads = cfg.num_attention_heads
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)
        self.out_proj = nn.Linear(cfg.hidden_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        B, L, C = x.shape
        q, k, v = (p(x).view(B, L, self.num_heads, -1).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        out = F.scaled_dot_product_attention(q, k, v, is_causal=causal)  # (B, H, L, D)
        return self.out_proj(out.transpose(1, 2).reshape(B, L, C))


class MLP(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig | CLIPTextConfig):
        super().__init__()
        if cfg.hidden_act not in ("gelu", "quick_gelu"):
            raise ValueError(f"unsupported CLIP hidden_act {cfg.hidden_act!r} (expected 'gelu' or 'quick_gelu')")
        self.quick_gelu = cfg.hidden_act == "quick_gelu"
        self.fc1 = nn.Linear(cfg.hidden_size, cfg.intermediate_size)
        self.fc2 = nn.Linear(cfg.intermediate_size, cfg.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc1(x)
        h = h * torch.sigmoid(1.702 * h) if self.quick_gelu else F.gelu(h)
        return self.fc2(h)


class EncoderLayer(nn.Module):
    """Pre-norm transformer block."""

    def __init__(self, cfg: CLIPVisionConfig | CLIPTextConfig):
        super().__init__()
        self.layer_norm1 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.self_attn = Attention(cfg)
        self.layer_norm2 = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, causal: bool = False) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x), causal)
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, cfg: CLIPVisionConfig | CLIPTextConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(cfg) for _ in range(cfg.num_hidden_layers))


class CLIPVision(nn.Module):
    """The ViT image encoder. forward returns the penultimate layer's hidden states (the last layer and
    post_layernorm are held only because the checkpoint has them)."""

    def __init__(self, cfg: CLIPVisionConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = Embeddings(cfg)
        self.pre_layrnorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)  # sic: the checkpoint's spelling
        self.encoder = Encoder(cfg)
        self.post_layernorm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        """Map a tensor name of a CLIPVisionModelWithProjection file to ours; None = not used."""
        name = name.removeprefix("vision_model.")
        if name.startswith("visual_projection.") or name.endswith("position_ids"):
            return None
        return name

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """pixel_values (B, 3, S, S) -> hidden states (B, 1 + (S/p)^2, C) after all layers but the last."""
        x = self.pre_layrnorm(self.embeddings(pixel_values))  # (B, L, C)
        for layer in self.encoder.layers[:-1]:
            x = layer(x)
        return x


class TextEmbeddings(nn.Module):
    """Token embedding plus a learned embedding of the position."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.position_embedding = nn.Embedding(cfg.max_position_embeddings, cfg.hidden_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        positions = self.position_embedding.weight[: input_ids.shape[1]]  # (L, C)
        return self.token_embedding(input_ids) + positions  # (B, L, C)


class CLIPText(nn.Module):
    """The text encoder. forward returns the pooled output: the final-normed state at the end-of-text token."""

    def __init__(self, cfg: CLIPTextConfig):
        super().__init__()
        self.config = cfg
        self.embeddings = TextEmbeddings(cfg)
        self.encoder = Encoder(cfg)
        self.final_layer_norm = nn.LayerNorm(cfg.hidden_size, eps=cfg.layer_norm_eps)

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        """Map a tensor name of a CLIPTextModel file (`text_model.` prefix before transformers 5) to ours."""
        return None if name.endswith("position_ids") else name.removeprefix("text_model.")

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """input_ids (B, L) int64, L <= max_position_embeddings (77 tokens, padded) -> pooled (B, C)."""
        if input_ids.shape[1] > self.config.max_position_embeddings:
            raise ValueError(f"CLIP text takes at most {self.config.max_position_embeddings} tokens, "
                             f"got {input_ids.shape[1]}")
        x = self.embeddings(input_ids)  # (B, L, C)
        for layer in self.encoder.layers:
            x = layer(x, causal=True)
        x = self.final_layer_norm(x)
        ids = input_ids.to(torch.int)
        # older configs say eos_token_id 2: the end-of-text token is then found as the largest id of the row
        eos = ids.argmax(-1) if self.config.eos_token_id == 2 else (ids == self.config.eos_token_id).int().argmax(-1)
        return x[torch.arange(x.shape[0], device=x.device), eos]  # (B, C)


def preprocess(image: torch.Tensor, processor_config: dict) -> torch.Tensor:
    """(H, W, 3) uint8 image -> (1, 3, S, S) float32 pixel_values, as CLIPImageProcessor (Pillow backend)
    makes them from the fields of a preprocessor_config.json (missing fields take CLIP's defaults)."""
    cfg = {
        "do_resize": True, "size": {"shortest_edge": 224}, "resample": 3,
        "do_center_crop": True, "crop_size": {"height": 224, "width": 224},
        "do_rescale": True, "rescale_factor": 1 / 255,
        "do_normalize": True, "image_mean": [0.48145466, 0.4578275, 0.40821073],
        "image_std": [0.26862954, 0.26130258, 0.27577711],
    } | processor_config  # fmt: skip
    x = image  # (H, W, 3) uint8
    if cfg["do_resize"]:
        height, width = _resized_size(x.shape[0], x.shape[1], cfg["size"])
        x = resize(x, height, width, PIL_FILTERS.get(cfg["resample"], cfg["resample"]))
    if cfg["do_center_crop"]:
        crop_h, crop_w = cfg["crop_size"]["height"], cfg["crop_size"]["width"]
        if crop_h > x.shape[0] or crop_w > x.shape[1]:
            raise ValueError(f"center crop {crop_h}x{crop_w} is larger than the resized image {tuple(x.shape[:2])}")
        top, left = (x.shape[0] - crop_h) // 2, (x.shape[1] - crop_w) // 2
        x = x[top : top + crop_h, left : left + crop_w]
    x = x.permute(2, 0, 1)  # (3, S, S)
    if cfg["do_rescale"]:
        x = (x.double() * cfg["rescale_factor"]).float()  # float64 product, stored as float32
    x = x.float()
    if cfg["do_normalize"]:
        mean = torch.tensor(cfg["image_mean"], dtype=torch.float32).view(3, 1, 1)
        std = torch.tensor(cfg["image_std"], dtype=torch.float32).view(3, 1, 1)
        x = (x - mean) / std
    return x.unsqueeze(0)  # (1, 3, S, S)


def _resized_size(height: int, width: int, size: dict) -> tuple[int, int]:
    """Target (height, width) for a size dict: {"shortest_edge": s} keeps the aspect ratio (long edge
    truncated), {"height": h, "width": w} is exact."""
    if "shortest_edge" in size and size.get("longest_edge") is None:
        short, long = min(height, width), max(height, width)
        new_short, new_long = size["shortest_edge"], int(size["shortest_edge"] * long / short)
        return (new_long, new_short) if width <= height else (new_short, new_long)
    if "height" in size and "width" in size:
        return size["height"], size["width"]
    raise ValueError(f"unsupported image processor size {size!r}")
