"""The OpenAI-compatible HTTP server (FastAPI): completions, chat, models, owner switches, admin, owner page.

Model ids: ``NAME`` (every expert), ``NAME:-legal`` (without legal), ``NAME:+code`` (public + code);
terms combine (``NAME:-legal-math``). The body's ``experts`` field (``{"exclude": [...]}`` or
``{"include": [...]}``; the OpenAI client's ``extra_body``) narrows the choice further.
"""

from __future__ import annotations

import asyncio
import json
import logging
import re
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from flexmoe import compose as C
from flexmoe.chat import read_chat_file
from flexmoe.compose import PUBLIC
from flexmoe.errors import FlexmoeError
from flexmoe.runtime import Composed, expert_mask, from_pretrained
from flexmoe.serve.audit_log import AuditLog
from flexmoe.serve.engine import Engine, Job, Result, Sampling
from flexmoe.serve.ledger import Ledger
from flexmoe.serve.owners import Registry
from flexmoe.serve.page import OWNER_PAGE, usage_svg
from flexmoe.signing import ALLOW_UNSIGNED, Trust

log = logging.getLogger("flexmoe.serve")


class ApiError(Exception):
    """An OpenAI-style error: HTTP status, message, type, param, code."""

    def __init__(
        self, status: int, message: str, type_: str = "invalid_request_error", param=None, code=None
    ):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type_, param, code

    def response(self) -> JSONResponse:
        body = {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}
        return JSONResponse(body, status_code=self.status)


class Experts(BaseModel):
    model_config = ConfigDict(extra="forbid")
    include: list[str] | None = None
    exclude: list[str] | None = None


class _Common(BaseModel):
    model_config = ConfigDict(extra="ignore")
    model: str
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float = Field(default=1.0, ge=0.0, le=2.0)
    top_p: float = Field(default=1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool = False
    n: int = Field(default=1, ge=1, le=1)
    experts: Experts | None = None
    ignore_eos: bool = False


class CompletionBody(_Common):
    prompt: str | list[str]


class Message(BaseModel):
    model_config = ConfigDict(extra="ignore")
    role: str
    content: str | list[dict[str, Any]] | None = None


class ChatBody(_Common):
    messages: list[Message] = Field(min_length=1)


class PackageBody(BaseModel):
    package: str


class ModelBody(BaseModel):
    path: str


@dataclass
class Settings:
    model: Path
    name: str | None = None
    owners: Path | None = None
    db: str | None = None
    audit_log: Path | None = None
    max_batch: int = 32
    device: str = "cpu"
    dtype: str = "float32"
    workdir: Path | None = None  # where admin operations write new model versions
    # Public keys accepted (None: any valid signature): the maintainer's, for the model served and the
    # models the admin swaps in, and the owners', for the packages the admin adds or updates.
    trust: list[Path] | None = None
    allow_unsigned: bool = False  # unsigned models and packages accepted (as --allow-unsigned elsewhere)
    # each request's prompt picks its owner (flexmoe.sequence_routing); None: on for a chat federation
    # whose owners shipped prompt centroids (runtime.from_pretrained)
    sequence_routing: bool | None = None
    prompt_calibration: Path | None = None  # public chat JSONL the prompt choice is calibrated on

    def verifier(self) -> Trust:
        return Trust.from_paths(self.trust, allow_unsigned=self.allow_unsigned)


@dataclass
class State:
    settings: Settings
    composed: Composed
    engine: Engine
    registry: Registry
    ledger: Ledger
    audit: AuditLog
    name: str
    model_dir: Path
    versions: int = 0
    admin_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    pending: set = field(default_factory=set)  # ledger writes of streams whose client went away


def load(settings: Settings, path: Path | None = None, trust: Trust | None = None) -> Composed:
    """The model at ``path`` (default: the one served), its signature verified under ``trust``
    (default: the server's --trust / --allow-unsigned)."""
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[settings.dtype]
    trust = trust or settings.verifier()
    c = from_pretrained(
        path or settings.model,
        dtype=dtype,
        device=settings.device,
        trust=trust,
        sequence_routing=settings.sequence_routing,
    )
    if settings.prompt_calibration is not None:  # every model served, swapped-in ones too
        if c.prompt_chosen_by_rows:
            c.calibrate_prompts(read_chat_file(settings.prompt_calibration))
        else:  # e.g. every owner now ships a prompt centroid: the swap must not fail over it
            log.warning("--prompt-calibration not applied to %s: the rows do not choose its prompts", path)
    return c


def parse_model(model_id: str, name: str, names: list[str]) -> tuple[list[str] | None, list[str] | None]:
    """``(include, exclude)`` from ``NAME``, ``NAME:-a-b`` or ``NAME:+a+b``."""
    base, _, spec = model_id.partition(":")
    if base != name:
        raise ApiError(
            404,
            f"The model {model_id!r} does not exist; this server serves {name!r}.",
            "invalid_request_error",
            "model",
            "model_not_found",
        )
    if not spec:
        return None, None
    terms = re.findall(r"([+-])([^+-]+)", spec)
    if not terms or "".join(s + n for s, n in terms) != spec:
        raise ApiError(
            400,
            f"Cannot read model id {model_id!r}: use NAME:-expert or NAME:+expert.",
            param="model",
            code="invalid_model_id",
        )
    inc = [n for s, n in terms if s == "+"] or None
    exc = [n for s, n in terms if s == "-"] or None
    return inc, exc


def request_mask(state: State, body: _Common) -> torch.Tensor:
    names = state.composed.names
    inc, exc = parse_model(body.model, state.name, names)
    if body.experts is not None:
        inc = (inc or []) + (body.experts.include or []) or None
        exc = (exc or []) + (body.experts.exclude or []) or None
    try:
        mask = expert_mask(names, inc, exc)
    except FlexmoeError as e:
        code = "expert_not_found" if "Unknown" in e.problem else "no_experts"
        raise ApiError(404 if code == "expert_not_found" else 400, str(e), param="experts", code=code) from e
    if not bool((mask & state.engine.enabled).any()):
        raise ApiError(
            400, "Every expert this request may use is switched off.", param="experts", code="no_experts"
        )
    return mask


def sampling_of(state: State, body: _Common, n_prompt: int) -> Sampling:
    ctx = int(getattr(state.composed.model.config, "max_position_embeddings", 2048))
    if n_prompt >= ctx:
        raise ApiError(
            400,
            f"The prompt has {n_prompt} tokens; this model's context is {ctx} tokens.",
            param="prompt",
            code="context_length_exceeded",
        )
    if n_prompt == 0:
        raise ApiError(400, "The prompt is empty.", param="prompt", code="empty_prompt")
    want = body.max_completion_tokens or body.max_tokens or 16
    stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
    if len(stop) > 4:
        raise ApiError(400, "At most 4 stop sequences.", param="stop")
    return Sampling(min(want, ctx - n_prompt), body.temperature, body.top_p, stop, body.seed, body.ignore_eos)


def bearer(request: Request) -> str | None:
    auth = request.headers.get("authorization", "")
    return auth[7:].strip() if auth.lower().startswith("bearer ") else None


def create_app(settings: Settings, composed: Composed | None = None) -> FastAPI:
    """The ASGI app; the model is loaded here (or passed in) and the engine runs while the app lives."""
    composed = composed or load(settings)
    name = settings.name or Path(settings.model).name
    owners_file = settings.owners
    audit_path = settings.audit_log or (
        owners_file.with_suffix(".audit.jsonl")
        if owners_file
        else Path(settings.model).parent / "audit.jsonl"
    )
    db = settings.db or f"sqlite:///{Path(settings.model).parent / (name + '-ledger.sqlite')}"
    state = State(
        settings,
        composed,
        Engine(composed, settings.max_batch),
        Registry(owners_file),
        Ledger(db),
        AuditLog(audit_path),
        name,
        Path(settings.model),
    )
    _apply_switches(state)

    @asynccontextmanager
    async def lifespan(_app):
        state.engine.start()
        yield
        state.engine.stop()

    app = FastAPI(title="flexmoe", lifespan=lifespan)
    app.state.flexmoe = state
    _errors(app)
    _openai_routes(app, state)
    _governance_routes(app, state)
    return app


def _apply_switches(state: State) -> None:
    names = state.composed.names
    state.engine.enabled = torch.tensor([n not in state.registry.disabled for n in names])


def _errors(app: FastAPI) -> None:
    @app.exception_handler(ApiError)
    async def _api(_req, e: ApiError):
        return e.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(_req, e: RequestValidationError):
        errs = e.errors()
        first = errs[0] if errs else {}
        param = ".".join(str(p) for p in first.get("loc", [])[1:]) or None
        msg = "; ".join(f"{'.'.join(str(p) for p in x.get('loc', []))}: {x.get('msg')}" for x in errs[:5])
        return ApiError(422, msg or "invalid request", param=param, code="invalid_body").response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_req, e: StarletteHTTPException):
        return ApiError(e.status_code, str(e.detail), code="http_error").response()

    @app.exception_handler(FlexmoeError)
    async def _user(_req, e: FlexmoeError):
        return ApiError(400, str(e)).response()

    @app.exception_handler(Exception)
    async def _bug(_req, e: Exception):
        return ApiError(500, f"internal error: {type(e).__name__}", "server_error").response()


def _openai_routes(app: FastAPI, state: State) -> None:
    @app.get("/v1/models")
    async def models():
        now = int(time.time())
        ids = [state.name] + [f"{state.name}:-{n}" for n in state.composed.names if n != PUBLIC]
        data = [{"id": i, "object": "model", "created": now, "owned_by": "flexmoe"} for i in ids]
        return {"object": "list", "data": data, "flexmoe": {"experts": _experts(state)}}

    @app.post("/v1/completions")
    async def completions(body: CompletionBody, request: Request):
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        if len(prompts) != 1:
            raise ApiError(400, "Send one prompt per request (a list of one is fine).", param="prompt")
        return await _generate(state, body, prompts[0], "text_completion", request)

    @app.post("/v1/chat/completions")
    async def chat(body: ChatBody, request: Request):
        tok = state.composed.tokenizer
        if not getattr(tok, "chat_template", None):
            raise ApiError(
                400,
                f"The model {state.name!r} has no chat template; use /v1/completions.",
                param="messages",
                code="no_chat_template",
            )
        msgs = [{"role": m.role, "content": _text(m.content)} for m in body.messages]
        try:
            prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
        except Exception as e:  # noqa: BLE001 - templates raise anything (jinja errors)
            raise ApiError(400, f"The chat template rejected the messages: {e}", param="messages") from e
        return await _generate(state, body, prompt, "chat.completion", request)


def _text(content) -> str:
    if content is None or isinstance(content, str):
        return content or ""
    return "".join(part.get("text", "") for part in content if part.get("type") == "text")


def _experts(state: State) -> list[dict]:
    enabled = state.engine.enabled.tolist()
    return [
        {"name": n, "owner": state.registry.owner_of(n), "enabled": bool(enabled[i])}
        for i, n in enumerate(state.composed.names)
    ]


async def _generate(state: State, body: _Common, prompt: str, kind: str, request: Request):
    mask = request_mask(state, body)
    ids = state.composed.tokenizer(prompt, add_special_tokens=False)["input_ids"]
    sampling = sampling_of(state, body, len(ids))
    loop = asyncio.get_running_loop()
    events: asyncio.Queue = asyncio.Queue()
    job = Job(ids, mask, sampling, lambda k, p: loop.call_soon_threadsafe(events.put_nowait, (k, p)))
    state.engine.submit(job)
    rid = f"{'chatcmpl' if kind.startswith('chat') else 'cmpl'}-{uuid.uuid4().hex[:24]}"
    meta = {"id": rid, "created": int(time.time()), "model": body.model}
    if body.stream:
        return StreamingResponse(
            _stream(state, job, events, kind, meta, request), media_type="text/event-stream"
        )
    text = ""
    while True:
        k, p = await events.get()
        if k == "delta":
            text += p
        elif k == "error":
            raise ApiError(500, p, "server_error")
        else:
            await _write_ahead(state, body.model, kind, p)
            return _final(kind, meta, p)


async def _write_ahead(state: State, model: str, kind: str, r: Result) -> None:
    """The ledger row is committed before the answer leaves (a kill -9 after this loses nothing)."""
    await run_in_threadpool(
        state.ledger.record,
        model,
        kind,
        r.prompt_tokens,
        r.completion_tokens,
        r.finish_reason,
        r.attribution,
        state.registry.owner_of,
    )


def _usage(r: Result) -> dict:
    return {
        "prompt_tokens": r.prompt_tokens,
        "completion_tokens": r.completion_tokens,
        "total_tokens": r.prompt_tokens + r.completion_tokens,
    }


def _final(kind: str, meta: dict, r: Result) -> dict:
    reason = "stop" if r.finish_reason == "cancelled" else r.finish_reason
    if kind == "chat.completion":
        choice = {"index": 0, "message": {"role": "assistant", "content": r.text}, "finish_reason": reason}
    else:
        choice = {"index": 0, "text": r.text, "logprobs": None, "finish_reason": reason}
    return {
        **meta,
        "object": kind,
        "choices": [choice],
        "usage": _usage(r),
        "flexmoe": {"attribution": r.attribution},
    }


def _chunk(kind: str, meta: dict, delta: str | None, reason: str | None, extra: dict | None = None) -> str:
    if kind == "chat.completion":
        d = {"content": delta} if delta is not None else {}
        choice = {"index": 0, "delta": d, "finish_reason": reason}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": delta or "", "logprobs": None, "finish_reason": reason}
        obj = "text_completion"
    return "data: " + json.dumps({**meta, "object": obj, "choices": [choice], **(extra or {})}) + "\n\n"


async def _stream(state: State, job: Job, events: asyncio.Queue, kind: str, meta: dict, request: Request):
    settled = False  # the engine's last event (done or error) was taken: nothing left to bill here
    try:
        if kind == "chat.completion":
            yield _chunk(kind, meta, "", None).replace('"content": ""', '"role": "assistant", "content": ""')
        while True:
            k, p = await events.get()
            if k == "delta":
                yield _chunk(kind, meta, p, None)
            elif k == "error":
                settled = True
                yield (
                    "data: "
                    + json.dumps(
                        {"error": {"message": p, "type": "server_error", "param": None, "code": None}}
                    )
                    + "\n\n"
                )
                return
            else:
                settled = True
                await _write_ahead(state, meta["model"], kind, p)
                extra = {"usage": _usage(p), "flexmoe": {"attribution": p.attribution}}
                yield _chunk(
                    kind, meta, None, "stop" if p.finish_reason == "cancelled" else p.finish_reason, extra
                )
                yield "data: [DONE]\n\n"
                return
    finally:
        job.cancelled.set()  # a client that went away frees its row in the batch
        if not settled:
            # The tokens made before the client went away used the owners' experts: they are billed
            # once the engine hands back the cancelled job (a task, since this generator is closing).
            state.pending.add(
                asyncio.get_running_loop().create_task(_record_when_done(state, events, kind, meta))
            )


async def _record_when_done(state: State, events: asyncio.Queue, kind: str, meta: dict) -> None:
    try:
        while True:
            k, p = await events.get()
            if k == "error":
                return
            if k == "done":
                await _write_ahead(state, meta["model"], kind, p)
                return
    finally:
        state.pending.discard(asyncio.current_task())


def _governance_routes(app: FastAPI, state: State) -> None:
    def who(request: Request) -> str:
        w = state.registry.identify(bearer(request))
        if w is None:
            raise ApiError(
                401,
                "Missing or unknown API key (Authorization: Bearer KEY).",
                "authentication_error",
                code="invalid_api_key",
            )
        return w

    def admin(request: Request) -> None:
        if who(request) != "":
            raise ApiError(403, "This needs the admin key.", "permission_error", code="forbidden")

    async def switch(expert: str, request: Request, enabled: bool):
        return await _switch(state, who(request), expert, enabled)

    @app.post("/v1/experts/{expert}/disable")
    async def disable(expert: str, request: Request):
        return await switch(expert, request, False)

    @app.post("/v1/experts/{expert}/enable")
    async def enable(expert: str, request: Request):
        return await switch(expert, request, True)

    @app.get("/v1/owner/me")
    async def me(request: Request):
        actor = who(request)
        if actor == "":
            return {"owner": "admin", "expert": None, "enabled": None}
        expert = state.registry.owners[actor].expert
        return {"owner": actor, "expert": expert, "enabled": expert not in state.registry.disabled}

    @app.get("/v1/owner/usage")
    async def owner_usage(request: Request, format: str = "json"):
        actor = who(request)
        expert = None if actor == "" else state.registry.owners[actor].expert
        rows = await run_in_threadpool(state.ledger.daily, None, expert)
        if format == "svg":
            return HTMLResponse(usage_svg(rows), media_type="image/svg+xml")
        return {"expert": expert, "days": rows}

    @app.get("/owner", response_class=HTMLResponse)
    async def owner_page():
        return OWNER_PAGE

    _admin_routes(app, state, admin)


async def _switch(state: State, actor: str, expert: str, enabled: bool) -> dict:
    """An owner (its own expert only) or the admin switches an expert for all traffic."""
    if expert not in state.composed.names:
        raise ApiError(404, f"No expert named {expert!r}.", param="expert", code="expert_not_found")
    owner = state.registry.owner_of(expert)
    if actor != "" and actor != owner:
        raise ApiError(403, f"Expert {expert!r} is not yours.", "permission_error", code="forbidden")
    if expert == PUBLIC and not enabled:
        raise ApiError(400, "The public expert (the anchor's FFN) cannot be switched off.", param="expert")
    await run_in_threadpool(state.registry.set_enabled, expert, enabled)
    state.audit.append(actor or "admin", "enable" if enabled else "disable", expert)
    _apply_switches(state)
    return {"expert": expert, "enabled": enabled}


def _admin_routes(app: FastAPI, state: State, admin) -> None:
    # Packages the admin adds or updates are checked like `flexmoe add`: signed by a trusted key, or
    # unsigned only when the server was started with --allow-unsigned.
    prov = C.Provenance(trust=state.settings.verifier())

    async def new_version(op: str, target: str, fn) -> dict:
        async with state.admin_lock:
            root = state.settings.workdir or state.model_dir.parent / f"{state.name}.versions"
            state.versions += 1
            out = root / f"v{state.versions}-{op}-{uuid.uuid4().hex[:6]}"
            try:
                await run_in_threadpool(fn, out)
            except FlexmoeError as e:
                raise ApiError(400, str(e), param="package") from e
            state.audit.append("admin", op, target, model=str(out))
            # A version this server has just written from the verified model and packages: unsigned
            # (the server holds no signing key), so accepted as such.
            await _swap(state, out, ALLOW_UNSIGNED)
            return {"model": str(out), "experts": state.composed.names}

    @app.post("/v1/admin/experts")
    async def add_expert(body: PackageBody, request: Request):
        admin(request)
        return await new_version(
            "add", body.package, lambda out: C.add(state.model_dir, Path(body.package), out, provenance=prov)
        )

    @app.put("/v1/admin/experts/{expert}")
    async def update_expert(expert: str, body: PackageBody, request: Request):
        admin(request)
        return await new_version(
            "update", expert, lambda out: C.update(state.model_dir, Path(body.package), out, provenance=prov)
        )

    @app.delete("/v1/admin/experts/{expert}")
    async def remove_expert(expert: str, request: Request):
        admin(request)
        if expert not in state.composed.names:
            raise ApiError(404, f"No expert named {expert!r}.", param="expert", code="expert_not_found")
        return await new_version("remove", expert, lambda out: C.remove(state.model_dir, expert, out))

    @app.post("/v1/admin/model")
    async def swap_model(body: ModelBody, request: Request):
        admin(request)
        async with state.admin_lock:
            state.audit.append("admin", "swap", body.path)
            await _swap(state, Path(body.path))
            return {"model": body.path, "experts": state.composed.names}


async def _swap(state: State, path: Path, trust: Trust | None = None) -> None:
    try:
        new = await run_in_threadpool(load, state.settings, path, trust)
    except (FlexmoeError, OSError) as e:
        raise ApiError(400, f"Cannot load {path}: {e}", param="path") from e
    await run_in_threadpool(state.engine.swap, new)
    state.composed, state.model_dir = new, path
    _apply_switches(state)
