"""`moetune` command line. Each subcommand is a small function registered in `COMMANDS`;
heavy imports happen inside the command, so `moetune --help` is instant."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from pathlib import Path
from typing import Callable

from .config import ConfigError
from .io import NoSpaceError, is_no_space, no_space


def cmd_models(args) -> int:
    """List the supported model families and their MoE facts (from each flagship's published config)."""
    from .model.arch import FAMILIES, NF4_BITS

    rows = []
    for fam in FAMILIES.values():
        cfg = fam.published_config()
        f, glu = fam.facts(cfg), fam.expert_glu(cfg)
        rows.append({"model_type": fam.model_type, "title": fam.title, "examples": list(fam.examples),
                     "flagship": fam.published, "moe_layers": len(f.moe_layers), "experts": f.num_experts,
                     "top_k": f.top_k, "expert_intermediate_size": f.expert_intermediate_size,
                     "gates_renormalised": f.norm_topk_prob, "activation": f.activation if glu is None else repr(glu),
                     "shared_expert_intermediate_size": f.shared_expert_intermediate_size,
                     "experts_nf4_gb": round(f.expert_params * NF4_BITS / 8 / 1e9, 2),
                     "checkpoint_expert_names": fam.hub_expert_names or
                     fam.expert_key_template.replace("{proj}", "|".join(fam.proj_names)),
                     "gguf_arch": fam.gguf_arch, "gguf_missing": fam.gguf_missing, "router": fam.router_note(fam.published_config())})
    if args.json:
        print(json.dumps(rows, indent=2))
        return 0
    for r in rows:
        shared = f"shared expert {r['shared_expert_intermediate_size']}" if r["shared_expert_intermediate_size"] else "no shared expert"
        print(f"{r['model_type']:<10} {r['title']}  (e.g. {', '.join(r['examples'])})")
        print(f"{'':<10} {r['flagship']}: {r['moe_layers']} MoE layers x {r['experts']} experts, top-{r['top_k']}, "
              f"{r['activation']}, gates renormalised: {'yes' if r['gates_renormalised'] else 'no'}, {shared}; "
              f"experts in NF4: {r['experts_nf4_gb']} GB")
        gguf = " (MoETune writes no GGUF of it yet: `moetune export` says why)" if r["gguf_missing"] else ""
        print(f"{'':<10} experts on disk: {r['checkpoint_expert_names']}; llama.cpp arch: {r['gguf_arch']}{gguf}")
    return 0


def cmd_tiny_model(args) -> int:
    """Write a random-weight checkpoint of a real architecture, with tokenizer."""
    from .model import make_tiny_model

    out = make_tiny_model(args.family, args.out, layers=args.layers, hidden=args.hidden, experts=args.experts,
                          top_k=args.top_k, seed=args.seed, tokenizer=args.tokenizer)
    print(f"wrote a tiny {args.family} checkpoint to {out}")
    return 0


def cmd_train(args) -> int:
    """Train (or resume) a run from a YAML config."""
    from . import config as C
    from .preflight import preflight
    from .training import train
    from .training.collectives import launch_local

    # everything checked before anything loads or the run folder exists: one error here, not one per rank
    cfg = preflight(C.load(args.config, args.set), gpus=args.gpus)
    out = args.out or str(Path("runs") / (Path(args.config).stem))
    launch_local(args.gpus, ["train", args.config, *[a for s in args.set for a in ("--set", s)], "--out", out,
                             *(["--resume"] if args.resume else [])])  # --gpus N: torchrun takes over
    summary = train(cfg, out, resume=args.resume)
    print(json.dumps(summary))
    return 0


def _add_train(sub):
    p = sub.add_parser("train", help="train routed adapters from a YAML config")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a field")
    p.add_argument("--out", help="run folder (default: runs/<config name>)")
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its last checkpoint")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="train data-parallel on N GPUs of this machine (starts torchrun; gloo on the CPU without "
                        "GPUs); under torchrun or accelerate launch, leave it out")
    return p


def cmd_sweep(args) -> int:
    """Short trainings of several candidates at matched trainable parameters; print the table (or JSON)."""
    from .sweep import SWEEP_FILE, run_sweep
    from .sweep_results import table

    out = args.out or str(Path("runs") / f"sweep-{Path(args.config).stem}")
    seeds = [int(s) for s in args.seeds.split(",") if s.strip()] if args.seeds else None
    result = run_sweep(args.config, args.try_, out, listed=args.candidate, seeds=seeds, params=args.params,
                       max_steps=args.max_steps, sets=args.set, echo=not args.json, grid=args.lr_grid,
                       match=args.match)
    print(json.dumps(result, indent=2) if args.json else f"{table(result)}\n({Path(out) / SWEEP_FILE})")
    return 0 if result["status"] == "done" else 130 if result["status"] == "stopped" else 1


def _add_sweep(sub):
    p = sub.add_parser("sweep", help="compare routing configurations at matched parameters, each at its best lr",
                       description="Candidates: every --candidate (or the base config) x the cross product of "
                                   "--try x --seeds. Each is a run folder OUT/NAME; a rerun skips finished ones. "
                                   "The table shows each candidate's trainable parameters and its activated adapter "
                                   "parameters per token: the adapter parameters one token's forward uses (shared: "
                                   "all of its adapter; dense: all N; routed, top-k of N: k adapters + its router; "
                                   "embedded: the adapters of the MoE's top-k experts, inside: their gate/up/down "
                                   "LoRA; attention LoRA: all of it).")
    p.add_argument("config", help="base YAML config")
    p.add_argument("--try", dest="try_", action="append", default=[], metavar="SECTION.KEY=V1,V2,...",
                   help="values to try for one field (the candidates are the cross product)")
    p.add_argument("--candidate", action="append", default=[], metavar="'[NAME:] KEY=V KEY=V'",
                   help="one listed candidate: overrides separated by spaces, optionally named")
    p.add_argument("--seeds", default=None, metavar="0,1,2", help="train every candidate with each seed")
    p.add_argument("--params", type=int, default=None,
                   help="parameters to match within 10%% (trainable, or activated per token with --match activated; "
                        "default: the base config's count)")
    p.add_argument("--match", choices=("trainable", "activated"), default="trainable",
                   help="match each candidate's rank by its trainable parameters (default) or by its activated "
                        "adapter parameters per token")
    p.add_argument("--lr-grid", default=None, metavar="1e-4,3e-4,1e-3",
                   help="train each candidate once per lr (its first seed) and run its seeds at the lr with the lowest "
                        "held-out loss (data.eval); the same as --try train.lr=...")
    p.add_argument("--max-steps", type=int, default=None, help="optimizer steps of each training (sets epochs to null)")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a base field")
    p.add_argument("--out", help="sweep folder (default: runs/sweep-<config name>)")
    p.add_argument("--json", action="store_true", help="print sweep.json instead of the table")
    return p


#: exit status of `moetune plan` when the budget cannot work (2 is a usage or config error)
PLAN_DOES_NOT_FIT = 3


def cmd_plan(args) -> int:
    """Plan GPU memory for a config before anything loads: what is resident, cached, offloaded; fits or not."""
    from . import config as C
    from .plan import plan

    cfg = C.load(args.config, args.set)
    result = plan(cfg, gpu_gb=args.gpu_gb, gpus=args.gpus, host_gb=args.host_gb)
    print(json.dumps(result.to_dict(), indent=2) if args.json else result.summary())
    return 0 if result.fits else PLAN_DOES_NOT_FIT


def _add_plan(sub):
    p = sub.add_parser("plan", help="GPU memory plan of a config (reads config.json only, loads no weights)",
                       description="Exit status 0 when the plan fits the budget, 3 when it cannot work.")
    p.add_argument("config", help="YAML config file")
    p.add_argument("--gpu-gb", type=float, default=None, help="GPU budget in GB (10^9 bytes); overrides memory.gpu_gb")
    p.add_argument("--host-gb", type=float, default=None,
                   help="host RAM in GB that offloaded experts may use (default: this machine's)")
    p.add_argument("--gpus", type=int, default=None, metavar="N",
                   help="plan one GPU of a job of N (default train.expert_parallel); with train.expert_parallel "
                        "each GPU holds its share of the experts")
    p.add_argument("--json", action="store_true", help="print the plan as JSON")
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE", help="override a field")
    return p


def cmd_eval(args) -> int:
    """Score a run's adapter (or its base model, --base; or both from one loaded model, --with-base) on
    benchmarks; write every prediction."""
    from .evaluate import evaluate_many
    from .runs.finished import load_run

    if args.base and args.with_base:
        raise ValueError("--base scores the base model alone; --with-base scores the adapter and the base: "
                         "give one of them.")
    run = load_run(args.run, device=args.device)
    benches = [b.strip() for spec in args.bench for b in spec.split(",") if b.strip()]

    def progress(name: str, done: int, total: int) -> None:
        if not args.json:
            print(f"\r{name}: {done}/{total}", end="\n" if done == total else "", file=sys.stderr, flush=True)

    def score(which: str):
        out_dir = Path(args.run) / "eval" / which
        result = evaluate_many(run.model, run.tokenizer, benches, out_dir=out_dir, data_root=args.data_root,
                               limit=args.limit, batch_size=args.batch_size or run.cfg.eval.batch_size,
                               num_beams=run.cfg.eval.num_beams, template=run.cfg.data.template, progress=progress)
        return {"model": which, "predictions": str(out_dir), **result.to_dict()}, result

    scored = [] if args.base else [score("adapter")]
    if args.base or args.with_base:  # the same weights with the adapters switched off: one copy of the model
        with run.peft.disabled():
            scored.append(score("base"))
    (primary, result), (base, base_result) = scored[0], scored[1] if len(scored) > 1 else (None, None)
    if args.json:
        print(json.dumps({"run": str(args.run), **primary, **({"base": base} if base else {})}, indent=2))
    else:
        print(f"{primary['model']} of {args.run}; predictions in {primary['predictions']}")
        print(result.table())
        if base:
            print(f"base model; predictions in {base['predictions']}")
            print(base_result.table())
    return 0


def _add_eval(sub):
    p = sub.add_parser("eval", help="score a run on commonsense / math benchmarks or a test file")
    p.add_argument("--run", required=True, help="run folder written by `moetune train`")
    p.add_argument("--bench", required=True, action="append", metavar="NAME|FILE",
                   help="benchmark name (boolq, gsm8k, ...), suite (commonsense, math) or an LLM-Adapters "
                        "test.json; repeat or separate with commas")
    p.add_argument("--limit", type=int, default=None, help="score only the first N rows of each benchmark")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.add_argument("--base", action="store_true", help="score the base model without the adapter")
    p.add_argument("--with-base", action="store_true",
                   help="score the adapter and then the base model (adapters switched off) from one loaded model")
    p.add_argument("--data-root", default=None,
                   help="folder laid out like LLM-Adapters' dataset/ (default: $MOETUNE_EVAL_DATA, else ./dataset)")
    p.add_argument("--batch-size", type=int, default=None, help="prompts per generation batch (default: eval.batch_size)")
    p.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: CUDA when present)")
    return p


def cmd_chat(args) -> int:
    """Answer a prompt with a run's adapted model (or its base model, --base); with --serve, answer JSON
    lines from stdin, the adapter and the base model from one loaded model."""
    from .data import generation_prompt
    from .evaluate import generate, stop_token_ids
    from .runs.finished import load_run

    if args.prompt is None and not args.serve:
        raise ValueError("give --prompt TEXT, or --serve to answer JSON lines from stdin.")
    run = load_run(args.run, device=args.device)
    template = run.cfg.data.template
    stops = stop_token_ids(run.model, run.tokenizer, chat=template == "chat")

    def reply(prompt: str, max_new_tokens: int, base: bool = False) -> str:
        text, special = generation_prompt(template, prompt, "", run.tokenizer)
        with run.peft.disabled() if base else contextlib.nullcontext():
            return generate(run.model, run.tokenizer, [text], add_special_tokens=special,
                            max_new_tokens=max_new_tokens, stop_ids=stops)[0].strip()

    if not args.serve:
        print(reply(args.prompt, args.max_new_tokens, base=args.base))
        return 0
    # one JSON object a line in ({"prompt", "max_new_tokens"?, "base"?}), one a line out ({"tuned", "base"?} or
    # {"error"}); the model loads once, so a conversation does not reload it for every message
    print(json.dumps({"ready": True}), flush=True)
    for line in sys.stdin:
        if not line.strip():
            continue
        try:
            request = json.loads(line)
            prompt, limit = str(request["prompt"]), int(request.get("max_new_tokens", args.max_new_tokens))
        except (ValueError, KeyError, TypeError) as e:
            print(json.dumps({"error": f"a request is one JSON object with a 'prompt' ({e!r})"}), flush=True)
            continue
        answer = {} if args.base else {"tuned": reply(prompt, limit)}
        if args.base or request.get("base"):
            answer["base"] = reply(prompt, limit, base=True)
        print(json.dumps(answer), flush=True)
    return 0


def _add_chat(sub):
    p = sub.add_parser("chat", help="answer a prompt with a run's adapter")
    p.add_argument("--run", required=True, help="run folder written by `moetune train`")
    p.add_argument("--prompt", help="the instruction to answer (the run's template wraps it)")
    p.add_argument("--base", action="store_true", help="answer with the base model, without the adapter")
    p.add_argument("--serve", action="store_true",
                   help='answer JSON lines from stdin ({"prompt": ..., "base": true}) until it closes')
    p.add_argument("--max-new-tokens", type=int, default=128)
    p.add_argument("--device", default=None, help="cpu, cuda, ... (default: CUDA when present)")
    return p


def cmd_export(args) -> int:
    """Export a run as merged HF safetensors, PEFT-layout LoRA or GGUF; print the export report."""
    from .export import export_run

    report = export_run(args.run, args.format, args.dtype, args.out, check_logits=False if args.no_check else None,
                        base=args.base)
    print(json.dumps(report, indent=2, ensure_ascii=False))
    return 0


def _add_export(sub):
    p = sub.add_parser("export", help="merge a run's adapter: HF safetensors, PEFT LoRA or GGUF")
    p.add_argument("--run", required=True, help="run folder written by `moetune train`")
    p.add_argument("--format", required=True, choices=("hf", "peft", "gguf", "gguf-lora"),
                   help="gguf-lora: the LoRA alone as a llama.cpp adapter GGUF, for a base GGUF (llama-cli --lora)")
    p.add_argument("--dtype", default="f16", choices=("f16", "bf16", "q8_0"), help="tensor type (q8_0: GGUF only)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--base", action="store_true",
                   help="with --format gguf: the run's base model alone, to load its gguf-lora adapter onto")
    p.add_argument("--no-check", action="store_true",
                   help="skip the logit comparison against the unmerged model (it loads the base model twice in "
                        "fp32; by default it runs when that fits in half the free memory)")
    return p


def cmd_ui(args) -> int:
    """Start the local app (Gradio) on 127.0.0.1 unless --host says otherwise; no share link unless --share."""
    from app.main import launch  # the engine never imports gradio; only this command loads the app

    launch(host=args.host, port=args.port, share=args.share)
    return 0


def _add_models(sub):
    p = sub.add_parser("models", help="supported families and their MoE facts")
    p.add_argument("--json", action="store_true", help="print JSON")
    return p


def _add_tiny_model(sub):
    from .model.arch import FAMILIES

    p = sub.add_parser("tiny-model", help="a random-weight checkpoint of a real architecture, with tokenizer")
    p.add_argument("--family", required=True, choices=sorted(FAMILIES))
    p.add_argument("--out", required=True, help="output directory")
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--experts", type=int, default=4)
    p.add_argument("--top-k", type=int, default=2)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--tokenizer", choices=["bpe", "spm"], default="bpe",
                   help="bpe: byte-level BPE (Qwen style, default); spm: SentencePiece-style BPE with byte fallback "
                        "(Llama / Mistral / Mixtral style)")
    return p


def _add_ui(sub):
    p = sub.add_parser("ui", help="start the local app")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--share", action="store_true", help="also open a public Gradio share link (off by default)")
    return p


#: name -> (parser builder, handler)
COMMANDS: dict[str, tuple[Callable, Callable]] = {
    "models": (_add_models, cmd_models),
    "tiny-model": (_add_tiny_model, cmd_tiny_model),
    "train": (_add_train, cmd_train),
    "sweep": (_add_sweep, cmd_sweep),
    "plan": (_add_plan, cmd_plan),
    "eval": (_add_eval, cmd_eval),
    "chat": (_add_chat, cmd_chat),
    "export": (_add_export, cmd_export),
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
    except OSError as e:  # a full disk is one line naming the folder; other OS errors are bugs to see whole
        if not is_no_space(e):
            raise
        full = e if isinstance(e, NoSpaceError) else no_space(Path(e.filename or ".").parent)
        print(f"moetune {args.command}: error: {full}", file=sys.stderr)
        return 1
    except RuntimeError as e:  # a job of several ranks that cannot go on (engine.training.distributed), one line
        from .training.collectives import DistributedError

        if not isinstance(e, DistributedError):
            raise
        print(f"moetune {args.command}: error: {e}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"moetune {args.command}: stopped", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
