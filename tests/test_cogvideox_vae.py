"""minialg's CogVideoX VAE against diffusers' AutoencoderKLCogVideoX (tiny random models, float32, CPU)."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLCogVideoX

from minialg import checkpoint
from minialg.models import cogvideox_vae
from minialg.models.cogvideox_vae import CogVideoXVAE, CogVideoXVAEConfig
from minialg.models.wan_vae import sample_posterior
from minialg.checkpoint import config_from

REAL_CONFIG = Path(__file__).resolve().parent.parent / "minialg" / "real_configs" / "CogVideoX-5b-I2V" / "vae"

TINY_CONFIGS = {
    # the real layout (4 levels, 4x temporal compression, 16 latent channels), narrow, 1 resnet per block
    "latent16": dict(block_out_channels=[8, 16, 16, 16], norm_num_groups=4, layers_per_block=1, latent_channels=16),
    # 4 latent channels, 2 resnets per block, a shortcut conv at every level change
    "latent4": dict(block_out_channels=[4, 8, 8, 12], norm_num_groups=2, layers_per_block=2, latent_channels=4),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def reference(**kwargs) -> AutoencoderKLCogVideoX:
    """A random diffusers VAE with the real config's other settings; all weights (norms too) perturbed."""
    config = json.loads((REAL_CONFIG / "config.json").read_text())
    config = {k: v for k, v in config.items() if not k.startswith("_")}
    torch.manual_seed(0)
    ref = AutoencoderKLCogVideoX(**{**config, **kwargs}).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    return ref


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def models(request):
    """(diffusers reference, ours) with the same random weights."""
    ref = reference(**TINY_CONFIGS[request.param])
    ours = CogVideoXVAE(config_from(CogVideoXVAEConfig, dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("frames,latent_frames", [(1, 1), (9, 3), (13, 4), (17, 5)])
def test_encode(models, frames, latent_frames):
    ref, ours = models
    torch.manual_seed(1)
    video = torch.rand(2, 3, frames, 16, 24) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(video).latent_dist
        mean, logvar = ours.encode(video)
    assert mean.shape == logvar.shape == (2, ours.config.latent_channels, latent_frames, 2, 3)
    assert rel_err(mean, posterior.mean) <= 1e-5
    assert rel_err(logvar, posterior.logvar) <= 1e-5


def test_encode_image_sample(models):
    """The I2V pipeline encodes the image as a one-frame video and samples the posterior with a generator."""
    ref, ours = models
    torch.manual_seed(2)
    image = torch.rand(1, 3, 1, 24, 16) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(image).latent_dist.sample(generator=torch.Generator().manual_seed(7))
        z = sample_posterior(*ours.encode(image), torch.Generator().manual_seed(7))
    assert z.shape == expected.shape == (1, ours.config.latent_channels, 1, 3, 2)
    assert rel_err(z, expected) <= 1e-5


@pytest.mark.parametrize("latent_frames,frames", [(1, 1), (2, 8), (3, 9), (4, 16), (13, 49)])
def test_decode(models, latent_frames, frames):
    ref, ours = models
    torch.manual_seed(3)
    z = torch.randn(1, ours.config.latent_channels, latent_frames, 2, 3)
    with torch.no_grad():
        expected = ref.decode(z).sample
        video = ours.decode(z)
        again = ours.decode(z)
    assert video.shape == expected.shape == (1, 3, frames, 16, 24)
    assert rel_err(video, expected) <= 1e-5
    assert torch.equal(video, again)  # no state carried between calls


# (tile size in pixels, tile overlap factors, latent height and width): tiles that add up to the input size, and
# tiles so small that the reference's output is larger than the untiled one (we must match it all the same)
TILINGS = [((48, 40), (1 / 6, 1 / 5), (8, 7)), ((16, 24), (1 / 6, 1 / 5), (3, 5)), ((32, 32), (0.25, 0.5), (6, 7))]


@pytest.mark.parametrize("tile_size,overlap,latent_size", TILINGS)
def test_tiled_decode(tile_size, overlap, latent_size):
    ref = reference(**TINY_CONFIGS["latent4"])
    ours = CogVideoXVAE(config_from(CogVideoXVAEConfig, dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.enable_tiling(tile_size[0], tile_size[1], *overlap)
    torch.manual_seed(4)
    z = torch.randn(1, 4, 3, *latent_size)
    with torch.no_grad():
        expected = ref.decode(z).sample
        video = ours.decode(z, tiled=True, tile_size=tile_size, tile_overlap=overlap)
        untiled = ours.decode(z)
    assert video.shape == expected.shape
    assert rel_err(video, expected) <= 1e-5
    # tiling did happen
    assert video.shape != untiled.shape or rel_err(video, untiled) > 1e-3


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tiled_decode_exact(dtype):
    """Blend extents that are not powers of two (6 pixels), in float32 and bf16: the same bits as diffusers."""
    ref = reference(**TINY_CONFIGS["latent4"]).to(dtype)
    ours = CogVideoXVAE(config_from(CogVideoXVAEConfig, dict(ref.config))).eval().to(dtype)
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.enable_tiling(36, 30, 1 / 6, 1 / 5)
    torch.manual_seed(4)
    z = torch.randn(1, 4, 3, 7, 6, dtype=dtype)
    with torch.no_grad():
        assert torch.equal(ours.decode(z, tiled=True, tile_size=(36, 30)), ref.decode(z).sample)


@pytest.mark.parametrize(
    "tile_size,overlap,video_size", [((48, 40), (1 / 6, 1 / 5), (64, 56)), ((32, 32), (0.25, 0.5), (48, 56))]
)
def test_tiled_encode(tile_size, overlap, video_size):
    ref = reference(**TINY_CONFIGS["latent4"])
    ours = CogVideoXVAE(config_from(CogVideoXVAEConfig, dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    ref.enable_tiling(tile_size[0], tile_size[1], *overlap)
    torch.manual_seed(5)
    video = torch.rand(1, 3, 9, *video_size) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(video).latent_dist
        mean, logvar = ours.encode(video, tiled=True, tile_size=tile_size, tile_overlap=overlap)
        untiled, _ = ours.encode(video)
    assert mean.shape == posterior.mean.shape
    assert rel_err(mean, posterior.mean) <= 1e-5
    assert rel_err(logvar, posterior.logvar) <= 1e-5
    assert mean.shape != untiled.shape or rel_err(mean, untiled) > 1e-3


def test_chunked_convolutions(models, monkeypatch):
    """Large conv inputs are convolved in time slices (with the kernel's overlap): the result must not change."""
    ref, ours = models
    monkeypatch.setattr(cogvideox_vae, "MAX_CONV_ELEMENTS", 40_000)  # 2 to 4 slices of >= 3 frames here
    torch.manual_seed(6)
    z = torch.randn(1, ours.config.latent_channels, 3, 3, 4)
    video = torch.rand(1, 3, 9, 32, 48) * 2 - 1
    with torch.no_grad():
        assert rel_err(ours.decode(z), ref.decode(z).sample) <= 1e-5
        assert rel_err(ours.encode(video)[0], ref.encode(video).latent_dist.mean) <= 1e-5


def test_real_config_state_dict():
    """The real checkpoint's tensor names and shapes, from its config alone (on meta)."""
    config = json.loads((REAL_CONFIG / "config.json").read_text())
    with torch.device("meta"):
        ref = AutoencoderKLCogVideoX(**{k: v for k, v in config.items() if not k.startswith("_")})
        ours = CogVideoXVAE(config_from(CogVideoXVAEConfig, config))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert len(list(ours.buffers())) == 0
    assert ours.config.scaling_factor == 0.7 and ours.config.invert_scale_latents is False


def test_checkpoint_loader(tmp_path):
    """A VAE saved by diffusers loads through minialg's generic loader and decodes the same."""
    ref = reference(**TINY_CONFIGS["latent4"])
    ref.save_pretrained(tmp_path)
    ours = checkpoint.load(CogVideoXVAE, CogVideoXVAEConfig, tmp_path)
    torch.manual_seed(7)
    z = torch.randn(1, 4, 2, 3, 4)
    with torch.no_grad():
        assert rel_err(ours.decode(z), ref.decode(z).sample) <= 1e-5
