"""Saved chunk layouts as ``jax.sharding``: the grid a tensor's chunks form, and the PartitionSpec that lays a
tensor out on a mesh exactly as it was saved (where one exists: torch's uneven ``torch.chunk`` splits have
no NamedSharding equivalent, since JAX needs every sharded dimension to divide evenly).
"""

from __future__ import annotations

import math
from typing import Any

from .catalog import TensorInfo


def saved_grid(info: TensorInfo) -> tuple[tuple[int, ...], ...] | None:
    """Per dimension, the cut points ``(0, c1, ..., size)`` of the grid the saved chunks form, or None when the
    chunks are not a Cartesian grid.

    Example:
        >>> import numpy as np
        >>> from jreshard.catalog import Chunk, TensorInfo
        >>> t = TensorInfo("w", (4, 6), np.dtype("f4"), (Chunk((0, 0), (2, 6)), Chunk((2, 0), (2, 6))))
        >>> saved_grid(t)
        ((0, 2, 4), (0, 6))
    """
    cuts = []
    for d, size in enumerate(info.shape):
        cuts.append(tuple(sorted({c.offsets[d] for c in info.chunks} | {0, size})))
    cells = math.prod(len(c) - 1 for c in cuts)
    if cells != len(info.chunks):
        return None
    for c in info.chunks:
        for d, cut in enumerate(cuts):
            i = cut.index(c.offsets[d]) if c.offsets[d] in cut else -1
            if i < 0 or i + 1 >= len(cut) or cut[i + 1] != c.offsets[d] + c.sizes[d]:
                return None
    return tuple(cuts)


def saved_partition_spec(info: TensorInfo, mesh: Any) -> Any | None:
    """A ``PartitionSpec`` over ``mesh`` whose shards are exactly the saved chunks (up to which device holds
    which), or None when there is none: chunks not on a grid, uneven splits, or split counts that no unused
    mesh axis (or run of consecutive axes) matches.

    Example:
        >>> import jax, numpy as np, jreshard
        >>> from jax.sharding import Mesh
        >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
        >>> ckpt = jreshard.open(jreshard.sample_path())
        >>> saved_partition_spec(ckpt.tensors["model.layers.1.b1"], Mesh(np.array(jax.devices()[:1]), ("x",)))  # 4 chunks, 1 device
        >>> saved_partition_spec(ckpt.tensors["model.layers.0.b1"], mesh)  # one chunk: replicated
        P(None,)
    """
    from jax.sharding import PartitionSpec

    grid = saved_grid(info)
    if grid is None:
        return None
    axes = list(mesh.axis_names)
    sizes = dict(mesh.shape)
    used: set[str] = set()
    spec: list[Any] = []
    for cut, size in zip(grid, info.shape):
        parts = len(cut) - 1
        if parts <= 1 or size == 0:
            spec.append(None)
            continue
        if size % parts or any(b - a != size // parts for a, b in zip(cut, cut[1:])):
            return None  # uneven split: no NamedSharding has these shards
        choice = _axes_for(parts, axes, sizes, used)
        if choice is None:
            return None
        used.update(choice)
        spec.append(choice[0] if len(choice) == 1 else tuple(choice))
    return PartitionSpec(*spec)


def _axes_for(parts: int, axes: list[str], sizes: dict[str, int], used: set[str]) -> list[str] | None:
    free = [a for a in axes if a not in used]
    for a in free:
        if sizes[a] == parts:
            return [a]
    for i in range(len(axes)):
        run: list[str] = []
        prod = 1
        for a in axes[i:]:
            if a in used or prod * sizes[a] > parts:
                break
            run.append(a)
            prod *= sizes[a]
            if prod == parts and len(run) > 1:
                return run
    return None


def matches_saved(info: TensorInfo, sharding: Any) -> bool:
    """Whether the shards of ``sharding`` are exactly the saved chunks: every device then reads one whole
    chunk, contiguous in storage.

    Example:
        >>> import jax, jreshard
        >>> from jax.sharding import SingleDeviceSharding
        >>> ckpt = jreshard.open(jreshard.sample_path())
        >>> matches_saved(ckpt.tensors["model.layers.0.b1"], SingleDeviceSharding(jax.devices()[0]))
        True
    """
    from .planning import normalize_index

    boxes = {normalize_index(idx, info.shape) for idx in sharding.devices_indices_map(info.shape).values()}
    chunks = {tuple((o, o + s) for o, s in zip(c.offsets, c.sizes)) for c in info.chunks}
    if not info.chunks:  # an empty tensor
        return True
    return boxes == chunks
