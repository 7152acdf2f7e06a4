"""Built-in alignment data: question/answer pairs from real standard-library docstrings.

"What does `json.dumps` do?" -> the first paragraph of ``json.dumps``'s docstring. The built-in pretraining
corpus holds the same docstrings, so the demo model learns a checkable task: recall the right one. Sources are
parsed with ``ast`` (nothing is imported), from a fixed list of pure-Python modules, in a fixed order: the
same Python gives the same pairs, in about a second.

The split is by a stable hash of the question (``zlib.crc32``, never ``hash()``: it differs per process), so
the held-out pairs (SFT validation, reward validation, PPO prompts) never change with the sample size.
"""
from __future__ import annotations

import ast
import random
import re
import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

MODULES = ("json", "textwrap", "shutil", "string", "random", "statistics", "base64", "heapq", "bisect", "glob",
           "fnmatch", "copy", "functools", "csv", "difflib", "calendar", "html", "gzip", "tempfile", "operator",
           "ipaddress", "fractions", "colorsys", "shlex", "uuid", "secrets", "pprint", "dataclasses", "inspect",
           "tokenize", "contextlib", "mimetypes", "platform", "filecmp", "quopri", "graphlib", "keyword",
           "posixpath", "ntpath", "genericpath", "linecache", "reprlib", "sched", "queue", "weakref", "abc",
           "locale", "codecs", "hmac", "hashlib", "zipfile", "tarfile", "pickle", "subprocess", "threading",
           "argparse", "logging", "typing", "types", "enum", "ast", "dis", "traceback", "warnings", "os")
MIN_ANSWER_CHARS = 20


@dataclass(frozen=True)
class QAPair:
    name: str  # qualified name, e.g. "json.dumps"
    question: str
    answer: str

    def messages(self) -> list[dict[str, str]]:
        return [{"role": "user", "content": self.question}, {"role": "assistant", "content": self.answer}]


def first_paragraph(doc: str, max_chars: int) -> str:
    """The docstring's first paragraph on one line, cut at a word boundary to at most ``max_chars``."""
    para = re.split(r"\n\s*\n", doc.strip(), maxsplit=1)[0]
    text = " ".join(para.split())
    if len(text) <= max_chars:
        return text
    cut = text[:max_chars].rsplit(" ", 1)[0]
    return cut.rstrip(",;:") + " ..."


def _module_path(name: str) -> Path | None:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    for path in (stdlib / f"{name}.py", stdlib / name / "__init__.py"):
        if path.is_file():
            return path
    return None


def module_pairs(module: str, max_answer_chars: int) -> list[QAPair]:
    """Pairs for the public top-level functions of one stdlib module (in source order)."""
    path = _module_path(module)
    if path is None:
        return []
    tree = ast.parse(path.read_text(encoding="utf-8", errors="replace"))
    pairs = []
    for node in tree.body:
        if not isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)) or node.name.startswith("_"):
            continue
        doc = ast.get_docstring(node)
        if not doc:
            continue
        answer = first_paragraph(doc, max_answer_chars)
        if len(answer) >= MIN_ANSWER_CHARS:
            name = f"{module}.{node.name}"
            pairs.append(QAPair(name, f"What does `{name}` do?", answer))
    return pairs


def builtin_pairs(max_answer_chars: int = 160, modules: tuple[str, ...] = MODULES) -> list[QAPair]:
    seen, out = set(), []
    for module in modules:
        for pair in module_pairs(module, max_answer_chars):
            if pair.name not in seen:
                seen.add(pair.name)
                out.append(pair)
    return out


def is_held_out(key: str, fraction: float) -> bool:
    return zlib.crc32(key.encode()) % 10_000 < fraction * 10_000


def split_pairs(pairs: list[QAPair], val_fraction: float) -> tuple[list[QAPair], list[QAPair]]:
    """(train, held-out) by a stable hash of the question."""
    held = [p for p in pairs if is_held_out(p.question, val_fraction)]
    return [p for p in pairs if not is_held_out(p.question, val_fraction)], held


def corrupt(answer: str, rng: random.Random) -> str:
    """A plausible wrong answer: the same words in a shuffled order, or its first half repeated."""
    words = answer.split()
    if len(words) > 3 and rng.random() < 0.5:
        rng.shuffle(words)
        return " ".join(words)
    half = " ".join(words[: max(1, len(words) // 2)])
    return f"{half} {half}"


def preference_pairs(pairs: list[QAPair], seed: int = 0) -> list[dict[str, str]]:
    """Reward data: chosen = the true answer; rejected = another function's answer (mostly from the same
    module: plausible, on topic) or a corrupted copy of the true one."""
    rng = random.Random(seed)
    by_module: dict[str, list[QAPair]] = {}
    for p in pairs:
        by_module.setdefault(p.name.rsplit(".", 1)[0], []).append(p)
    out = []
    for p in pairs:
        same = [q for q in by_module[p.name.rsplit(".", 1)[0]] if q.answer != p.answer]
        if same and rng.random() < 0.7:
            rejected = rng.choice(same).answer
        else:
            rejected = corrupt(p.answer, rng)
        if rejected != p.answer:
            out.append({"prompt": p.question, "chosen": p.answer, "rejected": rejected})
    return out
