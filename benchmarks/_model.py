"""The synthetic transformer-like model the restore benchmarks save and load.

The model is an embedding, ``L`` decoder layers (attention and MLP projections,
q/k/v biases, two norms) and a final norm and LM head, with the layer count
picked to reach a requested size. Matrices are bf16 except the f32 LM head;
norms and biases are f32.

Contents are deterministic and cheap to produce for any row range: row ``r`` of a
tensor is ``A[r % 61] + B[r % 67]`` for two small blocks of seeded Gaussian noise,
so each saving rank can generate exactly its own shard and a loader's output can
be checked against ``TensorSpec.rows`` without keeping a copy of the model around.
The rows repeat only every 61 * 67 = 4087 rows, so no shard boundary lines up with
the pattern (a shard read from the wrong offset does not compare equal) and the
data compresses about as badly as real weights do: with a single short period,
Orbax's zstd-compressed checkpoint would shrink ~40x and no longer be comparable.

``port_tensors`` describes the same model ported to another layout (what a JAX
model converted from torch typically wants): every 2-D weight transposed and the
per-layer tensors of each kind stacked into one ``[L, ...]`` array.
"""

from __future__ import annotations

import dataclasses
import math
import zlib

import ml_dtypes
import numpy as np

GIB = 1 << 30
DEVICE_COUNT = 8  # the restore mesh: (2, 4) ('data', 'model') of 8 CPU devices
MESH_SHAPE = (2, 4)
PERIODS = (61, 67)  # coprime: together, rows repeat every 4087 rows
DTYPES = {"bf16": np.dtype(ml_dtypes.bfloat16), "f32": np.dtype(np.float32)}

# How each kind of tensor is laid out on the ('data', 'model') mesh.
AXES = {
    "matrix": ("data", "model"),  # 2-D: rows over 'data', columns over 'model'.
    "sharded": ("model",),  # 1-D, split over 'model'.
    "replicated": (),  # 1-D, a full copy on every device.
}


@dataclasses.dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str  # a key of DTYPES
    kind: str  # a key of AXES

    @property
    def np_dtype(self) -> np.dtype:
        return DTYPES[self.dtype]

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.np_dtype.itemsize

    @property
    def axes(self) -> tuple[str, ...]:
        """Mesh axis per dimension, for ``PartitionSpec(*axes)``."""
        return AXES[self.kind]

    def rows(self, start: int = 0, stop: int | None = None) -> np.ndarray:
        """Rows ``[start, stop)`` (along dimension 0) of this tensor's contents."""
        stop = self.shape[0] if stop is None else stop
        rng = np.random.default_rng(zlib.crc32(self.name.encode()))
        index = np.arange(start, stop)
        a, b = (rng.standard_normal((p, *self.shape[1:]), dtype=np.float32) for p in PERIODS)
        return (a[index % PERIODS[0]] + b[index % PERIODS[1]]).astype(self.np_dtype, copy=False)

    def expected(self) -> np.ndarray:
        """The whole tensor (for checking a load)."""
        return self.rows()


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    hidden: int
    ffn: int
    vocab: int
    layers: int
    tensors: tuple[TensorSpec, ...]

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.tensors)

    @property
    def key(self) -> str:
        """Names the on-disk cache of this model's checkpoints."""
        periods = "x".join(map(str, PERIODS))
        return f"d{self.hidden}-f{self.ffn}-v{self.vocab}-L{self.layers}-p{periods}"

    def describe(self) -> str:
        counts = {d: sum(t.dtype == d for t in self.tensors) for d in DTYPES}
        return (
            f"{len(self.tensors)} tensors, {self.nbytes / GIB:.3f} GiB "
            f"(hidden {self.hidden}, ffn {self.ffn}, vocab {self.vocab}, {self.layers} layers; "
            + ", ".join(f"{n} {d}" for d, n in counts.items())
            + ")"
        )


def _layer(i: int, d: int, ffn: int) -> list[TensorSpec]:
    p = f"model.layers.{i}"
    out = [TensorSpec(f"{p}.input_norm.weight", (d,), "f32", "sharded")]
    for proj in ("q", "k", "v"):
        out.append(TensorSpec(f"{p}.attn.{proj}_proj.weight", (d, d), "bf16", "matrix"))
        out.append(TensorSpec(f"{p}.attn.{proj}_proj.bias", (d,), "f32", "replicated"))
    out += [
        TensorSpec(f"{p}.attn.o_proj.weight", (d, d), "bf16", "matrix"),
        TensorSpec(f"{p}.post_attn_norm.weight", (d,), "f32", "sharded"),
        TensorSpec(f"{p}.mlp.gate_proj.weight", (ffn, d), "bf16", "matrix"),
        TensorSpec(f"{p}.mlp.up_proj.weight", (ffn, d), "bf16", "matrix"),
        TensorSpec(f"{p}.mlp.down_proj.weight", (d, ffn), "bf16", "matrix"),
    ]
    return out


def build_model(size_gib: float) -> ModelSpec:
    """A model of about ``size_gib`` GiB (at least one layer).

    Every dimension is a multiple of 8, so each tensor splits evenly over the 4
    saving ranks (``Shard(0)``) and over the (2, 4) restore mesh.
    """
    d = 2048 if size_gib >= 0.75 else 1024 if size_gib >= 0.2 else 512
    ffn = d * 11 // 4  # 5632 for d = 2048
    vocab = d * 125 // 8  # 32000 for d = 2048
    top = [
        TensorSpec("model.embed_tokens.weight", (vocab, d), "bf16", "matrix"),
        TensorSpec("model.norm.weight", (d,), "f32", "sharded"),
        TensorSpec("lm_head.weight", (vocab, d), "f32", "matrix"),
    ]
    per_layer = sum(t.nbytes for t in _layer(0, d, ffn))
    fixed = sum(t.nbytes for t in top)
    layers = max(1, round((size_gib * GIB - fixed) / per_layer))
    tensors = top[:1] + [t for i in range(layers) for t in _layer(i, d, ffn)] + top[1:]
    return ModelSpec(d, ffn, vocab, layers, tuple(tensors))


def make_targets(model: ModelSpec, specs=None) -> dict:
    """Abstract target arrays (``jax.ShapeDtypeStruct`` with a ``NamedSharding`` on the (2, 4) mesh) for
    ``specs`` (the model's tensors unless given; anything with name, shape, np_dtype, axes)."""
    import os

    import jax
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    devices = jax.devices()
    if len(devices) != DEVICE_COUNT:
        raise RuntimeError(
            f"expected {DEVICE_COUNT} devices, got {len(devices)} (XLA_FLAGS={os.environ.get('XLA_FLAGS')!r})"
        )
    mesh = Mesh(np.array(devices).reshape(MESH_SHAPE), ("data", "model"))
    return {
        t.name: jax.ShapeDtypeStruct(t.shape, t.np_dtype, sharding=NamedSharding(mesh, PartitionSpec(*t.axes)))
        for t in (model.tensors if specs is None else specs)
    }


# ------------------------------------------------------------------ the ported layout


@dataclasses.dataclass(frozen=True)
class PortSpec:
    """One array of the ported layout: ``sources`` (saved tensors), each transposed when
    ``transpose``, stacked along a new first dimension when ``stacked`` (else exactly one)."""

    name: str
    sources: tuple[TensorSpec, ...]
    transpose: bool
    stacked: bool

    @property
    def src(self) -> TensorSpec:
        return self.sources[0]

    @property
    def np_dtype(self) -> np.dtype:
        return self.src.np_dtype

    @property
    def shape(self) -> tuple[int, ...]:
        one = self.src.shape[::-1] if self.transpose else self.src.shape
        return (len(self.sources), *one) if self.stacked else one

    @property
    def nbytes(self) -> int:
        return sum(t.nbytes for t in self.sources)

    @property
    def axes(self) -> tuple[str | None, ...]:
        """Mesh axis per dimension: the same logical dimensions as the saved tensors'
        (a transposed matrix keeps its saved rows on 'data': ``('model', 'data')``);
        the stacking dimension is not split."""
        one = self.src.axes[::-1] if self.transpose else self.src.axes
        if not one:  # replicated
            return ()
        return (None, *one) if self.stacked else one

    def expected(self) -> np.ndarray:
        """The whole array, built with numpy from the generator (for checking a load)."""
        parts = [t.rows().T if self.transpose else t.rows() for t in self.sources]
        return np.stack(parts) if self.stacked else parts[0]


def _port_name(name: str, transpose: bool) -> str:
    # A transposed torch weight [out, in] is a flax-style kernel [in, out].
    return name.removesuffix(".weight") + ".kernel" if transpose else name


def port_tensors(model: ModelSpec) -> tuple[PortSpec, ...]:
    """The ported layout of ``model``: top-level tensors as they are (2-D ones transposed),
    then one stacked array per kind of layer tensor, named ``model.layers.<kind>``."""
    prefix = "model.layers."
    by_kind: dict[str, list[TensorSpec]] = {}
    out = []
    for t in model.tensors:
        if t.name.startswith(prefix):
            _, kind = t.name[len(prefix):].split(".", 1)
            by_kind.setdefault(kind, []).append(t)
        else:
            transpose = len(t.shape) == 2
            out.append(PortSpec(_port_name(t.name, transpose), (t,), transpose, stacked=False))
    for kind, sources in by_kind.items():
        if len(sources) != model.layers:
            raise ValueError(f"{kind}: {len(sources)} tensors for {model.layers} layers")
        transpose = len(sources[0].shape) == 2
        out.append(PortSpec(_port_name(prefix + kind, transpose), tuple(sources), transpose, stacked=True))
    return tuple(out)
