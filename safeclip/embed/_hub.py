"""The Hugging Face hub side of loading weights: fail in seconds offline, quietly, and say how to load locally.

open_clip downloads a pretrained tag with ``huggingface_hub``, which retries an unreachable hub for about a minute and
logs every retry (twice, once through the root logger open_clip configures by calling ``logging.error``). Before a
download :func:`hub_offline_reason` probes the hub with a short timeout; when it is unreachable (or ``HF_HUB_OFFLINE``
is set) :func:`quiet_hub` runs the load in the hub's offline mode, so weights already in the local hub cache still
load and missing ones fail at once. No torch here; ``huggingface_hub`` is imported only inside :func:`quiet_hub`.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import warnings
from collections.abc import Iterator
from urllib.parse import urlsplit

from .._net import can_connect, env_true
from ..errors import ModelLoadError
from . import _identity

__all__ = ["PROBE_TIMEOUT_S", "hub_offline_reason", "local_weights_error", "not_in_hub_cache", "quiet_hub"]

PROBE_TIMEOUT_S = 3.0
"""How long the reachability probe waits for a TCP connection to the hub (name resolution included)."""

_LOCAL_FILE = "/path/to/open_clip_pytorch_model.bin"
_LOCAL_DIR = "/path/to/folder"
_offline_lock = threading.Lock()


def hub_offline_reason(timeout: float = PROBE_TIMEOUT_S) -> str | None:
    """Why the hub cannot be used now (``HF_HUB_OFFLINE`` set, or no connection within ``timeout``), else None."""
    if env_true("HF_HUB_OFFLINE") or env_true("TRANSFORMERS_OFFLINE"):
        return "HF_HUB_OFFLINE is set"
    url = urlsplit(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host = url.hostname or "huggingface.co"
    port = url.port or (80 if url.scheme == "http" else 443)
    if can_connect(host, port, timeout):
        return None
    return f"the Hugging Face hub ({host}) cannot be reached"


@contextlib.contextmanager
def quiet_hub(*, offline: bool) -> Iterator[None]:
    """Run an open_clip load without hub/open_clip log lines on stderr; ``offline``: in the hub's offline mode.

    open_clip logs through the root logger with ``logging.error``, which installs a stderr handler on a logger-less
    root; a temporary handler prevents that, and a filter drops the records. The offline mode is the hub's own
    (``huggingface_hub.constants.HF_HUB_OFFLINE``, read on every request), set for this call only.
    """
    root = logging.getLogger()
    hub_log = logging.getLogger("huggingface_hub")
    placeholder = logging.NullHandler()
    drop = logging.Filter("safeclip")  # passes only safeclip's own records
    level = hub_log.level
    root.addHandler(placeholder)
    root.addFilter(drop)
    hub_log.setLevel(logging.CRITICAL)
    try:
        with contextlib.ExitStack() as stack:
            stack.enter_context(warnings.catch_warnings())
            warnings.filterwarnings("ignore", module=r"huggingface_hub(\.|$)")
            if offline:
                stack.enter_context(_offline_lock)
                from huggingface_hub import constants

                was = constants.HF_HUB_OFFLINE
                constants.HF_HUB_OFFLINE = True
                stack.callback(setattr, constants, "HF_HUB_OFFLINE", was)
            yield
    finally:
        hub_log.setLevel(level)
        root.removeFilter(drop)
        root.removeHandler(placeholder)


def not_in_hub_cache(e: BaseException) -> bool:
    """Whether ``e`` (open_clip re-raises the hub's errors as new ones) comes from a file missing in offline mode."""
    from huggingface_hub.errors import LocalEntryNotFoundError, OfflineModeIsEnabled

    seen: set[int] = set()
    cur: BaseException | None = e
    while cur is not None and id(cur) not in seen:
        if isinstance(cur, (LocalEntryNotFoundError, OfflineModeIsEnabled)):
            return True
        seen.add(id(cur))
        cur = cur.__cause__ or cur.__context__
    return False


def local_weights_error(problem: str, model: str, pretrained: str | None = None) -> ModelLoadError:
    """A :class:`ModelLoadError` for ``problem`` that ends with how to load the weights from local files, in Python
    syntax in its message and in command-line syntax in its ``cli_message``.

    For a tag whose published file safeclip recognises (``openai``: OpenAI's ``.pt``, see ``known_weights.json``)
    that file is the one named, with its URL: a copy of it is the tag's space, where artifacts made for the tag (LAION's
    heads) apply; any other local file or folder is a space of its own.
    """
    arch = model if not model.startswith(("local-dir:", "hf-hub:")) else "ViT-B-32"
    published = next((k for k in _identity.known_weights().values() if k.pretrained == pretrained and arch in k.models), None)
    if published is not None:
        local = f"/path/to/{published.source.rsplit('/', 1)[-1]}"
        where = f"(the published file, from {published.source}, recognised as {pretrained} by its sha256)"
        return ModelLoadError(f"{problem}. Offline, load a local copy: model={arch!r}, pretrained={local!r} {where}",
                              cli_message=f"{problem}. Offline, load a local copy: --model {arch} --pretrained "
                                          f"{local} {where}")
    api = (f"{problem}. Offline, load a local checkpoint: model={arch!r}, pretrained={_LOCAL_FILE!r} "
           f"(or model='local-dir:{_LOCAL_DIR}')")
    cli = (f"{problem}. Offline, load a local checkpoint: --model {arch} --pretrained {_LOCAL_FILE} "
           f"(or --model local-dir:{_LOCAL_DIR})")
    return ModelLoadError(api, cli_message=cli)
