"""OfflineStepGenerator: step cutting, batching and usage over a scripted fake LLM that follows
vLLM's stop semantics; one real-engine test on the testbed policy."""
import asyncio
import math
from types import SimpleNamespace

import pytest

from ttc_vllm.engine_offline import (
    Delimiter, OfflineStepGenerator, request_seed, resolve_delimiter, split_steps,
)
from ttc_vllm.halting import replay_signal
from ttc_vllm.testbed.tokenizer import load_testbed_tokenizer
from ttc_vllm.search.protocols import StepGenerator, StepParams, Trace
from ttc_vllm.testbed import task
from ttc_vllm.testbed.task import STEP_TAG

TOK = load_testbed_tokenizer()
STEP_ID = TOK.convert_tokens_to_ids(task.STEP_TAG)
EOS = TOK.eos_token_id
PROMPT = TOK.encode(task.prompt(task.Problem((1, 2, 4))), add_special_tokens=False)
TRACE = "\n1+2=3<step>\n3+4=7<step>\n</think>\nAnswer: 7"
TRACE_IDS = TOK.encode(TRACE, add_special_tokens=False) + [EOS]


def enc(text):
    return TOK.encode(text, add_special_tokens=False)


class FakeLLM:
    """Continues every prompt with `script(prompt_ids, j)` and stops like vLLM: on a stop
    token id (kept, stop_reason = id), EOS (kept, stop_reason None), a stop string (token
    completing it kept, stop_reason = string) or max_tokens ("length")."""

    def __init__(self, script, cached=5):
        self.script = script
        self.cached = cached
        self.calls = []

    def get_tokenizer(self):
        return TOK

    def generate(self, prompts, sps, use_tqdm=False):
        self.calls.append((prompts, sps))
        outs = []
        for prompt, sp in zip(prompts, sps):
            samples = [self._sample(prompt["prompt_token_ids"], j, sp) for j in range(sp.n)]
            outs.append(SimpleNamespace(outputs=samples, num_cached_tokens=self.cached))
        return outs

    def _sample(self, prompt, j, sp):
        ids, finish, reason = [], "length", None
        for tid in self.script(prompt, j):
            if len(ids) == sp.max_tokens:
                break
            ids.append(tid)
            if tid == EOS:
                finish = "stop"
                break
            if tid in (sp.stop_token_ids or []):
                finish, reason = "stop", tid
                break
            hit = [s for s in (sp.stop or []) if s in TOK.decode(ids)]
            if hit:
                finish, reason = "stop", hit[0]
                break
        logprobs = None
        if sp.logprobs:
            # top-k entries -0.1, -0.2, ... plus the sampled token at -5 (outside the top k)
            logprobs = [{**{1000 + r: -0.1 * (r + 1) for r in range(sp.logprobs)}, tid: -5.0}
                        for tid in ids]
        return SimpleNamespace(token_ids=ids, finish_reason=finish, stop_reason=reason,
                               logprobs=logprobs)


def run(coro):
    return asyncio.run(coro)


def scripted_trace(prompt, j):
    """The rest of TRACE after what the prompt already holds."""
    done = len(prompt) - len(PROMPT)
    return TRACE_IDS[done:]


def test_resolve_delimiter_uses_token_ids_only_for_added_tokens():
    assert resolve_delimiter(TOK, "<step>") == Delimiter("<step>", STEP_ID)
    assert resolve_delimiter(TOK, "\n\n") == Delimiter("\n\n", None)
    with pytest.raises(ValueError, match="step_delimiter"):
        resolve_delimiter(TOK, "")


def test_split_steps_by_token_id_keeps_delimiter_and_tail():
    pieces = split_steps(TRACE_IDS, Delimiter("<step>", STEP_ID), TOK.decode)
    assert [TOK.decode(p, skip_special_tokens=True) for p in pieces] == [
        "\n1+2=3<step>", "\n3+4=7<step>", "\n</think>\nAnswer: 7"]
    assert sum(pieces, []) == TRACE_IDS


def test_split_steps_by_text_cuts_at_the_token_completing_the_string():
    ids = enc("a\n\nb\n\n\nc")
    pieces = split_steps(ids, Delimiter("\n\n"), TOK.decode)
    # byte tokens: the second "\n" completes each delimiter; the third newline starts "\nc"
    assert [TOK.decode(p) for p in pieces] == ["a\n\n", "b\n\n", "\nc"]
    assert split_steps(enc("x\n\n"), Delimiter("\n\n"), TOK.decode) == [enc("x\n\n")]


def test_token_confidence_is_minus_mean_of_top_k():
    entry = {7: -0.5, 8: -1.5, 9: -4.0}  # sampled token 9 outside the top 2
    assert replay_signal([entry], "token_confidence", top_k=2) == [pytest.approx(1.0)]
    assert replay_signal([entry], "token_confidence", top_k=3) == [pytest.approx(2.0)]
    assert replay_signal(None, "token_confidence", top_k=2) == []


def test_request_seed_depends_on_seed_and_prefix_only():
    assert request_seed(0, [1, 2]) == request_seed(0, (1, 2))
    assert request_seed(0, [1, 2]) != request_seed(1, [1, 2])
    assert request_seed(0, [1, 2]) != request_seed(0, [1, 3])
    assert 0 <= request_seed(5, PROMPT) < 2**31


def test_generate_steps_one_call_n_samples_usage_on_first_sample():
    llm = FakeLLM(scripted_trace, cached=16)
    gen = OfflineStepGenerator(llm, STEP_TAG)
    assert isinstance(gen, StepGenerator)
    first_prefix = PROMPT + enc("\n1+2=3<step>")
    out = run(gen.generate_steps([PROMPT, first_prefix], 3, StepParams(max_tokens=64)))
    assert len(llm.calls) == 1  # both prefixes, one engine call
    prompts, sps = llm.calls[0]
    assert [p["prompt_token_ids"] for p in prompts] == [PROMPT, first_prefix]
    assert all(sp.n == 3 and sp.stop_token_ids == [STEP_ID] and sp.include_stop_str_in_output
               for sp in sps)
    assert [len(samples) for samples in out] == [3, 3]
    step = out[0][0]
    assert step.text == "\n1+2=3<step>" and step.token_ids[-1] == STEP_ID and not step.finished
    assert (step.prompt_tokens, step.cached_prompt_tokens) == (len(PROMPT), 16)
    assert all(s.prompt_tokens == 0 and s.cached_prompt_tokens == 0 for s in out[0][1:])
    assert out[1][0].text == "\n3+4=7<step>" and out[1][0].prompt_tokens == len(first_prefix)
    assert out[0][0].mean_confidence is None


def test_generate_steps_eos_finishes_and_length_does_not():
    gen = OfflineStepGenerator(FakeLLM(scripted_trace), STEP_TAG)
    last_prefix = PROMPT + enc("\n1+2=3<step>\n3+4=7<step>")
    [[final]] = run(gen.generate_steps([last_prefix], 1, StepParams()))
    assert final.finished and final.token_ids[-1] == EOS and final.text == "\n</think>\nAnswer: 7"
    [[cut]] = run(gen.generate_steps([last_prefix], 1, StepParams(max_tokens=4)))
    assert not cut.finished and len(cut.token_ids) == 4


def test_text_delimiter_stops_on_the_string():
    script = lambda prompt, j: enc("one\n\ntwo\n\n") + [EOS]  # noqa: E731
    llm = FakeLLM(script)
    gen = OfflineStepGenerator(llm, step_delimiter="\n\n")
    [[step]] = run(gen.generate_steps([PROMPT], 1, StepParams()))
    assert llm.calls[0][1][0].stop == ["\n\n"] and not llm.calls[0][1][0].stop_token_ids
    assert step.text == "one\n\n" and not step.finished
    # a per-call delimiter overrides the default
    run(gen.generate_steps([PROMPT], 1, StepParams(step_delimiter="<step>")))
    assert llm.calls[1][1][0].stop_token_ids == [STEP_ID]


def test_complete_splits_like_generate_steps_and_only_last_is_finished():
    llm = FakeLLM(scripted_trace, cached=0)
    gen = OfflineStepGenerator(llm, STEP_TAG)
    [[c1, c2]] = run(gen.complete([PROMPT], 2, StepParams(max_tokens=256)))
    sp = llm.calls[0][1][0]
    assert not sp.stop_token_ids and not sp.stop  # runs to EOS
    assert [s.text for s in c1] == ["\n1+2=3<step>", "\n3+4=7<step>", "\n</think>\nAnswer: 7"]
    assert [s.finished for s in c1] == [False, False, True]
    assert Trace(tuple(PROMPT), c1).token_ids == tuple(PROMPT + TRACE_IDS)
    assert c1[0].prompt_tokens == len(PROMPT) and all(s.prompt_tokens == 0 for s in c1[1:] + c2)
    # the steps match what generate_steps cuts, step by step
    prefix = list(PROMPT)
    for s in c1:
        [[g]] = run(gen.generate_steps([prefix], 1, StepParams()))
        assert g.token_ids == s.token_ids and g.finished == s.finished
        prefix += list(s.token_ids)


def test_complete_cut_by_length_is_unfinished():
    gen = OfflineStepGenerator(FakeLLM(scripted_trace), STEP_TAG)
    [[c]] = run(gen.complete([PROMPT], 1, StepParams(max_tokens=15)))
    assert not c[-1].finished and sum(len(s.token_ids) for s in c) == 15


def test_confidence_requests_top_k_logprobs_and_averages_per_step():
    llm = FakeLLM(scripted_trace)
    gen = OfflineStepGenerator(llm, STEP_TAG, confidence_top_k=4)
    [[c]] = run(gen.complete([PROMPT], 1, StepParams(confidence=True)))
    assert llm.calls[0][1][0].logprobs == 4
    # every token: top-4 logprobs -0.1..-0.4 -> confidence 0.25 (the -5 sampled one excluded)
    assert all(math.isclose(s.mean_confidence, 0.25) for s in c)


def test_seeded_generator_sets_per_prefix_seeds():
    llm = FakeLLM(scripted_trace)
    run(OfflineStepGenerator(llm, STEP_TAG, seed=3).generate_steps([PROMPT], 2, StepParams()))
    assert llm.calls[0][1][0].seed == request_seed(3, PROMPT)


def test_bad_n_is_rejected():
    with pytest.raises(ValueError, match="n must be"):
        run(OfflineStepGenerator(FakeLLM(scripted_trace), STEP_TAG).generate_steps([PROMPT], 0, StepParams()))


@pytest.mark.engine
def test_real_engine_steps_hit_the_prefix_cache(llm):
    gen = OfflineStepGenerator(llm, STEP_TAG)
    # A prompt longer than one KV block: only full blocks are cached.
    block = llm.llm_engine.vllm_config.cache_config.block_size
    prompt = TOK.encode(task.prompt(task.Problem((812, 407, 695, 333, 904, 518, 276, 649))),
                        add_special_tokens=False)
    assert len(prompt) > block
    params = StepParams(temperature=1.0, max_tokens=48, confidence=True)
    [children] = run(gen.generate_steps([prompt], 4, params))
    assert len(children) == 4
    for s in children:
        assert s.finished or s.token_ids[-1] == STEP_ID or len(s.token_ids) == 48
        assert STEP_ID not in s.token_ids[:-1]  # a step never runs past its delimiter
        assert s.mean_confidence is not None and s.mean_confidence >= 0
    # expand every unfinished child: its prompt (the parent's exact ids) is mostly cached
    parents = [prompt + list(s.token_ids) for s in children if not s.finished]
    grand = run(gen.generate_steps(parents, 2, params))
    cached = [g[0].cached_prompt_tokens for g in grand]
    assert all(c >= block for c in cached), cached  # at least the first full block
    # complete(): the steps concatenate to one continuation and non-final ones end in the tag
    [[c]] = run(gen.complete([prompt], 1, StepParams(temperature=0.0, max_tokens=200)))
    assert all(s.token_ids[-1] == STEP_ID for s in c[:-1])
    if c[-1].finished:
        assert c[-1].token_ids[-1] == EOS


@pytest.mark.parametrize("strategy", ["weighted_vote", "beam"])
def test_real_engine_search_with_a_thinking_budget_caps_every_trace(llm, strategy):
    """`run_search(..., controls=...)` through the real engine: the ttc-vllm logits processor
    enforces the budget on each sampled trace (one request each) and across the step
    requests of a beam (the budget counts the thinking already in each step's prompt)."""
    from ttc_vllm.options import TTCOptions
    from ttc_vllm.search import SearchOptions, run_search
    from tests.fakes import FakeArithmeticPRM
    from ttc_vllm.testbed.metrics import MarkerIds, thinking_tokens

    cap = 40   # a hard-tier trace needs ~105 thinking tokens: every trace hits the cap
    controls = TTCOptions(max_think=cap, conclusion="<step>\n", answer_prefix="\nAnswer: ").sample_controls()
    ids = MarkerIds.from_tokenizer(TOK)
    problem = task.Problem((812, 407, 695, 333, 904, 518, 276, 649))
    prompt = TOK.encode(task.prompt(problem), add_special_tokens=False)
    opts = SearchOptions(strategy=strategy, n=4, beam_width=2, max_steps=16, max_step_tokens=64)
    for sent in (controls, None):
        result = run(run_search(prompt, OfflineStepGenerator(llm, STEP_TAG), FakeArithmeticPRM(), opts,
                                task.extract_answer, controls=sent))
        finished = [c for c in result.candidates if c.finished]
        assert finished
        for c in finished:
            out = list(c.trace.token_ids[len(prompt):])
            if sent is None:
                assert thinking_tokens(out, ids) > cap   # uncapped, the traces run longer
            else:
                assert thinking_tokens(out, ids) <= cap and ids.think_end in out
                assert task.ANSWER_PREFIX in TOK.decode(out)   # capped, then answered
