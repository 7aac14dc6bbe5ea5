"""The offline checkpoint minialg writes is in the real layout (diffusers loads it and agrees), and the CPU
benchmark runs and compares like for like."""

import json

import numpy as np
import pytest
import torch

import minialg
from minialg import bench
from minialg.checkpoint import config_from, read_json
from minialg.demo import demo_image, write_tiny


@pytest.mark.parametrize("family", ["wan", "cogvideox", "hunyuan_video", "ltx"])
def test_self_written_checkpoint_loads_in_diffusers_and_agrees(tmp_path, family):
    from diffusers import CogVideoXImageToVideoPipeline, WanImageToVideoPipeline
    from PIL import Image

    folder = write_tiny(tmp_path / "tiny", family)
    image = demo_image().numpy()
    pipe = minialg.load(folder, device="cpu", dtype=torch.float32)
    args = dict(height=32, width=48, num_frames=5, num_inference_steps=2)
    extra = {}
    if family == "cogvideox":  # its learned positional embedding fixes the size (and the text length)
        args, extra = dict(height=64, width=96, num_frames=9, num_inference_steps=2), {"max_sequence_length": 16}
        reference = CogVideoXImageToVideoPipeline.from_pretrained(folder, dtype=torch.float32)
    elif family == "hunyuan_video":  # the hand-written tokenizer files read by transformers' tokenizers
        from test_hunyuan_pipeline import reference_pipeline, template_of

        reference, extra = reference_pipeline(folder), {"prompt_template": template_of(pipe), "guidance_scale": 6.0}
    elif family == "ltx":  # the hub folder says LTXPipeline; it runs as LTXImageToVideoPipeline
        from diffusers import LTXImageToVideoPipeline

        args = dict(height=64, width=96, num_frames=9, num_inference_steps=2)
        reference, extra = LTXImageToVideoPipeline.from_pretrained(folder, dtype=torch.float32), {"negative_prompt": ""}
    else:
        reference = WanImageToVideoPipeline.from_pretrained(folder, dtype=torch.float32)
    expected = reference(image=Image.fromarray(image), prompt="a red ball", output_type="np",
                         generator=torch.Generator().manual_seed(42), **args, **extra).frames[0]
    frames = pipe(image, "a red ball", progress=False, **args)
    assert np.abs(frames.numpy() - expected).max() < 5e-4 and expected.std() > 0.01


def test_cpu_bench_reports_both_pipelines_on_the_same_video(tmp_path):
    report = tmp_path / "bench.json"
    bench.main(["--size", "tiny", "--steps", "1", "--repeats", "1", "--frames", "5", "--height", "32",
                "--width", "48", "--compare-diffusers", "--uncached", "--report", str(report)])
    runs = json.loads(report.read_text())["runs"]
    assert [run["model"].split()[0] for run in runs] == ["wan", "cogvideox"]
    for run in runs:
        check_run(run)
        assert run["minialg_uncached_s"] > 0 and run["uncached_equal"]  # the step cache changes no frame


def check_run(run):
    assert run["minialg_s"] > 0 and run["diffusers_s"] > 0 and run["minialg_alg_s"] > 0
    assert run["speedup"] == pytest.approx(run["diffusers_s"] / run["minialg_s"], rel=1e-2)
    assert run["max_abs_diff"] < 5e-4  # the timed runs made the same video
    assert set(run["minialg_stages_s"]) == {"text", "condition", "denoise", "decode"}


def test_bench_motion_mode_reports_time_and_the_measured_flow(tmp_path, monkeypatch):
    """`bench --motion` (shrunk here: the analysis is the same code at any size) times the analysis and checks the
    flow it measured on the panning texture."""
    from minialg import bench

    monkeypatch.setattr(bench, "motion_run", lambda frames, height, width, repeats, device, run=bench.motion_run:
                        run(9, 96, 160, repeats, device))
    bench.main(["--motion", "--repeats", "1", "--device", "cpu", "--report", str(tmp_path / "m.json")])
    run = json.loads((tmp_path / "m.json").read_text())["motion"]
    assert run["wall_s"] > 0 and run["cpu_s"] > 0 and run["frames"] == 9
    assert abs(run["flow_mean_px"] - run["true_flow_px"]) < 0.1 * run["true_flow_px"]


def test_ltx_denoiser_bench_small_configs_against_diffusers(tmp_path):
    """`bench --denoiser --family ltx ltx13b` on the small configs (CPU, float32), compiled (eager backend) and
    streamed: both LTX-Video transformers fed as minialg.families.ltx feeds them (packed tokens, per-token
    timesteps, masked T5 text; the 2B with grid positions and rope_interpolation_scale, the 13B with pixel
    coordinates, and its stage-2 shape too), FLOPs from minialg.flops.ltx_flops (which tests/test_speed.py checks
    against torch's FlopCounterMode), diffusers' LTXVideoTransformer3DModel on the same weights and arguments
    within 1e-5 relative (a wrong position, timestep or mask argument gives 0.08 to 0.6), and the whole runs of
    both ALG presets at 64 x 96 x 9 (the 13B single stage: its presets' upsampler is a hub folder not here)."""
    report_file = tmp_path / "bench.json"
    bench.main(["--denoiser", "--device", "cpu", "--dtype", "float32", "--compare_diffusers", "--compile",
                "--compile-backend", "eager", "--stream_blocks", "--repeats", "1", f"--report={report_file}",
                "--family", "ltx", "ltx13b"])  # either spelling: cli.py's options have underscores
    runs = json.loads(report_file.read_text())["runs"]
    assert [run["family"] for run in runs] == ["ltx", "ltx13b"]
    for run, tokens in zip(runs, ({"2": 180, "3": 180}, {"2": 72, "3": 72, "2 stage2": 288})):
        cfg = config_from(bench.SPECS[run["family"]].config, bench.denoiser_config(run["family"], small=True))
        assert run["small"] and set(run["batches"]) == set(tokens)
        assert run["sdpa"]["ran"] == {run["sdpa"]["order"][0]: 2 * cfg.num_layers}  # self- and cross-attention
        assert run["compiled_graphs"] == len(tokens) and run["streamed_recompiles"] == 0  # one graph per shape
        for key, row in run["batches"].items():
            batch, L = int(key.split()[0]), tokens[key]
            x, t, text, mask, *positions = run["input_shapes"][key]
            assert x == [batch, L, 128] and t == [batch, L] and text == [batch, 16, 32] and mask == [batch, 16]
            assert positions == ([] if run["family"] == "ltx" else [[batch, 3, L]])  # 0.9.0: the grid, not a tensor
            assert row["flops"] == bench.ltx_flops(cfg, (batch, L, 128), 16, L) > 0
            assert row["ms"] > 0 and row["diffusers_ms"] > 0
            assert row["diffusers_max_rel_diff"] <= 1e-5
            assert row["streamed_max_abs_diff"] == 0
    ltx, ltx13b = (run["whole_run"] for run in runs)
    for whole, preset, steps in ((ltx, "ltx_alg", 2), (ltx13b, "ltx13b_alg", 1)):  # 0.9.0's schedule needs 2
        assert whole["preset"] == preset and whole["steps"] == steps and whole["seconds"] > 0
        assert (whole["height"], whole["width"], whole["num_frames"]) == (64, 96, 9)
        assert set(whole["stages_s"]) == {"text", "condition", "denoise", "decode"}  # no upsample stage
    assert "single stage" in ltx13b["note"] and "note" not in ltx


@pytest.mark.parametrize("family", ["ltx", "ltx13b"])
def test_ltx_bench_real_size_layout_and_inputs(tmp_path, family):
    """The real-size whole run's folder (no weights) is the checkpoint's layout: 0.9.0 samples as
    LTXImageToVideoPipeline, the 13B as LTXConditionPipeline 0.9.7 (13.0e9 transformer parameters, 0.9.5+ VAE); and
    the real-size inputs hold the token grids asked for: 2B 704x480x161 -> 21 x 15 x 22, 13B stage 1 768x512 ->
    21 x 16 x 24, stage 2 1536x1024 -> 21 x 32 x 48."""
    from minialg.bench_models import write_configs
    from minialg.registry import pipeline_class

    folder = write_configs(family, tmp_path / family, small=False)
    cls = pipeline_class(folder)
    assert cls.__name__ == "LTXVideo" and cls.conditioned(folder) == (family == "ltx13b")
    assert cls.preset_of(folder) == f"{family}_alg"
    spec = bench.SPECS[family]
    cfg = config_from(spec.config, read_json(folder / "transformer" / "config.json"))
    assert read_json(folder / "transformer" / "config.json") == bench.denoiser_config(family, small=False)
    with torch.device("meta"):
        transformer = spec.model(cfg)
    assert sum(p.numel() for p in transformer.parameters()) / 1e9 == pytest.approx(
        1.92 if family == "ltx" else 13.04, abs=0.01)
    grids = {"": (21, 15, 22)} if family == "ltx" else {"": (21, 16, 24), "stage2": (21, 32, 48)}
    for stage, (f, h, w) in grids.items():
        args = bench.denoiser_inputs(family, cfg, 2, False, torch.device("cpu"), torch.bfloat16,
                                     torch.Generator().manual_seed(0), stage)
        x, t, text, mask = args[:4]
        assert x.shape == (2, f * h * w, 128) and text.shape == (2, 128, 4096) and mask.shape == (2, 128)
        assert t.shape == (2, f * h * w) and not t[:, :h * w].any() and t[:, h * w:].min() >= 0
        if family == "ltx":  # LTXImageToVideoPipeline's positions at 25 fps
            assert args[4:] == ((f, h, w), None, (8 / 25, 32, 32))
        else:  # LTXConditionPipeline's: the last token at frame (8 * 20 - 7) / 25 s, pixel (32 (h - 1), 32 (w - 1))
            last = args[5][0, :, -1].tolist()
            assert args[4] is None and last == pytest.approx([153 / 25, 32 * (h - 1), 32 * (w - 1)])
