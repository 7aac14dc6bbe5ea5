"""Tiny HunyuanVideo-I2V text-side oracles: tokenizers, LLaVA / CLIP text encoders, and a diffusers pipeline.

The tokenizers are built here (no hub): a byte-level BPE with Llama-3's pre-tokenizer and chat special tokens, and a
character-level CLIPTokenizer whose end-of-text token has the largest id and pads, as the real one.
"""

import json
from pathlib import Path

import torch

from minialg.models.llava import PROMPT_TEMPLATE

ROOT = Path(__file__).resolve().parent.parent
REAL = ROOT / "minialg" / "real_configs" / "HunyuanVideo-I2V"
LLAMA3_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
            "<image>", "<pad>"]
IMAGE_TOKEN, PAD_TOKEN = SPECIALS.index("<image>"), SPECIALS.index("<pad>")
PROMPTS = ["a cat", "A man with short gray hair plays a red electric guitar on a small stage, the camera pans left.",
           "Waves roll onto a sandy beach at sunset while seagulls circle above the water."]


def llama_tokenizer():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Split(Regex(LLAMA3_SPLIT), behavior="isolated"),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator([PROMPT_TEMPLATE["template"], *PROMPTS], trainer)
    tok.post_processor = processors.TemplateProcessing(single="<|begin_of_text|> $A",
                                                       special_tokens=[("<|begin_of_text|>", 0)])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>",
                                   pad_token="<pad>", padding_side="right")


def clip_tokenizer(folder: Path):
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    chars = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab = {c: i for i, c in enumerate(chars)} | {c + "</w>": i + 256 for i, c in enumerate(chars)}
    vocab |= {"<|startoftext|>": 512, "<|endoftext|>": 513}
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "vocab.json").write_text(json.dumps(vocab))
    (folder / "merges.txt").write_text("#version: 0.2\n")
    return CLIPTokenizer(str(folder / "vocab.json"), str(folder / "merges.txt"))


def tiny_template(tokenizer, image_emb_len: int) -> dict:
    """The pipeline's template with crop_start / image_emb_* counted in the tiny tokenizer's tokens."""
    prefix = tokenizer(PROMPT_TEMPLATE["template"].split("{}")[0]).input_ids
    start = prefix.index(IMAGE_TOKEN)
    return dict(PROMPT_TEMPLATE, crop_start=len(prefix), image_emb_start=start, image_emb_end=start + image_emb_len,
                image_emb_len=image_emb_len)


def perturb(model, scale=0.1):
    torch.manual_seed(1)
    with torch.no_grad():  # default inits leave biases and norms at 0 / 1
        for p in model.parameters():
            p.add_(torch.randn_like(p) * scale)
    return model.eval()


def tiny_llava(vocab_size: int, **text):
    """A LlavaForConditionalGeneration with a 4-layer GQA decoder and a 3-layer 28 px / patch 7 ViT (16 features)."""
    from transformers import LlavaConfig, LlavaForConditionalGeneration

    text = dict(model_type="llama", hidden_size=32, intermediate_size=64, num_hidden_layers=4, num_attention_heads=4,
                num_key_value_heads=2, vocab_size=vocab_size, rms_norm_eps=1e-5, rope_theta=500000.0) | text
    vision = dict(model_type="clip_vision_model", hidden_size=16, intermediate_size=32, num_hidden_layers=3,
                  num_attention_heads=2, image_size=28, patch_size=7)
    torch.manual_seed(0)
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_index=IMAGE_TOKEN,
                         pad_token_id=PAD_TOKEN, projector_hidden_act="gelu")
    return perturb(LlavaForConditionalGeneration(config))


def tiny_clip_text(eos_token_id: int = 2, hidden_act: str = "quick_gelu"):
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(0)
    config = CLIPTextConfig(vocab_size=514, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                            num_attention_heads=4, max_position_embeddings=77, hidden_act=hidden_act,
                            bos_token_id=512, eos_token_id=eos_token_id, pad_token_id=513)
    return perturb(CLIPTextModel(config))


def processor_config(size: int) -> dict:
    config = json.loads((REAL / "image_processor" / "preprocessor_config.json").read_text())
    return config | {"size": {"shortest_edge": size}, "crop_size": {"height": size, "width": size}}


def reference_pipeline(text_encoder=None, tokenizer=None, text_encoder_2=None, tokenizer_2=None, image_size=28):
    """A HunyuanVideoImageToVideoPipeline around the given text encoders, with a tiny transformer and VAE."""
    from diffusers import (AutoencoderKLHunyuanVideo, FlowMatchEulerDiscreteScheduler,
                           HunyuanVideoImageToVideoPipeline, HunyuanVideoTransformer3DModel)
    from transformers import CLIPImageProcessor

    torch.manual_seed(0)
    transformer = HunyuanVideoTransformer3DModel(
        in_channels=9, out_channels=4, num_attention_heads=2, attention_head_dim=10, num_layers=1,
        num_single_layers=1, num_refiner_layers=1, patch_size=1, patch_size_t=1, guidance_embeds=False,
        text_embed_dim=32, pooled_projection_dim=32, rope_axes_dim=(2, 4, 4), image_condition_type="latent_concat")
    vae = AutoencoderKLHunyuanVideo(
        latent_channels=4, down_block_types=("HunyuanVideoDownBlock3D",) * 4,
        up_block_types=("HunyuanVideoUpBlock3D",) * 4, block_out_channels=(8, 8, 8, 8), layers_per_block=1,
        norm_num_groups=4, spatial_compression_ratio=8, temporal_compression_ratio=4)
    config = {k: v for k, v in processor_config(image_size).items() if k != "image_processor_type"}
    return HunyuanVideoImageToVideoPipeline(
        text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer, vae=vae,
        scheduler=FlowMatchEulerDiscreteScheduler(shift=7.0), text_encoder_2=text_encoder_2,
        tokenizer_2=tokenizer_2, image_processor=CLIPImageProcessor(**config))
