"""The OpenAI-compatible HTTP server (spec §4, §5 infra): FastAPI endpoints over the continuous-batching scheduler.

    GET  /health                 {"status": "ok"} while the scheduler thread lives
    GET  /v1/models              the one served model
    POST /v1/chat/completions    chat, streaming or not, tools and tool_choice, logprobs, usage
    POST /v1/completions         text (or token ids) in, text out, streaming or not
    POST /admin/load_weights     {"path": folder}: swap the weights between two steps (RL's checkpoint engine)
    GET  /admin/stats            the scheduler's counters (running, waiting, free slots, steps)

Every error is OpenAI's body `{"error": {"message", "type", "param", "code"}}`: 4xx for the client's mistakes
(bad JSON, wrong types, unknown model 404, too many tokens), 500 when the engine failed a request. A streaming
client that goes away cancels its request, which frees its slot at the next step.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing, asynccontextmanager
from typing import TypeVar

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from openk2.serve import protocol as p
from openk2.serve.loading import ChatPrompt, ServedModel, resolve_model_dir
from openk2.serve.sampling import SamplingParams
from openk2.serve.scheduler import Scheduler, StepOutput

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 2**20  # larger request bodies get 413 (ours)
DISCONNECT_POLL_S = 0.1  # how often a request checks whether its client left (ours)
M = TypeVar("M", bound=BaseModel)


def create_app(served: ServedModel, scheduler: Scheduler | None = None) -> FastAPI:
    """The app; it starts the scheduler (one is made for `served` when not given) and stops it on shutdown."""
    scheduler = scheduler or served.new_scheduler()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        scheduler.start()
        yield
        scheduler.shutdown()

    app = FastAPI(title="openk2", lifespan=lifespan)
    app.state.served, app.state.scheduler = served, scheduler
    api = _Api(served, scheduler)

    @app.exception_handler(p.APIError)
    async def api_error(request: Request, e: p.APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return JSONResponse(p.APIError(str(e.detail), e.status_code, type=kind).body(), status_code=e.status_code)

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception) -> JSONResponse:
        log.exception("unhandled error on %s", request.url.path)
        return JSONResponse(p.APIError(f"internal error: {type(e).__name__}", 500, type="server_error").body(),
                            status_code=500)

    @app.get("/health")
    async def health() -> JSONResponse:
        alive = scheduler.is_alive()
        return JSONResponse({"status": "ok" if alive else "scheduler stopped"}, status_code=200 if alive else 503)

    @app.get("/v1/models")
    async def models() -> JSONResponse:
        card = p.ModelCard(id=served.name, created=p.now(), max_model_len=served.max_seq_len)
        return JSONResponse(p.ModelList(data=[card]).model_dump())

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Response:
        return await api.chat(request, await _parse(request, p.ChatCompletionRequest))

    @app.post("/v1/completions")
    async def completions(request: Request) -> Response:
        return await api.completions(request, await _parse(request, p.CompletionRequest))

    @app.post("/admin/load_weights")
    async def load_weights(request: Request) -> JSONResponse:
        body = await _parse(request, p.LoadWeightsRequest)
        try:
            folder = resolve_model_dir(body.path)
            seconds = await asyncio.to_thread(scheduler.reload_weights, str(folder))
        except (FileNotFoundError, ValueError, TypeError, KeyError) as e:
            raise p.APIError(f"cannot load weights from {body.path}: {e}", 400, param="path") from e
        return JSONResponse({"status": "ok", "path": str(folder), "seconds": round(seconds, 4)})

    @app.get("/admin/stats")
    async def stats() -> JSONResponse:
        return JSONResponse(scheduler.stats())

    return app


async def _parse(request: Request, model: type[M]) -> M:
    """The JSON body as `model`, or an APIError (bad JSON, too large, wrong fields)."""
    body = await request.body()
    if len(body) > MAX_BODY_BYTES:
        raise p.APIError(f"request body of {len(body)} bytes is over the limit of {MAX_BODY_BYTES}", 413)
    try:
        data = json.loads(body)
    except (ValueError, RecursionError) as e:  # UnicodeDecodeError and JSONDecodeError are ValueErrors
        raise p.APIError(f"the request body is not valid JSON: {str(e)[:200]}", 400) from None
    try:
        return model.model_validate(data)
    except ValidationError as e:
        raise p.validation_error(e) from None
    except RecursionError:
        raise p.APIError("the request body is nested too deeply", 400) from None


class _Api:
    """The endpoints' logic: requests -> scheduler submissions -> OpenAI responses."""

    def __init__(self, served: ServedModel, scheduler: Scheduler):
        self.served, self.scheduler = served, scheduler

    # ------------------------------------------------------------------------- shared
    def _check_model(self, name: str) -> None:
        if name != self.served.name:
            raise p.APIError(f"the model {name!r} does not exist; this server serves {self.served.name!r}", 404,
                             type="not_found_error", param="model", code="model_not_found")

    def _params(self, req: p.ChatCompletionRequest | p.CompletionRequest, prompt_len: int) -> SamplingParams:
        room = self.served.max_seq_len - prompt_len
        if room < 1:
            raise p.APIError(f"the prompt has {prompt_len} tokens; this model's context is {self.served.max_seq_len}"
                             " tokens, with at least one to generate", 400, param="messages",
                             code="context_length_exceeded")
        limit = req.token_limit
        if limit is not None and limit > room:
            raise p.APIError(f"max_tokens={limit} is too large: the prompt has {prompt_len} tokens and the context "
                             f"is {self.served.max_seq_len}, so at most {room} can be generated", 400,
                             param="max_tokens", code="context_length_exceeded")
        try:
            return SamplingParams(
                max_new_tokens=room if limit is None else limit,
                temperature=1.0 if req.temperature is None else req.temperature,  # OpenAI's default
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=req.top_k or 0, seed=req.seed, stop=tuple(req.stop or ()),
                stop_token_ids=() if req.ignore_eos else None)
        except ValueError as e:
            raise p.APIError(str(e), 400) from e

    def _submit(self, prompt_ids: list[int], params: SamplingParams) -> tuple[int, asyncio.Queue[StepOutput]]:
        loop, events = asyncio.get_running_loop(), asyncio.Queue()
        try:
            rid = self.scheduler.submit(prompt_ids, params, lambda ev: loop.call_soon_threadsafe(events.put_nowait, ev))
        except ValueError as e:
            raise p.APIError(str(e), 400) from e
        except OverflowError as e:
            raise p.APIError(f"the server is busy: {e}", 429, type="rate_limit_error") from e
        return rid, events

    async def _events(self, request: Request, rid: int, events: asyncio.Queue[StepOutput]) -> AsyncIterator[StepOutput]:
        """The request's events until its last; a client that leaves (or a cancelled task) cancels the request."""
        done, checked = False, time.monotonic()
        try:
            while not done:
                try:
                    ev = await asyncio.wait_for(events.get(), DISCONNECT_POLL_S)
                except TimeoutError:
                    ev = None
                # uvicorn drops what is sent to a client that left without telling the app: ask, now and then
                if ev is None or time.monotonic() - checked > DISCONNECT_POLL_S:
                    checked = time.monotonic()
                    if await request.is_disconnected():
                        return
                if ev is None:
                    continue
                done = ev.finish_reason is not None
                if ev.error is not None:
                    raise p.APIError(f"generation failed: {ev.error}", 500, type="server_error")
                yield ev
        finally:
            if not done:
                self.scheduler.cancel(rid)

    def _logprobs(self, ids: list[int], logprobs: list[float]) -> list[p.TokenLogprob]:
        out = []
        for t, lp in zip(ids, logprobs):
            token = self.served.tokenizer.decode([t])
            out.append(p.TokenLogprob(token=token, logprob=lp, bytes=list(token.encode())))
        return out

    # ------------------------------------------------------------------------- chat
    async def chat(self, request: Request, req: p.ChatCompletionRequest) -> Response:
        self._check_model(req.model)
        choice = req.effective_tool_choice
        tools = [t.model_dump(exclude_none=True) for t in req.tools] if req.tools else None
        try:
            prompt = self.served.chat_prompt([m.as_dict() for m in req.messages], tools,
                                             choice.model_dump() if isinstance(choice, BaseModel) else choice)
        except (ValueError, TypeError, KeyError) as e:
            raise p.APIError(str(e), 400, param="messages") from e
        params = self._params(req, len(prompt.ids))
        rid, events = self._submit(prompt.ids, params)
        if req.stream:
            chunks = self._chat_stream(request, req, prompt, rid, events)
            return StreamingResponse(chunks, media_type="text/event-stream")
        ids, logprobs, text, last = [], [], [], None
        async with aclosing(self._events(request, rid, events)) as stream:
            async for ev in stream:
                ids += ev.token_ids
                logprobs += ev.logprobs
                text.append(ev.text)
                last = ev
        if last is None:  # the client left
            return Response(status_code=499)
        content, calls = self.served.parse("".join(text), prompt)
        message = p.AssistantMessage(content=content, tool_calls=[
            p.ToolCallOut(id=c.id, function=p.FunctionCallOut(name=c.name, arguments=c.arguments)) for c in calls
        ] or None)
        choice_out = p.ChatChoice(message=message, finish_reason="tool_calls" if calls else last.finish_reason,
                                  logprobs=p.ChoiceLogprobs(content=self._logprobs(ids, logprobs)) if req.logprobs
                                  else None)
        body = p.ChatCompletion(id=p.new_id("chatcmpl"), created=p.now(), model=self.served.name, choices=[choice_out],
                                usage=p.Usage.of(last.prompt_tokens, last.completion_tokens))
        return Response(body.model_dump_json(), media_type="application/json")

    async def _chat_stream(self, request: Request, req: p.ChatCompletionRequest, prompt: ChatPrompt, rid: int,
                           events: asyncio.Queue[StepOutput]) -> AsyncIterator[str]:
        cid, created, model = p.new_id("chatcmpl"), p.now(), self.served.name

        def chunk(delta: p.Delta, finish: str | None = None, logprobs: p.ChoiceLogprobs | None = None) -> str:
            choice = p.ChatChunkChoice(delta=delta, finish_reason=finish, logprobs=logprobs)
            return p.sse(p.ChatCompletionChunk(id=cid, created=created, model=model, choices=[choice]))

        streamer = self.served.tool_parser.streamer() if prompt.parse_tools else None
        text, called, usage = prompt.forced, False, (0, 0)
        yield chunk(p.Delta(role="assistant", content=""))
        try:
            async with aclosing(self._events(request, rid, events)) as stream:
                async for ev in stream:
                    usage = (ev.prompt_tokens, ev.completion_tokens)
                    logprobs = (p.ChoiceLogprobs(content=self._logprobs(ev.token_ids, ev.logprobs))
                                if req.logprobs else None)
                    if streamer is None:
                        deltas = [p.Delta(content=ev.text)] if ev.text else []
                    else:
                        text += ev.text
                        pieces = streamer.feed(text) if ev.finish_reason is None else streamer.finish(text)
                        deltas = [self._delta(d) for d in pieces]
                        called |= any(d.tool_calls for d in deltas)
                    for i, delta in enumerate(deltas or ([p.Delta()] if logprobs else [])):
                        yield chunk(delta, logprobs=logprobs if i == 0 else None)
                    if ev.finish_reason is not None:
                        yield chunk(p.Delta(), "tool_calls" if called else ev.finish_reason)
        except p.APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        if req.stream_options is not None and req.stream_options.include_usage:
            yield p.sse(p.ChatCompletionChunk(id=cid, created=created, model=model, choices=[],
                                              usage=p.Usage.of(*usage)))
        yield p.SSE_DONE

    @staticmethod
    def _delta(d) -> p.Delta:
        """A tool parser's StreamDelta -> an OpenAI delta."""
        if d.tool_call_index is None:
            return p.Delta(content=d.content)
        function = p.FunctionDelta(name=d.name, arguments=d.arguments)
        return p.Delta(tool_calls=[p.ToolCallDelta(index=d.tool_call_index, id=d.id,
                                                   type="function" if d.id is not None else None, function=function)])

    # ------------------------------------------------------------------------- completions
    async def completions(self, request: Request, req: p.CompletionRequest) -> Response:
        self._check_model(req.model)
        if isinstance(req.prompt, str):
            ids = self.served.tokenizer.encode(req.prompt, allow_special=True)
        else:
            ids = list(req.prompt)
            vocab = self.served.tokenizer.vocab_size
            if max(ids) >= vocab:
                raise p.APIError(f"token id {max(ids)} is outside the vocabulary of {vocab}", 400, param="prompt")
        if not ids:
            raise p.APIError("the prompt encodes to no tokens", 400, param="prompt")
        params = self._params(req, len(ids))
        rid, events = self._submit(ids, params)
        cid, created, model = p.new_id("cmpl"), p.now(), self.served.name
        if req.stream:
            return StreamingResponse(self._completion_stream(request, req, rid, events, cid, created),
                                     media_type="text/event-stream")
        out, text = [], []
        async with aclosing(self._events(request, rid, events)) as stream:
            async for ev in stream:
                out.append(ev)
                text.append(ev.text)
        if not out:
            return Response(status_code=499)
        last = out[-1]
        ids_out = [t for ev in out for t in ev.token_ids]
        lps = [lp for ev in out for lp in ev.logprobs]
        choice = p.CompletionChoice(text="".join(text), finish_reason=last.finish_reason,
                                    logprobs=self._completion_logprobs(ids_out, lps) if req.logprobs else None)
        body = p.TextCompletion(id=cid, created=created, model=model, choices=[choice],
                                usage=p.Usage.of(last.prompt_tokens, last.completion_tokens))
        return Response(body.model_dump_json(), media_type="application/json")

    def _completion_logprobs(self, ids: list[int], logprobs: list[float]) -> p.CompletionLogprobs:
        tokens = [self.served.tokenizer.decode([t]) for t in ids]
        offsets = [sum(len(t) for t in tokens[:i]) for i in range(len(tokens))]
        return p.CompletionLogprobs(tokens=tokens, token_logprobs=logprobs, text_offset=offsets)

    async def _completion_stream(self, request: Request, req: p.CompletionRequest, rid: int,
                                 events: asyncio.Queue[StepOutput], cid: str, created: int) -> AsyncIterator[str]:
        usage = (0, 0)
        try:
            async with aclosing(self._events(request, rid, events)) as stream:
                async for ev in stream:
                    usage = (ev.prompt_tokens, ev.completion_tokens)
                    choice = p.CompletionChoice(text=ev.text, finish_reason=ev.finish_reason, logprobs=(
                        self._completion_logprobs(ev.token_ids, ev.logprobs) if req.logprobs else None))
                    yield p.sse(p.TextCompletion(id=cid, created=created, model=self.served.name, choices=[choice]))
        except p.APIError as e:
            yield f"data: {json.dumps(e.body())}\n\n"
        if req.stream_options is not None and req.stream_options.include_usage:
            yield p.sse(p.TextCompletion(id=cid, created=created, model=self.served.name, choices=[],
                                         usage=p.Usage.of(*usage)))
        yield p.SSE_DONE


def serve(served: ServedModel, host: str = "127.0.0.1", port: int = 8000, log_level: str = "info") -> None:
    """Run the server until Ctrl-C (`openk2 serve`): the engine loop on this thread, HTTP on another."""
    import signal
    import threading

    import uvicorn

    def stop(signum, frame):  # uvicorn handles no signals off the main thread: Ctrl-C and SIGTERM end the loop here
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, stop)
    signal.signal(signal.SIGTERM, stop)
    scheduler = served.new_scheduler()
    server = uvicorn.Server(uvicorn.Config(create_app(served, scheduler), host=host, port=port, log_level=log_level))
    http = threading.Thread(target=server.run, name="openk2-http", daemon=True)
    try:
        scheduler.run(ready=http.start)  # see Scheduler.run for why the loop keeps the main thread
    except KeyboardInterrupt:
        pass
    finally:
        signal.signal(signal.SIGINT, signal.SIG_DFL)  # a second Ctrl-C while shutting down exits at once
        server.should_exit = True
        scheduler.shutdown()
        if http.is_alive():
            http.join(10)

