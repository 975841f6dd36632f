"""The training loop, read top to bottom: `train` opens the run folder, then `setup` (data, model, adapters,
optimizer) -> `restore` (the newest good checkpoint with --resume) -> `run_steps` (one `train_step` each: AdamW on
the adapter parameters, row-sparse for per-expert adapters, warm-up + decay, gradient accumulation, clipping, bf16
autocast on GPU, gradient checkpointing, balance losses; `save` every train.save_every steps) -> `finish` (adapter,
benchmarks, summary). Exact resume (same data order, optimizer, scheduler and RNG state); SIGINT/SIGTERM save a
checkpoint and stop cleanly. Progress goes to the terminal and to `OUT/events.jsonl`."""

from __future__ import annotations

import contextlib
import math
import random
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

from . import checkpoint as ckpt, collectives, distributed
from ..config import Config, save as save_config
from ..runs import EventLog
from ..io import DamagedFileError, atomic_write_json, is_no_space, no_space
from .steps import add_usage, layer_major_step, micro_batch_major_step
from ..model import OffloadSchedule
from .optim import SparseAdamW, sparse_params_of
from ..runs import RunError, StopFlag, take_lock
from .reports import cache_stats, held_out_loss, memory_gb, run_benchmarks, written_folder

#: at most about this many `step` events of a run carry expert usage (summed over the steps between them)
USAGE_REPORTS = 500


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
        from ..data import make_batches

        return make_batches(self.examples, self.micro_batch, seed=self.seed + e)

    def tensors(self, idx: list[int], device) -> dict[str, torch.Tensor]:
        from ..data import collate

        return {k: v.to(device) for k, v in collate([self.examples[i] for i in idx], self.pad_id).items()}


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


# ---- the run, top to bottom: open the folder -> set up -> restore -> steps -> finish --------------------
def train(cfg: Config, out: str | Path, resume: bool = False, echo: bool = True,
          device: str | None = None, stop_after: int | None = None) -> dict:
    """Run (or resume) a training; returns the final summary. `stop_after` simulates a stop after that step."""
    out = Path(out)
    _check_request(cfg, out)
    dist = collectives.init_from_env(device)  # None: one process; else this rank of a torchrun job
    main = collectives.is_main(dist)  # rank 0 alone writes the run folder
    lock = _open_folder(out, resume) if main else None
    log, warnings = (None if main else distributed.NullLog()), []
    try:
        job = setup(cfg, out, dist, echo and main, device)
        at = restore(job, resume, warnings.append)
        log = start_log(job, at, warnings, log)
        stopped = run_steps(job, at, log, stop_after)
        return stopped if stopped is not None else finish(job, at, log)
    except Exception as e:
        full = is_no_space(e)
        err = no_space(written_folder(e, out)) if full else e
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


def _check_request(cfg: Config, out: Path) -> None:
    """What must hold before anything starts: a folder to write, a model and a dataset."""
    if out.exists() and not out.is_dir():
        raise RunError(f"--out {out} is a file, not a folder; choose a folder for the run.")
    if not cfg.model.path:
        raise RunError("model.path is empty; set it to a local HF checkpoint directory.")
    if not cfg.data.train:
        raise RunError("data.train is empty; give a dataset file or a registry name.")


def _open_folder(out: Path, resume: bool) -> Path:
    """Rank 0: create the run folder (refusing one that holds a run unless resuming), take its lock, and remove
    the unfinished checkpoints a crash or a full disk left behind. Returns the lock file."""
    if not resume and (ckpt.latest_checkpoint(out) is not None or (out / "adapter.safetensors").exists()):
        raise RunError(f"{out} already holds a run; pass --resume to continue it or choose another --out.")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise (no_space(out) if is_no_space(e) else RunError(f"cannot create the run folder {out}: {e.strerror}.")) from None
    lock = take_lock(out)
    try:
        ckpt.remove_unfinished(out)  # step-N.tmp folders
    except BaseException:
        lock.unlink(missing_ok=True)
        raise
    return lock


@dataclass
class Job:
    """Everything a training holds once it is set up."""

    cfg: Config
    out: Path
    dist: Any  # engine.training.collectives.Dist, or None alone
    echo: bool
    dev: torch.device
    tokenizer: Any
    examples: list
    data_stats: dict
    held_out: Batches | None
    peft: Any  # engine.adapters.RoutedPEFT
    cache: Any  # engine.model.offload.ExpertCache, or None with the experts resident
    batches: Any  # Batches, or this rank's slices of them
    total: int
    params: list
    sparse: dict
    opt: SparseAdamW
    sched: Any
    autocast: torch.dtype | None

    @property
    def main(self) -> bool:
        return collectives.is_main(self.dist)

    @property
    def model(self):
        return self.peft.model


@dataclass
class Position:
    """Where the run is: steps done, the epoch and the next micro-batch in it, the last step's loss."""

    step: int = 0
    epoch: int = 0
    pos: int = 0
    loss: float | None = None
    resumed_from: Path | None = None


def setup(cfg: Config, out: Path, dist, echo: bool, device: str | None) -> Job:
    """Check the model folder, read the data, load the model with its experts placed, attach the adapters,
    and build the optimizer and the schedule."""
    from ..adapters import attach
    from ..data import load_examples
    from ..model import check_checkpoint, load_tokenizer
    from ..runs.finished import default_device, load_run_model, offload_experts

    check_checkpoint(cfg.model.path)  # before anything loads: a bad folder is one clear error
    dev = dist.device if dist is not None else default_device(device)
    seed_everything(cfg.train.seed)
    tokenizer = load_tokenizer(cfg.model.path)
    examples, data_stats = load_examples(cfg.data.train, tokenizer, cfg.data.template, cfg.data.max_len,
                                         min_examples=cfg.train.micro_batch * cfg.train.grad_accum,
                                         train_on_prompt=cfg.data.train_on_prompt)
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
    return Job(cfg, out, dist, echo, dev, tokenizer, examples, data_stats, held_out, peft, cache, batches, total,
               params, sparse, opt, sched, torch.bfloat16 if dev.type == "cuda" else None)


def restore(job: Job, resume: bool, warn: Callable[[str], None]) -> Position:
    """With --resume, the newest good checkpoint (rank 0 verifies it, every rank gets it): adapter, optimizer,
    scheduler, RNG and data position. A fresh run starts at step 0."""
    dist, peft = job.dist, job.peft
    restored = distributed.load_checkpoint(dist, job.out if resume else None, warn)
    if restored is None:
        return Position()
    resumed_from, tensors, tstate, state = restored
    distributed.check_world_size(dist, state, resumed_from)
    missing = sorted(set(dict(peft.trainable_parameters())) - set(tensors))
    if missing:
        raise DamagedFileError(f"{resumed_from / 'adapter.safetensors'} does not hold {missing[0]} of this "
                               "config's adapter; resume with the config the run was started with.")
    distributed.restore_adapter(dist, peft, tensors)
    job.opt.load_state_dict(distributed.rank_state(dist, tstate, "optimizer"))
    job.sched.load_state_dict(tstate["scheduler"])
    ckpt.set_rng_state(distributed.rank_state(dist, tstate, "rng"))
    _resume_balance_scale(peft, state, resumed_from, warn)
    return Position(state["step"], state["epoch"], state["position"], state.get("loss"), resumed_from)


def _resume_balance_scale(peft, state: dict, resumed_from: Path, warn: Callable[[str], None]) -> None:
    """A run resumes on the balance-loss scale it started with: checkpoints before issue 22 carry none (scale 1,
    per layer); a scale this version does not know is refused."""
    from ..adapters.balance import CURRENT_SCALE, SCALES

    scale = state.get("balance_scale", 1)
    if scale not in SCALES:
        raise RunError(f"{resumed_from} was written with balance-loss scale {scale!r}, which this version of MoETune "
                       f"does not know ({', '.join(f'{k}: {v}' for k, v in SCALES.items())}); resume it with the "
                       "version that started it.")
    if scale != CURRENT_SCALE and peft.balance_terms:
        peft.set_balance_scale(scale)
        warn(f"this run started before issue 22 with the balance losses on the {SCALES[scale]!r} scale (each MoE "
             "layer's loss normalised to 1 and summed over layers); it resumes on that scale so its steps stay "
             f"comparable. New runs use the {SCALES[CURRENT_SCALE]!r} scale (one loss over all layers, k when "
             "balanced, as transformers' router_aux_loss_coef).")


def start_log(job: Job, at: Position, warnings: list[str], log):
    """Write config.yaml and open events.jsonl (rank 0), then the warnings and the `start` event."""
    if job.main:
        save_config(job.cfg, job.out / "config.yaml")
        log = EventLog(job.out / "events.jsonl", echo=job.echo, total_steps=job.total)
    log.set_position(at.step)
    for w in warnings:
        if job.echo:
            print(f"warning: {w}", file=sys.stderr)
        log.emit("warning", message=w)
    log.emit("start", step=at.step, total_steps=job.total, resumed=at.resumed_from is not None,
             **({"resumed_from": str(at.resumed_from)} if at.resumed_from is not None else {}),
             world_size=job.dist.world_size if job.dist is not None else 1,
             examples=len(job.examples), dropped=dropped_rows(job.data_stats), data=job.data_stats,
             parameters=job.peft.parameter_report(), device=str(job.dev), balance_scale=job.peft.balance_scale)
    return log


def run_steps(job: Job, at: Position, log, stop_after: int | None) -> dict | None:
    """Train to the last step, with a `step` event each step and a checkpoint every train.save_every; returns the
    `stopped` result when a signal (or `stop_after`) ends the run early, None at the end."""
    usage_every, usage_sum = max(1, job.total // USAGE_REPORTS), None
    schedule = OffloadSchedule(job.cache) if job.cache is not None else None
    job.model.train()
    order = job.batches.epoch(at.epoch)
    with StopFlag() as flag:
        while at.step < job.total:
            t0 = time.perf_counter()
            micro, order = _next_micro_batches(job, at, order)
            lr, loss, aux, tokens, usage = train_step(job, at, micro, schedule)
            dt = time.perf_counter() - t0
            loss, aux, tokens, usage, signalled = distributed.reduce_report(
                job.dist, loss, aux, tokens, usage, flag.stop)  # every rank stops after the same step
            at.loss, usage_sum = loss, add_usage(usage_sum, usage)
            stopping = signalled or (stop_after is not None and at.step >= stop_after)
            # expert usage summed over the steps since the last report (USAGE_REPORTS a run), so
            # events.jsonl stays small for 48 layers x 128 experts over tens of thousands of steps
            report = at.step % usage_every == 0 or at.step in (1, job.total) or stopping
            log.emit("step", step=at.step, total_steps=job.total, epoch=at.epoch, loss=round(loss, 6),
                     balance_loss=round(aux, 6), lr=lr, tokens_per_s=round(tokens / dt, 1),
                     memory_gb=memory_gb(job.dev), **({"expert_usage": usage_sum} if report else {}),
                     **({"offload": cache_stats(job.cache)} if job.cache is not None else {}))
            usage_sum = None if report else usage_sum
            if at.step % job.cfg.train.save_every == 0 or stopping or at.step == job.total:
                save(job, at, log)
            if stopping and at.step < job.total:
                log.emit("stopped", step=at.step, reason="signal" if signalled else "stop_after")
                return {"status": "stopped", "step": at.step, "out": str(job.out)}
    return None


def _next_micro_batches(job: Job, at: Position, order: list) -> tuple[list[dict], list]:
    """The step's train.grad_accum micro-batches as tensors on the device, moving to the next epoch as needed."""
    micro = []
    for _ in range(job.cfg.train.grad_accum):
        if at.pos >= len(order):
            at.epoch, at.pos = at.epoch + 1, 0
            order = job.batches.epoch(at.epoch)
        micro.append(job.batches.tensors(order[at.pos], job.dev))
        at.pos += 1
    return micro, order


def train_step(job: Job, at: Position, micro: list[dict], schedule) -> tuple[float, float, float, int, Any]:
    """One optimizer step over the micro-batches (layer-major when experts are offloaded); a NaN or inf loss or
    gradient raises Diverged before anything is applied. Returns the lr used, loss, balance loss, tokens, usage."""
    cfg, dist = job.cfg, job.dist
    tokens = sum(int(b["attention_mask"].sum()) for b in micro)
    num_items = distributed.global_token_counts(dist, micro)  # None alone: each micro-batch's mean
    if job.cache is not None:  # each offloaded layer crosses PCIe once per sweep, not per micro-batch
        loss, aux, usage = layer_major_step(job.model, job.peft, micro, cfg.train.grad_accum, hooks=schedule,
                                            autocast_dtype=job.autocast, num_items=num_items)
    else:
        loss, aux, usage = micro_batch_major_step(job.model, job.peft, micro, cfg.train.grad_accum,
                                                  autocast_dtype=job.autocast, num_items=num_items)
    distributed.reduce_gradients(dist, job.params, list(job.sparse.values()))  # sum + union of used rows
    norm = distributed.clip_grad_norm(dist, job.params, cfg.train.max_grad_norm if cfg.train.max_grad_norm > 0
                                      else float("inf"))  # the same on every rank
    if not (math.isfinite(loss) and math.isfinite(norm)):  # before the update spoils the adapter
        what = "the loss" if not math.isfinite(loss) else "the gradient"
        last = ckpt.latest_checkpoint(job.out)
        keep = (f"the last good checkpoint is {last} (--resume continues from it)" if last
                else "no checkpoint was written yet")
        raise Diverged(f"{what} became NaN or inf at step {at.step + 1}; nothing of that step was applied "
                       f"and {keep}. Lower train.lr or raise train.warmup_steps, and check the data.")
    lr = job.opt.param_groups[0]["lr"]
    job.opt.step()
    job.sched.step()
    job.opt.zero_grad(set_to_none=True)
    at.step += 1
    return lr, loss, aux, tokens, usage


def save(job: Job, at: Position, log) -> None:
    """A checkpoint (rank 0 writes it, with every rank's RNG and optimizer share), then the held-out loss."""
    adapter, extra, shared = distributed.checkpoint_parts(job.dist, job.peft, job.opt)
    if job.main:
        path = ckpt.save_checkpoint(job.out, at.step, adapter, job.opt, job.sched,
                                    {"epoch": at.epoch, "position": at.pos, "total_steps": job.total,
                                     "loss": at.loss, "balance_scale": job.peft.balance_scale, **shared},
                                    extra=extra)
        log.emit("checkpoint", step=at.step, path=str(path))
    if job.held_out:
        log.emit("eval", step=at.step, **held_out_loss(job.model, job.peft, job.held_out, job.dev, job.autocast))


def finish(job: Job, at: Position, log) -> dict:
    """The adapter file, the benchmarks of eval.benchmarks and summary.json (rank 0); the `done` event."""
    from ..adapters import save_adapter

    job.model.eval()
    summary = {"status": "done", "step": at.step, "out": str(job.out),
               "final_loss": None if at.loss is None else round(at.loss, 6)}
    final = distributed.adapter_state(job.dist, job.peft)  # gathered from every rank under expert parallelism
    if job.main:
        save_adapter(job.peft, job.out, extra={"train": {"steps": at.step, "data": job.data_stats,
                                                       "balance_scale": job.peft.balance_scale}}, tensors=final)
        if job.cfg.eval.benchmarks:  # on rank 0 alone: the adapter is the same on every rank
            summary["accuracy"] = run_benchmarks(job.cfg, job.model, job.tokenizer, job.out, log, at.step)
        atomic_write_json(job.out / "summary.json", summary)
    log.emit("done", **summary)
    return summary


