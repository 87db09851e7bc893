"""A policy compiled for one embedding space: its scorer (prompt embeddings, heads) and calibrators.

The :class:`~safeclip.moderator.Moderator` and the audit engines both hold one per policy; re-scoring needs only
the prompt embeddings (from an encoder or a prompt cache), never the image model.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import functools
import os

import numpy as np

from .calibrate import Calibrator, calibrate, load_calibrators, missing_inputs, probability_basis
from .errors import SafeclipError
from .heads import LinearProbe, load_head
from .policy import Policy, PolicyError, load_policy
from .score import Scorer, Scores

__all__ = ["CompiledPolicy", "lint_policy"]


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

    @functools.cached_property
    def basis(self) -> tuple[str, ...]:
        """Per category: ``"calibrator"``, ``"head"`` or ``"prompt"``, what its probability is."""
        return probability_basis(self.policy, self.calibrators)


def lint_policy(
    source: str | os.PathLike[str] | Policy, *, allow_outside: bool = False, encoder_id: str | None = None
) -> Policy:
    """Load a policy and every artifact it names, checked as a Moderator would check them, without the model.

    Every problem (invalid fields, wrong sha256 pins, malformed or non-finite artifacts, artifacts of different
    embedding spaces or dimensions, a calibrator that needs a missing probe or head, a ``url`` artifact that cannot
    be fetched, an artifact that cannot run in the policy's own ``encoder:``) is collected into one
    :class:`~safeclip.errors.PolicyError`. ``encoder_id`` also checks that every artifact belongs to that space.

    The space of the policy's ``encoder:`` is known without weights for a pretrained tag (from open_clip's
    configs); a local checkpoint is hashed when it exists here and skipped otherwise.

    >>> lint_policy("default").id
    'default@1.0'
    """
    policy = load_policy(source, allow_outside=allow_outside)
    problems: list[str] = []
    own: str | None = None
    if policy.encoder.get("model"):
        # Offline only: a tag's space is read from open_clip's configs (no weights are loaded or downloaded).
        from .embed._checkpoint import encoder_id_matches, known_encoder_id

        try:
            own = known_encoder_id(policy.encoder["model"], policy.encoder.get("pretrained"))
        except SafeclipError as e:
            problems.append(f"{policy.source}: encoder: {e}")
    spaces: dict[str, str] = {}
    dims: dict[int, str] = {}
    for cat in policy.categories:
        for key, ref in (("probe", cat.probe), ("head", cat.head), ("calibrator", cat.calibrator)):
            if ref is None:
                continue
            where = f"{policy.source}: categories.{cat.name}.{key}"
            art: Any
            try:
                path = ref.local_path()
                if key == "probe":
                    art = LinearProbe.load(path, ref.sha256, encoder_id=encoder_id)
                elif key == "head":
                    art = load_head(path, ref.sha256, encoder_id)
                else:
                    art = Calibrator.load(path, ref.sha256, encoder_id=encoder_id)
            except SafeclipError as e:
                problems.append(f"{where}: {e}")
                continue
            if art.encoder_id is not None:
                spaces.setdefault(art.encoder_id, where)
                if own is not None and not encoder_id_matches(art.encoder_id, own):
                    enc = " / ".join(policy.encoder.get(k, "?") for k in ("model", "pretrained"))
                    problems.append(f"{where}: was fitted in embedding space {art.encoder_id!r}, but the policy's "
                                    f"encoder: ({enc}) embeds into {own!r}: it cannot run there; set encoder: to "
                                    "the model and pretrained weights it was fitted with, or refit it")
            if key != "calibrator":
                dims.setdefault(art.dim, where)
            else:
                problems += [f"{where}: {p}" for p in missing_inputs(art, cat)]
    if len(spaces) > 1:
        problems.append(f"{policy.source}: artifacts come from {len(spaces)} embedding spaces: "
                        + "; ".join(f"{sid!r} ({where})" for sid, where in spaces.items()))
    if len(dims) > 1:
        problems.append(f"{policy.source}: probes and heads of different dimensions: "
                        + "; ".join(f"{d} ({where})" for d, where in dims.items()))
    if problems:
        raise PolicyError(problems)
    return policy
