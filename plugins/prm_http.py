"""A StepScorer over a running vLLM pooling server of the PRM (`TTC_VLLM_PRM=http://...`).

The PRM server is started by the operator, e.g.
`vllm serve PRM --runner pooling --pooler-config '{"tok_pooling_type": "STEP", "step_tag_id": ID}'`
(vLLM 0.32's `/pooling` takes no per-request step tag, so the server's pooler config holds
it). Inputs are built exactly as the in-process scorers build them
(`ttc_vllm.prm.scorers.token_ids_input`: the policy's token ids with every step closed by the
tag), so only `input_format="token_ids"` PRMs -- sharing the policy's tokenizer, like the
testbed PRM -- are served this way. One HTTP call scores a whole batch of traces.
"""
from __future__ import annotations

from typing import Any, Sequence

from ttc_vllm.prm.scorers import PRMConfig, step_scores, token_ids_input
from ttc_vllm.search.protocols import Trace


class HTTPPoolingPRM:
    def __init__(self, url: str, config: PRMConfig, tokenizer=None, *, timeout_s: float = 120.0,
                 client=None):
        if config.input_format != "token_ids":
            raise ValueError("TTC_VLLM_PRM=http://... serves PRMs with input_format "
                             f"'token_ids' only, got {config.input_format!r}")
        if config.kind != "pooling":
            raise ValueError(f"TTC_VLLM_PRM=http://... needs a pooling PRM, got kind {config.kind!r}")
        import httpx

        self.url = url.rstrip("/")
        self.config = config
        self.step_tag = config.require_step_tag()
        self.tokenizer = tokenizer  # the policy's (= the PRM's) tokenizer, for the tag and EOS
        self.client = client or httpx.AsyncClient(timeout=timeout_s)
        self._tag_id: int | None = None
        self._model: str | None = None

    async def _resolve(self) -> tuple[int, str]:
        if self._model is None:
            r = await self.client.get(f"{self.url}/v1/models")
            r.raise_for_status()
            self._model = r.json()["data"][0]["id"]
        if self._tag_id is None:
            if self.tokenizer is not None:
                ids = self.tokenizer.encode(self.step_tag, add_special_tokens=False)
            else:
                r = await self.client.post(f"{self.url}/tokenize", json={
                    "model": self._model, "prompt": self.step_tag, "add_special_tokens": False})
                r.raise_for_status()
                ids = r.json()["tokens"]
            if len(ids) != 1:
                raise ValueError(f"step tag {self.step_tag!r} is {len(ids)} tokens, not one")
            self._tag_id = int(ids[0])
        return self._tag_id, self._model

    async def score(self, traces: Sequence[Trace]) -> list[list[float]]:
        traces = list(traces)
        tag_id, model = await self._resolve()
        eos = getattr(self.tokenizer, "eos_token_id", None) if self.tokenizer is not None else None
        result: list[list[float]] = [[] for _ in traces]
        todo = [(i, token_ids_input(t, tag_id, eos)) for i, t in enumerate(traces) if t.steps]
        if not todo:
            return result
        payload: dict[str, Any] = {"model": model, "input": [x.token_ids for _, x in todo],
                                   "task": "token_classify", "use_activation": False,
                                   "add_special_tokens": False}
        r = await self.client.post(f"{self.url}/pooling", json=payload)
        r.raise_for_status()
        data = sorted(r.json()["data"], key=lambda d: d["index"])
        if len(data) != len(todo):
            raise RuntimeError(f"PRM server returned {len(data)} results for {len(todo)} traces")
        for (i, x), item in zip(todo, data):
            rows = item["data"]
            if rows and not isinstance(rows[0], list):
                rows = [[v] for v in rows]
            tags = [p for p, t in enumerate(x.token_ids) if t == tag_id]
            result[i] = step_scores(rows, tags, x.step_positions, self.config.good_label)
        return result

    async def aclose(self) -> None:
        await self.client.aclose()
