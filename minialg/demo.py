"""Tiny random checkpoints of every family in the real folder layout, written without diffusers.

Each has every file a real checkpoint has (model_index.json, config.json + safetensors per component under the
published tensor names, the tokenizer files, the scheduler config, the image processor config), with small sizes
and random weights, so `python cli.py demo` runs a whole path offline on a CPU in seconds. The video it makes is
noise. The tokenizers are small too: a sentencepiece model trained here (T5), and byte-level BPE files written by
hand (HunyuanVideo's Llama-3 tokenizer.json and CLIP vocab.json + merges.txt: the 256 byte symbols and a few merges).
"""

import io
import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from .checkpoint import config_from, read_json
from .models.bpe import BYTE_CHARS, LLAMA3_PATTERN
from .models.llava import DecoderLayer
from .registry import pipeline_class

REAL_CONFIGS = Path(__file__).parent / "real_configs"
REAL = REAL_CONFIGS / "Wan2.1-I2V-14B-480P-Diffusers"
REAL_COGVIDEOX = REAL_CONFIGS / "CogVideoX-5b-I2V"
FAMILIES = {"wan": "Wan2.1-I2V-14B-480P-Diffusers", "wan22": "Wan2.2-I2V-A14B-Diffusers",
            "wan22_ti2v": "Wan2.2-TI2V-5B-Diffusers", "cogvideox": "CogVideoX-5b-I2V",
            "hunyuan_video": "HunyuanVideo-I2V", "ltx": "LTX-Video"}  # family -> real configs
TEXT = """a red ball bouncing on a wooden floor
a car chase through narrow city streets at night
a snowboarder doing a backflip off a jump
a group of people whitewater rafting in a canyon
a helicopter hovering over a rescue site
a man swinging a tennis racquet at a tennis ball
the quick brown fox jumps over the lazy dog 0123456789
waves crash on the rocks while seagulls fly overhead"""


SIZES = {  # width of each component: "tiny" for the demo and tests, "mid" for CPU benchmarks
    "tiny": dict(dim=24, heads=2, layers=2, text=32, clip=32, clip_layers=3, image=28, vae=8),
    "mid": dict(dim=512, heads=8, layers=4, text=256, clip=256, clip_layers=4, image=112, vae=32),
}


def tiny_configs(vocab_size: int, size: str = "tiny", family: str = "wan") -> dict:
    """Small configs of a Wan family ("wan", "wan22", "wan22_ti2v") with the real configs' keys."""
    if family != "wan":
        return tiny_wan22_configs(vocab_size, size, family)
    s = SIZES[size]
    clip = dict(read_json(REAL / "image_encoder" / "config.json"), hidden_size=s["clip"],
                intermediate_size=2 * s["clip"], num_attention_heads=4, num_hidden_layers=s["clip_layers"],
                image_size=s["image"], patch_size=14, projection_dim=16)
    transformer = dict(read_json(REAL / "transformer" / "config.json"), attention_head_dim=s["dim"] // s["heads"],
                       num_attention_heads=s["heads"], num_layers=s["layers"], ffn_dim=2 * s["dim"], freq_dim=32,
                       text_dim=s["text"], image_dim=s["clip"], added_kv_proj_dim=s["dim"])
    text = dict(read_json(REAL / "text_encoder" / "config.json"), vocab_size=vocab_size, d_model=s["text"], d_kv=8,
                d_ff=2 * s["text"], num_heads=4, num_layers=s["layers"], relative_attention_num_buckets=8,
                relative_attention_max_distance=16)
    vae = dict(read_json(REAL / "vae" / "config.json"), base_dim=s["vae"], dim_mult=[1, 2, 2, 2])
    return {"transformer": transformer, "image_encoder": clip, "text_encoder": text, "vae": vae}


def tiny_wan22_configs(vocab_size: int, size: str, family: str) -> dict:
    """Wan 2.2: A14B's two experts (no CLIP) with Wan 2.1's VAE, or TI2V's transformer on the residual VAE."""
    s, real = SIZES[size], REAL_CONFIGS / FAMILIES[family]
    wan21 = tiny_configs(vocab_size, size)
    transformer = dict(read_json(real / "transformer" / "config.json"), **{
        k: wan21["transformer"][k] for k in ("attention_head_dim", "num_attention_heads", "num_layers", "ffn_dim",
                                             "freq_dim", "text_dim")})
    configs = {"transformer": transformer, "text_encoder": wan21["text_encoder"]}
    if family == "wan22":
        return dict(configs, transformer_2=transformer, vae=wan21["vae"])
    vae = dict(read_json(real / "vae" / "config.json"), base_dim=s["vae"], decoder_base_dim=2 * s["vae"],
               dim_mult=[1, 2, 2, 2])
    return dict(configs, vae=vae)


def tiny_cogvideox_configs(vocab_size: int, size: str = "tiny") -> dict:
    """CogVideoX-5b-I2V's configs, shrunk; its fixed size becomes 64 x 96 ("tiny") or 128 x 192 ("mid")."""
    s = SIZES[size]
    side = 8 if size == "tiny" else 16  # latent height; width is 1.5 x
    transformer = dict(read_json(REAL_COGVIDEOX / "transformer" / "config.json"), num_attention_heads=s["heads"],
                       attention_head_dim=max(16, s["dim"] // s["heads"]), text_embed_dim=s["text"],
                       time_embed_dim=16, num_layers=s["layers"], sample_height=side, sample_width=side * 3 // 2,
                       sample_frames=17, max_text_seq_length=16)
    width = s["vae"]
    vae = dict(read_json(REAL_COGVIDEOX / "vae" / "config.json"), block_out_channels=[width, 2 * width, 2 * width,
               2 * width], norm_num_groups=4, layers_per_block=1, sample_height=8 * side, sample_width=12 * side)
    text = dict(read_json(REAL_COGVIDEOX / "text_encoder" / "config.json"), vocab_size=vocab_size, d_model=s["text"],
                d_kv=8, d_ff=2 * s["text"], num_heads=4, num_layers=s["layers"], relative_attention_num_buckets=8,
                relative_attention_max_distance=16)
    return {"transformer": transformer, "text_encoder": text, "vae": vae}


def tiny_ltx_configs(vocab_size: int, size: str = "tiny") -> dict:
    """LTX-Video 0.9.0's configs (the hub folder), shrunk: 8 latent channels, the VAE's four levels kept (x32)."""
    s, real = SIZES[size], REAL_CONFIGS / "LTX-Video"
    transformer = dict(read_json(real / "transformer" / "config.json"), in_channels=8, out_channels=8,
                       num_attention_heads=s["heads"], attention_head_dim=s["dim"] // s["heads"],
                       cross_attention_dim=s["dim"], num_layers=s["layers"], caption_channels=s["text"])
    width = s["vae"]
    vae = dict(read_json(real / "vae" / "config.json"), latent_channels=8, layers_per_block=[1] * 5,
               block_out_channels=[width, 2 * width, 2 * width, 2 * width])
    text = dict(read_json(real / "text_encoder" / "config.json"), vocab_size=vocab_size, d_model=s["text"], d_kv=8,
                d_ff=2 * s["text"], num_heads=4, num_layers=s["layers"], relative_attention_num_buckets=8,
                relative_attention_max_distance=16)
    return {"transformer": transformer, "text_encoder": text, "vae": vae}


def tiny_hunyuan_configs(ids: dict, size: str = "tiny") -> dict:
    """HunyuanVideo-I2V's configs, shrunk; `ids`: the tiny tokenizers' sizes and special ids (write_bpe_tokenizers)."""
    s, real = SIZES[size], REAL_CONFIGS / FAMILIES["hunyuan_video"]
    head = s["dim"] // s["heads"]
    axes = [head // 3 // 2 * 2, head // 3 // 2 * 2]
    transformer = dict(read_json(real / "transformer" / "config.json"), num_attention_heads=s["heads"],
                       attention_head_dim=head, rope_axes_dim=[head - sum(axes), *axes], num_layers=s["layers"],
                       num_single_layers=s["layers"], num_refiner_layers=1, text_embed_dim=s["text"],
                       pooled_projection_dim=s["clip"])
    vae = dict(read_json(real / "vae" / "config.json"), block_out_channels=[s["vae"]] + [2 * s["vae"]] * 3,
               norm_num_groups=4, layers_per_block=1)
    llava = read_json(real / "text_encoder" / "config.json")
    llava.update(image_token_index=ids["<image>"], pad_token_id=ids["<pad>"], text_config=dict(
        llava["text_config"], vocab_size=ids["vocab"], hidden_size=s["text"], intermediate_size=2 * s["text"],
        num_hidden_layers=s["layers"] + 2, num_attention_heads=4, num_key_value_heads=2, bos_token_id=ids["bos"],
        eos_token_id=ids["eos"]), vision_config=dict(
        llava["vision_config"], hidden_size=s["clip"], intermediate_size=2 * s["clip"], num_attention_heads=4,
        num_hidden_layers=s["clip_layers"], image_size=s["image"], patch_size=s["image"] // 4, projection_dim=16))
    clip = dict(read_json(real / "text_encoder_2" / "config.json"), vocab_size=ids["clip_vocab"],
                hidden_size=s["clip"], intermediate_size=2 * s["clip"], num_attention_heads=4, num_hidden_layers=2,
                projection_dim=16)
    return {"transformer": transformer, "vae": vae, "text_encoder": llava, "text_encoder_2": clip}


LLAMA_SPECIALS = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>",
                  "<image>", "<pad>"]
LLAMA_MERGES = ["Ġ t", "h e", "Ġt he", "Ġ a", "Ġ o", "Ġo f", "i n", "e r", "o n", "e s", "a t", "Ċ Ċ"]
CLIP_MERGES = ["t h", "th e</w>", "i n", "r e", "o n</w>", "e r", "a n", "a t</w>"]


def write_bpe_tokenizers(folder: Path) -> dict:
    """HunyuanVideo-I2V's two tokenizers in their published files, written by hand: tokenizer/ (a Llama-3 style
    tokenizer.json: the byte symbols, a few merges, the chat template's special tokens) and tokenizer_2/ (CLIP's
    vocab.json + merges.txt). Returns the sizes and ids the tiny text encoders need."""
    vocab = {c: i for i, c in enumerate(BYTE_CHARS)} | {m.replace(" ", ""): 256 + i for i, m in enumerate(LLAMA_MERGES)}
    ids = {token: len(vocab) + i for i, token in enumerate(LLAMA_SPECIALS)}
    bos = {"SpecialToken": {"id": "<|begin_of_text|>", "type_id": 0}}
    spec = {
        "version": "1.0", "truncation": None, "padding": None, "normalizer": None,
        "added_tokens": [{"id": i, "content": t, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": False, "special": True} for t, i in ids.items()],
        "pre_tokenizer": {"type": "Sequence", "pretokenizers": [
            {"type": "Split", "pattern": {"Regex": LLAMA3_PATTERN}, "behavior": "Isolated", "invert": False},
            {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": False}]},
        "post_processor": {"type": "TemplateProcessing", "single": [bos, {"Sequence": {"id": "A", "type_id": 0}}],
                           "pair": [bos, {"Sequence": {"id": "A", "type_id": 0}}, bos,
                                    {"Sequence": {"id": "B", "type_id": 1}}],
                           "special_tokens": {"<|begin_of_text|>": {"id": "<|begin_of_text|>",
                                                                    "ids": [ids["<|begin_of_text|>"]],
                                                                    "tokens": ["<|begin_of_text|>"]}}},
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": True,
                  "vocab": vocab, "merges": LLAMA_MERGES}}
    real = REAL_CONFIGS / FAMILIES["hunyuan_video"]
    for sub in ("tokenizer", "tokenizer_2"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    (folder / "tokenizer" / "tokenizer.json").write_text(json.dumps(spec, ensure_ascii=False))
    (folder / "tokenizer" / "tokenizer_config.json").write_text((real / "tokenizer" / "tokenizer_config.json").read_text())

    clip = {c: i for i, c in enumerate(BYTE_CHARS + [c + "</w>" for c in BYTE_CHARS])}
    clip |= {m.replace(" ", ""): 512 + i for i, m in enumerate(CLIP_MERGES)}
    start, end = len(clip), len(clip) + 1  # the end-of-text token has the largest id, as CLIP's
    clip |= {"<|startoftext|>": start, "<|endoftext|>": end}
    (folder / "tokenizer_2" / "vocab.json").write_text(json.dumps(clip, ensure_ascii=False))
    (folder / "tokenizer_2" / "merges.txt").write_text("#version: 0.2\n" + "\n".join(CLIP_MERGES) + "\n")
    config = read_json(real / "tokenizer_2" / "tokenizer_config.json")
    config["added_tokens_decoder"] = dict(zip((str(start), str(end)), config["added_tokens_decoder"].values()))
    (folder / "tokenizer_2" / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return {"vocab": len(vocab) + len(ids), "clip_vocab": len(clip), "<image>": ids["<image>"], "<pad>": ids["<pad>"],
            "bos": ids["<|begin_of_text|>"], "eos": ids["<|end_of_text|>"]}


def published(sub: str, module: torch.nn.Module, config: dict, generator: torch.Generator) -> dict:
    """A module's tensors under the published files' names, with the tensors minialg never reads (CLIP's
    projection, LLaVA's unread last layers, final norm and lm_head) filled in at random."""
    tensors = {name: t.contiguous() for name, t in module.state_dict().items()}
    if sub == "image_encoder":  # a prefix, and a projection we never use
        tensors = {f"vision_model.{name}": t for name, t in tensors.items()}
        tensors["visual_projection.weight"] = torch.randn(config["projection_dim"], config["hidden_size"],
                                                          generator=generator)
    if sub == "text_encoder_2":
        tensors = {f"text_model.{name}": t for name, t in tensors.items()}
    if sub == "text_encoder" and "vision_tower.embeddings.class_embedding" in tensors:  # LLaVA (transformers 4 names)
        text = module.config.text_config
        for k in range(len(module.language_model.layers), text.num_hidden_layers):
            layer = DecoderLayer(text)
            randomize(layer, generator)
            tensors |= {f"language_model.layers.{k}.{n}": t for n, t in layer.state_dict().items()}
        tensors["language_model.norm.weight"] = torch.ones(text.hidden_size)
        tensors = {name.replace("language_model.", "language_model.model.", 1).replace(
            "vision_tower.", "vision_tower.vision_model.", 1): t for name, t in tensors.items()}
        tensors["language_model.lm_head.weight"] = torch.randn(text.vocab_size, text.hidden_size, generator=generator)
    return tensors


def randomize(module: torch.nn.Module, generator: torch.Generator) -> None:
    """Finite random weights: scaled normal matrices, unit norm weights, small vectors."""
    for name, p in module.named_parameters():
        if p.ndim >= 2:
            fan_in = p[0].numel()
            p.data = torch.randn(p.shape, generator=generator) / fan_in ** 0.5
        elif "norm" in name and name.endswith("weight"):
            p.data = torch.ones(p.shape)
        else:
            p.data = torch.randn(p.shape, generator=generator) * 0.02


def train_tokenizer(path: Path) -> int:
    """A small sentencepiece model in T5's conventions (pad 0, eos 1, unk 2, no bos); returns its size."""
    import sentencepiece as spm

    model = io.BytesIO()
    spm.SentencePieceTrainer.train(sentence_iterator=iter(TEXT.splitlines() * 4), model_writer=model,
                                   vocab_size=96, model_type="unigram", pad_id=0, eos_id=1, unk_id=2,
                                   bos_id=-1, minloglevel=2)
    path.write_bytes(model.getvalue())
    return 96


def write_tiny(folder: Path, family: str = "wan", seed: int = 0, size: str = "tiny") -> Path:
    """Write a tiny checkpoint of `family` (a key of FAMILIES) into `folder` (created); returns it."""
    folder, real = Path(folder), REAL_CONFIGS / FAMILIES[family]
    if family == "hunyuan_video":
        configs = tiny_hunyuan_configs(write_bpe_tokenizers(folder), size)
    else:
        (folder / "tokenizer").mkdir(parents=True, exist_ok=True)
        vocab_size = train_tokenizer(folder / "tokenizer" / "spiece.model")
        configs = tiny_cogvideox_configs(vocab_size, size) if family == "cogvideox" else \
            tiny_ltx_configs(vocab_size, size) if family == "ltx" else tiny_configs(vocab_size, size, family)
    (folder / "model_index.json").write_text((real / "model_index.json").read_text())
    for sub, config in configs.items():
        (folder / sub).mkdir(exist_ok=True)
        (folder / sub / "config.json").write_text(json.dumps(config, indent=2))
    for sub in ("scheduler", "image_processor"):
        if (real / sub).is_dir():
            (folder / sub).mkdir(exist_ok=True)
            for file in (real / sub).iterdir():
                (folder / sub / file.name).write_text(file.read_text())
    if (folder / "image_processor").is_dir():
        processor = read_json(folder / "image_processor" / "preprocessor_config.json")
        side = SIZES[size]["image"]
        processor.update(size={"shortest_edge": side}, crop_size={"height": side, "width": side})
        (folder / "image_processor" / "preprocessor_config.json").write_text(json.dumps(processor, indent=2))
    generator = torch.Generator().manual_seed(seed)
    for sub, (model_cls, config_cls) in pipeline_class(folder).components_of(folder).items():
        config = configs[sub]
        module = model_cls(config_from(config_cls, config))
        randomize(module, generator)
        tensors = published(sub, module, config, generator)
        stem = "model" if sub.startswith(("text_encoder", "image_encoder")) else "diffusion_pytorch_model"
        save_file(tensors, str(folder / sub / f"{stem}.safetensors"))
    return folder


def demo_image(height: int = 40, width: int = 56) -> torch.Tensor:
    """A smooth colour test image: (H, W, 3) uint8."""
    y = torch.linspace(0, 1, height)[:, None].expand(height, width)
    x = torch.linspace(0, 1, width)[None, :].expand(height, width)
    disc = (((x - 0.4) ** 2 + (y - 0.5) ** 2) < 0.06).float()
    rgb = torch.stack([0.8 * disc + 0.2 * x, 0.3 * y, 0.6 * (1 - disc) * (1 - x)], dim=-1)
    return (rgb * 255).round().to(torch.uint8)
