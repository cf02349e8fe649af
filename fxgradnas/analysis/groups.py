"""Prunable groups: the units a pruning decision is made over, and everything each one touches.

A group owns one or more *leaf spaces* (its unit grid): a channels group owns one leaf of C units;
a heads group owns the query-head space, ``[kv_heads, queries_per_kv]`` for grouped-query attention
(query head ``h`` reads KV head ``h // queries_per_kv``). Every axis the group touches is described by
a :class:`Layout`: the row-major factors of that axis, each either one of the group's unit axes or
a factor the group does not own (the head dim, the q/k/v piece index of a fused projection, ...), or a
factor that is a concatenation of parts holding units (a fused projection sliced into q, k and v: each
part has its own layout).
An *experts* group owns the experts of a mixture-of-experts layer: the router's rows and each expert's
slice of the stacked expert weights; its mask site is the router's logits (a removed expert's is -inf).
A *blocks* group's units are the residual blocks of one ModuleList or Sequential
(:mod:`fxgradnas.analysis.blocks`): a unit's mask multiplies every value its block adds to the stream.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass, field
from math import prod

import torch

from ..options import KINDS
from .blocks import Block, find_blocks
from .registry import entry_for
from .rules.elementwise import keeps_zero
from .spaces import is_data_size
from .state import Propagation, op_name

EXACT_FOR_EXPERTS = {"softmax", "log_softmax", "topk", "cumsum"}  # reductions over experts a -inf logit keeps exact
ZERO_BLIND = {"sum", "linalg_vector_norm", "norm"}  # reductions that zero entries do not change


@dataclass(frozen=True)
class Factor:
    """One row-major factor of an axis: its size (None if dynamic) and which unit axis it is; a factor
    that is a concatenation of parts holding units has the layout of each part (``parts``)."""

    size: int | None
    unit_axis: int | None = None
    parts: tuple[Layout, ...] = ()


@dataclass(frozen=True)
class Layout:
    """The factors of one axis, major to minor."""

    factors: tuple[Factor, ...]

    @property
    def unit_axes(self) -> tuple[int, ...]:
        """The unit axes the axis carries, in the order they first appear (parts included)."""
        found: list[int] = []
        for f in self.factors:
            inner = [f.unit_axis] if f.unit_axis is not None else [a for part in f.parts for a in part.unit_axes]
            found += [a for a in dict.fromkeys(inner) if a not in found]  # parts may repeat a unit axis
        return tuple(found)

    @property
    def concatenated(self) -> bool:
        """Whether a factor is a concatenation of parts holding units."""
        return any(f.parts for f in self.factors)


def factor_sizes(layouts: list[tuple[Layout, tuple[int, ...]]]) -> list[int | None]:
    """Sizes of an axis's factors when every group that touches it keeps its given count per unit axis
    (``layouts``: the axis's layout in each such group, with that group's counts); a concatenation is the
    sum of its parts."""
    out: list[int | None] = []
    for i, factor in enumerate(layouts[0][0].factors):
        here = [(layout.factors[i], kept) for layout, kept in layouts]
        unit = next((kept[f.unit_axis] for f, kept in here if f.unit_axis is not None), None)
        cut = [(f, kept) for f, kept in here if f.parts]
        if unit is not None:
            out.append(unit)
        elif cut:
            out.append(sum(prod(factor_sizes([(f.parts[j], kept) for f, kept in cut]))  # type: ignore[arg-type]
                           for j in range(len(cut[0][0].parts))))
        else:
            out.append(factor.size)
    return out


@dataclass(frozen=True)
class TensorAxis:
    """An axis of a parameter or buffer (``names``: every name it has, tied ones included)."""

    names: tuple[str, ...]
    axis: int
    layout: Layout
    numel: int

    @property
    def name(self) -> str:
        return self.names[0]


@dataclass(frozen=True)
class NodeAxis:
    """An axis of a graph node's output: a mask site or a shape constant to patch.

    ``batch_major``: the node's first axis starts with the batch (per-sample scores can be read).
    ``unit``: the one unit the whole value belongs to (a block's write into the residual stream; its layout
    has no factor), else None.
    """

    node: str
    axis: int
    layout: Layout
    batch_major: bool = False
    unit: int | None = None


@dataclass
class Group:
    """One prunable dimension (or a frozen one, with the reason).

    Attributes:
        name: The group's name, as plans and scores name it.
        kind: What its units are ("heads", "channels", "hidden", "experts", "blocks", ...).
        unit_shape: The unit grid (``(kv_heads, queries_per_kv)`` for grouped-query heads, ``(C,)`` otherwise).
        prunable: Whether a plan may prune it.
        reason: Why it is frozen (empty when prunable).
        exact: Whether pruning it gives exactly the masked model's outputs.
        exact_reason: Why it is not exact (empty when exact).
        unit_width: Channels per unit along its axes (a head's dim; 1 for channels).
        params: The parameter axes it slices.
        buffers: The buffer axes it slices.
        sites: The graph nodes its mask multiplies.
        shape_constants: The view/reshape/expand nodes whose size constants it patches.
        reductions: The reductions over its axes, as ``(node, kind)``.
        leaves: The leaf spaces of its unit grid.
        shared_kv: Multi-query attention: every query head reads the one KV head.
        min_units: The fewest units a plan may keep (an experts group: the router's top-k).
        blocks: A blocks group's units.
    """

    name: str
    kind: str
    unit_shape: tuple[int, ...]
    prunable: bool
    reason: str = ""
    exact: bool = True
    exact_reason: str = ""
    unit_width: int = 1
    params: list[TensorAxis] = field(default_factory=list)
    buffers: list[TensorAxis] = field(default_factory=list)
    sites: list[NodeAxis] = field(default_factory=list)
    shape_constants: list[NodeAxis] = field(default_factory=list)
    reductions: list[tuple[str, str]] = field(default_factory=list)
    leaves: tuple[int, ...] = ()
    shared_kv: bool = False  # multi-query attention: every query head reads the one KV head
    min_units: int = 1  # the fewest units a plan may keep (an experts group: the router's top-k)
    blocks: tuple[Block, ...] = ()  # a blocks group: its units

    @property
    def size(self) -> int:
        """Number of units: query heads for a heads group, channels otherwise."""
        return prod(self.unit_shape)

    @property
    def kv_heads(self) -> int | None:
        if self.kind != "heads":
            return None
        return 1 if self.shared_kv else self.unit_shape[0]

    @property
    def queries_per_kv(self) -> int | None:
        if self.kind != "heads":
            return None
        return self.size // self.kv_heads

    @property
    def params_per_unit(self) -> float:
        """Parameters on the group's axes (a block's: under its module), averaged per unit."""
        return sum(t.numel for t in self.params) / self.size if not self.blocks else \
            sum(b.numel for b in self.blocks) / self.size


def build_groups(p: Propagation) -> list[Group]:
    """Resolve the walk's records into groups, in graph order."""
    return _GroupBuilder(p).build()


class _GroupBuilder:
    def __init__(self, p: Propagation) -> None:
        self.p = p
        self.s = p.spaces
        self.rec = p.records
        self.nodes = {n.name: n for n in p.gm.graph.nodes}

    def leaves(self, space: int) -> list[int]:
        """The leaves of ``space``, inside its concatenated factors too."""
        return self.s.deep_leaves(space)

    def resolve(self, pairs: list[tuple[int, str]]) -> dict[int, list[str]]:
        out: dict[int, list[str]] = defaultdict(list)
        for space, text in pairs:
            for leaf in self.leaves(space):
                if text not in out[leaf]:
                    out[leaf].append(text)
        return out

    def build(self) -> list[Group]:
        frozen = self.resolve(self.rec.frozen)
        residual = set(self.resolve(self.rec.residual))
        reductions = defaultdict(list)
        for space, kind, node in self.rec.reductions:
            for leaf in self.leaves(space):
                reductions[leaf].append((node, kind))

        tensor_axes = [
            (tensor, axis, self.leaves(space))
            for tensor, spaces in self.rec.tensors.values()
            for axis, space in enumerate(spaces)
        ]
        segments = [segment for _, spaces in self.rec.tensors.values() for space in spaces
                    for segment in self.s.segments(space)]
        param_leaves: list[int] = []
        for tensor, _, leaves in tensor_axes:
            if isinstance(tensor, torch.nn.Parameter):
                param_leaves += [x for x in leaves if x not in param_leaves and not self.s.is_data(x)]

        units: list[tuple[str, tuple[int, ...]]] = []
        owned: set[int] = set()
        single_kv: set[tuple[int, ...]] = set()
        for space, kv_heads in self.rec.heads:
            if any(self.s.pieces(x) for x in self.s.leaves(space)):
                continue  # heads that are a concatenation of pieces are not one grid
            grid = tuple(x for x in self.s.leaves(space) if not self.s.is_data(x))
            if kv_heads == 1:
                single_kv.add(grid)
            if grid and not owned.intersection(grid) and any(x in param_leaves for x in grid):
                units.append(("heads", grid))
                owned.update(grid)
        internal = {leaf for space in self.rec.internal for leaf in self.leaves(space)}
        for segment in segments:
            if owned.intersection(segment):
                internal.update(x for x in segment if x not in owned)
        alone = {leaves[0] for _, _, leaves in tensor_axes if len(leaves) == 1}
        experts = set(self.resolve([(space, "") for _, _, space in self.rec.experts]))
        for leaf in param_leaves:
            if leaf in owned or leaf in internal or (leaf in frozen and leaf not in alone):
                continue  # part of another unit (head dim, spatial position, piece index)
            kind = "experts" if leaf in experts else "hidden" if leaf in residual else "channels"
            units.append((kind, (leaf,)))
            owned.add(leaf)

        groups = [self.group(kind, grid, frozen, reductions) for kind, grid in units]
        groups += self.block_groups()
        fewest = defaultdict(lambda: 1)
        for space, k in self.rec.min_units:
            for leaf in self.leaves(space):
                fewest[leaf] = max(fewest[leaf], k)
        for g in groups:
            g.shared_kv = g.kind == "heads" and g.leaves in single_kv
            if g.kind == "experts":
                g.min_units = max(fewest[leaf] for leaf in g.leaves)
        groups.sort(key=self._first_use)
        _name_groups(groups)
        return groups

    def block_groups(self) -> list[Group]:
        """Per ModuleList or Sequential, one group of the blocks that can be removed and one, frozen, of those
        that cannot."""
        by_container: dict[str, list[Block]] = defaultdict(list)
        for b in find_blocks(self.p):
            by_container[b.path.rpartition(".")[0]].append(b)
        groups = []
        for found in by_container.values():
            removable = tuple(b for b in found if not b.reason)
            frozen = tuple(b for b in found if b.reason)
            if removable:
                sites = [NodeAxis(branch, 0, Layout(()), self.batch_major(branch), unit=i)
                         for i, b in enumerate(removable) for _, _, branch in b.adds]
                groups.append(Group("", "blocks", (len(removable),), True, exact_reason="exact", sites=sites,
                                    blocks=removable))
            if frozen:
                reason = "; ".join(f"{b.path}: {b.reason}" for b in frozen)
                groups.append(Group("", "blocks", (len(frozen),), False, reason, exact=False, blocks=frozen))
        return groups

    def _first_use(self, g: Group) -> int:
        """Index of the first parameter the group touches, in graph order."""
        for i, (_, spaces) in enumerate(self.rec.tensors.values()):
            if any(self.touching(space, g.leaves) for space in spaces):
                return i
        return len(self.rec.tensors)

    def layout(self, space: int, grid: tuple[int, ...]) -> Layout:
        factors = []
        for leaf in self.s.leaves(space):
            size = self.s.size(leaf)
            unit = grid.index(leaf) if leaf in grid else None
            pieces = self.s.pieces(leaf) or []
            parts = tuple(self.layout(p, grid) for p in pieces) if self.touching(leaf, grid) and unit is None else ()
            factors.append(Factor(None if is_data_size(size) else int(size), unit, parts))
        return Layout(tuple(factors))

    def batch_major(self, node_name: str) -> bool:
        """Whether the node's axis 0 starts with the batch axis of the first tensor input."""
        inputs = [n for n in self.p.gm.graph.find_nodes(op="placeholder") if n in self.p.axes]
        node = next((n for n in self.p.axes if n.name == node_name), None)
        if not inputs or node is None or not self.p.axes[node] or not self.p.axes[inputs[0]]:
            return False
        batch = self.s.leaves(self.p.axes[inputs[0]][0])
        first = self.s.leaves(self.p.axes[node][0])
        return bool(batch and first and first[0] == batch[0])

    def touching(self, space: int, grid: tuple[int, ...]) -> bool:
        return any(leaf in grid for leaf in self.leaves(space))

    def group(self, kind: str, grid: tuple[int, ...], frozen: dict, reductions: dict) -> Group:
        params, buffers = [], []
        for tensor, spaces in self.rec.tensors.values():
            for axis, space in enumerate(spaces):
                if self.touching(space, grid):
                    entry = TensorAxis(
                        tuple(self.p.captured.names_of(tensor)), axis, self.layout(space, grid), tensor.numel()
                    )
                    (params if isinstance(tensor, torch.nn.Parameter) else buffers).append(entry)
        shifted: list[str] = []
        if kind == "hidden":
            masked, shifted = self.unzeroed(grid)
            records = self.rec.writes + [r for r in self.rec.consumed if r[0] in masked]
        else:
            records = self.rec.experts if kind == "experts" else self.rec.consumed
        sites = [
            NodeAxis(node, axis, self.layout(space, grid), self.batch_major(node))
            for node, axis, space in records
            if self.touching(space, grid)
        ]
        constants = [
            NodeAxis(node, axis, self.layout(space, grid))
            for node, spaces in self.rec.shape_ops
            for axis, space in enumerate(spaces)
            if self.touching(space, grid)
        ]
        reasons = [r for leaf in grid for r in frozen.get(leaf, [])]
        reduced = [r for leaf in grid for r in reductions.get(leaf, [])]
        unit_shape = tuple(int(self.s.size(x)) for x in grid)
        g = Group(
            name="",
            kind=kind,
            unit_shape=unit_shape,
            prunable=not reasons,
            reason="; ".join(dict.fromkeys(reasons)),
            params=params,
            buffers=buffers,
            sites=list(dict.fromkeys(sites)),
            shape_constants=constants,
            reductions=reduced,
            leaves=grid,
        )
        g.unit_width = _unit_width(g)
        _judge_exact(g)
        if g.exact and shifted:  # a sum over the residual width of values its masks do not zero
            g.exact, g.exact_reason = False, f"approximate: {shifted[0]} reduces over values a bias or shift made non-zero"
        if g.prunable:
            g.reason = self.unpatchable(constants, unit_shape)
            g.prunable = not g.reason
        cut = [site.node for site in g.sites if _partly_carried(site.layout, len(grid))]
        if g.prunable and cut:
            g.prunable, g.reason = False, f"its mask site {cut[0]} concatenates pieces that carry only some unit axes"
        if g.prunable and not g.sites:
            g.prunable, g.reason = False, "no place to put its mask (no weight consumes it)"
        dynamic = [site.node for site in g.sites if any(f.size is None for f in site.layout.factors)]
        if g.prunable and dynamic:  # the unit is spread over a batch/sequence-sized factor (DeBERTa's relative
            g.prunable = False      # position attention), which a mask of fixed shape cannot cover
            g.reason = f"its mask site {dynamic[0]} mixes the unit with a batch- or sequence-sized axis"

        if kind == "heads" and len(unit_shape) > 2:
            g.prunable, g.reason = False, f"head structure {unit_shape} not understood"
        return g

    def unzeroed(self, grid: tuple[int, ...]) -> tuple[set[str], list[str]]:
        """Where the residual width's write masks do not leave its pruned channels zero: a BatchNorm's
        shift, a bias or a sigmoid lies between the stream and a read. Returns the weight reads that need
        a mask of their own (or the masked model would read values the pruned one does not have), and the
        reductions over the width that still see non-zero values there (the group is then approximate)."""
        writes = {node for node, _, space in self.rec.writes if self.touching(space, grid)}
        reads = {name for name, _, space in self.rec.consumed if self.touching(space, grid)}
        zero: set[torch.fx.Node] = set()
        masked: set[str] = set()
        for node in self.p.gm.graph.nodes:
            if node.name in writes or keeps_zero(self.p, node, zero):
                zero.add(node)
            elif node.name in reads:  # masked there, zero from there on
                masked.add(node.name)
                zero.add(node)
        shifted = [node for space, _, node in self.rec.reductions if self.touching(space, grid)
                   and not all(x in zero for x in self.nodes[node].all_input_nodes
                               if self.p.is_tensor(x) and not self.p.is_weight(x))]
        return masked, shifted

    def unpatchable(self, constants: list[NodeAxis], unit_shape: tuple[int, ...]) -> str:
        """Why the rewrite could not shrink one of these size constants ('' when it can): the op has
        no patcher, or its patcher fails when dry-run with one unit fewer on every unit axis."""
        fewer = tuple(max(n - 1, 1) for n in unit_shape)
        for c in constants:
            old = [f.size for f in c.layout.factors]
            sizes = factor_sizes([(c.layout, fewer)])
            if sizes == old:
                continue
            node = self.nodes[c.node]
            entry = entry_for(node.target)
            if entry is None or entry.patch is None:
                return f"no patcher for the size constants of {op_name(node)} at {node.name}"
            try:
                entry.patch(node, c.axis, sizes)
            except Exception as exc:  # any failure to patch is a reason to freeze, never a crash
                return f"cannot patch a size constant of {op_name(node)} at {node.name}: {exc}"
        return ""


def _partly_carried(layout: Layout, axes: int) -> bool:
    """Whether a concatenated part of the axis carries some but not all of the group's ``axes`` unit axes (a
    mask over the axis is then not one value per entry of the grid)."""
    for f in layout.factors:
        for part in f.parts:
            if 0 < len(part.unit_axes) < axes or _partly_carried(part, axes):
                return True
    return False


def _unit_width(g: Group) -> int:
    """Entries of one unit where its mask goes (head_dim for heads, 1 for channels)."""
    return max((_entries_per_unit(site.layout) for site in g.sites), default=1)


def _entries_per_unit(layout: Layout) -> int:
    """Entries of the axis that one unit covers: its factors that are not unit axes (in a concatenation,
    those of the part that carries the units)."""
    width = 1
    for f in layout.factors:
        if f.parts:
            width *= max((_entries_per_unit(part) for part in f.parts if part.unit_axes), default=1)
        elif f.unit_axis is None:
            width *= f.size or 1
    return width


def _judge_exact(g: Group) -> None:
    """Whether zeroing a unit's mask equals removing it physically."""
    kinds = {kind for _, kind in g.reductions}
    if not kinds:
        g.exact, g.exact_reason = True, "exact"
        return
    if g.kind == "hidden":  # masked at every write and shifted read: its pruned channels read as zero
        if kinds <= ZERO_BLIND:
            g.exact, g.exact_reason = True, "exact"
        elif kinds <= ZERO_BLIND | {"mean of squares", "rms_norm"}:
            g.exact, g.exact_reason = True, "exact with RMSNorm rescale"
        else:
            g.exact = False
            g.exact_reason = "approximate: " + ", ".join(sorted(kinds)) + " statistics change"
        return
    if g.kind == "experts" and kinds <= EXACT_FOR_EXPERTS:  # a removed expert's logit is -inf: never chosen
        g.exact, g.exact_reason = True, "exact"
        return
    where = ", ".join(f"{kind} at {node}" for node, kind in g.reductions[:3])
    if g.kind == "heads" and kinds <= {"mean of squares", "rms_norm"}:  # OLMo2's q/k norm over all heads
        g.exact, g.exact_reason = False, f"approximate: an RMSNorm over all heads ({where}) sees only the kept ones"
        return
    g.exact, g.exact_reason = False, f"reduced over ({where})"
    if g.prunable:
        g.prunable, g.reason = False, f"reduced over by {where}: pruning would change the result"


def _common_module(names: list[str]) -> str:
    paths = [n.split(".")[:-1] for n in names]
    if not paths:
        return ""
    common = paths[0]
    for path in paths[1:]:
        i = 0
        while i < min(len(common), len(path)) and common[i] == path[i]:
            i += 1
        common = common[:i]
    return ".".join(common)


def _name_groups(groups: list[Group]) -> None:
    """Stable names from module paths: the common module of everything a group touches.

    Heads, hidden and prunable groups choose first; a module path shared by several groups of the
    same kind (an MLP stack in one Sequential) is skipped for the producing module of each.
    """
    options: dict[int, list[str]] = {}
    for g in groups:
        everything = _common_module([t.name for t in g.params])
        producers = _common_module([t.name for t in g.params if t.axis == 0])
        first_module = _common_module([g.params[0].name]) if g.params else ""
        stack = ".".join(filter(None, [g.blocks[0].path.rpartition(".")[0], "blocks"])) if g.blocks else ""
        options[id(g)] = [c for c in (everything, producers, first_module, stack) if c] or [g.kind]
    for kind in ("hidden", "blocks"):  # one model-wide group is named by its kind
        alone = [g for g in groups if g.kind == kind]
        if len(alone) == 1:
            options[id(alone[0])] = [kind]
    clash = defaultdict(int)
    for g in groups:
        clash[(options[id(g)][0], g.kind, g.prunable)] += 1
    taken: set[str] = set()
    for g in sorted(groups, key=lambda g: (not g.prunable, KINDS.index(g.kind))):
        opts = options[id(g)]
        if clash[(opts[0], g.kind, g.prunable)] > 1 and len(opts) > 1:
            opts = opts[1:]
        kind = [] if opts[0].endswith(f".{g.kind}") else [f"{opts[0]}.{g.kind}"]  # a stack's blocks: named so
        name = next((o for o in [*opts, *kind] if o not in taken), None)
        k = 2
        while name is None:
            name = f"{opts[0]}#{k}" if f"{opts[0]}#{k}" not in taken else None
            k += 1
        g.name = name
        taken.add(name)
