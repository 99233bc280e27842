"""`cifar-ray registry`: the registered model's versions, its champion, and registering.

    python -m cifar_ray.registry list
    python -m cifar_ray.registry show 3
    python -m cifar_ray.registry promote 3            # through the gate; --force skips it
    python -m cifar_ray.registry rollback             # champion goes back to the previous one
    python -m cifar_ray.registry canary 4 --percent 10  # 10% of live traffic; promoted or rolled
    python -m cifar_ray.registry canary --status        #   back on live feedback (canary.py)
    python -m cifar_ray.registry register runs/NAME/epoch_0010   # a checkpoint made earlier

The registered model `cifar10-classifier` lives in the MLflow store of tracking.py. The best
checkpoint of every train run and of every Tune experiment becomes a new version
(registration.py), scored on one fixed evaluation set (eval_set.py); the gate (gate.py)
decides which version is `champion`, the alias Serve follows (model_registry.py). The
decision and its reason are printed and kept as the version's tags.
"""

from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path

from cifar_ray import tracking
from cifar_ray.config import Config
from cifar_ray.errors import RegistryError, TrackingUnavailable, first_line
from cifar_ray.eval_set import choose_eval_set
from cifar_ray.model_registry import STATUS_TAG, Registry, promote, rollback
from cifar_ray.registration import register


def list_versions(registry: Registry) -> str:
    champion = registry.champion()
    rows = [("version", "champion", "created", "run", "model", "eval_accuracy", "gate")]
    for v in registry.versions():
        created = datetime.fromtimestamp(v.creation_timestamp / 1000).strftime("%Y-%m-%d %H:%M")
        rows.append((v.version, "*" if champion and str(champion.version) == str(v.version) else "", created,
                     v.tags.get("run", ""), v.tags.get("model", ""), v.tags.get("eval_accuracy", "")[:6],
                     v.tags.get("gate_decision", "")))
    if len(rows) == 1:
        return f"{registry.name} has no versions yet in {registry.uri}"
    widths = [max(len(str(r[i])) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(str(c).ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


def show_version(registry: Registry, version: str) -> str:
    v = registry.version(version)
    info = {"version": str(v.version), "aliases": list(v.aliases), "source": v.source, "run_id": v.run_id,
            "created": datetime.fromtimestamp(v.creation_timestamp / 1000).isoformat(timespec="seconds"),
            "tags": dict(sorted(v.tags.items()))}
    return json.dumps(info, indent=2)


def canary(registry: Registry, args) -> str:
    """`registry canary`: start a rollout, or --stop it, or its --status."""
    from dataclasses import fields

    from cifar_ray.canary import Rule

    if args.status:
        return canary_status(registry)
    if args.stop:
        version = registry.stop_canary("stopped: registry canary --stop")
        return f"rollout of version {version} stopped, not promoted" if version else "no rollout under way"
    if not args.version:
        raise RegistryError("registry canary: name a version, or use --status or --stop")
    if not 0 < args.percent <= 100:
        raise RegistryError(f"--percent must be above 0 and at most 100, not {args.percent}")
    under_way = registry.canary()
    if under_way:
        raise RegistryError(f"version {under_way['version']} is already rolling out; end it first with "
                            "registry canary --stop")
    rule = {f.name: getattr(args, f"rule_{f.name}") for f in fields(Rule)}
    settings = registry.start_canary(args.version, args.percent, args.shadow, rule)
    share = "a shadow copy of every request" if args.shadow else f"{args.percent:g}% of the requests"
    return (f"version {settings['version']} takes {share} beside champion version {settings['champion']}; "
            f"decided on live feedback (registry canary --status)")


def canary_status(registry: Registry) -> str:
    """The figures the Rollout deployment last wrote: per version, and its verdict so far."""
    settings = registry.canary()
    status = json.loads(registry.client.get_registered_model(registry.name).tags.get(STATUS_TAG) or "null")
    if settings is None:
        return "no rollout under way" + (f"; the last one: {status['verdict']['reason']}" if status else "")
    mode = "shadow" if settings["shadow"] else f"canary at {settings['percent']:g}%"
    lines = [f"version {settings['version']}: {mode} since {settings['started']}, champion version "
             f"{settings['champion']}"]
    if not status or status.get("canary", {}).get("started") != settings["started"]:
        return "\n".join(lines + ["no figures yet: is the endpoint serving (serve run serve_config.yaml)?"])
    rows = [("version", "requests", "errors", "p50_ms", "p99_ms", "confidence", "labelled", "accuracy (95% CI)",
             "agreement")]
    for version, r in sorted(status["versions"].items()):
        accuracy = (f"{r['live_accuracy']:.3f} ({r['accuracy_interval'][0]:.3f}-{r['accuracy_interval'][1]:.3f})"
                    if r["live_accuracy"] is not None else "-")
        rows.append((version, r["requests"], r["errors"], fmt(r["p50_ms"], ".1f"), fmt(r["p99_ms"], ".1f"),
                     fmt(r["mean_confidence"], ".3f"), r["labelled"], accuracy, fmt(r["agreement"], ".3f")))
    widths = [max(len(str(row[i])) for row in rows) for i in range(len(rows[0]))]
    lines += ["  ".join(str(c).ljust(w) for c, w in zip(row, widths)).rstrip() for row in rows]
    verdict = status["verdict"]
    return "\n".join(lines + [f"so far: {verdict['action']} ({verdict['reason']})"])


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def register_checkpoint(cfg: Config, checkpoint: str) -> dict:
    """`registry register`: a checkpoint made earlier, through the gate, in its own MLflow run.

    For a first version with no --eval-data, the evaluation set is held out of the
    checkpoint's own training source, as at the end of training.
    """
    from cifar_ray.checkpoint import local_checkpoint, read_metadata
    from cifar_ray.cli import init_ray

    with local_checkpoint(checkpoint) as folder:
        metadata = read_metadata(folder)
    uri = tracking.tracking_uri(cfg)
    registry = Registry(uri)
    champion = registry.champion()
    init_ray()
    holdout = None
    if not cfg.registry.eval_data and champion is None:
        holdout = holdout_of_training_source(Config.from_dict(metadata["config"]))
    eval_set = choose_eval_set(cfg.registry, uri, champion, holdout, metadata["data"]["source"])
    name = f"register-{Path(checkpoint.rstrip('/')).parent.name}-{Path(checkpoint.rstrip('/')).name}"
    run_cfg = Config.from_dict(metadata["config"]).with_overrides({"name": name})
    run_id = tracking.start_run(uri, run_cfg, kind="register")
    tags = {"run": metadata["config"]["run"]["name"], "checkpoint": checkpoint, "git_commit": tracking.git_commit(),
            "data_source": metadata["data"]["source"], "data_fingerprint": metadata["data"].get("fingerprint"),
            "model": metadata["model"]}
    outcome = register(registry, cfg.registry, run_id, checkpoint, eval_set, tags)
    tracking.end_run(uri, run_id)
    return outcome


def holdout_of_training_source(cfg: Config):
    from cifar_ray.data import read_source
    from cifar_ray.split import add_digests, holdout_of

    d = cfg.data
    ds = add_digests(read_source(d.data, synthetic_size=d.synthetic_size, seed=cfg.train.seed)).materialize()
    return holdout_of(ds)


def main(argv: list[str] | None = None, prog: str | None = None) -> None:
    from cifar_ray.cli import parse_args, run_cli

    args = parse_args("registry", argv, prog)

    def run() -> None:
        not_config = ("command", "version", "force", "checkpoint", "verbose", "percent", "shadow", "status", "stop")
        cfg = Config().with_overrides({k: v for k, v in vars(args).items()
                                       if v is not None and k not in not_config and not k.startswith("rule_")})
        if args.command == "register":
            register_checkpoint(cfg, args.checkpoint)
            return
        registry = Registry(tracking.tracking_uri(cfg))
        try:
            if args.command == "list":
                print(list_versions(registry))
            elif args.command == "show":
                print(show_version(registry, args.version))
            elif args.command == "promote":
                decision = promote(registry, cfg.registry, args.version, args.force)
                verdict = "is now champion" if decision.promote else "not promoted"
                print(f"{registry.name} version {args.version} {verdict}: {decision.reason}")
                if not decision.promote:
                    raise SystemExit(1)
            elif args.command == "canary":
                print(canary(registry, args))
            elif args.command == "rollback":
                current, previous = rollback(registry)
                print(f"{registry.name}: champion rolled back from version {current} to version {previous}")
        except (RegistryError, SystemExit):
            raise
        except Exception as e:
            raise TrackingUnavailable(f"registry {registry.uri}: {first_line(e)}") from None

    run_cli(run)


if __name__ == "__main__":
    main()
