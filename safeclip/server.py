"""safeclip over HTTP: an ASGI application around one :class:`~safeclip.Moderator`.

``safeclip serve`` runs it under uvicorn; :func:`create_app` gives the same application to mount in your own. It is
built on Starlette rather than FastAPI: a smaller dependency with no pydantic, and it has four routes.

=================  =============================================================================================
``POST /v1/check``  the image as the raw body, or as the multipart field ``image``; ``?policy=NAME`` picks one of
                    the loaded policies. 200: the Decision JSON (``Decision.to_dict()``). 400 unknown policy or
                    malformed request, 401 missing/wrong token, 413 body over the limit, 422 undecodable image (the
                    typed error; with a fail-closed Moderator, ``on_error="flag"|"block"``, a 200 Decision
                    instead), 503 + ``Retry-After`` queue full, 504 no answer within the request timeout.
``GET /healthz``    200 while the process is alive.
``GET /readyz``     200 once the model is loaded and has run a warm-up forward under every policy, else 503.
``GET /metrics``    Prometheus text: requests by outcome, latency, batch sizes, queue depth (token-protected).
=================  =============================================================================================

The server reads images from request bodies only: it never fetches a URL. Every response carries ``X-Request-ID``
(a sane incoming one is kept); each request is one JSON line on the ``safeclip.server.access`` logger (id, method,
path, status, outcome, latency, batch size, action), never the image.

>>> from safeclip.server import create_app                                               # doctest: +SKIP
>>> moderator = safeclip.Moderator(on_error="block")                                     # doctest: +SKIP
>>> app = create_app(moderator, policies=["default", "strict"], token="s3cret")          # doctest: +SKIP
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import logging
import re
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, MutableMapping
from typing import Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from .decide import Decision
from .errors import ConfigError, DecodeError, OverloadedError, SafeclipError
from .moderator import Moderator
from .policy import Policy, load_policy

__all__ = ["create_app"]

_access_log = logging.getLogger("safeclip.server.access")
_log = logging.getLogger("safeclip.server")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: the outcomes ``safeclip_requests_total`` counts (POST /v1/check)
OUTCOMES = ("allow", "flag", "block", "failed_closed", "invalid_image", "bad_request", "unauthorized", "too_large",
            "overloaded", "timeout", "client_gone", "error")

ASGIApp = Callable[[MutableMapping[str, Any], Callable[[], Awaitable[Any]], Callable[[Any], Awaitable[None]]],
                   Awaitable[None]]


class _Metrics:
    def __init__(self, moderator: Moderator) -> None:
        self.registry = CollectorRegistry()
        self.requests = Counter("safeclip_requests", "POST /v1/check requests by outcome", ["outcome"],
                                registry=self.registry)
        for outcome in OUTCOMES:
            self.requests.labels(outcome)
        self.latency = Histogram("safeclip_request_duration_seconds", "POST /v1/check latency, body read to answer",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        self.batch_size = Histogram("safeclip_batch_size", "requests embedded together in one model forward",
                                    buckets=_BATCH_BUCKETS, registry=self.registry)
        self.batch_frames = Histogram("safeclip_batch_frames", "frames embedded together in one model forward",
                                      buckets=_BATCH_BUCKETS, registry=self.registry)
        self.forward = Histogram("safeclip_batch_duration_seconds", "time of one batch: forward, score, decide",
                                 buckets=_LATENCY_BUCKETS, registry=self.registry)
        Gauge("safeclip_queue_depth", "requests admitted and not yet in a forward (decoding or queued)",
              registry=self.registry).set_function(lambda: moderator.batcher.waiting)
        Gauge("safeclip_requests_in_flight", "requests admitted and not yet answered",
              registry=self.registry).set_function(lambda: moderator.batcher.in_flight)
        Gauge("safeclip_queue_capacity", "requests the queue admits at once (max_queue)",
              registry=self.registry).set_function(lambda: moderator.batcher.max_queue)
        moderator.batcher.add_observer(self._batch)

    def _batch(self, n_requests: int, n_frames: int, seconds: float) -> None:
        self.batch_size.observe(n_requests)
        self.batch_frames.observe(n_frames)
        self.forward.observe(seconds)


def _error(status: int, kind: str, message: str, headers: dict[str, str] | None = None) -> Response:
    body = json.dumps({"error": {"type": kind, "message": message}})
    return Response(body, status_code=status, media_type="application/json", headers=headers)


def _authorized(request: Request, token: str | None) -> bool:
    if token is None:
        return True
    scheme, _, given = request.headers.get("authorization", "").partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), token.encode())


def _unauthorized() -> Response:
    return _error(401, "Unauthorized", "a bearer token is required: Authorization: Bearer <token>",
                  {"WWW-Authenticate": 'Bearer realm="safeclip"'})


class _TooLarge(Exception):
    pass


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise _TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart_image(request: Request, body: bytes) -> bytes | None:
    """The ``image`` file part of a multipart body already read (and bounded); None when there is none."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
    try:
        field = form.get("image")
        # A plain (non-file) field holds text, not bytes: an image sent that way arrives mangled, so it is refused.
        return await field.read() if isinstance(field, UploadFile) else None
    finally:
        await form.close()


async def _until_disconnect(receive: Callable[[], Awaitable[Any]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


def create_app(
    moderator: Moderator,
    *,
    policies: Iterable[str | Policy] | None = None,
    token: str | None = None,
    max_body_bytes: int = 20 * 2**20,
    timeout_s: float = 30.0,
    retry_after_s: int = 1,
    warm_up: bool = True,
) -> Starlette:
    """The ASGI application serving ``moderator``.

    ``policies``: the policies ``?policy=NAME`` may pick (shipped names or YAML paths), by their ``name``; the first
    is the default (none given: the Moderator's own). They are compiled here, before the first request. ``token``:
    required as ``Authorization: Bearer <token>`` on ``/v1/check`` and ``/metrics`` (compared in constant time).
    ``max_body_bytes``: a larger body is answered 413 without being read past the limit. ``timeout_s``: a request
    not answered in time (body read, queue, decode, forward) is answered 504 (408 while its body is still arriving)
    and dropped if it has not reached a forward. ``warm_up``: run one forward per policy at start-up before
    ``/readyz`` answers 200.

    The Moderator's ``on_error`` decides undecodable images: ``"raise"`` answers 422, ``"flag"``/``"block"`` a
    fail-closed Decision. Its ``max_queue`` bounds the requests in flight; one more is answered 503.
    """
    if token is not None and not token:
        raise ConfigError("the bearer token is empty")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ConfigError(f"max_body_bytes must be a positive integer, not {max_body_bytes!r}")
    if not timeout_s > 0:
        raise ConfigError(f"timeout_s must be a positive number of seconds, not {timeout_s!r}")
    loaded: dict[str, Policy] = {}
    for p in (list(policies) if policies is not None else []) or [moderator.policy]:
        pol = p if isinstance(p, Policy) else load_policy(p, allow_outside=moderator.allow_outside)
        if pol.name in loaded:
            raise ConfigError(f"two loaded policies are named {pol.name!r}; ?policy=NAME would be ambiguous")
        moderator.compiled(pol)
        loaded[pol.name] = pol
    default_policy = next(iter(loaded.values()))
    metrics = _Metrics(moderator)
    ready = threading.Event()
    warm_error: list[str] = []

    def warm() -> None:
        try:
            size = moderator.encoder.pixel_spec.size
            for pol in loaded.values():
                moderator.check(np.full((size, size, 3), 127, np.uint8), policy=pol)
            ready.set()
        except Exception as e:  # noqa: BLE001 - reported by /readyz and the log, the process stays up
            warm_error.append(f"{type(e).__name__}: {e}")
            _log.error("warm-up failed: %s", warm_error[0])

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        if warm_up:
            asyncio.get_running_loop().run_in_executor(None, warm)
        else:
            ready.set()
        yield

    async def check(request: Request) -> Response:
        log = request.scope.setdefault("safeclip.log", {})
        t0 = time.monotonic()

        def answer(outcome: str, response: Response) -> Response:
            log["outcome"] = outcome
            metrics.requests.labels(outcome).inc()
            metrics.latency.observe(time.monotonic() - t0)
            return response

        if not _authorized(request, token):
            return answer("unauthorized", _unauthorized())
        name = request.query_params.get("policy")
        pol = default_policy if name is None else loaded.get(name)
        if pol is None:
            return answer("bad_request", _error(400, "UnknownPolicy", f"policy {name!r} is not loaded; loaded: "
                                                                       f"{', '.join(loaded)}"))
        overloaded = {"Retry-After": str(retry_after_s)}
        if moderator.batcher.in_flight >= moderator.batcher.max_queue:  # cheap refusal before reading the body
            return answer("overloaded", _error(503, "OverloadedError", "the queue is full; retry later", overloaded))
        try:
            body = await asyncio.wait_for(_read_body(request, max_body_bytes), timeout_s)
            if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
                image = await _multipart_image(request, body)
                if image is None:
                    return answer("bad_request", _error(400, "MissingImage", "the multipart body has no file part "
                                                                             "named image (curl -F image=@photo.jpg)"))
            else:
                image = body
        except _TooLarge:
            return answer("too_large", _error(413, "PayloadTooLarge", f"the body exceeds {max_body_bytes} bytes"))
        except asyncio.TimeoutError:
            return answer("timeout", _error(408, "RequestTimeout", f"the body did not arrive within {timeout_s} s"))
        except ClientDisconnect:
            return answer("client_gone", Response(status_code=499))
        except Exception as e:  # noqa: BLE001 - a malformed multipart body
            return answer("bad_request", _error(400, "MalformedBody", f"the multipart body cannot be parsed: {e}"))
        if not image:
            return answer("invalid_image", _error(422, "EmptyBody", "the body is empty: send the image bytes"))
        try:
            ticket = moderator.admit()
        except OverloadedError as e:
            return answer("overloaded", _error(503, "OverloadedError", str(e), overloaded))
        with ticket:
            job = asyncio.ensure_future(moderator.check_async(image, policy=pol, ticket=ticket))
            gone = asyncio.ensure_future(_until_disconnect(request.receive))
            remaining = max(0.0, timeout_s - (time.monotonic() - t0))
            await asyncio.wait({job, gone}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
            gone.cancel()
            if not job.done():
                job.cancel()
                await asyncio.gather(job, return_exceptions=True)
                if gone.done() and not gone.cancelled():
                    return answer("client_gone", Response(status_code=499))
                return answer("timeout", _error(504, "Timeout", f"no decision within {timeout_s} s; retry later"))
            log["batch_size"] = ticket.batch_requests
        try:
            decision: Decision = job.result()
        except DecodeError as e:
            return answer("invalid_image", _error(422, type(e).__name__, str(e)))
        except OverloadedError as e:
            return answer("overloaded", _error(503, "OverloadedError", str(e), overloaded))
        except SafeclipError as e:
            return answer("error", _error(500, type(e).__name__, str(e)))
        except Exception as e:  # noqa: BLE001 - the model failed; the answer is an error, never a guess
            _log.exception("request %s failed", log.get("id"))
            return answer("error", _error(500, "InternalError", f"{type(e).__name__}: the request could not be "
                                                                "decided"))
        log["action"] = decision.action
        return answer("failed_closed" if decision.error else decision.action,
                      Response(decision.to_json(), media_type="application/json"))

    async def healthz(request: Request) -> Response:
        return Response('{"status": "ok"}', media_type="application/json")

    async def readyz(request: Request) -> Response:
        if ready.is_set():
            return Response('{"status": "ready"}', media_type="application/json")
        body = {"status": "failed", "error": warm_error[0]} if warm_error else {"status": "warming up"}
        return Response(json.dumps(body), status_code=503, media_type="application/json")

    async def metrics_text(request: Request) -> Response:
        if not _authorized(request, token):
            return _unauthorized()
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    app = Starlette(routes=[
        Route("/v1/check", check, methods=["POST"]),
        Route("/healthz", healthz, methods=["GET"]),
        Route("/readyz", readyz, methods=["GET"]),
        Route("/metrics", metrics_text, methods=["GET"]),
    ], lifespan=lifespan)
    app.state.metrics_registry = metrics.registry
    app.add_middleware(_RequestLog)
    return app


class _RequestLog:
    """ASGI middleware: a request id on every response, and one JSON access-log line per request."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: MutableMapping[str, Any], receive: Callable[[], Awaitable[Any]],
                       send: Callable[[Any], Awaitable[None]]) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = dict(scope.get("headers") or ()).get(b"x-request-id", b"").decode("latin-1")
        rid = incoming if _REQUEST_ID.fullmatch(incoming) else uuid.uuid4().hex
        log: dict[str, Any] = {"id": rid}
        scope["safeclip.log"] = log
        status = [500]
        t0 = time.monotonic()

        async def send_with_id(message: Any) -> None:
            if message["type"] == "http.response.start":
                status[0] = message["status"]
                message = {**message, "headers": [*message.get("headers", ()), (b"x-request-id", rid.encode())]}
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            _access_log.info(json.dumps({
                "id": rid, "method": scope.get("method"), "path": scope.get("path"), "status": status[0],
                "outcome": log.get("outcome"), "latency_ms": round((time.monotonic() - t0) * 1e3, 2),
                "batch_size": log.get("batch_size"), "action": log.get("action"),
            }))
