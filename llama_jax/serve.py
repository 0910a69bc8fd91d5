"""An OpenAI-compatible HTTP server: ``python -m llama_jax.serve`` (console script ``llama-jax-serve``).

    python -m llama_jax.serve                                   # SmolLM2-135M-Instruct on http://127.0.0.1:8000
    python -m llama_jax.serve --checkpoint=ckpt/ --port=8000 --max_batch=16 --max_length=4096 --quant=int8

Endpoints (the OpenAI shapes, field names and error JSON; https://platform.openai.com/docs/api-reference):

* ``GET /v1/models``, ``GET /health`` (status and the scheduler's rows / queue / counters).
* ``POST /v1/completions``: ``prompt`` (a string, a list of token ids, or a list of either: one choice each),
  ``max_tokens`` (default 16; 0 with ``echo`` only scores the prompt), ``temperature`` (default 1; 0 = greedy),
  ``top_p``, ``top_k`` / ``min_p`` (extensions), ``seed``, ``stop`` (string or up to 4), ``logprobs`` (top-k
  alternatives, 0..5), ``echo`` (the prompt is returned before the completion; with ``logprobs`` its tokens'
  log-probabilities too, the first one null: how harnesses score multiple choice), ``stream``, ``usage``.
* ``POST /v1/chat/completions``: ``messages`` (system, user, assistant with ``tool_calls``, tool results),
  ``tools`` (function schemas, rendered into the Llama 3.1 custom-tool system prompt by
  :func:`llama_jax.chat.system_preamble`), ``tool_choice`` ("auto" or "none"), the model's tool calls parsed by
  :func:`llama_jax.chat.parse_output` and returned as ``tool_calls`` with ``finish_reason: "tool_calls"``,
  ``logprobs``/``top_logprobs``, ``stream`` (server-sent events ending in ``data: [DONE]``;
  ``stream_options.include_usage``), ``usage``.

Errors are ``{"error": {"message", "type", "param", "code"}}``: malformed JSON or a bad field 400 naming the field,
a prompt longer than the context 400 naming the limit (code ``context_length_exceeded``), an unknown model 404,
a full queue 429 and shutting down 503 (both with ``Retry-After``).

Text a client sends is encoded as plain text: special-token text in a prompt or message (``<|eot_id|>``,
``<|im_end|>``) never becomes a special token. Token-id prompts are checked against the vocabulary.

The JAX engine runs in the :class:`llama_jax.scheduler.Scheduler`'s worker thread; the ASGI event loop only
hands requests over and awaits their events, so it never waits on the device. A client that disconnects from a
stream (or before a non-streamed answer) frees its row at once. SIGTERM/SIGINT: uvicorn stops accepting
connections and lets open requests finish for ``--shutdown_timeout`` seconds; then the scheduler fails what is
left and stops.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import time
import uuid
from typing import Any

from fastapi import Request as HttpRequest

from llama_jax.scheduler import QueueFull, Request, SamplingParams, Scheduler, ShuttingDown

#: Largest ``logprobs`` of /v1/completions (OpenAI's limit) and ``top_logprobs`` of chat.
MAX_COMPLETION_LOGPROBS = 5
MAX_CHAT_TOP_LOGPROBS = 20
#: Seconds a client is told to wait (Retry-After) when the queue is full or the server shuts down.
RETRY_AFTER_S = 1


class ApiError(Exception):
    """An OpenAI error response: HTTP ``status``, ``message``, ``type``, ``param`` (the field), ``code``."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        type: str = "invalid_request_error",
        code: str | None = None,
        headers: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.param, self.type, self.code = status, message, param, type, code
        self.headers = headers or {}

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


# ---------------------------------------------------------------------------------------------------- fields
_MISSING = object()


def _field(body: dict, name: str, kind: str, default: Any = _MISSING, *, lo=None, hi=None, lo_open=False):
    """``body[name]`` checked to be of ``kind`` ("int", "number", "bool", "str", "list", "dict") and in range.
    Absent or null gives ``default`` (ApiError 400 when there is none)."""
    v = body.get(name)
    if v is None:
        if default is _MISSING:
            raise ApiError(400, f"'{name}' is a required property", name)
        return default
    ok = {
        "int": isinstance(v, int) and not isinstance(v, bool),
        "number": isinstance(v, (int, float)) and not isinstance(v, bool),
        "bool": isinstance(v, bool),
        "str": isinstance(v, str),
        "list": isinstance(v, list),
        "dict": isinstance(v, dict),
    }[kind]
    if not ok:
        names = {
            "int": "an integer",
            "number": "a number",
            "bool": "a boolean",
            "str": "a string",
            "list": "an array",
            "dict": "an object",
        }
        raise ApiError(400, f"'{name}' must be {names[kind]}, got {json.dumps(v)[:80]}", name)
    if kind in ("int", "number"):
        if v != v or v in (float("inf"), float("-inf")):
            raise ApiError(400, f"'{name}' must be finite", name)
        if lo is not None and (v <= lo if lo_open else v < lo):
            raise ApiError(400, f"'{name}' must be {'>' if lo_open else '>='} {lo}, got {v}", name)
        if hi is not None and v > hi:
            raise ApiError(400, f"'{name}' must be <= {hi}, got {v}", name)
    return v


def _stop_strings(body: dict) -> tuple[str, ...]:
    stop = body.get("stop")
    if stop is None:
        return ()
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or len(stop) > 4 or not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "'stop' must be a non-empty string or a list of at most 4 non-empty strings", "stop")
    return tuple(stop)


def _unsupported(body: dict) -> None:
    """Refuses settings this server does not implement rather than ignoring them."""
    n = _field(body, "n", "int", 1)
    if n != 1:
        raise ApiError(400, f"'n' must be 1 (only one choice per prompt is supported), got {n}", "n")
    for name in ("presence_penalty", "frequency_penalty"):
        if _field(body, name, "number", 0) != 0:
            raise ApiError(400, f"'{name}' is not supported (must be 0)", name)
    if body.get("logit_bias"):
        raise ApiError(400, "'logit_bias' is not supported", "logit_bias")
    if _field(body, "best_of", "int", 1) != 1:
        raise ApiError(400, "'best_of' must be 1", "best_of")
    if body.get("suffix"):
        raise ApiError(400, "'suffix' is not supported", "suffix")


def _sampling(body: dict, max_tokens: int, stop, logprobs, echo=False) -> SamplingParams:
    return SamplingParams(
        max_tokens=max_tokens,
        temperature=float(_field(body, "temperature", "number", 1.0, lo=0, hi=2)),
        top_p=float(_field(body, "top_p", "number", 1.0, lo=0, hi=1, lo_open=True)),
        top_k=_field(body, "top_k", "int", 0, lo=0),
        min_p=float(_field(body, "min_p", "number", 0.0, lo=0, hi=1)),
        stop=stop,
        logprobs=logprobs,
        echo=echo,
        seed=_field(body, "seed", "int", None),
    )


# ---------------------------------------------------------------------------------------------------- chat
def chat_prompt(fmt, messages: list, tools: list | None) -> list[int]:
    """Token ids of an OpenAI ``messages`` list (+ ``tools``) in the model's chat format.

    Llama 3 vocabularies (:class:`llama_jax.chat.ChatFormat`): the tool definitions go into the system message's
    Llama 3.1 preamble (:func:`llama_jax.chat.system_message`), assistant ``tool_calls`` are rendered as the
    model writes them and tool results become ``ipython`` messages. Other vocabularies (a Jinja chat template):
    the same preamble text is put at the start of the system message and assistant tool calls are written as
    their JSON text, so any template renders them. Raises ValueError naming ``messages[i]``.
    """
    from llama_jax import chat

    msgs = [dict(m) if isinstance(m, dict) else m for m in messages]
    for i, m in enumerate(msgs):
        if not isinstance(m, dict):
            raise ValueError(f"messages[{i}]: must be an object with 'role' and 'content'")
        if m.get("role") == "developer":  # newer OpenAI name of the system role
            m["role"] = "system"
        if m.get("role") == "function":
            raise ValueError(f"messages[{i}]: role 'function' is deprecated; use 'tool'")
    llama3 = isinstance(fmt, chat.ChatFormat)
    if tools:
        has_system = bool(msgs) and msgs[0].get("role") == "system"
        text = chat._content_text(msgs[0], "messages[0]") if has_system else ""
        if llama3:
            system = chat.system_message(text, tools=tools, builtin_tools=())
        else:
            pre = chat.system_preamble(tools=tools, builtin_tools=())
            system = {"role": "system", "content": pre + ("\n" + text if text else "")}
        msgs = [system] + (msgs[1:] if has_system else msgs)
    if llama3:
        return fmt.encode_dialog_prompt(msgs)
    out = []
    for i, m in enumerate(msgs):
        calls = chat._tool_calls_of(m, f"messages[{i}]") if m.get("tool_calls") else []
        if calls:
            if m.get("role") != "assistant":
                raise ValueError(f"messages[{i}]: only assistant messages carry 'tool_calls'")
            text = chat._content_text(m, f"messages[{i}]")
            rendered = "\n".join(chat.render_tool_call(c) for c in calls)
            m = {"role": "assistant", "content": (text + "\n" if text else "") + rendered}
        else:
            m = {"role": m.get("role"), "content": m.get("content")}
        out.append(m)
    return fmt.encode_dialog_prompt(out)


def _tool_call_json(call) -> dict:
    return {
        "id": "call_" + uuid.uuid4().hex[:24],
        "type": "function",
        "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)},
    }


# ---------------------------------------------------------------------------------------------------- the app
class _Sink:
    """Hands a request's events from the scheduler thread to the event loop (never blocks the scheduler)."""

    def __init__(self, loop: asyncio.AbstractEventLoop, queue: asyncio.Queue, index: int):
        self.loop, self.queue, self.index = loop, queue, index

    def __call__(self, event) -> None:
        self.loop.call_soon_threadsafe(self.queue.put_nowait, (self.index, event))


def create_app(scheduler: Scheduler, tokenizer, model_name: str, *, shutdown_timeout: float = 30.0):
    """The FastAPI application serving ``scheduler`` under the model id ``model_name``.

    The scheduler is started on startup and shut down (``shutdown_timeout`` seconds for running requests) on
    shutdown.
    """
    from contextlib import asynccontextmanager

    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    from llama_jax import chat

    fmt = None
    try:
        fmt = chat.chat_format_for(tokenizer)
    except ValueError:
        pass  # no chat format: /v1/chat/completions answers 400
    stop_ids = set(scheduler.stop_ids)
    created = int(time.time())
    max_length = scheduler.max_length

    @asynccontextmanager
    async def lifespan(app):
        scheduler.start()
        yield
        await asyncio.to_thread(scheduler.shutdown, shutdown_timeout)

    app = FastAPI(title="llama-jax", lifespan=lifespan)

    def error_response(e: ApiError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status, headers=e.headers)

    @app.exception_handler(ApiError)
    async def _api_error(request, e: ApiError):
        return error_response(e)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, e):
        kind = "not_found_error" if e.status_code == 404 else "invalid_request_error"
        return error_response(ApiError(e.status_code, f"{request.method} {request.url.path}: {e.detail}", type=kind))

    @app.exception_handler(RequestValidationError)
    async def _validation_error(request, e):
        return error_response(ApiError(400, str(e)))

    @app.exception_handler(Exception)
    async def _internal_error(request, e):
        return error_response(ApiError(500, f"internal server error: {type(e).__name__}", type="server_error"))

    async def read_body(request: HttpRequest) -> dict:
        raw = await request.body()
        try:
            body = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ApiError(400, f"We could not parse the JSON body of your request ({e})") from None
        if not isinstance(body, dict):
            raise ApiError(400, "the request body must be a JSON object")
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise ApiError(400, "'model' must be a string", "model")
        if model is not None and model != model_name:
            raise ApiError(
                404,
                f"The model `{model}` does not exist (this server serves `{model_name}`)",
                "model",
                type="not_found_error",
                code="model_not_found",
            )
        return body

    def check_length(prompt: list[int], max_tokens: int, param: str) -> None:
        need = len(prompt) + max_tokens
        if need > max_length or len(prompt) >= max_length:
            raise ApiError(
                400,
                f"This model's maximum context length is {max_length} tokens. However, you "
                f"requested {need} tokens ({len(prompt)} in the {param}, {max_tokens} in the "
                "completion). Please reduce the length of the prompt or max_tokens.",
                param,
                code="context_length_exceeded",
            )

    def submit(prompts: list[list[int]], params: SamplingParams, param: str):
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue = asyncio.Queue()
        reqs = []
        try:
            for i, p in enumerate(prompts):
                try:
                    scheduler.check(p, params)
                except ValueError as e:
                    raise ApiError(400, str(e), "max_tokens" if "max_tokens" in str(e) else param) from None
                reqs.append(scheduler.submit(Request(p, params, _Sink(loop, queue, i))))
        except QueueFull as e:
            for r in reqs:
                scheduler.cancel(r)
            raise ApiError(
                429,
                f"too many requests: {e}; retry later",
                type="rate_limit_error",
                code="queue_full",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        except ShuttingDown as e:
            for r in reqs:
                scheduler.cancel(r)
            raise ApiError(
                503,
                f"{e}; retry later",
                type="server_error",
                code="unavailable",
                headers={"Retry-After": str(RETRY_AFTER_S)},
            ) from None
        return queue, reqs

    async def results(http: HttpRequest, queue: asyncio.Queue, reqs: list[Request]) -> list:
        """Waits for every request's result; cancels them all if the client goes away."""
        out: list = [None] * len(reqs)
        try:
            while any(r is None for r in out):
                try:
                    i, ev = await asyncio.wait_for(queue.get(), timeout=0.5)
                except TimeoutError:
                    if await http.is_disconnected():
                        raise asyncio.CancelledError() from None
                    continue
                if ev.kind == "error":
                    raise ApiError(503, ev.error, type="server_error", headers={"Retry-After": str(RETRY_AFTER_S)})
                if ev.kind == "done":
                    out[i] = ev.result
        finally:
            for r in reqs:
                if not r.finished:
                    scheduler.cancel(r)
        return out

    def sse(obj) -> str:
        return "data: " + json.dumps(obj, ensure_ascii=False) + "\n\n"

    def usage(results) -> dict:
        p = sum(len(r.prompt_tokens) for r in results)
        c = sum(len(r.tokens) for r in results)
        return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": p + c}

    def piece(i: int) -> str:
        return tokenizer.decode([int(i)])

    # ------------------------------------------------------------------------------------------ endpoints
    @app.get("/health")
    async def health():
        body = {
            "status": "ok" if scheduler.alive else "unavailable",
            "model": model_name,
            "max_length": max_length,
            **scheduler.stats(),
        }
        return JSONResponse(body, status_code=200 if scheduler.alive else 503)

    def model_card():
        return {
            "id": model_name,
            "object": "model",
            "created": created,
            "owned_by": "llama-jax",
            "max_model_len": max_length,
        }

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str):
        if model_id != model_name:
            raise ApiError(
                404, f"The model `{model_id}` does not exist", "model", type="not_found_error", code="model_not_found"
            )
        return model_card()

    # vLLM's tokenizer endpoints (what lm-eval's tokenizer_backend=remote reads). Text is encoded as plain text:
    # special-token text stays text; add_special_tokens adds BOS (default true, as vLLM).
    @app.get("/tokenizer_info")
    async def tokenizer_info():
        def text(i):
            return None if i is None else tokenizer.decode([i])

        return {
            "tokenizer_class": f"llama_jax.Tokenizer({tokenizer.kind})",
            "bos_token": text(tokenizer.bos_id),
            "eos_token": text(tokenizer.eos_id),
            "pad_token": None,
            "chat_template": tokenizer.chat_template,
            "model_max_length": max_length,
        }

    @app.post("/tokenize")
    async def tokenize(http: HttpRequest):
        body = await read_body(http)
        prompt = _field(body, "prompt", "str")
        bos = _field(body, "add_special_tokens", "bool", True) and tokenizer.bos_id is not None
        ids = tokenizer.encode(prompt, bos=bos)
        return {"tokens": ids, "count": len(ids), "max_model_len": max_length}

    @app.post("/detokenize")
    async def detokenize(http: HttpRequest):
        body = await read_body(http)
        ids = _field(body, "tokens", "list")
        if not all(isinstance(t, int) and not isinstance(t, bool) and 0 <= t < tokenizer.vocab_size for t in ids):
            raise ApiError(400, f"'tokens' must be token ids in [0, {tokenizer.vocab_size})", "tokens")
        return {"prompt": tokenizer.decode(ids)}

    @app.post("/v1/completions")
    async def completions(http: HttpRequest):
        body = await read_body(http)
        _unsupported(body)
        prompts = _completion_prompts(body, tokenizer)
        max_tokens = _field(body, "max_tokens", "int", 16, lo=0)
        logprobs = _field(body, "logprobs", "int", None, lo=0, hi=MAX_COMPLETION_LOGPROBS)
        echo = _field(body, "echo", "bool", False)
        stream = _field(body, "stream", "bool", False)
        include_usage = _stream_usage(body)
        if max_tokens == 0 and not echo:
            raise ApiError(400, "'max_tokens' must be >= 1 (0 only with echo)", "max_tokens")
        if max_tokens == 0 and stream:
            raise ApiError(400, "'max_tokens' must be >= 1 with stream", "max_tokens")
        params = _sampling(body, max_tokens, _stop_strings(body), logprobs, echo)
        for p in prompts:
            check_length(p, max_tokens, "prompt")
        queue, reqs = submit(prompts, params, "prompt")
        cid, model_id = "cmpl-" + uuid.uuid4().hex, model_name

        def choice_logprobs(r, text_start: int) -> dict | None:
            if logprobs is None:
                return None
            toks = list(r.tokens)  # a final stop id included, as OpenAI does (harnesses slice [:-1])
            ids, lps, tops = [], [], []
            if echo:
                ids += r.prompt_tokens
                lps += r.prompt_logprobs
                tops += r.top_logprobs[: len(r.prompt_tokens)] if r.top_logprobs else [None] * len(r.prompt_tokens)
            gen_tops = r.top_logprobs[len(r.prompt_tokens) if echo else 0 :] if r.top_logprobs else None
            ids += toks
            lps += r.logprobs[: len(toks)]
            tops += gen_tops[: len(toks)] if gen_tops else [{}] * len(toks)
            strs, offsets, pos = [], [], text_start
            for t in ids:
                s = piece(t)
                strs.append(s)
                offsets.append(pos)
                pos += len(s)
            top_dicts = [None if t is None else {piece(i): v for i, v in t} if isinstance(t, list) else t for t in tops]
            return {"tokens": strs, "token_logprobs": lps, "top_logprobs": top_dicts, "text_offset": offsets}

        def prompt_text(i: int) -> str:
            return tokenizer.decode(prompts[i])

        if not stream:
            res = await results(http, queue, reqs)
            choices = []
            for i, r in enumerate(res):
                prefix = prompt_text(i) if echo else ""
                choices.append(
                    {
                        "index": i,
                        "text": prefix + r.text,
                        "logprobs": choice_logprobs(r, 0),
                        "finish_reason": r.finish_reason,
                    }
                )
            return {
                "id": cid,
                "object": "text_completion",
                "created": int(time.time()),
                "model": model_id,
                "choices": choices,
                "usage": usage(res),
            }

        async def events():
            finished: list = [None] * len(reqs)
            try:
                if echo:
                    for i in range(len(reqs)):
                        yield sse(
                            {
                                "id": cid,
                                "object": "text_completion",
                                "created": int(time.time()),
                                "model": model_id,
                                "choices": [
                                    {"index": i, "text": prompt_text(i), "logprobs": None, "finish_reason": None}
                                ],
                            }
                        )
                while any(f is None for f in finished):
                    i, ev = await queue.get()
                    if ev.kind == "error":
                        yield sse({"error": {"message": ev.error, "type": "server_error", "param": None, "code": None}})
                        return
                    if ev.kind == "token" and ev.text:
                        lp = None
                        if logprobs is not None:
                            keep = list(zip(ev.token_ids, ev.logprobs, strict=True))
                            lp = {
                                "tokens": [piece(t) for t, _ in keep],
                                "token_logprobs": [v for _, v in keep],
                                "top_logprobs": None,
                                "text_offset": None,
                            }
                        yield sse(
                            {
                                "id": cid,
                                "object": "text_completion",
                                "created": int(time.time()),
                                "model": model_id,
                                "choices": [{"index": i, "text": ev.text, "logprobs": lp, "finish_reason": None}],
                            }
                        )
                    elif ev.kind == "done":
                        finished[i] = ev.result
                        tail = ev.result.text[len(reqs[i].sent_text) :]
                        yield sse(
                            {
                                "id": cid,
                                "object": "text_completion",
                                "created": int(time.time()),
                                "model": model_id,
                                "choices": [
                                    {
                                        "index": i,
                                        "text": tail,
                                        "logprobs": None,
                                        "finish_reason": ev.result.finish_reason,
                                    }
                                ],
                            }
                        )
                if include_usage:
                    yield sse(
                        {
                            "id": cid,
                            "object": "text_completion",
                            "created": int(time.time()),
                            "model": model_id,
                            "choices": [],
                            "usage": usage(finished),
                        }
                    )
                yield "data: [DONE]\n\n"
            finally:
                for r in reqs:
                    if not r.finished:
                        scheduler.cancel(r)

        return StreamingResponse(events(), media_type="text/event-stream")

    @app.post("/v1/chat/completions")
    async def chat_completions(http: HttpRequest):
        body = await read_body(http)
        _unsupported(body)
        if fmt is None:
            raise ApiError(
                400,
                f"model `{model_name}` has no chat format (no Llama 3 tokens, no chat template); use /v1/completions",
                "messages",
            )
        messages = _field(body, "messages", "list")
        if not messages:
            raise ApiError(400, "'messages' must hold at least one message", "messages")
        tools = _field(body, "tools", "list", None)
        tool_choice = body.get("tool_choice", "auto")
        if tool_choice not in ("auto", "none", None):
            raise ApiError(
                400, f"'tool_choice' must be 'auto' or 'none' (got {json.dumps(tool_choice)[:80]})", "tool_choice"
            )
        use_tools = bool(tools) and tool_choice != "none"
        if tools:
            for i, t in enumerate(tools):
                try:
                    chat.normalize_tool_definition(t, f"tools[{i}]")
                except ValueError as e:
                    raise ApiError(400, str(e), f"tools[{i}]") from None
        try:
            prompt = chat_prompt(fmt, messages, tools if use_tools else None)
        except ValueError as e:
            msg = str(e)
            param = msg.split(":", 1)[0] if msg.startswith("messages[") else "messages"
            raise ApiError(400, msg, param) from None
        max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
        name = "max_completion_tokens" if "max_completion_tokens" in body else "max_tokens"
        if max_tokens is None:
            max_tokens = max(max_length - len(prompt), 1)
        else:
            max_tokens = _field({name: max_tokens}, name, "int", lo=1)
        want_lp = _field(body, "logprobs", "bool", False)
        top_lp = _field(body, "top_logprobs", "int", 0, lo=0, hi=MAX_CHAT_TOP_LOGPROBS)
        if top_lp and not want_lp:
            raise ApiError(400, "'top_logprobs' needs 'logprobs': true", "top_logprobs")
        stream = _field(body, "stream", "bool", False)
        include_usage = _stream_usage(body)
        params = _sampling(body, max_tokens, _stop_strings(body), top_lp if want_lp and top_lp else None)
        check_length(prompt, max_tokens, "messages")
        queue, reqs = submit([prompt], params, "messages")
        cid = "chatcmpl-" + uuid.uuid4().hex

        def message_of(r) -> tuple[dict, str]:
            reason = r.finish_reason
            if use_tools:
                parsed = chat.parse_output(r.text)
                if parsed.tool_calls:
                    return (
                        {
                            "role": "assistant",
                            "content": parsed.content or None,
                            "tool_calls": [_tool_call_json(c) for c in parsed.tool_calls],
                        },
                        "tool_calls",
                    )
            return {"role": "assistant", "content": r.text}, reason

        def chat_logprobs(r) -> dict | None:
            if not want_lp:
                return None
            toks = list(r.tokens)
            if toks and toks[-1] in stop_ids:
                toks = toks[:-1]
            tops = r.top_logprobs or [[] for _ in toks]
            content = []
            for t, lp, top in zip(toks, r.logprobs, tops, strict=False):
                s = piece(t)
                content.append(
                    {
                        "token": s,
                        "logprob": lp,
                        "bytes": list(s.encode("utf-8")),
                        "top_logprobs": [
                            {"token": piece(i), "logprob": v, "bytes": list(piece(i).encode("utf-8"))} for i, v in top
                        ],
                    }
                )
            return {"content": content}

        if not stream:
            [r] = await results(http, queue, reqs)
            message, reason = message_of(r)
            return {
                "id": cid,
                "object": "chat.completion",
                "created": int(time.time()),
                "model": model_name,
                "choices": [{"index": 0, "message": message, "logprobs": chat_logprobs(r), "finish_reason": reason}],
                "usage": usage([r]),
            }

        def chunk(delta: dict, reason=None, logprobs=None) -> str:
            return sse(
                {
                    "id": cid,
                    "object": "chat.completion.chunk",
                    "created": int(time.time()),
                    "model": model_name,
                    "choices": [{"index": 0, "delta": delta, "logprobs": logprobs, "finish_reason": reason}],
                }
            )

        async def events():
            try:
                yield chunk({"role": "assistant", "content": ""})
                while True:
                    _, ev = await queue.get()
                    if ev.kind == "error":
                        yield sse({"error": {"message": ev.error, "type": "server_error", "param": None, "code": None}})
                        return
                    if ev.kind == "token":
                        if ev.text and not use_tools:  # with tools the reply may be a call: sent at the end
                            lp = None
                            if want_lp:
                                lp = {
                                    "content": [
                                        {"token": piece(t), "logprob": v, "bytes": None, "top_logprobs": []}
                                        for t, v in zip(ev.token_ids, ev.logprobs, strict=True)
                                        if t not in stop_ids
                                    ]
                                }
                            yield chunk({"content": ev.text}, logprobs=lp)
                        continue
                    r = ev.result
                    message, reason = message_of(r)
                    if "tool_calls" in message:
                        calls = [{"index": j, **c} for j, c in enumerate(message["tool_calls"])]
                        yield chunk(
                            {"tool_calls": calls, **({"content": message["content"]} if message["content"] else {})}
                        )
                    else:
                        tail = r.text if use_tools else r.text[len(reqs[0].sent_text) :]
                        if tail:
                            yield chunk({"content": tail})
                    yield chunk({}, reason)
                    if include_usage:
                        yield sse(
                            {
                                "id": cid,
                                "object": "chat.completion.chunk",
                                "created": int(time.time()),
                                "model": model_name,
                                "choices": [],
                                "usage": usage([r]),
                            }
                        )
                    yield "data: [DONE]\n\n"
                    return
            finally:
                for r in reqs:
                    if not r.finished:
                        scheduler.cancel(r)

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def _stream_usage(body: dict) -> bool:
    opts = _field(body, "stream_options", "dict", {})
    return bool(_field(opts, "include_usage", "bool", False)) if opts else False


def _completion_prompts(body: dict, tokenizer) -> list[list[int]]:
    """``prompt`` as token id lists: a string (encoded with BOS when the vocabulary has one, as
    ``experiments/eval.py`` and ``generate`` do; special-token text stays plain text), a list of ids, or a list
    of strings / id lists. Raises ApiError 400 naming ``prompt``."""
    p = body.get("prompt", _MISSING)
    if p is _MISSING or p is None:
        raise ApiError(400, "'prompt' is a required property", "prompt")

    def one(x, where):
        if isinstance(x, str):
            if not x:
                raise ApiError(400, f"'{where}' is an empty string", "prompt")
            return tokenizer.encode(x, bos=tokenizer.bos_id is not None)
        if isinstance(x, list) and x and all(isinstance(t, int) and not isinstance(t, bool) for t in x):
            bad = [t for t in x if not 0 <= t < tokenizer.vocab_size]
            if bad:
                raise ApiError(
                    400,
                    f"'{where}' holds token id {bad[0]} outside the vocabulary [0, {tokenizer.vocab_size})",
                    "prompt",
                )
            return list(x)
        raise ApiError(400, f"'{where}' must be a non-empty string or a non-empty list of token ids", "prompt")

    if isinstance(p, list) and p and all(isinstance(x, (str, list)) for x in p):
        return [one(x, f"prompt[{i}]") for i, x in enumerate(p)]
    return [one(p, "prompt")]


# ---------------------------------------------------------------------------------------------------- CLI
def _define_flags():
    from absl import flags

    flags.DEFINE_string("checkpoint", None, "llama-jax (Orbax) checkpoint directory; default: SmolLM2-135M-Instruct.")
    flags.DEFINE_string("host", "127.0.0.1", "Address to listen on (default loopback only).")
    flags.DEFINE_integer("port", 8000, "TCP port.")
    flags.DEFINE_integer("max_batch", 16, "Rows decoded together (concurrent requests in the running batch).")
    flags.DEFINE_integer(
        "max_length",
        None,
        "Longest sequence (prompt + new tokens) of a request; default the model's context, at most 2048.",
    )
    flags.DEFINE_integer("max_queue", 64, "Requests allowed to wait for a row; beyond, 429 with Retry-After.")
    flags.DEFINE_integer("steps_per_dispatch", 4, "Decode steps per device call between host checks.")
    flags.DEFINE_enum("quant", "none", ["none", "int8"], "Weight quantization at load (llama_jax.quant).")
    flags.DEFINE_enum("dtype", None, ["float32", "bfloat16"], "Parameter and compute dtype.")
    flags.DEFINE_string("mesh", None, 'Device mesh, e.g. "data=1,fsdp=2,tensor=4" (default: one device).')
    flags.DEFINE_string("model_name", None, "Model id served (default: the checkpoint directory's name).")
    flags.DEFINE_integer(
        "prefix_cache_pages",
        256,
        "Pages of --page_size tokens kept by the prefix cache (full "
        "pages of identical prompt prefixes are computed once); 0 turns it off.",
    )
    flags.DEFINE_integer("page_size", 16, "Tokens per page of the paged KV cache and of the prefix cache.")
    flags.DEFINE_enum(
        "kv_layout",
        None,
        ["paged", "dense"],
        "KV cache of the running batch: paged (a pool of pages, a page table per row; the default on one device) "
        "or dense (every row reserves --max_length slots; the default with --mesh).",
    )
    flags.DEFINE_integer(
        "num_pages",
        None,
        "Pages in the paged KV cache's pool; default the dense cache's bytes (max_batch x max_length / page_size) "
        "plus --prefix_cache_pages.",
    )
    flags.DEFINE_float("shutdown_timeout", 30.0, "Seconds running requests may finish after SIGTERM.")
    flags.DEFINE_bool("warmup", True, "Compile prefill/decode with a 1-token request before listening.")
    flags.DEFINE_string("log_level", "warning", "uvicorn log level.")


def build(
    checkpoint_path: str | None,
    *,
    max_batch: int = 16,
    max_length: int | None = None,
    quant: str = "none",
    dtype: str | None = None,
    mesh: str | None = None,
    max_queue: int = 64,
    steps_per_dispatch: int = 4,
    warmup: bool = True,
    prefix_cache_pages: int = 256,
    page_size: int = 16,
    kv_layout: str | None = None,
    num_pages: int | None = None,
):
    """(scheduler, tokenizer, model name) for a checkpoint (default SmolLM2). Raises ValueError naming the flag.

    ``kv_layout`` None: "paged" on one device, "dense" with a mesh (the paged pool is single-device)."""
    import jax.numpy as jnp

    from llama_jax import checkpoint
    from llama_jax import quant as quant_lib
    from llama_jax.default_model import default_checkpoint
    from llama_jax.engine import Engine
    from llama_jax.tokenizer import Tokenizer

    if max_batch < 1:
        raise ValueError(f"--max_batch must be >= 1, got {max_batch}")
    if prefix_cache_pages < 0 or page_size < 1:
        raise ValueError(
            f"--prefix_cache_pages must be >= 0 and --page_size >= 1, got {prefix_cache_pages}, {page_size}"
        )
    if kv_layout not in (None, "paged", "dense"):
        raise ValueError(f"--kv_layout must be paged or dense, got {kv_layout!r}")
    if kv_layout == "paged" and mesh:
        raise ValueError("--kv_layout=paged is single-device for now; use --kv_layout=dense with --mesh")
    if num_pages is not None and num_pages < 1:
        raise ValueError(f"--num_pages must be >= 1, got {num_pages}")
    if max_length is not None and max_length < 2:
        raise ValueError(f"--max_length must be >= 2, got {max_length}")
    path = checkpoint_path or default_checkpoint(quiet=True)
    if not os.path.isdir(path):
        raise ValueError(f"--checkpoint: {path}: no such directory")
    tok_dir = checkpoint.tokenizer_dir(path)
    if tok_dir is None:
        raise ValueError(f"--checkpoint: {path}: no tokenizer/ directory in the checkpoint")
    tokenizer = Tokenizer.from_file(tok_dir)
    mesh_obj = None
    if mesh:
        from llama_jax import sharding

        try:
            mesh_obj = sharding.parse_mesh(mesh)
        except ValueError as e:
            raise ValueError(f"--mesh: {e}") from None
    try:
        model = quant_lib.load(path, quant=quant, dtype=dtype and jnp.dtype(dtype), mesh=mesh_obj)
    except (FileNotFoundError, ValueError) as e:
        raise ValueError(f"--checkpoint: {e}") from None
    length = min(max_length or min(model.config.max_seq_len, 2048), model.config.max_seq_len)
    engine = Engine(model, max_length=length, mesh=mesh_obj)
    from llama_jax import chat

    stops = set(tokenizer.stop_ids)
    try:
        stops |= set(chat.chat_format_for(tokenizer).stop_ids)
    except ValueError:
        pass

    def make():
        return Scheduler(
            engine,
            tokenizer,
            max_batch=max_batch,
            max_queue=max_queue,
            steps_per_dispatch=steps_per_dispatch,
            stop_ids=sorted(stops),
            prefix_cache_pages=prefix_cache_pages,
            page_size=page_size,
            kv_layout=kv_layout or ("dense" if mesh_obj is not None else "paged"),
            num_pages=num_pages,
        )

    try:
        scheduler = make()
    except ValueError as e:
        raise ValueError(f"--kv_layout: {e}") from None
    if warmup:
        import queue as queue_lib

        q: queue_lib.Queue = queue_lib.Queue()
        with scheduler:
            bos = tokenizer.bos_id if tokenizer.bos_id is not None else 0
            scheduler.submit(Request([bos], SamplingParams(max_tokens=2), q.put))
            while q.get().kind == "token":
                pass
        scheduler = make()
    name = os.path.basename(os.path.normpath(path))
    return scheduler, tokenizer, name


def main(argv):
    from absl import flags

    from llama_jax.logs import quiet_unless_verbose

    FLAGS = flags.FLAGS
    quiet_unless_verbose()
    if len(argv) > 1:
        print(f"error: unexpected arguments: {' '.join(argv[1:])}", file=sys.stderr)
        return 1
    if not 0 <= FLAGS.port < 65536:
        print(f"error: --port must be in [0, 65535], got {FLAGS.port}", file=sys.stderr)
        return 1
    try:
        scheduler, tokenizer, name = build(
            FLAGS.checkpoint,
            max_batch=FLAGS.max_batch,
            max_length=FLAGS.max_length,
            quant=FLAGS.quant,
            dtype=FLAGS.dtype,
            mesh=FLAGS.mesh,
            max_queue=FLAGS.max_queue,
            steps_per_dispatch=FLAGS.steps_per_dispatch,
            warmup=FLAGS.warmup,
            prefix_cache_pages=FLAGS.prefix_cache_pages,
            page_size=FLAGS.page_size,
            kv_layout=FLAGS.kv_layout,
            num_pages=FLAGS.num_pages,
        )
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    import uvicorn

    app = create_app(scheduler, tokenizer, FLAGS.model_name or name, shutdown_timeout=FLAGS.shutdown_timeout)
    print(
        f"serving {FLAGS.model_name or name} (max_length {scheduler.max_length}, max_batch {FLAGS.max_batch}) "
        f"on http://{FLAGS.host}:{FLAGS.port}/v1",
        file=sys.stderr,
        flush=True,
    )
    config = uvicorn.Config(
        app,
        host=FLAGS.host,
        port=FLAGS.port,
        log_level=FLAGS.log_level,
        timeout_graceful_shutdown=max(int(FLAGS.shutdown_timeout), 1),
    )
    import signal

    # uvicorn re-raises the signal that stopped it once it has shut down gracefully; exit 0 instead
    previous = {sig: signal.signal(sig, lambda *_: None) for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        uvicorn.Server(config).run()
    except OSError as e:
        print(f"error: --port={FLAGS.port}: {e}", file=sys.stderr)
        return 1
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    return 0


def run():
    """Console-script entry point."""
    from absl import app

    _define_flags()
    app.run(main)


if __name__ == "__main__":
    run()
