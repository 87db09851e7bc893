"""PDQ lists as CSV files, in the layout ThreatExchange and HMA tools exchange: one hash per row.

Columns: ``hash`` (64 hex digits, the reference's ``Hash256::format`` text), ``id``, ``labels`` and, optionally,
``quality`` (0-100) and ``source``. A file either starts with a header row naming its columns (in any order; other
columns are ignored; ``pdq``, ``pdq_hash`` and ``signal_value`` are read as ``hash``, ``label`` and ``tags`` as
``labels``) or has none, and then its rows are ``hash[,id[,labels]]``. A row that is one field ``pdq <hex>`` (what
``threatexchange hash photo`` prints, and the signal files of its local-file exchange) is read as that hash. Blank
lines and lines starting with ``#`` are skipped. A row without an id takes its hash's hex as id.

Reading is all or nothing: every malformed row and every id given twice is reported, with its line number, and
:func:`import_pdq_csv` adds nothing unless every row is good (one bank transaction).

:func:`write_pdq_csv` writes ``hash,id,labels,quality,source`` with a header, one row per entry: its first hash (the
image as added: first view, not turned). A dihedral bank's turned variants and an animation's further frames are not
written (the other tools hold one hash per item; re-add the images to get them back). Reading what it wrote gives
the same entries, so export, import and export again writes the same file.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import BankError, DataError
from ..files import write_bytes_atomic
from ..pdq import PdqHash
from ._store import Bank, NewEntry

__all__ = ["CSV_COLUMNS", "import_pdq_csv", "read_pdq_csv", "write_pdq_csv"]

CSV_COLUMNS = ("hash", "id", "labels", "quality", "source")
"""The columns :func:`write_pdq_csv` writes, in order."""

_ALIASES = {"hash": "hash", "pdq": "hash", "pdq_hash": "hash", "signal_value": "hash", "signal": "hash",
            "id": "id", "content_id": "id", "labels": "labels", "label": "labels", "tags": "labels",
            "quality": "quality", "pdq_quality": "quality", "source": "source"}
_HEX = re.compile(r"[0-9a-fA-F]{64}")
_TE_LINE = re.compile(r"pdq\s+([0-9a-fA-F]{64})", re.IGNORECASE)
_MAX_SHOWN = 20  # problems listed in one error; the rest are counted


@dataclass(frozen=True)
class _Row:
    line: int
    hash: PdqHash
    id: str
    label: str
    quality: int | None
    source: str


def read_pdq_csv(path: str | os.PathLike[str]) -> list[tuple[PdqHash, str, str]]:
    """The ``(hash, id, label)`` of every row of a PDQ CSV file (module doc), in file order. A hash's quality is the
    row's ``quality`` column, else 100 (lists carry none). :class:`~safeclip.errors.DataError` lists every malformed
    row and repeated id with its line number."""
    return [(r.hash, r.id, r.label) for r in _read(Path(path))]


def import_pdq_csv(bank: Bank, path: str | os.PathLike[str], *, replace: bool = False) -> int:
    """Add every row of a PDQ CSV file to ``bank`` as one entry, in one transaction; returns how many. Nothing is
    added when any row is malformed, or (unless ``replace``) when an id is already in the bank."""
    if bank.kind != "pdq":
        raise BankError(f"{bank.path} is an {bank.kind} bank: only a pdq bank imports PDQ hashes")
    p = Path(path)
    rows = _read(p)
    if not rows:
        return 0
    if not replace:
        taken = [r for r in rows if bank.entry(r.id) is not None]
        if taken:
            raise BankError(_listing(p, [f"line {r.line}: id {r.id!r} is already in the bank" for r in taken],
                                     "give --replace to replace those entries, or remove them first"))
    data = np.frombuffer(b"".join(r.hash.bits for r in rows), np.uint8).reshape(len(rows), 32)
    entries = [NewEntry(r.id, label=r.label, source=r.source, quality=r.quality) for r in rows]
    return len(bank.add(data, entries, replace=replace))


def write_pdq_csv(bank: Bank, path: str | os.PathLike[str]) -> int:
    """Write the bank's entries (enabled or not, in the order they were added) to ``path`` (atomically), one row
    each with its first hash; returns how many rows."""
    if bank.kind != "pdq":
        raise BankError(f"{bank.path} is an {bank.kind} bank: only a pdq bank exports PDQ hashes")
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(CSV_COLUMNS)
    n = 0
    for e in bank.entries():
        first = bank.entry_rows(e.id)[0]
        w.writerow([bytes(first).hex(), e.id, e.label, "" if e.quality is None else e.quality, e.source])
        n += 1
    write_bytes_atomic(path, buf.getvalue().encode("utf-8"))
    return n


def _listing(path: Path, problems: list[str], fix: str) -> str:
    shown = problems[:_MAX_SHOWN]
    more = len(problems) - len(shown)
    head = f"{path}: {len(problems)} problem{'s' if len(problems) != 1 else ''}, nothing imported ({fix})"
    return "\n".join([head, *shown] + ([f"... and {more} more"] if more else []))


def _records(path: Path) -> Iterator[tuple[int, list[str]]]:
    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            reader = csv.reader(f)
            for fields in reader:
                if not fields or all(not x.strip() for x in fields) or fields[0].lstrip().startswith("#"):
                    continue
                yield reader.line_num, fields
    except FileNotFoundError as e:
        raise DataError(f"cannot read {path}: no such file") from e
    except IsADirectoryError as e:
        raise DataError(f"cannot read {path}: it is a folder, not a CSV file") from e
    except UnicodeDecodeError as e:
        raise DataError(f"cannot read {path}: not UTF-8 text ({e.reason} at byte {e.start}); is it a CSV file?") from e
    except (OSError, csv.Error) as e:
        raise DataError(f"cannot read {path}: {e}") from e


def _header(fields: list[str]) -> dict[str, int] | None:
    """Column positions when ``fields`` is a header row, else None (the row is data)."""
    first = fields[0].strip()
    if _HEX.fullmatch(first) or _TE_LINE.fullmatch(first):
        return None
    cols: dict[str, int] = {}
    for i, name in enumerate(fields):
        key = _ALIASES.get(name.strip().lower())
        if key is not None and key not in cols:
            cols[key] = i
    return cols if "hash" in cols else None


def _read(path: Path) -> list[_Row]:
    rows: list[_Row] = []
    problems: list[str] = []
    seen: dict[str, int] = {}
    cols: dict[str, int] | None = None
    first = True
    for line, fields in _records(path):
        if first:
            first = False
            cols = _header(fields)
            if cols is not None:
                continue
            if not (_HEX.fullmatch(fields[0].strip()) or _TE_LINE.fullmatch(fields[0].strip())):
                known = ", ".join(sorted({"hash", "id", "labels", "quality", "source"}))
                problems.append(f"line {line}: neither a hash nor a header naming a 'hash' column (columns: {known})")
                continue
        row, problem = _parse(line, fields, cols)
        if problem is not None:
            problems.append(f"line {line}: {problem}")
            continue
        assert row is not None
        if row.id in seen:
            problems.append(f"line {line}: id {row.id!r} is repeated (first on line {seen[row.id]})")
            continue
        seen[row.id] = line
        rows.append(row)
    if problems:
        raise DataError(_listing(path, problems, "fix those rows and import again"))
    return rows


def _parse(line: int, fields: list[str], cols: dict[str, int] | None) -> tuple[_Row | None, str | None]:
    if cols is None:
        if len(fields) > 3:
            return None, f"{len(fields)} columns; without a header a row is hash[,id[,labels]]"
        hash_text, entry_id, label = (fields + ["", ""])[:3]
        quality_text, source = "", ""
    else:
        def get(name: str) -> str:
            i = cols.get(name)
            return fields[i] if i is not None and i < len(fields) else ""

        hash_text, entry_id, label, quality_text, source = (get(c) for c in CSV_COLUMNS)
    hash_text = hash_text.strip()
    te = _TE_LINE.fullmatch(hash_text)
    if te:
        hash_text = te.group(1)
    if not _HEX.fullmatch(hash_text):
        shown = hash_text if len(hash_text) <= 40 else hash_text[:37] + "..."
        return None, f"hash {shown!r} is not 64 hex digits"
    quality: int | None = None
    if quality_text.strip():
        try:
            quality = int(quality_text.strip())
        except ValueError:
            quality = -1
        if not 0 <= quality <= 100:
            return None, f"quality {quality_text.strip()!r} is not an integer from 0 to 100"
    entry_id = entry_id.strip() or hash_text.lower()
    if len(entry_id) > 256 or "#removed-" in entry_id or not entry_id.isprintable():
        return None, f"id {entry_id[:60]!r} must be 1-256 printable characters"
    if not label.isprintable() or not source.isprintable():
        return None, "labels and source must be printable text on one line"
    h = PdqHash.from_hex(hash_text, 100 if quality is None else quality)
    return _Row(line, h, entry_id, label.strip(), quality, source), None
