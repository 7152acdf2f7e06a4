"""One completion request relayed from the engine to its client: each choice (n per prompt) is one engine stream;
they go out together as SSE chunks or as one JSON body, in OpenAI's shapes (serve/openai_api.py)."""
from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

from starlette.responses import StreamingResponse
from starlette.types import Receive, Scope, Send

from serve import openai_api as oa
from serve.sampling import Delta


@dataclass
class Choice:
    index: int
    first: Delta  # the engine's first delta (fetched before the response started: errors get a real status)
    rest: AsyncIterator[Delta]
    echo: str = ""  # the prompt's text, sent first (completions with echo)
    completion_tokens: int = 0
    finish: str | None = None
    parts: list[str] = field(default_factory=list)
    entries: list = field(default_factory=list)  # log-prob entries, prompt's first when echoed

    async def deltas(self) -> AsyncIterator[Delta]:
        yield self.first
        async for d in self.rest:
            yield d

    def take(self, d: Delta) -> list:
        """Record one engine delta; return its new log-prob entries (prompt ones first)."""
        self.completion_tokens = d.completion_tokens
        self.finish = d.finish_reason or self.finish
        self.parts.append(d.text)
        new = [*(d.prompt_logprobs or []), *(d.logprobs or [])]
        self.entries += new
        return new


class Relay:
    """The choices of one request. ``prompt_tokens``: summed over the request's prompts (each counted once)."""

    def __init__(self, kind: str, model: str, choices: list[Choice], prompt_tokens: int, wants_logprobs: bool,
                 token_info: Callable[[int], tuple[str, list[int]]], include_usage: bool):
        self.kind, self.model, self.choices = kind, model, choices
        self.prompt_tokens, self.wants_logprobs, self.info = prompt_tokens, wants_logprobs, token_info
        self.include_usage = include_usage
        self.rid = oa.new_id("chatcmpl" if kind == "chat" else "cmpl")
        self.closed = False

    def usage(self) -> dict:
        return oa.usage(self.prompt_tokens, sum(c.completion_tokens for c in self.choices))

    def _logprobs(self, entries: list, offset: int) -> dict | None:
        if not self.wants_logprobs:
            return None
        if self.kind == "chat":
            return oa.chat_logprobs(entries, self.info)
        return oa.completion_logprobs(entries, self.info, offset)

    async def close(self) -> None:
        """Stop every choice's engine stream (frees its batch rows); idempotent."""
        if not self.closed:
            self.closed = True
            for c in self.choices:
                await c.rest.aclose()

    async def whole(self) -> dict:
        async def drain(c: Choice) -> None:
            async for d in c.deltas():
                c.take(d)
        try:
            await asyncio.gather(*(drain(c) for c in self.choices))
        finally:
            await self.close()
        out = []
        for c in self.choices:
            text = c.echo + "".join(c.parts)
            if self.kind == "chat":
                out.append(oa.chat_choice(c.index, text, c.finish or "length", self._logprobs(c.entries, 0)))
            else:
                out.append(oa.completion_choice(c.index, text, c.finish or "length", self._logprobs(c.entries, 0)))
        build = oa.chat_response if self.kind == "chat" else oa.completion_response
        return build(self.rid, self.model, out, self.usage())

    def _chunk(self, c: Choice, text: str | None, finish: str | None, entries: list, offset: int) -> str:
        if self.kind == "chat":
            delta = {} if text is None else {"content": text}
            choice = {"index": c.index, "delta": delta, "finish_reason": finish,
                      "logprobs": self._logprobs(entries, 0) if entries else None}
            return oa.sse(oa.chat_chunk(self.rid, self.model, [choice]))
        choice = oa.completion_choice(c.index, text or "", finish, self._logprobs(entries, offset) if entries else None)
        return oa.sse(oa.completion_chunk(self.rid, self.model, [choice]))

    async def sse(self) -> AsyncIterator[str]:
        """Chunks of all choices as they come; an engine error after the headers travels as an error event. Chunks
        ready together go out as one write (the role chunk with the first text; the last one with usage and
        [DONE]): each write crosses the ASGI stack, ~1/10 of a loaded replica's event-loop time at c16."""
        queue: asyncio.Queue = asyncio.Queue()

        async def pump(c: Choice) -> None:
            try:
                async for d in c.deltas():
                    await queue.put((c, d))
            except Exception as exc:  # noqa: BLE001 - handed to the consumer below
                await queue.put((c, exc))
            await queue.put((c, None))

        tasks = [asyncio.create_task(pump(c)) for c in self.choices]
        offsets = {c.index: 0 for c in self.choices}
        out: list[str] = []  # chunks not yet written
        try:
            for c in self.choices:
                if self.kind == "chat":
                    first = {"index": c.index, "delta": {"role": "assistant", "content": ""},
                             "finish_reason": None, "logprobs": None}
                    out.append(oa.sse(oa.chat_chunk(self.rid, self.model, [first])))
                elif c.echo:
                    out.append(self._chunk(c, c.echo, None, [], 0))
            await asyncio.sleep(0)  # each pump queues its choice's first delta (already fetched): it joins the role
            running = len(tasks)
            while running:
                if out and queue.empty():
                    yield "".join(out)
                    out = []
                c, item = await queue.get()
                if item is None:
                    running -= 1
                    out.append(self._chunk(c, None, c.finish or "length", [], 0))
                    continue
                if isinstance(item, Exception):
                    raise item
                entries = c.take(item)
                if item.text or entries:
                    out.append(self._chunk(c, item.text, None, entries, offsets[c.index]))
                offsets[c.index] += sum(len(self.info(e[0])[0]) for e in entries)
            if self.include_usage:
                build = oa.chat_chunk if self.kind == "chat" else oa.completion_chunk
                out.append(oa.sse(build(self.rid, self.model, [], self.usage())))
        except oa.APIError as exc:  # headers are gone: the error travels as an event, as OpenAI's does
            out.append(oa.sse(exc.body()))
        finally:
            for t in tasks:
                t.cancel()
            await self.close()
        yield "".join(out) + oa.sse("[DONE]")


class SlotResponse(StreamingResponse):
    """A streaming response that runs ``on_close`` when it ends however it ends (sent, client gone before the
    first byte, cancelled): the admission slot and the engine streams are freed then, not at garbage collection."""

    def __init__(self, content: AsyncIterator[str], on_close: Callable[[], Awaitable[None]]):
        super().__init__(content, media_type="text/event-stream")
        self.on_close = on_close

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        try:
            await super().__call__(scope, receive, send)
        finally:
            await self.on_close()
