"""Run one of llama.cpp's converters (convert_hf_to_gguf.py, convert_lora_to_gguf.py) as a script:

    python tests/llama_convert.py PRE_TOKENIZER CONVERTER.py ARGS... [--then CONVERTER.py ARGS...]...

Why not run the converter directly: it names a byte-level BPE tokenizer's pre-tokenizer by hashing the
tokenization of a probe text against the hub tokenizers it knows (`TextModel.get_vocab_base_pre`), and the
tiny test models' locally trained tokenizer is none of them, so it raises "BPE pre-tokenizer was not
recognized". This runner answers that one method with the name the caller gives -- the one MoETune's own
GGUF writer picks for the same tokenizer.json (engine/export/gguf.py) -- and runs the converter unchanged.
Likewise its ERNIE-4.5 class reads a tokenizer only from a SentencePiece `tokenizer.model`, which the hub's
release ships and the tiny models (tokenizer.json only) lack: for a folder without one, the runner lets it read
the tokenizer as the converter's base class does (the tensors and hyperparameters are the converter's own).
It is run as a subprocess (its gguf-py must not meet the installed gguf in one interpreter); `--then` runs
further converters in the same interpreter, which saves importing torch and transformers again.
"""

from __future__ import annotations

import os
import runpy
import sys
from pathlib import Path


def main() -> None:
    pre, *rest = sys.argv[1:]
    jobs = [[]]
    for arg in rest:
        if arg == "--then":
            jobs.append([])
        else:
            jobs[-1].append(arg)
    script_dir = Path(jobs[0][0]).resolve().parent
    sys.path.insert(0, str(script_dir))  # its `conversion` package, as when the script runs itself
    if "NO_LOCAL_GGUF" not in os.environ:
        sys.path.insert(1, str(script_dir / "gguf-py"))
    import conversion.base

    conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: pre
    import conversion.ernie

    sentencepiece_only = conversion.ernie.Ernie4_5Model.set_vocab

    def ernie_vocab(self):
        if (self.dir_model / "tokenizer.model").is_file():
            return sentencepiece_only(self)
        return conversion.base.TextModel.set_vocab(self)

    conversion.ernie.Ernie4_5Model.set_vocab = ernie_vocab
    for script, *args in jobs:
        sys.argv = [str(script), *args]
        runpy.run_path(str(script), run_name="__main__")


if __name__ == "__main__":
    main()
