"""The error tree. Every error safeclip raises on purpose is a ``SafeclipError``.

    SafeclipError
    ├── ConfigError             an argument or setting is invalid (also a ValueError)
    ├── PolicyError             a policy file is invalid (every problem listed, with its location)
    ├── ModelLoadError          weights could not be loaded (what was tried, how to point at a local file)
    ├── DeviceError             the device is not a device name, or not available on this machine
    ├── EncoderMismatchError    embeddings / artifacts from another embedding space
    ├── ArtifactIntegrityError  an artifact's sha256 does not match its pin, or it escapes its directory
    ├── ArtifactUnavailableError a pinned artifact is not here and cannot be fetched (offline: where to put it)
    ├── CacheError              an embedding or prompt cache cannot be opened, read or written
    │   └── MissingPromptError      a prompt has no cached embedding (also a KeyError)
    ├── BankError               a bank of known content cannot be created, opened, read or written
    ├── ReviewError             a review store cannot be opened, read or written, or a verdict is invalid
    │   ├── ReviewStoreUnavailableError the store's database cannot be reached (a moderation request never fails on it)
    │   ├── ReviewItemNotFoundError the store has no item with that id
    │   └── InvalidVerdictError     a verdict's action, category or fields are not ones the item allows
    ├── DataError               labelled data or an audit/rescore table is malformed (file, row, column named)
    ├── AuditError              an audit cannot start or finish
    │   ├── NoInputsError           nothing to audit
    │   ├── ManifestError           a manifest cannot be read or has no path column
    │   ├── OutputError             the output cannot be written where it was asked for
    │   └── AuditLockedError        another audit is writing the same output
    ├── EngineError             an audit engine failed as a whole
    │   ├── EngineUnavailableError  the engine is not installed or its cluster cannot be reached
    │   └── EngineStalledError      the engine made no progress within its stall timeout
    ├── OverloadedError         a Moderator's request queue is full (retry later; a server answers 503)
    └── DecodeError             an input could not be turned into pixels
        ├── UnsupportedFormatError  not an allowed image format
        ├── ImageTooLargeError      byte / pixel / frame limits (decompression bombs)
        ├── TruncatedImageError     the file ends early or is corrupt
        └── DecodeTimeoutError      decoding exceeded its time budget
"""

from __future__ import annotations

__all__ = [
    "SafeclipError",
    "ConfigError",
    "PolicyError",
    "ModelLoadError",
    "DeviceError",
    "EncoderMismatchError",
    "ArtifactIntegrityError",
    "ArtifactUnavailableError",
    "CacheError",
    "MissingPromptError",
    "BankError",
    "ReviewError",
    "ReviewStoreUnavailableError",
    "ReviewItemNotFoundError",
    "InvalidVerdictError",
    "DataError",
    "AuditError",
    "NoInputsError",
    "ManifestError",
    "OutputError",
    "AuditLockedError",
    "EngineError",
    "EngineUnavailableError",
    "EngineStalledError",
    "OverloadedError",
    "DecodeError",
    "UnsupportedFormatError",
    "ImageTooLargeError",
    "TruncatedImageError",
    "DecodeTimeoutError",
]


class SafeclipError(Exception):
    """Base class of every error safeclip raises on purpose."""


class ConfigError(SafeclipError, ValueError):
    """An argument or setting is invalid (a batch size of 0, an unknown ``on_error``): the message says which."""


class PolicyError(SafeclipError, ValueError):
    """A policy is invalid. ``problems`` lists every problem as ``"file: path.to.field: message"``."""

    def __init__(self, problems: list[str] | str):
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        n = len(self.problems)
        head = f"{n} problem{'s' if n != 1 else ''} in policy"
        super().__init__(head + ":\n  " + "\n  ".join(self.problems))


class ModelLoadError(SafeclipError):
    """The encoder's weights could not be loaded. ``cli_message`` is the same message with its fix in command-line
    syntax (``--pretrained PATH`` where the message says ``pretrained='PATH'``); the CLI prints that one."""

    def __init__(self, message: str, *, cli_message: str | None = None):
        self.cli_message = cli_message or message
        super().__init__(message)


class DeviceError(SafeclipError):
    """The device is not a device name (cpu, cuda, cuda:N, mps, auto), or is not available on this machine."""


class EncoderMismatchError(SafeclipError, ValueError):
    """Embeddings or artifacts come from a different embedding space (encoder_id) than expected."""


class ArtifactIntegrityError(SafeclipError):
    """An artifact's sha256 does not match the pin in its policy, or its path is not allowed."""


class ArtifactUnavailableError(SafeclipError):
    """A pinned artifact named by its public location is in no mirror or cache and cannot be downloaded now.

    The message names the file, its sha256 and where to put a copy (``$SAFECLIP_ARTIFACTS_DIR``)."""


class CacheError(SafeclipError):
    """An embedding or prompt cache cannot be opened, read or written (corrupt, read-only, disk full)."""


class MissingPromptError(CacheError, KeyError):
    """A prompt text has no cached embedding in this embedding space (a ``KeyError`` too, as a lookup would be)."""

    def __str__(self) -> str:  # KeyError would repr() the message
        return Exception.__str__(self)


class BankError(SafeclipError):
    """A bank (a folder of known hashes or embeddings) cannot be created, opened, read or written: the message names
    the bank, what is wrong and the fix."""


class ReviewError(SafeclipError):
    """A review store cannot be opened (corrupt, of a newer schema, bound to another policy), read or written, or a
    verdict names an unknown item, action or category: the message names the store, what is wrong and the fix."""


class ReviewStoreUnavailableError(ReviewError):
    """The review store's database cannot be reached (PostgreSQL down, a SQLite file locked for too long). Review
    writes fail loudly with it; a moderation request never does (see ``safeclip.review.ReviewQueue``)."""


class ReviewItemNotFoundError(ReviewError):
    """A review store has no item with the id given. ``item_id`` is that id."""

    def __init__(self, message: str, item_id: int | None = None):
        self.item_id = item_id
        super().__init__(message)


class InvalidVerdictError(ReviewError, ValueError):
    """A verdict cannot be recorded as given: its action, category, note or reviewer is not one the item takes.
    ``reason`` says what without naming the store (a server answers its client with it)."""

    def __init__(self, message: str, reason: str | None = None):
        self.reason = reason or message
        super().__init__(message)


class DataError(SafeclipError, ValueError):
    """Input data (labelled rows, an audit or rescore table, embeddings) is malformed; the message names where."""


class AuditError(SafeclipError):
    """An audit cannot start or finish."""


class NoInputsError(AuditError, ValueError):
    """The audit was given nothing to audit."""


class ManifestError(AuditError, ValueError):
    """A manifest cannot be read, or holds no ``path`` column."""


class OutputError(AuditError):
    """The output cannot be written where it was asked for (a folder, unwritable, or not ours to replace)."""


class AuditLockedError(AuditError):
    """Another audit holds the lock on the same output."""


class EngineError(SafeclipError):
    """An audit engine failed as a whole (a file's failure is an error row, never this)."""


class EngineUnavailableError(EngineError):
    """The engine is not installed, too old, or its cluster cannot be reached."""


class EngineStalledError(EngineError):
    """The engine made no progress within its stall timeout."""


class OverloadedError(SafeclipError):
    """A Moderator has as many requests in flight as its queue holds; nothing was done: retry later."""


class DecodeError(SafeclipError, ValueError):
    """An input could not be decoded into pixels. ``source`` names the input when known."""

    def __init__(self, message: str, source: str | None = None):
        self.source = source
        self.reason = message
        super().__init__(f"{source}: {message}" if source else message)


class UnsupportedFormatError(DecodeError):
    """The input is not one of the allowed image formats."""


class ImageTooLargeError(DecodeError):
    """The input exceeds a byte, pixel or frame limit (e.g. a decompression bomb)."""


class TruncatedImageError(DecodeError):
    """The input is truncated or corrupt."""


class DecodeTimeoutError(DecodeError):
    """Decoding exceeded its time budget."""


def one_line(e: BaseException | str, limit: int | None = None) -> str:
    """``e``'s message (or the text ``e``) on one line (whitespace runs, newlines included, become one space), cut to
    ``limit`` characters with ``...``; an exception's class name when it has no message. For quoting a cause inside
    a message of our own, which is one line.

    >>> one_line(ValueError("bad\\n  thing"))
    'bad thing'
    >>> one_line(KeyboardInterrupt())
    'KeyboardInterrupt'
    """
    text = " ".join(str(e).split()) or ("" if isinstance(e, str) else type(e).__name__)
    return text if limit is None or len(text) <= limit else text[: limit - 3] + "..."
