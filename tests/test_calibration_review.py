"""calibration.review: labels and weights from verdicts, the weighted refit, the report, the written version, the
``safeclip calibrate --from-review`` command, and a small run of the whole loop on embeddings whose truth is known
(benchmarks/review_loop.py; the embeddings are synthetic, so nothing here is a moderation result)."""

from __future__ import annotations

import hashlib
import importlib.util
import sys
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from safeclip.calibration import (
    ThresholdWarning,
    calibrate_from_review,
    choose_thresholds,
    effective_n,
    rates_at,
    review_data,
)
from safeclip.compiled import CompiledPolicy
from safeclip.errors import DataError, EncoderMismatchError, ReviewError
from safeclip.policy import load_policy
from safeclip.review import NewItem, ReviewStore
from safeclip.versions import history, rollback

_spec = importlib.util.spec_from_file_location(
    "review_loop", Path(__file__).resolve().parents[1] / "benchmarks" / "review_loop.py")
assert _spec is not None and _spec.loader is not None
loop = importlib.util.module_from_spec(_spec)
sys.modules["review_loop"] = loop
_spec.loader.exec_module(loop)

ENC = loop.ENCODER


def new_store(path: Path, name: str = "loop") -> ReviewStore:
    from safeclip.review import open_store

    return open_store(path, policy=name)


def sha(i: int | str) -> str:
    return hashlib.sha256(str(i).encode()).hexdigest()


def decision(action: str, reasons: tuple[str, ...] = (), policy: str = "loop@1.0") -> dict[str, Any]:
    cats = {c: {"probability": 0.99 if c in reasons else 0.01, "action": action if c in reasons else "allow",
                "flag_threshold": 0.5, "block_threshold": 0.9} for c in ("weapons", "drugs")}
    return {"action": action, "reasons": list(reasons), "categories": cats, "policy": policy, "encoder_id": ENC}


def unit(rng: np.random.Generator) -> np.ndarray:
    v = rng.normal(size=loop.D)
    return (v / np.linalg.norm(v)).astype(np.float32)


@pytest.fixture()
def policy_file(tmp_path: Path) -> Path:
    return loop.write_policy(tmp_path, allow_rate=0.02, flag=0.9, block=0.99)


# ------------------------------------------------------------------------------------------- labels, weights
def test_labels_and_weights_from_verdicts(tmp_path: Path, policy_file: Path) -> None:
    """allow: negative everywhere; a category: positive for it only; no category: the decision's fired categories,
    nothing when none fired; several verdicts: majority, a tie positive; weight 1 / (probability x reviewed share)."""
    rng = np.random.default_rng(0)
    specs = [  # (action, probability, reasons, verdicts [(action, category)], embedding?, encoder)
        ("allow", 0.02, (), [("allow", None)], True, ENC),                                      # 0
        ("flag", 1.0, ("weapons",), [("flag", "weapons")], True, ENC),                          # 1
        ("block", 1.0, ("drugs",), [("block", None)], True, ENC),                               # 2
        ("flag", 1.0, (), [("flag", None)], True, ENC),                                         # 3 nothing fired
        ("flag", 1.0, ("weapons",), [("allow", None), ("flag", "weapons")], True, ENC),         # 4 tie
        ("allow", 0.02, (), [("allow", None), ("allow", None), ("flag", "weapons")], True, ENC),  # 5 majority
        ("allow", 0.02, (), [], True, ENC),                                                     # 6 not reviewed
        ("allow", 0.02, (), [], True, ENC),                                                     # 7 not reviewed
        ("flag", 1.0, ("weapons",), [("flag", "weapons")], False, ENC),                         # 8 no embedding
        ("flag", 1.0, ("weapons",), [("flag", "weapons")], True, "another-space"),              # 9 other encoder
    ]
    with new_store(tmp_path / "r.db") as store:
        ids = store.add([NewItem(sha(i), "loop@1.0", enc, a, decision(a, r), p, "check",
                                 embedding=unit(rng) if emb else None)
                         for i, (a, p, r, _, emb, enc) in enumerate(specs)])
        for item_id, spec in zip(ids, specs):
            assert item_id is not None
            for k, (act, cat) in enumerate(spec[3]):
                store.verdict(item_id, act, reviewer=f"r{k}", category=cat)
        rd = review_data(store, policy_file)
    assert rd.encoder_id == ENC and rd.n_items == 10 and rd.n_reviewed == 8
    assert dict(rd.left_out) == {"no embedding": 1, "other encoder": 1, "verdict labels nothing": 1}
    assert rd.skipped == 2 and len(rd) == 8  # every item of the space with an embedding, for the flip counts
    row = {int(i): k for k, i in enumerate(rd.item_ids)}
    lab = {c: {n: int(rd.labels[c][row[ids[n]]]) for n in (0, 1, 2, 3, 4, 5, 6)} for c in ("weapons", "drugs")}
    assert lab["weapons"] == {0: 0, 1: 1, 2: -1, 3: -1, 4: 1, 5: 0, 6: -1}
    assert lab["drugs"] == {0: 0, 1: -1, 2: 1, 3: -1, 4: 0, 5: 0, 6: -1}
    w = {n: float(rd.weights[row[ids[n]]]) for n in (0, 1, 5, 6)}
    # allow stratum: 4 items (0, 5, 6, 7), 2 reviewed: 1 / (0.02 * 2/4) = 100, not 50; flags: all reviewed, 1.
    assert w == {0: pytest.approx(100.0), 1: 1.0, 5: pytest.approx(100.0), 6: 0.0}
    assert rd.stream_weights[row[ids[6]]] == pytest.approx(50.0)
    with new_store(tmp_path / "r.db") as store:
        with pytest.raises(EncoderMismatchError):
            review_data(store, policy_file, encoder_id="nowhere")
        with pytest.raises(ReviewError, match="belongs to policy 'loop'"):
            review_data(store, "default")


def test_a_store_without_verdicts_is_refused(tmp_path: Path, policy_file: Path) -> None:
    with new_store(tmp_path / "r.db") as store:
        store.add([NewItem(sha(1), "loop@1.0", ENC, "allow", decision("allow"), 0.02, "check",
                           embedding=unit(np.random.default_rng(1)))])
        with pytest.raises(DataError, match="no verdicts"):
            review_data(store, policy_file)


# ------------------------------------------------------------------------------------------ weighted thresholds
def test_weighted_thresholds_equal_unweighted_with_unit_weights() -> None:
    rng = np.random.default_rng(5)
    p = np.round(rng.random(3000), 3)
    y = (rng.random(3000) < p).astype(int)
    a = choose_thresholds(p, y, block_precision=0.9, flag_recall=0.8).to_dict()
    b = choose_thresholds(p, y, block_precision=0.9, flag_recall=0.8, sample_weight=np.ones(3000)).to_dict()
    assert b.pop("bound") != a.pop("bound")
    assert a == b
    plain, unit = rates_at(p, y, 0.5).to_dict(), rates_at(p, y, 0.5, sample_weight=np.ones(3000)).to_dict()
    assert plain | {"bound": ""} == unit | {"bound": ""}


def test_weights_count_like_repeated_rows_with_wider_bounds() -> None:
    """Integer weights give the point estimates of rows repeated that often; the bound, on the effective n, is
    wider than the repeated rows' (which would pretend to more evidence than was seen)."""
    rng = np.random.default_rng(6)
    p = rng.random(400)
    y = (rng.random(400) < p).astype(int)
    w = rng.integers(1, 20, 400).astype(float)
    rep = np.repeat(np.arange(400), w.astype(int))
    a, b = rates_at(p, y, 0.6, sample_weight=w), rates_at(p[rep], y[rep], 0.6)
    assert (a.precision, a.recall, a.positive_rate) == pytest.approx((b.precision, b.recall, b.positive_rate))
    assert a.precision_bound < b.precision_bound and a.recall_bound < b.recall_bound
    assert a.n_eff == pytest.approx(effective_n(w)) and a.n_eff < w.sum()


# ---------------------------------------------------------------------------------------------- the refit
def run_small(tmp_path: Path, allow_rate: float, n: int = 10_000) -> Any:
    return loop.run_loop(tmp_path, n=n, n_held_out=20_000, allow_rate=allow_rate, seed=0,
                         store_factory=lambda p: new_store(p))


def test_review_loop_with_sampled_allows_moves_towards_the_target(tmp_path: Path) -> None:
    """The loop of benchmarks/review_loop.py: with 2% of allows reviewed, the weighted recall estimate at the old
    flag is near the truth and its bound below it; the refit lowers the flag, and the new policy's true recall on
    held-out decisions, under the target before, meets it (with the margin the bound asks for), its bound below it."""
    r = run_small(tmp_path, 0.02)
    c = r.result.categories["weapons"]
    target = loop.TARGETS["flag_recall"]
    true_before, true_after = r.before["flag"][1], r.after["flag"][1]
    assert true_before < 0.6  # the policy was set off
    old = c.old_rates["flag"]
    assert abs(old.recall - true_before) < 0.1 and old.recall_bound <= true_before
    assert c.new_flag < c.old_flag
    assert true_before < target <= c.new_rates["flag"].recall_bound <= true_after
    assert r.written and load_policy(tmp_path / "policy.yaml").version == "1.0+rev1"


def test_review_loop_with_flags_only_overestimates_recall(tmp_path: Path) -> None:
    """Flags only: the missed positives are never reviewed, so the weighted recall at the old flag looks ~1 while
    the truth is ~0.5; its bound lies above the truth."""
    r = run_small(tmp_path, 0.0)
    old = r.result.categories["weapons"].old_rates["flag"]
    assert old.recall > 0.95 and r.before["flag"][1] < 0.6 and old.recall_bound > r.before["flag"][1]


# ----------------------------------------------------------------------------------------- report and writing
@pytest.fixture()
def reviewed(tmp_path: Path) -> tuple[Path, Path]:
    """A policy set off and a store of 3,000 decisions reviewed from the truth (10% of allows sampled)."""
    flag, block = loop.off_thresholds()
    pol_path = loop.write_policy(tmp_path, allow_rate=0.1, flag=flag, block=block)
    x, y = loop.stream(np.random.default_rng(1), 3000)
    with new_store(tmp_path / "review.db") as store:
        loop.fill_store(store, load_policy(pol_path), x, y, "t")
    return pol_path, tmp_path / "review.db"


def test_report_counts_flips_and_write_makes_a_recorded_version(reviewed: tuple[Path, Path]) -> None:
    pol_path, db = reviewed
    before = pol_path.read_bytes()
    with new_store(db) as store:
        rd = review_data(store, pol_path)
        result = calibrate_from_review(pol_path, rd, embed_texts=loop.embed_texts, **loop.TARGETS)
    text = result.format()
    assert "weapons:" in text and "drugs: unchanged" in text and "would change" in text
    assert pol_path.read_bytes() == before  # the report writes nothing

    path = result.write(pol_path)
    new = load_policy(path)
    assert new.version == "1.0+rev1" and new.category("weapons").calibrator is not None
    cal_ref = new.category("weapons").calibrator
    assert cal_ref.path.name == f"weapons.{cal_ref.sha256[:8]}.json"
    # The flips, counted independently: every stored decision re-decided by the old and the written policy.
    a = CompiledPolicy.build(result.policy, loop.embed_texts, ENC)
    b = CompiledPolicy.build(new, loop.embed_texts, ENC)
    va, vb = a.decide(rd.embeddings, record=False), b.decide(rd.embeddings, record=False)
    moved = va.codes[:, 0] != vb.codes[:, 0]
    c = result.categories["weapons"]
    assert c.flips == int(moved.sum()) > 0 and c.flips_weighted == pytest.approx(rd.stream_weights[moved].sum())
    assert result.flips == int((va.actions != vb.actions).sum())
    assert sum(n for n, _ in result.transitions.values()) == result.flips
    # In place: the replaced version was recorded first, and rollback returns to it byte for byte.
    assert [v.version for v in history(pol_path)] == ["1.0", "1.0+rev1"]
    rollback(pol_path, "1.0")
    assert pol_path.read_bytes() == before
    # Refitting after the rollback names a version the history has not seen: one id, one set of decisions.
    with new_store(db) as store:
        again = calibrate_from_review(pol_path, store, embed_texts=loop.embed_texts, **loop.TARGETS)
    assert again.version == "1.0+rev2" and load_policy(again.write(pol_path)).version == "1.0+rev2"


def test_new_thresholds_that_never_fire_are_refused(reviewed: tuple[Path, Path], tmp_path: Path) -> None:
    pol_path, db = reviewed
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ThresholdWarning)
        result = calibrate_from_review(pol_path, db, embed_texts=loop.embed_texts, block_precision=0.999,
                                       flag_recall=0.999, confidence=0.999)
    assert result.disabled == ("weapons",) and "REFUSED" in result.format()
    out = tmp_path / "out"
    with pytest.raises(DataError, match="turn moderation off for weapons"):
        result.write(out)
    assert not out.exists()


# ------------------------------------------------------------------------------------------------------ CLI
def cli(*argv: str) -> tuple[int, str, str]:
    """``safeclip ARGV`` in this process (test_calibration_cli's runner)."""
    from test_calibration_cli import run

    return run(*argv)


def prompt_cache(folder: Path, pol_path: Path) -> Path:
    """The policy's prompt embeddings in a prompt cache, as a real encoder would have left them."""
    from safeclip.embed import PromptCache

    pol = load_policy(pol_path)
    texts = sorted({t.format(p) for c in pol.categories for p in (*c.prompts, *c.contrast, *pol.neutral)
                    for t in c.templates})
    PromptCache(ENC, folder).put(texts, loop.embed_texts(texts))
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*"))
            if p.is_file() and not p.name.startswith("review.db")}


def test_cli_dry_run_then_write_on_a_sqlite_store(reviewed: tuple[Path, Path], tmp_path: Path) -> None:
    pol_path, db = reviewed
    cache = prompt_cache(tmp_path / "cache", pol_path)
    common = ("calibrate", "--from-review", str(db), "--policy", str(pol_path), "--cache", str(cache),
              "--flag-recall", "0.8", "--block-precision", "0.9", "--confidence", "0.9")
    before = tree(pol_path.parent)
    rc, out, err = cli(*common, "--dry-run")
    assert rc == 0, err
    assert "loop@1.0 -> loop@1.0+rev1" in out and "dry run: nothing written" in out
    assert tree(pol_path.parent) == before

    rc, out2, err = cli(*common)
    assert rc == 0, err
    assert out2.startswith(out.split("dry run")[0].rstrip())  # the same report, printed before writing
    assert "wrote" in out2 and load_policy(pol_path).version == "1.0+rev1"

    rc, out3, err = cli(*common, "--out", str(tmp_path / "v2"))
    assert rc == 0, err
    assert load_policy(tmp_path / "v2" / "policy.yaml").version == "1.0+rev2"


def test_cli_needs_data_or_verdicts(tmp_path: Path) -> None:
    rc, out, err = cli("calibrate", "--policy", "default")
    assert rc == 2 and "give --data LABELED (labelled data) or --from-review STORE" in err
    assert len(err.strip().splitlines()) == 1
    rc, _, err = cli("calibrate", "--policy", "default", "--from-review", str(tmp_path / "none.db"))
    assert rc == 2 and len(err.strip().splitlines()) == 1


def test_old_labelled_data_joins_the_verdicts_with_weight_one(reviewed: tuple[Path, Path]) -> None:
    from safeclip.calibration import LabeledData

    pol_path, db = reviewed
    x, y = loop.stream(np.random.default_rng(7), 400)
    old = LabeledData(x, {"weapons": y}, ENC)
    with new_store(db) as store:
        rd = review_data(store, pol_path)
    alone = calibrate_from_review(pol_path, rd, embed_texts=loop.embed_texts, **loop.TARGETS)
    both = calibrate_from_review(pol_path, rd, data=old, embed_texts=loop.embed_texts, **loop.TARGETS)
    a, b = alone.categories["weapons"], both.categories["weapons"]
    assert (b.n_data, b.n_reviewed) == (400, a.n_reviewed) and both.n_data == 400
    assert "+ 400 old labelled rows" in both.format()
    assert b.calibrator.n_samples_ == a.calibrator.n_samples_ + 400
    with pytest.raises(EncoderMismatchError):
        calibrate_from_review(pol_path, rd, data=LabeledData(x, {"weapons": y}, "elsewhere"),
                              embed_texts=loop.embed_texts)
