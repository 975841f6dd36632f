"""`export_run`: a finished run as a merged HF checkpoint, a PEFT-layout LoRA, a GGUF file, or a llama.cpp
LoRA adapter GGUF (or, `base=True`, its base model alone as GGUF, for those adapters), with
export_report.json (what was merged and how, exact or not, and the measured logit difference).

Everything is written into a staging folder beside the output and moved in only when complete; the
report is moved in last, so a folder with export_report.json holds a finished export. A NaN / inf in an
exported tensor or in a logit figure fails the export; a full disk is one NoSpaceError naming the folder."""

from __future__ import annotations

import json
import math
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch

from ..io import atomic_write_json, is_no_space, no_space
from . import check
from .errors import ExportError
from .gguf import llama_cpp_problems, write_gguf
from .gguf_lora import LORA_DTYPES, gguf_lora_problems, read_gguf_lora, write_gguf_lora
from .llama_check import llama_cpp_check, unchecked
from .merge import merge_plan, merge_problems, write_merged
from .peft_lora import apply_peft, peft_plan, peft_problems, write_peft
from .source import RunSource, open_run

REPORT_FILE = "export_report.json"
FORMATS = ("hf", "peft", "gguf", "gguf-lora")
#: dtypes each format takes; f32 is kept for exactness checks (the user-facing contract names f16|bf16|q8_0)
DTYPES = {"hf": ("f16", "bf16", "f32"), "peft": ("f16", "bf16", "f32"), "gguf": ("f16", "bf16", "q8_0", "f32"),
          "gguf-lora": LORA_DTYPES}
TORCH_DTYPES = {"f16": torch.float16, "bf16": torch.bfloat16, "f32": torch.float32}


def export_run(run_dir: str | Path, fmt: str, dtype: str, out_dir: str | Path, *,
               check_logits: bool | None = None, base: bool = False) -> dict[str, Any]:
    """Export the run in `fmt` (hf, peft, gguf or gguf-lora) and `dtype` into `out_dir`; returns the report (also
    written there). `base=True` (with gguf): the run's base model alone, for its gguf-lora adapter.

    The logit comparison loads the base model twice in fp32: `check_logits=None` runs it when that fits
    in half the free host memory (else the report says why it was skipped); True / False force it."""
    _check_options(fmt, dtype, base)
    run_dir, out_dir = Path(run_dir), Path(out_dir)
    src = open_run(run_dir)
    _check_out_dir(out_dir, src)
    if base:
        problems = [f"llama.cpp: {p}" for p in llama_cpp_problems(src.hf_config, src.family)]
        if problems:
            raise ExportError(f"cannot export the base model of {run_dir} as gguf: " + "; ".join(problems) + ".")
    else:
        problems = {f: _problems(src, f) for f in FORMATS}
        if problems[fmt]:
            working = [f for f in FORMATS if not problems[f]]
            where = (f"Formats that work for this run: {', '.join(working)}." if working else
                     "No export format holds this run exactly; use it with MoETune itself (moetune eval / chat).")
            raise ExportError(f"cannot export {run_dir} as {fmt}: " + "; ".join(problems[fmt]) + f". {where}")
    try:
        return _export_into(src, fmt, dtype, out_dir, check_logits, base)
    except Exception as e:  # safetensors, gguf and torch each word a full disk their own way
        if is_no_space(e):
            raise no_space(out_dir) from None
        raise


def _export_into(src: RunSource, fmt: str, dtype: str, out_dir: Path, check_logits: bool | None,
                 base: bool) -> dict[str, Any]:
    """Write the export into a staging folder beside `out_dir`, check it, and move it in (the report last)."""
    created = not out_dir.exists()
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{out_dir.name}.staging-", dir=out_dir.parent))
    try:
        skipped = None
        if check_logits is None:
            skipped = _check_too_big(src.base)
            check_logits = skipped is None
        report = _export_base(src, dtype, staging, check_logits) if base else \
            _export(src, fmt, dtype, staging, check_logits)
        if skipped:
            report["check"] = {"skipped": skipped}
        _require_finite_figures(report, src.run_dir)
        report["out"] = str(out_dir)
        atomic_write_json(staging / REPORT_FILE, report)
        _move_in(staging, out_dir, report["files"])
    except BaseException:
        if created and out_dir.is_dir() and not any(out_dir.iterdir()):
            out_dir.rmdir()
        raise
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return report


def _export_base(src: RunSource, dtype: str, staging: Path, check_logits: bool) -> dict[str, Any]:
    """The run's base checkpoint alone as GGUF (MoETune's writer), checked in llama.cpp against transformers."""
    name = f"base-{dtype}.gguf"
    report: dict[str, Any] = {"format": "gguf", "base_only": True, "dtype": dtype, "run": str(src.run_dir),
                              "base": str(src.base), "family": src.family.model_type,
                              "note": "the base model alone, without the run's adapter: load the run's "
                                      "--format gguf-lora adapter onto it (llama-cli -m BASE --lora ADAPTER)"}
    report["gguf"] = write_gguf(src.base, staging / name, dtype)
    report["gguf"]["path"] = name
    report.update(merged=[], files=[name])
    if check_logits:
        inputs = check.sample_inputs(src.base)
        reference = check.logits(check.transformers_model(src.base), inputs)
        report["llama_cpp"] = llama_cpp_check(staging / name, inputs, reference, dtype)
    else:
        report["llama_cpp"] = unchecked(staging / name, dtype, "the checks were skipped (--no-check or too little "
                                                               "memory)")
    report["exact"] = True  # nothing is merged: the file holds the base checkpoint in `dtype`
    report["max_abs_logit_diff"] = report["llama_cpp"].get("max_abs_logit_diff")
    return report


def _require_finite_figures(report: dict[str, Any], run_dir: Path) -> None:
    """ExportError when a logit figure of the report is NaN or inf: such an export is never exact or done."""
    figures = {"max_abs_logit_diff": report.get("max_abs_logit_diff")}
    for part in ("check", "llama_cpp"):
        section = report.get(part) or {}
        figures.update({f"{part}.{k}": section.get(k) for k in ("max_abs_logit_diff", "median_abs_logit_diff",
                                                                 "max_abs_logit")})
    bad = {k: v for k, v in figures.items() if isinstance(v, float) and not math.isfinite(v)}
    if bad:
        shown = ", ".join(f"{k} = {v}" for k, v in bad.items())
        raise ExportError(f"the export of {run_dir} computes non-finite logits ({shown}), so it is not exact and "
                          "was not written; check the run (moetune eval) or train it again.")


def _export(src: RunSource, fmt: str, dtype: str, staging: Path, check_logits: bool) -> dict[str, Any]:
    report: dict[str, Any] = {"format": fmt, "dtype": dtype, "run": str(src.run_dir), "base": str(src.base),
                              "family": src.family.model_type}
    if fmt == "peft":
        summary = write_peft(src, staging, TORCH_DTYPES[dtype])
        report.update(merged=[g.to_dict() for g in peft_plan(src)], files=summary["files"],
                      target_modules=summary["target_modules"], target_parameters=summary["target_parameters"],
                      layout=summary["layout"])
        if check_logits:
            report["check"] = _check_peft(src, staging)
    elif fmt == "gguf-lora":
        name = f"adapter-{dtype}.gguf"
        report["gguf_lora"] = write_gguf_lora(src, staging / name, dtype)
        report["gguf_lora"]["path"] = name
        report.update(merged=[g.to_dict() for g in peft_plan(src)], files=[name])
        if check_logits:
            report["check"] = _check_lora(src, read_gguf_lora(staging / name, src),
                                          "the original base (transformers, fp32) with the LoRA read back from the "
                                          "adapter GGUF applied by hand")
    else:
        hf_dir = staging if fmt == "hf" else staging / "hf"
        summary = write_merged(src, hf_dir, TORCH_DTYPES[dtype] if fmt == "hf" else torch.float32)
        report.update(merged=[g.to_dict() for g in merge_plan(src)],
                      expert_intermediate_size=summary["expert_intermediate_size"], files=summary["files"])
        if check_logits:  # the merged model's logits, once: against the unmerged model, and against llama.cpp
            inputs = check.sample_inputs(src.base)
            merged = check.logits(check.transformers_model(hf_dir), inputs)
            what = "the merged checkpoint reloaded by transformers (fp32)" if fmt == "hf" else \
                "the fp32 merged HF checkpoint the GGUF was written from, reloaded by transformers"
            report["check"] = check.compare(check.logits(check.unmerged_model(src), inputs), merged, what)
        if fmt == "gguf":
            name = f"model-{dtype}.gguf"
            report["gguf"] = write_gguf(hf_dir, staging / name, dtype)
            report["gguf"]["path"] = name
            report["files"] = [name]
            report["llama_cpp"] = llama_cpp_check(staging / name, inputs, merged, dtype) if check_logits else \
                unchecked(staging / name, dtype, "the checks were skipped (--no-check or too little memory)")
    report["exact"] = all(g["exact"] for g in report["merged"])
    report["max_abs_logit_diff"] = report["check"]["max_abs_logit_diff"] if check_logits else None
    return report


def _check_too_big(base: Path) -> str | None:
    """Why the logit check would not fit in host memory (two fp32 copies of the base), or None."""
    from ..model import checkpoint_files, read_config

    config, _ = read_config(base)
    stored = sum(f.stat().st_size for f in checkpoint_files(base))
    bytes_per = 2 if str(getattr(config, "dtype", None) or "bfloat16").endswith(("bfloat16", "float16")) else 4
    need = 2 * stored * 4 // bytes_per
    free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
    if need <= free // 2:
        return None
    return (f"the check loads the base model twice in fp32 ({need / 1e9:.1f} GB) and this machine has "
            f"{free / 1e9:.1f} GB free; the merge itself is exact by construction (see `merged`)")


def _check_peft(src: RunSource, folder: Path) -> dict[str, Any]:
    from safetensors.torch import load_file

    return _check_lora(src, load_file(str(folder / "adapter_model.safetensors")),
                       "the original base (transformers, fp32) with the PEFT tensors applied by hand")


def _check_lora(src: RunSource, tensors: dict[str, torch.Tensor], what: str) -> dict[str, Any]:
    inputs = check.sample_inputs(src.base)
    reference = check.logits(check.unmerged_model(src), inputs)
    model = check.transformers_model(src.base)
    apply_peft(model, src.family, tensors, src.cfg.adapter.alpha, src.cfg.adapter.rank)
    return check.compare(reference, check.logits(model, inputs), what)


def format_problems(run_dir: str | Path) -> dict[str, list[str]]:
    """Why each export format cannot hold a finished run exactly ([] where it can): the reasons `export_run`
    refuses a format with, so a picker can offer only the formats that work."""
    src = open_run(Path(run_dir))
    return {f: _problems(src, f) for f in FORMATS}


def _problems(src: RunSource, fmt: str) -> list[str]:
    if fmt == "peft":
        return peft_problems(src)
    if fmt == "gguf-lora":
        return gguf_lora_problems(src)
    problems = merge_problems(src)
    if fmt == "gguf" and not problems:
        problems += [f"llama.cpp: {p}" for p in llama_cpp_problems(src.hf_config, src.family)]
    return problems


def _check_options(fmt: str, dtype: str, base: bool = False) -> None:
    if fmt not in FORMATS:
        raise ExportError(f"export.format (--format) {fmt!r} is not one of {', '.join(FORMATS)}.")
    if base and fmt != "gguf":
        raise ExportError(f"--base writes the base model alone as GGUF: use it with --format gguf, not {fmt} "
                          "(the run's LoRA for that base is --format gguf-lora).")
    if dtype not in DTYPES[fmt]:
        only = " (q8_0 is for --format gguf only)" if dtype == "q8_0" else ""
        raise ExportError(f"export.dtype (--dtype) {dtype!r} is not allowed for --format {fmt}{only}; "
                          f"choose one of {', '.join(DTYPES[fmt])}.")


def _check_out_dir(out_dir: Path, src: RunSource) -> None:
    resolved = out_dir.resolve()
    for what, path in (("base model", src.base), ("run", src.run_dir)):
        if resolved == path.resolve():
            raise ExportError(f"--out {str(out_dir)!r} is the {what} folder; give a new folder for the export.")
    if out_dir.exists() and not out_dir.is_dir():
        raise ExportError(f"--out {str(out_dir)!r} is a file; give a folder.")
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / REPORT_FILE).is_file():
        raise ExportError(f"--out {str(out_dir)!r} is not empty and holds no earlier export ({REPORT_FILE}); "
                          "give an empty or new folder so that nothing of yours is overwritten.")


def _move_in(staging: Path, out_dir: Path, files: list[str]) -> None:
    """Replace an earlier export in `out_dir` (the files its report lists) with the staged files and report."""
    out_dir.mkdir(parents=True, exist_ok=True)
    old = out_dir / REPORT_FILE
    if old.is_file():
        try:
            stale = json.loads(old.read_text()).get("files", [])
        except (json.JSONDecodeError, AttributeError):
            stale = []
        old.unlink()  # the folder no longer claims to hold a finished export until the new report lands
        for name in stale:
            if name not in files and "/" not in name and (out_dir / name).is_file():
                (out_dir / name).unlink()
    for name in files + [REPORT_FILE]:  # the report last: the folder claims a finished export only then
        os.replace(staging / name, out_dir / name)
