"""`compare` end to end on tiny checkpoints of both families (minialg.demo.write_tiny): every output exists and
parses, the report matches `cli.py motion` on the written videos, an interrupt leaves nothing, and report.html
renders in headless Chromium (skipped where none is installed), identical curves included. The command `demo
--save_model` prints runs on the checkpoint it leaves behind."""

import base64
import importlib.util
import json
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import av
import numpy as np
import pytest
import torch

import minialg
from minialg import media, motion
from minialg.comparison import FILES, GAP
from minialg.report import STYLE, line_chart
from minialg.demo import demo_image, write_tiny

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("cli", ROOT / "cli.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)

RUNS = {  # family -> (preset, size/steps override, frames, (height, width), fps)
    "wan": ("wan_alg", ["--height", "32", "--width", "48", "--num_frames", "9", "--num_inference_steps", "2"], 9,
            (32, 48), 16),
    "cogvideox": ("cogvideox_alg", ["--num_frames", "9", "--num_inference_steps", "2"], 9, (64, 96), 12),
}
CHROMIUM = next((shutil.which(n) for n in ("chromium", "chromium-browser", "google-chrome") if shutil.which(n)), None)
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync",
                  "--hide-scrollbars"]


@pytest.fixture(scope="module")
def image(tmp_path_factory) -> Path:
    from PIL import Image

    path = tmp_path_factory.mktemp("image") / "ball.png"
    Image.fromarray(demo_image(48, 72).numpy()).save(path)
    return path


@pytest.fixture(scope="module")
def compared(tmp_path_factory, image) -> dict:
    """family -> (output folder, stdout) of one `cli.py compare` per family."""
    done = {}
    for family, (preset, override, *_) in RUNS.items():
        root = tmp_path_factory.mktemp(family)
        folder = write_tiny(root / "tiny", family)
        argv = ["compare", "--config", preset, "--image_path", str(image), "--prompt", "a red ball bouncing",
                "--output_dir", str(root / "out"), "--model", str(folder), "--dtype", "float32", "--device", "cpu",
                "--seed", "7", *override]
        import contextlib
        import io

        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            assert cli.main(argv) == 0
        done[family] = (root / "out", out.getvalue())
    return done


def frames_of(path: Path) -> np.ndarray:
    with av.open(str(path)) as container:
        return np.stack([f.to_ndarray(format="rgb24") for f in container.decode(video=0)])


@pytest.mark.parametrize("family", list(RUNS))
def test_compare_writes_every_output_and_they_parse(compared, family):
    out, stdout = compared[family]
    _, _, frames, (height, width), fps = RUNS[family]
    assert sorted(p.name for p in out.iterdir()) == sorted(FILES)  # nothing else (no temporary folder)
    baseline, alg, both = (frames_of(out / name) for name in ("baseline.mp4", "alg.mp4", "side_by_side.mp4"))
    assert baseline.shape == alg.shape == (frames, height, width, 3)
    assert both.shape == (frames, height, 2 * width + GAP, 3)
    def distance(a, b):
        return np.abs(a.astype(int) - b.astype(int)).mean()

    left, right = both[:, :, :width], both[:, :, width + GAP:]
    print(f"{family}: baseline vs ALG {distance(baseline, alg):.2f} levels; side by side: left vs baseline "
          f"{distance(left, baseline):.2f}, right vs ALG {distance(right, alg):.2f}")
    assert distance(baseline, alg) > 1  # ALG changed the video
    assert distance(left, baseline) < distance(left, alg) and distance(right, alg) < distance(right, baseline)

    report = json.loads((out / "report.json").read_text())
    assert report["settings"]["seed"] == 7 and report["settings"]["alg"]["use_low_pass_guidance"] is True
    assert report["settings"]["fps"] == fps and report["settings"]["generation"]["num_inference_steps"] == 2
    for name in ("baseline", "alg"):
        run = report["runs"][name]
        assert run["video"] == f"{name}.mp4" and {"denoise", "decode", "run", "motion"} <= set(run["timings_s"])
        measured = run["motion"]
        assert (measured["frames"], measured["height"], measured["width"]) == (frames, height, width)
        assert set(measured["fidelity"]) == {"first_frame_psnr", "first_frame_ssim"}
        # the report measures the video as written: `cli.py motion` on the file says the same
        again = motion.analyze(*motion.read_video(out / f"{name}.mp4"))
        assert again["flow"]["mean_px"] == pytest.approx(measured["flow"]["mean_px"], rel=1e-5)
        assert again["residual"] == pytest.approx(measured["residual"], rel=1e-5)
        assert len(run["residual_bands"]["band_energy"]) == motion.RADIAL_BANDS

    page = (out / "report.html").read_text()
    for name in ("baseline", "alg"):  # both videos inside the page, byte for byte
        encoded = re.search(f'id="{name}" src="data:video/mp4;base64,([^"]+)"', page).group(1)
        assert base64.b64decode(encoded) == (out / f"{name}.mp4").read_bytes()
    assert page.count("<svg") == 3 and "<table>" in page and "http://" not in page and "https://" not in page
    assert "baseline" in stdout and "ALG" in stdout and "flow mean" in stdout and "report.html" in stdout


def test_compare_from_python(tmp_path, image):
    folder = write_tiny(tmp_path / "tiny", "wan")
    report = minialg.compare(image, "a red ball", tmp_path / "out", config="wan_alg", model=folder, device="cpu",
                             dtype="float32", generation=dict(height=32, width=48, num_frames=5,
                                                              num_inference_steps=1))
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == sorted(FILES)
    assert report == json.loads((tmp_path / "out" / "report.json").read_text())
    assert report["settings"]["seed"] == 42 and report["runs"]["alg"]["motion"]["frames"] == 5


def test_compare_needs_alg_on_and_fails_before_loading(tmp_path, image, capsys, monkeypatch):
    monkeypatch.setattr(minialg, "load", lambda *a, **k: pytest.fail("the model was loaded"))
    folder = write_tiny(tmp_path / "tiny", "wan")
    code = cli.main(["compare", "--config", "wan_default", "--image_path", str(image), "--prompt", "p",
                     "--output_dir", str(tmp_path / "out"), "--model", str(folder)])
    assert code == 1 and capsys.readouterr().err == (
        "error: compare needs a config with ALG on (alg.use_low_pass_guidance: true), such as wan_alg\n")
    assert not (tmp_path / "out").exists()


def test_an_interrupt_in_the_alg_run_leaves_nothing(tmp_path, image, capsys, monkeypatch):
    folder = write_tiny(tmp_path / "tiny", "wan")
    load = minialg.load

    def load_and_interrupt(*args, **kwargs):
        pipe = load(*args, **kwargs)
        calls = []

        def hook(module, inputs):
            calls.append(pipe.progress)
            if cli.status.run == "ALG" and pipe.progress[0] == 1:
                raise KeyboardInterrupt

        pipe.transformer.register_forward_pre_hook(hook)
        return pipe

    monkeypatch.setattr(minialg, "load", load_and_interrupt)
    code = cli.main(["compare", "--config", "wan_alg", "--image_path", str(image), "--prompt", "p", "--output_dir",
                     str(tmp_path / "out"), "--model", str(folder), "--dtype", "float32", "--device", "cpu",
                     "--height", "32", "--width", "48", "--num_frames", "5", "--num_inference_steps", "2"])
    assert code == 130
    assert capsys.readouterr().err.splitlines()[-1] == "interrupted after step 1 of 2 of the ALG run; nothing written"
    assert not (tmp_path / "out").exists()  # the folder compare made is gone with its temporary files


def chromium(*args, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run([CHROMIUM, *CHROMIUM_FLAGS, *args], capture_output=True, timeout=timeout)


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
def test_report_renders_in_headless_chromium(compared, tmp_path):
    from PIL import Image

    page = (compared["wan"][0] / "report.html").as_uri()
    dom = chromium(f"--user-data-dir={tmp_path / 'profile-dom'}", "--virtual-time-budget=15000", "--dump-dom", page)
    assert b'data-videos="ready"' in dom.stdout, dom.stderr[-2000:]  # the page's script ran; both videos decoded
    shot = tmp_path / "report.png"
    chromium(f"--user-data-dir={tmp_path / 'profile-shot'}", "--window-size=1100,1500", f"--screenshot={shot}", page)
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)
    assert pixels.shape == (1500, 1100, 3) and pixels.std() > 20

    def has(colour, tolerance=30):  # some pixels of this colour: the charts' lines were drawn
        return int((np.abs(pixels - np.array(colour)).max(-1) < tolerance).sum())

    assert has((232, 89, 12)) > 200 and has((76, 110, 245)) > 50  # ALG orange, baseline blue


def test_demo_keeps_its_checkpoint_and_the_compare_it_prints_runs(tmp_path, capsys):
    keep = tmp_path / "kept"
    assert cli.main(["demo", "--steps", "1", "--save_model", str(keep), "--output_path", str(tmp_path / "d.mp4")]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    command = shlex.split(last)
    assert command[:3] == ["python", "cli.py", "compare"] and command[command.index("--model") + 1] == str(keep)
    assert torch.equal(media.load_image(keep / "demo.png"), demo_image())  # the input image, kept exactly
    assert minialg.check(keep)  # a whole checkpoint, by its configs and headers
    assert cli.main(command[2:]) == 0
    assert sorted(p.name for p in (keep / "compare").iterdir()) == sorted(FILES)
    report = json.loads((keep / "compare" / "report.json").read_text())
    assert report["settings"]["generation"]["num_inference_steps"] == 1
    assert report["runs"]["alg"]["motion"]["frames"] == 9


def test_demo_refuses_a_non_empty_folder_before_any_compute(tmp_path, capsys, monkeypatch):
    monkeypatch.setattr(minialg, "load", lambda *a, **k: pytest.fail("the demo ran"))
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("mine")
    code = cli.main(["demo", "--save_model", str(tmp_path / "full"), "--output_path", str(tmp_path / "d.mp4")])
    assert code == 1 and capsys.readouterr().err == (f"error: --save_model {tmp_path / 'full'}: already exists and "
                                                    "is not an empty folder; name a new one\n")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["full"]


def strokes(svg: str) -> list[dict]:
    """Each polyline of a chart: its points and stroke attributes, in drawing order."""
    return [dict(re.findall(r'([\w-]+)="([^"]*)"', match)) for match in re.findall(r"<polyline ([^>]*)/>", svg)]


def test_identical_curves_are_drawn_so_both_show():
    xs, ys = [0.0, 1.0, 2.0, 3.0], [1.0, 3.0, 2.0, 2.5]
    for series in ({"baseline": (xs, ys), "alg": (xs, ys)}, {"alg": (xs, ys), "baseline": (xs, ys)}):
        under, over = strokes(line_chart("t", "x", "y", series))
        assert under["points"] == over["points"] and (under["stroke"], over["stroke"]) == ("#4c6ef5", "#e8590c")
        # the one drawn last is narrower and dashed: the first shows along its edges and through its gaps
        assert float(over["stroke-width"]) <= float(under["stroke-width"]) / 2
        assert "stroke-dasharray" in over and "stroke-dasharray" not in under
    dots = re.findall(r'<circle [^>]*r="([\d.]+)" fill="(#\w+)"', line_chart("t", "x", "y", series))
    assert min(float(r) for r, c in dots if c == "#4c6ef5") > max(float(r) for r, c in dots if c == "#e8590c")


@pytest.mark.skipif(CHROMIUM is None, reason="no Chromium installed (apt-get install chromium)")
def test_identical_curves_both_show_in_chromium(tmp_path):
    from PIL import Image

    xs, ys = [0.1 * k for k in range(12)], [1 + (k % 3) for k in range(12)]
    svg = line_chart("same curves", "x", "y", {"baseline": (xs, ys), "alg": (xs, ys)})
    page = tmp_path / "chart.html"
    page.write_text(f"<!DOCTYPE html><html><head><style>{STYLE} body {{ margin: 0; }}</style></head>"
                    f"<body>{svg}</body></html>")
    shot = tmp_path / "chart.png"
    chromium(f"--user-data-dir={tmp_path / 'profile'}", "--window-size=500,300", f"--screenshot={shot}", page.as_uri())
    pixels = np.asarray(Image.open(shot).convert("RGB")).astype(int)[40:240]  # the plot, below the legend
    seen = {name: int((np.abs(pixels - np.array(rgb)).max(-1) < 40).sum())
            for name, rgb in (("baseline", (76, 110, 245)), ("alg", (232, 89, 12)))}
    assert seen["baseline"] > 300 and seen["alg"] > 300, seen
