"""Issue 9: guidance-parallel and sequence-parallel sampling on torch.distributed (gloo, CPU), failure handling
under several ranks, and `cli.py batch`.

Distributed runs start 2, 3 or 4 plain processes with torchrun's environment (RANK, WORLD_SIZE, LOCAL_RANK,
MASTER_ADDR/PORT): tests/parallel_worker.py for the pipeline, cli.py for the failure cases. The ranks' frames
must be identical and within 1e-5 of the single process's (all passes in one batch); guidance parallelism
alone must also equal, bit for bit, a single process that batches the passes as the guidance groups do.
(Sequence parallelism gives attention the whole sequence in the single process's order, so it is often
bit-equal too, but the projections then run on fewer rows, which may change a last bit.)

Why two references: a pass's output depends in its last bits on the batch it runs in (the CPU's BLAS takes
another path for one row than for three, e.g. CogVideoX's time embedding), and CFG amplifies that. Running the
passes one by one in a single process moves CogVideoX's tiny frames by 1.3e-5 to 1.7e-5 at its guidance scale
6 (5e-6 to 8e-6 at 3), Wan's by 2.5e-6 at 5: float32 noise of the pipeline itself, not of the distribution.
The guidance-parallel CogVideoX runs here use scale 3, so that 1e-5 measures the distribution alone."""

import importlib.util
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

import minialg
from minialg import parallel
from minialg.config import PRESETS
from minialg.demo import demo_image, write_tiny

ROOT = Path(__file__).resolve().parent.parent
WORKER = Path(__file__).resolve().parent / "parallel_worker.py"
CALL = dict(num_frames=5, height=64, width=96, num_inference_steps=3, seed=3)  # 4 x 6 patch rows x columns
COG = dict(CALL, num_frames=17)  # CogVideoX-5b-I2V's learned position table (its sample size)
ALG = {family: yaml.safe_load((PRESETS / f"{family}_alg.yaml").read_text())["alg"] for family in ("wan", "cogvideox")}
ALG["wan"] = dict(ALG["wan"], schedule_interval_end_time=0.5)  # steps of three passes, then of two
ALG["cogvideox"] = dict(ALG["cogvideox"], schedule_interval_end_time=0.5, lp_filter_in_latent=False)  # pixel ALG

spec = importlib.util.spec_from_file_location("cli", ROOT / "cli.py")
cli = importlib.util.module_from_spec(spec)
spec.loader.exec_module(cli)


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict:
    """Tiny checkpoints: Wan 2.1 (2 heads), the same with 3 heads (for 3 ranks), Wan 2.2 A14B and TI2V, CogVideoX."""
    root = tmp_path_factory.mktemp("parallel")
    folders = {family: write_tiny(root / family, family)
               for family in ("wan", "wan22", "wan22_ti2v", "cogvideox", "hunyuan_video")}
    folders["wan3"] = write_tiny(root / "wan3", "wan")
    config = folders["wan3"] / "transformer" / "config.json"  # 3 heads of 8: the same weights' shapes
    config.write_text(json.dumps(dict(json.loads(config.read_text()), num_attention_heads=3, attention_head_dim=8)))
    return folders


def launch(ranks: int, argvs, tmp_path: Path, timeout: float = 240, env: dict | None = None) -> list:
    """Start `ranks` processes (argv per rank, or one argv for all) as torchrun would; (code, stdout, stderr)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    base = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), WORLD_SIZE=str(ranks),
                OMP_NUM_THREADS="1", MINIALG_DIST_TIMEOUT="60", PYTHONPATH=str(ROOT), **(env or {}))
    argvs = argvs if isinstance(argvs[0], list) else [argvs] * ranks
    processes = [subprocess.Popen([sys.executable, *argvs[r]], cwd=tmp_path, stdout=subprocess.PIPE,
                                  stderr=subprocess.PIPE, text=True, env=dict(base, RANK=str(r), LOCAL_RANK=str(r)))
                 for r in range(ranks)]
    results = []
    try:
        for p in processes:
            out, err = p.communicate(timeout=timeout)
            results.append((p.returncode, out, err))
    finally:
        for p in processes:
            p.kill()
    return results


def single(folder: Path, call: dict, groups: int = 1) -> torch.Tensor:
    """The single-process frames; with `groups`, each step's passes run in the batches the guidance groups use."""
    pipe = minialg.load(folder, device="cpu", dtype=torch.float32)
    denoise = pipe.denoise

    def as_the_groups(model, x, t, conditions, texts):
        owner = parallel.owners(len(conditions), groups)
        out = {}
        for g in sorted(set(owner)):
            mine = [j for j in range(len(conditions)) if owner[j] == g]
            out.update(zip(mine, denoise(model, x, t, [conditions[j] for j in mine], [texts[j] for j in mine])))
        return tuple(out[j] for j in range(len(conditions)))

    pipe.denoise = as_the_groups if groups > 1 else denoise
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ranks run (OMP_NUM_THREADS=1): CPU kernels may round by thread count
    try:
        return pipe(demo_image(), "a red ball bouncing", progress=False, **call)
    finally:
        torch.set_num_threads(threads)


def run_jobs(ranks: int, jobs: list, tiny: dict, tmp_path: Path) -> None:
    """Run the jobs on `ranks` processes; each job's frames on every rank must equal the single process's."""
    for k, job in enumerate(jobs):
        job.update(folder=str(tiny.get(job.get("model"))), out=str(tmp_path / f"job{k}"))
    (tmp_path / "jobs.json").write_text(json.dumps(jobs))
    results = launch(ranks, [str(WORKER), str(tmp_path / "jobs.json")], tmp_path)
    for code, out, err in results:
        assert code == 0, err[-3000:]
    for job in jobs:
        if job.get("hook"):
            for r in range(ranks):  # every rank's share of the joint attention equals the whole one's
                assert torch.load(f"{job['out']}.rank{r}.pt") == {"text last": 0.0, "text first": 0.0}
            continue
        K = job.get("sequence_parallel", 1)
        name = f"{job['model']} G={ranks // K} K={K} alg={bool(job['call'].get('alg'))}"
        frames = [torch.load(f"{job['out']}.rank{r}.pt") for r in range(ranks)]
        for r in range(1, ranks):
            assert torch.equal(frames[r], frames[0]), f"{name}: rank {r} differs from rank 0"
        if ranks // K > 1 and K == 1:  # guidance parallel alone changes nothing but the batches
            assert torch.equal(frames[0], single(tiny[job["model"]], job["call"], groups=ranks)), name
        error = (frames[0] - single(tiny[job["model"]], job["call"])).abs().max().item()
        assert error < 1e-5, f"{name}: max abs {error:.2e} from the single process"


def test_two_ranks_guidance_and_sequence_parallel(tiny, tmp_path):
    wan_alg, cog_alg = dict(CALL, alg=ALG["wan"]), dict(COG, alg=ALG["cogvideox"])
    run_jobs(2, [
        {"model": "wan", "call": wan_alg},  # guidance parallel: 2 groups, ALG steps of 3 passes and of 2
        {"model": "wan", "call": wan_alg, "sequence_parallel": 2},
        {"model": "wan", "call": CALL},  # CFG only
        {"model": "wan22_ti2v", "call": wan_alg, "sequence_parallel": 2},  # per-frame timesteps, 2 patch rows
        {"model": "wan22", "call": wan_alg, "sequence_parallel": 2},  # two experts
        {"model": "cogvideox", "call": dict(cog_alg, guidance_scale=3.0)},
        {"model": "cogvideox", "call": cog_alg, "sequence_parallel": 2},  # text tokens whole on both ranks
    ], tiny, tmp_path)


def test_two_ranks_hunyuan_video(tiny, tmp_path):
    """HunyuanVideo: [video ; text] joint attention with a text mask, the first frame's tokens modulated apart
    (token_replace); ALG in its one-pass form (no true CFG) and with true CFG (three passes over 2 groups)."""
    alg = dict(ALG["wan"], lp_resize_factor=0.625)
    call = dict(CALL, num_frames=5, alg=alg)
    run_jobs(2, [
        {"model": "hunyuan_video", "call": call, "sequence_parallel": 2},
        {"model": "hunyuan_video", "call": dict(call, true_cfg_scale=3.0)},
    ], tiny, tmp_path)


def test_three_ranks_uneven_rows_and_a_spare_group(tiny, tmp_path):
    run_jobs(3, [
        {"model": "wan3", "call": dict(CALL, alg=ALG["wan"])},  # 3 groups; two-pass steps leave one spare
        {"model": "wan3", "call": CALL, "sequence_parallel": 3},  # CFG only; 4 patch rows: 1, 1, 2
        {"hook": True},  # the attention hook alone, with HunyuanVideo's [video ; text] and a key mask
    ], tiny, tmp_path)


def test_four_ranks_both_at_once(tiny, tmp_path):
    run_jobs(4, [
        {"model": "wan", "call": dict(CALL, alg=ALG["wan"]), "sequence_parallel": 2},
        {"model": "cogvideox", "call": dict(COG, alg=ALG["cogvideox"], guidance_scale=3.0), "sequence_parallel": 2},
    ], tiny, tmp_path)


# ----------------------------------------------------------------------------------------------------------
# Layouts that cannot work: one line, before anything is loaded


def test_unusable_layouts_are_one_line_errors(tiny, monkeypatch):
    cpu = torch.device("cpu")
    for world, K, message in [(1, 2, "sequence_parallel=2 needs a world size that is a multiple of 2, got 1"),
                              (4, 3, "sequence_parallel=3 needs a world size that is a multiple of 3, got 4"),
                              (4, 1, "world size 4 with sequence_parallel=1 makes 4 guidance groups, but a step has "
                                     "at most 3 passes: use 1, 2 or 3 ranks"),
                              (2, 0, "sequence_parallel must be a positive integer, got 0")]:
        monkeypatch.setenv("WORLD_SIZE", str(world))
        with pytest.raises(ValueError) as e:
            parallel.setup(cpu, K)
        assert str(e.value).startswith(message) and "\n" not in str(e.value)
    layout = parallel.Layout(rank=1, world=3, sequence=3)
    with pytest.raises(ValueError, match="^sequence_parallel=3 does not divide the 2 attention heads of transformer"):
        parallel.check_heads(layout, {"transformer": 2})
    layout = parallel.Layout(rank=0, world=3, sequence=1)
    with pytest.raises(ValueError, match=r"^3 ranks with sequence_parallel=1 make 3 guidance groups, but this run "
                                         r"has at most 2 pass\(es\) per step \(CFG\): run with 2 ranks"):
        parallel.check_passes(layout, cfg=True, alg=False)
    parallel.check_passes(layout, cfg=True, alg=True)
    assert parallel.owners(3, 2) == [0, 0, 1] and parallel.owners(2, 3) == [0, 1] and parallel.owners(3, 3) == [0, 1, 2]
    monkeypatch.setenv("WORLD_SIZE", "1")
    with pytest.raises(ValueError, match="^sequence_parallel=2 needs a world size"):
        minialg.load(tiny["wan"], device="cpu", dtype=torch.float32, sequence_parallel=2)


# ----------------------------------------------------------------------------------------------------------
# A rank that fails stops every rank, each with one line


def cli_argv(tiny, image, output, *extra) -> list[str]:
    return [str(ROOT / "cli.py"), "--config", "wan_alg", "--model", str(tiny["wan"]), "--image_path", str(image),
            "--prompt", "a ball", "--output_path", str(output), "--device", "cpu", "--dtype", "float32",
            "--height", "64", "--width", "96", "--num_frames", "5", "--num_inference_steps", "3", *extra]


@pytest.fixture
def image(tmp_path) -> Path:
    from PIL import Image

    path = tmp_path / "input.png"
    Image.fromarray(demo_image().numpy()).save(path)
    return path


def errors(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr[-2000:]
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def test_a_bad_image_on_one_rank_stops_both_with_its_message(tiny, image, tmp_path):
    good, bad = cli_argv(tiny, image, tmp_path / "o.mp4"), cli_argv(tiny, tmp_path / "missing.png", tmp_path / "o.mp4")
    results = launch(2, [good, bad], tmp_path, timeout=120)
    for code, out, err in results:
        assert code == 1 and len(errors(err)) == 1, err[-2000:]
        assert errors(err)[0].startswith("error: rank 1: ") and "missing.png" in errors(err)[0]
    assert not (tmp_path / "o.mp4").exists()


INJECT = """
import os, sys
import cli
from minialg.families.wan import Wan

denoise, calls = Wan.denoise, []
def failing(self, *args):
    calls.append(1)
    if os.environ["RANK"] == "1" and len(calls) == 2:
        raise RuntimeError("injected failure")
    return denoise(self, *args)
Wan.denoise = failing
sys.exit(cli.main(sys.argv[1:]))
"""


def test_a_rank_failing_mid_run_stops_every_rank(tiny, image, tmp_path):
    """Rank 1 raises in its second denoiser call while rank 0 waits in a sequence-parallel all-to-all."""
    argv = ["-c", INJECT, *cli_argv(tiny, image, tmp_path / "o.mp4", "--sequence_parallel", "2")[1:]]
    (code0, _, err0), (code1, _, err1) = launch(2, argv, tmp_path, timeout=120)
    assert code1 == 1 and errors(err1) == ["error: rank 1: injected failure"]
    assert code0 == 1 and errors(err0) == ["error: rank 0 stopped in the sequence-parallel all-to-all: rank 1 "
                                           "failed: injected failure"]
    assert not (tmp_path / "o.mp4").exists()


# ----------------------------------------------------------------------------------------------------------
# cli.py batch under two ranks: the lines are shared out


def test_batch_shares_the_lines_out_over_the_ranks(tiny, image, tmp_path):
    lines = [{"id": name, "image": str(image if name != "b" else tmp_path / "missing.png"), "prompt": f"a {name}"}
             for name in "abcd"]
    (tmp_path / "m.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    argv = [str(ROOT / "cli.py"), "batch", str(tmp_path / "m.jsonl"), "--output_dir", str(tmp_path / "out"),
            "--model", str(tiny["wan"]), "--device", "cpu", "--dtype", "float32", "--height", "32", "--width", "48",
            "--num_frames", "5", "--num_inference_steps", "2"]
    (code0, out0, err0), (code1, out1, err1) = launch(2, argv, tmp_path, timeout=120)
    # rank 0 waits for every rank's counts and exits with the whole batch's status (3: a line failed); the
    # others exit 0, so torchrun stops no rank that is still working
    assert code0 == 3 and code1 == 0, err0[-2000:] + err1[-2000:]
    failures = tmp_path / "out" / "failures.jsonl"
    assert out0.strip().splitlines() == ["rank 0: batch: 2 written, 0 already there, 0 failed",  # a, c
                                         f"batch, all 2 ranks: 3 written, 0 already there, 1 failed (see {failures}); "
                                         "exit status 3"]
    assert out1.strip() == f"rank 1: batch: 1 written, 0 already there, 1 failed (see {failures})"
    assert sorted(p.name for p in (tmp_path / "out").iterdir()) == ["a.mp4", "c.mp4", "d.mp4", "failures.jsonl"]
    (failure,) = [json.loads(line) for line in (tmp_path / "out" / "failures.jsonl").read_text().splitlines()]
    assert failure["id"] == "b" and "missing.png" in failure["error"]
