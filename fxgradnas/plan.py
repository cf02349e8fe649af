"""Plans: which units of which groups to keep, saved as JSON with a fingerprint of the model."""

from __future__ import annotations

import json
import operator
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from .errors import ArgumentTypeError, PlanError
from .modules import fingerprint

if TYPE_CHECKING:
    from .analysis import Analysis

FORMAT = "fxgradnas.plan/1"


@dataclass
class Plan:
    """``{group name: [flat indices of the units to keep]}``; groups not named are kept whole.

    For a heads group the indices are query-head indices (query head ``h`` of a grouped-query
    layer reads KV head ``h // queries_per_kv``).

    Attributes:
        keep: Group name -> flat indices of the units it keeps (distinct non-negative ints).
        fingerprint: The fingerprint of the model the plan was made for (None: not checked).

    Raises:
        PlanError: ``keep`` is not a mapping of string names to distinct non-negative int indices, or
            ``fingerprint`` is not a string or None.
    """

    keep: dict[str, list[int]] = field(default_factory=dict)
    fingerprint: str | None = None

    def __post_init__(self) -> None:
        """Check the schema: group names are strings, each mapped to distinct non-negative int indices."""
        if not isinstance(self.keep, Mapping):
            raise PlanError(f"a plan maps group names to kept unit indices, not {type(self.keep).__name__}")
        if self.fingerprint is not None and not isinstance(self.fingerprint, str):
            raise PlanError(f"a plan's fingerprint is a string or None, not {self.fingerprint!r}")
        keep = {}
        for name, indices in self.keep.items():
            if not isinstance(name, str):
                raise PlanError(f"plan group names are strings, not {name!r}")
            keep[name] = _indices(name, indices)
        self.keep = keep

    def to_json(self) -> str:
        """The plan as JSON text (format, fingerprint, keep), which :meth:`from_json` reads back."""
        return json.dumps({"format": FORMAT, "fingerprint": self.fingerprint, "keep": self.keep}, indent=1)

    @classmethod
    def from_json(cls, text: str | bytes, analysis: Analysis | None = None) -> Plan:
        """The plan :meth:`to_json` wrote.

        Args:
            text: The JSON text (str or bytes).
            analysis: When given, the plan is also checked against it (:meth:`validate`).

        Returns:
            The plan.

        Raises:
            ArgumentTypeError: ``text`` is not a str or bytes.
            PlanError: The text is not a JSON fxgradnas plan, or (with ``analysis``) does not fit it.
        """
        if not isinstance(text, (str, bytes, bytearray)):
            raise ArgumentTypeError(f"Plan.from_json takes the JSON text, not {type(text).__name__}")
        try:
            data = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            raise PlanError(f"not a JSON plan: {exc}") from exc
        if not isinstance(data, dict) or data.get("format") != FORMAT:
            raise PlanError(f"not an fxgradnas plan (expected format {FORMAT!r})")
        unknown = sorted(set(data) - {"format", "fingerprint", "keep"})
        if unknown:
            raise PlanError(f"plan has unknown field(s) {', '.join(map(repr, unknown))}; fields: format, fingerprint, keep")
        if "keep" not in data:
            raise PlanError("plan has no 'keep' field (group name -> kept unit indices)")
        plan = cls(keep=data["keep"], fingerprint=data.get("fingerprint"))
        if analysis is not None:
            plan.validate(analysis)
        return plan

    def validate(self, analysis: Analysis, model: torch.nn.Module | None = None) -> None:
        """Check that the plan fits the analysed model.

        Args:
            analysis: The analysis the plan is applied with.
            model: The model whose fingerprint the plan's must match (default: the analysed model's as captured).

        Raises:
            PlanError: Naming the first problem: another model, an unknown or frozen group, an index that is not
                a distinct int in range, or a group left with no unit (or with fewer than its ``min_units``: a
                router's top-k).
        """
        expected = fingerprint(model) if model is not None else analysis.captured.fingerprint
        if self.fingerprint is not None and self.fingerprint != expected:
            raise PlanError(
                "this plan was made for a different model (parameter names or shapes differ); "
                "re-run the search on this model"
            )
        known = {g.name: g for g in analysis.groups}
        for name, given in self.keep.items():
            indices = _indices(name, given)  # keep may have been edited since the plan was made
            group = known.get(name)
            if group is None:
                raise PlanError(f"plan names unknown group {name!r}; groups: {', '.join(known)}")
            if not group.prunable:
                if sorted(indices) == list(range(group.size)):
                    continue
                raise PlanError(f"group {name!r} is frozen ({group.reason}); it cannot be pruned")
            if not indices:
                raise PlanError(f"plan keeps no unit of group {name!r}; keep at least one")
            if len(indices) < group.min_units:
                raise PlanError(f"plan keeps {len(indices)} units of group {name!r}, whose router picks "
                                f"{group.min_units} per token; keep at least {group.min_units}")
            bad = [i for i in indices if not 0 <= i < group.size]
            if bad:
                raise PlanError(f"indices {bad} out of range for group {name!r} of {group.size} units")

    def kept(self, name: str) -> list[int] | None:
        """Sorted kept indices of a group, or None when the plan keeps it whole.

        Args:
            name: The group's name.
        """
        return sorted(self.keep[name]) if name in self.keep else None


def _indices(name: str, indices: Any) -> list[int]:
    """``indices`` as a list of distinct non-negative ints; PlanError naming the group otherwise."""
    if isinstance(indices, (str, bytes, Mapping)) or not hasattr(indices, "__iter__"):
        raise PlanError(f"plan group {name!r} maps to {indices!r}; it takes a list of unit indices")
    result = []
    for i in indices:
        try:
            if isinstance(i, bool) or (isinstance(i, torch.Tensor) and i.dtype == torch.bool):
                raise TypeError
            value = operator.index(i)
        except TypeError:
            raise PlanError(f"plan group {name!r} has index {i!r}; unit indices are integers") from None
        if value < 0:
            raise PlanError(f"plan group {name!r} has negative index {value}; unit indices count from 0")
        result.append(value)
    if len(set(result)) != len(result):
        raise PlanError(f"plan repeats indices in group {name!r}: {sorted(result)}")
    return result


def check_plan(plan: Any) -> None:
    """Raise ArgumentTypeError unless ``plan`` is a :class:`Plan`."""
    if not isinstance(plan, Plan):
        raise ArgumentTypeError(f"plan must be a fxgradnas.Plan, not {type(plan).__name__}; make one with "
                                "Plan({group: [kept indices]}) or Plan.from_json(text)")
