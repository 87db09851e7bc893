"""A policy compiled for one embedding space: its scorer (prompt embeddings, heads) and calibrators.

The :class:`~safeclip.moderator.Moderator` and the audit engines both hold one per policy; re-scoring needs only
the prompt embeddings (from an encoder or a prompt cache), never the image model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np

from .calibrate import calibrate, load_calibrators
from .policy import Policy
from .score import Scorer, Scores

__all__ = ["CompiledPolicy"]


@dataclass(frozen=True)
class CompiledPolicy:
    """A policy bound to one embedding space: its scorer (prompts, probes) and calibrators."""

    policy: Policy
    scorer: Scorer
    calibrators: dict[str, Any]

    @classmethod
    def build(cls, policy: Policy, embed_texts: Any, encoder_id: str) -> CompiledPolicy:
        """Compile ``policy`` with prompt embeddings from ``embed_texts`` (an Encoder's, or a PromptCache's ``get``)."""
        return cls(policy, Scorer(policy, embed_texts, encoder_id=encoder_id), load_calibrators(policy, encoder_id))

    def probabilities(self, scores: Scores) -> tuple[np.ndarray, np.ndarray]:
        """``(N, C)`` probabilities and the ``(C,)`` mask of calibrated categories."""
        return calibrate(scores, self.calibrators)
