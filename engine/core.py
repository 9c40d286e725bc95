"""The engine core: admission checks, the step loop, aborts and statistics."""
from __future__ import annotations

import logging
from collections import deque

import torch

from sync_guard import GuardError

from .config import EngineConfig
from .device import Device, make_device
from .hashing import seed_key
from .kv_cache import KVCacheManager
from .model_runner import ModelRunner, PendingOutput, choose_num_kv_blocks
from .models.default import default_checkpoint
from .models.loader import load_checkpoint
from .models.oracle import OracleModel
from .request import Request, RequestOutput
from .sampling_params import SamplingParams
from .scheduler import Scheduler, SchedulerOutput
from .timeline import Timeline

logger = logging.getLogger("lockstep.engine")


def load_model(config: EngineConfig, device: Device) -> torch.nn.Module:
    if config.model == "oracle":
        return OracleModel().to(device.torch_device)
    dtype = config.dtype or (torch.bfloat16 if config.device == "cuda" else torch.float32)
    path = default_checkpoint() if config.model is None else config.model
    return load_checkpoint(path, dtype, device.torch_device)


class EngineCore:
    """Runs requests to completion one ``step`` at a time."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.device = make_device(config.device, config.sim_policy, config.seed)
        self.model = load_model(config, self.device)
        model_cfg = self.model.config
        self.vocab_size = model_cfg.vocab_size
        self.eos_token_ids = tuple(model_cfg.eos_token_ids)
        config.resolve_max_model_len(model_cfg.max_position_embeddings)
        num_blocks = config.num_kv_blocks or choose_num_kv_blocks(config, self.model, self.device)
        self.kv = KVCacheManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config, self.kv)
        self.timeline = Timeline(self.device)
        self.runner = ModelRunner(config, self.model, self.device, num_blocks, self.vocab_size,
                                  self.timeline)
        self.num_steps = 0
        self._num_added = 0
        self._pending_outputs: list[RequestOutput] = []
        self._in_flight: deque[tuple[int, SchedulerOutput, PendingOutput]] = deque()
        self._queue_depth = 2 if config.async_scheduling else 1

    def check_request(self, prompt_token_ids: object, params: object) -> None:
        """Raise ValueError, naming the field, if this request could never be served."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {params!r}")
        if isinstance(prompt_token_ids, (str, bytes)) or not hasattr(prompt_token_ids, "__len__"):
            raise ValueError(f"prompt_token_ids must be a list of ints, got {prompt_token_ids!r}")
        if len(prompt_token_ids) == 0:
            raise ValueError("prompt_token_ids is empty")
        for i, tok in enumerate(prompt_token_ids):
            if isinstance(tok, bool) or not isinstance(tok, int):
                raise ValueError(f"prompt_token_ids[{i}]={tok!r} is not an int")
            if not 0 <= tok < self.vocab_size:
                raise ValueError(f"prompt_token_ids[{i}]={tok} is outside the vocabulary "
                                 f"[0, {self.vocab_size})")
        params.check_vocab(self.vocab_size)
        n, max_len = len(prompt_token_ids), self.config.max_model_len
        if n >= max_len:
            raise ValueError(f"prompt_token_ids has {n} tokens; max_model_len={max_len} leaves "
                             f"no room to generate")
        if n + params.max_tokens > max_len:
            raise ValueError(f"max_tokens={params.max_tokens} with a {n}-token prompt exceeds "
                             f"max_model_len={max_len}")
        need = self.kv.blocks_for(n + params.max_tokens)
        if need > self.kv.pool.num_blocks:
            raise ValueError(f"request needs {need} KV blocks ({n} prompt + {params.max_tokens} "
                             f"max_tokens) but num_kv_blocks={self.kv.pool.num_blocks}")

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling_params: SamplingParams) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty str, got {request_id!r}")
        if request_id in self.scheduler.requests:
            raise ValueError(f"request_id={request_id!r} is already in use by an unfinished "
                             f"request")
        self.check_request(prompt_token_ids, sampling_params)
        params = sampling_params
        if params.seed is not None:
            key = seed_key(params.seed)
        else:  # unseeded: a stream of its own, from the engine seed and the arrival index
            key = seed_key((self.config.seed << 64) | self._num_added, domain=1)
        self._num_added += 1
        self.scheduler.add(Request(
            request_id, list(prompt_token_ids), params, key, self.eos_token_ids,
            logprobs=None if params.logprobs is None else []))

    def abort_request(self, request_id: str) -> bool:
        """End an unfinished request with finish reason "abort"; False if there is none."""
        req = self.scheduler.requests.get(request_id)
        if req is None:
            return False
        self.scheduler.finish(req, "abort")
        self._pending_outputs.append(RequestOutput.of(req))
        return True

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished() or bool(self._pending_outputs)
                or bool(self._in_flight))

    def step(self) -> list[RequestOutput]:
        """Advance the engine; returns outputs of requests that changed.

        Sync mode (queue depth 1): schedule, launch, wait for the tokens, update. Async mode
        (depth 2): schedule and launch step N+1 *before* collecting step N, so the host's
        scheduling and input preparation overlap the device's work.
        """
        outputs, self._pending_outputs = self._pending_outputs, []
        launched = False
        if len(self._in_flight) < self._queue_depth and self.scheduler.has_unfinished():
            launched = self._launch()
        if self._in_flight and (not launched or len(self._in_flight) == self._queue_depth):
            outputs += self._collect()
        return outputs + self._pending_outputs_now()

    def _launch(self) -> bool:
        step = self.num_steps + 1
        with self.timeline.host("schedule", step):
            sched = self.scheduler.schedule()
            self.runner.release(sched.freed_request_ids)
        if not sched.rows:
            return False
        self.num_steps = step
        try:
            with self.device.step_scope():
                pending = self.runner.execute_model(sched, self.kv.block_tables, step)
        except GuardError:  # a sync or a race found by sync_guard is the caller's to see
            raise
        except Exception as exc:  # one bad step must not take the engine down
            logger.exception("step %d failed to launch", self.num_steps)
            self._pending_outputs += self._fail(sched, exc)
            return False
        self._in_flight.append((step, sched, pending))
        return True

    def _collect(self) -> list[RequestOutput]:
        step, sched, pending = self._in_flight.popleft()
        with self.timeline.host("collect", step):
            try:
                result = pending.get_output()
            except GuardError:
                raise
            except Exception as exc:
                logger.exception("step %d failed on the device", step)
                return self._fail(sched, exc)
            changed = self.scheduler.update_from_output(sched, result.sampled, result.logprobs)
            return [RequestOutput.of(r) for r in changed]

    def _pending_outputs_now(self) -> list[RequestOutput]:
        outputs, self._pending_outputs = self._pending_outputs, []
        return outputs

    def _fail(self, sched, exc: Exception) -> list[RequestOutput]:
        failed = []
        for row in sched.rows:
            req = row.request
            req.num_placeholders -= row.samples
            if req.is_finished:
                continue
            self.scheduler.finish(req, "error")
            out = RequestOutput.of(req)
            out.error = f"{type(exc).__name__}: {exc}"
            failed.append(out)
        return failed

    def stats(self) -> dict:
        return {
            "num_steps": self.num_steps,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_free_blocks": self.kv.num_free_blocks,
            "num_total_blocks": self.kv.pool.num_blocks,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
        }
