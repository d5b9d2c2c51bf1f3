"""Property-based tests of the plan arithmetic and the copy executors, against numpy slicing."""

from __future__ import annotations

import math
import os
from concurrent.futures import ThreadPoolExecutor

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jreshard.catalog import Chunk, Locator, validate_chunks
from jreshard.errors import InconsistentCheckpointError
from jreshard import read as read_module
from jreshard.planning import normalize_index, overlaps, runs_of
from jreshard.read import CopyJob, Executor
from jreshard.storage import KvStore, LocalStore

SETTINGS = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@st.composite
def chunked(draw, max_ndim=3):
    """A shape and a grid chunking of it (cuts per dim, like DCP's Shard placements, empty chunks allowed)."""
    ndim = draw(st.integers(0, max_ndim))
    shape = tuple(draw(st.integers(1, 9)) for _ in range(ndim))
    cuts = []
    for d in shape:
        inner = sorted(draw(st.lists(st.integers(0, d), max_size=3)))
        cuts.append([0, *inner, d])
    chunks = []
    for cell in np.ndindex(*[len(c) - 1 for c in cuts]) if ndim else [()]:
        offs = tuple(cuts[k][i] for k, i in enumerate(cell))
        sizes = tuple(cuts[k][i + 1] - cuts[k][i] for k, i in enumerate(cell))
        chunks.append(Chunk(offs, sizes))
    return shape, chunks


@st.composite
def box_in(draw, shape):
    out = []
    for d in shape:
        a = draw(st.integers(0, d))
        b = draw(st.integers(a, d))
        out.append((a, b))
    return tuple(out)


@SETTINGS
@given(st.data())
def test_overlaps_rebuild_any_box(data):
    shape, chunks = data.draw(chunked())
    kept = validate_chunks("t", shape, chunks, "test")
    box = data.draw(box_in(shape))
    ref = np.arange(math.prod(shape)).reshape(shape)
    piece = np.full(tuple(b - a for a, b in box), -1)
    ovs = overlaps(kept, box)
    for ov in ovs:
        c = kept[ov.chunk_id]
        chunk_data = ref[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))]
        src = chunk_data[tuple(slice(a, a + n) for a, n in zip(ov.chunk_start, ov.size))]
        piece[tuple(slice(a, a + n) for a, n in zip(ov.piece_start, ov.size))] = src
    assert sum(math.prod(o.size) for o in ovs) == piece.size
    np.testing.assert_array_equal(piece, ref[tuple(slice(a, b) for a, b in box)])


@SETTINGS
@given(st.data())
def test_validate_detects_holes_and_overlaps(data):
    shape, chunks = data.draw(chunked(max_ndim=2))
    nonempty = [c for c in chunks if c.numel]
    if len(nonempty) < 2:
        return
    i = data.draw(st.integers(0, len(nonempty) - 1))
    with pytest.raises(InconsistentCheckpointError, match="holes"):
        validate_chunks("t", shape, nonempty[:i] + nonempty[i + 1 :], "test")
    # Growing a chunk by one element along a dim where a neighbour follows makes them overlap.
    c = nonempty[i]
    for d, (o, s) in enumerate(zip(c.offsets, c.sizes)):
        if o + s < shape[d]:
            grown = Chunk(c.offsets, tuple(x + (1 if k == d else 0) for k, x in enumerate(c.sizes)))
            with pytest.raises(InconsistentCheckpointError):
                validate_chunks("t", shape, nonempty[:i] + [grown] + nonempty[i + 1 :], "test")
            break


def _layout(data, sizes):
    """Store a chunk of ``sizes`` in a storage: C order, or a permuted (transposed) order, at an offset."""
    ndim = len(sizes)
    perm = data.draw(st.permutations(range(ndim))) if ndim else []
    storage_offset = data.draw(st.integers(0, 5))
    # Strides of a dense layout whose fastest dim is perm[-1].
    strides = [0] * ndim
    acc = 1
    for d in reversed(perm):
        strides[d] = acc
        acc *= sizes[d]
    return tuple(strides), storage_offset, storage_offset + acc + data.draw(st.integers(0, 3))


@pytest.fixture(scope="module")
def pool():
    with ThreadPoolExecutor(4) as p:
        yield p


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data(), backend=st.sampled_from(["memory", "posix", "tensorstore"]), gap=st.sampled_from([0, 16, 256]),
       max_request=st.sampled_from([8, 64, 32 * 2**20]))
def test_executors_copy_regions(tmp_path_factory, pool, data, backend, gap, max_request):
    shape, chunks = data.draw(chunked())
    kept = validate_chunks("t", shape, chunks, "test")
    dtype = np.dtype(data.draw(st.sampled_from(["float32", "int16", "float64", "uint8"])))
    ref = (np.arange(math.prod(shape)) * 7 + 3).astype(dtype).reshape(shape)
    # Lay every chunk out in one file, each with its own strides and storage offset.
    blob = bytearray()
    locs = []
    for c in kept:
        strides, soff, storage_len = _layout(data, c.sizes)
        storage = np.zeros(storage_len, dtype)
        view = np.lib.stride_tricks.as_strided(storage[soff:], shape=c.sizes, strides=tuple(s * dtype.itemsize for s in strides))
        view[...] = ref[tuple(slice(o, o + s) for o, s in zip(c.offsets, c.sizes))]
        blob += b"\xee" * 7  # unrelated bytes between items
        locs.append((len(blob), soff, strides, storage.nbytes))
        blob += storage.tobytes()
    blob = bytes(blob)
    if backend == "memory":
        store = None
        locs = [Locator("f", base, soff, strides, n, data=blob) for base, soff, strides, n in locs]
    elif backend == "posix":
        d = tmp_path_factory.mktemp("blob")
        (d / "f").write_bytes(blob)
        store = LocalStore(str(d))
        locs = [Locator("f", base, soff, strides, n) for base, soff, strides, n in locs]
    else:
        store = KvStore({"driver": "memory"})
        store.kv.write("f", blob).result()
        locs = [Locator("f", base, soff, strides, n) for base, soff, strides, n in locs]
    box = data.draw(box_in(shape))
    piece_shape = tuple(b - a for a, b in box)
    dest = np.zeros(piece_shape, dtype)
    jobs = [CopyJob("t", locs[ov.chunk_id], kept[ov.chunk_id].sizes, ov, dest,
                    runs_of(locs[ov.chunk_id], kept[ov.chunk_id].sizes, ov, piece_shape, dtype.itemsize))
            for ov in overlaps(kept, box)]
    # Small request sizes make the ranged reader cut reads and split long runs.
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(read_module, "MAX_REQUEST", max_request)
        Executor(store or LocalStore(os.getcwd()), "auto" if backend != "tensorstore" else "tensorstore", gap).run(jobs, pool)
    np.testing.assert_array_equal(dest, ref[tuple(slice(a, b) for a, b in box)])


def test_normalize_index_rejects_steps():
    assert normalize_index((slice(1, None),), (4, 2)) == ((1, 4), (0, 2))
    with pytest.raises(IndexError):
        normalize_index((slice(None, None, 2),), (4,))


@pytest.mark.parametrize("cpus, expected", [(None, 2), (1, 2), (2, 2), (3, 3), (6, 6), (64, 8)])
def test_read_threads_follow_the_cpu_count(tmp_path, monkeypatch, cpus, expected):
    """One read thread per CPU, at least 2 (a read overlaps the next) and at most 8; an explicit count wins."""
    monkeypatch.setattr(os, "cpu_count", lambda: cpus)
    assert Executor(LocalStore(str(tmp_path))).threads == expected
    assert Executor(LocalStore(str(tmp_path)), threads=5).threads == 5
