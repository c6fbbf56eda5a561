"""A throwaway Ray cluster of separate node processes on this machine, for tests and benchmarks.

Why not ``ray.init()`` alone: that starts one node inside the driver's session, which tests
neither the multi-node path (work items and results crossing node object stores) nor what
happens when a worker of another process dies. ``ray start`` twice gives a head node and a
second node, each its own raylet and object store, the way a real cluster runs.

Why not ``ray stop``: it kills every Ray process on the machine, including other people's.
Each cluster here gets a private ``--temp-dir`` (short: Ray's unix socket paths must stay
under ~107 characters) and its own ports, and :meth:`LocalRayCluster.stop` ends only the
processes whose command line names that directory.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import psutil

__all__ = ["LocalRayCluster", "start_local_cluster"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _ray_cli() -> str:
    """The ``ray`` script of this interpreter's environment (workers then run the same venv)."""
    beside = Path(sys.executable).parent / "ray"
    return str(beside) if beside.is_file() else "ray"


@dataclass
class LocalRayCluster:
    """Handle of a cluster started by :func:`start_local_cluster`."""

    address: str  # host:port of the head's GCS, what ray.init(address=...) takes
    temp_dir: Path
    num_nodes: int
    log: list[str] = field(default_factory=list)

    def processes(self) -> list[psutil.Process]:
        """This cluster's processes (raylets, GCS, agents, workers): those naming its temp dir."""
        mine: list[psutil.Process] = []
        marker = str(self.temp_dir)
        for proc in psutil.process_iter(["cmdline"]):
            try:
                if any(marker in part for part in proc.info["cmdline"] or ()):
                    mine.append(proc)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        seen = {p.pid for p in mine}
        for proc in list(mine):  # workers forked by a raylet may not repeat the temp dir
            try:
                for child in proc.children(recursive=True):
                    if child.pid not in seen:
                        seen.add(child.pid)
                        mine.append(child)
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
        return mine

    def worker_pids(self, title_prefix: str = "ray::") -> list[int]:
        """Pids of this cluster's worker processes whose title starts with ``title_prefix``
        (Ray names an actor's process ``ray::<ClassName>...``)."""
        pids = []
        for proc in self.processes():
            try:
                title = " ".join(proc.cmdline())
            except (psutil.NoSuchProcess, psutil.AccessDenied):
                continue
            if title.startswith(title_prefix):
                pids.append(proc.pid)
        return pids

    def stop(self, timeout_s: float = 3.0) -> None:
        """End this cluster's processes (TERM, then KILL), and remove its temp dir."""
        procs = self.processes()
        for proc in procs:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.terminate()
        _, alive = psutil.wait_procs(procs, timeout=timeout_s)
        for proc in alive:
            with contextlib.suppress(psutil.NoSuchProcess):
                proc.kill()
        psutil.wait_procs(alive, timeout=timeout_s)
        shutil.rmtree(self.temp_dir, ignore_errors=True)

    def __enter__(self) -> LocalRayCluster:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _node_ports() -> list[str]:
    """Every listening port of a node, chosen free, so that two nodes on one host (and other
    people's clusters) do not collide on Ray's fixed defaults."""
    return [
        f"--node-manager-port={_free_port()}",
        f"--object-manager-port={_free_port()}",
        f"--dashboard-agent-listen-port={_free_port()}",
        f"--dashboard-agent-grpc-port={_free_port()}",
        f"--runtime-env-agent-port={_free_port()}",
        f"--metrics-export-port={_free_port()}",
    ]


def start_local_cluster(
    *,
    num_nodes: int = 2,
    cpus_per_node: int = 1,
    object_store_bytes: int = 512 * 1024 * 1024,
    timeout_s: float = 60.0,
) -> LocalRayCluster:
    """Start a head node and ``num_nodes - 1`` more nodes as separate processes; wait until
    ``ray.nodes()`` shows them all alive. The caller stops it (``with`` or :meth:`stop`)."""
    temp_dir = Path(tempfile.mkdtemp(prefix="rb", dir="/tmp"))
    port = _free_port()
    cluster = LocalRayCluster(f"127.0.0.1:{port}", temp_dir, num_nodes)
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    common = [
        "--node-ip-address=127.0.0.1",
        f"--num-cpus={cpus_per_node}",
        f"--object-store-memory={object_store_bytes}",
        f"--temp-dir={temp_dir}",
        "--disable-usage-stats",
        *_node_ports(),
    ]
    head = [
        _ray_cli(),
        "start",
        "--head",
        f"--port={port}",
        "--include-dashboard=false",
        f"--dashboard-port={_free_port()}",
        *common,
    ]
    try:
        _run(head, env, cluster)
        for _ in range(num_nodes - 1):
            _run(
                [
                    _ray_cli(),
                    "start",
                    f"--address={cluster.address}",
                    "--node-ip-address=127.0.0.1",
                    f"--num-cpus={cpus_per_node}",
                    f"--object-store-memory={object_store_bytes}",
                    f"--temp-dir={temp_dir}",
                    "--disable-usage-stats",
                    *_node_ports(),
                ],
                env,
                cluster,
            )
        _wait_for_nodes(cluster, timeout_s)
    except BaseException:
        cluster.stop()
        raise
    return cluster


def _run(cmd: list[str], env: dict[str, str], cluster: LocalRayCluster) -> None:
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120, check=False)
    cluster.log.append(done.stdout + done.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd[:3])} failed:\n{done.stdout}\n{done.stderr}")


def _wait_for_nodes(cluster: LocalRayCluster, timeout_s: float) -> None:
    """Poll the GCS from a short-lived subprocess (this process must stay free to ``ray.init``
    with its own settings later)."""
    probe = (
        "import ray, logging;"
        f"ray.init(address={cluster.address!r}, logging_level=logging.ERROR, log_to_driver=False);"
        "print(sum(1 for n in ray.nodes() if n['Alive']))"
    )
    deadline = time.monotonic() + timeout_s
    alive = 0
    while time.monotonic() < deadline:
        done = subprocess.run(
            [sys.executable, "-c", probe], capture_output=True, text=True, timeout=60, check=False
        )
        lines = done.stdout.strip().splitlines()
        alive = int(lines[-1]) if lines and lines[-1].isdigit() else 0
        if alive >= cluster.num_nodes:
            return
        time.sleep(0.5)
    raise TimeoutError(
        f"only {alive} of {cluster.num_nodes} Ray nodes came up at {cluster.address}"
    )
