"""safeclip over HTTP: an ASGI application around one :class:`~safeclip.Moderator`.

``safeclip serve`` runs it under uvicorn, with :func:`uvicorn_protocol` closing connections that send no request
head in time and keeping the connection limit from ever refusing the probes; :func:`create_app` gives the same
application to mount in your own. It is built on Starlette rather than FastAPI: a smaller dependency with no
pydantic, and it has a handful of routes.

=================  =============================================================================================
``POST /v1/check``  the image (or video) as the raw body, or as the multipart field ``image``; ``?policy=NAME`` picks one of
                    the loaded policies. 200: the Decision JSON (``Decision.to_dict()``). 400 unknown policy or
                    malformed request, 401 missing/wrong token, 413 body over the limit, 422 undecodable image (the
                    typed error; with a fail-closed Moderator, ``on_error="flag"|"block"``, a 200 Decision
                    instead), 503 + ``Retry-After`` queue full or body budget spent (refused before the body is
                    read), 504 no answer within the request timeout.
``GET /healthz``    200 while the process is alive.
``GET /readyz``     200 once the model is loaded and has run a warm-up forward under every policy, else 503.
``GET /metrics``    Prometheus text: requests by outcome, latency, batch sizes, queue depth, the review hook's counts
                   (token-protected).
=================  =============================================================================================

With a review store (``create_app(review=...)``, ``safeclip serve --review STORE``), reviewers' routes too; each
``/v1/review`` route is behind the same bearer token as ``/v1/check``, answers errors in the same JSON shape (400
invalid verdict or reviewer, 401 missing/wrong token, 404 no such item, 503 + ``Retry-After`` the store's database
cannot be reached; ``/v1/check`` never depends on the store) and is never cached (``Cache-Control: no-store``):

===================================  ===========================================================================
``GET /v1/review/next?reviewer=R``   claims the next item for reviewer ``R`` (``ReviewStore.next``): 200 the item
                                     JSON (``ReviewItem.to_dict()``), 204 when the queue is empty.
``GET /v1/review/{id}``              200 the item JSON with its verdicts.
``GET /v1/review/{id}/thumbnail``    200 ``image/jpeg``; 404 when the item has none.
``POST /v1/review/{id}/verdict``     JSON ``{"action": "allow"|"flag"|"block", "reviewer": R, "category"?: C,
                                     "note"?: TEXT}``: 201 the verdict JSON (``Verdict.to_dict()``: who and when).
                                     An earlier verdict on the item is kept beside it.
``POST /v1/review/{id}/skip``        ``?reviewer=R`` passes the item on (``ReviewStore.skip``): 200
                                     ``{"skipped": true}`` when ``R`` held it, which sends it to the back of the
                                     queue; ``false`` when it has a verdict or another holds it (left as it is).
``GET /review``                      the HTML review page (no token needed to load it: it asks for the token
                                     and sends it with each call; no external assets, a strict CSP).
===================================  ===========================================================================

Videos: a body whose Content-Type (the request's, or the multipart part's) is one of :data:`VIDEO_TYPES` may be up
to ``max_video_bytes`` (``safeclip serve --max-video-mb``) instead of ``max_body_bytes``; it is decided by
``Moderator.check_async`` like an image, its frames in chunks, stopping at the first ``block`` (the Moderator's
``early_stop``), and answered with the Decision JSON (``segments``, ``frames_scored``, ``sampling``). The request
timeout covers the whole clip.

The Decision's ``matches`` lists the bank entries the image matched (policies with ``banks:``); the banks are
re-read when they change (at most every second), so entries added, disabled or removed with ``safeclip bank`` are
answered without a restart.

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
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import UploadFile
from starlette.requests import ClientDisconnect, Request
from starlette.responses import Response
from starlette.routing import Route

from ._review_page import PAGE, PAGE_HEADERS
from .decide import Decision
from .errors import (ConfigError, DecodeError, InvalidVerdictError, OverloadedError, ReviewError,
                     ReviewItemNotFoundError, ReviewStoreUnavailableError, SafeclipError, one_line)
from .moderator import Moderator
from .policy import Policy, load_policy
from .review import ReviewStore

__all__ = ["VIDEO_TYPES", "create_app", "uvicorn_protocol"]

#: Content types whose bodies may be as large as ``max_video_bytes``
VIDEO_TYPES = ("video/mp4", "video/webm", "video/quicktime", "video/x-matroska")

_access_log = logging.getLogger("safeclip.server.access")
_log = logging.getLogger("safeclip.server")
_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_BATCH_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256)
#: the outcomes ``safeclip_requests_total`` counts (POST /v1/check)
OUTCOMES = ("allow", "flag", "block", "failed_closed", "invalid_image", "bad_request", "unauthorized", "too_large",
            "overloaded", "timeout", "client_gone", "error")

#: scope key the connection guard (:func:`uvicorn_protocol`) sets on a request that came over its connection limit
_OVER_CONNECTION_LIMIT = "safeclip.over_connection_limit"

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
        Gauge("safeclip_queue_depth", "requests admitted and not yet in a forward (receiving, decoding or queued)",
              registry=self.registry).set_function(lambda: moderator.batcher.waiting)
        Gauge("safeclip_requests_in_flight", "requests admitted and not yet answered",
              registry=self.registry).set_function(lambda: moderator.batcher.in_flight)
        Gauge("safeclip_queue_capacity", "requests the queue admits at once (max_queue)",
              registry=self.registry).set_function(lambda: moderator.batcher.max_queue)
        self.connections_open = Gauge("safeclip_connections_open", "HTTP connections open (safeclip serve)",
                                      registry=self.registry)
        self.connections_closed = Counter(
            "safeclip_connections_closed", "connections the server closed on its own (safeclip serve): "
            "header_timeout (no complete request head in time), evicted (idle, to make room under max_connections)",
            ["reason"], registry=self.registry)
        for reason in ("header_timeout", "evicted"):
            self.connections_closed.labels(reason)
        queue = moderator.review
        if queue is not None:  # the review hook: a store that fails shows here, never as a failed request
            review = Gauge("safeclip_review_items", "decisions the review hook handled since start, by state: sampled, "
                           "written (duplicates among them), failed (lost), spooled, replayed, dropped, pending",
                           ["state"], registry=self.registry)
            for state in ("sampled", "written", "duplicates", "failed", "spooled", "replayed", "dropped", "pending"):
                review.labels(state).set_function(lambda state=state: getattr(queue.stats, state))
        moderator.batcher.add_observer(self._batch)

    def _batch(self, n_requests: int, n_frames: int, seconds: float) -> None:
        self.batch_size.observe(n_requests)
        self.batch_frames.observe(n_frames)
        self.forward.observe(seconds)


class _Problem(Exception):
    """A request the server refuses on its own (not a safeclip error); ``kind`` is the error type it answers."""

    kind = "BadRequest"


class _Unauthorized(_Problem):
    kind = "Unauthorized"

    def __init__(self) -> None:
        super().__init__("a bearer token is required: Authorization: Bearer <token>")


class _UnknownPolicy(_Problem):
    kind = "UnknownPolicy"


class _MissingImage(_Problem):
    kind = "MissingImage"


class _MalformedBody(_Problem):
    kind = "MalformedBody"


class _DuplicateImage(_Problem):
    kind = "DuplicateImage"


class _TooLarge(_Problem):
    kind = "PayloadTooLarge"


class _BodyTimeout(_Problem):
    kind = "RequestTimeout"


class _NoDecision(_Problem):
    kind = "Timeout"


class _EmptyBody(_Problem):
    kind = "EmptyBody"


class _ClientGone(_Problem):
    kind = "ClientGone"


class _InvalidVerdict(_Problem):
    kind = "InvalidVerdict"


class _NotFound(_Problem):
    kind = "NotFound"


@dataclass(frozen=True)
class _Answer:
    """How an exception is answered: status, ``safeclip_requests_total`` outcome, extra headers."""

    status: int
    outcome: str
    headers: tuple[tuple[str, str], ...] = ()
    retry_after: bool = False  # a Retry-After header (create_app's retry_after_s)
    body: bool = True  # 499 (the client is gone) has nobody to read a body
    internal: bool = False  # not ours: the message is withheld and the traceback logged


#: Every refusal of the server, by exception class: the most specific class in an exception's MRO wins.
_ANSWERS: dict[type[BaseException], _Answer] = {
    _Unauthorized: _Answer(401, "unauthorized", (("WWW-Authenticate", 'Bearer realm="safeclip"'),)),
    _Problem: _Answer(400, "bad_request"),  # unknown policy, no image part, malformed multipart
    _TooLarge: _Answer(413, "too_large"),
    _BodyTimeout: _Answer(408, "timeout"),
    _EmptyBody: _Answer(422, "invalid_image"),
    _ClientGone: _Answer(499, "client_gone", body=False),
    ClientDisconnect: _Answer(499, "client_gone", body=False),
    _NoDecision: _Answer(504, "timeout"),
    DecodeError: _Answer(422, "invalid_image"),
    OverloadedError: _Answer(503, "overloaded", retry_after=True),
    # The review routes' (never counted in safeclip_requests_total: only the access log shows their outcome).
    _NotFound: _Answer(404, "not_found"),
    # The store's other refusals; the routes turn its unknown-item and invalid-verdict errors into _NotFound and
    # _InvalidVerdict themselves, so that the answer does not name where the store lives.
    ReviewError: _Answer(400, "bad_request"),
    ReviewStoreUnavailableError: _Answer(503, "review_unavailable", retry_after=True),
    SafeclipError: _Answer(500, "error"),
    Exception: _Answer(500, "error", internal=True),  # the model failed: an error, never a guess
}


def _answer_of(error: BaseException) -> _Answer:
    return next(_ANSWERS[cls] for cls in type(error).__mro__ if cls in _ANSWERS)


def _error_response(error: BaseException, retry_after_s: int) -> tuple[_Answer, Response]:
    """The answer to ``error`` from the one table (:data:`_ANSWERS`)."""
    answer = _answer_of(error)
    headers = dict(answer.headers)
    if answer.retry_after:
        headers["Retry-After"] = str(retry_after_s)
    if not answer.body:
        return answer, Response(status_code=answer.status, headers=headers)
    if answer.internal:
        kind, message = "InternalError", f"{type(error).__name__}: the request could not be decided"
    else:
        kind, message = (error.kind if isinstance(error, _Problem) else type(error).__name__), str(error)
    body = json.dumps({"error": {"type": kind, "message": message}})
    return answer, Response(body, status_code=answer.status, media_type="application/json", headers=headers)


@dataclass(frozen=True)
class _Settings:
    """What :func:`create_app` was given, checked: the handlers read it from ``app.state.safeclip``."""

    moderator: Moderator
    policies: dict[str, Policy]
    token: bytes | None
    max_body_bytes: int
    max_video_bytes: int
    bodies: _BodyBudget
    timeout_s: float
    retry_after_s: int
    warm_up: bool
    metrics: _Metrics
    review: ReviewStore | None = None
    ready: threading.Event = field(default_factory=threading.Event)
    warm_error: list[str] = field(default_factory=list)

    @property
    def default_policy(self) -> Policy:
        return next(iter(self.policies.values()))

    def body_limit(self, request: Request) -> int:
        """The largest body ``request`` may send: a video's (by Content-Type), else an image's; a multipart body may
        hold either (its part's type is checked once read)."""
        ctype = request.headers.get("content-type", "")
        if _is_video(ctype):
            return self.max_video_bytes
        if ctype.lower().startswith("multipart/form-data"):
            return max(self.max_body_bytes, self.max_video_bytes)
        return self.max_body_bytes


def _is_video(content_type: str | None) -> bool:
    return (content_type or "").split(";")[0].strip().lower() in VIDEO_TYPES


def _settings(request: Request) -> _Settings:
    return request.app.state.safeclip


def _token_bytes(token: str) -> bytes:
    """A token as the UTF-8 bytes a client sends (an environment variable's undecodable bytes kept as they were)."""
    return token.encode("utf-8", "surrogateescape")


def _authorized(request: Request, token: bytes | None) -> bool:
    """``Authorization: Bearer <token>``, compared as bytes in constant time (headers arrive as bytes: Starlette
    gives them as latin-1 text, which encodes back to the bytes sent)."""
    if token is None:
        return True
    scheme, _, given = request.headers.get("authorization", "").encode("latin-1").partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), token)


class _BodyBudget:
    """The bytes of request bodies held at once, all requests together: taken before a body is read (its
    Content-Length; a body without one counts as the body limit), given back when the request is answered."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.held = 0  # only touched from the event loop: no lock

    @contextlib.contextmanager
    def take(self, n: int) -> Iterator[None]:
        if self.held + n > self.limit:
            raise OverloadedError(f"request bodies of {self.held} bytes are being held; {n} more would pass the "
                                  f"{self.limit}-byte budget for bodies; retry later")
        self.held += n
        try:
            yield
        finally:
            self.held -= n


def _declared_length(request: Request) -> int | None:
    declared = request.headers.get("content-length")
    return int(declared) if declared is not None and declared.isascii() and declared.isdigit() else None


async def _read_body(request: Request, limit: int) -> bytes:
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise _TooLarge(f"the body exceeds {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


async def _multipart_image(request: Request, body: bytes, max_image_bytes: int) -> bytes:
    """The ``image`` file part of a multipart body already read (and bounded); a part that is not a video (by its
    Content-Type) may hold at most ``max_image_bytes``."""
    sent = False

    async def replay() -> dict[str, Any]:
        nonlocal sent
        if sent:
            return {"type": "http.disconnect"}
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    try:
        form = await Request(request.scope, replay).form(max_files=4, max_fields=16)
    except Exception as e:  # noqa: BLE001 - whatever the multipart parser rejects
        raise _MalformedBody(f"the multipart body cannot be parsed: {e}") from e
    try:
        fields = form.getlist("image")
        if len(fields) > 1:  # which one would be moderated is the client's guess: none is
            raise _DuplicateImage(f"the multipart body has {len(fields)} parts named image; send one image per "
                                  "request")
        field = fields[0] if fields else None
        # A plain (non-file) field holds text, not bytes: an image sent that way arrives mangled, so it is refused.
        if not isinstance(field, UploadFile):
            raise _MissingImage("the multipart body has no file part named image (curl -F image=@photo.jpg)")
        if not _is_video(field.content_type) and (field.size or 0) > max_image_bytes:
            raise _TooLarge(f"the image part exceeds {max_image_bytes} bytes (a video part may be larger: send it "
                            f"with a video Content-Type, one of {', '.join(VIDEO_TYPES)})")
        return await field.read()
    finally:
        await form.close()


async def _until_disconnect(receive: Callable[[], Awaitable[Any]]) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def _request_image(request: Request, settings: _Settings, limit: int) -> bytes:
    """The image (or video) bytes of a request: the raw body or its multipart ``image`` part, read within the
    limits (``limit``: :meth:`_Settings.body_limit`)."""
    try:
        body = await asyncio.wait_for(_read_body(request, limit), settings.timeout_s)
    except asyncio.TimeoutError as e:
        raise _BodyTimeout(f"the body did not arrive within {settings.timeout_s} s") from e
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        return await _multipart_image(request, body, settings.max_body_bytes)
    return body


async def _decide(request: Request, settings: _Settings, t0: float, log: dict[str, Any]) -> Decision:
    """The Decision of one POST /v1/check, or the exception :data:`_ANSWERS` turns into its answer."""
    if _OVER_CONNECTION_LIMIT in request.scope:
        raise OverloadedError(f"all {request.scope[_OVER_CONNECTION_LIMIT]} connections the server keeps open have a "
                              "request in progress (max_connections); retry later")
    if not _authorized(request, settings.token):
        raise _Unauthorized
    name = request.query_params.get("policy")
    pol = settings.default_policy if name is None else settings.policies.get(name)
    if pol is None:
        raise _UnknownPolicy(f"policy {name!r} is not loaded; loaded: {', '.join(settings.policies)}")
    declared = _declared_length(request)
    limit = settings.body_limit(request)
    if declared is not None and declared > limit:
        raise _TooLarge(f"the body exceeds {limit} bytes")
    moderator = settings.moderator
    # The queue place and the body's bytes are taken before the body is read: a request refused for either has
    # nothing of its body in memory, and at most max_queue bodies (within the budget) are ever held at once.
    with moderator.admit() as ticket, settings.bodies.take(limit if declared is None else declared):
        image = await _request_image(request, settings, limit)
        if not image:
            raise _EmptyBody("the body is empty: send the image bytes")
        job = asyncio.ensure_future(moderator.check_async(image, policy=pol, ticket=ticket))
        gone = asyncio.ensure_future(_until_disconnect(request.receive))
        remaining = max(0.0, settings.timeout_s - (time.monotonic() - t0))
        await asyncio.wait({job, gone}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        gone.cancel()
        if not job.done():
            job.cancel()
            await asyncio.gather(job, return_exceptions=True)
            if gone.done() and not gone.cancelled():
                raise _ClientGone("the client went away before the decision")
            raise _NoDecision(f"no decision within {settings.timeout_s} s; retry later")
        log["batch_size"] = ticket.batch_requests
    return job.result()


async def _check(request: Request) -> Response:
    """POST /v1/check: the Decision, or the answer to what stopped it; counted by outcome either way."""
    settings = _settings(request)
    log = request.scope.setdefault("safeclip.log", {})
    t0 = time.monotonic()
    try:
        decision = await _decide(request, settings, t0, log)
    except Exception as e:  # noqa: BLE001 - every failure is answered from the one table
        answer, response = _error_response(e, settings.retry_after_s)
        if answer.internal:
            _log.error("request %s failed", log.get("id"), exc_info=e)
        outcome = answer.outcome
    else:
        log["action"] = decision.action
        outcome = "failed_closed" if decision.error else decision.action
        response = Response(decision.to_json(), media_type="application/json")
    log["outcome"] = outcome
    settings.metrics.requests.labels(outcome).inc()
    settings.metrics.latency.observe(time.monotonic() - t0)
    return response


async def _healthz(request: Request) -> Response:
    return Response('{"status": "ok"}', media_type="application/json")


async def _readyz(request: Request) -> Response:
    settings = _settings(request)
    if settings.ready.is_set():
        return Response('{"status": "ready"}', media_type="application/json")
    body = {"status": "failed", "error": settings.warm_error[0]} if settings.warm_error else {"status": "warming up"}
    return Response(json.dumps(body), status_code=503, media_type="application/json")


async def _metrics(request: Request) -> Response:
    settings = _settings(request)
    if not _authorized(request, settings.token):
        return _error_response(_Unauthorized(), settings.retry_after_s)[1]
    return Response(generate_latest(settings.metrics.registry), media_type=CONTENT_TYPE_LATEST)


#: The largest verdict body read (a verdict is a few short fields; a long note still fits)
_MAX_VERDICT_BYTES = 64 * 1024
_MAX_REVIEWER_CHARS = 200
_VERDICT_FIELDS = ("action", "reviewer", "category", "note")


def _json(data: Any, status: int = 200) -> Response:
    return Response(json.dumps(data), status_code=status, media_type="application/json")


def _shown(value: Any) -> str:
    """``value`` as a refusal quotes it: its repr, cut short."""
    return one_line(repr(value), 60)


def _reviewer(value: Any) -> str:
    """A reviewer's name as given (surrounding blanks stripped): 1 to 200 printable characters."""
    name = value.strip() if isinstance(value, str) else ""
    if not name or len(name) > _MAX_REVIEWER_CHARS or not name.isprintable():
        raise _InvalidVerdict(f"reviewer must be a name of 1 to {_MAX_REVIEWER_CHARS} printable characters "
                              f"(?reviewer=NAME, or \"reviewer\" in a verdict), not {_shown(value)}")
    return name


def _review_route(handler: Callable[[Request, ReviewStore], Awaitable[Response]]) -> Callable[[Request],
                                                                                              Awaitable[Response]]:
    """A ``/v1/review`` route: the bearer token checked, every failure answered from the one table, nothing cached.
    The handler runs the store's (blocking) calls in the thread pool."""
    async def route(request: Request) -> Response:
        settings = _settings(request)
        log = request.scope.setdefault("safeclip.log", {})
        assert settings.review is not None  # the routes exist only with a store
        try:
            if not _authorized(request, settings.token):
                raise _Unauthorized
            try:
                response = await handler(request, settings.review)
            except ReviewItemNotFoundError as e:  # the store's messages name its location: not for a client
                raise _NotFound(f"there is no review item {e.item_id}") from e
            except InvalidVerdictError as e:
                raise _InvalidVerdict(e.reason) from e
            log["outcome"] = "ok"
        except Exception as e:  # noqa: BLE001 - every failure is answered from the one table
            answer, response = _error_response(e, settings.retry_after_s)
            if answer.internal:
                _log.error("request %s failed", log.get("id"), exc_info=e)
            log["outcome"] = answer.outcome
        response.headers["Cache-Control"] = "no-store"
        return response

    return route


@_review_route
async def _review_next(request: Request, store: ReviewStore) -> Response:
    item = await run_in_threadpool(store.next, _reviewer(request.query_params.get("reviewer")))
    return Response(status_code=204) if item is None else _json(item.to_dict())


@_review_route
async def _review_item(request: Request, store: ReviewStore) -> Response:
    item = await run_in_threadpool(store.get, request.path_params["item_id"])
    return _json(item.to_dict())


@_review_route
async def _review_thumbnail(request: Request, store: ReviewStore) -> Response:
    item_id = request.path_params["item_id"]
    jpeg = await run_in_threadpool(store.thumbnail, item_id)
    if jpeg is None:
        raise _NotFound(f"review item {item_id} has no thumbnail")
    return Response(jpeg, media_type="image/jpeg")


async def _verdict_fields(request: Request, timeout_s: float) -> dict[str, Any]:
    """The verdict a POST body asks for, checked: ``action``, ``reviewer``, ``category`` and ``note`` (an empty
    category or note, as a form sends it, is none)."""
    try:
        body = await asyncio.wait_for(_read_body(request, _MAX_VERDICT_BYTES), timeout_s)
    except asyncio.TimeoutError as e:
        raise _BodyTimeout(f"the body did not arrive within {timeout_s} s") from e
    try:
        data = json.loads(body)
    except ValueError as e:
        raise _MalformedBody(f"the verdict is not JSON ({e}): send "
                             '{"action": "block", "reviewer": "NAME"}') from e
    if not isinstance(data, dict):
        raise _MalformedBody('the verdict must be a JSON object: {"action": "block", "reviewer": "NAME"}')
    unknown = sorted(set(data) - set(_VERDICT_FIELDS))
    if unknown:
        raise _InvalidVerdict(f"unknown verdict field(s) {', '.join(map(_shown, unknown))}; a verdict has "
                              f"{', '.join(_VERDICT_FIELDS)}")
    out = {"action": data.get("action"), "reviewer": _reviewer(data.get("reviewer"))}  # the store checks the action
    for key in ("category", "note"):
        value = data.get(key)
        if value is not None and not isinstance(value, str):
            raise _InvalidVerdict(f"{key} must be a string or null, not {_shown(value)}")
        out[key] = value or None
    return out


@_review_route
async def _review_verdict(request: Request, store: ReviewStore) -> Response:
    item_id = request.path_params["item_id"]
    fields = await _verdict_fields(request, _settings(request).timeout_s)

    verdict = await run_in_threadpool(store.verdict, item_id, fields["action"], reviewer=fields["reviewer"],
                                      category=fields["category"], note=fields["note"])
    return _json(verdict.to_dict(), 201)


@_review_route
async def _review_skip(request: Request, store: ReviewStore) -> Response:
    reviewer = _reviewer(request.query_params.get("reviewer"))
    skipped = await run_in_threadpool(store.skip, request.path_params["item_id"], reviewer)
    return _json({"skipped": skipped})


async def _review_page(request: Request) -> Response:
    return Response(PAGE, media_type="text/html", headers=PAGE_HEADERS)


def _warm(settings: _Settings) -> None:
    """One forward per policy, then ``/readyz`` answers 200; a failure is reported by /readyz and the log."""
    try:
        size = settings.moderator.encoder.pixel_spec.size
        for pol in settings.policies.values():
            # review=False: a warm-up is no decision on an upload; it never goes to the review queue
            settings.moderator.check(np.full((size, size, 3), 127, np.uint8), policy=pol, review=False)
        settings.ready.set()
    except Exception as e:  # noqa: BLE001 - the process stays up
        settings.warm_error.append(f"{type(e).__name__}: {e}")
        _log.error("warm-up failed: %s", settings.warm_error[0])


@contextlib.asynccontextmanager
async def _lifespan(app: Starlette) -> AsyncIterator[None]:
    settings: _Settings = app.state.safeclip
    if settings.warm_up:
        asyncio.get_running_loop().run_in_executor(None, _warm, settings)
    else:
        settings.ready.set()
    yield


def create_app(
    moderator: Moderator,
    *,
    policies: Iterable[str | Policy] | None = None,
    token: str | None = None,
    max_body_bytes: int = 20 * 2**20,
    max_video_bytes: int | None = None,
    max_body_budget_bytes: int | None = None,
    timeout_s: float = 30.0,
    retry_after_s: int = 1,
    warm_up: bool = True,
    review: ReviewStore | None = None,
) -> Starlette:
    """The ASGI application serving ``moderator``.

    ``policies``: the policies ``?policy=NAME`` may pick (shipped names or YAML paths), by their ``name``; the first
    is the default (none given: the Moderator's own). They are compiled here, before the first request. ``token``:
    required as ``Authorization: Bearer <token>`` on ``/v1/check`` and ``/metrics`` (compared in constant time, as
    UTF-8 bytes: a non-ASCII token works with any client that sends it in UTF-8).
    ``max_body_bytes``: a larger body is answered 413 without being read past the limit. ``max_video_bytes``: the
    same for a video body (Content-Type one of :data:`VIDEO_TYPES`; default: ``max_body_bytes``; the decoder's
    ``DecodeLimits.max_bytes`` still applies). ``max_body_budget_bytes``: the bytes of request bodies held at once, all requests together (default:
    512 MiB, or the larger body limit if larger); a request whose Content-Length would pass it (without one: ``max_body_bytes``)
    is answered 503 before its body is read. ``timeout_s``: a request
    not answered in time (body read, queue, decode, forward) is answered 504 (408 while its body is still arriving)
    and dropped if it has not reached a forward. ``warm_up``: run one forward per policy at start-up before
    ``/readyz`` answers 200. ``review``: an open review store: adds the ``/v1/review`` routes and the ``/review``
    page (see the module's table); the caller opens and closes it.

    The Moderator's ``on_error`` decides undecodable images: ``"raise"`` answers 422, ``"flag"``/``"block"`` a
    fail-closed Decision. Its ``max_queue`` bounds the requests in flight, bodies being received included (the
    place is taken before the body is read); one more is answered 503.
    """
    if token is not None and not token:
        raise ConfigError("the bearer token is empty")
    if isinstance(max_body_bytes, bool) or not isinstance(max_body_bytes, int) or max_body_bytes < 1:
        raise ConfigError(f"max_body_bytes must be a positive integer, not {max_body_bytes!r}")
    if max_video_bytes is None:
        max_video_bytes = max_body_bytes
    if isinstance(max_video_bytes, bool) or not isinstance(max_video_bytes, int) or max_video_bytes < 1:
        raise ConfigError(f"max_video_bytes must be a positive integer, not {max_video_bytes!r}")
    largest = max(max_body_bytes, max_video_bytes)
    if max_body_budget_bytes is None:
        max_body_budget_bytes = max(512 * 2**20, largest)
    if isinstance(max_body_budget_bytes, bool) or not isinstance(max_body_budget_bytes, int) \
            or max_body_budget_bytes < largest:
        raise ConfigError(f"max_body_budget_bytes must be an integer of at least max_body_bytes and max_video_bytes "
                          f"({largest}): a body of the largest size allowed must fit, not {max_body_budget_bytes!r}")
    if not timeout_s > 0:
        raise ConfigError(f"timeout_s must be a positive number of seconds, not {timeout_s!r}")
    loaded: dict[str, Policy] = {}
    for p in (list(policies) if policies is not None else []) or [moderator.policy]:
        pol = p if isinstance(p, Policy) else load_policy(p, allow_outside=moderator.allow_outside)
        if pol.name in loaded:
            raise ConfigError(f"two loaded policies are named {pol.name!r}; ?policy=NAME would be ambiguous")
        moderator.compiled(pol)
        loaded[pol.name] = pol
    settings = _Settings(moderator, loaded, None if token is None else _token_bytes(token), max_body_bytes,
                         max_video_bytes, _BodyBudget(max_body_budget_bytes), timeout_s, retry_after_s, warm_up,
                         _Metrics(moderator), review)
    routes = [
        Route("/v1/check", _check, methods=["POST"]),
        Route("/healthz", _healthz, methods=["GET"]),
        Route("/readyz", _readyz, methods=["GET"]),
        Route("/metrics", _metrics, methods=["GET"]),
    ]
    if review is not None:
        routes += [
            Route("/v1/review/next", _review_next, methods=["GET"]),
            Route("/v1/review/{item_id:int}", _review_item, methods=["GET"]),
            Route("/v1/review/{item_id:int}/thumbnail", _review_thumbnail, methods=["GET"]),
            Route("/v1/review/{item_id:int}/verdict", _review_verdict, methods=["POST"]),
            Route("/v1/review/{item_id:int}/skip", _review_skip, methods=["POST"]),
            Route("/review", _review_page, methods=["GET"]),
        ]
    app = Starlette(routes=routes, lifespan=_lifespan)
    app.state.safeclip = settings
    app.state.metrics_registry = settings.metrics.registry
    Gauge("safeclip_body_bytes_held", "bytes of request bodies taken from the budget (being received or decided)",
          registry=settings.metrics.registry).set_function(lambda: settings.bodies.held)
    Gauge("safeclip_body_budget_bytes", "bytes of request bodies held at once at most (max_body_budget_bytes)",
          registry=settings.metrics.registry).set_function(lambda: settings.bodies.limit)
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


class _ConnectionPool:
    """The open connections of one server, and which of them are idle (no request in progress), idle longest first.

    A connection is anything with ``close_idle()``; everything here runs on the event loop."""

    def __init__(self, max_connections: int, metrics: _Metrics) -> None:
        self.max_connections = max_connections
        self._metrics = metrics
        self._open: set[Any] = set()
        self._idle: dict[Any, None] = {}  # insertion order: idle longest first

    def opened(self, conn: Any) -> None:
        self._open.add(conn)
        self._idle[conn] = None
        self._metrics.connections_open.set(len(self._open))
        if len(self._open) > self.max_connections:
            self._evict(but=conn)

    def busy(self, conn: Any) -> bool:
        """``conn`` has a request in progress; False when that is over the limit (no idle connection to close)."""
        self._idle.pop(conn, None)
        return len(self._open) <= self.max_connections or self._evict(but=conn)

    def idle(self, conn: Any) -> None:
        if conn in self._open:
            self._idle.pop(conn, None)
            self._idle[conn] = None

    def closed(self, conn: Any, reason: str | None = None) -> None:
        if conn in self._open and reason is not None:
            self._metrics.connections_closed.labels(reason).inc()
        self._open.discard(conn)
        self._idle.pop(conn, None)
        self._metrics.connections_open.set(len(self._open))

    def _evict(self, but: Any) -> bool:
        victim = next((c for c in self._idle if c is not but), None)
        if victim is None:
            return False
        self.closed(victim, "evicted")
        victim.close_idle()
        return True


def uvicorn_protocol(app: Starlette, *, header_timeout_s: float = 10.0,
                     max_connections: int = 1024) -> type[asyncio.Protocol]:
    """uvicorn's HTTP/1.1 (h11) protocol, guarding :func:`create_app`'s ``app`` against connections that hold a
    place without asking anything: ``uvicorn.Config(app, http=uvicorn_protocol(app), limit_concurrency=None)``.

    A connection must deliver a complete request head within ``header_timeout_s`` of opening (after a response:
    of its next byte; silence in between is uvicorn's keep-alive timeout), else it is closed: bytes dribbled in do
    not extend the deadline. At most ``max_connections`` are kept open: one more closes the connection idle longest
    (no request in progress); when every connection has a request in progress, ``POST /v1/check`` is answered 503 +
    ``Retry-After`` by the app (request id, counted as ``overloaded``) and that connection closed, while
    ``/healthz``, ``/readyz`` and ``/metrics`` are still answered. (uvicorn's own ``limit_concurrency`` counts idle
    connections too and answers a bare 503 to every path, the probes included.)
    """
    if not (isinstance(header_timeout_s, (int, float)) and 0 < header_timeout_s < float("inf")):
        raise ConfigError(f"header_timeout_s must be a positive number of seconds, not {header_timeout_s!r}")
    if isinstance(max_connections, bool) or not isinstance(max_connections, int) or max_connections < 1:
        raise ConfigError(f"max_connections must be a positive integer, not {max_connections!r}")
    settings = getattr(app.state, "safeclip", None)
    if not isinstance(settings, _Settings):
        raise ConfigError("uvicorn_protocol guards an application made by safeclip.server.create_app")
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    pool = _ConnectionPool(max_connections, settings.metrics)

    class GuardedH11Protocol(H11Protocol):
        def __init__(self, *args: Any, **kwargs: Any) -> None:
            super().__init__(*args, **kwargs)
            self._deadline: asyncio.TimerHandle | None = None
            self._awaiting_head = True

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            pool.opened(self)
            self._arm()

        def connection_lost(self, exc: Exception | None) -> None:
            self._disarm()
            pool.closed(self)
            super().connection_lost(exc)

        def data_received(self, data: bytes) -> None:
            if self._awaiting_head:
                self._arm()  # the deadline runs from the first byte after a response (a no-op while it runs)
            super().data_received(data)

        def handle_events(self) -> None:
            before = self.cycle
            super().handle_events()
            if self.cycle is not before:  # a request head arrived; its task has not started yet
                self._disarm()
                self._awaiting_head = False
                if not pool.busy(self):
                    self.cycle.scope[_OVER_CONNECTION_LIMIT] = pool.max_connections  # type: ignore[literal-required]
                    self.cycle.keep_alive = False  # its place is given back once it is answered

        def on_response_complete(self) -> None:
            super().on_response_complete()  # may start a pipelined request (handle_events)
            if not self.transport.is_closing() and self.cycle is not None and self.cycle.response_complete:
                self._awaiting_head = True
                pool.idle(self)

        def close_idle(self) -> None:
            self._disarm()
            if not self.transport.is_closing():
                try:
                    self.conn.send(h11.ConnectionClosed())
                except h11.LocalProtocolError:
                    pass
                self.transport.close()

        def _arm(self) -> None:
            if self._deadline is None:
                self._deadline = self.loop.call_later(header_timeout_s, self._too_slow)

        def _disarm(self) -> None:
            if self._deadline is not None:
                self._deadline.cancel()
                self._deadline = None

        def _too_slow(self) -> None:
            self._deadline = None
            if self._awaiting_head:
                pool.closed(self, "header_timeout")
                self.close_idle()

    return GuardedH11Protocol
