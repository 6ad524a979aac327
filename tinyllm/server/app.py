"""The HTTP side of `tinyllm serve`: aiohttp routes that validate, tokenize, queue, and answer (JSON or SSE).

    POST /v1/chat/completions   messages -> the chat template -> a reply (stream: server-sent events, then [DONE])
    POST /v1/completions        a prompt (text or token ids) continued as it is
    GET  /v1/models             the one model served
    GET  /health                {"status": "ok", ...the scheduler's counts: requests, free KV pages}

The event loop never runs the model: requests go to the Scheduler's thread (scheduler.py), and its events come back
through loop.call_soon_threadsafe into one asyncio queue per request. Chat templates render on one worker thread
(the renderer is a sandboxed process, one request at a time). A client that disconnects cancels its handler
(aiohttp's handler_cancellation), and the handler's `finally` cancels the job: its pages are freed at the
scheduler's next step. Every error, our own and aiohttp's (404, 405, 413), is an OpenAI error object.
"""
import asyncio
import concurrent.futures
import json
import logging

from aiohttp import web

from ..tokenizer import StreamDecoder, TokenizerError
from .protocol import ApiError, TextAssembler, chunk, context_error, new_id, parse_json, parse_request, response
from .scheduler import Busy

log = logging.getLogger("tinyllm.server")
MAX_BODY = 4 * 2**20            # bytes of a request body (aiohttp answers 413 past it)
RETRY_AFTER = 1                 # seconds a client is told to wait when the queue is full
STATE = web.AppKey("state", object)


class State:
    """What the handlers share: the model, its name, the scheduler, the template thread."""

    def __init__(self, llm, name, scheduler):
        self.llm, self.name, self.scheduler = llm, name, scheduler
        self.encoder = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="tinyllm-template")


def make_app(llm, name, scheduler):
    app = web.Application(client_max_size=MAX_BODY, middlewares=[errors_as_json])
    app[STATE] = State(llm, name, scheduler)
    app.router.add_get("/health", health)
    app.router.add_get("/v1/models", models)
    app.router.add_post("/v1/chat/completions", lambda request: generate(request, "chat"))
    app.router.add_post("/v1/completions", lambda request: generate(request, "completion"))
    app.on_cleanup.append(_cleanup)
    return app


async def _cleanup(app):
    app[STATE].encoder.shutdown(wait=False)


@web.middleware
async def errors_as_json(request, handler):
    try:
        return await handler(request)
    except ApiError as e:
        return web.json_response(e.body(), status=e.status, headers=e.headers)
    except web.HTTPException as e:          # aiohttp's own: unknown path, wrong method, body too large
        if e.status < 400:
            raise
        kind = "invalid_request_error" if e.status < 500 else "server_error"
        return web.json_response(ApiError(e.status, f"{e.reason}: {request.method} {request.path}", kind=kind).body(),
                                 status=e.status, headers={k: v for k, v in e.headers.items() if k == "Allow"})
    except (asyncio.CancelledError, ConnectionResetError):
        raise
    except Exception as e:                  # noqa: BLE001 (a bug must not take the server down)
        log.exception("tinyllm serve: internal error")
        return web.json_response(ApiError(500, f"internal error ({type(e).__name__})", kind="server_error").body(),
                                 status=500)


async def health(request):
    return web.json_response({"status": "ok", **request.app[STATE].scheduler.stats()})


async def models(request):
    state = request.app[STATE]
    return web.json_response({"object": "list", "data": [{"id": state.name, "object": "model", "created": 0,
                                                          "owned_by": "tinyllm", "max_model_len": state.llm.max_len}]})


async def generate(request, kind):
    state = request.app[STATE]
    req = parse_request(parse_json(await request.read()), kind, state.name)
    prompt, context = await asyncio.get_running_loop().run_in_executor(state.encoder, encode, state.llm, req)
    error = context_error(len(prompt), req.max_tokens, state.llm.max_len)
    if error is not None:
        raise error
    events = asyncio.Queue()
    loop = asyncio.get_running_loop()

    def on_event(what, value):                  # the scheduler's thread
        try:
            loop.call_soon_threadsafe(events.put_nowait, (what, value))
        except RuntimeError:                    # the loop has closed: the server is stopping
            pass

    max_new = req.max_tokens or state.llm.max_len - len(prompt)
    stop_ids = () if req.ignore_eos else state.llm.stop_ids
    try:
        job = state.scheduler.submit(prompt, max_new, req.sampler, on_event, stop_ids)
    except Busy as e:
        raise ApiError(503, f"the server is busy: {e}; retry after {RETRY_AFTER} s", kind="server_error",
                       code="server_overloaded", headers={"Retry-After": str(RETRY_AFTER)}) from None
    text = TextAssembler(StreamDecoder(state.llm.tokenizer, context_ids=context), req.stop)
    try:
        if req.stream:
            return await stream(request, req, job, events, text, len(prompt), state.name)
        return await whole(req, job, events, text, len(prompt), state.name)
    finally:
        job.cancel()                            # done already (a no-op), or the client left: free its pages


def encode(llm, req):
    """-> (prompt ids, ids the reply continues: for a raw completion, the prompt's end keeps a leading space)."""
    tok = llm.tokenizer
    try:
        if req.kind == "chat":
            return tok.encode_chat(req.messages), ()
        ids = tok.encode(req.prompt) if isinstance(req.prompt, str) else list(req.prompt)
    except (TokenizerError, ValueError) as e:
        raise ApiError(400, str(e).splitlines()[0], param="messages" if req.kind == "chat" else "prompt") from None
    if max(ids) >= llm.config.vocab_size or min(ids) < 0:
        raise ApiError(400, f"prompt holds token ids outside the vocabulary [0, {llm.config.vocab_size})",
                       param="prompt")
    return ids, ids


async def next_tokens(job, events, text):
    """Async generator over (new text, finish reason or None) until the job ends; ApiError 500 on a failed step."""
    while True:
        what, value = await events.get()
        if what == "error":
            raise ApiError(500, f"generation failed: {value}", kind="server_error")
        if what == "done":
            yield text.finish(), value
            return
        piece = text.feed(value)
        if text.stopped:
            job.cancel()                        # a stop string: no more tokens wanted
            yield piece, "stop"
            return
        yield piece, None


async def whole(req, job, events, text, n_prompt, name):
    parts, finish = [], None
    async for piece, finish in next_tokens(job, events, text):
        parts.append(piece)
    return web.json_response(response(req.kind, new_id(req.kind), name, "".join(parts), finish, n_prompt,
                                      len(job.tokens)))


async def stream(request, req, job, events, text, n_prompt, name):
    """Server-sent events: a first chunk (chat: the role), one per piece of text, the finish reason, the usage if
    asked for, then [DONE]."""
    rid = new_id(req.kind)
    resp = web.StreamResponse(headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"})
    await resp.prepare(request)

    async def send(data):
        await resp.write(b"data: " + (data if isinstance(data, bytes) else json.dumps(data).encode()) + b"\n\n")

    if req.kind == "chat":
        await send(chunk(req.kind, rid, name, first=True))
    try:
        async for piece, finish in next_tokens(job, events, text):
            if piece or finish:
                await send(chunk(req.kind, rid, name, piece, finish))
    except ApiError as e:                       # headers are gone: the error travels as an event
        await send(e.body())
    if req.include_usage:
        await send(chunk(req.kind, rid, name, usage_of=(n_prompt, len(job.tokens))))
    await send(b"[DONE]")
    await resp.write_eof()
    return resp


async def run(app, host, port, ready=None):
    """Serve until cancelled; ready(url) once listening (port 0: the port the OS chose)."""
    runner = web.AppRunner(app, handler_cancellation=True, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, host, port)
    try:
        await site.start()
        sock = site._server.sockets[0].getsockname()
        if ready is not None:
            ready(f"http://{host if ':' not in host else f'[{host}]'}:{sock[1]}")
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
