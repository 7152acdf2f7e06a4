"""What one request asks the engine for and gets back, without torch: the ingress builds and checks these, and they
cross the Serve handle to the engine replica as they are."""
from __future__ import annotations

import math
from dataclasses import dataclass, field

MAX_LOGPROBS = 20  # alternatives per position, as OpenAI's top_logprobs

# One position's log-probs: (token id, its log-prob or None for a prompt's first token, [(alt id, log-prob)]).
TokenLogprob = tuple[int, float | None, list[tuple[int, float]]]


class RequestError(ValueError):
    """A request this engine cannot serve (its fault, not the server's): a 400 at the HTTP layer."""


@dataclass(kw_only=True)
class SamplingParams:
    max_tokens: int  # 0: no generation (prompt log-probs only)
    temperature: float = 1.0  # 0 (or below GREEDY_BELOW): greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None  # any int: reduced modulo 2**64 for torch.Generator
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks), as vLLM's extension of the same name
    logprobs: int | None = None  # None: none; k: each generated token's log-prob and its k best alternatives
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (completions' echo)

    def __post_init__(self) -> None:
        """Checked where it is built: in the ingress, a failure here is the client's 400."""
        if not isinstance(self.max_tokens, int) or self.max_tokens < 0:
            raise RequestError(f"max_tokens: must be an int >= 0, got {self.max_tokens!r}")
        if not (isinstance(self.temperature, (int, float)) and math.isfinite(self.temperature)
                and self.temperature >= 0):
            raise RequestError(f"temperature: must be a finite number >= 0, got {self.temperature!r}")
        if not (isinstance(self.top_p, (int, float)) and 0 < self.top_p <= 1):
            raise RequestError(f"top_p: must be in (0, 1], got {self.top_p!r}")
        if self.seed is not None and not isinstance(self.seed, int):
            raise RequestError(f"seed: must be an int, got {self.seed!r}")
        for name in ("logprobs", "prompt_logprobs"):
            k = getattr(self, name)
            if k is not None and not (isinstance(k, int) and 0 <= k <= MAX_LOGPROBS):
                raise RequestError(f"{name}: must be an int in 0..{MAX_LOGPROBS}, got {k!r}")
        if not all(isinstance(s, str) for s in self.stop):
            raise RequestError("stop: must be a list of strings")


@dataclass
class Delta:
    """What one request gained in one step: new text (possibly empty while a stop string may be forming)."""
    text: str
    completion_tokens: int
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"
    logprobs: list[TokenLogprob] | None = None  # one entry per generated token in this delta
    prompt_logprobs: list[TokenLogprob] | None = None  # on a request's first delta, when asked for



def merge(a: Delta | None, b: Delta | None) -> Delta | None:
    """Two consecutive deltas of one request as one (None: nothing new / already finished)."""
    if a is None or b is None:
        return a if b is None else b
    logprobs = None if a.logprobs is None and b.logprobs is None else (a.logprobs or []) + (b.logprobs or [])
    return Delta(a.text + b.text, b.completion_tokens, b.finish_reason, logprobs,
                 a.prompt_logprobs or b.prompt_logprobs)
