"""minialg's Wan 2.1 VAE against diffusers' AutoencoderKLWan (tiny random models, float32, CPU)."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan
from diffusers.models.autoencoders.vae import DiagonalGaussianDistribution

from minialg.models.wan_vae import WanVAE, WanVAEConfig, sample_posterior
from minialg.checkpoint import config_from

REAL_CONFIG = (Path(__file__).resolve().parent.parent / "minialg" / "real_configs" / "Wan2.1-I2V-14B-480P-Diffusers/vae/config.json")

TINY_CONFIGS = {
    # the real layout (dim_mult [1, 2, 4, 4], 2 res blocks, 16 latent channels), narrow
    "real-shape": dict(base_dim=8, z_dim=16, dim_mult=[1, 2, 4, 4], num_res_blocks=2),
    # fewer channels and blocks, 4 latent channels
    "small": dict(
        base_dim=8,
        z_dim=4,
        dim_mult=[1, 2, 2, 2],
        num_res_blocks=1,
        latents_mean=[0.3, -0.2, 0.1, 0.7],
        latents_std=[1.5, 0.8, 2.1, 1.2],
    ),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def models(request):
    """(diffusers reference, ours) with the same random weights; RMS gains randomised too."""
    kwargs = dict(temperal_downsample=[False, True, True], attn_scales=[], **TINY_CONFIGS[request.param])
    torch.manual_seed(0)
    ref = AutoencoderKLWan(**kwargs).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.uniform_(0.5, 1.5)
    ours = WanVAE(config_from(WanVAEConfig, dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


@pytest.mark.parametrize("frames,height,width", [(1, 16, 16), (5, 16, 24), (9, 16, 16)])
def test_encode(models, frames, height, width):
    ref, ours = models
    torch.manual_seed(1)
    video = torch.rand(2, 3, frames, height, width) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(video).latent_dist
        mean, logvar = ours.encode(video)
    k = (frames - 1) // 4
    assert mean.shape == logvar.shape == (2, ours.config.z_dim, 1 + k, height // 8, width // 8)
    assert rel_err(mean, posterior.mean) <= 1e-5
    assert rel_err(logvar, posterior.logvar) <= 1e-5
    with torch.no_grad():
        again, _ = ours.encode(video)
    assert torch.equal(again, mean)  # no state carried between calls


@pytest.mark.parametrize("latent_frames,height,width", [(1, 2, 2), (2, 2, 3), (3, 2, 2)])
def test_decode(models, latent_frames, height, width):
    ref, ours = models
    torch.manual_seed(2)
    z = torch.randn(2, ours.config.z_dim, latent_frames, height, width)
    with torch.no_grad():
        expected = ref.decode(z).sample
        video = ours.decode(z)
    assert video.shape == (2, 3, 1 + 4 * (latent_frames - 1), 8 * height, 8 * width)
    assert (expected.abs() < 1).float().mean() > 0.5  # mostly unclamped, so the comparison means something
    assert rel_err(video, expected) <= 1e-5
    with torch.no_grad():
        assert torch.equal(ours.decode(z), video)  # no state carried between calls


def test_sample_posterior():
    torch.manual_seed(3)
    mean = torch.randn(2, 4, 3, 2, 3)
    logvar = torch.randn(2, 4, 3, 2, 3) * 3
    logvar[0, 0, 0] = 50.0  # above the clamp
    logvar[1, 1, 1] = -50.0  # below the clamp
    reference = DiagonalGaussianDistribution(torch.cat([mean, logvar], dim=1))
    expected = reference.sample(generator=torch.Generator().manual_seed(7))
    z = sample_posterior(mean, logvar, torch.Generator().manual_seed(7))
    assert torch.equal(z, expected)
    assert not torch.equal(z, sample_posterior(mean, logvar, torch.Generator().manual_seed(8)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize_denormalize(dtype):
    cfg = config_from(WanVAEConfig, json.loads(REAL_CONFIG.read_text()))
    with torch.device("meta"):
        vae = WanVAE(cfg)
    torch.manual_seed(4)
    z = (torch.randn(1, 16, 3, 4, 5) * 2).to(dtype)
    # WanImageToVideoPipeline: mean and 1/std cast to the latents' dtype, reciprocal taken after the cast
    mean = torch.tensor(cfg.latents_mean).view(1, 16, 1, 1, 1).to(z.device, dtype)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, 16, 1, 1, 1).to(z.device, dtype)
    assert vae.normalize(z).dtype == dtype
    assert torch.equal(vae.normalize(z), (z - mean) * inv_std)
    assert torch.equal(vae.denormalize(z), z / inv_std + mean)


def test_real_config_state_dict_matches_reference():
    config = json.loads(REAL_CONFIG.read_text())
    cfg = config_from(WanVAEConfig, config)
    assert (cfg.base_dim, cfg.z_dim, cfg.dim_mult, cfg.num_res_blocks) == (96, 16, [1, 2, 4, 4], 2)
    assert cfg.temperal_downsample == [False, True, True] and cfg.decoder_base_dim is None
    with torch.device("meta"):
        ours = WanVAE(cfg)
        ref = AutoencoderKLWan.from_config(config)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    assert len(ours_shapes) == 194  # the reference names 194 tensors for this config
    assert not list(ours.buffers())


def test_unsupported_variants_refused():
    with pytest.raises(NotImplementedError):
        WanVAE(WanVAEConfig(base_dim=8, is_residual=True))
    with pytest.raises(NotImplementedError):
        WanVAE(WanVAEConfig(base_dim=8, patch_size=2))
