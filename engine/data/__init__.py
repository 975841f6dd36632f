"""Datasets for training: files in the formats people bring, prompt templates, tokenization with
loss on the response only, the cut-off with counts, batching and packing, and the dataset registry.

Entry points: `load_examples(spec, tokenizer, template, max_len)` -> (examples, stats),
`make_batches(examples, micro_batch, seed)` -> index batches, `collate(examples, pad_id)` -> tensors.

Files: `formats` (reading rows), `templates` (prompts), `encode` (tokens, labels, cut-off), `batching`, `registry`
(named datasets), `errors`, `synthetic` (random-token batches and tiny tasks for tests and benchmarks).
"""

from .batching import Packed, collate, make_batches, pack_examples
from .encode import IGNORE_INDEX, Example, encode_records, load_examples
from .errors import DataError
from .formats import FORMATS, Record, Row, detect_format, read_records, read_rows, to_record
from .registry import DEFAULT_REGISTRY, DatasetSpec, list_datasets, load_registry, registry_path, resolve_dataset
from .templates import (
    TEMPLATES, alpaca_prompt, check_template, generation_prompt, record_messages, render, render_chat,
)

__all__ = ["DEFAULT_REGISTRY", "FORMATS", "IGNORE_INDEX", "TEMPLATES", "DataError", "DatasetSpec", "Example", "Packed",
           "Record", "Row", "alpaca_prompt", "check_template", "collate", "detect_format", "encode_records",
           "generation_prompt", "list_datasets", "load_examples", "load_registry", "make_batches", "pack_examples",
           "read_records", "read_rows", "record_messages", "registry_path", "render", "render_chat",
           "resolve_dataset", "to_record"]
