"""The HTTP ingress on this machine: its port, the process holding it, and a clean stop.

Ray Serve's HAProxy ingress runs `haproxy` as a child of its proxy actor. Stopped from
outside (SIGTERM to `serve run`'s process group, as systemd, Docker and Kubernetes stop
things), that child could outlive Ray and keep listening on the port, and the next start
failed with "Failed to bind to address". Here: who holds a port, named in one line before
anything starts; the open-file limit HAProxy needs; and `cifar-ray serve`'s stop, which
leaves the port free.
"""

from __future__ import annotations

import contextlib
import os
import resource
import signal
import threading
import time
from typing import Iterator

from cifar_ray.errors import HostNotReady

# HAProxy sizes its sockets from maxconn (4096 by default, per process and thread group);
# under about this many open files it refuses to start.
HAPROXY_OPEN_FILES = 10_000
SERVE_HAPROXY_FOLDER = "haproxy-serve"  # in the path of the config Ray Serve writes for its HAProxy


def listeners():
    """(port, psutil.Process) of every TCP socket listening on this machine."""
    import psutil

    for conn in psutil.net_connections(kind="tcp"):
        if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.pid:
            with contextlib.suppress(psutil.NoSuchProcess):
                yield conn.laddr.port, psutil.Process(conn.pid)


def port_holder(port: int):
    """The psutil.Process listening on TCP `port` on this machine, or None."""
    return next((process for held, process in listeners() if held == port), None)


def describe(process) -> str:
    """'haproxy (pid 123, started 14:02:11)'."""
    started = time.strftime("%H:%M:%S", time.localtime(process.create_time()))
    return f"{process.name()} (pid {process.pid}, started {started})"


def check_port_free(port: int) -> None:
    """Raise HostNotReady, naming the process, if something other than a running Ray's Serve
    holds `port` (a running cluster's Serve is the one `cifar-ray serve` deploys to)."""
    holder = port_holder(port)
    if holder is not None and not under_a_raylet(holder):
        raise HostNotReady(f"port {port} is held by {describe(holder)}{left_by_serve(holder)}: stop it "
                           f"(kill {holder.pid}) or serve on another port")


def check_no_stale_haproxy() -> None:
    """Raise HostNotReady if an HAProxy that outlived its Ray still listens on this machine:
    Serve's own would fail to bind to its port."""
    import psutil

    for port, process in listeners():
        with contextlib.suppress(psutil.NoSuchProcess):
            if is_serves_haproxy(process) and not under_a_raylet(process):
                raise HostNotReady(f"port {port} is held by {describe(process)}{left_by_serve(process)}: "
                                   f"stop it (kill {process.pid}) before serving")


def is_serves_haproxy(process) -> bool:
    """An HAProxy that Ray Serve started: its config lives in Serve's haproxy-serve folder
    (RAY_SERVE_HAPROXY_CONFIG_FILE_LOC). A machine's own HAProxy is none of Serve's business."""
    return process.name() == "haproxy" and any(SERVE_HAPROXY_FOLDER in arg for arg in process.cmdline())


def left_by_serve(process) -> str:
    return ", left from an earlier Serve" if is_serves_haproxy(process) else ""


def under_a_raylet(process) -> bool:
    """Part of a running Ray node: its proxy actor, or the HAProxy that actor runs. One that
    outlived its Ray hangs from init instead."""
    import psutil

    with contextlib.suppress(psutil.Error):
        return any(parent.name() == "raylet" for parent in process.parents())
    return False


def raise_open_file_limit(needed: int = HAPROXY_OPEN_FILES) -> None:
    """Raise this process's open-file limit to `needed` (Ray and HAProxy inherit it), or say
    in one line why HAProxy would not start."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft >= needed:
        return
    if hard != resource.RLIM_INFINITY and hard < needed:
        raise HostNotReady(f"HAProxy needs an open-file limit of at least {needed:,}; this shell allows {hard:,} "
                      "(ulimit -Hn): raise it, or serve with --ingress proxy")
    resource.setrlimit(resource.RLIMIT_NOFILE, (needed, hard))


@contextlib.contextmanager
def stopped_cleanly(port: int, timeout_s: float = 10.0) -> Iterator[None]:
    """Run the block until Ctrl-C, SIGTERM or SIGHUP; then shut Serve and Ray down, leave
    nothing on `port`, and end the process: status 0, or 130 after Ctrl-C.

    The work happens in the signal handler itself, not in code an exception would unwind
    to: the signal may arrive inside Ray's own calls, which do not all let it through, and a
    SIGTERM to the process group stops the raylet too, after which Ray ends the process
    with status 1 about 15 s later: the shutdown has 10.
    """
    def stop(signum, frame):
        for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):  # no second signal cuts it short
            signal.signal(s, signal.SIG_IGN)
        shut_down(port, timeout_s)
        print("stopped", flush=True)
        os._exit(130 if signum == signal.SIGINT else 0)

    previous = {s: signal.signal(s, stop) for s in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT)}
    try:
        yield
    except BaseException:  # Serve failed to start, say: nothing of it may stay behind either
        shut_down(port, timeout_s)
        raise
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def shut_down(port: int, timeout_s: float) -> None:
    """Free `port` at once, then shut Serve and Ray down, each step bounded in time.

    A SIGTERM to the process group reaches the Ray this process started too; its workers
    then die without stopping the HAProxy they started, which kept the port (and Serve's
    stats and metrics ports). So first HAProxy is told to soft-stop (SIGUSR1: it closes its
    listeners and ends once its open requests are answered); Serve and Ray are shut down only
    if they are still up (else that waits on processes that are gone, until Ray ends this one
    with status 1); and whatever is left of HAProxy is ended.
    """
    import psutil
    import ray
    from ray import serve

    haproxies = [p for p in [port_holder(port)] if p is not None and p.name() == "haproxy"]
    for process in haproxies:
        with contextlib.suppress(psutil.Error):
            process.send_signal(signal.SIGUSR1)
    if not ray_going_down():
        for step in (serve.shutdown, ray.shutdown):
            worker = threading.Thread(target=step, daemon=True)
            worker.start()
            worker.join(timeout_s / 2)
    if (holder := port_holder(port)) is not None and holder.name() == "haproxy":
        haproxies.append(holder)  # started again while Serve went down
    for process in haproxies:
        with contextlib.suppress(psutil.Error):
            process.terminate()
            try:
                process.wait(2)
            except psutil.TimeoutExpired:
                process.kill()


def ray_going_down(grace_s: float = 0.5) -> bool:
    """Whether the Ray that this process started is stopping as well, as under a SIGTERM to
    the whole process group: one of the processes ray.init started here (gcs_server,
    raylet, the dashboard, the log monitor, the autoscaler) has ended within `grace_s`.

    Its dashboard and monitors end within that time; gcs_server and the raylet often take
    longer, and Serve's and Ray's shutdowns then wait on them until their timeouts (10 s).
    """
    import psutil

    started_here = psutil.Process().children()
    time.sleep(grace_s)  # time for them to act on that signal
    try:
        return any(p.status() == psutil.STATUS_ZOMBIE for p in started_here)
    except psutil.NoSuchProcess:  # ended and already reaped
        return True
