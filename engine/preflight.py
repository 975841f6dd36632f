"""Everything `moetune train` checks before anything loads, in one function the CLI and the app both call:
the config's values, the model folder (config.json of a supported family, weights, tokenizer), `routing.layers`
against the model's MoE layers (read from config.json), the data (a registry entry whose file is missing; every
row of a file read and checked; the template fits the rows), and the number of processes (`--gpus`, the app's
GPUs field). Each problem names its field, so the app shows it beside that field; `moetune train` stops on the
first ones before it creates the run folder.

    check(config_dict, gpus)  -> Preflight (config, problems, notes)
    preflight(config, gpus)   -> Config, or PreflightError listing every problem
"""

from __future__ import annotations

import os
import re
import sys
from dataclasses import dataclass, field

from . import config as C

#: the app's name of the `--gpus N` option
GPUS_FIELD = "gpus"
_FIELD = re.compile(r"^(?:--set [^:]*: )?([a-z_]+\.[a-z_]+)\b")


@dataclass
class Problem:
    """One thing that stops (or, as a note, shapes) a training, and the field it concerns."""

    field: str  # `section.key`, or "gpus"; "config" when no single field is to blame
    message: str  # starts with the field's name: "data.train: ..."


@dataclass
class Preflight:
    """The result of `check`: the validated config (None when its values are wrong), what stops the run, and
    notes that do not (e.g. GPUs = 2 with no GPU: 2 ranks on the CPU)."""

    config: C.Config | None
    problems: list[Problem] = field(default_factory=list)
    notes: list[Problem] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        """Nothing stops the run."""
        return not self.problems

    def by_field(self) -> dict[str, list[str]]:
        """Problem messages grouped by field."""
        out: dict[str, list[str]] = {}
        for p in self.problems:
            out.setdefault(p.field, []).append(p.message)
        return out


class PreflightError(C.ConfigError):
    """A config that `moetune train` would refuse; `problems` holds each one with its field."""

    def __init__(self, problems: list[Problem]):
        self.problems = problems
        super().__init__("\n".join(p.message for p in problems))


def _named(fid: str, message: str) -> Problem:
    """A problem whose message starts with its field's name (once)."""
    text = str(message).strip()
    return Problem(fid, text if text.startswith(fid) else f"{fid}: {text}")


def _field_of(message: str) -> str:
    m = _FIELD.match(message)
    return m.group(1) if m else "config"


def gpu_count() -> int:
    """GPUs this process may use: torch's count once torch is loaded, else the NVIDIA driver's devices
    (/proc/driver/nvidia/gpus) limited by CUDA_VISIBLE_DEVICES, so the app can say it without loading torch."""
    if "torch" in sys.modules:
        import torch

        return torch.cuda.device_count()
    try:
        found = len(os.listdir("/proc/driver/nvidia/gpus"))
    except OSError:
        return 0
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    if visible is None:
        return found
    ids = [v.strip() for v in visible.split(",") if v.strip()]
    ids = ids[:next((i for i, v in enumerate(ids) if v.startswith("-")), len(ids))]  # "-1" ends the list
    return min(found, len(ids))


def check_gpus(gpus, expert_parallel: int = 1, label: str = "GPUs") -> tuple[list[Problem], list[Problem]]:
    """(problems, notes) of the number of processes: a whole number of at least 1, no more than the machine's
    GPUs; with no GPU, more than 1 trains that many ranks on the CPU (a note); train.expert_parallel needs
    exactly its number of ranks."""
    problems, notes = [], []
    if gpus is None:
        return problems, notes
    try:
        n = int(gpus)
        whole = float(gpus) == n
    except (TypeError, ValueError):
        n, whole = 0, False
    if not whole or n < 1:
        shown = gpus if not isinstance(gpus, float) or not whole else int(gpus)
        return [Problem(GPUS_FIELD, f"{label} {shown!r}: give the number of GPUs (processes) on this machine, 1 or "
                                    "more: 1 trains one process (on the GPU when there is one, else the CPU), more "
                                    "train data parallel.")], notes
    have = gpu_count()
    if n > 1 and have == 0:
        notes.append(Problem(GPUS_FIELD, f"{label} {n}: this machine has no GPU, so {n} processes will train on the CPU "
                                         "(data parallel over gloo, each holding the model); give 1 for one "
                                         "process."))
    elif n > have > 0:
        problems.append(Problem(GPUS_FIELD, f"{label} {n}: this machine shows {have} GPU(s); give at most {have}."))
    if expert_parallel > 1 and expert_parallel != n:
        problems.append(Problem("train.expert_parallel", f"train.expert_parallel: {expert_parallel} needs exactly "
                                                         f"{expert_parallel} processes ({label} is {n}); set {label} to "
                                                         f"{expert_parallel} or train.expert_parallel to 1."))
    return problems, notes


def check_model(cfg: C.Config) -> list[Problem]:
    """The model folder is a checkpoint of a supported family with weights and a tokenizer, and routing.layers
    names only its MoE layers (config.json is read; no weight is loaded)."""
    from .model.hf_checkpoint import check_checkpoint

    if not str(cfg.model.path).strip():
        return [Problem("model.path", "model.path: empty; pick the demo model or give a local HF checkpoint folder.")]
    try:
        hf_config, family = check_checkpoint(cfg.model.path)
    except ValueError as e:  # CheckpointError, UnsupportedModelError
        return [_named("model.path", str(e))]
    moe_layers = family.moe_layers(hf_config)
    try:
        cfg.layer_indices(moe_layers)
    except C.ConfigError as e:
        return [_named("routing.layers", str(e))]
    if isinstance(cfg.routing.layers, str) and cfg.routing.layers.startswith("every:") \
            and int(cfg.routing.layers.split(":")[1]) > len(moe_layers):
        return [Problem("routing.layers", f"routing.layers: {cfg.routing.layers!r} selects only the first of the "
                                          f"model's {len(moe_layers)} MoE layers; write every:N with N at most "
                                          f"{len(moe_layers)} or a list such as [0].")]
    return []


def check_data(fid: str, spec: str, template: str, min_rows: int = 1, registry=None) -> list[Problem]:
    """A dataset (`data.train` or `data.eval`) is there and every row of it reads and fits the template: a
    registry entry whose file is missing says where to put it; a broken row names the file, row and field."""
    from .data.errors import DataError
    from .data.formats import read_records
    from .data.registry import resolve_dataset
    from .data.templates import render

    try:
        ds = resolve_dataset(spec, registry)
        records, _ = read_records(ds.file, ds.format, split=ds.split, columns=ds.columns,
                                  ignore_columns=ds.ignore_columns)
        if template != "chat":  # the chat template needs the tokenizer; training checks it when it loads one
            for r in records:
                render(r, template)
    except DataError as e:
        return [_named(fid, str(e))]
    if len(records) < min_rows:
        return [Problem(fid, f"{fid}: {ds.file} holds {len(records)} row(s), and one optimizer step takes "
                             f"{min_rows} (train.micro_batch × train.grad_accum × processes); add rows or lower "
                             "train.micro_batch / train.grad_accum.")]
    return []


def check(data: dict | C.Config, gpus=None, registry=None, gpus_label: str = "GPUs") -> Preflight:
    """Everything `moetune train` would check before anything loads, every problem with its field. `data` is a
    config dict (or Config), paths as the trainer will read them; `gpus` the number of processes (None: one)."""
    try:
        cfg = data if isinstance(data, C.Config) else C.from_dict(data)
    except C.ConfigError as e:
        return Preflight(None, [Problem(_field_of(str(e)), str(e))])
    problems, notes = check_gpus(gpus, cfg.train.expert_parallel, gpus_label)
    problems += check_model(cfg)
    if not str(cfg.data.train).strip():
        problems.append(Problem("data.train", "data.train: empty; give a dataset file or a registry name."))
    else:
        ranks = int(gpus) if gpus is not None and not any(p.field == GPUS_FIELD for p in problems) else 1
        problems += check_data("data.train", cfg.data.train, cfg.data.template,
                               cfg.train.micro_batch * cfg.train.grad_accum * ranks, registry)
    if str(cfg.data.eval).strip():
        problems += check_data("data.eval", cfg.data.eval, cfg.data.template, 1, registry)
    return Preflight(cfg, problems, notes)


def preflight(data: dict | C.Config, gpus=None, registry=None, gpus_label: str = "--gpus") -> C.Config:
    """The validated Config when `moetune train` can start on it; else PreflightError listing every problem
    (`gpus_label`: how the number of processes is named, `--gpus` on the command line)."""
    result = check(data, gpus, registry, gpus_label)
    if result.problems:
        raise PreflightError(result.problems)
    return result.config

