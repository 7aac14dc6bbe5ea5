"""minialg's HunyuanVideo VAE against diffusers' AutoencoderKLHunyuanVideo (tiny random models, CPU)."""

import copy
import json
from pathlib import Path

import pytest
import torch
from diffusers import AutoencoderKLHunyuanVideo

from minialg import checkpoint
from minialg.checkpoint import config_from
from minialg.models import hunyuan_vae
from minialg.models.hunyuan_vae import HunyuanVideoVAE, HunyuanVideoVAEConfig
from minialg.models.wan_vae import sample_posterior

REAL_CONFIG = Path(__file__).resolve().parent.parent / "minialg" / "real_configs" / "HunyuanVideo-I2V" / "vae"
# the real layout (4 levels, x8 space, x4 time, 16 latent channels), narrow, 1 resnet per block
TINY = dict(block_out_channels=[8, 16, 16, 16], norm_num_groups=4, layers_per_block=1)
DEFAULT_TILING = dict(size=hunyuan_vae.TILE_SIZE, stride=hunyuan_vae.TILE_STRIDE, frames=hunyuan_vae.TILE_FRAMES,
                      frame_stride=hunyuan_vae.TILE_FRAME_STRIDE)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def real_config() -> dict:
    return json.loads((REAL_CONFIG / "config.json").read_text())


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(diffusers reference, ours loaded by minialg's checkpoint loader from the reference's save_pretrained)."""
    config = {k: v for k, v in real_config().items() if not k.startswith("_")}
    torch.manual_seed(0)
    ref = AutoencoderKLHunyuanVideo(**{**config, **TINY}).eval()
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    folder = tmp_path_factory.mktemp("hunyuan-vae")
    ref.save_pretrained(folder)
    return ref, checkpoint.load(HunyuanVideoVAE, HunyuanVideoVAEConfig, folder)


def set_tiling(ref, tiled=False, framewise=True, size=(256, 256), stride=(192, 192), frames=16, frame_stride=12):
    """diffusers' tiling switches and sizes (what enable_tiling() and its attributes set)."""
    ref.use_tiling = tiled
    ref.use_framewise_encoding = ref.use_framewise_decoding = framewise
    ref.tile_sample_min_height, ref.tile_sample_min_width = size
    ref.tile_sample_stride_height, ref.tile_sample_stride_width = stride
    ref.tile_sample_min_num_frames, ref.tile_sample_stride_num_frames = frames, frame_stride


def ours_tiling(size, stride, frames, frame_stride) -> dict:
    return dict(tile_size=size, tile_stride=stride, tile_frames=frames, tile_frame_stride=frame_stride)


def test_defaults_are_diffusers():
    ref = AutoencoderKLHunyuanVideo(block_out_channels=[4, 4, 4, 4], norm_num_groups=2, layers_per_block=1)
    assert ref.use_framewise_encoding and ref.use_framewise_decoding and not ref.use_tiling
    assert DEFAULT_TILING["size"] == (ref.tile_sample_min_height, ref.tile_sample_min_width)
    assert DEFAULT_TILING["stride"] == (ref.tile_sample_stride_height, ref.tile_sample_stride_width)
    assert DEFAULT_TILING["frames"] == ref.tile_sample_min_num_frames
    assert DEFAULT_TILING["frame_stride"] == ref.tile_sample_stride_num_frames


@pytest.mark.parametrize("frames", [1, 5, 9])
def test_encode(models, frames):
    ref, ours = models
    set_tiling(ref)
    torch.manual_seed(1)
    video = torch.rand(2, 3, frames, 24, 32) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(video).latent_dist
        mean, logvar = ours.encode(video)
    assert mean.shape == logvar.shape == (2, 16, (frames - 1) // 4 + 1, 3, 4)
    assert torch.equal(mean, posterior.mean) and torch.equal(logvar, posterior.logvar)


def test_encode_image_sample(models):
    """The I2V pipeline encodes the image as a one-frame video; sampling the posterior matches diffusers too."""
    ref, ours = models
    set_tiling(ref)
    torch.manual_seed(2)
    image = torch.rand(1, 3, 1, 16, 24) * 2 - 1
    with torch.no_grad():
        expected = ref.encode(image).latent_dist.sample(generator=torch.Generator().manual_seed(7))
        z = sample_posterior(*ours.encode(image), torch.Generator().manual_seed(7))
    assert z.shape == (1, 16, 1, 2, 3) and torch.equal(z, expected)


@pytest.mark.parametrize("latent_frames", [1, 2, 3, 5])  # 5 > 16 / 4: diffusers' default frame tiles
def test_decode(models, latent_frames):
    ref, ours = models
    set_tiling(ref)
    torch.manual_seed(3)
    z = torch.randn(1, 16, latent_frames, 3, 4)
    with torch.no_grad():
        expected = ref.decode(z).sample
        video = ours.decode(z)
    assert video.shape == (1, 3, 4 * (latent_frames - 1) + 1, 24, 32)
    assert torch.equal(video, expected)


def test_whole_clip_without_frame_tiles(models):
    """framewise=False: one pass over all frames (diffusers with use_framewise_encoding/decoding off)."""
    ref, ours = models
    set_tiling(ref, framewise=False)
    torch.manual_seed(4)
    z = torch.randn(1, 16, 6, 2, 3)
    video = torch.rand(1, 3, 21, 16, 24) * 2 - 1
    with torch.no_grad():
        decoded, expected = ours.decode(z, framewise=False), ref.decode(z).sample
        mean, expected_mean = ours.encode(video, framewise=False)[0], ref.encode(video).latent_dist.mean
        assert rel_err(ours.decode(z), decoded) > 1e-3  # the default (frame tiles) differs
    assert decoded.shape == (1, 3, 21, 16, 24) and torch.equal(decoded, expected)
    assert mean.shape == (1, 16, 6, 2, 3) and torch.equal(mean, expected_mean)


# (tile size, stride, tile frames, frame stride, latent frames, latent height, width): tiles in space and time; the
# blend extents of the first two are powers of two (exact weights), of the last not
TILINGS = [((32, 32), (16, 16), 8, 4, 5, 6, 7),
           ((32, 48), (24, 32), 8, 4, 4, 5, 9),
           ((48, 40), (36, 24), 12, 8, 6, 7, 6)]


@pytest.mark.parametrize("size,stride,frames,frame_stride,latent_frames,height,width", TILINGS)
def test_tiled_decode(models, size, stride, frames, frame_stride, latent_frames, height, width):
    ref, ours = models
    tiling = dict(size=size, stride=stride, frames=frames, frame_stride=frame_stride)
    set_tiling(ref, tiled=True, **tiling)
    torch.manual_seed(5)
    z = torch.randn(1, 16, latent_frames, height, width)
    with torch.no_grad():
        expected = ref.decode(z).sample
        video = ours.decode(z, tiled=True, **ours_tiling(**tiling))
        untiled = ours.decode(z, framewise=False)
        time_only = ours.decode(z, **ours_tiling(**tiling))
    assert video.shape == expected.shape == untiled.shape == (1, 3, 4 * latent_frames - 3, 8 * height, 8 * width)
    assert torch.equal(video, expected)
    assert rel_err(video, time_only) > 1e-3 and rel_err(time_only, untiled) > 1e-3  # both tilings did happen


@pytest.mark.parametrize("size,stride,frames,frame_stride,latent_frames,height,width", TILINGS)
def test_tiled_encode(models, size, stride, frames, frame_stride, latent_frames, height, width):
    ref, ours = models
    tiling = dict(size=size, stride=stride, frames=frames, frame_stride=frame_stride)
    set_tiling(ref, tiled=True, **tiling)
    torch.manual_seed(6)
    video = torch.rand(1, 3, 4 * latent_frames - 3, 8 * height, 8 * width) * 2 - 1
    with torch.no_grad():
        posterior = ref.encode(video).latent_dist
        mean, logvar = ours.encode(video, tiled=True, **ours_tiling(**tiling))
        untiled = ours.encode(video, framewise=False)[0]
    assert mean.shape == posterior.mean.shape == untiled.shape == (1, 16, latent_frames, height, width)
    assert torch.equal(mean, posterior.mean) and torch.equal(logvar, posterior.logvar)
    assert rel_err(mean, untiled) > 1e-3


def test_bf16(models):
    """In bfloat16 (diffusers' module cast to bf16 as well), tiled and whole, encode and decode."""
    ref, ours = (copy.deepcopy(model).to(torch.bfloat16) for model in models)
    tiling = dict(size=(32, 32), stride=(16, 16), frames=8, frame_stride=4)
    set_tiling(ref, tiled=True, **tiling)
    torch.manual_seed(7)
    z = torch.randn(1, 16, 4, 5, 6, dtype=torch.bfloat16)
    video = torch.rand(1, 3, 9, 24, 32, dtype=torch.bfloat16) * 2 - 1
    with torch.no_grad():
        assert torch.equal(ours.decode(z, tiled=True, **ours_tiling(**tiling)), ref.decode(z).sample)
        mean = ours.encode(video, tiled=True, **ours_tiling(**tiling))[0]
        assert torch.equal(mean, ref.encode(video).latent_dist.mean)
        set_tiling(ref)
        assert torch.equal(ours.decode(z), ref.decode(z).sample)


def test_real_config_state_dict():
    """The real checkpoint's tensor names and shapes, from its config alone (on meta)."""
    config = real_config()
    with torch.device("meta"):
        ref = AutoencoderKLHunyuanVideo(**{k: v for k, v in config.items() if not k.startswith("_")})
        ours = HunyuanVideoVAE(config_from(HunyuanVideoVAEConfig, config))
    assert {k: v.shape for k, v in ours.state_dict().items()} == {k: v.shape for k, v in ref.state_dict().items()}
    assert len(list(ours.buffers())) == 0
    assert ours.config.scaling_factor == 0.476986 and ours.config.latent_channels == 16


def test_unsupported_config():
    with pytest.raises(NotImplementedError, match="temporal_compression_ratio"):
        HunyuanVideoVAE(HunyuanVideoVAEConfig(temporal_compression_ratio=8))
