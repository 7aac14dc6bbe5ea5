"""Time minialg.motion.analyze on an 81-frame 480x832 video (Wan's default output), written through H.264 and
read back. The video is a smooth random texture panning at (1.5, 0.7) px/frame, so the measured flow can be
checked too. Usage: python scripts/time_motion.py [--frames 81] [--height 480] [--width 832] [--repeats 3]"""

import argparse
import math
import os
import platform
import statistics
import tempfile
import time

import torch

from minialg import media, motion


def panning_texture(frames: int, height: int, width: int, step=(1.5, 0.7), seed: int = 0) -> torch.Tensor:
    """(F, H, W, 3) in [0, 1]: a window over a larger Gaussian-filtered noise texture, moved by sub-pixel
    steps exactly (phase ramps in its Fourier transform)."""
    pad = 64
    noise = torch.randn(3, height + pad, width + pad, generator=torch.Generator().manual_seed(seed))
    fy, fx = torch.fft.fftfreq(height + pad), torch.fft.fftfreq(width + pad)
    spectrum = torch.fft.fft2(noise) * torch.exp(-2 * math.pi ** 2 * 2.5 ** 2 * (fy[:, None] ** 2 + fx ** 2))
    out = []
    for t in range(frames):
        phase = torch.exp(-2j * math.pi * (fx * step[0] * t + fy[:, None] * step[1] * t))
        image = torch.fft.ifft2(spectrum * phase).real
        image = image[:, pad // 2:pad // 2 + height, pad // 2:pad // 2 + width]
        out.append((image / image.std() * 0.18 + 0.5).clamp(0, 1).permute(1, 2, 0))
    return torch.stack(out)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--frames", type=int, default=81)
    parser.add_argument("--height", type=int, default=480)
    parser.add_argument("--width", type=int, default=832)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--device", default="cpu")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "pan.mp4")
        media.write_video(panning_texture(args.frames, args.height, args.width), path, fps=16)
        video, fps = motion.read_video(path)
    motion.analyze(video[:3], fps, device=args.device)  # warm-up
    walls, cpus = [], []
    for _ in range(args.repeats):
        if args.device.startswith("cuda"):
            torch.cuda.synchronize()
        wall, cpu = time.perf_counter(), time.process_time()
        report = motion.analyze(video, fps, device=args.device)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    load = os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")
    print(f"motion.analyze, {args.frames} frames {args.width}x{args.height} on {args.device} "
          f"({platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
          f"load average {load:.2f}): median {statistics.median(walls):.2f} s wall, "
          f"{statistics.median(cpus):.2f} s CPU over {args.repeats} runs; measured flow "
          f"{report['flow']['mean_px']:.3f} px/frame (true {math.hypot(1.5, 0.7):.3f})")


if __name__ == "__main__":
    main()
