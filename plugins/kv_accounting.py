"""Per-request KV-cache accounting in vLLM's scheduler, and each request's `ttc` record.

vLLM exports only engine-wide KV gauges; how many blocks one request or one search held,
and for how long, is known only where blocks are allocated: in the EngineCore's scheduler.
`TTCSchedulerMixin` goes on top of whichever scheduler class vLLM picks (sync or async;
`vllm_compat.install_scheduler_mixin`, run by the general plugin in every process):

- when a request arrives it is opened in a `KVLedger` (ttc_vllm/kv_ledger.py), grouped by
  `extra_args["ttc_group"]` (every engine request of one search carries its search's id;
  the n samples of one request share their extra_args, hence their group), and a request
  with `ttc` options is stamped with its id for the logits processor (live_controls.py);
- after every `schedule()` it reads, for each scheduled request, the length of its block
  list (a dict lookup and a len: ~0.3 us a request), and the block ids only for grouped
  requests whose count changed;
- when vLLM frees a request it closes it in the ledger, reads how its thinking ended from
  the controller, counts its thinking tokens from its token ids, and returns the record as
  `kv_transfer_params["ttc"]` of the request's last output: that is how vLLM already moves
  per-request data from the engine core to the API process. Offline it is there on the
  `RequestOutput`; on the server ttc_vllm_plugins/engine_records.py takes it out before
  vLLM's handlers see it, observes the metrics and builds the response's usage block.

`TTC_VLLM_KV_ACCOUNTING=0` turns all of this off (vLLM's own scheduler class then runs).
`TTC_VLLM_KV_PEAK_FILE=PATH` additionally writes the engine-wide peak of blocks in use to
PATH whenever it grows (a benchmark aid; `read_peak` reads it back; removing PATH restarts
the peak).
"""
from __future__ import annotations

import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from ttc_vllm.control import thinking_tokens_of
from ttc_vllm.kv_ledger import GROUP_EXTRA_ARG, SEARCH_EXTRA_ARG, KVLedger
from ttc_vllm_plugins import vllm_compat
from ttc_vllm_plugins.live_controls import LIVE, RID_KEY

logger = logging.getLogger("ttc_vllm.plugins.kv")

ACCOUNTING_ENV = "TTC_VLLM_KV_ACCOUNTING"
PEAK_FILE_ENV = "TTC_VLLM_KV_PEAK_FILE"
GROUP_KEY = GROUP_EXTRA_ARG      # KV group: the engine requests of one search, or n samples
SEARCH_KEY = SEARCH_EXTRA_ARG    # set on the engine requests a search makes
SIBLINGS_KEY = "ttc_siblings"    # [parent request id, n] of an n>1 FINAL_ONLY request
RECORD_KEY = "ttc"
MAX_PENDING_SIBLINGS = 4096
OPTIONS_KEY = "ttc"


def accounting_enabled() -> bool:
    return os.environ.get(ACCOUNTING_ENV, "1").lower() not in ("0", "false", "no", "off")


class TTCSchedulerMixin:
    """Mixed in before vLLM's Scheduler / AsyncScheduler (see module doc)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.ttc_ledger = KVLedger(self.block_size)
        self._ttc_peak_file = os.environ.get(PEAK_FILE_ENV) or None
        self.peak_used_blocks = 0
        self._ttc_siblings: dict[str, list[dict[str, Any]]] = {}
        self._ttc_markers_read = False

    # -- arrivals -----------------------------------------------------------------------------
    def add_request(self, request) -> None:
        extra = getattr(request.sampling_params, "extra_args", None) if request.sampling_params else None
        group = None
        if extra:
            group = extra.get(GROUP_KEY)
            group = str(group) if group is not None else None
            if OPTIONS_KEY in extra:
                extra[RID_KEY] = request.request_id   # read by the logits processor
        self.ttc_ledger.open(request.request_id, time.monotonic(), group)
        super().add_request(request)

    # -- every step -----------------------------------------------------------------------------
    def schedule(self, *args, **kwargs):
        out = super().schedule(*args, **kwargs)
        ledger = self.ttc_ledger
        now = time.monotonic()
        for req_id, cached_tokens in vllm_compat.first_scheduled(out):
            ledger.admitted(req_id, cached_tokens // self.block_size)
        count = vllm_compat.block_counter(self)
        for req_id in vllm_compat.scheduled_request_ids(out):
            blocks = count(req_id)
            if blocks != ledger.holds(req_id):
                ids = vllm_compat.request_block_ids(self, req_id) if ledger.needs_ids(req_id) else None
                ledger.update(req_id, blocks, now, ids)
        if self._ttc_peak_file is not None:
            self._write_peak()
        return out

    # -- departures -----------------------------------------------------------------------------
    def _free_request(self, request, *args, **kwargs):
        records = self._ttc_records(request)
        kv_params, *rest = super()._free_request(request, *args, **kwargs)
        if records is not None:
            kv_params = {**(kv_params or {}), RECORD_KEY: {
                "requests": records, "searches_kv_blocks": self.ttc_ledger.grouped_blocks}}
        return (kv_params, *rest)

    def _ttc_records(self, request) -> list[dict[str, Any]] | None:
        """This request's record, with those of its n>1 siblings finished before it when
        only the last sibling's output reaches the client (vLLM's parent request drops the
        others' outputs under FINAL_ONLY); None while siblings are still running."""
        record = self._ttc_record(request)
        extra = getattr(request.sampling_params, "extra_args", None) or {}
        siblings = extra.get(SIBLINGS_KEY)
        if record is None or not siblings:
            return [record] if record is not None else None
        key, n = str(siblings[0]), int(siblings[1])
        if key not in self._ttc_siblings and len(self._ttc_siblings) >= MAX_PENDING_SIBLINGS:
            self._ttc_siblings.pop(next(iter(self._ttc_siblings)))   # an aborted set's leftovers
        pending = self._ttc_siblings.setdefault(key, [])
        pending.append(record)
        if len(pending) < n and request.status != vllm_compat.aborted_status():
            return None
        return self._ttc_siblings.pop(key)

    def _ttc_record(self, request) -> dict[str, Any] | None:
        try:
            kv = self.ttc_ledger.close(request.request_id, time.monotonic())
            if kv is None:
                return None
            extra = getattr(request.sampling_params, "extra_args", None) or {}
            kind = "search" if GROUP_KEY in extra and SEARCH_KEY in extra else \
                "controlled" if OPTIONS_KEY in extra else "plain"
            record: dict[str, Any] = {"kind": kind, "kv": kv}
            markers = self._ttc_markers()
            if markers is not None:
                thinking = {"thinking_tokens": thinking_tokens_of(
                    request.prompt_token_ids or (), request.output_token_ids, markers)}
                if OPTIONS_KEY in extra:
                    thinking.update(LIVE.outcome(request.request_id)
                                    or {"ended": "unknown", "forced": {}})
                record["thinking"] = thinking
            return record
        except Exception:   # noqa: BLE001 -- never take the engine down over a record
            logger.exception("ttc-vllm: no KV record for request %s", request.request_id)
            return None

    def _ttc_markers(self):
        """The thinking markers: the logits processor's when it shares this process, else
        read once from the engine's config and tokenizer, as the processor reads them."""
        if LIVE.markers is None and not self._ttc_markers_read:
            self._ttc_markers_read = True
            from ttc_vllm_plugins.logits_common import EngineContext

            EngineContext.from_vllm_config(self.vllm_config)   # sets LIVE.markers
        return LIVE.markers

    def _write_peak(self) -> None:
        if self.peak_used_blocks and not os.path.exists(self._ttc_peak_file):
            self.peak_used_blocks = 0  # the reader removed the file: start a new peak
        used, usable = vllm_compat.used_kv_blocks(self)
        if used <= self.peak_used_blocks:
            return
        self.peak_used_blocks = used
        record = {"peak_used_blocks": used, "num_blocks": usable, "block_size": self.block_size}
        tmp = f"{self._ttc_peak_file}.tmp{os.getpid()}"
        Path(tmp).write_text(json.dumps(record))
        os.replace(tmp, self._ttc_peak_file)


def read_peak(path: str | os.PathLike) -> dict:
    """The last record the scheduler wrote ({"peak_used_blocks": 0} before any allocation)."""
    p = Path(path)
    return json.loads(p.read_text()) if p.exists() else {"peak_used_blocks": 0}


def install() -> bool:
    """Put the mixin on vLLM's scheduler choice in this process (the general plugin calls
    this in every process; only the engine core builds a scheduler)."""
    if not accounting_enabled():
        return False
    return vllm_compat.install_scheduler_mixin(TTCSchedulerMixin)
