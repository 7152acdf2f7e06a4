"""``eval:`` section: bits per byte on held-out text, greedy samples and lm-eval tasks (pipelines/eval)."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

# The fixed prompt set: the same on every run, so runs compare side by side. Questions of the built-in SFT
# data's shape (pipelines/chat/builtin_qa.py) plus one open prompt.
DEFAULT_PROMPTS = [
    "What does `json.dumps` do?",
    "What does `textwrap.dedent` do?",
    "What does `shutil.copyfile` do?",
    "Explain what a Python list comprehension is.",
]


@dataclass(kw_only=True)
class EvalConfig:
    models: list[str] = field(default_factory=list)  # HF model dirs; empty: every model of the run
    text: list[str] = field(default_factory=list)  # held-out text files; empty: the data stage's validation split
    text_field: str = "text"  # the text column of .jsonl/.parquet held-out files
    max_bytes: int = 1_000_000  # cap on the held-out UTF-8 bytes scored (documents in id order, the last one cut)
    seq_len: int | None = None  # scoring window in tokens; None: the model's max_position_embeddings
    batch_size: int = 8  # windows per forward pass
    prompts: list[str] = field(default_factory=lambda: list(DEFAULT_PROMPTS))
    max_new_tokens: int = 48  # per greedy sample
    reward: bool = True  # the run's reward model: accuracy on its held-out preference pairs (runs without --model)
    policy: bool = True  # sft/ppo: reward, win rate vs sft, KL to sft on the PPO prompts (pipelines/eval/policy.py)
    tasks: list[str] = field(default_factory=list)  # lm-eval task names (local ones ship in pipelines/eval/tasks)
    task_limit: int | None = None  # lm-eval: at most this many documents per task (None: all)
    device: Literal["auto", "cpu", "cuda"] = "auto"  # auto: cuda when the Ray task (or process) has a GPU
    num_cpus: float = 1  # per Ray task (one task per model)
    num_gpus: float = 0
    # A live OpenAI-compatible endpoint instead of model dirs (raylm eval --endpoint URL): lm-eval through its
    # local-completions model type, greedy samples through chat completions (pipelines/eval/endpoint.py).
    endpoint: str | None = None  # base URL, e.g. http://127.0.0.1:8000/v1
    endpoint_model: str | None = None  # the served model id; None: the endpoint's only model
    api_key_env: str = "OPENAI_API_KEY"  # the environment variable holding the endpoint's API key (may be unset)
    tokenizer: str | None = None  # HF tokenizer dir/name for lm-eval's token counts; None: the endpoint's /tokenize
    concurrency: int = 4  # requests in flight to the endpoint

    def __post_init__(self) -> None:
        for name in ("max_bytes", "batch_size", "max_new_tokens", "num_cpus", "concurrency"):
            if getattr(self, name) <= 0:
                raise ValueError(f"{name}: must be > 0, got {getattr(self, name)}")
        if self.seq_len is not None and self.seq_len < 2:
            raise ValueError(f"seq_len: must be >= 2 (or null), got {self.seq_len}")
        if self.task_limit is not None and self.task_limit <= 0:
            raise ValueError(f"task_limit: must be > 0 (or null), got {self.task_limit}")
        if self.num_gpus < 0:
            raise ValueError(f"num_gpus: must be >= 0, got {self.num_gpus}")
        if not self.text_field:
            raise ValueError("text_field: must not be empty")
        for i, prompt in enumerate(self.prompts):
            if not prompt.strip():
                raise ValueError(f"prompts[{i}]: must not be empty")
        if self.endpoint is not None:
            if not self.endpoint.startswith(("http://", "https://")):
                raise ValueError(f"endpoint: must be an http(s) URL, got {self.endpoint!r}")
            if self.models:
                raise ValueError("endpoint: evaluates a live endpoint; models (model dirs) cannot be given with it")
        if not self.api_key_env:
            raise ValueError("api_key_env: must not be empty")
        if len(set(self.tasks)) != len(self.tasks):
            raise ValueError(f"tasks: listed twice: {min(t for t in self.tasks if self.tasks.count(t) > 1)}")
