"""Command line: `rlhfkit train | demo | export | chat | eval` (parse, then dispatch)."""

from __future__ import annotations

import argparse
import sys

from rlhfkit import __version__
from rlhfkit.errors import RlhfkitError


def _train(args: argparse.Namespace) -> int:
    from rlhfkit.config import load_config
    from rlhfkit.stages import run_stage

    config = load_config(args.config, args.overrides)
    run_stage(config)
    return 0


def _demo(args: argparse.Namespace) -> int:
    from rlhfkit.demo.pipeline import run_demo

    run_demo(output_dir=args.output_dir, quick=args.quick, fresh=args.fresh)
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
    demo.set_defaults(handler=_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    from rlhfkit.training.runtime import setup_logging

    setup_logging(args.debug)
    try:
        return args.handler(args)
    except RlhfkitError as err:
        if args.debug:
            raise
        print(f"error: {err}", file=sys.stderr)
        return getattr(err, "exit_code", 2)
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
