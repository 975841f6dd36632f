"""One rank of a test job (tests/test_distributed.py): trains each run of a JSON job file in turn, as
`moetune train` does under torchrun (RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT come from the environment)."""

from __future__ import annotations

import faulthandler
import json
import sys

import torch

from engine.config import from_dict
from engine.training import train


def main(job_file: str) -> int:
    """Run every training of the job file; the exit status is 0 when all finished."""
    faulthandler.enable()  # a rank that crashes in native code (gloo) says where, instead of exiting silently
    torch.set_num_threads(1)
    for run in json.loads(open(job_file).read()):
        train(from_dict(run["config"]), run["out"], resume=run.get("resume", False), echo=False, device="cpu",
              stop_after=run.get("stop_after"))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
