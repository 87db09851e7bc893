"""The public surface: one ``__all__``, and importing it (or re-scoring) never loads the model stack."""

from __future__ import annotations

import subprocess
import sys

import safeclip


def test_every_public_name_resolves_and_is_listed_once():
    assert len(safeclip.__all__) == len(set(safeclip.__all__))
    for name in safeclip.__all__:
        assert getattr(safeclip, name) is not None, name
    assert callable(safeclip.decode) and callable(safeclip.check) and callable(safeclip.audit)


def test_import_and_numpy_stages_do_not_load_torch():
    """Scoring, calibration and decisions run on numpy: importing them must not pull in torch or open_clip."""
    code = (
        "import sys, numpy as np, safeclip\n"
        "from safeclip.score import Scorer\n"
        "from safeclip.calibration import choose_thresholds\n"
        "rng = np.random.default_rng(0)\n"
        "def texts(ts):\n"
        "    v = rng.normal(size=(len(ts), 16)).astype('float32')\n"
        "    return v / np.linalg.norm(v, axis=1, keepdims=True)\n"
        "s = Scorer(safeclip.load_policy('default'), texts, encoder_id='x').score(texts(['a'] * 4))\n"
        "choose_thresholds(rng.random(200), rng.random(200) < 0.3, block_precision=0.5, flag_recall=0.5)\n"
        "print(sorted(m for m in ('torch', 'open_clip', 'torchvision') if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_import_is_light():
    """``import safeclip`` loads no model stack, no Arrow, no scikit-learn and sets up no worker processes."""
    heavy = ("torch", "open_clip", "torchvision", "pyarrow", "sklearn", "scipy", "matplotlib", "multiprocessing",
             "onnxruntime", "ray")
    code = f"import sys, safeclip\nprint(sorted(m for m in {heavy!r} if m in sys.modules))\n"
    out = subprocess.run([sys.executable, "-W", "ignore", "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_functions_named_like_submodules_stay_functions():
    """``safeclip.audit`` and ``safeclip.decode`` are functions even after their submodules are imported."""
    import safeclip.audit.ray  # noqa: F401
    import safeclip.decode  # noqa: F401
    import safeclip.moderator  # noqa: F401

    assert callable(safeclip.audit) and callable(safeclip.decode)
    assert safeclip.audit.__module__.startswith("safeclip.audit")


def test_lazy_names_resolve_to_their_modules():
    from safeclip.calibration import train_probe
    from safeclip.moderator import Moderator

    assert safeclip.Moderator is Moderator and safeclip.train_probe is train_probe
    assert set(safeclip._LAZY) <= set(safeclip.__all__) <= set(dir(safeclip))


def test_the_type_checking_view_is_the_lazy_table_exactly():
    """Issue 20: the TYPE_CHECKING imports (what type checkers see) and ``_LAZY`` (what runs) are one list: every lazy
    name is imported there from the module ``_LAZY`` names, and nothing else is."""
    import ast
    from pathlib import Path

    tree = ast.parse(Path(safeclip.__file__).read_text())
    block = next(n for n in tree.body if isinstance(n, ast.If) and getattr(n.test, "id", None) == "TYPE_CHECKING")
    seen = {}
    for node in block.body:
        assert isinstance(node, ast.ImportFrom) and node.level == 1
        for alias in node.names:
            seen[alias.asname or alias.name] = f"safeclip.{node.module}"
    assert seen == safeclip._LAZY
