"""The shape of the code that the import contracts cannot state (issue 20)."""

from __future__ import annotations

import ast
import itertools
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1] / "safeclip"


def test_no_import_circle_in_the_audit_package():
    """The writer and the summary take their own option group, never the whole plan: no module of ``safeclip.audit``
    imports, even for type checking, one that imports it back."""
    grimp = pytest.importorskip("grimp")
    graph = grimp.build_graph("safeclip", include_external_packages=False)
    mods = sorted(m for m in graph.modules if m.startswith("safeclip.audit."))
    circles = [(a, b) for a, b in itertools.combinations(mods, 2)
               if graph.find_shortest_chain(importer=a, imported=b) and graph.find_shortest_chain(importer=b,
                                                                                                 imported=a)]
    assert circles == []


def _functions_calling(name: str) -> set[str]:
    found = set()
    for path in [*ROOT.rglob("*.py"), *(ROOT.parent / "calibration").rglob("*.py")]:
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
                for call in ast.walk(node):
                    if isinstance(call, ast.Call):
                        f = call.func
                        called = f.attr if isinstance(f, ast.Attribute) else getattr(f, "id", None)
                        if called == name:
                            found.add(f"{path.stem}.{node.name}")
    return found


def test_each_decide_rule_is_applied_in_one_place():
    """The worst-view and unusable-input rules are each stated by one function of safeclip.decide and applied only by
    the decision object (CompiledPolicy.decide); nobody else re-derives them from raw embedding checks."""
    assert _functions_calling("worst_views") == {"compiled.decide"}
    assert _functions_calling("unusable_inputs") == {"compiled.decide"}
    assert _functions_calling("apply_banks") == {"compiled.decide"}
    # Video (issue 24): k of n frames and segments, the same way.
    assert _functions_calling("min_frames_codes") == {"compiled.decide"}
    assert _functions_calling("frame_segments") == {"compiled.decide"}
    # The decision object computes the per-row problems that unusable_inputs maps to inputs; besides it,
    # as_embeddings validates an API argument, and the cache checks its own entries (a damaged one is a miss,
    # re-embedded: storage integrity, not a decision).
    assert _functions_calling("embedding_row_problems") <= {"compiled.decide", "arrays.as_embeddings",
                                                            "cache._unusable_rows"}
    assert _functions_calling("decide_codes") <= {"compiled.decide", "decide.build_decision"}
