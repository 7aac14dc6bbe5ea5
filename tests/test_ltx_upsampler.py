"""minialg's LTX-Video latent upsampler against diffusers' LTXLatentUpsamplerModel and LTXLatentUpsamplePipeline
(tiny random models, float32 CPU)."""

import dataclasses
import inspect
import json
import shutil
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLLTXVideo, LTXLatentUpsamplePipeline
from diffusers.pipelines.ltx.modeling_latent_upsampler import LTXLatentUpsamplerModel
from test_real_layout import write_sparse

from minialg import checkpoint
from minialg.models.ltx_upsampler import (LTXLatentUpsampler, LTXLatentUpsamplerConfig, adain_filter_latent,
                                          tone_map_latents, upsample)

REAL_CONFIG = (Path(__file__).resolve().parent.parent / "minialg" / "real_configs" / "LTX-Video-later"
               / "latent_upsampler_0.9.7_config_DERIVED.json")
CHANNELS = 8  # latent channels of the tiny models (128 in LTX)
# (dims, spatial, temporal): the published layout first, then every other variant diffusers builds
VARIANTS = [(3, True, False), (3, False, True), (3, True, True), (2, True, False)]


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def tiny_reference(dims: int, spatial: bool, temporal: bool, seed: int = 0) -> LTXLatentUpsamplerModel:
    """64 mid channels (2 per norm group), 2 blocks per stage, every weight random (norms around 1)."""
    torch.manual_seed(seed)
    ref = LTXLatentUpsamplerModel(in_channels=CHANNELS, mid_channels=64, num_blocks_per_stage=2, dims=dims,
                                  spatial_upsample=spatial, temporal_upsample=temporal).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.3 * torch.randn_like(p))
            else:
                p.add_(torch.randn_like(p) * 0.02)
    return ref


def saved_and_loaded(ref: LTXLatentUpsamplerModel, folder: Path) -> LTXLatentUpsampler:
    ref.save_pretrained(folder)
    return checkpoint.load(LTXLatentUpsampler, LTXLatentUpsamplerConfig, folder)


def random_latents(*shape: int, seed: int) -> torch.Tensor:
    """Per-channel offsets and spreads, as VAE latents have."""
    g = torch.Generator().manual_seed(seed)
    c = shape[1]
    spread = torch.rand(c, generator=g).view(1, c, 1, 1, 1) * 2 + 0.2
    offset = torch.randn(c, generator=g).view(1, c, 1, 1, 1)
    return torch.randn(*shape, generator=g) * spread + offset


def test_defaults_are_diffusers_and_the_real_config():
    signature = inspect.signature(LTXLatentUpsamplerModel.__init__).parameters
    ours = dataclasses.asdict(LTXLatentUpsamplerConfig())
    assert ours == {name: signature[name].default for name in ours}
    assert set(signature) - {"self"} == set(ours)
    real = json.loads(REAL_CONFIG.read_text())
    assert {k: v for k, v in real.items() if not k.startswith("_")} == ours
    assert real["_class_name"] == LTXLatentUpsamplerModel.__name__


def test_real_config_layout(tmp_path):
    """The real config on meta: diffusers' tensor names and shapes exactly, checked by the loader's header plan."""
    kwargs = {k: v for k, v in json.loads(REAL_CONFIG.read_text()).items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = LTXLatentUpsamplerModel(**kwargs)
    expected = {name: tuple(t.shape) for name, t in ref.state_dict().items()}
    shutil.copy(REAL_CONFIG, tmp_path / "config.json")
    write_sparse(tmp_path / "diffusion_pytorch_model.safetensors",
                 {name: (shape, torch.float32) for name, shape in expected.items()})
    ours = checkpoint.build(LTXLatentUpsampler, LTXLatentUpsamplerConfig, tmp_path)
    assert next(ours.parameters()).is_meta
    assert {name: tuple(t.shape) for name, t in ours.state_dict().items()} == expected
    assert expected["upsampler.0.weight"] == (2048, 512, 3, 3) and len(expected) == 72
    planned = checkpoint.plan(ours, tmp_path)
    assert sorted(n for names in planned.values() for n, _ in names) == sorted(expected)


@pytest.mark.parametrize("dims,spatial,temporal", VARIANTS)
def test_model(tmp_path, dims, spatial, temporal):
    ref = tiny_reference(dims, spatial, temporal)
    ours = saved_and_loaded(ref, tmp_path)
    x = random_latents(2, CHANNELS, 3, 4, 6, seed=1)
    with torch.no_grad():
        expected, out = ref(x), ours(x)
    frames, scale = (5 if temporal else 3), (2 if spatial else 1)
    assert out.shape == expected.shape == (2, CHANNELS, frames, 4 * scale, 6 * scale)
    assert expected.abs().max() > 0.1
    assert rel_err(out, expected) <= 1e-6


def test_the_variants_diffusers_rejects_are_rejected():
    for dims, spatial, temporal in [(3, False, False), (2, False, False)]:
        with pytest.raises(ValueError):
            LTXLatentUpsamplerModel(in_channels=CHANNELS, mid_channels=32, dims=dims, spatial_upsample=spatial,
                                    temporal_upsample=temporal)
        with pytest.raises(ValueError):
            LTXLatentUpsampler(LTXLatentUpsamplerConfig(in_channels=CHANNELS, mid_channels=32, dims=dims,
                                                        spatial_upsample=spatial, temporal_upsample=temporal))
    # diffusers builds dims=2 with a temporal upsampler, whose 3D conv then fails on the frames; ours refuses it
    with pytest.raises(ValueError):
        LTXLatentUpsampler(LTXLatentUpsamplerConfig(in_channels=CHANNELS, mid_channels=32, dims=2,
                                                    temporal_upsample=True))


def tiny_vae(seed: int) -> AutoencoderKLLTXVideo:
    """Only its latent statistics (random here) and scaling factor take part in the latent path."""
    torch.manual_seed(seed)
    vae = AutoencoderKLLTXVideo(latent_channels=CHANNELS, block_out_channels=(8,) * 4,
                                decoder_block_out_channels=(8,) * 4, layers_per_block=(1,) * 5,
                                decoder_layers_per_block=(1,) * 5, scaling_factor=0.8).eval()
    with torch.no_grad():
        vae.latents_mean.copy_(torch.randn(CHANNELS))
        vae.latents_std.copy_(torch.rand(CHANNELS) * 2 + 0.3)
    return vae


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    """(diffusers' LTXLatentUpsamplePipeline on a tiny VAE with random latent statistics, our loaded model)."""
    ref = tiny_reference(3, True, False, seed=2)
    vae = tiny_vae(seed=3)
    ours = saved_and_loaded(ref, tmp_path_factory.mktemp("upsampler"))
    return LTXLatentUpsamplePipeline(vae=vae, latent_upsampler=ref), ours


@pytest.mark.parametrize("factor", [0.0, 0.25, 0.5, 1.0, 1.7, -0.5])
def test_adain(pipeline, factor):
    pipe, _ = pipeline
    latents = random_latents(2, CHANNELS, 3, 8, 12, seed=4)
    reference = random_latents(2, CHANNELS, 3, 4, 6, seed=5)
    expected = pipe.adain_filter_latent(latents, reference, factor)
    out = adain_filter_latent(latents, reference, factor)
    assert rel_err(out, expected) <= 1e-6
    if factor == 1.0:  # the statistics of the reference, per sample and channel (unbiased std)
        assert torch.allclose(out.mean(dim=(2, 3, 4)), reference.mean(dim=(2, 3, 4)), atol=1e-5)
        assert torch.allclose(out.std(dim=(2, 3, 4)), reference.std(dim=(2, 3, 4)), atol=1e-5)
    elif factor != 0.0:
        assert rel_err(out, latents) > 1e-2


@pytest.mark.parametrize("compression", [0.0, 0.3, 0.6, 1.0])
def test_tone_map(pipeline, compression):
    pipe, _ = pipeline
    latents = random_latents(2, CHANNELS, 3, 8, 12, seed=6) * 2
    expected = pipe.tone_map_latents(latents, compression)
    out = tone_map_latents(latents, compression)
    assert rel_err(out, expected) <= 1e-6
    assert (compression == 0.0) == torch.equal(out, latents)


@pytest.mark.parametrize("adain_factor", [0.0, 1.0, 0.5, -0.5])  # the pipeline skips AdaIN unless > 0
@pytest.mark.parametrize("tone_map", [0.0, 0.6])
def test_latent_path(pipeline, adain_factor, tone_map):
    """Normalised latents in, normalised upsampled latents out: the pipeline with latents= and output_type latent."""
    pipe, ours = pipeline
    latents = random_latents(2, CHANNELS, 3, 4, 6, seed=7)
    expected = pipe(latents=latents, adain_factor=adain_factor, tone_map_compression_ratio=tone_map,
                    output_type="latent", return_dict=False)[0]
    vae = pipe.vae
    out = upsample(ours, latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor,
                   adain_factor=adain_factor, tone_map_compression_ratio=tone_map)
    assert out.shape == expected.shape == (2, CHANNELS, 3, 8, 12) and out.dtype == torch.float32
    assert rel_err(out, expected) <= 1e-6
    plain = upsample(ours, latents, vae.latents_mean, vae.latents_std, vae.config.scaling_factor)
    assert (adain_factor <= 0.0 and tone_map == 0.0) == (rel_err(out, plain) < 1e-3)


@pytest.mark.parametrize("adain_factor,tone_map", [(0.0, 0.0), (1.0, 0.6)])
def test_latent_path_bf16(tmp_path, adain_factor, tone_map):
    """A bfloat16 model: the casts where the pipeline has them (float32 in, the model's dtype from the
    upsampler on, normalisation included)."""
    tiny_reference(3, True, False, seed=8).save_pretrained(tmp_path)
    ours = checkpoint.load(LTXLatentUpsampler, LTXLatentUpsamplerConfig, tmp_path, dtype=torch.bfloat16)
    ref = LTXLatentUpsamplerModel.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    pipe = LTXLatentUpsamplePipeline(vae=tiny_vae(seed=9), latent_upsampler=ref)
    latents = random_latents(1, CHANNELS, 2, 4, 6, seed=9)
    expected = pipe(latents=latents, adain_factor=adain_factor, tone_map_compression_ratio=tone_map,
                    output_type="latent", return_dict=False)[0]
    out = upsample(ours, latents, pipe.vae.latents_mean, pipe.vae.latents_std, pipe.vae.config.scaling_factor,
                   adain_factor=adain_factor, tone_map_compression_ratio=tone_map)
    assert out.dtype == expected.dtype == torch.bfloat16
    assert rel_err(out, expected) <= 1e-6  # measured bit-identical; one bfloat16 step is 4e-3


def test_tone_map_ratio_is_checked(pipeline):
    _, ours = pipeline
    latents = torch.zeros(1, CHANNELS, 1, 2, 2)
    for ratio in (-0.1, 1.5):
        with pytest.raises(ValueError):
            upsample(ours, latents, torch.zeros(CHANNELS), torch.ones(CHANNELS), tone_map_compression_ratio=ratio)
