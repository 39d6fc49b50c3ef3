"""The testbed PRM's body written by hand: the policy's own slip detector and a term
bookkeeping check, compiled into a `Qwen2ForProcessRewardModel` (vLLM's STEP pooling serves
it unchanged).

Why: a testbed step goes wrong in two ways. (1) A slip: the policy sampled a token it did
not expect (see `PolicySurpriseScorer`, step AUC ~0.88). Layers trained on top of the frozen
policy never learned that comparison from MC labels (held-out AUC stuck near 0.80; see
`ttc_vllm/testbed/README.md`). (2) A fluent bookkeeping error: a step adds a term already
added (and so never adds another one) or a term the question does not have, with correct
arithmetic. The policy finds these likely, so no slip signal sees them, and they are most
of the wrong traces that survive to a vote (1,081 of 2,291 wrong samples on 200 hard
problems, against 527 with only an arithmetic error and 640 with both;
`benchmarks/error_types.py`). Both checks are hand-set layers; the score head stays a
trained `Linear -> ReLU -> Linear` (`train_prm --body circuit` fits it on the MC labels).

Layout (hidden 384 = the policy's 192 + feature dims; 6 heads of 64, 2 KV heads; RoPE theta
1e8, so pairs 0-15 of a 64-dim head turn exactly like pairs 0-15 of the policy's 32-dim
heads, theta_i = 10^(-i/4), and pairs 16-31 turn <= 1e-4 rad per token: content scores
that do not depend on the distance):
  layers 0..n-1  the policy, block-embedded: its weights on the first 192 dims, each query /
                 key head's RoPE pairs on the same-frequency pairs of a 64-dim head (queries
                 x sqrt 2 undo the 1/sqrt(64) scale), norm weights x sqrt(192/384) and eps x
                 192/384, so those dims carry exactly its residual stream (the other dims
                 stay ~1e-3: they do not move its norms).
  embedding      also writes 1e-3 x a one-hot of the token (completion tokens J, `<think>`).
  layer n        attention: a previous-token head (query/key biases whose RoPE phases peak
                 at distance 1) copies the policy's logits over the completion vocabulary S
                 from position t-1 (where token t was sampled) to t; a constant head writes
                 K = 1e5, which from here on dominates every RMS norm, so the norms scale
                 all feature dims by one known constant. MLP: for each (v in S, j in J, v != j)
                 one SwiGLU unit, gate SiLU(g (z_v - z_j) - big (1 - [token = j])) x up
                 (z_v - z_j), summing to G_t = sum_v relu(z_v - z_x)^2 ~ the squared gap
                 between what the policy expected and what was sampled (0 when the sampled
                 token was its top choice).
  layer n+1      attention: content heads give the 0/1 "in the completion" flag (attend to
                 `<think>`: the question's digits were never sampled), the '=' count (first
                 step line or not) and a "check line" flag; previous-token heads copy the
                 tokens at t-1..t-3 as a digit on a circle of ten (cos, sin) plus is-digit.
                 MLP: flag x a log compression of G (~log3(G / 0.1), 0..10: clamp ramps, so
                 the pool's scores and the head's inputs stay bounded); 0/1 ANDs mask the
                 digit slots after a number's first digit (END marks its length), and give
                 each '+' / '=' a value: +1 for a question term, -1 for a used term (a step's
                 second term, at '='; the first step's first term, at '+'; not in check
                 lines), and mark the used ones as queries.
  layer n+2      attention: a soft maximum of compressed G over the prefix, P (how badly the
                 trace slipped anywhere so far); the term match: each position's number code
                 against every '+' / '=' key, score 100 x equal digit slots, so softmax
                 averages the values of the exact matches, (question copies - uses so far) /
                 (their sum): 0 for a legal use, <= -1/5 for one use too many or a term the
                 question lacks. MLP: T = query x clamp((-match - 0.04) / 0.04, 0, 1).
  layer n+3      a soft maximum of T over the prefix: the trace broke the bookkeeping so far.
  final norm     keeps P, pooled T and K; the head reads ramps relu(P - t_k) and T, and
                 `fit_head` fits it as a monotone function of both.

It needs float32: K and the gate offsets are beyond float16. Its config.json says so
(`ttc_vllm_required_dtype`), and `pooling_llm_kwargs` applies it, since vLLM's "auto" would
pick float16 for a pooling model; `vllm serve` needs `--dtype float32`.

Offline (fp32, held-out steps, exact labels, before the compression): the running max of G
scores AUC 0.876 and a soft max 0.874, against 0.883 for the exact log-prob margin; with the
term check the shipped head scores 0.923 (benchmarks/prm_signals.py measures the served
model). The testbed tokenizer fixes S, J and the term tokens; other policies need their own
(`build(..., completion_tokens=..., terms=...)`).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Sequence

HIDDEN, HEAD_DIM, HEADS, KV_HEADS, FFN = 384, 64, 6, 2, 704
ROPE_THETA = 1e8          # with 64-dim heads: pairs 0-15 turn exactly like the policy's 32-dim
                          # heads (theta_i = 10^(-i/4)); pairs 16-31 turn <= 1e-4 rad/token
POLICY_HEAD_DIM = 32
ONE_HOT_SCALE = 1e-3      # token one-hots, small enough not to move the policy's norms
K_CONST = 1e5             # the constant that dominates the norms from the compare layer on
G_SCALE = 1e-3            # G is stored x 1e-3 so it never rivals K
KAPPA = math.sqrt(HIDDEN) / K_CONST   # what the K-dominated norms multiply features by
GATE_SLOPE, GATE_OFF, RAMP_SLOPE = 4.0, 2000.0, 20.0
THINK_SCORE, POOL_SCORE = 50.0, 8.0
COUNT_SCORE = 30.0        # the '=' count and "check" flag heads
AND_SLOPE = 40.0          # SiLU(40 x 0.5) / 20 = 1 - 2e-9: a 0/1 AND of 0/1 inputs
MATCH_SCORE = 100.0       # x (number of equal digit slots): one digit off costs >= 19 logits
TERM_POOL_SCORE = 20.0
# G is compressed to ~log3(G / 0.1): sum_k clamp((G - t_k) / (2 t_k), 0, 1), t_k = 0.1 x 3^k
LOG_STEPS = tuple(0.1 * 3 ** k for k in range(10))
HEAD_RAMPS = tuple(0.5 * k for k in range(20))   # score head unit k = relu(P - t_k)
TERM_UNIT = len(HEAD_RAMPS)                       # score head unit reading the term flag


def testbed_tokens(tokenizer) -> tuple[list[int], list[int], int]:
    """(S, J, think id) for the testbed: S = every token a testbed completion uses, J = S
    without the step tag (the PRM's scoring position is not a sampled token)."""
    from ttc_vllm.testbed.task import ANSWER_PREFIX, CHECK_PREFIX, EOS, STEP_TAG, THINK_END, THINK_START

    ids = tokenizer.encode("0123456789+=\n" + CHECK_PREFIX + ANSWER_PREFIX, add_special_tokens=False)
    ids += [tokenizer.convert_tokens_to_ids(w) for w in (STEP_TAG, THINK_END, EOS)]
    s = sorted(set(ids))
    tag = tokenizer.convert_tokens_to_ids(STEP_TAG)
    return s, [t for t in s if t != tag], int(tokenizer.convert_tokens_to_ids(THINK_START))


def term_tokens(tokenizer) -> dict:
    """Token ids the term check reads: the ten digits, '+', '=', and the 'k' of "check "
    (only check lines contain it)."""
    one = lambda c: tokenizer.encode(c, add_special_tokens=False)[0]  # noqa: E731
    return {"digits": [one(str(i)) for i in range(10)], "plus": one("+"), "eq": one("="), "check": one("k")}


class Dims:
    """Where each feature lives in the residual stream."""

    def __init__(self, base: int, s: Sequence[int], j: Sequence[int]):
        self.policy = slice(0, base)
        self.one_hot = {t: base + i for i, t in enumerate(j)}
        self.think = base + len(j)
        self.logits = {t: self.think + 1 + i for i, t in enumerate(s)}
        self.k = self.think + 1 + len(s)
        nxt = iter(range(self.k + 1, HIDDEN))
        self.g, self.flag, self.g_comp, self.pool = (next(nxt) for _ in range(4))
        # term check: the '=' count and check flag; the tokens at t-1..t-3 as (cos, sin,
        # is digit, is not digit); the masked codes of slots 2 and 3 (cos, sin, END); the
        # key value, the query mask, the match, the flag and its pool
        self.eq_count, self.check = next(nxt), next(nxt)
        self.raw = [[next(nxt) for _ in range(4)] for _ in range(3)]
        self.code = [self.raw[0][:2]] + [[next(nxt) for _ in range(3)] for _ in range(2)]
        self.value, self.query, self.match, self.term, self.term_pool = (next(nxt) for _ in range(5))
        if self.term_pool >= HIDDEN - 1:
            raise ValueError(f"{len(s)} completion tokens do not fit the {HIDDEN}-wide stream")


def rope_frequencies():
    import torch

    return ROPE_THETA ** (-torch.arange(HEAD_DIM // 2, dtype=torch.float64) * 2 / HEAD_DIM)


def previous_token_qk(distance: int = 1, scale: float = 364.0 * math.sqrt(HEAD_DIM / POLICY_HEAD_DIM),
                      pairs: int = 5, decay: float = 0.8):
    """Query and key biases (one head) whose RoPE score sum_i a_i cos(theta_i (d - distance))
    peaks at d = distance: ~40 logits above every other distance below 600 tokens, so softmax
    puts ~all weight on the position `distance` back. The key does not depend on the distance."""
    import torch

    theta = rope_frequencies()
    q = torch.zeros(HEAD_DIM, dtype=torch.float64)
    k = torch.zeros(HEAD_DIM, dtype=torch.float64)
    for i in range(pairs):
        amp = math.sqrt(scale * decay ** i)
        k[i] = amp
        q[i], q[i + HEAD_DIM // 2] = amp * math.cos(theta[i] * distance), -amp * math.sin(theta[i] * distance)
    return q.float(), k.float()


def build(policy_dir: Path, completion_tokens: tuple[list[int], list[int], int] | None = None,
          terms: dict | None = None):
    """(Qwen2Model body, config, dims): the circuit over the policy in `policy_dir`."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM, Qwen2Model

    policy = Qwen2ForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32)
    pc = policy.config
    base, heads, kv = pc.hidden_size, pc.num_attention_heads, pc.num_key_value_heads
    if (base, heads, kv) != (192, 6, 2):
        raise ValueError("the circuit expects the testbed policy's shape (192 wide, 6 heads of 32, 2 KV heads)")
    theta = (getattr(pc, "rope_parameters", None) or {}).get("rope_theta", getattr(pc, "rope_theta", None))
    if theta != 10000.0:
        raise ValueError(f"the circuit expects the policy's RoPE theta 10000, got {theta}")
    if completion_tokens is None or terms is None:
        tok = AutoTokenizer.from_pretrained(str(policy_dir))
        completion_tokens = completion_tokens or testbed_tokens(tok)
        terms = terms or term_tokens(tok)
    s, j, think = completion_tokens
    d = Dims(base, s, j)
    n = pc.num_hidden_layers
    cfg = copy.deepcopy(pc)
    cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads = HIDDEN, HEADS, KV_HEADS
    cfg.head_dim, cfg.intermediate_size = HEAD_DIM, FFN
    cfg.rope_parameters = {"rope_type": "default", "rope_theta": ROPE_THETA}
    cfg.num_hidden_layers = n + 4
    cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
    share = base / HIDDEN
    cfg.rms_norm_eps = pc.rms_norm_eps * share   # mean over HIDDEN dims = the policy's mean x 192/HIDDEN
    cfg.tie_word_embeddings = False
    from ttc_vllm.engine import REQUIRED_DTYPE_KEY

    setattr(cfg, REQUIRED_DTYPE_KEY, "float32")   # read back by pooling_llm_kwargs
    ps = policy.state_dict()
    zeros = torch.zeros
    st: dict[str, torch.Tensor] = {}
    emb = zeros(pc.vocab_size, HIDDEN)
    emb[:, d.policy] = ps["model.embed_tokens.weight"]
    for t, col in d.one_hot.items():
        emb[t, col] = ONE_HOT_SCALE
    emb[think, d.think] = ONE_HOT_SCALE
    st["embed_tokens.weight"] = emb
    norm_scale = math.sqrt(share)
    one_hot = lambda t: d.one_hot[t]  # noqa: E731
    big = 1 / (ONE_HOT_SCALE * KAPPA)   # reads a one-hot dim back as 0/1 after a K-dominated norm
    const = 1 / math.sqrt(HIDDEN)       # reads K after such a norm as 1

    def blank(layer: int) -> str:
        o = f"layers.{layer}."
        for name in ("input_layernorm", "post_attention_layernorm"):
            st[o + name + ".weight"] = zeros(HIDDEN)
        for name, rows in (("q_proj", HEADS * HEAD_DIM), ("k_proj", KV_HEADS * HEAD_DIM),
                           ("v_proj", KV_HEADS * HEAD_DIM)):
            st[o + f"self_attn.{name}.weight"] = zeros(rows, HIDDEN)
            st[o + f"self_attn.{name}.bias"] = zeros(rows)
        st[o + "self_attn.o_proj.weight"] = zeros(HIDDEN, HEADS * HEAD_DIM)
        st[o + "mlp.gate_proj.weight"] = zeros(FFN, HIDDEN)
        st[o + "mlp.up_proj.weight"] = zeros(FFN, HIDDEN)
        st[o + "mlp.down_proj.weight"] = zeros(HIDDEN, FFN)
        return o

    def head(h: int) -> slice:
        return slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)

    def at(h: int, i: int) -> int:
        return h * HEAD_DIM + i

    # A policy head's RoPE pair i (dims i, i + 16) sits on pair i (dims i, i + 32) of a
    # 64-dim head, which turns at the same frequency; queries x sqrt(2) undo the 1/sqrt(64)
    # scaling. Query heads keep their index, so each keeps its KV head (3 per KV head).
    half = POLICY_HEAD_DIM // 2
    rope_rows = torch.tensor([i if i < half else i + HEAD_DIM // 2 - half for i in range(POLICY_HEAD_DIM)])
    q_scale = math.sqrt(HEAD_DIM / POLICY_HEAD_DIM)
    for layer in range(n):
        p, o = f"model.layers.{layer}.", blank(layer)
        for name in ("input_layernorm", "post_attention_layernorm"):
            st[o + name + ".weight"][d.policy] = ps[p + name + ".weight"] * norm_scale
        for h in range(heads):
            src, dst = slice(h * POLICY_HEAD_DIM, (h + 1) * POLICY_HEAD_DIM), h * HEAD_DIM + rope_rows
            st[o + "self_attn.q_proj.weight"][dst[:, None], torch.arange(base)] = \
                ps[p + "self_attn.q_proj.weight"][src] * q_scale
            st[o + "self_attn.q_proj.bias"][dst] = ps[p + "self_attn.q_proj.bias"][src] * q_scale
            st[o + "self_attn.o_proj.weight"][d.policy, h * HEAD_DIM: h * HEAD_DIM + POLICY_HEAD_DIM] = \
                ps[p + "self_attn.o_proj.weight"][:, src]
        for h in range(kv):
            src = slice(h * POLICY_HEAD_DIM, (h + 1) * POLICY_HEAD_DIM)
            dst = h * HEAD_DIM + rope_rows
            st[o + "self_attn.k_proj.weight"][dst[:, None], torch.arange(base)] = ps[p + "self_attn.k_proj.weight"][src]
            st[o + "self_attn.k_proj.bias"][dst] = ps[p + "self_attn.k_proj.bias"][src]
            v = slice(h * HEAD_DIM, h * HEAD_DIM + POLICY_HEAD_DIM)
            st[o + "self_attn.v_proj.weight"][v, d.policy] = ps[p + "self_attn.v_proj.weight"][src]
            st[o + "self_attn.v_proj.bias"][v] = ps[p + "self_attn.v_proj.bias"][src]
        for name in ("gate_proj", "up_proj"):
            st[o + f"mlp.{name}.weight"][: pc.intermediate_size, d.policy] = ps[p + f"mlp.{name}.weight"]
        st[o + "mlp.down_proj.weight"][d.policy, : pc.intermediate_size] = ps[p + "mlp.down_proj.weight"]

    # layer n: previous-token copy of the S logits (query head 0 on KV head 0), K (query head 1)
    o = blank(n)
    st[o + "input_layernorm.weight"][d.policy] = ps["model.norm.weight"] * norm_scale   # = its final norm
    q, k = previous_token_qk()
    st[o + "self_attn.q_proj.bias"][head(0)] = q
    st[o + "self_attn.k_proj.bias"][head(0)] = k
    lm_head = ps["lm_head.weight"]
    if len(s) >= HEAD_DIM:
        raise ValueError(f"{len(s)} completion tokens do not fit one {HEAD_DIM}-dim head")
    for i, t in enumerate(s):
        st[o + "self_attn.v_proj.weight"][i, d.policy] = lm_head[t]
        st[o + "self_attn.o_proj.weight"][d.logits[t], i] = 1.0
    st[o + "self_attn.v_proj.bias"][len(s)] = K_CONST
    st[o + "self_attn.o_proj.weight"][d.k, at(1, len(s))] = 1.0
    st[o + "post_attention_layernorm.weight"][[*d.one_hot.values(), *d.logits.values(), d.k]] = 1.0
    gate, up, down = (st[o + f"mlp.{x}_proj.weight"] for x in ("gate", "up", "down"))
    unit = 0
    for tj in j:
        for tv in s:
            if tv == tj:
                continue
            gate[unit, d.logits[tv]] += GATE_SLOPE / KAPPA
            gate[unit, d.logits[tj]] -= GATE_SLOPE / KAPPA
            gate[unit, d.one_hot[tj]] += GATE_OFF * big
            gate[unit, d.k] -= GATE_OFF * const
            up[unit, d.logits[tv]] += 1 / KAPPA
            up[unit, d.logits[tj]] -= 1 / KAPPA
            down[d.g, unit] = G_SCALE / GATE_SLOPE
            unit += 1
    if unit > FFN:
        raise ValueError(f"{unit} gap units do not fit {FFN}")

    # layer n+1, attention. KV head 0, content keys on the slowest RoPE pairs (position-free):
    # head 0 the completion flag (attend to `<think>`), head 1 the '=' count (n / (n + 1) over
    # the '=' so far with `<think>` as the sink: 1/2 inside the first step line, >= 2/3
    # after), head 2 the check flag (0 until a "check" line, >= 1/2 from then on).
    # KV head 1: heads 3-5 copy the token at t-1, t-2, t-3 as (cos, sin) of its digit on a
    # circle of ten, is-digit, is-not-digit.
    o = blank(n + 1)
    st[o + "input_layernorm.weight"][[d.think, d.k, *d.one_hot.values()]] = 1.0
    wq, bq = st[o + "self_attn.q_proj.weight"], st[o + "self_attn.q_proj.bias"]
    wk, bk = st[o + "self_attn.k_proj.weight"], st[o + "self_attn.k_proj.bias"]
    wv, bv = st[o + "self_attn.v_proj.weight"], st[o + "self_attn.v_proj.bias"]
    wo = st[o + "self_attn.o_proj.weight"]
    slow = HEAD_DIM // 2 - 1     # the slowest RoPE pair: ~position-independent content scores
    root = math.sqrt(HEAD_DIM)
    bq[at(0, slow)] = 1.0
    wk[slow, d.think] = THINK_SCORE * root * big
    wv[0, d.think] = big
    wo[d.flag, at(0, 0)] = 1.0
    for h, (pair, token, out) in enumerate(((slow - 1, terms["eq"], d.eq_count),
                                            (slow - 2, terms["check"], d.check)), start=1):
        bq[at(h, pair)] = 1.0
        wk[pair, one_hot(token)] = wk[pair, d.think] = COUNT_SCORE * root * big
        wv[h, one_hot(token)] = big
        wo[out, at(h, h)] = 1.0
    _, k = previous_token_qk()
    bk[head(1)] = k
    for i, digit in enumerate(terms["digits"]):
        angle = 2 * math.pi * i / 10
        wv[at(1, 0), one_hot(digit)] = math.cos(angle) * big
        wv[at(1, 1), one_hot(digit)] = math.sin(angle) * big
        wv[at(1, 2), one_hot(digit)] = big
        wv[at(1, 3), one_hot(digit)] = -big
    bv[at(1, 3)] = 1.0
    for back in range(3):
        q, _ = previous_token_qk(distance=back + 1)
        bq[head(3 + back)] = q
        for c in range(4):
            wo[d.raw[back][c], at(3 + back, c)] = 1.0

    # layer n+1, MLP: flag x log-compressed G; the masked digit codes; the key value and the
    # query mask of the term check (0/1 ANDs: SiLU(AND_SLOPE (sum - (m - 1/2))) x 2 / AND_SLOPE)
    reads = [d.flag, d.g, d.k, d.eq_count, d.check, *sum(d.raw, []), *d.one_hot.values()]
    st[o + "post_attention_layernorm.weight"][reads] = 1.0
    gate, up, down = (st[o + f"mlp.{x}_proj.weight"] for x in ("gate", "up", "down"))
    # clamp(x, 0, 1) = relu(x) - relu(x - 1), each relu(x) ~ SiLU(a x) / a; the flag multiplies
    # (the up projection), so prompt positions (flag exactly 0) add nothing however large G is
    for k, t in enumerate(LOG_STEPS):
        for unit, shift, sign in ((2 * k, 0.0, 1.0), (2 * k + 1, 1.0, -1.0)):
            gate[unit, d.g] = RAMP_SLOPE / (2 * t * G_SCALE * KAPPA)
            gate[unit, d.k] = -RAMP_SLOPE * (0.5 + shift) * const
            up[unit, d.flag] = sign / KAPPA
            down[d.g_comp, unit] = 1 / RAMP_SLOPE
    unit = 2 * len(LOG_STEPS)
    and_out = 2 / AND_SLOPE

    def and_unit(terms_in: dict[int, float], offset: float, up_dims: dict[int, float], out: dict[int, float]):
        nonlocal unit
        for dim, w in terms_in.items():
            gate[unit, dim] = AND_SLOPE * w * (big if dim in d.one_hot.values() else 1 / KAPPA)
        gate[unit, d.k] = -AND_SLOPE * offset * const
        for dim, w in up_dims.items():
            up[unit, dim] = and_out * w * (const if dim == d.k else 1 / KAPPA)
        for dim, w in out.items():
            down[dim, unit] = w
        unit += 1

    # slot 2 = (cos, sin, END) of t-2 if t-1 is a digit; slot 3 likewise if t-1 and t-2 are
    isdig = [d.raw[b][2] for b in range(3)]
    for c in range(3):
        src = (0, 1, 3)[c]
        and_unit({isdig[0]: 1.0}, 0.5, {d.raw[1][src]: 1.0}, {d.code[1][c]: 1.0})
        and_unit({isdig[0]: 1.0, isdig[1]: 1.0}, 1.5, {d.raw[2][src]: 1.0}, {d.code[2][c]: 1.0})
    plus, eq = one_hot(terms["plus"]), one_hot(terms["eq"])
    # a question term: '+' or '=' before `<think>` -> value +1
    and_unit({plus: 1.0, eq: 1.0, d.flag: -1.0}, 0.5, {d.k: 1.0}, {d.value: 1.0})
    # a used term: in the completion, outside check lines, at '=' (a step's second term) or at
    # the first step's '+' (its first term) -> value -1, and this position asks the question
    and_unit({d.flag: 1.0, eq: 1.0, d.check: -2.0}, 1.5, {d.k: 1.0}, {d.value: -1.0, d.query: 1.0})
    # (first step: '=' count 1/2, later >= 2/3; before `<think>` the count is meaningless and
    # up to +6 here, which the flag's weight 8 outvotes)
    and_unit({d.flag: 8.0, plus: 1.0, d.check: -2.0, d.eq_count: -12.0}, 8.5 - 6.0, {d.k: 1.0},
             {d.value: -1.0, d.query: 1.0})

    # layer n+2: soft max of G over the prefix (head 0); the term match (head 3): the number
    # ending at t-1 against every '+' / '=' key, scores MATCH_SCORE x equal digit slots,
    # non-separator keys -2 x MATCH_SCORE. It averages the values of the exact matches:
    # (question copies - uses so far, this one included) / (their sum): 0 when the term is
    # used no more often than the question has it, <= -1/5 when it is one use too many
    o = blank(n + 2)
    code_dims = [x for slot in d.code for x in slot]
    st[o + "input_layernorm.weight"][[d.g_comp, d.k, d.value, plus, eq, *code_dims]] = 1.0
    wq, bq = st[o + "self_attn.q_proj.weight"], st[o + "self_attn.q_proj.bias"]
    wk, bk = st[o + "self_attn.k_proj.weight"], st[o + "self_attn.k_proj.bias"]
    wv = st[o + "self_attn.v_proj.weight"]
    wo = st[o + "self_attn.o_proj.weight"]
    bq[at(0, slow)] = 1.0
    wk[slow, d.g_comp] = POOL_SCORE * root / KAPPA
    wv[0, d.g_comp] = 1 / KAPPA
    wo[d.pool, at(0, 0)] = 1.0
    first = HEAD_DIM // 2 - 12   # RoPE pairs 20..28: <= 1e-5 rad per token
    for i, dim in enumerate(code_dims):
        wq[at(3, first + i), dim] = MATCH_SCORE * root / KAPPA
        wk[at(1, first + i), dim] = 1 / KAPPA
    sep = first + len(code_dims)
    bq[at(3, sep)] = 2 * MATCH_SCORE * root
    wk[at(1, sep), plus] = wk[at(1, sep), eq] = big
    bk[at(1, sep)] = -1.0
    wv[at(1, 0), d.value] = 1 / KAPPA
    wo[d.match, at(3, 0)] = 1.0
    # the term flag: query mask x clamp((-match - 0.04) / 0.04, 0, 1)
    st[o + "post_attention_layernorm.weight"][[d.match, d.query, d.k]] = 1.0
    gate, up, down = (st[o + f"mlp.{x}_proj.weight"] for x in ("gate", "up", "down"))
    for unit, shift, sign in ((0, 0.0, 1.0), (1, 1.0, -1.0)):
        gate[unit, d.match] = -RAMP_SLOPE / (0.04 * KAPPA)
        gate[unit, d.k] = -RAMP_SLOPE * (1.0 + shift) * const
        up[unit, d.query] = sign / KAPPA
        down[d.term, unit] = 1 / RAMP_SLOPE

    # layer n+3: the term flag's running max (soft, scores TERM_POOL_SCORE x flag)
    o = blank(n + 3)
    st[o + "input_layernorm.weight"][[d.term, d.k]] = 1.0
    st[o + "self_attn.q_proj.bias"][at(0, slow)] = 1.0
    st[o + "self_attn.k_proj.weight"][slow, d.term] = TERM_POOL_SCORE * root / KAPPA
    st[o + "self_attn.v_proj.weight"][0, d.term] = 1 / KAPPA
    st[o + "self_attn.o_proj.weight"][d.term_pool, at(0, 0)] = 1.0
    st["norm.weight"] = zeros(HIDDEN)
    st["norm.weight"][[d.pool, d.term_pool, d.k]] = 1.0

    body = Qwen2Model(cfg)
    body.load_state_dict(st, strict=True)
    for p in body.parameters():
        p.requires_grad_(False)
    return body.eval(), cfg, d


def head_init(score, dims: Dims) -> None:
    """Score head weights: hidden unit k = relu(P - t_k) read off the normed stream (a
    piecewise-linear basis on P in [0, 10]) and unit TERM_UNIT = the term flag's pool T;
    logit(good) - logit(bad) = 2 - P - 4 T to start (`fit_head` refits the output layer)."""
    import torch

    first, last = score[0], score[2]
    with torch.no_grad():
        for m in (first, last):
            m.weight.zero_()
            m.bias.zero_()
        for k, t in enumerate(HEAD_RAMPS):
            first.weight[k, dims.pool] = 1 / KAPPA
            first.bias[k] = -t
        first.weight[TERM_UNIT, dims.term_pool] = 1 / KAPPA
        last.weight[1, 0], last.weight[0, 0] = -0.5, 0.5
        last.weight[1, TERM_UNIT], last.weight[0, TERM_UNIT] = -2.0, 2.0
        last.bias[1], last.bias[0] = 1.0, -1.0


def head_basis(features):
    """[N, 2] (P, T) -> the score head's hidden units [N, len(HEAD_RAMPS) + 1]."""
    import torch

    ramps = torch.tensor(HEAD_RAMPS)
    return torch.cat([torch.relu(features[:, :1] - ramps[None, :]), features[:, 1:2].clamp(min=0)], 1)


def fit_head(score, dims: Dims, features, targets, steps: int = 400, lr: float = 0.05) -> dict:
    """Fit the score head as a monotone calibration of (P, T): logit(good) - logit(bad) =
    b - sum_k w_k relu(P - t_k) - w_T T with every w >= 0 (softplus), by soft-label cross
    entropy against `targets` (P(good) per step). Monotone, so the head cannot reorder steps
    by quirks of the labels; it only maps the two compiled signals to a probability. Writes
    the weights into `score`."""
    import torch

    basis = head_basis(features.detach().float())
    targets = targets.detach().float()
    raw = torch.full((basis.shape[1],), -3.0, requires_grad=True)
    bias = torch.tensor(2.0, requires_grad=True)
    opt = torch.optim.Adam([raw, bias], lr=lr)
    for _ in range(steps):
        margin = bias - basis @ torch.nn.functional.softplus(raw)
        loss = torch.nn.functional.binary_cross_entropy_with_logits(margin, targets)
        opt.zero_grad()
        loss.backward()
        opt.step()
    head_init(score, dims)
    w = torch.nn.functional.softplus(raw).detach()
    last = score[2]
    with torch.no_grad():
        last.weight[1, : len(w)] = -w / 2
        last.weight[0, : len(w)] = w / 2
        last.bias[1], last.bias[0] = bias.detach() / 2, -bias.detach() / 2
    return {"loss": round(loss.item(), 4), "bias": round(bias.item(), 4),
            "slopes": [round(x, 4) for x in w[:-1].tolist()], "term_weight": round(w[-1].item(), 4)}


def pool_at(body, dims: Dims, ids, mask, rows, cols):
    """(P, T) at the given (row, position) pairs of a padded batch, [N, 2] (no grad)."""
    import torch

    with torch.no_grad():
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden[rows, cols][:, [dims.pool, dims.term_pool]] / KAPPA


def features(body, dims: Dims, ids, mask=None) -> dict:
    """Every circuit feature per position, unscaled, by name: for tests and analysis."""
    out = body(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hs = out.hidden_states
    n = len(hs) - 5   # the policy's layers; hs[n + i + 1] is the output of circuit layer n + i
    after_compare, after_flags, after_match = hs[n + 1], hs[n + 2], hs[n + 3]
    last = out.last_hidden_state
    return {
        "g": after_compare[..., dims.g] / G_SCALE,
        "flag": after_flags[..., dims.flag], "g_comp": after_flags[..., dims.g_comp],
        "eq_count": after_flags[..., dims.eq_count], "check": after_flags[..., dims.check],
        "value": after_flags[..., dims.value], "query": after_flags[..., dims.query],
        "match": after_match[..., dims.match], "term": after_match[..., dims.term],
        "pool": last[..., dims.pool] / KAPPA, "term_pool": last[..., dims.term_pool] / KAPPA,
    }


def compress(g):
    """The circuit's log compression of G (exact ramps; the circuit's SiLUs round the corners)."""
    return sum(((g - t) / (2 * t)).clamp(0, 1) for t in LOG_STEPS)


HEAD_FILE = "head.safetensors"   # a circuit PRM's fitted score head: all git ships of its weights


def materialize(recipe: Path, policy_dir: Path, cache_root: Path) -> Path:
    """A full model directory for vLLM from a circuit PRM's recipe (config, tokenizer files
    and HEAD_FILE): the body is rebuilt from the policy (`build` is deterministic), the head
    loaded. Built once into cache_root, keyed by the recipe, the policy and this module, and
    moved into place whole, so concurrent callers never see half a model."""
    import hashlib
    import os
    import shutil
    import tempfile

    from safetensors.torch import load_file, save_file

    digest = hashlib.sha256()
    for path in [*sorted(p for p in recipe.iterdir() if p.is_file()), policy_dir / "model.safetensors",
                 Path(__file__)]:
        digest.update(path.name.encode() + path.read_bytes())
    target = cache_root / f"testbed-prm-{digest.hexdigest()[:16]}"
    if (target / "model.safetensors").exists():
        return target
    from transformers.utils import logging as hf_logging

    bar = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()   # callers may print one-line errors on stderr
    try:
        body, _, _ = build(policy_dir)
    finally:
        if bar:
            hf_logging.enable_progress_bar()
    state = {f"model.{k}": v.contiguous() for k, v in body.state_dict().items()}
    state.update(load_file(str(recipe / HEAD_FILE)))
    cache_root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_root, prefix=".building-"))
    try:
        for path in recipe.iterdir():
            if path.is_file() and path.name != HEAD_FILE:
                shutil.copy(path, tmp / path.name)
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        try:
            os.rename(tmp, target)
        except OSError:   # another process finished first
            if not (target / "model.safetensors").exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target
