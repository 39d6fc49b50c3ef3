"""`ttc-vllm` command line: demo, testbed training, calibration, serving, jobs.

Bad arguments end with one line on stderr and exit code 2; vLLM is imported only by the
subcommands that need it, so `ttc-vllm --help` is instant.
"""
from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

from ttc_vllm.testbed.task import TIERS


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> None:  # one line, exit 2 (argparse prints usage too)
        sys.stderr.write(f"{self.prog}: error: {message}\n")
        raise SystemExit(2)


def positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {value}")
    return value


def tier_list(text: str) -> list[str]:
    tiers = [t.strip() for t in text.split(",") if t.strip()]
    unknown = [t for t in tiers if t not in TIERS]
    if unknown or not tiers:
        raise argparse.ArgumentTypeError(f"unknown tier {', '.join(unknown) or repr(text)}; choose from {', '.join(TIERS)}")
    return tiers


def readable_dir(text: str) -> Path:
    path = Path(text)
    if not path.is_dir() or not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"not a readable directory: {text}")
    return path


def writable_dir(text: str) -> Path:
    path = Path(text)
    existing = path
    while not existing.exists():  # the nearest existing ancestor must be a writable directory
        existing = existing.parent
    if not existing.is_dir() or not os.access(existing, os.W_OK):
        raise argparse.ArgumentTypeError(f"not a writable directory: {text}")
    return path


def build_parser() -> argparse.ArgumentParser:
    ap = _Parser(prog="ttc-vllm", description="Test-time compute scaling for vLLM serving")
    sub = ap.add_subparsers(dest="command", required=True, parser_class=_Parser)

    demo = sub.add_parser("demo", help="greedy vs majority@k on the shipped testbed model, table + plot")
    demo.add_argument("--tiers", type=tier_list, default=list(TIERS), help="comma-separated: easy,medium,hard")
    demo.add_argument("--problems", type=positive_int, default=100, help="problems per tier")
    demo.add_argument("--k", type=positive_int, default=16, help="samples per problem for majority@k")
    demo.add_argument("--temperature", type=float, default=0.8)
    demo.add_argument("--model", type=readable_dir, default=None, help="policy directory (default: shipped)")
    demo.add_argument("--out", type=writable_dir, default=Path("runs/demo"), help="where the JSON and PNG go")

    tb = sub.add_parser("testbed", help="train the testbed models")
    tb_sub = tb.add_subparsers(dest="testbed_command", required=True, parser_class=_Parser)
    tp = tb_sub.add_parser("train-policy", help="train the testbed policy (CPU, about 45 min)")
    tp.add_argument("--out", type=writable_dir, required=True)
    tp.add_argument("--steps", type=positive_int, default=2400)
    tp.add_argument("--minutes", type=float, default=60.0)
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--lr", type=float, default=2e-3)
    tp.add_argument("--init", type=readable_dir, default=None, help="continue from these weights")

    sub.add_parser("calibrate", help="pick a halting threshold from warm-up traces", add_help=False)
    sub.add_parser("serve", help="vllm serve with the ttc-vllm plugin enabled (same arguments)", add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Pass-through subcommands keep their own argument parsing.
    if argv[:1] == ["calibrate"]:
        from ttc_vllm.calibrate import calibrate_main

        return calibrate_main(argv[1:]) or 0
    if argv[:1] == ["serve"]:
        from ttc_vllm_plugins.serve import serve_main

        return serve_main(argv[1:]) or 0
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from ttc_vllm.demo import run_demo

        run_demo(args.tiers, args.problems, args.k, args.temperature, args.model, args.out)
    elif args.command == "testbed" and args.testbed_command == "train-policy":
        from ttc_vllm.testbed.train_policy import train

        train(args.out, args.steps, args.minutes, batch=32, lr=args.lr, seed=args.seed,
              threads=os.cpu_count() or 2, init=args.init)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
