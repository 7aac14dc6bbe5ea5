"""One rank of a distributed test run (tests/test_parallel.py starts several with torchrun's environment).

    python tests/parallel_worker.py JOBS.json

JOBS.json: a list of {"folder", "sequence_parallel", "call": pipeline keywords, "out": file stem}; each job
loads the checkpoint with that layout, runs the call on the demo image and saves the frames to OUT.rankR.pt.
"""

import json
import os
import sys

import torch

import minialg
from minialg import parallel
from minialg.demo import demo_image


def main(path: str) -> None:
    rank = int(os.environ["RANK"])
    for job in json.loads(open(path).read()):
        pipe = minialg.load(job["folder"], device="cpu", dtype=torch.float32,
                            sequence_parallel=job.get("sequence_parallel", 1))
        frames = pipe(demo_image(), "a red ball bouncing", progress=False, **job["call"])
        torch.save(frames, f"{job['out']}.rank{rank}.pt")
    parallel.leave()


if __name__ == "__main__":
    main(sys.argv[1])
