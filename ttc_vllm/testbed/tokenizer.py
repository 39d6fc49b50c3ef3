"""Byte-level tokenizer of the testbed: one token per byte, plus single tokens for the
markers. It round-trips any string exactly (whitespace and newlines included)."""
from __future__ import annotations

from functools import lru_cache

from ttc_vllm.testbed.task import BOS, EOS, PAD, STEP_TAG, THINK_END, THINK_START

# Renders a conversation to exactly the text the policy is trained on: the last user message
# is the question; the generation prompt opens the thinking block.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}Q: {{ message['content'] | trim }}\n"
    "{% elif message['role'] == 'assistant' %}{{ message['content'] }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}" + THINK_START + "{% endif %}"
)

SPECIAL = [PAD, BOS, EOS]          # never shown in decoded text by default
MARKERS = [THINK_START, THINK_END, STEP_TAG]  # single tokens, shown in text


def build_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from tokenizers import AddedToken
    from transformers import PreTrainedTokenizerFast

    alphabet = pre_tokenizers.ByteLevel.alphabet()
    vocab = {tok: i for i, tok in enumerate(SPECIAL)}
    for ch in sorted(alphabet):
        vocab[ch] = len(vocab)
    core = Tokenizer(models.BPE(vocab=vocab, merges=[]))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    core.decoder = decoders.ByteLevel()
    core.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in SPECIAL])
    core.add_tokens([AddedToken(t, special=False, normalized=False) for t in MARKERS])
    tok = PreTrainedTokenizerFast(
        tokenizer_object=core, bos_token=BOS, eos_token=EOS, pad_token=PAD,
        clean_up_tokenization_spaces=False, model_max_length=1024,
    )
    tok.chat_template = CHAT_TEMPLATE
    return tok


@lru_cache(maxsize=1)
def load_testbed_tokenizer():
    """One testbed tokenizer per process, built on first use (callers must not change it)."""
    return build_tokenizer()
