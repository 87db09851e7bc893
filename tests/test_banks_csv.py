from __future__ import annotations

import numpy as np
import pytest

from safeclip.banks import Bank, NewEntry, import_pdq_csv, read_pdq_csv, write_pdq_csv
from safeclip.errors import BankError, DataError

H1 = "f" * 64
H2 = "0123456789abcdef" * 4
H3 = "a" * 32 + "5" * 32


@pytest.fixture
def bank(tmp_path):
    with Bank.create(tmp_path / "bank", "pdq") as b:
        yield b


def test_round_trip_is_exact(bank, tmp_path):
    src = tmp_path / "in.csv"
    src.write_text(f"hash,id,labels,quality,source\n{H1},e1,csam,90,a.jpg\n{H2},e2,\"x, y\",,\n{H3},e3,,100,b c\n")
    assert import_pdq_csv(bank, src) == 3
    assert [(e.id, e.label, e.quality, e.source) for e in bank.entries()] == [
        ("e1", "csam", 90, "a.jpg"), ("e2", "x, y", None, ""), ("e3", "", 100, "b c")]
    assert bytes(bank.entry_rows("e2")[0]).hex() == H2
    out = tmp_path / "out.csv"
    assert write_pdq_csv(bank, out) == 3
    assert out.read_text() == src.read_text()
    with Bank.create(tmp_path / "again", "pdq") as b2:
        import_pdq_csv(b2, out)
        write_pdq_csv(b2, tmp_path / "out2.csv")
    assert (tmp_path / "out2.csv").read_bytes() == out.read_bytes()


def test_no_header_and_other_column_layouts(tmp_path):
    p = tmp_path / "plain.csv"
    p.write_text(f"{H1}\n{H2},id2\n\n# a comment\n{H3.upper()},id3,lab\n")
    rows = read_pdq_csv(p)
    assert [(h.hex, i, lab) for h, i, lab in rows] == [(H1, H1, ""), (H2, "id2", ""), (H3, "id3", "lab")]
    assert rows[0][0].quality == 100
    # threatexchange's "pdq <hex>" lines, and a header in another order with known aliases and extra columns
    p.write_text(f"pdq {H1}\n")
    assert read_pdq_csv(p)[0][0].hex == H1
    p.write_text(f"\ufefftags,extra,signal_value,pdq_quality,content_id\nt,z,{H2},77,c9\n")
    (h, i, lab), = read_pdq_csv(p)
    assert (h.hex, h.quality, i, lab) == (H2, 77, "c9", "t")


def test_malformed_rows_are_all_reported_with_line_numbers_and_nothing_is_added(bank, tmp_path):
    p = tmp_path / "bad.csv"
    p.write_text(f"hash,id,labels,quality\n{H1},a,,50\nnothex,b,,\n{H2},a,,\n{H3},c,,101\n{H3[:-1]},d,,\n")
    with pytest.raises(DataError) as e:
        import_pdq_csv(bank, p)
    msg = str(e.value)
    assert "4 problems" in msg and "nothing imported" in msg
    for needle in ("line 3: hash 'nothex'", "line 4: id 'a' is repeated (first on line 2)", "line 5: quality '101'",
                   "line 6: hash"):
        assert needle in msg
    assert all(len(line) < 200 for line in msg.splitlines())
    assert len(bank) == 0
    p.write_text(f"{H1},a,b,extra\n")
    with pytest.raises(DataError, match="line 1: 4 columns"):
        read_pdq_csv(p)
    p.write_text("name,value\nx,y\n")
    with pytest.raises(DataError, match="line 1: neither a hash nor a header"):
        read_pdq_csv(p)
    with pytest.raises(DataError, match="no such file"):
        read_pdq_csv(tmp_path / "missing.csv")


def test_existing_ids_refuse_the_whole_file_unless_replace(bank, tmp_path):
    p = tmp_path / "a.csv"
    p.write_text(f"{H1},a\n{H2},b\n")
    assert import_pdq_csv(bank, p) == 2
    p.write_text(f"{H3},c\n{H3},b\n")
    with pytest.raises(BankError, match="line 2: id 'b' is already in the bank"):
        import_pdq_csv(bank, p)
    assert len(bank) == 2 and bank.entry("c") is None
    assert import_pdq_csv(bank, p, replace=True) == 2
    assert bytes(bank.entry_rows("b")[0]).hex() == H3 and len(bank) == 3


def test_embedding_banks_do_not_take_pdq_lists(tmp_path):
    with Bank.create(tmp_path / "e", "embedding", dim=4, encoder_id="x") as b:
        (tmp_path / "a.csv").write_text(f"{H1}\n")
        with pytest.raises(BankError, match="embedding bank"):
            import_pdq_csv(b, tmp_path / "a.csv")
        b.add(np.eye(4, dtype=np.float32)[:1], [NewEntry("v")])
        with pytest.raises(BankError, match="embedding bank"):
            write_pdq_csv(b, tmp_path / "o.csv")
