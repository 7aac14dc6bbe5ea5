"""Wan 2.2 from the command line: the presets carry the official Wan 2.2 defaults, the authors' command line runs
them on local folders (sizes overridden for the tiny checkpoints), the demos run offline, and a family keyword
the checkpoint cannot take fails before any model is loaded."""

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import yaml

from minialg.config import load_config
from minialg.demo import write_tiny
from test_cli import ROOT, read_video

NEGATIVE = "色调艳丽，过曝，静态，细节模糊不清"  # the start of the official sample_neg_prompt


@pytest.mark.parametrize("name", ["wan22_alg", "wan22_default", "wan22_ti2v_alg", "wan22_ti2v_default"])
def test_presets_carry_the_official_wan22_defaults(name):
    config = load_config(name)
    generation = dict(config.generation)
    assert generation.pop("negative_prompt").startswith(NEGATIVE)
    if name.startswith("wan22_ti2v"):
        assert config.model == "Wan-AI/Wan2.2-TI2V-5B-Diffusers" and config.fps == 24
        assert generation == dict(num_frames=121, num_inference_steps=50, guidance_scale=5.0, height=704,
                                  width=1280, flow_shift=5.0)
    else:
        assert config.model == "Wan-AI/Wan2.2-I2V-A14B-Diffusers" and config.fps == 16
        assert generation == dict(num_frames=81, num_inference_steps=40, guidance_scale=3.5, guidance_scale_2=3.5,
                                  height=720, width=1280, flow_shift=5.0)
    assert config.alg == load_config("wan_alg" if name.endswith("_alg") else "wan_default").alg  # Wan 2.1's presets


def cli(*args, cwd):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(str, args)], capture_output=True, text=True,
                          cwd=cwd, env=dict(os.environ, HF_HUB_OFFLINE="1"))


@pytest.mark.parametrize("family, size", [("wan22", (32, 48)), ("wan22_ti2v", (64, 96))])
def test_official_command_line_with_a_wan22_preset_and_a_local_model(tmp_path, test_image, family, size):
    from PIL import Image

    Image.fromarray(test_image).save(tmp_path / "in.png")
    folder = write_tiny(tmp_path / "tiny", family)
    out = cli("--config", f"{family}_alg", "--image_path", tmp_path / "in.png", "--prompt", "a ball",
              "--output_path", tmp_path / "out.mp4", "--model", folder, "--dtype", "float32", "--height", size[0],
              "--width", size[1], "--num_frames", 9, "--num_inference_steps", 3, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    frames, codec, fps = read_video(tmp_path / "out.mp4")
    assert len(frames) == 9 and frames[0].shape == (*size, 3) and fps == (24 if family == "wan22_ti2v" else 16)


@pytest.mark.parametrize("family", ["wan22", "wan22_ti2v"])
def test_wan22_demos_run_offline(tmp_path, family):
    out = cli("demo", "--family", family, "--output_path", tmp_path / "d.mp4", "--steps", 2, cwd=tmp_path)
    assert out.returncode == 0, out.stderr
    frames, _, _ = read_video(tmp_path / "d.mp4")
    assert len(frames) == 17 and frames[0].shape == (64, 96, 3) and np.std(frames) > 5


def test_guidance_scale_2_on_a_one_expert_checkpoint_fails_before_loading(tmp_path, test_image):
    from PIL import Image

    Image.fromarray(test_image).save(tmp_path / "in.png")
    folder = write_tiny(tmp_path / "tiny", "wan22_ti2v")
    (folder / "transformer" / "diffusion_pytorch_model.safetensors").write_bytes(b"")  # loading it would fail
    config = yaml.safe_load((ROOT / "minialg" / "configs" / "wan22_alg.yaml").read_text())
    (tmp_path / "c.yaml").write_text(yaml.safe_dump(config, allow_unicode=True))
    out = cli("--config", tmp_path / "c.yaml", "--image_path", tmp_path / "in.png", "--prompt", "a ball",
              "--output_path", tmp_path / "out.mp4", "--model", folder, "--height", 64, "--width", 96, cwd=tmp_path)
    assert out.returncode == 1 and out.stderr.strip().splitlines() == [
        "error: guidance_scale_2 is for checkpoints with two experts (Wan 2.2 A14B); this one has one"]
    assert not (tmp_path / "out.mp4").exists()
