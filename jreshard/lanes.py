"""Many copy jobs as arrays: the common case of a load planned without a Python object per overlap.

A checkpoint of N ranks has N chunks per tensor, and a process's pieces overlap several of them each: at pod
scale a plan has millions of overlaps. Most are the same kind of copy: a box of a C-contiguous saved chunk
(a ``torch.save`` storage at a known file offset) into a C-ordered box of a shard buffer, which is a *row of
runs* (``n`` runs of ``run`` bytes, ``s`` bytes apart in the file and ``ds`` bytes apart in the buffer; one run
when the box is contiguous in both). :class:`RegionBlock` holds a leaf's overlaps with a tensor's chunks as
arrays (from :func:`jreshard.catalog.chunk_overlap_arrays`), :func:`lanes_of` turns the blocks of a unit into
one :class:`Lane` (:class:`Rows` of runs as arrays, exactly the runs :func:`jreshard.planning.runs_of` gives for
each overlap), and :func:`jreshard.read._file_requests` merges and cuts a lane's rows into requests with the
same arithmetic as the other jobs'. A request feeds ``(lane, Rows)`` parts, read straight into the buffers
(:func:`jreshard.read._scatter_iovs`) or copied from a staged read (:func:`copy_block_from`).

Overlaps that are not such rows (in-memory or compressed items, big-endian or strided storages, transposed
destinations, casts through temporaries) stay :class:`jreshard.program.Region` objects and copy jobs.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .catalog import TensorInfo
from .errors import TruncatedDataError


@dataclass(eq=False)
class RegionBlock:
    """Overlaps of one traced leaf with the chunks of saved tensor ``info``, as arrays: chunk ids ``cid`` (n,),
    starts in the chunk ``cstart``, sizes ``size`` and starts in the leaf's box ``pstart`` (n, ndim); element
    ``i`` of overlap ``r`` lands at element ``dst0[r] + sum(i_k * strides_k)`` of slot ``slot``."""

    info: TensorInfo
    slot: int | np.ndarray  # one slot, or one per row (the overlaps of several pieces of one shape)
    cid: np.ndarray
    cstart: np.ndarray
    size: np.ndarray
    dst0: np.ndarray
    strides: tuple[int, ...]
    pstart: np.ndarray

    def __len__(self) -> int:
        return len(self.cid)

    def subset(self, rows: np.ndarray) -> RegionBlock:
        """The rows ``rows`` (a mask or indices) as a block."""
        slot = self.slot if isinstance(self.slot, int) else self.slot[rows]
        return RegionBlock(self.info, slot, self.cid[rows], self.cstart[rows], self.size[rows], self.dst0[rows],
                           self.strides, self.pstart[rows])

    @property
    def nbytes(self) -> int:
        return int(self.size.prod(axis=1).sum()) * self.info.dtype.itemsize


@dataclass
class Rows:
    """Rows of runs as arrays: row i copies ``n[i]`` runs of ``run[i]`` bytes from file offsets ``x0[i] + k * s[i]``
    to bytes ``dst[i] + k * ds[i]`` of the buffer of slot ``slot[i]``; ``base[i]`` is the file offset of its
    chunk's storage (runs of one chunk may be read through larger gaps), ``tensor[i]`` indexes the lane's
    ``names`` and ``kid[i]`` its file. A lane's rows, and what one request feeds of them, are Rows; the planner's
    rows of copy jobs carry only the first five."""

    x0: np.ndarray
    n: np.ndarray
    s: np.ndarray
    run: np.ndarray
    base: np.ndarray
    dst: np.ndarray | None = None
    ds: np.ndarray | None = None
    slot: np.ndarray | None = None
    tensor: np.ndarray | None = None
    kid: np.ndarray | None = None

    FIELDS = ("x0", "n", "s", "run", "base", "dst", "ds", "slot", "tensor", "kid")

    def __len__(self) -> int:
        return len(self.x0)

    def take(self, rows: np.ndarray | slice) -> Rows:
        """The rows ``rows`` (a mask, indices or a slice)."""
        return Rows(*(None if getattr(self, f) is None else getattr(self, f)[rows] for f in self.FIELDS))

    def split(self, bounds: Sequence[int]) -> list[Rows]:
        """The rows between consecutive ``bounds`` (views, no copies): ``[take(slice(a, b)) for a, b in pairs]``,
        made quickly for the many requests of a lane.

        Example:
            >>> r = Rows(*(np.arange(5) for _ in range(5)))
            >>> [p.x0.tolist() for p in r.split([0, 2, 5])]
            [[0, 1], [2, 3, 4]]
        """
        cols = [getattr(self, f) for f in self.FIELDS]
        out = []
        for a, b in zip(bounds[:-1], bounds[1:]):
            out.append(Rows(*[None if c is None else c[a:b] for c in cols]))
        return out

    @staticmethod
    def concat(parts: list[Rows]) -> Rows:
        return Rows(*(None if getattr(parts[0], f) is None else np.concatenate([getattr(p, f) for p in parts])
                      for f in Rows.FIELDS))

    @property
    def nbytes(self) -> int:
        return int((self.n * self.run).sum())

    def slot_bytes(self) -> dict[int, int]:
        """Bytes fed per slot."""
        nb = self.n * self.run
        return {int(k): int(nb[self.slot == k].sum()) for k in np.unique(self.slot)}


@dataclass(eq=False)
class Lane:
    """The rows of runs of one unit (all files): ``rows``, whose file ids index ``keys`` and tensor ids ``names``;
    ``dests``, the unit's slot buffers, bound while the unit runs; ``whole``, the lane these rows were taken
    from (whose buffers are bound), for the rows of one file."""

    keys: list[str]
    names: list[str]
    rows: Rows
    dests: list[np.ndarray] | None = field(default=None, repr=False)
    whole: Lane | None = field(default=None, repr=False)

    def __len__(self) -> int:
        return len(self.rows)

    def only(self, key: str) -> Lane:
        """The rows in file ``key`` (sharing this lane's buffers once bound)."""
        mask = self.rows.kid == (self.keys.index(key) if key in self.keys else -1)
        return Lane(self.keys, self.names, self.rows.take(mask), whole=self.whole or self)


class Located:
    """What locating chunks found (per-archive state): the locators by (tensor name, chunk id), the tensors
    with chunks read whole by default among them, the same locators as arrays per tensor (:class:`LaneTable`,
    for :func:`lanes_of`) with the file ids those use, and the headers a format read to locate them (its own
    cache, by key). One object, swapped whole when released, so that a plan running meanwhile keeps one
    consistent set."""

    __slots__ = ("file_ids", "headers", "lane_tables", "locators", "sub_ranged")

    def __init__(self) -> None:
        self.locators: dict[tuple[str, int], Any] = {}
        self.sub_ranged: set[str] = set()
        self.lane_tables: dict[str, LaneTable] = {}
        self.file_ids: dict[str, int] = {}
        self.headers: dict[Any, Any] = {}


class LaneTable:
    """Per chunk of one saved tensor, what :func:`lanes_of` needs of its locator, as arrays filled as chunks are
    located (:meth:`put`): ``state`` -1 (not located yet), 0 (located, not a plain storage rows can read: in
    memory, big-endian, strided) or 1; then the storage's file offset ``base``, element ``soff`` and file id
    ``fid`` (into the ids of :meth:`put`'s ``file_ids``), and the chunk's innermost size ``cols``."""

    def __init__(self, n: int):
        self.state = np.full(n, -1, np.int8)
        self.base = np.zeros(n, np.int64)
        self.soff = np.zeros(n, np.int64)
        self.fid = np.zeros(n, np.int64)
        self.cols = np.zeros(n, np.int64)

    def put(self, info: TensorInfo, cid: int, loc: Any, file_ids: dict[str, int], at: int | None = None) -> None:
        """Record chunk ``cid`` of ``info`` located at ``loc``, in entry ``at`` (default ``cid``)."""
        from .planning import c_strides

        k = cid if at is None else at
        # A storage rows of runs read: in a file, little-endian (or of 1-byte items), C-contiguous.
        plain = (loc.data is None and (loc.byteorder == "little" or info.dtype.itemsize == 1)
                 and loc.strides == c_strides(info.chunks[cid].sizes))
        if plain:
            self.base[k], self.soff[k] = loc.base, loc.storage_offset
            self.fid[k] = file_ids.setdefault(loc.key, len(file_ids))
            sizes = info.chunks[cid].sizes
            self.cols[k] = sizes[-1] if sizes else 1
        self.state[k] = 1 if plain else 0


def row_grid(x0: np.ndarray, n: np.ndarray, s: np.ndarray) -> np.ndarray:
    """The run starts of many rows of runs at once: row i is ``x0[i] + k * s[i]`` for ``k < n[i]``, in order.

    Example:
        >>> row_grid(np.array([0, 100]), np.array([3, 2]), np.array([10, 5])).tolist()
        [0, 10, 20, 100, 105]
    """
    total = int(n.sum())
    first = np.cumsum(n) - n
    k = np.arange(total, dtype=np.int64) - np.repeat(first, n)
    return np.repeat(x0, n) + k * np.repeat(s, n)


def _dest_bytes(lane: Lane) -> tuple[list[np.ndarray], np.ndarray, np.ndarray]:
    """The lane's slot buffers as flat bytes, their addresses and sizes (by slot)."""
    from .read import _flat_u8

    assert lane.dests is not None
    flat = [_flat_u8(d) for d in lane.dests]
    return flat, np.array([f.ctypes.data for f in flat], np.int64), np.array([len(f) for f in flat], np.int64)


def copy_block_from(buf: np.ndarray, origin: int, lane: Lane, blk: Rows, where: str) -> None:
    """Copy the runs of ``blk`` from ``buf`` (uint8, whose byte 0 is file byte ``origin``) into the buffers."""
    flat, _, _ = _dest_bytes(lane)
    for x0, n, s, run, dst, ds, slot, t in zip(*(a.tolist() for a in (blk.x0, blk.n, blk.s, blk.run, blk.dst,
                                                                       blk.ds, blk.slot, blk.tensor))):
        lo, hi = x0 - origin, x0 + (n - 1) * s + run - origin
        dest = flat[slot]
        if lo < 0 or hi > len(buf) or dst < 0 or dst + (n - 1) * ds + run > len(dest):
            raise TruncatedDataError(f"{where}: tensor {lane.names[t]!r}: bytes [{x0}, {x0 + hi - lo}) are outside "
                                     "what was read")
        src_v = np.ndarray((n, run), np.uint8, buffer=buf, offset=lo, strides=(s, 1))
        dst_v = np.ndarray((n, run), np.uint8, buffer=dest, offset=dst, strides=(ds, 1))
        np.copyto(dst_v, src_v)


def lanes_of(blocks: list[RegionBlock], located: dict[tuple[str, int], Any],
             tables: dict[str, LaneTable] | None = None, file_ids: dict[str, int] | None = None
             ) -> tuple[list[Lane], list[tuple[RegionBlock, np.ndarray]]]:
    """The lane (one, for all files; none if empty) of the overlaps in ``blocks`` whose chunks are located
    (``located``: Locators by (tensor name, chunk id)) as plain little-endian C-contiguous storages in files and
    whose copy is a row of runs; and, per block, the rows left to copy jobs (a boolean mask), as (block, mask)
    pairs.

    Each row is exactly what :func:`jreshard.planning.runs_of` gives for the overlap: size-1 dims dropped, the
    innermost dim contiguous in both storage and buffer, the next folded into one run when it is contiguous
    in both too.

    ``tables`` (LaneTable by tensor name, file ids from ``file_ids``): a block whose chunks its tensor's table
    knows all is read from the table at once, instead of chunk by chunk from ``located``."""
    names: list[str] = []
    keys: dict[str, int] = {} if file_ids is None else file_ids
    # Per block, per row: its chunk's facts (from the table, or chunk by chunk from the locators) and the block's
    # constants; a 1-D block as rows of one row (size (1, n), starting at column n0). Then all rows at once.
    facts: list[Any] = []
    for blk in blocks:
        info = blk.info
        names.append(info.name)
        table = tables.get(info.name) if tables else None
        idx = blk.cid
        if table is None or (table.state[idx] < 0).any():  # chunk by chunk from the locators
            uniq, idx = np.unique(blk.cid, return_inverse=True)
            table = LaneTable(len(uniq))
            for i, c in enumerate(uniq.tolist()):
                loc = located.get((info.name, c))
                if loc is not None:
                    table.put(info, c, loc, keys, at=i)
        facts.append((table.state[idx] == 1, table.base[idx], table.soff[idx], table.fid[idx], table.cols[idx]))
    if not blocks:
        return [], []
    cat = np.concatenate
    counts = [len(blk) for blk in blocks]
    per_block = lambda values: np.repeat(np.array(values, np.int64), counts)  # noqa: E731
    one_d = [blk.size.shape[1] == 1 for blk in blocks]
    size = cat([np.column_stack((np.ones(len(b), np.int64), b.size[:, 0])) if d else b.size
                for b, d in zip(blocks, one_d)])
    cstart = cat([np.column_stack((np.zeros(len(b), np.int64), b.cstart[:, 0])) if d else b.cstart
                  for b, d in zip(blocks, one_d)])
    item = per_block([b.info.dtype.itemsize for b in blocks])
    e0 = per_block([0 if d else b.strides[0] for b, d in zip(blocks, one_d)])
    e1 = per_block([b.strides[-1] for b in blocks])
    ok, base, soff, kid, cols = (cat([f[k] for f in facts]) for k in range(5))
    cols = np.where(per_block(one_d).astype(bool), 1, cols)  # (a 1-D row: its single row, any width)
    s0, s1 = size[:, 0], size[:, 1]
    inner = s1 != 1
    # s1 != 1: the row is contiguous in storage; it must be in the buffer too (else element-wise).
    # s1 == 1: a column; only a single element, or a column contiguous in both, is a run.
    ok = ok & np.where(inner, e1 == 1, (s0 == 1) | ((cols == 1) & (e0 == 1)))
    fold = (s0 == 1) | ~inner | ((cols == s1) & (e0 == s1))
    n = np.where(fold, 1, s0)
    run = np.where(fold, s0 * s1, s1) * item
    s = np.where(fold, 0, cols * item)
    ds = np.where(fold, 0, e0 * item)
    x0 = base + (soff + cstart[:, 0] * cols + cstart[:, 1]) * item
    slot = cat([np.broadcast_to(np.asarray(b.slot, np.int64), (len(b),)) for b in blocks])
    dst = cat([b.dst0 for b in blocks]) * item
    rest: list[tuple[RegionBlock, np.ndarray]] = []
    if not ok.all():
        bounds = np.cumsum([0, *counts]).tolist()
        for blk, lo, hi in zip(blocks, bounds[:-1], bounds[1:]):
            if not ok[lo:hi].all():
                rest.append((blk, ~ok[lo:hi]))
    if not ok.any():
        return [], rest
    rows = Rows(x0[ok], n[ok], s[ok], run[ok], base[ok], dst[ok], ds[ok], slot[ok],
                per_block(list(range(len(blocks))))[ok], kid[ok])
    return [Lane(list(keys), names, rows)], rest

