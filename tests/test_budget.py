import json

import pytest

from ttc_vllm import budget


def test_effort_table_longest_substring_match_and_default():
    assert budget.effort_table("Qwen/Qwen3-8B")["medium"] == budget.BUILTIN_EFFORT_TABLES["qwen3"]["medium"]
    assert budget.effort_table("/x/ttc_vllm/testbed/weights/policy") == budget.BUILTIN_EFFORT_TABLES["testbed"]
    assert budget.effort_table("some/unknown-model") == budget.BUILTIN_EFFORT_TABLES["default"]
    tables = {"default": {"low": 1}, "qwen": {"low": 2}, "qwen3-32b": {"low": 3}}
    assert budget.effort_table("Qwen/Qwen3-32B-AWQ", tables) == {"low": 3}
    assert budget.effort_table("Qwen/Qwen2.5", tables) == {"low": 2}


def test_effort_levels_are_monotonic_in_every_builtin_table():
    for name, table in budget.BUILTIN_EFFORT_TABLES.items():
        values = [table[level] for level in budget.EFFORT_LEVELS]
        assert values == sorted(values) and values[0] == 0, name


def test_override_file_and_inline_json(tmp_path, monkeypatch):
    f = tmp_path / "effort.json"
    f.write_text(json.dumps({"my-model": {"low": 5, "high": 50}, "default": {"medium": 77}}))
    monkeypatch.setenv(budget.EFFORT_TABLE_ENV, str(f))
    assert budget.effort_to_tokens("low", "org/My-Model-7B") == 5
    assert budget.effort_to_tokens("medium", "org/My-Model-7B") == 77     # inherited from default
    assert budget.effort_to_tokens("medium", "anything") == 77
    monkeypatch.setenv(budget.EFFORT_TABLE_ENV, '{"qwen3": {"high": 9}}')
    assert budget.effort_to_tokens("high", "Qwen3-4B") == 9
    assert budget.effort_to_tokens("low", "Qwen3-4B") == budget.BUILTIN_EFFORT_TABLES["qwen3"]["low"]
    monkeypatch.setenv(budget.EFFORT_TABLE_ENV, '{"qwen3": {"extreme": 9}}')
    with pytest.raises(ValueError, match="unknown level 'extreme'"):
        budget.load_effort_tables()
    monkeypatch.setenv(budget.EFFORT_TABLE_ENV, '{"qwen3": {"low": -1}}')
    with pytest.raises(ValueError, match="qwen3.*low"):
        budget.load_effort_tables()


def test_unknown_effort_is_rejected():
    with pytest.raises(ValueError, match="reasoning_effort"):
        budget.effort_to_tokens("max")


@pytest.mark.parametrize("max_tokens, reserve, expected", [
    (None, 16, None), (100, 16, 83), (100, 0, 99), (17, 16, 0), (5, 16, 0),
])
def test_output_limit(max_tokens, reserve, expected):
    assert budget.output_limit(max_tokens, reserve) == expected


def test_resolve_budget_arithmetic():
    rb = budget.resolve_budget(max_think=200, min_think=150, max_tokens=120, answer_reserve=19)
    assert (rb.think_cap, rb.out_limit, rb.min_think, rb.effective_cap) == (200, 100, 100, 100)
    rb = budget.resolve_budget(effort="low", model="testbed", min_think=3)
    assert (rb.think_cap, rb.out_limit, rb.min_think) == (32, None, 3)
    rb = budget.resolve_budget()
    assert (rb.think_cap, rb.out_limit, rb.min_think, rb.effective_cap) == (None, None, 0, None)


def test_room_left_and_forcing_start():
    assert budget.room_left(None, None, 5, 9) is None
    assert budget.room_left(50, None, 45, 999) == 5
    assert budget.room_left(50, 30, 10, 27) == 3
    # conclusion of 4 tokens: free thinking while more than 4 tokens of room remain
    assert budget.forcing_start(5, 4) is None
    assert budget.forcing_start(4, 4) == 0       # whole conclusion fits exactly
    assert budget.forcing_start(3, 4) == 4       # only </think> (index 4 of conclusion+[end])
    assert budget.forcing_start(-2, 4) == 4
    assert budget.forcing_start(None, 4) is None
