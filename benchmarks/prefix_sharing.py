"""Beam search over vLLM prefix caching: cache hits, peak KV blocks and wall time, on vs off.

    python benchmarks/prefix_sharing.py [--problems 16] [--kv-problems 6] [--n 16] [--beam-width 4]
        [--block-size B]

Two policy engines side by side in this process -- prefix caching on and off, both with
ttc-vllm's KVAccountingScheduler, which records the peak number of KV blocks held by
requests from the scheduler's block pool -- and the shipped testbed PRM in a third (vLLM
pooling). Arms alternate problem by problem, so machine load hits both alike.

1. Cache hits: PRM-guided beam search (n candidates per step, n/beam_width beams) on hard
   problems; share of the step requests' prompt tokens that vLLM served from its prefix
   cache (`num_cached_tokens`), and the share that was cacheable at all (vLLM caches full
   blocks only and always recomputes the last prompt token).
2. Peak KV blocks with a long shared prompt: the same beam search, max_steps rounds, on a
   few-shot prompt (solved examples before the question, ~80% of each request's tokens);
   peak blocks held per search, caching off / on (target >= 3x); and the cache-hit share of
   these step requests: with a prompt of realistic length (a system prompt or few-shot
   examples), the part the block size leaves uncached shrinks.
3. Wall time of the beam searches of (1), off / on.
Prints a table, writes benchmarks/results/prefix_sharing.json and prefix_sharing.png.
"""
from __future__ import annotations

import asyncio
import os
import random
import statistics
import sys
import tempfile
import time
from pathlib import Path

if __package__ in (None, ""):  # `python benchmarks/NAME.py`: import `benchmarks` from this checkout
    sys.path[0] = str(Path(__file__).resolve().parents[1])

from benchmarks import harness


def cacheable(prefix_len: int, block_size: int) -> int:
    """Prompt tokens vLLM can serve from cache at best: full blocks, never the last token."""
    return ((prefix_len - 1) // block_size) * block_size


class CountingGenerator:
    """Wraps a StepGenerator and records the prefix length of every engine request."""

    def __init__(self, inner):
        self.inner = inner
        self.prefix_lengths: list[int] = []

    async def generate_steps(self, prefixes, n, params):
        self.prefix_lengths.extend(len(p) for p in prefixes)
        return await self.inner.generate_steps(prefixes, n, params)

    async def complete(self, prefixes, n, params):
        self.prefix_lengths.extend(len(p) for p in prefixes)
        return await self.inner.complete(prefixes, n, params)


def main() -> None:
    ap = harness.parser(__doc__)
    ap.add_argument("--problems", type=int, default=16, help="hard problems for cache hits / wall time")
    ap.add_argument("--kv-problems", type=int, default=6, help="long-prompt searches for peak KV")
    ap.add_argument("--n", type=int, default=16)
    ap.add_argument("--beam-width", type=int, default=4)
    ap.add_argument("--kv-max-steps", type=int, default=3)
    ap.add_argument("--shots", type=int, default=2, help="solved examples in the long prompt")
    ap.add_argument("--seed", type=int, default=20_000)
    ap.add_argument("--block-size", type=int, default=None, help="KV block size (default: ttc_vllm.engine's)")
    a = ap.parse_args()

    from ttc_vllm_plugins.kv_accounting import PEAK_FILE_ENV, read_peak

    from ttc_vllm.engine import make_llm
    from ttc_vllm.engine_offline import OfflineStepGenerator
    from ttc_vllm.prm.scorers import make_scorer
    from ttc_vllm.search import SearchOptions, run_search
    from ttc_vllm.testbed import policy_path, prm_scorer_config, task
    from ttc_vllm.testbed.task import STEP_TAG

    t0 = time.time()
    tmp = Path(tempfile.mkdtemp(prefix="ttc-kv-"))
    arms = {}
    for name, caching in (("on", True), ("off", False)):
        peak_file = tmp / f"peak_{name}.json"
        os.environ[PEAK_FILE_ENV] = str(peak_file)  # read by the engine core it spawns
        extra = {"block_size": a.block_size} if a.block_size else {}
        llm = make_llm(str(policy_path()), enable_prefix_caching=caching,
                       kv_cache_memory_bytes=256 << 20, max_num_seqs=256, **extra)
        arms[name] = {"llm": llm, "gen": OfflineStepGenerator(llm, STEP_TAG), "peak_file": peak_file}
    os.environ.pop(PEAK_FILE_ENV, None)
    scorer = make_scorer(prm_scorer_config(engine_kwargs={"kv_cache_memory_bytes": 256 << 20}))
    tokenizer = arms["on"]["llm"].get_tokenizer()
    block_size = arms["on"]["llm"].llm_engine.vllm_config.cache_config.block_size
    opts = SearchOptions(strategy="beam", n=a.n, beam_width=a.beam_width)
    kv_opts = SearchOptions(strategy="beam", n=a.n, beam_width=a.beam_width, max_steps=a.kv_max_steps,
                            max_step_tokens=64)

    async def search(arm, ids, options):
        gen = CountingGenerator(arm["gen"])
        started = time.perf_counter()
        result = await run_search(ids, gen, scorer, options, task.extract_answer)
        return result, time.perf_counter() - started, gen.prefix_lengths

    # 1 + 3: hard problems, normal prompts
    problems = task.generate("hard", a.problems, a.seed)
    per_arm = {name: {"wall": [], "prompt": 0, "cached": 0, "cacheable": 0, "correct": 0,
                      "generated": 0} for name in arms}
    for i, problem in enumerate(problems):
        ids = tokenizer.encode(task.prompt(problem), add_special_tokens=False)
        order = ("on", "off") if i % 2 == 0 else ("off", "on")
        for name in order:
            result, wall, lengths = asyncio.run(search(arms[name], ids, opts))
            s = per_arm[name]
            s["wall"].append(wall)
            s["prompt"] += result.accounting.prompt_tokens
            s["cached"] += result.accounting.cached_prompt_tokens
            s["cacheable"] += sum(cacheable(n, block_size) for n in lengths)
            s["generated"] += result.accounting.generated_tokens
            s["correct"] += task.is_correct(problem, result.text)

    # 2: long shared prompt, peak KV blocks per search
    rng = random.Random(a.seed)
    kv_rows = []
    for i in range(a.kv_problems):
        examples = task.generate("medium", a.shots, a.seed + 1000 + i)
        question = task.generate("hard", 1, a.seed + 2000 + i)[0]
        ids = tokenizer.encode(task.few_shot_prompt(question, examples, rng), add_special_tokens=False)
        row = {"prompt_tokens": len(ids)}
        for name in (("on", "off") if i % 2 == 0 else ("off", "on")):
            arm = arms[name]
            arm["peak_file"].unlink(missing_ok=True)  # the scheduler restarts its peak
            result, _, lengths = asyncio.run(search(arm, ids, kv_opts))
            time.sleep(0.05)
            row[f"peak_blocks_{name}"] = read_peak(arm["peak_file"])["peak_used_blocks"]
            row[f"requests_{name}"] = len(lengths)
            row[f"tokens_per_request_{name}"] = (sum(lengths) + result.accounting.generated_tokens) / max(1, len(lengths))
            row[f"prompt_tokens_{name}"] = result.accounting.prompt_tokens
            row[f"cached_prompt_tokens_{name}"] = result.accounting.cached_prompt_tokens
            row[f"cacheable_tokens_{name}"] = sum(cacheable(n, block_size) for n in lengths)
        row["ratio_off_on"] = row["peak_blocks_off"] / max(1, row["peak_blocks_on"])
        kv_rows.append(row)

    summary = {}
    for name, s in per_arm.items():
        summary[name] = {
            "accuracy": s["correct"] / len(problems),
            "wall_s_median": statistics.median(s["wall"]), "wall_s_total": sum(s["wall"]),
            "prompt_tokens": s["prompt"], "cached_prompt_tokens": s["cached"],
            "cached_share": s["cached"] / max(1, s["prompt"]),
            "cacheable_share": s["cacheable"] / max(1, s["prompt"]),
            "generated_tokens": s["generated"],
        }
    ratios = [w_off / w_on for w_on, w_off in zip(per_arm["on"]["wall"], per_arm["off"]["wall"])]
    wall_ratio = statistics.median(ratios)
    kv_ratio = statistics.median(r["ratio_off_on"] for r in kv_rows)
    kv_prompt = sum(r["prompt_tokens_on"] for r in kv_rows)
    kv_cached_share = sum(r["cached_prompt_tokens_on"] for r in kv_rows) / max(1, kv_prompt)
    kv_cacheable_share = sum(r["cacheable_tokens_on"] for r in kv_rows) / max(1, kv_prompt)

    print(f"beam search n={a.n} beam_width={a.beam_width}, {len(problems)} hard problems, "
          f"block size {block_size}")
    print(f"{'arm':<6}{'acc':>7}{'cached/prompt':>15}{'cacheable':>11}{'gen tok':>9}{'wall s (med)':>14}")
    for name, s in summary.items():
        print(f"{name:<6}{s['accuracy']:>7.1%}{s['cached_share']:>15.1%}{s['cacheable_share']:>11.1%}"
              f"{s['generated_tokens']:>9}{s['wall_s_median']:>14.2f}")
    print(f"wall time off/on (median of per-problem ratios): {wall_ratio:.2f}x")
    print(f"\npeak KV blocks, long shared prompt ({a.shots}-shot), {a.kv_max_steps} beam rounds:")
    print(f"{'prompt tok':>11}{'on':>6}{'off':>6}{'off/on':>8}")
    for r in kv_rows:
        print(f"{r['prompt_tokens']:>11}{r['peak_blocks_on']:>6}{r['peak_blocks_off']:>6}{r['ratio_off_on']:>8.2f}")
    print(f"median off/on: {kv_ratio:.2f}x (target >= 3x)")
    print(f"cache hits of these step requests (caching on): {kv_cached_share:.1%} of prompt tokens "
          f"({kv_cacheable_share:.1%} cacheable)")

    name = "prefix_sharing" + (f"_block{a.block_size}" if a.block_size else "")
    path = harness.write_result(name, {
        "n": a.n, "beam_width": a.beam_width, "problems": len(problems), "block_size": block_size,
        "search": opts.model_dump(mode="json"), "arms": summary,
        "wall_ratio_off_on_median": wall_ratio, "wall_ratios": ratios,
        "cached_share_target_met": summary["on"]["cached_share"] >= 0.9,
        "kv": {"shots": a.shots, "max_steps": a.kv_max_steps, "rows": kv_rows,
               "ratio_off_on_median": kv_ratio, "target_met": kv_ratio >= 3.0,
               "cached_share_on": kv_cached_share, "cacheable_share_on": kv_cacheable_share,
               "cached_share_target_met": kv_cached_share >= 0.9},
        "seconds": round(time.time() - t0, 1),
    })
    plot(summary, kv_rows, ratios, harness.RESULTS / f"{name}.png")
    print(f"wrote {path} and {harness.RESULTS / f'{name}.png'}")
    scorer.close()
    for arm in arms.values():
        arm["gen"].close()
        arm["llm"].llm_engine.engine_core.shutdown()


def plot(summary, kv_rows, ratios, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a1, a2, a3) = plt.subplots(1, 3, figsize=(13, 4))
    names = list(summary)
    a1.bar(names, [100 * summary[k]["cached_share"] for k in names], label="served from cache")
    a1.plot(names, [100 * summary[k]["cacheable_share"] for k in names], "k_", markersize=30,
            label="cacheable (full blocks)")
    a1.set_ylabel("% of step-request prompt tokens")
    a1.set_title("prefix-cache hits, beam search")
    a1.legend(fontsize=7)
    xs = range(len(kv_rows))
    a2.bar([x - 0.2 for x in xs], [r["peak_blocks_on"] for r in kv_rows], 0.4, label="caching on")
    a2.bar([x + 0.2 for x in xs], [r["peak_blocks_off"] for r in kv_rows], 0.4, label="caching off")
    a2.set_xlabel("long-prompt search")
    a2.set_ylabel("peak KV blocks held")
    a2.set_title("peak KV blocks, shared long prompt")
    a2.legend(fontsize=7)
    a3.hist(ratios, bins=10)
    a3.set_xlabel("wall time off / on per problem")
    a3.set_title("beam search wall time")
    harness.save_figure(fig, path)


if __name__ == "__main__":
    main()
