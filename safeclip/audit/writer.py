"""The audit's output: its schema and rows, the committed Parquet parts of a run in progress, resume, and the
exactly-once merge into ``OUT.parquet``.

Exactly once, resumable
    Rows are committed as Parquet part files in ``OUT.parquet.parts/`` (each written whole, fsynced, renamed into
    place: :func:`safeclip._files.write_parquet_atomic`), always *after* the embeddings they use were committed to
    the cache. ``run.json`` beside them says which configuration (policy, encoder, columns) wrote them. A re-run of
    the same command skips every input that has a committed row, and finds the embeddings of the rest in the cache,
    so after ``kill -9`` at any moment nothing committed is computed again; parts of another configuration are
    dropped. At the end the parts are merged, in input order and one row per input, into ``OUT.parquet``, and the
    parts folder is removed. Both engines write this same layout, so each can resume the other's runs.

Columns: ``path, sha256, bytes, width, height, frames, action, p_<category>..., error, encoder_id, policy`` (and
``embedding`` with ``save_embeddings``); the run's metadata is the schema's ``safeclip`` key (JSON).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import sys
import tempfile
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from .._files import fsync_dir, write_json_atomic, write_parquet_atomic
from ..cache import EmbeddingCache
from ..decide import ACTIONS
from ..errors import AuditError, AuditLockedError
from ..policy import Policy
from .identity import EncoderIdentity
from .worker import FileResult, decoder_fingerprint

if TYPE_CHECKING:  # pragma: no cover
    import pyarrow as pa

    from .plan import AuditPlan

__all__ = ["FORMAT_VERSION", "Parts", "Rows", "RunOutput", "embedding_dir", "output_schema", "policy_fingerprint",
           "read_meta", "run_meta"]

FORMAT_VERSION = 1
_NOT_IDENTITY = ("encoder_chosen_by",)  # run metadata that does not change a row: resuming ignores it


def policy_fingerprint(policy: Policy) -> str:
    return hashlib.sha256(repr(policy).encode()).hexdigest()[:16]


def run_meta(ident: EncoderIdentity, policy: Policy, save_embeddings: bool, encoder_chosen_by: str) -> dict[str, Any]:
    """An audit's metadata: what its rows depend on (``run.json`` and the output schema's ``safeclip`` key)."""
    return {"format": FORMAT_VERSION, "kind": "audit", "encoder_id": ident.encoder_id,
            "encoder_chosen_by": encoder_chosen_by, "policy": policy.id,
            "policy_fingerprint": policy_fingerprint(policy), "categories": list(policy.category_names),
            "dim": ident.dim, "save_embeddings": bool(save_embeddings)}


def _same_run(a: Mapping[str, Any] | None, b: Mapping[str, Any]) -> bool:
    """Whether parts written under metadata ``a`` hold the rows a run under ``b`` would write."""
    if not isinstance(a, Mapping):
        return False

    def key(m: Mapping[str, Any]) -> dict[str, Any]:
        return {k: v for k, v in m.items() if k not in _NOT_IDENTITY}

    return key(a) == key(b)


def output_schema(categories: Sequence[str], meta: Mapping[str, Any], save_embeddings: bool) -> pa.Schema:
    import pyarrow as pa

    fields = [
        pa.field("path", pa.string()),
        pa.field("sha256", pa.string()),
        pa.field("bytes", pa.int64()),
        pa.field("width", pa.int32()),
        pa.field("height", pa.int32()),
        pa.field("frames", pa.int32()),
        pa.field("action", pa.string()),
        *[pa.field(f"p_{c}", pa.float32()) for c in categories],
        pa.field("error", pa.string()),
        pa.field("encoder_id", pa.string()),
        pa.field("policy", pa.string()),
    ]
    if save_embeddings:
        fields.append(pa.field("embedding", pa.list_(pa.float32())))
    return pa.schema(fields, metadata={b"safeclip": json.dumps(dict(meta), sort_keys=True).encode()})


def read_meta(schema: pa.Schema) -> dict[str, Any]:
    """The ``safeclip`` metadata of an output's schema ({} when absent)."""
    raw = (schema.metadata or {}).get(b"safeclip")
    try:
        return json.loads(raw) if raw else {}
    except ValueError:
        return {}


class Rows:
    """A columnar buffer of output rows."""

    def __init__(self, n_categories: int, save_embeddings: bool) -> None:
        self.c = n_categories
        self.save_embeddings = save_embeddings
        self.cols: dict[str, list[Any]] = {k: [] for k in (
            "path", "sha256", "bytes", "width", "height", "frames", "action", "error")}
        self.probs: list[np.ndarray | None] = []
        self.emb: list[np.ndarray | None] = []

    def __len__(self) -> int:
        return len(self.probs)

    def add(self, path: str | None, sha: str | None, nbytes: int | None, width: int | None, height: int | None,
            frames: int | None, action: str | None, probs: np.ndarray | None, error: str | None,
            emb: np.ndarray | None = None) -> None:
        c = self.cols
        c["path"].append(path)
        c["sha256"].append(sha)
        c["bytes"].append(nbytes)
        c["width"].append(width)
        c["height"].append(height)
        c["frames"].append(frames)
        c["action"].append(action)
        c["error"].append(error)
        self.probs.append(probs)
        if self.save_embeddings:
            self.emb.append(emb)

    def extend(self, inputs: Sequence[str], results: Sequence[FileResult]) -> None:
        """One row per result: decided (``code`` set) or an error row."""
        for r in results:
            if r.code is None:
                self.add(inputs[r.tid], r.sha256, r.nbytes, None, None, None, None, None, r.error_text)
            else:
                self.add(inputs[r.tid], r.sha256, r.nbytes, r.width, r.height, r.n_frames, ACTIONS[r.code],
                         r.probs, None, r.embeddings)

    def table(self, schema: pa.Schema, categories: Sequence[str], encoder_id: str, policy_id: str) -> pa.Table:
        import pyarrow as pa

        n = len(self)
        arrays: dict[str, Any] = dict(self.cols)
        mat = np.full((n, self.c), np.nan, np.float32)
        valid = np.zeros(n, bool)
        for i, p in enumerate(self.probs):
            if p is not None:
                mat[i] = p
                valid[i] = True
        for j, name in enumerate(categories):
            arrays[f"p_{name}"] = pa.array(mat[:, j], pa.float32(), mask=~valid)
        arrays["encoder_id"] = [encoder_id] * n
        arrays["policy"] = [policy_id] * n
        if self.save_embeddings:
            arrays["embedding"] = [None if e is None else np.asarray(e, np.float32).ravel() for e in self.emb]
        return pa.Table.from_arrays([pa.array(arrays[f.name], f.type) for f in schema], schema=schema)


class Parts:
    """``OUT.parquet.parts/``: the committed rows of a run in progress (see the module docstring)."""

    def __init__(self, out: Path, run: Mapping[str, Any]) -> None:
        self.out = out
        self.dir = out.with_name(out.name + ".parts")
        self.run = dict(run)
        self._lock_fd: int | None = None
        self._next = 0
        self.previous: Any = None

    def open(self) -> set[str]:
        """Lock the folder; return the paths that already have a committed row of this same run. Nothing is
        deleted until :meth:`begin` (the run's identity may still be a prediction)."""
        import pyarrow.parquet as pq

        self.out.parent.mkdir(parents=True, exist_ok=True)
        for stale in self.out.parent.glob(f"{self.dir.name}.done-*"):
            shutil.rmtree(stale, ignore_errors=True)
        self.dir.mkdir(exist_ok=True)
        self._lock()
        for tmp in self.dir.glob(".*.tmp"):
            tmp.unlink(missing_ok=True)
        try:
            self.previous = json.loads((self.dir / "run.json").read_text())
        except (OSError, ValueError):
            self.previous = None
        done: set[str] = set()
        if not _same_run(self.previous, self.run):
            return done
        for p in sorted(self.dir.glob("part-*.parquet")):
            try:
                done.update(v for v in pq.read_table(p, columns=["path"]).column("path").to_pylist() if v)
            except Exception:  # parts are renamed into place whole, so this is outside damage: recompute them
                p.unlink(missing_ok=True)
                continue
            self._next = max(self._next, int(p.stem.split("-")[1]) + 1)
        return done

    def begin(self) -> None:
        """Make the folder this run's: parts of another configuration (policy, encoder) are dropped."""
        if _same_run(self.previous, self.run):
            return
        parts = sorted(self.dir.glob("part-*.parquet"))
        if parts:
            prev = self.previous if isinstance(self.previous, Mapping) else {}
            print(f"safeclip audit: {self.dir} holds rows of another configuration "
                  f"({prev.get('policy')}, {prev.get('encoder_id')}); starting over (the embedding cache still "
                  "saves the model work)", file=sys.stderr)
        for p in parts:
            p.unlink()
        self._next = 0
        write_json_atomic(self.dir / "run.json", self.run, durable=True)
        self.previous = self.run

    def _lock(self) -> None:
        try:
            import fcntl
        except ImportError:  # pragma: no cover - no advisory locks on this platform
            return
        fd = os.open(self.dir / "LOCK", os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            os.close(fd)
            raise AuditLockedError(f"another audit is writing {self.out} (lock held on {self.dir / 'LOCK'}); wait "
                                   "for it to finish, or give another --out") from e
        self._lock_fd = fd

    def commit(self, table: pa.Table) -> None:
        if table.num_rows:
            write_parquet_atomic(table, self.dir / f"part-{self._next:06d}.parquet")
            self._next += 1

    def merge(self, inputs: Sequence[str], schema: pa.Schema) -> pa.Table:
        """Merge the parts into ``OUT`` (input order, one row per input), then remove the parts folder."""
        import pyarrow as pa
        import pyarrow.compute as pc
        import pyarrow.parquet as pq

        tables = [pq.read_table(p).cast(schema) for p in sorted(self.dir.glob("part-*.parquet"))]
        table = pa.concat_tables(tables) if tables else schema.empty_table()
        idx = pc.index_in(table.column("path"), value_set=pa.array(inputs, pa.string()))
        table = table.filter(pc.is_valid(idx))
        idx = pc.drop_null(idx).to_numpy()
        order = np.argsort(idx, kind="stable")
        idx = idx[order]
        keep = np.ones(len(idx), bool)
        keep[1:] = idx[1:] != idx[:-1]  # exactly once, even if a part were ever duplicated
        table = table.take(pa.array(order[keep]))
        if table.num_rows != len(inputs):
            raise AuditError(
                f"{self.dir} holds rows for {table.num_rows} of the {len(inputs)} inputs after the run: its parts "
                "were changed while the audit ran. Nothing was lost from the embedding cache: run the same "
                "command again (it recomputes the missing rows), or delete the folder to start over")
        write_parquet_atomic(table.replace_schema_metadata(schema.metadata), self.out)
        self.remove()
        return table

    def remove(self) -> None:
        gone = self.dir.with_name(f"{self.dir.name}.done-{os.getpid()}")
        with contextlib.suppress(OSError):
            os.replace(self.dir, gone)  # one atomic step: a kill now leaves only a folder to delete
            fsync_dir(self.dir.parent)
            shutil.rmtree(gone, ignore_errors=True)
        self.release()

    def release(self) -> None:
        if self._lock_fd is not None:
            with contextlib.suppress(OSError):
                os.close(self._lock_fd)
            self._lock_fd = None


@contextlib.contextmanager
def embedding_dir(plan: AuditPlan) -> Iterator[Path]:
    """The folder of the run's embedding cache: the plan's, or with ``use_cache=False`` a private one, removed at
    the end (identical files are still embedded once within the run)."""
    if plan.use_cache:
        yield plan.cache_dir
        return
    scratch = tempfile.mkdtemp(prefix="safeclip-audit-")
    try:
        yield Path(scratch)
    finally:
        shutil.rmtree(scratch, ignore_errors=True)


class RunOutput:
    """Where one run's results go, in the order exactly-once needs: the embedding cache of its space
    (:attr:`db`), then rows, buffered (:attr:`rows`) and committed as parts of the output (:meth:`commit`).

    Opening it locks the output (:class:`~safeclip.errors.AuditLockedError` if another audit holds it) and finds the
    inputs committed by an interrupted run of the same configuration (:attr:`done`); :meth:`begin`, once the
    encoder is known for sure, drops parts of another configuration.
    """

    def __init__(self, plan: AuditPlan, ident: EncoderIdentity, emb_dir: Path) -> None:
        self.plan = plan
        self.ident = ident
        self.meta = run_meta(ident, plan.policy, plan.save_embeddings, plan.encoder_chosen_by)
        self.schema = output_schema(plan.categories, self.meta, plan.save_embeddings)
        self.fingerprint = decoder_fingerprint(plan.decode_limits, ident.spec.size if plan.fast_decode else None)
        self.parts = Parts(plan.out, self.meta)
        self.done = self.parts.open()
        try:
            self.db = EmbeddingCache(emb_dir, ident.encoder_id)  # exists before the decoders open it read-only
        except BaseException:
            self.parts.release()
            raise
        self.rows = self._new_rows()

    def _new_rows(self) -> Rows:
        return Rows(len(self.plan.categories), self.plan.save_embeddings)

    def todo(self) -> list[tuple[int, str]]:
        """``(position, path)`` of the inputs without a committed row."""
        return [(i, p) for i, p in enumerate(self.plan.inputs) if p not in self.done]

    def begin(self) -> None:
        self.parts.begin()

    def commit(self) -> None:
        """Commit the buffered rows as one part (their embeddings are in the cache already: see
        :func:`safeclip.audit.mapper.store`)."""
        if len(self.rows):
            self.parts.commit(self.rows.table(self.schema, self.plan.categories, self.ident.encoder_id,
                                              self.plan.policy.id))
            self.rows = self._new_rows()

    def merge(self) -> pa.Table:
        return self.parts.merge(list(self.plan.inputs), self.schema)

    def release(self) -> None:
        """Unlock the output, fold the cache's write-ahead log in and close it (however the run ended)."""
        self.parts.release()
        self.db.checkpoint()
        self.db.close()
