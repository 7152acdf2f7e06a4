"""The inference engine: a Hugging Face causal LM generating for a batch of requests at once, with a KV cache,
streaming each request's text as it grows.

No Ray here (serve/batching.py runs it with continuous batching; serve/app.py wraps that in Serve). Per-request
sampling (temperature, top_p, seed) and stop strings are why the loop is ours: ``model.generate`` applies one
GenerationConfig to the whole batch and cannot stream several requests separately.
"""
from __future__ import annotations

import random
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch

REQUIRED_FILES = ("config.json",)


@dataclass(kw_only=True)
class SamplingParams:
    max_tokens: int
    temperature: float = 1.0  # 0: greedy
    top_p: float = 1.0
    stop: list[str] = field(default_factory=list)
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens (benchmarks), as vLLM's extension of the same name


@dataclass
class Delta:
    """What one request gained in one step: new text (possibly empty while a stop string may be forming)."""
    text: str
    completion_tokens: int
    finish_reason: str | None = None  # "stop" (EOS or a stop string) or "length"


# ---- pure helpers (unit-tested) -------------------------------------------------------------------------------

def find_stop(text: str, stops: list[str], start: int = 0) -> int | None:
    """Index of the earliest stop string in ``text[start:]`` (absolute), or None."""
    hits = [i for i in (text.find(s, start) for s in stops if s) if i >= 0]
    return min(hits) if hits else None


def held_back(text: str, stops: list[str]) -> int:
    """How many trailing chars to withhold: the longest suffix that could still grow into a stop string,
    or an incomplete UTF-8 sequence (decoded as U+FFFD)."""
    hold = 0
    for stop in stops:
        for k in range(min(len(stop) - 1, len(text)), hold, -1):
            if text.endswith(stop[:k]):
                hold = k
                break
    replacement = len(text) - len(text.rstrip("\ufffd"))
    return max(hold, replacement)


def top_p_filter(logits: torch.Tensor, top_p: float) -> torch.Tensor:
    """Nucleus filtering of one row of logits: keep the smallest set of tokens whose probability reaches top_p."""
    if top_p >= 1.0:
        return logits
    sorted_logits, order = torch.sort(logits, descending=True)
    cum = torch.softmax(sorted_logits, dim=-1).cumsum(dim=-1)
    drop_sorted = cum - torch.softmax(sorted_logits, dim=-1) >= top_p  # mass before this token already >= p
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_tokens(logits: torch.Tensor, params: list[SamplingParams], generators: list[torch.Generator]) -> list[int]:
    """One next token per row, each row with its own temperature, top_p and random stream."""
    out = []
    # On the CPU: each row samples with its own CPU torch.Generator (a GPU batch is a small copy per step).
    for row, p, gen in zip(logits.float().cpu(), params, generators):
        if p.temperature <= 0:
            out.append(int(row.argmax()))
            continue
        probs = torch.softmax(top_p_filter(row / p.temperature, p.top_p), dim=-1)
        out.append(int(torch.multinomial(probs, 1, generator=gen)))
    return out


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts to one length (so every row's next token sits in the last column)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        mask[i, width - len(p):] = 1
    return ids, mask


def merge(a: Delta | None, b: Delta | None) -> Delta | None:
    """Two consecutive deltas of one request as one (None: nothing new / already finished)."""
    if a is None or b is None:
        return a if b is None else b
    return Delta(a.text + b.text, b.completion_tokens, b.finish_reason)


# ---- per-request decoding state -------------------------------------------------------------------------------

class _Row:
    def __init__(self, params: SamplingParams, budget: int):
        self.params = params
        self.budget = budget  # max new tokens for this row (its max_tokens, capped by the model's context)
        self.ids: list[int] = []
        self.emitted = 0  # chars of decoded text already sent
        self.generator = torch.Generator().manual_seed(
            params.seed if params.seed is not None else random.getrandbits(63))

    def advance(self, token: int, eos_ids: set[int], decode) -> Delta:
        """Take one sampled token; return the text it made safe to send and whether the row is done."""
        if token in eos_ids and not self.params.ignore_eos:
            return self._finish(decode(self.ids), "stop")
        self.ids.append(token)
        text = decode(self.ids)
        stop_at = find_stop(text, self.params.stop, max(0, self.emitted - max(map(len, self.params.stop), default=0)))
        if stop_at is not None:
            return self._finish(text[:stop_at], "stop")
        if len(self.ids) >= self.budget:
            return self._finish(text.rstrip("\ufffd"), "length")
        safe = len(text) - held_back(text, self.params.stop)
        new = text[self.emitted:safe] if safe > self.emitted else ""
        self.emitted = max(self.emitted, safe)
        return Delta(new, len(self.ids))

    def _finish(self, text: str, reason: str) -> Delta:
        new = text[self.emitted:] if len(text) > self.emitted else ""
        self.emitted = len(text)
        return Delta(new, len(self.ids), reason)


# ---- the engine ---------------------------------------------------------------------------------------------

class Engine:
    """Loads a Hugging Face model dir (config.json, weights, tokenizer with a chat template)."""

    def __init__(self, model_dir: str | Path, device: str | None = None, dtype: torch.dtype | None = None):
        from transformers import AutoModelForCausalLM, AutoTokenizer

        model_dir = Path(model_dir)
        missing = [f for f in REQUIRED_FILES if not (model_dir / f).exists()]
        if missing:
            raise FileNotFoundError(f"{model_dir}: not a Hugging Face model dir (missing {', '.join(missing)})")
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # fp32 on CPU: bf16 is ~10x slower on AVX2-only CPUs (docs/platform.md).
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in [*eos, self.tokenizer.eos_token_id] if i is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    # -- prompts --
    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise ValueError("the model's tokenizer has no chat template: use /v1/completions")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def text_prompt_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise ValueError("the prompt is empty")
        if len(ids) >= self.max_context:
            raise ValueError(f"the prompt has {len(ids)} tokens; the model's context is {self.max_context}")

    # -- generation --
    def generate_stream(self, prompts: list[list[int]], params: list[SamplingParams]) -> Iterator[list[Delta | None]]:
        """Generate for all prompts together (no one joins later). Yields, per step, one entry per request: its
        Delta, or None once it has finished (its last Delta carried a finish_reason)."""
        from serve.batching import RunningBatch

        if not prompts or len(prompts) != len(params):
            raise ValueError("generate_stream: need one SamplingParams per prompt")
        batch = RunningBatch(self)
        batch.add(list(range(len(prompts))), prompts, params)
        while len(batch):
            step: list[Delta | None] = [None] * len(prompts)
            for i, delta in batch.step():
                step[i] = delta
            yield step
