"""Routed-PEFT: the four routing strategies (shared, dense, routed, embedded) of LoRA, bottleneck
and gated adapters, attached to a loaded MoE model; plus attention LoRA, the baseline."""

from .attach import RoutedPEFT, attach
from .persist import AdapterMismatchError, load_adapter, read_adapter_tensors, read_meta, save_adapter
from .strategies import balance_loss

__all__ = ["AdapterMismatchError", "RoutedPEFT", "attach", "balance_loss", "load_adapter", "read_adapter_tensors",
           "read_meta", "save_adapter"]
