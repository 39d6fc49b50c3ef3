"""The testbed PRM's body written by hand: the policy's own slip detector, compiled into a
`Qwen2ForProcessRewardModel` (vLLM's STEP pooling serves it unchanged).

Why: a testbed step is wrong when the policy sampled a token it did not expect (a slip; see
`PolicySurpriseScorer`, step AUC ~0.88). Layers trained on top of the frozen policy never
learned that comparison from MC labels (held-out AUC stuck near 0.80; see
`ttc_vllm/testbed/README.md`), but three hand-set layers compute it. The score head stays
a trained `Linear -> ReLU -> Linear` (`train_prm --body circuit` fits it on the MC labels).

Layout (hidden 256 = the policy's 192 + 59 feature dims; 8 heads of 32, 2 KV heads):
  layers 0..n-1  the policy, block-embedded: the policy's weights on the first 192 dims
                 (its query heads 0-2 / 3-5 on heads 0-2 / 4-6, so each keeps its KV head),
                 norm weights x sqrt(192/256) and eps x 192/256, so those dims carry exactly
                 its residual stream (the other dims stay ~1e-3: they do not move its norms).
  embedding      also writes 1e-3 x a one-hot of the token (for the completion tokens J
                 the gap is taken at, and for `<think>`).
  layer n        attention: a previous-token head (query/key biases whose RoPE phases peak
                 at distance 1) copies the policy's logits over the completion vocabulary S
                 from position t-1 (where token t was sampled) to t; a constant head writes
                 K = 1e5, which from here on dominates every RMS norm, so the norms scale
                 all feature dims by one known constant. MLP: for each (v in S, j in J, v != j)
                 one SwiGLU unit, gate SiLU(g (z_v - z_j) - big (1 - [token = j])) x up
                 (z_v - z_j), summing to G_t = sum_v relu(z_v - z_x)^2 ~ the squared gap
                 between what the policy expected and what was sampled (0 when the sampled
                 token was its top choice).
  layer n+1      attention to `<think>` (a content key on the slowest RoPE pair) gives a 0/1
                 "in the completion" flag (the question's digits were never sampled); the
                 MLP writes flag x a log compression of G (~log3(G / 0.1), 0..10: clamp
                 ramps, so the pool's scores and the head's inputs stay bounded).
  layer n+2      attention with scores 8 x that pools a soft maximum over the prefix into
                 P: how badly the trace slipped anywhere so far.
  final norm     keeps P and K only; the head reads P through ramps relu(P - t_k), and
                 `fit_head` fits it as a monotone function of P.

It needs float32: K and the gate offsets are beyond float16. Its config.json says so
(`ttc_vllm_required_dtype`), and `pooling_llm_kwargs` applies it, since vLLM's "auto" would
pick float16 for a pooling model; `vllm serve` needs `--dtype float32`.

Offline (fp32, held-out steps, exact labels, before the compression): the running max of G
scores AUC 0.876 and a soft max 0.874, against 0.883 for the exact log-prob margin (benchmarks/prm_signals.py
measures the served model). The testbed tokenizer fixes S and J; other policies need their
own token sets (`build(..., completion_tokens=...)`).
"""
from __future__ import annotations

import copy
import math
from pathlib import Path
from typing import Sequence

HIDDEN, HEAD_DIM, HEADS, KV_HEADS, FFN = 256, 32, 8, 2, 704
ONE_HOT_SCALE = 1e-3      # token one-hots, small enough not to move the policy's norms
K_CONST = 1e5             # the constant that dominates the norms from the compare layer on
G_SCALE = 1e-3            # G is stored x 1e-3 so it never rivals K
KAPPA = math.sqrt(HIDDEN) / K_CONST   # what the K-dominated norms multiply features by
GATE_SLOPE, GATE_OFF, RAMP_SLOPE = 4.0, 2000.0, 20.0
THINK_SCORE, POOL_SCORE = 50.0, 8.0
# G is compressed to ~log3(G / 0.1): sum_k clamp((G - t_k) / (2 t_k), 0, 1), t_k = 0.1 x 3^k
LOG_STEPS = tuple(0.1 * 3 ** k for k in range(10))
HEAD_RAMPS = tuple(0.5 * k for k in range(20))   # score head unit k = relu(P - t_k)


def testbed_tokens(tokenizer) -> tuple[list[int], list[int], int]:
    """(S, J, think id) for the testbed: S = every token a testbed completion uses, J = S
    without the step tag (the PRM's scoring position is not a sampled token)."""
    from ttc_vllm.testbed.task import ANSWER_PREFIX, CHECK_PREFIX, EOS, STEP_TAG, THINK_END, THINK_START

    ids = tokenizer.encode("0123456789+=\n" + CHECK_PREFIX + ANSWER_PREFIX, add_special_tokens=False)
    ids += [tokenizer.convert_tokens_to_ids(w) for w in (STEP_TAG, THINK_END, EOS)]
    s = sorted(set(ids))
    tag = tokenizer.convert_tokens_to_ids(STEP_TAG)
    return s, [t for t in s if t != tag], int(tokenizer.convert_tokens_to_ids(THINK_START))


class Dims:
    """Where each feature lives in the 256-wide residual stream."""

    def __init__(self, base: int, s: Sequence[int], j: Sequence[int]):
        self.policy = slice(0, base)
        self.one_hot = {t: base + i for i, t in enumerate(j)}
        self.think = base + len(j)
        self.logits = {t: self.think + 1 + i for i, t in enumerate(s)}
        self.k = self.think + 1 + len(s)
        self.g, self.flag, self.g_comp, self.pool = self.k + 1, self.k + 2, self.k + 3, self.k + 4
        if self.pool >= HIDDEN:
            raise ValueError(f"{len(s)} completion tokens do not fit the {HIDDEN}-wide stream")


def previous_token_qk(scale: float = 364.0, pairs: int = 5, decay: float = 0.8):
    """Query and key biases (one head) whose RoPE score sum_i a_i cos(theta_i (d - 1)) peaks
    at distance d = 1: 40+ logits above every other distance below 600 tokens, so softmax
    puts ~all weight on the previous position."""
    import torch

    theta = 10000.0 ** (-torch.arange(HEAD_DIM // 2, dtype=torch.float64) * 2 / HEAD_DIM)
    q = torch.zeros(HEAD_DIM, dtype=torch.float64)
    k = torch.zeros(HEAD_DIM, dtype=torch.float64)
    for i in range(pairs):
        amp = math.sqrt(scale * decay ** i)
        k[i] = amp
        q[i], q[i + HEAD_DIM // 2] = amp * math.cos(theta[i]), -amp * math.sin(theta[i])
    return q.float(), k.float()


def build(policy_dir: Path, completion_tokens: tuple[list[int], list[int], int] | None = None):
    """(Qwen2Model body, config, dims): the circuit over the policy in `policy_dir`."""
    import torch
    from transformers import AutoTokenizer, Qwen2ForCausalLM, Qwen2Model

    policy = Qwen2ForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32)
    pc = policy.config
    base, heads, kv = pc.hidden_size, pc.num_attention_heads, pc.num_key_value_heads
    if (base, heads, kv) != (192, 6, 2):
        raise ValueError("the circuit expects the testbed policy's shape (192 wide, 6 heads of 32, 2 KV heads)")
    s, j, think = completion_tokens or testbed_tokens(AutoTokenizer.from_pretrained(str(policy_dir)))
    d = Dims(base, s, j)
    n = pc.num_hidden_layers
    cfg = copy.deepcopy(pc)
    cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads = HIDDEN, HEADS, KV_HEADS
    cfg.head_dim, cfg.intermediate_size = HEAD_DIM, FFN
    cfg.num_hidden_layers = n + 3
    cfg.layer_types = ["full_attention"] * cfg.num_hidden_layers
    share = base / HIDDEN
    cfg.rms_norm_eps = pc.rms_norm_eps * share   # mean over 256 dims = the policy's mean x 192/256
    cfg.tie_word_embeddings = False
    from ttc_vllm.prm.scorers import REQUIRED_DTYPE_KEY

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
    policy_q = [h + h // 3 for h in range(heads)]   # policy query head -> circuit query head

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

    # the policy, block-embedded (circuit query heads 3 and 7 stay zero: their output is unused)
    for layer in range(n):
        p, o = f"model.layers.{layer}.", blank(layer)
        for name in ("input_layernorm", "post_attention_layernorm"):
            st[o + name + ".weight"][d.policy] = ps[p + name + ".weight"] * norm_scale
        for name in ("k_proj", "v_proj"):
            w = ps[p + f"self_attn.{name}.weight"]
            st[o + f"self_attn.{name}.weight"][: w.shape[0], d.policy] = w
            st[o + f"self_attn.{name}.bias"][: w.shape[0]] = ps[p + f"self_attn.{name}.bias"]
        for h, ch in enumerate(policy_q):
            src = slice(h * HEAD_DIM, (h + 1) * HEAD_DIM)
            st[o + "self_attn.q_proj.weight"][head(ch), d.policy] = ps[p + "self_attn.q_proj.weight"][src]
            st[o + "self_attn.q_proj.bias"][head(ch)] = ps[p + "self_attn.q_proj.bias"][src]
            st[o + "self_attn.o_proj.weight"][d.policy, head(ch)] = ps[p + "self_attn.o_proj.weight"][:, src]
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
    st[o + "self_attn.o_proj.weight"][d.k, HEAD_DIM + len(s)] = 1.0
    st[o + "post_attention_layernorm.weight"][[*d.one_hot.values(), *d.logits.values(), d.k]] = 1.0
    gate, up, down = (st[o + f"mlp.{x}_proj.weight"] for x in ("gate", "up", "down"))
    unit = 0
    for tj in j:
        for tv in s:
            if tv == tj:
                continue
            gate[unit, d.logits[tv]] += GATE_SLOPE / KAPPA
            gate[unit, d.logits[tj]] -= GATE_SLOPE / KAPPA
            gate[unit, d.one_hot[tj]] += GATE_OFF / (ONE_HOT_SCALE * KAPPA)
            gate[unit, d.k] -= GATE_OFF / math.sqrt(HIDDEN)          # K after the norm ~ sqrt(256)
            up[unit, d.logits[tv]] += 1 / KAPPA
            up[unit, d.logits[tj]] -= 1 / KAPPA
            down[d.g, unit] = G_SCALE / GATE_SLOPE
            unit += 1
    if unit > FFN:
        raise ValueError(f"{unit} gap units do not fit {FFN}")

    # layer n+1: the completion flag (query head 0 / KV head 0), then flag x log-compressed G
    o = blank(n + 1)
    st[o + "input_layernorm.weight"][[d.think, d.k]] = 1.0
    slow = HEAD_DIM // 2 - 1     # the slowest RoPE pair: ~position-independent content scores
    st[o + "self_attn.q_proj.bias"][slow] = 1.0
    st[o + "self_attn.k_proj.weight"][slow, d.think] = THINK_SCORE * math.sqrt(HEAD_DIM) / (ONE_HOT_SCALE * KAPPA)
    st[o + "self_attn.v_proj.weight"][0, d.think] = 1 / (ONE_HOT_SCALE * KAPPA)
    st[o + "self_attn.o_proj.weight"][d.flag, 0] = 1.0
    st[o + "post_attention_layernorm.weight"][[d.flag, d.g, d.k]] = 1.0
    # clamp(x, 0, 1) = relu(x) - relu(x - 1), each relu(x) ~ SiLU(a x) / a; the flag multiplies
    # (the up projection), so prompt positions (flag exactly 0) add nothing however large G is
    for k, t in enumerate(LOG_STEPS):
        for unit, shift, sign in ((2 * k, 0.0, 1.0), (2 * k + 1, 1.0, -1.0)):
            st[o + "mlp.gate_proj.weight"][unit, d.g] = RAMP_SLOPE / (2 * t * G_SCALE * KAPPA)
            st[o + "mlp.gate_proj.weight"][unit, d.k] = -RAMP_SLOPE * (0.5 + shift) / math.sqrt(HIDDEN)
            st[o + "mlp.up_proj.weight"][unit, d.flag] = sign / KAPPA
            st[o + "mlp.down_proj.weight"][d.g_comp, unit] = 1 / RAMP_SLOPE

    # layer n+2: soft max of G over the prefix
    o = blank(n + 2)
    st[o + "input_layernorm.weight"][[d.g_comp, d.k]] = 1.0
    st[o + "self_attn.q_proj.bias"][slow] = 1.0
    st[o + "self_attn.k_proj.weight"][slow, d.g_comp] = POOL_SCORE * math.sqrt(HEAD_DIM) / KAPPA
    st[o + "self_attn.v_proj.weight"][0, d.g_comp] = 1 / KAPPA
    st[o + "self_attn.o_proj.weight"][d.pool, 0] = 1.0
    st["norm.weight"] = zeros(HIDDEN)
    st["norm.weight"][[d.pool, d.k]] = 1.0

    body = Qwen2Model(cfg)
    body.load_state_dict(st, strict=True)
    for p in body.parameters():
        p.requires_grad_(False)
    return body.eval(), cfg, d


def head_init(score, dims: Dims) -> None:
    """Score head weights: hidden unit k = relu(P - t_k) read off the normed stream (a
    piecewise-linear basis on P in [0, 10]); logit(good) - logit(bad) = 2 - P to start
    (training refits the output layer and the ramps)."""
    import torch

    first, last = score[0], score[2]
    with torch.no_grad():
        for m in (first, last):
            m.weight.zero_()
            m.bias.zero_()
        for k, t in enumerate(HEAD_RAMPS):
            first.weight[k, dims.pool] = 1 / KAPPA
            first.bias[k] = -t
        last.weight[1, 0], last.weight[0, 0] = -0.5, 0.5
        last.bias[1], last.bias[0] = 1.0, -1.0


def fit_head(score, dims: Dims, pool, targets, steps: int = 400, lr: float = 0.05) -> dict:
    """Fit the score head as a monotone calibration of P: logit(good) - logit(bad) =
    b - sum_k w_k relu(P - t_k) with every w_k >= 0 (softplus), by soft-label cross entropy
    against `targets` (P(good) per step). Monotone, so the head cannot reorder steps by
    quirks of the labels; it only maps P to a probability. Writes the weights into `score`."""
    import torch

    pool = pool.detach().float()
    targets = targets.detach().float()
    ramps = torch.tensor(HEAD_RAMPS)
    basis = torch.relu(pool[:, None] - ramps[None, :])            # [N, R]
    raw = torch.full((len(HEAD_RAMPS),), -3.0, requires_grad=True)
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
        last.weight[1, : len(HEAD_RAMPS)] = -w / 2
        last.weight[0, : len(HEAD_RAMPS)] = w / 2
        last.bias[1], last.bias[0] = bias.detach() / 2, -bias.detach() / 2
    return {"loss": round(loss.item(), 4), "bias": round(bias.item(), 4),
            "slopes": [round(x, 4) for x in w.tolist()]}


def pool_at(body, dims: Dims, ids, mask, rows, cols):
    """P at the given (row, position) pairs of a padded batch (no grad)."""
    import torch

    with torch.no_grad():
        hidden = body(input_ids=ids, attention_mask=mask).last_hidden_state
    return hidden[rows, cols, dims.pool] / KAPPA


def features(body, dims: Dims, ids, mask=None):
    """(G, flag, compressed G x flag, P) per position, unscaled: for tests and analysis."""
    out = body(input_ids=ids, attention_mask=mask, output_hidden_states=True)
    hs = out.hidden_states
    n = len(hs) - 1
    g = hs[n - 2][..., dims.g] / G_SCALE
    flag, g_comp = hs[n - 1][..., dims.flag], hs[n - 1][..., dims.g_comp]
    pool = out.last_hidden_state[..., dims.pool] / KAPPA
    return g, flag, g_comp, pool


def compress(g):
    """The circuit's log compression of G (exact ramps; the circuit's SiLUs round the corners)."""
    return sum(((g - t) / (2 * t)).clamp(0, 1) for t in LOG_STEPS)
