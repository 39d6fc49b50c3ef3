"""EngineClientStepGenerator over a scripted fake of vLLM's async engine client: step cutting,
finished rules, usage reporting, trace limits, and aborting every sub-request on cancel."""
from __future__ import annotations

import asyncio
from types import SimpleNamespace

import pytest

from ttc_vllm.engine_async import EngineClientStepGenerator
from ttc_vllm.search import SearchOptions, run_search
from ttc_vllm.search.protocols import StepParams

EOS, STEP, THINK, END = 1, 2, 3, 4
NAMES = {EOS: "</s>", STEP: "<step>", THINK: "<think>", END: "</think>"}


class FakeTokenizer:
    eos_token_id = EOS

    def get_added_vocab(self):
        return {"<step>": STEP, "<think>": THINK, "</think>": END}

    def decode(self, ids, skip_special_tokens=True):
        return "".join("" if (t == EOS and skip_special_tokens) else NAMES.get(t, chr(ord("a") + t - 10))
                       for t in ids)

    def encode(self, text, add_special_tokens=False):
        rev = {v: k for k, v in NAMES.items()}
        return [rev[text]] if text in rev else [ord(c) - ord("a") + 10 for c in text]


def script(prefix, sample):
    """The fake policy: two steps "<x>b<step>" (x depends on the sample), then the answer."""
    steps_done = sum(1 for t in prefix if t == STEP)
    out = []
    for _ in range(steps_done, 2):
        out += [10 + sample, 11, STEP]
    return out + [END, 20 + sample, EOS]


class FakeEngine:
    """Mimics AsyncLLM.generate/abort for FINAL_ONLY requests."""

    def __init__(self, block_after: int | None = None, fail_after: int | None = None):
        self.requests: list[tuple[str, list[int], object]] = []
        self.aborted: list[str] = []
        self.running: set[str] = set()
        self.block_after = block_after  # requests beyond this many hang until cancelled
        self.fail_after = fail_after

    async def generate(self, prompt, sp, request_id, **kwargs):
        assert prompt["type"] == "token"
        prefix = list(prompt["prompt_token_ids"])
        self.requests.append((request_id, prefix, sp))
        index = len(self.requests)
        self.running.add(request_id)
        try:
            if self.fail_after is not None and index > self.fail_after:
                await asyncio.sleep(0.01)
                raise RuntimeError("engine hiccup")
            if self.block_after is not None and index > self.block_after:
                await asyncio.sleep(3600)
            outputs = []
            for j in range(sp.n):
                tokens, finish, reason = [], "length", None
                for t in script(prefix, j):
                    if len(tokens) == sp.max_tokens:
                        break
                    tokens.append(t)
                    if t == EOS:
                        finish = "stop"
                        break
                    if t in (sp.stop_token_ids or []):
                        finish, reason = "stop", t
                        break
                outputs.append(SimpleNamespace(token_ids=tokens, finish_reason=finish,
                                               stop_reason=reason, logprobs=None))
            self.running.discard(request_id)
            yield SimpleNamespace(outputs=outputs, finished=True, num_cached_tokens=len(prefix) - 1)
        finally:
            self.running.discard(request_id)

    async def abort(self, request_id):
        ids = [request_id] if isinstance(request_id, str) else list(request_id)
        self.aborted.extend(ids)


PROMPT = [30, 31, THINK]


def generator(engine, **kw):
    kw.setdefault("max_model_len", 64)
    return EngineClientStepGenerator(engine, FakeTokenizer(), request_id="chatcmpl-1",
                                     prompt_len=len(PROMPT), step_delimiter="<step>", **kw)


def test_steps_stop_at_the_step_token_and_keep_it():
    engine = FakeEngine()
    [[a, b]] = asyncio.run(generator(engine).generate_steps([PROMPT], 2, StepParams(max_tokens=16)))
    assert a.token_ids == (10, 11, STEP) and a.text == "ab<step>" and not a.finished
    assert b.token_ids == (11, 11, STEP)
    assert (a.prompt_tokens, a.cached_prompt_tokens) == (3, 2)  # the request's usage, once
    assert (b.prompt_tokens, b.cached_prompt_tokens) == (0, 0)
    _, prefix, sp = engine.requests[0]
    assert prefix == PROMPT and sp.stop_token_ids == [STEP] and sp.n == 2


def test_answer_step_is_finished_and_continues_the_parent_ids():
    engine = FakeEngine()
    gen = generator(engine)
    parent = PROMPT + [10, 11, STEP, 10, 11, STEP]
    [[step]] = asyncio.run(gen.generate_steps([parent], 1, StepParams(max_tokens=16)))
    assert step.token_ids == (END, 20, EOS) and step.finished and step.text == "</think>k"
    assert engine.requests[0][1] == parent


def test_complete_splits_the_trace_like_generate_steps_would():
    [[trace]] = asyncio.run(generator(FakeEngine()).complete([PROMPT], 1, StepParams(max_tokens=32)))
    assert [s.token_ids for s in trace] == [(10, 11, STEP), (10, 11, STEP), (END, 20, EOS)]
    assert [s.finished for s in trace] == [False, False, True]
    assert trace[0].prompt_tokens == 3 and trace[1].prompt_tokens == 0


def test_per_call_length_cut_is_not_the_end_of_the_trace():
    [[step]] = asyncio.run(generator(FakeEngine()).generate_steps([PROMPT], 1, StepParams(max_tokens=2)))
    assert step.token_ids == (10, 11) and not step.finished


def test_request_max_tokens_caps_the_whole_trace_and_finishes_it():
    engine = FakeEngine()
    gen = generator(engine, max_new_tokens=4)
    [[trace]] = asyncio.run(gen.complete([PROMPT], 1, StepParams(max_tokens=32)))
    assert sum(len(s.token_ids) for s in trace) == 4 and trace[-1].finished
    assert engine.requests[0][2].max_tokens == 4
    # A prefix already at the cap gets an empty finished step without an engine request.
    full = PROMPT + [10, 11, STEP, 10]
    [[step]] = asyncio.run(gen.generate_steps([full], 1, StepParams(max_tokens=32)))
    assert step.token_ids == () and step.finished and len(engine.requests) == 1


def test_model_context_caps_the_trace():
    engine = FakeEngine()
    gen = generator(engine, max_model_len=len(PROMPT) + 5)
    [[step]] = asyncio.run(gen.generate_steps([PROMPT + [10, 11, STEP]], 1, StepParams(max_tokens=32)))
    assert engine.requests[0][2].max_tokens == 2 and step.token_ids == (10, 11) and step.finished


def test_one_request_per_prefix_with_unique_ids_submitted_concurrently():
    engine = FakeEngine()
    gen = generator(engine)
    prefixes = [PROMPT, PROMPT + [10, 11, STEP]]
    out = asyncio.run(gen.generate_steps(prefixes, 3, StepParams()))
    assert [len(r) for r in out] == [3, 3]
    ids = [rid for rid, _, _ in engine.requests]
    assert len(set(ids)) == 2 and all(rid.startswith("chatcmpl-1-ttc") for rid in ids)
    assert gen.requests == 2 and gen.aborted == 0 and not gen.live


def test_cancelling_a_call_aborts_every_running_sub_request():
    engine = FakeEngine(block_after=1)
    gen = generator(engine)

    async def scenario():
        task = asyncio.create_task(gen.generate_steps([PROMPT, PROMPT + [10, 11, STEP],
                                                       PROMPT + [11, 11, STEP]], 2, StepParams()))
        while len(engine.requests) < 3:
            await asyncio.sleep(0.001)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task

    asyncio.run(scenario())
    blocked = {rid for rid, _, _ in engine.requests[1:]}
    assert blocked <= set(engine.aborted)
    assert engine.requests[0][0] not in engine.aborted  # it had finished
    assert not gen.live and not engine.running and gen.aborted == 2


def test_a_failing_sub_request_aborts_its_siblings():
    engine = FakeEngine(block_after=2, fail_after=1)
    gen = generator(engine)
    with pytest.raises(RuntimeError, match="hiccup"):
        asyncio.run(gen.generate_steps([PROMPT, PROMPT + [10, 11, STEP], PROMPT + [11, 11, STEP]],
                                       1, StepParams()))
    assert {rid for rid, _, _ in engine.requests[1:]} <= set(engine.aborted)
    assert not gen.live


def test_majority_search_end_to_end_over_the_fake_engine():
    engine = FakeEngine()
    gen = generator(engine)
    options = SearchOptions(strategy="majority", n=3)
    result = asyncio.run(run_search(PROMPT, gen, None, options,
                                    lambda text: text.rsplit("</think>", 1)[-1] or None))
    # samples 0,1,2 answer k, l, m: a three-way tie goes to the first sampled
    assert result.answer == "k" and len(result.candidates) == 3
    assert result.accounting.generated_tokens == 3 * 9
    assert result.accounting.cached_prompt_tokens == 2


def test_client_sampling_knobs_reach_every_sub_request_but_cannot_override_the_search():
    engine = FakeEngine()
    gen = generator(engine, sampling_overrides={"top_k": 5, "ignore_eos": True})
    asyncio.run(gen.generate_steps([PROMPT], 2, StepParams(temperature=0.3)))
    sp = engine.requests[0][2]
    assert (sp.top_k, sp.ignore_eos, sp.temperature, sp.n) == (5, True, 0.3, 2)
    with pytest.raises(ValueError, match="temperature"):
        generator(engine, sampling_overrides={"temperature": 2.0})
