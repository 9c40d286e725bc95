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


@dataclass
class RequestOutput:
    """What a user sees of a request: cumulative generated ids and, once finished, why."""

    request_id: str
    prompt_token_ids: list[int]
    token_ids: list[int]
    finish_reason: str | None
    logprobs: list[dict[int, float]] | None = None
    text: str | None = None
    error: str | None = None

    @property
    def finished(self) -> bool:
        return self.finish_reason is not None

    @classmethod
    def of(cls, request: Request) -> "RequestOutput":
        return cls(request.request_id, list(request.prompt_token_ids),
                   list(request.output_token_ids), request.finish_reason,
                   None if request.logprobs is None else list(request.logprobs))
