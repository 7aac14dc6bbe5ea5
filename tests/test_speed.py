"""The speed and memory machinery, on the CPU: the analytic FLOP counts against torch's FlopCounterMode, regional
compilation (one graph per batch size for all blocks, no recompiles between steps, no graph breaks, the same
outputs), blocks streamed by minialg.gpu (the same outputs, every block back on the CPU afterwards), and the
denoiser benchmark's report."""

import json

import pytest
import torch
from torch._dynamo.utils import counters
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.flop_counter import FlopCounterMode

from minialg import bench
from minialg.gpu import blocks_of, compile_blocks, stream_blocks
from minialg.checkpoint import config_from

CPU = torch.device("cpu")
CASES = {  # name -> (family, config): the bench's small configs, and a CogVideoX 1.5 layout beside them
    "wan": ("wan", bench.denoiser_config("wan", small=True)),
    "wan22": ("wan22", bench.denoiser_config("wan22", small=True)),
    "wan22_ti2v": ("wan22_ti2v", bench.denoiser_config("wan22_ti2v", small=True)),  # a timestep per latent frame
    "cogvideox": ("cogvideox", bench.denoiser_config("cogvideox", small=True)),
    "hunyuan_video": ("hunyuan_video", bench.denoiser_config("hunyuan_video", small=True)),
    "hunyuan_video-latent_concat": ("hunyuan_video", dict(bench.denoiser_config("hunyuan_video", small=True),
                                                          image_condition_type="latent_concat", in_channels=33)),
    "cogvideox-1.5": ("cogvideox", dict(bench.denoiser_config("cogvideox", small=True), patch_size_t=2,
                                        ofs_embed_dim=24, patch_bias=False, use_learned_positional_embeddings=False,
                                        sample_frames=13)),  # 4 latent frames: 2 temporal patches
    "ltx": ("ltx", bench.denoiser_config("ltx", small=True)),  # per-token timesteps, masked text, grid positions
    "ltx13b": ("ltx13b", bench.denoiser_config("ltx13b", small=True)),  # pixel coordinates
}


def build(case: str, seed: int = 0):
    family, config = CASES[case]
    model_cls, config_cls, _ = bench.DENOISERS[family]
    cfg = config_from(config_cls, config)
    return family, cfg, bench.random_model(model_cls, cfg, CPU, torch.float32, seed)


def inputs(family: str, cfg, batch: int, seed: int) -> tuple:
    generator = torch.Generator().manual_seed(seed)
    return bench.denoiser_inputs(family, cfg, batch, True, CPU, torch.float32, generator)


@pytest.mark.parametrize("case", list(CASES))
def test_flop_count_equals_torch_flop_counter(case):
    """The analytic count is exact: FlopCounterMode counts matmuls, convolutions and attention (under the math
    SDPA backend attention is two bmm's it sees; it has no formula for the CPU flash kernel); elementwise work
    (norms, RoPE, softmax, GELU, modulation) is counted by neither."""
    family, cfg, model = build(case)
    args = inputs(family, cfg, 3, seed=1)
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*args)
    assert {str(op) for op in counter.get_flop_counts()["Global"]} >= {"aten.addmm", "aten.bmm"}  # attention counted
    assert bench.denoiser_flops(family, cfg, args) == counter.get_total_flops()


@pytest.mark.parametrize("family", ["wan", "wan22", "wan22_ti2v", "cogvideox", "hunyuan_video", "ltx", "ltx13b"])
def test_flop_count_at_the_real_shape(family):
    """At real size and shape (B=3), run on the meta device: no memory, no compute, the same ops counted."""
    model_cls, config_cls, _ = bench.DENOISERS[family]
    cfg = config_from(config_cls, bench.denoiser_config(family, small=False))
    with torch.device("meta"):
        model = model_cls(cfg)
        if family == "wan":  # 480x832, 81 frames
            args = (torch.empty(3, 36, 21, 60, 104), torch.empty(3), torch.empty(3, 512, 4096),
                    torch.empty(3, 257, 1280))
        elif family == "wan22":  # 480x832, 81 frames, no CLIP
            args = (torch.empty(3, 36, 21, 60, 104), torch.empty(3), torch.empty(3, 512, 4096), None)
        elif family == "wan22_ti2v":  # 704x1280, 121 frames, a timestep per latent frame
            args = (torch.empty(3, 48, 31, 44, 80), torch.empty(3, 31), torch.empty(3, 512, 4096), None)
        elif family == "hunyuan_video":  # 352x608, 129 frames, 400 text states
            args = (torch.empty(3, 16, 33, 44, 76), torch.empty(3), torch.empty(3, 400, 4096),
                    torch.ones(3, 400, dtype=torch.int64), torch.empty(3, 768), torch.empty(3))
        elif family == "ltx":  # 704x480, 161 frames: 21 x 15 x 22 tokens, a timestep each; 128 text states
            args = (torch.empty(3, 6930, 128), torch.empty(3, 6930), torch.empty(3, 128, 4096),
                    torch.ones(3, 128, dtype=torch.int64), (21, 15, 22), None, (8 / 25, 32, 32))
        elif family == "ltx13b":  # stage 1, 768x512, 161 frames: 21 x 16 x 24 tokens, positions as coordinates
            args = (torch.empty(3, 8064, 128), torch.empty(3, 8064), torch.empty(3, 128, 4096),
                    torch.ones(3, 128, dtype=torch.int64), None, torch.empty(3, 3, 8064))
        else:  # 480x720, 49 frames
            args = (torch.empty(3, 13, 32, 60, 90), torch.empty(3), torch.empty(3, 226, 4096))
    with torch.no_grad(), sdpa_kernel(SDPBackend.MATH), FlopCounterMode(display=False) as counter:
        model(*args)
    assert bench.denoiser_flops(family, cfg, args) == counter.get_total_flops()


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_compile_blocks_one_graph_per_batch_size(family):
    """A denoising-like loop, B=2 then 3 then 2, new latents and timesteps every step: two graphs in all (one per
    batch size, shared by every block), no recompiles between steps, no graph breaks, and the outputs of the
    uncompiled model."""
    _, cfg, model = build(family)
    steps = [(batch, inputs(family, cfg, batch, seed=10 * i + batch)) for i, batch in enumerate((2, 3, 2)) for _ in
             range(3)]
    steps = [(batch, (args[0] + j, args[1] - 100 * j, *args[2:])) for j, (batch, args) in enumerate(steps)]
    with torch.no_grad():
        expected = [model(*args) for _, args in steps]

        block_args = []
        handle = blocks_of(model)[0].register_forward_pre_hook(lambda module, a: block_args.append(a))
        model(*steps[0][1])
        handle.remove()
        torch._dynamo.reset()
        explanation = torch._dynamo.explain(type(blocks_of(model)[0]).forward)(blocks_of(model)[0], *block_args[0])
        assert explanation.graph_count == 1 and explanation.graph_break_count == 0

        torch._dynamo.reset()
        counters.clear()
        compile_blocks(model, backend="eager")
        for (_, args), want in zip(steps, expected):
            assert torch.equal(model(*args), want)
    assert counters["stats"]["unique_graphs"] == 2
    assert not counters["graph_break"]
    # the frames dynamo compiled: the first call, and the one recompile for B=3 (B=2 comes back from the cache)
    assert counters["frames"]["ok"] == 2


@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_stream_blocks_on_cpu(family):
    """Identical outputs; during a block's call its parameters are device copies; afterwards every block points
    at its CPU tensors again and nothing is left in flight; remove() takes the hooks off."""
    _, cfg, model = build(family)
    args = inputs(family, cfg, 2, seed=3)
    with torch.no_grad():
        expected = model(*args)
        streamer = stream_blocks(model, "cpu")
        host = [{name: p.data_ptr() for name, p in block.named_parameters()} for block in blocks_of(model)]
        seen = []

        def check_copies(block, _, k):
            seen.append(k)
            assert all(p.data_ptr() != host[k][name] for name, p in block.named_parameters())
            assert set(streamer.arriving) == ({k + 1} if k + 1 < len(host) else set())  # the next one is coming

        checks = [block.register_forward_pre_hook(lambda module, a, k=k: check_copies(module, a, k))
                  for k, block in enumerate(blocks_of(model))]  # after streaming's hooks: they see the copies
        got = model(*args)
        assert torch.equal(got, expected)
        assert seen == list(range(len(host)))
        for k, block in enumerate(blocks_of(model)):
            assert {name: p.data_ptr() for name, p in block.named_parameters()} == host[k]
            assert all(p.device.type == "cpu" for p in block.parameters())
        assert streamer.arriving == {}
        assert torch.equal(model(*args), expected)  # a second call works the same

        for check in checks:
            check.remove()
        streamer.remove()
        assert torch.equal(model(*args), expected)
        assert all(not block._forward_pre_hooks and not block._forward_hooks for block in blocks_of(model))


def test_stream_blocks_with_compiled_blocks():
    """Streaming swaps the parameters' tensors before and after each compiled block: no recompiles, same output."""
    family, cfg, model = build("wan")
    args = [inputs(family, cfg, batch, seed=batch) for batch in (2, 3)]
    with torch.no_grad():
        expected = [model(*a) for a in args]
        torch._dynamo.reset()
        counters.clear()
        compile_blocks(model, backend="eager")
        stream_blocks(model, "cpu")
        for _ in range(2):
            for a, want in zip(args, expected):
                assert torch.equal(model(*a), want)
    assert counters["stats"]["unique_graphs"] == 2


@pytest.mark.parametrize("streamed", [False, True], ids=["resident", "streamed"])
@pytest.mark.parametrize("family", ["wan", "cogvideox"])
def test_compile_blocks_with_the_step_cache(family, streamed):
    """A run's loop with the step cache (two distinct texts, ALG's B=3 passes then CFG's B=2): Wan's blocks compute
    the cross-attention keys/values at the first call and take them in after, so three graphs in all (B=3 computing,
    B=3 and B=2 taking), none added by a second run; CogVideoX's blocks see no change, two graphs. The outputs of
    the uncompiled model without a cache; streamed blocks too (their keys/values stay)."""
    _, cfg, model = build(family)
    x, timestep, text, *image = inputs(family, cfg, 2, seed=5)
    extra = {"image": image[0][:1]} if family == "wan" else {}  # one image for every pass, as the pipeline
    steps = [(x[:1].expand(len(passes), *x.shape[1:]) + i, timestep[:1].expand(len(passes)) - 50 * i, passes)
             for i, passes in enumerate([(1, 0, 1)] * 2 + [(1, 0)] * 3)]
    with torch.no_grad():
        expected = [model(xs, ts, text, passes=passes, **extra) for xs, ts, passes in steps]
        torch._dynamo.reset()
        counters.clear()
        compile_blocks(model, backend="eager")
        if streamed:
            stream_blocks(model, "cpu")
        for _ in range(2):  # two runs, each with its own cache
            cache = {}
            for (xs, ts, passes), want in zip(steps, expected):
                assert torch.equal(model(xs, ts, text, passes=passes, cache=cache, **extra), want)
    assert counters["stats"]["unique_graphs"] == (3 if family == "wan" else 2)
    assert not counters["graph_break"]


@pytest.mark.parametrize("families", [["wan", "cogvideox"], ["wan22", "wan22_ti2v", "hunyuan_video"]])
def test_bench_denoiser_mode_on_cpu(tmp_path, families):
    """The small configs, B=2 and 3, compiled (eager backend), streamed, against diffusers (float32: the same
    numbers), and the whole-run timing: the report holds every figure, consistent with itself."""
    report_file = tmp_path / "bench.json"
    bench.main(["--denoiser", "--device", "cpu", "--dtype", "float32", "--compile", "--compile-backend", "eager",
                "--compare-diffusers", "--stream-blocks", "--repeats", "1", "--report", str(report_file),
                "--family", *families])
    report = json.loads(report_file.read_text())
    assert report["matmul_tflops"] > 0
    assert [run["family"] for run in report["runs"]] == families
    for run in report["runs"]:
        assert run["small"] and run["device"] == "cpu" and run["compile"]
        assert run["sdpa"]["order"][0] in run["sdpa"]["probe_ms"]
        assert set(run["sdpa"]["ran"]) == {run["sdpa"]["order"][0]}  # the fastest backend is the one that ran
        kinds = 2 if run["family"] == "hunyuan_video" else 1  # HunyuanVideo: double- and single-stream blocks
        assert run["compiled_graphs"] == 2 * kinds and run["streamed_recompiles"] == 0  # one per kind and batch
        assert set(run["batches"]) == {"2", "3"}
        model_cls, config_cls, _ = bench.DENOISERS[run["family"]]
        cfg = config_from(config_cls, bench.denoiser_config(run["family"], small=True))
        for batch, row in run["batches"].items():
            shapes = run["input_shapes"][batch]
            assert all(shape[0] == int(batch) for shape in shapes)
            if run["family"].startswith("wan"):  # shapes: x, timestep, text (and Wan 2.1's image)
                image = shapes[3][1] if len(shapes) > 3 else 0
                timesteps = shapes[1][1] if len(shapes[1]) == 2 else 1
                assert row["flops"] == bench.wan_flops(cfg, tuple(shapes[0]), shapes[2][1], image, timesteps)
            elif run["family"] == "hunyuan_video":
                assert row["flops"] == bench.hunyuan_flops(cfg, tuple(shapes[0]), shapes[2][1])
            else:
                assert row["flops"] == bench.cogvideox_flops(cfg, tuple(shapes[0]), shapes[2][1])
            assert row["ms"] > 0 and row["tflops"] == pytest.approx(row["flops"] / row["ms"] / 1e9, rel=1e-2)
            assert row["mfu"] == pytest.approx(row["tflops"] / report["matmul_tflops"], rel=1e-2)
            assert row["peak_memory_gib"] is None  # a CPU has no allocator statistics to report
            assert row["diffusers_ms"] > 0 and row["diffusers_max_rel_diff"] <= 1e-5
            assert row["diffusers_over_minialg"] == pytest.approx(row["diffusers_ms"] / row["ms"], rel=1e-2)
            assert row["streamed_ms"] > 0 and row["streamed_max_abs_diff"] == 0
        whole = run["whole_run"]
        assert whole["preset"] == f"{run['family']}_alg" and whole["steps"] == 1 and whole["seconds"] > 0
        assert set(whole["stages_s"]) == {"text", "condition", "denoise", "decode"}
