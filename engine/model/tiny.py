"""Tiny random-weight checkpoints of the real architectures, with a tokenizer trained locally on text the
project ships: byte-level BPE (GPT-2 / Qwen style, the default) or SentencePiece-style BPE with byte
fallback (Llama / Mistral / Mixtral style). Tests and the demo use these; nothing is downloaded."""

from __future__ import annotations

from pathlib import Path

import torch

from .arch import FAMILIES, get_family

CORPUS = Path(__file__).resolve().parents[2] / "assets" / "tokenizer_corpus.txt"
#: Qwen2's pre-tokenization pattern (llama.cpp: tokenizer.ggml.pre = "qwen2")
QWEN2_PATTERN = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
                 r"|\s*[\r\n]+|\s+(?!\S)|\s+")
SPECIAL_TOKENS = ["<pad>", "<s>", "</s>", "<unk>", "<|im_start|>", "<|im_end|>"]
#: Llama's reserved ids: <unk> 0, <s> 1, </s> 2, then the 256 byte-fallback tokens <0x00>..<0xFF>
SPM_SPECIAL_TOKENS = ["<unk>", "<s>", "</s>"]
SPM_BYTE_TOKENS = [f"<0x{b:02X}>" for b in range(256)]
CHAT_TOKENS = ["<|im_start|>", "<|im_end|>"]
#: the tokenizer kinds make_tiny_model builds
TOKENIZERS = ("bpe", "spm")
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


def build_spm_tokenizer(vocab_size: int = 512, corpus: Path = CORPUS):
    """A SentencePiece-style BPE tokenizer laid out as Llama's and Mixtral's tokenizer.json (unk=0, bos=1,
    eos=2, byte tokens 3..258, spaces as '▁' with one prepended, BOS added), trained on the shipped corpus.

    Its merges are then regenerated the way transformers converts a SentencePiece model (every split of a
    piece into two pieces, in the order of the pieces), so BPE over them equals SentencePiece's
    highest-score-first merging, which is what llama.cpp's 'llama' tokenizer runs.
    """
    from tokenizers import AddedToken, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    n_pieces = vocab_size - len(SPM_BYTE_TOKENS) - len(CHAT_TOKENS)
    if n_pieces < 100:
        raise ValueError(f"vocab_size {vocab_size} is too small for a SentencePiece-style tokenizer (it holds "
                         f"{len(SPM_BYTE_TOKENS)} byte tokens); use at least 400.")
    normalizer = normalizers.Sequence([normalizers.Prepend("▁"), normalizers.Replace(" ", "▁")])
    trainer_tok = Tokenizer(models.BPE(unk_token="<unk>", byte_fallback=True))
    trainer_tok.normalizer = normalizer
    # split at spaces while training only, as SentencePiece does (no piece spans two words)
    trainer_tok.pre_tokenizer = pre_tokenizers.Metaspace(replacement="▁", prepend_scheme="never", split=True)
    # no newline or tab pieces: like Llama's, those characters fall back to byte tokens
    trainer = trainers.BpeTrainer(vocab_size=n_pieces, special_tokens=SPM_SPECIAL_TOKENS, show_progress=False)
    trainer_tok.train_from_iterator(corpus.read_text(encoding="utf-8").splitlines(), trainer)
    trained = sorted(trainer_tok.get_vocab().items(), key=lambda item: item[1])
    pieces = [t for t, _ in trained if t not in SPM_SPECIAL_TOKENS]
    vocab = {t: i for i, t in enumerate(SPM_SPECIAL_TOKENS + SPM_BYTE_TOKENS + pieces)}

    tok = Tokenizer(models.BPE(vocab=vocab, merges=_sentencepiece_merges(pieces, vocab), unk_token="<unk>",
                               byte_fallback=True, fuse_unk=True))
    tok.normalizer = normalizer
    tok.decoder = decoders.Sequence([decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse(),
                                     decoders.Strip(" ", 1, 0)])
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False)
                            for t in SPM_SPECIAL_TOKENS + CHAT_TOKENS])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   additional_special_tokens=CHAT_TOKENS)
    fast.chat_template = CHAT_TEMPLATE
    return fast


def _sentencepiece_merges(pieces: list[str], vocab: dict[str, int]) -> list[tuple[str, str]]:
    """Every split of each piece into two vocabulary pieces, ordered by the piece's id, then the parts' ids."""
    merges = []
    for piece in pieces:
        splits = [(piece[:k], piece[k:]) for k in range(1, len(piece))]
        merges += sorted((s for s in splits if s[0] in vocab and s[1] in vocab),
                         key=lambda s: (vocab[s[0]], vocab[s[1]]))
    return merges


def tiny_config(family: str, layers: int = 2, hidden: int = 64, experts: int = 4, top_k: int = 2,
                vocab_size: int = 512):
    """A transformers config of a family's real architecture at a tiny size."""
    from transformers import AutoConfig

    fam = get_family(family)
    for flag, value in (("--layers", layers), ("--hidden", hidden), ("--experts", experts), ("--top-k", top_k)):
        if value < 1:
            raise ValueError(f"{flag} {value}: it must be at least 1.")
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
                    top_k: int = 2, seed: int = 0, vocab_size: int = 512, tokenizer: str = "bpe") -> Path:
    """Write a random-weight checkpoint (hub per-expert tensor names) and its tokenizer to `out`; `tokenizer` is
    "bpe" (byte-level, Qwen2-style) or "spm" (SentencePiece-style BPE with byte fallback, as Llama and Mixtral)."""

    if family not in FAMILIES:
        get_family(family)  # raises the clear error
    if tokenizer not in TOKENIZERS:
        raise ValueError(f"--tokenizer {tokenizer!r} is not a tiny tokenizer kind; "
                         f"choose one of {', '.join(TOKENIZERS)}.")
    tok = build_spm_tokenizer(vocab_size) if tokenizer == "spm" else build_tokenizer(vocab_size)
    config = tiny_config(family, layers, hidden, experts, top_k, len(tok))  # checks the sizes before writing
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    config.pad_token_id = tok.pad_token_id  # None for the SentencePiece style, which has no pad token (as Llama)
    torch.manual_seed(seed)
    model = get_family(family).tiny_model(config)
    get_family(family).tiny_init(model, torch.Generator().manual_seed(seed))
    # transformers 5 writes experts back under the hub's per-expert names (gate_proj/up_proj/down_proj,
    # Mixtral's block_sparse_moe.experts.N.w1/w2/w3), which is the layout MoETune's loader reads.
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return out
