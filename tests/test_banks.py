"""Banks: the store (crash safety, concurrent readers, damage), policies that name banks, and the decide rule.

Embeddings here are built so the right answer is known (unit vectors, copies of bank entries); nothing is a
moderation result.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading
import time
from pathlib import Path

import numpy as np
import pytest
import yaml

from safeclip.banks import Bank, NewEntry, PolicyBanks, bank_kind
from safeclip.compiled import CompiledPolicy, Views, lint_policy
from safeclip.errors import BankError, PolicyError
from safeclip.policy import load_policy

DIM = 8


def _codes(ids: list[int]) -> np.ndarray:
    """A deterministic random hash per integer id."""
    return np.stack([np.random.default_rng(i).integers(0, 256, 32, dtype=np.uint8) for i in ids])


def _unit(seed: int, dim: int = DIM) -> np.ndarray:
    v = np.random.default_rng(seed).normal(size=(1, dim)).astype(np.float32)
    return v / np.linalg.norm(v)


def _fake_texts(texts: list[str]) -> np.ndarray:
    x = np.random.default_rng(1).normal(size=(len(texts), DIM)).astype(np.float32)
    return x / np.linalg.norm(x, axis=1, keepdims=True)


def _policy(folder: Path, categories: dict) -> Path:
    doc = {"name": "banks-test", "version": "1", "extends": "default", "encoder": {}, "categories": categories}
    path = folder / "policy.yaml"
    path.write_text(yaml.safe_dump(doc))
    return path


# ---- the store --------------------------------------------------------------------------------------------------

def test_a_one_entry_bank_matches_and_reports_its_entry(tmp_path):
    bank = Bank.create(tmp_path / "b", "pdq")
    bank.add(_codes([7]), [NewEntry("only", label="one")])
    q = _codes([7])
    q[0, 0] ^= 0b111  # three bits off
    [(rows, dist)] = bank.search_hamming(q, 31)
    assert rows.tolist() == [0] and dist.tolist() == [3]
    assert bank.entries_by_number(bank.entry_numbers(rows).tolist())[1].id == "only"
    assert bank_kind(tmp_path / "b") == "pdq"


def test_search_is_exact_across_index_segments_and_the_unindexed_tail(tmp_path, monkeypatch):
    import safeclip.banks._store as store

    monkeypatch.setitem(store.TAIL_ROWS, "pdq", 50)  # index every 50 adds, so segments and merges happen
    bank = Bank.create(tmp_path / "b", "pdq")
    for start in range(0, 400, 37):
        ids = list(range(start, min(start + 37, 400)))
        bank.add(_codes(ids), [NewEntry(f"e{i}") for i in ids])
    assert bank._segments, "an index was built"
    assert len(bank._segments) <= store._MAX_SEGMENTS
    codes = _codes(list(range(400)))
    for r, (rows, dist) in enumerate(bank.search_hamming(codes, 0)):
        assert rows.tolist() == [r] and dist.tolist() == [0]


def test_disable_enable_remove_and_a_disabled_bank(tmp_path):
    bank = Bank.create(tmp_path / "b", "pdq")
    bank.add(_codes([1, 2]), [NewEntry("a"), NewEntry("b")])
    reader = Bank.open(tmp_path / "b")
    bank.disable(["a"])
    reader.refresh()
    assert [len(r) for r, _ in reader.search_hamming(_codes([1, 2]), 0)] == [0, 1]
    bank.enable(["a"])
    bank.remove(["b"])
    reader.refresh()
    assert [len(r) for r, _ in reader.search_hamming(_codes([1, 2]), 0)] == [1, 0]
    assert [e.id for e in reader.entries()] == ["a"]
    bank.add(_codes([3]), [NewEntry("b")])  # a removed id may be used again
    bank.set_enabled(False)
    reader.refresh()
    assert not reader.enabled
    with pytest.raises(BankError, match="no entry 'zz'"):
        bank.disable(["zz"])
    with pytest.raises(BankError, match="already exists"):
        bank.add(_codes([4]), [NewEntry("a")])


def test_a_reader_cannot_write_and_bad_rows_are_refused(tmp_path):
    Bank.create(tmp_path / "b", "embedding", dim=DIM, encoder_id="space-a")
    reader = Bank.open(tmp_path / "b")
    with pytest.raises(BankError, match="read-only"):
        reader.disable(["x"])
    writer = Bank.open(tmp_path / "b", writable=True)
    with pytest.raises(BankError, match="L2-normalised"):
        writer.add(np.ones((1, DIM), np.float32), [NewEntry("x")])
    with pytest.raises(BankError, match=r"\(N, 8\)"):
        writer.add(np.ones((1, 4), np.float32), [NewEntry("x")])
    with pytest.raises(BankError, match="not an empty folder"):
        Bank.create(tmp_path / "b", "pdq")
    with pytest.raises(BankError, match="no such bank folder"):
        Bank.open(tmp_path / "nope")


_ADDER = textwrap.dedent("""
    import sys, numpy as np
    from safeclip.banks import Bank, NewEntry
    bank = Bank.open(sys.argv[1], writable=True)
    start = int(sys.argv[2])
    print("ready", flush=True)
    for b in range(start, start + 100000, 50):
        ids = list(range(b, b + 50))
        rows = np.stack([np.random.default_rng(i).integers(0, 256, 32, dtype=np.uint8) for i in ids])
        bank.add(rows, [NewEntry(f"e{i}", label=str(i)) for i in ids])
""")


def test_kill_9_during_add_then_reopen(tmp_path):
    """A writer killed at any moment leaves a bank whose every entry has exactly its own rows; the next writer cuts
    off rows nobody committed and goes on."""
    path = tmp_path / "b"
    Bank.create(path, "pdq")
    for attempt in range(3):
        proc = subprocess.Popen([sys.executable, "-c", _ADDER, str(path), str(attempt * 1_000_000)],
                                stdout=subprocess.PIPE, text=True)
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        time.sleep(0.4 + 0.3 * attempt)
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
        bank = Bank.open(path, writable=True)
        entries = list(bank.entries())
        assert entries, "some adds committed before the kill"
        ids = [int(e.label) for e in entries]
        assert np.array_equal(np.asarray(bank.data[:len(ids)]), _codes(ids)), "every entry has its own rows"
        bank.add(_codes([10**9 + attempt]), [NewEntry(f"after{attempt}", label=str(10**9 + attempt))])
        [(rows, _)] = bank.search_hamming(_codes([10**9 + attempt]), 0)
        assert len(rows) == 1
        bank.close()
    size = (path / "rows.bin").stat().st_size
    with Bank.open(path) as bank:
        assert size == bank.n_rows * 32, "no uncommitted rows are left behind"


def test_readers_keep_matching_while_a_writer_adds(tmp_path):
    path = tmp_path / "b"
    writer = Bank.create(path, "pdq")
    writer.add(_codes([0]), [NewEntry("e0")])
    proc = subprocess.Popen([sys.executable, "-c", _ADDER, str(path), "1"], stdout=subprocess.PIPE, text=True)
    errors: list[BaseException] = []
    seen: list[int] = []

    def read() -> None:
        try:
            reader = Bank.open(path)
            deadline = time.monotonic() + 3
            while time.monotonic() < deadline:
                reader.refresh(force=True)
                [(rows, _)] = reader.search_hamming(_codes([0]), 0)
                assert rows.tolist() == [0]
                seen.append(reader.n_rows)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)

    try:
        assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
        threads = [threading.Thread(target=read) for _ in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        proc.kill()
        proc.wait()
    assert not errors, errors
    assert seen[-1] > seen[0], "readers saw the writer's adds"


def test_a_truncated_rows_file_is_refused_with_a_clear_error(tmp_path):
    bank = Bank.create(tmp_path / "b", "pdq")
    bank.add(_codes([1, 2, 3]), [NewEntry("a"), NewEntry("b"), NewEntry("c")])
    bank.close()
    with open(tmp_path / "b" / "rows.bin", "r+b") as f:
        f.truncate(40)
    with pytest.raises(BankError, match="holds 1 rows but the bank lists 3: the file was truncated"):
        Bank.open(tmp_path / "b")


def test_a_damaged_index_is_searched_exactly_and_rebuilt(tmp_path, monkeypatch, caplog):
    import safeclip.banks._store as store

    monkeypatch.setitem(store.TAIL_ROWS, "pdq", 10)
    bank = Bank.create(tmp_path / "b", "pdq")
    bank.add(_codes(list(range(30))), [NewEntry(f"e{i}") for i in range(30)])
    assert bank._segments
    seg = tmp_path / "b" / "index" / bank._segments[0].name
    for f in seg.iterdir():
        f.write_bytes(f.read_bytes()[:20])  # truncated
    reader = Bank.open(tmp_path / "b")
    assert not reader._segments
    assert "search index is damaged" in caplog.text
    [(rows, _)] = reader.search_hamming(_codes([17]), 0)
    assert rows.tolist() == [17], "searched exactly meanwhile"
    bank.rebuild_index()
    reader.refresh(force=True)
    assert reader._segments
    [(rows, _)] = reader.search_hamming(_codes([17]), 0)
    assert rows.tolist() == [17]


def test_embedding_search_finds_near_copies_and_skips_disabled_entries(tmp_path):
    bank = Bank.create(tmp_path / "b", "embedding", dim=DIM, encoder_id="space-a")
    vecs = np.concatenate([_unit(i) for i in range(20)])
    bank.add(vecs, [NewEntry(f"v{i}") for i in range(20)])
    near = vecs[5] + 0.05 * _unit(99)[0]
    near /= np.linalg.norm(near)
    [(rows, sims)] = bank.search_vectors(near[None], 0.9)
    assert rows[0] == 5 and sims[0] > 0.9
    bank.disable(["v5"])
    [(rows, _)] = bank.search_vectors(near[None], 0.9)
    assert 5 not in rows.tolist()


# ---- policies ---------------------------------------------------------------------------------------------------

def test_policies_validate_their_banks_with_locations(tmp_path):
    Bank.create(tmp_path / "hashes", "pdq")
    Bank.create(tmp_path / "vecs", "embedding", dim=DIM, encoder_id="space-a")
    path = _policy(tmp_path, {
        "known": {"banks": [{"path": "missing", "effect": "deny"},
                            {"path": "hashes", "effect": "deny", "min_similarity": 0.9},
                            {"path": "hashes", "effect": "deny", "max_distance": 300},
                            {"path": "vecs", "effect": "maybe"},
                            {"path": "vecs", "effect": "allow", "min_similarity": 2},
                            {"path": "hashes", "effect": "deny", "quarantine": {"max_inputs": 0}}]},
    })
    with pytest.raises(PolicyError) as e:
        load_policy(path)
    text = str(e.value)
    assert "categories.known.banks[0].path:" in text and "no such bank folder" in text
    assert "banks[1].min_similarity: " in text and "is a pdq bank, matched by max_distance" in text
    assert "banks[2].max_distance: must be an integer number of bits" in text
    assert "banks[3].effect: must be deny" in text
    assert "banks[4].min_similarity: must be a number in [0.5, 1.0]" in text
    assert "banks[5].quarantine.max_inputs: must be a positive integer" in text


def test_lint_and_compile_refuse_an_embedding_bank_of_another_space(tmp_path):
    Bank.create(tmp_path / "vecs", "embedding", dim=DIM, encoder_id="space-a")
    path = _policy(tmp_path, {"sexual": {"banks": [{"path": "vecs", "effect": "allow"}]}})
    policy = load_policy(path)
    assert lint_policy(path, encoder_id="space-a").id == policy.id
    with pytest.raises(PolicyError, match=r"banks\[0\]\.path: .*holds embeddings of 'space-a'"):
        lint_policy(path, encoder_id="space-b")
    with pytest.raises(PolicyError, match=r"banks\[0\]\.path: .*holds embeddings of 'space-a', but this policy runs "
                                          r"in 'space-b'"):
        CompiledPolicy.build(policy, _fake_texts, "space-b")


def test_policy_show_round_trips_banks(tmp_path):
    Bank.create(tmp_path / "hashes", "pdq")
    path = _policy(tmp_path, {"known": {"banks": [{"path": "hashes", "effect": "deny", "action": "flag",
                                                    "max_distance": 20,
                                                    "quarantine": {"max_inputs": 5, "window_hours": 2}}]}})
    policy = load_policy(path)
    doc = policy.to_dict(relative_to=tmp_path)
    assert doc["categories"]["known"]["banks"] == [{"path": "hashes", "effect": "deny", "action": "flag",
                                                    "max_distance": 20,
                                                    "quarantine": {"max_inputs": 5, "window_hours": 2.0}}]
    again = tmp_path / "again.yaml"
    again.write_text(yaml.safe_dump(doc, sort_keys=False))
    assert load_policy(again).categories == policy.categories


# ---- deciding ---------------------------------------------------------------------------------------------------

@pytest.fixture
def decided(tmp_path):
    """A policy with a deny PDQ bank (a bank-only category) and an allow embedding bank on a category that fires
    for everything (flag threshold 0)."""
    deny = Bank.create(tmp_path / "incidents", "pdq")
    deny.add(_codes([1, 2]), [NewEntry("inc-1", label="incident one"), NewEntry("inc-2")])
    allow = Bank.create(tmp_path / "fp", "embedding", dim=DIM, encoder_id="space-a")
    allow.add(_unit(5), [NewEntry("fp-1", label="beach photo")])
    path = _policy(tmp_path, {
        "known": {"banks": [{"path": "incidents", "effect": "deny", "action": "block",
                             "quarantine": {"max_inputs": 2}}]},
        "sexual": {"thresholds": {"flag": 0.0, "block": 1.0},
                   "banks": [{"path": "fp", "effect": "allow", "min_similarity": 0.95}]},
    })
    compiled = CompiledPolicy.build(load_policy(path), _fake_texts, "space-a")
    # Every other category off, so that only the banks and `sexual` decide.
    compiled = CompiledPolicy.build(_only(compiled.policy, {"known", "sexual"}), _fake_texts, "space-a")
    return compiled, deny, allow


def _only(policy, keep):
    import dataclasses

    cats = tuple(c if c.name in keep else dataclasses.replace(c, flag=None, block=None) for c in policy.categories)
    return dataclasses.replace(policy, categories=cats)


def _views(emb: np.ndarray, hashes: list[np.ndarray | None]) -> Views:
    return Views.single(emb).with_pdq([None if h is None else (h[None], [90]) for h in hashes])


def test_a_deny_match_blocks_and_says_which_bank_and_entry(decided):
    compiled, _, _ = decided
    near = _codes([1])[0].copy()
    near[3] ^= 0b1011
    v = compiled.decide(_views(_unit(9), [near]))
    assert v.action(0) == "block"
    d = v.decision(0)
    assert any("known content: entry 'inc-1' ('incident one') of bank 'incidents' at distance 3" in r
               for r in d.reasons)
    [m] = [m for m in d.to_dict()["matches"] if m["category"] == "known"]
    assert m["entry"] == "inc-1" and m["distance"] == 3 and m["effect"] == "deny" and m["action"] == "block"
    assert d.categories["known"].banks[0].entry == "inc-1"


def test_an_allow_exemplar_overrides_a_flag_and_says_so(decided):
    compiled, _, _ = decided
    other = compiled.decide(_views(_unit(9), [_codes([50])[0]]))
    assert other.action(0) == "flag", "the category fires for anything"
    near = _unit(5)[0] + 0.02 * _unit(77)[0]
    v = compiled.decide(_views((near / np.linalg.norm(near))[None], [_codes([50])[0]]))
    assert v.action(0) == "allow"
    reasons = v.decision(0).reasons
    assert any(r.startswith("sexual: allowed by entry 'fp-1' ('beach photo') of bank 'fp' at similarity") and
               "overrides p=" in r for r in reasons), reasons


def test_deny_wins_over_allow_and_views_take_the_worst(decided):
    compiled, _, _ = decided
    emb = np.concatenate([_unit(5), _unit(5)])
    views = Views(emb, np.array([0, 2]))
    views = views.with_pdq([(np.stack([_codes([50])[0], _codes([2])[0]]), [90, 90])])
    v = compiled.decide(views)
    assert v.action(0) == "block" and int(v.view[0]) == 1


def test_a_match_in_a_clip_gives_the_frames_time(decided):
    """Video (issue 24): PDQ is matched per sampled frame, and a match says the frame's time; a deny match on one
    frame acts whatever a category's k of n asks (banks act on any one frame)."""
    import dataclasses

    compiled, _, _ = decided
    emb = np.concatenate([_unit(9), _unit(9), _unit(9)])
    views = Views(emb, np.array([0, 3])).with_pdq(
        [(np.stack([_codes([50])[0], _codes([60])[0], _codes([2])[0]]), [90, 90, 90])]).with_times([(0.0, 1.5, 3.0)])
    v = compiled.decide(views, record=False)
    assert v.action(0) == "block" and v.time(0) == 3.0
    d = v.decision(0)
    [m] = [m for m in d.matches if m.category == "known"]
    assert m.entry == "inc-2" and m.time_s == 3.0 and d.to_dict()["matches"][0]["time_s"] == 3.0
    assert "(frame at 3.00 s)" in m.describe()
    assert [(s.category, s.start_s, s.end_s, s.action) for s in d.segments if s.category == "known"] == [
        ("known", 3.0, 3.0, "block")]
    k3 = dataclasses.replace(compiled, policy=dataclasses.replace(compiled.policy, categories=tuple(
        dataclasses.replace(c, min_frames=3) for c in compiled.policy.categories)))
    assert k3.decide(views, record=False).action(0) == "block"
    still = compiled.decide(_views(_unit(9), [_codes([2])[0]]), record=False).decision(0)
    assert all(m.time_s is None for m in still.matches)


def test_a_flooding_entry_is_quarantined_until_confirmed(decided):
    compiled, deny, _ = decided
    base = _codes([2])[0]
    actions = []
    for k in range(4):  # four distinct near-copies of the same entry; the policy allows 2 in its window
        q = base.copy()
        q[k] ^= 1
        actions.append(compiled.decide(_views(_unit(9), [q])))
    assert [v.action(0) for v in actions[:2]] == ["block", "block"]
    last = actions[3]
    assert last.codes[0][compiled.policy.category_names.index("known")] == 1
    d = last.decision(0)
    assert any("is in flood quarantine (it matched 4 distinct inputs" in r for r in d.reasons), d.reasons
    deny.confirm(["inc-2"])
    compiled.scorer.banks.refresh_s = 0.0
    q = base.copy()
    q[9] ^= 1
    v = compiled.decide(_views(_unit(9), [q]))
    assert v.codes[0][compiled.policy.category_names.index("known")] == 2


def test_an_input_without_a_hash_fails_closed_under_a_pdq_bank(decided):
    compiled, _, _ = decided
    v = compiled.decide(Views.single(_unit(9)))
    assert v.action(0) == "block" and v.problems[0][0] == "NoHash"
    assert "no PDQ hash was computed" in v.problems[0][1]


def test_low_quality_hashes_are_not_matched(decided):
    compiled, _, _ = decided
    views = Views.single(_unit(9)).with_pdq([(_codes([1]), [10])])
    v = compiled.decide(views)
    assert v.problems[0] is None and not v.matches(0)


def test_a_long_lived_policy_sees_new_and_disabled_entries(decided):
    compiled, deny, _ = decided
    compiled.scorer.banks.refresh_s = 0.0
    assert not compiled.decide(_views(_unit(9), [_codes([300])[0]])).matches(0)
    deny.add(_codes([300]), [NewEntry("new")])
    assert compiled.decide(_views(_unit(9), [_codes([300])[0]])).matches(0)[0].entry == "new"
    deny.disable(["new"])
    assert not compiled.decide(_views(_unit(9), [_codes([300])[0]])).matches(0)


def test_policy_banks_explain_the_nearest_entries(decided):
    compiled, _, _ = decided
    banks: PolicyBanks = compiled.scorer.banks
    far = _codes([1])[0].copy()
    far[:6] ^= 0xFF  # 48 bits off: no match, still the nearest
    [m] = banks.nearest("known", _unit(9)[0], far, 90, k=1)
    assert m.entry == "inc-1" and m.distance == 48 and not m.matched


def test_a_compiled_policy_with_banks_travels_to_another_process_and_reopens_them(decided):
    """What the Ray engine does with the compiled policy: the copy opens the same bank folders again."""
    import pickle

    compiled, _, _ = decided
    copy = pickle.loads(pickle.dumps(compiled))
    assert copy.scorer.banks is not compiled.scorer.banks
    v = copy.decide(_views(_unit(9), [_codes([1])[0]]))
    assert v.action(0) == "block" and v.matches(0)[0].entry == "inc-1"


def test_rescoring_and_explaining_do_not_count_towards_quarantine(decided):
    compiled, _, _ = decided
    base = _codes([2])[0]
    for k in range(5):
        q = base.copy()
        q[k] ^= 1
        v = compiled.decide(_views(_unit(9), [q]), record=False)
        assert v.action(0) == "block" and not v.matches(0)[0].quarantined


def test_a_reader_starts_from_the_saved_row_map_and_reads_what_changed_since(tmp_path):
    bank = Bank.create(tmp_path / "b", "pdq")
    bank.add(_codes(list(range(20))), [NewEntry(f"e{i}") for i in range(20)])
    bank.rebuild_index()  # saves the row -> entry map beside the index
    assert (tmp_path / "b" / "index" / "state.npz").is_file()
    bank.disable(["e3"])
    bank.add(_codes([100]), [NewEntry("late")])
    reader = Bank.open(tmp_path / "b")
    found = reader.search_hamming(_codes([3, 4, 100]), 0)
    assert [len(r) for r, _ in found] == [0, 1, 1]
    (tmp_path / "b" / "index" / "state.npz").write_bytes(b"damaged")  # derived data: read everything instead
    reader = Bank.open(tmp_path / "b")
    assert [len(r) for r, _ in reader.search_hamming(_codes([3, 4, 100]), 0)] == [0, 1, 1]
