"""The training loop: AdamW on the adapter parameters (row-sparse for per-expert adapters), warm-up + decay, gradient accumulation,
clipping, bf16 autocast on GPU, gradient checkpointing, balance losses; atomic checkpoints every N
steps; exact resume (same data order, optimizer, scheduler and RNG state); SIGINT/SIGTERM save a
checkpoint and stop cleanly. Progress goes to the terminal and to `OUT/events.jsonl`."""

from __future__ import annotations

import contextlib
import math
import os
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from . import checkpoint as ckpt
from . import distributed
from .config import Config, save as save_config
from .events import EventLog
from .io import DamagedFileError, atomic_write_json, is_no_space, no_space
from .layerwise import add_usage, layer_major_step, micro_batch_major_step
from .offload import OffloadSchedule
from .optim import SparseAdamW, sparse_params_of
from .process import StopFlag, pid_alive

LOCK_FILE = ".lock"
#: at most about this many `step` events of a run carry expert usage (summed over the steps between them)
USAGE_REPORTS = 500


class RunError(ValueError):
    """A run that cannot start: its folder is busy or holds another run."""


class Diverged(ValueError):
    """The loss or its gradient became NaN or inf (from the data or the hyper-parameters); the step was not applied."""


def lr_lambda(cfg: Config, total_steps: int):
    """Multiplier of the peak lr at each step: linear warm-up, then cosine / linear decay or constant."""
    warm, kind = cfg.train.warmup_steps, cfg.train.scheduler

    def f(step: int) -> float:
        if warm and step < warm:
            return (step + 1) / warm
        if kind == "constant":
            return 1.0
        progress = min(1.0, (step - warm) / max(1, total_steps - warm))
        return 0.5 * (1 + math.cos(math.pi * progress)) if kind == "cosine" else 1.0 - progress

    return f


def seed_everything(seed: int) -> None:
    """Seed python, numpy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


@dataclass
class Batches:
    """The deterministic order of micro-batches: epoch e is shuffled with seed + e."""

    examples: list
    micro_batch: int
    seed: int
    pad_id: int

    def epoch(self, e: int) -> list[list[int]]:
        from .data import make_batches

        return make_batches(self.examples, self.micro_batch, seed=self.seed + e)

    def tensors(self, idx: list[int], device) -> dict[str, torch.Tensor]:
        from .data import collate

        return {k: v.to(device) for k, v in collate([self.examples[i] for i in idx], self.pad_id).items()}


def _lock(out: Path) -> Path:
    """Take the run folder's lock (created exclusively, holding our PID); a live owner refuses with its PID,
    a stale lock (its PID gone) is taken over."""
    lock = out / LOCK_FILE
    for _ in range(3):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
            except (OSError, ValueError):
                pid = 0  # unreadable or garbled: no live owner to protect
            if pid > 0 and pid != os.getpid() and pid_alive(pid):
                raise RunError(f"{out} is in use by a running training (pid {pid}); wait for it, stop it, "
                               "or choose another --out.") from None
            lock.unlink(missing_ok=True)  # stale lock of a process that is gone
            continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return lock
    raise RunError(f"could not take the lock {lock}: another process keeps taking it; choose another --out.")


def dropped_rows(stats: dict) -> int:
    """Rows of the training set left out by the cut-off (prompt fills data.max_len, or too long and dropped)."""
    return int(stats.get("dropped_long_prompt", 0)) + int(stats.get("dropped_too_long", 0))


def _report_dropped(stats: dict, echo: bool) -> None:
    """Say on the terminal how many rows the cut-off left out, and why."""
    if echo and dropped_rows(stats):
        print(f"data: {dropped_rows(stats):,} of {stats['rows']:,} rows dropped by the cut-off data.max_len="
              f"{stats['max_len']} ({stats['dropped_long_prompt']:,} whose prompt alone fills it, "
              f"{stats['dropped_too_long']:,} longer and too_long='drop'); training on {stats['examples']:,}",
              file=sys.stderr)


def _memory_gb(device: torch.device) -> float:
    if device.type == "cuda":
        return round(torch.cuda.max_memory_allocated(device) / 1e9, 3)
    import resource

    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6, 3)  # Linux: KB


def train(cfg: Config, out: str | Path, resume: bool = False, echo: bool = True,
          device: str | None = None, stop_after: int | None = None) -> dict:
    """Run (or resume) a training; returns the final summary. `stop_after` simulates a stop after that step."""
    from .data import load_examples
    from .loader import check_checkpoint, load_tokenizer
    from .routing import attach, save_adapter
    from .runs import default_device, load_run_model, offload_experts

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder; choose a folder for the run.")
    if not cfg.model.path:
        raise RunError("model.path is empty; set it to a local HF checkpoint directory.")
    if not cfg.data.train:
        raise RunError("data.train is empty; give a dataset file or a registry name.")
    dist = distributed.init_from_env(device)  # None: one process; else this rank of a torchrun job
    main = distributed.is_main(dist)  # rank 0 alone writes the run folder
    echo = echo and main
    latest = ckpt.latest_checkpoint(out) if main else None
    if main and not resume and (latest is not None or (out / "adapter.safetensors").exists()):
        raise RunError(f"{out} already holds a run; pass --resume to continue it or choose another --out.")
    if main:
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise (no_space(out) if is_no_space(e) else RunError(f"cannot create the run folder {out}: {e.strerror}.")) from None
    lock = _lock(out) if main else None
    log, warnings = (None if main else distributed.NullLog()), []
    try:
        if main:
            ckpt.remove_unfinished(out)  # step-N.tmp folders a crash or a full disk left behind
        check_checkpoint(cfg.model.path)  # before anything loads: a bad folder is one clear error
        dev = dist.device if dist is not None else default_device(device)
        seed_everything(cfg.train.seed)
        tokenizer = load_tokenizer(cfg.model.path)
        examples, data_stats = load_examples(cfg.data.train, tokenizer, cfg.data.template, cfg.data.max_len,
                                             min_examples=cfg.train.micro_batch * cfg.train.grad_accum)
        _report_dropped(data_stats, echo)
        held_out = Batches(load_examples(cfg.data.eval, tokenizer, cfg.data.template, cfg.data.max_len)[0],
                           cfg.train.micro_batch, cfg.train.seed, tokenizer.pad_token_id) if cfg.data.eval else None
        loaded, slots = load_run_model(cfg, dev)
        peft = attach(loaded, cfg)
        distributed.shard_experts(dist, peft, cfg)  # train.expert_parallel > 1: this rank's experts only
        cache = offload_experts(peft, slots, dev)  # None: experts resident
        model = loaded.model
        if cfg.train.gradient_checkpointing:
            model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
        batches = distributed.shard(Batches(examples, cfg.train.micro_batch, cfg.train.seed, tokenizer.pad_token_id),
                                    dist)  # data parallel: this rank's slice of every global micro-batch
        per_epoch = max(1, len(batches.epoch(0)) // cfg.train.grad_accum)
        total = math.ceil(cfg.train.epochs * per_epoch) if cfg.train.epochs else cfg.train.max_steps
        params = [p for _, p in peft.trainable_parameters()]
        distributed.join_replicas(dist, params, cfg.train.seed)
        # per-expert adapters that no token reached this step keep their values and moments (DESIGN "Memory")
        sparse = sparse_params_of(model)
        opt = SparseAdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, sparse_params=sparse)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_lambda(cfg, total))
        schedule = OffloadSchedule(cache) if cache is not None else None
        autocast = torch.bfloat16 if dev.type == "cuda" else None
        step, epoch, pos, loss_sum, resumed_from = 0, 0, 0, None, None
        usage_every, usage_sum = max(1, total // USAGE_REPORTS), None
        restored = distributed.load_checkpoint(dist, out if resume else None, warnings.append)
        if restored is not None:  # rank 0 verified and read it, every rank has it
            resumed_from, tensors, tstate, state = restored
            distributed.check_world_size(dist, state, resumed_from)
            missing = sorted(set(dict(peft.trainable_parameters())) - set(tensors))
            if missing:
                raise DamagedFileError(f"{resumed_from / 'adapter.safetensors'} does not hold {missing[0]} of this "
                                       "config's adapter; resume with the config the run was started with.")
            distributed.restore_adapter(dist, peft, tensors)
            opt.load_state_dict(distributed.rank_state(dist, tstate, "optimizer"))
            sched.load_state_dict(tstate["scheduler"])
            ckpt.set_rng_state(distributed.rank_state(dist, tstate, "rng"))
            step, epoch, pos, loss_sum = state["step"], state["epoch"], state["position"], state.get("loss")
        if main:
            save_config(cfg, out / "config.yaml")
        log = EventLog(out / "events.jsonl", echo=echo, total_steps=total) if main else log
        log.set_position(step)
        for w in warnings:
            if echo:
                print(f"warning: {w}", file=sys.stderr)
            log.emit("warning", message=w)
        log.emit("start", step=step, total_steps=total, resumed=resumed_from is not None,
                 **({"resumed_from": str(resumed_from)} if resumed_from is not None else {}),
                 world_size=dist.world_size if dist is not None else 1,
                 examples=len(examples), dropped=dropped_rows(data_stats), data=data_stats,
                 parameters=peft.parameter_report(),
                 device=str(dev))
        model.train()
        order = batches.epoch(epoch)
        with StopFlag() as flag:
            while step < total:
                t0, micro = time.perf_counter(), []
                for _ in range(cfg.train.grad_accum):
                    if pos >= len(order):
                        epoch, pos = epoch + 1, 0
                        order = batches.epoch(epoch)
                    micro.append(batches.tensors(order[pos], dev))
                    pos += 1
                tokens = sum(int(b["attention_mask"].sum()) for b in micro)
                num_items = distributed.global_token_counts(dist, micro)  # None alone: each micro-batch's mean
                if cache is not None:  # each offloaded layer crosses PCIe once per sweep, not per micro-batch
                    loss_sum, aux_sum, usage = layer_major_step(model, peft, micro, cfg.train.grad_accum,
                                                                hooks=schedule, autocast_dtype=autocast,
                                                                num_items=num_items)
                else:
                    loss_sum, aux_sum, usage = micro_batch_major_step(model, peft, micro, cfg.train.grad_accum,
                                                                      autocast_dtype=autocast, num_items=num_items)
                distributed.reduce_gradients(dist, params, list(sparse.values()))  # sum + union of used rows
                norm = distributed.clip_grad_norm(dist, params, cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0
                                                  else float("inf"))  # the same on every rank
                if not (math.isfinite(loss_sum) and math.isfinite(norm)):  # before the update spoils the adapter
                    what = "the loss" if not math.isfinite(loss_sum) else "the gradient"
                    last = ckpt.latest_checkpoint(out)
                    keep = (f"the last good checkpoint is {last} (--resume continues from it)" if last
                            else "no checkpoint was written yet")
                    raise Diverged(f"{what} became NaN or inf at step {step + 1}; nothing of that step was applied "
                                   f"and {keep}. Lower train.lr or raise train.warmup_steps, and check the data.")
                lr = opt.param_groups[0]["lr"]
                opt.step()
                sched.step()
                opt.zero_grad(set_to_none=True)
                step += 1
                dt = time.perf_counter() - t0
                loss_sum, aux_sum, tokens, usage, signalled = distributed.reduce_report(
                    dist, loss_sum, aux_sum, tokens, usage, flag.stop)  # every rank stops after the same step
                usage_sum = add_usage(usage_sum, usage)
                stopping = signalled or (stop_after is not None and step >= stop_after)
                # expert usage summed over the steps since the last report (USAGE_REPORTS a run), so
                # events.jsonl stays small for 48 layers x 128 experts over tens of thousands of steps
                report = step % usage_every == 0 or step in (1, total) or stopping
                log.emit("step", step=step, total_steps=total, epoch=epoch, loss=round(loss_sum, 6),
                         balance_loss=round(aux_sum, 6), lr=lr, tokens_per_s=round(tokens / dt, 1),
                         memory_gb=_memory_gb(dev), **({"expert_usage": usage_sum} if report else {}),
                         **({"offload": _cache_stats(cache)} if cache is not None else {}))
                usage_sum = None if report else usage_sum
                if step % cfg.train.save_every == 0 or stopping or step == total:
                    adapter, extra, shared = distributed.checkpoint_parts(dist, peft, opt)  # every rank's RNG
                    if main:
                        path = ckpt.save_checkpoint(out, step, adapter, opt, sched, {"epoch": epoch, "position": pos,
                                                    "total_steps": total, "loss": loss_sum, **shared}, extra=extra)
                        log.emit("checkpoint", step=step, path=str(path))
                    if held_out:
                        log.emit("eval", step=step, **_held_out_loss(model, peft, held_out, dev, autocast))
                if stopping and step < total:
                    log.emit("stopped", step=step, reason="signal" if signalled else "stop_after")
                    return {"status": "stopped", "step": step, "out": str(out)}
        model.eval()
        summary = {"status": "done", "step": step, "out": str(out),
                   "final_loss": None if loss_sum is None else round(loss_sum, 6)}
        final = distributed.adapter_state(dist, peft)  # gathered from every rank under expert parallelism
        if main:
            save_adapter(peft, out, extra={"train": {"steps": step, "data": data_stats}}, tensors=final)
            if cfg.eval.benchmarks:  # on rank 0 alone: the adapter is the same on every rank
                summary["accuracy"] = _run_benchmarks(cfg, model, tokenizer, out, log, step)
            atomic_write_json(out / "summary.json", summary)
        log.emit("done", **summary)
        return summary
    except Exception as e:
        full = is_no_space(e)
        err = no_space(_written_folder(e, out)) if full else e
        try:  # where the disk still takes it
            if log is None:
                log = EventLog(out / "events.jsonl", echo=False)
            log.emit("error", message=str(err), kind=type(err).__name__)
        except OSError:
            pass
        if full:
            raise err from None
        raise
    finally:
        if log is not None:
            with contextlib.suppress(OSError):
                log.close()
        if lock is not None:
            lock.unlink(missing_ok=True)


def _written_folder(e: BaseException, out: Path) -> Path:
    """The folder a failed write was going to: the run folder, or the folder outside it an OSError names
    (the NF4 expert cache, say)."""
    while e is not None:
        if isinstance(e, OSError) and e.filename:
            target = Path(e.filename).resolve()
            return out if target.is_relative_to(out.resolve()) else target.parent
        e = e.__cause__ or e.__context__
    return out


def _run_benchmarks(cfg: Config, model, tokenizer, out: Path, log: EventLog, step: int) -> dict[str, float]:
    """`eval.benchmarks` after training: accuracy per benchmark as `eval` events, every prediction in
    OUT/eval/adapter/. The adapter is saved already, so a benchmark that cannot run is reported, not fatal."""
    from .data import DataError
    from .evaluate import evaluate, expand_benchmarks, resolve_benchmark

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


def _held_out_loss(model, peft, held_out: Batches, dev: torch.device, autocast) -> dict:
    """Mean loss per response token on the held-out examples (`data.eval`); touches no RNG, no adapter state."""
    from .data import IGNORE_INDEX, make_batches

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


def _cache_stats(cache) -> dict:
    """This step's cache traffic (the counters restart every step)."""
    stats = cache.stats.as_dict()
    stats.pop("per_layer")
    cache.reset_stats()
    return stats
