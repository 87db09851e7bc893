"""What a bank folder says of itself (format, kind, name, encoder_id, dimension), read without its entries.

A foundation (stdlib only) so that policies can check the banks they name (a missing folder, a threshold of the wrong
kind) where every other field is checked; :mod:`safeclip.banks` holds the bank itself.
"""

from __future__ import annotations

import os
import sqlite3
from pathlib import Path

from .errors import BankError

__all__ = ["BANK_KINDS", "DB", "FORMAT", "FORMAT_VERSION", "PDQ_BYTES", "ROWS", "bank_kind", "connect", "is_bank",
           "meta_problem", "read_meta"]

BANK_KINDS = ("pdq", "embedding")
FORMAT = "safeclip.bank"
FORMAT_VERSION = 1
PDQ_BYTES = 32
DB = "bank.sqlite"
ROWS = "rows.bin"


def is_bank(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a bank folder (holds a bank manifest)."""
    return (Path(path) / DB).is_file()


def bank_kind(path: str | os.PathLike[str]) -> str:
    """The kind (``pdq`` or ``embedding``) of the bank folder at ``path``; :class:`~safeclip.errors.BankError` when it
    is not one."""
    return read_meta(path)["kind"]


def connect(p: Path, writable: bool) -> tuple[sqlite3.Connection, dict[str, str]]:
    if not p.is_dir():
        raise BankError(f"{p}: no such bank folder (create one with `safeclip bank create {p} --kind pdq`)")
    if not (p / DB).is_file():
        raise BankError(f"{p}: not a bank folder (no {DB}); create one with `safeclip bank create`")
    uri = f"file:{(p / DB).resolve()}" + ("" if writable else "?mode=ro")
    try:
        con = sqlite3.connect(uri, uri=True, check_same_thread=False, timeout=30.0, isolation_level=None)
        if writable:
            con.execute("PRAGMA journal_mode=WAL")
            con.execute("PRAGMA synchronous=FULL")
        meta = dict(con.execute("SELECT key, value FROM meta").fetchall())
    except sqlite3.Error as e:
        raise BankError(f"{p}: the bank manifest cannot be read ({e}); restore the folder from a copy") from e
    problem = meta_problem(meta)
    if problem is None and not (p / ROWS).is_file():
        problem = f"{ROWS} is missing; the bank's hashes/embeddings are gone (restore the folder)"
    if problem:
        con.close()
        raise BankError(f"{p}: {problem}")
    return con, meta


def read_meta(path: str | os.PathLike[str]) -> dict[str, str]:
    """What a bank folder says of itself (kind, name, encoder_id, dim, ...), without reading its entries."""
    con, meta = connect(Path(path), False)
    con.close()
    return meta


def meta_problem(meta: dict[str, str]) -> str | None:
    if meta.get("format") != FORMAT:
        return f"not a safeclip bank (format {meta.get('format')!r})"
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        return "the bank's format version is not a number; restore the folder"
    if version > FORMAT_VERSION:
        return f"bank format {version} is newer than this safeclip reads ({FORMAT_VERSION}); upgrade safeclip"
    if meta.get("kind") not in BANK_KINDS:
        return f"unknown bank kind {meta.get('kind')!r}"
    try:
        dim = int(meta.get("dim", ""))
    except ValueError:
        return "the bank's dimension is not a number"
    if dim < 1 or (meta["kind"] == "embedding" and not meta.get("encoder_id")):
        return "the bank's dimension or encoder_id is missing"
    return None
