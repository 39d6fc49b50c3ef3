"""Every search strategy through the real testbed policy engine (session fixture `llm`) and
the shipped testbed PRM served by vLLM's pooling runner inside a Ray actor pool (local Ray
head in this process, loopback only)."""
from __future__ import annotations

import asyncio
import functools
import time

import pytest

from ttc_vllm.search import STRATEGIES, SearchOptions, StepParams, Trace, run_search
from ttc_vllm.testbed import prm_path, prm_scorer_config, task
from ttc_vllm.testbed.task import STEP_TAG

ray = pytest.importorskip("ray")

pytestmark = [pytest.mark.engine, pytest.mark.ray, pytest.mark.timeout(900)]


def test_the_testbed_prm_is_shipped():
    assert (prm_path() / "config.json").exists() and (prm_path() / "model.safetensors").exists()


@pytest.fixture(scope="module")
def prm_pool():
    from ttc_vllm.prm.pool import PRMPool, init_ray
    from ttc_vllm.prm.scorers import make_scorer

    init_ray(ray, "local", include_dashboard=False, num_cpus=2, log_to_driver=False)   # loopback only
    config = prm_scorer_config(engine_kwargs={"kv_cache_memory_bytes": 128 << 20})
    pool = PRMPool(1, functools.partial(make_scorer, config), max_batch=64, max_restarts=2,
                   max_task_retries=2, actor_options={"num_cpus": 1}, ready_timeout_s=300)
    yield pool
    pool.close()
    ray.shutdown()


@pytest.fixture(scope="module")
def generator(llm):
    from ttc_vllm.engine_offline import OfflineStepGenerator
    from ttc_vllm.jobs.replicas import CoalescingGenerator

    gen = OfflineStepGenerator(llm, STEP_TAG)
    yield CoalescingGenerator(gen)  # concurrent searches share engine calls, as in jobs
    gen.close()


def encode(tokenizer, text):
    return tuple(tokenizer.encode(text, add_special_tokens=False))


def test_served_prm_ranks_right_steps_above_wrong_ones(generator, prm_pool, tokenizer):
    """The shipped PRM, served by vLLM in a Ray actor, on fresh policy traces of unseen
    problems: step-level AUC against the testbed's exact ground truth (0.875 on the training
    run's held-out split; 0.78 leaves room for a sample of ~70 traces)."""
    from ttc_vllm.testbed.prm_data import testbed_prefix_correct
    from ttc_vllm.testbed.train_prm import roc_auc

    problems = task.generate("hard", 24, seed=61)
    prompts = [encode(tokenizer, task.prompt(p)) for p in problems]
    done = asyncio.run(generator.complete(prompts, 3, StepParams(temperature=1.0, max_tokens=400)))
    traces, labels = [], []
    for prompt, problem, samples in zip(prompts, problems, done):
        for steps in samples:
            if steps and steps[-1].finished:
                traces.append(Trace(prompt, steps))
                texts = [s.text for s in steps]
                labels.append([testbed_prefix_correct(problem, texts[:k + 1]) for k in range(len(texts))])
    scores = asyncio.run(prm_pool.score(traces))
    assert all(len(s) == len(t.steps) for s, t in zip(scores, traces))
    assert all(0.0 <= x <= 1.0 for s in scores for x in s)
    flat = [x for s in scores for x in s]
    ys = [y for ls in labels for y in ls]
    assert 0 < sum(ys) < len(ys)
    assert roc_auc(flat, ys) >= 0.78


def test_served_prm_scores_a_slip_and_every_later_step_lower(prm_pool, tokenizer):
    """Hand-written traces, clean and with one wrong sum digit at step k: the served PRM
    scores steps before k the same and every step from k on lower."""
    import random

    from ttc_vllm.search import Step

    def trace(problem, lines):
        steps = [Step(encode(tokenizer, f"\n{line}{task.STEP_TAG}"), line, False) for line in lines]
        return Trace(encode(tokenizer, task.prompt(problem)), steps)

    pairs = []
    for i, problem in enumerate(task.generate("medium", 6, seed=71)):
        lines = task.solve(problem, random.Random(i), overthink_prob=0.0).steps
        k = len(lines) // 2
        lhs, total = lines[k].split("=")
        bad = lines[:k] + [f"{lhs}={total[:-1]}{(int(total[-1]) + 3) % 10}"] + lines[k + 1:]
        pairs.append((k, trace(problem, lines), trace(problem, bad)))
    scores = asyncio.run(prm_pool.score([t for _, a, b in pairs for t in (a, b)]))
    for n, (k, _, _) in enumerate(pairs):
        clean, slipped = scores[2 * n], scores[2 * n + 1]
        assert slipped[:k] == pytest.approx(clean[:k], abs=1e-4)
        assert all(b < a - 0.05 for a, b in zip(clean[k:], slipped[k:])), (clean, slipped)


@pytest.mark.parametrize("strategy", list(STRATEGIES))
def test_strategy_on_the_real_engine_and_prm(strategy, generator, prm_pool, tokenizer):
    """Each strategy end to end: easy problems are answered right; hard problems produce a
    finished, answered trace with the accounting vLLM and the PRM reported (tree searches
    continue prefixes the engine has seen, so their step requests hit the prefix cache)."""
    n, width = 4, 2
    options = SearchOptions(strategy=strategy, n=n, beam_width=width, temperature=0.8,
                            mcts={"rollouts": 12})
    easy = task.generate("easy", 2, seed=41)
    hard = task.generate("hard", 2, seed=41)
    scorer = prm_pool if options.needs_scorer else None

    # Easy problems sample cooler: at 0.8, MCTS's weighted pick among its traces was wrong
    # once in ~80 easy searches over this session's CI runs (a misread term) -- sampling,
    # not the search. Hard problems keep 0.8 for the accounting and cache checks.
    easy_options = SearchOptions(**{**options.model_dump(), "temperature": 0.3})

    async def run_all():
        return await asyncio.gather(*(
            run_search(encode(tokenizer, task.prompt(p)), generator, scorer,
                       easy_options if p in easy else options, task.extract_answer)
            for p in easy + hard))

    results = asyncio.run(run_all())
    for problem, result in zip(easy, results[:2]):
        assert result.answer == str(problem.answer), result.text
    for result in results:
        a = result.accounting
        assert result.chosen is not None and result.chosen.finished and result.answer is not None
        assert a.generated_tokens > 0 and a.prompt_tokens > 0 and a.nodes_expanded >= 1
        if options.needs_scorer:
            assert a.prm_calls >= 1 and a.prm_traces >= n // width
            assert result.chosen.step_scores is not None
            assert len(result.chosen.step_scores) == len(result.chosen.trace.steps)
        else:
            assert a.prm_calls == 0
        if strategy in ("beam", "dvts", "mcts"):
            assert a.generator_calls > 1
    if strategy in ("beam", "dvts", "mcts"):
        # Hard prompts (39 tokens) fill a 32-token block, so every later step request hits
        # it; easy ones (12-15 tokens) may end before any continued prefix fills one.
        assert all(r.accounting.cached_prompt_tokens > 0 for r in results[2:])
    if strategy in ("majority", "weighted_vote", "best_of_n"):
        assert all(len(r.candidates) == n for r in results)
    elif strategy == "dvts":
        assert all(len(r.candidates) == n // width for r in results)
    elif strategy == "beam":  # the beam skips exact duplicates, so it may hold fewer
        assert all(1 <= len(r.candidates) <= n // width for r in results)
        assert all(len({c.trace.token_ids for c in r.candidates}) == len(r.candidates) for r in results)


@pytest.mark.parametrize("strategy, exit_votes", [("majority", None), ("weighted_vote", None),
                                                  ("weighted_vote", "counted")])
def test_adaptive_sampling_stops_at_consensus_on_the_real_engine(strategy, exit_votes, generator, prm_pool,
                                                                 tokenizer):
    """search.adaptive through the real policy (and PRM): easy problems, whose sampled
    traces agree, stop after the first wave of 2; every search's traces are a prefix of the
    wave schedule, and only what was sampled is counted and scored (once per wave with the
    weighted exit, once per search with the counted one)."""
    waves = (2, 2, 4)
    options = SearchOptions(strategy=strategy, n=8, temperature=0.3,
                            adaptive={"waves": waves, "exit_votes": exit_votes})
    problems = task.generate("easy", 3, seed=43) + task.generate("hard", 2, seed=43)
    scorer = prm_pool if options.needs_scorer else None

    async def run_all():
        return await asyncio.gather(*(
            run_search(encode(tokenizer, task.prompt(p)), generator, scorer, options, task.extract_answer)
            for p in problems))

    results = asyncio.run(run_all())
    for problem, result in zip(problems[:3], results[:3]):
        assert result.answer == str(problem.answer), result.text
    assert sum(len(r.candidates) == 2 for r in results[:3]) >= 2
    for problem, result in zip(problems, results):
        sampled = len(result.candidates)
        assert sampled in (2, 4, 8)
        prompt = len(encode(tokenizer, task.prompt(problem)))
        assert result.accounting.generated_tokens == sum(len(c.trace.token_ids) - prompt
                                                         for c in result.candidates)
        if strategy == "weighted_vote":
            assert result.accounting.prm_traces == sampled
            assert all(c.step_scores is not None for c in result.candidates)
            waves_sampled = {2: 1, 4: 2, 8: 3}[sampled]
            assert result.accounting.prm_calls == (1 if exit_votes == "counted" else waves_sampled)


def test_killed_prm_actor_mid_search_is_replaced_and_searches_complete(generator, prm_pool, tokenizer):
    """Kill the PRM actor (a vLLM pooling engine) while beam searches wait on it: Ray
    restarts it, the pool retries the batch, and every search ends with its full beam."""
    options = SearchOptions(strategy="beam", n=8, beam_width=4, temperature=0.8)
    problems = task.generate("hard", 4, seed=51)
    pid_before = ray.get(prm_pool.actors[0].ready.remote())
    batches_before = prm_pool.stats.batches

    async def run_all():
        searches = asyncio.gather(*(
            run_search(encode(tokenizer, task.prompt(p)), generator, prm_pool, options, task.extract_answer)
            for p in problems))
        deadline = time.monotonic() + 120
        while prm_pool.stats.batches < batches_before + 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        ray.kill(prm_pool.actors[0], no_restart=False)
        return await searches

    results = asyncio.run(run_all())
    # a new process: Ray restarted the actor (and re-ran the lost call, max_task_retries)
    assert ray.get(prm_pool.actors[0].ready.remote(), timeout=300) != pid_before
    for result in results:
        assert 1 <= len(result.candidates) <= options.n // options.beam_width  # distinct beams
        assert result.answer is not None and result.chosen.finished
