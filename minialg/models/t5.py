"""T5 v1.1 and UMT5 text encoders, and their sentencepiece tokenizer.

Wan 2.1 encodes prompts with UMT5-XXL, CogVideoX with T5-v1.1-XXL. Both are the encoder half of T5: pre-norm
blocks of self-attention and a gated-GELU feed-forward, RMS layer norms, no absolute positions. Position enters
as a learned bias on the attention logits, looked up by a bucketed relative distance. The two families differ
in one place only: T5 learns that bias in the first block and shares it with every block, UMT5 learns one per
block. Reference for behaviour: transformers' T5EncoderModel / UMT5EncoderModel (`last_hidden_state`).
"""

import html
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

import sentencepiece
import torch
import torch.nn.functional as F
from torch import nn

try:
    import ftfy
except ImportError:
    ftfy = None


@dataclass
class T5Config:
    """Keys of a checkpoint's text_encoder/config.json. Defaults are transformers' T5Config defaults, except
    `feed_forward_proj`: only T5 v1.1's gated GELU is implemented (original T5's "relu" is not)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64  # width of one head
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "gated-gelu"
    model_type: str = "t5"  # "umt5": a relative position bias in every block

    def __post_init__(self):
        if self.feed_forward_proj != "gated-gelu":
            raise ValueError(f"feed_forward_proj {self.feed_forward_proj!r} is not supported, only 'gated-gelu'")
        if self.model_type not in ("t5", "umt5"):
            raise ValueError(f"model_type {self.model_type!r} is neither 't5' nor 'umt5'")


    @property
    def bias_in_every_block(self) -> bool:
        return self.model_type == "umt5"


def relative_position_buckets(length: int, num_buckets: int, max_distance: int, device: torch.device) -> torch.Tensor:
    """Bucket of each (query, key) pair of a bidirectional attention over `length` tokens: (L, L) int64.

    Half of the buckets are for keys after the query, half for keys before. The first half of each half holds
    the distances 0, 1, 2, ... exactly; the rest cover distances up to `max_distance` on a log scale, and every
    larger distance shares the last bucket."""
    position = torch.arange(length, dtype=torch.long, device=device)
    relative = position[None, :] - position[:, None]  # (L, L) key position - query position
    half = num_buckets // 2
    side = (relative > 0).long() * half
    distance = relative.abs()
    exact = half // 2
    log_ratio = torch.log(distance.float() / exact) / math.log(max_distance / exact)  # -inf at 0: not used
    far = (exact + (log_ratio * (half - exact)).long()).clamp(max=half - 1)
    return side + torch.where(distance < exact, distance, far)


class RMSNorm(nn.Module):
    """T5's layer norm: scale by the root mean square (computed in fp32), no mean, no bias."""

    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        variance = x.float().pow(2).mean(-1, keepdim=True)
        x = x * torch.rsqrt(variance + self.eps)  # fp32
        return self.weight * x.to(self.weight.dtype)


class SelfAttention(nn.Module):
    """Multi-head attention without the 1/sqrt(d) scale (T5 folds it into the weights); positions come in as
    an additive bias on the logits."""

    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.num_heads = cfg.num_heads
        inner = cfg.num_heads * cfg.d_kv
        self.q = nn.Linear(cfg.d_model, inner, bias=False)
        self.k = nn.Linear(cfg.d_model, inner, bias=False)
        self.v = nn.Linear(cfg.d_model, inner, bias=False)
        self.o = nn.Linear(inner, cfg.d_model, bias=False)
        self.relative_attention_bias = (
            nn.Embedding(cfg.relative_attention_num_buckets, cfg.num_heads) if has_relative_bias else None
        )

    def position_bias(self, buckets: torch.Tensor) -> torch.Tensor:
        """(L, L) bucket ids -> (1, heads, L, L) learned bias."""
        return self.relative_attention_bias(buckets).permute(2, 0, 1)[None]

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        B, L, _ = x.shape
        q, k, v = (proj(x).view(B, L, self.num_heads, -1).transpose(1, 2) for proj in (self.q, self.k, self.v))
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_bias, scale=1.0)  # (B, H, L, d_kv)
        return self.o(out.transpose(1, 2).reshape(B, L, -1))


class AttentionLayer(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.SelfAttention = SelfAttention(cfg, has_relative_bias)

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        return x + self.SelfAttention(self.layer_norm(x), attn_bias)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    """GELU, tanh approximation, written out as the reference does (so bf16 rounds the same way)."""
    return 0.5 * x * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (x + 0.044715 * torch.pow(x, 3.0))))


class GatedGelu(nn.Module):
    """wo(gelu_tanh(wi_0 x) * wi_1 x)."""

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.wi_0 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wi_1 = nn.Linear(cfg.d_model, cfg.d_ff, bias=False)
        self.wo = nn.Linear(cfg.d_ff, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.wo(gelu_tanh(self.wi_0(x)) * self.wi_1(x))


class FeedForwardLayer(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)
        self.DenseReluDense = GatedGelu(cfg)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.DenseReluDense(self.layer_norm(x))


class Block(nn.Module):
    def __init__(self, cfg: T5Config, has_relative_bias: bool):
        super().__init__()
        self.layer = nn.ModuleList([AttentionLayer(cfg, has_relative_bias), FeedForwardLayer(cfg)])

    def forward(self, x: torch.Tensor, attn_bias: torch.Tensor) -> torch.Tensor:
        return self.layer[1](self.layer[0](x, attn_bias))


class Encoder(nn.Module):
    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.block = nn.ModuleList(
            [Block(cfg, has_relative_bias=cfg.bias_in_every_block or i == 0) for i in range(cfg.num_layers)]
        )
        self.final_layer_norm = RMSNorm(cfg.d_model, cfg.layer_norm_epsilon)

    def forward(self, x: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
        B, L, _ = x.shape
        buckets = relative_position_buckets(
            L, self.config.relative_attention_num_buckets, self.config.relative_attention_max_distance, x.device
        )  # (L, L)
        for block in self.block:
            attention = block.layer[0].SelfAttention
            if attention.relative_attention_bias is not None:  # else: keep the bias of the block before
                attn_bias = attention.position_bias(buckets)  # (1, H, L, L)
                if attention_mask is not None:
                    keep = attention_mask[:, None, None, :].bool()  # (B, 1, 1, L)
                    attn_bias = torch.where(keep, attn_bias, torch.finfo(attn_bias.dtype).min)  # (B, H, L, L)
            x = block(x, attn_bias)
        return self.final_layer_norm(x)


class T5Encoder(nn.Module):
    """T5 v1.1 / UMT5 encoder: token ids -> per-token embeddings (transformers' `last_hidden_state`)."""

    # Parameters transformers keeps in fp32 in a bf16 load: none (its `_keep_in_fp32_modules = ["wo"]` applies
    # to fp16 loads only).
    fp32_params: tuple[str, ...] = ()

    def __init__(self, cfg: T5Config):
        super().__init__()
        self.config = cfg
        self.shared = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.encoder = Encoder(cfg)

    @staticmethod
    def checkpoint_name(name: str) -> str | None:
        """`encoder.embed_tokens.weight` is a tied copy of `shared.weight`: ignored."""
        return None if name == "encoder.embed_tokens.weight" else name

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """input_ids (B, L) int64; attention_mask (B, L), 0 where a key is padding (None: attend to all).
        Returns (B, L, d_model). Padded positions get values too; callers drop them as the reference does."""
        return self.encoder(self.shared(input_ids), attention_mask)


class Tokenizer:
    """Prompt -> T5 token ids, as transformers' T5Tokenizer gives them (with `padding="max_length",
    truncation=True`): sentencepiece ids, then `</s>`, then `<pad>` up to max_length.

    Special tokens written literally in a prompt (`<extra_id_3>`, `</s>`, ...) become their ids, as in
    transformers. Their ids come from the files beside spiece.model: tokenizer.json's `added_tokens`, else
    tokenizer_config.json's `added_tokens_decoder`, else T5's convention (`extra_ids` sentinels after the
    sentencepiece vocabulary, `<extra_id_0>` last)."""

    def __init__(self, spiece_path: str | Path):
        spiece_path = Path(spiece_path)
        self.sp = sentencepiece.SentencePieceProcessor(model_file=str(spiece_path))
        self.pad_id = self.sp.piece_to_id("<pad>")
        self.eos_id = self.sp.piece_to_id("</s>")
        self.added_tokens = self._read_added_tokens(spiece_path.parent)  # literal text -> id
        longest_first = sorted(self.added_tokens, key=len, reverse=True)
        self.added_pattern = re.compile("(" + "|".join(map(re.escape, longest_first)) + ")")

    def _read_added_tokens(self, folder: Path) -> dict[str, int]:
        if (folder / "tokenizer.json").is_file():
            added = json.loads((folder / "tokenizer.json").read_text(encoding="utf-8"))["added_tokens"]
            return {token["content"]: token["id"] for token in added}
        config_file = folder / "tokenizer_config.json"
        config = json.loads(config_file.read_text(encoding="utf-8")) if config_file.is_file() else {}
        if "added_tokens_decoder" in config:
            return {token["content"]: int(i) for i, token in config["added_tokens_decoder"].items()}
        extra_ids = config.get("extra_ids", 100)
        tokens = {piece: self.sp.piece_to_id(piece) for piece in ("<pad>", "</s>", "<unk>")}
        size = self.sp.get_piece_size()
        tokens.update({f"<extra_id_{i}>": size + extra_ids - 1 - i for i in range(extra_ids)})
        return tokens

    def encode(self, text: str) -> list[int]:
        """Ids of one text, without `</s>`."""
        ids = []
        for i, part in enumerate(self.added_pattern.split(text)):  # odd parts are added tokens
            ids += [self.added_tokens[part]] if i % 2 else self.sp.encode(part)
        return ids

    def __call__(self, texts: list[str], max_length: int) -> tuple[torch.Tensor, torch.Tensor]:
        """-> input_ids, attention_mask: (B, max_length) int64 each."""
        input_ids = torch.full((len(texts), max_length), self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros((len(texts), max_length), dtype=torch.long)
        for row, text in enumerate(texts):
            ids = self.encode(text)[: max_length - 1] + [self.eos_id]
            input_ids[row, : len(ids)] = torch.tensor(ids)
            attention_mask[row, : len(ids)] = 1
        return input_ids, attention_mask


def clean_prompt(text: str) -> str:
    """Wan's prompt clean-up: fix mojibake (when ftfy is installed), unescape HTML twice, collapse whitespace."""
    if ftfy is not None:
        text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()
