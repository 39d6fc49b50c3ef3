"""Train the testbed policy: a small Qwen2 causal LM on seeded random traces.

    python -m ttc_vllm.testbed.train_policy --out DIR [--minutes M] [--seed S] [--init DIR]

`--init` continues from saved weights (a second phase with its own seed and schedule);
the shipped weights record every phase's command in training.json.

Reproducible from the seed (data order and init); wall time depends on the machine, so
the run stops at `--steps` or `--minutes`, whichever comes first, and records both.
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

from ttc_vllm.testbed.task import Problem, prompt, solve

# The training mixture covers every tier's knobs and beyond, so tiers can be re-tuned
# after training without retraining.
TRAIN_MAGNITUDES = [(1, 20, 0.25), (10, 99, 0.35), (1, 999, 0.40)]
TRAIN_TERMS = (2, 8)

MODEL_CONFIG = dict(
    hidden_size=192, intermediate_size=576, num_hidden_layers=4, num_attention_heads=6,
    num_key_value_heads=2, max_position_embeddings=512, rope_theta=10000.0,
    tie_word_embeddings=True, rms_norm_eps=1e-6, hidden_act="silu",
)


def sample_training_problem(rng: random.Random) -> Problem:
    r, acc = rng.random(), 0.0
    for lo, hi, p in TRAIN_MAGNITUDES:
        acc += p
        if r <= acc:
            break
    n = rng.randint(*TRAIN_TERMS)
    return Problem(tuple(rng.randint(lo, hi) for _ in range(n)), "train")


def encode_example(tok, rng: random.Random) -> tuple[list[int], int]:
    """Token ids of one training trace, and how many leading (prompt) tokens carry no loss."""
    problem = sample_training_problem(rng)
    trace = solve(problem, rng)
    p_ids = tok.encode(prompt(problem), add_special_tokens=False)
    c_ids = tok.encode(trace.completion, add_special_tokens=False)
    return p_ids + c_ids, len(p_ids)


def make_model(tok, seed: int):
    import torch
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    vocab = int(math.ceil(len(tok) / 16) * 16)
    cfg = Qwen2Config(vocab_size=vocab, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                      pad_token_id=tok.pad_token_id, torch_dtype="float32", **MODEL_CONFIG)
    return Qwen2ForCausalLM(cfg)


def train(out: Path, steps: int, minutes: float, batch: int, lr: float, seed: int, threads: int,
          init: Path | None = None, warmup: int | None = None) -> dict:
    import torch

    from ttc_vllm.testbed.tokenizer import build_tokenizer

    torch.set_num_threads(threads)
    tok = build_tokenizer()
    if init is not None:
        from transformers import Qwen2ForCausalLM

        torch.manual_seed(seed)
        model = Qwen2ForCausalLM.from_pretrained(str(init), torch_dtype=torch.float32)
    else:
        model = make_model(tok, seed)
    n_params = sum(p.numel() for p in model.parameters())
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = min(200, steps // 10) if warmup is None else warmup

    def lr_at(step: int) -> float:
        if step < warmup:
            return lr * (step + 1) / warmup
        frac = (step - warmup) / max(1, steps - warmup)
        return lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, frac))))

    rng = random.Random(f"train:{seed}")
    curve, t0, step = [], time.time(), 0
    model.train()
    while step < steps and (time.time() - t0) < minutes * 60:
        examples = [encode_example(tok, rng) for _ in range(batch)]
        width = max(len(ids) for ids, _ in examples)
        ids = torch.full((batch, width), tok.pad_token_id, dtype=torch.long)
        labels = torch.full((batch, width), -100, dtype=torch.long)
        mask = torch.zeros((batch, width), dtype=torch.long)
        for i, (seq, n_prompt) in enumerate(examples):
            ids[i, : len(seq)] = torch.tensor(seq)
            labels[i, n_prompt: len(seq)] = torch.tensor(seq[n_prompt:])
            mask[i, : len(seq)] = 1
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % 25 == 0 or step == 1:
            curve.append({"step": step, "loss": round(loss.item(), 4), "seconds": round(time.time() - t0, 1)})
            print(json.dumps(curve[-1]), flush=True)
        if step % 500 == 0:
            save(model, tok, out)
    save(model, tok, out)
    phases = []
    if init is not None and (Path(init) / "training.json").exists():
        previous = json.loads((Path(init) / "training.json").read_text())
        phases = previous.get("phases", [{k: v for k, v in previous.items() if k != "curve"}])
    record = {"seed": seed, "steps": step, "init": str(init) if init else None, "warmup": warmup, "batch": batch, "lr": lr, "params": n_params,
              "seconds": round(time.time() - t0, 1), "final_loss": curve[-1]["loss"] if curve else None,
              "model_config": MODEL_CONFIG, "curve": curve}
    record["phases"] = phases + [{k: v for k, v in record.items() if k != "curve"}]
    (out / "training.json").write_text(json.dumps(record, indent=1))
    return record


def save(model, tok, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(str(out), safe_serialization=True)
    tok.save_pretrained(str(out))
    # vLLM reads generation defaults from here; keep them neutral.
    (out / "generation_config.json").write_text(json.dumps(
        {"bos_token_id": tok.bos_token_id, "eos_token_id": tok.eos_token_id, "pad_token_id": tok.pad_token_id}))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--steps", type=int, default=6000)
    ap.add_argument("--minutes", type=float, default=60.0)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--init", type=Path, default=None, help="continue from these weights")
    ap.add_argument("--warmup", type=int, default=None)
    a = ap.parse_args(argv)
    rec = train(a.out, a.steps, a.minutes, a.batch, a.lr, a.seed, a.threads, a.init, a.warmup)
    print(json.dumps({k: v for k, v in rec.items() if k != "curve"}))


if __name__ == "__main__":
    main()
