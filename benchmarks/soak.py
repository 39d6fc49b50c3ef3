"""Soak: a real `ttc-vllm serve` under mixed loopback traffic for a stated time.

The mix (weights per request): plain chat, budgeted (max_think + answer prefix), halted
(token-confidence halting), server-side search (majority n=4 and beam n=4), streaming with a
budget, and ~10 % client disconnects (a streaming or search request dropped after its
first bytes or a random short wait). Workers keep `--concurrency` requests in flight.

Reported: requests and errors per kind (a server error is any 5xx, a connection the server
broke, or an unexpected status), latency p50/p95/p99 per kind, RSS of every process of the
server's tree sampled over time (growth = mean of the last minute over the mean of the
first minute after `--warmup` seconds), crashes (the server process exiting), and whether
the engine is back to idle after the load (no running or waiting request, KV use 0) with
how long it took. Targets (issue 16): 0 server errors, 0 crashes, RSS growth of the API and
policy processes (vLLM's engine core and its model-runner worker) < 5 % after warm-up.

Prints a table, writes benchmarks/results/soak.json (+ soak.png).
Usage: python benchmarks/soak.py [--minutes 10] [--concurrency 6] [--warmup 120]
"""
from __future__ import annotations

import asyncio
import os
import random
import re
import statistics
import sys
import time
from pathlib import Path

import httpx

if __package__ in (None, ""):  # `python benchmarks/NAME.py`: import `benchmarks` from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import harness

ORACLE_PRM = "python:ttc_vllm.testbed.oracle_prm:OraclePRM"
QUESTIONS = ["3+4=?", "12+30=?", "512+377=?", "804+219+660=?", "512+377+804+219+660=?"]
# kind -> weight; "disconnect" drops its request early on purpose
MIX = {"plain": 25, "budgeted": 20, "halted": 15, "search_majority": 10, "search_beam": 5,
       "streaming": 15, "disconnect": 10}


def body_for(kind: str, rng: random.Random) -> dict:
    body = {"model": harness.SERVED, "messages": [{"role": "user", "content": rng.choice(QUESTIONS)}],
            "max_tokens": 160, "temperature": 0.8, "seed": rng.randrange(1 << 30)}
    if kind == "budgeted":
        body["ttc"] = {"max_think": rng.choice([24, 40, 64]), "answer_prefix": "Final Answer:"}
    elif kind == "halted":
        body["ttc"] = {"halting": {"signal": "token_confidence", "threshold": 12.0, "window": 16,
                                   "min_tokens": 8}}
    elif kind == "search_majority":
        body["ttc"] = {"search": {"strategy": "majority", "n": 4}}
    elif kind == "search_beam":
        body["ttc"] = {"search": {"strategy": "beam", "n": 4, "beam_width": 2, "max_steps": 8}}
    elif kind == "streaming":
        body["ttc"] = {"max_think": 40}
        body["stream"] = True
    elif kind == "disconnect":
        if rng.random() < 0.5:
            body["ttc"] = {"search": {"strategy": "majority", "n": 4}}
        else:
            body["ttc"], body["stream"] = {"max_think": 64}, True
    return body


class Tally:
    def __init__(self):
        self.latency: dict[str, list[float]] = {k: [] for k in MIX}
        self.errors: dict[str, list[str]] = {k: [] for k in MIX}
        self.statuses: dict[str, dict[int, int]] = {k: {} for k in MIX}
        self.rejected_429 = 0

    def count(self, kind: str, status: int) -> None:
        self.statuses[kind][status] = self.statuses[kind].get(status, 0) + 1


async def one_request(client: httpx.AsyncClient, url: str, kind: str, rng: random.Random,
                      tally: Tally) -> None:
    body = body_for(kind, rng)
    start = time.perf_counter()
    try:
        if kind == "disconnect":
            # leave after the first bytes or after a random short wait, whichever comes first
            async def partial():
                async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                    async for _ in r.aiter_bytes():
                        return r.status_code
                    return r.status_code
            try:
                status = await asyncio.wait_for(partial(), timeout=rng.uniform(0.05, 1.5))
            except asyncio.TimeoutError:
                status = 0   # dropped before any byte: the disconnect itself
            tally.count(kind, status)
            if status >= 500:
                tally.errors[kind].append(f"status {status}")
            return
        if body.get("stream"):
            async with client.stream("POST", f"{url}/v1/chat/completions", json=body) as r:
                text = b"".join([chunk async for chunk in r.aiter_bytes()])
            status = r.status_code
            ok = status == 200 and text.rstrip().endswith(b"data: [DONE]")
        else:
            r = await client.post(f"{url}/v1/chat/completions", json=body)
            status = r.status_code
            ok = status == 200 and r.json()["choices"][0]["finish_reason"] in ("stop", "length")
        tally.count(kind, status)
        if status == 429:   # the concurrent-search cap: an answer, not an error
            tally.rejected_429 += 1
        elif not ok:
            tally.errors[kind].append(f"status {status}")
        else:
            tally.latency[kind].append(time.perf_counter() - start)
    except (httpx.HTTPError, ValueError, KeyError) as e:
        tally.count(kind, -1)
        tally.errors[kind].append(f"{type(e).__name__}: {e}")


async def drive(url: str, seconds: float, concurrency: int, seed: int, tally: Tally) -> None:
    kinds, weights = list(MIX), list(MIX.values())
    deadline = time.monotonic() + seconds
    limits = httpx.Limits(max_connections=concurrency * 2)
    async with httpx.AsyncClient(timeout=600, limits=limits) as client:
        async def worker(w: int) -> None:
            rng = random.Random(seed * 1000 + w)
            while time.monotonic() < deadline:
                await one_request(client, url, rng.choices(kinds, weights)[0], rng, tally)

        await asyncio.gather(*(worker(w) for w in range(concurrency)))


def process_tree(pid: int) -> dict[str, object]:
    """name -> psutil.Process for the server (api), its engine core and other children."""
    import psutil

    root = psutil.Process(pid)
    out: dict[str, object] = {"api": root}
    for child in root.children(recursive=True):
        try:
            title = " ".join(child.cmdline()) or child.name()
        except psutil.Error:
            continue
        if "EngineCore" in title:
            name = "engine_core"   # vLLM titles its engine process VLLM::EngineCore
        elif "VLLM::Worker" in title:
            name = "worker"        # the policy's model runner (the logits processor runs here)
        elif "resource_tracker" in title:
            name = "resource_tracker"
        else:
            name = f"{Path(title.split()[0]).name}_{child.pid}"
        out.setdefault(name, child)
    return out


async def sample_rss(pid: int, seconds: float, every_s: float, out: list[dict]) -> None:
    import psutil

    start = time.monotonic()
    while time.monotonic() - start < seconds:
        row = {"t_s": round(time.monotonic() - start, 1)}
        for name, proc in process_tree(pid).items():
            try:
                row[name] = proc.memory_info().rss
            except psutil.Error:
                pass
        out.append(row)
        await asyncio.sleep(every_s)


def metrics(url: str) -> dict[str, float]:
    text = httpx.get(f"{url}/metrics", timeout=30).text
    out: dict[str, float] = {}
    for line in text.splitlines():
        m = re.match(r"^([a-zA-Z_:][\w:]*)(\{[^}]*\})?\s+(\S+)$", line)
        if m:
            out[m.group(1)] = out.get(m.group(1), 0.0) + float(m.group(3))
    return out


def wait_idle(url: str, timeout_s: float) -> tuple[bool, float, dict[str, float]]:
    start = time.monotonic()
    while True:
        m = metrics(url)
        idle = (m.get("vllm:num_requests_running", 1) == 0 and m.get("vllm:num_requests_waiting", 1) == 0
                and m.get("vllm:kv_cache_usage_perc", 1) == 0)
        waited = time.monotonic() - start
        if idle or waited > timeout_s:
            return idle, waited, {k: m.get(k) for k in ("vllm:num_requests_running",
                                                         "vllm:num_requests_waiting",
                                                         "vllm:kv_cache_usage_perc")}
        time.sleep(0.5)


def rss_growth(samples: list[dict], warmup_s: float, window_s: float = 60.0) -> dict[str, dict]:
    """Per process: mean RSS of the first `window_s` after warm-up vs of the last `window_s`."""
    end = samples[-1]["t_s"]
    out = {}
    names = sorted({k for row in samples for k in row if k != "t_s"})
    for name in names:
        first = [r[name] for r in samples if name in r and warmup_s <= r["t_s"] < warmup_s + window_s]
        last = [r[name] for r in samples if name in r and r["t_s"] >= end - window_s]
        if first and last:
            a, b = statistics.mean(first), statistics.mean(last)
            out[name] = {"after_warmup_mib": a / 2**20, "last_mib": b / 2**20,
                         "growth_pct": 100.0 * (b - a) / a}
    return out


def percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    values = sorted(values)
    return values[min(len(values) - 1, int(round(q / 100 * (len(values) - 1))))]


def plot(samples: list[dict], tally: Tally, path: Path, warmup_s: float) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(12, 4.5))
    names = sorted({k for row in samples for k in row if k != "t_s"})
    for name in names:
        pts = [(r["t_s"] / 60, r[name] / 2**20) for r in samples if name in r]
        left.plot(*zip(*pts), label=name)
    left.axvline(warmup_s / 60, color="grey", ls=":", label="end of warm-up")
    left.set_xlabel("minutes")
    left.set_ylabel("RSS (MiB)")
    left.set_title("RSS per process of ttc-vllm serve")
    left.legend(fontsize=7)
    kinds = [k for k in MIX if tally.latency[k]]
    right.boxplot([tally.latency[k] for k in kinds], tick_labels=kinds, showfliers=False)
    right.set_yscale("log")
    right.set_ylabel("latency (s)")
    right.set_title("latency per request kind (completed requests)")
    right.tick_params(axis="x", rotation=30)
    harness.save_figure(fig, path)


def main(argv: list[str] | None = None) -> int:
    from ttc_vllm.testbed import policy_path

    ap = harness.parser(__doc__)
    ap.add_argument("--model", default=str(policy_path()))
    ap.add_argument("--minutes", type=float, default=10.0)
    ap.add_argument("--warmup", type=float, default=120.0, help="seconds before RSS growth is measured")
    ap.add_argument("--concurrency", type=int, default=6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sample-every", type=float, default=5.0)
    args = ap.parse_args(argv)

    env = {**os.environ, "PYTHONPATH": str(harness.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TTC_VLLM_PRM": ORACLE_PRM}
    server = harness.ServerProcess("ttc-vllm", [sys.executable, "-m", "ttc_vllm.cli", "serve",
                                        *harness.engine_args(args.model, 512)], env)
    try:
        server.wait_healthy(600)
        seconds = args.minutes * 60
        tally, samples = Tally(), []

        async def run():
            await asyncio.gather(drive(server.url, seconds, args.concurrency, args.seed, tally),
                                 sample_rss(server.proc.pid, seconds, args.sample_every, samples))

        asyncio.run(run())
        crashed = server.proc.poll() is not None
        idle, idle_wait, final = (False, 0.0, {}) if crashed else wait_idle(server.url, 120)
        healthy = not crashed and httpx.get(f"{server.url}/health", timeout=10).status_code == 200
    finally:
        server.stop()

    growth = rss_growth(samples, args.warmup)
    rows = []
    for kind in MIX:
        lat = tally.latency[kind]
        rows.append({"kind": kind, "requests": sum(tally.statuses[kind].values()),
                     "statuses": {str(k): v for k, v in sorted(tally.statuses[kind].items())},
                     "errors": len(tally.errors[kind]), "error_examples": tally.errors[kind][:5],
                     "p50_s": percentile(lat, 50), "p95_s": percentile(lat, 95),
                     "p99_s": percentile(lat, 99)})
    errors = sum(r["errors"] for r in rows)
    print(f"{'kind':16s} {'requests':>8s} {'errors':>6s} {'p50 s':>7s} {'p95 s':>7s} {'p99 s':>7s}  statuses")
    for r in rows:
        fmt = lambda v: f"{v:7.2f}" if v is not None else "      -"  # noqa: E731
        print(f"{r['kind']:16s} {r['requests']:8d} {r['errors']:6d} {fmt(r['p50_s'])} {fmt(r['p95_s'])} "
              f"{fmt(r['p99_s'])}  {r['statuses']}")
    print(f"server errors: {errors}; 429 answers: {tally.rejected_429}; crashed: {crashed}; "
          f"healthy after: {healthy}; idle after load: {idle} ({idle_wait:.1f} s) {final}")
    for name, g in growth.items():
        print(f"RSS {name:12s} {g['after_warmup_mib']:8.1f} MiB after warm-up -> {g['last_mib']:8.1f} MiB "
              f"at the end: {g['growth_pct']:+.2f} %")
    png = harness.RESULTS / "soak.png"
    plot(samples, tally, png, args.warmup)
    targets = {"server_errors": errors == 0, "crashes": not crashed and healthy,
               "idle_after": idle,
               "rss_growth_api_lt_5pct": growth.get("api", {}).get("growth_pct", 99) < 5,
               "rss_growth_engine_core_lt_5pct": growth.get("engine_core", {}).get("growth_pct", 99) < 5,
               "rss_growth_worker_lt_5pct": growth.get("worker", {}).get("growth_pct", 99) < 5}
    path = harness.write_result("soak", {
        "settings": vars(args), "mix": MIX, "rows": rows, "server_errors": errors,
        "rejected_429": tally.rejected_429, "crashed": crashed, "healthy_after": healthy,
        "idle_after": idle, "idle_wait_s": idle_wait, "final_gauges": final,
        "rss_growth": growth, "rss_samples": samples, "targets_met": targets, "plot": png.name})
    print(f"targets: {targets}\nwrote {path} and {png}")
    return 0 if all(targets.values()) else 1


if __name__ == "__main__":
    raise SystemExit(main())
