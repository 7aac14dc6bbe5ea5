"""The offline checkpoint minialg writes is in the real layout (diffusers loads it and agrees), and the CPU
benchmark runs and compares like for like."""

import json

import numpy as np
import pytest
import torch

import minialg
from minialg import bench
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
