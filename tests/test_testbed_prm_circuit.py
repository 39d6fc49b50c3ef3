"""The hand-set PRM body (`prm_circuit`) against the policy it is compiled from, in torch."""
import math
import random

import pytest
import torch

from ttc_vllm.testbed import policy_path
from ttc_vllm.testbed import prm_circuit as pc
from ttc_vllm.testbed.task import STEP_TAG, generate, prompt, solve


@pytest.fixture(scope="module")
def circuit():
    from transformers import AutoTokenizer, Qwen2ForCausalLM

    body, cfg, dims = pc.build(policy_path())
    policy = Qwen2ForCausalLM.from_pretrained(str(policy_path()), dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(str(policy_path()))
    return body, dims, policy, tok


def trace_ids(tok, problem, steps):
    text = prompt(problem) + "\n" + "".join(f"{s}{STEP_TAG}\n" for s in steps)
    ids = tok.encode(text, add_special_tokens=False)
    tag = tok.convert_tokens_to_ids(STEP_TAG)
    return torch.tensor([ids]), [i for i, t in enumerate(ids) if t == tag]


def correct_steps(problem, seed):
    return solve(problem, random.Random(seed), overthink_prob=0.0).steps


def slipped(steps, k):
    """Step k with the last digit of its sum changed (an arithmetic slip)."""
    lhs, total = steps[k].split("=")
    bad = total[:-1] + str((int(total[-1]) + 3) % 10)
    return steps[:k] + [f"{lhs}={bad}"] + steps[k + 1:]


def reference_gap(policy, ids, s_ids, j_ids, think_id):
    """sum over v in S of relu(z_v - z_token)^2 from the policy's logits at t-1, at completion
    positions whose token is in J; 0 elsewhere."""
    with torch.no_grad():
        z = policy(input_ids=ids).logits[0]
    zs = z[:-1][:, s_ids]
    zx = z[:-1].gather(1, ids[0, 1:, None])[:, 0]
    g = torch.zeros(ids.shape[1])
    g[1:] = (torch.relu(zs - zx[:, None]) ** 2).sum(-1)
    after = torch.cumsum((ids[0] == think_id).long(), 0) > 0
    in_j = torch.isin(ids[0], torch.tensor(j_ids))
    return torch.where(after & in_j, g, torch.zeros_like(g)), after


def test_policy_stream_is_the_policy_and_logits_are_copied_one_position_on(circuit):
    body, dims, policy, tok = circuit
    problem = generate("medium", 1, 11)[0]
    ids, _ = trace_ids(tok, problem, correct_steps(problem, 1))
    with torch.no_grad():
        out = body(input_ids=ids, output_hidden_states=True)
        ref = policy(input_ids=ids, output_hidden_states=True)
    n = policy.config.num_hidden_layers
    # the first 192 dims after the policy layers = the policy's residual (HF's last hidden
    # state of the policy is after its final norm)
    torch.testing.assert_close(out.hidden_states[n - 1][0, :, dims.policy], ref.hidden_states[n - 1][0],
                               rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(policy.model.norm(out.hidden_states[n][0, :, dims.policy]),
                               ref.hidden_states[n][0], rtol=1e-4, atol=1e-4)
    s_ids = list(dims.logits)
    copied = out.hidden_states[n + 1][0][:, list(dims.logits.values())]
    torch.testing.assert_close(copied[1:], ref.logits[0, :-1, s_ids], rtol=1e-4, atol=1e-3)


def test_gap_flag_and_compression_match_the_policy(circuit):
    body, dims, policy, tok = circuit
    s_ids, j_ids = list(dims.logits), list(dims.one_hot)
    think = tok.convert_tokens_to_ids("<think>")
    for seed, problem in enumerate(generate("hard", 3, 5)):
        steps = correct_steps(problem, seed)
        for variant in (steps, slipped(steps, 1)):
            ids, _ = trace_ids(tok, problem, variant)
            with torch.no_grad():
                f = pc.features(body, dims, ids)
            g, flag, g_comp = f["g"], f["flag"], f["g_comp"]
            want, after = reference_gap(policy, ids, s_ids, j_ids, think)
            # SiLU(4z) z / 4 is relu(z)^2 up to ~0.1 near z = 0
            assert (g[0][after] - want[after]).abs().max() < 0.1 + 0.01 * want.max()
            assert torch.equal(flag[0][~after], torch.zeros_like(flag[0][~after]))
            assert (flag[0][after] - 1).abs().max() < 1e-4
            # the question's digits (huge gaps: never sampled) add nothing
            assert torch.equal(g_comp[0][~after], torch.zeros_like(g_comp[0][~after]))
            torch.testing.assert_close(g_comp[0][after], pc.compress(g[0][after]), atol=0.03, rtol=0)


def test_pool_is_a_soft_running_max(circuit):
    body, dims, policy, tok = circuit
    problem = generate("hard", 1, 8)[0]
    ids, _ = trace_ids(tok, problem, slipped(correct_steps(problem, 2), 3))
    with torch.no_grad():
        f = pc.features(body, dims, ids)
    g_comp, pool = f["g_comp"], f["pool"]
    running = torch.cummax(g_comp[0], 0).values
    t = torch.arange(1, ids.shape[1] + 1, dtype=torch.float32)
    assert (pool[0] <= running + 1e-3).all()
    assert (pool[0] >= running - (torch.log(t) + 1) / pc.POOL_SCORE).all()
    assert running[-1] > 1.0   # the slip registers


def test_a_slip_lowers_this_and_every_later_step_score_only(circuit):
    from torch import nn

    body, dims, policy, tok = circuit
    head = nn.Sequential(nn.Linear(pc.HIDDEN, pc.HIDDEN), nn.ReLU(), nn.Linear(pc.HIDDEN, 2))
    pc.head_init(head, dims)

    def scores(ids, tags):
        with torch.no_grad():
            return torch.softmax(head(body(input_ids=ids).last_hidden_state[0, tags]), -1)[:, 1]

    lowered = 0
    for seed, problem in enumerate(generate("medium", 4, 21)):
        steps = correct_steps(problem, seed)
        k = len(steps) // 2
        good, bad = scores(*trace_ids(tok, problem, steps)), scores(*trace_ids(tok, problem, slipped(steps, k)))
        torch.testing.assert_close(bad[:k], good[:k], rtol=1e-4, atol=1e-4)   # before the slip: same
        assert (bad[k:] < good[k:] - 0.05).all()
        lowered += 1
    assert lowered == 4
    assert not math.isnan(float(good.sum()))


def test_build_refuses_a_policy_of_another_shape(tmp_path):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    cfg = Qwen2Config(vocab_size=272, hidden_size=128, intermediate_size=256, num_hidden_layers=1,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64)
    Qwen2ForCausalLM(cfg).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match="testbed policy's shape"):
        pc.build(tmp_path, completion_tokens=([1, 2], [1], 3))


def steps_using(used):
    """Arithmetically correct step lines adding `used` in that order (terms may be wrong)."""
    acc, lines = used[0], []
    for term in used[1:]:
        lines.append(f"{acc}+{term}={acc + term}")
        acc += term
    return lines


def term_flags(circuit, problem, lines):
    """(term pool at each step tag, term flag at every position) for a trace."""
    body, dims, _, tok = circuit
    ids, tags = trace_ids(tok, problem, lines)
    with torch.no_grad():
        f = pc.features(body, dims, ids)
    return f["term_pool"][0, tags], f["term"][0]


def test_term_check_passes_every_correct_trace_with_checks_and_repeated_values(circuit):
    from ttc_vllm.testbed.task import Problem

    problems = [*generate("easy", 4, 3), *generate("medium", 4, 3), *generate("hard", 4, 3),
                Problem((512, 77, 512, 9)), Problem((5, 15, 5, 5)), Problem((120, 20, 12, 2))]
    for seed, problem in enumerate(problems):
        trace = solve(problem, random.Random(seed), overthink_prob=1.0)
        pool, flag = term_flags(circuit, problem, trace.steps + trace.checks)
        assert len(pool) == len(trace.steps) + len(trace.checks)
        assert pool.abs().max() < 1e-3, (problem.terms, trace.steps)
        assert flag.abs().max() < 1e-3


def test_term_check_flags_a_reused_or_misread_term_from_its_step_on(circuit):
    from ttc_vllm.testbed.task import Problem

    rng = random.Random(4)
    for problem in generate("hard", 6, 9):
        order = list(problem.terms)
        rng.shuffle(order)
        k = rng.randrange(2, len(order))                 # the step whose term goes wrong
        reused = order[:k] + [order[rng.randrange(k)]] + order[k + 1:]   # one term twice, one never
        misread = order[:k] + [order[k] + 1 if order[k] % 10 != 9 else order[k] - 1] + order[k + 1:]
        misread_first = [order[0] + 10 if order[0] < 990 else order[0] - 10] + order[1:]
        for used, first_bad in ((reused, k - 1), (misread, k - 1), (misread_first, 0)):
            if sorted(used) == sorted(problem.terms):
                continue
            pool, _ = term_flags(circuit, problem, steps_using(used))
            assert (pool[:first_bad].abs() < 1e-3).all(), (problem.terms, used)
            assert (pool[first_bad:] > 0.99).all(), (problem.terms, used)
    # a value the question has twice may be used twice, not three times
    problem = Problem((512, 77, 512, 9))
    assert term_flags(circuit, problem, steps_using([512, 9, 512, 77]))[0].abs().max() < 1e-3
    pool, _ = term_flags(circuit, problem, steps_using([512, 9, 512, 512]))
    assert (pool[:2].abs() < 1e-3).all() and pool[2] > 0.99
    # a 4-digit running sum that ends in a term's digits is not a use of that term
    problem = Problem((442, 600, 400, 1))
    assert term_flags(circuit, problem, steps_using([600, 400, 442, 1]))[0].abs().max() < 1e-3


def test_the_shipped_recipe_materializes_the_circuit_with_its_head_once(tmp_path, monkeypatch):
    from safetensors.torch import load_file

    from ttc_vllm.testbed import CACHE_ENV, prm_path, prm_recipe_path

    monkeypatch.setenv(CACHE_ENV, str(tmp_path))
    path = prm_path()
    assert path.parent == tmp_path and (path / "config.json").read_text() == \
        (prm_recipe_path() / "config.json").read_text()
    state = load_file(str(path / "model.safetensors"))
    body, _, _ = pc.build(policy_path())
    for k, v in body.state_dict().items():
        assert torch.equal(state[f"model.{k}"], v), k
    for k, v in load_file(str(prm_recipe_path() / pc.HEAD_FILE)).items():
        assert torch.equal(state[k], v), k
    assert len(state) == len(body.state_dict()) + 4
    stamp = (path / "model.safetensors").stat().st_mtime_ns
    assert prm_path() == path and (path / "model.safetensors").stat().st_mtime_ns == stamp   # cached
    # a recipe directory with its own full model (a train-prm --out) is used as it is
    full = tmp_path / "full"
    full.mkdir()
    (full / "model.safetensors").write_bytes(b"")
    monkeypatch.setattr("ttc_vllm.testbed.prm_recipe_path", lambda: full)
    assert prm_path() == full
