"""The command line: the authors' invocation writes the asked-for mp4; bad input fails in one line, leaving
nothing behind; the presets equal the authors' configs; the offline demo."""

import importlib.util
import os
import shutil
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import yaml

from minialg.config import load_config

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("cli", ROOT / "cli.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)

CONFIG = {
    "model": {"path": "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers", "dtype": "float32"},
    "generation": {"num_frames": 9, "num_inference_steps": 2, "guidance_scale": 5.0, "height": 32, "width": 48},
    "alg": {"use_low_pass_guidance": True, "lp_filter_type": "down_up", "lp_filter_in_latent": True,
            "lp_blur_sigma": None, "lp_blur_kernel_size": None, "lp_resize_factor": 0.4,
            "lp_strength_schedule_type": "interval", "schedule_blur_kernel_size": False,
            "schedule_interval_start_time": 0.0, "schedule_interval_end_time": 0.2},
    "video": {"fps": 8},
}


@pytest.fixture
def run(tmp_path, tiny_wan, test_image):
    """Run the CLI in-process with a config edited by `change`; returns (exit code, stderr, output path)."""
    from PIL import Image

    image = tmp_path / "input.png"
    Image.fromarray(test_image).save(image)

    def go(change=None, extra=(), image_path=image, model=tiny_wan, capsys=None):
        config = yaml.safe_load(yaml.safe_dump(CONFIG))
        for section, values in (change or {}).items():
            config.setdefault(section, {}).update(values)
        (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
        output = tmp_path / "out.mp4"
        argv = ["--config", str(tmp_path / "c.yaml"), "--image_path", str(image_path), "--prompt", "a ball",
                "--output_path", str(output), "--model", str(model), "--device", "cpu", *extra]
        return cli.main(argv), output

    return go


def read_video(path):
    with av.open(str(path)) as container:
        stream = container.streams.video[0]
        frames = [f.to_ndarray(format="rgb24") for f in container.decode(stream)]
        return frames, stream.codec_context.name, float(stream.average_rate)


def test_official_command_line_writes_the_asked_for_video(tmp_path, tiny_wan, test_image):
    from PIL import Image

    Image.fromarray(test_image).save(tmp_path / "city.png")
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(CONFIG))
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--config", str(tmp_path / "c.yaml"),
                          "--image_path", str(tmp_path / "city.png"), "--prompt", "A car chase at night.",
                          "--output_path", str(tmp_path / "city.mp4"), "--model", str(tiny_wan)],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    frames, codec, fps = read_video(tmp_path / "city.mp4")
    assert len(frames) == 9 and frames[0].shape == (32, 48, 3) and codec == "h264" and fps == 8
    assert "wrote" in out.stdout and "9 frames" in out.stdout
    assert [p.name for p in tmp_path.iterdir() if p.name.startswith(".")] == []  # no temporary file left


def test_seed_flag_reaches_the_pipeline_and_defaults_to_42(run, monkeypatch):
    # tiny H.264 encodes of equal frames are not always byte-equal (x264 here), so the seed is checked where it
    # acts; equal seeds giving equal frames is tested at the pipeline (test_pipeline.py)
    import minialg.pipeline

    seeds, call = [], minialg.pipeline.Pipeline.__call__
    monkeypatch.setattr(minialg.pipeline.Pipeline, "__call__",
                        lambda self, *a, **kw: seeds.append(kw["seed"]) or call(self, *a, **kw))
    assert run()[0] == 0 and run(extra=["--seed", "3"])[0] == 0 and run({"generation": {"seed": 5}})[0] == 0
    assert seeds == [42, 3, 5]


def test_num_frames_not_4k_plus_1_is_rounded_with_a_visible_warning(tmp_path, tiny_wan, test_image):
    from PIL import Image

    Image.fromarray(test_image).save(tmp_path / "i.png")
    config = dict(CONFIG, generation=dict(CONFIG["generation"], num_frames=10))
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config))
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--config", str(tmp_path / "c.yaml"), "--image_path",
                          str(tmp_path / "i.png"), "--prompt", "p", "--output_path", str(tmp_path / "o.mp4"),
                          "--model", str(tiny_wan)], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "warning: num_frames must be 4k+1: rounding 10 to 9" in out.stderr
    assert len(read_video(tmp_path / "o.mp4")[0]) == 9


def broken_checkpoint(tiny_wan, tmp_path, how):
    folder = tmp_path / "broken"
    shutil.copytree(tiny_wan, folder)
    weights = folder / "vae" / "diffusion_pytorch_model.safetensors"
    if how == "component":
        shutil.rmtree(folder / "vae")
    elif how == "weights":
        weights.write_bytes(weights.read_bytes()[:-100])
    return folder


@pytest.mark.parametrize("case, message", [
    ("missing image", "nowhere.png"),
    ("undecodable image", "not.png"),
    ("height", "height must be a positive multiple of 16, got 30"),
    ("steps", "num_inference_steps must be at least 1, got 0"),
    ("typo", "lp_resize_facor.*did you mean lp_resize_factor"),
    ("wrong type", "guidance_scale"),
    ("out of range", "lp_resize_factor"),
    ("unknown section key", "unknown key 'fsp'"),
    ("missing model", "model folder not found"),
    ("missing component", r"missing file: .*vae.config\.json"),
    ("truncated weights", r"diffusion_pytorch_model\.safetensors.*truncated"),
])
def test_bad_input_fails_in_one_line_and_leaves_nothing(run, tmp_path, tiny_wan, capsys, case, message):
    kwargs = {
        "missing image": dict(image_path=tmp_path / "nowhere.png"),
        "height": dict(change={"generation": {"height": 30}}),
        "steps": dict(change={"generation": {"num_inference_steps": 0}}),
        "typo": dict(change={"alg": {"lp_resize_facor": 0.3}}),
        "wrong type": dict(change={"generation": {"guidance_scale": "high"}}),
        "out of range": dict(change={"alg": {"lp_resize_factor": 1.5}}),
        "unknown section key": dict(change={"video": {"fsp": 8}}),
        "missing model": dict(model=tmp_path / "no-such-model"),
    }.get(case, {})
    if case in ("missing component", "truncated weights"):
        kwargs = dict(model=broken_checkpoint(tiny_wan, tmp_path, case.split()[1]))
    if case == "undecodable image":
        (tmp_path / "not.png").write_text("this is not an image")
        kwargs = dict(image_path=tmp_path / "not.png")
    code, output = run(**kwargs)
    err = capsys.readouterr().err.strip()
    assert code != 0
    assert err.startswith("error: ") and len(err.splitlines()) == 1, err
    import re
    assert re.search(message, err), err
    assert not output.exists() and not any(p.name.startswith(".out") for p in tmp_path.iterdir())


def test_errors_reach_the_shell_without_a_traceback(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--config", "wan_alg", "--image_path",
                          str(tmp_path / "missing.png"), "--prompt", "p", "--output_path", str(tmp_path / "o.mp4")],
                         capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode != 0 and "Traceback" not in out.stderr and out.stderr.startswith("error: ")
    assert not (tmp_path / "o.mp4").exists()


@pytest.mark.parametrize("name", ["wan_alg", "wan_default"])
def test_presets_equal_the_authors_configs_with_flow_shift_written_out(name):
    config = load_config(name)
    assert config.model == "Wan-AI/Wan2.1-I2V-14B-480P-Diffusers" and config.dtype == "bfloat16" and config.fps == 16
    assert config.generation == dict(num_frames=81, num_inference_steps=50, guidance_scale=5.0, height=480,
                                     width=832, flow_shift=5.0)
    alg = config.alg
    assert alg.use_low_pass_guidance == (name == "wan_alg")
    if name == "wan_alg":
        assert (alg.lp_filter_type, alg.lp_filter_in_latent, alg.lp_resize_factor) == ("down_up", True, 0.4)
        assert (alg.lp_strength_schedule_type, alg.schedule_interval_start_time,
                alg.schedule_interval_end_time) == ("interval", 0.0, 0.2)
        assert alg.lp_blur_sigma == 15.0 and alg.schedule_linear_end_time == 0.5  # nulls take the defaults


def test_demo_runs_offline_and_says_the_weights_are_random(tmp_path):
    env = dict(os.environ, HF_HUB_OFFLINE="1")
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "demo", "--output_path", str(tmp_path / "d.mp4")],
                         capture_output=True, text=True, cwd=tmp_path, env=env)
    assert out.returncode == 0, out.stderr
    assert "RANDOM weights" in out.stdout and "noise" in out.stdout
    frames, codec, _ = read_video(tmp_path / "d.mp4")
    assert len(frames) == 17 and frames[0].shape == (64, 96, 3) and codec == "h264"
    assert np.std(frames) > 5  # not a blank video


def test_official_command_line_with_the_cogvideox_preset_and_a_local_model(tmp_path, tiny_cogvideox, test_image):
    from PIL import Image

    Image.fromarray(test_image).save(tmp_path / "boat.png")
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--config", "cogvideox_alg", "--image_path",
                          str(tmp_path / "boat.png"), "--prompt", "A group of people whitewater rafting.",
                          "--output_path", str(tmp_path / "boat.mp4"), "--model", str(tiny_cogvideox), "--dtype",
                          "float32"], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    frames, codec, fps = read_video(tmp_path / "boat.mp4")
    assert len(frames) == 49 and frames[0].shape == (32, 48, 3) and codec == "h264" and fps == 12  # preset: 49 @ 12


def test_cogvideox_demo_runs_offline(tmp_path):
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "demo", "--family", "cogvideox", "--output_path",
                          str(tmp_path / "d.mp4")], capture_output=True, text=True, cwd=tmp_path,
                         env=dict(os.environ, HF_HUB_OFFLINE="1"))
    assert out.returncode == 0, out.stderr
    frames, codec, _ = read_video(tmp_path / "d.mp4")
    assert len(frames) == 17 and frames[0].shape == (64, 96, 3) and np.std(frames) > 5


def test_compile_and_stream_blocks_flags_keep_the_video(run, tmp_path, monkeypatch):
    import torch

    frames, compiled = {}, []
    monkeypatch.setattr(cli.media, "write_video", lambda f, path, fps: frames.setdefault(len(frames), f))
    monkeypatch.setattr(torch, "compile", lambda fn, **kw: compiled.append(fn) or torch._dynamo.optimize("eager")(fn))
    assert run()[0] == 0 and run(extra=["--compile", "--stream_blocks"])[0] == 0
    assert len(compiled) == 2  # the tiny Wan's two blocks, each compiled on its own
    assert torch.equal(frames[0], frames[1])


def test_no_cache_flag_reaches_load_and_keeps_the_video(run, monkeypatch):
    import torch

    frames, flags, load = [], [], cli.minialg.load
    monkeypatch.setattr(cli.media, "write_video", lambda f, path, fps: frames.append(f))
    monkeypatch.setattr(cli.minialg, "load", lambda *a, **kw: flags.append(kw["cache_cross_attention"]) or load(*a, **kw))
    assert run()[0] == 0 and run(extra=["--no_cache"])[0] == 0
    assert flags == [True, False] and torch.equal(frames[0], frames[1])


def test_download_fetches_a_named_model_into_weights(tmp_path, monkeypatch, capsys):
    import huggingface_hub

    from minialg import checkpoint

    calls = []
    monkeypatch.setattr(checkpoint, "WEIGHTS_DIR", tmp_path / "weights")
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda repo, **kw: calls.append((repo, kw)))
    assert cli.main(["download", "THUDM/CogVideoX-5b-I2V"]) == 0
    assert calls[0][0] == "THUDM/CogVideoX-5b-I2V" and calls[0][1]["local_dir"] == tmp_path / "weights" / "CogVideoX-5b-I2V"
    assert "downloaded THUDM/CogVideoX-5b-I2V" in capsys.readouterr().out

    def offline(repo, **kw):
        raise OSError("no route to host\nmore detail")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", offline)
    assert cli.main(["download", "THUDM/CogVideoX-5b-I2V"]) != 0
    assert capsys.readouterr().err.strip() == "error: could not download THUDM/CogVideoX-5b-I2V: OSError: no route to host"
