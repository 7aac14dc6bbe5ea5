"""One rank of a distributed test run (tests/test_parallel.py starts several with torchrun's environment).

    python tests/parallel_worker.py JOBS.json

JOBS.json: a list of {"folder", "sequence_parallel", "call": pipeline keywords, "out": file stem}; each job
loads the checkpoint with that layout, runs the call on the demo image and saves the frames to OUT.rankR.pt.
A job {"hook": true, "out"} instead checks the Ulysses attention hook alone on joint [video ; text] and
[text ; video] sequences with a key mask (HunyuanVideo's and CogVideoX's layouts) and saves the errors.
"""

import json
import os
import sys

import torch

import minialg
from minialg import parallel
from minialg.demo import demo_image
from minialg.models.wan import attend


def main(path: str) -> None:
    rank = int(os.environ["RANK"])
    for job in json.loads(open(path).read()):
        if job.get("hook"):
            torch.save(check_hook(), f"{job['out']}.rank{rank}.pt")
            continue
        pipe = minialg.load(job["folder"], device="cpu", dtype=torch.float32,
                            sequence_parallel=job.get("sequence_parallel", 1))
        frames = pipe(demo_image(), "a red ball bouncing", progress=False, **job["call"])
        torch.save(frames, f"{job['out']}.rank{rank}.pt")
    parallel.leave()


def check_hook() -> dict:
    """Max abs error of Ulysses.attend against attention over the whole sequence, text trailing or leading."""
    world = int(os.environ["WORLD_SIZE"])
    layout, _ = parallel.setup(torch.device("cpu"), sequence_parallel=world)
    hook = parallel.Ulysses(layout.sequence_group, world, layout.rank)
    generator = torch.Generator().manual_seed(0)
    B, N, Dh, grid, T = 2, 2 * world, 8, (2, 4, 3), 5  # 24 video tokens in 2 frames of 4 x 3 patches
    L = 24
    q, k, v = (torch.randn(B, N, L + T, Dh, generator=generator) for _ in range(3))
    errors = {}
    for first in (False, True):
        video, text = (slice(T, None), slice(0, T)) if first else (slice(0, L), slice(L, None))
        mask = torch.ones(B, 1, 1, L + T, dtype=torch.bool)
        mask[0, ..., text.start + 3:text.start + T] = False  # the first sequence has 3 text tokens
        expected = attend(q, k, v, mask)  # (B, L+T, N*Dh)
        mine = [hook.split(grid, x[:, :, video])[0] for x in (q, k, v)]  # (B, N, my tokens, Dh)
        local = [torch.cat([x[:, :, text], m] if first else [m, x[:, :, text]], dim=2) for x, m in zip((q, k, v), mine)]
        S = local[0].shape[2]
        got = hook.attend(*local, mask, text=slice(0, T) if first else slice(S - T, S))
        want = torch.cat([expected[:, text], hook.split(grid, expected[:, video])[0]] if first else
                         [hook.split(grid, expected[:, video])[0], expected[:, text]], dim=1)
        errors["text first" if first else "text last"] = (got - want).abs().max().item()
    return errors


if __name__ == "__main__":
    main(sys.argv[1])
