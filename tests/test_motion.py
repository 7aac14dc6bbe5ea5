"""minialg.motion on synthetic videos with known motion, written through H.264 and read back as users' videos
are: a static texture, translations of 0.5 to 4 px/frame, an oscillation at a known frequency, per-frame noise,
frame 0 equal to the image; and `cli.py motion`."""

import importlib.util
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from minialg import media, motion

ROOT = Path(__file__).resolve().parent.parent
spec = importlib.util.spec_from_file_location("cli", ROOT / "cli.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)

H, W = 96, 144  # the video; the texture is larger, so a moving window shows new content at its edges


class Texture:
    """A smooth random colour texture (Gaussian-filtered noise), shifted by any sub-pixel amount exactly (a
    phase ramp in its Fourier transform), seen through an H x W window at its centre."""

    def __init__(self, seed: int = 0, sigma: float = 2.5, size: tuple = (2 * H, 2 * W)):
        noise = torch.randn(3, *size, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
        self.fy, self.fx = torch.fft.fftfreq(size[0], dtype=torch.float64), torch.fft.fftfreq(size[1], dtype=torch.float64)
        gain = torch.exp(-2 * math.pi ** 2 * sigma ** 2 * (self.fy[:, None] ** 2 + self.fx[None] ** 2))
        self.spectrum = torch.fft.fft2(noise) * gain
        self.scale = torch.fft.ifft2(self.spectrum).real.std()

    def frame(self, dx: float, dy: float) -> torch.Tensor:
        """The window's content when the texture has moved by (dx, dy) pixels: (H, W, 3) in [0, 1]."""
        phase = torch.exp(-2j * math.pi * (self.fx[None] * dx + self.fy[:, None] * dy))
        image = torch.fft.ifft2(self.spectrum * phase).real / self.scale * 0.18 + 0.5
        top, left = (image.shape[1] - H) // 2, (image.shape[2] - W) // 2
        return image[:, top:top + H, left:left + W].clamp(0, 1).permute(1, 2, 0).float()

    def video(self, positions) -> torch.Tensor:
        return torch.stack([self.frame(dx, dy) for dx, dy in positions])


def through_h264(frames: torch.Tensor, fps: float, tmp_path: Path) -> tuple[torch.Tensor, float]:
    media.write_video(frames, tmp_path / "v.mp4", fps=fps)
    return motion.read_video(tmp_path / "v.mp4")


@pytest.mark.parametrize("grain", [0.0, 1.5])
def test_a_static_texture_has_near_zero_flow_and_is_not_dynamic(tmp_path, grain):
    frames = Texture().video([(0, 0)] * 17)  # with grain: independent noise of `grain` grey levels per frame
    frames = frames + grain / 255 * torch.randn(frames.shape, generator=torch.Generator().manual_seed(0))
    video, fps = through_h264(frames.clamp(0, 1), 16, tmp_path)
    report = motion.analyze(video, fps)
    print(f"static, grain {grain}: mean {report['flow']['mean_px']:.4f} px, top 5% "
          f"{report['flow']['top5_mean_px']:.4f} px")
    assert report["flow"]["mean_px"] < 0.05 and report["flow"]["top5_mean_px"] < 0.15
    assert report["dynamic_degree"] == {"score": 0.0, "dynamic": False, "threshold_px": 6.0 * H / 256}
    assert report["spectrum"]["dominant_hz"] == 0.0


@pytest.mark.parametrize("speed", [0.5, 1.0, 2.0, 4.0])
def test_a_translation_is_measured_within_10_percent(tmp_path, speed):
    direction = (0.8, 0.6)  # unit length, diagonal: both flow components at work
    positions = [(speed * direction[0] * t, speed * direction[1] * t) for t in range(13)]
    video, fps = through_h264(Texture(seed=1).video(positions), 16, tmp_path)
    report = motion.analyze(video, fps)
    per_pair = np.array(report["flow"]["per_pair_px"])
    error = abs(report["flow"]["mean_px"] - speed) / speed
    print(f"{speed} px/frame: measured {report['flow']['mean_px']:.4f} ({error:+.2%}), pairs "
          f"{per_pair.min():.3f}..{per_pair.max():.3f}")
    assert error < 0.10 and np.all(np.abs(per_pair - speed) / speed < 0.15)
    flow, factor = motion.optical_flow(video)
    direction_measured = flow.mean((0, 2, 3)) / flow.mean((0, 2, 3)).norm()
    assert torch.allclose(direction_measured, torch.tensor(direction), atol=0.05)
    # VBench's rule at 16 fps looks at every 2nd frame: 2 x speed against 6 px x 96/256 = 2.25 px
    if speed != 1.0:  # 2 px against 2.25 px is too close to call
        assert report["dynamic_degree"]["dynamic"] == (speed > 1.0)


def test_motion_larger_than_the_window_is_followed_coarse_to_fine(tmp_path):
    video, fps = through_h264(Texture(seed=2).video([(9.0 * t, 0.0) for t in range(6)]), 8, tmp_path)
    report = motion.analyze(video, fps)
    assert abs(report["flow"]["mean_px"] - 9.0) / 9.0 < 0.1 and report["dynamic_degree"]["dynamic"]


def test_an_oscillation_peaks_in_its_frequency_bin(tmp_path):
    frames, fps, cycles = 32, 16, 4  # 4 cycles in 32 frames at 16 fps: 2 Hz, bin 4
    amplitude = 2.0
    positions = [(amplitude * math.sin(2 * math.pi * cycles * t / frames), 0.0) for t in range(frames)]
    video, fps = through_h264(Texture(seed=3).video(positions), fps, tmp_path)
    spectrum = motion.analyze(video, fps)["spectrum"]
    amplitudes = spectrum["amplitude_px"]
    assert spectrum["freqs_hz"][:5] == [0.5, 1.0, 1.5, 2.0, 2.5] and len(amplitudes) == frames // 2
    print(f"oscillation: peak {spectrum['dominant_hz']} Hz, amplitude {amplitudes[cycles - 1]:.3f} px "
          f"(true {amplitude}), next largest {sorted(amplitudes)[-2]:.3f}")
    assert spectrum["dominant_hz"] == 2.0
    assert abs(amplitudes[cycles - 1] - amplitude) / amplitude < 0.15
    assert sorted(amplitudes)[-2] < 0.2 * amplitudes[cycles - 1]


def test_per_frame_noise_raises_the_high_frequency_ratio(tmp_path):
    smooth = Texture(seed=4).video([(0.7 * t, 0.3 * t) for t in range(13)])
    noisy = (smooth + 0.04 * torch.randn(smooth.shape, generator=torch.Generator().manual_seed(5))).clamp(0, 1)
    ratios = {}
    for name, frames in (("smooth", smooth), ("noisy", noisy)):
        video, fps = through_h264(frames, 16, tmp_path)
        residual = motion.analyze(video, fps)["residual"]
        assert residual["low_freq_energy"] + residual["high_freq_energy"] == pytest.approx(
            ((motion.luma(motion.to_unit(video))[1:] - motion.luma(motion.to_unit(video))[:-1]) ** 2).mean().item(),
            rel=1e-4)  # Parseval: the split adds up to the mean squared difference
        ratios[name] = residual["high_freq_ratio"]
    print(f"high-frequency ratio: smooth motion {ratios['smooth']:.3f}, with per-frame noise {ratios['noisy']:.3f}")
    assert ratios["noisy"] > ratios["smooth"] + 0.2


def test_frame_zero_equal_to_the_image_has_high_psnr_and_ssim(tmp_path):
    # a larger image (so it is resized), smoother than the other textures: random colour noise at 2.5 px is a
    # worst case for yuv420p's halved chroma (29 dB), natural images are not
    image = (Texture(seed=6, sigma=4.0, size=(3 * H, 3 * W)).frame(0, 0) * 255).round().to(torch.uint8)
    first = media.resize(image, H, W, "lanczos").float() / 255
    frames = torch.cat([first[None], Texture(seed=7).video([(t, 0) for t in range(1, 5)])])
    video, fps = through_h264(frames, 16, tmp_path)
    fidelity = motion.analyze(video, fps, image=image.numpy())["fidelity"]
    print(f"frame 0 vs image through H.264: PSNR {fidelity['first_frame_psnr']:.2f} dB, "
          f"SSIM {fidelity['first_frame_ssim']:.4f}")
    assert fidelity["first_frame_psnr"] > 30 and fidelity["first_frame_ssim"] > 0.9
    other = motion.fidelity(video[1], image)
    assert other["first_frame_psnr"] < 20 and other["first_frame_ssim"] < 0.5


def test_ssim_and_psnr_match_their_definitions():
    from scipy.ndimage import gaussian_filter

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (40, 52, 3)).astype(np.uint8)
    b = np.clip(a + rng.normal(0, 20, a.shape), 0, 255).astype(np.uint8)
    x, y = a.astype(np.float64), b.astype(np.float64)
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    scores = []
    for c in range(3):  # Wang et al.'s formula: 11-tap Gaussian (sigma 1.5), valid windows only
        f = lambda z: gaussian_filter(z, 1.5, truncate=3.5)[5:-5, 5:-5]  # noqa: E731
        mx, my = f(x[..., c]), f(y[..., c])
        vx, vy, cov = f(x[..., c] ** 2) - mx ** 2, f(y[..., c] ** 2) - my ** 2, f(x[..., c] * y[..., c]) - mx * my
        scores.append((((2 * mx * my + c1) * (2 * cov + c2)) / ((mx ** 2 + my ** 2 + c1) * (vx + vy + c2))).mean())
    got = motion.ssim(torch.from_numpy(a), torch.from_numpy(b))
    assert got == pytest.approx(np.mean(scores), abs=1e-7)  # the same sums in another order
    assert motion.psnr(torch.from_numpy(a), torch.from_numpy(b)) == pytest.approx(
        10 * np.log10(255 ** 2 / ((x - y) ** 2).mean()), abs=1e-9)
    assert motion.ssim(torch.from_numpy(a), torch.from_numpy(a)) == pytest.approx(1.0)
    assert motion.psnr(torch.from_numpy(a), torch.from_numpy(a)) == motion.PSNR_CAP_DB


def test_bad_input_fails_in_one_line(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        motion.read_video(tmp_path / "missing.mp4")
    (tmp_path / "bad.mp4").write_text("not a video")
    with pytest.raises(ValueError, match="not a decodable video"):
        motion.read_video(tmp_path / "bad.mp4")
    with pytest.raises(ValueError, match="frames >= 2"):
        motion.analyze(torch.zeros(1, 16, 16, 3), 8)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="^CUDA is not available here"):
            motion.analyze(torch.zeros(2, 16, 16, 3), 8, device="cuda")


SCHEMA = {"frames", "fps", "height", "width", "flow", "dynamic_degree", "spectrum", "residual"}
PARTS = {"flow": {"mean_px", "top5_mean_px", "per_pair_px"}, "dynamic_degree": {"score", "dynamic", "threshold_px"},
         "spectrum": {"freqs_hz", "amplitude_px", "dominant_hz"},
         "residual": {"low_freq_energy", "high_freq_energy", "high_freq_ratio"},
         "fidelity": {"first_frame_psnr", "first_frame_ssim"}}


def test_cli_motion_prints_exactly_the_schema(tmp_path, capsys):
    from PIL import Image

    frames = Texture(seed=8).video([(1.5 * t, 0) for t in range(9)])
    media.write_video(frames, tmp_path / "clip.mp4", fps=12)
    Image.fromarray((frames[0] * 255).round().to(torch.uint8).numpy()).save(tmp_path / "input.png")
    for extra, keys in (([], SCHEMA), (["--image", str(tmp_path / "input.png")], SCHEMA | {"fidelity"})):
        assert cli.main(["motion", str(tmp_path / "clip.mp4"), "--json", *extra]) == 0
        out = capsys.readouterr().out
        report = json.loads(out)  # one JSON object, nothing else on stdout
        assert set(report) == keys and all(set(report[k]) == PARTS[k] for k in keys - {"frames", "fps", "height",
                                                                                        "width"})
        assert (report["frames"], report["fps"], report["height"], report["width"]) == (9, 12.0, H, W)
        assert len(report["flow"]["per_pair_px"]) == 8 and abs(report["flow"]["mean_px"] - 1.5) < 0.15
        assert len(report["spectrum"]["freqs_hz"]) == len(report["spectrum"]["amplitude_px"]) == 4
    assert cli.main(["motion", str(tmp_path / "clip.mp4"), "--image", str(tmp_path / "input.png")]) == 0
    table = capsys.readouterr().out
    assert "flow mean" in table and "dynamic degree" in table and "PSNR" in table and not table.startswith("{")
    assert cli.main(["motion", str(tmp_path / "missing.mp4")]) == 1
    assert capsys.readouterr().err.startswith("error: cannot read video")


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA here")
def test_the_gpu_gives_the_cpu_report(tmp_path):
    video, fps = through_h264(Texture(seed=9).video([(1.2 * t, 0.4 * t) for t in range(9)]), 16, tmp_path)
    cpu, gpu = motion.analyze(video, fps), motion.analyze(video, fps, device="cuda")
    assert gpu["flow"]["mean_px"] == pytest.approx(cpu["flow"]["mean_px"], rel=1e-3)
    assert gpu["residual"]["high_freq_ratio"] == pytest.approx(cpu["residual"]["high_freq_ratio"], rel=1e-3)
