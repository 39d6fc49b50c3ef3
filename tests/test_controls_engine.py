"""Thinking controls through a real vLLM engine on the testbed policy (V1 runner on CPU).

Uses the session fixture `llm` of tests/conftest.py. The checks hold for any weights (the random probe
included): logit_bias pushes the model to end thinking early so the floors are exercised.
"""
import json
import random

import pytest

from ttc_vllm.testbed.task import extract_answer, generate, prompt

pytestmark = pytest.mark.engine

CONCLUSION = "\nTime is up, concluding."
ANSWER_PREFIX = "\nAnswer: "


@pytest.fixture(scope="module")
def ids(llm):
    tok = llm.get_tokenizer()
    enc = lambda s: tok.encode(s, add_special_tokens=False)  # noqa: E731
    return dict(start=tok.convert_tokens_to_ids("<think>"), end=tok.convert_tokens_to_ids("</think>"),
                eos=tok.eos_token_id, conclusion=enc(CONCLUSION), wait=enc("\nWait,"),
                answer_prefix=enc(ANSWER_PREFIX))


def thinking_tokens(token_ids, start, end):
    """Tokens inside thinking blocks; the prompt opened the first one."""
    inside, n = True, 0
    for t in token_ids:
        if t == end:
            inside = False
        elif t == start and not inside:
            inside = True
        elif inside:
            n += 1
    return n


def first_block(token_ids, end):
    return list(token_ids[:token_ids.index(end)]) if end in token_ids else list(token_ids)


def sampling(ttc, **kw):
    from vllm import SamplingParams

    return SamplingParams(extra_args={"ttc": json.dumps(ttc)} if ttc is not None else None, **kw)


def prompts(n, seed=0):
    return [prompt(p) for p in generate("medium", n, seed)]


def test_random_budgets_never_exceeded(llm, ids):
    """The issue's acceptance run: 500 requests with random budgets 0..200 and n 1..3 over all
    tiers; no trace thinks past its cap, every capped trace ends its thinking with the
    conclusion, then </think>, exactly at the cap; with `answer_prefix` (half the requests)
    every capped trace then has the forced answer prefix, and (all but a rare sample) the
    model's number after it."""
    rng = random.Random(0)
    problems = [p for tier in ("easy", "medium", "hard") for p in generate(tier, 84, 7)][:250]
    reqs = []
    for i, p in enumerate(problems):
        cap = rng.randint(0, 200)
        ttc = {"max_think": cap, **({"answer_prefix": ANSWER_PREFIX} if i % 2 else {})}
        reqs.append((prompt(p), cap, sampling(ttc, n=rng.choice([1, 2, 3]), temperature=1.0,
                                              max_tokens=cap + 40)))
    outs = llm.generate([r[0] for r in reqs], [r[2] for r in reqs], use_tqdm=False)
    conc, forced, sequences, answered, unparsed = ids["conclusion"], 0, 0, 0, []
    prefix = ids["answer_prefix"]
    for i, ((_, cap, params), out) in enumerate(zip(reqs, outs)):
        assert len(out.outputs) == params.n
        for o in out.outputs:
            sequences += 1
            tids = list(o.token_ids)
            assert thinking_tokens(tids, ids["start"], ids["end"]) <= cap
            block = first_block(tids, ids["end"])
            if len(block) >= cap - len(conc):            # budget reached: forced ending
                forced += 1
                assert ids["end"] in tids
                if cap >= len(conc):
                    assert block[-len(conc):] == conc and len(block) == cap
                else:
                    assert block == []  # too small for the phrase: </think> only
                if i % 2:
                    # s1's "Final Answer:": the prefix right after </think>, then the model's
                    # number -- an answer line on every capped trace (the number is sampled)
                    k = len(block) + 1
                    assert tids[k:k + len(prefix)] == prefix
                    answered += 1
                    if extract_answer(o.text) is None:
                        unparsed.append(o.text)
                # Without answer_prefix, whether an answer line follows is the model's part:
                # the testbed policy, never trained on cut thinking, often keeps computing
                # after </think> (see the README).
    assert len(reqs) == 250 and sequences >= 450
    assert forced > 100 and answered > 50
    # The prefix is forced on every one of them (asserted above); the number after it is the
    # model's, sampled at temperature 1.0, so a rare stray token ("Answer: \n595") is its
    # choice, not a control failure -- but more than 2 % would mean the forcing misleads it.
    assert len(unparsed) <= max(1, answered // 50), unparsed


def test_answer_reserve_keeps_room_for_the_answer(llm, ids):
    reserve = 12
    params = sampling({"answer_reserve": reserve}, temperature=1.0, max_tokens=50,
                      logit_bias={ids["eos"]: -100.0})
    for out in llm.generate(prompts(4), params, use_tqdm=False):
        tids = list(out.outputs[0].token_ids)
        assert ids["end"] in tids and tids.index(ids["end"]) <= 50 - reserve - 1


def test_min_think_never_closes_early(llm, ids):
    rng = random.Random(1)
    reqs = []
    # Easy problems: the model wants to close thinking after ~30 tokens, below every floor,
    # so it tries to stop and the continuation must be injected.
    easy = [prompt(p) for p in generate("easy", 12, 2)]
    for text in easy:
        floor = rng.randint(45, 90)
        reqs.append((floor, sampling({"min_think": floor, "max_extensions": 3}, temperature=1.0,
                                     max_tokens=200, n=rng.choice([1, 2]))))
    outs = llm.generate(easy, [r[1] for r in reqs], use_tqdm=False)
    injected = 0
    for (floor, _), out in zip(reqs, outs):
        for o in out.outputs:
            block = first_block(list(o.token_ids), ids["end"])
            assert len(block) >= floor
            injected += any(block[i:i + len(ids["wait"])] == ids["wait"] for i in range(len(block)))
    assert injected > 0


def test_effort_none_and_halting_end_to_end(llm, ids):
    none = sampling({"reasoning_effort": "none"}, temperature=1.0, max_tokens=20)
    # tau=0 on a confidence >= 0: halts as soon as min_tokens thinking tokens exist.
    halt = sampling({"halting": {"signal": "token_confidence", "threshold": 0.0, "min_tokens": 7,
                                 "window": 4}}, temperature=1.0, max_tokens=80,
                    logit_bias={ids["end"]: -100.0, ids["eos"]: -100.0})
    stop = sampling({"halting": {"signal": "entropy", "threshold": -1e-9, "direction": "below",
                                 "action": "stop", "min_tokens": 5}}, temperature=1.0, max_tokens=80,
                    logit_bias={ids["eos"]: -100.0})
    o_none, o_halt, o_stop = llm.generate(prompts(3), [none, halt, stop], use_tqdm=False)
    assert list(o_none.outputs[0].token_ids)[0] == ids["end"]
    block = first_block(list(o_halt.outputs[0].token_ids), ids["end"])
    assert block[7:] == ids["conclusion"] and ids["end"] in o_halt.outputs[0].token_ids
    s = o_stop.outputs[0]
    assert list(s.token_ids) [5:] == [ids["eos"]] and s.finish_reason == "stop"


def test_sampled_margin_stops_after_the_first_unlikely_token(llm, ids):
    """stop when a sampled token's log-prob is more than 1 below the top token's: the EOS
    comes right after the first thinking token whose margin (from vLLM's own returned
    log-probs) is under -1, and never in a trace without one."""
    from ttc_vllm.halting import replay_signal

    tau = -1.0
    params = sampling({"halting": {"signal": "sampled_margin", "aggregate": "min", "threshold": tau,
                                   "direction": "below", "action": "stop"}},
                      temperature=1.0, max_tokens=120, logprobs=20)
    outs = llm.generate(prompts(24, seed=3), [params] * 24, use_tqdm=False)
    stopped = 0
    for out in outs:
        o = out.outputs[0]
        tids = list(o.token_ids)
        think = first_block(tids, ids["end"])
        conc = ids["conclusion"]
        if think[-len(conc):] == conc:   # forced at the cap: unlikely tokens, but not sampled
            think = think[:-len(conc)]
        margins = replay_signal(o.logprobs[:len(think)], "sampled_margin", 20, tids)
        if any(abs(m - tau) < 1e-2 for m in margins):
            continue  # too close to call across float rounding
        first = next((t for t, m in enumerate(margins) if m < tau), None)
        if first is None or first + 1 >= len(tids):
            assert ids["eos"] not in think
            continue
        assert tids[first + 1] == ids["eos"] and len(tids) == first + 2, (first, tids)
        stopped += 1
    assert stopped >= 3   # at temperature 1 most traces sample an unlikely token


def test_bad_option_rejected_at_admission_engine_keeps_serving(llm, ids):
    with pytest.raises(Exception, match=r"ttc\.max_think"):
        llm.generate(prompts(1), sampling({"max_think": -1}, max_tokens=5), use_tqdm=False)
    with pytest.raises(Exception, match=r"ttc\.halting"):
        llm.generate(prompts(1), sampling({"halting": {"threshold": 1, "nested": {"x": 1}}}, max_tokens=5),
                     use_tqdm=False)
    out = llm.generate(prompts(2), [sampling({"max_think": 3}, max_tokens=10, temperature=0.0),
                                    sampling(None, max_tokens=10, temperature=0.0)], use_tqdm=False)
    assert thinking_tokens(list(out[0].outputs[0].token_ids), ids["start"], ids["end"]) <= 3
    assert len(out[1].outputs[0].token_ids) > 0
