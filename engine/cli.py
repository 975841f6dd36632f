"""`moetune` command line. Each subcommand is a small function registered in `COMMANDS`;
heavy imports happen inside the command, so `moetune --help` is instant."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Callable

from .config import ConfigError


def cmd_models(args) -> int:
    """List the supported model families and their MoE facts (from each flagship's published config)."""
    from .arch import FAMILIES, NF4_BITS

    rows = []
    for fam in FAMILIES.values():
        f = fam.facts(fam.published_config())
        rows.append({"model_type": fam.model_type, "title": fam.title, "examples": list(fam.examples),
                     "flagship": fam.published, "moe_layers": len(f.moe_layers), "experts": f.num_experts,
                     "top_k": f.top_k, "expert_intermediate_size": f.expert_intermediate_size,
                     "gates_renormalised": f.norm_topk_prob, "activation": f.activation,
                     "shared_expert_intermediate_size": f.shared_expert_intermediate_size,
                     "experts_nf4_gb": round(f.expert_params * NF4_BITS / 8 / 1e9, 2),
                     "checkpoint_expert_names": fam.expert_key_template.replace("{proj}", "|".join(fam.proj_names)),
                     "gguf_arch": fam.gguf_arch})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        shared = f"shared expert {r['shared_expert_intermediate_size']}" if r["shared_expert_intermediate_size"] else "no shared expert"
        print(f"{r['model_type']:<10} {r['title']}  (e.g. {', '.join(r['examples'])})")
        print(f"{'':<10} {r['flagship']}: {r['moe_layers']} MoE layers x {r['experts']} experts, top-{r['top_k']}, "
              f"{r['activation']}, gates renormalised: {'yes' if r['gates_renormalised'] else 'no'}, {shared}; "
              f"experts in NF4: {r['experts_nf4_gb']} GB")
        print(f"{'':<10} experts on disk: {r['checkpoint_expert_names']}; llama.cpp arch: {r['gguf_arch']}")
    return 0


def cmd_tiny_model(args) -> int:
    """Write a random-weight checkpoint of a real architecture, with tokenizer."""
    from .tiny import make_tiny_model

    out = make_tiny_model(args.family, args.out, layers=args.layers, hidden=args.hidden, experts=args.experts,
                          top_k=args.top_k, seed=args.seed)
    print(f"wrote a tiny {args.family} checkpoint to {out}")
    return 0


def cmd_ui(args) -> int:
    """Start the local app."""
    print("The MoETune app is not built yet: it lands with the Gradio-app issue. "
          "Meanwhile the command line works: `moetune models`, `moetune tiny-model`.")
    return 0


def _add_models(sub):
    p = sub.add_parser("models", help="supported families and their MoE facts")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _add_tiny_model(sub):
    from .arch import FAMILIES

    p = sub.add_parser("tiny-model", help="a random-weight checkpoint of a real architecture, with tokenizer")
    p.add_argument("--family", required=True, choices=sorted(FAMILIES))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    return p


def _add_ui(sub):
    p = sub.add_parser("ui", help="start the local app")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=7860)
    return p


#: name -> (parser builder, handler)
COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "models": (_add_models, cmd_models),
    "tiny-model": (_add_tiny_model, cmd_tiny_model),
    "ui": (_add_ui, cmd_ui),
}


def build_parser() -> argparse.ArgumentParser:
    """The argument parser with every registered subcommand."""
    parser = argparse.ArgumentParser(prog="moetune", description="Fine-tune MoE LLMs with routed adapters.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (add, handler) in COMMANDS.items():
        add(sub).set_defaults(handler=handler)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Entry point of the `moetune` console script."""
    args = build_parser().parse_args(argv)
    try:
        return int(args.handler(args) or 0)
    except (ConfigError, ValueError, FileNotFoundError) as e:
        print(f"moetune {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moetune {args.command}: stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
