"""Issue 12: a device that is not here fails in one line; the output's extension picks its format (or is refused
before any compute); Ctrl-C / SIGTERM print one line, exit 130 / 143 and leave no file; the top-level help names
every subcommand."""

import importlib.util
import os
import signal
import subprocess
import sys
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import minialg
from minialg import gpu, media
from minialg.demo import demo_image, write_tiny

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("cli", ROOT / "cli.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)

no_cuda = pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has CUDA")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> Path:
    return write_tiny(tmp_path_factory.mktemp("tiny") / "wan", "wan")


@pytest.fixture
def image(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "input.png"
    Image.fromarray(demo_image().numpy()).save(path)
    return path


def run_argv(tiny, image, output, *extra) -> list[str]:
    return ["--config", "wan_alg", "--image_path", str(image), "--prompt", "a ball", "--output_path", str(output),
            "--model", str(tiny), "--dtype", "float32", "--device", "cpu", "--height", "32", "--width", "48",
            "--num_frames", "5", "--num_inference_steps", "3", *extra]


# ----------------------------------------------------------------------------------------------------------
# 1. the device

@no_cuda
def test_cuda_without_cuda_says_so_in_one_line(tmp_path, tiny, image, capsys):
    with pytest.raises(ValueError) as e:
        gpu.check_device("cuda")
    assert str(e.value) == "CUDA is not available here (this torch is a CPU-only build); available devices: cpu"
    with pytest.raises(ValueError, match="^CUDA is not available here") as e:
        minialg.load(tiny, device="cuda", dtype=torch.float32)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="^CUDA is not available here"):
        minialg.load(tmp_path / "not-even-a-model", device="cuda")  # checked before anything else
    code = cli.main(run_argv(tiny, image, tmp_path / "o.mp4", "--device", "cuda"))
    err = capsys.readouterr().err
    assert code == 1 and err == "error: CUDA is not available here (this torch is a CPU-only build); " \
                                "available devices: cpu\n"
    assert not (tmp_path / "o.mp4").exists()


def test_device_names_and_counts(monkeypatch):
    assert gpu.check_device("cpu") == torch.device("cpu") and gpu.check_device(torch.device("cpu")).type == "cpu"
    for bad, message in [("gpu", "unknown device 'gpu'"), ("meta", "minialg does not run on 'meta' devices")]:
        with pytest.raises(ValueError, match=message):
            gpu.check_device(bad)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)  # a machine with two GPUs
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    assert gpu.available_devices()[:3] == ["cpu", "cuda:0", "cuda:1"]
    assert gpu.check_device("cuda:1") == torch.device("cuda:1")
    with pytest.raises(ValueError, match="^there is no cuda:2 here; available devices: cpu, cuda:0, cuda:1"):
        gpu.check_device("cuda:2")


# ----------------------------------------------------------------------------------------------------------
# 2. the output format follows the extension

def container_of(path: Path) -> tuple[str, str]:
    """What the file is: the container (from its own header bytes) and the codec PyAV decodes."""
    head = path.read_bytes()[:64]
    kind = ("mp4" if head[4:8] == b"ftyp" else "gif" if head[:6] == b"GIF89a" else
            "webm" if b"webm" in head else "matroska" if b"matroska" in head else "?")
    with av.open(str(path)) as container:
        return kind, container.streams.video[0].codec_context.name


@pytest.mark.parametrize("name, container, codec, tolerance", [
    ("clip.mp4", "mp4", "h264", 3), ("clip.mkv", "matroska", "h264", 3), ("clip.webm", "webm", "vp9", 3),
    ("clip.gif", "gif", "gif", 8), ("CLIP.MP4", "mp4", "h264", 3),
])
def test_the_extension_picks_the_format(tmp_path, name, container, codec, tolerance):
    y, x = torch.meshgrid(torch.arange(48) / 40, torch.arange(64) / 40, indexing="ij")
    image = torch.stack([torch.sin(3 * x + 1), torch.cos(2 * y), torch.sin(2 * x + 3 * y)], dim=-1) * 0.35 + 0.5
    frames = image[None] * torch.linspace(0.3, 1, 9)[:, None, None, None]  # (9, 48, 64, 3)
    media.write_video(frames, tmp_path / name, fps=16)
    assert container_of(tmp_path / name) == (container, codec)
    with av.open(str(tmp_path / name)) as c:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)]).astype(float)
    expected = (frames * 255).to(torch.uint8).numpy()
    error = np.abs(decoded - expected).mean()
    print(f"{name}: mean abs error {error:.2f} levels")
    assert decoded.shape == (9, 48, 64, 3) and error < tolerance
    assert [p.name for p in tmp_path.iterdir()] == [name]


def test_gif_keeps_an_odd_size_and_few_colours_exactly(tmp_path):
    colours = torch.tensor([[0, 0, 0], [1, 0, 0], [0, 0.5, 1], [1, 1, 1]])
    frames = colours[torch.randint(0, 4, (3, 15, 21), generator=torch.Generator().manual_seed(0))]
    media.write_video(frames, tmp_path / "a.gif", fps=10)
    with av.open(str(tmp_path / "a.gif")) as c:
        decoded = np.stack([f.to_ndarray(format="rgb24") for f in c.decode(video=0)])
    assert np.array_equal(decoded, (frames * 255).to(torch.uint8).numpy())  # 4 colours: the palette holds them


@pytest.mark.parametrize("name", ["clip.avi", "clip.png", "clip", "clip.mp4.part"])
def test_other_extensions_are_refused_in_one_line(tmp_path, name):
    with pytest.raises(ValueError) as e:
        media.write_video(torch.rand(2, 16, 16, 3), tmp_path / name, fps=8)
    assert "is not a video format minialg writes; use one of .mp4, .mkv, .webm, .gif" in str(e.value)
    assert "\n" not in str(e.value) and list(tmp_path.iterdir()) == []


def test_cli_refuses_the_extension_before_any_compute(tmp_path, tiny, image, capsys, monkeypatch):
    monkeypatch.setattr(minialg, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    assert cli.main(run_argv(tiny, image, tmp_path / "clip.avi")) == 1
    assert capsys.readouterr().err == ("error: cannot write clip.avi: the extension '.avi' is not a video format "
                                       "minialg writes; use one of .mp4, .mkv, .webm, .gif\n")
    assert cli.main(["demo", "--output_path", str(tmp_path / "demo.mov")]) == 1
    assert "'.mov' is not a video format" in capsys.readouterr().err


def test_cli_writes_a_real_gif(tmp_path, tiny, image):
    assert cli.main(run_argv(tiny, image, tmp_path / "clip.gif")) == 0
    assert container_of(tmp_path / "clip.gif") == ("gif", "gif")


# ----------------------------------------------------------------------------------------------------------
# 3. Ctrl-C and SIGTERM

CHILD = """
import signal, sys, runpy
import minialg
load = minialg.load

def load_and_wait(*args, **kwargs):
    pipe = load(*args, **kwargs)
    def wait_in_step_two(module, inputs):  # runs in the main thread, inside the solver loop
        if pipe.progress[0] == 1:
            print("MARK", flush=True)
            signal.pause()  # until the test's signal arrives
    pipe.transformer.register_forward_pre_hook(wait_in_step_two)
    return pipe

minialg.load = load_and_wait
sys.argv = ["cli.py", *sys.argv[1:]]
runpy.run_path({cli!r}, run_name="__main__")
"""


@pytest.mark.parametrize("how, code, word", [(signal.SIGINT, 130, "interrupted"), (signal.SIGTERM, 143, "terminated")])
def test_a_signal_mid_run_prints_one_line_and_leaves_nothing(tmp_path, tiny, image, how, code, word):
    before = sorted(tmp_path.iterdir())
    child = subprocess.Popen([sys.executable, "-c", CHILD.format(cli=str(ROOT / "cli.py")),
                              *run_argv(tiny, image, tmp_path / "out.mp4")],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=tmp_path,
                             env=dict(os.environ, PYTHONPATH=str(ROOT)))
    try:
        for line in child.stdout:  # deterministic: the child waits inside step 2 until the signal comes
            if line.strip() == "MARK":
                break
        child.send_signal(how)
        out, err = child.communicate(timeout=120)
    finally:
        child.kill()
    lines = [line for line in err.replace("\r", "\n").splitlines() if line.strip()]
    assert child.returncode == code, err
    assert "Traceback" not in err and lines[-1] == f"{word} after step 1 of 3; nothing written", err
    assert [line for line in lines if "denoising" not in line] == lines[-1:]  # one line, besides the progress bar
    assert sorted(tmp_path.iterdir()) == before  # no video, no temporary file


def test_an_interrupt_while_writing_removes_the_partial_file(tmp_path, tiny, image, capsys, monkeypatch):
    frames = media._frames

    def interrupted_after_one(*args):
        for k, frame in enumerate(frames(*args)):
            if k == 1:
                raise KeyboardInterrupt
            yield frame

    monkeypatch.setattr(media, "_frames", interrupted_after_one)
    before = sorted(tmp_path.iterdir())
    assert cli.main(run_argv(tiny, image, tmp_path / "out.mp4")) == 130
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted after step 3 of 3; nothing written"
    assert sorted(tmp_path.iterdir()) == before


def test_an_interrupt_while_loading_says_so(tmp_path, tiny, image, capsys, monkeypatch):
    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(minialg, "load", interrupt)
    assert cli.main(run_argv(tiny, image, tmp_path / "out.mp4")) == 130
    assert capsys.readouterr().err == "interrupted before the first step; nothing written\n"


# ----------------------------------------------------------------------------------------------------------
# 4. help

def test_top_level_help_lists_every_subcommand_and_each_has_its_own_help(capsys):
    out = subprocess.run([sys.executable, str(ROOT / "cli.py"), "--help"], capture_output=True, text=True)
    assert out.returncode == 0 and "--config" in out.stdout and "--output_path" in out.stdout
    assert set(cli.SUBCOMMANDS) == {"check", "download", "demo", "bench", "motion", "compare", "batch"}
    for name, line in cli.SUBCOMMANDS.items():
        assert f"  {name}" in out.stdout and line in out.stdout, name
        with pytest.raises(SystemExit) as done:
            cli.main([name, "--help"])
        assert done.value.code == 0 and "usage:" in capsys.readouterr().out, name
