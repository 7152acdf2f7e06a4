"""Continuous batching: requests join and leave the running batch between decode steps.

``RunningBatch`` holds the KV cache of every request in flight (left-padded to one width). New requests are
prefilled together and their cache is merged in; a finished or cancelled one is dropped from the cache at once.
So a request never waits for a whole batch to finish, only for the step in progress. ``Scheduler`` runs a
RunningBatch in a background thread and streams each request's deltas through a callback.

Isolation: whatever one request brings (a bad prompt, parameters that fail its sampling) fails that request
alone. ``add`` changes nothing until every new row is built and prefilled, and ``sample`` samples each row on its
own, so one row's error never shifts or fails the others.

transformers has no continuous batching for its default (DynamicCache) path with per-request sampling, hence
this; the cache surgery relies only on DynamicLayer's ``keys``/``values`` tensors ([batch, heads, seq, dim]).
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable, Iterator
from dataclasses import dataclass

import torch

from serve.engine import Engine, left_pad
from serve.sampling import Delta, SamplingParams, TokenLogprob, merge


def pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad ``t`` on the left along ``dim`` to ``width``."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    return torch.nn.functional.pad(t, [0, 0] * (t.dim() - 1 - dim) + [missing, 0])


def prompt_logprobs(logits: torch.Tensor, prompt: list[int], k: int) -> list[TokenLogprob]:
    """Per prompt token, its log-prob given the tokens before it (None for the first) and the k best
    alternatives. ``logits``: [width, vocab] of one left-padded row; the prompt fills its last len(prompt)."""
    n = len(prompt)
    lp = torch.log_softmax(logits[logits.shape[0] - n:-1].float(), dim=-1)  # [n-1, vocab]: position j predicts j+1
    target = torch.tensor(prompt[1:], device=lp.device)
    chosen = lp.gather(1, target[:, None])[:, 0].tolist()
    top = torch.topk(lp, k) if k else None
    out: list[TokenLogprob] = [(prompt[0], None, [])]
    for j, tok in enumerate(prompt[1:]):
        alts = list(zip(top.indices[j].tolist(), top.values[j].tolist())) if top is not None else []
        out.append((tok, chosen[j], alts))
    return out


class RunningBatch:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.keys: list[Hashable] = []  # the caller's key of each row
        self.rows: list = []  # serve.engine.Row, one per key
        self.cache = self.mask = self.last_pos = self.logits = None

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(self, keys: list[Hashable], prompts: list[list[int]],
            params: list[SamplingParams]) -> list[tuple[Hashable, Delta]]:
        """Prefill new requests (together) and merge them into the batch. All or nothing: if a request is bad
        or the prefill fails, this raises and the batch is as it was. Returns the requests already finished
        (max_tokens 0: prompt log-probs only), which never join the batch."""
        e = self.engine
        rows = [e.new_row(p, sp) for p, sp in zip(prompts, params, strict=True)]
        ids, mask = left_pad(prompts, e.pad_id)
        ids, mask = ids.to(e.device), mask.to(e.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        full = any(sp.prompt_logprobs is not None for sp in params) or not e.keeps_logits
        out = e.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True,
                      **({} if full else {"logits_to_keep": 1}))
        for i, (row, prompt, sp) in enumerate(zip(rows, prompts, params)):
            if sp.prompt_logprobs is not None:
                row.prompt_logprobs = prompt_logprobs(out.logits[i], prompt, sp.prompt_logprobs)
        done = [(k, Delta("", 0, "length", [] if sp.logprobs is not None else None, row.prompt_logprobs))
                for k, row, sp in zip(keys, rows, params) if sp.max_tokens == 0]
        keep = [i for i, sp in enumerate(params) if sp.max_tokens > 0]
        if not keep:
            return done
        cache, logits, last_pos = out.past_key_values, out.logits[:, -1, :], positions[:, -1]
        if len(keep) < len(rows):
            index = torch.tensor(keep, device=e.device)
            cache.batch_select_indices(index)
            mask, logits, last_pos = mask[index], logits[index], last_pos[index]
        if not self.rows:
            self.cache, self.mask, self.last_pos, self.logits = cache, mask, last_pos, logits
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self.cache.layers, cache.layers):
                mine.keys = torch.cat([pad_left(mine.keys, width, 2), pad_left(theirs.keys, width, 2)])
                mine.values = torch.cat([pad_left(mine.values, width, 2), pad_left(theirs.values, width, 2)])
            self.mask = torch.cat([pad_left(self.mask, width, 1), pad_left(mask, width, 1)])
            self.last_pos = torch.cat([self.last_pos, last_pos])
            self.logits = torch.cat([self.logits, logits])
        self.keys += [keys[i] for i in keep]
        self.rows += [rows[i] for i in keep]
        return done

    @torch.inference_mode()
    def sample(self, cancelled: set | frozenset = frozenset()) -> list[tuple[Hashable, Delta | Exception]]:
        """Sample one token for every row from the last forward's logits and drop finished/cancelled/failed rows.
        A row whose sampling fails gets its exception in place of a delta; the others go on. The caller can send
        the deltas before ``forward`` runs: a token reaches its client one forward pass sooner."""
        e = self.engine
        logits = self.logits.float().cpu()  # one copy per step; rows sample with their own CPU generators
        best = logits.argmax(dim=-1).tolist()  # greedy rows' tokens, one call for the batch (not one per row)
        out: list[tuple[Hashable, Delta | Exception]] = []
        keep: list[int] = []
        for i, (key, row) in enumerate(zip(self.keys, self.rows)):
            if key in cancelled:
                continue
            try:
                delta = row.next(logits[i], e.eos_ids, best[i])
            except Exception as exc:  # noqa: BLE001 - this row's failure is this row's alone
                out.append((key, exc))
                continue
            out.append((key, delta))
            if delta.finish_reason is None:
                keep.append(i)
        if not keep:
            self.__init__(e)
        elif len(keep) < len(self.rows):
            self._select(keep)
        return out

    @torch.inference_mode()
    def forward(self) -> None:
        """The decode forward of every row's last sampled token (after ``sample``): the logits of the next step."""
        if not self.rows:
            return
        e = self.engine
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(self.rows), 1))], dim=1)
        self.last_pos = self.last_pos + 1
        tokens = torch.tensor([row.ids[-1] for row in self.rows], device=e.device)[:, None]
        fwd = e.model(input_ids=tokens, attention_mask=e.decode_mask(self.mask), position_ids=self.last_pos[:, None],
                      past_key_values=self.cache, use_cache=True)
        self.cache, self.logits = fwd.past_key_values, fwd.logits[:, -1, :]

    def _select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.engine.device)
        self.cache.batch_select_indices(index)
        self.mask, self.last_pos, self.logits = self.mask[index], self.last_pos[index], self.logits[index]
        self.keys = [self.keys[i] for i in keep]
        self.rows = [self.rows[i] for i in keep]
        self._trim()

    def _trim(self) -> None:
        """Drop leading columns that are padding for every row: only rows that leave leave such columns behind."""
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start > 0:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


def generate(engine: Engine, prompts: list[list[int]], params: list[SamplingParams]) -> Iterator[list]:
    """Offline: all prompts in one batch (no one joins later). Yields, per step, one entry per request: its Delta,
    its exception, or None once it has finished."""
    batch = RunningBatch(engine)
    first: list = [None] * len(prompts)
    for i, delta in batch.add(list(range(len(prompts))), prompts, params):
        first[i] = delta
    if any(d is not None for d in first):
        yield first
    while len(batch):
        step: list = [None] * len(prompts)
        for i, delta in batch.sample():
            step[i] = delta
        batch.forward()
        yield step


Emit = Callable[[Delta | BaseException], None]


@dataclass
class _Stream:
    """A request's side of the scheduler: where its deltas go, and the delta being coalesced."""
    emit: Emit
    pending: Delta | None = None
    steps: int = 0  # steps since the last emit
    sent: bool = False  # anything emitted yet


class Scheduler:
    """Runs a RunningBatch in a thread. ``submit`` from any thread; each request's deltas (coalesced: the first
    at once, then one per ``stream_interval`` tokens) or its error go to its ``emit`` callback. ``on_step`` runs after
    each admission and each step's emits (before the next forward): where an engine process sends them together."""

    def __init__(self, engine: Engine, max_batch_size: int, stream_interval: int, gather_s: float = 0.005,
                 on_step: Callable[[], None] = lambda: None):
        self.engine, self.max_batch_size, self.stream_interval = engine, max_batch_size, stream_interval
        self.on_step = on_step
        self.gather_s = gather_s  # how long an idle engine waits for company before prefilling a lone request
        self.inbox: queue.Queue = queue.Queue()
        self.cancelled: set = set()
        self.lock = threading.Lock()
        self.thread = threading.Thread(target=self._run, name="raylm-batcher", daemon=True)
        self.thread.start()

    def submit(self, key: Hashable, prompt_ids: list[int], params: SamplingParams, emit: Emit) -> None:
        self.inbox.put((key, prompt_ids, params, emit))

    def cancel(self, key: Hashable) -> None:
        with self.lock:
            self.cancelled.add(key)

    def _take(self, batch: RunningBatch) -> list:
        """New requests to admit: blocks while the batch is idle; never more than the batch has room for."""
        room = self.max_batch_size - len(batch)
        items = []
        if not len(batch):
            items.append(self.inbox.get())
            deadline = time.monotonic() + self.gather_s
            while len(items) < room and (left := deadline - time.monotonic()) > 0:
                try:
                    items.append(self.inbox.get(timeout=left))
                except queue.Empty:
                    break
        while len(items) < room:
            try:
                items.append(self.inbox.get_nowait())
            except queue.Empty:
                break
        with self.lock:  # cancelled while still waiting in the inbox: never start them
            dropped = {it[0] for it in items} & self.cancelled
            self.cancelled -= dropped
        return [it for it in items if it[0] not in dropped]

    def _run(self) -> None:
        batch = RunningBatch(self.engine)
        streams: dict[Hashable, _Stream] = {}
        while True:
            self._admit(batch, streams)
            self.on_step()
            if not len(batch):
                with self.lock:
                    if self.inbox.empty():  # nothing can match a leftover key (a request cancelled as it ended)
                        self.cancelled.clear()
                continue
            with self.lock:  # keys not in the batch stay: they may still be waiting in the inbox
                cancelled = self.cancelled & set(batch.keys)
                self.cancelled -= cancelled
            for key in cancelled:
                streams.pop(key, None)
            try:
                for key, delta in batch.sample(cancelled):  # sent before the next forward runs
                    self._forward(streams, key, delta)
                self.on_step()
                batch.forward()
            except Exception as exc:  # noqa: BLE001 - the forward pass itself failed: the batch is lost
                for stream in streams.values():
                    stream.emit(exc)
                streams.clear()
                batch = RunningBatch(self.engine)
                self.on_step()

    def _admit(self, batch: RunningBatch, streams: dict[Hashable, _Stream]) -> None:
        items = self._take(batch)
        if not items:
            return
        try:
            groups = [(items, batch.add([i[0] for i in items], [i[1] for i in items], [i[2] for i in items]))]
        except Exception:  # noqa: BLE001 - add changed nothing: admit one by one, so only the culprit fails
            groups = []
            for item in items:
                try:
                    groups.append(([item], batch.add([item[0]], [item[1]], [item[2]])))
                except Exception as exc:  # noqa: BLE001 - this request's own failure
                    item[3](exc)
        for admitted, done in groups:
            for key, _, _, emit in admitted:
                streams[key] = _Stream(emit)
            for key, delta in done:
                self._forward(streams, key, delta)

    def _forward(self, streams: dict[Hashable, _Stream], key: Hashable, delta: Delta | Exception) -> None:
        stream = streams.get(key)
        if stream is None:
            return
        if isinstance(delta, Exception):
            del streams[key]
            stream.emit(delta)
            return
        stream.pending, stream.steps = merge(stream.pending, delta), stream.steps + 1
        if delta.finish_reason or not stream.sent or stream.steps >= self.stream_interval:
            stream.emit(stream.pending)
            stream.pending, stream.steps, stream.sent = None, 0, True
        if delta.finish_reason:
            del streams[key]
