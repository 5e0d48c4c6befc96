"""The ingress deployment: the FastAPI app (auth, validation, model names, errors) in front of the
model deployment. CPU only; it awaits the model replicas and never runs a pipeline itself."""

# No `from __future__ import annotations`: FastAPI reads the route's body type, built per
# config inside `build_api`, from the live annotation.
import asyncio
import base64
import logging
import secrets
import time
from collections.abc import Sequence
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from ray import serve
from ray.exceptions import RayActorError, RayTaskError
from ray.serve.exceptions import BackPressureError, DeploymentUnavailableError, ReplicaUnavailableError
from ray.serve.handle import DeploymentHandle
from starlette.exceptions import HTTPException as StarletteHTTPException
from tenacity import (
    AsyncRetrying,
    RetryError,
    retry_if_exception_type,
    stop_after_attempt,
    stop_after_delay,
    wait_exponential,
)

import atelier
from atelier.endpoint.api import (
    MAX_SEED,
    ErrorResponse,
    GenerationResponse,
    ModelInfo,
    ModelList,
    request_model,
)
from atelier.endpoint.config import ServeConfig
from atelier.errors import (
    AtelierError,
    InvalidInput,
    NotFound,
    Overloaded,
    ServiceError,
    describe_validation_error,
)
from atelier_serve.auth import ApiKeys
from atelier_serve.metrics import IngressMetrics

log = logging.getLogger("ray.serve")
GENERATIONS = "/v1/images/generations"
# What Ray raises when the replica a request went to is gone (its process killed, its node lost),
# as opposed to an error the model raised (RayTaskError) or a full queue (BackPressureError).
REPLICA_GONE = (RayActorError, ReplicaUnavailableError)


class _Ttl:
    """Answers reused for a few seconds: the registry is S3, and "latest" changes rarely."""

    def __init__(self, seconds: float):
        self.seconds = seconds
        self._items: dict[str, tuple[float, Any]] = {}

    def get(self, key: str) -> Any:
        hit = self._items.get(key)
        return hit[1] if hit and time.monotonic() - hit[0] < self.seconds else None

    def put(self, key: str, value: Any) -> Any:
        self._items[key] = (time.monotonic(), value)
        return value


class _Alias:
    """What an alias ("name@prod") is served as on this ingress replica: the version it named
    when first asked, until a newer one is loaded on a model replica (`warming`), then that one.
    So a promotion reaches users without a restart, and no request waits on a model's load."""

    def __init__(self, serving: str):
        self.serving = serving
        self.checked = time.monotonic()
        self.warming: str | None = None


def _unwrap(error: BaseException) -> BaseException:
    """The model replica's own exception out of Ray's wrapper, so it keeps its status."""
    if isinstance(error, RayTaskError) and isinstance(getattr(error, "cause", None), AtelierError):
        return error.cause
    return error


@serve.deployment(name="APIIngress")
@serve.ingress()
class APIIngress:
    """Built per replica from the config: the request model carries the configured bounds."""

    def __init__(self, model: DeploymentHandle, config: dict[str, Any]):
        from atelier.registry import Registry
        from atelier.settings import get_settings
        from atelier.storage import Storage

        self.config = ServeConfig.parse(config)
        self.keys = ApiKeys(self.config.auth)
        self.model = model
        self.storage = Storage(get_settings())
        self.registry = Registry(self.storage)
        self.cache = _Ttl(self.config.ingress.registry_cache_s)
        self.aliases: dict[str, _Alias] = {}
        self._tasks: set[asyncio.Task] = set()
        self.metrics = IngressMetrics()

    def __serve_build_asgi_app__(self) -> FastAPI:
        return build_api(self)

    # -- models ----------------------------------------------------------------------------------
    async def resolve(self, ref: str) -> str:
        """A request's model as the id replicas load: a base name, or "name:version" with the
        latest version (or the alias's) filled in, so a newly published or promoted version is
        picked up."""
        if ref in self.config.base_models:
            return ref
        if "@" in ref:
            return await self._resolve_alias(ref)
        resolved = self.cache.get(f"ref:{ref}")
        if resolved is None:
            resolved = self.cache.put(f"ref:{ref}", await self._lookup(ref))
        return resolved

    async def _lookup(self, ref: str) -> str:
        try:
            _, card = await asyncio.to_thread(self.registry.get, ref)
        except NotFound as e:  # said without the bucket and prefix behind the name
            raise NotFound(e.message, where="model") from None
        return card.ref

    async def _resolve_alias(self, ref: str) -> str:
        """The version an alias is served as. Looked up at most every registry_cache_s; a new
        version is loaded on a model replica in the background while the old one keeps serving."""
        state = self.aliases.get(ref)
        if state is None:  # nothing served yet under this alias: nothing to keep serving
            state = self.aliases[ref] = _Alias(await self._lookup(ref))
            return state.serving
        if time.monotonic() - state.checked >= self.config.ingress.registry_cache_s:
            state.checked = time.monotonic()
            target = await self._lookup(ref)
            if target == state.serving:
                state.warming = None  # moved back before the new one loaded: abandon that load
            elif target != state.warming:
                state.warming = target
                task = asyncio.create_task(self._switch(ref, state, target))
                self._tasks.add(task)  # held: the loop keeps only a weak reference
                task.add_done_callback(self._tasks.discard)
        return state.serving

    async def _switch(self, ref: str, state: _Alias, target: str) -> None:
        started = time.monotonic()
        try:
            await self.model.options(multiplexed_model_id=target).warm.remote()
        except Exception as e:  # the old version keeps serving; the next lookup tries again
            log.warning("%s: loading %s failed, still serving %s: %s", ref, target, state.serving, e)
            if state.warming == target:
                state.warming = None
            return
        if state.warming == target:
            log.info("%s: now %s (was %s; loaded in %.2f s)", ref, target, state.serving,
                     time.monotonic() - started)
            state.serving, state.warming = target, None

    async def models(self) -> ModelList:
        listed = self.cache.get("models")
        if listed is None:
            cards = await asyncio.to_thread(self.registry.list)
            latest = {card.name: card.version for card in cards}
            data = [ModelInfo(id=name, name=name, version=None, latest=True, method="base",
                              base_model=None, created_at=None) for name in sorted(self.config.base_models)]
            data += [ModelInfo(id=card.ref, name=card.name, version=card.version,
                               latest=latest[card.name] == card.version, method=card.method,
                               base_model=card.base_model if card.method != "full" else None,
                               created_at=card.created_at)
                     for card in cards if card.name not in self.config.base_models]
            listed = self.cache.put("models", ModelList(data=data))
        return listed

    async def generate(self, body) -> dict[str, Any]:
        # body.model is set: the request model has the configured default, or requires it.
        model_id = await self.resolve(body.model)
        request = body.model_dump(exclude={"model", "response_format"})
        if request["seed"] is None:
            request["seed"] = secrets.randbelow(MAX_SEED - body.n + 2)
        handle = self.model.options(multiplexed_model_id=model_id)
        try:
            result = await self._generate(handle, request, model_id)
        except BackPressureError as e:
            raise Overloaded("every model replica is busy and the queue is full; retry later",
                             where=model_id) from e
        except DeploymentUnavailableError as e:
            raise Overloaded("the model deployment is not available", where=model_id) from e
        except RayTaskError as e:
            raise _unwrap(e) from None
        return {"model": model_id, **result}


    async def _generate(self, handle: DeploymentHandle, request: dict[str, Any], model_id: str) -> dict:
        """The model deployment's answer, retried while the replica it went to has gone away:
        Serve routes the retry to another replica or the restarted one. Only that failure is
        retried; a model's error or a full queue is answered at once. The seed was fixed before
        the first attempt, so a retry draws the same images."""
        cfg = self.config.ingress

        def said(state) -> None:
            log.warning("model replica went away (%s); retry %d of %s", type(state.outcome.exception()).__name__,
                        state.attempt_number, model_id)
            self.metrics.retried(model_id)

        started = time.monotonic()
        try:
            async for attempt in AsyncRetrying(
                    retry=retry_if_exception_type(REPLICA_GONE),
                    stop=stop_after_attempt(cfg.replica_retries + 1) | stop_after_delay(cfg.replica_retry_s),
                    wait=wait_exponential(multiplier=0.25, max=4.0), before_sleep=said):
                with attempt:
                    return await handle.generate.remote(request)
        except RetryError as e:
            attempts = e.last_attempt.attempt_number
            raise Overloaded(f"the model replica went away and no replica answered: {attempts} "
                             f"attempt{'s' if attempts > 1 else ''} in {time.monotonic() - started:.1f} s "
                             f"(ingress.replica_retries {cfg.replica_retries}, replica_retry_s "
                             f"{cfg.replica_retry_s:g})", where=model_id) from e
        raise AssertionError("unreachable: AsyncRetrying returns or raises")


def build_api(ingress: APIIngress) -> FastAPI:
    """The FastAPI app of one ingress replica."""
    config = ingress.config
    Body = request_model(config)
    bearer = HTTPBearer(auto_error=False, description="An API key of this server.")

    app = FastAPI(
        title="Atelier image generation",
        version=atelier.__version__,
        description="Stable Diffusion models from the Atelier registry, served by Ray Serve.",
    )

    def authorized(credentials: HTTPAuthorizationCredentials | None = Depends(bearer)) -> None:
        ingress.keys.check(f"{credentials.scheme} {credentials.credentials}" if credentials else None)

    def error_response(error: AtelierError) -> JSONResponse:
        status = error.http_status
        body = ErrorResponse(error={"type": type(error).__name__, "message": str(error), "status": status})
        headers = {}
        if status == 503:
            headers["Retry-After"] = str(config.http.retry_after_s)
        if status == 401:
            headers["WWW-Authenticate"] = "Bearer"
        return JSONResponse(body.model_dump(), status_code=status, headers=headers)

    # The one place an error becomes an HTTP status: each AtelierError carries its own.
    @app.exception_handler(AtelierError)
    async def atelier_error(_: Request, error: AtelierError) -> JSONResponse:
        if error.http_status >= 500:
            log.warning("%s: %s", type(error).__name__, error)
        return error_response(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_request(_: Request, error: RequestValidationError) -> JSONResponse:
        return error_response(InvalidInput(_describe(error.errors())))

    # FastAPI answers a body it cannot even decode (bytes that are not UTF-8) with a bare 400;
    # to a client that is the same mistake as malformed JSON, so it gets the same 422.
    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, error: StarletteHTTPException) -> Response:
        if error.status_code == 400:
            return error_response(InvalidInput("the body is not valid JSON (not UTF-8 text)"))
        return await http_exception_handler(request, error)

    @app.exception_handler(Exception)
    async def unexpected(_: Request, error: Exception) -> JSONResponse:
        cause = _unwrap(error)
        if isinstance(cause, AtelierError):
            return error_response(cause)
        log.exception("unexpected error")
        return error_response(AtelierError(f"internal error ({type(cause).__name__})"))

    errors: dict[int | str, dict[str, Any]] = {
        401: {"model": ErrorResponse, "description": "No or wrong API key."},
        404: {"model": ErrorResponse, "description": "No such model."},
        422: {"model": ErrorResponse, "description": "A field is missing, malformed or out of bounds; "
              "the message names it."},
        424: {"model": ErrorResponse, "description": "The model exists but could not be loaded."},
        503: {"model": ErrorResponse, "description": "Overloaded or storage unreachable; see Retry-After."},
    }

    @app.post(
        GENERATIONS,
        dependencies=[Depends(authorized)],
        response_model=None,
        summary="Generate images",
        responses={
            # "model" puts GenerationResponse (and GeneratedImage) in components/schemas, so
            # every $ref of the document resolves; FastAPI adds the application/json entry.
            200: {
                "model": GenerationResponse,
                "description": "b64_json: the images as JSON; png: the image itself.",
                "content": {"image/png": {"schema": {"type": "string", "format": "binary"}}},
                "headers": {
                    "X-Atelier-Model": {"description": "The model version that made the images.",
                                        "schema": {"type": "string"}},
                    "X-Atelier-GPU": {"description": "The GPU type of the replica that made them "
                                      "(cpu, t4, a100).", "schema": {"type": "string"}},
                    "X-Atelier-Batch-Images": {
                        "description": "Images made by the pipeline call that made these: this "
                        "request's and those batched with it.",
                        "schema": {"type": "integer", "minimum": 1}},
                },
            },
            **errors,
        },
    )
    async def generations(body: Body) -> Response:  # type: ignore[valid-type]
        result = await ingress.generate(body)
        served = {"X-Atelier-Model": result["model"], "X-Atelier-GPU": result["gpu"],
                  "X-Atelier-Batch-Images": str(result["batch_images"])}
        if body.response_format == "png":  # type: ignore[attr-defined]  # Body is made at run time
            return Response(result["images"][0], media_type="image/png", headers={
                **served, "X-Atelier-Seed": str(result["seeds"][0]),
                "X-Atelier-Scheduler": result["scheduler"],
            })
        response = GenerationResponse(
            created=int(time.time()), model=result["model"], width=result["width"],
            height=result["height"], steps=result["steps"], guidance_scale=result["guidance_scale"],
            scheduler=result["scheduler"],
            data=[{"b64_json": base64.b64encode(png).decode(), "seed": seed}
                  for png, seed in zip(result["images"], result["seeds"], strict=True)],
        )
        return JSONResponse(response.model_dump(), headers=served)

    @app.get("/v1/models", response_model=ModelList, dependencies=[Depends(authorized)],
             summary="List the models", responses={401: errors[401]})
    async def list_models() -> ModelList:
        return await ingress.models()

    @app.get("/healthz", summary="Liveness: the ingress answers")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", summary="Readiness: the registry's storage answers",
             responses={503: errors[503]})
    async def readyz() -> dict[str, str]:
        # Model replicas are not called: with scale-to-zero a probe would keep one running.
        if ingress.cache.get("ready") is None:
            try:
                await asyncio.to_thread(ingress.storage.check)
            except AtelierError as e:  # a missing bucket too: not ready, whatever the cause
                raise ServiceError(f"not ready: {e}") from e
            ingress.cache.put("ready", True)
        return {"status": "ready"}

    return app


def _describe(errors: Sequence[Any]) -> str:
    """FastAPI's validation errors as `describe_validation_error` words pydantic's ("n: Input
    should be less than or equal to 4"), without the "body" every field starts with."""
    fields = []
    for item in errors:
        loc = list(item.get("loc", ()))
        if loc[:1] == ["body"]:
            loc = loc[1:]
        if item.get("type") == "json_invalid":
            return "the body is not valid JSON" + (f" (error at character {loc[0]})" if loc else "")
        if item.get("type") == "missing" and not loc:
            return "the body is missing: send a JSON object"
        fields.append({**item, "loc": loc})
    return describe_validation_error(fields)
