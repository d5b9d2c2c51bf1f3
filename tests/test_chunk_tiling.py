"""The exact-tiling check of saved chunks (``validate_chunks``) and the chunk/box overlaps (``overlaps``),
against brute-force references written here: a numpy array painted with every chunk."""

from __future__ import annotations

import math
import pickle
import time

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jreshard import catalog
from jreshard.catalog import Chunk, validate_chunks
from jreshard.errors import CheckpointFormatError, InconsistentCheckpointError
from jreshard.planning import overlaps

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---------------------------------------------------------------------------------------------
# references
# ---------------------------------------------------------------------------------------------


def paint(shape, chunks) -> str:
    """What is wrong with ``chunks`` as a tiling of ``shape``: 'outside', 'overlap', 'holes' or 'ok'."""
    for c in chunks:
        if any(o + s > d for o, s, d in zip(c.offsets, c.sizes, shape)):
            return "outside"
    count = np.zeros(shape, dtype=np.int64)
    seen = set()
    for c in chunks:
        if (c.offsets, c.sizes) in seen:  # exact duplicates are dropped, not overlaps
            continue
        seen.add((c.offsets, c.sizes))
        count[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))] += 1
    if (count > 1).any():
        return "overlap"
    if (count == 0).any():
        return "holes"
    return "ok"


def painted_count(shape, chunks) -> np.ndarray:
    count = np.zeros(shape, dtype=np.int64)
    for c in {(c.offsets, c.sizes) for c in chunks}:
        count[tuple(slice(o, o + s) for o, s in zip(*c))] += 1
    return count


def kept_reference(chunks):
    """Non-empty chunks, first of each (offsets, sizes), in order."""
    out, seen = [], set()
    for c in chunks:
        if math.prod(c.sizes) and (c.offsets, c.sizes) not in seen:
            seen.add((c.offsets, c.sizes))
            out.append(c)
    return out


def overlaps_reference(shape, chunks, box):
    """(chunk id, start in chunk, start in box, size) for every chunk meeting ``box``, by painting masks."""
    grid = np.indices(shape) if shape else np.zeros((0,), dtype=np.int64)
    in_box = np.ones(shape, dtype=bool)
    for k, (a, b) in enumerate(box):
        in_box &= (grid[k] >= a) & (grid[k] < b)
    out = []
    for i, c in enumerate(chunks):
        region = in_box.copy()
        for k, (o, s) in enumerate(zip(c.offsets, c.sizes)):
            region &= (grid[k] >= o) & (grid[k] < o + s)
        if not region.any():
            continue
        where = np.argwhere(region) if shape else np.zeros((1, 0), dtype=np.int64)
        start, stop = where.min(axis=0), where.max(axis=0) + 1
        assert region.sum() == math.prod((stop - start).tolist())  # a box, as it must be
        out.append((i, tuple((start - np.array(c.offsets, dtype=np.int64)).tolist()),
                    tuple((start - np.array([a for a, _ in box], dtype=np.int64)).tolist()),
                    tuple((stop - start).tolist())))
    return out


def as_tuples(ovs):
    return [(o.chunk_id, o.chunk_start, o.piece_start, o.size) for o in ovs]


# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------


@st.composite
def split_tiling(draw, max_ndim=4, max_side=6, max_chunks=40, min_side=0):
    """A random shape (0-``max_ndim`` dims, zero-size dims allowed) and an exact tiling of it made by recursive
    random cuts (not necessarily a grid)."""
    ndim = draw(st.integers(0, max_ndim))
    shape = tuple(draw(st.integers(min_side, max_side)) for _ in range(ndim))
    chunks, stack = [], [((0,) * ndim, shape)]
    while stack:
        lo, hi = stack.pop()
        dims = [k for k in range(ndim) if hi[k] - lo[k] >= 2]
        if dims and len(chunks) + len(stack) < max_chunks and draw(st.integers(0, 3)):
            k = draw(st.sampled_from(dims))
            cut = draw(st.integers(lo[k] + 1, hi[k] - 1))
            stack.append((lo, hi[:k] + (cut,) + hi[k + 1 :]))
            stack.append((lo[:k] + (cut,) + lo[k + 1 :], hi))
        else:
            chunks.append(Chunk(lo, tuple(b - a for a, b in zip(lo, hi))))
    return shape, draw(st.permutations(chunks))


@st.composite
def any_box(draw, shape, empty_ok=True):
    lo = tuple(draw(st.integers(0, d)) for d in shape)
    sizes = tuple(draw(st.integers(0 if empty_ok else min(1, d - a), d - a)) for a, d in zip(lo, shape))
    return Chunk(lo, sizes)


@st.composite
def with_extras(draw, tiling):
    """``tiling`` (a strategy) with empty chunks and exact duplicates mixed in (both to be dropped)."""
    shape, chunks = draw(tiling)
    chunks = list(chunks)
    for _ in range(draw(st.integers(0, 3))):
        kind = draw(st.sampled_from(["empty", "dup"]))
        if kind == "dup" and chunks:
            extra = chunks[draw(st.integers(0, len(chunks) - 1))]
        elif shape:
            c = draw(any_box(shape))
            k = draw(st.integers(0, len(shape) - 1))
            extra = Chunk(c.offsets, c.sizes[:k] + (0,) + c.sizes[k + 1 :])
        else:
            continue
        chunks.insert(draw(st.integers(0, len(chunks))), extra)
    return shape, chunks


def mutate(data, shape, chunks):
    """One random change to a tiling: move, grow or shrink one chunk, drop one, add a random box, or add a copy
    of one moved by an offset."""
    chunks = list(chunks)
    nd = len(shape)
    kind = data.draw(st.sampled_from(["move", "resize", "drop", "add", "dup_offset"]))
    if kind == "add" and nd:
        chunks.insert(data.draw(st.integers(0, len(chunks))), data.draw(any_box(shape)))
        return chunks
    if not chunks:
        return chunks
    i = data.draw(st.integers(0, len(chunks) - 1))
    c = chunks[i]
    if kind == "drop" or not nd:
        del chunks[i]
        return chunks
    k = data.draw(st.integers(0, nd - 1))
    delta = data.draw(st.integers(-3, 3))
    if kind == "move":  # stays inside: the volumes still add up, yet (if it moved) two chunks overlap
        o = min(max(0, c.offsets[k] + delta), shape[k] - c.sizes[k])
        chunks[i] = Chunk(c.offsets[:k] + (o,) + c.offsets[k + 1 :], c.sizes)
    elif kind == "resize":
        s = max(0, c.sizes[k] + delta)
        chunks[i] = Chunk(c.offsets, c.sizes[:k] + (s,) + c.sizes[k + 1 :])
    else:
        o = max(0, c.offsets[k] + delta)
        moved = Chunk(c.offsets[:k] + (o,) + c.offsets[k + 1 :], c.sizes)
        chunks.insert(data.draw(st.integers(0, len(chunks))), moved)
    return chunks


def check_against_paint(shape, chunks):
    expect = paint(shape, chunks)
    if expect == "ok":
        kept = validate_chunks("t.w", shape, chunks, "ckpt")
        assert list(kept) == kept_reference(chunks)
        assert all(a is b for a, b in zip(kept, kept_reference(chunks)))
        return
    with pytest.raises(InconsistentCheckpointError, match=expect) as info:
        validate_chunks("t.w", shape, chunks, "ckpt")
    assert "'t.w'" in str(info.value) and str(info.value).startswith("ckpt: ")


# ---------------------------------------------------------------------------------------------
# validate_chunks
# ---------------------------------------------------------------------------------------------


@SETTINGS
@given(with_extras(split_tiling()))
def test_exact_tilings_are_accepted_unchanged(case):
    shape, chunks = case
    kept = validate_chunks("t", shape, chunks, "ckpt")
    expected = kept_reference(chunks)
    assert isinstance(kept, tuple)
    assert len(kept) == len(expected) and all(a is b for a, b in zip(kept, expected))


@SETTINGS
@given(st.data(), split_tiling())
def test_mutated_tilings_match_painting(data, tiling):
    shape, chunks = tiling
    check_against_paint(shape, mutate(data, shape, chunks))


@SETTINGS
@given(st.data())
def test_random_boxes_match_painting(data):
    """Arbitrary chunk sets (mostly not tilings), as hostile metadata may hold."""
    ndim = data.draw(st.integers(0, 4))
    shape = tuple(data.draw(st.integers(1, 5)) for _ in range(ndim))
    chunks = data.draw(st.lists(any_box(shape), max_size=10))
    check_against_paint(shape, chunks)


@SETTINGS
@given(st.data(), split_tiling(max_chunks=catalog._SMALL_CHUNKS))
def test_the_small_and_the_array_paths_both_match_painting(data, tiling):
    """Layouts of up to _SMALL_CHUNKS chunks (valid, with extras, or mutated) decided by plain Python and by the
    array path: both agree with the painting."""
    shape, chunks = tiling
    kind = data.draw(st.sampled_from(["as_is", "extras", "mutated"]))
    if kind == "extras":
        shape, chunks = data.draw(with_extras(st.just((shape, chunks))))
    elif kind == "mutated":
        chunks = mutate(data, shape, chunks)
    small = catalog._SMALL_CHUNKS
    try:
        for limit in (small, 0):
            catalog._SMALL_CHUNKS = limit
            check_against_paint(shape, chunks)
    finally:
        catalog._SMALL_CHUNKS = small


def test_a_few_chunks_that_tile_are_decided_without_arrays(monkeypatch):
    def refuse(*args):
        raise AssertionError("the array path was taken")

    monkeypatch.setattr(catalog, "_chunk_arrays", refuse)
    grid = [Chunk((r, c), (2, 3)) for r in (0, 2) for c in (0, 3, 6)]
    assert validate_chunks("w", (4, 9), grid + [grid[1], Chunk((1, 1), (0, 2))], "ckpt") == tuple(grid)
    with pytest.raises(AssertionError, match="array path"):  # an overlap is left to the array path to report
        validate_chunks("w", (4, 9), grid[:-1] + [Chunk((2, 5), (2, 4))], "ckpt")


def _forced(monkeypatch, **budgets):
    """The array path (whatever the chunk count) with its work budgets set to ``budgets``."""
    monkeypatch.setattr(catalog, "_SMALL_CHUNKS", 0)
    for k, v in budgets.items():
        monkeypatch.setattr(catalog, k, v)


@SETTINGS
@given(st.data(), split_tiling())
def test_sweep_decides_alone_when_the_vertex_method_gives_up(data, tiling):
    """With the vertex method's budget at zero, the overlap sweep decides; the answers must not change."""
    shape, chunks = tiling
    if data.draw(st.booleans()):
        chunks = mutate(data, shape, chunks)
    with pytest.MonkeyPatch.context() as mp:
        _forced(mp, _VERTEX_BUDGET=0, _VERTEX_PER_CHUNK=0)
        check_against_paint(shape, chunks)


@SETTINGS
@given(st.data(), split_tiling(max_ndim=3))
def test_messages_stay_true_without_a_named_pair(data, tiling):
    """With no budget to name an overlapping pair, the error still says something true: 'overlap' only if two
    chunks overlap, 'holes' only if an element is uncovered; and an exact tiling is still accepted."""
    shape, chunks = tiling
    chunks = mutate(data, shape, chunks)
    expect = paint(shape, chunks)
    with pytest.MonkeyPatch.context() as mp:
        _forced(mp, _SWEEP_BUDGET=0, _SWEEP_PER_CHUNK=0)
        if expect == "ok":
            validate_chunks("t", shape, chunks, "ckpt")
            return
        with pytest.raises(InconsistentCheckpointError) as info:
            validate_chunks("t", shape, chunks, "ckpt")
    msg = str(info.value)
    if expect == "outside":
        assert "outside" in msg
        return
    count = painted_count(shape, chunks)
    assert ("overlap" in msg) != ("holes" in msg), msg
    if "overlap" in msg:
        assert (count > 1).any()
    else:
        assert (count == 0).any()


def test_layout_beyond_both_budgets_is_refused_not_accepted(monkeypatch):
    shape, chunks = (4, 4), [Chunk((i, j), (1, 1)) for i in range(4) for j in range(4)]
    assert validate_chunks("t", shape, chunks, "ckpt") == tuple(chunks)
    _forced(monkeypatch, _VERTEX_BUDGET=0, _VERTEX_PER_CHUNK=0, _DECIDE_SWEEP_BUDGET=0, _SWEEP_PER_CHUNK=0)
    with pytest.raises(InconsistentCheckpointError, match="too irregular"):
        validate_chunks("t", shape, chunks, "ckpt")


def test_staggered_non_grid_tilings():
    """Brick walls and a pinwheel (no straight cut through it): exact tilings that are not grids."""
    bricks = [Chunk((r, c), (1, 2)) for r in range(0, 6, 2) for c in range(0, 8, 2)]
    bricks += [Chunk((r, 0), (1, 1)) for r in range(1, 6, 2)] + [Chunk((r, 7), (1, 1)) for r in range(1, 6, 2)]
    bricks += [Chunk((r, c), (1, 2)) for r in range(1, 6, 2) for c in range(1, 7, 2)]
    assert paint((6, 8), bricks) == "ok"
    assert len(validate_chunks("t", (6, 8), bricks, "ckpt")) == len(bricks)
    pinwheel = [Chunk((0, 0), (2, 1)), Chunk((0, 1), (1, 2)), Chunk((1, 2), (2, 1)), Chunk((2, 0), (1, 2)),
                Chunk((1, 1), (1, 1))]
    assert paint((3, 3), pinwheel) == "ok"
    assert validate_chunks("t", (3, 3), pinwheel, "ckpt") == tuple(pinwheel)
    swapped = pinwheel[:4] + [Chunk((1, 1), (1, 2))]
    with pytest.raises(InconsistentCheckpointError, match="overlap"):
        validate_chunks("t", (3, 3), swapped, "ckpt")


def test_scalars_and_empty_tensors():
    one = Chunk((), ())
    assert validate_chunks("s", (), [one, Chunk((), ()), one], "ckpt") == (one,)
    with pytest.raises(InconsistentCheckpointError, match="holes"):
        validate_chunks("s", (), [], "ckpt")
    empty = Chunk((0, 0), (0, 5))
    assert validate_chunks("e", (0, 5), [empty, empty], "ckpt") == ()
    assert validate_chunks("e", (0, 5), [], "ckpt") == ()
    with pytest.raises(InconsistentCheckpointError, match="outside"):
        validate_chunks("e", (0, 5), [Chunk((0, 0), (1, 5))], "ckpt")
    with pytest.raises(InconsistentCheckpointError, match="holes"):
        validate_chunks("w", (3,), [Chunk((0,), (0,)), Chunk((1,), (0,))], "ckpt")


@pytest.mark.parametrize("bad", [True, False, 2.0, -1, 2**62 + 1, 2**64, 2**70, None, "1", np.int64(1)])
@pytest.mark.parametrize("field", ["offsets", "sizes"])
def test_offsets_and_sizes_must_be_plain_non_negative_ints(bad, field):
    good = Chunk((0, 0), (2, 2))
    values = list(getattr(good, field))
    values[1] = bad
    chunk = Chunk(tuple(values), good.sizes) if field == "offsets" else Chunk(good.offsets, tuple(values))
    with pytest.raises(CheckpointFormatError, match=r"^ckpt: tensor 'w'"):
        validate_chunks("w", (2, 2), [good, chunk], "ckpt")


@pytest.mark.parametrize("chunk", [Chunk(None, (2,)), Chunk((0,), 2), Chunk((0,), {2: 2})])
def test_offsets_and_sizes_must_be_lists(chunk):
    with pytest.raises(CheckpointFormatError, match=r"^ckpt: tensor 'w'.*not a list of integers"):
        validate_chunks("w", (2,), [Chunk((0,), (2,)), chunk], "ckpt")


@pytest.mark.parametrize("shape", [(2, True), (2.0,), (-1,), (2**62, 4), "ab", [2] * 65])
def test_shape_must_be_plain_non_negative_ints(shape):
    with pytest.raises(CheckpointFormatError, match="tensor 'w'"):
        validate_chunks("w", shape, [], "ckpt")


def test_rank_and_bounds_errors_name_the_chunk():
    rank = r"ckpt: tensor 'w' .*rank 1 \(offsets \(0,\), sizes \(2,\)\)"
    with pytest.raises(InconsistentCheckpointError, match=rank):
        validate_chunks("w", (2, 2), [Chunk((0, 0), (2, 2)), Chunk((0,), (2,))], "ckpt")
    with pytest.raises(InconsistentCheckpointError, match=r"ckpt: tensor 'w' .*outside it \(offsets \(1, 0\)"):
        validate_chunks("w", (2, 2), [Chunk((0, 0), (1, 2)), Chunk((1, 0), (2, 2))], "ckpt")
    with pytest.raises(InconsistentCheckpointError, match="outside"):  # would overflow int64 if added
        validate_chunks("w", (2**62,), [Chunk((2**62,), (2**62,))], "ckpt")
    with pytest.raises(InconsistentCheckpointError, match=r"overlap \(offsets \(0, 0\) sizes \(2, 2\) and offsets"):
        validate_chunks("w", (2, 2), [Chunk((0, 0), (2, 2)), Chunk((1, 1), (1, 1))], "ckpt")


def test_huge_dims_and_high_rank():
    """Coordinates near 2**62 (no int64 overflow) and 64 dims (no 2**64 vertices)."""
    big = 2**61
    assert len(validate_chunks("w", (2 * big,), [Chunk((big,), (big,)), Chunk((0,), (big,))], "ckpt")) == 2
    with pytest.raises(InconsistentCheckpointError, match="overlap"):
        validate_chunks("w", (2 * big,), [Chunk((big - 1,), (big + 1,)), Chunk((0,), (big,))], "ckpt")
    shape = (2,) * 12 + (1,) * 52  # 64 dims; 12 cut in halves: 4,096 chunks
    corners = [Chunk(tuple((i >> k) & 1 for k in range(12)) + (0,) * 52, (1,) * 64) for i in range(4096)]
    assert len(validate_chunks("w", shape, corners, "ckpt")) == 4096
    with pytest.raises(InconsistentCheckpointError, match="holes"):
        validate_chunks("w", shape, corners[:-1], "ckpt")
    moved = corners[:-1] + [Chunk((0,) * 64, (2,) + (1,) * 63)]
    with pytest.raises(InconsistentCheckpointError, match="overlap"):
        validate_chunks("w", shape, moved, "ckpt")
    # A staircase in 24 dims: chunk k is x_0..x_{k-1} = 0, x_k = 1; the last is the origin. Every chunk has
    # up to 2**24 vertices, but the dim-by-dim expansion cancels them as it goes.
    nd = 24
    stairs = [Chunk((0,) * k + (1,) + (0,) * (nd - k - 1), (1,) * (k + 1) + (2,) * (nd - k - 1)) for k in range(nd)]
    stairs.append(Chunk((0,) * nd, (1,) * nd))
    assert len(validate_chunks("w", (2,) * nd, stairs, "ckpt")) == nd + 1
    with pytest.raises(InconsistentCheckpointError, match="holes"):
        validate_chunks("w", (2,) * nd, stairs[:-1], "ckpt")
    grown = stairs[:-1] + [Chunk((0,) * nd, (1,) * (nd - 1) + (2,))]
    with pytest.raises(InconsistentCheckpointError, match="overlap"):
        validate_chunks("w", (2,) * nd, grown, "ckpt")


# ---------------------------------------------------------------------------------------------
# overlaps
# ---------------------------------------------------------------------------------------------


@st.composite
def target_box(draw, shape):
    out = []
    for d in shape:
        a = draw(st.integers(0, d))
        out.append((a, draw(st.integers(a, d))))
    return tuple(out)


@SETTINGS
@given(st.data(), split_tiling(max_ndim=3, max_side=12, max_chunks=150, min_side=1))
def test_overlaps_match_painting(data, tiling):
    shape, chunks = tiling
    kept = validate_chunks("t", shape, chunks, "ckpt")
    for _ in range(3):
        box = data.draw(target_box(shape))
        got = overlaps(kept, box)
        assert as_tuples(got) == overlaps_reference(shape, kept, box)
        assert got == overlaps(list(kept), box)  # a list is scanned: same Overlap objects
        np_box = tuple((np.int64(a), np.int64(b)) for a, b in box)
        assert as_tuples(overlaps(kept, np_box)) == as_tuples(got)


@SETTINGS
@given(st.data())
def test_overlaps_index_with_uneven_chunks(data):
    """Chunks of very different sizes (the index's window is by the largest), in random order, many boxes."""
    cuts0 = sorted({0, 40, *data.draw(st.lists(st.integers(1, 39), max_size=12))})
    cuts1 = sorted({0, 30, *data.draw(st.lists(st.integers(1, 29), max_size=12))})
    chunks = [Chunk((a, c), (b - a, d - c)) for a, b in zip(cuts0, cuts0[1:]) for c, d in zip(cuts1, cuts1[1:])]
    kept = validate_chunks("t", (40, 30), data.draw(st.permutations(chunks)), "ckpt")
    for _ in range(4):
        box = data.draw(target_box((40, 30)))
        assert as_tuples(overlaps(kept, box)) == overlaps_reference((40, 30), kept, box)


@SETTINGS
@given(st.data(), split_tiling(max_ndim=3, max_side=10, max_chunks=40, min_side=1))
def test_scanned_overlaps_kept_per_layout_are_the_scans(data, tiling):
    """Tensors cut alike (two validations of one layout, as a model's layers are) share the scanned overlaps of
    a box: the second tensor gets the first's Overlap objects, equal to a fresh scan and to painting, for any
    box, asked for in any order, any number of times; a box of lists is scanned, not kept."""
    shape, chunks = tiling
    first = validate_chunks("layer0", shape, chunks, "ckpt")
    second = validate_chunks("layer1", shape, [Chunk(c.offsets, c.sizes) for c in chunks], "ckpt")
    assert catalog.chunk_overlaps(first, tuple((0, d) for d in shape)) is None  # few chunks: scanned
    boxes = [data.draw(target_box(shape)) for _ in range(3)]
    for box in boxes + boxes[::-1]:
        a, b = overlaps(first, box), overlaps(second, box)
        assert as_tuples(a) == as_tuples(b) == overlaps_reference(shape, first, box)
        assert all(x is y for x, y in zip(a, b))  # the same objects: kept once for the layout
        assert a == overlaps(tuple(first), box)  # a plain tuple is scanned afresh: equal
        assert as_tuples(overlaps(first, [list(r) for r in box])) == as_tuples(a)


def test_layouts_that_differ_in_sizes_only_keep_their_own_overlaps():
    """A layout is its chunks' offsets and sizes: two with the same offsets, one chunk longer, do not share."""
    short = validate_chunks("a", (8, 3), [Chunk((0, 0), (4, 3)), Chunk((4, 0), (4, 3))], "ckpt")
    long = validate_chunks("b", (10, 3), [Chunk((0, 0), (4, 3)), Chunk((4, 0), (6, 3))], "ckpt")
    box = ((2, 10), (0, 3))
    assert [o.size for o in overlaps(short, box)] == [(2, 3), (4, 3)]
    assert [o.size for o in overlaps(long, box)] == [(2, 3), (6, 3)]
    assert [o.size for o in overlaps(short, box)] == [(2, 3), (4, 3)]


def _fresh_scan_tables(monkeypatch, held: int, layouts: int) -> None:
    from jreshard import planning

    monkeypatch.setattr(planning, "SCANNED_OVERLAPS", held)
    monkeypatch.setattr(planning, "LAYOUTS", layouts)
    monkeypatch.setattr(planning, "_SCANNED", {})
    monkeypatch.setattr(planning, "_SCANNED_HELD", [0])
    monkeypatch.setattr(planning, "_LAYOUT_IDS", {})


def test_scanned_overlaps_kept_stay_within_their_bound(monkeypatch):
    """What overlaps() keeps of its scans never passes SCANNED_OVERLAPS Overlaps in all; every answer stays the
    scan's."""
    from jreshard import planning

    _fresh_scan_tables(monkeypatch, held=10, layouts=4096)
    tensors = [validate_chunks(f"t{k}", (4 * (k % 3 + 1), 6), [Chunk((4 * i, 0), (4, 6)) for i in range(k % 3 + 1)],
                               "ckpt") for k in range(9)]
    for _ in range(2):
        for t in tensors:
            shape = (4 * len(t), 6)
            for box in (((0, shape[0]), (0, 6)), ((1, shape[0] - 1), (2, 5)), ((2, 3), (0, 6))):
                assert as_tuples(overlaps(t, box)) == overlaps_reference(shape, t, box)
                assert planning._SCANNED_HELD[0] == sum(len(v) for v in planning._SCANNED.values()) <= 10
    assert planning._SCANNED  # (something was kept)


def test_a_layout_numbering_that_starts_over_reuses_no_number(monkeypatch):
    """Layouts numbered one at a time (the numbering starts over at each new one): a new layout never gets the
    number an older tensor still holds, so a box asked of both gets each one's own overlaps."""
    _fresh_scan_tables(monkeypatch, held=1 << 15, layouts=1)
    halves = validate_chunks("a", (4, 6), [Chunk((0, 0), (2, 6)), Chunk((2, 0), (2, 6))], "ckpt")
    whole = validate_chunks("b", (4, 6), [Chunk((0, 0), (4, 6))], "ckpt")
    box = ((0, 4), (0, 6))
    for _ in range(2):
        assert [o.size for o in overlaps(halves, box)] == [(2, 6), (2, 6)]
        assert [o.size for o in overlaps(whole, box)] == [(4, 6)]


def test_overlaps_index_is_used_kept_with_the_chunks_and_not_pickled():
    chunks = [Chunk((i, j), (1, 1)) for i in range(10) for j in range(10)]
    kept = validate_chunks("t", (10, 10), chunks, "ckpt")
    assert kept == tuple(chunks) and repr(kept) == repr(tuple(chunks))
    box = ((2, 4), (5, 9))
    found = catalog.chunk_overlaps(kept, box)
    assert found is not None and found[0] == [25, 26, 27, 28, 35, 36, 37, 38]
    assert overlaps(kept, box) == overlaps(tuple(chunks), box) == overlaps(chunks, box)
    assert catalog.chunk_overlaps(tuple(chunks), box) is None  # a plain tuple is scanned
    again = pickle.loads(pickle.dumps(kept))
    assert again == kept and "_index" not in vars(again) and "_index" in vars(kept)


def test_overlaps_of_unvalidated_chunks_are_scanned():
    """Chunks the index cannot take (mixed ranks, negative values, lists): the plain scan answers."""
    ragged = catalog.ChunkTuple(tuple(Chunk((i,), (1,)) for i in range(60)) + (Chunk((4, 0), (1, 1)),))
    assert [o.chunk_id for o in overlaps(ragged, ((3, 5),))] == [3, 4, 60]
    negative = catalog.ChunkTuple(Chunk((i - 5,), (1,)) for i in range(60))
    assert [o.chunk_id for o in overlaps(negative, ((0, 2),))] == [5, 6]
    lists = catalog.ChunkTuple(Chunk([i], [1]) for i in range(60))
    assert [o.chunk_id for o in overlaps(lists, ((0, 2),))] == [0, 1]


# ---------------------------------------------------------------------------------------------
# scale (timings are printed, not asserted)
# ---------------------------------------------------------------------------------------------


def test_a_million_chunks():
    g = 1000
    grid = [Chunk((i * 3, j * 5), (3, 5)) for i in range(g) for j in range(g)]
    t0 = time.perf_counter()
    kept = validate_chunks("big", (3 * g, 5 * g), grid, "ckpt")
    t_grid = time.perf_counter() - t0
    assert len(kept) == g * g
    box = ((1000, 1300), (2000, 2500))
    t0 = time.perf_counter()
    ovs = overlaps(kept, box)
    t_overlaps = time.perf_counter() - t0
    assert sum(math.prod(o.size) for o in ovs) == 300 * 500
    assert [o.chunk_id for o in ovs] == [i * g + j for i in range(333, 434) for j in range(400, 500)]
    del grid, kept, ovs

    rows = [Chunk((r * 4, 0), (4, 8192)) for r in range(2048)]
    t0 = time.perf_counter()
    for _ in range(64):  # 64 tensors of 2,048 rows, as a model saved on 2,048 ranks
        validate_chunks("row", (8192, 8192), rows, "ckpt")
    t_rows = time.perf_counter() - t0

    small = [Chunk((i * 3, j * 5), (3, 5)) for i in range(300) for j in range(300)]
    small[45_678] = Chunk((small[45_678].offsets[0] + 1, small[45_678].offsets[1]), (3, 5))
    t0 = time.perf_counter()
    with pytest.raises(InconsistentCheckpointError, match=r"overlap \(offsets \("):
        validate_chunks("bad", (900, 1500), small, "ckpt")
    t_bad = time.perf_counter() - t0
    print(f"\n1,000,000-chunk grid: {t_grid:.2f} s; one box's overlaps: {t_overlaps * 1e3:.1f} ms; "
          f"64 x 2,048 rows: {t_rows:.2f} s; 90,000 chunks with an overlap, named: {t_bad:.2f} s")
