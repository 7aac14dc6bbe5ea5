"""minialg's LTX-Video VAE against diffusers' AutoencoderKLLTXVideo (tiny random models, CPU, float32).

Three generations, each from its real config with narrow widths and few layers: 0.9.0 (stride-2 conv levels),
0.9.1 (timestep-conditioned decoder with noise injection and residual upsamplers) and 0.9.5+ (spatial, temporal
and spatio-temporal folding levels).
"""

import copy
import inspect
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLLTXVideo

from minialg import checkpoint
from minialg.checkpoint import config_from, read_header
from minialg.models import ltx_vae
from minialg.models.ltx_vae import LTXVideoVAE, LTXVideoVAEConfig
from minialg.models.wan_vae import sample_posterior

REAL = Path(__file__).resolve().parent.parent / "minialg" / "real_configs"
REAL_CONFIGS = {"0.9.0": REAL / "LTX-Video" / "vae" / "config.json",
                "0.9.1": REAL / "LTX-Video-later" / "vae_0.9.1_config.json",
                "0.9.5": REAL / "LTX-Video-later" / "vae_0.9.5-0.9.8_config.json"}
# narrow widths, 8 latent channels, mostly 1 resnet per block; every width change of the real layouts kept (the
# 0.9.0 conv_out / conv_in resnets with their layer-norm shortcuts, the folding downsamplers' channel groups)
TINY = {
    "0.9.0": dict(block_out_channels=[8, 16, 16, 32], decoder_block_out_channels=[8, 16, 16, 32],
                  latent_channels=8, layers_per_block=[1, 2, 1, 1, 1], decoder_layers_per_block=[1, 1, 2, 1, 1]),
    # noise in the mid block and two of the three up blocks (the real one: the up blocks only)
    "0.9.1": dict(block_out_channels=[8, 16, 16, 16], decoder_block_out_channels=[16, 32, 64], latent_channels=8,
                  layers_per_block=[1, 1, 1, 1, 1], decoder_layers_per_block=[1, 1, 1, 2],
                  decoder_inject_noise=[True, False, True, True]),
    "0.9.5": dict(block_out_channels=[8, 16, 32, 32, 64], decoder_block_out_channels=[16, 32, 64],
                  latent_channels=8, layers_per_block=[1, 1, 1, 1, 1], decoder_layers_per_block=[1, 1, 1, 1]),
}
VERSIONS = list(TINY)
TOLERANCE = 2e-6  # relative to the largest reference magnitude (measured: at most 4e-7, mostly exact)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def real_config(version: str) -> dict:
    return {k: v for k, v in json.loads(REAL_CONFIGS[version].read_text()).items() if not k.startswith("_")}


@pytest.fixture(scope="module", params=VERSIONS)
def models(request, tmp_path_factory):
    """(version, diffusers reference, ours loaded by minialg's checkpoint loader from the reference's
    save_pretrained folder). Every parameter is perturbed (norm weights, noise scales and scale-shift tables
    too, so a missing term shows), and the latent statistics are made non-trivial."""
    version = request.param
    torch.manual_seed(0)
    ref = AutoencoderKLLTXVideo(**{**real_config(version), **TINY[version]}).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
        ref.latents_mean.copy_(torch.randn_like(ref.latents_mean))
        ref.latents_std.copy_(torch.rand_like(ref.latents_std) + 0.5)
    folder = tmp_path_factory.mktemp(f"ltx-vae-{version}")
    ref.save_pretrained(folder)
    return version, ref, checkpoint.load(LTXVideoVAE, LTXVideoVAEConfig, folder)


def set_tiling(ref, tiled=False, size=(512, 512), stride=(448, 448)):
    """diffusers' tiling switch and sizes (what enable_tiling() sets; framewise decoding stays off)."""
    ref.use_tiling = tiled
    ref.tile_sample_min_height, ref.tile_sample_min_width = size
    ref.tile_sample_stride_height, ref.tile_sample_stride_width = stride


def timestep_for(version: str, batch: int) -> torch.Tensor | None:
    return None if version == "0.9.0" else torch.tensor([0.05, 0.025][:batch])


def decode_both(ref, ours, version, z, seed=3, **tiling):
    """(diffusers, ours): the reference's injected noise from the global RNG seeded with `seed`, ours from a
    generator seeded the same."""
    t = timestep_for(version, z.shape[0])
    with torch.no_grad():
        torch.manual_seed(seed)
        expected = ref.decode(z, t).sample
        video = ours.decode(z, t, generator=torch.Generator().manual_seed(seed), **tiling)
    return expected, video


def test_defaults_are_diffusers_and_the_real_0_9_0_config():
    defaults = {k: p.default for k, p in inspect.signature(AutoencoderKLLTXVideo.__init__).parameters.items()
                if k != "self"}
    ours = LTXVideoVAEConfig()
    assert set(defaults) == set(vars(ours))
    for key, value in defaults.items():
        assert getattr(ours, key) == (list(value) if isinstance(value, tuple) else value), key
    assert config_from(LTXVideoVAEConfig, real_config("0.9.0")) == ours
    ref = AutoencoderKLLTXVideo(block_out_channels=[8] * 4, decoder_block_out_channels=[8] * 4, latent_channels=8)
    assert not ref.use_tiling and not ref.use_framewise_decoding
    assert ltx_vae.TILE_SIZE == (ref.tile_sample_min_height, ref.tile_sample_min_width)
    assert ltx_vae.TILE_STRIDE == (ref.tile_sample_stride_height, ref.tile_sample_stride_width)


@pytest.mark.parametrize("version", VERSIONS)
def test_real_config_state_dict(version):
    """The real checkpoint's tensor names and shapes (the latent statistics buffers included), on meta."""
    config = real_config(version)
    with torch.device("meta"):
        ref = AutoencoderKLLTXVideo(**config)
        ours = LTXVideoVAE(config_from(LTXVideoVAEConfig, config))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert {k for k, _ in ours.named_buffers()} == {k for k, _ in ref.named_buffers()} == {"latents_mean",
                                                                                          "latents_std"}
    assert ours.spatial_compression == ref.spatial_compression_ratio == 32
    assert ours.temporal_compression == ref.temporal_compression_ratio == 8


def test_0_9_5_blocks_with_conv_and_unscaled_levels():
    """0.9.5 blocks may also downsample by a stride-2 conv (no width change) or not at all; the encoder still
    matches, its tensors loaded by name from the reference's state dict."""
    config = dict(TINY["0.9.5"], down_block_types=["LTXVideo095DownBlock3D"] * 4, block_out_channels=[8, 8, 16, 32, 32],
                  downsample_type=["conv", "spatial", "spatiotemporal", "temporal"],
                  spatio_temporal_scaling=[True, True, True, False])
    torch.manual_seed(7)
    ref = AutoencoderKLLTXVideo(**config).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    ours = LTXVideoVAE(LTXVideoVAEConfig(**config))
    ours.load_state_dict(ref.state_dict())  # strict: the same names and shapes
    video = torch.rand(1, 3, 9, 64, 64) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(video).latent_dist
        mean, logvar = ours.encode(video)
    assert mean.shape == (1, 8, 3, 2, 2)  # 9 -> 5 -> 3 frames, 64 -> 16 -> 8 -> 4 -> 2 pixels
    assert rel_err(mean, posterior.mean) < TOLERANCE and rel_err(logvar, posterior.logvar) < TOLERANCE


def test_checkpoint_holds_latent_statistics(models, tmp_path):
    """save_pretrained writes latents_mean / latents_std; the loader fills our buffers with them."""
    version, ref, ours = models
    ref.save_pretrained(tmp_path)
    header = read_header(tmp_path / "diffusion_pytorch_model.safetensors")
    assert header["latents_mean"][1] == header["latents_std"][1] == (8,)
    buffers, state = dict(ours.named_buffers()), ours.state_dict()
    assert buffers.keys() == {"latents_mean", "latents_std"}
    assert not any("latents" in name for name, _ in ours.named_parameters())
    for name in buffers:  # as buffers (not parameters beside meta buffers), in the state dict too
        assert torch.equal(buffers[name], getattr(ref, name)) and torch.equal(state[name], getattr(ref, name))
        assert getattr(ours, name) is buffers[name]
    assert not torch.equal(ours.latents_mean, torch.zeros(8))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_normalize_as_the_pipelines(models, dtype):
    """normalize / denormalize are the pipelines' _normalize_latents / _denormalize_latents (bit for bit)."""
    from diffusers import LTXImageToVideoPipeline as Pipe

    version, ref, ours = models
    torch.manual_seed(8)
    z = torch.randn(2, 8, 2, 3, 4).to(dtype)
    stats = ref.latents_mean, ref.latents_std
    assert torch.equal(ours.normalize(z), Pipe._normalize_latents(z, *stats))
    assert torch.equal(ours.normalize(z, 0.7), Pipe._normalize_latents(z, *stats, 0.7))
    assert torch.equal(ours.denormalize(z), Pipe._denormalize_latents(z, *stats, ref.config.scaling_factor))
    assert torch.equal(ours.denormalize(z, 0.7), Pipe._denormalize_latents(z, *stats, 0.7))
    assert rel_err(ours.denormalize(z), z) > 1e-2  # the statistics are not the identity


@pytest.mark.parametrize("frames", [1, 9])
def test_encode(models, frames):
    version, ref, ours = models
    set_tiling(ref)
    torch.manual_seed(1)
    video = torch.rand(2, 3, frames, 64, 96) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(video).latent_dist
        mean, logvar = ours.encode(video)
    assert mean.shape == logvar.shape == (2, 8, (frames - 1) // 8 + 1, 2, 3)
    assert rel_err(mean, posterior.mean) < TOLERANCE and rel_err(logvar, posterior.logvar) < TOLERANCE
    assert torch.equal(logvar, logvar[:, :1].expand_as(logvar))  # one log-variance for all channels
    assert posterior.logvar.std() > 0.01  # a real test of the shared channel, not a constant


def test_encode_image_sample(models):
    """The I2V pipeline samples the posterior of a one-frame video with its generator."""
    version, ref, ours = models
    set_tiling(ref)
    torch.manual_seed(2)
    image = torch.rand(1, 3, 1, 32, 64) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(image).latent_dist.sample(generator=torch.Generator().manual_seed(7))
        z = sample_posterior(*ours.encode(image), torch.Generator().manual_seed(7))
    assert z.shape == (1, 8, 1, 1, 2) and rel_err(z, expected) < TOLERANCE


@pytest.mark.parametrize("latent_frames", [1, 2])
def test_decode(models, latent_frames):
    version, ref, ours = models
    set_tiling(ref)
    torch.manual_seed(3)
    z = torch.randn(2, 8, latent_frames, 2, 3)
    expected, video = decode_both(ref, ours, version, z)
    assert video.shape == expected.shape == (2, 3, 8 * latent_frames - 7, 64, 96)
    assert rel_err(video, expected) < TOLERANCE


def test_decode_timestep_and_noise(models):
    """0.9.1+: the timestep changes the result; 0.9.1: so does the noise, drawn from the generator (None: the
    global RNG, as diffusers). 0.9.0: a timestep is ignored."""
    version, ref, ours = models
    torch.manual_seed(4)
    z = torch.randn(1, 8, 2, 2, 3)
    t = torch.tensor([0.05])
    with torch.no_grad():
        if version == "0.9.0":  # no timestep conditioning: a timestep is ignored, as by diffusers
            assert torch.equal(ours.decode(z, t), ours.decode(z))
            return
        video = ours.decode(z, t, generator=torch.Generator().manual_seed(5))
        assert rel_err(ours.decode(z, 0.0, generator=torch.Generator().manual_seed(5)), video) > 1e-3
        assert torch.equal(ours.decode(z, 0.05, generator=torch.Generator().manual_seed(5)), video)
        other_noise = ours.decode(z, t, generator=torch.Generator().manual_seed(6))
        torch.manual_seed(5)
        global_rng = ours.decode(z, t)
    assert torch.equal(global_rng, video)
    assert (rel_err(other_noise, video) > 1e-3) == (version == "0.9.1")


# (tile size, tile stride) in pixels, latent height and width, of one frame (tiles cut space only; one frame keeps
# the tests fast): 3 x 2 tiles of 2 x 3 latent pixels (blend extents 32, 32); 2 x 3 tiles of 3 x 5 (extents 32
# and 96, the second clipped to 64 by the last column's width: weights (96 - y) / 96 not exact in binary)
TILINGS = [((64, 96), (32, 64), 3, 4), ((96, 160), (64, 64), 3, 6)]


@pytest.mark.parametrize("size,stride,height,width", TILINGS)
def test_tiled_decode(models, size, stride, height, width):
    version, ref, ours = models
    set_tiling(ref, tiled=True, size=size, stride=stride)
    torch.manual_seed(5)
    z = torch.randn(1, 8, 1, height, width)
    expected, video = decode_both(ref, ours, version, z, tile_size=size, tile_stride=stride, tiled=True)
    untiled = decode_both(ref, ours, version, z)[1]
    assert video.shape == expected.shape == untiled.shape == (1, 3, 1, 32 * height, 32 * width)
    assert rel_err(video, expected) < TOLERANCE
    assert rel_err(video, untiled) > 1e-3  # the tiles did change the result


@pytest.mark.parametrize("size,stride,height,width", TILINGS)
def test_tiled_encode(models, size, stride, height, width):
    version, ref, ours = models
    set_tiling(ref, tiled=True, size=size, stride=stride)
    torch.manual_seed(6)
    video = torch.rand(1, 3, 1, 32 * height, 32 * width) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(video).latent_dist
        mean, logvar = ours.encode(video, tiled=True, tile_size=size, tile_stride=stride)
        untiled = ours.encode(video)[0]
    assert mean.shape == posterior.mean.shape == (1, 8, 1, height, width)
    assert rel_err(mean, posterior.mean) < TOLERANCE and rel_err(logvar, posterior.logvar) < TOLERANCE
    assert rel_err(mean, untiled) > 1e-3


def test_bf16(models):
    """In bfloat16 (diffusers' module cast to bf16 as well), decode with timestep and noise, and encode: bit for bit."""
    version, ref, ours = (copy.deepcopy(m).to(torch.bfloat16) if i else m for i, m in enumerate(models))
    set_tiling(ref)
    torch.manual_seed(9)
    z = torch.randn(2, 8, 2, 2, 3, dtype=torch.bfloat16)
    video = torch.rand(2, 3, 9, 64, 96, dtype=torch.bfloat16) * 2 - 1
    t = timestep_for(version, 2)
    t = None if t is None else t.to(torch.bfloat16)
    with torch.no_grad():
        torch.manual_seed(3)
        expected = ref.decode(z, t).sample
        decoded = ours.decode(z, t, generator=torch.Generator().manual_seed(3))
        mean, expected_mean = ours.encode(video)[0], ref.encode(video).latent_dist.mean
    assert decoded.dtype == mean.dtype == torch.bfloat16
    assert torch.equal(decoded, expected) and torch.equal(mean, expected_mean)


def test_unsupported_and_missing_arguments():
    with pytest.raises(NotImplementedError, match="patch_size_t"):
        LTXVideoVAE(LTXVideoVAEConfig(patch_size_t=2))
    with pytest.raises(NotImplementedError, match="downsample_type"):
        LTXVideoVAE(LTXVideoVAEConfig(down_block_types=["LTXVideo095DownBlock3D"] * 4, downsample_type=["x"] * 4))
    with torch.device("meta"):
        vae = LTXVideoVAE(config_from(LTXVideoVAEConfig, real_config("0.9.1")))
    with pytest.raises(ValueError, match="timestep"):
        vae.decode(torch.zeros(1, 128, 1, 1, 1, device="meta"))
