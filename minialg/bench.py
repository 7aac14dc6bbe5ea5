"""Benchmarks you can rerun: minialg against diffusers on the same checkpoint, inputs and settings.

    python -m minialg.bench --compare-diffusers     # CPU: mid-size random Wan and CogVideoX checkpoints, whole runs

Both pipelines load the same checkpoint folder (written by minialg.demo in the real layout, random weights) and
make the same video (same seed, size, steps, guidance); each run is timed end to end, the median of `--repeats`
rounds is reported, and the two outputs are compared. minialg's ALG run (the family's preset) is timed beside
them; diffusers has no ALG. A JSON report goes to --report.
"""

import argparse
import json
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

import minialg
from minialg.config import load_config
from minialg.demo import demo_image, write_tiny


def time_runs(runs: dict, repeats: int) -> dict:
    """Median wall time of each named call over `repeats` rounds, the calls alternating within a round (so a
    change in machine load hits both), after one warm-up round; returns {name: (seconds, last output)}."""
    outputs = {name: run() for name, run in runs.items()}
    times = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            start = time.perf_counter()
            outputs[name] = run()
            times[name].append(time.perf_counter() - start)
    return {name: (statistics.median(times[name]), outputs[name]) for name in runs}


def cpu_run(family: str, size: str, steps: int, repeats: int, compare: bool, frames: int, height: int,
            width: int) -> dict:
    """Whole CFG runs of one family with minialg (and diffusers), plus minialg's ALG run."""
    image = demo_image(height, width).numpy()
    args = dict(num_frames=frames, height=height, width=width, num_inference_steps=steps)
    prompt = "a red ball bouncing on a wooden floor"
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny(Path(tmp) / f"{family}-{size}", family, size=size)
        pipe = minialg.load(folder, device="cpu", dtype=torch.float32)
        if family == "cogvideox":  # its learned positional embedding fixes the size and the text length
            args.update(height=pipe.defaults["height"], width=pipe.defaults["width"])
        alg = load_config(f"{family}_alg").alg
        runs = {"minialg": lambda: pipe(image, prompt, seed=42, progress=False, **args),
                "minialg_alg": lambda: pipe(image, prompt, seed=42, alg=alg, progress=False, **args)}
        if compare:
            from diffusers import CogVideoXImageToVideoPipeline, WanImageToVideoPipeline
            from PIL import Image

            reference_cls = WanImageToVideoPipeline if family == "wan" else CogVideoXImageToVideoPipeline
            reference = reference_cls.from_pretrained(folder, dtype=torch.float32)
            reference.set_progress_bar_config(disable=True)
            extra = {} if family == "wan" else {"max_sequence_length": pipe.defaults["max_sequence_length"]}
            runs["diffusers"] = lambda: reference(image=Image.fromarray(image), prompt=prompt, output_type="np",
                                                  generator=torch.Generator("cpu").manual_seed(42), **args,
                                                  **extra).frames[0]
        results = time_runs(runs, repeats)
        pipe(image, prompt, seed=42, progress=False, **args)  # once more, for the stage times of a CFG run
        report = {"model": f"{family} I2V layout, '{size}' random weights", "device": "cpu", **args,
                  "repeats": repeats, "minialg_s": round(results["minialg"][0], 3),
                  "minialg_alg_s": round(results["minialg_alg"][0], 3),
                  "minialg_stages_s": {k: round(v, 3) for k, v in pipe.timings.items()}}
        if compare:
            (ref_s, ref), (ours_s, ours) = results["diffusers"], results["minialg"]
            report.update(diffusers_s=round(ref_s, 3), speedup=round(ref_s / ours_s, 3),
                          max_abs_diff=float(np.abs(ours.numpy() - ref).max()))
    return report


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minialg.bench", description=__doc__.splitlines()[0])
    parser.add_argument("--compare-diffusers", action="store_true", help="time diffusers in the same run")
    parser.add_argument("--family", nargs="+", default=["wan", "cogvideox"], choices=["wan", "cogvideox"])
    parser.add_argument("--size", default="mid", choices=["tiny", "mid"])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--frames", type=int, default=17)
    parser.add_argument("--height", type=int, default=128, help="Wan only: CogVideoX runs at its fixed size")
    parser.add_argument("--width", type=int, default=192)
    parser.add_argument("--report", default="bench.json")
    args = parser.parse_args(argv)
    report = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d"),
              "runs": [cpu_run(family, args.size, args.steps, args.repeats, args.compare_diffusers, args.frames,
                               args.height, args.width) for family in args.family]}
    Path(args.report).write_text(json.dumps(report, indent=2))
    for run in report["runs"]:
        line = f"{run['model']}: minialg {run['minialg_s']:.2f} s (with ALG {run['minialg_alg_s']:.2f} s)"
        if "diffusers_s" in run:
            line += (f", diffusers {run['diffusers_s']:.2f} s, speed-up x{run['speedup']:.2f}, "
                     f"max |frames diff| {run['max_abs_diff']:.1e}")
        print(line)
    print(f"report: {args.report}")


if __name__ == "__main__":
    main()
