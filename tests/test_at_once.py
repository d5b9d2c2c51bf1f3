"""The overlaps of all of a target's pieces found at once (the common case at pod scale: a tensor read as it is
saved, many chunks, several devices per process) against the same overlaps found piece by piece."""

from __future__ import annotations

import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jreshard import catalog
from jreshard.catalog import Chunk, TensorInfo, validate_chunks
from jreshard.lanes import RegionBlock
from jreshard.planning import Piece
from jreshard.program import Target, _steps_at_once, make_step
from jreshard.views import View

SETTINGS = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def tiled(draw, min_chunks=catalog._INDEX_MIN_CHUNKS):
    """A 1-D or 2-D shape cut into at least ``min_chunks`` chunks of uneven sizes, in random order."""
    ndim = draw(st.sampled_from([1, 2]))
    if ndim == 1:
        n = draw(st.integers(min_chunks, 120))
        cuts = sorted({0, n * 3, *draw(st.lists(st.integers(1, n * 3 - 1), min_size=n - 1, max_size=n - 1,
                                                unique=True))})
        chunks = [Chunk((a,), (b - a,)) for a, b in zip(cuts, cuts[1:])]
        shape: tuple[int, ...] = (n * 3,)
    else:
        rows = sorted({0, 50, *draw(st.lists(st.integers(1, 49), min_size=11, max_size=30, unique=True))})
        cols = sorted({0, 9, *draw(st.lists(st.integers(1, 8), min_size=3, max_size=8, unique=True))})
        chunks = [Chunk((a, c), (b - a, d - c)) for a, b in zip(rows, rows[1:]) for c, d in zip(cols, cols[1:])]
        shape = (50, 9)
    return shape, validate_chunks("t", shape, draw(st.permutations(chunks)), "ckpt")


@st.composite
def box_in(draw, shape, empty_ok=True):
    out = []
    for d in shape:
        a = draw(st.integers(0, d - (0 if empty_ok else 1)))
        out.append((a, draw(st.integers(a if empty_ok else a + 1, d))))
    return tuple(out)


@SETTINGS
@given(st.data(), tiled())
def test_many_boxes_find_what_each_box_finds(data, tiling):
    shape, chunks = tiling
    boxes = [data.draw(box_in(shape)) for _ in range(data.draw(st.integers(1, 9)))]
    bid, cid, cstart, pstart, size = catalog.chunk_overlap_arrays_many(chunks, boxes)
    assert (np.diff(bid) >= 0).all()  # box 0's rows first, then box 1's ...
    for k, box in enumerate(boxes):
        one = catalog.chunk_overlap_arrays(chunks, box)
        rows = bid == k
        for a, b in zip(one, (cid, cstart, pstart, size)):
            assert np.array_equal(a, b[rows]), (k, box)
        # and what the plain scan of every chunk finds, in chunk order
        found = [(i, tuple(max(o, b0) - o for o, (b0, _) in zip(c.offsets, box)))
                 for i, c in enumerate(chunks)
                 if all(max(o, b0) < min(o + s, b1) for o, s, (b0, b1) in zip(c.offsets, c.sizes, box))]
        assert [(i, tuple(s)) for i, s in zip(cid[rows].tolist(), cstart[rows].tolist())] == found


def test_many_boxes_refuse_what_one_box_refuses():
    few = validate_chunks("t", (8,), [Chunk((i,), (1,)) for i in range(8)], "ckpt")  # below the index's threshold
    assert catalog.chunk_overlap_arrays_many(few, [((0, 2),)]) is None
    many = validate_chunks("t", (100,), [Chunk((i,), (1,)) for i in range(100)], "ckpt")
    assert catalog.chunk_overlap_arrays_many(many, [((0, 2),), ((0, 2), (0, 1))]) is None  # one box of another rank
    assert catalog.chunk_overlap_arrays_many(many, []) is None


def _target(shape, dtype=np.dtype("float32"), name="t"):
    """A target read as tensor ``name`` is saved."""
    dtype = np.dtype(dtype)
    return Target(0, "x", View("saved", name, (), f"saved({name!r})", shape, dtype), shape, dtype, None, dtype.itemsize)


def _block_rows(regions, slot):
    """Per slot, the rows of the RegionBlocks as (cid, cstart, pstart, size, dst0), sorted; and their strides."""
    out = []
    for r in regions:
        assert type(r) is RegionBlock
        slots = np.broadcast_to(r.slot, r.cid.shape)
        for i in np.flatnonzero(slots == slot).tolist():
            out.append((int(r.cid[i]), tuple(r.cstart[i].tolist()), tuple(r.pstart[i].tolist()),
                        tuple(r.size[i].tolist()), int(r.dst0[i]), r.strides))
    return sorted(out)


@SETTINGS
@given(st.data(), tiled(), st.integers(0, 5))
def test_steps_at_once_equal_steps_made_one_by_one(data, tiling, slot0):
    shape, chunks = tiling
    tensors = {"t": TensorInfo("t", shape, np.dtype("float32"), chunks)}
    target = _target(shape)
    n = data.draw(st.integers(1, 6))
    # Pieces of one shape (the usual even sharding) or of several shapes.
    if data.draw(st.booleans()):
        first = data.draw(box_in(shape, empty_ok=False))
        extent = [b - a for a, b in first]
        boxes = [first] + [tuple((a, a + e) for a, e in zip(
            [data.draw(st.integers(0, d - e)) for d, e in zip(shape, extent)], extent)) for _ in range(n - 1)]
    else:
        boxes = [data.draw(box_in(shape, empty_ok=False)) for _ in range(n)]
    pieces = [Piece("x", box, 0, []) for box in boxes]
    made = _steps_at_once(target, pieces, boxes, slot0, tensors)
    assert made is not None
    steps, regions = made
    all_regions = [r for regs in regions for r in regs]
    assert len({id(r) for r in all_regions}) == len({tuple(s.shape) for s in steps})  # one block per shape
    for k, (piece, box) in enumerate(zip(pieces, boxes)):
        step, regs = make_step(target, piece, box, slot0 + k, tensors)
        got = steps[k]
        assert (got.box, got.slot, got.buf_dtype, got.casts, got.temps, got.piece) == \
            (step.box, step.slot, step.buf_dtype, step.casts, step.temps, step.piece)
        assert _block_rows(all_regions, slot0 + k) == _block_rows(regs, slot0 + k)


def test_steps_at_once_leave_views_and_small_tensors_to_make_step():
    chunks = validate_chunks("t", (100,), [Chunk((i,), (1,)) for i in range(100)], "ckpt")
    tensors = {"t": TensorInfo("t", (100,), np.dtype("float32"), chunks)}
    piece = Piece("x", ((0, 10),), 0, [])
    view = View("saved", "t", (), "saved('t')", (100,), np.dtype("float32")).astype("float64")
    cast = Target(0, "x", view, (100,), np.dtype("float64"), None, 8)
    assert _steps_at_once(cast, [piece], [piece.box], 0, tensors) is None
    few = {"t": TensorInfo("t", (4,), np.dtype("float32"), validate_chunks("t", (4,), [Chunk((0,), (4,))], "c"))}
    assert _steps_at_once(_target((4,)), [Piece("x", ((0, 4),), 0, [])], [((0, 4),)], 0, few) is None


def test_tensors_cut_alike_share_one_index_and_its_blocks():
    """Layers cut into the same chunks share an index (and the blocks of a set of boxes); a tensor cut otherwise,
    or the same chunks listed in another order (other chunk ids), has its own."""
    cuts = [Chunk((4 * i, 0), (4, 6)) for i in range(60)]
    a = validate_chunks("a", (240, 6), list(cuts), "ckpt")
    b = validate_chunks("b", (240, 6), list(cuts), "ckpt")
    c = validate_chunks("c", (240, 6), cuts[::-1], "ckpt")
    d = validate_chunks("d", (240, 6), [Chunk((3 * i, 0), (3, 6)) for i in range(80)], "ckpt")
    box = ((5, 30), (0, 6))
    ia, ib, ic, id_ = (catalog.chunk_index(x, [box]) for x in (a, b, c, d))
    assert ia is ib and ia is not ic and ia is not id_
    tensors = {n: TensorInfo(n, (240, 6), np.dtype(dt), x)
               for n, dt, x in (("a", "float32", a), ("b", "int8", b), ("c", "float32", c), ("d", "float32", d))}
    boxes = [box, ((40, 65), (0, 6))]
    pieces = [Piece("x", bx, 0, []) for bx in boxes]
    for name in ("a", "b", "c", "d", "b"):
        dt = tensors[name].dtype
        target = _target((240, 6), dt, name)
        steps, regions = _steps_at_once(target, pieces, boxes, 3, tensors)
        blocks = [r for regs in regions for r in regs]
        assert all(r.info is tensors[name] for r in blocks)
        assert all(s.buf_dtype == dt for s in steps)
        for k, (piece, bx) in enumerate(zip(pieces, boxes)):
            _, regs = make_step(target, piece, bx, 3 + k, tensors)
            assert _block_rows(blocks, 3 + k) == _block_rows(regs, 3 + k), name
    assert ("steps", tuple(boxes)) in ia.memo and ("steps", tuple(boxes)) in ic.memo


def test_a_tensor_cut_alike_takes_the_blocks_at_its_first_plan(monkeypatch):
    """The blocks of a set of boxes are found once per layout: a tensor cut alike whose chunks were never asked
    for their index yet (the usual case: each layer of a model is planned once) takes them from the memo."""
    from jreshard import program

    calls = []
    real = program._block_groups
    monkeypatch.setattr(program, "_block_groups", lambda *a: calls.append(a[0].view._args) or real(*a))
    cuts = [Chunk((0, 5 * i), (3, 5)) for i in range(70)]  # a layout no other test uses
    tensors = {n: TensorInfo(n, (3, 350), np.dtype("float32"), validate_chunks(n, (3, 350), list(cuts), "ckpt"))
               for n in ("l0", "l1", "l2")}
    boxes = [((0, 3), (0, 160)), ((0, 3), (160, 320)), ((0, 3), (320, 350))]
    pieces = [Piece("x", bx, 0, []) for bx in boxes]
    for name in tensors:
        target = _target((3, 350), name=name)
        steps, regions = _steps_at_once(target, pieces, boxes, 0, tensors)
        blocks = [r for regs in regions for r in regs]
        assert all(r.info is tensors[name] for r in blocks)
        for k, (piece, bx) in enumerate(zip(pieces, boxes)):
            _, regs = make_step(target, piece, bx, k, tensors)
            assert _block_rows(blocks, k) == _block_rows(regs, k), name
    assert calls == ["l0"]


def test_index_memo_is_bounded(monkeypatch):
    chunks = validate_chunks("t", (200,), [Chunk((2 * i,), (2,)) for i in range(100)], "ckpt")
    tensors = {"t": TensorInfo("t", (200,), np.dtype("float32"), chunks)}
    index = catalog.chunk_index(chunks, [((0, 1),)])
    monkeypatch.setattr(type(index), "MEMO_ENTRIES", 5)
    index.memo.clear()
    for k in range(23):
        box = ((k, k + 7),)
        _steps_at_once(_target((200,)), [Piece("x", box, 0, [])], [box], 0, tensors)
        assert 1 <= len(index.memo) <= 5


@st.composite
def located_blocks(draw):
    """A 2-D tensor of many row-band chunks with locators of every kind (plain, in memory, big-endian,
    strided), and a block of overlaps with some of them (destinations C-ordered or transposed)."""
    from jreshard.catalog import Locator

    nchunks, width = draw(st.integers(48, 70)), draw(st.integers(1, 9))
    chunks = validate_chunks("t", (2 * nchunks, width), [Chunk((2 * i, 0), (2, width)) for i in range(nchunks)], "c")
    dtype = np.dtype(draw(st.sampled_from(["int8", "float32"])))
    info = TensorInfo("t", (2 * nchunks, width), dtype, chunks)
    located = {}
    for c in range(nchunks):
        kind = draw(st.sampled_from(["plain", "plain", "memory", "big", "strided", "none"]))
        if kind == "none":
            continue
        key = draw(st.sampled_from(["a", "b", "c"]))
        base, soff = draw(st.integers(0, 10**6)), draw(st.integers(0, 50))
        located[("t", c)] = Locator(key, base, soff, (1, 2) if kind == "strided" else (width, 1), 4 * width,
                                    "big" if kind == "big" else "little",
                                    data=b"x" * (8 * width) if kind == "memory" else None)
    box = ((draw(st.integers(0, 10)), draw(st.integers(60, 2 * nchunks))), (0, width))
    cid, cstart, pstart, size = catalog.chunk_overlap_arrays(chunks, box)
    strides = draw(st.sampled_from([(width, 1), (1, box[0][1] - box[0][0])]))
    dst0 = pstart @ np.array(strides, np.int64)
    block = RegionBlock(info, np.arange(len(cid), dtype=np.int64) % 3, cid, cstart, size, dst0, strides, pstart)
    return info, located, block


@SETTINGS
@given(located_blocks())
def test_lane_tables_give_the_rows_located_chunks_give(case):
    """Rows made from the located chunks as arrays (LaneTable) equal those made chunk by chunk from the
    locators, and the rows left to copy jobs are the same."""
    from jreshard.lanes import LaneTable, lanes_of

    info, located, block = case
    by_locators = lanes_of([block], located)
    table, ids = LaneTable(len(info.chunks)), {}
    for (_, c), loc in located.items():
        table.put(info, c, loc, ids)
    unknown = any(("t", c) not in located for c in np.unique(block.cid).tolist())
    by_tables = lanes_of([block], {} if not unknown else located, {"t": table}, ids)

    def rows(lanes):
        if not lanes:
            return []
        (lane,) = lanes
        r = lane.rows
        return sorted(zip(*(getattr(r, f).tolist() for f in ("x0", "n", "s", "run", "base", "dst", "ds", "slot")),
                          [lane.keys[k] for k in r.kid.tolist()]))

    assert rows(by_tables[0]) == rows(by_locators[0])
    assert [m.tolist() for _, m in by_tables[1]] == [m.tolist() for _, m in by_locators[1]]
    for (_, c), loc in located.items():
        plain = loc.data is None and (loc.byteorder == "little" or info.dtype.itemsize == 1) and loc.strides[-1] == 1
        assert table.state[c] == (1 if plain else 0)
