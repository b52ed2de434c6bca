"""Continuous batching over an engine's sequence slots (spec §5 infra: the serving side of rollouts).

One engine-owner thread runs the loop; callers on any thread (the HTTP event loop, a terminal chat)
`submit` requests and receive `StepOutput` events through a sink callback. Each iteration of the loop:

    cancel   drop requests whose client went away, free their slots
    reload   when asked, swap the weights between two steps (RL's checkpoint engine)
    admit    move waiting requests (FIFO) into free slots, batched prefill of the newly admitted
    decode   one batched decode step for every sequence already running
    sample   per request (its own SamplingParams and seeded generator; rows with equal settings share a call)
    stop     stop token ids, stop strings on the decoded text, max_tokens, the context limit
    emit     the new text of each request, without splitting a UTF-8 character or a possible stop string

Weight reloads happen between steps only, so a request in flight continues on the new weights from
its next token on: its cache entries (computed by the old weights) are kept. RL's checkpoint engine
relies on this (partial rollouts continue across a weight update, spec §5); callers that need
on-policy tokens only must drain the server before reloading.
An engine exception fails only the requests of that step (their sinks get an `error`); the loop goes on.
"""

from __future__ import annotations

import collections
import heapq
import itertools
import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

import torch

from openk2.serve.sampling import SamplingParams, sample

log = logging.getLogger(__name__)


class StepEngine(Protocol):
    """What the scheduler needs of an engine: openk2.serve.engine.Engine and hf_engine.HFEngine both have it."""

    max_batch: int
    max_seq_len: int

    def prefill(self, slots: Sequence[int], prompts: Sequence[Sequence[int]]) -> torch.Tensor: ...

    def decode(self, slots: Sequence[int], tokens: Sequence[int]) -> torch.Tensor: ...

    def release(self, slots: Sequence[int]) -> None: ...

    def load_weights(self, path) -> None: ...


@dataclass
class StepOutput:
    """What one request produced since its previous event; `finish_reason` set on the last one."""

    token_ids: list[int]
    text: str  # new text, safe to show (no half character, no possible start of a stop string)
    logprobs: list[float]
    finish_reason: str | None = None  # "stop", "length", or None while running
    stop_reason: int | str | None = None  # the stop token id or stop string that ended it
    error: str | None = None  # set (with finish_reason "error") when the engine failed this request
    prompt_tokens: int = 0
    completion_tokens: int = 0


Sink = Callable[[StepOutput], None]


class IncrementalDetokenizer:
    """Decoded text of a growing id list, one token at a time, never splitting a UTF-8 character.

    Decodes a short window (a few tokens before the unread ones, for tokenizers whose pieces depend on
    their neighbours) and holds text back while it ends in U+FFFD, i.e. an incomplete byte sequence.
    """

    def __init__(self, decode: Callable[[list[int]], str], context: int = 4):
        self.decode, self.context = decode, context
        self.ids: list[int] = []
        self.prefix = 0  # window start
        self.read = 0  # ids[:read] are already in `text`
        self.text = ""

    def push(self, token_id: int) -> str:
        """Add a token -> the text it completes ("" while a character is incomplete)."""
        self.ids.append(token_id)
        before = self.decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        window = self.decode(self.ids[self.prefix:])
        if window.endswith("\ufffd") or len(window) <= len(before):
            return ""
        new = window[len(before):]
        self.text += new
        self.read = len(self.ids)
        self.prefix = max(self.read - self.context, 0)
        return new

    def flush(self) -> str:
        """At the end: the text still held back (an incomplete character decodes to U+FFFD)."""
        if self.read == len(self.ids):
            return ""
        before = self.decode(self.ids[self.prefix:self.read]) if self.read > self.prefix else ""
        new = self.decode(self.ids[self.prefix:])[len(before):]
        self.text += new
        self.read = len(self.ids)
        return new


@dataclass
class _Request:
    id: int
    prompt: list[int]
    params: SamplingParams
    stop_ids: frozenset[int]
    sink: Sink
    generator: torch.Generator
    detok: IncrementalDetokenizer
    budget: int = 0  # tokens it may generate: min(max_new_tokens, what the context has left)
    slot: int = -1
    tokens: list[int] = field(default_factory=list)
    pending_ids: list[int] = field(default_factory=list)  # sampled, not yet sent
    pending_logprobs: list[float] = field(default_factory=list)
    sent: int = 0  # characters of detok.text already sent
    stop_len: int = 0  # longest stop string

    @property
    def sample_key(self) -> tuple:
        p = self.params
        return (p.temperature, p.top_p, p.top_k, p.logprobs) if not p.greedy else (0.0, p.logprobs)


@dataclass
class _Reload:
    path: str
    done: threading.Event = field(default_factory=threading.Event)
    seconds: float = 0.0
    error: BaseException | None = None


class Scheduler:
    """Continuous batching: `Scheduler(engine, tokenizer.decode).start()`, then `submit` from any thread."""

    def __init__(self, engine: StepEngine, decode: Callable[[list[int]], str], *,
                 default_stop_ids: Sequence[int] = (), max_waiting: int = 4096):
        self.engine, self.decode_fn = engine, decode
        self.default_stop_ids = frozenset(int(t) for t in default_stop_ids)
        self.max_waiting = max_waiting
        self._cond = threading.Condition()
        self._waiting: collections.deque[_Request] = collections.deque()
        self._running: dict[int, _Request] = {}  # request id -> request, in admission order
        # a min-heap: the lowest free slot goes out first, so running slots stay packed at the front and a
        # decode step over them, in slot order, reads the cache as one view instead of gathering rows
        self._free = list(range(engine.max_batch))
        self._cancelled: set[int] = set()
        self._reloads: list[_Reload] = []
        self._ids = itertools.count()
        self._thread: threading.Thread | None = None
        self._stopping = False
        # counters for tests and benchmarks
        self.steps = 0  # loop iterations that ran the engine
        self.max_running_seen = 0

    # ------------------------------------------------------------------------- public API
    def start(self) -> Scheduler:
        """Run the loop in a thread of its own (a no-op when it already runs)."""
        if self._thread is None:
            self._thread = threading.Thread(target=self._loop, name="openk2-scheduler", daemon=True)
            self._thread.start()
        return self

    def run(self, ready: Callable[[], None] = lambda: None) -> None:
        """Run the loop in the calling thread until `shutdown()`; `ready()` is called once it owns the loop.

        `openk2 serve` gives the loop the main thread: torch's OpenMP work issued from the main thread ran a
        batch-16 decode step 1.6x faster than from a second thread on our 2-core CPU (10–13 ms against
        17–21 ms per step), so the HTTP server takes the second thread instead."""
        with self._cond:
            if self._thread is not None:
                raise RuntimeError("the scheduler loop is already running")
            self._thread = threading.current_thread()
        ready()
        self._loop()

    def shutdown(self, timeout: float = 10.0) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        thread, self._thread = self._thread, None
        if thread is not None and thread is not threading.current_thread() and thread is not threading.main_thread():
            thread.join(timeout)  # a loop that `run()` holds in the main thread returns by itself

    def is_alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def submit(self, prompt: Sequence[int], params: SamplingParams, sink: Sink) -> int:
        """Queue one request -> its id. `params.stop_token_ids` None means the scheduler's default stop ids."""
        prompt = [int(t) for t in prompt]
        if not prompt:
            raise ValueError("the prompt is empty")
        room = self.engine.max_seq_len - len(prompt)
        if room < 1:
            raise ValueError(f"the prompt has {len(prompt)} tokens; the context holds {self.engine.max_seq_len} "
                             f"with at least one to generate")
        stop_ids = self.default_stop_ids if params.stop_token_ids is None else frozenset(params.stop_token_ids)
        seed_generator = params.generators(1)[0]
        # the last sampled token never enters the cache, so a slot holds prompt + budget - 1 tokens
        req = _Request(id=next(self._ids), prompt=prompt, params=params, stop_ids=stop_ids, sink=sink,
                       generator=seed_generator, detok=IncrementalDetokenizer(self.decode_fn),
                       budget=min(params.max_new_tokens, room + 1),
                       stop_len=max((len(s) for s in params.stop), default=0))
        with self._cond:
            if self._stopping:
                raise RuntimeError("the scheduler is shut down")
            if len(self._waiting) >= self.max_waiting:
                raise OverflowError(f"{len(self._waiting)} requests are waiting already (max {self.max_waiting})")
            self._waiting.append(req)
            self._cond.notify()
        return req.id

    def cancel(self, request_id: int) -> None:
        """The client went away: free the request's slot at the next step (a no-op when it already ended)."""
        with self._cond:
            self._cancelled.add(request_id)
            self._cond.notify()

    def reload_weights(self, path: str, timeout: float | None = None) -> float:
        """Replace the engine's weights between two steps (blocks the caller) -> seconds the swap took."""
        job = _Reload(str(path))
        with self._cond:
            if self._thread is None:
                raise RuntimeError("the scheduler is not running")
            self._reloads.append(job)
            self._cond.notify()
        if not job.done.wait(timeout):
            raise TimeoutError(f"weight reload from {path} did not finish in {timeout} s")
        if job.error is not None:
            raise job.error
        return job.seconds

    def generate(self, prompt: Sequence[int], params: SamplingParams) -> StepOutput:
        """Blocking convenience for in-process use: the whole result as one StepOutput."""
        events: queue.SimpleQueue[StepOutput] = queue.SimpleQueue()
        self.submit(prompt, params, events.put)
        ids, logprobs, text = [], [], []
        while True:
            ev = events.get()
            ids += ev.token_ids
            logprobs += ev.logprobs
            text.append(ev.text)
            if ev.finish_reason is not None:
                return StepOutput(ids, "".join(text), logprobs, ev.finish_reason, ev.stop_reason, ev.error,
                                  ev.prompt_tokens, ev.completion_tokens)

    def stats(self) -> dict[str, int]:
        with self._cond:
            return {"running": len(self._running), "waiting": len(self._waiting), "free_slots": len(self._free),
                    "steps": self.steps, "max_running_seen": self.max_running_seen}

    # ------------------------------------------------------------------------- the loop
    def _loop(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._waiting or self._running or self._reloads or self._cancelled):
                    self._cond.wait()
                if self._stopping:
                    break
                cancelled, self._cancelled = self._cancelled, set()
                reloads, self._reloads = self._reloads, []
                admitted = []
                self._waiting = collections.deque(r for r in self._waiting if r.id not in cancelled)
                for rid in cancelled & self._running.keys():
                    self._free_slot(self._running.pop(rid))
                while self._waiting and self._free:
                    req = self._waiting.popleft()
                    req.slot = heapq.heappop(self._free)
                    admitted.append(req)
                running = sorted(self._running.values(), key=lambda r: r.slot)
                for req in admitted:
                    self._running[req.id] = req
                self.max_running_seen = max(self.max_running_seen, len(self._running))
            for job in reloads:
                self._reload(job)
            if admitted or running:
                self.steps += 1
                self._step(admitted, running)
        with self._cond:  # shut down: whatever is left ends with an error
            left = list(self._running.values()) + list(self._waiting)
            self._running.clear()
            self._waiting.clear()
        for req in left:
            self._emit(req, StepOutput([], "", [], "error", error="the server is shutting down"))

    def _reload(self, job: _Reload) -> None:
        start = time.perf_counter()
        try:
            self.engine.load_weights(job.path)
        except BaseException as e:  # handed to the caller, who reports it
            job.error = e
        job.seconds = time.perf_counter() - start
        job.done.set()

    def _step(self, admitted: list[_Request], running: list[_Request]) -> None:
        rows: list[_Request] = []
        logits: list[torch.Tensor] = []
        if admitted:
            try:
                logits.append(self.engine.prefill([r.slot for r in admitted], [r.prompt for r in admitted]))
                rows += admitted
            except Exception as e:
                self._fail(admitted, e)
        if running:
            try:
                logits.append(self.engine.decode([r.slot for r in running], [r.tokens[-1] for r in running]))
                rows += running
            except Exception as e:
                self._fail(running, e)
        if not rows:
            return
        all_logits = logits[0] if len(logits) == 1 else torch.cat(logits)
        tokens, logprobs = self._sample(all_logits, rows)
        finished = []
        for req, tok, lp in zip(rows, tokens, logprobs):
            if self._advance(req, tok, lp):
                finished.append(req)
        if finished:
            with self._cond:
                for req in finished:
                    if self._running.pop(req.id, None) is not None:
                        self._free_slot(req)

    def _sample(self, logits: torch.Tensor, rows: list[_Request]) -> tuple[list[int], list[float]]:
        """Rows with equal sampling settings share one `sample` call, each with its own generator."""
        groups: dict[tuple, list[int]] = {}
        for i, req in enumerate(rows):
            groups.setdefault(req.sample_key, []).append(i)
        if len(groups) == 1:
            toks, lps = sample(logits, rows[0].params, [r.generator for r in rows])
            return toks.tolist(), lps.tolist()
        tokens, logprobs = [0] * len(rows), [0.0] * len(rows)
        for idx in groups.values():
            toks, lps = sample(logits[idx], rows[idx[0]].params, [rows[i].generator for i in idx])
            for i, t, lp in zip(idx, toks.tolist(), lps.tolist()):
                tokens[i], logprobs[i] = t, lp
        return tokens, logprobs

    def _advance(self, req: _Request, tok: int, lp: float) -> bool:
        """Record one sampled token, emit what can be shown -> whether the request is finished."""
        req.tokens.append(tok)
        req.pending_ids.append(tok)
        req.pending_logprobs.append(lp)
        finish, reason = None, None
        if tok in req.stop_ids:
            finish, reason = "stop", tok  # the stop token's text is never shown, as in OpenAI's API
        else:
            req.detok.push(tok)
            if req.params.stop:
                finish, reason = self._find_stop(req)
            if finish is None and len(req.tokens) >= req.budget:
                finish = "length"
        if finish is not None and reason is None:  # "length": show what an incomplete character held back
            req.detok.flush()
        text = req.detok.text
        if finish is None:  # hold back a tail that may be the start of a stop string
            shown = len(text) - self._stop_prefix_len(text, req.params.stop) if req.params.stop else len(text)
            if shown <= req.sent:
                return False
        else:
            shown = len(text)
        out = StepOutput(req.pending_ids, text[req.sent:shown], req.pending_logprobs, finish, reason,
                         prompt_tokens=len(req.prompt), completion_tokens=len(req.tokens))
        req.sent, req.pending_ids, req.pending_logprobs = shown, [], []
        self._emit(req, out)
        return finish is not None

    @staticmethod
    def _find_stop(req: _Request) -> tuple[str | None, str | None]:
        text = req.detok.text
        start = max(req.sent - req.stop_len, 0)  # a stop string may begin in text already held back
        hits = [(i, s) for s in req.params.stop if (i := text.find(s, start)) >= 0]
        if not hits:
            return None, None
        at, s = min(hits)
        req.detok.text = text[:at]
        return "stop", s

    @staticmethod
    def _stop_prefix_len(text: str, stops: Sequence[str]) -> int:
        """Length of the longest tail of text that is a proper prefix of a stop string."""
        best = 0
        for s in stops:
            for n in range(min(len(s) - 1, len(text)), best, -1):
                if text.endswith(s[:n]):
                    best = n
                    break
        return best

    def _fail(self, reqs: list[_Request], error: Exception) -> None:
        log.exception("engine step failed for %d requests", len(reqs), exc_info=error)
        with self._cond:
            for req in reqs:
                if self._running.pop(req.id, None) is not None:
                    self._free_slot(req)
        for req in reqs:
            self._emit(req, StepOutput(req.pending_ids, "", req.pending_logprobs, "error",
                                       error=f"{type(error).__name__}: {error}", prompt_tokens=len(req.prompt),
                                       completion_tokens=len(req.tokens)))

    @staticmethod
    def _emit(req: _Request, out: StepOutput) -> None:
        try:
            req.sink(out)
        except Exception:  # e.g. the consumer's event loop closed: the request is lost, the loop is not
            log.exception("delivering an event of request %d failed", req.id)

    def _free_slot(self, req: _Request) -> None:
        """Under the lock: give the slot back (the engine may drop its cache rows)."""
        try:
            self.engine.release([req.slot])
        except Exception:
            log.exception("engine.release(%d) failed", req.slot)
        heapq.heappush(self._free, req.slot)
