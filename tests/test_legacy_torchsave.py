"""Legacy ``torch.save`` files (``_use_new_zipfile_serialization=False``; what torch wrote before 1.6), written
by torch itself: every dtype, views and shared storages, nested state dicts with objects, Hugging Face style
sharded ``pytorch_model.bin`` with its index (also mixed with zip shards), small files (read whole) and large
ones (only the pickles and one 8-byte count per storage read at open), and hostile edits of real files.

Expected values come from ``torch.load(..., weights_only=True)`` named by torch's own ``flatten_state_dict``, from
the same state dict saved as a zip archive, or from an independent decoder of the legacy layout (Python's pickle
and numpy ``as_strided``), never from jreshard.
"""

from __future__ import annotations

import io
import json
import math
import os
import pickle
import struct
import tarfile

import jax
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard import errors
from tests.helpers import (
    assert_same,
    check_loaded_array,
    child_env,
    make_mesh,
    random_tensor,
)
from tests.test_torchsave import NP_DTYPES, to_numpy, torch_reference
from tests.test_torchsave import check_catalog_and_data as check_all

IOS = ("posix", "tensorstore")
# dtypes torch saves with an UntypedStorage (no legacy typed storage class)
UNTYPED = ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz", "float8_e8m0fnu", "uint16", "uint32",
           "uint64")
SETTINGS = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])


def save_legacy(obj, path) -> None:
    import torch

    torch.save(obj, path, _use_new_zipfile_serialization=False)


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    """Every legacy file of this module, written once by torch."""
    import torch

    d = tmp_path_factory.mktemp("legacy")
    out = {}
    flat = {f"w_{dt}": random_tensor(f"legacy.w_{dt}", dt, (16, 8)) for dt in NP_DTYPES if dt not in UNTYPED}
    flat.update({f"s_{dt}": random_tensor(f"legacy.s_{dt}", dt, ()) for dt in ("float32", "bfloat16", "int64", "bool")})
    flat["big"] = random_tensor("legacy.big", "float32", (512, 256))
    flat["empty"] = torch.zeros(0, 5)
    save_legacy(flat, d / "flat.pt")
    out["flat"] = d / "flat.pt"

    big = torch.arange(100 * 8, dtype=torch.float32).reshape(100, 8) * 0.5 - 7
    bf = random_tensor("legacy.bf", "bfloat16", (40, 12))
    shared = {
        "big": big, "alias": big, "t": big[2:50].T, "tail": big[5:], "col": big[:, 3], "strided": big[1::3, ::2],
        "elem": big[9, 2], "bf_t": bf[10:30].T, "bf_slice": bf[3:7, 2:11],
        "param": torch.nn.Parameter(torch.randn(8, 4)),
        "expanded": torch.arange(4, dtype=torch.float32).reshape(4, 1).expand(4, 6),
    }
    save_legacy(shared, d / "shared.pt")
    out["shared"] = d / "shared.pt"

    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(64, 128), torch.nn.ReLU(), torch.nn.Linear(128, 32))
    opt = torch.optim.AdamW(model.parameters(), lr=0.1)
    model(torch.randn(4, 64)).square().sum().backward()
    opt.step()
    nested = {"model": model.state_dict(), "optimizer": opt.state_dict(), "epoch": 3,
              "meta": {"name": "run-1", "ids": [1, 2, 3], "flags": (True, False), "none": None},
              "history": [torch.tensor([1.0, 2.0]), {"loss": torch.tensor(0.25)}]}
    save_legacy(nested, d / "nested.pt")
    out["nested"] = d / "nested.pt"
    out["nested_state"] = nested

    # dtypes without a legacy storage class: torch writes an UntypedStorage and _rebuild_tensor_v3 (and its own
    # legacy loader cannot read them back; the expected values are the tensors saved)
    base = {dt: random_tensor(f"legacy.u_{dt}", dt, (12, 10)) for dt in UNTYPED}
    untyped = {f"w_{dt}": t for dt, t in base.items()}
    untyped.update({f"view_{dt}": t[2:9, 1::3].T for dt, t in base.items()})
    untyped["f32"] = torch.arange(6, dtype=torch.float32)
    save_legacy(untyped, d / "untyped.pt")
    out["untyped"] = d / "untyped.pt"
    out["untyped_state"] = untyped

    save_legacy({"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "n": 5}, d / "small.pt")
    out["small"] = d / "small.pt"

    hf = d / "hf"
    hf.mkdir()
    names = [f"model.layers.{i}.{p}" for i in range(3) for p in ("attn.weight", "norm.weight")] + ["lm_head.weight"]
    sd = {n: random_tensor(n, "bfloat16" if "attn" in n else "float32", (32,) if "norm" in n else (64, 32))
          for n in names}
    weight_map = {}
    for i in range(2):
        fname = f"pytorch_model-{i + 1:05d}-of-00002.bin"
        part = dict(list(sd.items())[i::2])
        save_legacy(part, hf / fname)
        weight_map.update({k: fname for k in part})
    (hf / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    out["hf"] = hf
    out["hf_files"] = sorted(hf.glob("*.bin"))
    out["hf_state"] = sd
    return out


# ---------------------------------------------------------------------------------------------
# the fixtures themselves
# ---------------------------------------------------------------------------------------------


def test_fixture_files_are_legacy(files):
    import zipfile

    for key in ("flat", "shared", "nested", "small"):
        raw = files[key].read_bytes()
        assert not zipfile.is_zipfile(files[key])
        assert raw.startswith(b"\x80\x02\x8a\x0al\xfc\x9cF\xf9 j\xa8P\x19.")  # the magic number, pickled
    assert os.path.getsize(files["flat"]) > 64 * 1024 > os.path.getsize(files["small"])
    assert b"_rebuild_tensor_v3" in files["untyped"].read_bytes() and b"UntypedStorage" in files["untyped"].read_bytes()


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("io_", IOS)
@pytest.mark.parametrize("which", ["flat", "shared", "nested", "small"])
def test_legacy_matches_torch_load(files, io_, which):
    tensors, objects = torch_reference(files[which])
    with jreshard.open(files[which], io=io_) as ck:
        check_all(ck, tensors, objects)


@pytest.mark.parametrize("io_", IOS)
def test_untyped_storages(files, io_):
    """float8 and uint16/32/64 tensors (UntypedStorage, _rebuild_tensor_v3), whole and as views."""
    state = files["untyped_state"]
    with jreshard.open(files["untyped"], io=io_) as ck:
        assert set(ck.tensors) == set(state) and not ck.objects
        for name, t in state.items():
            assert_same(ck.read(name), to_numpy(t), name)
        t = state["view_uint64"]
        assert_same(ck.read("view_uint64", (slice(1, 3), slice(2, 6))), to_numpy(t[1:3, 2:6]), "view box")


def test_legacy_and_zip_read_the_same(files, tmp_path):
    import torch

    zipped = tmp_path / "nested_zip.pt"
    torch.save(files["nested_state"], zipped)
    with jreshard.open(files["nested"]) as a, jreshard.open(zipped) as b:
        assert set(a.tensors) == set(b.tensors) and dict(a.objects) == dict(b.objects)
        for name in a.tensors:
            assert_same(a.read(name), b.read(name), name)


@pytest.mark.parametrize("io_", IOS)
def test_sub_boxes(files, io_):
    import torch

    raw = torch.load(str(files["shared"]), weights_only=True)
    flat = torch.load(str(files["flat"]), weights_only=True)
    cases = [(files["shared"], raw, "t", (slice(1, 7), slice(5, 40))), (files["shared"], raw, "strided", (slice(3, 20),)),
             (files["shared"], raw, "bf_t", (slice(2, 11), slice(4, 19))), (files["shared"], raw, "col", (slice(9, 60),)),
             (files["flat"], flat, "big", (slice(100, 200), slice(30, 97))),
             (files["flat"], flat, "w_complex128", (slice(0, 16), slice(4, 8)))]
    for path, ref, name, box in cases:
        with jreshard.open(path, io=io_) as ck:
            assert_same(ck.read(name, box), to_numpy(ref[name][box]), f"{name}{box}")


def test_large_file_reads_only_pickles_and_counts(files):
    """At open: the pickles (a growing window from the start) and 8 bytes per storage; a box read: about its
    bytes."""
    path = files["flat"]
    size = os.path.getsize(path)
    with jreshard.open(path, io="posix") as ck:
        opened = ck.io_stats.bytes_read
        assert opened <= 64 * 1024 + 8 * (len(ck.tensors) + 4), (opened, size)
        ref = to_numpy(__import__("torch").load(str(path), weights_only=True)["big"])
        box = (slice(64, 96), slice(0, 256))
        assert_same(ck.read("big", box), ref[box], "big box")
        assert ck.io_stats.bytes_read - opened <= 32 * 256 * 4 + 512
        assert ck.io_stats.bytes_read < size / 2


def test_large_pickle_is_read_in_growing_windows(tmp_path):
    """A state dict whose pickles are longer than the first read (3000 small tensors)."""
    import torch

    sd = {f"layer.{i}.w": torch.full((2, 3), float(i)) for i in range(3000)}
    sd["big"] = random_tensor("legacy.grow", "float32", (400, 400))
    save_legacy(sd, tmp_path / "many.pt")
    tensors, objects = torch_reference(tmp_path / "many.pt")
    for io_ in IOS:
        with jreshard.open(tmp_path / "many.pt", io=io_) as ck:
            if io_ == "posix":
                assert ck.io_stats.bytes_read < os.path.getsize(tmp_path / "many.pt") / 2
            for name in ("layer.0.w", "layer.2999.w", "big"):
                assert_same(ck.read(name), tensors[name], name)
            assert len(ck.tensors) == len(tensors) and not objects


@pytest.mark.parametrize("io_", IOS)
@pytest.mark.parametrize("how", ["dir", "index_file", "index_url"])
def test_hf_sharded_legacy_bin(files, io_, how):
    tensors, objects = torch_reference(*files["hf_files"])
    hf = files["hf"]
    source = {"dir": hf, "index_file": hf / "pytorch_model.bin.index.json",
              "index_url": f"file://{hf}/pytorch_model.bin.index.json"}[how]
    with jreshard.open(source, io=io_) as ck:
        check_all(ck, tensors, objects)


def test_index_of_zip_and_legacy_shards(files, tmp_path):
    """The index works the same whatever each shard's format."""
    import shutil

    import torch

    d = tmp_path / "mixed"
    shutil.copytree(files["hf"], d)
    first = d / "pytorch_model-00001-of-00002.bin"
    torch.save(torch.load(str(first), weights_only=True), first)  # now a zip archive
    tensors, objects = torch_reference(*sorted(d.glob("*.bin")))
    with jreshard.open(d) as ck:
        check_all(ck, tensors, objects)


def test_pytorch_model_bin_directory(files, tmp_path):
    d = tmp_path / "single"
    d.mkdir()
    (d / "pytorch_model.bin").write_bytes(files["nested"].read_bytes())
    tensors, objects = torch_reference(d / "pytorch_model.bin")
    with jreshard.open(d) as ck:
        check_all(ck, tensors, objects)


def test_load_onto_mesh(files):
    tensors, _ = torch_reference(files["flat"])
    mesh = make_mesh("2x4")
    targets = {n: jax.ShapeDtypeStruct(tensors[n].shape, tensors[n].dtype, sharding=NamedSharding(mesh, P("data", "model")))
               for n in ("big", "w_bfloat16", "w_float64", "w_int8")}
    out = jreshard.load(files["flat"], targets)
    for name, t in targets.items():
        check_loaded_array(out[name], t, tensors[name], name)


# ---------------------------------------------------------------------------------------------
# refused inputs: hand-edited files, each refusal a JReshardError naming the file
# ---------------------------------------------------------------------------------------------


def _layout(raw: bytes) -> dict:
    """Where the five pickles end and each storage's count lies, by an independent walk (Python's pickle)."""

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            return lambda *a, **k: None

        def persistent_load(self, pid):
            return None

    f = io.BytesIO(raw)
    ends = []
    for i in range(5):
        value = (Recorder if i == 3 else pickle.Unpickler)(f).load()
        ends.append(f.tell())
    keys = value
    return {"ends": ends, "keys": keys}


def _storage_table(raw: bytes) -> list[tuple[str, int, int]]:
    """(key, offset of its count, count) of each storage, walking the counts from the end of the key list."""
    lay = _layout(raw)
    pos, out = lay["ends"][4], []
    itemsizes = _itemsizes(raw)
    for k in lay["keys"]:
        (count,) = struct.unpack_from("<q", raw, pos)
        out.append((k, pos, count))
        pos += 8 + count * itemsizes[k]
    assert pos == len(raw)
    return out


def _itemsize_kinds(raw: bytes) -> dict:
    """{storage key: torch storage class name} of a legacy file."""
    kinds = {}

    class Kinds(pickle.Unpickler):
        def find_class(self, module, name):
            return name if name.endswith("Storage") else (lambda *a, **k: None)

        def persistent_load(self, pid):
            kinds[pid[2]] = pid[1]

    f = io.BytesIO(raw)
    for _ in range(3):
        pickle.load(f)
    Kinds(f).load()
    return kinds


def _itemsizes(raw: bytes) -> dict:
    class Sizes(pickle.Unpickler):
        def find_class(self, module, name):
            if module == "torch" and name.endswith("Storage"):
                return name
            if (module, name) == ("torch.storage", "UntypedStorage"):
                return "UntypedStorage"
            return lambda *a, **k: None

        def persistent_load(self, pid):
            item = {"FloatStorage": 4, "UntypedStorage": 1, "DoubleStorage": 8, "LongStorage": 8}.get(pid[1])
            self.sizes[pid[2]] = item

    f = io.BytesIO(raw)
    for _ in range(3):
        pickle.load(f)
    u = Sizes(f)
    u.sizes = {}
    u.load()
    return u.sizes


@pytest.fixture()
def plain(tmp_path):
    """A small legacy file of float32 and int64 tensors (the raw bytes too)."""
    import torch

    sd = {"a": torch.arange(12, dtype=torch.float32).reshape(3, 4), "b": torch.arange(6, dtype=torch.float32) * 7,
          "c": torch.ones(2, 2) * 3, "i": torch.arange(5, dtype=torch.int64)[1:]}
    path = tmp_path / "plain.pt"
    save_legacy(sd, path)
    return path, path.read_bytes()


def _open_all(path, io_="posix"):
    ck = jreshard.open(path, io=io_)
    for n in ck.tensors:
        ck.read(n)
    dict(ck.objects)
    return ck


@pytest.mark.parametrize("io_", IOS)
def test_truncated_at_every_boundary(plain, tmp_path, io_):
    _, raw = plain
    lay = _layout(raw)
    table = _storage_table(raw)
    cuts = {0, 1, 10, 14, 15, 16, 20} | {e - 1 for e in lay["ends"]} | set(lay["ends"][:4])
    cuts |= {off + d for _, off, _ in table for d in (0, 4, 8, 9)} | {len(raw) - 1}
    for cut in sorted(c for c in cuts if 0 <= c < len(raw)):
        p = tmp_path / f"cut{cut}.pt"
        p.write_bytes(raw[:cut])
        with pytest.raises(errors.JReshardError) as ei:
            _open_all(p, io_)
        assert p.name in str(ei.value), (cut, ei.value)


@pytest.mark.parametrize("which", [0, 1, 2])
@pytest.mark.parametrize("delta", [-1, 1, 2**40, -(2**62), 2**63 - 1])
def test_count_in_file_disagrees_with_pickle(plain, tmp_path, which, delta):
    _, raw = plain
    _, off, count = _storage_table(raw)[which]
    bad = bytearray(raw)
    struct.pack_into("<q", bad, off, max(-(2**63), min(2**63 - 1, count + delta)))
    p = tmp_path / "count.pt"
    p.write_bytes(bytes(bad))
    with pytest.raises(errors.InconsistentCheckpointError, match="count"):
        _open_all(p)


def _rewrite_pickles(raw: bytes, main=None, keys=None) -> bytes:
    """The file with its main pickle and/or key list replaced (the storages' bytes kept)."""
    ends = _layout(raw)["ends"]
    parts = [raw[: ends[2]], raw[ends[2] : ends[3]], raw[ends[3] : ends[4]], raw[ends[4] :]]
    if main is not None:
        parts[1] = main
    if keys is not None:
        parts[2] = pickle.dumps(keys, protocol=2)
    return b"".join(parts)


def test_key_list_edits(plain, tmp_path):
    _, raw = plain
    keys = _layout(raw)["keys"]
    cases = {
        "duplicate": (keys[:1] + keys[:1] + keys[2:], errors.InconsistentCheckpointError),
        "unknown": (keys[:-1] + ["999999"], errors.InconsistentCheckpointError),
        "missing": (keys[:-1], errors.MissingDataError),
        "not strings": ([1, 2, 3], errors.CheckpointFormatError),
        "not a list": ({"a": 1}, errors.CheckpointFormatError),
        "reordered": (keys[::-1], errors.InconsistentCheckpointError),  # counts no longer line up
    }
    for new_keys, exc in cases.values():
        p = tmp_path / "keys.pt"
        p.write_bytes(_rewrite_pickles(raw, keys=new_keys))
        with pytest.raises(exc):
            _open_all(p)


def _p_str(x: str) -> bytes:
    b = x.encode()
    return b"X" + struct.pack("<I", len(b)) + b


def _p_int(v: int) -> bytes:
    if -(2**31) <= v < 2**31:
        return b"J" + struct.pack("<i", v)
    b = v.to_bytes((v.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(b)]) + b


def _p_tuple(*items: bytes) -> bytes:
    return b"(" + b"".join(items) + b"t"


def _storage_pid(kind: str, key: str, numel: int, view: bytes = b"N") -> bytes:
    """The persistent id ('storage', torch.<kind>, key, 'cpu', numel, view_metadata), as torch pickles it."""
    return _p_tuple(_p_str("storage"), f"ctorch\n{kind}\n".encode(), _p_str(key), _p_str("cpu"), _p_int(numel),
                    view) + b"Q"


def _main_pickle(entries: dict) -> bytes:
    """A protocol-2 main pickle {name: _rebuild_tensor_v2(storage, offset, size, stride, False, {})}, each entry
    (persistent id bytes, offset, size, stride), or raw bytes of the value."""
    out = b"\x80\x02}"
    for name, entry in entries.items():
        if isinstance(entry, bytes):
            value = entry
        else:
            pid, offset, size, stride = entry
            args = _p_tuple(pid, _p_int(offset), _p_tuple(*map(_p_int, size)), _p_tuple(*map(_p_int, stride)), b"\x89}")
            value = b"ctorch._utils\n_rebuild_tensor_v2\n" + args + b"R"
        out += _p_str(name) + value + b"s"
    return out + b"."


@pytest.mark.parametrize("case", ["view_metadata", "module", "huge_numel", "negative_numel", "numel_vs_count",
                                  "two_dtypes", "five_field_pid", "view_outside", "control"])
def test_persistent_id_edits(plain, tmp_path, case):
    """The main pickle rebuilt by hand (protocol 2, as torch writes it) around the file's first storage (the
    other storages' bytes stay as trailing bytes, which torch ignores too)."""
    _, raw = plain
    key0, _, count0 = _storage_table(raw)[0]
    kind = _itemsize_kinds(raw)[key0]
    fs = (kind, key0)
    entries = {"w": (_storage_pid(*fs, count0), 0, (count0 // 2, 2), (2, 1))}
    exc = errors.JReshardError
    if case == "view_metadata":
        entries = {"w": (_storage_pid(*fs, count0, _p_tuple(_p_str("v"), _p_int(0), _p_int(4))), 0, (4,), (1,))}
        exc = errors.CheckpointFormatError
    elif case == "module":
        entries = {"w": _p_tuple(_p_str("module"), _p_int(1), _p_str("src.py"), _p_str("source")) + b"Q"}
        exc = errors.CheckpointFormatError
    elif case == "huge_numel":
        entries = {"w": (_storage_pid(*fs, 2**60), 0, (4,), (1,))}
        exc = errors.TruncatedDataError
    elif case == "negative_numel":
        entries = {"w": (_storage_pid(*fs, -1), 0, (0,), (1,))}
        exc = errors.CheckpointFormatError
    elif case == "numel_vs_count":
        entries = {"w": (_storage_pid(*fs, count0 - 2), 0, (4,), (1,))}
        exc = errors.InconsistentCheckpointError
    elif case == "two_dtypes":
        entries = {"w": (_storage_pid(*fs, count0), 0, (4,), (1,)),
                   "v": (_storage_pid("ShortStorage", key0, count0 * 4), 0, (2,), (1,))}
        exc = errors.InconsistentCheckpointError
    elif case == "five_field_pid":
        pid = _p_tuple(_p_str("storage"), f"ctorch\n{kind}\n".encode(), _p_str(key0), _p_str("cpu"), _p_int(count0)) + b"Q"
        entries = {"w": (pid, 0, (4,), (1,))}
        exc = errors.CheckpointFormatError
    elif case == "view_outside":
        entries = {"w": (_storage_pid(*fs, count0), count0 - 2, (4,), (1,))}  # 2 elements beyond its end
        exc = errors.InconsistentCheckpointError
    p = tmp_path / "pid.pt"
    p.write_bytes(_rewrite_pickles(raw, main=_main_pickle(entries), keys=[] if case == "module" else [key0]))
    if case == "control":  # the hand-built pickle itself is read as torch reads it
        import torch

        ref = torch.load(str(p), weights_only=True)["w"]
        assert tuple(ref.shape) == (count0 // 2, 2)
        with jreshard.open(p) as ck:
            assert_same(ck.read("w"), ref.numpy(), "w")
    else:
        with pytest.raises(exc) as ei:
            _open_all(p)
        assert "pid.pt" in str(ei.value)


def test_huge_numel_is_refused_before_allocating(plain, tmp_path):
    """A pickle that declares a storage of 2**40 floats and a view of all of them in a small file: refused from
    the counts and the file size, in a child capped at 2 GiB of address space above its imports."""
    import subprocess
    import sys
    import textwrap

    _, raw = plain
    key0 = _storage_table(raw)[0][0]
    main = _main_pickle({"w": (_storage_pid("FloatStorage", key0, 2**40), 0, (2**20, 2**20), (2**20, 1))})
    p = tmp_path / "huge.pt"
    p.write_bytes(_rewrite_pickles(raw, main=main, keys=[key0]))
    code = textwrap.dedent(f"""
        import resource, jreshard
        cap = int([l.split()[1] for l in open('/proc/self/status') if l.startswith('VmPeak')][0]) * 1024 + 2 * 2**30
        resource.setrlimit(resource.RLIMIT_AS, (cap, cap))
        try:
            ck = jreshard.open({str(p)!r}, io="posix")
            for n in ck.tensors:
                ck.read(n)
            print("READ")
        except jreshard.JReshardError as e:
            print("REFUSED", type(e).__name__, e)
    """)
    r = subprocess.run([sys.executable, "-c", code], env=child_env(), capture_output=True, text=True, timeout=120,
                       check=False)
    assert r.returncode == 0 and "REFUSED" in r.stdout, (r.stdout, r.stderr[-2000:])
    assert "MemoryError" not in r.stdout and "huge.pt" in r.stdout


def test_wrong_magic_and_protocol(plain, tmp_path):
    _, raw = plain
    ends = _layout(raw)["ends"]
    for name, new in {
        "magic.pt": pickle.dumps(12345, protocol=2) + raw[ends[0]:],
        "protocol.pt": raw[: ends[0]] + pickle.dumps(1000, protocol=2) + raw[ends[1]:],
        "sysinfo.pt": raw[: ends[1]] + pickle.dumps([1], protocol=2) + raw[ends[2]:],
        "garbage.pt": b"\x00" * 100,
    }.items():
        p = tmp_path / name
        p.write_bytes(new)
        with pytest.raises(errors.CheckpointFormatError) as ei:
            _open_all(p)
        assert name in str(ei.value)


def test_tar_format_is_refused_clearly(tmp_path):
    """torch < 0.4 wrote a tar of ``sys_info``, ``pickle``, ``tensors`` and ``storages``."""
    p = tmp_path / "old.pt"
    with tarfile.open(p, "w", format=tarfile.PAX_FORMAT) as tar:
        for member in ("sys_info", "pickle", "tensors", "storages"):
            data = pickle.dumps({"x": 1}, protocol=2)
            info = tarfile.TarInfo(member)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    with pytest.raises(errors.CheckpointFormatError, match=r"tar-format torch file \(torch < 0\.4\)"):
        jreshard.open(p)


def test_malicious_global_in_legacy_file(tmp_path):
    import torch

    marker = tmp_path / "MARKER"

    class Evil:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    p = tmp_path / "evil.pt"
    save_legacy({"w": torch.ones(3), "hook": Evil()}, p)
    with pytest.raises(errors.UnsafeCheckpointError, match="system"):
        _open_all(p)
    assert not marker.exists()


# ---------------------------------------------------------------------------------------------
# hypothesis: mutations of a real legacy file decode to what an independent decoder reads, or are refused
# ---------------------------------------------------------------------------------------------


def _oracle(raw: bytes) -> dict | None:
    """{name: array} of a legacy file decoded with Python's pickle (a recording unpickler) and numpy, torch's
    rules applied by hand; None when it is not a well-formed legacy file of this test's kind."""
    sizes = {"FloatStorage": np.dtype("<f4"), "LongStorage": np.dtype("<i8")}

    class View:
        def __init__(self, storage, offset, size, stride):
            self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    class U(pickle.Unpickler):
        def find_class(self, module, name):
            if (module, name) == ("torch._utils", "_rebuild_tensor_v2"):
                return lambda s, o, size, stride, *a: View(s, o, size, stride)
            if (module, name) == ("collections", "OrderedDict"):
                return dict
            if module == "torch" and name in sizes:
                return name
            raise pickle.UnpicklingError(name)

        def persistent_load(self, pid):
            if not (type(pid) is tuple and len(pid) == 6 and pid[0] == "storage" and pid[1] in sizes and pid[5] is None
                    and type(pid[2]) is str and type(pid[4]) is int and pid[4] >= 0):
                raise pickle.UnpicklingError("pid")
            seen = self.storages.setdefault(pid[2], (pid[1], pid[4]))
            if seen != (pid[1], pid[4]):
                raise pickle.UnpicklingError("two kinds")
            return pid[2]

    try:
        f = io.BytesIO(raw)
        if pickle.load(f) != 0x1950A86A20F9469CFC6C or pickle.load(f) != 1001 or type(pickle.load(f)) is not dict:
            return None
        u = U(f)
        u.storages = {}
        obj = u.load()
        keys = pickle.load(f)
        if type(keys) is not list or len(set(keys)) != len(keys) or set(keys) != set(u.storages):
            return None
        data = {}
        for k in keys:
            kind, numel = u.storages[k]
            head = f.read(8)
            if len(head) < 8 or struct.unpack("<q", head)[0] != numel:
                return None
            body = f.read(numel * sizes[kind].itemsize)
            if len(body) != numel * sizes[kind].itemsize:
                return None
            data[k] = np.frombuffer(body, sizes[kind])
        if type(obj) is not dict:
            return None
        out = {}
        for name, v in obj.items():
            if not isinstance(v, View):
                return None
            store = data[v.storage]
            size, stride, off = v.size, v.stride, v.offset
            if not (type(size) is tuple and type(stride) is tuple and len(size) == len(stride) <= 8
                    and all(type(x) is int and 0 <= x < 2**31 for x in size + stride + (off,))):
                return None
            if math.prod(size) and off + sum((n - 1) * t for n, t in zip(size, stride)) >= len(store):
                return None
            base = store[off:] if math.prod(size) else store[:0]
            out[name] = np.array(np.lib.stride_tricks.as_strided(base, size, tuple(t * store.itemsize for t in stride)))
        return out
    except Exception:  # noqa: BLE001  (anything this decoder cannot read is "not well-formed")
        return None


@SETTINGS
@given(data=st.data())
def test_mutated_legacy_files(plain, tmp_path, data):
    """Mutations of the structural bytes (pickles, counts) and truncations: jreshard gives the values the
    independent decoder reads, or a JReshardError naming the file; never another exception."""
    _, raw = plain
    ends = _layout(raw)["ends"]
    table = _storage_table(raw)
    bad = bytearray(raw)
    kind = data.draw(st.sampled_from(["pickle_byte", "count", "truncate", "insert"]))
    if kind == "pickle_byte":
        for _ in range(data.draw(st.integers(1, 3))):
            i = data.draw(st.integers(0, ends[4] - 1))
            bad[i] = data.draw(st.integers(0, 255))
    elif kind == "count":
        _, off, count = data.draw(st.sampled_from(table))
        new = data.draw(st.one_of(st.integers(-2, 2).map(lambda d: count + d), st.integers(-(2**63), 2**63 - 1)))
        struct.pack_into("<q", bad, off, new)
    elif kind == "truncate":
        del bad[data.draw(st.integers(0, len(raw) - 1)):]
    else:
        i = data.draw(st.integers(0, ends[4]))
        bad[i:i] = data.draw(st.binary(min_size=1, max_size=8))
    p = tmp_path / "mutated.pt"
    p.write_bytes(bytes(bad))
    expected = _oracle(bytes(bad))
    try:
        with jreshard.open(p) as ck:
            got = {n: ck.read(n) for n in ck.tensors}
            objects = dict(ck.objects)
        error = None
    except errors.JReshardError as e:
        error = e
    if error is not None:
        assert "mutated.pt" in str(error)
    elif expected is not None:
        assert not objects and set(got) == set(expected)
        for n, array in got.items():
            assert array.tobytes() == expected[n].tobytes() and array.shape == expected[n].shape, n
