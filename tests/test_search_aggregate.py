import pytest

from ttc_vllm.search.aggregate import aggregate_step_scores, best_of_n, majority_vote, weighted_vote


@pytest.mark.parametrize("how,expected", [
    ("min", 0.5), ("prod", 0.9 * 0.5 * 0.8), ("mean", (0.9 + 0.5 + 0.8) / 3), ("last", 0.8),
])
def test_aggregations(how, expected):
    assert aggregate_step_scores([0.9, 0.5, 0.8], how) == pytest.approx(expected)


def test_prod_penalises_long_chains_min_does_not():
    short, long = [0.9] * 2, [0.9] * 8
    assert aggregate_step_scores(long, "prod") < aggregate_step_scores(short, "prod")
    assert aggregate_step_scores(long, "min") == aggregate_step_scores(short, "min")


def test_aggregation_rejects_empty_and_unknown():
    with pytest.raises(ValueError, match="empty"):
        aggregate_step_scores([], "min")
    with pytest.raises(ValueError, match="unknown aggregation 'max'"):
        aggregate_step_scores([0.5], "max")


def test_majority_picks_most_frequent_and_ignores_missing_answers():
    assert majority_vote(["5", None, "7", "7", None, None]) == 2
    assert majority_vote([None, None]) is None
    assert majority_vote([]) is None


def test_majority_tie_goes_to_the_answer_seen_first():
    assert majority_vote(["7", "5", "5", "7"]) == 0
    assert majority_vote(["5", "7", "7", "5"]) == 0
    assert majority_vote([None, "9", "3"]) == 1


def test_weighted_vote_sums_weights_per_answer():
    # Three weak votes for 1 lose to one strong vote for 2.
    assert weighted_vote([1, 1, 1, 2], [0.1, 0.1, 0.1, 0.9]) == 3
    # ... and win when they add up to more.
    assert weighted_vote([1, 1, 1, 2], [0.4, 0.4, 0.4, 0.9]) == 0


def test_weighted_vote_ties_and_representative():
    assert weighted_vote(["a", "b", "b"], [1.0, 0.5, 0.5]) == 0  # tie: first answer
    assert weighted_vote(["b", "a", "b"], [0.2, 0.1, 0.7]) == 2  # b's strongest trace
    assert weighted_vote([None, None], [0.9, 0.9]) is None
    with pytest.raises(ValueError):
        weighted_vote(["a"], [0.1, 0.2])


def test_best_of_n_takes_best_answered_first_on_ties():
    assert best_of_n([None, "3", "4"], [0.99, 0.5, 0.5]) == 1
    assert best_of_n(["3", "4", "4"], [0.2, 0.6, 0.6]) == 1
    assert best_of_n([None], [0.3]) is None


def test_decide_dispatches_each_rule_and_rejects_unknown():
    from ttc_vllm.search.aggregate import decide

    answers, weights = ["7", "8", "8", None], [0.9, 0.2, 0.3, 1.0]
    assert decide("majority", answers, weights) == 1          # "8" twice; its first candidate
    assert decide("weighted_vote", answers, weights) == 0     # "7" 0.9 > "8" 0.5
    assert decide("best_of_n", answers, weights) == 0         # the unanswered 1.0 does not count
    with pytest.raises(ValueError, match="unknown decision rule 'max'"):
        decide("max", answers, weights)


def test_leading_share_counts_answered_weight_only():
    from ttc_vllm.search.aggregate import leading_share

    assert leading_share(["7", "8", "7", None], [1.0] * 4) == pytest.approx(2 / 3)
    assert leading_share(["7", "8", None], [0.2, 0.6, 5.0]) == pytest.approx(0.75)   # unanswered weight ignored
    assert leading_share(["7", "8"], [-1.0, 0.5]) == 1.0                            # negative weight counts as 0
    assert leading_share(["7", None], [1.0, 1.0], min_votes=2) == 0.0               # too few answers
    assert leading_share(["7", "8"], [0.0, 0.0]) == 0.0 and leading_share([None], [1.0]) == 0.0
    with pytest.raises(ValueError, match="2 answers but 1 weights"):
        leading_share(["7", "8"], [1.0])
