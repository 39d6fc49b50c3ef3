import random

from ttc_vllm.testbed.task import STEP_TAG, THINK_END, THINK_START, TIERS, generate, prompt, solve
from ttc_vllm.testbed.tokenizer import build_tokenizer

TOK = build_tokenizer()


def test_round_trip_of_10000_traces_is_exact():
    rng = random.Random(0)
    per_tier = 10_000 // len(TIERS) + 1
    n = 0
    for name in TIERS:
        for p in generate(name, per_tier, 123):
            text = prompt(p) + solve(p, rng).completion
            ids = TOK.encode(text, add_special_tokens=False)
            assert TOK.decode(ids, skip_special_tokens=False) == text
            n += 1
    assert n >= 10_000


def test_round_trip_of_arbitrary_text():
    for text in ["  two  spaces\n\n\ttab", "ünïcødé ✓ 漢字", "<think><think></think>", "\r\n", ""]:
        assert TOK.decode(TOK.encode(text, add_special_tokens=False), skip_special_tokens=False) == text


def test_markers_are_single_tokens_and_survive_skip_special():
    for marker in (THINK_START, THINK_END, STEP_TAG, TOK.bos_token, TOK.eos_token):
        assert len(TOK.encode(marker, add_special_tokens=False)) == 1
    ids = TOK.encode(f"{TOK.bos_token}a{THINK_START}b{STEP_TAG}{THINK_END}{TOK.eos_token}", add_special_tokens=False)
    # bos/eos are special (hidden); the reasoning markers stay visible to reasoning parsers
    assert TOK.decode(ids, skip_special_tokens=True) == f"a{THINK_START}b{STEP_TAG}{THINK_END}"


def test_chat_template_renders_the_training_prompt():
    p = generate("easy", 1, 0)[0]
    question = p.question[len("Q: "):]
    rendered = TOK.apply_chat_template([{"role": "user", "content": question}], tokenize=False,
                                       add_generation_prompt=True)
    assert rendered == prompt(p)
