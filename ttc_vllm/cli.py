"""`ttc-vllm` command line: demo, testbed training, calibration, jobs, options reference, and
the subcommands other packages register (`serve`, from the plugins).

Bad arguments end with one line on stderr and exit code 2; vLLM is imported only by the
subcommands that need it, so `ttc-vllm --help` is instant. A registered subcommand is an
entry point of the group `ttc_vllm.commands` (NAME = "module:function"): `ttc-vllm NAME ARGS`
calls function(ARGS), which parses its own arguments.
"""
from __future__ import annotations

import argparse
import os
import sys
from importlib.metadata import EntryPoint, entry_points
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


def positive_int_list(text: str) -> list[int]:
    values = []
    for part in (p.strip() for p in text.split(",")):
        try:
            values.append(positive_int(part))
        except argparse.ArgumentTypeError:
            raise argparse.ArgumentTypeError(f"expected comma-separated positive integers, got {text!r}") from None
    return list(dict.fromkeys(values))


def strategy_list(text: str) -> list[str]:
    from ttc_vllm.search import STRATEGIES

    names = [s.strip() for s in text.split(",") if s.strip()]
    unknown = [s for s in names if s not in STRATEGIES]
    if unknown or not names:
        raise argparse.ArgumentTypeError(
            f"unknown strategy {', '.join(unknown) or repr(text)}; choose from {', '.join(STRATEGIES)}")
    return list(dict.fromkeys(names))


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text!r}") from None
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {text}")
    return value


def readable_file(text: str) -> Path:
    path = Path(text)
    if not path.is_file() or not os.access(path, os.R_OK):
        raise argparse.ArgumentTypeError(f"not a readable file: {text}")
    return path


def _add_job_evaluate(job_sub) -> None:
    ev = job_sub.add_parser(
        "evaluate", help="batch test-time-compute evaluation on Ray, resumable (results.jsonl, summary, plot)")
    data = ev.add_argument_group("dataset (testbed tiers, or a JSONL file)")
    data.add_argument("--tiers", type=tier_list, default=None, help="comma-separated testbed tiers (default: all)")
    data.add_argument("--dataset", type=readable_file, default=None,
                      help='JSONL rows {"prompt": ..., "answer": ...} (prompts as the model continues them)')
    data.add_argument("--dataset-name", default=None, help="tier name of the dataset's rows (default: file stem)")
    data.add_argument("--problems", type=positive_int, default=None,
                      help="problems per tier (default 100) / first rows of --dataset (default all)")
    data.add_argument("--seed", type=int, default=10_000, help="testbed problem seed (default: held-out set)")
    data.add_argument("--chat", action="store_true", help="render prompts with the policy's chat template")
    grid = ev.add_argument_group("grid and search")
    grid.add_argument("--strategies", type=strategy_list, default=["majority"], help="comma-separated strategies")
    grid.add_argument("--n", type=positive_int_list, default=[4], help="comma-separated n values")
    grid.add_argument("--temperature", type=float, default=0.8)
    grid.add_argument("--max-steps", type=positive_int, default=32)
    grid.add_argument("--max-step-tokens", type=positive_int, default=256)
    grid.add_argument("--beam-width", type=positive_int, default=4)
    grid.add_argument("--aggregation", choices=["min", "prod", "mean", "last"], default="min")
    grid.add_argument("--controls", default=None,
                      help='in-engine thinking controls for every sampled trace, a JSON object of ttc '
                           'options, e.g. \'{"max_think": 120}\' or a halting rule (sampling strategies)')
    grid.add_argument("--adaptive", default=None,
                      help='adaptive sampling for majority / weighted_vote (search.adaptive), a JSON object, '
                           'e.g. \'{"waves": [4, 4, 4, 4], "consensus": 0.75}\'')
    grid.add_argument("--step-delimiter", default=None,
                      help=r"step delimiter, backslash escapes allowed (default: the testbed's <step>; '\n\n' for real models)")
    run = ev.add_argument_group("models and cluster")
    # The text as given (a Path would turn s3://b into s3:/b); the job resolves and checks it:
    # a relative path may resolve against $TTC_VLLM_JOB_STORAGE.
    run.add_argument("--out", required=True,
                     help="results directory, reuse it to resume. A relative path is resolved against "
                          "$TTC_VLLM_JOB_STORAGE if set, else the working directory (refused inside a Ray "
                          "job, whose working directory is temporary)")
    run.add_argument("--policy", default=None, help="policy model dir or hub id (default: shipped testbed policy)")
    run.add_argument("--engine-kwargs", default=None, help="JSON object of extra vllm.LLM arguments for the policy")
    run.add_argument("--prm-config", default=None, help="PRMConfig JSON or file (default: shipped testbed PRM)")
    run.add_argument("--address", default=None,
                     help="Ray cluster: auto, host:port or ray://host:port (default: RAY_ADDRESS if set, "
                          "else a local Ray in this process)")
    run.add_argument("--num-cpus", type=positive_int, default=None, help="CPUs of a local Ray (default: all)")
    run.add_argument("--policy-replicas", type=positive_int, default=1, help="policy engines (Ray actors)")
    run.add_argument("--replica-cpus", type=non_negative_float, default=1.0)
    run.add_argument("--replica-gpus", type=non_negative_float, default=0.0)
    run.add_argument("--prm-actors", type=positive_int, default=1, help="PRM engines (Ray actors)")
    run.add_argument("--prm-cpus", type=non_negative_float, default=1.0)
    run.add_argument("--prm-gpus", type=non_negative_float, default=0.0)
    run.add_argument("--concurrency", type=positive_int, default=8, help="problems in flight per replica")
    run.add_argument("--ready-timeout", type=float, default=900.0,
                     help="seconds each actor group (policy replicas, PRM actors) may take to start, "
                          "including waiting for a joined cluster to add the resources they need")


COMMANDS_GROUP = "ttc_vllm.commands"


def registered_commands() -> dict[str, EntryPoint]:
    """Subcommands installed packages register (for example `serve`, by ttc_vllm_plugins)."""
    return {ep.name: ep for ep in entry_points(group=COMMANDS_GROUP)}


DEFAULT_OPTIONS_REFERENCE = str(Path(__file__).with_name("OPTIONS.md"))


def options_reference(check: str | None) -> int:
    """Print the options reference, or (check) compare it with a committed file: 0 when equal."""
    from ttc_vllm.options_reference import COMMAND, generate

    text = generate()
    if check is None:  # UTF-8 whatever the locale: the reference has ≥, ≤, τ
        sys.stdout.flush()
        sys.stdout.buffer.write(text.encode("utf-8"))
        sys.stdout.flush()
        return 0
    path = Path(check)
    if path.is_file() and path.read_text(encoding="utf-8") == text:
        return 0
    sys.stderr.write(f"ttc-vllm options-reference: {path} is stale or missing; regenerate it: {COMMAND}\n")
    return 1


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
    demo.add_argument("--verbose", action="store_true",
                      help="show vLLM's engine logs and progress bars (hidden by default)")

    tb = sub.add_parser("testbed", help="train the testbed models")
    tb_sub = tb.add_subparsers(dest="testbed_command", required=True, parser_class=_Parser)
    tp = tb_sub.add_parser("train-policy", help="train the testbed policy (CPU, about 45 min)")
    tp.add_argument("--out", type=writable_dir, required=True)
    tp.add_argument("--steps", type=positive_int, default=2400)
    tp.add_argument("--minutes", type=float, default=60.0)
    tp.add_argument("--seed", type=int, default=0)
    tp.add_argument("--lr", type=float, default=2e-3)
    tp.add_argument("--init", type=readable_dir, default=None, help="continue from these weights")
    tb_sub.add_parser("train-prm", help="train the testbed PRM on `job prm-data` labels", add_help=False)

    job = sub.add_parser("job", help="batch jobs (local Ray, or `ray job submit ... -- ttc-vllm job ...`)")
    job_sub = job.add_subparsers(dest="job_command", required=True, parser_class=_Parser)
    _add_job_evaluate(job_sub)
    job_sub.add_parser("prm-data", help="Monte-Carlo step labels for PRM training", add_help=False)

    ref = sub.add_parser("options-reference",
                         help="print the per-request options reference (ttc_vllm/OPTIONS.md) from the models")
    ref.add_argument("--check", nargs="?", const=DEFAULT_OPTIONS_REFERENCE, default=None, metavar="PATH",
                     help="instead of printing, exit 1 if PATH (default: ttc_vllm/OPTIONS.md) is stale")

    sub.add_parser("calibrate", help="pick a halting threshold from warm-up traces", add_help=False)
    for name, ep in sorted(registered_commands().items()):
        if name not in sub.choices:
            sub.add_parser(name, help=f"from {ep.module} (its own arguments)", add_help=False)
    return ap


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    # Pass-through subcommands keep their own argument parsing.
    if argv[:1] == ["calibrate"]:
        from ttc_vllm.calibrate import calibrate_main

        return calibrate_main(argv[1:]) or 0
    commands = registered_commands()
    if argv[:1] and argv[0] in commands:
        return commands[argv[0]].load()(argv[1:]) or 0
    if argv[:2] == ["job", "prm-data"]:
        from ttc_vllm.testbed.prm_data import prm_data_main

        prm_data_main(argv[2:])
        return 0
    if argv[:2] == ["testbed", "train-prm"]:
        from ttc_vllm.testbed.train_prm import main as train_prm_main

        train_prm_main(argv[2:])
        return 0
    args = build_parser().parse_args(argv)
    if args.command == "demo":
        from ttc_vllm.demo import quiet_engine, run_demo

        if not args.verbose:
            quiet_engine()  # before vLLM is imported: its logging reads the environment then
        run_demo(args.tiers, args.problems, args.k, args.temperature, args.model, args.out,
                 verbose=args.verbose)
    elif args.command == "options-reference":
        return options_reference(args.check)
    elif args.command == "testbed" and args.testbed_command == "train-policy":
        from ttc_vllm.testbed.train_policy import train

        train(args.out, args.steps, args.minutes, batch=32, lr=args.lr, seed=args.seed,
              threads=os.cpu_count() or 2, init=args.init)
    elif args.command == "job" and args.job_command == "evaluate":
        from ttc_vllm.jobs.errors import JobError
        from ttc_vllm.jobs.evaluate import evaluate_main
        from ttc_vllm.jobs.replicas import ReplicaUnavailableError
        from ttc_vllm.prm.pool import PRMUnavailableError

        try:
            return evaluate_main(args, argv)
        except (JobError, ReplicaUnavailableError, PRMUnavailableError) as e:
            sys.stderr.write(f"ttc-vllm job evaluate: error: {' '.join(str(e).split())}\n")
            return 2
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
