"""How the adapters are trained.

- `loop`: `train(cfg, out, resume=...)`, read top to bottom: open the run folder -> setup -> restore -> steps ->
  checkpoint -> finish; `reports`: the held-out loss, benchmarks after training, memory, cache traffic.
- `steps`: the micro-batch-major step and the layer-major step (each offloaded layer crosses PCIe once per step).
- `optim`: AdamW that leaves the rows of experts no token reached alone (`SparseAdamW`).
- `checkpoint`: checksummed, atomically written checkpoints; the newest good one for --resume.
- `collectives`: the job of several ranks (torchrun env, timeouts, traffic counts, `--gpus N` -> torchrun);
  `distributed`: data parallel exactly equal to one process; `expert_parallel`: experts split over the ranks.

Builds on engine.model, engine.adapters and engine.data; writes its run folder through engine.runs.
"""

from .checkpoint import checkpoints, latest_checkpoint, load_checkpoint, save_checkpoint
from .loop import Batches, Diverged, train
from .optim import SparseAdamW, sparse_params_of
from .steps import layer_major_step, micro_batch_major_step

__all__ = ["Batches", "Diverged", "SparseAdamW", "checkpoints", "latest_checkpoint", "layer_major_step",
           "load_checkpoint", "micro_batch_major_step", "save_checkpoint", "sparse_params_of", "train"]
