"""The exactness check of an export: the largest absolute logit difference between the exported model
and the unmerged one (the base with the run's adapters attached by engine.adapters.load_adapter, its
experts as training held them), on a few sample prompts, in fp32 on the CPU."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn

from .source import RunSource, nf4_round_trip

SAMPLE_PROMPTS = (
    "Below is an instruction that describes a task. Write a response that appropriately completes the request.\n\n"
    "### Instruction:\nWhat is 52 + 578?\n\n### Response:\n",
    "The quick brown fox jumps over the lazy dog.",
    "Question: is the sky blue on a clear day? Answer: true",
)


def sample_inputs(base: Path, prompts: tuple[str, ...] = SAMPLE_PROMPTS) -> list[torch.Tensor]:
    """The sample prompts as [1, T] token ids of the base model's tokenizer."""
    from ..model import load_tokenizer

    tok = load_tokenizer(base)
    return [torch.tensor([tok(p)["input_ids"]]) for p in prompts]


def unmerged_model(src: RunSource) -> nn.Module:
    """The base model in fp32 with the run's adapters attached, experts (and, with model.attention_quant nf4,
    the other linear layers) stored as training stored them."""
    from ..model import load_model
    from ..adapters import load_adapter

    loaded = load_model(src.base, torch.float32, "cpu", expert_quant=src.cfg.model.quant)
    with torch.no_grad():  # NF4 linear layers as the dequantised fp32 weights they multiply by (bitsandbytes'
        for name in src.nf4_linears:  # own CPU kernel computes in bf16, which would blur the comparison)
            weight = loaded.model.get_parameter(name)
            weight.copy_(nf4_round_trip(weight))
    load_adapter(loaded, src.run_dir)
    return loaded.model.eval()


def transformers_model(path: str | Path) -> nn.Module:
    """A checkpoint loaded by transformers itself in fp32, with its plain (eager) expert loop."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(path), dtype=torch.float32)
    model.config._experts_implementation = "eager"  # transformers' reference loop, no fused kernels
    return model.eval()


def logits(model: nn.Module, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The model's logits [T, V] on each input."""
    with torch.no_grad():
        return [model(ids).logits[0].float() for ids in inputs]


def compare(reference: list[torch.Tensor], exported: list[torch.Tensor], what: str) -> dict[str, Any]:
    """The largest absolute logit difference, its median over positions (a few positions whose top-k
    experts flip under rounding move far more than the rest), and the size of the logits."""
    per_position = torch.cat([(a - b).abs().max(dim=-1).values for a, b in zip(reference, exported)])
    return {"compared": what, "prompts": len(reference), "tokens": int(per_position.numel()),
            "max_abs_logit_diff": float(per_position.max()),
            "median_abs_logit_diff": float(per_position.median()),
            "max_abs_logit": max(float(r.abs().max()) for r in reference)}
