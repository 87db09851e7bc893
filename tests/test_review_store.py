"""The review store (safeclip.review._store) on both back ends: the same tests for SQLite and PostgreSQL.

PostgreSQL runs where ``$SAFECLIP_TEST_POSTGRES_URL`` names a server (``eval "$(bash .ci/postgres)"`` starts one),
each test in a schema of its own, created and dropped; without it those cases skip, unless
``$SAFECLIP_REQUIRE_POSTGRES=1`` (CI), where they fail.
"""

from __future__ import annotations

import contextlib
import json
import os
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from safeclip.errors import InvalidVerdictError, ReviewError, ReviewItemNotFoundError, ReviewStoreUnavailableError
from safeclip.review import SCHEMA_VERSION, NewItem, ReviewStore, StratumCount, open_store
from safeclip.review import _schema, _store

POLICY = "default@1.0"
CATEGORIES = ("nudity", "violence")


def _with_schema(url: str, schema: str) -> str:
    return url + ("&" if "?" in url else "?") + f"options=-csearch_path%3D{schema}"


def _psycopg() -> Any:
    try:
        import psycopg
    except ImportError:
        if os.environ.get("SAFECLIP_REQUIRE_POSTGRES") == "1":
            pytest.fail("SAFECLIP_REQUIRE_POSTGRES=1 but psycopg is not installed: pip install 'safeclip[review-pg]'")
        pytest.skip("psycopg is not installed (pip install 'safeclip[review-pg]')")
    return psycopg


def _postgres_url() -> str:
    url = os.environ.get("SAFECLIP_TEST_POSTGRES_URL")
    if not url:
        if os.environ.get("SAFECLIP_REQUIRE_POSTGRES") == "1":
            pytest.fail("SAFECLIP_REQUIRE_POSTGRES=1 but SAFECLIP_TEST_POSTGRES_URL is unset: "
                        "eval \"$(bash .ci/postgres)\"")
        pytest.skip("no PostgreSQL: set SAFECLIP_TEST_POSTGRES_URL (eval \"$(bash .ci/postgres)\")")
    _psycopg()
    return url


@contextlib.contextmanager
def _fresh_schema() -> Iterator[str]:
    """The test server's URL with a new schema first on its search_path; the schema is dropped after."""
    url = _postgres_url()
    psycopg = _psycopg()
    schema = f"t_{uuid.uuid4().hex[:16]}"
    with psycopg.connect(url, autocommit=True) as con:
        con.execute(f"CREATE SCHEMA {schema}")
    try:
        yield _with_schema(url, schema)
    finally:
        with psycopg.connect(url, autocommit=True) as con:
            con.execute(f"DROP SCHEMA {schema} CASCADE")


@pytest.fixture(params=["sqlite", "postgresql"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[str]:
    """A place for a new store: a SQLite path, or a PostgreSQL URL whose search_path is a fresh schema."""
    if request.param == "sqlite":
        yield str(tmp_path / "review.db")
    else:
        with _fresh_schema() as url:
            yield url


def raw(location: str, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Run SQL on the store's database behind its back (to damage or inspect it); ``?`` placeholders."""
    if location.startswith("postgresql://"):
        with _psycopg().connect(location, autocommit=True) as con:
            cur = con.execute(sql.replace("?", "%s"), params or None)
            return cur.fetchall() if cur.description else []
    con = sqlite3.connect(location)
    try:
        with con:
            return con.execute(sql, params).fetchall()
    finally:
        con.close()


def decision(action: str, p: float = 0.9) -> dict[str, Any]:
    return {"action": action, "policy": POLICY, "reasons": ["nudity"] if action != "allow" else [],
            "categories": {c: {"probability": p if c == "nudity" else 0.01, "action": action} for c in CATEGORIES}}


def item(i: int, action: str = "flag", *, policy: str = POLICY, probability: float | None = None,
         embedding: bool = True, thumbnail: bool = True) -> NewItem:
    rng = np.random.default_rng(i)
    emb = rng.standard_normal(16).astype(np.float32)
    return NewItem(sha256=f"{i:064x}", policy=policy, encoder_id="tiny", action=action, decision=decision(action),
                   probability=(1.0 if action != "allow" else 0.02) if probability is None else probability,
                   origin="check", source=f"img{i}.jpg",
                   embedding=emb / np.linalg.norm(emb) if embedding else None,
                   thumbnail=bytes([i % 256]) * 50 + b"\xff\xd9" if thumbnail else None)


def added(store: ReviewStore, items: list[NewItem]) -> list[int]:
    """Add new items; their ids."""
    ids = store.add(items)
    assert all(isinstance(i, int) for i in ids)
    return [int(i) for i in ids if i is not None]


def claim(store: ReviewStore, reviewer: str, lease_s: float = 600.0) -> int:
    """The id of the item ``next`` gives ``reviewer`` (there must be one)."""
    got = store.next(reviewer, lease_s=lease_s)
    assert got is not None
    return got.id


def one_line(e: pytest.ExceptionInfo[BaseException]) -> str:
    msg = str(e.value)
    assert "\n" not in msg and msg
    return msg


# ------------------------------------------------------------------------------------------------ items
def test_add_get_round_trip(location: str) -> None:
    with open_store(location) as store:
        assert store.policy_name is None and store.schema_version == SCHEMA_VERSION
        before = time.time()
        ids = added(store, [item(1), item(2, "allow", embedding=False, thumbnail=False)])
        assert ids == [ids[0], ids[0] + 1]
        got = store.get(ids[0])
        new = item(1)
        assert (got.sha256, got.policy, got.encoder_id, got.action, got.origin, got.source) == \
            (new.sha256, POLICY, "tiny", "flag", "check", "img1.jpg")
        assert got.decision == decision("flag") and got.probability == 1.0 and got.verdicts == ()
        assert got.policy_name == "default" and got.policy_version == "1.0" and store.policy_name == "default"
        assert before - 1 <= got.created_at <= time.time() + 1
        assert got.has_embedding and got.has_thumbnail
        assert store.thumbnail(ids[0]) == new.thumbnail
        emb = store.embeddings([ids[1], ids[0], 12345])
        assert emb.shape == (3, 16) and emb.dtype == np.float32
        assert np.isnan(emb[0]).all() and np.isnan(emb[2]).all()
        assert emb[1].view(np.uint32).tolist() == np.asarray(new.embedding).view(np.uint32).tolist()  # bit-exact
        other = store.get(ids[1])
        assert not other.has_embedding and not other.has_thumbnail and store.thumbnail(ids[1]) is None
        assert other.probability == 0.02 and other.to_dict()["decision"] == decision("allow")
        for read in (store.get, store.thumbnail):
            with pytest.raises(ReviewItemNotFoundError, match="has no item 12345") as e:
                read(12345)
            one_line(e)
            assert e.value.item_id == 12345
    with open_store(location, create=False) as again:  # it persists, and the first add bound the policy
        assert again.policy_name == "default" and again.get(ids[0]).decision == decision("flag")


def test_add_is_idempotent_by_sha256_and_policy_version(location: str) -> None:
    with open_store(location) as store:
        first = store.add([item(1), item(2), item(1)])
        assert isinstance(first[0], int) and isinstance(first[1], int) and first[2] is None  # a duplicate in the call
        assert store.add([item(2), item(1)]) == [None, None]
        changed = NewItem(**{**item(1).__dict__, "action": "block", "decision": decision("block")})
        assert store.add([changed]) == [None]
        assert store.get(first[0]).action == "flag"  # nothing changed
        newer = store.add([item(1, policy="default@1.1")])  # the same content under a new policy version
        assert newer[0] is not None and len(list(store.items())) == 3
        later = added(store, [item(9), item(3), item(5)])  # ids follow the order given, not the keys'
        assert later == sorted(later) and [int(i.sha256, 16) for i in store.items(after_id=later[0] - 1)] == [9, 3, 5]


def test_items_of_another_policy_are_refused(location: str) -> None:
    with open_store(location, policy="default") as store:
        assert store.policy_name == "default"
        with pytest.raises(ReviewError, match="several policies") as e:
            store.add([item(1), item(2, policy="strict@1.0")])
        one_line(e)
        with pytest.raises(ReviewError, match="belongs to policy 'default': items of policy 'strict'") as e:
            store.add([item(3, policy="strict@1.0")])
        one_line(e)
        assert list(store.items()) == []  # nothing added
    with pytest.raises(ReviewError, match="belongs to policy 'default', not 'strict'") as e:
        open_store(location, policy="strict")
    one_line(e)
    with pytest.raises(ReviewError, match="not a policy name"):
        open_store(location, policy="default@1.0")
    with open_store(location) as store:
        with pytest.raises(ReviewError, match="NewItem"):
            store.add([{"sha256": "x"}])  # type: ignore[list-item]
        for bad, match in ((dict(probability=0.0), "probability"), (dict(probability=1.5), "probability"),
                           (dict(action="maybe"), "action"), (dict(policy="default"), "policy id"),
                           (dict(embedding=np.zeros((2, 3), np.float32)), "embedding"),
                           (dict(decision={"x": object()}), "not JSON")):
            with pytest.raises(ReviewError, match=match) as e:
                store.add([NewItem(**{**item(5).__dict__, **bad})])
            one_line(e)
        assert list(store.items()) == []


def test_an_unbound_store_is_bound_by_its_first_item(location: str) -> None:
    with open_store(location) as store, open_store(location) as other:
        store.add([item(1, policy="strict@2")])
        assert store.policy_name == "strict"
        with pytest.raises(ReviewError, match="belongs to policy 'strict'"):
            other.add([item(2)])  # opened while unbound: the store's binding still holds
    with open_store(location, policy="strict") as store:
        assert [i.policy for i in store.items()] == ["strict@2"]


# ------------------------------------------------------------------------------------------------ verdicts
def test_verdicts_are_kept_side_by_side(location: str) -> None:
    with open_store(location) as store:
        [iid] = added(store, [item(1)])
        claimed = store.next("alice")
        assert claimed is not None and claimed.id == iid and claimed.claimed_by == "alice"
        first = store.verdict(iid, "block", reviewer="alice", category="nudity", note="clear")
        second = store.verdict(iid, "allow", reviewer="bob", note="art")
        assert second.id > first.id and first.created_at <= second.created_at
        got = store.get(iid)
        assert got.verdicts == (first, second)
        assert [(v.reviewer, v.action, v.category, v.note) for v in got.verdicts] == \
            [("alice", "block", "nudity", "clear"), ("bob", "allow", None, "art")]
        assert got.claimed_by is None and got.claimed_until is None  # alice's verdict released her lease
        assert store.next("alice") is None


def test_invalid_verdicts_are_refused(location: str) -> None:
    with open_store(location) as store:
        [iid] = added(store, [item(1)])
        cases: list[tuple[tuple[Any, str], dict[str, Any], type[ReviewError], str]] = [
                 ((iid + 1, "flag"), {"reviewer": "a"}, ReviewItemNotFoundError, "has no item"),
                 ((iid, "maybe"), {"reviewer": "a"}, InvalidVerdictError, "not one of allow, flag, block"),
                 ((iid, "flag"), {"reviewer": "a", "category": "weapons"}, InvalidVerdictError,
                  r"not one of item \d+.s categories \(nudity, violence\)"),
                 ((iid, "flag"), {"reviewer": "  "}, InvalidVerdictError, "reviewer"),
                 ((iid, "flag"), {"reviewer": None}, InvalidVerdictError, "reviewer"),
                 (("1", "flag"), {"reviewer": "a"}, ReviewError, "not an integer"),
                 ((iid, "flag"), {"reviewer": "a", "note": 3}, InvalidVerdictError, "note")]
        for args, kwargs, cls, match in cases:
            with pytest.raises(cls, match=match) as e:
                store.verdict(*args, **kwargs)
            one_line(e)
            if isinstance(e.value, InvalidVerdictError):  # what a server tells its client: the store unnamed
                assert e.value.reason in str(e.value) and str(store.location) not in e.value.reason
        assert store.get(iid).verdicts == () and [i.id for i in store.items(reviewed=False)] == [iid]


# ------------------------------------------------------------------------------------------------ the queue
def test_next_claims_the_oldest_free_item_with_a_lease(location: str) -> None:
    with open_store(location) as store:
        a, b, c = added(store, [item(1), item(2), item(3)])
        t0 = time.time()
        got = store.next("alice", lease_s=120)
        assert got is not None and got.id == a and got.claimed_by == "alice"
        assert got.claimed_until is not None and t0 + 120 <= got.claimed_until <= time.time() + 120
        assert claim(store, "bob") == b  # alice's lease is live
        assert claim(store, "alice", 120) == a  # her own claim first
        # Alice's lease runs out (set in the past: a short real lease would make the test race a slow machine).
        raw(location, "UPDATE items SET claimed_until = ? WHERE id = ?", (time.time() - 1, a))
        assert claim(store, "carol") == a
        assert claim(store, "alice") == c  # hers was taken: the next free one
        store.verdict(c, "flag", reviewer="dave")  # a verdict by anyone takes the item out of the queue
        assert store.next("erin") is None
        assert store.get(c).claimed_by == "alice"  # dave's verdict released no lease of alice's
        with pytest.raises(ReviewError, match="lease_s"):
            store.next("alice", lease_s=0)
        with pytest.raises(ReviewError, match="reviewer"):
            store.next("")


def test_skip_sends_an_item_behind_the_queue_and_only_its_holder_can(location: str) -> None:
    with open_store(location) as store:
        a, b, c = added(store, [item(1), item(2), item(3)])
        assert claim(store, "alice") == a
        assert store.skip(a, "bob") is False  # not bob's to pass on
        assert store.skip(a, "alice") is True
        got = store.get(a)
        assert got.claimed_by is None and got.claimed_until is None and got.verdicts == ()
        assert claim(store, "alice") == b  # her lease is gone and the item is behind b and c
        [d] = added(store, [item(4)])  # added after the skip: behind the skipped one
        assert [claim(store, who) for who in ("bob", "carol", "dave")] == [c, a, d]
        assert store.skip(b, "alice") is True and claim(store, "erin") == b  # skipped again: still served
        store.verdict(b, "flag", reviewer="erin")
        assert store.skip(b, "erin") is False  # judged: left as it is
        with pytest.raises(ReviewItemNotFoundError, match="has no item 999"):
            store.skip(999, "alice")
        with pytest.raises(ReviewError, match="reviewer"):
            store.skip(a, " ")


def test_threads_sharing_one_store_never_claim_the_same_item(location: str) -> None:
    with open_store(location) as store:
        store.add([item(i) for i in range(40)])
        claims: list[int] = []

        def work(name: str) -> None:
            while (got := store.next(name)) is not None:
                claims.append(got.id)
                store.verdict(got.id, "flag", reviewer=name)

        threads = [threading.Thread(target=work, args=(f"t{k}",)) for k in range(6)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        assert sorted(claims) == sorted(i.id for i in store.items()) and len(claims) == 40


def test_items_filter_and_page(location: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(_store, "PAGE", 3)  # many pages from a few items
    with open_store(location) as store:
        ids = added(store, [item(i, "flag" if i % 3 else "allow", policy="default@1.0" if i < 8 else "default@2.0")
                         for i in range(12)])
        for iid in ids[:5]:
            store.verdict(iid, "allow", reviewer="r")
        store.verdict(ids[0], "block", reviewer="s")
        every = list(store.items())
        assert [i.id for i in every] == ids and len(every[0].verdicts) == 2 and every[5].verdicts == ()
        assert [i.id for i in store.items(reviewed=True)] == ids[:5]
        assert [i.id for i in store.items(reviewed=False)] == ids[5:]
        assert [i.id for i in store.items(action="allow")] == [ids[k] for k in (0, 3, 6, 9)]
        assert [i.id for i in store.items(policy="default@2.0")] == ids[8:]
        assert [i.id for i in store.items(policy="default@2.0", action="flag", reviewed=False)] == \
            [ids[k] for k in (8, 10, 11)]
        assert [i.id for i in store.items(after_id=ids[3], limit=5)] == ids[4:9]
        assert [i.id for i in store.items(limit=0)] == [] and list(store.items(policy="nope@1")) == []
        with pytest.raises(ReviewError, match="action"):
            store.items(action="maybe")
        with pytest.raises(ReviewError, match="limit"):
            store.items(limit=-1)


def test_strata_count_items_and_reviewed_items(location: str) -> None:
    with open_store(location) as store:
        assert store.strata() == []
        ids = added(store, [item(i, ("allow", "flag", "block")[i % 3], policy=f"default@{1 + i // 6}")
                         for i in range(12)])
        for k in (0, 1, 3, 7):
            store.verdict(ids[k], "allow", reviewer="r")
        store.verdict(ids[0], "flag", reviewer="s")  # two verdicts: one reviewed item
        assert store.strata() == [
            StratumCount("default@1", "allow", 2, 2), StratumCount("default@1", "block", 2, 0),
            StratumCount("default@1", "flag", 2, 1), StratumCount("default@2", "allow", 2, 0),
            StratumCount("default@2", "block", 2, 0), StratumCount("default@2", "flag", 2, 1)]


# ------------------------------------------------------------------------------------------------ refusals
def test_a_newer_schema_is_refused(location: str) -> None:
    open_store(location).close()
    raw(location, "UPDATE safeclip_review_meta SET schema_version = ?", (SCHEMA_VERSION + 1,))
    with pytest.raises(ReviewError, match=f"schema version {SCHEMA_VERSION + 1}, newer .* upgrade safeclip") as e:
        open_store(location)
    one_line(e)


def test_not_a_review_store_is_refused(location: str) -> None:
    raw(location, "CREATE TABLE photos (id INTEGER PRIMARY KEY, name TEXT)")
    with pytest.raises(ReviewError, match="is not a review store .*photos.*new file") as e:
        open_store(location)
    one_line(e)
    assert "items" not in {r[0] for r in _tables(location)}  # nothing was created beside the foreign table


def test_a_damaged_meta_table_is_refused(location: str) -> None:
    open_store(location).close()
    raw(location, "DELETE FROM safeclip_review_meta")
    with pytest.raises(ReviewError, match="damaged.*backup") as e:
        open_store(location)
    one_line(e)


def test_a_missing_store_is_not_created_on_request(location: str) -> None:
    with pytest.raises(ReviewError, match="create=True") as e:
        open_store(location, create=False)
    one_line(e)
    assert not Path(location).exists() if not location.startswith("postgresql") else _tables(location) == []


def test_a_closed_store_refuses_work(location: str) -> None:
    store = open_store(location)
    store.close()
    store.close()
    with pytest.raises(ReviewError, match="closed"):
        store.add([item(1)])


def _tables(location: str) -> list[tuple[Any, ...]]:
    if location.startswith("postgresql://"):
        return raw(location, "SELECT tablename FROM pg_tables WHERE schemaname = current_schema()")
    return raw(location, "SELECT name FROM sqlite_master WHERE type = 'table'")


def test_a_file_that_is_not_sqlite_or_is_corrupt_is_refused(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.db"
    garbage.write_bytes(np.random.default_rng(0).integers(0, 256, 8192, dtype=np.uint8).tobytes())
    with pytest.raises(ReviewError, match="is not a SQLite database or is corrupt.*backup") as e:
        open_store(garbage)
    assert str(garbage) in one_line(e)
    path = tmp_path / "review.db"
    with open_store(path) as store:
        store.add([item(i) for i in range(300)])
    size = path.stat().st_size
    with open(path, "r+b") as f:  # overwrite every page but the first (the header) with noise
        f.seek(4096)
        f.write(np.random.default_rng(1).integers(0, 256, size - 4096, dtype=np.uint8).tobytes())
    with pytest.raises(ReviewError, match="corrupt") as e:
        with open_store(path) as store:
            list(store.items())
    one_line(e)
    with pytest.raises(ReviewError, match="is a folder"):
        open_store(tmp_path)


# ------------------------------------------------------------------------------------------------ migrations
def test_each_migration_runs_once_and_is_recorded(location: str, monkeypatch: pytest.MonkeyPatch) -> None:
    def recorded() -> list[int]:
        return [int(r[0]) for r in raw(location, "SELECT version FROM safeclip_review_migrations ORDER BY version")]

    released = list(_schema.MIGRATIONS)
    monkeypatch.setattr(_schema, "MIGRATIONS", released[:1])
    monkeypatch.setattr(_store, "SCHEMA_VERSION", 1)
    with open_store(location) as store:  # a store at version 1, as an older safeclip wrote it
        a, b = added(store, [item(1), item(2)])
        store_id = store.store_id
    raw(location, "UPDATE items SET claimed_by = 'alice', claimed_until = ? WHERE id = ?", (time.time() + 600, a))
    assert recorded() == [1]

    monkeypatch.setattr(_schema, "MIGRATIONS", released)  # this safeclip: every released migration
    monkeypatch.setattr(_store, "SCHEMA_VERSION", len(released))
    with open_store(location) as store:
        assert store.schema_version == len(released) and store.store_id == store_id
        assert store.get(a).decision == decision("flag") and store.get(a).claimed_by == "alice"  # data came through
        assert store.skip(a, "alice") and claim(store, "bob") == b  # version 2's queue order on old rows
    assert recorded() == list(range(1, len(released) + 1))

    n = len(released) + 1
    extra = "ALTER TABLE items ADD COLUMN reviewed_by_model TEXT"  # fails if it ever runs twice
    monkeypatch.setattr(_schema, "MIGRATIONS", [*released, _schema.Migration(n, (extra,), (extra,))])
    monkeypatch.setattr(_store, "SCHEMA_VERSION", n)
    with open_store(location) as store:
        assert store.schema_version == n and store.store_id == store_id
    with open_store(location) as store:
        assert store.schema_version == n
    assert recorded() == list(range(1, n + 1))
    assert raw(location, "SELECT schema_version FROM safeclip_review_meta") == [(n,)]
    assert raw(location, "SELECT reviewed_by_model FROM items") == [(None,), (None,)]
    monkeypatch.setattr(_store, "SCHEMA_VERSION", n - 1)  # the older safeclip meets the migrated store
    with pytest.raises(ReviewError, match="upgrade safeclip"):
        open_store(location)


# ------------------------------------------------------------------------------------------------ PostgreSQL only
def test_postgres_location_never_shows_the_password() -> None:
    with _fresh_schema() as location:
        secret = location.replace("postgresql://postgres@", "postgresql://postgres:hunter2@", 1)
        assert "hunter2" in secret  # trust authentication ignores it
        with open_store(secret) as store:
            assert "hunter2" not in store.location and store.location.startswith("postgresql://postgres@")
            assert "hunter2" not in repr(store)


def test_a_lost_connection_fails_loudly_then_reconnects() -> None:
    with _fresh_schema() as location:
        name = f"victim_{uuid.uuid4().hex[:8]}"
        with open_store(f"{location}&application_name={name}") as store:
            [iid] = added(store, [item(1)])
            raw(location, "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE application_name = ?", (name,))
            with pytest.raises(ReviewStoreUnavailableError, match="connection was lost") as e:
                store.verdict(iid, "flag", reviewer="alice")
            one_line(e)
            assert store.get(iid).verdicts == ()  # nothing was written; the next call connected again
            store.verdict(iid, "flag", reviewer="alice")
            assert len(store.get(iid).verdicts) == 1


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.timeout(30)
def test_unreachable_postgres_is_unavailable_quickly() -> None:
    _psycopg()
    with pytest.raises(ReviewStoreUnavailableError, match="cannot be reached.*start PostgreSQL") as e:
        open_store(f"postgresql://postgres:hunter2@127.0.0.1:{_free_port()}/db")  # nothing listens: refused
    assert "hunter2" not in one_line(e)
    with socket.socket() as silent:  # accepts connections (the kernel's backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        port = silent.getsockname()[1]
        with pytest.raises(ReviewStoreUnavailableError, match="cannot be reached"):
            open_store(f"postgresql://postgres@127.0.0.1:{port}/db?connect_timeout=1")


@pytest.mark.parametrize("url", ["postgresql://postgres:hun%zzter2@127.0.0.1:1/db",
                                 "postgresql://postgres@127.0.0.1:1/db?password=hun%zzter2&sslmode=disable"])
def test_a_password_is_masked_even_where_libpq_quotes_it(url: str) -> None:
    _psycopg()
    with pytest.raises(ReviewError, match="percent-encoded") as e:  # libpq quotes the token it could not decode
        open_store(url)
    assert "hun" not in one_line(e) and "***" in one_line(e)


def test_postgres_without_psycopg_names_the_extra(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "psycopg", None)  # import psycopg raises ImportError
    with pytest.raises(ReviewError, match=r"pip install 'safeclip\[review-pg\]'") as e:
        open_store("postgresql://postgres:hunter2@127.0.0.1:1/db")
    assert "hunter2" not in one_line(e)


# ------------------------------------------------------------------------------------------------ processes
WORKER = r"""
import json, random, sys, time
from pathlib import Path

import numpy as np

from safeclip.review import NewItem, open_store

location, w, sync = sys.argv[1], int(sys.argv[2]), Path(sys.argv[3])
N, WORKERS = int(sys.argv[4]), int(sys.argv[5])


def barrier(name):
    (sync / f"{name}.{w}").touch()
    deadline = time.time() + 120
    while len(list(sync.glob(f"{name}.*"))) < WORKERS:
        if time.time() > deadline:
            sys.exit(f"worker {w}: the others never reached {name}")
        time.sleep(0.005)


def new(i):
    emb = np.random.default_rng(i).standard_normal(16).astype(np.float32)
    cats = {"nudity": {"probability": 0.9}, "violence": {"probability": 0.1}}
    return NewItem(f"{i:064x}", "default@1.0", "tiny", "flag", {"action": "flag", "categories": cats}, 1.0,
                   "check", embedding=emb)


barrier("imported")
store = open_store(location)  # all at once, on a store nobody has created yet
mine = [(w * 4 + j) % N for j in range(N // 2)]  # overlapping windows that cover every item
random.Random(w).shuffle(mine)
added = {}
for k in range(0, len(mine), 5):
    chunk = mine[k:k + 5]
    for i, got in zip(chunk, store.add([new(i) for i in chunk])):
        added[i] = got
barrier("added")
ids = {int(it.sha256, 16): it.id for it in store.items()}
plan = [ids[i] for i in range(8)] + [ids[8 + 2 * w], ids[9 + 2 * w]]  # 8 items everyone judges, 2 only this one
random.Random(w).shuffle(plan)
verdicts, claims = [], []
for n, iid in enumerate(plan + [None] * N):
    if iid is not None:
        v = store.verdict(iid, ("allow", "flag", "block")[(w + n) % 3], reviewer=f"w{w}",
                          category="nudity" if n % 2 else None, note=f"w{w}-{n}")
        verdicts.append(v.to_dict())
    got = store.next(f"w{w}", lease_s=3600)
    if got is None:
        if iid is None:
            break
        continue
    claims.append(got.id)
    v = store.verdict(got.id, "flag", reviewer=f"w{w}", note=f"claimed by w{w}")
    verdicts.append(v.to_dict())
store.close()
print(json.dumps({"added": {str(i): a for i, a in added.items()}, "verdicts": verdicts, "claims": claims}))
"""


def test_eight_processes_lose_no_item_no_verdict_and_share_no_claim(location: str, tmp_path: Path) -> None:
    """8 processes open a new store at once, add overlapping items, then post verdicts on overlapping and disjoint
    items while claiming the queue with ``next``: each item is there once, every verdict is, no claim is shared."""
    n, workers = 40, 8
    sync = tmp_path / "sync"
    sync.mkdir()
    env = {**os.environ, "PYTHONHASHSEED": "0"}
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, location, str(w), str(sync), str(n), str(workers)],
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
             for w in range(workers)]
    outs = []
    for p in procs:
        out, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-3000:]
        outs.append(json.loads(out))
    with open_store(location) as store:
        every = list(store.items())
        # adds: each (sha256, policy) exactly once, and exactly one process got its id
        assert sorted(int(i.sha256, 16) for i in every) == list(range(n))
        winners: dict[str, list[int]] = {}
        for o in outs:
            for i, got in o["added"].items():
                if got is not None:
                    winners.setdefault(i, []).append(got)
        by_index = {int(i.sha256, 16): i.id for i in every}
        assert {int(i): ids for i, ids in winners.items()} == {i: [by_index[i]] for i in range(n)}
        # verdicts: every one posted is there, as posted, and no other
        posted = sorted((v for o in outs for v in o["verdicts"]), key=lambda v: v["id"])
        stored = sorted((v.to_dict() for i in every for v in i.verdicts), key=lambda v: v["id"])
        assert len(posted) == len(stored) == workers * 10 + sum(len(o["claims"]) for o in outs)
        assert stored == posted
        # claims: never one item twice; the items no one judged by plan were all claimed
        claims = [c for o in outs for c in o["claims"]]
        assert len(claims) == len(set(claims))
        assert {by_index[i] for i in range(8 + 2 * workers, n)} <= set(claims)
        assert store.next("anyone") is None and store.strata()[0].reviewed == n


KILLED_WRITER = r"""
import sys

import numpy as np

from safeclip.review import NewItem, open_store

store = open_store(sys.argv[1], policy="default")
cats = {"nudity": {"probability": 0.9}, "violence": {"probability": 0.1}}
for i in range(1_000_000):  # until killed: each line is printed only once its write has returned
    thumb = np.random.default_rng(i).bytes(64 * 1024)  # long writes, so that the kill lands inside one
    [iid] = store.add([NewItem(f"{i:064x}", "default@1.0", "tiny", "flag", {"action": "flag", "categories": cats},
                               1.0, "check", embedding=np.ones(16, np.float32), thumbnail=thumb)])
    print("item", iid, flush=True)
    v = store.verdict(iid, "block", reviewer="killed", category="nudity")
    print("verdict", v.id, flush=True)
"""


def test_a_writer_killed_mid_write_loses_nothing_it_was_told_was_written(location: str) -> None:
    """kill -9 a process in the middle of adding items and posting verdicts: the store opens clean, holds every item
    and verdict whose write had returned, and takes new work."""
    proc = subprocess.Popen([sys.executable, "-c", KILLED_WRITER, location], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    acked: dict[str, set[int]] = {"item": set(), "verdict": set()}
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            kind, number = line.split()
            acked[kind].add(int(number))
            if len(acked["verdict"]) >= 25:
                break
        else:
            pytest.fail(f"the writer stopped early: {proc.stderr.read()[-2000:] if proc.stderr else ''}")
    finally:
        proc.kill()  # SIGKILL: no atexit, no rollback of its own
        proc.wait(timeout=30)
    assert proc.returncode == -9
    if not location.startswith("postgresql://"):
        assert raw(location, "PRAGMA integrity_check") == [("ok",)]
    with open_store(location, create=False) as store:
        items = {i.id: i for i in store.items()}
        assert acked["item"] <= set(items)
        stored = {v.id for i in items.values() for v in i.verdicts}
        assert acked["verdict"] <= stored
        assert all(items[i].has_thumbnail for i in acked["item"])
        [new] = added(store, [item(10**9)])
        store.verdict(new, "allow", reviewer="alice")
        assert [v.reviewer for v in store.get(new).verdicts] == ["alice"]


def test_a_forked_child_gets_its_own_connection_and_the_parents_keeps_working(location: str) -> None:
    """A forking server (gunicorn's pre-fork, multiprocessing's fork) inherits an open store: the child must not use
    the parent's connection (SQLite's and libpq's do not cross fork), nor close it under the parent."""
    with open_store(location, policy="default") as store:
        added(store, [item(1)])
        pid = os.fork()
        if pid == 0:  # the child: writes through the inherited store object and closes it
            code = 1
            try:
                code = 0 if added(store, [item(2)]) else 1
                store.close()
            finally:
                os._exit(code)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        added(store, [item(3)])  # the parent's connection still works
        assert sorted(i.sha256 for i in store.items()) == [f"{i:064x}" for i in (1, 2, 3)]
