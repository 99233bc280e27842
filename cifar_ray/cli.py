"""The command lines: `cifar-ray <stage>` (and `python -m cifar_ray.<stage>`), their flags,
Ray start-up and one-line errors (quiet start-up: quiet.py).

Every stage's flags are declared here, on top of config.py alone, so `--help` and a
mistyped flag answer at once: TensorFlow, Keras and Ray load only once a stage runs.
"""

from __future__ import annotations

import argparse
import ast
import importlib
import importlib.util
import os
import sys
from typing import Callable

from cifar_ray.errors import ClusterUnreachable, find_user_error, first_line
from cifar_ray.flags import add_config_flags, add_field_flags
from cifar_ray.quiet import QUIET_FLAG, is_quiet, quiet_start_up


STAGES = {
    "train": "train a model on a Ray cluster (Ray Train, data-parallel Keras)",
    "tune": "compare models and settings with Ray Tune; the best becomes a registry version",
    "evaluate": "score a checkpoint on labelled images: accuracy per class, figures, model card",
    "predict": "batch predictions for a folder of images, written as Parquet",
    "serve": "serve the champion model (or a checkpoint) over HTTP with Ray Serve",
    "registry": "the registered model's versions: list, show, promote, rollback, canary, register",
    "feedback": "labelled answers from the payload log as training data (feedback export)",
}

EXAMPLES = """examples:
  cifar-ray train                                   # Keras CIFAR-10 on a local Ray
  cifar-ray train --data ../shared/data/cifar10/train --model fast_resnet
  cifar-ray tune --num-samples 8
  cifar-ray evaluate --checkpoint <run>/epoch_0010 --data <parquet folder> --out report/
  cifar-ray serve                                   # the registry's champion on :8000
  cifar-ray registry list
  cifar-ray registry canary 4 --percent 10           # decided on live feedback
  cifar-ray feedback export --from runs/payload_log --out data/feedback

`cifar-ray <stage> --help` lists a stage's flags. `python -m cifar_ray.<stage>` is the same."""

# For a Ray this process starts on one machine:
# - With more workers than CPUs (a laptop), Ray kills an idle task worker after 1 s, and each
#   epoch's first batch waited ~2 s for a new worker process to run its Ray Data task
#   (benchmarks/idle_workers.py). Idle workers live 60 s instead.
# - No preemption watcher: it waits for a cluster to drain a node, which one machine never
#   does, and it is one more process per run (benchmarks/run_cpu.py: 0.96x a smoke run's time).
LOCAL_RAY_ENV = {"RAY_idle_worker_killing_time_threshold_ms": "60000", "RAY_TRAIN_ENABLE_PREEMPTION_WATCHER": "0"}


# ---------------------------------------------------------------------------------------
# Flags
# ---------------------------------------------------------------------------------------

def add_train_flags(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, ("data", "model", "train", "scaling", "run", "registry"))


def add_tune_flags(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, ("tune", "data", "model", "train", "scaling", "run", "registry"))


def add_inference_flags(parser: argparse.ArgumentParser) -> None:
    """--checkpoint, --data and --num-actors, shared by evaluate and predict."""
    parser.add_argument("--checkpoint", required=True, help="checkpoint folder or URI")
    parser.add_argument("--data", required=True,
                        help="'cifar10' (its test split), 'synthetic', a Parquet folder/URI or an image folder")
    parser.add_argument("--num-actors", type=int, default=1,
                        help="model replicas predicting in parallel (evaluate: up to 10,000 rows, one is the driver itself)")


def add_evaluate_flags(parser: argparse.ArgumentParser) -> None:
    add_inference_flags(parser)
    parser.add_argument("--out", help="write the metrics, figures and MODEL_CARD.md into this folder or URI")
    parser.add_argument("--tta", action=argparse.BooleanOptionalAction, default=None,
                        help="test-time augmentation: six views of each image, the mirror and one-pixel shifts "
                        "(tta.py; default: as the checkpoint's config says, on for fast_resnet)")


def add_predict_flags(parser: argparse.ArgumentParser) -> None:
    add_inference_flags(parser)
    parser.add_argument("--out", required=True, help="folder or URI for the Parquet predictions")


def add_serve_flags(parser: argparse.ArgumentParser) -> None:
    add_config_flags(parser, ("serve",))
    add_field_flags(parser, ("tracking_uri", "storage_path"))
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s)")
    parser.add_argument("--ingress", choices=("haproxy", "proxy"), default="haproxy",
                        help="HTTP in front of the replicas when this starts Ray: Ray Serve's HAProxy "
                             "ingress, or its Python proxy actor (default: %(default)s)")


def add_registry_flags(parser: argparse.ArgumentParser) -> None:
    store = argparse.ArgumentParser(add_help=False)
    add_field_flags(store, ("tracking_uri", "storage_path"))
    commands = parser.add_subparsers(dest="command", required=True)
    commands.add_parser("list", parents=[store], help="all versions, the champion marked *")
    commands.add_parser("show", parents=[store], help="one version: source, scores, gate decision, tags") \
        .add_argument("version")
    p = commands.add_parser("promote", parents=[store], help="make a version champion if the gate allows it")
    p.add_argument("version")
    p.add_argument("--force", action="store_true", help="promote whatever the gate says")
    add_field_flags(p, ("min_improvement", "max_class_drop"))
    commands.add_parser("rollback", parents=[store], help="champion back to the previous champion")
    add_canary_flags(commands.add_parser(
        "canary", parents=[store], help="a version takes a share of live traffic (or a shadow copy) and is "
                                        "promoted or rolled back on live feedback"))
    p = commands.add_parser("register", parents=[store], help="a checkpoint folder or URI as a new version, "
                                                               "through the gate")
    p.add_argument("checkpoint")
    add_field_flags(p, ("eval_data", "promote", "min_improvement", "max_class_drop"))


def add_canary_flags(p: argparse.ArgumentParser) -> None:
    from dataclasses import fields

    from cifar_ray.canary import Rule

    p.add_argument("version", nargs="?", help="the version to roll out (not with --status or --stop)")
    p.add_argument("--percent", type=float, default=10.0, help="share of the requests it answers (default: 10)")
    p.add_argument("--shadow", action="store_true", help="answer a copy of every request instead, never seen "
                                                         "by clients; rolled back when worse, promoted by a person")
    p.add_argument("--status", action="store_true", help="the rollout's live figures per version")
    p.add_argument("--stop", action="store_true", help="end the rollout, not promoted")
    rule = p.add_argument_group("the decision (canary.py)")
    for f in fields(Rule):
        rule.add_argument("--" + f.name.replace("_", "-"), dest=f"rule_{f.name}", type=type(f.default),
                          default=f.default, help=f"{f.metadata['help']} (default: {f.default})")


def add_feedback_flags(parser: argparse.ArgumentParser) -> None:
    commands = parser.add_subparsers(dest="command", required=True)
    p = commands.add_parser("export", help="labelled images of the payload log as a Parquet folder (image, label)")
    p.add_argument("--from", dest="source", required=True, help="the payload log: serve_config.yaml's "
                                                                "payload_log_path (default <storage-path>/payload_log)")
    p.add_argument("--out", required=True, help="folder or URI to write; --data of train and evaluate reads it")


FLAGS: dict[str, Callable[[argparse.ArgumentParser], None]] = {
    "train": add_train_flags, "tune": add_tune_flags, "evaluate": add_evaluate_flags,
    "predict": add_predict_flags, "serve": add_serve_flags, "registry": add_registry_flags,
    "feedback": add_feedback_flags,
}


def stage_help(stage: str) -> str:
    """The stage module's docstring, read from its source without importing it."""
    source = importlib.util.find_spec(f"cifar_ray.{stage}").origin
    with open(source, encoding="utf-8") as f:
        return ast.get_docstring(ast.parse(f.read())) or STAGES[stage]


def build_parser(stage: str, prog: str | None = None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=prog or f"python -m cifar_ray.{stage}", description=stage_help(stage),
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    FLAGS[stage](parser)
    parser.add_argument("--verbose", action="store_true",
                        help="show TensorFlow's start-up and Ray's progress logs")
    return parser


def parse_args(stage: str, argv: list[str] | None = None, prog: str | None = None) -> argparse.Namespace:
    """The stage's flags; unless --verbose, the start-up logs are quieted before anything
    imports TensorFlow or starts Ray."""
    args = build_parser(stage, prog).parse_args(argv)
    if not args.verbose:
        os.environ[QUIET_FLAG] = "1"
        quiet_start_up()
    return args


def main(argv: list[str] | None = None) -> None:
    """`cifar-ray <stage> ...`: parse the stage's flags here, then import and run the stage."""
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in STAGES:
        parser = argparse.ArgumentParser(
            prog="cifar-ray", description="Train, tune, evaluate and serve CIFAR-10 Keras models on Ray.",
            epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
        stages = parser.add_subparsers(dest="stage", required=True, metavar="<stage>")
        for name, summary in STAGES.items():
            stages.add_parser(name, help=summary, add_help=False)
        parser.parse_args(argv)  # exits: help, or a usage error naming the stages
        return
    stage, rest = argv[0], argv[1:]
    prog = f"cifar-ray {stage}"
    parse_args(stage, rest, prog)  # --help and bad flags answer before the stage is imported
    importlib.import_module(f"cifar_ray.{stage}").main(rest, prog=prog)


# ---------------------------------------------------------------------------------------
# Running a stage
# ---------------------------------------------------------------------------------------

def init_ray() -> None:
    """Join the cluster this runs on (a job, RAY_ADDRESS, `ray start`), or start a local one.

    Unless --verbose, its worker processes start as quietly as the driver.
    """
    import ray

    if ray.is_initialized():
        return
    from cifar_ray import idle_executor

    idle_executor.install()  # and, below, in every worker process
    hook = "cifar_ray.worker_setup.quiet" if is_quiet() else "cifar_ray.worker_setup.verbose"
    for key, value in LOCAL_RAY_ENV.items():  # read only if ray.init starts Ray: a cluster keeps its own
        os.environ.setdefault(key, value)
    try:
        ray.init(logging_level="WARNING", runtime_env={"worker_process_setup_hook": hook})
    except ConnectionError as e:  # RAY_ADDRESS names a cluster that is not there
        raise ClusterUnreachable(
            f"cannot join the Ray cluster at RAY_ADDRESS={os.environ.get('RAY_ADDRESS', '')} ({first_line(e)}); "
            "start it (`ray start --head`), or unset RAY_ADDRESS to start a local one") from None


def run_cli(main: Callable[[], object]) -> None:
    """Run `main`; turn a user error into one line on stderr and exit status 2."""
    try:
        main()
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        sys.exit(130)
    except Exception as e:
        user_error = find_user_error(e)
        if user_error is None or os.environ.get("CIFAR_RAY_DEBUG"):
            raise
        message = str(user_error).strip().splitlines()[0] if str(user_error).strip() else repr(user_error)
        print(f"error: {message}", file=sys.stderr)
        sys.exit(2)
