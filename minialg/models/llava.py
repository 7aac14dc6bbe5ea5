"""LLaVA-LLaMA-3, as HunyuanVideo-I2V encodes its prompt and image: the text condition is an inner layer of a
LLaMA-3 decoder that has read the prompt with the image's features spliced in.

    image ─ CLIP ViT (penultimate layer, class token dropped) ─ projector ─┐
    chat template with one <image> token ─ widen it to one slot per patch ─┴─ write features into the slots
        ─ LLaMA decoder (causal, padding masked), stopped at the layer that is read
        ─ crop the template's system part, keep every k-th image state, concatenate [image ; text] and masks

Equal to transformers' LlavaForConditionalGeneration (`hidden_states[-(skip + 1)]`) wrapped in diffusers'
HunyuanVideoImageToVideoPipeline._get_llama_prompt_embeds. The layers after the one read, the final norm and the
lm_head are never built: `checkpoint_name` skips their tensors.
"""

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from minialg.checkpoint import config_from
from minialg.models.clip import CLIPVision, CLIPVisionConfig
from minialg.models.t5 import RMSNorm

# The pipeline's chat template: the prompt goes in at {}; crop_start counts the Llama-3 tokens before it, the image
# token sits at image_emb_start and widens to image_emb_len slots (24 x 24 patches of a 336 x 336 image).
PROMPT_TEMPLATE = {
    "template": (
        "<|start_header_id|>system<|end_header_id|>\n\n<image>\nDescribe the video by detailing the following "
        "aspects according to the reference image: "
        "1. The main content and theme of the video."
        "2. The color, shape, size, texture, quantity, text, and spatial relationships of the objects."
        "3. Actions, events, behaviors temporal relationships, physical movement changes of the objects."
        "4. background environment, light, style and atmosphere."
        "5. camera angles, movements, and transitions used in the video:<|eot_id|>\n\n"
        "<|start_header_id|>user<|end_header_id|>\n\n{}<|eot_id|>"
        "<|start_header_id|>assistant<|end_header_id|>\n\n"
    ),
    "crop_start": 103,
    "image_emb_start": 5,
    "image_emb_end": 581,
    "image_emb_len": 576,
}
END_HEADER_ID = 128007  # <|end_header_id|> in the Llama-3 vocabulary


@dataclass
class LlamaConfig:
    """Keys of `text_config`; defaults are transformers' LlamaConfig defaults. Rotary settings come either as
    `rope_theta` + `rope_scaling` (older files) or as `rope_parameters` (transformers 5 files)."""

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None  # None: one per query head
    head_dim: int | None = None  # None: hidden_size // num_attention_heads
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    mlp_bias: bool = False
    max_position_embeddings: int = 2048
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    rope_parameters: dict | None = None

    def __post_init__(self):
        if self.hidden_act != "silu":
            raise ValueError(f"unsupported LLaMA hidden_act {self.hidden_act!r} (only 'silu')")
        self.num_key_value_heads = self.num_key_value_heads or self.num_attention_heads
        self.head_dim = self.head_dim or self.hidden_size // self.num_attention_heads
        rope = dict(self.rope_parameters or self.rope_scaling or {})
        rope.setdefault("rope_theta", self.rope_theta)
        rope["rope_type"] = rope.get("rope_type", rope.pop("type", "default"))
        if rope["rope_type"] not in ("default", "linear", "llama3"):
            raise ValueError(f"unsupported rope type {rope['rope_type']!r} (expected default, linear or llama3)")
        self.rope_parameters = rope


@dataclass
class LlavaConfig:
    """Keys of a LlavaForConditionalGeneration config.json (text_config and vision_config as their dicts)."""

    text_config: dict | LlamaConfig | None = None
    vision_config: dict | CLIPVisionConfig | None = None
    image_token_index: int = 32000
    pad_token_id: int | None = None  # the slots the widened prompt leaves empty; they are masked out
    projector_hidden_act: str = "gelu"
    multimodal_projector_bias: bool = True
    vision_feature_layer: int = -2
    vision_feature_select_strategy: str = "default"  # "default": drop the class token, "full": keep it
    # not a config.json key: the pipeline reads hidden_states[-(num_hidden_layers_to_skip + 1)] of the decoder
    num_hidden_layers_to_skip: int = 2

    def __post_init__(self):
        if self.text_config is None or self.vision_config is None:
            raise ValueError("a LLaVA config needs both text_config and vision_config")
        if isinstance(self.text_config, dict):
            self.text_config = config_from(LlamaConfig, self.text_config)
        if isinstance(self.vision_config, dict):
            self.vision_config = config_from(CLIPVisionConfig, self.vision_config)
        if self.vision_feature_layer != -2:
            raise ValueError(f"vision_feature_layer {self.vision_feature_layer} is not supported, only -2")
        if self.vision_feature_select_strategy not in ("default", "full"):
            raise ValueError(f"unknown vision_feature_select_strategy {self.vision_feature_select_strategy!r}")
        if self.projector_hidden_act != "gelu":
            raise ValueError(f"unsupported projector_hidden_act {self.projector_hidden_act!r} (only 'gelu')")
        if not 1 <= self.num_hidden_layers_to_skip < self.text_config.num_hidden_layers:
            raise ValueError(f"num_hidden_layers_to_skip must be in [1, {self.text_config.num_hidden_layers}), "
                             f"got {self.num_hidden_layers_to_skip}")

    @property
    def num_image_features(self) -> int:
        """Features the vision tower gives per image: one per patch (+ the class token for "full")."""
        vision = self.vision_config
        patches = (vision.image_size // vision.patch_size) ** 2
        return patches + (self.vision_feature_select_strategy == "full")


def rope_inverse_frequencies(cfg: LlamaConfig) -> torch.Tensor:
    """(head_dim / 2,) float32 rotation speeds, on the CPU in float32 as transformers makes them."""
    rope, dim = cfg.rope_parameters, cfg.head_dim
    inv_freq = 1.0 / (rope["rope_theta"] ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope["rope_type"] == "linear":
        return inv_freq / rope["factor"]
    if rope["rope_type"] == "llama3":  # Llama 3.1: slow rotations stretched by `factor`, a smooth ramp between
        factor, low, high = rope["factor"], rope["low_freq_factor"], rope["high_freq_factor"]
        context = rope.get("original_max_position_embeddings", cfg.max_position_embeddings)
        wavelength = 2 * math.pi / inv_freq
        stretched = torch.where(wavelength > context / low, inv_freq / factor, inv_freq)
        ramp = (context / wavelength - low) / (high - low)
        smoothed = (1 - ramp) * stretched / factor + ramp * stretched
        between = ~(wavelength < context / high) * ~(wavelength > context / low)
        return torch.where(between, smoothed, stretched)
    return inv_freq


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotary embedding on (B, H, L, D): the two halves of each head are the two coordinates of D/2 rotations."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


class Attention(nn.Module):
    """Grouped-query attention: num_key_value_heads key/value heads, each shared by a group of query heads."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.head_dim, self.groups = cfg.head_dim, cfg.num_attention_heads // cfg.num_key_value_heads
        bias = cfg.attention_bias
        self.q_proj = nn.Linear(cfg.hidden_size, cfg.num_attention_heads * cfg.head_dim, bias=bias)
        self.k_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=bias)
        self.v_proj = nn.Linear(cfg.hidden_size, cfg.num_key_value_heads * cfg.head_dim, bias=bias)
        self.o_proj = nn.Linear(cfg.num_attention_heads * cfg.head_dim, cfg.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (p(x).view(B, L, -1, self.head_dim).transpose(1, 2) for p in (self.q_proj, self.k_proj, self.v_proj))
        q, k = rotate(q, cos, sin), rotate(k, cos, sin)  # (B, H, L, D), (B, H_kv, L, D)
        if self.groups > 1:  # each key/value head copied for its group, as transformers does beside a mask
            k, v = (t[:, :, None].expand(-1, -1, self.groups, -1, -1).reshape(B, -1, L, self.head_dim) for t in (k, v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.head_dim**-0.5)  # (B, H, L, D)
        return self.o_proj(out.transpose(1, 2).contiguous().reshape(B, L, -1))


class MLP(nn.Module):
    """SwiGLU: down(silu(gate x) * up x)."""

    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.up_proj = nn.Linear(cfg.hidden_size, cfg.intermediate_size, bias=cfg.mlp_bias)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.hidden_size, bias=cfg.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class LlamaDecoder(nn.Module):
    """Token embedding and the first `num_layers` decoder layers."""

    def __init__(self, cfg: LlamaConfig, num_layers: int):
        super().__init__()
        self.config = cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(num_layers))

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor) -> torch.Tensor:
        """x (B, L, C) embeddings, attention_mask (B, L) 1 = token / 0 = padding, position_ids (B, L) int64."""
        L = x.shape[1]
        causal = torch.ones(L, L, dtype=torch.bool, device=x.device).tril()
        mask = causal[None, None] & attention_mask.bool()[:, None, None, :]  # (B, 1, L, L): past, non-padding keys
        angles = position_ids[..., None].float() * rope_inverse_frequencies(self.config).to(x.device)  # (B, L, D/2)
        angles = torch.cat((angles, angles), dim=-1)[:, None]  # (B, 1, L, D)
        cos, sin = angles.cos().to(x.dtype), angles.sin().to(x.dtype)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return x


class Projector(nn.Module):
    """Vision width -> text width: linear, GELU, linear."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        vision, text, bias = cfg.vision_config.hidden_size, cfg.text_config.hidden_size, cfg.multimodal_projector_bias
        self.linear_1 = nn.Linear(vision, text, bias=bias)
        self.linear_2 = nn.Linear(text, text, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.linear_2(F.gelu(self.linear_1(x)))


class LlavaTextEncoder(nn.Module):
    """The text encoder. forward returns the decoder's hidden states after all but the last
    `num_hidden_layers_to_skip` layers, for a prompt whose image slots are already widened (see `widen_image_token`)."""

    def __init__(self, cfg: LlavaConfig):
        super().__init__()
        self.config = cfg
        self.vision_tower = CLIPVision(cfg.vision_config)
        self.multi_modal_projector = Projector(cfg)
        text = cfg.text_config
        self.language_model = LlamaDecoder(text, text.num_hidden_layers - cfg.num_hidden_layers_to_skip)

    def checkpoint_name(self, name: str) -> str | None:
        """Map a tensor name of a LlavaForConditionalGeneration file to ours; None = not used.

        Files written before transformers 5 (the published one) say `language_model.model.*`,
        `language_model.lm_head.*`, `vision_tower.vision_model.*`; transformers 5 modules say `model.language_model.*`,
        `model.vision_tower.*`, `lm_head.*`. The final norm, the lm_head and the layers after the one read are skipped.
        """
        for old, new in (("language_model.model.", "language_model."), ("model.language_model.", "language_model."),
                         ("vision_tower.vision_model.", "vision_tower."), ("model.vision_tower.", "vision_tower."),
                         ("model.multi_modal_projector.", "multi_modal_projector."),
                         ("language_model.lm_head.", "lm_head.")):
            if name.startswith(old):
                name = new + name.removeprefix(old)
                break
        if name.startswith(("lm_head.", "language_model.norm.")) or name.endswith("position_ids"):
            return None
        layer = re.match(r"language_model\.layers\.(\d+)\.", name)
        if layer and int(layer.group(1)) >= len(self.language_model.layers):
            return None
        return name

    def image_features(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """(N_img, 3, S, S) -> (N_img, num_image_features, C_text): projected penultimate ViT states."""
        states = self.vision_tower(pixel_values)  # (N_img, 1 + P, C_vision)
        if self.config.vision_feature_select_strategy == "default":
            states = states[:, 1:]
        return self.multi_modal_projector(states)

    def input_embeddings(self, input_ids: torch.Tensor, pixel_values: torch.Tensor) -> torch.Tensor:
        """Token embeddings with the image features written, in order, into the image-token slots: (B, L, C)."""
        embeds = self.language_model.embed_tokens(input_ids)
        features = self.image_features(pixel_values).to(embeds.dtype)
        slots = (input_ids == self.config.image_token_index)[..., None]  # (B, L, 1)
        return embeds.masked_scatter(slots, features)

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, position_ids: torch.Tensor,
                pixel_values: torch.Tensor) -> torch.Tensor:
        """input_ids, attention_mask, position_ids (B, L) as `widen_image_token` makes them, with exactly
        num_image_features image tokens per image; pixel_values (B, 3, S, S) -> hidden states (B, L, C)."""
        x = self.input_embeddings(input_ids, pixel_values)
        return self.language_model(x, attention_mask, position_ids)


def widen_image_token(input_ids: torch.Tensor, cfg: LlavaConfig, image_emb_start: int, image_emb_end: int,
                      image_emb_len: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The pipeline's expansion of tokenized prompts (B, L) to (B, L + n (image_emb_len - 1)), n the most image
    tokens of a row: each image token becomes image_emb_len slots, image_emb_start:image_emb_end are image slots,
    the rest of the widened row is pad_token_id. The mask marks every slot that is not pad_token_id (the tokenizer's
    own mask is not used); positions count the marked slots (1 where unmarked). Returns (ids, mask, positions)."""
    if cfg.pad_token_id is None:
        raise ValueError("the LLaVA config has no pad_token_id: the widened prompt cannot be padded")
    image = input_ids == cfg.image_token_index
    width = input_ids.shape[1] + int(image.sum(-1).max()) * (image_emb_len - 1)
    target = torch.cumsum(image * (image_emb_len - 1) + 1, -1) - 1  # where each old slot goes
    rows, cols = torch.where(~image)
    ids = torch.full((input_ids.shape[0], width), cfg.pad_token_id, dtype=input_ids.dtype, device=input_ids.device)
    ids[rows, target[rows, cols]] = input_ids[rows, cols]
    ids[:, image_emb_start:image_emb_end] = cfg.image_token_index
    mask = (ids != cfg.pad_token_id).long()
    positions = (mask.cumsum(-1) - 1).masked_fill_(mask == 0, 1)
    return ids, mask, positions


@torch.no_grad()
def llama_prompt_embeds(encoder: LlavaTextEncoder, input_ids: torch.Tensor, attention_mask: torch.Tensor,
                        pixel_values: torch.Tensor, template: dict = PROMPT_TEMPLATE, end_header_id: int = END_HEADER_ID,
                        image_embed_interleave: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    """The pipeline's `_get_llama_prompt_embeds` after tokenization and image preprocessing.

    input_ids, attention_mask: (B, max_sequence_length + crop_start) int64 on the CPU, the tokenizer's output for
    `template["template"].format(prompt)` (right-padded, truncated); pixel_values (B, 3, S, S): one image per prompt,
    CLIPImageProcessor's output (`clip.preprocess` with the image_processor config). image_embed_interleave keeps
    every k-th image state when 0 < k < 6 (diffusers: 2 for latent_concat checkpoints, 4 for token_replace).

    Returns (embeds (B, T, C) on the encoder's device in its dtype, mask (B, T) int64): ceil(image_emb_len / k)
    image states, then the max_sequence_length - 4 text states from crop_start on, the 4 tokens before the assistant
    reply (<|eot_id|><|start_header_id|>assistant<|end_header_id|>) left out. The mask is 1 on the image states and
    the tokenizer's mask on the text states.
    """
    cfg = encoder.config
    crop_start, image_len = template.get("crop_start"), template.get("image_emb_len", 576)
    image_start, image_end = template.get("image_emb_start", 5), template.get("image_emb_end", 581)
    if not crop_start or crop_start < 0:
        raise ValueError(f"the prompt template needs a positive crop_start, got {crop_start}")
    if input_ids.shape[0] != pixel_values.shape[0]:
        raise ValueError(f"{input_ids.shape[0]} prompts but {pixel_values.shape[0]} images: one image per prompt")
    ids, mask, positions = widen_image_token(input_ids.cpu(), cfg, image_start, image_end, image_len)
    slots = (ids == cfg.image_token_index).sum(-1)
    if not bool((slots == cfg.num_image_features).all()):
        raise ValueError(f"the widened prompt has {slots.tolist()} image slots, the vision tower gives "
                         f"{cfg.num_image_features} features per image (template image_emb_* or tokenizer mismatch)")
    device = encoder.language_model.embed_tokens.weight.device
    hidden = encoder(ids.to(device), mask.to(device), positions.to(device), pixel_values.to(device))  # (B, L', C)

    L = input_ids.shape[1]
    step = image_embed_interleave if 0 < image_embed_interleave < 6 else 1
    embeds, masks = [], []
    for row in range(input_ids.shape[0]):
        headers = torch.where(input_ids[row].cpu() == end_header_id)[0].tolist()
        if len(headers) == 2:  # truncated before the assistant header: the reply would start after the last token
            headers.append(L - 1)
        if not headers:
            raise ValueError(f"prompt {row} has no <|end_header_id|> (id {end_header_id}): not the chat template")
        reply = headers[-1] + 1  # first token after the last header, in the tokenizer's positions
        text = torch.cat([hidden[row, crop_start - 1 + image_len: reply - 5 + image_len],
                          hidden[row, reply - 1 + image_len:]])
        text_mask = torch.cat([attention_mask[row, crop_start: reply - 4], attention_mask[row, reply:]])
        image = hidden[row, image_start:image_end][::step]
        embeds.append(torch.cat([image, text]))
        masks.append(torch.cat([attention_mask.new_ones(image.shape[0]), text_mask.cpu()]))
    return torch.stack(embeds), torch.stack(masks).to(device)
