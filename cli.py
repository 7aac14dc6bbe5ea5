"""minialg's command line.

The authors' command line works unchanged:
    python cli.py --config wan_alg --image_path city.png --prompt "A car chase" --output_path city.mp4
plus our own flags (--seed, --device, --model, --negative_prompt, --dtype, size and step overrides, ...) and the
subcommands in SUBCOMMANDS (`python cli.py --help` lists them, `python cli.py SUB --help` explains each).

Under torchrun every command that makes videos runs on all ranks (minialg.parallel: guidance- and
sequence-parallel, `--sequence_parallel K`; `batch` shares the manifest's lines out); only rank 0 writes.

The output's extension picks its format (.mp4, .mkv: H.264; .webm: VP9; .gif); any other is refused before
any compute. Ctrl-C (SIGINT) or SIGTERM during a run prints one line ("interrupted after step i of n; nothing
written"), removes every partial or temporary file and exits with status 130 (SIGINT) or 143 (SIGTERM), the
shell's 128 + signal number.

Exit status: 0 when the command did what it was asked; 1 for an error, in one line on stderr (bad arguments,
inputs, config or checkpoint; for `batch`, an error before any video); 3 from `batch` when any line of the
manifest failed (the others were made; the last line says so and names failures.jsonl), and from `batch
--dry_run` when any line would fail; 130 / 143 when interrupted.
"""

import argparse
import os
import shlex
import signal
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass, field
from pathlib import Path

import torch

import minialg
from minialg import checkpoint, lora, media, parallel
from minialg.config import bucket_size, load_config, sized  # noqa: F401  (bucket_size: importable here)
from minialg.weight_flags import add_transformer_flags, component_files, loras
from minialg.demo import FAMILIES
from minialg.pipeline import settle
from minialg.registry import default_preset, pipeline_class

SUBCOMMANDS = {  # name -> one line for the top-level help
    "check": "validate a checkpoint from its configs and safetensors headers (no tensor data read)",
    "download": "fetch a checkpoint from the Hugging Face hub into weights/",
    "demo": "a whole run on a tiny random checkpoint, offline, on the CPU (the video is noise)",
    "bench": "benchmarks: the denoiser at real size (CUDA), whole runs against diffusers (CPU)",
    "motion": "measure a video's motion: optical flow, dynamic degree, motion and residual spectra, fidelity",
    "compare": "one run with ALG and one without (same seed): videos, motion reports, report.html",
    "batch": "one video per line of a JSONL manifest: resumable, failures logged, lines shared over torchrun ranks",
}
LOOP_OPTIONS = ("negative_prompt", "flow_shift", "solver", "seed")  # generation keys of the loop itself; the
# others beside the OVERRIDES and common ones are the family's own (checked by it before the model loads)
OVERRIDES = ("height", "width", "num_frames", "num_inference_steps", "guidance_scale")  # run flags over the config
LINES_FAILED = 3  # batch's exit status when some lines failed (1 is an error before any video)


@dataclass
class Status:
    """What an interrupt message reports: the pipeline whose progress counts, the run it is in, files written."""
    generating: bool = False  # a command that makes videos (its interrupt message names the step)
    pipe: "minialg.Pipeline | None" = None
    run: str = ""  # which of several runs (compare)
    written: list = field(default_factory=list)


status = Status()


class Terminated(BaseException):
    """Raised by the SIGTERM handler, so SIGTERM unwinds (and cleans up) like Ctrl-C."""


def _terminate(signum, frame):
    raise Terminated()


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def run_settings(args) -> tuple:
    """The config with the command line's overrides, checked: (config, model folder, image, generation kwargs,
    seed)."""
    config, generation, seed = run_config(args, load_config(args.config))
    model = args.model or config.model
    if not model:
        raise ValueError("no model: set model.path in the config or pass --model")
    image = media.load_image(args.image_path)  # every input checked before the model is loaded
    generation = sized(config.resolution, generation, image, keep=flagged(args))  # HunyuanVideo's buckets
    folder = checkpoint.resolve(model)
    check_generation(folder, config, generation)
    return config, folder, image, generation, seed


def run_config(args, config) -> tuple:
    """The config with the command line's overrides: (config, generation kwargs, seed)."""
    generation = dict(config.generation)
    seed = args.seed if args.seed is not None else generation.pop("seed", 42)
    generation.pop("seed", None)
    if args.negative_prompt is not None:
        generation["negative_prompt"] = args.negative_prompt
    for name in OVERRIDES:
        if getattr(args, name) is not None:
            generation[name] = getattr(args, name)
    if args.fps is not None:
        config.fps = args.fps
    return config, generation, seed


def flagged(args) -> set:
    """The generation settings the command line set: they win over the config and HunyuanVideo's size buckets."""
    return {name for name in OVERRIDES if getattr(args, name) is not None}


def check_generation(folder: Path, config, generation: dict) -> dict:
    """The run's settings against the checkpoint's defaults and the family's own keywords, before the model is
    loaded; returns the settled run (the size and frames the pipeline will use)."""
    family, common = pipeline_class(folder), OVERRIDES + ("max_sequence_length", "use_dynamic_cfg")
    run = settle(family.defaults_of(folder), alg=config.alg, **{k: v for k, v in generation.items() if k in common})
    own = {k: v for k, v in generation.items() if k not in common and k not in LOOP_OPTIONS}
    family.settle_options(folder, run, **own)
    return run


def load_pipeline(args, folder, config, data_parallel: bool = False) -> "minialg.Pipeline":
    return minialg.load(folder, device=args.device or default_device(), dtype=args.dtype or config.dtype,
                        **component_files(args), **loras(args, config), strict_loras=not args.lora_skip_unmatched,
                        offload_encoders=args.offload_encoders, compile=args.compile, stream_blocks=args.stream_blocks,
                        cache_cross_attention=not args.no_cache, sequence_parallel=args.sequence_parallel,
                        data_parallel=data_parallel)


def generate_settings(args) -> tuple:
    output = Path(args.output_path)
    media.video_format(output)  # an extension we cannot write fails before any compute
    if not output.parent.is_dir():
        raise ValueError(f"output folder does not exist: {output.parent}")
    return run_settings(args)


def generate(args) -> None:
    parallel.join(args.device or default_device())  # under torchrun: all ranks meet before checking the inputs
    config, folder, image, generation, seed = parallel.together(generate_settings, args)  # one rank's error: all
    output = Path(args.output_path)
    start = time.perf_counter()
    pipe = status.pipe = load_pipeline(args, folder, config)
    frames = pipe(image, args.prompt, seed=seed, alg=config.alg, **generation)
    if not pipe.layout.writes:
        return
    media.write_video(frames, output, fps=config.fps)
    status.written.append(str(output))
    times = ", ".join(f"{k} {v:.1f}s" for k, v in pipe.timings.items())
    print(f"wrote {output}: {frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]} at {config.fps} fps, "
          f"in {time.perf_counter() - start:.1f}s ({times})")


def compare(args) -> None:
    from minialg.comparison import compare as run_compare, summary

    parallel.join(args.device or default_device())
    config, folder, image, generation, seed = parallel.together(run_settings, args)
    if parallel.rank() != 0:  # under torchrun the other ranks compute with rank 0 and write nothing
        with tempfile.TemporaryDirectory() as scratch:
            run_compare(image, args.prompt, scratch, config=config, model=folder, seed=seed, generation=generation,
                        load=lambda: load_pipeline(args, folder, config), status=status)
        return
    report = run_compare(image, args.prompt, args.output_dir, config=config, model=folder, seed=seed,
                         generation=generation, load=lambda: load_pipeline(args, folder, config), status=status)
    print(summary(report, args.output_dir))


def motion(args) -> None:
    import json

    from minialg import motion as measure

    video, fps = measure.read_video(args.video)
    image = media.load_image(args.image) if args.image else None
    report = measure.analyze(video, fps, image=image, device=args.device)
    print(json.dumps(report) if args.json else measure.table(report))


def check(args) -> None:
    summary = minialg.check(args.model, **component_files(args), **loras(args))
    for row in summary:
        print(f"{row['component']:14s} {row['class']:16s} {row['tensors']:5d} tensors in {row['files']} file(s), "
              f"{row['parameters'] / 1e9:.3f} B parameters")
        if "format" in row:  # a component from a file of its own
            sharded = f"{row['files']} shards" if row["files"] > 1 else "one file"
            print(f"{'':14s} {getattr(args, row['component'])}: {row['model']}\n{'':14s} {row['format']} layout "
                  f"({row['names']} names, {sharded}, {row['bytes'] / 1e9:.2f} GB): {row['precision']}\n"
                  f"{'':14s} config: {row['config']}")
        for e in row.get("loras", []):
            print(f"{'':14s} LoRA {e['file']} (strength {e['strength']:g}): {e['format']} names, "
                  f"{', '.join(e['keys'])}, rank {e['rank']}; {e['matched']} keys matched, "
                  f"{len(e['unmatched'])} unmatched" + "".join(f"\n{'':16s} unmatched: {k}" for k in e["unmatched"]))
    lora.refuse_unmatched(summary, not args.lora_skip_unmatched)  # as load refuses them
    print(f"ok: {args.model} matches its configs")


def download(args) -> None:
    dest = checkpoint.download(args.model, Path(args.dest) if args.dest else None)
    print(f"downloaded {args.model} into {dest}")


DEMO_PROMPT = "a red ball bouncing"


def demo(args) -> None:
    from minialg.demo import demo_image, write_tiny

    media.video_format(args.output_path)
    keep = Path(args.save_model).expanduser() if args.save_model else None
    if keep is not None and keep.exists() and (not keep.is_dir() or any(keep.iterdir())):
        raise ValueError(f"--save_model {keep}: already exists and is not an empty folder; name a new one")
    print(f"demo: a tiny {args.family} checkpoint with RANDOM weights, written and run offline on the CPU; "
          "the video is noise, the path through the code is the real one")
    if keep is not None:
        keep.parent.mkdir(parents=True, exist_ok=True)
    # written beside DIR and renamed into place at the end: an interrupted demo leaves no half checkpoint
    with tempfile.TemporaryDirectory(dir=keep.parent if keep else None) as tmp:
        folder = write_tiny(Path(tmp) / "tiny", args.family)
        pipe = status.pipe = minialg.load(folder, device="cpu", dtype=torch.float32)
        start = time.perf_counter()
        frames = pipe(demo_image(), DEMO_PROMPT, num_frames=17, height=64, width=96,
                      num_inference_steps=args.steps, seed=args.seed, alg=load_config(f"{args.family}_alg").alg)
        if not pipe.layout.writes:
            return
        media.write_video(frames, Path(args.output_path), fps=16)
        status.written.append(args.output_path)
        if keep is not None:
            media.write_image(demo_image(), folder / "demo.png")  # the input, for the commands that need one
            os.replace(folder, keep)  # onto an empty folder too
            status.written.append(str(keep))
    print(f"wrote {args.output_path}: {frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, "
          f"{args.steps} steps with ALG in {time.perf_counter() - start:.1f}s")
    if keep is not None:
        print(f"kept the checkpoint in {keep} (its input image: {keep / 'demo.png'}); baseline against ALG on it, "
              "in seconds on the CPU:")
        print("    " + shlex.join(demo_compare(keep, args.family, args.steps)))


def demo_compare(folder: Path, family: str, steps: int) -> list[str]:
    """The `compare` command for a checkpoint `demo --save_model` kept: the demo's size, few frames, its steps."""
    return ["python", "cli.py", "compare", "--model", str(folder), "--config", f"{family}_alg", "--image_path",
            str(folder / "demo.png"), "--prompt", DEMO_PROMPT, "--output_dir", str(folder / "compare"),
            "--height", "64", "--width", "96", "--num_frames", "9", "--num_inference_steps", str(steps),
            "--device", "cpu", "--dtype", "float32"]


def add_run_flags(parser: argparse.ArgumentParser, one_video: bool = True) -> None:
    """The flags of a run: the authors' (--config, --image_path, --prompt) and ours. `batch` reads the image
    and prompt from its manifest, and its config defaults to the model family's ALG preset."""
    if one_video:
        parser.add_argument("--config", required=True, help="YAML run config, or a preset name (wan_alg, ...)")
        parser.add_argument("--image_path", required=True)
        parser.add_argument("--prompt", required=True)
    else:
        parser.add_argument("--config", default=None, help="YAML run config or preset name (default: the ALG "
                            "preset of the model's own variant, e.g. wan22_alg for Wan 2.2 A14B; then --model is "
                            "needed)")
    parser.add_argument("--negative_prompt", default=None)
    parser.add_argument("--seed", type=int, default=None, help="default: the config's, else 42 (as the authors)")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument("--model", default=None, help="checkpoint folder or hub repo id (overrides model.path)")
    add_transformer_flags(parser)
    parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
    for name, kind in zip(OVERRIDES, (int, int, int, int, float)):
        parser.add_argument(f"--{name}", type=kind, default=None, help=f"overrides the config's generation.{name}")
    parser.add_argument("--fps", type=float, default=None, help="overrides the config's video.fps")
    parser.add_argument("--offload_encoders", action=argparse.BooleanOptionalAction, default=None,
                        help="keep the text/image encoders on the CPU between uses (default: the family decides; "
                             "on for HunyuanVideo-I2V on CUDA cards under 80 GB)")
    parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
    parser.add_argument("--stream_blocks", action="store_true",
                        help="keep transformer blocks in CPU memory, stream them to the GPU one at a time")
    parser.add_argument("--sequence_parallel", type=int, default=1, metavar="K",
                        help="under torchrun: split each pass's video tokens over K ranks (Ulysses); the world "
                             "size must be K times 1, 2 or 3 (guidance passes shared out)")
    parser.add_argument("--no_cache", action="store_true",
                        help="recompute the cross-attention keys/values (and other step-invariant work) every step")
    parser.add_argument("--model_cache_dir", default=None, help=argparse.SUPPRESS)  # the authors' flag


def subcommand_parser(name: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=f"cli.py {name}", description=SUBCOMMANDS[name])
    if name in ("check", "download"):
        parser.add_argument("model", help="checkpoint folder or hub repo id")
    if name == "check":
        add_transformer_flags(parser)
    if name == "download":
        parser.add_argument("--dest", help="target folder (default: weights/NAME)")
    if name == "demo":
        parser.add_argument("--output_path", default="demo.mp4", help="video file: .mp4, .mkv, .webm or .gif")
        parser.add_argument("--steps", type=int, default=8)
        parser.add_argument("--family", default="wan", choices=list(FAMILIES))
        parser.add_argument("--seed", type=int, default=42)
        parser.add_argument("--save_model", default=None, metavar="DIR",
                            help="keep the tiny checkpoint (and its input image, DIR/demo.png) in DIR, a new or "
                                 "empty folder, to try compare, batch, check and motion on; prints the compare command")
    if name == "motion":
        parser.add_argument("video", help="a video file PyAV reads (mp4, webm, mkv, gif, ...)")
        parser.add_argument("--image", default=None, help="the input image: adds PSNR and SSIM of frame 0 to it")
        parser.add_argument("--json", action="store_true", help="print one JSON object instead of a table")
        parser.add_argument("--device", default="cpu", help="where to compute (cpu, cuda, ...)")
    if name == "compare":
        add_run_flags(parser)
        parser.add_argument("--output_dir", required=True, help="folder for the videos, report.json, report.html")
    if name == "batch":
        parser.add_argument("manifest", help='JSONL, one video per line: {"id", "image", "prompt", "seed"?, '
                            '"negative_prompt"?, "overrides"?} (image paths relative to the manifest\'s folder)')
        parser.add_argument("--output_dir", required=True, help="folder for ID.mp4 and failures.jsonl")
        parser.add_argument("--format", default="mp4", choices=[e[1:] for e in media.VIDEO_FORMATS],
                            help="the videos' format")
        parser.add_argument("--dry_run", action="store_true",
                            help="check every line (image, settings, id) and the checkpoint, print what would run "
                                 "and exit (0: every line would run, 3: some would fail); loads no weights")
        add_run_flags(parser, one_video=False)
    return parser


def top_parser() -> argparse.ArgumentParser:
    """The run without a subcommand (the authors' command line); its help lists every subcommand."""
    width = max(map(len, SUBCOMMANDS))
    epilog = "subcommands (python cli.py SUB --help for each):\n" + "\n".join(
        f"  {name:{width}s}  {line}" for name, line in SUBCOMMANDS.items())
    parser = argparse.ArgumentParser(
        prog="cli.py", formatter_class=argparse.RawDescriptionHelpFormatter, epilog=epilog,
        usage="%(prog)s --config C --image_path I --prompt P --output_path O [options]\n"
              f"       %(prog)s {{{','.join(SUBCOMMANDS)}}} ...",
        description="Image to video with Adaptive Low-pass Guidance.")
    add_run_flags(parser)
    parser.add_argument("--output_path", required=True, help="video file: .mp4, .mkv (H.264), .webm (VP9), .gif")
    return parser


def batch(args) -> int:
    """The manifest's videos; the exit status says whether every line was made (0) or some failed (3)."""
    from minialg import batch as batches

    if args.dry_run:
        return batch_plan(args)
    parallel.join(args.device or default_device())
    config, folder, items, bad, generation, seed = parallel.together(batch_settings, args)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    if parallel.rank() == 0:
        for record in bad:
            batches.log_failure(output_dir, record)
    pipe = status.pipe = load_pipeline(args, folder, config, data_parallel=True)
    counts = batches.run(pipe, items, output_dir, generation=generation, seed=seed, alg=config.alg, fps=config.fps,
                         extension=f".{args.format}", status=status, resolution=config.resolution,
                         fixed=flagged(args))
    counts["failed"] += len(bad) if parallel.rank() == 0 else 0
    if not pipe.layout.writes:  # a sequence group's other ranks made the same videos: counted once
        counts = dict.fromkeys(counts, 0)
    launched = parallel.launched()
    if pipe.layout.writes:
        print(batch_line(f"rank {pipe.layout.rank}: batch" if launched else "batch", counts, output_dir,
                         exit_status=not launched))
    total = parallel.tally(counts)  # rank 0 waits for the other ranks' counts; None on the others
    if total is None:
        return 0
    if launched:
        print(batch_line(f"batch, all {parallel.world_size()} ranks", total, output_dir))
    return LINES_FAILED if total["failed"] else 0


def batch_line(who: str, counts: dict, output_dir: Path, exit_status: bool = True) -> str:
    failed = counts["failed"]
    where = f" (see {output_dir / 'failures.jsonl'})" if failed else ""
    code = f"; exit status {LINES_FAILED}" if failed and exit_status else ""
    return f"{who}: {counts['written']} written, {counts['done']} already there, {failed} failed{where}{code}"


def batch_plan(args) -> int:
    """`batch --dry_run`: the checkpoint checked from its configs and headers, every line as the run checks it;
    prints one line per video that would run and a summary. Loads no weights, writes nothing."""
    from minialg import batch as batches

    if parallel.rank() != 0:  # under torchrun: checked and said once, by rank 0
        return 0
    config, folder, items, bad, generation, seed = batch_settings(args)
    summary = minialg.check(folder, transformer=args.transformer, transformer_2=args.transformer_2,
                            **loras(args, config))  # every component's names and shapes, the LoRAs'; no tensor data
    lora.refuse_unmatched(summary, not args.lora_skip_unmatched)
    lines, counts = batches.plan(items, bad, Path(args.output_dir), generation=generation, seed=seed,
                                 check=lambda settings: check_generation(folder, config, settings),
                                 extension=f".{args.format}", resolution=config.resolution, fixed=flagged(args))
    print("\n".join(lines))
    code = f"; exit status {LINES_FAILED}" if counts["failed"] else ""
    print(f"dry run of {folder} with {args.config or default_preset(folder)}: {counts['run']} would run, "
          f"{counts['done']} already there, {counts['failed']} would fail{code} (no weights loaded, nothing "
          f"written)")
    return LINES_FAILED if counts["failed"] else 0


def batch_settings(args) -> tuple:
    """The run for every line, checked before the model is loaded, and the manifest's lines."""
    from minialg import batch as batches

    if args.config is None and args.model is None:
        raise ValueError("batch needs --config or --model")
    folder = checkpoint.resolve(args.model) if args.model else None
    config = load_config(args.config or default_preset(folder))
    config, generation, seed = run_config(args, config)
    if folder is None:
        if not config.model:
            raise ValueError("no model: set model.path in the config or pass --model")
        folder = checkpoint.resolve(config.model)
    check_generation(folder, config, generation)
    items, bad = batches.read_manifest(args.manifest)
    return config, folder, items, bad, generation, seed


def interrupted(how: str, code: int) -> int:
    """One line for an interrupted command; partial files were removed on the way out."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):  # clear a live progress bar first
        bar.close()
    where = ""
    if status.pipe is not None:
        done, steps = status.pipe.progress
        where = f" after step {done} of {steps}" + (f" of the {status.run} run" if status.run else "")
    elif status.generating:
        where = " before the first step"
    kept = f"; wrote {', '.join(status.written)} before that" if status.written else "; nothing written"
    if len(status.written) > 3:
        kept = f"; wrote {len(status.written)} files before that"
    print(f"{how}{where}{kept}", file=sys.stderr)
    return code


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":  # python cli.py bench ... == python -m minialg.bench ...
        from minialg.bench import main as bench

        return bench(argv[1:]) or 0
    if argv and argv[0] in SUBCOMMANDS:
        command, args = globals()[argv[0]], subcommand_parser(argv[0]).parse_args(argv[1:])
    else:
        command, args = generate, top_parser().parse_args(argv)
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"
    if parallel.rank() != 0:
        warnings.simplefilter("ignore")  # said once, by rank 0
    global status
    status = Status(generating=command in (generate, demo, compare, batch))
    handler = signal.signal(signal.SIGTERM, _terminate) if _main_thread() else None
    try:
        code = command(args) or 0
        parallel.leave(barrier=command is not batch)  # batch ranks finish at their own pace
    except (ValueError, OSError, RuntimeError) as e:  # CheckpointError is a ValueError
        parallel.leave(ok=False, error=None if isinstance(e, parallel.PeerError) else str(e))
        rank = f"rank {parallel.rank()}: " if parallel.launched() and not str(e).startswith("rank ") else ""
        print(f"error: {rank}{e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        parallel.leave(ok=False)
        return interrupted("interrupted", 128 + signal.SIGINT)
    except Terminated:
        parallel.leave(ok=False)
        return interrupted("terminated", 128 + signal.SIGTERM)
    finally:
        if handler is not None:
            signal.signal(signal.SIGTERM, handler)
    return code


def _main_thread() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


if __name__ == "__main__":
    sys.exit(main())
