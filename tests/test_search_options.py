import typing

import pytest
from pydantic import ValidationError

from ttc_vllm.search import STRATEGIES
from ttc_vllm.search.options import DEFAULT_MAX_N, MAX_N_ENV, SearchOptions, Strategy


def _error_text(excinfo) -> str:
    return str(excinfo.value)


def test_every_strategy_has_a_runner():
    assert set(typing.get_args(Strategy)) == set(STRATEGIES)


def test_n_ceiling_defaults_to_64_and_names_n(monkeypatch):
    monkeypatch.delenv(MAX_N_ENV, raising=False)
    assert SearchOptions(strategy="majority", n=DEFAULT_MAX_N).n == 64
    with pytest.raises(ValidationError) as e:
        SearchOptions(strategy="majority", n=65)
    assert e.value.errors()[0]["loc"] == ("n",)
    assert MAX_N_ENV in _error_text(e)


def test_n_ceiling_follows_env(monkeypatch):
    monkeypatch.setenv(MAX_N_ENV, "128")
    assert SearchOptions(strategy="majority", n=128).n == 128
    with pytest.raises(ValidationError):
        SearchOptions(strategy="majority", n=129)
    monkeypatch.setenv(MAX_N_ENV, "lots")
    with pytest.raises(ValueError, match=MAX_N_ENV):
        SearchOptions(strategy="majority", n=2)


@pytest.mark.parametrize("field,value", [
    ("n", 0), ("beam_width", 0), ("max_steps", 0), ("temperature", 2.5), ("temperature", -0.1),
    ("top_p", 0.0), ("aggregation", "max"), ("step_delimiter", ""), ("max_step_tokens", 0),
])
def test_bad_values_are_rejected_naming_the_field(field, value):
    with pytest.raises(ValidationError) as e:
        SearchOptions(**{"strategy": "beam", "n": 8, field: value})
    assert e.value.errors()[0]["loc"][0] == field


def test_unknown_fields_and_strategies_are_rejected():
    with pytest.raises(ValidationError):
        SearchOptions(strategy="beam", n=8, beam_size=4)
    with pytest.raises(ValidationError):
        SearchOptions(strategy="greedy")


@pytest.mark.parametrize("strategy", ["beam", "dvts"])
def test_beam_width_must_divide_n_for_tree_beams(strategy):
    assert SearchOptions(strategy=strategy, n=12, beam_width=3).beam_width == 3
    for bad in (5, 16):
        with pytest.raises(ValidationError, match="beam_width .* must divide n"):
            SearchOptions(strategy=strategy, n=12, beam_width=bad)


@pytest.mark.parametrize("strategy", ["majority", "weighted_vote", "best_of_n", "mcts"])
def test_beam_width_divisibility_is_not_checked_elsewhere(strategy):
    assert SearchOptions(strategy=strategy, n=3, beam_width=4).n == 3


def test_mcts_options_are_validated():
    opts = SearchOptions(strategy="mcts", mcts={"c_puct": 0.5, "rollouts": 8})
    assert (opts.mcts.c_puct, opts.mcts.rollouts) == (0.5, 8)
    with pytest.raises(ValidationError) as e:
        SearchOptions(strategy="mcts", mcts={"c_puct": 0})
    assert e.value.errors()[0]["loc"] == ("mcts", "c_puct")
    with pytest.raises(ValidationError):
        SearchOptions(strategy="mcts", mcts={"rollouts": 0})


def test_truncation_only_for_sampling_strategies_and_before_max_steps():
    opts = SearchOptions(strategy="majority", truncate={"after_steps": 2, "keep_ratio": 0.25})
    assert opts.truncate.keep_ratio == 0.25
    with pytest.raises(ValidationError, match="truncate applies only"):
        SearchOptions(strategy="beam", n=8, truncate={})
    with pytest.raises(ValidationError, match="after_steps"):
        SearchOptions(strategy="best_of_n", max_steps=3, truncate={"after_steps": 3})
    for ratio in (0.0, 1.0):
        with pytest.raises(ValidationError):
            SearchOptions(strategy="majority", truncate={"keep_ratio": ratio})


def test_needs_scorer():
    assert not SearchOptions(strategy="majority").needs_scorer
    assert not SearchOptions(strategy="majority", truncate={"by": "confidence"}).needs_scorer
    assert SearchOptions(strategy="majority", truncate={"by": "prm"}).needs_scorer
    assert SearchOptions(strategy="best_of_n").needs_scorer
