"""Unit scores of groups (:class:`Scores`), and the baseline scorers beside calibration: weight
magnitude and random."""

from __future__ import annotations

import torch

from .analysis import Analysis, Group, Layout, check_analysis, check_groups
from .errors import ArgumentTypeError
from .modules import check_weights
from .units import fold_to_units


class Scores(dict):
    """``{group name: tensor of unit scores}`` (flat unit index, as in plans) plus how they were made;
    ``granularity``: calibration's ("batch" or "sample"; empty for the baselines); ``truncated``: calibration stopped at ``max_batches`` with batches left unread.

    Args:
        scores: Group name -> flat tensor of unit scores.
        scorer: What made them ("gradnas", "l1", "random(seed)").
        granularity: Calibration's granularity ("batch" or "sample"; empty for the baselines).
        batches: How many calibration batches were read.
        seconds: How long scoring took.
        history: Calibration's per-round values (empty for the baselines).
        truncated: Calibration stopped at ``max_batches`` with batches left unread.
    """

    def __init__(self, scores: dict[str, torch.Tensor], *, scorer: str, granularity: str = "", batches: int = 0,
                 seconds: float = 0.0, history: list[float] | None = None, truncated: bool = False) -> None:
        super().__init__(scores)
        self.scorer, self.granularity, self.batches, self.seconds = scorer, granularity, batches, seconds
        self.history = history or []
        self.truncated = truncated

    def replaced(self, scores: dict[str, torch.Tensor], **changes: object) -> Scores:
        """New values, with the rest of how they were made.

        Args:
            scores: Group name -> flat tensor of unit scores.
            **changes: New values of the attributes (``scorer``, ``batches``, ...).
        """
        fields = {"scorer": self.scorer, "granularity": self.granularity, "batches": self.batches, "seconds": self.seconds,
                  "history": self.history, "truncated": self.truncated}
        return Scores(scores, **{**fields, **changes})

    def scaled(self, factor: float) -> Scores:
        """Every score times ``factor``, with how they were made.

        Args:
            factor: The multiplier.
        """
        return self.replaced({k: v * factor for k, v in self.items()})


def _to_unit_grid(values: torch.Tensor, group: Group, layout: Layout) -> torch.Tensor:
    """Per-index values along an axis on the group's unit grid; an axis that carries only some unit
    axes (a KV projection) adds its value to every unit it serves."""
    folded = fold_to_units(values, layout)
    shape = [group.unit_shape[a] if a in layout.unit_axes else 1 for a in range(len(group.unit_shape))]
    return folded.reshape(shape).expand(group.unit_shape)


def l1_scores(analysis: Analysis, groups: list[Group] | None = None) -> Scores:
    """Unit score = the L1 norm of every weight slice the unit owns (a block's: of its parameters; the
    magnitude ranking).

    Args:
        analysis: The analysed model (:func:`fxgradnas.analyze`).
        groups: The groups to score (default: ``analysis.prunable``).

    Returns:
        The unit scores per group.

    Raises:
        ArgumentTypeError: ``analysis`` is not an Analysis, or ``groups`` not a list.
        ArgumentError: ``groups`` holds a group of another analysis, or the weights are on the meta device.
    """
    check_analysis(analysis, "l1_scores")
    check_groups(analysis, groups)
    model = analysis.captured.model
    check_weights(model, "l1_scores (weight magnitudes)")
    scores = {}
    for g in groups if groups is not None else analysis.prunable:
        total = torch.tensor([float(sum(p.detach().float().abs().sum() for p in model.get_submodule(b.path).parameters()))
                              for b in g.blocks]) if g.blocks else torch.zeros(g.unit_shape)
        for t in g.params:
            w = model.get_parameter(t.name).detach().float().abs()
            per_index = w.movedim(t.axis, 0).reshape(w.shape[t.axis], -1).sum(1).cpu()
            total = total + _to_unit_grid(per_index, g, t.layout)
        scores[g.name] = total.reshape(-1)
    return Scores(scores, scorer="l1")


def random_scores(analysis: Analysis, groups: list[Group] | None = None, seed: int = 0) -> Scores:
    """Unit scores drawn uniformly at random from ``seed``: the baseline any ranking must beat.

    Args:
        analysis: The analysed model (:func:`fxgradnas.analyze`).
        groups: The groups to score (default: ``analysis.prunable``).
        seed: The random generator's seed.

    Returns:
        The unit scores per group.

    Raises:
        ArgumentTypeError: ``analysis`` is not an Analysis, ``groups`` not a list or ``seed`` not an int.
        ArgumentError: ``groups`` holds a group of another analysis.
    """
    check_analysis(analysis, "random_scores")
    check_groups(analysis, groups)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ArgumentTypeError(f"seed must be an int, not {seed!r}")
    generator = torch.Generator().manual_seed(seed)
    chosen = groups if groups is not None else analysis.prunable
    return Scores({g.name: torch.rand(g.size, generator=generator) for g in chosen}, scorer=f"random({seed})")
