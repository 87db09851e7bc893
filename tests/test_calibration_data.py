"""Labelled data (calibration.data): LabeledData from arrays, load_labeled from Parquet, CSV and in-memory tables,
the label rules, and one clear DataError naming the file, row and column for each kind of malformed input.

No model is needed: every file here holds embeddings and names its embedding space (loading never compiles the
policy; prompts are embedded only when a workflow function scores).
"""

from __future__ import annotations

import json
import warnings
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from calibration_known import POLICY

from safeclip.calibration import DataWarning, LabeledData, load_labeled, prompt_source
from safeclip.errors import DataError, EncoderMismatchError, ModelLoadError, SafeclipError

ENC = "test-space"


def unit_rows(n: int, d: int = 8, seed: int = 0) -> np.ndarray:
    x = np.random.default_rng(seed).normal(size=(n, d))
    return (x / np.linalg.norm(x, axis=1, keepdims=True)).astype(np.float32)


@pytest.fixture
def policy(tmp_path: Path) -> Path:
    path = tmp_path / "synth.yaml"
    path.write_text(POLICY)
    return path


def parquet(path: Path, embeddings: list, **columns) -> Path:
    pq.write_table(pa.table({"embedding": pa.array(embeddings, pa.list_(pa.float32())), **columns}), path)
    return path


# ---------------------------------------------------------------------------------------------- LabeledData
def test_labeled_data_from_arrays_normalises_groups_and_hashes() -> None:
    x = unit_rows(6)
    x[5] = x[0]  # the same image twice
    d = LabeledData(x.astype(np.float64), {"drugs": [1, 0, 1, -1, 0, 1]}, encoder_id=ENC)
    assert d.embeddings.dtype == np.float32 and len(d) == 6 and d.n_rows == 6
    np.testing.assert_allclose(np.linalg.norm(d.embeddings, axis=1), 1.0, rtol=1e-6)
    assert d.rows.tolist() == list(range(6)) and d.groups[5] == d.groups[0] and len(set(d.groups)) == 5
    assert d.labels["drugs"].dtype == np.int8 and d.labelled("drugs").tolist() == [0, 1, 2, 4, 5]
    other = LabeledData(x, {"drugs": [1, 0, 1, -1, 0, 0]}, encoder_id=ENC)
    assert d.sha256 != other.sha256 and d.sha256 == LabeledData(x, {"drugs": [1, 0, 1, -1, 0, 1]}, ENC).sha256
    sub = d.take([4, 1])
    assert sub.rows.tolist() == [4, 1] and sub.labels["drugs"].tolist() == [0, 0] and sub.encoder_id == ENC
    assert d.name == "in-memory data" and "embed_texts" not in repr(d)


@pytest.mark.parametrize("case, match", [
    ("not-unit", "row 12: embedding norm 2"),
    ("nan", "row 11: the embedding holds NaN"),
    ("labels", "must hold 1 \\(positive\\), 0 \\(negative\\) or -1"),
    ("label-length", "labels for 'drugs' have shape \\(2,\\)"),
    ("one-d", "non-empty \\(n, D\\) array"),
    ("encoder", "encoder_id must name"),
    ("unknown-category", "no labels for 'weapons'"),
])
def test_labeled_data_refuses_bad_arrays(case: str, match: str) -> None:
    x = unit_rows(3)
    rows = np.array([10, 11, 12])
    with pytest.raises(DataError, match=match):
        if case == "not-unit":
            LabeledData(x * np.array([[1], [1], [2]]), {"drugs": [1, 0, 1]}, ENC, rows=rows)
        elif case == "nan":
            x[1, 0] = np.nan
            LabeledData(x, {"drugs": [1, 0, 1]}, ENC, rows=rows)
        elif case == "labels":
            LabeledData(x, {"drugs": [1, 2, 0]}, ENC)
        elif case == "label-length":
            LabeledData(x, {"drugs": [1, 0]}, ENC)
        elif case == "one-d":
            LabeledData(x[0], {"drugs": [1]}, ENC)
        elif case == "encoder":
            LabeledData(x, {"drugs": [1, 0, 1]}, "")
        else:
            LabeledData(x, {"drugs": [1, 0, 1]}, ENC).labelled("weapons")


# ---------------------------------------------------------------------------------------------- load_labeled
def test_parquet_with_category_columns_left_out_rows_and_frames(policy: Path, tmp_path: Path) -> None:
    x = unit_rows(5)
    emb = [list(x[0]), None, list(x[2]) + list(x[3]), list(x[3]), list(x[4])]  # row 1: none; row 2: two frames
    data = parquet(tmp_path / "d.parquet", emb, weapons=pa.array([1, 0, 0, None, 1], pa.int8()),
                   drugs=["yes", "no", "", "true", "0"], encoder_id=[ENC] * 5)
    with pytest.warns(DataWarning, match=r"1 of 5 row\(s\) have no embedding and are left out \(first: row 1\)"):
        d = load_labeled(data, policy, ["weapons", "drugs"])
    assert d.warnings == ("1 of 5 row(s) have no embedding and are left out (first: row 1)",)
    assert d.rows.tolist() == [0, 2, 3, 4] and d.n_rows == 5 and d.encoder_id == ENC
    np.testing.assert_allclose(d.embeddings[1], x[2], rtol=1e-6)  # an animation's first frame
    assert d.labels["weapons"].tolist() == [1, 0, -1, 1] and d.labels["drugs"].tolist() == [1, -1, 1, 0]
    assert d.source == data and d.name == "d.parquet" and d.sha256 and callable(d.embed_texts)


def test_wrong_length_embedding_blames_its_own_row(policy: Path, tmp_path: Path) -> None:
    x = unit_rows(6)
    emb = [list(v) for v in x]
    emb[4] = emb[4][:7]  # one short row among 8-d ones: that row is named, not the first one
    data = parquet(tmp_path / "d.parquet", emb, label=[1, 0, 1, 0, 1, 0], encoder_id=[ENC] * 6)
    with pytest.raises(DataError, match=r"d.parquet: row 4: embedding of length 7, most rows have 8"):
        load_labeled(data, policy, ["weapons"])


def test_csv_label_names_and_their_errors(policy: Path, tmp_path: Path) -> None:
    x = unit_rows(4)
    lines = ["embedding,label"] + [f"\"{json.dumps([float(v) for v in r])}\",{lab}"
                                   for r, lab in zip(x, ["weapons", "none", "drugs", ""])]
    (tmp_path / "d.csv").write_text("\n".join(lines) + "\n")
    d = load_labeled(tmp_path / "d.csv", policy, ["weapons", "drugs"], encoder_id=ENC)
    assert d.labels["weapons"].tolist() == [1, 0, 0, -1] and d.labels["drugs"].tolist() == [0, 0, 1, -1]
    (tmp_path / "bad.csv").write_text("\n".join(lines[:2] + [lines[2].replace("none", "weapon")]) + "\n")
    with pytest.raises(DataError, match=r"bad.csv: column 'label' holds \['weapon'\].*\(first: row 1\)"):
        load_labeled(tmp_path / "bad.csv", policy, ["weapons"], encoder_id=ENC)
    (tmp_path / "bin.csv").write_text("embedding,weapons\n\"[1, 0]\",maybe\n")
    with pytest.raises(DataError, match=r"column 'weapons', row 0: 'maybe' is not a 0/1 label"):
        load_labeled(tmp_path / "bin.csv", policy, ["weapons"], encoder_id=ENC)
    (tmp_path / "parse.csv").write_text("embedding,weapons\n\"[1, 0]\",1\n\"1 0 x\",0\n")
    with pytest.raises(DataError, match=r"parse.csv: row 1: cannot parse the embedding"):
        load_labeled(tmp_path / "parse.csv", policy, ["weapons"], encoder_id=ENC)


def test_in_memory_tables_and_category_inference(policy: Path) -> None:
    pd = pytest.importorskip("pandas")
    x = unit_rows(4)
    df = pd.DataFrame({"embedding": list(x), "drugs": [1, 0, None, 1], "encoder_id": ENC})
    d = load_labeled(df, policy)  # no categories: every one the table labels
    assert d.categories == ("drugs",) and d.labels["drugs"].tolist() == [1, 0, -1, 1] and d.source is None
    t = pa.table({"embedding": pa.array(list(x), pa.list_(pa.float32())), "label": ["gambling", "none"] * 2})
    d = load_labeled(t, policy, encoder_id=ENC)
    assert d.categories == ("gambling",) and d.labels["gambling"].tolist() == [1, 0, 1, 0]
    with pytest.raises(DataError, match="holds 0/1 labels for one category: say which with --category"):
        load_labeled(t.set_column(1, "label", pa.array([1, 0, 1, 0])), policy, encoder_id=ENC)


@pytest.mark.parametrize("case, error, match", [
    ("no-file", DataError, "no such file"),
    ("suffix", DataError, "expected a .parquet or .csv file"),
    ("columns", DataError, "needs an 'embedding' or a 'path' column"),
    ("no-space", DataError, "which embedding space"),
    ("mixed-spaces", EncoderMismatchError, "mixes embedding spaces"),
    ("other-space", EncoderMismatchError, "--encoder-id 'b', but"),
    ("unknown-category", SafeclipError, r"no category \['nudity'\]"),
    ("empty", DataError, "no rows"),
    ("two-from-binary", DataError, "0/1 labels, which label one category"),
])
def test_malformed_inputs_raise_one_clear_error(case: str, error: type, match: str, policy: Path,
                                                tmp_path: Path) -> None:
    x = unit_rows(2)
    emb = [list(v) for v in x]
    kwargs: dict = {}
    cats = ["weapons"]
    if case == "no-file":
        src: object = tmp_path / "missing.parquet"
    elif case == "suffix":
        (tmp_path / "d.json").write_text("{}")
        src = tmp_path / "d.json"
    elif case == "columns":
        src = pa.table({"label": [1, 0]})
    elif case == "no-space":
        src = parquet(tmp_path / "d.parquet", emb, label=[1, 0])
    elif case == "mixed-spaces":
        src = parquet(tmp_path / "d.parquet", emb, label=[1, 0], encoder_id=["a", "b"])
    elif case == "other-space":
        src = parquet(tmp_path / "d.parquet", emb, label=[1, 0], encoder_id=["a", "a"])
        kwargs["encoder_id"] = "b"
    elif case == "unknown-category":
        src, cats = parquet(tmp_path / "d.parquet", emb, label=[1, 0]), ["nudity"]
    elif case == "empty":
        src = pa.table({"embedding": pa.array([], pa.list_(pa.float32())), "label": pa.array([], pa.int8())})
    else:
        src, cats = parquet(tmp_path / "d.parquet", emb, label=[1, 0]), ["weapons", "drugs"]
        kwargs["encoder_id"] = ENC
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an error, never a warning and a half-loaded result
        with pytest.raises(error, match=match):
            load_labeled(src, policy, cats, **kwargs)


def test_prompt_source_without_a_model_names_the_fix(tmp_path: Path) -> None:
    texts = prompt_source(ENC, cache=tmp_path)
    with pytest.raises(ModelLoadError, match=r"1 prompt\(s\) have no cached embedding .* pass --model/--pretrained"):
        texts(["a handgun"])


def test_per_frame_embedding_lists_as_audit_writes_them(policy: Path, tmp_path: Path) -> None:
    """``safeclip audit --save-embeddings`` stores one list per sampled frame: the first frame is the row's."""
    x = unit_rows(4)
    frames = [[list(x[0])], None, [list(x[1]), list(x[2])], [list(x[3])]]
    pq.write_table(pa.table({"embedding": pa.array(frames, pa.list_(pa.list_(pa.float32()))), "weapons": [1, 0, 0, 1],
                             "encoder_id": [ENC] * 4}), tmp_path / "audit.parquet")
    with pytest.warns(DataWarning, match=r"1 of 4 row\(s\) have no embedding"):
        d = load_labeled(tmp_path / "audit.parquet", policy, ["weapons"])
    assert d.rows.tolist() == [0, 2, 3] and d.labels["weapons"].tolist() == [1, 0, 1]
    np.testing.assert_allclose(d.embeddings, x[[0, 1, 3]], rtol=1e-6)
