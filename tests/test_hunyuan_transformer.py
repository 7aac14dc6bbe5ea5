"""minialg's HunyuanVideo transformer against diffusers' HunyuanVideoTransformer3DModel on tiny random models
shrunk from the published HunyuanVideo-I2V config, saved by diffusers and loaded by minialg's checkpoint loader.

Every comparison is bit-exact (torch.equal), float32 and bf16: minialg runs the same float ops in the same order
on the same memory layouts (RoPE tables built per axis like diffusers, adaLN rows applied per token range,
attention on (B, S, N, Dh) tensors transposed for SDPA, the same boolean masks)."""

import json
from pathlib import Path

import pytest
import torch
from diffusers import HunyuanVideoTransformer3DModel

from minialg import checkpoint
from minialg.checkpoint import config_from
from minialg.models.hunyuan import HunyuanVideoTransformer, HunyuanVideoTransformerConfig

REAL_CONFIG = (Path(__file__).resolve().parent.parent / "minialg" / "real_configs" / "HunyuanVideo-I2V" /
               "transformer" / "config.json")
REAL = {k: v for k, v in json.loads(REAL_CONFIG.read_text()).items() if not k.startswith("_")}
# the real config shrunk; mlp_ratio 2 also checks that the token refiner keeps its fixed MLP ratio of 4
TINY = dict(REAL, num_attention_heads=2, attention_head_dim=24, rope_axes_dim=[4, 10, 10], num_layers=2,
            num_single_layers=2, num_refiner_layers=2, mlp_ratio=2.0, text_embed_dim=32, pooled_projection_dim=20)
VARIANTS = {  # (image_condition_type, guidance_embeds): in_channels
    ("token_replace", True): 16,  # the published HunyuanVideo-I2V
    ("token_replace", False): 16,
    ("latent_concat", False): 33,  # HunyuanVideo-I2V-33ch
    ("latent_concat", True): 33,
    (None, True): 16,  # text-to-video HunyuanVideo
}
TEXT_LEN = 9
LENGTHS = [9, 4]  # prompts cut at different lengths in one batch


def tiny_config(image_condition_type, guidance_embeds) -> dict:
    return dict(TINY, image_condition_type=image_condition_type, guidance_embeds=guidance_embeds,
                in_channels=VARIANTS[(image_condition_type, guidance_embeds)])


def save_reference(config: dict, folder: Path, seed: int = 0) -> HunyuanVideoTransformer3DModel:
    """diffusers' model with every default init perturbed, saved in its own on-disk layout and loaded back.

    The oracle is the loaded model: both loaders leave CPU tensors in the memory-mapped files (8-byte, not
    64-byte aligned), and CPU matrix-vector products (batch 1) round by alignment, so weights in fresh memory
    differ from loaded ones by an ulp there; loaded against loaded, the results are bit-equal."""
    torch.manual_seed(seed)
    ref = HunyuanVideoTransformer3DModel(**config).eval()
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in ref.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * 0.2)
    ref.save_pretrained(folder)
    return HunyuanVideoTransformer3DModel.from_pretrained(folder).eval()


def inputs(config: dict, lengths=LENGTHS, frames=3, height=4, width=6, seed=1, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    batch = len(lengths)
    x = torch.randn(batch, config["in_channels"], frames, height, width, generator=gen).to(dtype)
    timestep = torch.tensor([937.5, 41.0])[:batch]  # float timesteps, as the flow-matching scheduler gives
    text = torch.randn(batch, TEXT_LEN, config["text_embed_dim"], generator=gen).to(dtype)
    text_mask = (torch.arange(TEXT_LEN)[None, :] < torch.tensor(lengths)[:, None]).to(torch.int64)
    pooled = torch.randn(batch, config["pooled_projection_dim"], generator=gen).to(dtype)
    guidance = (torch.tensor([6000.0, 3500.0])[:batch]).to(dtype) if config["guidance_embeds"] else None
    return x, timestep, text, text_mask, pooled, guidance


@torch.no_grad()
def run_ref(ref, x, timestep, text, text_mask, pooled, guidance):
    return ref(x, timestep, text, text_mask, pooled, guidance, return_dict=False)[0]


@pytest.mark.parametrize("kind", list(VARIANTS), ids=[f"{k}-guidance={g}" for k, g in VARIANTS])
@torch.no_grad()
def test_matches_diffusers_bit_for_bit(tmp_path, kind):
    config = tiny_config(*kind)
    ref = save_reference(config, tmp_path)
    ours = checkpoint.load(HunyuanVideoTransformer, HunyuanVideoTransformerConfig, tmp_path)
    assert (ours.config.image_condition_type, ours.config.guidance_embeds) == kind
    args = inputs(config)
    expected = run_ref(ref, *args)
    got = ours(*args)
    assert got.shape == expected.shape == (2, 16, 3, 4, 6) and got.dtype == torch.float32
    print(f"{kind}: max abs {(got - expected).abs().max():.1e} of {expected.abs().max():.1f}")
    assert torch.equal(got, expected)

    # a batch of one, odd frame count and a longer, fully kept prompt
    args = inputs(config, lengths=[TEXT_LEN], frames=2, height=6, width=2, seed=3)
    assert torch.equal(ours(*args), run_ref(ref, *args))


@pytest.fixture(scope="module")
def i2v(tmp_path_factory):
    """The published kind (token_replace, guidance embedded): diffusers' model and minialg's, loaded."""
    folder = tmp_path_factory.mktemp("hunyuan-i2v")
    config = tiny_config("token_replace", True)
    ref = save_reference(config, folder, seed=5)
    return config, folder, ref, checkpoint.load(HunyuanVideoTransformer, HunyuanVideoTransformerConfig, folder)


@torch.no_grad()
def test_text_past_each_prompt_is_never_seen(i2v):
    config, _, _, ours = i2v
    x, timestep, text, text_mask, pooled, guidance = inputs(config, seed=7)
    out = ours(x, timestep, text, text_mask, pooled, guidance)
    noisy = text.clone()
    noisy[1, LENGTHS[1]:] += 5 * torch.randn(TEXT_LEN - LENGTHS[1], text.shape[2])
    assert torch.equal(ours(x, timestep, noisy, text_mask, pooled, guidance), out)
    everything = torch.ones_like(text_mask)  # ... but the same change matters once those tokens count
    changed = ours(x, timestep, noisy, everything, pooled, guidance)[1] - ours(x, timestep, text, everything,
                                                                                pooled, guidance)[1]
    assert changed.abs().max() > 1e-2


@torch.no_grad()
def test_bf16_matches_diffusers_bf16_bit_for_bit(i2v):
    """Both loaded in bf16 from the same folder (diffusers keeps nothing of this model in float32)."""
    config, folder, ref, ours = i2v
    ref_bf16 = HunyuanVideoTransformer3DModel.from_pretrained(folder, torch_dtype=torch.bfloat16).eval()
    ours_bf16 = checkpoint.load(HunyuanVideoTransformer, HunyuanVideoTransformerConfig, folder,
                                dtype=torch.bfloat16)
    assert {p.dtype for p in ours_bf16.parameters()} == {torch.bfloat16}
    args = inputs(config, seed=11, dtype=torch.bfloat16)
    expected = run_ref(ref_bf16, *args)
    got = ours_bf16(*args)
    assert got.dtype == torch.bfloat16 and torch.isfinite(got).all()
    assert torch.equal(got, expected)
    fp32 = ours(*(a.float() if a is not None and a.is_floating_point() else a for a in args))
    err = ((got.float() - fp32).abs().max() / fp32.abs().max()).item()
    print(f"bf16 vs float32: rel err {err:.2e}")
    assert 1e-4 < err < 0.1  # it really ran in bf16, and still computes the same function


def test_forward_has_no_data_dependent_host_sync():
    """The whole forward runs on the meta device, where any .item()/.tolist()/data-dependent shape would fail."""
    config = tiny_config("token_replace", True)
    with torch.device("meta"):
        model = HunyuanVideoTransformer(config_from(HunyuanVideoTransformerConfig, config))
        args = [None if a is None else a.to("meta") for a in inputs(config)]
        out = model(*args)
    assert out.shape == (2, 16, 3, 4, 6) and out.device.type == "meta"


def test_guidance_is_required_when_embedded(i2v):
    config, _, _, ours = i2v
    x, timestep, text, text_mask, pooled, _ = inputs(config)
    with pytest.raises(ValueError, match="guidance"):
        ours(x, timestep, text, text_mask, pooled)


def test_config_checks():
    with pytest.raises(ValueError, match="rope_axes_dim"):
        HunyuanVideoTransformerConfig(attention_head_dim=128, rope_axes_dim=(16, 56, 48))
    with pytest.raises(ValueError, match="image_condition_type"):
        HunyuanVideoTransformerConfig(image_condition_type="channel_concat")


def test_real_config_names_and_shapes_on_meta():
    cfg = config_from(HunyuanVideoTransformerConfig, REAL)
    assert cfg.image_condition_type == "token_replace" and cfg.guidance_embeds and cfg.in_channels == 16
    with torch.device("meta"):
        ref = HunyuanVideoTransformer3DModel.from_config(REAL)
        ours = HunyuanVideoTransformer(cfg)
    assert list(ours.buffers()) == []
    ref_shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    our_shapes = {k: tuple(v.shape) for k, v in ours.state_dict().items()}
    assert our_shapes == ref_shapes
    assert "single_transformer_blocks.39.proj_out.weight" in our_shapes
    assert "time_text_embed.guidance_embedder.linear_2.weight" in our_shapes
    assert our_shapes["context_embedder.token_refiner.refiner_blocks.1.ff.net.0.proj.weight"] == (12288, 3072)
    count = sum(v.numel() for v in ours.parameters())
    assert 12.5e9 < count < 13.5e9  # HunyuanVideo's 13B denoiser


def test_fp32_params_follow_diffusers_rule():
    assert HunyuanVideoTransformer3DModel._keep_in_fp32_modules is None
    assert HunyuanVideoTransformer.fp32_params == ()
