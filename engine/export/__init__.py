"""Export a fine-tune in formats other tools run: a merged HF checkpoint, PEFT-layout adapters, GGUF."""

from __future__ import annotations

from .gguf import GGUF_DTYPES, ExportError, write_gguf

__all__ = ["GGUF_DTYPES", "ExportError", "write_gguf"]
