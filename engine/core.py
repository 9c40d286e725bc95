"""The engine core: admission checks, the step loop, aborts and statistics."""
from __future__ import annotations

import logging
import numbers
import threading
from collections import deque
from collections.abc import Sequence
from contextlib import contextmanager
from typing import Iterator

import torch

from sync_guard import GuardError

from .config import EngineConfig
from .device import Device, make_device
from .hashing import seed_key
from .kv_cache import KVCacheManager
from .model_runner import ModelRunner, PendingOutput, check_sizes, choose_num_kv_blocks
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


def token_id_list(prompt: object, field: str = "prompt_token_ids") -> list[int]:
    """``prompt`` (a sequence of ints, or a 1-d integer tensor or array) as a list of ints."""
    if hasattr(prompt, "ndim") and hasattr(prompt, "tolist"):  # a tensor or an array
        if prompt.ndim != 1:
            raise ValueError(f"{field} must be a 1-d sequence of ints, got a {prompt.ndim}-d "
                             f"{type(prompt).__name__}")
        prompt = prompt.tolist()
    if isinstance(prompt, (str, bytes, bytearray)) or not isinstance(prompt, Sequence):
        raise ValueError(f"{field} must be a sequence of ints, got {prompt!r}")
    out = []
    for i, tok in enumerate(prompt):
        if isinstance(tok, bool) or not isinstance(tok, numbers.Integral):
            raise ValueError(f"{field}[{i}]={tok!r} is not an int")
        out.append(int(tok))
    return out


class EngineBrokenError(RuntimeError):
    """The engine was interrupted where its state could not be kept consistent."""


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
        check_sizes(config, self.model, self.device, self.vocab_size, num_blocks,
                    "num_kv_blocks" if config.num_kv_blocks else "max_num_seqs")
        self.kv = KVCacheManager(num_blocks, config.block_size)
        self.scheduler = Scheduler(config, self.kv)
        self.timeline = Timeline(self.device, config.timeline_steps, self.exclusive)
        self.runner = ModelRunner(config, self.model, self.device, num_blocks, self.vocab_size,
                                  self.timeline)
        self.num_steps = 0
        self._num_added = 0
        self._pending_outputs: list[RequestOutput] = []
        self._in_flight: deque[tuple[int, SchedulerOutput, PendingOutput]] = deque()
        self._queue_depth = config.queue_depth
        self._collect_early = config.collect == "eager"
        self._owner_lock = threading.Lock()
        self._owner: tuple[int, str, str] | None = None  # (thread id, call, thread name)
        self.broken: str | None = None  # why the engine can no longer be used

    def check_request(self, prompt_token_ids: object, params: object) -> list[int]:
        """The prompt as a list of ints; ValueError, naming the field, if this request could
        never be served."""
        if not isinstance(params, SamplingParams):
            raise ValueError(f"sampling_params must be a SamplingParams, got {params!r}")
        prompt_token_ids = token_id_list(prompt_token_ids)
        if len(prompt_token_ids) == 0:
            raise ValueError("prompt_token_ids is empty")
        for i, tok in enumerate(prompt_token_ids):
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
        return prompt_token_ids

    def add_request(self, request_id: str, prompt_token_ids: list[int],
                    sampling_params: SamplingParams) -> None:
        self.ensure_usable()
        self.add_checked_request(request_id, self.check_request(prompt_token_ids, sampling_params),
                                 sampling_params)

    def check_request_id(self, request_id: object) -> None:
        if not isinstance(request_id, str) or not request_id:
            raise ValueError(f"request_id must be a non-empty str, got {request_id!r}")
        if request_id in self.scheduler.requests:
            raise ValueError(f"request_id={request_id!r} is already in use by an unfinished "
                             f"request")

    def add_checked_request(self, request_id: str, prompt: list[int],
                            params: SamplingParams) -> None:
        """``add_request`` for a prompt that ``check_request`` returned (not checked again)."""
        self.ensure_usable()
        with self.exclusive("EngineCore.add_request"):
            self._add(request_id, prompt, params)

    def _add(self, request_id: str, prompt: list[int], params: SamplingParams) -> None:
        self.check_request_id(request_id)
        if params.seed is not None:
            key = seed_key(params.seed)
        else:  # unseeded: a stream of its own, from the engine seed and the arrival index
            key = seed_key((self.config.seed << 64) | self._num_added, domain=1)
        self._num_added += 1
        self.scheduler.add(Request(
            request_id, prompt, params, key, self.eos_token_ids,
            logprobs=None if params.logprobs is None else []))

    def abort_request(self, request_id: str) -> bool:
        """End an unfinished request with finish reason "abort"; False if there is none."""
        self.ensure_usable()
        with self.exclusive("EngineCore.abort_request"):
            req = self.scheduler.requests.get(request_id)
            if req is None:
                return False
            self.scheduler.finish(req, "abort")
            self._pending_outputs.append(RequestOutput(req))
            return True

    def settle(self) -> None:
        """Collect every step in flight without launching another (their outputs are kept for
        the next ``step``): after aborts, nothing of them stays on the device."""
        self.ensure_usable()
        with self.exclusive("EngineCore.settle"):
            while self._in_flight:
                self._pending_outputs += self._collect()

    def drop_outputs(self, request_ids: set[str]) -> None:
        """Forget the pending outputs of ``request_ids`` (the others stay)."""
        with self.exclusive("EngineCore.drop_outputs"):
            self._pending_outputs = [o for o in self._pending_outputs
                                     if o.request_id not in request_ids]

    def put_back(self, outputs: list[RequestOutput]) -> None:
        """Outputs taken by a caller that does not own them: the next ``step`` returns them."""
        with self.exclusive("EngineCore.put_back"):
            self._pending_outputs = outputs + self._pending_outputs

    def has_unfinished_requests(self) -> bool:
        return (self.scheduler.has_unfinished() or bool(self._pending_outputs)
                or bool(self._in_flight))

    @contextmanager
    def exclusive(self, what: str) -> Iterator[None]:
        """One caller at a time: a second thread entering while another is inside gets a
        RuntimeError at once (the engine's state is not thread-safe); the owner may nest."""
        me = threading.get_ident()
        with self._owner_lock:
            owner = self._owner
            if owner is not None and owner[0] != me:
                raise RuntimeError(
                    f"{what} called from thread {threading.current_thread().name!r} while "
                    f"{owner[1]} is running in thread {owner[2]!r}: one engine serves one "
                    f"caller at a time (use one LLM per thread, or serialise the calls)")
            if owner is None:
                self._owner = (me, what, threading.current_thread().name)
        try:
            yield
        finally:
            if owner is None:
                self._owner = None

    def ensure_usable(self) -> None:
        if self.broken is not None:
            raise EngineBrokenError(
                f"the engine is unusable: {self.broken}; its requests, KV blocks and device "
                f"state are in an unknown state. Make a new LLM")

    def step(self) -> list[RequestOutput]:
        """Advance the engine; returns outputs of requests that changed.

        Sync mode (queue depth 1): schedule, launch, wait for the tokens, update. Async mode
        (depth 2): schedule and launch step N+1 *before* collecting step N, so the host's
        scheduling and input preparation overlap the device's work. With ``collect="eager"``, a
        step in flight whose outputs already reached the host is collected before scheduling
        (the tokens must not depend on which steps the host happened to know).

        A failure inside a phase (schedule, launch, device work, collect) ends the requests it
        touched with finish reason "error" (the cause in ``RequestOutput.error``) and returns
        their blocks, slots and placeholders; the engine goes on serving the rest. An interrupt
        (KeyboardInterrupt, or any BaseException) reaches the caller; unless it came from one
        step's device work, it may have struck the host mid-update, so the engine is marked
        broken and every later call raises :class:`EngineBrokenError`.
        """
        self.ensure_usable()
        with self.exclusive("EngineCore.step"):
            try:
                return self._step()
            except BaseException as exc:  # _contain re-raised it, or nothing could contain it
                if not (isinstance(exc, GuardError)
                        or getattr(exc, "lockstep_device_fault", False)):
                    self.broken = (f"{type(exc).__name__} ({exc}) escaped step "
                                   f"{self.num_steps} where it could not be contained")
                raise

    def _step(self) -> list[RequestOutput]:
        outputs, self._pending_outputs = self._pending_outputs, []
        if self._collect_early:  # what the host knows now depends on the device's timing
            while self._in_flight and self._in_flight[0][2].ready():
                outputs += self._collect()
        launched = False
        if len(self._in_flight) < self._queue_depth and self.scheduler.has_unfinished():
            launched = self._launch()
        if self._in_flight and (not launched or len(self._in_flight) == self._queue_depth):
            outputs += self._collect()
        return outputs + self._pending_outputs_now()

    def _launch(self) -> bool:
        step = self.num_steps + 1
        try:
            with self.timeline.host("schedule", step):
                sched = self.scheduler.schedule()
                self.runner.release(sched.freed_request_ids)
        except BaseException as exc:  # the running requests are the ones it touched
            self._contain(exc, "schedule", step, list(self.scheduler.running))
            return False
        if not sched.rows:
            return False
        self.num_steps = step
        try:
            with self.device.step_scope(step):
                pending = self.runner.execute_model(sched, self.kv.block_tables, step)
        except BaseException as exc:
            self._contain(exc, "launch", step, [row.request for row in sched.rows])
            return False
        self._in_flight.append((step, sched, pending))
        return True

    def _collect(self) -> list[RequestOutput]:
        step, sched, pending = self._in_flight.popleft()
        try:
            with self.timeline.host("collect", step):
                result = pending.get_output()
                changed = self.scheduler.update_from_output(sched, result.sampled,
                                                            result.logprobs)
                return [RequestOutput(r) for r in changed]
        except BaseException as exc:
            self._contain(exc, "collect", step, [row.request for row in sched.rows])
            return []

    def _contain(self, exc: BaseException, phase: str, step: int, requests: list) -> None:
        """End ``requests`` with "error" (their outputs go out with the next step's) and free
        what they hold. An Exception is then handled; anything else is re-raised. ``step`` keeps
        the engine usable after a guard finding or an interrupt that struck inside one step's
        device work (the device layer marks it); an interrupt that struck the host anywhere
        else (a second SIGINT) may have cut any of the engine's or the device layer's updates
        in half, so the engine is marked broken."""
        guard = isinstance(exc, GuardError)
        if isinstance(exc, Exception) and not guard:
            logger.warning("step %d failed in %s: %s: %s", step, phase, type(exc).__name__, exc)
        error = f"step {step} failed in {phase}: {type(exc).__name__}: {exc}"
        for req in requests:
            if req.is_finished:
                continue
            self.scheduler.finish(req, "error")
            out = RequestOutput(req)
            out.error = error
            self._pending_outputs.append(out)
        if guard or not isinstance(exc, Exception):
            raise exc

    def _pending_outputs_now(self) -> list[RequestOutput]:
        outputs, self._pending_outputs = self._pending_outputs, []
        return outputs

    def activity(self) -> str:
        """Where the host is in a step, for a watchdog in another thread (a snapshot)."""
        current = self.timeline.current
        in_flight = [step for step, _, _ in list(self._in_flight)]
        where = "between steps" if current is None else \
            f"engine step {current[1]}, {current[0]}"
        if current is not None and current[0] == "collect":
            where += " (waiting for its outputs)"
        return f"{where}; steps in flight {in_flight}"

    def stats(self) -> dict:
        """Counters; safe from any thread (a snapshot: beside a running step, it may fall
        between two of the step's updates)."""
        return {
            "num_steps": self.num_steps,
            "num_preemptions": self.scheduler.num_preemptions,
            "num_free_blocks": self.kv.num_free_blocks,
            "num_total_blocks": self.kv.pool.num_blocks,
            "num_running": len(self.scheduler.running),
            "num_waiting": len(self.scheduler.waiting),
        }
