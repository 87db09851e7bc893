"""safeclip: image content moderation on frozen CLIP embeddings.

>>> import safeclip                                  # doctest: +SKIP
>>> safeclip.check("upload.jpg").action              # doctest: +SKIP
'allow'

The data flow is decode -> embed -> score -> calibrate -> decide, one module per stage. :class:`Moderator` chains
them for requests and :func:`audit` for collections; every stage after embed works on numpy arrays alone.
"""

from __future__ import annotations

from .audit import AuditSummary, audit, diff, rescore
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
from .decide import ACTIONS, CategoryResult, Decision
from .decode import Decoded, DecodeLimits, decode
from .embed import Encoder, PromptCache
from .heads import LinearProbe
from .errors import (
    ArtifactIntegrityError,
    DecodeError,
    DecodeTimeoutError,
    EncoderMismatchError,
    ImageTooLargeError,
    ModelLoadError,
    PolicyError,
    SafeclipError,
    TruncatedImageError,
    UnsupportedFormatError,
)
from .moderator import Moderator, check, default_moderator, set_default_moderator
from .policy import Category, Policy, list_policies, load_policy
from .score import Scorer, Scores

__version__ = "0.1.0"

__all__ = [
    "ACTIONS",
    "ArtifactIntegrityError",
    "AuditSummary",
    "Calibrator",
    "Category",
    "CategoryResult",
    "Decision",
    "DecodeError",
    "DecodeLimits",
    "DecodeTimeoutError",
    "Decoded",
    "Encoder",
    "EncoderMismatchError",
    "ImageTooLargeError",
    "LinearProbe",
    "ModelLoadError",
    "Moderator",
    "Policy",
    "PolicyError",
    "PromptCache",
    "Report",
    "SafeclipError",
    "Scorer",
    "Scores",
    "ThresholdWarning",
    "Thresholds",
    "TruncatedImageError",
    "UnsupportedFormatError",
    "__version__",
    "audit",
    "check",
    "choose_thresholds",
    "decode",
    "default_moderator",
    "diff",
    "evaluate",
    "fit_calibrator",
    "list_policies",
    "load_policy",
    "rescore",
    "set_default_moderator",
    "train_probe",
]
