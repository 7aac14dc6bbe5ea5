"""minialg's Wan transformer against diffusers' WanTransformer3DModel on tiny random models (float32, CPU)."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import WanTransformer3DModel

from minialg.models.wan import WanTransformer, WanTransformerConfig
from minialg.checkpoint import config_from

REAL_CONFIG = (Path(__file__).resolve().parent.parent / "minialg" / "real_configs" / "Wan2.1-I2V-14B-480P-Diffusers/transformer/config.json")

TINY_I2V = dict(
    patch_size=(1, 2, 2),
    num_attention_heads=2,
    attention_head_dim=24,
    in_channels=36,
    out_channels=16,
    text_dim=32,
    freq_dim=64,
    ffn_dim=80,
    num_layers=2,
    cross_attn_norm=True,
    qk_norm="rms_norm_across_heads",
    eps=1e-6,
    image_dim=40,
    added_kv_proj_dim=48,
)
TINY_T2V = dict(TINY_I2V, in_channels=16, image_dim=None, added_kv_proj_dim=None)
TEXT_LEN = 512  # diffusers splits [image ; text] at len - 512, so I2V text must be 512 tokens
IMAGE_LEN = 257


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def randomise(model: torch.nn.Module, seed: int) -> None:
    """Give every parameter a random value (diffusers initialises some to zeros or ones)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn(p.shape, generator=gen) * 0.3)


def build_pair(config: dict, seed: int = 0) -> tuple[WanTransformer3DModel, WanTransformer]:
    torch.manual_seed(seed)
    ref = WanTransformer3DModel(**config).eval()
    randomise(ref, seed)
    ours = WanTransformer(config_from(WanTransformerConfig, dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def inputs(config: dict, batch: int, frames=3, height=6, width=10, text_len=TEXT_LEN, seed=1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, config["in_channels"], frames, height, width, generator=gen)
    timestep = torch.randint(0, 1000, (batch,), generator=gen)  # int64, like the scheduler's
    text = torch.randn(batch, text_len, config["text_dim"], generator=gen)
    image = None
    if config["image_dim"] is not None:
        image = torch.randn(batch, IMAGE_LEN, config["image_dim"], generator=gen)
    return x, timestep, text, image


@torch.no_grad()
def run_ref(ref, x, timestep, text, image):
    return ref(x, timestep, text, encoder_hidden_states_image=image, return_dict=False)[0]


@pytest.fixture(scope="module")
def i2v_pair():
    return build_pair(TINY_I2V)


@pytest.mark.parametrize("batch", [1, 3])
@torch.no_grad()
def test_i2v_matches_diffusers(i2v_pair, batch):
    ref, ours = i2v_pair
    x, timestep, text, image = inputs(TINY_I2V, batch)
    expected = run_ref(ref, x, timestep, text, image)
    got = ours(x, timestep, text, image)
    assert got.shape == expected.shape == (batch, 16, 3, 6, 10)
    assert got.dtype == x.dtype
    err = rel_err(got, expected)
    print(f"i2v B={batch}: rel err {err:.2e}")
    assert err <= 1e-5


@torch.no_grad()
def test_i2v_other_shapes_and_float_timesteps(i2v_pair):
    ref, ours = i2v_pair
    x, timestep, text, image = inputs(TINY_I2V, 2, frames=2, height=8, width=4, seed=5)
    timestep = timestep.float() + 0.37  # the flow-matching schedulers give fractional float timesteps
    err = rel_err(ours(x, timestep, text, image), run_ref(ref, x, timestep, text, image))
    print(f"i2v other shape, float t: rel err {err:.2e}")
    assert err <= 1e-5


@torch.no_grad()
def test_batch_entries_are_independent(i2v_pair):
    _, ours = i2v_pair
    x, timestep, text, image = inputs(TINY_I2V, 3, seed=7)
    batched = ours(x, timestep, text, image)
    for i in range(3):
        single = ours(x[i : i + 1], timestep[i : i + 1], text[i : i + 1], image[i : i + 1])
        assert rel_err(batched[i : i + 1], single) <= 1e-5
    assert rel_err(batched[0], batched[1]) > 1e-2  # entries really differ


@pytest.mark.parametrize("cross_attn_norm", [True, False])
@torch.no_grad()
def test_text_only_matches_diffusers(cross_attn_norm):
    config = dict(TINY_T2V, cross_attn_norm=cross_attn_norm)
    ref, ours = build_pair(config, seed=3)
    assert ours.condition_embedder.image_embedder is None and ours.blocks[0].attn2.add_k_proj is None
    x, timestep, text, image = inputs(config, 3, text_len=20, seed=4)
    assert image is None
    err = rel_err(ours(x, timestep, text), run_ref(ref, x, timestep, text, None))
    print(f"t2v cross_attn_norm={cross_attn_norm}: rel err {err:.2e}")
    assert err <= 1e-5


@torch.no_grad()
def test_image_position_embedding_matches_diffusers():
    """FLF2V-style configs: diffusers takes (2B, I, C) and pairs rows; we take the pairs joined, (B, 2I, C)."""
    config = dict(TINY_I2V, pos_embed_seq_len=2 * IMAGE_LEN)
    ref, ours = build_pair(config, seed=8)
    x, timestep, text, image = inputs(config, 2, seed=9)
    image_pairs = torch.randn(4, IMAGE_LEN, config["image_dim"])
    expected = run_ref(ref, x, timestep, text, image_pairs)
    err = rel_err(ours(x, timestep, text, image_pairs.reshape(2, 2 * IMAGE_LEN, -1)), expected)
    print(f"pos_embed: rel err {err:.2e}")
    assert err <= 1e-5


def test_real_config_names_and_shapes_on_meta():
    real = json.loads(REAL_CONFIG.read_text())
    cfg = config_from(WanTransformerConfig, real)
    assert cfg.patch_size == (1, 2, 2) and cfg.image_dim == 1280 and cfg.added_kv_proj_dim == 5120
    with torch.device("meta"):
        ref = WanTransformer3DModel.from_config(real)
        ours = WanTransformer(cfg)
    assert list(ours.buffers()) == []
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert "blocks.39.attn2.add_k_proj.weight" in our_shapes
    assert "condition_embedder.image_embedder.ff.net.0.proj.weight" in our_shapes


def test_checkpoint_name():
    assert WanTransformer.checkpoint_name("blocks.3.attn2.norm_added_q.weight") is None
    for name in ["blocks.3.attn2.norm_added_k.weight", "blocks.0.scale_shift_table", "proj_out.bias"]:
        assert WanTransformer.checkpoint_name(name) == name


def test_fp32_params_follow_diffusers_rule():
    config = dict(TINY_I2V)
    with torch.device("meta"):
        ref = WanTransformer3DModel(**config)
        ours = WanTransformer(config_from(WanTransformerConfig, config))
    assert set(WanTransformer.fp32_params) <= set(ref._keep_in_fp32_modules)
    kept = {n for n, _ in ours.named_parameters() if set(n.split(".")) & set(WanTransformer.fp32_params)}
    ref_kept = {n for n, _ in ref.named_parameters() if set(n.split(".")) & set(ref._keep_in_fp32_modules)}
    assert kept == ref_kept
    assert "condition_embedder.time_embedder.linear_1.weight" in kept and "blocks.1.norm2.weight" in kept


def to_mixed_bf16(model: torch.nn.Module, keep: tuple[str, ...]) -> torch.nn.Module:
    """bf16 everywhere except parameters with a dot-separated name part in `keep` (what the loader does)."""
    for name, p in model.named_parameters():
        if not set(name.split(".")) & set(keep):
            p.data = p.data.to(torch.bfloat16)
    return model


@torch.no_grad()
def test_bf16_with_fp32_params(i2v_pair):
    ref, ours = i2v_pair
    x, timestep, text, image = inputs(TINY_I2V, 2, seed=11)
    expected_fp32 = ours(x, timestep, text, image)

    bf16 = lambda t: t.to(torch.bfloat16)  # noqa: E731
    ours_bf16 = to_mixed_bf16(WanTransformer(ours.config).eval(), WanTransformer.fp32_params)
    ours_bf16.load_state_dict(ours.state_dict())  # copies into the existing dtypes
    assert ours_bf16.blocks[0].scale_shift_table.dtype == torch.float32
    assert ours_bf16.blocks[0].attn1.to_q.weight.dtype == torch.bfloat16
    got = ours_bf16(bf16(x), timestep, bf16(text), bf16(image))
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    err_fp32 = rel_err(got, expected_fp32)

    ref_bf16 = to_mixed_bf16(WanTransformer3DModel(**TINY_I2V).eval(), tuple(ref._keep_in_fp32_modules))
    ref_bf16.load_state_dict(ref.state_dict())
    expected_bf16 = run_ref(ref_bf16, bf16(x), timestep, bf16(text), bf16(image))
    err_ref = rel_err(got, expected_bf16)
    ref_err_fp32 = rel_err(expected_bf16, expected_fp32)
    print(f"bf16: rel err vs fp32 {err_fp32:.2e} (diffusers bf16: {ref_err_fp32:.2e}), vs diffusers bf16 {err_ref:.2e}")
    assert err_fp32 <= 5e-2
    assert err_fp32 <= 1.25 * ref_err_fp32  # as accurate as diffusers in the same precision
    # Not bit-equal: diffusers slices the text out of a concatenated [image ; text] tensor, and bf16 CPU GEMMs
    # round differently on non-contiguous inputs. Allow two bf16 steps (2 * 2^-7) of the output's scale.
    assert err_ref <= 2**-6
