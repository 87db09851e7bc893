"""``safeclip serve``: moderate uploads over HTTP (:mod:`safeclip.server` under uvicorn).

Needs the serve extra: ``pip install safeclip[serve]``. Binds 127.0.0.1 unless ``--host`` says otherwise. SIGTERM
stops accepting connections, lets the requests in flight finish (at most ``--timeout-s`` more), and exits 0. The
access log is one JSON line per request on stdout; uvicorn's own messages go to stderr.

``--review STORE`` (a SQLite file, or a ``postgresql://`` URL) opens a review store at start-up, bound to the
serving policy's name, and adds the ``/v1/review`` routes and the ``/review`` page; a store that cannot be opened
stops the server before it listens. The decisions it serves that fall in the policy's review sample are written there
(:class:`~safeclip.review.ReviewQueue`, origin ``serve``); ``--review-spool FILE`` keeps what the store cannot take
until it can.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from ..errors import ConfigError
from ._options import (EXIT_OK, EXIT_USAGE, add_model_args, add_policy_arg, encoder_spec, number_arg, positive_int,
                       run_standalone)

__all__ = ["register", "main"]

TOKEN_ENV = "SAFECLIP_SERVE_TOKEN"
_LOOPBACK = {"127.0.0.1", "::1", "localhost"}


_port = number_arg(int, 0, 65535, "a port number (0: any free port)")
_positive_float = number_arg(float, 0.0, float("inf"), "a positive number", open_low=True)


def _wait_ms(text: str) -> float:
    value = 0.0 if text.strip() in ("0", "0.0") else _positive_float(text)
    if value >= 1e4:
        raise argparse.ArgumentTypeError(f"expected milliseconds below 10000, got {text}")
    return value


def _default_max_connections() -> int:
    """1024, or fewer where the open-file limit would run out first (leaving room for the model's files)."""
    try:
        import resource

        soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    except (ImportError, OSError, ValueError):
        return 1024
    return 1024 if soft == resource.RLIM_INFINITY else max(16, min(1024, soft - 64))


def register(subparsers: Any) -> None:
    p = subparsers.add_parser("serve", help="serve POST /v1/check over HTTP (needs safeclip[serve])",
                              description="Moderate uploads over HTTP: POST /v1/check, GET /healthz, /readyz, "
                                          "/metrics. Binds 127.0.0.1 by default; SIGTERM drains and exits 0.")
    p.add_argument("--host", default="127.0.0.1",
                   help="address to listen on (default 127.0.0.1: this machine only; 0.0.0.0: every interface)")
    p.add_argument("--port", type=_port, default=8080, help="TCP port (default 8080; 0: any free port)")
    add_policy_arg(p, multiple=True)
    add_model_args(p)
    p.add_argument("--max-batch", type=positive_int,
                   help="most frames embedded in one shared forward (default: --batch-size, i.e. 16 on a CPU, 64 on "
                        "a GPU); 1 turns micro-batching off")
    p.add_argument("--max-wait-ms", type=_wait_ms, default=5.0,
                   help="how long a forward waits for requests still being decoded (default 5)")
    p.add_argument("--max-queue", type=positive_int,
                   help="requests in flight at once, bodies being received included; one more is answered 503 "
                        "before its body is read (default: 4 x --max-batch)")
    p.add_argument("--on-error", choices=("raise", "block", "flag"), default="raise",
                   help="an undecodable image: raise (default) answers 422 with the error; block or flag answers a "
                        "fail-closed Decision")
    p.add_argument("--token-file", type=Path,
                   help=f"file holding the bearer token required on /v1/check and /metrics (default: ${TOKEN_ENV}; "
                        "neither: no token)")
    p.add_argument("--timeout-s", type=_positive_float, default=30.0,
                   help="a request not answered within this many seconds gets 504 (default 30)")
    p.add_argument("--max-body-mb", type=_positive_float, default=20.0,
                   help="larger request bodies get 413 (default 20)")
    p.add_argument("--max-video-mb", type=_positive_float, default=64.0,
                   help="larger video bodies (Content-Type video/mp4, video/webm, video/quicktime, video/x-matroska, "
                        "or such a multipart part) get 413 (default 64, the decoder's byte limit)")
    p.add_argument("--max-body-budget-mb", type=_positive_float,
                   help="request bodies held in memory at once, all requests together; a request whose Content-Length "
                        "would pass it (without one: --max-body-mb) gets 503 + Retry-After before its body is read "
                        "(default 512, or --max-body-mb / --max-video-mb if larger)")
    p.add_argument("--header-timeout-s", type=_positive_float, default=10.0,
                   help="a connection that has not sent a complete request head this many seconds after opening (or "
                        "after its next byte, following a response) is closed (default 10)")
    p.add_argument("--max-connections", type=positive_int,
                   help="connections kept open at once; one more closes the one idle longest, and while every one "
                        "has a request in progress POST /v1/check gets 503 + Retry-After (the probes are still "
                        "answered) (default 1024, or less under a lower open-file limit: ulimit -n)")
    p.add_argument("--review", metavar="STORE",
                   help="serve the review queue of this store (a SQLite file, created if missing, or a "
                        "postgresql://user@host/db URL): GET /v1/review/next, POST /v1/review/ID/verdict and the "
                        "page /review, behind the same token as /v1/check; the served decisions in the policy's "
                        "review sample (review: {sample: ...}) are written there")
    p.add_argument("--review-spool", metavar="FILE",
                   help="with --review: keep here what the store cannot take (down, locked) and write it there "
                        "once it can; without it such items are logged and lost, never a failed request")
    p.add_argument("--log-level", choices=("critical", "error", "warning", "info", "debug"), default="info")
    p.set_defaults(func=_cmd_serve)


def read_token(token_file: Path | None) -> str | None:
    """The bearer token from ``token_file``, else ``$SAFECLIP_SERVE_TOKEN``, else None (surrounding blanks
    stripped); an empty or unreadable source is a :class:`ConfigError`, never an open server."""
    if token_file is not None:
        try:
            token = token_file.read_text(encoding="utf-8").strip()
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"--token-file {token_file}: cannot be read ({e})") from e
        if not token:
            raise ConfigError(f"--token-file {token_file} is empty: put the token in it")
        return token
    env = os.environ.get(TOKEN_ENV)
    if env is None:
        return None
    if not env.strip():
        raise ConfigError(f"${TOKEN_ENV} is set but empty: unset it to serve without a token, or set the token")
    return env.strip()


def _cmd_serve(args: argparse.Namespace) -> int:
    try:
        import uvicorn  # noqa: F401 - checked here, used by _run

        from ..server import create_app
    except ImportError as e:
        raise ConfigError(f"safeclip serve needs the serve extra ({e.name} is not installed): "
                          "pip install 'safeclip[serve]'") from e
    from ..moderator import BatchingOptions, Moderator
    from ..policy import load_policy

    token = read_token(args.token_file)
    policies = args.policy or []
    serving = load_policy(policies[0] if policies else None)
    with contextlib.ExitStack() as stack:
        review = None
        queue = None
        if args.review is not None:  # opened before the model loads: a store that cannot be used stops us at once
            from ..review import ReviewQueue, open_store

            review = stack.enter_context(open_store(args.review, policy=serving.name))
            # Served decisions in the policy's sample go to the same store (flushed before it closes, on exit).
            queue = ReviewQueue(review, origin="serve", spool=args.review_spool)
            stack.callback(queue.close)
        elif args.review_spool is not None:
            raise ConfigError("--review-spool keeps what --review STORE could not take: give --review too")
        moderator = Moderator(policy=serving, encoder=encoder_spec(args), on_error=args.on_error,
                              batching=BatchingOptions(args.max_batch, args.max_wait_ms, args.max_queue),
                              review=queue)
        app = create_app(moderator, policies=policies or None, token=token,
                         max_body_bytes=int(args.max_body_mb * 2**20), timeout_s=args.timeout_s,
                         max_video_bytes=int(args.max_video_mb * 2**20),
                         max_body_budget_bytes=None if args.max_body_budget_mb is None else
                         int(args.max_body_budget_mb * 2**20), review=review)
        return _run(app, args, token)


def _run(app: Any, args: argparse.Namespace, token: str | None) -> int:
    """Serve ``app`` under uvicorn until SIGTERM (drained) or a failure to listen."""
    import uvicorn

    from ..server import uvicorn_protocol

    access = logging.getLogger("safeclip.server.access")
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(message)s"))
    access.addHandler(handler)
    access.setLevel(logging.INFO)
    access.propagate = False
    log = logging.getLogger("safeclip.server")
    if args.host not in _LOOPBACK and token is None:
        log.warning("listening on %s without a bearer token: anyone who can reach it can use it (--token-file)",
                    args.host)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level, access_log=False,
                            lifespan="on", timeout_graceful_shutdown=args.timeout_s + 5, server_header=False,
                            http=uvicorn_protocol(app, header_timeout_s=args.header_timeout_s,
                                                  max_connections=args.max_connections or _default_max_connections()),
                            limit_concurrency=None)  # the guard's limit: uvicorn's counts idle connections too
    server = uvicorn.Server(config)
    # uvicorn handles SIGTERM (drain, then shut down) and re-raises it afterwards under the handler it found:
    # this one, so that a drained server exits 0 instead of dying of the signal.
    main_thread = threading.current_thread() is threading.main_thread()
    previous = signal.signal(signal.SIGTERM, lambda *_: setattr(server, "should_exit", True)) if main_thread else None
    try:
        server.run()
    except SystemExit as e:  # uvicorn exits 1 when it cannot listen; it has said why on stderr
        raise ConfigError(f"cannot serve on {args.host}:{args.port} (see the message above)") from e
    finally:
        if main_thread:
            signal.signal(signal.SIGTERM, previous)
        access.removeHandler(handler)
    return EXIT_OK if server.started else EXIT_USAGE


def main(argv: Sequence[str] | None = None) -> int:
    return run_standalone(register, "Moderate uploads over HTTP.", argv)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
