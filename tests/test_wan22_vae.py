"""minialg's Wan 2.2 VAE against diffusers' AutoencoderKLWan(is_residual=True): tiny random checkpoints saved by
diffusers and loaded by minialg, float32 on the CPU, bit for bit; and the real TI2V-5B layout on meta."""

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLWan

from minialg import checkpoint
from minialg.checkpoint import config_from
from minialg.models.wan22_vae import Wan22VAE, patchify, unpatchify
from minialg.models.wan_vae import WanVAE, WanVAEConfig

REAL = Path(__file__).resolve().parent.parent / "minialg" / "real_configs" / "Wan2.2-TI2V-5B-Diffusers" / "vae"
REAL_CONFIG = {k: v for k, v in json.loads((REAL / "config.json").read_text()).items() if not k.startswith("_")}

TINY_CONFIGS = {
    # the real TI2V-5B config (residual, patch 2, z 48, 12 pixel channels, dim_mult [1, 2, 4, 4]), narrow
    "real-shape": dict(base_dim=16, decoder_base_dim=32),
    # one res block per level, time halved by the first two levels instead of the last two
    "other-levels": dict(base_dim=8, decoder_base_dim=16, num_res_blocks=1, temperal_downsample=[True, True, False]),
}


@pytest.fixture(scope="module", params=list(TINY_CONFIGS))
def models(request, tmp_path_factory):
    """(diffusers reference, minialg's loaded from the reference's save_pretrained folder)."""
    torch.manual_seed(0)
    ref = AutoencoderKLWan(**{**REAL_CONFIG, **TINY_CONFIGS[request.param]}).eval()
    with torch.no_grad():
        for p in ref.parameters():  # default inits leave biases at zero and RMS gains at one
            p.add_(torch.randn_like(p) * 0.05)
    folder = tmp_path_factory.mktemp("wan22-vae")
    ref.save_pretrained(folder)
    return ref, checkpoint.load(Wan22VAE, WanVAEConfig, folder)


@pytest.mark.parametrize("frames,height,width", [(1, 32, 32), (5, 32, 48), (9, 16, 32)])
def test_encode(models, frames, height, width):
    ref, ours = models
    torch.manual_seed(1)
    video = torch.rand(2, 3, frames, height, width) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(video).latent_dist
        mean, logvar = ours.encode(video)
    assert mean.shape == logvar.shape == (2, 48, 1 + (frames - 1) // 4, height // 16, width // 16)
    assert torch.equal(mean, posterior.mean)
    assert torch.equal(logvar, posterior.logvar)
    assert mean.std() > 0.1
    with torch.no_grad():
        assert torch.equal(ours.encode(video)[0], mean)  # no state carried between calls


@pytest.mark.parametrize("latent_frames,height,width", [(1, 2, 2), (2, 2, 3), (3, 1, 2)])
def test_decode(models, latent_frames, height, width):
    ref, ours = models
    torch.manual_seed(2)
    z = torch.randn(2, 48, latent_frames, height, width)
    with torch.no_grad():
        expected = ref.decode(z).sample
        video = ours.decode(z)
    assert video.shape == (2, 3, 1 + 4 * (latent_frames - 1), 16 * height, 16 * width)
    assert (expected.abs() < 1).float().mean() > 0.5  # mostly unclamped, so the comparison means something
    assert torch.equal(video, expected)
    with torch.no_grad():
        assert torch.equal(ours.decode(z), video)  # no state carried between calls


def test_bf16_encode_decode(models):
    ref, ours = models
    ref, ours = copy.deepcopy(ref).to(torch.bfloat16), copy.deepcopy(ours).to(torch.bfloat16)
    torch.manual_seed(3)
    video = (torch.rand(1, 3, 5, 32, 16) * 2 - 1).to(torch.bfloat16)
    with torch.no_grad():
        assert torch.equal(ours.encode(video)[0], ref.encode(video).latent_dist.mean)
        z = torch.randn(1, 48, 2, 2, 1, dtype=torch.bfloat16)
        assert torch.equal(ours.decode(z), ref.decode(z).sample)


def test_patchify_is_diffusers_order_and_inverts():
    from diffusers.models.autoencoders.autoencoder_kl_wan import patchify as ref_patchify

    x = torch.randn(2, 3, 5, 8, 12)
    assert torch.equal(patchify(x, 2), ref_patchify(x, 2))
    assert torch.equal(unpatchify(patchify(x, 2), 2), x)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize_denormalize(dtype):
    cfg = config_from(WanVAEConfig, REAL_CONFIG)
    with torch.device("meta"):
        vae = Wan22VAE(cfg)
    torch.manual_seed(4)
    z = torch.randn(1, 48, 3, 4, 5).to(dtype)
    # WanPipeline / WanImageToVideoPipeline: mean and 1/std cast to the latents' dtype, reciprocal after the cast
    mean = torch.tensor(REAL_CONFIG["latents_mean"]).view(1, 48, 1, 1, 1).to(dtype)
    inv_std = 1.0 / torch.tensor(REAL_CONFIG["latents_std"]).view(1, 48, 1, 1, 1).to(dtype)
    assert torch.equal(vae.normalize(z), (z - mean) * inv_std)
    assert torch.equal(vae.denormalize(z), z / inv_std + mean)


def test_real_layout_matches_reference():
    cfg = config_from(WanVAEConfig, REAL_CONFIG)
    assert (cfg.base_dim, cfg.decoder_base_dim, cfg.z_dim, cfg.patch_size, cfg.is_residual) == (160, 256, 48, 2, True)
    with torch.device("meta"):
        ours = Wan22VAE(cfg)
        ref = AutoencoderKLWan(**REAL_CONFIG)
    ours_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours_shapes == ref_shapes
    assert len(ours_shapes) == 196  # the reference names 196 tensors for this config
    assert 0.70e9 < sum(p.numel() for p in ours.parameters()) < 0.71e9  # 705 M
    assert not list(ours.buffers())


def test_wrong_variants_refused():
    with pytest.raises(NotImplementedError, match="Wan22VAE"):
        WanVAE(config_from(WanVAEConfig, {**REAL_CONFIG, "base_dim": 8, "decoder_base_dim": 8}))
    with pytest.raises(NotImplementedError, match="is_residual"):
        Wan22VAE(WanVAEConfig(base_dim=8))
    with pytest.raises(NotImplementedError, match="attn_scales"):
        Wan22VAE(WanVAEConfig(base_dim=8, is_residual=True, attn_scales=[0.5]))


def test_odd_size_refused(models):
    _, ours = models
    with pytest.raises(ValueError, match="multiples of 16"):
        ours.encode(torch.zeros(1, 3, 1, 24, 32))
