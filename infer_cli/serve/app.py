"""The HTTP side of `infer serve`: an OpenAI-compatible API on the batching engine.

``create_app`` builds the FastAPI app before the model is loaded (so /health can say
"loading"); ``Server.ready`` hands it the loaded engine. Every error a client can see is an
OpenAI-style ``{"error": {...}}`` object with a fitting status; nothing a client sends can stop
the server or reach a Python traceback.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import time
from dataclasses import dataclass, field, replace
from importlib import resources
from typing import Callable

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from pydantic import ValidationError
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from infer_cli.engine.json_schema import JSON_OBJECT_GBNF, UnsupportedSchema, to_gbnf
from infer_cli.engine.sampling import Sampling
from infer_cli.serve import protocol as P
from infer_cli.serve.engine import (STREAM_INTERVAL_S, WORKER_LOST, IsolatedServeEngine, QueueFull,
                                    ServeEngine, ShuttingDown, Unavailable)
from infer_cli.serve.metrics import CONTENT_TYPE_LATEST, Metrics

MAX_BODY = 8 * 1024 * 1024
_ROUTES = ("/", "/health", "/metrics", "/v1/models", "/v1/chat/completions", "/v1/completions")


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code
        self.headers = headers or {}


def _error(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None,
           headers=None) -> JSONResponse:
    return JSONResponse(P.error_body(message, type_, param, code), status_code=status, headers=headers)


@dataclass(frozen=True)
class Defaults:
    """What a request does not say: the command line's settings."""

    sampling: Sampling = Sampling()
    max_tokens: int = -1              # -1: up to the context
    stop: tuple[str, ...] = ()
    system: str | None = None         # a system prompt for chats that bring none


@dataclass
class Settings:
    model_id: str
    api_key: str | None = None
    cors: list[str] = field(default_factory=list)
    max_body: int = MAX_BODY
    queue_limit: int = 64
    stream_interval: float = STREAM_INTERVAL_S  # a stream's text is handed over at most this often
    defaults: Defaults = Defaults()
    log: Callable[[str], None] | None = None   # one line per request


RETRY_AFTER_LOST = "2"  # seconds: the workers are probed at most this far apart while reconnecting


class Server:
    """The app's state: loading, then ok (with an engine) or error; with RPC workers, ok and
    reconnecting (a worker was lost, the engine reloads the model when it is back) in turn."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.status, self.error = "loading", None
        self.engine: ServeEngine | None = None
        self.metrics = Metrics()
        self.model = self.template = None
        self.n_ctx = 0
        self.bos = self.eos = ""

    def ready(self, batch_engine) -> ServeEngine:
        model = batch_engine.model
        # Read once here: these go through the model's shared piece buffer, which the engine
        # thread uses while decoding.
        self.bos, self.eos = model.bos_text, model.eos_text
        self.model, self.template = model, batch_engine.template
        self.n_ctx = batch_engine.context.n_ctx
        if hasattr(batch_engine, "restart"):  # the engine in a child process (RPC workers)
            self.engine = IsolatedServeEngine(batch_engine, queue_limit=self.settings.queue_limit,
                                              metrics=self.metrics, on_state=self._engine_state,
                                              log=self.settings.log)
        else:
            self.engine = ServeEngine(batch_engine, queue_limit=self.settings.queue_limit,
                                      metrics=self.metrics,
                                      stream_interval=self.settings.stream_interval)
        self.metrics.attach(self.engine, self.n_ctx)
        self.status = "ok"  # before the engine runs: a child lost at once says so after this
        self.engine.start()
        return self.engine

    def failed(self, message: str) -> None:
        self.status, self.error = "error", message

    def _engine_state(self, status: str, reason: str | None) -> None:
        self.status, self.error = status, reason

    def require(self) -> ServeEngine:
        if self.status == "loading":
            raise APIError(503, "the model is still loading", "server_error", code="model_loading",
                           headers={"Retry-After": "5"})
        if self.engine is None:
            raise APIError(503, f"the model failed to load: {self.error}", "server_error",
                           code="model_failed")
        if self.status == "reconnecting":
            raise _worker_lost(self.error)
        return self.engine


def _worker_lost(reason: str | None) -> APIError:
    return APIError(503, f"the engine is reconnecting to its RPC workers: {reason}", "server_error",
                    code=WORKER_LOST, headers={"Retry-After": RETRY_AFTER_LOST})


# --- middleware (plain ASGI: they see every request, the streamed ones too) ---------------------

class BodyLimit:
    """Refuse a body over ``cap`` bytes with 413: without keeping it, when Content-Length says
    so, else as soon as the bytes read pass it (a chunked upload has no length to check).

    The rest of the upload is read and dropped first (up to ``DRAIN_CAPS`` times the cap, for at
    most ``DRAIN_S``): the connection closes after a 413, and a socket closed on bytes it has not
    read is reset, which can reach the client before the answer does (2 of 26 chunked 9 MiB
    uploads in one run of stress_serve.py got a reset instead of the 413)."""

    DRAIN_CAPS = 8
    DRAIN_S = 5.0

    def __init__(self, app, cap: int):
        self.app, self.cap = app, cap

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope["headers"])
        if b"content-length" in headers:
            try:
                n = int(headers[b"content-length"])
            except ValueError:
                return await _send_json(send, 400, P.error_body("Content-Length is not a number"))
            if n > self.cap:
                # a client that waits for "100 Continue" (curl does, past 1 MiB) has sent nothing
                waits = headers.get(b"expect", b"").lower() == b"100-continue"
                return await self._too_large(receive, send, 0, not waits)
        body, more = bytearray(), True
        while more:
            msg = await receive()
            if msg["type"] == "http.disconnect":
                return
            body += msg.get("body", b"")
            more = msg.get("more_body", False)
            if len(body) > self.cap:
                return await self._too_large(receive, send, len(body), more)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": bytes(body), "more_body": False}
            return await receive()  # after the body: the disconnect, when it comes

        await self.app(scope, replay, send)

    async def _too_large(self, receive, send, read: int, more: bool):
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.DRAIN_S
        while more and read <= self.DRAIN_CAPS * self.cap:
            try:
                msg = await asyncio.wait_for(receive(), max(0.0, deadline - loop.time()))
            except asyncio.TimeoutError:
                break
            if msg["type"] == "http.disconnect":
                return
            read += len(msg.get("body", b""))
            more = msg.get("more_body", False)
        await _send_json(send, 413, P.error_body(f"the request body is over {self.cap} bytes",
                                                 code="request_too_large"))


async def _send_json(send, status: int, obj: dict) -> None:
    data = json.dumps(obj).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(data)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": data})


class AccessLog:
    """One line per request (method, path, status, tokens, time) and the requests counter."""

    def __init__(self, app, server: Server):
        self.app, self.server = app, server

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        t0 = time.perf_counter()
        note: dict = {}
        scope["infer.note"] = note
        status = [500]

        async def send_status(msg):
            if msg["type"] == "http.response.start":
                status[0] = msg["status"]
            await send(msg)

        try:
            await self.app(scope, receive, send_status)
        finally:
            path = scope.get("path", "")
            self.server.metrics.requests.labels(path if path in _ROUTES else "other", str(status[0])).inc()
            log = self.server.settings.log
            if log is not None:
                tokens = f" {note['tokens']} tokens" if "tokens" in note else ""
                extra = f" ({note['extra']})" if "extra" in note else ""
                log(f"{scope.get('method', '?')} {path} {status[0]}{tokens} "
                    f"{time.perf_counter() - t0:.2f} s{extra}")


# --- the app ------------------------------------------------------------------------------------

def create_app(settings: Settings) -> FastAPI:
    server = Server(settings)
    app = FastAPI(title="infer", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server
    _handlers(app)

    def authorize(request: Request) -> None:
        key = settings.api_key
        if not key:
            return
        given = request.headers.get("x-api-key")
        auth = request.headers.get("authorization", "")
        if given is None and auth[:7].lower() == "bearer ":
            given = auth[7:].strip()
        if not given or not hmac.compare_digest(given.encode(), key.encode()):
            raise APIError(401, "a valid API key is needed (Authorization: Bearer KEY or X-Api-Key)",
                           code="invalid_api_key")

    @app.get("/health")
    async def health():
        if server.status == "ok":
            return {"status": "ok"}
        if server.status == "loading":
            return JSONResponse({"status": "loading"}, status_code=503, headers={"Retry-After": "5"})
        if server.status == "reconnecting":
            return JSONResponse({"status": "reconnecting", "error": server.error}, status_code=503,
                                headers={"Retry-After": RETRY_AFTER_LOST})
        return JSONResponse({"status": "error", "error": server.error}, status_code=500)

    @app.get("/")
    async def page():
        html = resources.files("infer_cli.serve").joinpath("page.html").read_text(encoding="utf-8")
        return HTMLResponse(html, headers={"Cache-Control": "no-cache"})

    @app.get("/metrics")
    async def metrics(request: Request):
        authorize(request)
        return Response(server.metrics.render(), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    async def models(request: Request):
        authorize(request)
        n_ctx = server.n_ctx or None
        entry = {"id": settings.model_id, "object": "model", "created": P.now(), "owned_by": "infer",
                 "context_length": n_ctx, "status": server.status}
        if server.engine is not None:
            entry["meta"] = {"n_ctx": n_ctx, "n_ctx_train": server.model.n_ctx_train,
                             "n_vocab": server.model.n_vocab, "parallel": server.engine.parallel}
        return {"object": "list", "data": [entry]}

    async def generate(request: Request, schema, chat: bool):
        """Both generation routes: parse, check, tokenize, hand to the engine, answer."""
        authorize(request)
        body = await _parse(request, schema)
        engine = server.require()
        top = _check_options(body, chat)
        if chat:
            prompts = [await run_in_threadpool(_chat_tokens, server, body)]
        else:
            prompts = await run_in_threadpool(_completion_tokens, server, body)
        grammar = _grammar(body.response_format)
        max_tokens = (body.max_completion_tokens or body.max_tokens) if chat else body.max_tokens
        reqs = await run_in_threadpool(_requests, server, body, prompts, grammar, max_tokens, top)
        return await _answer(request, server, engine, body, reqs, chat=chat)

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        return await generate(request, P.ChatCompletionRequest, True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await generate(request, P.CompletionRequest, False)

    app.add_middleware(BodyLimit, cap=settings.max_body)
    if settings.cors:
        from starlette.middleware.cors import CORSMiddleware

        app.add_middleware(CORSMiddleware, allow_origins=settings.cors, allow_methods=["*"],
                           allow_headers=["*"], max_age=600)
    app.add_middleware(AccessLog, server=server)
    return app


def _handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(request, e: APIError):
        return _error(e.status, e.message, e.type, e.param, e.code, e.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(request, e: RequestValidationError):
        return _validation_response(e.errors())

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request, e: StarletteHTTPException):
        if e.status_code == 404:
            return _error(404, f"no route {request.method} {request.url.path}", code="not_found")
        if e.status_code == 405:
            return _error(405, f"{request.method} is not allowed on {request.url.path}",
                          code="method_not_allowed")
        return _error(e.status_code, str(e.detail), headers=getattr(e, "headers", None))

    @app.exception_handler(Exception)
    async def crashed(request, e: Exception):
        return _error(500, f"internal error ({type(e).__name__})", "server_error")


def _validation_response(errors) -> JSONResponse:
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    param = ".".join(loc) or None
    msg = first.get("msg", "invalid request")
    return _error(400, f"{param}: {msg}" if param else msg, param=param, code="invalid_value")


async def _parse(request: Request, model):
    raw = await request.body()
    try:
        obj = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as e:
        raise APIError(400, f"the body is not valid JSON ({getattr(e, 'msg', e)})",
                       code="invalid_json") from None
    if not isinstance(obj, dict):
        raise APIError(400, "the body must be a JSON object", code="invalid_json")
    try:
        return model.model_validate(obj)
    except ValidationError as e:
        errors = e.errors(include_url=False)
        resp = _validation_response(errors)
        detail = json.loads(resp.body)["error"]
        raise APIError(400, detail["message"], param=detail["param"], code="invalid_value") from None


def _check_options(body, chat: bool) -> int | None:
    """Refuse what this server cannot honour (a 400 naming it, never a silent ignore); return
    how many alternatives to report per token's log-probability, or None for none."""
    if body.logit_bias:
        raise APIError(400, "logit_bias is not supported by this server", param="logit_bias")
    if getattr(body, "best_of", None) not in (None, 1):
        raise APIError(400, "best_of is not supported by this server", param="best_of")
    if chat:
        if body.tools:
            raise APIError(400, "tools are not supported by this server", param="tools")
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs")
        if not isinstance(body.logprobs, (bool, type(None))):
            raise APIError(400, "logprobs must be true or false", param="logprobs")
        return (body.top_logprobs or 0) if body.logprobs else None
    if body.suffix:
        raise APIError(400, "suffix (fill-in-the-middle) is not supported", param="suffix")
    if body.logprobs is None or body.logprobs is False:
        return None
    if isinstance(body.logprobs, bool) or not isinstance(body.logprobs, int) \
            or not 0 <= body.logprobs <= P.MAX_COMPLETION_LOGPROBS:
        raise APIError(400, f"logprobs must be an integer 0..{P.MAX_COMPLETION_LOGPROBS}",
                       param="logprobs")
    return body.logprobs


# --- prompts, grammars, requests (run in a worker thread: tokenizing a long prompt takes time) ---

def _chat_tokens(server: Server, body: P.ChatCompletionRequest) -> list[int]:
    from infer_cli.engine.chat import render
    from infer_cli.engine.runner import prompt_tokens
    from infer_cli.errors import TemplateFailed

    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                for m in body.messages]
    system = server.settings.defaults.system
    if system and not any(m["role"] == "system" for m in messages):
        messages.insert(0, {"role": "system", "content": system})
    if server.template is None:  # no chat template: plain completion of the joined text
        return prompt_tokens(server.model, "".join(m["content"] for m in messages), templated=False)
    try:
        text = render(server.template, messages, bos=server.bos, eos=server.eos)
    except TemplateFailed as e:
        raise APIError(400, str(e), param="messages") from None
    return prompt_tokens(server.model, text, templated=True)


def _completion_tokens(server: Server, body: P.CompletionRequest) -> list[list[int]]:
    from infer_cli.engine.runner import prompt_tokens

    p = body.prompt
    if isinstance(p, str):
        texts = [p]
    elif p and all(isinstance(x, int) for x in p):
        texts = [list(p)]
    else:
        texts = list(p)
    if not texts:
        raise APIError(400, "prompt is empty", param="prompt")
    out = []
    n_vocab = server.model.n_vocab
    for t in texts:
        if isinstance(t, str):
            out.append(prompt_tokens(server.model, t, templated=False))
        else:
            if any(not 0 <= x < n_vocab for x in t):
                raise APIError(400, f"prompt holds a token id outside 0..{n_vocab - 1}", param="prompt")
            out.append(list(t))
    return out


def _grammar(fmt) -> str | None:
    """The GBNF grammar for a response_format, or None for free text."""
    if fmt is None or fmt.type == "text":
        return None
    schema = fmt.schema_
    if fmt.type == "json_schema":
        if fmt.json_schema is None or fmt.json_schema.schema_ is None:
            raise APIError(400, "response_format json_schema needs json_schema.schema",
                           param="response_format.json_schema.schema")
        schema = fmt.json_schema.schema_
    if schema is None:
        return JSON_OBJECT_GBNF  # json_object: any JSON object
    try:
        return to_gbnf(schema)
    except UnsupportedSchema as e:  # the text must always validate: refuse what is not enforced
        raise APIError(400, f"the JSON schema uses what this server cannot enforce: {e}",
                       param="response_format") from None


def _requests(server: Server, body, prompts: list[list[int]], grammar: str | None, max_tokens,
              logprobs: int | None = None):
    """The engine requests of one HTTP request: ``n`` per prompt, after every check."""
    from infer_cli.engine.generate import Request as EngineRequest
    from infer_cli.engine.sampling import Sampler

    d = server.settings.defaults
    n_ctx = server.n_ctx
    s = d.sampling
    given = {k: getattr(body, k) for k in ("temperature", "top_p", "top_k", "min_p",
                                           "repeat_penalty", "repeat_last_n", "presence_penalty",
                                           "frequency_penalty", "seed")
             if getattr(body, k) is not None}
    s = replace(s, **given, grammar=grammar)
    if grammar is not None:
        try:  # built once here so that a grammar llama.cpp refuses is this request's 400
            Sampler(server.model, s).close()
        except ValueError as e:
            raise APIError(400, str(e), param="response_format") from None
    stop = body.stops() or d.stop
    if any(not x for x in stop):
        raise APIError(400, "a stop string is empty", param="stop")
    reqs = []
    for tokens in prompts:
        if not tokens:
            raise APIError(400, "the prompt is empty", param="prompt")
        if len(tokens) >= n_ctx:
            raise APIError(400, f"the prompt is {len(tokens)} tokens but the context holds {n_ctx}",
                           param="messages" if hasattr(body, "messages") else "prompt",
                           code="context_length_exceeded")
        room = n_ctx - len(tokens)
        want = max_tokens or (d.max_tokens if d.max_tokens > 0 else room)
        for i in range(body.n):
            si = s if i == 0 or s.seed < 0 else replace(s, seed=s.seed + i)
            reqs.append(EngineRequest(tuple(tokens), si, min(want, room), stop, body.ignore_eos,
                                      logprobs, body.cache_prompt))
    return reqs


# --- answering ---------------------------------------------------------------------------------

async def _answer(request: Request, server: Server, engine: ServeEngine, body, reqs, *, chat: bool):
    sink: asyncio.Queue = asyncio.Queue()
    try:
        handles = engine.submit(reqs, sink, asyncio.get_running_loop())
    except QueueFull:
        raise APIError(503, f"the server is busy ({engine.parallel} running, the wait queue is "
                       "full); try again shortly", "server_error", code="queue_full",
                       headers={"Retry-After": "1"}) from None
    except ShuttingDown:
        raise APIError(503, "the server is shutting down", "server_error", code="shutting_down") from None
    except Unavailable as e:
        raise _worker_lost(e.reason) from None
    note = request.scope.get("infer.note", {})
    meta = {"id": P.new_id("chatcmpl" if chat else "cmpl"), "created": P.now(),
            "model": server.settings.model_id}
    prompts_text = None
    if not chat and body.echo:
        prompts_text = [body.prompt] if isinstance(body.prompt, str) else (
            body.prompt if all(isinstance(x, str) for x in body.prompt) else None)
    if body.stream:
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        gen = _stream(engine, handles, sink, meta, chat, include_usage, note, prompts_text, body.n)
        return StreamingResponse(gen, media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
    results = await _collect(request, engine, handles, sink)
    note["tokens"] = _token_note(results)
    failed = [r for r in results if r["finish_reason"] == "error"]
    if failed:
        if failed[0].get("code") == WORKER_LOST:
            raise _worker_lost(failed[0]["error"])
        raise APIError(500, f"generation failed: {failed[0]['error']}", "server_error")
    choices = []
    for i, r in enumerate(results):
        fr = P.finish_reason(r["finish_reason"])
        lps = r["logprobs"]
        if chat:
            choices.append({"index": i, "message": {"role": "assistant", "content": r["text"]},
                            "logprobs": None if lps is None else P.chat_logprobs(lps),
                            "finish_reason": fr})
        else:
            head = prompts_text[i // body.n] if prompts_text is not None else ""
            choices.append({"index": i, "text": head + r["text"], "finish_reason": fr,
                            "logprobs": None if lps is None else P.completion_logprobs(lps, len(head))})
    return {**meta, "object": "chat.completion" if chat else "text_completion",
            "system_fingerprint": "infer", "choices": choices, "usage": P.usage(results),
            "timings": P.timings(results[0])}


def _token_note(results) -> str:
    return f"{sum(r['n_prompt'] for r in results if r)}+{sum(r['n_generated'] for r in results if r)}"


async def _collect(request: Request, engine: ServeEngine, handles, sink) -> list[dict]:
    """Every choice's result. A client that hangs up cancels its sequences at once: a watcher
    waits for the disconnect (it does not depend on tokens flowing, so a long prompt being
    computed is cancelled as promptly as a long answer)."""
    results: list = [None] * len(handles)
    left = len(handles)

    async def watch() -> None:
        while (await request.receive())["type"] != "http.disconnect":
            pass
        engine.cancel(handles)
        sink.put_nowait(None)

    watcher = asyncio.create_task(watch())
    try:
        while left:
            item = await sink.get()
            if item is None:
                raise APIError(499, "the client closed the connection")
            idx, _text, res, _lps = item
            if res is not None:
                results[idx] = res
                left -= 1
    finally:
        watcher.cancel()
        if left:
            engine.cancel(handles)
    return results


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


async def _stream(engine, handles, sink, meta, chat: bool, include_usage: bool, note: dict,
                  prompts_text, n: int):
    """Server-sent events in OpenAI's chunk shapes. Closing the generator (the client left)
    cancels the sequences still running."""
    obj = "chat.completion.chunk" if chat else "text_completion"
    results: list = [None] * len(handles)
    left = len(handles)

    offsets = [len(prompts_text[h.index // n]) if prompts_text is not None else 0 for h in handles]

    def chunk(idx: int, piece: str | None, finish: str | None = None, extra=None,
              lps: list | None = None) -> dict:
        if chat:
            choice = {"index": idx, "delta": {} if piece is None else {"content": piece},
                      "logprobs": P.chat_logprobs(lps) if lps else None, "finish_reason": finish}
        else:
            logprobs = None
            if lps:
                logprobs = P.completion_logprobs(lps, offsets[idx])
                offsets[idx] += sum(len(e["token"]) for e in lps)
            choice = {"index": idx, "text": piece or "", "logprobs": logprobs,
                      "finish_reason": finish}
        out = {**meta, "object": obj, "system_fingerprint": "infer", "choices": [choice]}
        if extra:
            out.update(extra)
        return out

    try:
        for h in handles:
            if chat:
                first = chunk(h.index, "")
                first["choices"][0]["delta"] = {"role": "assistant", "content": ""}
                yield _sse(first)
            elif prompts_text is not None:
                yield _sse(chunk(h.index, prompts_text[h.index // n]))
        while left:
            idx, text, res, lps = await sink.get()
            if res is None:
                yield _sse(chunk(idx, text, lps=lps))
                continue
            results[idx] = res
            left -= 1
            if res["finish_reason"] == "error":
                yield _sse(P.error_body(f"generation failed: {res['error']}", "server_error",
                                        code=res.get("code")))
                continue
            yield _sse(chunk(idx, None, P.finish_reason(res["finish_reason"]),
                             {"timings": P.timings(res)}, lps))
        done = [r for r in results if r is not None]
        note["tokens"] = _token_note(done)
        if include_usage and done:
            yield _sse({**meta, "object": obj, "system_fingerprint": "infer", "choices": [],
                        "usage": P.usage(done), "timings": P.timings(done[0])})
        yield "data: [DONE]\n\n"
    finally:
        if left:
            engine.cancel(handles)
            note["extra"] = "cancelled: the client left"
