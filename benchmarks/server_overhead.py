"""What the sampling controller costs a vLLM server, and what serving search costs.

1. Plain-request throughput (requests without `ttc`) of vanilla vLLM vs `ttc-vllm serve`
   (sampling controller + logits processor), both servers up at once with identical engine
   settings and driven in alternating rounds with the same load, so machine noise hits both
   alike. Reported: completion tokens/s per server, the ratio (median over rounds). The
   ttc-vllm server is also measured with single-trace controls on every request.
   Note: vLLM always loads `vllm.logits_processors` entry points, so once ttc-vllm is
   installed "vanilla" carries the logits processor too (idle for requests without ttc).
2. Search latency through the server (one HTTP request per problem) vs the same strategy,
   problems and seeds run offline (`run_search` over `OfflineStepGenerator` on an offline
   `LLM`); both use the testbed's oracle PRM (an exact checker), so the comparison is about serving.

Prints a table, writes benchmarks/results/server_overhead.json (+ .png).
Usage: python benchmarks/server_overhead.py [--model DIR] [--rounds 5] [--requests 64]
"""
from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from pathlib import Path

import httpx

if __package__ in (None, ""):  # `python benchmarks/NAME.py`: import `benchmarks` from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import harness

ORACLE_PRM = "python:ttc_vllm.testbed.oracle_prm:OraclePRM"
STRATEGIES = {
    "majority": {"strategy": "majority", "n": 8},
    "best_of_n": {"strategy": "best_of_n", "n": 8},
    "beam": {"strategy": "beam", "n": 8, "beam_width": 2, "max_steps": 16},
}


def prompts(count: int, tier: str = "medium", seed: int = 7):
    from ttc_vllm.testbed import task

    return task.generate(tier, count, seed)


async def load_round(url: str, problems, concurrency: int, max_tokens: int, ttc: dict | None) -> dict:
    """Send every problem once (greedy-free sampling, ignore_eos: fixed token counts)."""
    from ttc_vllm.testbed import task

    sem = asyncio.Semaphore(concurrency)
    tokens = 0
    async with httpx.AsyncClient(timeout=600) as client:
        async def one(i, problem):
            nonlocal tokens
            body = {"model": harness.SERVED, "prompt": task.prompt(problem), "max_tokens": max_tokens,
                    "temperature": 0.8, "seed": i, "ignore_eos": True}
            if ttc is not None:
                body["ttc"] = ttc
            async with sem:
                r = await client.post(f"{url}/v1/completions", json=body)
            r.raise_for_status()
            tokens += r.json()["usage"]["completion_tokens"]

        start = time.perf_counter()
        await asyncio.gather(*(one(i, p) for i, p in enumerate(problems)))
        wall = time.perf_counter() - start
    return {"tokens": tokens, "wall_s": wall, "tokens_per_s": tokens / wall,
            "requests_per_s": len(problems) / wall}


def search_latency_server(url: str, problems, strategy: dict, max_tokens: int) -> list[dict]:
    out = []
    with httpx.Client(timeout=600) as client:
        for i, problem in enumerate(problems):
            body = {"model": harness.SERVED, "messages": [{"role": "user", "content": problem.question.removeprefix("Q: ").strip()}],
                    "max_tokens": max_tokens, "seed": 100 + i, "ttc": {"search": strategy}}
            start = time.perf_counter()
            r = client.post(f"{url}/v1/chat/completions", json=body)
            latency = time.perf_counter() - start
            r.raise_for_status()
            usage = r.json()["ttc"]
            out.append({"latency_s": latency, "answer": usage["answers"][0],
                        "generated_tokens": usage["generated_tokens"],
                        "cached_prompt_tokens": usage["cached_prompt_tokens"]})
    return out


def search_latency_offline(llm, problems, strategy: dict, max_tokens: int) -> list[dict]:
    from ttc_vllm.answer import answer_extractor
    from ttc_vllm.engine_offline import OfflineStepGenerator
    from ttc_vllm.search import SearchOptions, run_search
    from ttc_vllm.testbed import task
    from ttc_vllm.testbed.oracle_prm import OraclePRM

    tokenizer = llm.get_tokenizer()
    options = SearchOptions.model_validate(strategy)
    out = []
    for i, problem in enumerate(problems):
        ids = tokenizer.encode(task.prompt(problem), add_special_tokens=False)
        generator = OfflineStepGenerator(llm, task.STEP_TAG, seed=100 + i)
        start = time.perf_counter()
        result = asyncio.run(run_search(ids, generator, OraclePRM(), options,
                                        answer_extractor(thinking_open=True)))
        latency = time.perf_counter() - start
        generator.close()
        out.append({"latency_s": latency, "answer": result.answer,
                    "generated_tokens": result.accounting.generated_tokens,
                    "cached_prompt_tokens": result.accounting.cached_prompt_tokens})
    return out


def plot(data: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(11, 4))
    t = data["throughput"]
    names = list(t["servers"])
    ax1.bar(names, [t["servers"][n]["median_tokens_per_s"] for n in names], color=["#888", "#2a7", "#27a"])
    ax1.set_ylabel("completion tokens / s (median of rounds)")
    ax1.set_title(f"plain requests: ttc-vllm / vanilla = {t['ratio_plain']:.3f}")
    s = data["search"]
    strategies = list(s)
    x = range(len(strategies))
    ax2.bar([i - 0.2 for i in x], [s[k]["server_median_s"] for k in strategies], 0.4, label="server (HTTP)")
    ax2.bar([i + 0.2 for i in x], [s[k]["offline_median_s"] for k in strategies], 0.4, label="offline LLM")
    ax2.set_xticks(list(x), strategies)
    ax2.set_ylabel("latency per problem, s (median)")
    ax2.set_title("search latency")
    ax2.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main(argv: list[str] | None = None) -> dict:
    from ttc_vllm.testbed import policy_path

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default=os.environ.get("TTC_VLLM_POLICY", str(policy_path())))
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--requests", type=int, default=64, help="plain requests per round")
    ap.add_argument("--concurrency", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--search-problems", type=int, default=5)
    ap.add_argument("--name", default="server_overhead")
    args = ap.parse_args(argv)
    import json

    max_model_len = min(1024, json.loads(Path(args.model, "config.json").read_text())
                        .get("max_position_embeddings", 1024))
    env = {**os.environ, "PYTHONPATH": str(harness.ROOT) + os.pathsep + os.environ.get("PYTHONPATH", ""),
           "TTC_VLLM_PRM": ORACLE_PRM}
    env.pop("VLLM_PLUGINS", None)
    vanilla = harness.ServerProcess("vanilla", [sys.executable, "-m", "vllm.entrypoints.launchers.api_server.entry",
                                        "--model", *harness.engine_args(args.model, max_model_len)], env)
    ttc = harness.ServerProcess("ttc-vllm", [sys.executable, "-m", "ttc_vllm.cli", "serve",
                                     *harness.engine_args(args.model, max_model_len)], env)
    rounds: dict[str, list[dict]] = {"vanilla": [], "ttc-vllm": [], "ttc-vllm + max_think": []}
    problems = prompts(args.requests)
    search_problems = prompts(args.search_problems, seed=11)
    search: dict[str, dict] = {}
    try:
        vanilla.wait_healthy(900)
        ttc.wait_healthy(900)
        targets = [("vanilla", vanilla.url, None), ("ttc-vllm", ttc.url, None),
                   ("ttc-vllm + max_think", ttc.url, {"max_think": 32})]
        for _, url, extra in targets:  # warm-up
            asyncio.run(load_round(url, problems[:8], args.concurrency, args.max_tokens, extra))
        for r in range(args.rounds):
            order = targets if r % 2 == 0 else targets[::-1]
            for name, url, extra in order:
                rounds[name].append(asyncio.run(load_round(url, problems, args.concurrency,
                                                           args.max_tokens, extra)))
                print(f"round {r} {name:22s} {rounds[name][-1]['tokens_per_s']:8.0f} tok/s", flush=True)
        vanilla.stop()
        for name, strategy in STRATEGIES.items():
            search[name] = {"server": search_latency_server(ttc.url, search_problems, strategy, 400)}
    finally:
        vanilla.stop()
        ttc.stop()

    from ttc_vllm.engine import make_llm

    llm = make_llm(args.model, kv_cache_memory_bytes=512 << 20, max_model_len=max_model_len,
                   max_num_seqs=64)
    for name, strategy in STRATEGIES.items():
        search_latency_offline(llm, search_problems[:1], strategy, 400)  # warm-up
        search[name]["offline"] = search_latency_offline(llm, search_problems, strategy, 400)

    servers = {name: {"median_tokens_per_s": statistics.median(r["tokens_per_s"] for r in rs),
                      "rounds": rs} for name, rs in rounds.items()}
    ratios = [b["tokens_per_s"] / a["tokens_per_s"] for a, b in zip(rounds["vanilla"], rounds["ttc-vllm"])]
    data = {
        "config": vars(args),
        "throughput": {"servers": servers, "ratio_plain": statistics.median(ratios),
                       "ratio_per_round": ratios},
        "search": {},
    }
    for name in STRATEGIES:
        srv, off = search[name]["server"], search[name]["offline"]
        data["search"][name] = {
            "strategy": STRATEGIES[name],
            "server_median_s": statistics.median(x["latency_s"] for x in srv),
            "offline_median_s": statistics.median(x["latency_s"] for x in off),
            "same_answers": sum(a["answer"] == b["answer"] for a, b in zip(srv, off)),
            "problems": len(srv), "server": srv, "offline": off,
        }

    print(f"\nplain requests ({args.requests} per round, concurrency {args.concurrency}, "
          f"{args.max_tokens} tokens each, {args.rounds} rounds)")
    print(f"{'server':24s} {'median tok/s':>14s}")
    for name, s in servers.items():
        print(f"{name:24s} {s['median_tokens_per_s']:14.0f}")
    print(f"ratio ttc-vllm / vanilla (median of per-round ratios): {data['throughput']['ratio_plain']:.3f}")
    print(f"\nsearch latency per problem ({args.search_problems} medium problems)")
    print(f"{'strategy':12s} {'server s':>10s} {'offline s':>10s} {'ratio':>7s} {'same answer':>12s}")
    for name, s in data["search"].items():
        print(f"{name:12s} {s['server_median_s']:10.3f} {s['offline_median_s']:10.3f} "
              f"{s['server_median_s'] / s['offline_median_s']:7.2f} {s['same_answers']:>6d}/{s['problems']}")
    path = harness.write_result(args.name, data)
    plot(data, harness.RESULTS / f"{args.name}.png")
    print(f"\nwrote {path} and {harness.RESULTS / (args.name + '.png')}")
    return data


if __name__ == "__main__":
    main()
