"""Attach a routing strategy to a loaded model: expert banks in every MoE layer, adapters in the
selected ones, router taps for statistics and balance losses; freeze the rest; account."""

from __future__ import annotations

import contextlib
from collections import defaultdict

import torch
from torch import nn

from .banks import AdapterBank, LoraLinear
from ..model.arch import decoder_layers
from ..config import Config
from ..model import ExpertBank, LoadedModel, expert_store
from .balance import CURRENT_SCALE, BalanceTerm
from .strategies import ParallelAdapters, RoutedAdapters, RouterTap, add_block_output

class RoutedPEFT:
    """A model with Routed-PEFT attached: its trainable parameters, losses, statistics and accounting."""

    def __init__(self, loaded: LoadedModel, cfg: Config):
        self.loaded, self.cfg = loaded, cfg
        self.model, self.family = loaded.model, loaded.family
        self.facts = self.family.facts(self.model.config)
        #: the experts' gated activation when it is not act(gate)·up (gated adapters take the same form)
        self.glu = self.family.expert_glu(self.model.config)
        self.base_params = sum(p.numel() for p in self.model.parameters())
        self.layers = cfg.layer_indices(self.facts.moe_layers)
        self.taps: dict[int, RouterTap] = {}
        self.routed: dict[int, RoutedAdapters] = {}
        self.banks: dict[int, ExpertBank] = {}
        r = cfg.routing
        #: the balance losses (engine.adapters.balance), one per router group, None where its coefficient is 0
        self.balance: dict[str, BalanceTerm | None] = {
            "routed": BalanceTerm(r.num_adapters, r.top_k, r.balance_loss)
            if r.strategy == "routed" and r.balance_loss > 0 else None,
            "base": BalanceTerm(self.facts.num_experts, self.facts.top_k, r.base_balance_loss)
            if r.base_balance_loss > 0 else None}
        self._hooks: list = []
        #: trained MoE routers: (parameter, its base weights), so `disabled()` can give the base model back
        self._base_routers: dict[int, tuple[nn.Parameter, torch.Tensor]] = {}
        #: trainable parameter count by group ("embedded", "attention", "router", …) and by layer
        self.groups: dict[str, int] = defaultdict(int)
        self.by_layer: dict[int, int] = defaultdict(int)
        self._attach()

    # ---- building -------------------------------------------------------------------------------
    def _bank(self, num: int, d_in: int, d_out: int, kind: str | None = None) -> AdapterBank:
        a = self.cfg.adapter
        return AdapterBank(kind or a.kind, num, d_in, d_out, a.rank, a.alpha, a.dropout, self.facts.activation,
                           glu=self.glu, init=a.init)

    def _router_std(self) -> float | None:
        """The routed strategy's router init: `perft` as the paper's code leaves it (its `shared_routing_adapter_gate`
        is not re-drawn by init_trainable_parameters, so from_pretrained's `_init_weights` gives it
        N(0, config.initializer_range), 0.02 for OLMoE and Mixtral); kaiming: None (N(0, 1/d_in))."""
        if self.cfg.adapter.init != "perft":
            return None
        return float(getattr(self.model.config, "initializer_range", None) or 0.02)

    def _attach(self) -> None:
        r, a, f = self.cfg.routing, self.cfg.adapter, self.facts
        for p in self.model.parameters():
            p.requires_grad_(False)
        H, I, E = f.hidden_size, f.expert_intermediate_size, f.num_experts
        selected = set(self.layers)
        for layer, block in self.family.moe_blocks(self.model):
            streamed = self.loaded.expert_stores
            store = streamed[layer] if streamed else expert_store(self.family.experts(block), self.cfg.model.quant,
                                                                 self.family.canonical_experts(block))
            bias = self.family.expert_biases(block)
            parallel = inside = None
            if layer in selected and r.strategy == "embedded":
                if a.placement == "inside":
                    inside = {"gate": self._bank(E, H, I, "lora"), "up": self._bank(E, H, I, "lora"),
                              "down": self._bank(E, I, H, "lora")}
                else:
                    parallel = self._bank(E, H, H)
            bank = ExpertBank(store, f.activation, H, I, parallel=parallel, inside=inside,
                              backend=self.cfg.model.expert_backend, glu=self.glu, bias=bias)
            block.experts = bank
            self.banks[layer] = bank
            if layer in selected and r.strategy in ("shared", "dense", "routed"):
                num = 1 if r.strategy == "shared" else r.num_adapters
                if r.strategy == "routed":
                    module = RoutedAdapters(self._bank(num, H, H), r.top_k, r.renormalize, self.balance["routed"],
                                            router_std=self._router_std())
                    self.routed[layer] = module
                else:
                    module = ParallelAdapters(self._bank(num, H, H))
                block.peft = module
                self._hooks.append(block.register_forward_hook(add_block_output(module)))
            router = self.family.router(block)
            tap = RouterTap(E, self.balance["base"] if layer in selected else None, self.family.router_probs,
                            own_choice=self.family.router_scoring != "softmax")
            self.taps[layer] = tap
            self._hooks.append(router.register_forward_hook(tap))
            if r.train_router and layer in selected:
                router.weight.requires_grad_(True)
                self._base_routers[layer] = (router.weight, router.weight.detach().clone())
                self._count("router", layer, router.weight.numel())
            trainable = sum(p.numel() for p in bank.parameters()) + sum(
                p.numel() for p in getattr(block, "peft", nn.Module()).parameters())
            if trainable:
                self._count(r.strategy, layer, trainable)
        if r.attention_lora:
            attn_layers = range(f.num_layers) if r.layers == "all" else self.layers
            for i in attn_layers:
                # hybrid models (Qwen3.5): linear-attention layers have no self_attn, so no attention LoRA
                attn = getattr(decoder_layers(self.model)[i], "self_attn", None)
                for name in self.family.attention_modules(attn):
                    wrapped = LoraLinear(getattr(attn, name), a.rank, a.alpha, a.dropout)
                    setattr(attn, name, wrapped)
                    self._count("attention", i, wrapped.lora.num_params())
        # adapters are fp32 master weights on the model's device (bf16 would swallow small updates: at lr 1e-5
        # a bf16 weight of 0.01 does not move); they compute in the activations' dtype
        device = next((p.device for p in self.model.parameters() if p.device.type != "meta"), torch.device("cpu"))
        for module in self.model.modules():
            if isinstance(module, (AdapterBank, RoutedAdapters)):
                module.to(device=device, dtype=torch.float32)

    def _count(self, group: str, layer: int, n: int) -> None:
        self.groups[group] += n
        self.by_layer[layer] += n

    @contextlib.contextmanager
    def disabled(self):
        """Within the block the model is the base model again (every adapter adds exactly zero, trained
        routers hold their base weights), e.g. to answer as the base beside the adapter in one process."""
        banks = [m for m in self.model.modules() if isinstance(m, AdapterBank)]
        scales = [b.scale for b in banks]
        trained = {layer: p.detach().clone() for layer, (p, _) in self._base_routers.items()}
        try:
            for b in banks:
                b.scale = 0.0
            with torch.no_grad():
                for p, base in self._base_routers.values():
                    p.copy_(base)
            yield self
        finally:
            for b, scale in zip(banks, scales):
                b.scale = scale
            with torch.no_grad():
                for layer, (p, _) in self._base_routers.items():
                    p.copy_(trained[layer])

    # ---- training interface -----------------------------------------------------------------------
    def trainable_parameters(self) -> list[tuple[str, nn.Parameter]]:
        """(name, parameter) of everything that trains, in a stable order."""
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def adapter_state_dict(self) -> dict[str, torch.Tensor]:
        """The trainable tensors, by their names in the model."""
        return {n: p.detach() for n, p in self.trainable_parameters()}

    # ---- balance losses (engine.adapters.balance) ---------------------------------------------------------
    @property
    def balance_terms(self) -> list[BalanceTerm]:
        return [t for t in self.balance.values() if t is not None]

    @property
    def balance_scale(self) -> int:
        """The balance losses' scale version (engine.adapters.balance.SCALES), recorded in every checkpoint."""
        terms = self.balance_terms
        return terms[0].scale if terms else CURRENT_SCALE

    def set_balance_scale(self, scale: int) -> None:
        """Train on an older scale (a run resumed from a checkpoint written with it)."""
        for t in self.balance_terms:
            t.scale = scale

    def balance_begin(self, attention_mask: torch.Tensor | None, totals: list | None = None) -> None:
        """Before one micro-batch's forward (or one layer's recompute): the routers record from here on, pads left
        out through `attention_mask` [batch, seq]; `totals` (one per term, from `balance_counted` summed over the
        layers and ranks) fixes the counts the loss uses, for a layer-major recompute of one layer."""
        mask = None if attention_mask is None else attention_mask.reshape(-1).bool()
        for i, t in enumerate(self.balance_terms):
            t.clear()
            t.mask, t.armed = mask, True
            t.totals = totals[i] if totals is not None and i < len(totals) else None

    def balance_counted(self) -> list:
        """Per term, this rank's [counts..., tokens] recorded since `balance_begin` (then cleared)."""
        return [t.counted() for t in self.balance_terms]

    def aux_loss(self) -> torch.Tensor | None:
        """Sum of the balance losses recorded since the last call (then cleared); None when there are none. The
        routers keep recording as armed (a checkpointed layer's recompute in backward repeats its forward's
        operations) until `clear_losses` or the next `balance_begin`."""
        losses = [loss for t in self.balance_terms if (loss := t.loss()) is not None]
        return torch.stack([loss.reshape(()) for loss in losses]).sum() if losses else None

    def clear_losses(self) -> None:
        """Drop recorded balance statistics and stop recording (e.g. before a forward, so recomputation cannot
        double them)."""
        for t in self.balance_terms:
            t.clear()
            t.mask, t.totals, t.armed = None, None, False

    def routing_stats(self) -> dict[int, dict[str, list[int]]]:
        """Per MoE layer: tokens each expert (and each routed adapter) received in the last forward."""
        counted = [layer for layer, tap in self.taps.items() if tap.last_counts is not None]
        # the taps' counts stay on the device: all layers read back in one copy (one sync, not one per layer)
        rows = torch.stack([self.taps[l].last_counts for l in counted]).tolist() if counted else []
        experts = dict(zip(counted, rows))
        stats = {}
        for layer in self.taps:
            entry = {"experts": experts.get(layer, [])}
            if layer in self.routed and self.routed[layer].last_counts is not None:
                entry["adapters"] = self.routed[layer].last_counts.tolist()  # host counts (sort_by_group's)
            stats[layer] = entry
        return stats

    def activated_params(self) -> int:
        """Activated adapter parameters per token: the trainable parameters one token's forward uses, summed over
        the layers. shared / dense: all their adapters; routed: top_k of its N adapters + its router (every logit
        is computed); embedded: the adapters of the MoE's top_k experts (parallel: one adapter each; inside: the
        LoRA on their gate, up and down); attention LoRA and a trained MoE router: all of them."""
        k = self.facts.top_k
        n = sum(p.numel() for m in self.model.modules() if isinstance(m, LoraLinear) for p in m.lora.parameters())
        n += sum(p.numel() for p, _ in self._base_routers.values())
        for bank in self.banks.values():
            for b in ([bank.parallel] if bank.parallel is not None else []) + list((bank.inside or {}).values()):
                n += k * b.num_params() // b.num
        for _, block in self.family.moe_blocks(self.model):
            module = getattr(block, "peft", None)
            if isinstance(module, RoutedAdapters):
                n += module.top_k * module.bank.num_params() // module.bank.num + module.router.weight.numel()
            elif module is not None:
                n += module.bank.num_params()
        return n

    def parameter_report(self) -> dict:
        """Trainable parameters as a count and a percentage of the base model, by strategy and by layer, and the
        activated adapter parameters per token (`activated_params`)."""
        trainable = sum(p.numel() for _, p in self.trainable_parameters())
        return {"trainable": trainable, "activated": self.activated_params(), "base": self.base_params,
                "percent": 100.0 * trainable / self.base_params,
                "by_group": dict(self.groups), "by_layer": {int(k): v for k, v in sorted(self.by_layer.items())}}


def attach(loaded: LoadedModel, cfg: Config) -> RoutedPEFT:
    """Attach the config's routing strategy and adapters to a loaded model (in place)."""
    return RoutedPEFT(loaded, cfg)
