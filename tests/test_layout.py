"""jreshard.layout against torch: the box every rank holds, and the NamedSharding that holds the same boxes.

The reference is torch itself: ``compute_local_shape_and_global_offset`` for the (offset, size) torch reports,
and torch's own splitting (``Shard._split_tensor`` / ``_StridedShard._split_tensor``, what
``distribute_tensor`` does on each mesh dim) of an ``arange`` tensor for the exact elements each rank holds.
Meshes larger than this process's 8 CPU devices are checked in a helper process with 64 CPU devices.
"""

from __future__ import annotations

import itertools
import json
import math
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from jreshard import layout as L
from jreshard.errors import InvalidArgumentError, ShardingError
from tests.helpers import REPO_ROOT, child_env

SETTINGS = settings(max_examples=150, deadline=None, database=None,
                    suppress_health_check=[HealthCheck.too_slow])

# ---------------------------------------------------------------------------------------------
# torch's view of a layout
# ---------------------------------------------------------------------------------------------


def _torch_placements(spec):
    """Live torch placements from (kind, dim, split_factor) triples."""
    from torch.distributed.tensor.placement_types import Replicate, Shard, _StridedShard

    out = []
    for kind, dim, sf in spec:
        out.append(Replicate() if kind == "R" else Shard(dim) if kind == "S" else _StridedShard(dim, split_factor=sf))
    return out


def _ours(spec):
    return [L.Replicate() if k == "R" else L.Shard(d) if k == "S" else L.StridedShard(d, sf) for k, d, sf in spec]


class _FakeMesh:
    """What compute_local_shape_and_global_offset asks of a DeviceMesh, for one rank's coordinate."""

    def __init__(self, shape, coordinate):
        self.shape = tuple(shape)
        self._coordinate = tuple(coordinate)

    def _is_current_rank_part_of_mesh(self):
        return True

    def _sym_get_coordinate(self, dim):
        return self._coordinate[dim]


def torch_offset_size(shape, mesh_shape, tplacements, coord):
    from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

    sizes, offsets = compute_local_shape_and_global_offset(shape, _FakeMesh(mesh_shape, coord), tplacements)
    return tuple(offsets), tuple(sizes)


def torch_local(global_tensor, mesh_shape, tplacements, coord) -> np.ndarray:
    """The local tensor of the rank at ``coord``: torch's split of each mesh dim, left to right."""
    from torch.distributed.tensor.placement_types import Shard, _StridedShard

    t = global_tensor
    for m, p in enumerate(tplacements):
        if isinstance(p, (Shard, _StridedShard)):
            shards, _ = p._split_tensor(t, mesh_shape[m], with_padding=False, contiguous=True)
            t = shards[coord[m]]
    return t.numpy()


def _global(shape):
    import torch

    return torch.arange(math.prod(shape), dtype=torch.int64).reshape(shape)


# ---------------------------------------------------------------------------------------------
# JAX device boxes, in this process (<= 8 devices) or in a 64-device helper process
# ---------------------------------------------------------------------------------------------


def _spec_of(entries):
    from jax.sharding import PartitionSpec

    return PartitionSpec(*[None if e is None else (e if isinstance(e, str) else tuple(e)) for e in entries])


def jax_boxes_here(shape, mesh_shape, names, specs):
    """For each spec: {coordinate: ((start, stop), ...)} of ``TorchLayout(...).sharding()``, or None when JAX
    refuses the spec for this shape."""
    out = []
    for entries in specs:
        lay = L.TorchLayout(tuple(mesh_shape), tuple(names), _spec_of(entries))
        sharding = lay.sharding()
        try:
            sharding.shard_shape(tuple(shape))
            imap = sharding.devices_indices_map(tuple(shape))
        except ValueError:
            out.append(None)
            continue
        mesh = sharding.mesh
        boxes = {}
        for c in np.ndindex(*mesh_shape):
            idx = imap[mesh.devices[c]]
            boxes[c] = tuple(tuple(s.indices(n)[:2]) for s, n in zip(idx, shape))
        out.append(boxes)
    return out


def _serve() -> None:  # the helper process: one JSON request per line
    for line in sys.stdin:
        req = json.loads(line)
        res = jax_boxes_here(req["shape"], req["mesh_shape"], req["names"], req["specs"])
        print(json.dumps([None if b is None else [[list(c), [list(x) for x in v]] for c, v in b.items()]
                          for b in res]), flush=True)


class _Helper:
    def __init__(self):
        self.proc = None

    def boxes(self, shape, mesh_shape, names, specs):
        import jax

        if math.prod(mesh_shape) <= len(jax.devices()):
            return jax_boxes_here(shape, mesh_shape, names, specs)
        if self.proc is None:
            env = child_env(XLA_FLAGS="--xla_force_host_platform_device_count=64", JAX_PLATFORMS="cpu")
            self.proc = subprocess.Popen([sys.executable, "-c", "from tests.test_layout import _serve; _serve()"],
                                         cwd=str(REPO_ROOT), env=env, stdin=subprocess.PIPE,
                                         stdout=subprocess.PIPE, text=True)
        jspecs = [[e if e is None or isinstance(e, str) else list(e) for e in s] for s in specs]
        self.proc.stdin.write(json.dumps({"shape": list(shape), "mesh_shape": list(mesh_shape),
                                          "names": list(names), "specs": jspecs}) + "\n")
        self.proc.stdin.flush()
        line = self.proc.stdout.readline()
        assert line, "the 64-device helper process died"
        return [None if b is None else {tuple(c): tuple(tuple(x) for x in v) for c, v in b}
                for b in json.loads(line)]

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture(scope="module")
def helper():
    h = _Helper()
    yield h
    h.close()


# ---------------------------------------------------------------------------------------------
# strategies
# ---------------------------------------------------------------------------------------------


@st.composite
def layouts(draw, even: bool = False):
    """(shape, mesh_shape, placement triples); ``even`` makes every sharded dim a multiple of the product of
    the mesh sizes (and split factors) splitting it, so that the NamedSharding side is exercised often."""
    mesh_shape = tuple(draw(st.lists(st.integers(1, 4), min_size=1, max_size=3)))
    ndim = draw(st.integers(1, 3))
    spec = []
    for m in range(len(mesh_shape)):
        kind = draw(st.sampled_from("RSSTT"))  # T: _StridedShard
        dim = draw(st.integers(0, ndim - 1))
        later = math.prod(mesh_shape[m + 1:])
        sf = draw(st.sampled_from(sorted({1, 2, 3, 4, later, *mesh_shape[m + 1:]})))
        spec.append(("R", 0, 1) if kind == "R" else ("S", dim, 1) if kind == "S" else ("T", dim, sf))
    if even:
        shape = []
        for d in range(ndim):
            f = math.prod(mesh_shape[m] * spec[m][2] for m in range(len(spec)) if spec[m][0] != "R"
                          and spec[m][1] == d)
            shape.append(f * draw(st.integers(0 if f == 1 else 1, 2)))
    else:
        shape = [draw(st.integers(0, 13)) for _ in range(ndim)]
    return tuple(shape), mesh_shape, spec


def all_specs(names, sizes, ndim):
    """Every PartitionSpec over the axes of size > 1 (axes of size 1 change no box), as entry lists."""
    axes = [a for a, n in zip(names, sizes) if n > 1]
    for assign in itertools.product(range(-1, ndim), repeat=len(axes)):
        groups = [[a for a, d in zip(axes, assign) if d == k] for k in range(ndim)]
        for orders in itertools.product(*(itertools.permutations(g) for g in groups)):
            yield [None if not o else list(o) for o in orders]


# ---------------------------------------------------------------------------------------------
# the property
# ---------------------------------------------------------------------------------------------


def torch_held(shape, mesh_shape, tplacements, coord):
    """Per dim, the global indices the rank at ``coord`` holds: torch's split of ``arange(size)`` with the
    placements of that dim only (the full-tensor check in check_layout confirms the dims are independent)."""
    from torch.distributed.tensor.placement_types import Replicate

    out = []
    for d, n in enumerate(shape):
        only_d = [p if getattr(p, "dim", None) == d else Replicate() for p in tplacements]
        sub = [1] * len(shape)
        sub[d] = n
        out.append(torch_local(_global((n,)).reshape(sub), mesh_shape, only_d, coord).ravel())
    return out


def check_layout(shape, mesh_shape, spec, helper) -> str:
    names = tuple(f"m{i}" for i in range(len(mesh_shape)))
    tpl = _torch_placements(spec)
    ours = _ours(spec)
    g = _global(shape)
    G = g.numpy()
    coords = list(np.ndindex(*mesh_shape))
    held = {}
    for c in coords:
        want = torch_offset_size(shape, mesh_shape, tpl, c)
        assert L.local_chunk(shape, mesh_shape, ours, c) == want, (c, want)
        assert L.local_chunk(shape, mesh_shape, tpl, c) == want, (c, "live torch placements")
        held[c] = h = torch_held(shape, mesh_shape, tpl, c)
        loc = torch_local(g, mesh_shape, tpl, c)
        assert np.array_equal(G[np.ix_(*h)], loc), c  # the rank's elements are the product of its per-dim indices
        idx = L.local_indices(shape, mesh_shape, ours, c)
        got = [np.concatenate([np.arange(r.start, r.stop) for r in rs] + [np.zeros(0, np.int64)]) for rs in idx]
        assert all(np.array_equal(a, b) for a, b in zip(got, h)), (c, idx, h)
        assert L.local_is_box(shape, mesh_shape, ours, c) == all(len(rs) <= 1 for rs in idx)

    def same(boxes) -> bool:  # every device holds exactly torch's indices, dim by dim
        return all(np.array_equal(np.arange(*boxes[c][d]), held[c][d]) for c in coords for d in range(len(shape)))

    try:
        lay = L.torch_layout(shape, tpl, mesh_shape, names)
    except ShardingError as e:
        why = str(e)
        assert f"shape {tuple(shape)}" in why and "dim" in why, why
        # independently: a NamedSharding gives every device, per dim, one range, of one size for all devices ...
        reasons = set()
        for d, n in enumerate(shape):
            hs = [held[c][d] for c in coords]
            if any(len(h) and h[-1] - h[0] + 1 != len(h) for h in hs):
                reasons.add(f"dim {d} of size {n}: the rank at mesh coordinate")
            if n > 0 and len({len(h) for h in hs}) > 1:
                reasons.add(f"dim {d} of size {n} split")
        if reasons:
            assert any(r in why for r in reasons), (reasons, why)
            return "refused: " + ("uneven" if "needs equal sizes" in why else "not a box")
        # ... else no PartitionSpec at all gives these boxes
        specs = list(all_specs(names, mesh_shape, len(shape)))
        for entries, boxes in zip(specs, helper.boxes(shape, mesh_shape, names, specs)):
            assert boxes is None or not same(boxes), (entries, why)
        return "refused: order"
    assert lay.mesh_shape == tuple(mesh_shape) and lay.axis_names == names
    entries = [e if e is None or isinstance(e, str) else list(e) for e in lay.spec]
    assert len(entries) == len(shape)
    (boxes,) = helper.boxes(shape, mesh_shape, names, [entries])
    assert boxes is not None, (lay.spec, "JAX refuses the spec")
    assert same(boxes), lay.spec
    for c in coords:
        offsets, sizes = torch_offset_size(shape, mesh_shape, tpl, c)
        assert boxes[c] == tuple((o, o + s) for o, s in zip(offsets, sizes)), (c, boxes[c], offsets, sizes)
    return "layout"


OUTCOMES: dict = {}


@SETTINGS
@given(layouts())
def test_layouts_match_torch(helper, case):
    shape, mesh_shape, spec = case
    out = check_layout(shape, mesh_shape, spec, helper)
    OUTCOMES[out] = OUTCOMES.get(out, 0) + 1


@settings(SETTINGS, max_examples=100)
@given(layouts(even=True))
def test_even_layouts_match_torch(helper, case):
    shape, mesh_shape, spec = case
    out = check_layout(shape, mesh_shape, spec, helper)
    OUTCOMES[out] = OUTCOMES.get(out, 0) + 1


# ---------------------------------------------------------------------------------------------
# known layouts
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape, mesh_shape, spec, expected", [
    # FSDP2 over TP: the TP mesh dim is the major factor
    ((8, 4), (2, 2), [("T", 0, 2), ("S", 0, 1)], ("m1", "m0")),
    ((16,), (2, 4), [("T", 0, 4), ("S", 0, 1)], ("m1", "m0")),
    # HSDP + TP
    ((8, 6), (2, 2, 2), [("R", 0, 1), ("T", 0, 2), ("S", 0, 1)], ("m2", "m1")),
    # nested Shard on one dim: mesh order
    ((8, 6), (2, 2), [("S", 0, 1), ("S", 0, 1)], ("m0", "m1")),
    ((8, 6), (2, 2), [("S", 1, 1), ("S", 0, 1)], "m1"),
])
def test_known_layouts(helper, shape, mesh_shape, spec, expected):
    lay = L.torch_layout(shape, _torch_placements(spec), mesh_shape, tuple(f"m{i}" for i in range(len(mesh_shape))))
    d = spec[-1][1]
    assert lay.spec[d] == expected
    assert check_layout(shape, mesh_shape, spec, helper) == "layout"


@pytest.mark.parametrize("shape, mesh_shape, spec, words, outcome", [
    ((10,), (4,), [("S", 0, 1)], "dim 0 of size 10 split 4 ways by torch.chunk gives sizes (3, 3, 3, 1)", "uneven"),
    ((5, 2), (2, 2), [("S", 0, 1), ("S", 0, 1)], "gives sizes (2, 1, 1, 1)", "uneven"),
    ((8,), (2,), [("T", 0, 2)], "holds indices [0:2, 4:6]", "not a box"),
    # FSDP2 over a TP degree different from the strided split: block order no PartitionSpec expresses
    ((16,), (2, 4), [("T", 0, 2), ("S", 0, 1)], "not a mixed-radix number", "order"),
])
def test_refusals_explain(helper, shape, mesh_shape, spec, words, outcome):
    with pytest.raises(ShardingError) as e:
        L.torch_layout(shape, _torch_placements(spec), mesh_shape)
    assert words in str(e.value), str(e.value)
    assert check_layout(shape, mesh_shape, spec, helper) == f"refused: {outcome}"


def test_live_torch_objects():
    from torch.distributed.tensor.placement_types import Partial, Replicate, Shard, _StridedShard

    assert L.to_placement(Shard(1)) == L.Shard(1)
    assert L.to_placement(Replicate()) == L.Replicate()
    assert L.to_placement(_StridedShard(0, split_factor=3)) == L.StridedShard(0, 3)
    placements = [_StridedShard(0, split_factor=2), Shard(0)]
    assert L.local_chunk((8, 2), (2, 2), placements, (0, 1)) == ((4, 0), (2, 2))

    class DeviceMeshLike:  # torch's DeviceMesh: .mesh is a tensor of ranks, .mesh_dim_names
        def __init__(self):
            import torch

            self.mesh = torch.arange(4).reshape(2, 2)
            self.mesh_dim_names = ("dp", "tp")

    lay = L.torch_layout((8, 2), placements, device_mesh=DeviceMeshLike())
    assert (lay.mesh_shape, lay.axis_names, tuple(lay.spec)) == ((2, 2), ("dp", "tp"), (("tp", "dp"), None))
    unnamed = L.torch_layout((8, 2), [Shard(1), Replicate()], (2, 2))
    assert unnamed.axis_names == ("dp0", "dp1") and tuple(unnamed.spec) == (None, "dp0")
    for bad in (Partial(), Partial("max")):
        with pytest.raises(ShardingError, match="Partial"):
            L.torch_layout((8, 2), [bad, Shard(0)], (2, 2))
        with pytest.raises(ShardingError, match="Partial"):
            L.local_chunk((8, 2), (2, 2), [Shard(0), bad], (0, 0))


def test_mesh_and_sharding_devices_in_rank_order():
    import jax
    from jax.sharding import NamedSharding

    lay = L.torch_layout((16, 4), [L.StridedShard(0, 4), L.Shard(0)], (2, 4), ("dp", "tp"))
    mesh = lay.mesh()
    assert mesh.axis_names == ("dp", "tp") and mesh.devices.shape == (2, 4)
    assert list(mesh.devices.ravel()) == jax.devices()[:8]
    devs = jax.devices()[::-1]
    assert list(lay.mesh(devs).devices.ravel()) == devs
    assert lay.sharding(np.array(devs).reshape(4, 2)) == NamedSharding(lay.mesh(devs), lay.spec)
    with pytest.raises(InvalidArgumentError, match="needs 8 devices"):
        lay.mesh(jax.devices()[:4])
    big = L.torch_layout((8,), [L.Replicate()], (len(jax.devices()) + 1,))
    with pytest.raises(InvalidArgumentError, match="devices"):
        big.mesh()


def test_bad_arguments():
    with pytest.raises(InvalidArgumentError, match="one placement per mesh dimension"):
        L.torch_layout((8,), [L.Shard(0)], (2, 2))
    with pytest.raises(InvalidArgumentError, match="dim 2"):
        L.local_chunk((8, 2), (2,), [L.Shard(2)], (0,))
    with pytest.raises(InvalidArgumentError, match="coordinate"):
        L.local_chunk((8,), (2,), [L.Shard(0)], (2,))
    with pytest.raises(InvalidArgumentError, match="split_factor"):
        L.local_chunk((8,), (2,), [L.StridedShard(0, 0)], (0,))
    with pytest.raises(InvalidArgumentError, match="distinct"):
        L.torch_layout((8,), [L.Shard(0), L.Replicate()], (2, 2), ("a", "a"))
    with pytest.raises(InvalidArgumentError, match="not a placement"):
        L.to_placement("Shard(0)")
    # negative dims are tensor dims counted from the end
    assert L.local_chunk((4, 6), (2,), [L.Shard(-1)], (1,)) == ((0, 3), (4, 3))


def test_outcomes_were_varied():
    """The random layouts reached every outcome (a guard against a strategy that only tests one path)."""
    if not OUTCOMES:
        pytest.skip("run with the property tests")
    assert {"layout", "refused: uneven", "refused: not a box"} <= set(OUTCOMES), OUTCOMES
