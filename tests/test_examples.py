"""The example notebook runs top to bottom: tiny random-weight checkpoint, a handful of photos, synthetic labels.

Nothing it computes here is a moderation result (random weights); the test checks that every cell runs, that it
drives the calibration workflow functions itself (no command line, no copy of the split), and that it leaves behind
a saved, pinned, calibrated policy that loads.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from safeclip import Moderator, load_policy
from safeclip.artifacts import sha256_file

REPO = Path(__file__).resolve().parents[1]
NOTEBOOK = REPO / "examples" / "policy_tuning.ipynb"
WALLPAPER = ("plasma-workspace-wallpapers-", "mate-backgrounds-", "gnome-backgrounds-")


def test_notebook_is_committed_without_outputs() -> None:
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(not c.outputs and c.execution_count is None for c in code)
    assert sum("parameters" in c.metadata.get("tags", []) for c in code) == 1
    first = nb.cells[0]
    assert first.cell_type == "markdown" and 'pip install -e ".[notebook]"' in first.source
    assert "jupyter nbconvert --to notebook --execute" in first.source and "tests/test_examples.py" in first.source
    source = "\n".join(c.source for c in code)
    for call in ("load_labeled(", "calibrate_policy(", "evaluate_policy(", "audit("):
        assert call in source, call
    for absent in ("safeclip.cli", "train_test_split", "subprocess", "choose_thresholds("):
        assert absent not in source, absent  # the workflow functions do it: no CLI call, no copied split


@pytest.mark.slow
def test_policy_tuning_notebook_runs(tmp_path: Path, photos: list[Path], tiny_model: str, tiny_encoder) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    # A handful of small photos: 6 from wallpaper packages (the synthetic rule's positives), 10 others.
    by_size = sorted(photos, key=lambda p: p.stat().st_size)
    pick = [p for p in by_size if p.name.startswith(WALLPAPER)][:6] + [
        p for p in by_size if not p.name.startswith(WALLPAPER)][:10]
    images = tmp_path / "images"
    images.mkdir()
    for p in pick:
        shutil.copy(p, images / p.name)
    out = tmp_path / "out"

    nb = nbformat.read(NOTEBOOK, as_version=4)
    at = next(i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", []))
    overrides = {"IMAGES": str(images), "MODEL": tiny_model, "PRETRAINED": None, "DEVICE": "cpu",
                 "CACHE": str(tmp_path / "cache"), "OUT": str(out), "LABELS": None}
    nb.cells.insert(at + 1, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in overrides.items())))
    client = nbclient.NotebookClient(nb, timeout=240, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()

    text = "\n".join(o.get("text", "") for c in nb.cells if c.cell_type == "code" for o in c.outputs)
    assert "SYNTHETIC stand-in labels" in text
    assert "16 labelled images, 6 positive" in text
    assert "16 files: 0 cache hits, 16 embedded" in text
    assert "reloaded policy: max |p - p_hold| =" in text
    assert "wallpaper: 16 labelled rows (6 positive)" in text  # calibrate_policy's summary
    assert "policy tuning-example@1+cal." in text  # evaluate_policy's, on the written policy
    assert "TqdmWarning" not in text and "Traceback" not in text

    pol = load_policy(out / "policy.yaml")
    cat = pol.category("wallpaper")
    assert cat.probe is not None and cat.calibrator is not None
    assert cat.calibrator.sha256 == sha256_file(cat.calibrator.path)
    assert pol.category("weapons").block is None  # the notebook's edit of an inherited category survives
    d = Moderator(policy=out / "policy.yaml", encoder=tiny_encoder).check(images / pick[0].name)
    assert d.categories["wallpaper"].calibrated
    assert (out / "reports" / "wallpaper" / "report.json").is_file()
    assert (out / "reports" / "wallpaper" / "split.parquet").is_file()
    assert "\nextends: edited.yaml\n" in (out / "policy.yaml").read_text()  # the edited policy, beside it
