"""One real `ttc-vllm serve` process per test session, shared by every server test
(start-up costs 20-60 s of CPU here): the testbed policy with the DeepSeek-R1 reasoning
parser and, as its start-up PRM, the testbed's exact checker ttc_vllm.testbed.oracle_prm
(TTC_VLLM_PRM=python:...), so every strategy is reachable. The fixtures `server` and
`client` (tests/conftest.py) wrap `start_server` and `make_client`."""
from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

ROOT = Path(__file__).resolve().parents[1]
SERVED_NAME = "ttc-testbed"  # matches the "testbed" effort table
HARD = "512+377+804+219+660+931+145=?"  # 6 additions: ~100 thinking tokens when solved
EASY = "3+4=?"
BLOCK = 32  # CPU attention needs a multiple of 32; small so short traces fill blocks
MAX_SEARCH_WORK = 8192
MAX_CONCURRENT_SEARCHES = 2
MAX_BODY_BYTES = 2 << 20
STARTUP_TIMEOUT_S = float(os.environ.get("TTC_VLLM_SERVER_TIMEOUT", "600"))


def policy_dir() -> str:
    """TTC_VLLM_POLICY, else the shipped policy, else the training run's output."""
    if os.environ.get("TTC_VLLM_POLICY"):
        return os.environ["TTC_VLLM_POLICY"]
    from ttc_vllm.testbed import policy_path

    shipped = policy_path()
    return str(shipped) if (shipped / "config.json").exists() else "/tmp/train/policy"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def max_model_len(model: str) -> int:
    config = json.loads(Path(model, "config.json").read_text())
    return min(1024, int(config.get("max_position_embeddings", 1024)))


def server_command(model: str, port: int) -> list[str]:
    return [sys.executable, "-m", "ttc_vllm.cli", "serve", model,
            "--host", "127.0.0.1", "--port", str(port), "--served-model-name", SERVED_NAME,
            "--enforce-eager", "--kv-cache-memory-bytes", str(512 << 20), "--block-size", str(BLOCK),
            "--max-model-len", str(max_model_len(model)), "--max-num-seqs", "64", "--seed", "0",
            "--reasoning-parser", "deepseek_r1", "--enable-prompt-tokens-details",
            "--uvicorn-log-level", "warning"]


class Server:
    def __init__(self, url: str, process: subprocess.Popen, log: Path):
        self.url = url
        self.process = process
        self.log = log

    def metrics(self, label: str = "") -> dict[str, float]:
        """Prometheus samples summed by metric name, over the samples whose labels contain
        `label` (e.g. 'finished_reason="abort"')."""
        text = httpx.get(f"{self.url}/metrics", timeout=120).text   # slow under load, not wrong
        out: dict[str, float] = {}
        for line in text.splitlines():
            m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
            if not m or label not in (m.group(2) or ""):
                continue
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
        return out


def start_server(tmp_path_factory):
    """Yields a healthy Server; stops its process group afterwards."""
    model = policy_dir()
    if not Path(model, "config.json").exists():
        pytest.skip(f"no testbed policy at {model}")
    port = free_port()
    env = {**os.environ,
           "TTC_VLLM_PRM": "python:ttc_vllm.testbed.oracle_prm:OraclePRM",
           "TTC_VLLM_MAX_N": "64",
           # room for the disconnect test's long MCTS search (beam_width x rollouts)
           "TTC_VLLM_MAX_SEARCH_WORK": str(MAX_SEARCH_WORK),
           "TTC_VLLM_MAX_CONCURRENT_SEARCHES": str(MAX_CONCURRENT_SEARCHES),
           "TTC_VLLM_MAX_BODY_BYTES": str(MAX_BODY_BYTES),
           "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    log = tmp_path_factory.mktemp("ttc-server") / "server.log"
    with open(log, "wb") as sink:
        process = subprocess.Popen(server_command(model, port), cwd=ROOT, env=env, stdout=sink,
                                   stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(process, url, log)
        yield Server(url, process, log)
    finally:
        stop_process_group(process)


def wait_healthy(process: subprocess.Popen, url: str, log: Path,
                 timeout_s: float = STARTUP_TIMEOUT_S) -> None:
    """Until `url`/health answers 200; fails with the log's tail if the server exits first
    or stays unhealthy past `timeout_s` (a failure guard for a server that never comes up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        if process.poll() is not None:
            pytest.fail(f"server exited with {process.returncode}:\n{log.read_text()[-4000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        if time.monotonic() > deadline:
            pytest.fail(f"server not healthy after {timeout_s}s:\n{log.read_text()[-4000:]}")
        time.sleep(1)


def stop_process_group(process: subprocess.Popen) -> None:
    if process.poll() is not None:
        return
    try:
        os.killpg(process.pid, signal.SIGTERM)
        process.wait(timeout=30)
    except subprocess.TimeoutExpired:
        os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)
    except ProcessLookupError:
        pass


def make_client(server):
    import openai

    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=300)
