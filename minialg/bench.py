"""Benchmarks you can rerun: the denoiser alone at real size, and whole runs against diffusers.

    python -m minialg.bench                          # on CUDA: the denoiser benchmark below
    python -m minialg.bench --compile --compare-diffusers --stream-blocks
    python -m minialg.bench --pipelines --compare-diffusers   # CPU: mid-size random checkpoints, whole runs

--denoiser (the default on CUDA): builds each transformer from minialg/real_configs (real size on CUDA, a small
config derived from it on the CPU) with random weights made directly on the device, feeds it the real-shape
inputs (Wan 480x832, 81 frames; CogVideoX its 480x720, 49 frames; LTX-Video 2B 704x480, 161 frames; 13B both
stages of its recipe: 768x512, and 1536x1024 as "2 stage2") and reports, for the CFG batch (2) and the ALG
batch (3): ms per call (median after warm-up; CUDA events on a GPU), the FLOPs of the shape counted
analytically, TFLOP/s and MFU against the bf16 matmul rate measured in the same run, peak GPU memory, and the
SDPA kernel that ran (the fastest backend for the model's attention shapes is picked first). Options: regional
`torch.compile` (--compile), blocks streamed from the CPU (--stream-blocks), diffusers' transformer with the
same weights and inputs (--compare-diffusers); then a whole run of the family's ALG preset with random weights
(--run-steps, VAE decode included) and its stages.

--pipelines (the default without CUDA): both pipelines load the same checkpoint folder (written by
minialg.demo in the real layout, random weights) and make the same video (same seed, size, steps, guidance);
each run is timed end to end, the median of `--repeats` rounds is reported, and the two outputs are compared.
minialg's ALG run (the family's preset) is timed beside them; diffusers has no ALG.

A JSON report goes to --report, and a short table is printed.
"""

import argparse
import gc
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel

import minialg
from minialg.bench_models import (DENOISERS, SPECS, attention_lengths, denoiser_config, denoiser_flops,
                                  denoiser_inputs, diffusers_denoiser, random_model, random_pipeline)
from minialg.checkpoint import config_from
from minialg.config import load_config
from minialg.demo import demo_image, write_tiny
from minialg.flops import cogvideox_flops, hunyuan_flops, ltx_flops, wan_flops  # noqa: F401 (the tests' names)
from minialg.gpu import blocks_of, compile_blocks, stream_blocks
from minialg.profiling import (host_sync, matmul_tflops, measure, peak_memory_gib, reset_peak_memory, sdpa_kernels_ran,
                               sdpa_order, sig)


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
            width: int, uncached: bool = False) -> dict:
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
        if uncached:  # the same CFG run with the step cache off (cache_cross_attention=False)
            plain = minialg.load(folder, device="cpu", dtype=torch.float32, cache_cross_attention=False)
            runs["minialg_uncached"] = lambda: plain(image, prompt, seed=42, progress=False, **args)
        if compare:
            from diffusers import CogVideoXImageToVideoPipeline, WanImageToVideoPipeline
            from PIL import Image

            reference_cls = WanImageToVideoPipeline if family.startswith("wan") else CogVideoXImageToVideoPipeline
            reference = reference_cls.from_pretrained(folder, dtype=torch.float32)
            reference.set_progress_bar_config(disable=True)
            extra = {} if family.startswith("wan") else {"max_sequence_length": pipe.defaults["max_sequence_length"]}
            runs["diffusers"] = lambda: reference(image=Image.fromarray(image), prompt=prompt, output_type="np",
                                                  generator=torch.Generator("cpu").manual_seed(42), **args,
                                                  **extra).frames[0]
        results = time_runs(runs, repeats)
        pipe(image, prompt, seed=42, progress=False, **args)  # once more, for the stage times of a CFG run
        report = {"model": f"{family} I2V layout, '{size}' random weights", "device": "cpu", **args,
                  "repeats": repeats, "minialg_s": sig(results["minialg"][0]),
                  "minialg_alg_s": sig(results["minialg_alg"][0]),
                  "minialg_stages_s": {k: sig(v) for k, v in pipe.timings.items()}}
        if uncached:
            report.update(minialg_uncached_s=sig(results["minialg_uncached"][0]),
                          uncached_equal=bool(torch.equal(results["minialg_uncached"][1], results["minialg"][1])))
        if compare:
            (ref_s, ref), (ours_s, ours) = results["diffusers"], results["minialg"]
            report.update(diffusers_s=sig(ref_s), speedup=sig(ref_s / ours_s),
                          max_abs_diff=float(np.abs(ours.numpy() - ref).max()))
    return report


# ---- the denoiser benchmark (the models, their inputs and FLOPs: minialg.bench_models) ------------------------

def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def compiled_graphs() -> int:
    return torch._dynamo.utils.counters["stats"]["unique_graphs"]


def denoiser_run(family: str, args, device: torch.device, dtype: torch.dtype, matmul: float) -> dict:
    """ms per call, FLOPs, TFLOP/s, MFU and peak memory of one family's transformer for each batch size (and
    each other shape of the family: "2 stage2"); then diffusers' and the streamed-blocks numbers, and a whole run
    of the ALG preset."""
    spec = SPECS[family]
    model_cls, config_cls = spec.model, spec.config
    small = args.small or device.type != "cuda"
    config = denoiser_config(family, small)
    cfg = config_from(config_cls, config)
    model = random_model(model_cls, cfg, device, dtype)
    if args.compile:
        torch._dynamo.reset()  # a fresh cache, so the graphs counted below are this model's
        compile_blocks(model, backend=args.compile_backend)
    generator = torch.Generator(device).manual_seed(1)
    inputs = {str(b): denoiser_inputs(family, cfg, b, small, device, dtype, generator) for b in args.batches}
    inputs |= {f"{b} {stage}": denoiser_inputs(family, cfg, b, small, device, dtype, generator, stage)
               for stage, (b, _) in spec.stages.items()}
    first = inputs[str(args.batches[0])]
    lengths = attention_lengths(family, cfg, first)
    lengths += [n for case in inputs.values() for n in attention_lengths(family, cfg, case) if n not in lengths]
    order, probe = sdpa_order(lengths, cfg.num_attention_heads, cfg.attention_head_dim, device, dtype,
                              masked=spec.mask is not None, bias=spec.mask == "bias")
    # the fastest alone: it ran every attention shape of the model in the probe. (A priority list is not enough:
    # the CPU dispatcher ignores the order and takes flash attention whenever it is allowed.)
    backends = sdpa_kernel(order[:1])
    report = {"model": f"{family} ({spec.transformer_config or spec.checkpoint} config{', small' if small else ''})",
              "family": family, "small": small, "device": str(device), "dtype": str(dtype).removeprefix("torch."),
              "parameters": sum(p.numel() for p in model.parameters()), "compile": args.compile,
              "input_shapes": {b: [list(t.shape) for t in case if isinstance(t, torch.Tensor)]
                               for b, case in inputs.items()},
              "sdpa": {"order": [b.name.lower() for b in order], "probe_ms": probe}, "batches": {}}
    graphs_before = compiled_graphs()
    with torch.no_grad(), backends:
        outputs = {}
        for b in inputs:
            ms, peak = measure(lambda: model(*inputs[b]), device, args.warmup, args.repeats)
            flops = denoiser_flops(family, cfg, inputs[b])
            tflops = flops / ms / 1e9
            report["batches"][b] = {"ms": sig(ms), "flops": flops, "tflops": sig(tflops),
                                    "mfu": sig(tflops / matmul), "peak_memory_gib": peak}
            outputs[b] = model(*inputs[b])
        report["sdpa"]["ran"] = sdpa_kernels_ran(lambda: model(*first))
        if device.type == "cuda":
            report["host_sync"] = host_sync(lambda: model(*first), device)  # None: the call never waits
        if args.compile:
            report["compiled_graphs"] = compiled_graphs() - graphs_before
        if args.compare_diffusers:
            ref, call = diffusers_denoiser(family, config, model, device)
            if args.compile:  # the same regional compilation for diffusers' blocks
                for block in blocks_of(ref):
                    block.compile(dynamic=False, backend=args.compile_backend)
            for b in inputs:
                ms, _ = measure(lambda: call(*inputs[b]), device, args.warmup, args.repeats)
                row = report["batches"][b]
                row.update(diffusers_ms=sig(ms), diffusers_over_minialg=sig(ms / row["ms"]),
                           diffusers_max_rel_diff=rel_diff(outputs[b], call(*inputs[b])))
            del ref, call
            gc.collect()  # compiled blocks hold themselves in a cycle; their weights are ours, freed below
        if args.stream_blocks:
            graphs_before = compiled_graphs()
            streamer = stream_blocks(model, device)
            for b in inputs:
                ms, peak = measure(lambda: model(*inputs[b]), device, args.warmup, args.repeats)
                row = report["batches"][b]
                row.update(streamed_ms=sig(ms), streamed_peak_memory_gib=peak,
                           stream_slowdown=sig(ms / row["ms"]),
                           streamed_max_abs_diff=(model(*inputs[b]) - outputs[b]).abs().max().item())
            streamer.remove()
            if args.compile:
                report["streamed_recompiles"] = compiled_graphs() - graphs_before
    del model, inputs, outputs, first
    gc.collect()
    if args.run_steps and (small or family != "hunyuan_video"):  # (no tokenizer with the published ids here)
        report["whole_run"] = whole_run(family, device, dtype, small, args.run_steps, args, order)
    return report


def whole_run(family: str, device: torch.device, dtype: torch.dtype, small: bool, steps: int, args,
              sdpa: list[SDPBackend]) -> dict:
    """Seconds of a whole run of the family's ALG preset (text, condition, denoising loop, VAE decode) with
    random weights, after a 2-step warm-up run (compilation, both batch sizes, kernel autotuning); the family's
    sizes over the preset's (SPECS: `run`, `run_small`), without its `drop` keys, at least its `min_steps`."""
    spec, preset = SPECS[family], load_config(f"{family}_alg")
    steps = max(steps, spec.min_steps)
    generation = {k: v for k, v in preset.generation.items() if k not in spec.drop}
    generation.update(seed=42, **(spec.run_small if small else spec.run))
    with tempfile.TemporaryDirectory() as tmp:
        pipe = random_pipeline(family, Path(tmp), device, dtype, small)
        if args.compile:
            for expert in (pipe.transformer, getattr(pipe, "transformer_2", None)):
                if expert is not None:
                    compile_blocks(expert, backend=args.compile_backend)
        image = demo_image(256, 384).numpy()
        prompt = "a red ball bouncing on a wooden floor"
        with sdpa_kernel(sdpa, set_priority=True):
            pipe(image, prompt, alg=preset.alg, progress=False, **dict(generation, num_inference_steps=2))
            reset_peak_memory(device)
            start = time.perf_counter()
            pipe(image, prompt, alg=preset.alg, progress=False, **dict(generation, num_inference_steps=steps))
            total = time.perf_counter() - start  # the pipeline synchronises the device after each stage
        run = {"preset": f"{family}_alg", "steps": steps, "seconds": sig(total),
               "stages_s": {k: sig(v) for k, v in pipe.timings.items()},
               "peak_memory_gib": peak_memory_gib(device)}
        run.update({k: generation.get(k) for k in ("height", "width", "num_frames")}, **(
            {"note": spec.note} if spec.note else {}))
    return run


def motion_run(frames: int, height: int, width: int, repeats: int, device: str) -> dict:
    """Seconds of minialg.motion.analyze on a panning texture written through H.264 and read back (median wall
    and CPU time over `repeats`, after a warm-up), and the flow it measured against the true 1.655 px/frame."""
    from minialg import motion

    with tempfile.TemporaryDirectory() as tmp:
        minialg.media.write_video(motion.panning_texture(frames, height, width), Path(tmp) / "pan.mp4", fps=16)
        video, fps = motion.read_video(Path(tmp) / "pan.mp4")
    motion.analyze(video[:3], fps, device=device)  # warm-up
    walls, cpus = [], []
    for _ in range(repeats):
        wall, cpu = time.perf_counter(), time.process_time()
        report = motion.analyze(video, fps, device=device)
        walls.append(time.perf_counter() - wall)
        cpus.append(time.process_time() - cpu)
    return {"frames": frames, "height": height, "width": width, "device": device, "repeats": repeats,
            "wall_s": sig(statistics.median(walls)), "cpu_s": sig(statistics.median(cpus)),
            "flow_mean_px": sig(report["flow"]["mean_px"]), "true_flow_px": sig(math.hypot(1.5, 0.7))}


FP8_PROBE = """
import json, sys, torch
from pathlib import Path
from minialg.checkpoint import load
from minialg.models.wan import WanTransformer, WanTransformerConfig
def peak():  # this process's resident high-water mark, GiB (Linux; getrusage's would carry the parent's over exec)
    line = next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
    return int(line.split()[1]) / 2**20
start = peak()
model = load(WanTransformer, WanTransformerConfig, Path(sys.argv[1]), "cpu", torch.bfloat16)
loaded = peak()
c, g = model.config, torch.Generator().manual_seed(0)
x = [torch.randn(s, generator=g, dtype=torch.bfloat16) for s in ((1, c.in_channels, 3, 6, 10), (1, 512, c.text_dim),
                                                                (1, 257, c.image_dim))]
with torch.no_grad():
    model(x[0], torch.tensor([500.0]), x[1], x[2])
weights = sum(t.numel() * t.element_size() for t in model.state_dict().values()) / 2**30
print(json.dumps({"start_gib": round(start, 2), "loaded_gib": round(loaded, 2), "ran_gib": round(peak(), 2),
                  "weights_gib": round(weights, 2)}))
"""


def fp8_memory() -> dict:
    """Peak resident memory (each in a fresh process, on the CPU) of loading one block of the real-size Wan 2.1 I2V
    14B transformer (its config with num_layers 1) and running it on a small input, from a bf16 file and from a
    scaled-fp8 one (block Linear weights e4m3 with a float32 scale, as ComfyUI's): minialg.fp8 keeps the latter."""
    import subprocess

    from safetensors.torch import save_file

    from minialg.models.wan import WanTransformer, WanTransformerConfig

    config = dict(denoiser_config("wan", small=False), num_layers=1)
    model = random_model(WanTransformer, config_from(WanTransformerConfig, config), torch.device("cpu"),
                         torch.bfloat16)
    bf16 = {name: t.contiguous() for name, t in model.state_dict().items()}
    scaled = {}  # (a diffusers-layout folder: no `scaled_fp8` marker, the scales are read by name)
    for name, t in bf16.items():
        if name.startswith("blocks.") and name.endswith(".weight") and t.ndim == 2:
            scale = t.float().abs().max() / 448  # e4m3's largest value
            scaled[name] = (t.float() / scale).to(torch.float8_e4m3fn)
            scaled[name[:-len("weight")] + "scale_weight"] = scale.reshape(1)
        else:
            scaled[name] = t
    del model
    rows = {}
    with tempfile.TemporaryDirectory() as tmp:
        for name, tensors in (("bf16", bf16), ("scaled fp8", scaled)):
            folder = Path(tmp) / name.replace(" ", "_")
            folder.mkdir()
            (folder / "config.json").write_text(json.dumps(config))
            save_file(tensors, str(folder / "diffusion_pytorch_model.safetensors"))
            out = subprocess.run([sys.executable, "-c", FP8_PROBE, str(folder)], capture_output=True, text=True)
            if out.returncode:
                raise RuntimeError(f"the {name} probe failed: {out.stderr.strip().splitlines()[-1]}")
            rows[name] = dict(json.loads(out.stdout.strip().splitlines()[-1]), file_gb=sig(
                (folder / "diffusion_pytorch_model.safetensors").stat().st_size / 1e9))
    return rows


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(prog="python -m minialg.bench", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--denoiser", action="store_true", help="the transformers alone (the default on CUDA)")
    mode.add_argument("--pipelines", action="store_true",
                      help="whole CPU runs against diffusers (the default without CUDA)")
    mode.add_argument("--motion", action="store_true", help="the motion analysis of an 81-frame 480x832 video")
    mode.add_argument("--fp8", action="store_true", help="peak memory: one real-size Wan 14B block, scaled fp8 vs bf16")
    parser.add_argument("--compare-diffusers", action="store_true", help="time diffusers in the same run")
    parser.add_argument("--family", nargs="+", default=["wan", "cogvideox"], choices=list(DENOISERS))
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--report", default="bench.json")
    pipelines = parser.add_argument_group("--pipelines")
    pipelines.add_argument("--size", default="mid", choices=["tiny", "mid"])
    pipelines.add_argument("--steps", type=int, default=10)
    pipelines.add_argument("--frames", type=int, default=17)
    pipelines.add_argument("--height", type=int, default=128, help="Wan only: CogVideoX runs at its fixed size")
    pipelines.add_argument("--width", type=int, default=192)
    pipelines.add_argument("--uncached", action="store_true", help="also time minialg with the step cache off")
    denoiser = parser.add_argument_group("--denoiser")
    denoiser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    denoiser.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float32"])
    denoiser.add_argument("--small", action="store_true", help="the small configs (always on the CPU)")
    denoiser.add_argument("--batches", type=int, nargs="+", default=[2, 3], help="2: CFG, 3: ALG")
    denoiser.add_argument("--warmup", type=int, default=1)
    denoiser.add_argument("--compile", action="store_true", help="regional torch.compile of the blocks")
    denoiser.add_argument("--compile-backend", default="inductor")
    denoiser.add_argument("--stream-blocks", action="store_true", help="also with the blocks streamed from the CPU")
    denoiser.add_argument("--run-steps", type=int, default=None,
                          help="steps of the whole ALG-preset run (default 50; 1 for small configs; 0: none)")
    argv = sys.argv[1:] if argv is None else argv  # cli.py's spelling (--run_steps) works too
    args = parser.parse_args([a.split("=")[0].replace("_", "-") + a[len(a.split("=")[0]):] if a.startswith("--")
                              else a for a in argv])
    report = {"torch": torch.__version__, "machine": platform.processor() or platform.machine(),
              "threads": torch.get_num_threads(), "date": time.strftime("%Y-%m-%d")}
    if args.motion:
        report["motion"] = run = motion_run(81, 480, 832, args.repeats, args.device)  # Wan's output size
        Path(args.report).write_text(json.dumps(report, indent=2))
        print(f"motion analysis, {run['frames']} frames {run['width']}x{run['height']} on {run['device']}: "
              f"{run['wall_s']:.2f} s wall, {run['cpu_s']:.2f} s CPU (median of {run['repeats']}); measured flow "
              f"{run['flow_mean_px']:.3f} px/frame, true {run['true_flow_px']:.3f}\nreport: {args.report}")
        return
    if args.fp8:
        report["fp8"] = rows = fp8_memory()
        Path(args.report).write_text(json.dumps(report, indent=2))
        for name, row in rows.items():
            print(f"{name}: file {row['file_gb']} GB, peak RSS {row['start_gib']} GiB after the imports, "
                  f"{row['loaded_gib']} GiB loaded, {row['ran_gib']} GiB after a forward ({row['weights_gib']} GiB "
                  "of weights)")
        return
    if args.pipelines or not (args.denoiser or torch.cuda.is_available()):
        report["runs"] = [cpu_run(family, args.size, args.steps, args.repeats, args.compare_diffusers, args.frames,
                                  args.height, args.width, args.uncached) for family in args.family]
        Path(args.report).write_text(json.dumps(report, indent=2))
        for run in report["runs"]:
            line = f"{run['model']}: minialg {run['minialg_s']:.2f} s (with ALG {run['minialg_alg_s']:.2f} s)"
            if "minialg_uncached_s" in run:
                line += f", minialg uncached {run['minialg_uncached_s']:.2f} s"
            if "diffusers_s" in run:
                line += (f", diffusers {run['diffusers_s']:.2f} s, speed-up x{run['speedup']:.2f}, "
                         f"max |frames diff| {run['max_abs_diff']:.1e}")
            print(line)
        print(f"report: {args.report}")
        return

    device, dtype = torch.device(args.device), getattr(torch, args.dtype)
    if args.run_steps is None:
        args.run_steps = 50 if device.type == "cuda" and not args.small else 1
    report["device_name"] = torch.cuda.get_device_name(device) if device.type == "cuda" else report["machine"]
    report["matmul_tflops"] = matmul = sig(matmul_tflops(device, dtype))
    report["runs"] = [denoiser_run(family, args, device, dtype, matmul) for family in args.family]
    Path(args.report).write_text(json.dumps(report, indent=2))
    print(f"{report['device_name']}: {args.dtype} matmul {matmul:.1f} TFLOP/s")
    for run in report["runs"]:
        print_denoiser_run(run)
    print(f"report: {args.report}")


def print_denoiser_run(run: dict) -> None:
    print(f"{run['model']}, {run['dtype']}, compile {run['compile']}, SDPA {run['sdpa']['order'][0]} "
          f"(ran: {run['sdpa']['ran']})")
    print(f"{'batch':>7} {'ms/call':>10} {'TFLOP/s':>9} {'MFU':>6} {'peak GiB':>9}"
          f" | {'streamed ms':>11} {'peak GiB':>9} | {'diffusers ms':>12} {'diffusers/ours':>14}")
    for batch, row in run["batches"].items():
        def num(key, fmt):
            return "-" if row.get(key) is None else format(row[key], fmt)

        print(f"{batch:>7} {row['ms']:>10.1f} {row['tflops']:>9.2f} {row['mfu']:>6.1%}"
              f" {num('peak_memory_gib', '.2f'):>9}"
              f" | {num('streamed_ms', '.1f'):>11} {num('streamed_peak_memory_gib', '.2f'):>9}"
              f" | {num('diffusers_ms', '.1f'):>12} {num('diffusers_over_minialg', '.2f'):>14}")
    if "whole_run" in run:
        whole = run["whole_run"]
        stages = ", ".join(f"{k} {v:.1f}" for k, v in whole["stages_s"].items())
        print(f"  whole run, {whole['preset']}, {whole['steps']} steps: {whole['seconds']:.1f} s ({stages})"
              + (f"; {whole['note']}" if "note" in whole else ""))


if __name__ == "__main__":
    main()
