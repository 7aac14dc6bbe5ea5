"""minialg's LTX-Video transformer against diffusers' LTXVideoTransformer3DModel and the official Lightricks
ltx-video package's Transformer3DModel, on tiny random models (float32, CPU)."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import LTXVideoTransformer3DModel
from diffusers.pipelines.ltx.pipeline_ltx_condition import LTXConditionPipeline
from diffusers.pipelines.ltx.pipeline_ltx_image2video import LTXImageToVideoPipeline

from minialg import checkpoint
from minialg.checkpoint import config_from
from minialg.models.ltx import LTXVideoTransformer, LTXVideoTransformerConfig, pack, unpack

REAL = Path(__file__).resolve().parent.parent / "minialg" / "real_configs"
REAL_2B = REAL / "LTX-Video" / "transformer" / "config.json"
REAL_13B = REAL / "LTX-Video-later" / "transformer_13b_0.9.7_config_DERIVED.json"

TINY = dict(in_channels=8, out_channels=8, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
            num_layers=2, caption_channels=12)
# widths 32, 40, 48: D % 6 = 2 (as the 2B's 2048), 4 (as the 13B's 4096), 0 (no unrotated channels)
HEAD_DIMS = [16, 20, 24]
GRID = (3, 4, 5)  # latent frames, height, width
TOKENS = 3 * 4 * 5
TEXT_LEN = 7
I2V_SCALE = (8 / 25, 32, 32)  # LTXImageToVideoPipeline's rope_interpolation_scale at frame_rate 25
TOL = 1e-5  # max abs error relative to the output's max abs value


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def tiny_config(head_dim: int) -> dict:
    return dict(TINY, attention_head_dim=head_dim, cross_attention_dim=2 * head_dim)


@pytest.fixture(scope="module", params=HEAD_DIMS, ids=lambda d: f"D{2 * d}")
def pair(request, tmp_path_factory):
    """diffusers' model with every weight random (non-zero tables), saved with save_pretrained; ours loaded
    from that folder by minialg.checkpoint."""
    torch.manual_seed(0)
    ref = LTXVideoTransformer3DModel(**tiny_config(request.param)).eval()
    gen = torch.Generator().manual_seed(request.param)
    with torch.no_grad():
        for p in ref.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    folder = tmp_path_factory.mktemp("tiny-ltx")
    ref.save_pretrained(folder)
    ours = checkpoint.load(LTXVideoTransformer, LTXVideoTransformerConfig, folder, "cpu", torch.float32)
    return ref, ours


def inputs(batch: int = 2, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, TOKENS, TINY["in_channels"], generator=gen)
    text = torch.randn(batch, TEXT_LEN, TINY["caption_channels"], generator=gen)
    mask = torch.ones(batch, TEXT_LEN, dtype=torch.int64)  # the tokenizer's attention mask: padding at the end
    mask[0, 5:] = 0
    mask[1, 3:] = 0
    return x, text, mask


def condition_coords(batch: int, frame_rates=(25.0, 10.0)) -> torch.Tensor:
    """video_coords as LTXConditionPipeline makes them (pixel units, frames / frame rate); each batch element
    with another frame_index and frame rate, so the rows differ (a shift alone would not show: RoPE is relative)."""
    ids = LTXConditionPipeline._prepare_video_ids(1, *GRID)
    rows = []
    for b in range(batch):
        coords = LTXConditionPipeline._scale_video_ids(ids, 32, 8, frame_index=8 * b).float()
        coords[:, 0] = coords[:, 0] * (1.0 / frame_rates[b])
        rows.append(coords)
    return torch.cat(rows)


@torch.no_grad()
def run_ref(ref, x, text, timestep, mask, grid=None, scale=None, coords=None):
    frames, height, width = grid if grid is not None else (None, None, None)
    return ref(x, text, timestep, mask, frames, height, width, rope_interpolation_scale=scale, video_coords=coords,
               return_dict=False)[0]


@pytest.mark.parametrize("scale", [I2V_SCALE, None], ids=["i2v-scale", "no-scale"])
@torch.no_grad()
def test_grid_scalar_timesteps_masked_text(pair, scale):
    """(a) positions from the grid, one timestep per batch element (different), padded text."""
    ref, ours = pair
    x, text, mask = inputs()
    timestep = torch.tensor([900.0, 37.5])
    expected = run_ref(ref, x, text, timestep, mask, grid=GRID, scale=scale)
    got = ours(x, timestep, text, mask, grid=GRID, rope_interpolation_scale=scale)
    assert got.shape == expected.shape == (2, TOKENS, 8) and got.dtype == torch.float32
    err = rel_err(got, expected)
    print(f"grid scale={scale}: max abs err {(got - expected).abs().max():.2e}, rel {err:.2e}")
    assert err <= TOL
    assert rel_err(got[0], got[1]) > 1e-2  # the batch entries really differ
    # the mask is used: changing padded text tokens changes nothing, dropping the mask changes the output
    noisy = text.clone()
    noisy[mask == 0] = 5.0
    assert rel_err(ours(x, timestep, noisy, mask, grid=GRID, rope_interpolation_scale=scale), got) <= TOL
    assert rel_err(ours(x, timestep, text, None, grid=GRID, rope_interpolation_scale=scale), got) > 1e-3


@torch.no_grad()
def test_grid_per_token_timesteps_as_image_to_video(pair):
    """LTXImageToVideoPipeline's timesteps: (B, L), the first latent frame's tokens (the image) at 0."""
    ref, ours = pair
    x, text, mask = inputs(seed=2)
    conditioning = torch.zeros(2, TOKENS)
    conditioning[:, : GRID[1] * GRID[2]] = 1.0
    timestep = torch.tensor([700.0, 250.0]).unsqueeze(-1) * (1 - conditioning)  # (B, L)
    expected = run_ref(ref, x, text, timestep, mask, grid=GRID, scale=I2V_SCALE)
    got = ours(x, timestep, text, mask, grid=GRID, rope_interpolation_scale=I2V_SCALE)
    err = rel_err(got, expected)
    print(f"grid per-token t: max abs err {(got - expected).abs().max():.2e}, rel {err:.2e}")
    assert err <= TOL
    scalar = ours(x, timestep[:, -1], text, mask, grid=GRID, rope_interpolation_scale=I2V_SCALE)
    assert rel_err(scalar, got) > 1e-3  # the per-token timesteps matter


@torch.no_grad()
def test_coords_per_token_timesteps(pair):
    """(b) explicit video coords (B, 3, L) and per-token timesteps (B, L) with some tokens at 0."""
    ref, ours = pair
    x, text, mask = inputs(seed=3)
    coords = condition_coords(2)
    gen = torch.Generator().manual_seed(4)
    timestep = torch.rand(2, TOKENS, generator=gen) * 1000
    timestep[:, :20] = 0.0  # the conditioning tokens
    timestep[1, 40:45] = 0.0
    expected = run_ref(ref, x, text, timestep, mask, coords=coords)
    got = ours(x, timestep, text, mask, coords=coords)
    err = rel_err(got, expected)
    print(f"coords per-token t: max abs err {(got - expected).abs().max():.2e}, rel {err:.2e}")
    assert err <= TOL
    # the coordinates matter (each row its own), and not only through the grid
    assert rel_err(ours(x, timestep, text, mask, coords=condition_coords(2)[[0, 0]]), got) > 1e-3
    assert rel_err(ours(x, timestep, text, mask, grid=GRID, rope_interpolation_scale=I2V_SCALE), got) > 1e-3


@torch.no_grad()
def test_grid_positions_scale_with_patch_size(tmp_path):
    """patch_size / patch_size_t (1 in every published config) multiply the grid positions."""
    ref = LTXVideoTransformer3DModel(**dict(TINY, patch_size=2, patch_size_t=2)).eval()
    ref.save_pretrained(tmp_path)
    ours = checkpoint.load(LTXVideoTransformer, LTXVideoTransformerConfig, tmp_path)
    x, text, mask = inputs(seed=8)
    timestep = torch.tensor([500.0, 20.0])
    expected = run_ref(ref, x, text, timestep, mask, grid=GRID, scale=I2V_SCALE)
    err = rel_err(ours(x, timestep, text, mask, grid=GRID, rope_interpolation_scale=I2V_SCALE), expected)
    print(f"grid patch 2: rel err {err:.2e}")
    assert err <= TOL


@torch.no_grad()
def test_one_timestep_as_b_by_1(pair):
    """The condition pipeline without a conditioning image passes t as (B, 1): one timestep per element."""
    _, ours = pair
    x, text, mask = inputs(seed=5)
    timestep = torch.tensor([400.0, 10.0])
    coords = condition_coords(2)
    by_column = ours(x, timestep[:, None], text, mask, coords=coords)
    assert rel_err(by_column, ours(x, timestep, text, mask, coords=coords)) == 0


@pytest.mark.parametrize("path", [REAL_2B, REAL_13B], ids=["2B-0.9.0", "13B-0.9.7"])
def test_real_config_names_and_shapes_on_meta(path):
    """(c) the published configs build on meta with exactly diffusers' tensor names and shapes."""
    real = json.loads(path.read_text())
    cfg = config_from(LTXVideoTransformerConfig, real)
    with torch.device("meta"):
        ref = LTXVideoTransformer3DModel.from_config({k: v for k, v in real.items() if not k.startswith("_")})
        ours = LTXVideoTransformer(cfg)
    assert list(ours.buffers()) == []
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    width = real["num_attention_heads"] * real["attention_head_dim"]
    assert our_shapes[f"transformer_blocks.{real['num_layers'] - 1}.scale_shift_table"] == (6, width)
    assert our_shapes["time_embed.emb.timestep_embedder.linear_1.weight"] == (width, 256)


def test_config_defaults_are_the_2b_checkpoint():
    real = json.loads(REAL_2B.read_text())
    assert config_from(LTXVideoTransformerConfig, real) == LTXVideoTransformerConfig()
    assert set(real) - {"_class_name", "_diffusers_version"} == set(LTXVideoTransformerConfig.__dataclass_fields__)


def test_fp32_params_follow_diffusers_rule():
    assert not LTXVideoTransformer3DModel._keep_in_fp32_modules and LTXVideoTransformer.fp32_params == ()


def test_unsupported_config_and_bad_inputs_raise(pair):
    for bad in (dict(norm_elementwise_affine=True), dict(qk_norm="rms_norm"), dict(cross_attention_dim=48)):
        with pytest.raises(ValueError):
            LTXVideoTransformerConfig(**dict(TINY, **bad))
    _, ours = pair
    x, text, mask = inputs()
    t = torch.tensor([1.0, 2.0])
    with pytest.raises(ValueError, match="either grid"):
        ours(x, t, text, mask)
    with pytest.raises(ValueError, match="grid"):
        ours(x, t, text, mask, grid=(3, 4, 4))
    with pytest.raises(ValueError, match="coords"):
        ours(x, t, text, mask, coords=condition_coords(2)[:, :, :-1])
    with pytest.raises(ValueError, match="timestep"):
        ours(x, torch.ones(2, 3), text, mask, grid=GRID)


@pytest.mark.parametrize("patch", [(1, 1), (2, 1), (2, 2)])
def test_pack_unpack_match_the_pipelines(patch):
    p, pt = patch
    latents = torch.randn(2, 3, 4, 6, 8)
    tokens = pack(latents, p, pt)
    assert torch.equal(tokens, LTXImageToVideoPipeline._pack_latents(latents, p, pt))
    grid = (4 // pt, 6 // p, 8 // p)
    assert torch.equal(unpack(tokens, grid, p, pt), latents)
    assert torch.equal(unpack(tokens, grid, p, pt), LTXImageToVideoPipeline._unpack_latents(tokens, *grid, p, pt))


@torch.no_grad()
def test_bf16_matches_diffusers_bf16(pair):
    """In bf16 (the loader's dtype for every tensor: no float32 modules) ours follows diffusers' rounding."""
    ref, ours = pair
    x, text, mask = inputs(seed=6)
    timestep = torch.tensor([900.0, 37.5]).unsqueeze(-1).expand(2, TOKENS).clone()
    timestep[:, :20] = 0.0
    expected_fp32 = ours(x, timestep, text, mask, grid=GRID, rope_interpolation_scale=I2V_SCALE)
    bf16 = lambda t: t.to(torch.bfloat16)  # noqa: E731
    ref_bf16 = LTXVideoTransformer3DModel(**dict(ref.config)).eval().to(torch.bfloat16)
    ref_bf16.load_state_dict(ref.state_dict())
    ours_bf16 = LTXVideoTransformer(ours.config).eval().to(torch.bfloat16)
    ours_bf16.load_state_dict(ours.state_dict())
    expected = run_ref(ref_bf16, bf16(x), bf16(text), timestep, mask, grid=GRID, scale=I2V_SCALE)
    got = ours_bf16(bf16(x), timestep, bf16(text), mask, grid=GRID, rope_interpolation_scale=I2V_SCALE)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    err, err_fp32 = rel_err(got, expected), rel_err(expected, expected_fp32)
    print(f"bf16: vs diffusers bf16 {err:.2e} (diffusers bf16 vs fp32: {err_fp32:.2e})")
    assert err <= 1e-6 and err_fp32 > 1e-3  # the same bf16 rounding, far closer than bf16 is to fp32


# (d) the official Lightricks model (ltx-video 0.1.2's Transformer3DModel), built with the config its own
# diffusers-checkpoint loader maps the 2B diffusers config to, at tiny size
OFFICIAL = dict(activation_fn="gelu-approximate", attention_bias=True, attention_type="default", dropout=0.0,
                double_self_attention=False, norm_elementwise_affine=False, norm_eps=1e-6, num_embeds_ada_norm=1000,
                only_cross_attention=False, upcast_attention=False, use_linear_projection=False, qk_norm="rms_norm",
                standardization_norm="rms_norm", positional_embedding_type="rope", positional_embedding_theta=10000.0,
                positional_embedding_max_pos=[20, 2048, 2048], timestep_scale_multiplier=1000)


@pytest.mark.parametrize("per_token", [False, True], ids=["scalar-t", "per-token-t"])
@torch.no_grad()
def test_official_ltx_video_package(pair, per_token):
    transformer3d = pytest.importorskip("ltx_video.models.transformers.transformer3d")
    from ltx_video.utils.diffusers_config_mapping import OURS_TRANSFORMER_CONFIG, TRANSFORMER_KEYS_RENAME_DICT

    assert {k: OURS_TRANSFORMER_CONFIG[k] for k in OFFICIAL} == OFFICIAL  # the package's own 2B mapping
    ref, ours = pair
    cfg = ref.config
    official = transformer3d.Transformer3DModel(
        num_attention_heads=cfg.num_attention_heads, attention_head_dim=cfg.attention_head_dim,
        in_channels=cfg.in_channels, out_channels=cfg.out_channels, num_layers=cfg.num_layers,
        cross_attention_dim=cfg.cross_attention_dim, caption_channels=cfg.caption_channels, **OFFICIAL).eval()
    renamed = {}
    for name, tensor in ref.state_dict().items():  # diffusers -> official names, as the package's loader does
        for diffusers_name, official_name in TRANSFORMER_KEYS_RENAME_DICT.items():
            name = name.replace(diffusers_name, official_name)
        renamed[name] = tensor
    official.load_state_dict(renamed, strict=True)

    x, text, mask = inputs(seed=7)
    coords = condition_coords(2)
    sigma = torch.tensor([0.875, 0.25])  # the official model takes t in [0, 1] and multiplies by 1000 itself
    if per_token:
        sigma = sigma[:, None].expand(2, TOKENS).clone()
        sigma[:, :20] = 0.0
    expected = official(x, coords, encoder_hidden_states=text, timestep=sigma, encoder_attention_mask=mask,
                        return_dict=False)[0]
    got = ours(x, 1000 * sigma, text, mask, coords=coords)
    err = rel_err(got, expected)
    print(f"official per_token={per_token}: max abs err {(got - expected).abs().max():.2e}, rel {err:.2e}")
    assert err <= TOL
