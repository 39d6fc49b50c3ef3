"""Train the testbed PRM: a `Qwen2ForProcessRewardModel` on Monte-Carlo step labels.

    python -m ttc_vllm.testbed.train_prm --labels LABELS.jsonl [MORE.jsonl ...] --policy POLICY_DIR
        --out DIR [--body circuit|layers] [--minutes M] [--epochs E] [--extra-layers L]
        [--aux-weight W] [--label hard|soft] [--no-verify]

`--body circuit` (the default, the shipped PRM): the body is `prm_circuit`'s hand-set slip detector
and term bookkeeping check over the policy (frozen; nothing to learn there), and training is
one pass over the training split for its two pooled features (slip P, term flag T), then
`prm_circuit.fit_head`: a monotone calibration of them against the MC targets below, written
into the score head. Held-out AUC 0.923 (0.875 with the slip detector alone).

`--body layers` (the earlier PRM, AUC 0.80): the trained policy's transformer,
frozen, plus `--extra-layers` new layers on top
(copies of its last layer whose output projections start at zero, so training starts from
the policy's own hidden states), and vLLM's score head Linear(h, h) -> ReLU -> Linear(h, 2),
both with bias (vLLM's ColumnParallelLinear / RowParallelLinear default to bias=True).

Why new layers: a step is wrong when the policy wrote a token it did not expect (a slip).
The policy "knows" that only in its next-token distribution at the position BEFORE the slip;
probes show its hidden state at the step tag does not carry it. Reading "prediction at t-1 vs
token at t" and then pooling that over the trace into the tag takes two more attention layers
than the policy has. With --extra-layers 0 the whole policy is fine-tuned instead. (Trained
from MC labels they learn "digit positions are risky", not the comparison: AUC ~0.80.)

Loss: soft-label cross entropy at the tag closing each step, target [1 - y, y] (column 1 =
good) with y from the step's MC value: `--label hard` (default; Math-Shepherd HE) y = 1 when
any rollout reached the right answer, `--label soft` (SE) y = the value. Measured on the
testbed: SE-trained PRMs learn difficulty / distance to the end (held-out AUC vs the exact
ground truth ~0.6) while HE-trained ones rank right steps above wrong ones (~0.8 after one
epoch); plus, with extra layers, `--aux-weight` x the same loss at every completion token
against dense targets from the frozen policy itself (`surprise_targets`: running minimum of
p(token)/max p, floored) -- self-supervision that teaches the new layers to find slips. No
ground truth is used for training. Inputs are built by the scorer's own `token_ids_input`, so
training and serving see the same tokens (a final step's EOS replaced by the tag).

Held-out problems (a hash split) give the step-level AUC against `exact_prefix_correct`
(the testbed's exact ground truth) and against `mc_value > 0.5`. A second split of other
problems (validation) picks the epoch whose weights are saved, by AUC against the training
targets (ground truth is never used to train or to choose). The saved directory loads
in `vllm.LLM(path, runner="pooling")`; with verification on, vLLM's scores of held-out traces
are compared with this module's torch forward. Everything lands in DIR/training.json.
"""
from __future__ import annotations

import argparse
import functools
import hashlib
import json
import math
import random
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Sequence

from ttc_vllm.prm.label import read_jsonl
from ttc_vllm.prm.scorers import token_ids_input
from ttc_vllm.search.protocols import Step, Trace
from ttc_vllm.testbed.task import STEP_TAG

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
                   "chat_template.jinja")


@dataclass
class LabelledTrace:
    trace: Trace
    mc_values: list[float]  # per step
    exact: list[bool | None]  # per step
    problem_key: str


def traces_from_rows(rows: Sequence[dict[str, Any]]) -> list[LabelledTrace]:
    """Regroup the labeller's per-step rows into traces (the longest prefix of each
    trace_id holds all its steps)."""
    by_trace: dict[int, list[dict[str, Any]]] = {}
    for row in rows:
        by_trace.setdefault(row["trace_id"], []).append(row)
    out = []
    for trace_id in sorted(by_trace):
        group = sorted(by_trace[trace_id], key=lambda r: r["step_index"])
        if [r["step_index"] for r in group] != list(range(len(group))):
            raise ValueError(f"trace {trace_id}: step rows are not 0..{len(group) - 1}")
        last = group[-1]
        steps = tuple(Step(tuple(ids), r["step_text"], finished=r["final"])
                      for ids, r in zip(last["step_token_ids"], group))
        out.append(LabelledTrace(
            Trace(tuple(last["prompt_token_ids"]), steps),
            [float(r["mc_value"]) for r in group],
            [r["exact_prefix_correct"] for r in group],
            json.dumps(last["problem"], sort_keys=True),
        ))
    return out


def step_targets(mc_values: Sequence[float], label: str) -> list[float]:
    """Training targets P(good) per step from MC values: "soft" = the value itself (Math-
    Shepherd SE), "hard" = 1 when any rollout reached the right answer (HE). Soft targets of
    a hard problem's early, right steps are small (the policy rarely finishes it), so a PRM
    trained on them learns "how far from the end / how hard" more than "is this step right";
    HE keeps a right step near 1 whatever the difficulty -- what search needs to rank
    siblings."""
    if label == "soft":
        return list(mc_values)
    if label == "hard":
        return [1.0 if v > 0 else 0.0 for v in mc_values]
    raise ValueError(f"label must be 'soft' or 'hard', got {label!r}")


def held_out(problem_key: str, share: float, seed: int) -> bool:
    h = hashlib.sha1(f"{seed}:{problem_key}".encode()).digest()
    return int.from_bytes(h[:4], "little") / 2**32 < share


def roc_auc(scores: Sequence[float], labels: Sequence[bool]) -> float | None:
    """Area under the ROC curve (Mann-Whitney U with tied scores counted half); None when
    one class is missing."""
    pos = sum(1 for y in labels if y)
    neg = len(labels) - pos
    if pos == 0 or neg == 0:
        return None
    order = sorted(range(len(scores)), key=lambda i: scores[i])
    rank_sum, i = 0.0, 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and scores[order[j + 1]] == scores[order[i]]:
            j += 1
        avg_rank = (i + j) / 2 + 1
        rank_sum += sum(avg_rank for k in range(i, j + 1) if labels[order[k]])
        i = j + 1
    return (rank_sum - pos * (pos + 1) / 2) / (pos * neg)


def soft_step_loss(logits, targets):
    """Mean soft-label cross entropy over steps: logits [S, 2], targets [S] = P(good)."""
    import torch

    logp = torch.log_softmax(logits.float(), dim=-1)
    return -(targets * logp[:, 1] + (1 - targets) * logp[:, 0]).mean()


def build_model(policy_dir: Path, extra_layers: int = 0, body: str = "layers"):
    """A Qwen2 PRM in torch: the policy's transformer (+ `extra_layers` new layers on top) and
    vLLM's score head. New layers start as copies of the policy's last layer with their output
    projections zeroed, so the PRM's hidden states start equal to the policy's. Returns
    (model, config, teacher): `teacher(ids, base_hidden)` is the frozen policy's next-token
    log-probs from the policy layers' output (None when extra_layers == 0).

    `body="circuit"`: the hand-set slip detector and term check of `prm_circuit` instead (frozen; only the
    score head is fitted, by `train` through `prm_circuit.fit_head`; no teacher)."""
    import copy

    import torch
    from transformers import Qwen2ForCausalLM, Qwen2Model

    if body == "circuit":
        from ttc_vllm.testbed import prm_circuit

        backbone, config, dims = prm_circuit.build(policy_dir)
        model = _prm_class()(backbone, config.hidden_size, config.num_hidden_layers)
        prm_circuit.head_init(model.score, dims)
        model.circuit_dims = dims
        return model, config, None
    if body != "layers":
        raise ValueError(f"body must be 'layers' or 'circuit', got {body!r}")
    policy = Qwen2ForCausalLM.from_pretrained(str(policy_dir), dtype=torch.float32)
    base_layers = policy.config.num_hidden_layers
    config = copy.deepcopy(policy.config)
    config.num_hidden_layers = base_layers + extra_layers
    config.layer_types = ["full_attention"] * config.num_hidden_layers
    config.tie_word_embeddings = False
    h = config.hidden_size
    backbone = Qwen2Model(config)
    state = policy.model.state_dict()
    last = f"layers.{base_layers - 1}."
    for k in range(extra_layers):
        for name, tensor in list(state.items()):
            if name.startswith(last):
                new = tensor.clone()
                if name.endswith(("self_attn.o_proj.weight", "mlp.down_proj.weight")):
                    new.zero_()  # the new layer adds nothing to the residual stream yet
                state[f"layers.{base_layers + k}." + name[len(last):]] = new
    backbone.load_state_dict(state)
    model = _prm_class()(backbone, h, base_layers)
    teacher = None
    if extra_layers:
        for p in list(model.model.embed_tokens.parameters()) + [
                q for layer in model.model.layers[:base_layers] for q in layer.parameters()]:
            p.requires_grad_(False)  # the policy part stays the policy: the teacher reads it
        norm = copy.deepcopy(policy.model.norm).requires_grad_(False)
        head = policy.lm_head.weight.detach().clone()

        def teacher(base_hidden):
            with torch.no_grad():
                return torch.log_softmax(norm(base_hidden) @ head.T, dim=-1)
    return model, config, teacher


@functools.cache
def _prm_class():
    from torch import nn

    class Qwen2PRM(nn.Module):
        """A Qwen2 body and vLLM's score head; `return_base` also gives the residual after
        the first `base_layers` layers (the policy's, for the teacher)."""

        def __init__(self, backbone, hidden: int, base_layers: int):
            super().__init__()
            self.model = backbone
            self.score = nn.Sequential(nn.Linear(hidden, hidden), nn.ReLU(), nn.Linear(hidden, 2))
            self.base_layers = base_layers
            self._base = None
            backbone.layers[base_layers - 1].register_forward_hook(self._keep_base)

        def _keep_base(self, module, args, output):
            self._base = output[0] if isinstance(output, tuple) else output

        def forward(self, input_ids, attention_mask=None, return_base: bool = False):
            hidden = self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
            logits = self.score(hidden)
            return (logits, self._base) if return_base else logits

    return Qwen2PRM


def surprise_targets(logp, ids, tag_id: int, completion_mask, floor: float = 0.2):
    """Dense "still on track" targets from the frozen policy: at each completion position, the
    running minimum over the completion so far of min(1, r / floor), where r = p(token) /
    max_v p(v) under the policy. A token the policy found unlikely (a slip) drags every later
    position down; ordinary branching (which term to add next) keeps r near 1. Prompt,
    padding and step-tag positions count as 1."""
    import torch

    r = torch.ones(ids.shape, dtype=torch.float32)
    actual = logp[:, :-1].gather(-1, ids[:, 1:, None])[..., 0]
    r[:, 1:] = torch.exp(actual - logp[:, :-1].max(-1).values)
    r = torch.clamp(r / floor, max=1.0)
    r = torch.where(completion_mask & (ids != tag_id), r, torch.ones_like(r))
    return torch.cummin(r, dim=1).values


def batches(items: list, size: int, rng: random.Random | None):
    order = list(range(len(items)))
    if rng is not None:
        rng.shuffle(order)
    for i in range(0, len(order), size):
        yield [items[j] for j in order[i: i + size]]


def collate(inputs, pad_id: int):
    """Right-padded ids and mask, plus (row, position) of every step tag."""
    import torch

    width = max(len(x.token_ids) for x in inputs)
    ids = torch.full((len(inputs), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(inputs), width), dtype=torch.long)
    rows, cols = [], []
    for b, x in enumerate(inputs):
        ids[b, : len(x.token_ids)] = torch.tensor(x.token_ids)
        mask[b, : len(x.token_ids)] = 1
        rows.extend([b] * len(x.step_positions))
        cols.extend(x.step_positions)
    return ids, mask, torch.tensor(rows), torch.tensor(cols)


def predict(model, inputs, pad_id: int, batch: int = 64) -> list[list[float]]:
    """P(good) per step of each input, with the torch model."""
    import torch

    model.eval()
    out = []
    with torch.no_grad():
        for chunk in batches(inputs, batch, None):
            ids, mask, rows, cols = collate(chunk, pad_id)
            probs = torch.softmax(model(ids, mask)[rows, cols].float(), dim=-1)[:, 1].tolist()
            k = 0
            for x in chunk:
                out.append(probs[k: k + len(x.step_positions)])
                k += len(x.step_positions)
    return out


def evaluate(scores: list[list[float]], data: list[LabelledTrace]) -> dict[str, Any]:
    flat_s, exact, mc, nonfinal_s, nonfinal_exact = [], [], [], [], []
    for s, d in zip(scores, data):
        for k, (p, e, m) in enumerate(zip(s, d.exact, d.mc_values)):
            flat_s.append(p)
            exact.append(bool(e))
            mc.append(m > 0.5)
            if k < len(s) - 1:
                nonfinal_s.append(p)
                nonfinal_exact.append(bool(e))
    auc_exact = roc_auc(flat_s, exact)
    return {
        "steps": len(flat_s),
        "positives_exact": sum(exact),
        "auc_exact": None if auc_exact is None else round(auc_exact, 4),
        "auc_exact_nonfinal": _round(roc_auc(nonfinal_s, nonfinal_exact)),
        "auc_mc": _round(roc_auc(flat_s, mc)),
    }


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def save(model, config, policy_dir: Path, out: Path) -> None:
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()
             if k.startswith(("model.", "score."))}
    save_file(state, str(out / "model.safetensors"), metadata={"format": "pt"})
    if getattr(model, "circuit_dims", None) is not None:   # what ships: the body is rebuilt from the policy
        from ttc_vllm.testbed.prm_circuit import HEAD_FILE

        save_file({k: v for k, v in state.items() if k.startswith("score.")}, str(out / HEAD_FILE),
                  metadata={"format": "pt"})
    cfg = config.to_dict()
    cfg.update(architectures=["Qwen2ForProcessRewardModel"], num_labels=2,
               id2label={"0": "bad", "1": "good"}, label2id={"bad": 0, "good": 1},
               tie_word_embeddings=False, step_tag=STEP_TAG)
    (out / "config.json").write_text(json.dumps(cfg, indent=2))
    for name in TOKENIZER_FILES:
        if (policy_dir / name).exists():
            shutil.copy(policy_dir / name, out / name)


def verify_in_vllm(out: Path, model, inputs, traces: list[Trace], pad_id: int) -> dict[str, Any]:
    """Score traces with the saved PRM in vLLM and compare with the torch forward."""
    from ttc_vllm.prm.scorers import VLLMPoolingPRM
    from ttc_vllm.testbed import prm_scorer_config

    t0 = time.perf_counter()
    scorer = VLLMPoolingPRM(prm_scorer_config(
        model=str(out), engine_kwargs={"kv_cache_memory_bytes": 256 << 20, "max_model_len": 512}))
    vllm_scores = scorer.score_sync(traces)
    torch_scores = predict(model, inputs, pad_id)
    diff = max(abs(a - b) for vs, ts in zip(vllm_scores, torch_scores) for a, b in zip(vs, ts))
    same_shape = all(len(v) == len(t.steps) for v, t in zip(vllm_scores, traces))
    scorer.llm.llm_engine.engine_core.shutdown()
    return {"traces": len(traces), "max_abs_diff": round(diff, 6), "one_score_per_step": same_shape,
            "seconds": round(time.perf_counter() - t0, 1)}


EVAL_TRACES_PER_EPOCH = 300  # the per-epoch curve uses a fixed subset; the final test uses all


def validation_auc(scores: list[list[float]], data: list["LabelledTrace"], label: str) -> float:
    """Held-out AUC of the scores against the training targets themselves (no ground
    truth): what picks the epoch to keep."""
    flat, ys = [], []
    for s, d in zip(scores, data):
        flat.extend(s)
        ys.extend(y > 0.5 for y in step_targets(d.mc_values, label))
    auc = roc_auc(flat, ys)
    return 0.0 if auc is None else auc


def completion_mask(lengths: Sequence[int], prompt_lengths: Sequence[int], width: int):
    """[B, width] bool: positions of the completion (after the prompt, before padding)."""
    import torch

    pos = torch.arange(width)[None, :]
    return (pos >= torch.tensor(prompt_lengths)[:, None]) & (pos < torch.tensor(lengths)[:, None])


def train(labels: Sequence[Path], policy_dir: Path, out: Path, epochs: int, minutes: float,
          batch: int, lr: float, seed: int, threads: int, holdout: float, verify: bool,
          extra_layers: int = 2, aux_weight: float = 0.5, label: str = "hard",
          surprise_floor: float = 0.2, body: str = "circuit") -> dict[str, Any]:
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(seed)
    rng = random.Random(f"prm:{seed}")
    data, source = [], []
    for path in labels:  # trace ids are per file
        part = traces_from_rows(read_jsonl(path))
        data.extend(part)
        source.extend([str(path)] * len(part))
    model, config, teacher = build_model(policy_dir, extra_layers, body)
    use_aux = teacher is not None and aux_weight > 0
    pad_id = config.pad_token_id if config.pad_token_id is not None else 0
    tag_id, eos_id = _tag_and_eos(policy_dir)
    inputs = [token_ids_input(d.trace, tag_id, eos_id) for d in data]
    test_idx = [i for i, d in enumerate(data) if held_out(d.problem_key, holdout, seed)]
    test_set = set(test_idx)
    # A validation split (other problems again) picks the epoch to keep, by AUC against the
    # MC targets: long runs overfit a few thousand traces (held-out AUC peaks, then falls).
    val_idx = [i for i, d in enumerate(data)
               if i not in test_set and held_out(d.problem_key, holdout, seed + 1)]
    val_set = set(val_idx)
    train_idx = [i for i in range(len(data)) if i not in test_set and i not in val_set]
    train_items = [(inputs[i], step_targets(data[i].mc_values, label), len(data[i].trace.prompt_ids))
                   for i in train_idx]

    curve_idx = sorted(random.Random(seed).sample(test_idx, min(EVAL_TRACES_PER_EPOCH, len(test_idx))))
    t0, step, curve = time.time(), 0, []
    best: tuple[float, int, dict | None] = (-1.0, 0, None)
    fit = None
    if body == "circuit":   # a frozen body: one pass for P, then the monotone head fit; no epochs
        from ttc_vllm.testbed import prm_circuit

        pools = []
        for chunk in batches(train_items, 64, None):
            pools.append(prm_circuit.pool_at(model.model, model.circuit_dims,
                                             *collate([x for x, _, _ in chunk], pad_id)))
        targets = torch.tensor([m for _, ms, _ in train_items for m in ms], dtype=torch.float32)
        fit = prm_circuit.fit_head(model.score, model.circuit_dims, torch.cat(pools), targets)
        best = (validation_auc(predict(model, [inputs[i] for i in val_idx], pad_id),
                               [data[i] for i in val_idx], label), 0, None)
        epochs = 0
    else:
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        head = [p for n, p in trainable if n.startswith("score.")]
        body_params = [p for n, p in trainable if not n.startswith("score.")]
        opt = torch.optim.AdamW([{"params": body_params, "lr": lr}, {"params": head, "lr": lr * 3}],
                                weight_decay=0.01)
        total_steps = epochs * math.ceil(len(train_items) / batch)
        base = [g["lr"] for g in opt.param_groups]
    for epoch in range(epochs):
        model.train()
        for chunk in batches(train_items, batch, rng):
            if time.time() - t0 > minutes * 60:
                break
            # schedule by steps or by the time budget, whichever runs out first
            frac = max(step / max(1, total_steps), (time.time() - t0) / (minutes * 60))
            for g, b in zip(opt.param_groups, base):  # short warm-up, cosine decay
                g["lr"] = b * min(1.0, (step + 1) / 20) * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))
            ids, mask, rows, cols = collate([x for x, _, _ in chunk], pad_id)
            targets = torch.tensor([m for _, ms, _ in chunk for m in ms], dtype=torch.float32)
            if use_aux:
                logits, base_hidden = model(ids, mask, return_base=True)
                comp = completion_mask([len(x.token_ids) for x, _, _ in chunk],
                                       [n for _, _, n in chunk], ids.shape[1])
                dense = surprise_targets(teacher(base_hidden), ids, tag_id, comp, surprise_floor)
                loss = (soft_step_loss(logits[rows, cols], targets)
                        + aux_weight * soft_step_loss(logits[comp], dense[comp]))
            else:
                loss = soft_step_loss(model(ids, mask)[rows, cols], targets)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_([p for _, p in trainable], 1.0)
            opt.step()
            step += 1
        metrics = evaluate(predict(model, [inputs[i] for i in curve_idx], pad_id),
                           [data[i] for i in curve_idx])
        val_auc = validation_auc(predict(model, [inputs[i] for i in val_idx], pad_id),
                                 [data[i] for i in val_idx], label)
        curve.append({"epoch": epoch + 1, "step": step, "loss": round(loss.item(), 4),
                      "seconds": round(time.time() - t0, 1), "val_auc_targets": round(val_auc, 4),
                      **metrics})
        print(json.dumps(curve[-1]), flush=True)
        if val_auc > best[0]:
            best = (val_auc, epoch + 1, {k: v.detach().clone() for k, v in model.state_dict().items()})
        if time.time() - t0 > minutes * 60:
            break
    train_s = time.time() - t0
    if best[2] is not None:
        model.load_state_dict(best[2])
    save(model, config, policy_dir, out)
    test_scores = predict(model, [inputs[i] for i in test_idx], pad_id)
    by_source = {}
    for path in dict.fromkeys(source):
        pick = [k for k, i in enumerate(test_idx) if source[i] == path]
        by_source[path] = evaluate([test_scores[k] for k in pick], [data[test_idx[k]] for k in pick])
    record: dict[str, Any] = {
        "labels": [str(p) for p in labels], "policy": str(policy_dir), "seed": seed,
        "epochs_run": len(curve), "steps": step, "batch": batch, "lr": lr,
        "body": body, "head_fit": fit, "extra_layers": extra_layers if body == "layers" else 0,
        "aux_weight": aux_weight if use_aux else 0.0, "label": label,
        "surprise_floor": surprise_floor,
        "seconds": round(train_s, 1), "params": sum(p.numel() for p in model.parameters()),
        "train_traces": len(train_idx), "val_traces": len(val_idx), "test_traces": len(test_idx),
        "kept_epoch": best[1], "kept_val_auc_targets": round(best[0], 4),
        "test": evaluate(test_scores, [data[i] for i in test_idx]), "test_by_labels": by_source,
        "curve": curve,
    }
    if verify:
        k = test_idx[:16]
        record["vllm_check"] = verify_in_vllm(out, model, [inputs[i] for i in k],
                                              [data[i].trace for i in k], pad_id)
    (out / "training.json").write_text(json.dumps(record, indent=1))
    return record


def _tag_and_eos(policy_dir: Path) -> tuple[int, int | None]:
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(policy_dir))
    return int(tok.convert_tokens_to_ids(STEP_TAG)), tok.eos_token_id


def main(argv: list[str] | None = None) -> dict[str, Any]:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--labels", type=Path, nargs="+", required=True,
                    help="JSONL file(s) from `ttc-vllm job prm-data`")
    ap.add_argument("--policy", type=Path, required=True, help="trained policy dir (backbone init)")
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--epochs", type=int, default=30)
    ap.add_argument("--minutes", type=float, default=15.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=5e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--holdout", type=float, default=0.15, help="share of problems held out")
    ap.add_argument("--extra-layers", type=int, default=2,
                    help="new transformer layers on top of the (frozen) policy layers")
    ap.add_argument("--aux-weight", type=float, default=0.5,
                    help="weight of the dense policy-surprise targets (needs --extra-layers > 0)")
    ap.add_argument("--surprise-floor", type=float, default=0.2,
                    help="surprise targets are min(1, r / floor): r at or above the floor counts as on track")
    ap.add_argument("--label", choices=["hard", "soft"], default="hard",
                    help="targets from MC values: hard = any rollout right (HE), soft = the value (SE)")
    ap.add_argument("--body", choices=["circuit", "layers"], default="circuit",
                    help="circuit (the shipped PRM) = the hand-set slip detector and term check of prm_circuit, "
                         "only the score head is fitted; layers = --extra-layers trained on the "
                         "frozen policy (the earlier PRM)")
    ap.add_argument("--no-verify", action="store_true", help="skip the vLLM load/score check")
    a = ap.parse_args(argv)
    if a.extra_layers < 0 or a.aux_weight < 0:
        ap.error("--extra-layers and --aux-weight must be >= 0")
    if not 0 < a.surprise_floor <= 1:
        ap.error("--surprise-floor must be in (0, 1]")
    rec = train(a.labels, a.policy, a.out, a.epochs, a.minutes, a.batch, a.lr, a.seed,
                a.threads, a.holdout, not a.no_verify, a.extra_layers, a.aux_weight, a.label,
                a.surprise_floor, a.body)
    print(json.dumps({k: v for k, v in rec.items() if k != "curve"}))
    return rec


if __name__ == "__main__":
    main()
