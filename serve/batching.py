"""Continuous batching: requests join and leave the running batch between decode steps.

``RunningBatch`` holds the KV cache of every request in flight (left-padded to one width). A new request is
prefilled on its own and its cache is merged in; a finished or cancelled one is dropped from the cache at once.
So a request never waits for a whole batch to finish, only for the step in progress. ``Scheduler`` runs a
RunningBatch in a background thread and streams each request's deltas through a callback.

transformers has no continuous batching for its default (DynamicCache) path with per-request sampling, hence
this; the cache surgery relies only on DynamicLayer's ``keys``/``values`` tensors ([batch, heads, seq, dim]).
"""
from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Hashable

import torch

from serve.engine import Delta, Engine, SamplingParams, _Row, left_pad, merge, sample_tokens


def pad_left(t: torch.Tensor, width: int, dim: int) -> torch.Tensor:
    """Zero-pad ``t`` on the left along ``dim`` to ``width``."""
    missing = width - t.shape[dim]
    if missing <= 0:
        return t
    shape = list(t.shape)
    shape[dim] = missing
    return torch.cat([t.new_zeros(shape), t], dim=dim)


class RunningBatch:
    def __init__(self, engine: Engine):
        self.engine = engine
        self.keys: list[Hashable] = []  # the caller's key of each row
        self.rows: list[_Row] = []
        self.cache = self.mask = self.last_pos = self.logits = None

    def __len__(self) -> int:
        return len(self.rows)

    @torch.inference_mode()
    def add(self, keys: list[Hashable], prompts: list[list[int]], params: list[SamplingParams]) -> None:
        """Prefill new requests (together) and merge them into the batch."""
        e = self.engine
        for p in prompts:
            e.check_prompt(p)
        ids, mask = left_pad(prompts, e.pad_id)
        ids, mask = ids.to(e.device), mask.to(e.device)
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        out = e.model(input_ids=ids, attention_mask=mask, position_ids=positions, use_cache=True)
        logits, last_pos = out.logits[:, -1, :], positions[:, -1]
        if not self.rows:
            self.cache, self.mask, self.last_pos, self.logits = out.past_key_values, mask, last_pos, logits
        else:
            width = max(self.mask.shape[1], mask.shape[1])
            for mine, theirs in zip(self.cache.layers, out.past_key_values.layers):
                mine.keys = torch.cat([pad_left(mine.keys, width, 2), pad_left(theirs.keys, width, 2)])
                mine.values = torch.cat([pad_left(mine.values, width, 2), pad_left(theirs.values, width, 2)])
            self.mask = torch.cat([pad_left(self.mask, width, 1), pad_left(mask, width, 1)])
            self.last_pos = torch.cat([self.last_pos, last_pos])
            self.logits = torch.cat([self.logits, logits])
        self.keys += keys
        self.rows += [_Row(p, max(1, min(p.max_tokens, e.max_context - len(ids_))))
                      for ids_, p in zip(prompts, params)]

    @torch.inference_mode()
    def step(self, cancelled: set | frozenset = frozenset()) -> list[tuple[Hashable, Delta]]:
        """Sample one token for every row, drop finished/cancelled rows, run the next decode forward."""
        e = self.engine
        tokens = sample_tokens(self.logits, [r.params for r in self.rows], [r.generator for r in self.rows])
        out, keep = [], []
        for i, (key, row, tok) in enumerate(zip(self.keys, self.rows, tokens)):
            if key in cancelled:
                continue
            delta = row.advance(tok, e.eos_ids, e.decode)
            out.append((key, delta))
            if delta.finish_reason is None:
                keep.append(i)
        if not keep:
            self.__init__(e)
            return out
        if len(keep) < len(self.rows):
            self._select(keep)
        self.mask = torch.cat([self.mask, self.mask.new_ones((len(keep), 1))], dim=1)
        self.last_pos = self.last_pos + 1
        fwd = e.model(input_ids=torch.tensor([tokens[i] for i in keep], device=e.device)[:, None],
                      attention_mask=self.mask, position_ids=self.last_pos[:, None], past_key_values=self.cache,
                      use_cache=True)
        self.cache, self.logits = fwd.past_key_values, fwd.logits[:, -1, :]
        self._trim()
        return out

    def _select(self, keep: list[int]) -> None:
        index = torch.tensor(keep, device=self.engine.device)
        self.cache.batch_select_indices(index)
        self.mask, self.last_pos, self.logits = self.mask[index], self.last_pos[index], self.logits[index]
        self.keys = [self.keys[i] for i in keep]
        self.rows = [self.rows[i] for i in keep]

    def _trim(self) -> None:
        """Drop leading columns that are padding for every row (left behind by rows that left)."""
        used = self.mask.any(dim=0).nonzero()
        start = int(used[0]) if len(used) else 0
        if start > 0:
            self.mask = self.mask[:, start:]
            for layer in self.cache.layers:
                layer.keys, layer.values = layer.keys[:, :, start:], layer.values[:, :, start:]


Emit = Callable[[Delta | BaseException], None]


class Scheduler:
    """Runs a RunningBatch in a thread. ``submit`` from any thread; each request's deltas (coalesced: the first
    at once, then one per ``stream_interval`` tokens) or its error go to its ``emit`` callback."""

    def __init__(self, engine: Engine, max_batch_size: int, stream_interval: int, gather_s: float = 0.005):
        self.engine, self.max_batch_size, self.stream_interval = engine, max_batch_size, stream_interval
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
        streams: dict = {}  # key -> [emit, pending Delta, steps since last emit, sent anything]
        while True:
            self._admit(batch, streams)
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
                deltas = batch.step(cancelled)
            except Exception as exc:  # noqa: BLE001 - the batch is lost: fail its requests, start afresh
                for emit, *_ in streams.values():
                    emit(exc)
                streams.clear()
                batch = RunningBatch(self.engine)
                continue
            for key, delta in deltas:
                self._forward(streams, key, delta)

    def _admit(self, batch: RunningBatch, streams: dict) -> None:
        valid = []
        for key, prompt, params, emit in self._take(batch):
            try:
                self.engine.check_prompt(prompt)
                valid.append((key, prompt, params, emit))
            except ValueError as exc:  # a bad request fails alone
                emit(exc)
        if not valid:
            return
        try:
            batch.add([v[0] for v in valid], [v[1] for v in valid], [v[2] for v in valid])
        except Exception as exc:  # noqa: BLE001 - whatever failed the prefill fails these requests only
            for v in valid:
                v[3](exc)
            return
        for key, _, _, emit in valid:
            streams[key] = [emit, None, 0, False]

    def _forward(self, streams: dict, key: Hashable, delta: Delta) -> None:
        state = streams.get(key)
        if state is None:
            return
        state[1], state[2] = merge(state[1], delta), state[2] + 1
        if delta.finish_reason or not state[3] or state[2] >= self.stream_interval:
            state[0](state[1])
            state[1], state[2], state[3] = None, 0, True
        if delta.finish_reason:
            del streams[key]
