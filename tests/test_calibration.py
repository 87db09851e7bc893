"""The calibration package as a whole (calibration/__init__.py, installed as safeclip.calibration): its public
surface, a cheap import, and its house rules (no module reaches into another's private names). Each module has
its own tests: tests/test_calibration_<module>.py."""

from __future__ import annotations

import ast
import subprocess
import sys
from pathlib import Path

import safeclip.calibration as calibration

REPO = Path(__file__).resolve().parents[1]
# What the package exported before it was split into modules: kept, with the same meaning.
EARLIER = ["train_probe", "fit_calibrator", "choose_thresholds", "evaluate", "Report", "Thresholds",
           "ThresholdWarning", "precision_lower_bound", "recall_lower_bound", "naive_threshold", "DEFAULT_CS"]
WORKFLOW = ["load_labeled", "LabeledData", "calibrate_policy", "evaluate_policy", "CalibrationResult",
            "EvaluationResult", "grouped_split"]


def test_public_surface() -> None:
    assert set(EARLIER + WORKFLOW) <= set(calibration.__all__)
    assert sorted(calibration.__all__) == sorted(set(calibration.__all__))
    for name in calibration.__all__:
        obj = getattr(calibration, name)
        assert getattr(obj, "__module__", "safeclip.calibration").startswith("safeclip.calibration"), name
    assert "installed as ``safeclip.calibration``" in " ".join(calibration.__doc__.split())


def test_import_is_cheap() -> None:
    code = ("import sys, safeclip.calibration; print(sorted(m for m in ('torch', 'open_clip', 'sklearn', 'scipy', "
            "'pyarrow', 'matplotlib', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    assert out.stdout.strip() == "[]"


def _private_imports(path: Path) -> list[str]:
    """``from X import _name`` where X is another module (a module's own private names stay inside it)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            found += [f"{path.name}:{node.lineno}: from {'.' * node.level}{node.module or ''} import {a.name}"
                      for a in node.names if a.name.startswith("_")]
    return found


def test_no_module_imports_another_modules_private_names() -> None:
    files = sorted((REPO / "calibration").glob("*.py")) + [REPO / "safeclip" / "cli" / "calibration.py"]
    assert [hit for f in files for hit in _private_imports(f)] == []
