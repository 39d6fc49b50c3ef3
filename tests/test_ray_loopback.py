"""A Ray head that ttc-vllm starts listens on loopback only (ttc_vllm.prm.pool.init_ray).

Each test starts the real thing in a child process -- the PRM pool's start-up path, and a
whole `ttc-vllm serve` with TTC_VLLM_PRM=local -- then lists every listening TCP socket and
every unconnected UDP socket of that process's tree (Ray's GCS, raylet, agents and workers
are all its descendants) and asserts that none is bound to a non-loopback address. It first
waits until the Ray processes it knows about are listening, so a listener that binds late is
not missed and an empty list cannot pass by accident.
"""
from __future__ import annotations

import ipaddress
import os
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import httpx
import pytest

psutil = pytest.importorskip("psutil")
pytest.importorskip("ray")

from tests.live_server import (  # noqa: E402
    ROOT, SERVED_NAME, free_port, policy_dir, server_command, stop_process_group, wait_healthy,
)

pytestmark = pytest.mark.ray

# Ray processes that listen once a head with one actor is up (process names as ps shows them).
RAY_LISTENERS = {"gcs_server", "raylet", "ray::DashboardAgent", "ray::RuntimeEnvAgent"}


@dataclass(frozen=True)
class Listener:
    pid: int
    process: str
    kind: str  # "tcp" or "udp"
    ip: str
    port: int

    def __str__(self) -> str:
        return f"{self.process} (pid {self.pid}) {self.kind} {self.ip}:{self.port}"


def listeners(root_pid: int) -> list[Listener]:
    """Listening TCP sockets and unconnected (so: receiving from anyone) UDP sockets of a
    process and all its descendants."""
    root = psutil.Process(root_pid)
    found = []
    for proc in [root, *root.children(recursive=True)]:
        try:
            name = proc.name()
            if name.startswith("python"):  # say which program: "python dashboard.py"
                args = proc.cmdline()
                name = " ".join(os.path.basename(a) for a in args[:1] + args[1:3])
            connections = proc.net_connections(kind="inet")
        except (psutil.NoSuchProcess, psutil.ZombieProcess):
            continue  # exited meanwhile: it listens on nothing
        for c in connections:
            if c.type == socket.SOCK_STREAM and c.status == psutil.CONN_LISTEN:
                found.append(Listener(proc.pid, name, "tcp", c.laddr.ip, c.laddr.port))
            elif c.type == socket.SOCK_DGRAM and not c.raddr:
                found.append(Listener(proc.pid, name, "udp", c.laddr.ip, c.laddr.port))
    return found


def is_loopback(ip: str) -> bool:
    address = ipaddress.ip_address(ip.split("%", 1)[0])
    if address.version == 6 and address.ipv4_mapped is not None:  # ::ffff:127.0.0.1
        address = address.ipv4_mapped
    return address.is_loopback


def wait_for_listeners(process: subprocess.Popen, expected: set[str], timeout_s: float,
                       what: str) -> list[Listener]:
    """Poll until every process named in `expected` listens (Ray starts its agents and
    workers asynchronously), then return the tree's listeners."""
    deadline = time.monotonic() + timeout_s
    while True:
        assert process.poll() is None, f"{what} exited with {process.returncode}"
        found = listeners(process.pid)
        missing = expected - {entry.process for entry in found}
        if not missing:
            return found
        assert time.monotonic() < deadline, (
            f"{what}: no listener of {sorted(missing)} after {timeout_s:g}s; found: "
            + "; ".join(map(str, found)))
        time.sleep(0.5)


def assert_loopback_only(found: list[Listener]) -> None:
    exposed = [str(entry) for entry in found if not is_loopback(entry.ip)]
    assert not exposed, "listening beyond loopback:\n" + "\n".join(exposed)


def clean_env(**extra: str) -> dict[str, str]:
    """This environment without anything that points Ray elsewhere: the defaults are tested."""
    env = {k: v for k, v in os.environ.items()
           if k not in ("TTC_VLLM_RAY_HOST", "RAY_ADDRESS", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER")}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


# The server's PRM start-up path (plugins/prm_config.py `_ray_pool`) with a fake scorer: a
# PRMPool with no address and no Ray running starts its own head.
POOL_SCRIPT = """
import sys
from ttc_vllm.prm.pool import PRMPool
from ttc_vllm.testbed.oracle_prm import OraclePRM

with PRMPool(1, OraclePRM, actor_options={"num_cpus": 0.5}) as pool:
    pool.check()
    print("ready", flush=True)
    sys.stdin.read()  # until the test closes our stdin
"""


@pytest.mark.timeout(240)
def test_the_prm_pools_ray_head_listens_on_loopback_only():
    process = subprocess.Popen([sys.executable, "-c", POOL_SCRIPT], cwd=ROOT, env=clean_env(),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready", "the PRM pool did not start"
        found = wait_for_listeners(process, RAY_LISTENERS | {"ray::ScorerHost"}, 120, "the PRM pool")
        assert_loopback_only(found)
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


# The batch jobs' start-up path (`ttc-vllm job evaluate --ray local`).
JOBS_SCRIPT = """
import sys
from ttc_vllm.jobs.replicas import connect

assert connect("local", num_cpus=1)
print("ready", flush=True)
sys.stdin.read()
"""


@pytest.mark.timeout(240)
def test_the_jobs_ray_head_listens_on_loopback_only():
    process = subprocess.Popen([sys.executable, "-c", JOBS_SCRIPT], cwd=ROOT, env=clean_env(),
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout.readline().strip() == "ready", "Ray did not start"
        assert_loopback_only(wait_for_listeners(process, RAY_LISTENERS, 120, "the jobs' Ray head"))
    finally:
        process.stdin.close()
        try:
            process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def test_ray_host_defaults_to_loopback_and_can_be_set():
    from ttc_vllm.prm.pool import ray_host

    for value in (None, "", " ", "localhost", "127.0.0.1", "127.0.0.2", "::1"):
        env = {} if value is None else {"TTC_VLLM_RAY_HOST": value}
        assert ray_host(env) == "127.0.0.1", value
    assert ray_host({"TTC_VLLM_RAY_HOST": " 10.1.2.3 "}) == "10.1.2.3"


def test_joining_a_cluster_by_address_is_not_overridden():
    from ttc_vllm.prm.pool import init_ray

    calls = []

    class FakeRay:
        def init(self, **kwargs):
            calls.append(kwargs)

    init_ray(FakeRay(), "ray://head:10001", include_dashboard=False)
    assert calls == [{"address": "ray://head:10001", "include_dashboard": False}]


@pytest.mark.server
@pytest.mark.timeout(900)
def test_the_server_with_a_local_prm_listens_on_loopback_only(tmp_path):
    """`ttc-vllm serve` with TTC_VLLM_PRM=local: the server's own process tree -- the API
    server, its engine, and the Ray head with the PRM actor (the testbed PRM in a vLLM
    pooling engine) -- listens on loopback only, and a PRM search is served through it."""
    model = policy_dir()
    if not os.path.exists(os.path.join(model, "config.json")):
        pytest.skip(f"no testbed policy at {model}")
    port = free_port()
    log = tmp_path / "server.log"
    env = clean_env(TTC_VLLM_PRM="local", TTC_VLLM_PRM_ACTORS="1")
    with open(log, "wb") as sink:
        process = subprocess.Popen(server_command(model, port), cwd=ROOT, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url, log)
        # The PRM works over this Ray: a best-of-n search scores its traces on the actor.
        r = httpx.post(f"{url}/v1/chat/completions", timeout=600, json={
            "model": SERVED_NAME, "messages": [{"role": "user", "content": "3+4=?"}],
            "max_tokens": 120, "seed": 0, "ttc": {"search": {"strategy": "best_of_n", "n": 2}}})
        assert r.status_code == 200, r.text
        assert r.json()["ttc"]["prm_calls"] >= 1
        found = wait_for_listeners(process, RAY_LISTENERS | {"ray::ScorerHost"}, 120, "the server")
        assert any(entry.port == port for entry in found), "the API server's own port was not seen"
        assert_loopback_only(found)
    finally:
        stop_process_group(process)
