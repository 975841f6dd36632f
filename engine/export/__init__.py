"""Export a fine-tune in formats other tools run: a merged HF checkpoint, PEFT-layout adapters, GGUF, and a
llama.cpp LoRA adapter GGUF.

`export_run(run_dir, fmt, dtype, out_dir)` is the one entry point (`moetune export` calls it).

Files: `run` (the entry point and its report), `source` (a finished run opened for export), `merge` (merged HF
checkpoint), `peft_lora`, `gguf` + `gguf_tokenizer` (GGUF file and its tokenizer metadata), `gguf_lora`, `check`
(logit difference in transformers), `llama_check` + `llama_child` (llama.cpp run in a child process), `errors`.
"""

from __future__ import annotations

from .gguf import GGUF_DTYPES, write_gguf
from .errors import ExportError
from .gguf_lora import write_gguf_lora
from .run import DTYPES, FORMATS, REPORT_FILE, export_run

__all__ = ["DTYPES", "FORMATS", "GGUF_DTYPES", "REPORT_FILE", "ExportError", "export_run", "write_gguf",
           "write_gguf_lora"]
