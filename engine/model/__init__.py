"""What is loaded and frozen: the base model, its experts in NF4 (or bf16), and where they live.

- `arch/`: one module per MoE family (where the MoE blocks, routers and experts are, checkpoint names, llama.cpp
  names); `get_family(model_type)`, `FAMILIES`. Adding a family = one file there + its published config + a test.
- `hf_checkpoint`: reading a local HF checkpoint folder (config.json and family, weight files, tensors one at a
  time with or without a memory map, the base model's identity).
- `loader`: the checkpoint into transformers' module tree (`load_model`, `load_tokenizer`).
- `stores`: the NF4 / dense expert stores of one MoE layer; `store_files`: their checksummed files.
- `expert_cache`: the on-disk cache of quantised experts; `streaming`: quantising while the checkpoint streams.
- `linear4bit`: QLoRA-style NF4 for the other frozen linear layers.
- `expert_bank`: the module that replaces a family's experts and computes only the routed (token, expert) pairs,
  grouped by expert (`grouped`: the grouped matrix products); per-expert adapter banks are handed to it by
  `engine.adapters` (it never imports them).
- `host_arena`: a layer's experts in host memory as one exact arena, expert after expert, page-locked with
  cudaHostRegister (what the planner counts as pinned); the host stores the cache copies from.
- `offload`: experts beyond the GPU budget behind a GPU cache (one buffer of slots), the layer schedule.
- `tiny`: random-weight checkpoints of the real architectures, for tests and the demo.

Nothing here imports engine.adapters, engine.training or engine.runs: those build on this package.
"""

from .arch import FAMILIES, ExpertKey, Family, MoEFacts, UnsupportedModelError, get_family
from .expert_bank import ExpertBank
from .expert_cache import cache_folder, default_cache_dir, load_cached_experts
from .hf_checkpoint import (
    CheckpointError, base_identity, check_checkpoint, checkpoint_files, iter_tensors, read_config, read_tensors,
)
from .linear4bit import is_quantizable_linear, quantize_linear_layers
from .loader import LoadedModel, load_model, load_tokenizer
from .offload import ExpertCache, OffloadSchedule, offload_banks
from .store_files import QuantCacheError
from .stores import DenseExpertStore, NF4ExpertStore, expert_store, nf4_expert_nbytes, nf4_nbytes, quantized_nbytes
from .streaming import quantize_checkpoint_experts
from .tiny import build_tokenizer, make_tiny_model, tiny_config

__all__ = ["FAMILIES", "CheckpointError", "DenseExpertStore", "ExpertBank", "ExpertCache", "ExpertKey", "Family",
           "LoadedModel", "MoEFacts", "NF4ExpertStore", "OffloadSchedule", "QuantCacheError", "UnsupportedModelError",
           "base_identity", "build_tokenizer", "cache_folder", "check_checkpoint", "checkpoint_files",
           "default_cache_dir", "expert_store", "get_family", "is_quantizable_linear", "iter_tensors",
           "load_cached_experts", "load_model", "load_tokenizer", "make_tiny_model", "nf4_expert_nbytes", "nf4_nbytes",
           "offload_banks", "quantize_checkpoint_experts", "quantize_linear_layers", "quantized_nbytes",
           "read_config", "read_tensors", "tiny_config"]
