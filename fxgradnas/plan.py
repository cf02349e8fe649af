"""Plans: which units of which groups to keep, saved as JSON with a fingerprint of the model."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch

from .capture import fingerprint
from .errors import PlanError

if TYPE_CHECKING:
    from .analysis import Analysis

FORMAT = "fxgradnas.plan/1"


@dataclass
class Plan:
    """``{group name: [flat indices of the units to keep]}``; groups not named are kept whole.

    For a heads group the indices are query-head indices (query head ``h`` of a grouped-query
    layer reads KV head ``h // queries_per_kv``).
    """

    keep: dict[str, list[int]] = field(default_factory=dict)
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.keep, Mapping):
            raise PlanError(f"a plan maps group names to kept unit indices, not {type(self.keep).__name__}")
        self.keep = {str(k): [int(i) for i in v] for k, v in self.keep.items()}

    def to_json(self) -> str:
        return json.dumps({"format": FORMAT, "fingerprint": self.fingerprint, "keep": self.keep}, indent=1)

    @classmethod
    def from_json(cls, text: str) -> Plan:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise PlanError(f"not a JSON plan: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PlanError(f"not an fxgradnas plan (expected format {FORMAT!r})")
        return cls(keep=data["keep"], fingerprint=data.get("fingerprint"))

    def validate(self, analysis: Analysis, model: torch.nn.Module | None = None) -> None:
        """Raise PlanError naming the first problem: another model (``model``'s fingerprint, default the
        analysed model's as captured), an unknown or frozen group, an out-of-range or duplicate index, or a
        group left with no unit."""
        expected = fingerprint(model) if model is not None else analysis.captured.fingerprint
        if self.fingerprint is not None and self.fingerprint != expected:
            raise PlanError(
                "this plan was made for a different model (parameter names or shapes differ); "
                "re-run the search on this model"
            )
        known = {g.name: g for g in analysis.groups}
        for name, indices in self.keep.items():
            group = known.get(name)
            if group is None:
                raise PlanError(f"plan names unknown group {name!r}; groups: {', '.join(known)}")
            if not group.prunable:
                if sorted(indices) == list(range(group.size)):
                    continue
                raise PlanError(f"group {name!r} is frozen ({group.reason}); it cannot be pruned")
            if not indices:
                raise PlanError(f"plan keeps no unit of group {name!r}; keep at least one")
            if len(set(indices)) != len(indices):
                raise PlanError(f"plan repeats indices in group {name!r}: {sorted(indices)}")
            bad = [i for i in indices if not 0 <= i < group.size]
            if bad:
                raise PlanError(f"indices {bad} out of range for group {name!r} of {group.size} units")

    def kept(self, name: str) -> list[int] | None:
        """Sorted kept indices of a group, or None when the plan keeps it whole."""
        return sorted(self.keep[name]) if name in self.keep else None
