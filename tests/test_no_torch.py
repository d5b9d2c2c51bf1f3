"""jreshard loads DCP checkpoints in a process where torch cannot be imported at all."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.helpers import REPO_ROOT, child_env

CHILD = r'''
import importlib.abc, json, sys

class _NoTorch(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name == "torch" or name.startswith("torch."):
            raise ImportError(f"torch is blocked in this test: {name}")
        return None

sys.meta_path.insert(0, _NoTorch())
sys.modules["torch"] = None

try:
    import torch  # noqa: F401
    raise SystemExit("torch import was not blocked")
except ImportError:
    pass

import numpy as np
import jax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import jreshard
from tests import torch_writers as tw
from tests.helpers import assert_same, spec_fits

root = sys.argv[1]
assert len(jax.devices()) == 8, jax.devices()
assert not jax.config.jax_enable_x64
mesh = Mesh(np.array(jax.devices()).reshape(2, 4), ("data", "model"))
axis = {"data": 2, "model": 4}
ref_all = tw.load_store(root + "/ref")
variants = json.load(open(root + "/ref/variants.json"))
checked = 0
for variant in ("plain", "zstd", "safetensors"):
    path = root + "/" + variant
    names = variants[variant]
    ck = jreshard.open(path)
    assert set(ck.tensors) == set(names), variant
    assert dict(ck.objects) == tw.OBJECTS_FLAT, (variant, dict(ck.objects))
    targets = {}
    for name in names:
        ref = ref_all[name]
        assert_same(ck.read(name), ref, f"read {variant}:{name}")
        # default JAX (no x64): load the 8/16/32-bit tensors onto the mesh
        if ref.dtype in (np.float64, np.int64, np.complex128):
            continue
        spec = P("data", "model") if spec_fits(P("data", "model"), ref.shape, axis) else P()
        targets[name] = jax.ShapeDtypeStruct(ref.shape, ref.dtype, sharding=NamedSharding(mesh, spec))
    for io in ("posix", "tensorstore"):
        out = jreshard.load(path, targets, io=io)
        for name, t in targets.items():
            arr = out[name]
            assert arr.sharding == t.sharding, (name, arr.sharding)
            assert_same(np.asarray(arr), ref_all[name], f"load {variant}/{io}:{name}")
            for s in arr.addressable_shards:
                assert_same(np.asarray(s.data), ref_all[name][s.index], f"shard {variant}/{io}:{name}")
            checked += 1

blocked = "torch" not in sys.modules or sys.modules["torch"] is None
leaked = sorted(m for m in sys.modules if m.startswith("torch.") and sys.modules[m] is not None)
print(json.dumps({"ok": True, "checked": checked, "torch_blocked": blocked, "leaked": leaked}))
'''


def test_load_without_torch(checkpoints):
    env = child_env(XLA_FLAGS="--xla_force_host_platform_device_count=8", JAX_PLATFORMS="cpu")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, str(checkpoints.root)],
        env=env,
        cwd=str(REPO_ROOT),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, f"child failed:\n{proc.stdout[-4000:]}\n{proc.stderr[-8000:]}"
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["ok"] is True
    assert result["torch_blocked"] is True
    assert result["leaked"] == []
    assert result["checked"] > 50
