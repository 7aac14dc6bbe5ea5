"""Step-invariant work done once per run (issue 13): every block's cross-attention keys and values (Wan), the
rotary and positional tables, the projected text (CogVideoX) and the latent ALG condition of a constant strength.

The video with the cache equals the video without it, bit for bit (float32 and bf16, CPU), for every family and
guidance mode, streamed and compiled; the cached work really runs once (counted), and nothing stays on the device
after a run.
"""

import pytest
import torch
from torch._dynamo.utils import counters

import minialg
from minialg import alg as lowpass
from minialg import gpu
from minialg.demo import demo_image, write_tiny
from minialg.models import wan

PROMPT = "a red ball bouncing on a wooden floor"
WAN_FAMILIES = ["wan", "wan22", "wan22_ti2v"]  # Wan 2.1 I2V (CLIP image tokens), 2.2 A14B (two experts), TI2V
ALG_LATENT = dict(use_low_pass_guidance=True, lp_filter_type="down_up", lp_filter_in_latent=True,
                  lp_resize_factor=0.4, lp_strength_schedule_type="interval", schedule_interval_end_time=0.5)
ALG_PIXEL = dict(use_low_pass_guidance=True, lp_filter_type="gaussian_blur", lp_filter_in_latent=False,
                 lp_blur_sigma=3.0, lp_blur_kernel_size=5, lp_strength_schedule_type="linear")
MODES = {"cfg": {}, "no-cfg": dict(guidance_scale=1.0), "alg-latent": dict(alg=ALG_LATENT),
         "alg-pixel": dict(alg=ALG_PIXEL)}


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    root = tmp_path_factory.mktemp("step-cache")
    return {family: write_tiny(root / family, family) for family in WAN_FAMILIES + ["cogvideox"]}


@pytest.fixture(scope="module")
def pipes(folders):
    """(cached, uncached) float32 pipelines of each family, loaded once."""
    return {family: (minialg.load(folder, device="cpu", dtype=torch.float32),
                     minialg.load(folder, device="cpu", dtype=torch.float32, cache_cross_attention=False))
            for family, folder in folders.items()}


def generate(pipe, steps=4, **kwargs):
    size = dict(height=32, width=64) if pipe.family == "wan" else {}  # CogVideoX: its fixed size
    return pipe(demo_image(), PROMPT, seed=42, num_frames=9, num_inference_steps=steps, progress=False,
                **dict(size, **kwargs))


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("family", WAN_FAMILIES + ["cogvideox"])
def test_cached_video_equals_uncached_video(pipes, family, mode):
    cached, uncached = pipes[family]
    assert cached.cache_steps and not uncached.cache_steps
    frames = generate(cached, **MODES[mode])
    assert torch.equal(frames, generate(uncached, **MODES[mode]))
    assert frames.std() > 0.01 and cached.step_caches == {}  # a real video; the cache is gone after the run


@pytest.fixture
def tables(monkeypatch):
    """The rotary tables Wan computes, counted."""
    original, made = wan.rope_cos_sin, []
    monkeypatch.setattr(wan, "rope_cos_sin", lambda *args: made.append(args) or original(*args))
    return made


@pytest.mark.parametrize("cached", [True, False], ids=["cached", "uncached"])
@pytest.mark.parametrize("family", ["wan", "wan22"])
def test_keys_values_embedders_and_tables_are_computed_once_per_expert(pipes, tables, family, cached):
    """Cross-attention k/v projections, text and image embedders, the rotary table: once per run and expert with
    the cache, at every step without. Wan 2.2 A14B switches experts within the run: each fills its own cache."""
    pipe = pipes[family][0 if cached else 1]
    experts = [m for m in (pipe.transformer, getattr(pipe, "transformer_2", None)) if m is not None]
    calls, steps = {id(m): [] for m in experts}, {id(m): [] for m in experts}
    parts = [(m, part) for m in experts for part in (m.blocks[0].attn2.to_k, m.blocks[-1].attn2.to_v,
                                                     m.condition_embedder.text_embedder,
                                                     m.condition_embedder.image_embedder) if part is not None]
    handles = [part.register_forward_hook(lambda *_, m=m: calls[id(m)].append(1)) for m, part in parts]
    handles += [m.register_forward_hook(lambda *_, m=m: steps[id(m)].append(1)) for m in experts]
    generate(pipe, steps=4)
    for handle in handles:
        handle.remove()
    assert all(steps[id(m)] for m in experts) and sum(map(len, steps.values())) == 4  # A14B: both experts ran
    per_call = 4 if family == "wan" else 3  # Wan 2.1 also embeds the CLIP image tokens
    for m in experts:
        assert len(calls[id(m)]) == per_call * (1 if cached else len(steps[id(m)]))
    assert len(tables) == (len(experts) if cached else 4)


def test_latent_condition_of_a_constant_strength_is_filtered_once(pipes, monkeypatch):
    original, strengths = lowpass.low_pass, []
    monkeypatch.setattr(lowpass, "low_pass", lambda x, cfg, s: strengths.append(s) or original(x, cfg, s))
    generate(pipes["wan"][0], alg=ALG_LATENT)  # interval: strength 1 at steps 0 and 1 of 4
    assert strengths == [1.0]
    strengths.clear()
    generate(pipes["wan"][1], alg=ALG_LATENT)
    assert strengths == [1.0, 1.0]


@pytest.mark.parametrize("family", ["wan", "wan22"])
def test_streamed_cached_video_equals_uncached_video(folders, pipes, family):
    """The cache holds activations: a streamed block's weights go back to the CPU, its keys and values stay."""
    streamed = minialg.load(folders[family], device="cpu", dtype=torch.float32, stream_blocks=True)
    for mode in ("cfg", "alg-latent"):
        assert torch.equal(generate(streamed, **MODES[mode]), generate(pipes[family][1], **MODES[mode]))


def test_compiled_cached_video_equals_uncached_video_with_three_graphs(folders, pipes):
    """Regional compilation (eager backend): an ALG run (3 passes at steps 0-1, then 2) compiles three block graphs,
    shared by all blocks: B=3 computing the keys/values (step 0), B=3 and B=2 taking them in; no graph breaks."""
    pipe = minialg.load(folders["wan"], device="cpu", dtype=torch.float32)
    torch._dynamo.reset()
    counters.clear()
    gpu.compile_blocks(pipe.transformer, backend="eager")
    frames = generate(pipe, steps=6, alg=ALG_LATENT)
    assert counters["stats"]["unique_graphs"] == 3 and not counters["graph_break"]
    assert torch.equal(frames, generate(pipes["wan"][1], steps=6, alg=ALG_LATENT))
    generate(pipe, steps=6, alg=ALG_LATENT)  # a second run: the same graphs, no recompilation
    assert counters["stats"]["unique_graphs"] == 3
    torch._dynamo.reset()


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_bf16_cached_video_equals_uncached_video(folders, family):
    cached = minialg.load(folders[family], device="cpu", dtype="bfloat16")
    uncached = minialg.load(folders[family], device="cpu", dtype="bfloat16", cache_cross_attention=False)
    for mode in ("cfg", "alg-latent"):
        assert torch.equal(generate(cached, steps=3, **MODES[mode]), generate(uncached, steps=3, **MODES[mode]))


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_passes_pick_text_rows_like_a_batch_of_texts(pipes, family):
    """The transformer with distinct texts and a row per pass (the cache's form) equals it with the batch's texts
    written out, as diffusers takes them; a cached second call equals an uncached one. (Text and image lengths as
    in real use: CPU matmuls of a few rows, M < ~14, can round a row differently with the row count.)"""
    model = pipes[family][0].transformer
    g = torch.Generator().manual_seed(0)
    if family == "wan":
        x, text, image = torch.randn(3, 36, 3, 4, 6, generator=g), torch.randn(2, 64, 32, generator=g), \
            torch.randn(1, 32, 32, generator=g)
        full = dict(text=text[[1, 0, 1]], image=image.expand(3, -1, -1))
        rows = dict(text=text, image=image, passes=(1, 0, 1))
    else:
        cfg = model.config
        x = torch.randn(3, 3, cfg.in_channels, cfg.sample_height, cfg.sample_width, generator=g)
        text = torch.randn(2, cfg.max_text_seq_length, cfg.text_embed_dim, generator=g)
        full, rows = dict(text=text[[1, 0, 1]]), dict(text=text, passes=(1, 0, 1))
    t = torch.tensor([900.0, 900.0, 900.0])
    with torch.no_grad():
        assert torch.equal(model(x, t, **full), model(x, t, **rows))
        cache = {}
        model(x, t, **rows, cache=cache)
        assert torch.equal(model(x + 1, t - 100, **rows, cache=cache), model(x + 1, t - 100, **rows))
        with pytest.raises(ValueError, match="passes"):
            model(x, t, **dict(rows, passes=(0, 2, 1)))


def test_cache_flag_is_checked(folders):
    with pytest.raises(ValueError, match="cache_cross_attention must be True or False"):
        minialg.load(folders["wan"], device="cpu", cache_cross_attention="no")
