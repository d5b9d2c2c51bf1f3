"""The layout picture (saved chunks over target shards) and the notebook reprs.

Pictures of checkpoints written by torch (``conftest.checkpoints``: DCP on 4 ranks), and, for the property that
every shard cell and every saved boundary is drawn, pictures of random chunk grids and shard grids. The PNG is
parsed back by hand (signature, chunk CRCs, IHDR, IDAT) and its pixels checked.
"""

from __future__ import annotations

import itertools
import re
import struct
import xml.etree.ElementTree as ET
import zlib

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard.errors import InvalidArgumentError, ShardingError, TargetMismatchError
from jreshard.picture import INK, LayoutPicture, layout_picture
from tests.helpers import make_mesh

VARIANT = "plain"


@pytest.fixture(scope="module")
def ckpt(checkpoints):
    with jreshard.open(checkpoints.dirs[VARIANT]) as c:
        yield c


def _spec(ckpt, name: str, mesh, spec) -> dict:
    t = ckpt.tensors[name]
    return {name: jax.ShapeDtypeStruct(t.shape, t.dtype, sharding=NamedSharding(mesh, spec))}


def drawing(text: str) -> list[str]:
    """The drawing of a picture's text: from the line with the top-left corner to the bottom-left one."""
    lines = text.splitlines()
    top = next(i for i, line in enumerate(lines) if line[:1] in "┏+")
    bottom = next(i for i in range(top + 1, len(lines)) if lines[i][:1] in "┗+")
    return lines[top : bottom + 1]


KIND = {"┃": "both", "│": "shard", "┆": "saved", "━": "both", "─": "shard", "┄": "saved"}


def crossings(line: str, chars: str) -> list[str]:
    """The kinds of the boundary lines a row (or column) of the drawing crosses, in order."""
    return [KIND[c] for c in line if c in chars]


def expected_kinds(saved_cuts, shard_cuts, size) -> list[str]:
    both = {0, size}
    cuts = sorted(set(saved_cuts) | set(shard_cuts) | both)
    return ["both" if c in both or (c in saved_cuts and c in shard_cuts) else "shard" if c in shard_cuts else "saved"
            for c in cuts]


# -- text -------------------------------------------------------------------------------------------------


def test_text_of_a_planned_tensor(ckpt):
    """d2.s0s1 (16, 24) was saved on a 2x2 mesh (chunks [0:8|8:16] x [0:12|12:24]); onto a 2x4 mesh each of the
    8 shards is drawn once, labelled with its device, and the saved cuts are drawn as saved or as both."""
    mesh = make_mesh("2x4")
    plan = ckpt.plan(_spec(ckpt, "d2.s0s1", mesh, P("data", "model")))
    pic = plan.picture("d2.s0s1")
    text = pic.text(width=72, height=20)
    labels = sorted(int(m) for m in re.findall(r"\bd(\d+)\b", "\n".join(drawing(text))))
    assert labels == list(range(8)), text
    lines = drawing(text)
    assert crossings(lines[1], "┃│┆") == ["both", "shard", "both", "shard", "both"], text  # cols 0 6 12 18 24
    assert crossings([row[1] for row in lines][1:-1], "━─┄") == ["both"], text  # row 8 (the frame is not crossed)
    assert "d2.s0s1  float32 (16, 24)" in text and "saved: 4 chunks (2x2 grid); target: 8 shards on 8 devices" in text
    assert plan.by_tensor()["d2.s0s1"].bytes_needed == 16 * 24 * 4 and "needed 1.50 KiB, read " in text
    # Each device appears once, and a shard's devices are those jax puts it on.
    sharding = NamedSharding(mesh, P("data", "model"))
    for shard in pic.shards:
        held = {d.id for d, idx in sharding.devices_indices_map((16, 24)).items()
                if tuple(s.indices(n)[:2] for s, n in zip(idx, (16, 24))) == shard.box}
        assert set(shard.devices) == held


def test_text_merges_boundaries_when_too_dense():
    """200 saved chunks across 40 columns: boundaries merge, and the caption says how many; labels are capped."""
    saved = [((0, 4), (10 * i, 10 * i + 10)) for i in range(200)]
    shards = [(((0, 4), (1000 * k, 1000 * k + 1000)), (k,), 0) for k in range(2)]
    pic = LayoutPicture("dense", (4, 2000), "float32", saved, shards)
    text = pic.text(width=40, height=10)
    assert "merged at this size" in text
    assert all(len(line) <= 40 for line in text.splitlines())
    assert len(drawing(text)[0]) == 40


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_every_cell_and_boundary_is_drawn(data):
    """Random chunk grids and shard grids over a random 2-D shape: each vertical and horizontal boundary of either
    is drawn once, as saved, shard or both, in order; every shard cell is labelled, or counted as too small."""
    rows = data.draw(st.integers(1, 64), "rows")
    cols = data.draw(st.integers(1, 400), "cols")

    def cuts(n: int, most: int, label: str) -> list[int]:
        return sorted(data.draw(st.sets(st.integers(1, max(1, n - 1)), max_size=most), label) - {n})

    saved_r, saved_c = cuts(rows, 6, "saved rows"), cuts(cols, 12, "saved cols")
    shard_r, shard_c = cuts(rows, 6, "shard rows"), cuts(cols, 12, "shard cols")

    def grid(rc, cc):
        r, c = [0, *rc, rows], [0, *cc, cols]
        return [((a, b), (x, y)) for a, b in itertools.pairwise(r) for x, y in itertools.pairwise(c)]

    shards = [(box, (k,), 0) for k, box in enumerate(grid(shard_r, shard_c))]
    pic = LayoutPicture("t", (rows, cols), "float32", grid(saved_r, saved_c), shards)
    text = pic.text(width=72, height=40)
    lines = drawing(text)
    assert crossings(lines[1], "┃│┆") == expected_kinds(saved_c, shard_c, cols), text
    assert crossings([row[1] for row in lines], "━─┄") == expected_kinds(saved_r, shard_r, rows), text
    assert "merged" not in text
    body = "\n".join(lines)
    labelled = set(re.findall(r"\bd(\d+)\b", body)) | set(re.findall(r"#(\d+)", body))
    small = re.search(r"(\d+) cells? too small", text)
    assert len(labelled) + (int(small.group(1)) if small else 0) == len(shards), text
    assert len(re.findall(r"\bd\d+\b|#\d+", body)) == len(labelled)  # each label once


def test_rank_3_draws_the_two_dims_with_most_cuts(ckpt):
    """d1.s1_3d (8, 10, 3) was saved split along dim 1 by 4; sharded on dim 0 by 2 the cuts are in dims 0 and 1,
    which are drawn; dim 2 (no cut) is projected."""
    mesh = make_mesh("2x4")
    plan = ckpt.plan(_spec(ckpt, "d1.s1_3d", mesh, P("data")))
    pic = plan.picture("d1.s1_3d")
    assert pic.dims == (0, 1)
    text = pic.text()
    assert "rows: dim 0 (8), columns: dim 1 (10) of 3 dims" in text and "along dim 2" in text
    # 3-D with cuts in dims 0 and 2: those are drawn
    boxes = [((0, 2), (0, 5), (0, 6)), ((2, 4), (0, 5), (0, 6))]
    pic = LayoutPicture("x", (4, 5, 6), "f4", [((0, 4), (0, 5), (0, 3)), ((0, 4), (0, 5), (3, 6))],
                        [(b, (k,), 0) for k, b in enumerate(boxes)])
    assert pic.dims == (0, 2)


def test_rank_0_and_1(ckpt):
    mesh = make_mesh("8")
    for name, dims, words in (("plain.scalar", (), "a scalar"), ("d1.vec", (0,), "a strip: dim 0 (40)")):
        pic = ckpt.plan(_spec(ckpt, name, mesh, P())).picture(name)
        assert pic.dims == dims
        text = pic.text()
        assert words in text and "d0-7" in text
        assert len(drawing(text)) == 3


def test_mapped_target_is_traced_onto_the_saved_tensor(ckpt):
    """A transposed target: its shards are drawn where they are read from, the transposed boxes of the saved
    tensor; a stacked target is drawn on the saved tensor asked for."""
    mesh = make_mesh("2x4")
    t = ckpt.tensors["d2.s0s1"]  # (16, 24)
    sharding = NamedSharding(mesh, P("data", "model"))
    target = {"w": jax.ShapeDtypeStruct((24, 16), t.dtype, sharding=sharding)}
    plan = ckpt.plan(target, mapping={"w": jreshard.saved("d2.s0s1").T})
    pic = plan.picture("w")
    assert pic.name == "d2.s0s1" and pic.shape == (16, 24)
    expected = sorted(tuple(reversed(tuple(s.indices(n)[:2] for s, n in zip(idx, (24, 16)))))
                      for idx in sharding.devices_indices_map((24, 16)).values())
    assert sorted(s.box for s in pic.shards) == expected
    assert "saved('d2.s0s1').T" in pic.text(width=100)

    a, b = ckpt.tensors["model.layers.0.w"], ckpt.tensors["d1.s0"]  # (16, 16), (16, 12)
    stacked = jreshard.concat([jreshard.saved(a.name), jreshard.saved(b.name)], axis=1)  # (16, 28)
    target = {"s": jax.ShapeDtypeStruct((16, 28), np.float32, sharding=NamedSharding(mesh, P("data")))}
    plan = ckpt.plan(target, mapping={"s": stacked})
    first, second = plan.picture("s"), plan.picture("s", saved=b.name)
    assert first.name == a.name and second.name == b.name
    assert sorted(s.box for s in second.shards) == [((0, 8), (0, 12)), ((8, 16), (0, 12))]
    assert "1 of the 2 saved tensors" in first.text(width=200)
    with pytest.raises(InvalidArgumentError, match="is read from 'model.layers.0.w', 'd1.s0'"):
        plan.picture("s", saved="plain.w")


def test_unknown_names(ckpt):
    mesh = make_mesh("8")
    plan = ckpt.plan(_spec(ckpt, "d1.s0", mesh, P("data")))
    with pytest.raises(TargetMismatchError, match=r"no target array named 'd1\.s1'.*did you mean 'd1\.s0'"):
        plan.picture("d1.s1")
    with pytest.raises(TargetMismatchError, match="did you mean"):
        layout_picture(ckpt, "d1.s00", NamedSharding(mesh, P("data")))


def test_layout_picture_of_any_sharding(ckpt):
    mesh = make_mesh("4x2")
    pic = layout_picture(ckpt, "d1.s0", jax.ShapeDtypeStruct((16, 12), np.float32,
                                                            sharding=NamedSharding(mesh, P("model", "data"))))
    assert len(pic.shards) == 8 and len(pic.saved) == 4 and pic.bytes_needed is None
    assert "needed" not in pic.text()
    with pytest.raises(ShardingError, match="d1.uneven_s0"):
        layout_picture(ckpt, "d1.uneven_s0", NamedSharding(mesh, P("data")))  # 10 rows over 4
    with pytest.raises(InvalidArgumentError, match="not a jax sharding"):
        layout_picture(ckpt, "d1.s0", P("data"))


def test_sizes_are_checked():
    pic = LayoutPicture("w", (4,), "f4", [((0, 4),)], [(((0, 4),), (0,), 0)])
    for bad in (0, -1, 8193, True, 2.5):
        with pytest.raises(InvalidArgumentError):
            pic.png(width=bad, height=10)
        with pytest.raises(InvalidArgumentError):
            pic.png(width=10, height=bad)
        with pytest.raises(InvalidArgumentError):
            pic.text(width=bad)
    assert len(pic.png(width=1, height=1)) > 0
    with pytest.raises(InvalidArgumentError, match="has 2 dims, the tensor 1"):
        LayoutPicture("w", (4,), "f4", [((0, 4), (0, 1))], [])


# -- SVG and PNG ---------------------------------------------------------------------------------------------


def read_png(data: bytes) -> np.ndarray:
    """Pixels of an 8-bit RGB PNG without interlace, filter type 0 (what the picture writes), every CRC checked."""
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pos, chunks = 8, []
    while pos < len(data):
        (n,) = struct.unpack(">I", data[pos : pos + 4])
        tag, body = data[pos + 4 : pos + 8], data[pos + 8 : pos + 8 + n]
        (crc,) = struct.unpack(">I", data[pos + 8 + n : pos + 12 + n])
        assert crc == zlib.crc32(tag + body) & 0xFFFFFFFF, tag
        chunks.append((tag, body))
        pos += 12 + n
    assert chunks[0][0] == b"IHDR" and chunks[-1] == (b"IEND", b"")
    w, h, depth, color, comp, filt, interlace = struct.unpack(">IIBBBBB", chunks[0][1])
    assert (depth, color, comp, filt, interlace) == (8, 2, 0, 0, 0)
    raw = np.frombuffer(zlib.decompress(b"".join(b for t, b in chunks if t == b"IDAT")), np.uint8)
    rows = raw.reshape(h, 1 + 3 * w)
    assert not rows[:, 0].any()  # filter type 0 on every row
    return rows[:, 1:].reshape(h, w, 3)


@pytest.mark.parametrize("size", [(800, 600), (333, 97)])
def test_png_pixels(ckpt, tmp_path, size):
    """mp.b (256, 1024), saved 2x2, onto 2x4: the PNG has exactly the asked size, and a pixel inside each shard
    (away from its edges and its label) has that shard's colour."""
    mesh = make_mesh("2x4")
    pic = ckpt.plan(_spec(ckpt, "mp.b", mesh, P("data", "model"))).picture("mp.b")
    width, height = size
    path = tmp_path / "mp.png"
    pic.save_png(path, width=width, height=height)
    img = read_png(path.read_bytes())
    assert img.shape == (height, width, 3)
    colors = pic.shard_colors()
    assert len(set(colors)) == 8
    for shard, color in zip(pic.shards, colors):
        (r0, r1), (c0, c1) = shard.box
        y = int((r0 + 0.2 * (r1 - r0)) / 256 * height)
        x = int((c0 + 0.2 * (c1 - c0)) / 1024 * width)
        assert tuple(img[y, x]) == color, (shard, (y, x))
    with pytest.raises(InvalidArgumentError, match="cannot write"):
        pic.save_png(tmp_path / "no" / "such" / "dir.png")


def test_png_colours_by_process():
    """With shards of several processes, the colour is the process's."""
    shards = [(((0, 2), (0, 4)), (0,), 0), (((2, 4), (0, 4)), (1,), 0), (((4, 8), (0, 4)), (2,), 1)]
    pic = LayoutPicture("w", (8, 4), "f4", [((0, 8), (0, 4))], shards)
    colors = pic.shard_colors()
    assert colors[0] == colors[1] != colors[2]
    img = read_png(pic.png(width=100, height=200))
    assert tuple(img[30, 20]) == colors[0] and tuple(img[150, 20]) == colors[2]
    assert "p0:d0" in pic.text() and "p1:d2" in pic.text()


def test_png_draws_saved_edges_dashed():
    """A saved boundary inside one shard is a dark dashed column of the PNG; without it there is none."""
    ink = np.array(INK, np.uint8)

    def dark_columns(saved):
        img = read_png(LayoutPicture("w", (8, 8), "f4", saved, [(((0, 8), (0, 8)), (0,), 0)]).png(100, 100))
        dark = (img[10:90] == ink).all(axis=2).mean(axis=0)  # per column, the share of dark pixels
        return [x for x in range(10, 90) if dark[x] > 0.4]

    cols = dark_columns([((0, 8), (0, 4)), ((0, 8), (4, 8))])
    assert cols and all(40 <= x <= 60 for x in cols) and len(cols) <= 2, cols
    img = read_png(LayoutPicture("w", (8, 8), "f4", [((0, 8), (0, 4)), ((0, 8), (4, 8))],
                                 [(((0, 8), (0, 8)), (0,), 0)]).png(100, 100))
    assert not (img[10:90, cols[0]] == ink).all(axis=1).all()  # dashed: gaps along it
    assert dark_columns([((0, 8), (0, 8))]) == []


def test_svg(ckpt):
    """Well-formed SVG: one filled rectangle per shard, labelled; the saved chunks' edges as one dashed line per
    saved boundary (2x2 chunks: 3 across, 3 down)."""
    mesh = make_mesh("2x4")
    pic = ckpt.plan(_spec(ckpt, "d2.s0s1", mesh, P("data", "model"))).picture("d2.s0s1")
    root = ET.fromstring(pic.svg(width=480))
    rects = root.findall("{http://www.w3.org/2000/svg}rect")
    filled = [r for r in rects if r.get("fill") != "none"]
    assert len(filled) == 8
    (dashed,) = [p for p in root.findall("{http://www.w3.org/2000/svg}path") if p.get("stroke-dasharray")]
    moves = re.findall(r"M(\d+) (\d+)([HV])(\d+)", dashed.get("d"))
    assert sorted(kind for _, _, kind, _ in moves) == ["H"] * 3 + ["V"] * 3
    assert len({(int(y), kind) for _, y, kind, _ in moves if kind == "H"}) == 3
    labels = [t.text for t in root.findall("{http://www.w3.org/2000/svg}text") if re.fullmatch(r"d\d+", t.text or "")]
    assert sorted(labels) == sorted(f"d{k}" for k in range(8))
    assert pic._repr_html_() == pic.svg()


# -- notebook reprs ------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A torch.save file whose tensor and object names are HTML."""
    import torch

    path = tmp_path_factory.mktemp("html") / "names.pt"
    torch.save({"<script>alert(1)</script>": torch.arange(8, dtype=torch.float32).reshape(2, 4),
                "<b>step</b>": 5, "plain": torch.ones(3)}, path)
    return path


def test_html_escapes_every_name(hostile):
    with jreshard.open(hostile) as ckpt:
        name = "<script>alert(1)</script>"
        assert name in ckpt.tensors
        html = ckpt._repr_html_()
        assert "&lt;script&gt;alert(1)&lt;/script&gt;" in html and "&lt;b&gt;step&lt;/b&gt;" in html
        assert "<script" not in html and "<b>step" not in html
        mesh = make_mesh("8")
        plan = ckpt.plan({name: jax.ShapeDtypeStruct((2, 4), np.float32, sharding=NamedSharding(mesh, P()))})
        html = plan._repr_html_()
        assert "&lt;script&gt;" in html and "<script" not in html and "<svg" in html
        svg = plan.picture(name).svg()
        assert "&lt;script&gt;" in svg and "<script" not in svg
        ET.fromstring(svg)


def test_checkpoint_html(ckpt):
    """One row per tensor up to 50, then a row counting the rest; the saved grid; the objects below."""
    html = ckpt._repr_html_()
    rows = re.findall(r"<tr><td>([^<]*)</td>", html)
    n = len(ckpt.tensors)
    assert n > 50
    assert rows[:50] == list(ckpt.tensors)[:50]
    assert f"\u2026 {n - 50} more" in html
    assert "<td>d2.s0s1</td><td>float32</td><td>(16, 24)</td><td>1.50 KiB</td><td>4</td><td>2\u00d72</td>" in html
    assert "<td>sched.lr</td><td><code>0.1</code></td>" in html


def test_plan_html_tables_and_picture(ckpt):
    """The per-target table of this process adds up to the plan, and the picture is of the target that reads
    the most beyond what it needs."""
    mesh = make_mesh("2x4")
    target = {**_spec(ckpt, "mp.b", mesh, P("data", "model")), **_spec(ckpt, "d2.uneven_s0s1", mesh, P()),
              **_spec(ckpt, "mp.d", mesh, P("model", "data"))}
    plan = ckpt.plan(target)
    per = plan.by_tensor()
    assert sum(t.bytes_to_read for t in per.values()) == plan.bytes_to_read
    assert sum(t.bytes_needed for t in per.values()) == plan.bytes_needed
    assert all(0 < t.num_reads <= plan.num_reads for t in per.values())
    worst = max(per, key=lambda n: per[n].bytes_to_read - per[n].bytes_needed)
    html = plan._repr_html_()
    assert f"<p>{worst}: the target that reads the most" in html and html.count("<svg") == 1
    for name, t in per.items():
        assert f"<td>{name}</td>" in html and f"<td>{t.num_reads}</td>" in html
    assert repr(plan).startswith("<jreshard.Plan for ")


def test_by_tensor_matches_the_reads_of_a_load(ckpt):
    """What by_tensor says a target reads is what the storage sees when it is loaded; several targets' shares
    add up to the plan's reads."""
    mesh = make_mesh("2x4")
    target = {**_spec(ckpt, "mp.a", mesh, P(None, "model")), **_spec(ckpt, "d1.s1", mesh, P("data", "model"))}
    both = ckpt.plan(target, max_inflight_bytes=64 * 2**10)
    assert sum(t.bytes_to_read for t in both.by_tensor().values()) == both.bytes_to_read
    for name, spec in target.items():
        one = ckpt.plan({name: spec}, max_inflight_bytes=64 * 2**10)  # also locates (header reads) before counting
        tp = one.by_tensor()[name]
        assert (tp.bytes_to_read, tp.num_reads) == (one.bytes_to_read, one.num_reads)
        before = (ckpt.io_stats.bytes_read, ckpt.io_stats.num_reads)
        ckpt.load({name: spec}, max_inflight_bytes=64 * 2**10)
        got = (ckpt.io_stats.bytes_read - before[0], ckpt.io_stats.num_reads - before[1])
        assert got == (tp.bytes_to_read, tp.num_reads), name
