"""``raylm eval --endpoint URL``: a live OpenAI-compatible endpoint, measured as a model of a run is.

- lm-eval tasks through lm-eval's own ``local-completions`` model type: log-likelihoods from ``/v1/completions``
  with ``echo`` + ``logprobs`` (raylm's server and vLLM answer them). lm-eval counts context tokens itself, so it
  needs the served tokenizer: ``eval.tokenizer`` (a HF tokenizer dir or name), else the endpoint's own
  ``/tokenize`` routes (raylm and vLLM serve them; lm-eval's ``remote`` tokenizer backend uses them).
- the fixed prompts, greedy, through ``/v1/chat/completions`` (a server without a chat template: ``/v1/completions``).

No bits per byte of our own: it needs the tokenizer's windows; the ``raylm_heldout`` task gives lm-eval's through
the endpoint. The endpoint is probed before any work (reachable, key accepted, model served, tokenizer routes).
"""
from __future__ import annotations

import os
from dataclasses import dataclass, field

import httpx

from cluster.schemas.eval import EvalConfig

TIMEOUT_S = 30


@dataclass(frozen=True)
class Target:
    base: str  # ".../v1"
    model: str
    key: str | None
    card: dict = field(default_factory=dict)  # GET /v1/models/{id}

    @property
    def headers(self) -> dict:
        return {"Authorization": f"Bearer {self.key}"} if self.key else {}

    @property
    def root(self) -> str:
        """The server root (vLLM's and raylm's /tokenize live there, beside /v1)."""
        return self.base.removesuffix("/v1")


def api_base(url: str) -> str:
    base = url.rstrip("/")
    for suffix in ("/chat/completions", "/completions", "/models"):
        base = base.removesuffix(suffix)
    return base


def _get(base: str, path: str, headers: dict) -> httpx.Response:
    try:
        return httpx.get(base + path, headers=headers, timeout=TIMEOUT_S)
    except httpx.HTTPError as exc:
        raise ValueError(f"eval.endpoint: {base} unreachable ({type(exc).__name__}: {exc})") from None


def probe(cfg: EvalConfig) -> Target:
    """The endpoint and model to evaluate, checked: reachable, the key accepted, the model served."""
    base = api_base(cfg.endpoint)
    key = os.environ.get(cfg.api_key_env, "").strip() or None
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    r = _get(base, "/models", headers)
    if r.status_code in (401, 403):
        said = f"the key in ${cfg.api_key_env}" if key else f"no key (${cfg.api_key_env} is unset)"
        raise ValueError(f"eval.endpoint: {base} refused {said} (HTTP {r.status_code})")
    if r.status_code != 200:
        raise ValueError(f"eval.endpoint: GET {base}/models answered HTTP {r.status_code} (is it an OpenAI-"
                         "compatible base URL, ending in /v1?)")
    try:
        served = [m["id"] for m in r.json()["data"]]
    except (ValueError, KeyError, TypeError):
        raise ValueError(f"eval.endpoint: GET {base}/models is not an OpenAI models list") from None
    model = cfg.endpoint_model
    if model is None:
        if len(served) != 1:
            raise ValueError(f"eval.endpoint_model: {base} serves {len(served)} models ({', '.join(served)}): "
                             "name one with --model NAME")
        model = served[0]
    elif model not in served:
        raise ValueError(f"eval.endpoint_model: {base} does not serve {model!r} (it serves: {', '.join(served)})")
    card = _get(base, f"/models/{model}", headers)
    return Target(base, model, key, card.json() if card.status_code == 200 else {})


def check_tokenizer(cfg: EvalConfig, target: Target) -> None:
    """lm-eval's log-likelihoods need the served tokenizer: the given one must load, else the endpoint must serve
    /tokenize (lm-eval's own check)."""
    if cfg.tokenizer:
        from transformers import AutoTokenizer

        try:
            AutoTokenizer.from_pretrained(cfg.tokenizer)
        except (OSError, ValueError) as exc:
            raise ValueError(f"eval.tokenizer: {cfg.tokenizer}: cannot load a tokenizer ({exc})") from None
        return
    from lm_eval.utils import check_remote_tokenizer_support

    if not check_remote_tokenizer_support(target.root, timeout=TIMEOUT_S, auth_token=target.key):
        raise ValueError(f"eval.tokenizer: {target.root} serves no /tokenizer_info + /tokenize (raylm and vLLM "
                         "do); lm-eval needs the served model's tokenizer: pass --tokenizer DIR")


def samples(target: Target, prompts: list[str], max_new_tokens: int) -> dict:
    """One greedy completion per prompt, through chat completions; plain completions when the server refuses
    chat (a model without a chat template)."""
    items, fmt = [], "chat"
    with httpx.Client(base_url=target.base, headers=target.headers, timeout=TIMEOUT_S * 4) as http:
        for prompt in prompts:
            common = {"model": target.model, "max_tokens": max_new_tokens, "temperature": 0, "seed": 0}
            if fmt == "chat":
                r = http.post("/chat/completions", json={**common, "messages": [{"role": "user", "content": prompt}]})
                if 400 <= r.status_code < 500 and not items:
                    fmt = "text"
            if fmt == "text":
                r = http.post("/completions", json={**common, "prompt": prompt})
            if r.status_code != 200:
                raise RuntimeError(f"eval: {target.base}: a sample request answered HTTP {r.status_code}: "
                                   f"{r.text[:300]}")
            body = r.json()
            choice = body["choices"][0]
            text = choice["message"]["content"] if fmt == "chat" else choice["text"]
            items.append({"prompt": prompt, "completion": text or "",
                          "tokens": (body.get("usage") or {}).get("completion_tokens")})
    return {"format": fmt, "items": items}


def lm_eval_tasks(target: Target, cfg: EvalConfig, tasks_dir) -> dict:
    """lm-eval's ``local-completions`` against the endpoint (its ``LocalCompletionsAPI``, built here so the key
    and the tokenizer are passed as objects, not through its string arguments)."""
    from lm_eval.models.openai_completions import LocalCompletionsAPI

    from pipelines.eval.lm_tasks import evaluate_lm

    max_len = target.card.get("max_model_len")  # raylm's and vLLM's model objects carry it
    lm = LocalCompletionsAPI(
        base_url=target.base + "/completions", model=target.model, auth_token=target.key,
        header=target.headers or None, tokenizer_backend="huggingface" if cfg.tokenizer else "remote",
        tokenizer=cfg.tokenizer, tokenized_requests=True, num_concurrent=cfg.concurrency, batch_size=1,
        max_length=int(max_len or cfg.seq_len or 2048), timeout=TIMEOUT_S * 4, seed=0)
    # Documents start after EOS, as in process (lm_tasks.run_tasks) and in our bits per byte: lm-eval's API
    # models prefer BOS.
    lm.custom_prefix_token_id = lm.eot_token_id
    # A chat template only through a local tokenizer: lm-eval's remote backend cannot render one for
    # log-likelihood requests.
    chat = bool(cfg.tokenizer) and bool(getattr(lm.tokenizer, "chat_template", None))
    return evaluate_lm(lm, cfg.tasks, tasks_dir, chat, cfg.task_limit)


def served_identity(target: Target) -> dict:
    """What the endpoint says the model is (raylm adds the lineage head and max_model_len)."""
    card = target.card
    out = {"id": target.model, "owned_by": card.get("owned_by"), "max_model_len": card.get("max_model_len")}
    lineage = card.get("lineage")
    if lineage:
        out["lineage_head"] = {"stage": lineage[0]["stage"], "record_sha256": lineage[0]["record_sha256"],
                               "verified": lineage[0]["verified"]}
    return out


def evaluate_endpoint(target: Target, cfg: EvalConfig, tasks_dir) -> dict:
    """results.json's ``models`` entry for the endpoint (no path, weights or bits per byte of our own)."""
    record = {"name": target.model, "endpoint": target.base, "served": served_identity(target), "path": None,
              "weights_sha256": None, "parameters": None, "bpb": None,
              "samples": samples(target, cfg.prompts, cfg.max_new_tokens)}
    if cfg.tasks:
        record["lm_eval"] = lm_eval_tasks(target, cfg, tasks_dir)
    return record
