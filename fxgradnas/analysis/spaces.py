"""Dimension spaces: a union-find over index spaces that may be refined into products or concatenations.

Every tensor axis in the captured graph is labelled with a *space*. Op rules declare two axes to be
the same index space (``union``) or one axis to be a row-major product of others (``compose``), as a
reshape does. A space that is the product of others keeps that factorisation, and unions align
factorisations by size, splitting a leaf where one side is finer (``[9]`` and ``[3, 3]`` become
``[3, 3]``). Pruning a unit of a leaf space removes that index from every axis the leaf is a factor of.

A leaf of constant size may instead be cut into consecutive *parts* (``cut``), as slicing a fused
projection into q, k and v does: the leaf is then the concatenation of its parts, each a space of its
own (with its own factors: the heads of q and of k). For products the concatenated leaf is one factor;
``deep_leaves`` looks inside it.

Sizes are ints or sympy expressions (symbolic batch and sequence sizes from a dynamic export); a
space with a symbolic size is a *data* space and is never a pruning unit.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

import sympy

Size = int | sympy.Expr


def as_size(value: object) -> Size:
    """An int for a concrete dimension, a sympy expression for a symbolic one."""
    if isinstance(value, int):
        return value
    expr = getattr(getattr(value, "node", None), "expr", None)
    if expr is None:
        return int(value)  # type: ignore[call-overload]
    return int(expr) if expr.is_number else expr


def is_data_size(size: Size) -> bool:
    return not isinstance(size, int)


def quotient(big: Size, small: Size) -> Size | None:
    """``big / small`` when ``small`` divides ``big`` exactly, else None."""
    if isinstance(big, int) and isinstance(small, int):
        return big // small if small and big % small == 0 else None
    q = sympy.cancel(sympy.sympify(big) / sympy.sympify(small))
    if q.is_integer:
        return int(q) if q.is_number else q
    return None


def same_size(a: Size, b: Size) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    if a == b:
        return True
    difference = sympy.expand(sympy.sympify(a) - sympy.sympify(b))
    if difference == 0 or difference.is_polynomial():  # expanded, a polynomial is zero only as 0
        return difference == 0
    return sympy.simplify(difference) == 0


class ShapeConflict(Exception):
    """Two axes declared the same space have sizes that cannot be aligned."""


@dataclass
class SpaceGraph:
    """Union-find of index spaces with row-major factorisations at the roots."""

    parent: list[int] = field(default_factory=list)
    sizes: list[Size] = field(default_factory=list)
    factors: dict[int, list[int]] = field(default_factory=dict)
    parts: dict[int, list[int]] = field(default_factory=dict)  # a leaf's consecutive pieces

    def new(self, size: Size) -> int:
        self.parent.append(len(self.parent))
        self.sizes.append(size)
        return len(self.parent) - 1

    def find(self, s: int) -> int:
        root = s
        while self.parent[root] != root:
            root = self.parent[root]
        while self.parent[s] != root:
            self.parent[s], s = root, self.parent[s]
        return root

    def size(self, s: int) -> Size:
        return self.sizes[self.find(s)]

    def is_trivial(self, s: int) -> bool:
        return self.size(s) == 1

    def is_data(self, s: int) -> bool:
        return is_data_size(self.size(s))

    def leaves(self, s: int) -> list[int]:
        """The leaf spaces ``s`` is the row-major product of (size-1 leaves dropped)."""
        root = self.find(s)
        parts = self.factors.get(root)
        if parts is None:
            return [] if self.sizes[root] == 1 else [root]
        out: list[int] = []
        for part in parts:
            out.extend(self.leaves(part))
        return out

    def segments(self, s: int) -> list[list[int]]:
        """The leaves of each product that ``s`` is the concatenation of: one list for a product without a
        concatenated factor; ``[a, concat(p, q), b]`` gives those of ``[a, p, b]`` and ``[a, q, b]``."""
        out: list[list[int]] = [[]]
        for leaf in self.leaves(s):
            pieces = self.parts.get(leaf)
            if pieces is None:
                out = [segment + [leaf] for segment in out]
            else:
                out = [segment + more for segment in out for piece in pieces for more in self.segments(piece)]
        return out

    def deep_leaves(self, s: int) -> list[int]:
        """Every leaf of every segment of ``s`` (see :meth:`segments`), once."""
        return list(dict.fromkeys(leaf for segment in self.segments(s) for leaf in segment))

    def pieces(self, s: int) -> list[int] | None:
        """The parts ``s`` is the concatenation of, or None when it is not cut."""
        parts = self.parts.get(self.find(s))
        return None if parts is None else [self.find(p) for p in parts]

    def concat(self, parts: list[int]) -> int:
        """A new space that is the concatenation of ``parts`` (one part: that part)."""
        if len(parts) == 1:
            return self.find(parts[0])
        space = self.new(sum(int(self.size(p)) for p in parts))
        self.parts[space] = [self.find(p) for p in parts]
        return space

    def cut(self, s: int, start: int, end: int) -> int:
        """The space of entries ``[start, end)`` of ``s``: a leaf is cut into parts at these bounds, a part
        that a bound falls inside is cut in turn, and a range of several parts is their concatenation."""
        root = self.find(s)
        size = self.sizes[root]
        if not isinstance(size, int):
            raise ShapeConflict(f"a slice of the data-sized axis {size}")
        if not 0 <= start < end <= size:
            raise ShapeConflict(f"entries [{start}, {end}) of an axis of {size}")
        if start == 0 and end == size:
            return root
        if root in self.factors:
            raise ShapeConflict(f"entries [{start}, {end}) cut across the factors of a product of size {size}")
        if root not in self.parts:
            bounds = sorted({0, start, end, size})
            self.parts[root] = [self.new(b - a) for a, b in zip(bounds, bounds[1:], strict=False)]
        pieces, offset = [], 0
        for part in list(self.parts[root]):
            n = int(self.size(part))
            low, high = max(start, offset), min(end, offset + n)
            if low < high:
                pieces.append(self.cut(part, low - offset, high - offset))
            offset += n
        return self.concat(pieces)

    def compose(self, parts: list[int]) -> int:
        """A new space that is the row-major product of ``parts``."""
        parts = [self.find(p) for p in parts if not self.is_trivial(p)]
        if len(parts) == 1:
            return parts[0]
        size: Size = 1
        for p in parts:
            size = size * self.sizes[p]
        if not isinstance(size, int):
            size = sympy.expand(size)
            size = int(size) if size.is_number else size
        space = self.new(size)
        if parts:
            self.factors[space] = parts
        return space

    def split(self, leaf: int, first: Size) -> tuple[int, int]:
        """Refine a leaf into ``[first, size / first]``; returns the two new leaves."""
        root = self.find(leaf)
        assert root not in self.factors, "split applies to leaves"
        if root in self.parts:
            raise ShapeConflict(f"a concatenation of {len(self.parts[root])} pieces cannot be a product")
        rest = quotient(self.sizes[root], first)
        if rest is None:
            raise ShapeConflict(f"{first} does not divide {self.sizes[root]}")
        a, b = self.new(first), self.new(rest)
        self.factors[root] = [a, b]
        return a, b

    def union(self, a: int, b: int) -> None:
        """Declare ``a`` and ``b`` the same index space, aligning their factorisations."""
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if not same_size(self.sizes[ra], self.sizes[rb]):
            raise ShapeConflict(f"size {self.sizes[ra]} vs {self.sizes[rb]}")
        fa, fb = self.factors.get(ra), self.factors.get(rb)
        pa, pb = self.pieces(ra), self.pieces(rb)
        if self._contains(ra, rb) or self._contains(rb, ra):
            raise ShapeConflict("a space cannot equal one of its own factors")
        if (pa is not None or pb is not None) and (fa is not None or fb is not None):
            raise ShapeConflict("a concatenation of pieces cannot be a product")
        if pa is not None and pb is not None and [self.sizes[p] for p in pa] != [self.sizes[p] for p in pb]:
            raise ShapeConflict(f"pieces {[self.sizes[p] for p in pa]} vs {[self.sizes[p] for p in pb]}")
        self.parent[rb] = ra
        if pb is not None:
            del self.parts[rb]
            if pa is None:
                self.parts[ra] = pb
            else:
                for x, y in zip(pa, pb, strict=True):
                    self.union(x, y)
        if fb is not None:
            del self.factors[rb]
        if fa is None and fb is not None:
            self.factors[ra] = fb
        elif fa is not None and fb is not None:
            self.align(fa, fb)

    def align(self, xs: list[int], ys: list[int]) -> None:
        """Union two row-major factor lists of equal total size, refining where needed."""
        qx = deque(p for p in xs if not self.is_trivial(p))
        qy = deque(p for p in ys if not self.is_trivial(p))
        while qx and qy:
            x, y = self.find(qx.popleft()), self.find(qy.popleft())
            sx, sy = self.sizes[x], self.sizes[y]
            if same_size(sx, sy):
                self.union(x, y)
                continue
            if quotient(sx, sy) is not None:
                self._refine_front(x, sy, qx)
                qy.appendleft(y)
            elif quotient(sy, sx) is not None:
                self._refine_front(y, sx, qy)
                qx.appendleft(x)
            else:
                raise ShapeConflict(f"cannot align {sx} with {sy}")
        if qx or qy:
            raise ShapeConflict("factor lists of different total size")

    def _refine_front(self, space: int, first: Size, queue: deque[int]) -> None:
        """Put ``space`` back on ``queue`` as finer parts whose first part is at most ``first``."""
        parts = self.factors.get(space)
        if parts is None:
            parts = list(self.split(space, first))
        queue.extendleft(reversed([p for p in parts if not self.is_trivial(p)]))

    def _contains(self, outer: int, inner: int) -> bool:
        root = self.find(outer)
        parts = self.factors.get(root) or self.parts.get(root)
        if not parts:
            return False
        return any(self.find(p) == inner or self._contains(p, inner) for p in parts)

    def regroup(self, in_spaces: list[int], out_sizes: list[Size]) -> list[int]:
        """Spaces of a row-major reshape's output axes, given the input axes' spaces."""
        queue = deque(leaf for s in in_spaces for leaf in self.leaves(s))
        out: list[int] = []
        for size in out_sizes:
            if size == 1:
                out.append(self.new(1))
                continue
            taken: list[int] = []
            have: Size = 1
            while not same_size(have, size):
                if not queue:
                    raise ShapeConflict("reshape consumes more than its input")
                leaf = self.find(queue.popleft())
                if leaf in self.factors:
                    queue.extendleft(reversed(self.factors[leaf]))
                    continue
                need = quotient(size, have)
                if need is None:
                    raise ShapeConflict(f"cannot build {size} from {have}")
                if quotient(need, self.sizes[leaf]) is not None:
                    taken.append(leaf)
                    have = have * self.sizes[leaf]
                elif quotient(self.sizes[leaf], need) is not None:
                    first, rest = self.split(leaf, need)
                    taken.append(first)
                    queue.appendleft(rest)
                    have = size
                else:
                    raise ShapeConflict(f"cannot split {self.sizes[leaf]} into {need}")
            out.append(self.compose(taken))
        if any(not self.is_trivial(q) for q in queue):
            raise ShapeConflict("reshape leaves part of its input unused")
        return out
