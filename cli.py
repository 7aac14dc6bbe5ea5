"""minialg's command line.

The authors' command line works unchanged:
    python cli.py --config wan_alg --image_path city.png --prompt "A car chase" --output_path city.mp4
plus our own flags (--seed, --device, --model, --negative_prompt, --dtype) and subcommands:
    python cli.py check MODEL            validate a checkpoint from its configs and headers, no tensor data read
    python cli.py download REPO_ID       fetch a checkpoint from the hub into weights/
    python cli.py bench [--compare-diffusers]   benchmarks (python -m minialg.bench --help)
    python cli.py demo --output_path demo.mp4   a whole path (--family wan|cogvideox) on a tiny random checkpoint,
                                                offline, on the CPU
"""

import argparse
import sys
import tempfile
import time
import warnings
from pathlib import Path

import torch

import minialg
from minialg import checkpoint, media
from minialg.config import load_config
from minialg.pipeline import pipeline_class, settle


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def generate(args) -> None:
    config = load_config(args.config)
    model = args.model or config.model
    if not model:
        raise ValueError("no model: set model.path in the config or pass --model")
    generation = dict(config.generation)
    seed = args.seed if args.seed is not None else generation.pop("seed", 42)
    generation.pop("seed", None)
    if args.negative_prompt is not None:
        generation["negative_prompt"] = args.negative_prompt
    output = Path(args.output_path)
    if not output.parent.is_dir():
        raise ValueError(f"output folder does not exist: {output.parent}")
    image = media.load_image(args.image_path)  # every input checked before the model is loaded
    folder = checkpoint.resolve(model)
    settle(pipeline_class(folder).defaults_of(folder), alg=config.alg, **{k: v for k, v in generation.items() if k in (
        "height", "width", "num_frames", "num_inference_steps", "guidance_scale", "max_sequence_length",
        "use_dynamic_cfg")})
    start = time.perf_counter()
    pipe = minialg.load(folder, device=args.device or default_device(), dtype=args.dtype or config.dtype,
                        offload_encoders=args.offload_encoders, compile=args.compile,
                        stream_blocks=args.stream_blocks)
    frames = pipe(image, args.prompt, seed=seed, alg=config.alg, **generation)
    media.write_video(frames, output, fps=config.fps)
    times = ", ".join(f"{k} {v:.1f}s" for k, v in pipe.timings.items())
    print(f"wrote {output}: {frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]} at {config.fps} fps, "
          f"in {time.perf_counter() - start:.1f}s ({times})")


def check(args) -> None:
    summary = minialg.check(args.model)
    for row in summary:
        print(f"{row['component']:14s} {row['class']:16s} {row['tensors']:5d} tensors in {row['files']} file(s), "
              f"{row['parameters'] / 1e9:.3f} B parameters")
    print(f"ok: {args.model} matches its configs")


def download(args) -> None:
    dest = checkpoint.download(args.model, Path(args.dest) if args.dest else None)
    print(f"downloaded {args.model} into {dest}")


def demo(args) -> None:
    from minialg.demo import demo_image, write_tiny

    print(f"demo: a tiny {args.family} checkpoint with RANDOM weights, written and run offline on the CPU; "
          "the video is noise, the path through the code is the real one")
    with tempfile.TemporaryDirectory() as tmp:
        folder = write_tiny(Path(tmp) / "tiny", args.family)
        pipe = minialg.load(folder, device="cpu", dtype=torch.float32)
        start = time.perf_counter()
        frames = pipe(demo_image(), "a red ball bouncing", num_frames=17, height=64, width=96,
                      num_inference_steps=args.steps, seed=args.seed, alg=load_config(f"{args.family}_alg").alg)
        media.write_video(frames, Path(args.output_path), fps=16)
    print(f"wrote {args.output_path}: {frames.shape[0]} frames, {frames.shape[2]}x{frames.shape[1]}, "
          f"{args.steps} steps with ALG in {time.perf_counter() - start:.1f}s")


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv and argv[0] == "bench":  # python cli.py bench ... == python -m minialg.bench ...
        from minialg.bench import main as bench

        return bench(argv[1:]) or 0
    commands = {"check": check, "download": download, "demo": demo}
    if argv and argv[0] in commands:
        parser = argparse.ArgumentParser(prog=f"cli.py {argv[0]}")
        if argv[0] in ("check", "download"):
            parser.add_argument("model", help="checkpoint folder or hub repo id")
        if argv[0] == "download":
            parser.add_argument("--dest", help="target folder (default: weights/NAME)")
        if argv[0] == "demo":
            parser.add_argument("--output_path", default="demo.mp4")
            parser.add_argument("--steps", type=int, default=8)
            parser.add_argument("--family", default="wan", choices=["wan", "cogvideox"])
            parser.add_argument("--seed", type=int, default=42)
        command, args = commands[argv[0]], parser.parse_args(argv[1:])
    else:
        parser = argparse.ArgumentParser(prog="cli.py", description="Image to video with Adaptive Low-pass Guidance. "
                                         "Subcommands: check MODEL, download REPO_ID, demo.")
        parser.add_argument("--config", required=True, help="YAML run config, or a preset name (wan_alg, ...)")
        parser.add_argument("--image_path", required=True)
        parser.add_argument("--prompt", required=True)
        parser.add_argument("--output_path", required=True)
        parser.add_argument("--negative_prompt", default=None)
        parser.add_argument("--seed", type=int, default=None, help="default: the config's, else 42 (as the authors)")
        parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
        parser.add_argument("--model", default=None, help="checkpoint folder or hub repo id (overrides model.path)")
        parser.add_argument("--dtype", default=None, choices=["bfloat16", "float16", "float32"])
        parser.add_argument("--offload_encoders", action="store_true",
                            help="keep the text/image encoders on the CPU between uses")
        parser.add_argument("--compile", action="store_true", help="torch.compile each transformer block")
        parser.add_argument("--stream_blocks", action="store_true",
                            help="keep transformer blocks in CPU memory, stream them to the GPU one at a time")
        parser.add_argument("--model_cache_dir", default=None, help=argparse.SUPPRESS)  # the authors' flag
        command, args = generate, parser.parse_args(argv)
    warnings.formatwarning = lambda message, *_: f"warning: {message}\n"
    try:
        command(args)
    except (ValueError, OSError, RuntimeError) as e:  # CheckpointError is a ValueError
        print(f"error: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
