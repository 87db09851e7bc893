"""The keyword form of the option groups: ``Moderator(model=..., fast_decode=...)`` and ``audit(workers=...)`` keep
working, each keyword mapped by one table onto a field of its value object (:class:`~safeclip.embed.EncoderSpec`,
:class:`~safeclip.embed.DecodeOptions`, ...)."""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from typing import Any

__all__ = ["apply_keywords"]


def apply_keywords(where: str, keywords: Mapping[str, Any], table: Mapping[str, tuple[str, str]],
                   groups: dict[str, Any]) -> dict[str, Any]:
    """``groups`` (name -> value object) with each keyword of ``keywords`` set on the field ``table`` maps it to.

    An unknown keyword is a ``TypeError`` naming it, as for any function.
    """
    unknown = sorted(set(keywords) - set(table))
    if unknown:
        raise TypeError(f"{where}() got unexpected keyword argument(s) {', '.join(map(repr, unknown))}")
    changes: dict[str, dict[str, Any]] = {}
    for key, value in keywords.items():
        group, field = table[key]
        changes.setdefault(group, {})[field] = value
    out = dict(groups)
    for group, fields in changes.items():
        out[group] = dataclasses.replace(out[group], **fields)
    return out
