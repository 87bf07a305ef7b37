"""Command line: `rlhfkit train | demo | export | chat | eval` (parse, then dispatch)."""

from __future__ import annotations

import argparse
import sys

from rlhfkit import __version__
from rlhfkit.cpu.allocator import request_huge_pages
from rlhfkit.errors import RlhfkitError
from rlhfkit.logs import setup_logging


def _train(args: argparse.Namespace) -> int:
    from rlhfkit.config import load_config

    config = load_config(args.config, args.overrides)
    if config.training.cpu_speedups != "off":
        request_huge_pages()  # before torch allocates: PyTorch reads the switch once
    from rlhfkit.stages import run_stage

    run_stage(config)
    return 0


def _demo(args: argparse.Namespace) -> int:
    request_huge_pages()  # before torch allocates: PyTorch reads the switch once
    from rlhfkit.demo.pipeline import run_demo

    run_demo(output_dir=args.output_dir, quick=args.quick, fresh=args.fresh, algo=args.algo, device=args.device)
    return 0


def _export(args: argparse.Namespace) -> int:
    from rlhfkit.commands.export import run_export
    from rlhfkit.config import load_config

    run_export(load_config(args.config, args.overrides, check=False))
    return 0


CHAT_OPTIONS = ("adapter", "template", "system", "max_new_tokens", "temperature", "top_p", "top_k",
                "repetition_penalty", "greedy", "seed", "device", "trust_remote_code")


def _chat(args: argparse.Namespace) -> int:
    from rlhfkit.commands.chat import chat_settings, run_chat

    given = {name: getattr(args, name) for name in CHAT_OPTIONS if getattr(args, name) is not None}
    return run_chat(**chat_settings(args.model, given))


def _eval(args: argparse.Namespace) -> int:
    from rlhfkit.commands.evaluate import run_eval
    from rlhfkit.config import load_config

    run_eval(load_config(args.config, args.overrides, check=False), args.baseline)
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="rlhfkit", description="SFT -> reward model -> PPO for causal LMs.")
    parser.add_argument("--version", action="version", version=f"rlhfkit {__version__}")
    parser.add_argument("--debug", action="store_true", help="show tracebacks and library logs")
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="run one stage (sft, rm, ppo) from a YAML config")
    train.add_argument("config", help="YAML config (LLaMA-Factory key names)")
    train.add_argument("overrides", nargs="*", help="key=value pairs that override the YAML")
    train.set_defaults(handler=_train)

    demo = commands.add_parser("demo", help="run the whole pipeline on the embedded movie-review task")
    demo.add_argument("--output-dir", default="demo_output", help="where models and the report go")
    demo.add_argument("--quick", action="store_true", help="a tiny model and a few steps (about a minute)")
    demo.add_argument("--fresh", action="store_true", help="retrain every stage instead of reusing results")
    demo.add_argument("--algo", choices=("ppo", "grpo"), default="ppo",
                      help="grpo: also train a GRPO policy and compare it with PPO in the report")
    demo.add_argument("--device", choices=("auto", "cpu"), default="auto",
                      help="auto (cuda, mps, cpu; the default) or cpu, for every stage and the sampling")
    demo.set_defaults(handler=_demo)

    export = commands.add_parser("export", help="merge LoRA adapters into the base and save a standalone model")
    export.add_argument("config", help="YAML config: model_name_or_path, adapter_name_or_path, export_dir, ...")
    export.add_argument("overrides", nargs="*", help="key=value pairs that override the YAML")
    export.set_defaults(handler=_export)

    chat = commands.add_parser("chat", help="chat with a model in the terminal (/reset, /exit)")
    chat.add_argument("model", help="model folder (base, or an exported model), or a YAML config in LLaMA-Factory's "
                                    "inference format (model_name_or_path, adapter_name_or_path, template, ...)")
    chat.add_argument("--adapter", help="LoRA adapter folder(s) to load on the model, comma-separated")
    chat.add_argument("--template", help="chat template: the tokenizer's own (default) or a LLaMA-Factory name "
                                         "(llama3, qwen3, mistral, ...; docs/data.md)")
    chat.add_argument("--system", help="system message")
    chat.add_argument("--max-new-tokens", type=int, help="longest reply in tokens (512; a config: its value)")
    chat.add_argument("--temperature", type=float, help="sampling temperature (0.95)")
    chat.add_argument("--top-p", type=float, help="nucleus sampling threshold (0.7)")
    chat.add_argument("--top-k", type=int, help="top-k sampling, 0 disables (50)")
    chat.add_argument("--repetition-penalty", type=float, help="1.0 disables (1.0)")
    chat.add_argument("--greedy", action="store_true", default=None, help="greedy decoding instead of sampling")
    chat.add_argument("--seed", type=int, help="sampling seed (42)")
    chat.add_argument("--device", choices=("auto", "cpu"), help="auto (cuda, mps, cpu; the default) or cpu")
    chat.add_argument("--trust-remote-code", action="store_true", default=None,
                      help="allow custom modelling code")
    chat.set_defaults(handler=_chat)

    evaluate = commands.add_parser("eval", help="score a policy on a prompt dataset with reward source(s)")
    evaluate.add_argument("config", help="YAML config: model, adapter, dataset, reward_model(s), output_dir, ...")
    evaluate.add_argument("overrides", nargs="*", help="key=value pairs that override the YAML")
    evaluate.add_argument("--baseline", help="output_dir of an earlier eval to compare with, prompt by prompt")
    evaluate.set_defaults(handler=_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    setup_logging(args.debug)
    try:
        code = args.handler(args)
    except RlhfkitError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        code = getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        code = 130
    if "torch" in sys.modules:  # a launched process is ended without torch.distributed's teardown
        from rlhfkit.training.runtime import exit_launched_process

        exit_launched_process(code)  # returns unless this is one process of a multi-process launch
    return code


if __name__ == "__main__":
    sys.exit(main())
