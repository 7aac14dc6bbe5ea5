"""minialg's CogVideoX transformer against diffusers' CogVideoXTransformer3DModel on tiny random models (float32,
CPU), with the rotary tables computed the way diffusers' image-to-video pipeline computes them."""

import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from diffusers import CogVideoXImageToVideoPipeline, CogVideoXTransformer3DModel

from minialg.models.cogvideox import CogVideoXTransformer, CogVideoXTransformerConfig
from minialg.checkpoint import config_from

REAL_CONFIGS = Path(__file__).resolve().parent.parent / "minialg" / "real_configs"
VAE_SCALE_SPATIAL = 8  # pixels per latent pixel; the pipeline's rotary helper takes pixel sizes

TINY_5B_I2V = dict(  # learned positional embedding + rotary, as CogVideoX-5b-I2V
    num_attention_heads=2,
    attention_head_dim=16,
    in_channels=8,
    out_channels=4,
    time_embed_dim=24,
    text_embed_dim=20,
    num_layers=2,
    sample_height=8,
    sample_width=12,
    sample_frames=9,  # 3 latent frames
    patch_size=2,
    max_text_seq_length=7,
    use_rotary_positional_embeddings=True,
    use_learned_positional_embeddings=True,
)
TINY_15_I2V = dict(  # temporal patches, ofs embedding, rotary only, no patch conv bias, as CogVideoX1.5-5B-I2V
    TINY_5B_I2V,
    sample_height=16,
    sample_width=16,
    sample_frames=17,
    patch_size_t=2,
    ofs_embed_dim=24,
    patch_bias=False,
    use_learned_positional_embeddings=False,
)
TINY_2B = dict(  # fixed sin-cos table, no rotary, as CogVideoX-2b
    TINY_5B_I2V, in_channels=4, use_rotary_positional_embeddings=False, use_learned_positional_embeddings=False
)
TINY_5B_T2V = dict(TINY_2B, use_rotary_positional_embeddings=True)  # rotary only, 1.0 grid (crop-resized)

# (config, latent frames, height, width): the sample size, and sizes that take the other code paths
CASES = {
    "5b-i2v": (TINY_5B_I2V, 3, 8, 12),
    "5b-i2v-other-frames": (TINY_5B_I2V, 2, 8, 12),  # diffusers swaps the learned table for the sin-cos one
    "1.5-i2v": (TINY_15_I2V, 4, 8, 12),
    "1.5-i2v-taller": (TINY_15_I2V, 2, 16, 6),
    "2b-sincos": (TINY_2B, 3, 8, 12),
    "2b-sincos-other-size": (TINY_2B, 2, 10, 6),
    "5b-t2v-rotary-other-size": (TINY_5B_T2V, 2, 12, 6),  # non-trivial crop region of the rotary grid
    "5b-t2v-rotary-wide": (TINY_5B_T2V, 3, 6, 16),
}


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def build_pair(config: dict, seed: int = 0) -> tuple[CogVideoXTransformer3DModel, CogVideoXTransformer]:
    torch.manual_seed(seed)
    ref = CogVideoXTransformer3DModel(**config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # every weight random (LayerNorms start at 1/0), the learned table's text rows too
        for t in ref.state_dict().values():
            t.copy_(torch.randn(t.shape, generator=gen, dtype=t.dtype) * 0.3)
    ours = CogVideoXTransformer(config_from(CogVideoXTransformerConfig, dict(ref.config))).eval()
    ours.load_state_dict(ref.state_dict(), strict=True)
    return ref, ours


def pipeline_rotary(ref: CogVideoXTransformer3DModel, frames: int, height: int, width: int):
    """(cos, sin) exactly as CogVideoXImageToVideoPipeline builds them for latents of this size, or None."""
    if not ref.config.use_rotary_positional_embeddings:
        return None
    pipe = SimpleNamespace(vae_scale_factor_spatial=VAE_SCALE_SPATIAL, transformer=ref)
    return CogVideoXImageToVideoPipeline._prepare_rotary_positional_embeddings(
        pipe, height * VAE_SCALE_SPATIAL, width * VAE_SCALE_SPATIAL, frames, torch.device("cpu")
    )


def inputs(config: dict, batch: int, frames: int, height: int, width: int, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, frames, config["in_channels"], height, width, generator=gen)
    timestep = torch.tensor([981, 500, 3][:batch])  # int64, as the DDIM/DPM schedulers give them
    text = torch.randn(batch, config["max_text_seq_length"], config["text_embed_dim"], generator=gen)
    return x, timestep, text


@pytest.mark.parametrize("batch", [1, 3])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_diffusers(case: str, batch: int):
    config, frames, height, width = CASES[case]
    ref, ours = build_pair(config)
    x, timestep, text = inputs(config, batch, frames, height, width)
    ofs = None if config.get("ofs_embed_dim") is None else x.new_full((1,), 2.0)  # as the pipeline passes it
    with torch.no_grad():
        expected = ref(x, text, timestep, ofs=ofs, image_rotary_emb=pipeline_rotary(ref, frames, height, width),
                       return_dict=False)[0]
        got = ours(x, timestep, text, ofs=ofs)
    assert got.shape == expected.shape == (batch, frames, config["out_channels"], height, width)
    assert rel_err(got, expected) <= 1e-5
    if batch == 3:  # entries differ (timestep, text, latent), so a batch mix-up would show
        assert rel_err(got[0], got[1]) > 1e-2


def test_ofs_default_and_float_timesteps():
    """ofs=None means the pipeline's 2.0; another ofs changes the output; fractional timesteps work."""
    ref, ours = build_pair(TINY_15_I2V)
    x, _, text = inputs(TINY_15_I2V, 2, 4, 8, 12)
    timestep = torch.tensor([999.0, 0.25])
    with torch.no_grad():
        expected = ref(x, text, timestep, ofs=torch.full((1,), 2.0),
                       image_rotary_emb=pipeline_rotary(ref, 4, 8, 12), return_dict=False)[0]
        got = ours(x, timestep, text)
        other = ours(x, timestep, text, ofs=torch.full((2,), 1.0))
    assert rel_err(got, expected) <= 1e-5
    assert rel_err(other, expected) > 1e-3


def test_learned_table_used_at_sample_size():
    """At the sample size the learned table (text rows included) is what is added: changing it changes the output."""
    _, ours = build_pair(TINY_5B_I2V)
    x, timestep, text = inputs(TINY_5B_I2V, 1, 3, 8, 12)
    with torch.no_grad():
        before = ours(x, timestep, text)
        table = ours.patch_embed.pos_embedding
        table[:, :7].add_(torch.randn(table[:, :7].shape))  # a constant per token would vanish in the LayerNorm
        after = ours(x, timestep, text)
    assert rel_err(after, before) > 1e-3


@pytest.mark.parametrize("height, width", [(10, 12), (8, 14)])
def test_learned_positions_fix_the_resolution(height: int, width: int):
    ref, ours = build_pair(TINY_5B_I2V)
    x, timestep, text = inputs(TINY_5B_I2V, 1, 3, height, width)
    with pytest.raises(ValueError):  # diffusers refuses too
        ref(x, text, timestep, image_rotary_emb=None)
    with pytest.raises(ValueError, match=rf"{height}x{width} given, 8x12 required") as err:
        ours(x, timestep, text)
    assert "\n" not in str(err.value)


def test_temporal_patches_need_whole_patches():
    _, ours = build_pair(TINY_15_I2V)
    x, timestep, text = inputs(TINY_15_I2V, 1, 3, 8, 12)
    with pytest.raises(ValueError, match="patch_size_t"):
        ours(x, timestep, text)


def test_no_buffers_and_fp32_params():
    _, ours = build_pair(TINY_5B_I2V)
    assert list(ours.buffers()) == []
    assert CogVideoXTransformer.fp32_params == ()


REAL_15_I2V = dict(  # CogVideoX1.5-5B-I2V transformer/config.json (not shipped in real_configs)
    json.loads((REAL_CONFIGS / "CogVideoX-5b-I2V/transformer/config.json").read_text()),
    ofs_embed_dim=512, patch_bias=False, patch_size_t=2, sample_frames=81, sample_height=300, sample_width=300,
    use_learned_positional_embeddings=False,
)


@pytest.mark.parametrize("real", ["5b-i2v", "1.5-i2v"])
def test_real_config_state_dict_on_meta(real: str):
    config = json.loads((REAL_CONFIGS / "CogVideoX-5b-I2V/transformer/config.json").read_text())
    if real == "1.5-i2v":
        config = REAL_15_I2V
    init = {k: v for k, v in config.items() if not k.startswith("_")}
    with torch.device("meta"):
        ref = CogVideoXTransformer3DModel(**init)
        ours = CogVideoXTransformer(config_from(CogVideoXTransformerConfig, config))
    expected = {name: tuple(t.shape) for name, t in ref.state_dict().items()}
    got = {name: tuple(t.shape) for name, t in ours.state_dict().items()}
    assert got == expected
    assert ("patch_embed.pos_embedding" in got) == (real == "5b-i2v")
    assert not hasattr(CogVideoXTransformer, "checkpoint_name")


@pytest.mark.parametrize("case", ["5b-i2v", "1.5-i2v"])
def test_loads_a_saved_checkpoint(case: str, tmp_path: Path):
    """diffusers' save_pretrained folder -> minialg's generic loader (headers checked, learned table included)."""
    from minialg import checkpoint

    config, frames, height, width = CASES[case]
    ref, _ = build_pair(config)
    ref.save_pretrained(tmp_path)
    ours = checkpoint.load(CogVideoXTransformer, CogVideoXTransformerConfig, tmp_path)
    x, timestep, text = inputs(config, 2, frames, height, width)
    ofs = None if config.get("ofs_embed_dim") is None else x.new_full((1,), 2.0)
    with torch.no_grad():
        expected = ref(x, text, timestep, ofs=ofs, image_rotary_emb=pipeline_rotary(ref, frames, height, width),
                       return_dict=False)[0]
        got = ours(x, timestep, text)
    assert rel_err(got, expected) <= 1e-5
