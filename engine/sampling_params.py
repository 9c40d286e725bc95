"""Sampling parameters (vLLM / OpenAI semantics), validated on construction.

* ``temperature``: below 1e-5 (0 included) means greedy (argmax), as in vLLM; otherwise logits
  are divided by it.
* ``top_k``: keep the k most likely tokens; 0 or -1 keeps all.
* ``top_p``: keep the smallest set of most likely tokens whose probability sums to at least p.
* ``min_p``: drop tokens whose probability is below ``min_p`` times the top token's.
* ``seed``: makes sampling a pure function of (seed, output position), whatever the batch.
* ``max_tokens``: at most this many generated tokens (finish reason "length").
* ``min_tokens``: stop tokens (and EOS) are masked until this many tokens were generated.
* ``stop_token_ids``: generation stops after emitting one of these (finish reason "stop"); the
  stop token is part of the output, as in vLLM.
* ``ignore_eos``: do not stop on the model's EOS token.
* ``presence_penalty``: subtracted from the logit of every token that occurs in the output so far.
* ``frequency_penalty``: subtracted once per occurrence of a token in the output so far.
* ``repetition_penalty``: for tokens in the prompt or the output, positive logits are divided by
  it and negative ones multiplied (1 = off), as in Hugging Face transformers and vLLM.
* ``logprobs``: return, per generated token, the log-probabilities (of the raw model
  distribution, before penalties and temperature) of the sampled token and the top ``logprobs``
  tokens; None returns none.

Example::

    >>> SamplingParams(temperature=0.8, top_p=0.9, seed=7, max_tokens=32)
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

GREEDY_BELOW = 1e-5  # temperatures under this sample greedily (dividing by them overflows)


@dataclass(frozen=True)
class SamplingParams:
    """How to sample one request's tokens; every field is checked, errors name the field."""

    temperature: float = 1.0
    top_k: int = 0
    top_p: float = 1.0
    min_p: float = 0.0
    seed: int | None = None
    max_tokens: int = 16
    min_tokens: int = 0
    stop_token_ids: tuple[int, ...] = field(default_factory=tuple)
    ignore_eos: bool = False
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    logprobs: int | None = None

    def __post_init__(self) -> None:
        object.__setattr__(self, "stop_token_ids", _int_tuple("stop_token_ids", self.stop_token_ids))
        _check_number("temperature", self.temperature, low=0.0)
        _check_int("top_k", self.top_k, low=-1)
        _check_number("top_p", self.top_p, low=0.0, high=1.0, low_open=True)
        _check_number("min_p", self.min_p, low=0.0, high=1.0)
        if self.seed is not None:
            _check_int("seed", self.seed, low=0)
        _check_int("max_tokens", self.max_tokens, low=1)
        _check_int("min_tokens", self.min_tokens, low=0)
        if self.min_tokens > self.max_tokens:
            raise ValueError(
                f"min_tokens={self.min_tokens} must not exceed max_tokens={self.max_tokens}")
        if not isinstance(self.ignore_eos, bool):
            raise ValueError(f"ignore_eos must be a bool, got {self.ignore_eos!r}")
        _check_number("presence_penalty", self.presence_penalty, low=-2.0, high=2.0)
        _check_number("frequency_penalty", self.frequency_penalty, low=-2.0, high=2.0)
        _check_number("repetition_penalty", self.repetition_penalty, low=0.0, low_open=True)
        if self.logprobs is not None:
            _check_int("logprobs", self.logprobs, low=0)

    @property
    def greedy(self) -> bool:
        return self.temperature < GREEDY_BELOW

    @property
    def has_penalties(self) -> bool:
        return (self.presence_penalty != 0.0 or self.frequency_penalty != 0.0
                or self.repetition_penalty != 1.0)

    def check_vocab(self, vocab_size: int) -> None:
        """Raise ValueError when a token-valued field lies outside ``[0, vocab_size)``."""
        for tok in self.stop_token_ids:
            if not 0 <= tok < vocab_size:
                raise ValueError(f"stop_token_ids contains {tok}, outside the vocabulary "
                                 f"[0, {vocab_size})")
        if self.top_k > vocab_size:
            raise ValueError(f"top_k={self.top_k} exceeds the vocabulary size {vocab_size}")
        if self.logprobs is not None and self.logprobs > vocab_size:
            raise ValueError(f"logprobs={self.logprobs} exceeds the vocabulary size {vocab_size}")


def _check_int(name: str, value: object, low: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int):
        raise ValueError(f"{name} must be an int, got {value!r}")
    if value < low:
        raise ValueError(f"{name} must be >= {low}, got {value}")


FLOAT32_MAX = 3.4028234663852886e38  # the parameters travel to the device as float32


def _check_number(name: str, value: object, low: float | None = None, high: float | None = None,
                  low_open: bool = False) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a finite number, got {value!r}")
    try:
        as_float = float(value)
    except OverflowError:
        raise ValueError(f"{name}={value!r} is too large for a float") from None
    if not math.isfinite(as_float) or abs(as_float) > FLOAT32_MAX:
        raise ValueError(f"{name} must be a finite number within float32 range "
                         f"(|{name}| <= {FLOAT32_MAX:.4g}), got {value!r}")
    if low is not None and (value < low or (low_open and value == low)):
        bound = ">" if low_open else ">="
        raise ValueError(f"{name} must be {bound} {low}, got {value}")
    if high is not None and value > high:
        raise ValueError(f"{name} must be <= {high}, got {value}")


def _int_tuple(name: str, values: object) -> tuple[int, ...]:
    if isinstance(values, (str, bytes)) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a sequence of ints, got {values!r}")
    out = tuple(values)
    for v in out:
        if isinstance(v, bool) or not isinstance(v, int):
            raise ValueError(f"{name} must contain ints, got {v!r}")
    return out
