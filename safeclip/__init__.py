"""safeclip: image content moderation on frozen CLIP embeddings.

>>> import safeclip                                  # doctest: +SKIP
>>> safeclip.check("upload.jpg").action              # doctest: +SKIP
'allow'

The data flow is decode -> embed -> score -> calibrate -> decide, one module per stage. :class:`Moderator` chains
them for requests and :func:`audit` for collections; every stage after embed works on numpy arrays alone. The
offline toolkit (probes, calibrators, thresholds, reports) is :mod:`safeclip.calibration`.

Importing this package is cheap: most names are loaded on first use (PEP 562), so ``import safeclip`` pulls in
neither torch, pyarrow nor scikit-learn, and starts no process. ``decode`` and ``audit`` are imported at once because
each shares its name with a submodule, which the import system would otherwise bind in its place.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from .errors import (
    ArtifactIntegrityError,
    ArtifactUnavailableError,
    AuditError,
    AuditLockedError,
    BankError,
    CacheError,
    ConfigError,
    DataError,
    DecodeError,
    DecodeTimeoutError,
    DeviceError,
    EncoderMismatchError,
    EngineError,
    EngineStalledError,
    EngineUnavailableError,
    ImageTooLargeError,
    InvalidVerdictError,
    ManifestError,
    MissingPromptError,
    ModelLoadError,
    NoInputsError,
    OutputError,
    OverloadedError,
    PolicyError,
    ReviewError,
    ReviewItemNotFoundError,
    ReviewStoreUnavailableError,
    SafeclipError,
    TruncatedImageError,
    UnsupportedFormatError,
)

from .audit import AuditSummary, EngineOptions, OutputOptions, audit, diff, rescore
from .decode import Decoded, DecodeLimits, decode

__version__ = "0.1.0"

# public name -> the module that defines it, imported on first access
_LAZY: dict[str, str] = {
    "Calibrator": "safeclip.calibrate",
    "Report": "safeclip.calibration",
    "Thresholds": "safeclip.calibration",
    "ThresholdWarning": "safeclip.calibration",
    "choose_thresholds": "safeclip.calibration",
    "evaluate": "safeclip.calibration",
    "fit_calibrator": "safeclip.calibration",
    "train_probe": "safeclip.calibration",
    "ACTIONS": "safeclip.decide",
    "CategoryResult": "safeclip.decide",
    "Decision": "safeclip.decide",
    "Segment": "safeclip.decide",
    "Encoder": "safeclip.embed",
    "PromptCache": "safeclip.embed",
    "LinearProbe": "safeclip.heads",
    "MLPHead": "safeclip.heads",
    "fetch_artifact": "safeclip.fetch",
    "import_laion_nsfw": "safeclip.importers",
    "import_laion_violence": "safeclip.importers",
    "Moderator": "safeclip.moderator",
    "check": "safeclip.moderator",
    "default_moderator": "safeclip.moderator",
    "set_default_moderator": "safeclip.moderator",
    "BatchingOptions": "safeclip.moderator",
    "Explanation": "safeclip.moderator",
    "CompiledPolicy": "safeclip.compiled",
    "Verdicts": "safeclip.compiled",
    "Views": "safeclip.compiled",
    "lint_policy": "safeclip.compiled",
    "DecodeOptions": "safeclip.embed",
    "EncoderSpec": "safeclip.embed",
    "Category": "safeclip.policy",
    "Policy": "safeclip.policy",
    "list_policies": "safeclip.policy",
    "load_policy": "safeclip.policy",
    "Scorer": "safeclip.score",
    "Scores": "safeclip.score",
    "Bank": "safeclip.banks",
    "BankEntry": "safeclip.banks",
    "BankMatch": "safeclip.banks",
    "NewEntry": "safeclip.banks",
    "PdqHash": "safeclip.pdq",
    "pdq_hash": "safeclip.pdq",
    "ReviewQueue": "safeclip.review",
    "ReviewStore": "safeclip.review",
}

__all__ = sorted([
    "ArtifactIntegrityError", "ArtifactUnavailableError", "AuditError", "AuditLockedError", "BankError", "CacheError", "ConfigError", "DataError", "DecodeError",
    "DecodeTimeoutError", "DeviceError", "EncoderMismatchError", "EngineError", "EngineStalledError",
    "EngineUnavailableError",
    "ImageTooLargeError", "InvalidVerdictError", "ManifestError", "MissingPromptError", "ModelLoadError", "NoInputsError", "OutputError",
    "OverloadedError",
    "PolicyError", "ReviewError", "ReviewItemNotFoundError", "ReviewStoreUnavailableError", "SafeclipError", "TruncatedImageError", "UnsupportedFormatError", "__version__", "AuditSummary",
    "audit", "diff", "rescore", "EngineOptions", "OutputOptions", "Decoded", "DecodeLimits", "decode", *_LAZY,
])


def _calibration() -> Any:
    """The runtime's one import of the offline package, for its lazy names only (import-linter sees it here)."""
    from . import calibration

    return calibration


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'safeclip' has no attribute {name!r}")
    source = _calibration() if module == "safeclip.calibration" else importlib.import_module(module)
    value = getattr(source, name)
    globals()[name] = value  # later lookups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_LAZY))


if TYPE_CHECKING:  # for type checkers and IDEs; never executed. tests/test_init.py checks it is _LAZY exactly.
    from .calibrate import Calibrator
    from .calibration import (
        Report,
        Thresholds,
        ThresholdWarning,
        choose_thresholds,
        evaluate,
        fit_calibrator,
        train_probe,
    )
    from .banks import Bank, BankEntry, BankMatch, NewEntry
    from .compiled import CompiledPolicy, Verdicts, Views, lint_policy
    from .decide import ACTIONS, CategoryResult, Decision, Segment
    from .embed import DecodeOptions, Encoder, EncoderSpec, PromptCache
    from .fetch import fetch_artifact
    from .heads import LinearProbe, MLPHead
    from .importers import import_laion_nsfw, import_laion_violence
    from .moderator import BatchingOptions, Explanation, Moderator, check, default_moderator, set_default_moderator
    from .pdq import PdqHash, pdq_hash
    from .review import ReviewQueue, ReviewStore
    from .policy import Category, Policy, list_policies, load_policy
    from .score import Scorer, Scores
