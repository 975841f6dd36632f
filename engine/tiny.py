"""Tiny random-weight checkpoints of the real architectures, with a byte-level BPE tokenizer trained
locally on text the project ships. Tests and the demo use these; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

from .arch import FAMILIES, get_family

CORPUS = Path(__file__).resolve().parent.parent / "assets" / "tokenizer_corpus.txt"
#: Qwen2's pre-tokenization pattern (llama.cpp: tokenizer.ggml.pre = "qwen2")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
# A plain ChatML template, so chat-format datasets work on tiny models.
CHAT_TEMPLATE = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)


def build_tokenizer(vocab_size: int = 512, corpus: Path = CORPUS):
    """A byte-level BPE tokenizer (pad=0, bos=1, eos=2) trained on the shipped corpus in about a second.

    It pre-splits text with Qwen2's pattern (one token per digit), so llama.cpp tokenises it the same
    way with its `qwen2` pre-tokenizer, and small models can learn arithmetic digit by digit.
    """
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(QWEN2_PATTERN), behavior="isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train([str(corpus)], trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                   unk_token="<unk>", additional_special_tokens=["<|im_start|>", "<|im_end|>"])
    fast.chat_template = CHAT_TEMPLATE
    return fast


def tiny_config(family: str, layers: int = 2, hidden: int = 64, experts: int = 4, top_k: int = 2,
                vocab_size: int = 512):
    """A transformers config of a family's real architecture at a tiny size."""
    from transformers import AutoConfig

    fam = get_family(family)
    if top_k > experts:
        raise ValueError(f"--top-k {top_k} is larger than --experts {experts}; choose top_k <= experts.")
    if hidden % 8:
        raise ValueError(f"--hidden {hidden} must be a multiple of 8 (4 attention heads of even size).")
    kwargs = fam.tiny_config_kwargs(layers, hidden, experts, top_k, vocab_size)
    # Real models init at std 0.02 for H in the thousands; at tiny H that leaves logits (and routers)
    # too flat for a frozen head to express anything, so scale the init with the width instead.
    kwargs["initializer_range"] = hidden ** -0.5
    return AutoConfig.for_model(family, **kwargs)


def make_tiny_model(family: str, out: str | Path, layers: int = 2, hidden: int = 64, experts: int = 4,
                    top_k: int = 2, seed: int = 0, vocab_size: int = 512) -> Path:
    """Write a random-weight checkpoint (hub per-expert tensor names) and its tokenizer to `out`."""
    from transformers import AutoModelForCausalLM

    if family not in FAMILIES:
        get_family(family)  # raises the clear error
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    tokenizer = build_tokenizer(vocab_size)
    config = tiny_config(family, layers, hidden, experts, top_k, len(tokenizer))
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # transformers 5 writes experts back under the hub's per-expert names (gate_proj/up_proj/down_proj,
    # Mixtral's block_sparse_moe.experts.N.w1/w2/w3), which is the layout MoETune's loader reads.
    model.save_pretrained(out)
    tokenizer.save_pretrained(out)
    return out
