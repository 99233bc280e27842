"""The Grafana dashboard and the Prometheus alert rules query only metrics that exist: the
app's own (defined in cifar_ray/, named as Ray exports them) or Ray Serve's."""

import functools
import json
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
DEFINED = re.compile(r"\b(Counter|Gauge|Histogram)\(\s*\"([a-z0-9_]+)\"")
QUERIED = re.compile(r"\bray_[a-z0-9_]+")


def app_metrics() -> set[str]:
    """Every name Prometheus sees for the app's metrics: Ray prefixes `ray_`, adds `_total`
    to a counter and `_bucket`, `_sum`, `_count` to a histogram."""
    suffixes = {"Counter": ["_total"], "Gauge": [""], "Histogram": ["_bucket", "_sum", "_count"]}
    names = set()
    for module in (ROOT / "cifar_ray").glob("*.py"):
        for kind, name in DEFINED.findall(module.read_text()):
            names |= {f"ray_{name}{suffix}" for suffix in suffixes[kind]}
    return names


@functools.cache
def ray_serve_source() -> str:
    import ray.serve

    return "\n".join(source.read_text() for source in Path(ray.serve.__file__).parent.rglob("*.py"))


def ray_serve_defines(name: str) -> bool:
    """A `ray_serve_...` metric: Ray Serve's source names it (without Ray's prefix)."""
    base = re.sub(r"_(bucket|sum|count|total)$", "", name.removeprefix("ray_"))
    return f'"{base}"' in ray_serve_source()


def queries() -> dict[str, list[str]]:
    dashboard = json.loads((ROOT / "cluster/grafana/cifar-ray.json").read_text())
    rules = yaml.safe_load((ROOT / "cluster/prometheus/cifar-ray-rules.yaml").read_text())
    found = {f"panel {p['title']!r}": [t["expr"] for t in p["targets"]] for p in dashboard["panels"]}
    found |= {f"rule {r['alert']}": [r["expr"]] for group in rules["groups"] for r in group["rules"]}
    return found


def test_every_panel_and_rule_queries_a_metric_the_app_or_ray_serve_exports():
    ours = app_metrics()
    assert {"ray_cifar_ray_requests_total", "ray_cifar_ray_stage_ms_bucket", "ray_cifar_ray_traffic_share"} <= ours
    unknown = {}
    for where, exprs in queries().items():
        names = {n for expr in exprs for n in QUERIED.findall(expr)}
        assert names, f"{where} queries no metric"
        missing = {n for n in names if n not in ours and not (n.startswith("ray_serve_") and ray_serve_defines(n))}
        if missing:
            unknown[where] = sorted(missing)
    assert not unknown, unknown


def test_the_rules_cover_errors_latency_and_a_missing_champion():
    alerts = {r["alert"] for g in yaml.safe_load((ROOT / "cluster/prometheus/cifar-ray-rules.yaml").read_text())["groups"]
              for r in g["rules"]}
    assert {"CifarRayNoChampion", "CifarRayDrift", "CifarRayErrorRate", "CifarRayLatencyP99"} <= alerts
