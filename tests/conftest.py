"""Shared fixtures: tiny random checkpoints saved by diffusers/transformers in the real on-disk layout."""

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from minialg.demo import FAMILIES, tiny_configs, train_tokenizer

REAL_CONFIGS = Path(__file__).resolve().parent.parent / "minialg" / "real_configs"


def _strip(config: dict) -> dict:
    return {k: v for k, v in config.items() if not k.startswith("_") and k not in ("architectures", "model_type")}


def save_tiny_wan(folder: Path, family: str = "wan") -> Path:
    """A tiny Wan checkpoint saved by diffusers (save_pretrained): the oracle's own layout. "wan": a Wan 2.1
    WanImageToVideoPipeline; "wan22": Wan 2.2 A14B (two experts, boundary_ratio 0.9, no CLIP); "wan22_ti2v": Wan
    2.2 TI2V-5B, published as a WanPipeline with expand_timesteps (48-channel residual VAE)."""
    from diffusers import (AutoencoderKLWan, UniPCMultistepScheduler, WanImageToVideoPipeline, WanPipeline,
                           WanTransformer3DModel)
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, CLIPVisionModelWithProjection, T5Tokenizer,
                              UMT5Config, UMT5EncoderModel)

    real = REAL_CONFIGS / FAMILIES[family]
    (folder / "spm").mkdir(parents=True)
    spiece = folder / "spm" / "spiece.model"
    vocab_size = train_tokenizer(spiece)
    tokenizer = T5Tokenizer.from_pretrained(folder / "spm", extra_ids=0)
    configs = tiny_configs(vocab_size, family=family)
    torch.manual_seed(0)
    models = dict(transformer=WanTransformer3DModel(**_strip(configs["transformer"])),
                  vae=AutoencoderKLWan(**_strip(configs["vae"])),
                  text_encoder=UMT5EncoderModel(UMT5Config(**_strip(configs["text_encoder"]))))
    if family == "wan":
        models["image_encoder"] = CLIPVisionModelWithProjection(CLIPVisionConfig(**_strip(configs["image_encoder"])))
    if family == "wan22":
        models["transformer_2"] = WanTransformer3DModel(**_strip(configs["transformer_2"]))
    for model in models.values():  # default inits leave some weights at zero
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    with torch.no_grad():
        for name in ("transformer", "transformer_2"):  # denoisers that react visibly to their image condition
            if name in models:
                models[name].patch_embedding.weight.mul_(4)
        if family == "wan22_ti2v":  # the image is frame 0 only: stronger attention carries it to the other frames
            for name, p in models["transformer"].named_parameters():
                if ".to_out." in name and name.endswith("weight"):
                    p.mul_(16)
    scheduler = UniPCMultistepScheduler.from_config(json.loads((real / "scheduler/scheduler_config.json").read_text()))
    if family == "wan":
        processor = json.loads((real / "image_processor/preprocessor_config.json").read_text())
        processor.update(size={"shortest_edge": 28}, crop_size={"height": 28, "width": 28})
        processor.pop("image_processor_type")
        pipe = WanImageToVideoPipeline(tokenizer=tokenizer, image_processor=CLIPImageProcessor(**processor),
                                       scheduler=scheduler, **models)
    elif family == "wan22":
        pipe = WanImageToVideoPipeline(tokenizer=tokenizer, scheduler=scheduler, boundary_ratio=0.9, **models)
    else:
        pipe = WanPipeline(tokenizer=tokenizer, scheduler=scheduler, expand_timesteps=True, **models)
    pipe.save_pretrained(folder / "ckpt")
    shutil.copy(spiece, folder / "ckpt" / "tokenizer" / "spiece.model")  # transformers 5 saves tokenizer.json only
    return folder / "ckpt"


@pytest.fixture(scope="session")
def tiny_wan(tmp_path_factory) -> Path:
    return save_tiny_wan(tmp_path_factory.mktemp("tiny-wan"))


@pytest.fixture(scope="session")
def test_image() -> np.ndarray:
    """A 40 x 60 RGB uint8 image with structure at every scale (so low-pass filtering changes it)."""
    rng = np.random.default_rng(0)
    y, x = np.mgrid[0:40, 0:60] / 40.0
    smooth = np.stack([np.sin(3 * x + 1), np.cos(2 * y), np.sin(2 * x + 3 * y)], axis=-1) * 0.35 + 0.5
    image = smooth + rng.normal(0, 0.08, smooth.shape)
    return (np.clip(image, 0, 1) * 255).round().astype(np.uint8)


def save_tiny_cogvideox(folder: Path, version: str) -> Path:
    """A tiny CogVideoXImageToVideoPipeline saved by diffusers: "1.0" (5b-I2V: learned positions + RoPE) or "1.5"
    (temporal patches, ofs embedding, inverted latent scale)."""
    from diffusers import (AutoencoderKLCogVideoX, CogVideoXDDIMScheduler, CogVideoXImageToVideoPipeline,
                           CogVideoXTransformer3DModel)
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    real = REAL_CONFIGS / "CogVideoX-5b-I2V"
    (folder / "spm").mkdir(parents=True)
    spiece = folder / "spm" / "spiece.model"
    vocab_size = train_tokenizer(spiece)
    tokenizer = T5Tokenizer.from_pretrained(folder / "spm", extra_ids=0)
    config = dict(_strip(json.loads((real / "transformer/config.json").read_text())), num_attention_heads=2,
                  attention_head_dim=16, text_embed_dim=32, time_embed_dim=16, num_layers=2, sample_height=4,
                  sample_width=6, sample_frames=9, max_text_seq_length=16)
    vae_config = dict(_strip(json.loads((real / "vae/config.json").read_text())), block_out_channels=[8, 16, 16, 16],
                      norm_num_groups=4, layers_per_block=1, sample_height=32, sample_width=48)
    if version == "1.5":
        config.update(patch_size_t=2, ofs_embed_dim=16, use_learned_positional_embeddings=False, patch_bias=False)
        vae_config.update(invert_scale_latents=True)
    torch.manual_seed(1)
    transformer = CogVideoXTransformer3DModel(**config)
    vae = AutoencoderKLCogVideoX(**vae_config)
    text_encoder = T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=32, d_kv=8, d_ff=64, num_heads=4,
                                           num_layers=2, relative_attention_num_buckets=8,
                                           relative_attention_max_distance=16, feed_forward_proj="gated-gelu"))
    for model in (transformer, vae, text_encoder):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
    scheduler = CogVideoXDDIMScheduler.from_config(json.loads((real / "scheduler/scheduler_config.json").read_text()))
    pipe = CogVideoXImageToVideoPipeline(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae,
                                         transformer=transformer, scheduler=scheduler)
    pipe.save_pretrained(folder / "ckpt")
    shutil.copy(spiece, folder / "ckpt" / "tokenizer" / "spiece.model")
    return folder / "ckpt"


@pytest.fixture(scope="session")
def tiny_cogvideox(tmp_path_factory) -> Path:
    return save_tiny_cogvideox(tmp_path_factory.mktemp("tiny-cogvideox"), "1.0")


@pytest.fixture(scope="session")
def tiny_cogvideox15(tmp_path_factory) -> Path:
    return save_tiny_cogvideox(tmp_path_factory.mktemp("tiny-cogvideox15"), "1.5")


LTX_VAES = {  # version -> (real VAE config, tiny overrides keeping every block kind of that generation; channels
    # double per level as in the real ones: diffusers' decoder breaks on a timestep-conditioned level that does not)
    "0.9.0": ("LTX-Video/vae/config.json", dict(block_out_channels=[8, 16, 16, 16], layers_per_block=[1, 1, 1, 1, 1],
                                                scaling_factor=0.9)),  # the pipelines use it one way only
    "0.9.1": ("LTX-Video-later/vae_0.9.1_config.json",
              dict(block_out_channels=[8, 16, 16, 16], layers_per_block=[1, 1, 1, 1, 1],
                   decoder_block_out_channels=[8, 16, 32], decoder_layers_per_block=[1, 1, 1, 1],
                   decoder_inject_noise=[False, False, False, False])),  # diffusers draws it from the global RNG
    "0.9.1-noise": ("LTX-Video-later/vae_0.9.1_config.json",  # as published: noise injected in three levels
                    dict(block_out_channels=[8, 16, 16, 16], layers_per_block=[1, 1, 1, 1, 1],
                         decoder_block_out_channels=[8, 16, 32], decoder_layers_per_block=[1, 1, 1, 1])),
    "0.9.5": ("LTX-Video-later/vae_0.9.5-0.9.8_config.json",
              dict(block_out_channels=[4, 8, 16, 32, 64], layers_per_block=[1, 1, 1, 1, 1],
                   decoder_block_out_channels=[8, 16, 32], decoder_layers_per_block=[1, 1, 1, 1])),
}


def save_tiny_ltx(folder: Path, version: str) -> Path:
    """A tiny LTX-Video checkpoint saved by diffusers: "0.9.0" (the hub folder's LTXPipeline), "0.9.1" (its
    timestep-conditioned VAE) or "0.9.5" (LTXConditionPipeline, the 0.9.5 VAE blocks)."""
    from diffusers import (AutoencoderKLLTXVideo, FlowMatchEulerDiscreteScheduler, LTXConditionPipeline,
                           LTXPipeline, LTXVideoTransformer3DModel)
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    (folder / "spm").mkdir(parents=True)
    spiece = folder / "spm" / "spiece.model"
    vocab_size = train_tokenizer(spiece)
    tokenizer = T5Tokenizer.from_pretrained(folder / "spm", extra_ids=0)
    real = REAL_CONFIGS / "LTX-Video"
    config = dict(_strip(json.loads((real / "transformer/config.json").read_text())), in_channels=8, out_channels=8,
                  num_attention_heads=2, attention_head_dim=8, cross_attention_dim=16, num_layers=2,
                  caption_channels=16)
    vae_file, vae_tiny = LTX_VAES[version]
    vae_config = dict(_strip(json.loads((REAL_CONFIGS / vae_file).read_text())), latent_channels=8, **vae_tiny)
    torch.manual_seed(2)
    transformer = LTXVideoTransformer3DModel(**config)
    vae = AutoencoderKLLTXVideo(**vae_config)
    text_encoder = T5EncoderModel(T5Config(vocab_size=vocab_size, d_model=16, d_kv=8, d_ff=32, num_heads=2,
                                           num_layers=2, relative_attention_num_buckets=8,
                                           relative_attention_max_distance=16, feed_forward_proj="gated-gelu"))
    with torch.no_grad():
        for model in (transformer, vae, text_encoder):
            for p in model.parameters():
                p.add_(torch.randn_like(p) * 0.05)
        vae.latents_mean.copy_(torch.randn(8) * 0.2)  # normalized latents differ from raw ones
        vae.latents_std.copy_(torch.rand(8) + 0.5)
    scheduler_file = "LTX-Video-later/scheduler_0.9.5+_config_DERIVED.json" if version == "0.9.5" else \
        "LTX-Video/scheduler/scheduler_config.json"
    scheduler = FlowMatchEulerDiscreteScheduler.from_config(json.loads((REAL_CONFIGS / scheduler_file).read_text()))
    cls = LTXConditionPipeline if version == "0.9.5" else LTXPipeline
    cls(tokenizer=tokenizer, text_encoder=text_encoder, vae=vae, transformer=transformer,
        scheduler=scheduler).save_pretrained(folder / "ckpt")
    shutil.copy(spiece, folder / "ckpt" / "tokenizer" / "spiece.model")
    return folder / "ckpt"


@pytest.fixture(scope="session", params=["0.9.0", "0.9.1", "0.9.5"])
def tiny_ltx(request, tmp_path_factory) -> Path:
    return save_tiny_ltx(tmp_path_factory.mktemp(f"ltx{request.param}"), request.param)


def save_tiny_ltx_upsampler(folder: Path) -> Path:
    """A tiny LTXLatentUpsamplePipeline folder as the hub's Lightricks/ltxv-spatial-upscaler-0.9.7: model_index.json
    and latent_upsampler/ (the VAE comes from the video checkpoint)."""
    from diffusers.pipelines.ltx.modeling_latent_upsampler import LTXLatentUpsamplerModel

    torch.manual_seed(3)
    model = LTXLatentUpsamplerModel(in_channels=8, mid_channels=32, num_blocks_per_stage=1)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    model.save_pretrained(folder / "latent_upsampler")
    (folder / "model_index.json").write_text(json.dumps({
        "_class_name": "LTXLatentUpsamplePipeline", "latent_upsampler": ["diffusers", "LTXLatentUpsamplerModel"],
        "vae": [None, None]}))
    return folder
