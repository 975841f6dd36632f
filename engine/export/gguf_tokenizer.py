"""The tokenizer of a GGUF file: llama.cpp's `tokenizer.ggml.*` metadata from a checkpoint folder's HF tokenizer
(byte-level BPE as `gpt2` with its pre-tokenizer name, SentencePiece-style BPE as `llama` with scores and
token types), and the special tokens (bos / eos / pad, add_bos) as llama.cpp's own converter writes them."""

from __future__ import annotations

import json
import logging
import warnings
from pathlib import Path

import gguf

from .errors import ExportError

#: HF pre-tokenizer regexes (a `Split` before a regex-free ByteLevel) -> llama.cpp's `tokenizer.ggml.pre`
_SPLIT_PRE = {
    # Qwen1.5 / Qwen2 / Qwen3
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen2",
    # Qwen3.5 (marks join letters), which transformers' Qwen3_5Tokenizer runs whatever tokenizer.json says
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+":
        "qwen35",
}
#: llama.cpp's byte-level pre-tokenizers that add BOS unless the file says otherwise (src/llama-vocab.cpp)
_PRE_ADDS_BOS = {"llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                 "jina-v5-nano", "tekken", "chameleon"}
_SPACE = "\u2581"  # '▁', SentencePiece's space
_TT = gguf.TokenType



def _add_tokenizer(writer: gguf.GGUFWriter, hf_dir: Path, vocab_size: int) -> int:
    """Write the checkpoint's tokenizer as llama.cpp's 'gpt2' (byte-level BPE) or 'llama' (SentencePiece-style
    BPE with byte fallback) model; returns the number of tokens."""
    tok_file = hf_dir / "tokenizer.json"
    if not tok_file.is_file():
        raise ExportError(f"{tok_file} is missing; the GGUF export needs the checkpoint's fast tokenizer "
                          "(save it with tokenizer.save_pretrained into the checkpoint directory).")
    spec = json.loads(tok_file.read_text(encoding="utf-8"))
    model = spec.get("model") or {}
    if model.get("type") == "BPE" and model.get("byte_fallback"):
        return _add_llama_tokenizer(writer, hf_dir, vocab_size)
    if model.get("type") != "BPE":
        raise ExportError(f"{tok_file} is a {model.get('type')} tokenizer; the GGUF export writes BPE tokenizers "
                          "only (byte-level, as GPT-2 and Qwen, or SentencePiece-style with byte fallback, as Llama "
                          "and Mistral). Export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py.")
    return _add_gpt2_tokenizer(writer, hf_dir, spec, vocab_size)


def _add_gpt2_tokenizer(writer: gguf.GGUFWriter, hf_dir: Path, spec: dict, vocab_size: int) -> int:
    """Write a byte-level BPE tokenizer as llama.cpp's 'gpt2' model; returns the number of tokens."""
    from transformers import AutoTokenizer

    model = spec.get("model") or {}
    tok = AutoTokenizer.from_pretrained(str(hf_dir), local_files_only=True)
    # the pre-tokenizer transformers runs, whatever the file says (a model's own tokenizer class may set its own)
    backend = json.loads(tok.backend_tokenizer.to_str())
    pre = _pre_tokenizer(backend.get("pre_tokenizer"), hf_dir / "tokenizer.json")
    if backend.get("normalizer"):  # Qwen's NFC: llama.cpp's byte-level tokenizers take the text as it comes
        warnings.warn(f"the model's tokenizer ({type(tok).__name__}) normalises text in transformers "
                      f"({json.dumps(backend['normalizer'])[:80]}) and not in llama.cpp, so text not already in that "
                      "form (decomposed accents) tokenises differently in the GGUF.", stacklevel=4)
    vocab = tok.get_vocab()
    if max(vocab.values()) >= vocab_size:
        raise ExportError(f"the tokenizer has token id {max(vocab.values())}, beyond the model's vocab_size "
                          f"{vocab_size}; is this tokenizer the model's?")
    by_id = {i: t for t, i in vocab.items()}
    added = tok.added_tokens_decoder  # id -> AddedToken
    tokens, types = [], []
    for i in range(vocab_size):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    merges = [m if isinstance(m, str) else " ".join(m) for m in model.get("merges", [])]

    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre(pre)
    writer.add_token_list(tokens)
    writer.add_token_types(types)
    writer.add_token_merges(merges)
    _special_vocab(tok, hf_dir, len(tokens), llama_add_bos=pre in _PRE_ADDS_BOS).add_to_gguf(writer, quiet=True)
    return len(tokens)


def _pre_tokenizer(pre: dict | None, where: Path) -> str:
    """llama.cpp's `tokenizer.ggml.pre` for a tokenizer.json pre-tokenizer, or a clear error."""
    steps = pre.get("pretokenizers", []) if pre and pre.get("type") == "Sequence" else [pre] if pre else []
    kinds = [s.get("type") for s in steps]
    if kinds == ["ByteLevel"] and steps[0].get("use_regex", True) and not steps[0].get("add_prefix_space"):
        return "gpt-2"  # GPT-2's regex, which llama.cpp's 'gpt-2' pre-tokenizer applies
    if kinds == ["Split", "ByteLevel"] and not steps[1].get("use_regex", True):
        pattern = (steps[0].get("pattern") or {}).get("Regex")
        if pattern in _SPLIT_PRE:
            return _SPLIT_PRE[pattern]
    raise ExportError(f"{where}: pre-tokenizer {json.dumps(pre)[:200]} has no known llama.cpp equivalent; the "
                      "GGUF export knows GPT-2's, Qwen2's and Qwen3.5's byte-level BPE and SentencePiece-style BPE "
                      "with byte fallback. Export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py.")


def _add_llama_tokenizer(writer: gguf.GGUFWriter, hf_dir: Path, vocab_size: int) -> int:
    """Write a SentencePiece-style BPE tokenizer (byte fallback, spaces as '▁') as llama.cpp's 'llama' model,
    read with the gguf package's LlamaHfVocab and SpecialVocab; returns the number of tokens."""
    where = hf_dir / "tokenizer.json"
    try:
        vocab = gguf.LlamaHfVocab(hf_dir)
    except (FileNotFoundError, TypeError) as e:
        raise ExportError(f"{where} is a BPE tokenizer with byte fallback, but not Llama's SentencePiece kind "
                          f"({e}); export with --format hf and convert with llama.cpp's convert_hf_to_gguf.py.") from e
    tok = vocab.tokenizer
    backend = json.loads(tok.backend_tokenizer.to_str())  # the pipeline transformers runs, whatever the file says
    space_prefix = _spm_space_prefix(backend, where)

    ids = [i for i in range(vocab.vocab_size_base) if i not in vocab.added_tokens_ids]
    ids += [vocab.added_tokens_dict[t] for t in vocab.added_tokens_list]
    if max(ids) >= vocab_size:
        raise ExportError(f"the tokenizer has token id {max(ids)}, beyond the model's vocab_size {vocab_size}; "
                          "is this tokenizer the model's?")
    tokens = [f"[PAD{i}]" for i in range(vocab_size)]
    types = [_TT.UNUSED] * vocab_size
    for i, (text, _, kind) in zip(ids, vocab.all_tokens()):
        tokens[i] = text.decode("utf-8")
        types[i] = kind  # as llama.cpp's converter writes them (<unk> a CONTROL token, as the gguf package reads it)
    merges = [tuple(m.split(" ")) if isinstance(m, str) else tuple(m) for m in backend["model"].get("merges", [])]
    scores = _spm_scores(tokens, types, merges)
    _warn_missing_merges(tokens, types, merges, where)

    writer.add_tokenizer_model("llama")
    writer.add_tokenizer_pre("default")
    writer.add_token_list(tokens)
    writer.add_token_scores(scores)
    writer.add_token_types(types)
    if not space_prefix:  # llama.cpp's SentencePiece tokenizer prepends '▁' unless told not to (and its converter
        writer.add_add_space_prefix(False)  # writes the key only then)
    _special_vocab(tok, hf_dir, len(tokens), llama_add_bos=True).add_to_gguf(writer, quiet=True)
    return len(tokens)


def _spm_space_prefix(backend: dict, where: Path) -> bool:
    """Whether the tokenizer puts a '▁' before the text (llama.cpp's add_space_prefix); a clear error where its
    normalizer or pre-tokenizer does something llama.cpp's SentencePiece tokenizer does not."""
    norm, pre = backend.get("normalizer"), backend.get("pre_tokenizer")
    steps = norm.get("normalizers", []) if norm and norm.get("type") == "Sequence" else [norm] if norm else []
    prepend = replace = False
    for step in steps:
        if step.get("type") == "Prepend" and step.get("prepend") == _SPACE:
            prepend = True
        elif step.get("type") == "Replace" and step.get("pattern") == {"String": " "} and step.get("content") == _SPACE:
            replace = True
        else:
            raise ExportError(f"{where}: normalizer step {json.dumps(step)[:200]} has no llama.cpp equivalent (its "
                              "SentencePiece tokenizer only writes spaces as '▁' and prepends one); export with "
                              "--format hf and convert with llama.cpp's convert_hf_to_gguf.py.")
    if pre is not None:
        if pre.get("type") != "Metaspace" or pre.get("replacement") != _SPACE or pre.get("split", True) or steps:
            raise ExportError(f"{where}: pre-tokenizer {json.dumps(pre)[:200]} has no llama.cpp equivalent (its "
                              "SentencePiece tokenizer does not split text; it takes Metaspace(split=false) or the "
                              "Prepend/Replace normalizer); export with --format hf and convert with llama.cpp's "
                              "convert_hf_to_gguf.py.")
        replace = True
        scheme = pre.get("prepend_scheme") or ("always" if pre.get("add_prefix_space", True) else "never")
        prepend = scheme != "never"
        if prepend:
            after_special = ""
            if scheme == "first":
                after_special = " or follows a special token (prepend_scheme 'first', legacy=False)"
            warnings.warn(f"{where}: transformers' Metaspace pre-tokenizer puts no '▁' before text that starts with "
                          f"a space{after_special}; llama.cpp does, so such prompts tokenise differently in the GGUF.",
                          stacklevel=5)
    if not replace:
        raise ExportError(f"{where}: this byte-fallback BPE does not write spaces as '▁', which llama.cpp's "
                          "SentencePiece tokenizer always does; export with --format hf and convert with llama.cpp's "
                          "convert_hf_to_gguf.py.")
    return prepend


def _spm_scores(tokens: list[str], types: list[gguf.TokenType], merges: list[tuple[str, ...]]) -> list[float]:
    """SentencePiece scores from BPE merge ranks: a piece scores minus the rank of the first merge that makes
    it (llama.cpp joins the highest-scoring pair first, as BPE joins the lowest rank); a normal piece no merge
    makes scores below all of them, as SentencePiece ranks single characters; other tokens score 0."""
    made: dict[str, int] = {}
    for rank, pair in enumerate(merges):
        made.setdefault("".join(pair), rank)
    return [0.0 if kind != _TT.NORMAL else -float(made[t]) if t in made else -float(len(merges) + i)
            for i, (t, kind) in enumerate(zip(tokens, types))]


def _warn_missing_merges(tokens: list[str], types: list[gguf.TokenType], merges: list[tuple[str, ...]],
                         where: Path) -> None:
    """Warn where llama.cpp could join two pieces into a third that the tokenizer's merges never join that way
    (a BPE trained without SentencePiece): it may then tokenise some text differently from transformers."""
    normal = {t for t, kind in zip(tokens, types) if kind == _TT.NORMAL}
    pairs = set(merges)
    missing = [(t[:k], t[k:]) for t in normal for k in range(1, len(t))
               if t[:k] in normal and t[k:] in normal and (t[:k], t[k:]) not in pairs]
    if missing:
        shown = ", ".join(f"{a!r}+{b!r}" for a, b in sorted(missing)[:3])
        more = " …" if len(missing) > 3 else ""
        warnings.warn(f"{where}: {len(missing)} pairs of pieces join into a piece with no merge of that pair "
                      f"({shown}{more}); llama.cpp's SentencePiece tokenizer joins them, so it may tokenise some "
                      "text differently. Tokenizers converted from SentencePiece have every such merge.",
                      stacklevel=5)


def _special_vocab(tok, hf_dir: Path, n_vocab: int, llama_add_bos: bool) -> gguf.SpecialVocab:
    """The gguf package's special tokens, BOS/EOS policy and chat template, as llama.cpp's converter reads them from
    the folder, corrected to what the loaded tokenizer does (which is what transformers runs) where they differ:
    the ids of bos / eos / unk / pad, and add_bos / add_eos where the converter's value (or, when it writes none,
    llama.cpp's default for the tokenizer model: `llama_add_bos`, no EOS) would give another policy."""
    quiet = logging.getLogger("gguf.vocab")
    level = quiet.level
    quiet.setLevel(logging.ERROR)  # it warns about Llama's ordinary `<s> $A <s> $B` pair template
    try:
        special = gguf.SpecialVocab(hf_dir, n_vocab=n_vocab)
    finally:
        quiet.setLevel(level)
    for kind in ("bos", "eos", "unk", "pad"):
        token_id = getattr(tok, f"{kind}_token_id")
        if token_id is not None:
            special.special_token_ids[kind] = int(token_id)
    probe = tok("a")["input_ids"]
    adds = {"bos": tok.bos_token_id is not None and probe[:1] == [tok.bos_token_id],
            "eos": tok.eos_token_id is not None and probe[-1:] == [tok.eos_token_id]}
    for kind, default in (("bos", llama_add_bos), ("eos", False)):
        if special.add_special_token.get(kind, default) != adds[kind]:
            special.add_special_token[kind] = adds[kind]
    if special.chat_template is None and tok.chat_template:
        template = tok.chat_template
        special.chat_template = ([{"name": k, "template": v} for k, v in template.items()]
                                 if isinstance(template, dict) else template)
    return special
