"""SpaceGraph: union-find of index spaces with row-major factorisations (what reshapes and unions do)."""

from __future__ import annotations

from math import prod

import pytest
import sympy
from hypothesis import given, settings
from hypothesis import strategies as st

from fxgradnas.analysis.spaces import ShapeConflict, Size, SpaceGraph

B, T = 3, 7  # odd example sizes, as in the zoo
PROPERTY = settings(max_examples=150, deadline=None, derandomize=True, database=None)


def sizes(g: SpaceGraph, spaces: list[int]) -> list[Size]:
    return [g.size(s) for s in spaces]


def roots(g: SpaceGraph, spaces: list[int]) -> list[int]:
    return [g.find(s) for s in spaces]


def composite(g: SpaceGraph, factors: list[int]) -> int:
    return g.compose([g.new(f) for f in factors])


# --- union ---------------------------------------------------------------------------------------
def test_union_of_equal_leaves_is_one_space() -> None:
    g = SpaceGraph()
    a, b, c = g.new(5), g.new(5), g.new(5)
    g.union(a, b)
    g.union(b, c)
    g.union(c, a)  # already one space: a no-op
    assert g.find(a) == g.find(b) == g.find(c)
    assert g.size(c) == 5
    assert g.leaves(a) == [g.find(a)]


def test_union_of_different_sizes_raises() -> None:
    g = SpaceGraph()
    a, b = g.new(5), g.new(7)
    with pytest.raises(ShapeConflict):
        g.union(a, b)
    assert g.find(a) != g.find(b)


@pytest.mark.parametrize("leaf_first", [True, False])
def test_union_of_leaf_and_composite_gives_the_leaf_the_factorisation(leaf_first: bool) -> None:
    g = SpaceGraph()
    leaf = g.new(15)
    two, three = g.new(3), g.new(5)
    comp = g.compose([two, three])
    g.union(*((leaf, comp) if leaf_first else (comp, leaf)))
    assert g.find(leaf) == g.find(comp)
    assert roots(g, g.leaves(leaf)) == roots(g, [two, three])
    assert sizes(g, g.leaves(leaf)) == [3, 5]


def test_align_refines_a_coarser_factor() -> None:
    """[9] aligned with [3, 3]: the 9 is split into two 3s, each the same space as one of the 3s."""
    g = SpaceGraph()
    nine, a, b = g.new(9), g.new(3), g.new(3)
    g.align([nine], [a, b])
    assert roots(g, g.leaves(nine)) == roots(g, [a, b])
    assert g.find(a) != g.find(b)


def test_union_of_composites_refines_both_sides() -> None:
    """[9, 2] == [3, 6] row-major: the common refinement is [3, 3, 2]."""
    g = SpaceGraph()
    x, y = composite(g, [9, 2]), composite(g, [3, 6])
    g.union(x, y)
    assert sizes(g, g.leaves(x)) == [3, 3, 2]
    assert roots(g, g.leaves(x)) == roots(g, g.leaves(y))


def test_union_of_incompatible_factorisations_raises() -> None:
    """[2, 3] and [3, 2] have the same size but no common row-major refinement."""
    g = SpaceGraph()
    x, y = composite(g, [2, 3]), composite(g, [3, 2])
    with pytest.raises(ShapeConflict):
        g.union(x, y)


# --- regroup (what a reshape does) ---------------------------------------------------------------
def test_regroup_splits_a_leaf_and_composes_it_back() -> None:
    g = SpaceGraph()
    b, t, c = g.new(B), g.new(T), g.new(32)
    out = g.regroup([b, t, c], [B, T, 4, 8])
    assert sizes(g, out) == [B, T, 4, 8]
    assert roots(g, out[:2]) == roots(g, [b, t])
    assert roots(g, g.leaves(c)) == roots(g, out[2:])  # the 32-leaf is now [4, 8]

    back = g.regroup(out, [B, T, 32])
    assert roots(g, back[:2]) == roots(g, [b, t])
    assert g.size(back[2]) == 32
    assert roots(g, g.leaves(back[2])) == roots(g, out[2:])


def test_regroup_merges_symbolic_sizes() -> None:
    """(s0, s1, 8) -> (s0*s1, 8): the merged axis is the product of the two data spaces."""
    s0, s1 = sympy.symbols("s0 s1", integer=True, positive=True)
    g = SpaceGraph()
    a, b, c = g.new(s0), g.new(s1), g.new(8)
    merged, eight = g.regroup([a, b, c], [s0 * s1, 8])
    assert sympy.simplify(g.size(merged) - s0 * s1) == 0
    assert roots(g, g.leaves(merged)) == roots(g, [a, b])
    assert g.find(eight) == g.find(c)
    assert g.is_data(merged) and g.is_data(a) and not g.is_data(eight)

    back = g.regroup([merged, eight], [s0, s1, 8])
    assert roots(g, back) == roots(g, [a, b, c])


def test_symbolic_leaf_takes_a_symbolic_factorisation() -> None:
    s0, s1 = sympy.symbols("s0 s1", integer=True, positive=True)
    g = SpaceGraph()
    whole, a, b = g.new(s0 * s1), g.new(s0), g.new(s1)
    g.union(whole, g.compose([a, b]))
    assert roots(g, g.leaves(whole)) == roots(g, [a, b])
    with pytest.raises(ShapeConflict):
        g.union(a, g.new(8))


def test_regroup_that_mixes_factors_raises() -> None:
    g = SpaceGraph()
    x = composite(g, [2, 3])
    with pytest.raises(ShapeConflict):
        g.regroup([x], [3, 2])
    with pytest.raises(ShapeConflict):
        g.regroup([g.new(6)], [4])  # leaves part of the input unused / cannot build 4 from 6


def test_size_one_axes_are_ignored() -> None:
    g = SpaceGraph()
    one, b, c = g.new(1), g.new(B), g.new(12)
    assert g.is_trivial(one) and g.leaves(one) == []
    assert g.compose([one, c]) == g.find(c)  # a product with a size-1 factor is the other factor
    assert roots(g, g.leaves(g.compose([b, one, c]))) == roots(g, [b, c])

    out = g.regroup([b, one, c], [B, 12])  # squeeze
    assert roots(g, out) == roots(g, [b, c])
    out = g.regroup([b, c], [B, 1, 3, 1, 4])  # unsqueeze + split
    assert [g.is_trivial(s) for s in out] == [False, True, False, True, False]
    assert roots(g, g.leaves(c)) == roots(g, [out[2], out[4]])


# --- properties ----------------------------------------------------------------------------------
factor_lists = st.lists(st.integers(1, 6), min_size=1, max_size=5)


def prefix_products(factors: list[int]) -> list[int]:
    out, p = [], 1
    for f in factors:
        if f != 1:
            p *= f
            out.append(p)
    return out


def chain_compatible(xs: list[int], ys: list[int]) -> bool:
    """Two row-major factorisations of one size have a common refinement iff their prefix products
    form one chain under divisibility."""
    points = sorted(set(prefix_products(xs)) | set(prefix_products(ys)))
    return all(b % a == 0 for a, b in zip(points, points[1:], strict=False))


def prime_factors(n: int) -> list[int]:
    out, d = [], 2
    while n > 1:
        while n % d == 0:
            out.append(d)
            n //= d
        d += 1
    return out


@st.composite
def two_factorisations(draw: st.DrawFn) -> tuple[list[int], list[int]]:
    """Two factor lists of one product; the second regroups a shuffle of the first's primes."""
    xs = draw(factor_lists)
    primes = draw(st.permutations(prime_factors(prod(xs))))
    cuts = sorted(draw(st.sets(st.integers(1, max(len(primes) - 1, 1)), max_size=3)))
    bounds = [0, *[c for c in cuts if c < len(primes)], len(primes)]
    ys = [prod(primes[a:b]) for a, b in zip(bounds, bounds[1:], strict=False)]
    return xs, ys


@PROPERTY
@given(factors=factor_lists)
def test_regroup_a_leaf_into_factors_and_back(factors: list[int]) -> None:
    n = prod(factors)
    g = SpaceGraph()
    leaf = g.new(n)
    out = g.regroup([leaf], factors)
    assert sizes(g, out) == factors
    real = [f for f in factors if f != 1]
    assert sizes(g, g.leaves(leaf)) == real
    assert roots(g, g.leaves(leaf)) == roots(g, [s for s in out if not g.is_trivial(s)])

    (back,) = g.regroup(out, [n])
    assert g.size(back) == n
    assert sizes(g, g.leaves(back)) == real
    assert prod(sizes(g, g.leaves(back))) == n


@PROPERTY
@given(pair=two_factorisations())
def test_union_aligns_exactly_the_compatible_factorisations(pair: tuple[list[int], list[int]]) -> None:
    xs, ys = pair
    g = SpaceGraph()
    x, y = composite(g, xs), composite(g, ys)
    if not chain_compatible(xs, ys):
        with pytest.raises(ShapeConflict):
            g.union(x, y)
        return
    g.union(x, y)
    assert g.find(x) == g.find(y)
    leaves = g.leaves(x)
    assert roots(g, leaves) == roots(g, g.leaves(y))
    assert prefix_products(sizes(g, leaves)) == sorted(set(prefix_products(xs)) | set(prefix_products(ys)))


@PROPERTY
@given(pair=two_factorisations())
def test_regroup_succeeds_exactly_for_compatible_shapes(pair: tuple[list[int], list[int]]) -> None:
    xs, ys = pair
    g = SpaceGraph()
    ins = [g.new(f) for f in xs]
    if not chain_compatible(xs, ys):
        with pytest.raises(ShapeConflict):
            g.regroup(ins, ys)
        return
    out = g.regroup(ins, ys)
    assert sizes(g, out) == ys
    in_leaves = [leaf for s in ins for leaf in g.leaves(s)]
    out_leaves = [leaf for s in out for leaf in g.leaves(s)]
    assert roots(g, in_leaves) == roots(g, out_leaves)


# --- concatenations (slices of a fused projection) -----------------------------------------------
def test_cut_makes_a_leaf_the_concatenation_of_its_parts() -> None:
    g = SpaceGraph()
    qkv = g.new(16)
    k = g.cut(qkv, 8, 12)  # cut at both bounds: three parts
    q, v = g.cut(qkv, 0, 8), g.cut(qkv, 12, 16)
    assert sizes(g, [q, k, v]) == [8, 4, 4]
    assert g.pieces(qkv) == roots(g, [q, k, v])
    assert g.leaves(qkv) == [g.find(qkv)]  # one factor for products
    assert g.cut(qkv, 8, 12) == g.find(k)  # the same bounds, the same part
    assert g.pieces(g.cut(qkv, 8, 16)) == roots(g, [k, v])  # several parts: their concatenation


def test_a_part_cut_again_is_the_concatenation_of_its_own_parts() -> None:
    g = SpaceGraph()
    slots = g.new(6)
    q, rest = g.cut(slots, 0, 4), g.cut(slots, 4, 6)
    k = g.cut(slots, 4, 5)
    assert g.pieces(slots) == roots(g, [q, rest])
    assert g.pieces(rest) == [g.find(k), g.find(g.cut(slots, 5, 6))]


def test_segments_expand_a_concatenated_factor_and_deep_leaves_list_every_leaf() -> None:
    g = SpaceGraph()
    kv, slots, hd = g.new(2), g.new(4), g.new(5)
    rows = g.compose([kv, slots, hd])
    q = g.cut(slots, 0, 2)
    assert [sizes(g, s) for s in g.segments(rows)] == [[2, 2, 5], [2, 2, 5]]  # q part, then the k/v part
    assert roots(g, g.deep_leaves(rows)) == roots(g, [kv, q, hd, g.cut(slots, 2, 4)])
    assert g.segments(q) == [[g.find(q)]]


def test_union_of_concatenations_unites_their_parts() -> None:
    g = SpaceGraph()
    a, b = g.new(12), g.new(12)
    a1, a2 = g.cut(a, 0, 8), g.cut(a, 8, 12)
    b1, b2 = g.cut(b, 0, 8), g.cut(b, 8, 12)
    g.union(a, b)
    assert roots(g, [a1, a2]) == roots(g, [b1, b2])
    c = g.new(12)
    g.union(c, a)  # a leaf takes the parts
    assert g.pieces(c) == roots(g, [a1, a2])


@pytest.mark.parametrize("other", ["pieces", "product"])
def test_union_of_a_concatenation_with_other_parts_or_a_product_raises(other: str) -> None:
    g = SpaceGraph()
    a = g.new(12)
    g.cut(a, 0, 8)
    b = g.new(12)
    if other == "pieces":
        g.cut(b, 0, 6)
    else:
        b = composite(g, [3, 4])
    with pytest.raises(ShapeConflict):
        g.union(a, b)


def test_a_product_cannot_be_cut_across_its_factors_nor_a_concatenation_split() -> None:
    g = SpaceGraph()
    with pytest.raises(ShapeConflict, match="across the factors"):
        g.cut(composite(g, [3, 4]), 0, 5)
    a = g.new(12)
    g.cut(a, 0, 8)
    with pytest.raises(ShapeConflict, match="concatenation"):
        g.regroup([a], [3, 4])
    with pytest.raises(ShapeConflict, match="data-sized"):
        g.cut(g.new(sympy.Symbol("s", positive=True, integer=True)), 0, 2)
