"""Locating many torch.save archives: the fast path of ``open_archives`` (two windows per archive read in one
batch, and layout templates shared by archives of one shape and dtype) held to the general path
(``open_archives_general``, called directly as the oracle) on archives torch itself writes.

* the same Archives and Locators as the general path, for DCP checkpoints torch writes with 4 ranks and for
  many archives ``torch.save`` writes into one file at offsets (as DCP does), read whole (small or compressed)
  and located through windows;
* two read requests per archive located through windows (one when it is read whole), the general path never
  consulted for them, and one full parse per layout: archives of one shape and dtype whose CRC-32 fields
  (and payloads, and ``.data/serialization_id``) differ get the first one's parse;
* one byte of one archive among many of its layout changed, at every position of its windows and (hypothesis)
  to any value, in any of them: the fast path gives exactly what the general path gives, Archives or error.
"""

from __future__ import annotations

import io
import struct
import zipfile

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import jreshard
from jreshard.errors import JReshardError
from jreshard.formats import torchsave
from jreshard.formats.torchsave import (
    HEAD,
    SMALL_BLOB,
    TAIL,
    WINDOW_TAIL,
    Blob,
    flatten_state,
    open_archives,
    open_archives_general,
)
from jreshard.storage import Store, _check_length
from jreshard.unpickle import TensorRef

DEFAULT = {"small": SMALL_BLOB, "tail": TAIL}  # DCPSource.locate_many, torchfile
PRECISE = {"small": 0, "tail": 1024}  # DCPSource.locate_many(precise=True): every archive through windows
MODES = {"default": DEFAULT, "precise": PRECISE}


class BytesStore(Store):
    """Files held in memory; counts read requests in ``stats`` as the real stores do."""

    description = "mem://"

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__()
        self.files = files

    def read_ranges(self, requests):
        out = []
        for key, start, stop in requests:
            data = self.files[key][start:stop]
            _check_length(self, key, start, stop, len(data))
            out.append(data)
        self.stats.add(sum(stop - start for _, start, stop in requests), len(requests))
        return out

    def read_all(self, key):
        return self.read(key, 0, len(self.files[key]))

    def exists(self, key):
        return key in self.files


# ---------------------------------------------------------------------------------------------- archives

# (shape, dtype, how many): chunks as DCP saves them. Sizes put them on every path: read whole by default (at most
# SMALL_BLOB) or located through two windows; in precise mode, one window (at most HEAD + WINDOW_TAIL) or two.
GROUPS = (
    ((160, 128), "float32", 5),  # 80 KiB: two windows in both modes
    ((320, 128), "bfloat16", 4),  # 80 KiB
    ((64, 64), "float32", 4),  # 16 KiB: whole by default, two windows when precise
    ((6, 4), "float32", 5),  # ~1.6 KiB: whole by default, one window when precise
    ((0, 16), "float32", 2),  # an empty chunk
    ((33,), "int64", 3),
)


def _save(tensor) -> bytes:
    import torch

    buf = io.BytesIO()
    torch.save(tensor, buf)
    return buf.getvalue()


def _archives() -> list[list[bytes]]:
    """Archives written by torch.save, per group, values random (CRCs differ)."""
    import torch

    gen = torch.Generator().manual_seed(7)
    groups = []
    for shape, dtype, n in GROUPS:
        groups.append([_save((torch.rand(shape, generator=gen) * 1000).to(getattr(torch, dtype))) for _ in range(n)])
    groups.append([_save(torch.arange(100.0)[10:30])])  # a view: a storage larger than the tensor, offset 10
    return groups


@pytest.fixture(scope="module")
def groups() -> list[list[bytes]]:
    return _archives()


def _interleaved(groups: list[list[bytes]]) -> list[bytes]:
    """All archives, groups interleaved as a rank's items are."""
    out = []
    for k in range(max(len(g) for g in groups)):
        out += [g[k] for g in groups if k < len(g)]
    return out


def _file(archives: list[bytes], key: str = "__0_0.distcp") -> tuple[BytesStore, list[Blob], list[str]]:
    """The archives one after the other in one file, with a few bytes between them (as a rank's .distcp holds
    its items), and their blobs."""
    data, blobs = bytearray(), []
    for raw in archives:
        data += b"\x00" * 3
        blobs.append(Blob(key, len(data), len(raw)))
        data += raw
    return BytesStore({key: bytes(data)}), blobs, [f"{key} (item {i})" for i in range(len(blobs))]


def _located(archives) -> list[tuple]:
    """Everything an Archive tells: its layout, its decoded data.pkl, and the Locator of each of its tensors
    (with the bytes of those held in memory)."""
    out = []
    for a in archives:
        entries = sorted((e.name, e.raw_name, e.header_offset, e.size, e.method, e.data_offset)
                         for e in a.entries.values())
        locs = []
        for name, leaf in flatten_state(a.obj):
            if isinstance(leaf, TensorRef):
                loc = a.locator(leaf, name)
                locs.append((loc, None if loc.data is None else bytes(loc.data)))
        out.append((a.blob, a.where, a.prefix, a.byteorder, a.cd_off, a.data, entries, repr(a.obj), locs))
    return out


def _outcome(fn, store, blobs, wheres, mode) -> tuple:
    try:
        return ("located", _located(fn(store, blobs, wheres, **mode)))
    except JReshardError as e:
        return ("refused", type(e), str(e))


def _expected_reads(blobs, mode) -> int:
    win_tail = min(WINDOW_TAIL, mode["tail"])
    return sum(1 if b.transforms or b.length <= mode["small"] or b.length <= HEAD + win_tail else 2 for b in blobs)


@pytest.fixture
def counted(monkeypatch):
    """Counters of the general path's archives and of the fast path's full parses."""
    counts = {"general": 0, "parses": 0}
    general, parse = torchsave.open_archives_general, torchsave._parse_windows

    def general_counted(store, blobs, *args, **kwargs):
        counts["general"] += len(blobs)
        return general(store, blobs, *args, **kwargs)

    def parse_counted(*args, **kwargs):
        counts["parses"] += 1
        return parse(*args, **kwargs)

    monkeypatch.setattr(torchsave, "open_archives_general", general_counted)
    monkeypatch.setattr(torchsave, "_parse_windows", parse_counted)
    return counts


# ---------------------------------------------------------------------------------------------- torch's archives


@pytest.mark.parametrize("mode", MODES)
def test_same_as_general_two_reads_one_parse_per_layout(groups, counted, mode):
    """Many archives of a few layouts, in one file: the general path's Archives and Locators, two reads per
    archive located through windows, no archive handed to the general path, one full parse per layout."""
    store, blobs, wheres = _file(_interleaved(groups))
    oracle = _located(open_archives_general(store, blobs, wheres, **MODES[mode]))
    counted["general"] = 0
    before = store.stats.num_reads
    got = open_archives(store, blobs, wheres, **MODES[mode])
    assert store.stats.num_reads - before == _expected_reads(blobs, MODES[mode])
    assert counted["general"] == 0
    assert _located(got) == oracle
    assert counted["parses"] == len(groups) < len(blobs)  # a group is a layout (two have one length)
    # The archives of a layout share the template's decoded data.pkl, which nothing can change.
    shared = [a.obj for a in got if a.obj == got[0].obj]
    assert len(shared) > 1 and all(obj is shared[0] for obj in shared)
    with pytest.raises(AttributeError):
        shared[0].size = (1,)


def _cd_crcs(raw: bytes) -> list[int]:
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        return [i.CRC for i in z.infolist()]


def _crc_fields(raw: bytes) -> list[int]:
    """Where the CRC-32 fields of an archive are: in its local headers (+14) and central directory (+16)."""
    with zipfile.ZipFile(io.BytesIO(raw)) as z:
        infos, pos = z.infolist(), z.start_dir
    out = [info.header_offset + 14 for info in infos]
    for _ in infos:
        out.append(pos + 16)
        nlen, elen, clen = struct.unpack_from("<HHH", raw, pos + 28)
        pos += 46 + nlen + elen + clen
    return out


@pytest.mark.parametrize("mode", MODES)
def test_crc_only_differences_reuse_the_template(groups, counted, mode):
    """Archives of one layout whose CRC-32 fields differ (they do: random values), and then whose every CRC
    field is overwritten with arbitrary bytes: one full parse, the general path's result."""
    group = groups[0]  # the 80 KiB float32 chunks
    assert len({len(raw) for raw in group}) == 1
    assert len({tuple(_cd_crcs(raw)) for raw in group}) == len(group)  # the CRCs do differ
    rng = np.random.default_rng(3)
    scrambled = [group[0]]
    for raw in group[1:]:
        raw = bytearray(raw)
        for pos in _crc_fields(bytes(raw)):
            raw[pos : pos + 4] = rng.integers(0, 256, 4, dtype=np.uint8).tobytes()
        scrambled.append(bytes(raw))
    for archives_ in (group, scrambled):
        store, blobs, wheres = _file(archives_)
        oracle = _located(open_archives_general(store, blobs, wheres, **MODES[mode]))
        counted.update(general=0, parses=0)
        before = store.stats.num_reads
        assert _located(open_archives(store, blobs, wheres, **MODES[mode])) == oracle
        assert counted == {"general": 0, "parses": 1}
        assert store.stats.num_reads - before == 2 * len(blobs)  # a head and a tail each


# ---------------------------------------------------------------------------------------------- one byte changed


def _windows(length: int, mode: dict) -> list[int]:
    """The positions of an archive of ``length`` bytes that the fast path reads (all of it when it reads it
    whole)."""
    win_tail = min(WINDOW_TAIL, mode["tail"])
    if length <= mode["small"] or length <= HEAD + win_tail:
        return list(range(length))
    return [*range(HEAD), *range(length - win_tail, length)]


def _changed(archives: list[bytes], which: int, pos: int, value: int) -> list[bytes]:
    raw = bytearray(archives[which])
    raw[pos] = value
    return [*archives[:which], bytes(raw), *archives[which + 1:]]


def _same_outcome(archives: list[bytes], mode: dict) -> None:
    store, blobs, wheres = _file(archives)
    assert _outcome(open_archives, store, blobs, wheres, mode) == _outcome(open_archives_general, store, blobs,
                                                                             wheres, mode)


def _layout(groups: list[list[bytes]], g: int) -> list[bytes]:
    """The archives of group ``g`` (one layout), and one of another layout after them."""
    return groups[g] + [groups[-1][0]]


@pytest.mark.parametrize(("g", "mode"), [(0, "default"), (2, "precise"), (3, "default"), (3, "precise")])
def test_every_byte_of_the_windows(groups, g, mode):
    """The last archive of a layout (its neighbours' template already made) with one byte flipped, at every
    position the fast path reads: exactly the general path's Archives, or its error."""
    group = _layout(groups, g)
    which = len(group) - 2
    for pos in _windows(len(group[which]), MODES[mode]):
        _same_outcome(_changed(group, which, pos, group[which][pos] ^ 0x5A), MODES[mode])


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_any_byte_any_value(groups, data):
    """One byte of one archive of a layout (the template's or a later one) set to any value, at any position
    the fast path reads: exactly the general path's Archives, or its error."""
    g = data.draw(st.sampled_from([0, 1, 2, 3, 5]), "group")
    mode = MODES[data.draw(st.sampled_from(sorted(MODES)), "mode")]
    group = _layout(groups, g)
    which = data.draw(st.integers(0, len(group) - 2), "which")
    pos = data.draw(st.sampled_from(_windows(len(group[which]), mode)), "pos")
    value = data.draw(st.integers(0, 255), "value")
    _same_outcome(_changed(group, which, pos, value), mode)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow,
                                                                 HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_templates_kept_across_calls(groups, counted, data):
    """Templates kept from one call to the next (a load locates unit by unit, :func:`templates_for`): a later
    call parses no layout an earlier one parsed, and an archive of it with one byte set to any value, at any
    position the fast path reads, still gives exactly the general path's Archives, or its error."""
    mode = MODES[data.draw(st.sampled_from(sorted(MODES)), "mode")]
    kept = torchsave._Templates(torchsave.KEPT_TEMPLATES)
    store, blobs, wheres = _file(_interleaved(groups))
    first = open_archives(store, blobs, wheres, **mode, templates=kept)
    assert _located(first) == _located(open_archives_general(store, blobs, wheres, **mode))
    counted.update(general=0, parses=0)
    assert _located(open_archives(store, blobs, wheres, **mode, templates=kept)) == _located(first)
    assert counted == {"general": 0, "parses": 0}
    # What is kept holds no archive's own bytes, not even those of an archive held whole (its payload).
    kinds = {held for held, _ in kept.by_key}
    kept_archives = [t.archive for probes in kept.by_key.values() for table in probes.values() for t in table.values()]
    assert kept_archives and all(a.data is None for a in kept_archives)
    assert mode["small"] == 0 or True in kinds  # (archives held whole were among them)
    g = data.draw(st.sampled_from([0, 1, 2, 3, 5]), "group")
    group = _layout(groups, g)
    which = data.draw(st.integers(0, len(group) - 2), "which")
    pos = data.draw(st.sampled_from(_windows(len(group[which]), mode)), "pos")
    value = data.draw(st.integers(0, 255), "value")
    store, blobs, wheres = _file(_changed(group, which, pos, value))

    def with_kept(*args, **kwargs):
        return open_archives(*args, **kwargs, templates=kept)

    assert _outcome(with_kept, store, blobs, wheres, mode) == _outcome(open_archives_general, store, blobs,
                                                                         wheres, mode)


def test_a_checkpoint_keeps_its_templates_per_kind_of_call(checkpoints, counted):
    """A DCP checkpoint's chunks located in many calls (as a load locates them, unit by unit) are parsed once per
    layout in all, with the Locators of one call for everything."""
    with jreshard.open(checkpoints.dirs["plain"]) as ckpt:
        items = [(info, c) for info in ckpt.tensors.values() for c in info.chunks if c.ref.kind == "torch_save"]
        oracle = ckpt.format.locate_many(items, precise=True)  # one call
        parses_one_call = counted["parses"]
    with jreshard.open(checkpoints.dirs["plain"]) as ckpt:
        items = [(info, c) for info in ckpt.tensors.values() for c in info.chunks if c.ref.kind == "torch_save"]
        counted["parses"] = 0
        got = [loc for k in range(0, len(items), 3) for loc in ckpt.format.locate_many(items[k : k + 3], precise=True)]
        assert got == oracle
        assert counted["parses"] == parses_one_call < len(items)


def test_big_archives_go_to_the_general_path(counted):
    """An archive whose parse needs bytes outside the windows (a state dict of many tensors: a long data.pkl,
    a central directory beyond the last KiB) is parsed by the general path, and the same."""
    import torch

    raw = _save({f"layer{i}.weight": torch.full((1000,), float(i)) for i in range(40)})
    assert len(raw) > SMALL_BLOB
    store, blobs, wheres = _file([raw, raw])
    oracle = _located(open_archives_general(store, blobs, wheres, **DEFAULT))
    counted["general"] = 0
    assert _located(open_archives(store, blobs, wheres, **DEFAULT)) == oracle
    assert counted["general"] == 2


# ---------------------------------------------------------------------------------------------- DCP checkpoints


@pytest.mark.parametrize("variant", ["plain", "zstd", "threads"])
@pytest.mark.parametrize("mode", MODES)
def test_dcp_checkpoints_written_by_torch(checkpoints, counted, variant, mode):
    """Every chunk and object of DCP checkpoints torch wrote with 4 ranks: the general path's Archives and
    Locators, the reads counted, nothing handed to the general path."""
    ck = jreshard.open(str(checkpoints.dirs[variant]))
    try:
        src = ck.format
        blobs = [c.ref.blob for t in src.tensors.values() for c in t.chunks if c.ref.kind == "torch_save"]
        blobs += [r.blob for r in src.object_refs.values()]
        wheres = [f"item {i}" for i in range(len(blobs))]
        assert len(blobs) > 20
        oracle = _located(open_archives_general(src.store, blobs, wheres, **MODES[mode]))
        counted.update(general=0, parses=0)
        before = src.store.stats.num_reads
        got = open_archives(src.store, blobs, wheres, **MODES[mode])
        assert src.store.stats.num_reads - before == _expected_reads(blobs, MODES[mode])
        assert _located(got) == oracle
        assert counted["general"] == 0
        # One full parse per layout: archives of one length, entries and data.pkl share one, CRCs aside.
        layouts = {(blob.length if data is None else -len(data), tuple(entries), obj)
                   for blob, _, _, _, _, data, entries, obj, _ in oracle}
        assert counted["parses"] == len(layouts) < len(blobs)
        if mode == "precise" and variant != "zstd":
            assert _expected_reads(blobs, MODES[mode]) > len(blobs)  # some located through two windows
    finally:
        ck.close()
