"""The OpenAI-compatible HTTP server (FastAPI on uvicorn) in front of an AsyncEngine.

POST /v1/chat/completions and /v1/completions (streamed as server-sent events or not), GET /v1/models,
/health, /metrics, and the playground page at GET / (static files in playground/). Every bad request gets a
4xx with an OpenAI-style error naming the field; the engine keeps serving everyone else. A streaming client
that disconnects has its request aborted.
"""
import json
import logging
import os
import time

from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, PlainTextResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles

from padengine.errors import InvalidInput
from padengine.serving import openai_api as api
from padengine.serving import openai_format as fmt
from padengine.serving.async_engine import AsyncEngine, QueueFull

logger = logging.getLogger(__name__)
PLAYGROUND = os.path.join(os.path.dirname(__file__), "playground")     # the page at GET / and its assets


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
          code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def build_app(engine: AsyncEngine, model_name: str, max_body_bytes: int = 1 << 20,
              max_preferences: int = api.DEFAULT_MAX_PREFERENCES) -> FastAPI:
    app = FastAPI(title="padengine", docs_url=None, redoc_url=None)
    tokenizer, reward_tokenizer = engine.engine.tokenizer, engine.engine.reward_tokenizer
    max_model_len = engine.engine.max_model_len
    strings = fmt.TokenStrings(tokenizer)          # token texts and bytes for logprobs

    app.mount("/playground", StaticFiles(directory=PLAYGROUND), name="playground")
    app.get("/", include_in_schema=False)(lambda: FileResponse(os.path.join(PLAYGROUND, "index.html")))

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "created": int(time.time()),
                                            "owned_by": "padengine", "max_model_len": max_model_len}]}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(engine.stats.render(), media_type="text/plain; version=0.0.4")

    async def complete(request: Request, chat: bool):
        declared = request.headers.get("content-length", "0")
        if not declared.isdigit() or int(declared) > max_body_bytes:
            return error(413, f"the request body is larger than {max_body_bytes} bytes", "body")
        body = await request.body()
        if len(body) > max_body_bytes:
            return error(413, f"the request body is larger than {max_body_bytes} bytes", "body")
        try:
            payload = json.loads(body)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            return error(400, f"malformed JSON: {e}", "body")
        try:
            req = api.parse(payload, chat, model_name, tokenizer, reward_tokenizer, max_model_len, max_preferences)
        except InvalidInput as e:
            return invalid(e)
        try:
            stream = engine.stream(params=req.params, prompt_token_ids=req.prompt_token_ids,
                                   reward_prompt_token_ids=req.rewards, stop=req.stop)
            first = await anext(stream)      # raises bad input and a full queue before any response
        except InvalidInput as e:
            return invalid(api.engine_error(e, req))
        except QueueFull as e:
            return error(429, f"server busy: {e}; retry later", None, "rate_limit_error", "queue_full")
        if req.stream:
            return StreamingResponse(sse(req, first, stream), media_type="text/event-stream")
        choices = {}
        try:
            out = first
            while out is not None:
                choices.setdefault(out.index, fmt.Choice(out.index)).add(out)
                out = await anext(stream, None)
        finally:
            await stream.aclose()
        return fmt.completion(req, model_name, list(choices.values()), strings)

    def invalid(e: InvalidInput) -> JSONResponse:
        if e.field == "model":
            return error(404, str(e), "model", code="model_not_found")
        return error(400, str(e), e.field)

    async def sse(req, first, stream):
        """One chunk per output with text (or tokens, when logprobs are asked for), the first of each choice
        with the role; a finish chunk per choice; the usage; [DONE] when every choice has finished."""
        rid, tokens, started, offsets = fmt.new_id(req), 0, set(), {}
        try:
            out = first
            while out is not None:
                tokens += len(out.token_ids)
                first_of_choice = out.index not in started
                logprobs = None
                if req.logprobs and out.token_ids:
                    logprobs = fmt.logprobs_object(req, strings, out, offsets.get(out.index, 0))
                    if not req.chat:
                        offsets[out.index] = logprobs["text_offset"][-1] + len(logprobs["tokens"][-1])
                if out.text or first_of_choice or logprobs:
                    started.add(out.index)
                    yield _event(fmt.chunk(req, rid, model_name, out.index, out.text, None, role=first_of_choice,
                                           logprobs=logprobs))
                if out.finished:
                    yield _event(fmt.chunk(req, rid, model_name, out.index, None if req.chat else "",
                                           out.finish_reason))
                out = await anext(stream, None)
            if req.include_usage:
                yield _event(fmt.usage_chunk(req, rid, model_name, tokens))
            yield "data: [DONE]\n\n"
        finally:
            await stream.aclose()       # a disconnected client lands here: its requests are aborted

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def serve(engine: AsyncEngine, model_name: str, host: str, port: int, max_body_bytes: int,
          max_preferences: int = api.DEFAULT_MAX_PREFERENCES) -> None:
    import uvicorn
    uvicorn.run(build_app(engine, model_name, max_body_bytes, max_preferences), host=host, port=port,
                log_level="warning")
