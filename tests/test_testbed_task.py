import random

import pytest

from ttc_vllm.testbed.task import (
    ANSWER_PREFIX, STEP_TAG, THINK_END, TIERS, Problem, extract_answer, first_answer_offset, generate,
    is_correct, prompt, solve, step_lines,
)


def test_generator_is_seeded_and_tiers_differ():
    assert generate("hard", 50, 7) == generate("hard", 50, 7)
    assert generate("hard", 50, 7) != generate("hard", 50, 8)
    assert generate("easy", 50, 7) != generate("hard", 50, 7)


@pytest.mark.parametrize("name", list(TIERS))
def test_problems_respect_their_tier_knobs(name):
    spec = TIERS[name]
    for p in generate(name, 300, 1):
        assert spec.min_terms <= len(p.terms) <= spec.max_terms
        assert all(spec.min_value <= t <= spec.max_value for t in p.terms)
        assert p.tier == name


def test_tiers_get_harder():
    def mean_work(name):  # steps x digits per step: what makes a trace error-prone
        ps = generate(name, 300, 2)
        return sum((len(p.terms) - 1) * len(str(p.answer)) for p in ps) / len(ps)
    assert mean_work("easy") < mean_work("medium") < mean_work("hard")


def test_unknown_tier_and_bad_count_are_rejected():
    with pytest.raises(ValueError, match="unknown tier 'extreme'"):
        generate("extreme", 3, 0)
    with pytest.raises(ValueError, match="positive"):
        generate("easy", 0, 0)


def test_every_trace_is_correct_step_by_step():
    rng = random.Random(3)
    for name in TIERS:
        for p in generate(name, 200, 3):
            tr = solve(p, rng)
            lines = step_lines(tr.completion)
            assert len(lines) == len(tr.steps) + len(tr.checks) == len(p.terms) - 1 + len(tr.checks)
            acc_terms = []
            for line in tr.steps:
                lhs, rhs = line.split("=")
                a, b = map(int, lhs.split("+"))
                assert a + b == int(rhs)
                acc_terms.append(b)
            # every term used exactly once, in some order
            first = int(tr.steps[0].split("+")[0])
            assert sorted([first] + acc_terms) == sorted(p.terms)
            assert extract_answer(tr.completion) == p.answer
            assert is_correct(p, tr.completion)


def test_overthinking_share_is_controlled():
    rng = random.Random(4)
    with_checks = sum(bool(solve(p, rng, overthink_prob=0.6).checks) for p in generate("medium", 1000, 4))
    assert 540 <= with_checks <= 660
    assert not any(solve(p, rng, overthink_prob=0.0).checks for p in generate("medium", 200, 4))


def test_answer_extraction_and_checker():
    p = Problem((2, 3))
    assert extract_answer(f"\n2+3=5{STEP_TAG}\n{THINK_END}\n{ANSWER_PREFIX}5") == 5
    assert extract_answer(f"\n2+3=5{STEP_TAG}\n{THINK_END}\n{ANSWER_PREFIX}-12") == -12
    assert extract_answer("\n2+3=5") is None                        # no answer line
    assert extract_answer(f"{ANSWER_PREFIX}4 inside{THINK_END}\nnothing") is None  # only after thinking
    assert is_correct(p, 5) and not is_correct(p, 6) and not is_correct(p, None)
    assert prompt(p).endswith("<think>") and "Q: 2+3=?" in prompt(p)


def test_first_answer_offset_marks_the_overthinking_tail():
    p = Problem((2, 3, 4))
    text = f"\n2+3=5{STEP_TAG}\n5+4=9{STEP_TAG}\ncheck 2+3=5{STEP_TAG}\n{THINK_END}\nAnswer: 9"
    off = first_answer_offset(p, text)
    assert text[:off].endswith(f"5+4=9{STEP_TAG}")
    assert first_answer_offset(Problem((2, 2)), text) is None


def test_audit_separates_slips_chains_and_term_bookkeeping():
    from ttc_vllm.testbed.task import Audit, Problem, audit

    p = Problem((512, 77, 512, 9))

    def completion(lines, checks=()):
        body = "".join(f"{x}{STEP_TAG}\n" for x in lines) + "".join(f"check {x}{STEP_TAG}\n" for x in checks)
        return f"\n{body}</think>\nAnswer: 1</s>"

    good = ["512+9=521", "521+512=1033", "1033+77=1110"]
    assert audit(p, completion(good, checks=["512+9=521"])) == Audit(True, True, True, True)
    # a slip (C != A + B), carried on consistently
    assert audit(p, completion(["512+9=520", "520+512=1032", "1032+77=1109"])) == Audit(True, False, True, True)
    # a chain break: step 2 starts from another number
    assert audit(p, completion(["512+9=521", "522+512=1034", "1034+77=1111"])) == Audit(True, True, False, True)
    # 77 never added, 512 three times: one reuse beyond the question's two copies
    assert audit(p, completion(["512+9=521", "521+512=1033", "1033+512=1545"])) == \
        Audit(True, True, True, False, reused=1, foreign=0)
    # a misread term (78 for 77)
    assert audit(p, completion(["512+9=521", "521+512=1033", "1033+78=1111"])) == \
        Audit(True, True, True, False, reused=0, foreign=1)
    assert audit(p, completion(["512 plus 9"])) == Audit(False, False, False, False)
    assert audit(p, "\n</think>\nAnswer: 1</s>") == Audit(False, False, False, False)
