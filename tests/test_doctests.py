"""Every docstring example in ``safeclip`` and ``safeclip.calibration`` runs.

This is ``--doctest-modules`` over both packages, done through the installed names: ``calibration/`` is installed as
``safeclip.calibration`` (package-dir mapping), which pytest's path-based collection would import under the wrong
name. ``__main__`` modules are skipped: importing them runs the command line.
"""

from __future__ import annotations

import doctest
import importlib
import pkgutil

import pytest

import safeclip


def _modules() -> list[str]:
    import safeclip.calibration
    import safeclip.policies

    names = ["safeclip", "safeclip.calibration", "safeclip.policies"]
    for pkg in (safeclip, safeclip.calibration):  # an editable install maps calibration/ outside safeclip/
        for info in pkgutil.walk_packages(pkg.__path__, pkg.__name__ + "."):
            if not info.name.endswith("__main__"):
                names.append(info.name)
    return sorted(set(names))


MODULES = _modules()


def test_both_packages_are_walked():
    assert "safeclip.calibration" in MODULES and "safeclip.cli.audit" in MODULES and "safeclip.score" in MODULES


@pytest.mark.parametrize("name", MODULES)
def test_docstring_examples(name: str, tmp_path, monkeypatch) -> None:
    if name == "safeclip.audit.ray" or name.startswith("safeclip.audit.ray."):
        pytest.importorskip("ray")
    monkeypatch.chdir(tmp_path)  # examples that write files write them here
    module = importlib.import_module(name)
    finder = doctest.DocTestFinder(exclude_empty=True)
    runner = doctest.DocTestRunner(optionflags=doctest.ELLIPSIS | doctest.NORMALIZE_WHITESPACE)
    for test in finder.find(module, name, globs={**vars(module)}):
        runner.run(test)
    result = runner.summarize(verbose=False)
    assert result.failed == 0, f"{result.failed} of {result.attempted} docstring examples failed in {name}"



@pytest.mark.parametrize("name", ["safeclip.score", "safeclip.decide", "safeclip.calibrate", "safeclip.cli"])
def test_main_entry_points_carry_examples(name: str) -> None:
    """Guards against a finder that silently finds nothing."""
    tests = doctest.DocTestFinder(exclude_empty=True).find(importlib.import_module(name), name)
    assert sum(len(t.examples) for t in tests) > 0
