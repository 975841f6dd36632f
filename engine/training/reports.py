"""What the trainer measures and reports besides the training loss: the held-out loss on `data.eval` at each
checkpoint, the benchmarks of `eval.benchmarks` after training, peak memory, and the expert cache's traffic."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import Config
from ..runs import EventLog


def memory_gb(device: torch.device) -> float:
    """Peak memory so far in GB: CUDA allocated on a GPU, the process's peak resident set on the CPU."""
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)  # Linux: KB


def written_folder(e: BaseException, out: Path) -> Path:
    """The folder a failed write was going to: the run folder, or the folder outside it an OSError names
    (the NF4 expert cache, say)."""
    while e is not None:
        if isinstance(e, OSError) and e.filename:
            target = Path(e.filename).resolve()
            return out if target.is_relative_to(out.resolve()) else target.parent
        e = e.__cause__ or e.__context__
    return out


def run_benchmarks(cfg: Config, model, tokenizer, out: Path, log: EventLog, step: int) -> dict[str, float]:
    """`eval.benchmarks` after training: accuracy per benchmark as `eval` events, every prediction in
    OUT/eval/adapter/. The adapter is saved already, so a benchmark that cannot run is reported, not fatal."""
    from ..data import DataError
    from ..evaluate import evaluate, expand_benchmarks, resolve_benchmark

    accuracy = {}
    model.config.use_cache = True  # generation (training turned the KV cache off)
    for spec in expand_benchmarks(cfg.eval.benchmarks):
        try:
            bench, _ = resolve_benchmark(spec)
            r = evaluate(model, tokenizer, spec, limit=cfg.eval.limit, batch_size=cfg.eval.batch_size,
                         num_beams=cfg.eval.num_beams, template=cfg.data.template,
                         predictions_path=out / "eval" / "adapter" / f"{bench.name}.predictions.jsonl")
        except DataError as e:
            log.emit("eval", step=step, benchmark=str(spec), error=str(e))
            continue
        accuracy[r.name] = r.accuracy
        log.emit("eval", step=step, benchmark=r.name, accuracy=round(r.accuracy, 6), rows=r.rows,
                 correct=r.correct)
    return accuracy


def held_out_loss(model, peft, held_out, dev: torch.device, autocast) -> dict:
    """Mean loss per response token on the held-out examples (`data.eval`); touches no RNG, no adapter state."""
    from ..data import IGNORE_INDEX, make_batches

    total, count = 0.0, 0
    # dropout off, but the model stays in train mode: bitsandbytes repacks NF4 linears for inference on
    # model.eval() on the CPU, after which they can no longer train
    dropouts = [m for m in model.modules() if isinstance(m, torch.nn.Dropout) and m.training]
    for m in dropouts:
        m.eval()
    with torch.no_grad():
        for idx in make_batches(held_out.examples, held_out.micro_batch, shuffle=False):
            batch = held_out.tensors(idx, dev)
            n = int((batch["labels"][:, 1:] != IGNORE_INDEX).sum())
            with torch.autocast(dev.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
                total += model(**batch).loss.item() * n
            count += n
    peft.clear_losses()
    for m in dropouts:
        m.train()
    return {"eval_loss": round(total / max(1, count), 6), "eval_tokens": count}


def cache_stats(cache) -> dict:
    """This step's cache traffic (the counters restart every step)."""
    stats = cache.stats.as_dict()
    stats.pop("per_layer")
    cache.reset_stats()
    return stats
