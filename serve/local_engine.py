"""The hf engine as a replica runs it: the model and its continuous-batching loop (serve/batching.py) in a process
of their own, and an async ``generate`` that streams one request's Deltas to the replica's event loop.

Why a process and not a thread of the replica: a replica is bound by its one GIL. With the loop in a thread, the
engine (0.18 ms of Python per output token) and the event loop (HTTP, templates, SSE writes: 0.12 ms) took turns
on one core; apart, each has its own interpreter (vLLM splits its API server from its engine core for the same
reason). Per decode step the engine sends one message holding every row's delta; the replica sends one message per
request and per cancellation. ``serve.engine: vllm`` keeps a separate engine deployment with the same ``generate``
contract (serve/vllm_engine.py), because vLLM runs in its own Python.
"""
from __future__ import annotations

import asyncio
import itertools
import json
import os
import pickle
import socket
import subprocess
import sys
import threading
from collections.abc import AsyncIterator
from multiprocessing.connection import Connection

from serve.mailbox import Mailbox
from serve.sampling import Delta, SamplingParams


class EngineDied(RuntimeError):
    """The engine process of this replica is gone: its requests fail, and the health check asks for a new replica."""


def portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (RequestError and most errors do), else a RuntimeError that says what it was."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:  # noqa: BLE001 - any pickling failure: send the text instead
        return RuntimeError(f"{type(exc).__name__}: {exc}")


def engine_main(model_dir: str, max_batch_size: int, stream_interval: int, gather_s: float, threads: int,
                conn: Connection) -> None:
    """The engine process: load the model, run the scheduler thread, take commands until the replica goes away.
    One socket both ways: this thread only receives, the scheduler thread only sends."""
    commands = events = conn
    import torch

    from serve.batching import Scheduler
    from serve.engine import Engine

    torch.set_num_threads(threads)
    try:
        engine = Engine(model_dir)
    except BaseException as exc:  # noqa: BLE001 - the replica re-raises it in its constructor
        events.send(("failed", portable(exc)))
        return
    outbox: list = []  # (key, Delta | error) of this step; only the scheduler thread touches it

    def flush() -> None:
        if outbox:
            events.send([(k, v if isinstance(v, Delta) else portable(v)) for k, v in outbox])
            outbox.clear()

    scheduler = Scheduler(engine, max_batch_size, stream_interval, gather_s=gather_s, on_step=flush)
    events.send(("ready", None))
    while True:
        try:
            if not commands.poll(1.0):
                if not scheduler.thread.is_alive():  # the replica sees the pipe close and fails health checks
                    os._exit(1)
                continue
            command = commands.recv()
        except (EOFError, OSError):  # the replica is gone (also when it was killed): so is its engine
            os._exit(0)
        if command[0] == "submit":
            _, key, prompt_ids, params = command
            scheduler.submit(key, prompt_ids, params, lambda item, key=key: outbox.append((key, item)))
        else:
            scheduler.cancel(command[1])


class HFEngine:
    def __init__(self, model_dir: str, max_batch_size: int, batch_wait_timeout_s: float, stream_interval: int):
        import torch
        from transformers import AutoTokenizer

        from serve.engine import check_model_dir

        check_model_dir(model_dir)  # before the tokenizer, whose own error would not say what is missing
        # A fresh interpreter (not fork: the replica has threads, Ray's and Serve's, that a forked child would
        # inherit mid-lock; not multiprocessing's spawn: it re-runs the host's __main__, a script without a main
        # guard included) on one end of a socket pair; it imports what the replica imports (sys.path).
        mine, theirs = socket.socketpair()
        args = [model_dir, max_batch_size, stream_interval, batch_wait_timeout_s, torch.get_num_threads()]
        self.process = subprocess.Popen(
            [sys.executable, "-m", "serve.local_engine", str(theirs.fileno()), json.dumps(args)],
            pass_fds=[theirs.fileno()], env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
        theirs.close()
        self.commands = self.events = Connection(mine.detach())
        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)  # while the engine process loads the model
        try:
            status, error = self.events.recv()
        except EOFError:
            raise EngineDied(f"{model_dir}: the engine process exited while loading the model "
                             f"(exit code {self.process.wait()})") from None
        if status == "failed":
            raise error
        self.keys = itertools.count()
        self.send_lock = threading.Lock()
        self.boxes_lock = threading.Lock()
        self.boxes: dict[int, Mailbox] = {}
        self.reader = threading.Thread(target=self._read, name="raylm-engine-reader", daemon=True)
        self.reader.start()

    async def generate(self, prompt_ids: list[int], params: SamplingParams) -> AsyncIterator[Delta]:
        """Yields the request's Deltas (text, completion_tokens, finish_reason, log-probs) as its tokens come;
        closing the generator early (client gone, timeout) frees the request's batch row."""
        key = next(self.keys)
        mailbox = Mailbox(asyncio.get_running_loop())
        with self.boxes_lock:
            self.boxes[key] = mailbox
        finished = False
        try:
            self._send(("submit", key, prompt_ids, params))
            while not finished:
                item = await mailbox.get()
                if isinstance(item, BaseException):
                    finished = True  # the engine is done with it
                    raise item
                finished = item.finish_reason is not None
                yield item
        finally:
            with self.boxes_lock:
                self.boxes.pop(key, None)
            if not finished:
                self._send(("cancel", key))

    def _send(self, command: tuple) -> None:
        if not self.reader.is_alive():
            raise EngineDied("the engine process of this replica has exited")
        with self.send_lock:
            try:
                self.commands.send(command)
            except (OSError, EOFError) as exc:
                raise EngineDied("the engine process of this replica has exited") from exc

    def _read(self) -> None:
        """Hands each step's deltas to their mailboxes: one wake-up of the event loop per step, not one per row."""
        loop = None
        try:
            while True:
                ready = []
                for key, item in self.events.recv():
                    with self.boxes_lock:
                        box = self.boxes.get(key)
                    if box is not None and box.put(item, wake=False):
                        ready.append(box.ready)
                        loop = box.loop
                if ready:
                    loop.call_soon_threadsafe(_set_all, ready)
        except (EOFError, OSError):
            pass
        with self.boxes_lock:
            boxes = list(self.boxes.values())
        for box in boxes:
            box.put(EngineDied("the engine process of this replica exited"))

    def check_health(self) -> None:
        if self.process.poll() is not None:
            raise RuntimeError(f"the engine process died (exit code {self.process.returncode})")
        if not self.reader.is_alive():
            raise RuntimeError("the engine reader thread died")


def _set_all(events: list[asyncio.Event]) -> None:
    for event in events:
        event.set()


if __name__ == "__main__":  # the engine process (HFEngine starts it): FD ARGS_JSON
    engine_main(*json.loads(sys.argv[2]), conn=Connection(int(sys.argv[1])))
