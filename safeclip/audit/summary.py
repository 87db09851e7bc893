"""What a run produced: :class:`AuditSummary`, and the :class:`Tally` both engines keep while they run.

>>> s = AuditSummary(out="a.parquet", rows=2, actions={"allow": 1, "flag": 1, "block": 0}, errors=0, processed=2,
...                  resumed=0, decoded=2, embedded=2, cache_hits=0, duplicates=0, worker_restarts=0, seconds=1.0,
...                  startup_seconds=0.5, images_per_s=2.0, encoder_id="e", policy="p")
>>> s.fails("flag"), s.fails("block")
(True, False)
"""

from __future__ import annotations

import contextlib
import dataclasses
import time
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from ..decide import ACTIONS
from ..errors import ConfigError
from .reader import describe_skipped

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from .worker import FileResult

__all__ = ["ERROR_ACTION", "FAIL_LEVELS", "AuditSummary", "Tally", "run_summary", "summarize"]

ERROR_ACTION = "error"
"""The ``action`` of an output row whose input could not be decided (its ``error`` says why)."""

FAIL_LEVELS: tuple[str, ...] = ("flag", "block", "error")
"""``--fail-on`` levels, in increasing severity: an undecidable file (error) is worse than a block (fail closed)."""


@dataclass(frozen=True)
class AuditSummary:
    """What an :func:`~safeclip.audit.audit` or :func:`~safeclip.audit.rescore` run produced.

    Counts over the whole output: ``rows``, ``actions`` (allow/flag/block), ``errors`` (rows whose action is
    ``error``: inputs that could not be decided). This run only:
    ``processed`` (rows computed now), ``resumed`` (rows kept from the committed parts of an interrupted run),
    ``decoded`` (files decoded into pixels), ``embedded`` (distinct images the model embedded), ``cache_hits``
    (rows whose embedding the worker found in the cache, including copies of a file embedded earlier in this run),
    ``duplicates`` (rows decoded in this run whose sha256 was already embedded or waiting in the model's batch),
    ``worker_restarts``; ``skipped``: the files of the input folders left out, by reason (see
    :mod:`safeclip.audit.reader`). ``seconds`` is the wall time of the call, ``startup_seconds`` the part spent
    loading the model, ``images_per_s`` = processed / seconds. ``timings`` breaks the time down (worker-side
    ``read_s``/``decode_s`` are summed over workers).
    """

    out: str
    rows: int
    actions: Mapping[str, int]
    errors: int
    processed: int
    resumed: int
    decoded: int
    embedded: int
    cache_hits: int
    duplicates: int
    worker_restarts: int
    seconds: float
    startup_seconds: float
    images_per_s: float
    encoder_id: str
    policy: str
    timings: Mapping[str, float] = field(default_factory=dict)
    skipped: Mapping[str, int] = field(default_factory=dict)

    def fails(self, level: str | None) -> bool:
        """Whether any row reaches ``level`` (``flag`` < ``block`` < ``error``); ``None`` never fails."""
        if level is None:
            return False
        if level not in FAIL_LEVELS:
            raise ConfigError(f"fail-on level must be one of {FAIL_LEVELS}, not {level!r}")
        n = self.errors
        if level in ("flag", "block"):
            n += self.actions.get("block", 0)
        if level == "flag":
            n += self.actions.get("flag", 0)
        return n > 0

    def format(self) -> str:
        acts = ", ".join(f"{a} {self.actions.get(a, 0)}" for a in ACTIONS)
        return (f"{self.rows} rows -> {self.out}: {acts}, errors {self.errors} | this run: {self.processed} "
                f"processed in {self.seconds:.1f}s ({self.images_per_s:.1f} images/s, model load "
                f"{self.startup_seconds:.1f}s), {self.decoded} decoded, {self.embedded} embedded, "
                f"{self.cache_hits} cache hits, {self.duplicates} duplicates, {self.resumed} resumed"
                + (f", {self.worker_restarts} worker restarts" if self.worker_restarts else "")
                + (f" | {describe_skipped(self.skipped)}" if self.skipped else ""))


@dataclass
class Tally:
    """This run's counts and timings, added up from the batch unit's results (the same rules in both engines)."""

    decoded: int = 0
    embedded: int = 0
    cache_hits: int = 0
    duplicates: int = 0
    worker_restarts: int = 0
    timings: dict[str, float] = field(default_factory=dict)

    def add(self, results: Iterable[FileResult]) -> None:
        t = self.timings
        for r in results:
            self.decoded += r.decoded
            self.embedded += r.new
            self.cache_hits += r.kind == "hit"
            self.duplicates += r.duplicate
            self.worker_restarts += r.restarts
            for key, v in (("read_s", r.read_s), ("decode_s", r.decode_s), ("embed_s", r.embed_s),
                           ("score_s", r.score_s)):
                t[key] = t.get(key, 0.0) + v

    @contextlib.contextmanager
    def timed(self, key: str) -> Iterator[None]:
        """Add the time spent in the ``with`` block to ``timings[key]``."""
        t = time.monotonic()
        try:
            yield
        finally:
            self.timings[key] = self.timings.get(key, 0.0) + time.monotonic() - t


def summarize(table: pa.Table, tally: Tally, *, out: str, processed: int, resumed: int, started_at: float,
              startup_seconds: float, encoder_id: str, policy: str) -> AuditSummary:
    """The summary of a run that wrote ``table`` (counts over the table, this run's work from ``tally``)."""
    import pyarrow.compute as pc

    counts = {a: 0 for a in ACTIONS}
    vc = pc.value_counts(table.column("action")).to_pylist() if table.num_rows else []
    for item in vc:
        if item["values"] in counts:  # error rows (action "error", or null in older outputs) are ``errors``
            counts[item["values"]] = int(item["counts"])
    errors = int(table.num_rows - pc.count(table.column("error"), mode="only_null").as_py()) if table.num_rows else 0
    seconds = time.monotonic() - started_at
    timings: dict[str, Any] = {k: round(v, 4) for k, v in tally.timings.items()}
    return AuditSummary(
        out=out, rows=table.num_rows, actions=MappingProxyType(counts), errors=errors, processed=processed,
        resumed=resumed, decoded=tally.decoded, embedded=tally.embedded, cache_hits=tally.cache_hits,
        duplicates=tally.duplicates, worker_restarts=tally.worker_restarts, seconds=seconds,
        startup_seconds=startup_seconds, images_per_s=processed / seconds if seconds > 0 else 0.0,
        encoder_id=encoder_id, policy=policy, timings=MappingProxyType(timings))


def run_summary(table: pa.Table, tally: Tally, *, out: str, inputs: int, skipped: Mapping[str, int], policy: str,
                started_at: float, processed: int, startup_seconds: float, encoder_id: str, label: str,
                verbose: bool) -> AuditSummary:
    """The summary of an engine's run over ``inputs`` inputs that wrote ``table`` to ``out``, printed on stderr
    (``label: ...``) when ``verbose``."""
    import sys

    summary = summarize(table, tally, out=out, processed=processed, resumed=inputs - processed,
                        started_at=started_at, startup_seconds=startup_seconds, encoder_id=encoder_id, policy=policy)
    summary = dataclasses.replace(summary, skipped=MappingProxyType(dict(skipped)))
    if verbose:
        print(f"{label}: {summary.format()}", file=sys.stderr)
    return summary
