"""The llama.cpp check of a GGUF export: the file is run by llama.cpp (llama-cpp-python, when installed) in a
child process on the sample prompts, and its logits are compared with the fp32 merged checkpoint's in
transformers. A crash is reported with its signal and, where it is llama.cpp's documented bug, with what
runs instead; it never takes the export down, and the file is kept (it is sound: the comparison says so)."""

from __future__ import annotations

import warnings
from pathlib import Path
from typing import Any

import torch

from . import llama_child
from . import check


def llama_cpp_check(gguf_path: Path, inputs: list[torch.Tensor], reference: list[torch.Tensor],
                    dtype: str) -> dict[str, Any]:
    """Run `gguf_path` in llama.cpp on `inputs` ([1, T] token ids); the logit difference from `reference`, the
    fp32 merged checkpoint's logits on them in transformers."""
    if not llama_child.llama_cpp_available():
        return unchecked(gguf_path, dtype, "llama-cpp-python is not installed (pip install llama-cpp-python, or "
                                           "pip install -e '.[dev]'), so the file was not run in llama.cpp")
    ops = [("logits", ids[0].tolist()) for ids in inputs]
    report: dict[str, Any] = {"llama_cpp_version": llama_child.llama_cpp_version()}
    try:
        got = llama_child.run_llama(gguf_path, ops, n_ctx=_context(inputs))
    except llama_child.LlamaCppCrash as crash:
        report["crashed"] = crash.signal_name
        known = llama_child.known_crash(crash, dtype)
        if known is None:
            report["error"] = str(crash)
            warnings.warn(f"llama.cpp crashed ({crash.signal_name}) running the exported {gguf_path.name}; "
                          "see export_report.json", stacklevel=2)
            return report
        report["known_issue"] = known
        got = llama_child.run_llama(gguf_path, ops, n_ctx=_context(inputs), repack=False)
        report["runs_with"] = "--no-repack (llama.cpp's extra CPU buffer types off)"
        warnings.warn(f"{gguf_path.name}: {known}", stacklevel=2)
    except llama_child.LlamaCppError as error:
        report["error"] = str(error)
        return report
    risk = llama_child.amx_risk(dtype)
    if risk and "known_issue" not in report:  # this llama.cpp ran it; one built natively for this CPU may not
        report["note"] = risk
    report.update(check.compare(reference, [torch.from_numpy(g) for g in got],
                                f"llama.cpp running the {dtype} GGUF, against the fp32 merged checkpoint "
                                "in transformers"))
    return report


def unchecked(gguf_path: Path, dtype: str, why: str) -> dict[str, Any]:
    """The report of a GGUF not run in llama.cpp: why, and the warning when this CPU is one it may crash on."""
    report: dict[str, Any] = {"skipped": why}
    risk = llama_child.amx_risk(dtype)
    if risk:
        report["warning"] = risk
        warnings.warn(f"{gguf_path.name}: {risk}", stacklevel=2)
    return report


def _context(inputs: list[torch.Tensor]) -> int:
    """A context just big enough for the longest sample prompt (llama.cpp rounds it up)."""
    return max(64, max(int(ids.shape[1]) for ids in inputs))
