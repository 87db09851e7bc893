from __future__ import annotations

import hashlib
import json
import os

import numpy as np
import pytest
from PIL import Image, ImageFilter, ImageOps

from safeclip.cli import main
from safeclip.pdq import PdqHash, hamming


def _json_lines(text: str) -> list[dict]:
    return [json.loads(ln) for ln in text.strip().splitlines()]


@pytest.fixture
def images(tmp_path):
    """Two textured synthetic images, a mirrored copy of the first, and a flat one."""
    rng = np.random.default_rng(7)
    out = {}
    for name in ("a", "b"):
        noise = Image.fromarray(rng.integers(0, 256, (96, 128, 3), dtype=np.uint8)).resize((512, 384))
        out[name] = tmp_path / f"{name}.png"
        noise.filter(ImageFilter.GaussianBlur(6)).save(out[name])
    out["mirror"] = tmp_path / "mirror.png"
    ImageOps.mirror(Image.open(out["a"])).save(out["mirror"])
    out["flat"] = tmp_path / "flat.png"
    Image.new("RGB", (200, 200), (120, 120, 120)).save(out["flat"])
    return {k: str(v) for k, v in out.items()}


def test_create_add_list_match_on_synthetic_images(tmp_path, images, capsys):
    bank = str(tmp_path / "bank")
    assert main(["bank", "create", bank, "--kind", "pdq"]) == 0
    assert "created" in capsys.readouterr().out
    assert main(["bank", "add", bank, images["a"], "--label", "incident-1", "--id", "inc1"]) == 0
    assert capsys.readouterr().out.split() == ["inc1"]
    assert main(["bank", "match", bank, images["a"], images["b"], images["mirror"], "--json"]) == 0
    rows = _json_lines(capsys.readouterr().out)
    assert [r["path"] for r in rows] == [images["a"], images["b"], images["mirror"]]
    assert rows[0]["matches"] == [{"entry": "inc1", "label": "incident-1", "distance": 0}]
    assert rows[1]["matches"] == [] and rows[2]["matches"] == []  # a flipped copy needs a dihedral bank
    assert main(["bank", "list", bank, "--json"]) == 0
    doc = json.loads(capsys.readouterr().out)
    assert doc["counts"] == {"entries": 1, "enabled": 1, "disabled": 0, "rows": 1, "quarantined": 0}
    (e,) = doc["entries"]
    assert (e["id"], e["label"], e["source"], e["enabled"], e["flood_count"], e["quarantined"]) == (
        "inc1", "incident-1", images["a"], True, 0, False)
    assert main(["bank", "list", bank]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("inc1\tincident-1\t") and "1 entries (1 enabled, 0 disabled" in lines[-1]


def test_dihedral_bank_matches_a_flipped_copy(tmp_path, images, capsys):
    bank = str(tmp_path / "dih")
    assert main(["bank", "create", bank, "--kind", "pdq", "--dihedral"]) == 0
    capsys.readouterr()
    assert main(["bank", "add", bank, images["a"]]) == 0
    eid = capsys.readouterr().out.strip()
    assert eid == hashlib.sha256(open(images["a"], "rb").read()).hexdigest()[:16]
    assert main(["bank", "list", bank, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["entries"][0]["rows"] == 8
    assert main(["bank", "match", bank, images["mirror"], "--json"]) == 0
    (row,) = _json_lines(capsys.readouterr().out)
    # the variants come from sign flips of one DCT: within a few bits of hashing the mirrored pixels, not equal
    assert [(m["entry"], m["distance"] <= 31) for m in row["matches"]] == [(eid, True)]


def test_flat_and_bad_files_are_reported_and_the_rest_added(tmp_path, images, capsys):
    bank = str(tmp_path / "bank")
    main(["bank", "create", bank, "--kind", "pdq"])
    capsys.readouterr()
    bad = tmp_path / "bad.jpg"
    bad.write_bytes(b"not an image")
    assert main(["bank", "add", bank, images["flat"], str(bad), images["b"]]) == 1
    out, err = capsys.readouterr()
    assert len(out.split()) == 1
    errors = [ln for ln in err.splitlines() if ln.startswith("error:")]
    assert len(errors) == 2
    assert "flat.png: too flat to hash reliably" in errors[0] and "bad.jpg" in errors[1]
    # adding the same file again is refused, one line
    assert main(["bank", "add", bank, images["b"]]) == 1
    assert "already in the bank" in capsys.readouterr().err


def test_disable_stops_a_match_and_enable_restores_it(tmp_path, images, capsys):
    bank = str(tmp_path / "bank")
    main(["bank", "create", bank, "--kind", "pdq"])
    main(["bank", "add", bank, images["a"], "--id", "x"])
    capsys.readouterr()

    def matches() -> list:
        capsys.readouterr()
        assert main(["bank", "match", bank, images["a"], "--json"]) == 0
        return _json_lines(capsys.readouterr().out)[0]["matches"]

    assert main(["bank", "disable", bank, "x"]) == 0
    assert matches() == []
    assert main(["bank", "enable", bank, "x"]) == 0
    assert [m["entry"] for m in matches()] == ["x"]
    assert main(["bank", "disable", bank, "--all"]) == 0
    assert matches() == []
    assert main(["bank", "enable", bank, "--all"]) == 0
    assert main(["bank", "confirm", bank, "x"]) == 0
    assert [m["entry"] for m in matches()] == ["x"]
    assert main(["bank", "remove", bank, "x"]) == 0
    assert matches() == []
    assert main(["bank", "remove", bank, "x"]) == 2
    assert "no entry 'x'" in capsys.readouterr().err
    assert main(["bank", "disable", bank]) == 2


def test_hash_json(images, capsys):
    assert main(["bank", "hash", "--json", "--dihedral", images["a"], images["mirror"]]) == 0
    a, m = _json_lines(capsys.readouterr().out)
    assert len(a["pdq"]) == 64 and a["quality"] >= 50 and list(a["variants"])[0] == "original"
    assert hamming(PdqHash.from_hex(a["variants"]["flip_y"]), PdqHash.from_hex(m["pdq"])) <= 31  # mirrored
    assert hamming(PdqHash.from_hex(a["pdq"]), PdqHash.from_hex(m["pdq"])) > 31
    assert main(["bank", "hash", images["flat"]]) == 0
    hexhash, quality, path = capsys.readouterr().out.strip().split("\t")
    assert int(quality) < 50 and path == images["flat"]


def test_real_photos_folder_add_and_match(tmp_path, photos, capsys):
    folder = tmp_path / "known"
    folder.mkdir()
    for p in photos[:3]:
        os.symlink(p, folder / p.name)
    bank = str(tmp_path / "bank")
    main(["bank", "create", bank, "--kind", "pdq"])
    capsys.readouterr()
    assert main(["bank", "add", bank, str(folder), "--label", "known"]) == 0
    assert len(capsys.readouterr().out.split()) == 3
    files = [str(photos[1]), str(photos[10])]
    assert main(["bank", "match", bank, *files, "--json"]) == 0
    hit, miss = _json_lines(capsys.readouterr().out)
    assert hit["matches"][0]["distance"] == 0 and hit["matches"][0]["label"] == "known"
    assert all(m["distance"] <= 31 for m in miss["matches"])


def test_csv_export_import_round_trip(tmp_path, images, capsys):
    bank, other = str(tmp_path / "bank"), str(tmp_path / "other")
    main(["bank", "create", bank, "--kind", "pdq"])
    main(["bank", "create", other, "--kind", "pdq"])
    main(["bank", "add", bank, images["a"], images["b"], "--label", "l"])
    out1, out2 = tmp_path / "one.csv", tmp_path / "two.csv"
    assert main(["bank", "export", bank, str(out1)]) == 0
    assert main(["bank", "import", other, str(out1)]) == 0
    assert main(["bank", "export", other, str(out2)]) == 0
    assert out1.read_text() == out2.read_text() and len(out1.read_text().splitlines()) == 3
    assert main(["bank", "import", other, str(out1)]) == 2  # ids already there: nothing added
    assert "already in the bank" in capsys.readouterr().err
    assert main(["bank", "import", other, str(out1), "--replace"]) == 0
    out1.write_text("hash,id\nzz,1\n")
    assert main(["bank", "import", other, str(out1)]) == 2
    assert "line 2: hash 'zz'" in capsys.readouterr().err


def test_add_from_parquet_reuses_the_audit_hashes(tmp_path, images, capsys):
    import pyarrow as pa
    import pyarrow.parquet as pq

    assert main(["bank", "hash", "--json", images["a"], images["b"], images["flat"]]) == 0
    hashed = _json_lines(capsys.readouterr().out)
    shas = [hashlib.sha256(open(h["path"], "rb").read()).hexdigest() for h in hashed]
    table = pa.table({"path": [h["path"] for h in hashed], "sha256": shas, "action": ["block", "allow", "block"],
                      "pdq": [h["pdq"] for h in hashed], "pdq_quality": [h["quality"] for h in hashed]})
    audit = tmp_path / "audit.parquet"
    pq.write_table(table, audit)
    bank = str(tmp_path / "bank")
    main(["bank", "create", bank, "--kind", "pdq"])
    capsys.readouterr()
    assert main(["bank", "add", bank, "--from-parquet", str(audit), "--where-action", "block"]) == 1
    out, err = capsys.readouterr()
    assert out.split() == [shas[0][:16]]
    assert "flat.png: too flat" in err
    assert main(["bank", "match", bank, images["a"], "--json"]) == 0
    assert _json_lines(capsys.readouterr().out)[0]["matches"][0]["distance"] == 0
    pq.write_table(table.drop_columns(["pdq", "pdq_quality"]), audit)
    assert main(["bank", "add", bank, "--from-parquet", str(audit)]) == 2
    assert "re-run the audit with this safeclip to record hashes" in capsys.readouterr().err


def test_usage_errors_exit_2(tmp_path, images, capsys):
    bank2 = str(tmp_path / "b2")
    assert main(["bank", "create", bank2, "--kind", "pdq", "--encoder-id", "x"]) == 2
    assert main(["bank", "add", str(tmp_path / "nope"), images["a"]]) == 2
    assert "no such bank folder" in capsys.readouterr().err
    main(["bank", "create", bank2, "--kind", "pdq"])
    assert main(["bank", "add", bank2, images["a"], images["b"], "--id", "x"]) == 2
    assert main(["bank", "add", bank2]) == 2
    assert main(["bank", "create", bank2, "--kind", "pdq"]) == 2
    assert "already exists" in capsys.readouterr().err


@pytest.mark.slow
def test_embedding_bank_with_the_tiny_model(tmp_path, tiny_model, cache_dir, images, capsys, monkeypatch):
    monkeypatch.setenv("SAFECLIP_CACHE_DIR", str(cache_dir))
    model = ["--model", tiny_model, "--device", "cpu"]
    bank = str(tmp_path / "emb")
    assert main(["bank", "create", bank, "--kind", "embedding", *model]) == 0
    assert main(["bank", "add", bank, images["a"], "--id", "e", *model]) == 0
    assert capsys.readouterr().out.split()[-1] == "e"
    assert main(["bank", "match", bank, images["a"], "--json", *model]) == 0
    (row,) = _json_lines(capsys.readouterr().out)
    assert row["matches"][0]["entry"] == "e" and row["matches"][0]["similarity"] > 0.999
    other = str(tmp_path / "other")
    assert main(["bank", "create", other, "--kind", "embedding", "--encoder-id", "another-space", "--dim", "64"]) == 0
    assert main(["bank", "add", other, images["a"], *model]) == 2
    assert "another-space" in capsys.readouterr().err
