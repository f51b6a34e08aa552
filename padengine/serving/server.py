"""The OpenAI-compatible HTTP server (FastAPI on uvicorn) in front of an AsyncEngine.

POST /v1/chat/completions and /v1/completions (streamed as server-sent events or not), GET /v1/models,
/health and /metrics. Every bad request gets a 4xx with an OpenAI-style error naming the field; the
engine keeps serving everyone else. A streaming client that disconnects has its request aborted.
"""
import json
import logging
import time

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse

from padengine.errors import InvalidInput
from padengine.serving import openai_api as api
from padengine.serving.async_engine import AsyncEngine, QueueFull

logger = logging.getLogger(__name__)


def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
          code: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status)


def build_app(engine: AsyncEngine, model_name: str, max_body_bytes: int = 1 << 20) -> FastAPI:
    app = FastAPI(title="padengine", docs_url=None, redoc_url=None)
    tokenizer, reward_tokenizer = engine.engine.tokenizer, engine.engine.reward_tokenizer
    max_model_len = engine.engine.max_model_len

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
            req = api.parse(payload, chat, model_name, tokenizer, reward_tokenizer, max_model_len)
            stream = engine.generate(params=req.params, prompt_token_ids=req.prompt_token_ids,
                                     reward_prompt_token_ids=req.rewards, stop=req.stop)
            first = await anext(stream)      # raises bad input and a full queue before any response
        except InvalidInput as e:
            if e.field == "model":
                return error(404, str(e), "model", code="model_not_found")
            param = api.engine_field(e, chat)
            return error(400, f"{param}: {str(e).split(': ', 1)[-1]}", param)
        except QueueFull as e:
            return error(429, f"server busy: {e}; retry later", None, "rate_limit_error", "queue_full")
        if req.stream:
            return StreamingResponse(sse(req, first, stream), media_type="text/event-stream")
        text, tokens, out = first.text, len(first.token_ids), first
        async for out in stream:
            text, tokens = text + out.text, tokens + len(out.token_ids)
        return api.completion(req, model_name, text, out.finish_reason, tokens)

    async def sse(req, first, stream):
        rid, tokens = api.new_id(req), 0
        try:
            out, role = first, True
            while True:
                tokens += len(out.token_ids)
                if out.text or role:
                    yield _event(api.chunk(req, rid, model_name, out.text, None, role=role))
                    role = False
                if out.finished:
                    yield _event(api.chunk(req, rid, model_name, None if req.chat else "", out.finish_reason))
                    if req.include_usage:
                        yield _event(api.chunk(req, rid, model_name, None, None, usage_=api.usage(req, tokens)))
                    yield "data: [DONE]\n\n"
                    return
                out = await anext(stream)
        finally:
            await stream.aclose()       # a disconnected client lands here: the request is aborted

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await complete(request, chat=True)

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await complete(request, chat=False)

    return app


def _event(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"


def serve(engine: AsyncEngine, model_name: str, host: str, port: int, max_body_bytes: int) -> None:
    import uvicorn
    uvicorn.run(build_app(engine, model_name, max_body_bytes), host=host, port=port, log_level="warning")
