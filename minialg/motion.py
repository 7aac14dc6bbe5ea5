"""Measure what a video does, without learned weights: how far things move, how often they swing, how much of
the change between frames is flicker, and how close frame 0 stays to the input image.

    flow        dense optical flow between consecutive frames: pyramidal Lucas-Kanade (coarse to fine, warped
                and refined at each level), in pixels per frame
    dynamic     VBench's dynamic degree, with this flow in place of RAFT's (constants below)
    spectrum    the motion spectrum of Generative Image Dynamics (Li et al., 2024): per-pixel trajectories
                accumulated from the flow, their temporal FFT, amplitude per frequency averaged over pixels
    residual    the residual spectrum of Spectral Motion Alignment (Park et al., 2024): energy of the frame
                differences split at a spatial-frequency cut-off into low (motion) and high (flicker, artifacts)
    fidelity    PSNR and SSIM of frame 0 against the input image resized to the video's size

Everything runs in torch, on the CPU or a GPU (`device`). `analyze(video, fps, image)` returns the report that
`python cli.py motion --json` prints; `read_video(path)` decodes any file PyAV reads.
"""

import math
import os

import av
import numpy as np
import torch
import torch.nn.functional as F

from . import media
from .gpu import check_device

LUMA = (0.299, 0.587, 0.114)  # BT.601 weights: flow and residuals are measured on luma

# Pyramidal Lucas-Kanade
WORK_SIDE = 256  # flow is computed on the frames halved until their short side is at most this (480p -> 240),
# then reported in the video's own pixels: 4x less work at 480p, and motion is measured to a fraction of a pixel
MIN_SIDE = 24  # the coarsest pyramid level keeps at least this many pixels on its short side
MAX_LEVELS = 6  # levels halve the size; motion up to ~2^(levels-1) x a few pixels per frame is followed
ITERATIONS = 3  # warp-and-solve refinements per level
WINDOW = 7  # square window of the local least-squares fit, in pixels of each level
DAMPING = 1e-5  # Tikhonov term on the 2x2 normal equations, in (intensity/pixel)^2 with intensities in [0, 1]:
# about (0.8 grey levels per pixel)^2, so flat, textureless windows get no update instead of noise

# VBench's dynamic degree (vbench/dynamic_degree.py): frames sampled at about 8 fps (every round(fps / 8)-th),
# per sampled pair the mean of the largest 5% of flow magnitudes; a pair moves when that exceeds
# 6 px x (short side / 256) x max(1, 8 / fps); the video is dynamic when round(4 x sampled frames / 16) pairs
# move (at least one). VBench's flow is RAFT's; ours is the flow above, composed over the sampling interval.
VBENCH_FPS = 8.0
TOP_FRACTION = 0.05
THRESHOLD_PX_AT_256 = 6.0

# Spectral Motion Alignment's split: spatial frequencies above 1/8 cycle per pixel (periods under 8 pixels, one
# VAE latent cell of Wan and CogVideoX) count as high: detail the decoder invents, where flicker shows.
CUTOFF_CYCLES_PER_PX = 0.125
RADIAL_BANDS = 16  # the residual's radial spectrum: equal bands of 0 .. 0.5 cycle per pixel (the cut-off is an
# edge between two; the corners beyond 0.5 go to the last band)

# SSIM (Wang et al., 2004): 11-tap Gaussian window, sigma 1.5, K1 0.01, K2 0.03, on 0..255 values per channel
SSIM_TAPS, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03
PSNR_CAP_DB = 100.0  # identical images: report 100 dB instead of infinity (JSON has no infinity)


# ---------------------------------------------------------------------------------------------------------
# Video in

def read_video(path: "str | os.PathLike") -> tuple[torch.Tensor, float]:
    """Decode every frame of a video file: (F, H, W, 3) uint8 RGB and its frame rate."""
    if not os.path.isfile(path):
        raise ValueError(f"cannot read video {path}: no such file")
    try:
        with av.open(str(path)) as container:
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate or stream.base_rate
            frames = [frame.to_ndarray(format="rgb24") for frame in container.decode(stream)]
    except (av.error.FFmpegError, IndexError) as e:
        raise ValueError(f"cannot read video {path}: not a decodable video ({e})") from None
    if not frames:
        raise ValueError(f"cannot read video {path}: no frames")
    return torch.from_numpy(np.stack(frames)), float(rate) if rate else 16.0


def to_unit(video: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 or float 0..1 -> float32 0..1."""
    return video.float() / 255.0 if video.dtype == torch.uint8 else video.float()


def luma(video: torch.Tensor) -> torch.Tensor:
    """(F, H, W, 3) in [0, 1] -> (F, 1, H, W)."""
    weights = torch.tensor(LUMA, device=video.device, dtype=video.dtype)
    return (video @ weights)[:, None]


# ---------------------------------------------------------------------------------------------------------
# Optical flow: pyramidal Lucas-Kanade

def gradients(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Central differences of (N, 1, H, W), one-sided at the edges."""
    p = F.pad(x, (1, 1, 1, 1), mode="replicate")
    return (p[..., 1:-1, 2:] - p[..., 1:-1, :-2]) / 2, (p[..., 2:, 1:-1] - p[..., :-2, 1:-1]) / 2


def box(x: torch.Tensor) -> torch.Tensor:
    """Mean over the WINDOW x WINDOW neighbourhood of each pixel of (N, C, H, W), shrunk at the edges."""
    return F.avg_pool2d(x, WINDOW, stride=1, padding=WINDOW // 2, count_include_pad=False)


def base_grid(height: int, width: int, device) -> torch.Tensor:
    """Pixel coordinates (1, 2, H, W): x then y."""
    y, x = torch.meshgrid(torch.arange(height, device=device, dtype=torch.float32),
                          torch.arange(width, device=device, dtype=torch.float32), indexing="ij")
    return torch.stack([x, y])[None]


def sample(x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    """Bilinear samples of (N, C, H, W) at pixel positions (N, 2, h, w) (x, y), edges extended: (N, C, h, w)."""
    height, width = x.shape[-2:]
    scale = torch.tensor([2 / max(width - 1, 1), 2 / max(height - 1, 1)], device=x.device).view(1, 2, 1, 1)
    grid = (positions * scale - 1).permute(0, 2, 3, 1)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=True)


def pyramid(x: torch.Tensor) -> list[torch.Tensor]:
    """Finest first: each level halves the size of the last (antialiased), down to MIN_SIDE pixels."""
    levels = [x]
    while len(levels) < MAX_LEVELS and min(levels[-1].shape[-2:]) // 2 >= MIN_SIDE:
        h, w = levels[-1].shape[-2:]
        levels.append(F.interpolate(levels[-1], size=(h // 2, w // 2), mode="bilinear", antialias=True,
                                    align_corners=False))
    return levels


def lucas_kanade(first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Flow (N, 2, H, W) from frames `first` to `second` (N, 1, H, W): pixel p of `first` is at p + flow in
    `second`. Coarse to fine; at each level `second` is warped by the current flow and a least-squares fit over
    a WINDOW x WINDOW square of the brightness-constancy equation Ix u + Iy v + It = 0 gives the correction; the corrected flow is then averaged over the same window (without that, repeated
    refinements amplify pixel noise). Where the flow points outside `second`, It is taken as 0 (no evidence)."""
    flow = None
    for a, b in zip(reversed(pyramid(first)), reversed(pyramid(second))):
        h, w = a.shape[-2:]
        if flow is None:
            flow = a.new_zeros(a.shape[0], 2, h, w)
        else:  # the coarser level's flow, upsampled and rescaled to this level's pixels
            scale = torch.tensor([w / flow.shape[-1], h / flow.shape[-2]], device=a.device).view(1, 2, 1, 1)
            flow = F.interpolate(flow, size=(h, w), mode="bilinear", align_corners=False) * scale
        gx, gy = gradients(a)
        sxx, sxy, syy = box(torch.cat([gx * gx, gx * gy, gy * gy], dim=1)).unbind(1)
        sxx, syy = sxx + DAMPING, syy + DAMPING
        det = sxx * syy - sxy * sxy  # > 0: damping keeps the system invertible
        grid = base_grid(h, w, a.device)
        limit = torch.tensor([w - 1, h - 1], device=a.device).view(1, 2, 1, 1)
        for _ in range(ITERATIONS):
            target = grid + flow
            inside = ((target >= 0) & (target <= limit)).all(1, keepdim=True)
            it = (sample(b, target) - a) * inside  # (N, 1, h, w): what the current flow leaves unexplained
            bx, by = box(torch.cat([gx * it, gy * it], dim=1)).unbind(1)
            flow = flow - torch.stack([syy * bx - sxy * by, sxx * by - sxy * bx], dim=1) / det[:, None]
            flow = box(flow)  # smoothed over the same window: repeated refinements must not amplify noise
    return flow


def optical_flow(video: torch.Tensor, chunk: int = 8) -> tuple[torch.Tensor, int]:
    """Flow between consecutive frames of (F, H, W, 3) on the working grid (the frames halved until the short
    side is at most WORK_SIDE): (F - 1, 2, h, w) in working pixels per frame (x, y), and the factor (1, 2, 4, ...)
    from working pixels to the video's."""
    gray = luma(to_unit(video))
    factor = 1
    while min(gray.shape[-2:]) > WORK_SIDE:
        h, w = gray.shape[-2:]
        gray = F.interpolate(gray, size=(h // 2, w // 2), mode="bilinear", antialias=True, align_corners=False)
        factor *= 2
    pairs = []
    for start in range(0, gray.shape[0] - 1, chunk):
        end = min(start + chunk, gray.shape[0] - 1)
        pairs.append(lucas_kanade(gray[start:end], gray[start + 1:end + 1]))
    return torch.cat(pairs), factor


def compose(flows: torch.Tensor) -> torch.Tensor:
    """Flow from frame 0 to frame k+1 of (k, 2, H, W) consecutive flows: follow each pixel through them."""
    grid = base_grid(*flows.shape[-2:], flows.device)
    total = flows[:1]
    for step in flows[1:]:
        total = total + sample(step[None], grid + total)
    return total


# ---------------------------------------------------------------------------------------------------------
# Measures

def magnitude(flow: torch.Tensor) -> torch.Tensor:
    """|flow| of (N, 2, H, W): (N, H, W)."""
    return (flow[:, 0].square() + flow[:, 1].square()).sqrt()


def top_mean(speed: torch.Tensor, fraction: float = TOP_FRACTION) -> torch.Tensor:
    """Mean of the largest `fraction` of each (N, H, W) map: (N,)."""
    flat = speed.flatten(1)
    k = max(1, int(flat.shape[1] * fraction))
    return flat.topk(k, dim=1).values.mean(1)


def dynamic_degree(flow: torch.Tensor, fps: float, factor: int, short_side: int) -> dict:
    """VBench's decision (see the constants) on the consecutive-frame flow (F - 1, 2, h, w) of optical_flow,
    for a video whose short side is `short_side` pixels."""
    interval = max(1, round(fps / VBENCH_FPS))
    sampled = len(range(0, flow.shape[0] + 1, interval))  # frames VBench would read
    pairs = [compose(flow[s:s + interval]) for s in range(0, flow.shape[0] - interval + 1, interval)]
    scores = top_mean(magnitude(torch.cat(pairs))) * factor if pairs else flow.new_zeros(0)
    threshold = max(1.0, VBENCH_FPS / fps) * THRESHOLD_PX_AT_256 * short_side / 256
    moving = int((scores > threshold).sum())
    needed = max(1, round(4 * sampled / 16))
    return {"score": moving / len(pairs) if pairs else 0.0, "dynamic": bool(pairs) and moving >= needed,
            "threshold_px": threshold}


def trajectories(flow: torch.Tensor) -> torch.Tensor:
    """Displacement of every pixel of frame 0 in each frame, following the flow: (F, 2, H, W), [0] = 0."""
    grid = base_grid(*flow.shape[-2:], flow.device)
    displacement = [flow.new_zeros(1, 2, *flow.shape[-2:])]
    for step in flow:
        displacement.append(displacement[-1] + sample(step[None], grid + displacement[-1]))
    return torch.cat(displacement)


def motion_spectrum(flow: torch.Tensor, fps: float, factor: int = 1) -> dict:
    """Generative Image Dynamics' spectral view: each pixel's trajectory (its mean removed) through the temporal
    FFT; the amplitude of the (x, y) oscillation at each frequency, in pixels, averaged over pixels. A pixel
    swinging A px at a bin's frequency contributes A at that bin. The dominant frequency is the largest bin above
    0 Hz (0.0 when nothing moves by a hundredth of a pixel)."""
    path = trajectories(flow) * factor  # (F, 2, h, w) in the video's pixels
    frames = path.shape[0]
    spectrum = torch.fft.rfft(path - path.mean(0), dim=0).abs()  # (F // 2 + 1, 2, H, W)
    weight = torch.full((spectrum.shape[0],), 2.0 / frames, device=flow.device)
    if frames % 2 == 0:
        weight[-1] = 1.0 / frames  # the Nyquist bin has no mirror image
    amplitude = (spectrum.square().sum(1).sqrt() * weight[:, None, None]).mean((1, 2))[1:].tolist()
    freqs = [k * fps / frames for k in range(1, len(amplitude) + 1)]
    peak = max(range(len(amplitude)), key=amplitude.__getitem__) if amplitude else None
    dominant = freqs[peak] if peak is not None and amplitude[peak] >= 0.01 else 0.0
    return {"freqs_hz": freqs, "amplitude_px": amplitude, "dominant_hz": dominant}


def residual_spectrum(video: torch.Tensor, chunk: int = 8) -> dict:
    """Spectral Motion Alignment's view of the frame differences r = luma[t + 1] - luma[t]: their energy (mean
    r^2, intensities in [0, 1]) by spatial frequency (Parseval: the bands add up to mean r^2), averaged over
    pairs; below CUTOFF_CYCLES_PER_PX is low, the rest high. Also the RADIAL_BANDS bands, for charts."""
    gray = luma(to_unit(video))[:, 0]  # (F, H, W)
    height, width = gray.shape[-2:]
    fy, fx = torch.fft.fftfreq(height, device=gray.device), torch.fft.fftfreq(width, device=gray.device)
    radius = (fy[:, None] ** 2 + fx[None, :] ** 2).sqrt()  # (H, W) cycles per pixel
    band = (radius / 0.5 * RADIAL_BANDS).long().clamp(max=RADIAL_BANDS - 1).flatten()  # corners: last band
    energy = torch.zeros(RADIAL_BANDS, dtype=torch.float64, device=gray.device)
    pairs = gray.shape[0] - 1
    for start in range(0, pairs, chunk):
        end = min(start + chunk, pairs)
        power = torch.fft.fft2(gray[start + 1:end + 1] - gray[start:end]).abs().square()  # (n, H, W)
        energy.index_add_(0, band, power.sum(0).flatten().double())
    energy = (energy / (max(pairs, 1) * (height * width) ** 2)).tolist()
    edges = [b * 0.5 / RADIAL_BANDS for b in range(RADIAL_BANDS + 1)]
    low = sum(e for e, upper in zip(energy, edges[1:]) if upper <= CUTOFF_CYCLES_PER_PX)
    total = sum(energy)
    high = max(total - low, 0.0)
    return {"low_freq_energy": low, "high_freq_energy": high, "high_freq_ratio": high / total if total > 0 else 0.0,
            "bands_cycles_per_px": [(lo + hi) / 2 for lo, hi in zip(edges, edges[1:])], "band_energy": energy}


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    """PSNR in dB of two (H, W, 3) 0..255 images (capped at PSNR_CAP_DB)."""
    mse = (a.double() - b.double()).square().mean().item()
    return PSNR_CAP_DB if mse == 0 else min(PSNR_CAP_DB, 10 * math.log10(255.0 ** 2 / mse))


def gaussian_kernel(sigma: float, taps: int, device=None) -> torch.Tensor:
    x = torch.arange(taps, dtype=torch.float64, device=device) - (taps - 1) / 2
    k = torch.exp(-x * x / (2 * sigma * sigma))
    return k / k.sum()


def filter_valid(x: torch.Tensor, kernel: torch.Tensor) -> torch.Tensor:
    """Separable filtering of every channel of (N, C, H, W) over the windows that fit inside: (N, C, H - k + 1, ...)."""
    c = x.shape[1]
    x = F.conv2d(x, kernel.view(1, 1, 1, -1).expand(c, 1, 1, -1), groups=c)
    return F.conv2d(x, kernel.view(1, 1, -1, 1).expand(c, 1, -1, 1), groups=c)


def ssim(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean SSIM of two (H, W, 3) 0..255 images: per channel over the valid windows, then over channels."""
    x, y = (t.double().permute(2, 0, 1)[None] for t in (a, b))  # (1, 3, H, W)
    taps = min(SSIM_TAPS, (min(x.shape[-2:]) - 1) // 2 * 2 + 1)  # smaller for images under 11 pixels
    window = gaussian_kernel(SSIM_SIGMA, taps, x.device)
    mean_x, mean_y = filter_valid(x, window), filter_valid(y, window)
    var_x = filter_valid(x * x, window) - mean_x ** 2
    var_y = filter_valid(y * y, window) - mean_y ** 2
    cov = filter_valid(x * y, window) - mean_x * mean_y
    c1, c2 = (SSIM_K1 * 255) ** 2, (SSIM_K2 * 255) ** 2
    index = ((2 * mean_x * mean_y + c1) * (2 * cov + c2)) / ((mean_x ** 2 + mean_y ** 2 + c1) * (var_x + var_y + c2))
    return index.mean().item()


def fidelity(first_frame: torch.Tensor, image: torch.Tensor) -> dict:
    """Frame 0 (H, W, 3) against the input image, resized to (H, W) as the pipelines resize it (Lanczos)."""
    frame = (to_unit(first_frame) * 255).round().clamp(0, 255).to(torch.uint8).cpu()
    target = media.resize(media.load_image(image), *frame.shape[:2], "lanczos")
    return {"first_frame_psnr": psnr(frame, target), "first_frame_ssim": ssim(frame, target)}


# ---------------------------------------------------------------------------------------------------------
# The report

def analyze(video: torch.Tensor, fps: float, image=None, device=None, details: bool = False) -> dict:
    """Every measure of a video (F, H, W, 3), uint8 or float in [0, 1], at `fps`; `image` (a path or an
    (H, W, 3) uint8 array) adds fidelity. The report of `python cli.py motion --json`; `details` adds the
    residual's radial spectrum (for charts)."""
    if video.ndim != 4 or video.shape[-1] != 3 or video.shape[0] < 2:
        raise ValueError(f"video must be (frames >= 2, H, W, 3), got {tuple(video.shape)}")
    if not fps > 0:
        raise ValueError(f"fps must be positive, got {fps!r}")
    device = check_device(device) if device is not None else video.device
    frames = video.to(device)
    flow, factor = optical_flow(frames)
    speed = magnitude(flow) * factor  # (F - 1, h, w) in the video's pixels per frame
    per_pair = speed.mean((1, 2))
    residual = residual_spectrum(frames)
    report = {
        "frames": video.shape[0], "fps": float(fps), "height": video.shape[1], "width": video.shape[2],
        "flow": {"mean_px": per_pair.mean().item(), "top5_mean_px": top_mean(speed).mean().item(),
                 "per_pair_px": per_pair.tolist()},
        "dynamic_degree": dynamic_degree(flow, fps, factor, min(video.shape[1:3])),
        "spectrum": motion_spectrum(flow, fps, factor),
        "residual": {k: residual[k] for k in ("low_freq_energy", "high_freq_energy", "high_freq_ratio")},
    }
    if image is not None:
        report["fidelity"] = fidelity(video[0], image)
    if details:
        report["residual_bands"] = {k: residual[k] for k in ("bands_cycles_per_px", "band_energy")}
    return report


def table(report: dict) -> str:
    """A short readable summary of a report."""
    flow, dyn, spec, res = report["flow"], report["dynamic_degree"], report["spectrum"], report["residual"]
    rows = [
        ("video", f"{report['frames']} frames, {report['width']}x{report['height']} at {report['fps']:g} fps"),
        ("flow mean", f"{flow['mean_px']:.3f} px/frame"),
        ("flow top 5% mean", f"{flow['top5_mean_px']:.3f} px/frame"),
        ("dynamic degree", f"{'dynamic' if dyn['dynamic'] else 'static'} ({dyn['score']:.0%} of pairs over "
                           f"{dyn['threshold_px']:.2f} px)"),
        ("dominant motion", f"{spec['dominant_hz']:.2f} Hz"),
        ("residual energy", f"low {res['low_freq_energy']:.3g}, high {res['high_freq_energy']:.3g} "
                            f"(high ratio {res['high_freq_ratio']:.3f})"),
    ]
    if "fidelity" in report:
        fid = report["fidelity"]
        rows.append(("frame 0 vs image", f"PSNR {fid['first_frame_psnr']:.2f} dB, SSIM {fid['first_frame_ssim']:.4f}"))
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:{width}s}  {value}" for name, value in rows)


def panning_texture(frames: int, height: int, width: int, step=(1.5, 0.7), seed: int = 0) -> torch.Tensor:
    """A synthetic video with known motion, for benchmarks and checks: (F, H, W, 3) in [0, 1], a smooth random
    texture moved by `step` = (x, y) pixels per frame, exactly (phase ramps in its Fourier transform)."""
    pad = 64
    noise = torch.randn(3, height + pad, width + pad, generator=torch.Generator().manual_seed(seed))
    fy, fx = torch.fft.fftfreq(height + pad), torch.fft.fftfreq(width + pad)
    spectrum = torch.fft.fft2(noise) * torch.exp(-2 * math.pi ** 2 * 2.5 ** 2 * (fy[:, None] ** 2 + fx ** 2))
    out = []
    for t in range(frames):
        phase = torch.exp(-2j * math.pi * (fx * step[0] * t + fy[:, None] * step[1] * t))
        image = torch.fft.ifft2(spectrum * phase).real[:, pad // 2:pad // 2 + height, pad // 2:pad // 2 + width]
        out.append((image / image.std() * 0.18 + 0.5).clamp(0, 1).permute(1, 2, 0))
    return torch.stack(out)
