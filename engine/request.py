"""Per-request state and the outputs handed to users."""
from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .sampling_params import SamplingParams


class RequestStatus(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass(slots=True)
class Request:
    """One request's progress through the engine.

    ``num_computed_tokens`` counts tokens whose KV entries are (or, in async mode, will be) in
    the cache. ``num_placeholders`` counts tokens that were scheduled for sampling but whose ids
    are not known on the host yet (always 0 in sync mode).
    """

    request_id: str
    prompt_token_ids: list[int]
    sampling_params: SamplingParams
    seed: int
    eos_token_ids: tuple[int, ...] = ()
    output_token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    num_computed_tokens: int = 0
    num_placeholders: int = 0
    status: RequestStatus = RequestStatus.WAITING
    finish_reason: str | None = None

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        """Tokens known to the host: prompt plus generated."""
        return len(self.prompt_token_ids) + len(self.output_token_ids)

    @property
    def num_tokens_with_placeholders(self) -> int:
        return self.num_tokens + self.num_placeholders

    @property
    def num_output_tokens_with_placeholders(self) -> int:
        return len(self.output_token_ids) + self.num_placeholders

    @property
    def is_finished(self) -> bool:
        return self.status is RequestStatus.FINISHED

    def stop_reason_for(self, token: int) -> str | None:
        """The finish reason after appending ``token`` to the output, or None to go on."""
        params = self.sampling_params
        n_out = len(self.output_token_ids)
        if n_out > params.min_tokens and (token in params.stop_token_ids or (
                token in self.eos_token_ids and not params.ignore_eos)):
            return "stop"
        if n_out >= params.max_tokens:
            return "length"
        return None


class RequestOutput:
    """What a user sees of a request: cumulative generated ids and, once finished, why.

    The engine hands one out for every request that changed, every step, so it is a snapshot
    taken in constant time: the request and how many output ids (and logprobs) it had then. A
    request's lists only grow, so ``token_ids`` and ``logprobs`` (fresh lists on each access)
    are those prefixes; copying them at every step would make a long generation quadratic.
    """

    __slots__ = ("request_id", "finish_reason", "text", "error", "_request", "_num_tokens",
                 "_num_logprobs")

    def __init__(self, request: Request) -> None:
        self.request_id = request.request_id
        self.finish_reason = request.finish_reason
        self.text: str | None = None
        self.error: str | None = None
        self._request = request
        self._num_tokens = len(request.output_token_ids)
        self._num_logprobs = None if request.logprobs is None else len(request.logprobs)

    @property
    def prompt_token_ids(self) -> list[int]:
        return list(self._request.prompt_token_ids)

    @property
    def token_ids(self) -> list[int]:
        return self._request.output_token_ids[:self._num_tokens]

    @property
    def logprobs(self) -> list[dict[int, float]] | None:
        if self._num_logprobs is None:
            return None
        return self._request.logprobs[:self._num_logprobs]

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    FIELDS = ("request_id", "prompt_token_ids", "token_ids", "finish_reason", "logprobs",
              "text", "error")

    def _fields(self) -> tuple:
        return tuple(getattr(self, name) for name in self.FIELDS)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, RequestOutput):
            return NotImplemented
        return self._fields() == other._fields()

    __hash__ = None  # mutable (text, error), like the dataclass it replaces

    def __repr__(self) -> str:
        return "RequestOutput(" + ", ".join(f"{name}={getattr(self, name)!r}"
                                            for name in self.FIELDS) + ")"
