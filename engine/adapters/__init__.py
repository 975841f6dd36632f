"""What is trained. Routed-PEFT: the four routing strategies (shared, dense, routed, embedded) of LoRA,
bottleneck and gated adapters, attached to a loaded MoE model; plus attention LoRA, the baseline.

- `banks`: `AdapterBank`, N adapters of one kind batched over experts (one, grouped, or paired forward);
  `LoraLinear` for attention LoRA.
- `strategies`: the parallel and routed modules beside an MoE block, the router tap.
- `balance`: the balance losses on transformers' scale (`BalanceTerm`), data parallel exact; old runs' scale.
- `attach`: `attach(loaded, cfg)` -> `RoutedPEFT`, the adapters placed on a loaded model (the embedded strategy's
  banks go into the expert bank of engine.model).
- `files`: `adapter.safetensors` + `moetune.json` (with the adapter's SHA-256): save, read, load onto a model.
"""

from .attach import RoutedPEFT, attach
from .files import AdapterMismatchError, load_adapter, read_adapter_tensors, read_meta, save_adapter
from .balance import balance_loss

__all__ = ["AdapterMismatchError", "RoutedPEFT", "attach", "balance_loss", "load_adapter", "read_adapter_tensors",
           "read_meta", "save_adapter"]
