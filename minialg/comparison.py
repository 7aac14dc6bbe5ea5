"""Baseline against ALG: one configuration run twice with the same seed and settings, once with ALG and once
with `use_low_pass_guidance: false`, both videos measured (minialg.motion) and reported.

    import minialg
    report = minialg.compare("city.png", "A car chase at night", "out/", config="wan_alg")

writes out/baseline.mp4, out/alg.mp4, out/side_by_side.mp4 (left baseline, right ALG), out/report.json and
out/report.html (minialg.report), and returns what report.json holds. Each video is measured as it was
written (decoded back from its file), so `python cli.py motion out/alg.mp4` prints the same numbers. Nothing
is left in the output folder unless every file was made: they are written into a temporary folder inside it
and moved into place at the end.
"""

import dataclasses
import json
import os
import tempfile
import time
from pathlib import Path

import torch

from . import checkpoint, media, motion, report as html_report
from .report import rows
from .config import RunConfig, load_config

NAMES = ("baseline", "alg")
FILES = ("baseline.mp4", "alg.mp4", "side_by_side.mp4", "report.json", "report.html")
GAP = 8  # white pixels between the two videos of side_by_side.mp4


def compare(image, prompt: str, output_dir: "str | os.PathLike", *, config: "str | RunConfig" = "wan_alg",
            model=None, seed: int | None = None, generation: dict | None = None, device=None, dtype=None,
            load=None, status=None) -> dict:
    """Run `config` (a preset name, a YAML path or a RunConfig; it must have ALG on) with and without ALG.

    `model` overrides the config's checkpoint, `seed` its seed (default: the config's, else 42), `generation`
    updates its generation settings (height, num_inference_steps, ...). `load` (no arguments -> a pipeline)
    replaces minialg.load(model, device, dtype); `status` (cli.Status) is told the pipeline and the run under
    way, for the command line's interrupt message."""
    from .registry import load as load_model

    config = config if isinstance(config, RunConfig) else load_config(config)
    if not config.alg.use_low_pass_guidance:
        raise ValueError("compare needs a config with ALG on (alg.use_low_pass_guidance: true), such as wan_alg")
    settings = dict(config.generation, **(generation or {}))
    seed = seed if seed is not None else settings.get("seed", 42)
    settings.pop("seed", None)
    folder = checkpoint.resolve(model or config.model)
    pixels = media.load_image(image)
    output_dir = Path(output_dir)
    created = not output_dir.exists()
    output_dir.mkdir(parents=True, exist_ok=True)
    try:
        with tempfile.TemporaryDirectory(prefix=".compare-", dir=output_dir) as tmp:
            report = _run(pixels, prompt, Path(tmp), config, folder, seed, settings, device, dtype,
                          load or (lambda: load_model(folder, device=device or _default_device(),
                                                      dtype=dtype or config.dtype)), status)
            for name in FILES:
                os.replace(Path(tmp) / name, output_dir / name)
    except BaseException:
        if created and not any(output_dir.iterdir()):
            output_dir.rmdir()
        raise
    if status is not None:
        status.written.extend(str(output_dir / name) for name in FILES)
    return report


def _default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _run(pixels, prompt, tmp: Path, config, folder, seed, settings, device, dtype, load, status) -> dict:
    start = time.perf_counter()
    pipe = load()
    if status is not None:
        status.pipe = pipe
    load_s = time.perf_counter() - start
    algs = {"baseline": dataclasses.replace(config.alg, use_low_pass_guidance=False), "alg": config.alg}
    runs, videos, raw = {}, {}, {}
    for name in NAMES:
        if status is not None:
            status.run = "ALG" if name == "alg" else name
        start = time.perf_counter()
        frames = raw[name] = pipe(pixels, prompt, seed=seed, alg=algs[name], **settings)
        run_s = time.perf_counter() - start
        media.write_video(frames, tmp / f"{name}.mp4", fps=config.fps)
        start = time.perf_counter()
        videos[name], fps = motion.read_video(tmp / f"{name}.mp4")
        measured = motion.analyze(videos[name], fps, image=pixels, device=pipe.device, details=True)
        bands = measured.pop("residual_bands")
        runs[name] = {"video": f"{name}.mp4", "motion": measured, "residual_bands": bands,
                      "timings_s": dict(pipe.timings, run=run_s, motion=time.perf_counter() - start)}
    if status is not None:
        status.run = ""
    baseline, alg = raw["baseline"], raw["alg"]
    gap = torch.ones(baseline.shape[0], baseline.shape[1], GAP, 3)
    media.write_video(torch.cat([baseline, gap, alg], dim=2), tmp / "side_by_side.mp4", fps=config.fps)
    report = {
        "settings": {"model": str(folder), "prompt": prompt, "seed": seed, "fps": config.fps,
                     "dtype": str(pipe.dtype).replace("torch.", ""), "device": str(pipe.device),
                     "generation": settings, "alg": dataclasses.asdict(config.alg),
                     "baseline": "the same settings with alg.use_low_pass_guidance: false"},
        "timings_s": {"load": load_s},
        "runs": runs,
        "files": {"baseline": "baseline.mp4", "alg": "alg.mp4", "side_by_side": "side_by_side.mp4",
                  "html": "report.html"},
    }
    (tmp / "report.json").write_text(json.dumps(report, indent=1))
    embedded = {name: (tmp / f"{name}.mp4").read_bytes() for name in NAMES}
    (tmp / "report.html").write_text(html_report.html(report, embedded))
    return report


def summary(report: dict, output_dir: "str | os.PathLike | None" = None) -> str:
    """The two-column summary the command line prints."""
    table = [("", "baseline", "ALG"), *rows(report)]
    width = max(len(label) for label, _, _ in table)
    lines = [f"{label:{width}s}  {a:>10s}  {b:>10s}" for label, a, b in table]
    where = f"{output_dir}/" if output_dir is not None else ""
    lines.append(f"wrote {', '.join(where + name for name in FILES)} (side by side: left baseline, right ALG)")
    return "\n".join(lines)
