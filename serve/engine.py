"""The inference engine: a Hugging Face causal LM, its tokenizer, and what one request needs to decode (its sampling
parameters, its random stream, its stop strings, its log-probs).

No Ray and no batching here: serve/batching.py runs rows of many requests in one continuous batch; serve/app.py
wraps that in Serve. What a request asks for and gets back (SamplingParams, Delta) lives in serve/sampling.py. Per-request sampling (temperature, top_p, seed), log-probs and stop strings are why the loop
is ours: ``model.generate`` applies one GenerationConfig to the whole batch and cannot stream requests separately.
"""
from __future__ import annotations

import inspect
import random
from pathlib import Path

import torch

from serve.sampling import Delta, RequestError, SamplingParams, TokenLogprob

REQUIRED_FILES = ("config.json",)
# Below this temperature a row decodes greedily (vLLM's rule too): dividing logits by a tiny positive number
# overflows to inf and the softmax to NaN.
GREEDY_BELOW = 1e-5

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
    drop_sorted[0] = False  # the best token always stays (rounding can leave a tiny mass "before" it)
    drop = torch.zeros_like(drop_sorted).scatter(0, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def sample_token(logits: torch.Tensor, params: SamplingParams, generator: torch.Generator) -> int:
    """One next token from one row of logits, with the row's own temperature, top_p and random stream."""
    if params.temperature < GREEDY_BELOW:
        return int(logits.argmax())
    probs = torch.softmax(top_p_filter(logits.float() / params.temperature, params.top_p), dim=-1)
    if not torch.isfinite(probs).all():
        raise RequestError("sampling failed: the model produced non-finite probabilities for this request")
    return int(torch.multinomial(probs, 1, generator=generator))


def token_logprob(logits: torch.Tensor, token: int, k: int) -> TokenLogprob:
    """The model's own (pre-temperature) log-prob of ``token`` under one row of logits, and the k best."""
    lp = torch.log_softmax(logits.float(), dim=-1)
    top = torch.topk(lp, k) if k else None
    alts = list(zip(top.indices.tolist(), top.values.tolist())) if top is not None else []
    return token, float(lp[token]), alts


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad prompts to one length (so every row's next token sits in the last column)."""
    rows = [torch.tensor(p, dtype=torch.long) for p in prompts]
    ids = torch.nn.utils.rnn.pad_sequence(rows, batch_first=True, padding_value=pad_id, padding_side="left")
    mask = torch.nn.utils.rnn.pad_sequence([torch.ones_like(r) for r in rows], batch_first=True,
                                           padding_value=0, padding_side="left")
    return ids, mask


def check_model_dir(model_dir: str | Path) -> Path:
    model_dir = Path(model_dir)
    missing = [f for f in REQUIRED_FILES if not (model_dir / f).exists()]
    if missing:
        raise FileNotFoundError(f"{model_dir}: not a Hugging Face model dir (missing {', '.join(missing)})")
    return model_dir


def check_cache_layers(config, model_dir) -> None:
    """serve/batching.py left-pads and concatenates each layer's whole KV history, which only full-attention
    layers keep (any architecture: Llama, Qwen, GPT-2, GPT-NeoX ...). A sliding-window layer keeps only its
    last window, so rows of different lengths would no longer line up: refuse at load, not mid-request."""
    from transformers import DynamicCache

    kinds = {type(layer).__name__ for layer in DynamicCache(config=config).layers} - {"DynamicLayer"}
    if kinds:
        raise ValueError(f"{model_dir}: the hf engine batches full-attention KV caches only; this model has "
                         f"{', '.join(sorted(kinds))} layers (sliding-window attention): serve it with "
                         f"serve.engine=vllm")


# ---- per-request decoding state -------------------------------------------------------------------------------

class TextStream:
    """A row's generated text, one token at a time. With a fast tokenizer (and no clean-up of spaces, which only a
    whole decode applies), tokenizers' own ``DecodeStream`` adds each token's text: ~0.5 us a token, where decoding
    the row's whole history again cost ~6 us at 30 tokens (16 rows a step). It withholds a trailing incomplete UTF-8
    sequence, as a whole decode's trailing U+FFFD is withheld. Other tokenizers decode the whole history."""

    def __init__(self, tokenizer):
        from tokenizers import Tokenizer
        from tokenizers.decoders import DecodeStream

        self.ids: list[int] = []
        self.text = ""
        self.tokenizer = tokenizer
        fast = getattr(tokenizer, "_tokenizer", None)
        if isinstance(fast, Tokenizer) and not getattr(tokenizer, "clean_up_tokenization_spaces", False):
            self.fast, self.stream = fast, DecodeStream(skip_special_tokens=True)
        else:
            self.fast = self.stream = None

    def push(self, token: int) -> str:
        """Take the next token; return the whole text so far."""
        self.ids.append(token)
        if self.stream is None:
            self.text = self.tokenizer.decode(self.ids, skip_special_tokens=True)
        else:
            self.text += self.stream.step(self.fast, token) or ""
        return self.text


class Row:
    """One request's decoding state. Building it cannot touch a batch, so a bad request fails alone."""

    def __init__(self, params: SamplingParams, budget: int, text: TextStream,
                 prompt_logprobs: list[TokenLogprob] | None = None):
        self.params = params
        self.budget = budget  # max new tokens for this row (its max_tokens, capped by the model's context)
        self.text = text  # its ids are the tokens generated so far
        self.ids = text.ids
        self.emitted = 0  # chars of decoded text already sent
        self.prompt_logprobs = prompt_logprobs  # sent with the first delta
        seed = params.seed if params.seed is not None else random.getrandbits(63)
        self.generator = torch.Generator().manual_seed(seed % 2**64)  # any int maps into what torch accepts

    def next(self, logits: torch.Tensor, eos_ids: set[int], best: int | None = None) -> Delta:
        """Sample this row's next token from its logits (on the CPU: each row has its own CPU generator).
        ``best``: the row's argmax, when the caller took it for the whole batch at once (greedy rows use it)."""
        greedy = best is not None and self.params.temperature < GREEDY_BELOW
        token = best if greedy else sample_token(logits, self.params, self.generator)
        logprobs = None
        if self.params.logprobs is not None:  # EOS ends the text and is not part of it: no entry
            ends = token in eos_ids and not self.params.ignore_eos
            logprobs = [] if ends else [token_logprob(logits, token, self.params.logprobs)]
        delta = self.advance(token, eos_ids)
        delta.logprobs = logprobs
        if self.prompt_logprobs is not None:
            delta.prompt_logprobs, self.prompt_logprobs = self.prompt_logprobs, None
        return delta

    def advance(self, token: int, eos_ids: set[int]) -> Delta:
        """Take one sampled token; return the text it made safe to send and whether the row is done."""
        if token in eos_ids and not self.params.ignore_eos:
            return self._finish(self.text.text, "stop")
        text = self.text.push(token)
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

        model_dir = check_model_dir(model_dir)
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        # fp32 on CPU: bf16 is ~10x slower on AVX2-only CPUs (docs/platform.md).
        dtype = dtype or (torch.bfloat16 if self.device.type == "cuda" else torch.float32)
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype).to(self.device).eval()
        check_cache_layers(self.model.config, model_dir)
        self.max_context = int(getattr(self.model.config, "max_position_embeddings", 2048))
        self.vocab_size = int(self.model.get_input_embeddings().num_embeddings)
        # Prefill computes logits for the last position only, unless a row asks for its prompt's log-probs.
        self.keeps_logits = "logits_to_keep" in inspect.signature(self.model.forward).parameters
        eos = self.model.generation_config.eos_token_id if self.model.generation_config else None
        eos = eos if isinstance(eos, list) else [eos]
        self.eos_ids = {i for i in [*eos, self.tokenizer.eos_token_id] if i is not None}
        self.pad_id = self.tokenizer.pad_token_id if self.tokenizer.pad_token_id is not None else 0

    def decode_mask(self, mask: torch.Tensor) -> torch.Tensor:
        """The attention mask of a decode step (one new token per row, ``mask``: [B, S] over the whole cache). With
        SDPA it goes in as SDPA's own boolean [B, 1, 1, S] mask, which transformers passes through untouched: its
        mask builder costs ~10% of a small model's decode step on CPU, for a mask that is the padding mask here (a
        single query token attends to every cached position its row holds)."""
        if self.model.config._attn_implementation != "sdpa":
            return mask
        return mask[:, None, None, :].bool()

    # -- prompts --
    def chat_prompt_ids(self, messages: list[dict]) -> list[int]:
        if not self.tokenizer.chat_template:
            raise RequestError("the model's tokenizer has no chat template: use /v1/completions")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True,
                                                 return_dict=False)
        return list(ids["input_ids"] if isinstance(ids, dict) else ids)

    def text_prompt_ids(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=True)

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True)

    def check_prompt(self, ids: list[int]) -> None:
        if not ids:
            raise RequestError("the prompt is empty")
        if len(ids) >= self.max_context:
            raise RequestError(f"the prompt has {len(ids)} tokens; the model's context is {self.max_context}")
        if not all(isinstance(i, int) and 0 <= i < self.vocab_size for i in ids):
            raise RequestError(f"the prompt holds token ids outside the vocabulary (0..{self.vocab_size - 1})")

    def new_row(self, prompt: list[int], params: SamplingParams) -> Row:
        """Check one request and build its decoding state (raises RequestError for this request only)."""
        self.check_prompt(prompt)
        return Row(params, max(1, min(params.max_tokens, self.max_context - len(prompt))), TextStream(self.tokenizer))
