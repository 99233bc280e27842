"""Cluster: launcher configs and KubeRay manifests validated, and a job on a real 2-node cluster."""

import contextlib
import copy
import os
import re
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
KUBERAY = ROOT / "cluster" / "kuberay"
CRD_FILES = {"RayCluster": "ray.io_rayclusters.yaml", "RayJob": "ray.io_rayjobs.yaml",
             "RayService": "ray.io_rayservices.yaml"}


def validate_launcher_config(config: dict) -> None:
    """What `ray up` does first: fill in the provider's defaults, then check the schema."""
    from ray.autoscaler._private.util import prepare_config, validate_config

    validate_config(prepare_config(config))


@pytest.mark.parametrize("name", ["aws-gpu.yaml", "gcp-gpu.yaml"])
def test_cluster_launcher_configs_pass_rays_own_validation(name):
    config = yaml.safe_load((ROOT / "cluster" / name).read_text())
    validate_launcher_config(config)  # raises on any schema violation
    workers = config["available_node_types"]["gpu_worker"]
    assert workers["min_workers"] == 0 and workers["max_workers"] >= 2
    assert "2.60" in config["docker"]["image"] and "gpu" in config["docker"]["image"]


def test_launcher_validation_catches_a_typo():
    import jsonschema

    config = yaml.safe_load((ROOT / "cluster" / "aws-gpu.yaml").read_text())
    config["available_node_types"]["gpu_worker"]["max_worker"] = 4
    with pytest.raises(jsonschema.ValidationError, match="max_worker"):
        validate_launcher_config(config)


def strict(schema):
    """The CRD schema with unknown fields forbidden, as strict field validation does."""
    schema = copy.deepcopy(schema)
    stack = [schema]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            if "properties" in node and "additionalProperties" not in node \
                    and not node.get("x-kubernetes-preserve-unknown-fields"):
                node["additionalProperties"] = False
            stack.extend(node.values())
        elif isinstance(node, list):
            stack.extend(node)
    return schema


@pytest.fixture(scope="module")
def crd_schemas():
    directory = os.environ.get("KUBERAY_CRD_DIR")
    if not directory:
        pytest.skip("KUBERAY_CRD_DIR is not set")
    schemas = {}
    for kind, filename in CRD_FILES.items():
        # 3.3 MB of YAML: libyaml's parser reads it 7x faster than PyYAML's own (10.8 s of the suite)
        crd = yaml.load((Path(directory) / filename).read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
        (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
        schemas[kind] = strict(version["schema"]["openAPIV3Schema"])
    return schemas


@pytest.mark.parametrize("name", sorted(p.name for p in KUBERAY.glob("ray*.yaml")))
def test_kuberay_manifests_are_valid_against_the_crds(crd_schemas, name):
    import jsonschema

    manifest = yaml.safe_load((KUBERAY / name).read_text())
    assert manifest["apiVersion"] == "ray.io/v1"
    errors = sorted(jsonschema.Draft7Validator(crd_schemas[manifest["kind"]]).iter_errors(manifest),
                    key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{list(e.absolute_path)}: {e.message}" for e in errors[:10])


def test_strict_validation_catches_an_unknown_field(crd_schemas):
    import jsonschema

    manifest = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())
    manifest["spec"]["headGroupSpec"]["rayStartParam"] = {}  # typo of rayStartParams
    assert list(jsonschema.Draft7Validator(crd_schemas["RayCluster"]).iter_errors(manifest))


def test_rayservice_serves_the_same_application_as_serve_config():
    local = yaml.safe_load((ROOT / "serve_config.yaml").read_text())
    service = yaml.safe_load((KUBERAY / "rayservice.yaml").read_text())
    cluster = yaml.safe_load(service["spec"]["serveConfigV2"])
    (local_app,), (cluster_app,) = local["applications"], cluster["applications"]
    # Allowed differences: the registry is a server (MLFLOW_TRACKING_URI), not the local
    # store under storage_path; the proxy binds for the Service.
    assert local_app["args"].pop("storage_path") == "./runs" and "storage_path" not in cluster_app["args"]
    assert cluster_app == local_app
    assert cluster_app["args"]["checkpoint"] == "models:/cifar10-classifier@champion"
    containers = [service["spec"]["rayClusterConfig"]["headGroupSpec"]["template"]["spec"]["containers"][0]]
    containers += [g["template"]["spec"]["containers"][0] for g in service["spec"]["rayClusterConfig"]["workerGroupSpecs"]]
    mlflow_service = next(d for d in yaml.safe_load_all((KUBERAY / "mlflow.yaml").read_text()) if d["kind"] == "Service")
    for container in containers:
        assert {"name": "MLFLOW_TRACKING_URI", "value": f"http://{mlflow_service['metadata']['name']}:5000"} \
            in container["env"]
    assert cluster["proxy_location"] == local["proxy_location"]
    assert cluster["http_options"]["host"] == "0.0.0.0" and local["http_options"]["host"] == "127.0.0.1"
    assert cluster["http_options"]["request_timeout_s"] == local["http_options"]["request_timeout_s"]
    from cifar_ray.serve_deployment import TOKEN_ENV

    token = {"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": "cifar-ray-api-token", "key": "token",
                                                                "optional": True}}}
    assert all(token in container["env"] for container in containers)  # the replicas run on any node


def test_the_cluster_image_turns_on_the_haproxy_ingress():
    from cifar_ray.serve import FAST_INGRESS_ENV

    env_lines = [line for line in (ROOT / "cluster/Dockerfile").read_text().splitlines() if line.startswith("ENV ")]
    assert all(f"{k}={v}" in " ".join(env_lines) for k, v in FAST_INGRESS_ENV.items())


def test_rayjobs_run_the_real_entrypoints_on_the_raycluster():
    cluster = yaml.safe_load((KUBERAY / "raycluster.yaml").read_text())["metadata"]["name"]
    for name, module in (("rayjob-train.yaml", "cifar_ray.train"), ("rayjob-tune.yaml", "cifar_ray.tune")):
        spec = yaml.safe_load((KUBERAY / name).read_text())["spec"]
        assert spec["clusterSelector"]["ray.io/cluster"] == cluster
        assert spec["entrypoint"].startswith(f"python -m {module} ")
        assert "--use-gpu" in spec["entrypoint"] and "--storage-path s3://" in spec["entrypoint"]


# ---------------------------------------------------------------------------------------
# A real two-node cluster on this machine
# ---------------------------------------------------------------------------------------

def free_ports(n: int) -> list[int]:
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def node_ports() -> list[str]:
    """Every port a node listens on, chosen free, so two nodes share one machine."""
    names = ["--node-manager-port", "--object-manager-port", "--metrics-export-port",
             "--dashboard-agent-listen-port", "--dashboard-agent-grpc-port", "--runtime-env-agent-port"]
    ports = free_ports(len(names))
    return [arg for name, port in zip(names, ports) for arg in (f"{name}={port}",)]


def stop_nodes_of(token: str) -> None:
    """Stop only the Ray processes of this cluster: those started with its auth token in their
    environment, and their children (a raylet's agents are started without it). Command lines
    do not tell them all: the agents rename themselves, and the Ray Client server names neither
    the temp dir nor the token. The agents outlive SIGTERM: one left behind kept a core busy
    through the next minute of tests (test_data's took 3x as long)."""
    import psutil

    cluster: dict[int, psutil.Process] = {}  # kept across scans: a dead raylet's agents are no one's children

    def processes() -> list[psutil.Process]:
        for process in psutil.process_iter():
            with contextlib.suppress(psutil.Error):
                if process.environ().get("RAY_AUTH_TOKEN") == token:
                    cluster.update({p.pid: p for p in (process, *process.children(recursive=True))})
        return [p for p in cluster.values() if p.is_running()]

    for stop in (psutil.Process.terminate, psutil.Process.kill):
        for process in processes():
            with contextlib.suppress(psutil.Error):
                stop(process)
        psutil.wait_procs(processes(), timeout=2)


@pytest.fixture
def two_node_cluster(tmp_path):
    """A Ray head and one worker node, started with `ray start`, token authentication on."""
    temp_dir = Path("/tmp") / f"cr{os.getpid()}"  # short: Ray's socket paths have a length limit
    gcs, dashboard, client = free_ports(3)
    # The job's `python` is this venv's, activated or not.
    token = os.urandom(16).hex()
    env = {**os.environ, "RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": token,
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    env.pop("RAY_ADDRESS", None)
    ray = str(Path(sys.executable).parent / "ray")
    common = ["--num-cpus=1", "--node-ip-address=127.0.0.1", "--disable-usage-stats"]
    try:
        subprocess.run([ray, "start", "--head", f"--port={gcs}", f"--dashboard-port={dashboard}",
                        f"--ray-client-server-port={client}", "--dashboard-host=127.0.0.1",
                        f"--temp-dir={temp_dir}", *common, *node_ports()],
                       env=env, check=True, capture_output=True, timeout=120)
        subprocess.run([ray, "start", f"--address=127.0.0.1:{gcs}", f"--temp-dir={temp_dir}",
                        *common, *node_ports()], env=env, check=True, capture_output=True, timeout=120)
        yield f"http://127.0.0.1:{dashboard}", env
    finally:
        stop_nodes_of(token)


def test_training_job_runs_across_two_nodes(two_node_cluster, tmp_path):
    address, env = two_node_cluster
    runs = tmp_path / "runs"
    # No --working-dir here: both nodes share one temp dir on this machine, and the second
    # node's runtime-env agent deleted the job's package folder mid-run (seen: the driver's
    # later imports failed). The venv's editable install is the same code on both nodes.
    submit = subprocess.run(
        [str(Path(sys.executable).parent / "ray"), "job", "submit", "--address", address, "--",
         # Ray merges log lines that differ only in numbers; each worker's line must show.
         "RAY_DEDUP_LOGS=0", "python", "-m", "cifar_ray.train", "--preset", "smoke", "--synthetic-size", "300",
         "--num-workers", "2", "--epochs", "1", "--name", "two-nodes", "--storage-path", str(runs)],
        env=env, capture_output=True, text=True, timeout=420)
    logs = submit.stdout + submit.stderr
    assert submit.returncode == 0 and "succeeded" in logs, logs[-4000:]
    nodes = dict(re.findall(r"worker (\d)/2 on node ([0-9a-f]+)", logs))
    assert set(nodes) == {"0", "1"} and nodes["0"] != nodes["1"], logs[-4000:]
    assert (runs / "two-nodes" / "summary.json").is_file()
    assert (runs / "two-nodes" / "epoch_0001" / "model.keras").is_file()
