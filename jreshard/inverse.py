"""The inverse of a load mapping: arrays under their target names and layouts back to the saved tensors.

:func:`jreshard.load` fills each target from a view of saved tensors (``mapping = {target: view}``).
:func:`invert` runs every view backwards with array operations (``jnp.transpose``, ``reshape``, indexing,
flips; a stack is undone by indexing its axis, a concat by slicing it) and reassembles each saved tensor from
the pieces the targets hold, by concatenation (or, for pieces that interleave, by strided updates). Views are
inverted structurally, so a sharded target gives sharded pieces: nothing is gathered onto one device.

A saved tensor must be covered exactly once: pieces that leave part of it out (an index or a slice no other
target makes up for) or that read some element twice (a tensor used by two targets, tied weights) make the
mapping non-invertible, and :func:`invert` raises an error naming the saved tensor and the targets.
"""

from __future__ import annotations

import itertools
import math
import os
from collections.abc import Mapping
from typing import Any

import numpy as np

from .errors import InvalidArgumentError, JReshardError, TargetMismatchError
from .planning import c_strides
from .views import View, _axes, _axis, _groups, _index_plan, _linear_boxes, saved
from .write_safetensors import named_arrays

Region = tuple[tuple[int, int, int], ...]  # per dimension: (start, step >= 1, count)


class _Unknown(Exception):
    """A saved tensor's shape or dtype is not known (yet)."""


class _Spec:
    """What is known of one saved tensor: shape and dtype (None while unknown), and who said so."""

    __slots__ = ("dtype", "shape", "source")

    def __init__(self, shape: tuple[int, ...] | None, dtype: np.dtype | None, source: str) -> None:
        self.shape, self.dtype, self.source = shape, dtype, source


def invert(tree: Any, mapping: Any = None, *, saved_like: Any = None) -> dict[str, Any]:
    """The saved tensors, by saved name, that ``mapping`` maps onto the arrays of ``tree``: the inverse of
    ``jreshard.load(ckpt, target, mapping=mapping)``, so that ``invert(jreshard.load(ckpt, t, mapping=m), m)``
    gives back the checkpoint's tensors (bit for bit), ready for :func:`jreshard.save_safetensors`.

    ``tree`` holds ``jax.Array``s (or numpy arrays) under the target names: a pytree shaped like a load target
    (nested dicts, a flax nnx state or its pure dict) or a flat dict of dotted names; leaves that are not arrays
    (saved objects a load returned, such as ``step``) are left out. ``mapping`` is the one
    given to :func:`jreshard.load` (a flat dict or a pytree of saved names and views); targets it does not name
    are saved under their own name, as a load reads them. Mapping entries whose target is not in ``tree`` are
    an error (as in a load): leave a target out of both to drop it.

    Each view is undone with array operations: ``.T`` / ``.transpose`` by the inverse transpose, ``.reshape``
    by a reshape back (of a part of it, by the boxes that part covers), indexing by putting the selected part
    back in place (negative steps flipped), :func:`jreshard.stack` by indexing the stacked axis,
    :func:`jreshard.concat` by slicing, and the pieces of one saved tensor read by several targets (a fused
    ``qkv`` sliced into q, k and v) are concatenated. ``.astype`` is undone by casting to the saved dtype:
    exact for every value the load could have produced (they came from the saved dtype), rounded as
    ``astype`` rounds for values changed since (e.g. a float32 target trained after a load from bfloat16).

    Shapes and dtypes of the saved tensors are worked out backwards from the arrays where the views allow it
    (a transpose, a stack, a plain name). A reshape, a partial index or a concat of unknown parts hides the saved
    shape, and an ``.astype`` the saved dtype: then give ``saved_like``, the checkpoint the mapping was made for
    (a :class:`jreshard.Checkpoint` or its path; only metadata is read) or a dict ``{saved name: array-like
    with .shape and .dtype, or a shape tuple}``. A target whose dtype differs from the saved one given there is
    cast to it (as a load casts the other way).

    Returns ``{saved name: array}``: ``jax.Array``s (numpy arrays for numpy inputs), in the order of
    ``saved_like`` when given, else in the order the targets read them.

    Raises TargetMismatchError when a saved tensor is only partly covered by the targets, or some of its
    elements are read by two targets (overlapping pieces), or shapes disagree; InvalidArgumentError when a saved
    shape or dtype cannot be worked out without ``saved_like``.

    Example:
        >>> import numpy as np, jreshard
        >>> from jreshard import invert
        >>> qkv = np.arange(12.0).reshape(6, 2)
        >>> m = {"q": jreshard.saved("qkv")[:2].T, "kv": jreshard.saved("qkv")[2:].reshape(2, 2, 2)}
        >>> loaded = {"q": qkv[:2].T, "kv": qkv[2:].reshape(2, 2, 2), "bias": np.ones(3)}
        >>> out = invert(loaded, m, saved_like={"qkv": qkv})  # a slice hides the saved shape
        >>> sorted(out), bool((out["qkv"] == qkv).all())
        (['bias', 'qkv'], True)
    """
    from .program import _mapping

    arrays = named_arrays(tree, "invert", skip_others=True)
    views = _mapping(mapping)
    unknown = sorted(set(views) - set(arrays))
    if unknown:
        from .program import close_hint

        raise TargetMismatchError(
            f"invert: {len(unknown)} mapping entries name no array of the tree: {', '.join(map(repr, unknown[:8]))}"
            f"{' ...' if len(unknown) > 8 else ''}" + close_hint(unknown[0], arrays))
    specs, order = _given_specs(saved_like)
    entries = {name: views.get(name) or saved(name) for name in arrays}
    _infer(entries, arrays, specs)
    bound = _bind(entries, arrays, specs)

    use_np = all(isinstance(a, np.ndarray) for a in arrays.values())
    leaves = list(dict.fromkeys(leaf for view in bound.values() for leaf in view.names()))
    names = [n for n in order if n in set(leaves)] + [n for n in leaves if n not in set(order)]
    if not use_np:
        import jax

        for leaf in names:
            if jax.dtypes.canonicalize_dtype(specs[leaf].dtype) != specs[leaf].dtype:
                raise InvalidArgumentError(f"invert: saved tensor {leaf!r} is {specs[leaf].dtype}, which JAX holds "
                                           "only with jax.config.update('jax_enable_x64', True)")

    def run(values: dict[str, Any]) -> dict[str, Any]:
        pieces: dict[str, list[tuple[Region, Any, str]]] = {leaf: [] for leaf in names}
        for name, view in bound.items():
            out: list[tuple[str, Region, Any]] = []
            _inv(view, values[name], tuple((0, 1, n) for n in view.shape), out)
            for leaf, region, piece in out:
                pieces[leaf].append((region, piece, name))
        return {leaf: _assemble(leaf, specs[leaf].shape, specs[leaf].dtype, pieces[leaf], use_np) for leaf in names}

    if use_np:
        return run(arrays)
    import jax

    # One program for the whole inversion: XLA fuses the transposes, slices and concatenations and propagates
    # the targets' shardings to the saved tensors.
    result = jax.jit(run)(arrays)
    return {leaf: result[leaf] for leaf in names}


# -- saved shapes and dtypes ----------------------------------------------------------------------------


def _np_dtype(a: Any, name: str) -> np.dtype:
    try:
        return np.dtype(a.dtype)
    except TypeError:
        raise InvalidArgumentError(f"invert: target {name!r} has dtype {a.dtype}, which no saved tensor holds") from None


def _given_specs(saved_like: Any) -> tuple[dict[str, _Spec], list[str]]:
    """{saved name: spec} of ``saved_like`` and its names in order."""
    if saved_like is None:
        return {}, []
    from .checkpoint import Checkpoint

    if isinstance(saved_like, (str, os.PathLike)):
        from . import open as open_checkpoint

        with open_checkpoint(saved_like) as ckpt:
            return _given_specs(ckpt)
    if isinstance(saved_like, Checkpoint):
        infos = saved_like.tensors
        return ({n: _Spec(tuple(i.shape), np.dtype(i.dtype), f"checkpoint {saved_like.source}")
                 for n, i in infos.items()}, list(infos))
    if not isinstance(saved_like, Mapping):
        raise InvalidArgumentError("saved_like must be a jreshard.Checkpoint, its path, or a dict {saved name: "
                                   f"array-like or shape}}, not {type(saved_like).__name__}")
    out: dict[str, _Spec] = {}
    for name, v in saved_like.items():
        where = f"saved_like[{name!r}]"
        if isinstance(v, (tuple, list)) and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool)
                                                for s in v):
            out[name] = _Spec(tuple(int(s) for s in v), None, where)
        elif hasattr(v, "shape") and hasattr(v, "dtype"):
            try:
                dtype = np.dtype(v.dtype)
            except TypeError:
                dtype = _torch_dtype(v.dtype)
            out[name] = _Spec(tuple(int(s) for s in v.shape), dtype, where)
        else:
            raise InvalidArgumentError(f"invert: {where} is a {type(v).__name__}; give an array-like (with .shape and "
                                       ".dtype) or a shape tuple")
    return out, list(saved_like)


def _torch_dtype(dtype: Any) -> np.dtype | None:
    """A torch dtype (``torch.bfloat16``) as numpy's, by name, without importing torch; None if unknown."""
    from .dtypes import TORCH_DTYPES

    text = str(dtype)
    return TORCH_DTYPES.get(text[len("torch."):]) if text.startswith("torch.") else None


def _forward_shape(view: View, specs: dict[str, _Spec]) -> tuple[int, ...] | None:
    def lookup(n: str) -> tuple[tuple[int, ...], np.dtype]:
        s = specs.get(n)
        if s is None or s.shape is None:
            raise _Unknown(n)
        return s.shape, s.dtype if s.dtype is not None else np.dtype(np.float32)

    try:
        return view.bind(lookup).shape
    except (_Unknown, JReshardError):
        return None


def _set(specs: dict[str, _Spec], name: str, shape: tuple[int, ...] | None, dtype: np.dtype | None,
         source: str) -> bool:
    """Record what a target says of saved tensor ``name``; True when something new was learnt."""
    s = specs.get(name)
    if s is None:
        specs[name] = _Spec(shape, dtype, source)
        return shape is not None or dtype is not None
    changed = False
    if shape is None:
        pass
    elif s.shape is None:
        s.shape, s.source, changed = shape, source, True
    elif s.shape != shape:
        raise TargetMismatchError(f"invert: saved tensor {name!r} would have shape {shape} by {source} but {s.shape} "
                                  f"by {s.source}")
    if s.dtype is None and dtype is not None:
        s.dtype, changed = dtype, True
    return changed


def _dtype_down(view: View, dtype: np.dtype | None, specs: dict[str, _Spec], source: str) -> bool:
    """Record ``dtype`` for the saved tensors under ``view`` that no ``astype`` separates from its output."""
    if dtype is None or view._op == "astype":
        return False
    if view._op == "saved":
        return _set(specs, view._args, None, dtype, source)
    changed = False
    for k in view._kids:
        changed = _dtype_down(k, dtype, specs, source) or changed
    return changed


def _back(view: View, shape: tuple[int, ...], dtype: np.dtype | None, specs: dict[str, _Spec], source: str) -> bool:
    """Work the shapes (and dtypes) of the saved tensors under ``view`` out from its output's; True when
    something new was learnt."""
    changed = _dtype_down(view, dtype, specs, source)
    return _back_shape(view, shape, dtype, specs, source) or changed


def _back_shape(view: View, shape: tuple[int, ...], dtype: np.dtype | None, specs: dict[str, _Spec],
                source: str) -> bool:
    op, args, kids = view._op, view._args, view._kids
    if op == "saved":
        return _set(specs, args, shape, dtype, source)
    if op == "astype":
        return _back(kids[0], shape, None, specs, source)
    if op == "transpose":
        axes = _axes(args, len(shape), repr(view))
        inner = [0] * len(shape)
        for i, a in enumerate(axes):
            inner[a] = shape[i]
        return _back(kids[0], tuple(inner), dtype, specs, source)
    if op == "stack":
        if not shape:
            return False
        axis = _axis(args, len(shape), repr(view))
        if shape[axis] != len(kids):
            return False
        inner = shape[:axis] + shape[axis + 1:]
        changed = False
        for k in kids:  # every kid, not just until the first change
            changed = _back(k, inner, dtype, specs, source) or changed
        return changed
    if op == "concat":
        if not shape:
            return False
        axis = _axis(args, len(shape), repr(view))
        known = [_forward_shape(k, specs) for k in kids]
        missing = [i for i, s in enumerate(known) if s is None]
        if len(missing) == 1:
            rest = shape[axis] - sum(s[axis] for s in known if s is not None and len(s) == len(shape))
            if rest >= 0:
                known[missing[0]] = shape[:axis] + (rest,) + shape[axis + 1:]
        changed = False
        for k, s in zip(kids, known):
            if s is not None:
                changed = _back(k, s, dtype, specs, source) or changed
        return changed
    if op == "index":
        inner = _index_input_shape(args, shape)
        return _back(kids[0], inner, dtype, specs, source) if inner is not None else False
    return False  # reshape: the input's shape is not determined by the output's


def _index_input_shape(key: tuple[Any, ...], shape: tuple[int, ...]) -> tuple[int, ...] | None:
    """The input shape of an index made only of full slices (any direction), ``...`` and ``None``; else None."""
    for k in key:
        if not (k is None or k is Ellipsis or (isinstance(k, slice) and k.start is None and k.stop is None
                                                and k.step in (None, 1, -1))):
            return None
    n_slices = sum(1 for k in key if isinstance(k, slice))
    n_new = sum(1 for k in key if k is None)
    n_ellipsis = len(shape) - n_slices - n_new
    if n_ellipsis < 0 or (n_ellipsis and Ellipsis not in key):
        if Ellipsis not in key and n_ellipsis > 0:
            key = key + (Ellipsis,)
        else:
            return None
    out: list[int] = []
    o = 0
    for k in key:
        if k is None:
            o += 1
        elif k is Ellipsis:
            out.extend(shape[o:o + n_ellipsis])
            o += n_ellipsis
        else:
            out.append(shape[o])
            o += 1
    return tuple(out)


def _infer(entries: dict[str, View], arrays: dict[str, Any], specs: dict[str, _Spec]) -> None:
    """Fill ``specs`` with what the targets tell of the saved tensors, until nothing new is learnt."""
    changed = True
    while changed:
        changed = False
        for name, view in entries.items():
            a = arrays[name]
            shape = tuple(int(s) for s in a.shape)
            changed = _back(view, shape, _np_dtype(a, name), specs, f"target {name!r}") or changed


def _bind(entries: dict[str, View], arrays: dict[str, Any], specs: dict[str, _Spec]) -> dict[str, View]:
    """Every view bound to the saved shapes and dtypes, checked against its array."""
    for name, view in entries.items():
        for leaf in view.names():
            s = specs.get(leaf)
            if s is None or s.shape is None or s.dtype is None:
                what = "shape" if s is None or s.shape is None else "dtype"
                raise InvalidArgumentError(
                    f"invert: the {what} of saved tensor {leaf!r} cannot be worked out from target {name!r} "
                    f"({view!r}): a reshape, a partial index, a concat of unknown parts or an astype hides it; give "
                    f"saved_like= (the checkpoint the mapping was made for, or {{{leaf!r}: (shape, dtype)-like}})")
    out: dict[str, View] = {}
    for name, view in entries.items():
        bound = view.bind(lambda n: (specs[n].shape, specs[n].dtype))
        a = arrays[name]
        shape, dtype = tuple(int(s) for s in a.shape), _np_dtype(a, name)
        if bound.shape != shape:
            raise TargetMismatchError(f"invert: target {name!r} has shape {shape} but its mapping entry {bound!r} "
                                      f"gives {bound.shape}")
        for leaf in bound.names():
            if dtype.kind == "c" and specs[leaf].dtype.kind != "c":
                raise TargetMismatchError(f"invert: target {name!r} is {dtype}; casting it to the {specs[leaf].dtype} "
                                          f"of saved tensor {leaf!r} would drop the imaginary part")
        out[name] = bound
    return out


# -- running views backwards ----------------------------------------------------------------------------


def _index(a: Any, axis: int, key: Any) -> Any:
    return a[(slice(None),) * axis + (key,)]


def _inv(view: View, a: Any, region: Region, out: list[tuple[str, Region, Any]]) -> None:
    """Append (saved name, region of it, values) for the part ``region`` of ``view``'s output that ``a`` holds."""
    if any(c == 0 for _, _, c in region):
        return
    op, args, kids = view._op, view._args, view._kids
    if op == "saved":
        out.append((args, region, a))
    elif op == "astype":
        _inv(kids[0], a, region, out)
    elif op == "transpose":
        axes = _axes(args, len(region), repr(view))
        inverse = [0] * len(axes)
        for i, ax in enumerate(axes):
            inverse[ax] = i
        _inv(kids[0], a.transpose(inverse), tuple(region[i] for i in inverse), out)
    elif op == "stack":
        axis = _axis(args, len(region), repr(view))
        s, st, c = region[axis]
        rest = region[:axis] + region[axis + 1:]
        for j in range(c):
            _inv(kids[s + j * st], _index(a, axis, j), rest, out)
    elif op == "concat":
        axis = _axis(args, len(region), repr(view))
        s, st, c = region[axis]
        off = 0
        for kid in kids:
            n = kid.shape[axis]
            j0 = max(0, -((s - off) // st))  # first j with s + j*st >= off
            j1 = min(c, -((s - off - n) // st))  # first j with s + j*st >= off + n
            if j0 < j1:
                sub = _index(a, axis, slice(j0, j1)) if (j0, j1) != (0, c) else a
                _inv(kid, sub, region[:axis] + ((s + j0 * st - off, st, j1 - j0),) + region[axis + 1:], out)
            off += n
    elif op == "index":
        _inv_index(view, a, region, out)
    elif op == "reshape":
        kid = kids[0]
        if all(r == (0, 1, n) for r, n in zip(region, view.shape)):
            _inv(kid, a.reshape(kid.shape), tuple((0, 1, n) for n in kid.shape), out)
        else:
            _inv_partial_reshape(view, a, region, out)
    else:  # pragma: no cover
        raise AssertionError(op)


def _inv_index(view: View, a: Any, region: Region, out: list[tuple[str, Region, Any]]) -> None:
    kid = view._kids[0]
    plan, _ = _index_plan(kid.shape, view._args, repr(view))
    inner: list[tuple[int, int, int] | None] = [None] * len(kid.shape)
    squeeze: list[int] = []
    flip: list[int] = []
    ints: list[int] = []
    o = 0
    for kind, d, start, step in plan:
        if kind == "new":
            squeeze.append(o)
            o += 1
        elif kind == "slice":
            r0, rs, rc = region[o]
            if step > 0:
                inner[d] = (start + r0 * step, rs * step, rc)
            else:
                inner[d] = (start + (r0 + (rc - 1) * rs) * step, -rs * step, rc)
                flip.append(o)
            o += 1
        else:  # int
            inner[d] = (start, 1, 1)
            ints.append(d)
    if flip:
        a = a[tuple(slice(None, None, -1) if i in flip else slice(None) for i in range(a.ndim))]
    if squeeze:
        a = a.reshape(tuple(n for i, n in enumerate(a.shape) if i not in squeeze))
    for d in sorted(ints):
        a = a[(slice(None),) * d + (None,)]
    assert all(r is not None for r in inner)
    _inv(kid, a, tuple(inner), out)  # type: ignore[arg-type]


def _split_segments(sizes: list[int], region: list[tuple[int, int, int]]
                    ) -> list[tuple[list[tuple[int, int]], int, tuple[int, int, int]]]:
    """The part ``region`` of dims ``sizes`` (one reshape group's output) as runs of the group's C-order
    linear index: (fixed (dim, position in the region) pairs, first flattened dim, (start, step, count))."""
    lin = c_strides(sizes)
    m = len(sizes)
    t = max((k for k in range(m) if region[k] != (0, 1, sizes[k])), default=-1)
    if t < 0:
        return [([], 0, (0, 1, math.prod(sizes)))]
    s_t, st_t, c_t = region[t]
    if t == m - 1 or st_t == 1:
        iterate, flat_from = list(range(t)), t
    else:
        iterate, flat_from = list(range(t + 1)), t + 1
    out = []
    for js in itertools.product(*[range(region[k][2]) for k in iterate]):
        base = sum((region[k][0] + j * region[k][1]) * lin[k] for k, j in zip(iterate, js))
        fixed = list(zip(iterate, js))
        if flat_from == m:
            seg = (base, 1, 1)
        elif t == m - 1 and flat_from == t:
            seg = (base + s_t, st_t, c_t)
        elif flat_from == t:
            seg = (base + s_t * lin[t], 1, c_t * lin[t])
        else:
            seg = (base, 1, lin[t])
        out.append((fixed, flat_from, seg))
    return out


def _merge_boxes(seg: tuple[int, int, int], sizes: list[int]) -> list[tuple[int, int, list[tuple[int, int, int]]]]:
    """A run (start, step, count) of the C-order linear index over dims ``sizes`` (one reshape group's input)
    as boxes: (first, end) positions in the run and the box (start, step, count) per dim."""
    s, st, c = seg
    if len(sizes) == 1:
        return [(0, c, [(s, st, c)])]
    if st == 1 or c == 1:
        return [(first - s, first - s + math.prod(b - a for a, b in box), [(a, 1, b - a) for a, b in box])
                for box, first in _linear_boxes(s, s + (c - 1) * st + 1, sizes)]
    inner = math.prod(sizes[1:])
    if st % inner == 0:
        pos = list(np.unravel_index(s % inner, sizes[1:])) if inner > 1 else []
        return [(0, c, [(s // inner, st // inner, c)] + [(int(p), 1, 1) for p in pos])]
    out = []
    for j in range(c):
        idx = np.unravel_index(s + j * st, sizes)
        out.append((j, j + 1, [(int(i), 1, 1) for i in idx]))
    return out


def _inv_partial_reshape(view: View, a: Any, region: Region, out: list[tuple[str, Region, Any]]) -> None:
    kid = view._kids[0]
    src, dst = kid.shape, view.shape
    keep = [i for i, n in enumerate(dst) if n != 1]
    a = a.reshape(tuple(a.shape[i] for i in keep))
    pos = {d: p for p, d in enumerate(keep)}
    options = []
    for gin, gout in _groups(src, dst):
        per = []
        for fixed, flat_from, seg in _split_segments([dst[d] for d in gout], [region[d] for d in gout]):
            flat_len = seg[2]
            for j0, j1, box in _merge_boxes(seg, [src[d] for d in gin]):
                per.append(([(pos[gout[k]], j) for k, j in fixed], [pos[d] for d in gout[flat_from:]], flat_len,
                            j0, j1, list(zip(gin, box))))
        options.append(per)
    ones = [d for d, n in enumerate(src) if n == 1]
    for combo in itertools.product(*options):
        key: list[Any] = [slice(None)] * a.ndim
        for fixed, *_ in combo:
            for p, j in fixed:
                key[p] = j
        piece = a[tuple(key)] if any(isinstance(k, int) for k in key) else a
        piece = piece.reshape(tuple(flat_len for _, _, flat_len, _, _, _ in combo))
        sl = tuple(slice(j0, j1) for _, _, _, j0, j1, _ in combo)
        if any((j0, j1) != (0, n) for (_, _, n, j0, j1, _) in combo):
            piece = piece[sl]
        inner: list[tuple[int, int, int]] = [(0, 1, 1)] * len(src)
        counts = []
        for *_, box in combo:
            for d, r in box:
                inner[d] = r
                counts.append(r[2])
        piece = piece.reshape(tuple(counts))
        for d in ones:
            piece = piece[(slice(None),) * d + (None,)]
        _inv(kid, piece, tuple(inner), out)


# -- reassembling saved tensors ---------------------------------------------------------------------------


def _last(r: tuple[int, int, int]) -> int:
    s, st, c = r
    return s + (c - 1) * st


def _ap_meet(a: tuple[int, int, int], b: tuple[int, int, int]) -> bool:
    """Whether two arithmetic progressions (start, step, count) share an element."""
    lo, hi = max(a[0], b[0]), min(_last(a), _last(b))
    if lo > hi:
        return False
    g = math.gcd(a[1], b[1])
    if (b[0] - a[0]) % g:
        return False
    # x = a0 + i*a1 = b0 (mod b1): i = (b0 - a0)/g * inv(a1/g) mod b1/g
    m = b[1] // g
    i = ((b[0] - a[0]) // g * pow(a[1] // g, -1, m)) % m if m > 1 else 0
    x = a[0] + i * a[1]
    period = a[1] * m
    if x < lo:
        x += -((x - lo) // period) * period
    return x <= hi


def _check_cover(name: str, shape: tuple[int, ...], pieces: list[tuple[Region, Any, str]]) -> None:
    for r, _, _ in pieces:
        for (s, st, c), n in zip(r, shape):
            assert 0 <= s and s + (c - 1) * st < n, (name, r, shape)
    items = sorted(pieces, key=lambda p: p[0][0][0] if p[0] else 0)
    for i, (r1, _, t1) in enumerate(items):
        for r2, _, t2 in items[i + 1:]:
            if r1 and r2[0][0] > _last(r1[0]):
                break
            if all(_ap_meet(x, y) for x, y in zip(r1, r2)):
                why = "twice by target " + repr(t1) if t1 == t2 else f"by both targets {t1!r} and {t2!r}"
                raise TargetMismatchError(
                    f"invert: saved tensor {name!r} is not invertible from this mapping: some of its elements are read "
                    f"{why} (overlapping pieces); leave one of them out of the tree and the mapping")
    covered = sum(math.prod(c for _, _, c in r) for r, _, _ in pieces)
    size = math.prod(shape)
    if covered != size:
        targets = sorted({t for _, _, t in pieces})
        raise TargetMismatchError(
            f"invert: saved tensor {name!r} {shape} is only partly covered by the mapping: the targets "
            f"{', '.join(map(repr, targets)) or '(none)'} hold {covered} of its {size} elements (an index or slice "
            "drops the rest); map the rest to some target too")


def _assemble(name: str, shape: tuple[int, ...], dtype: np.dtype, pieces: list[tuple[Region, Any, str]],
              use_np: bool) -> Any:
    _check_cover(name, shape, pieces)
    parts = [(r, p.astype(dtype) if np.dtype(p.dtype) != dtype else p) for r, p, _ in pieces]
    if not parts:  # an empty tensor
        return np.zeros(shape, dtype) if use_np else _jnp().zeros(shape, dtype)
    return _build(parts, tuple((0, n) for n in shape), dtype, use_np)


def _jnp() -> Any:
    import jax.numpy as jnp

    return jnp


def _build(parts: list[tuple[Region, Any]], bounds: tuple[tuple[int, int], ...], dtype: np.dtype, use_np: bool) -> Any:
    """The box ``bounds`` of the saved tensor from the pieces that tile it exactly: concatenation along cuts no
    piece crosses, else strided updates of a zero array."""
    if len(parts) == 1:
        r, p = parts[0]
        if all(st == 1 or c == 1 for _, st, c in r):
            return p
    for d, (lo, hi) in enumerate(bounds):
        starts = sorted({r[d][0] for r, _ in parts} - {lo})
        cuts = [c for c in starts if not any(r[d][0] < c <= _last(r[d]) for r, _ in parts)]
        if not cuts:
            continue
        edges = [lo, *cuts, hi]
        slabs = []
        for a, b in itertools.pairwise(edges):
            sub = [(r, p) for r, p in parts if a <= r[d][0] < b]
            slabs.append(_build(sub, bounds[:d] + ((a, b),) + bounds[d + 1:], dtype, use_np))
        xp = np if use_np else _jnp()
        return xp.concatenate(slabs, axis=d)
    shape = tuple(b - a for a, b in bounds)
    if use_np:
        out = np.zeros(shape, dtype)
        for r, p in parts:
            out[_slices(r, bounds)] = p
        return out
    out = _jnp().zeros(shape, dtype)
    for r, p in parts:
        out = out.at[_slices(r, bounds)].set(p)
    return out


def _slices(r: Region, bounds: tuple[tuple[int, int], ...]) -> tuple[slice, ...]:
    return tuple(slice(s - lo, s - lo + (c - 1) * st + 1, st) for (s, st, c), (lo, _) in zip(r, bounds))


__all__ = ["invert"]
