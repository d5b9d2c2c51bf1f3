"""Lazy, numpy-like views over saved tensors, traced per shard.

A :class:`View` is an expression over saved tensors: :func:`saved` names one, and ``.T``, ``.transpose``,
``.reshape``, basic indexing, ``.astype``, :func:`stack` and :func:`concat` combine them. Nothing is read when
a view is made. When a target shard (a box of the view's index space) is loaded, :meth:`View.trace` maps the
box back through the expression to boxes of saved tensors, each with the place its elements take in the
shard's buffer (an offset and a stride per saved dimension). Every device therefore reads only the saved bytes
its shard needs; no whole tensor is ever assembled.

Views made by :func:`saved` alone are *unbound*: their shapes are known once a checkpoint is given (at
:func:`jreshard.load` / :func:`jreshard.plan`), and every operation is checked then, with an error naming the
expression. Views made by :meth:`jreshard.Checkpoint.saved` are *bound*: each operation is checked at once.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from .errors import InvalidArgumentError, TargetMismatchError
from .planning import c_strides

Box = tuple[tuple[int, int], ...]


@dataclass(frozen=True)
class Leaf:
    """A box of saved tensor ``name`` and where its elements go: element ``i`` (relative to the box start) of
    the box lands at element ``dst + sum(i_k * strides_k)`` of the shard buffer. ``casts``: the dtypes its
    values are cast to, in order, before they land (empty: none)."""

    name: str
    box: Box
    dst: int
    strides: tuple[int, ...]
    casts: tuple[np.dtype, ...] = ()

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(b - a for a, b in self.box)


class View:
    """A lazy view of saved tensors. Make one with :func:`saved`, :func:`stack` or :func:`concat`.

    Example:
        >>> import jreshard
        >>> v = jreshard.saved("model.layers.0.w1").T.reshape(4, 8, -1)
        >>> v
        saved('model.layers.0.w1').T.reshape(4, 8, -1)
    """

    __slots__ = ("_args", "_dtype", "_kids", "_op", "_shape", "_text")

    def __init__(self, op: str, args: Any, kids: tuple[View, ...], text: str,
                 shape: tuple[int, ...] | None = None, dtype: np.dtype | None = None) -> None:
        self._op = op
        self._args = args
        self._kids = kids
        self._text = text
        self._shape = shape
        self._dtype = dtype
        if shape is None and kids and all(k._shape is not None for k in kids):
            self._shape, self._dtype = self._infer([(k._shape, k._dtype) for k in kids])

    # -- properties --------------------------------------------------------------------------------

    @property
    def shape(self) -> tuple[int, ...]:
        """The view's shape (an unbound view learns it when a checkpoint is given)."""
        if self._shape is None:
            raise InvalidArgumentError(f"{self!r}: its shape is known once it is read from a checkpoint "
                                       "(use Checkpoint.saved(name) for a view checked at once)")
        return self._shape

    @property
    def dtype(self) -> np.dtype:
        """The view's numpy dtype."""
        if self._dtype is None:
            raise InvalidArgumentError(f"{self!r}: its dtype is known once it is read from a checkpoint")
        return self._dtype

    @property
    def ndim(self) -> int:
        """Number of dimensions of the view."""
        return len(self.shape)

    @property
    def size(self) -> int:
        """Number of elements of the view."""
        return math.prod(self.shape)

    def __repr__(self) -> str:
        return self._text

    def nodes(self) -> Iterator[View]:
        """This view and every view it is made of, depth first."""
        stack = [self]
        while stack:
            v = stack.pop()
            yield v
            stack.extend(reversed(v._kids))

    def names(self) -> list[str]:
        """The saved tensors this view reads, in first-use order.

        Example:
            >>> import jreshard
            >>> jreshard.stack([jreshard.saved("a"), jreshard.saved("b")]).names()
            ['a', 'b']
        """
        return list(dict.fromkeys(v._args for v in self.nodes() if v._op == "saved"))

    # -- operations ------------------------------------------------------------------------------

    @property
    def T(self) -> View:
        """The dimensions reversed (numpy's ``.T``)."""
        return self._make("transpose", None, f"{self._text}.T")

    def transpose(self, *axes: int) -> View:
        """The dimensions permuted: ``axes`` as in ``numpy.transpose`` (none given: reversed).

        Example:
            >>> import jreshard
            >>> jreshard.saved("w").transpose(1, 0)
            saved('w').transpose(1, 0)
        """
        if len(axes) == 1 and isinstance(axes[0], (tuple, list)):
            axes = tuple(axes[0])
        if not axes:
            return self._make("transpose", None, f"{self._text}.transpose()")
        axes = tuple(_int(a, "transpose axis") for a in axes)
        return self._make("transpose", axes, f"{self._text}.transpose({', '.join(map(str, axes))})")

    def reshape(self, *shape: int) -> View:
        """The same elements in C order under another shape (one ``-1`` allowed): splits and merges
        dimensions, as ``numpy.reshape`` does.

        Example:
            >>> import jreshard
            >>> jreshard.saved("qkv").reshape(3, 4, -1)
            saved('qkv').reshape(3, 4, -1)
        """
        if len(shape) == 1 and isinstance(shape[0], (tuple, list)):
            shape = tuple(shape[0])
        shape = tuple(_int(s, "reshape size") for s in shape)
        if sum(1 for s in shape if s == -1) > 1 or any(s < -1 for s in shape):
            raise InvalidArgumentError(f"{self._text}.reshape{shape}: sizes must be >= 0, with at most one -1")
        return self._make("reshape", shape, f"{self._text}.reshape({', '.join(map(str, shape))})")

    def astype(self, dtype: Any) -> View:
        """The values cast to ``dtype`` (per shard, as ``numpy.astype`` with unsafe casting would).

        Example:
            >>> import jreshard, numpy as np
            >>> jreshard.saved("w").astype(np.float16)
            saved('w').astype(float16)
        """
        try:
            dt = np.dtype(dtype)
        except TypeError as e:
            raise InvalidArgumentError(f"{self._text}.astype({dtype!r}): not a dtype: {e}") from None
        if not (dt.kind in "biufc" or type(dt.type).__module__.startswith("ml_dtypes")
                or dt.type.__module__.startswith("ml_dtypes")) or dt.hasobject:
            raise InvalidArgumentError(f"{self._text}.astype({dt}): only boolean and numeric dtypes")
        return self._make("astype", dt, f"{self._text}.astype({dt})")

    def __getitem__(self, key: Any) -> View:
        """Basic indexing: integers, slices (any non-zero step), ``...`` and ``None``.

        Example:
            >>> import jreshard
            >>> jreshard.saved("w")[0, 2:4]
            saved('w')[0, 2:4]
        """
        key = key if isinstance(key, tuple) else (key,)
        for k in key:
            if not (k is None or k is Ellipsis or isinstance(k, slice) or _is_int(k)):
                raise InvalidArgumentError(f"{self._text}[{key!r}]: only integers, slices, ... and None index a view")
            if isinstance(k, slice):
                for part in (k.start, k.stop, k.step):
                    if part is not None and not _is_int(part):
                        raise InvalidArgumentError(f"{self._text}: slice {k!r} must have integer bounds")
                if k.step is not None and int(k.step) == 0:
                    raise InvalidArgumentError(f"{self._text}: slice step cannot be zero")
        key = tuple(slice(*(None if p is None else int(p) for p in (k.start, k.stop, k.step))) if isinstance(k, slice)
                    else (int(k) if _is_int(k) else k) for k in key)
        return self._make("index", key, f"{self._text}[{', '.join(_key_text(k) for k in key)}]")

    def _make(self, op: str, args: Any, text: str) -> View:
        return View(op, args, (self,), text)

    # -- shapes ----------------------------------------------------------------------------------

    def _infer(self, kids: list[tuple[tuple[int, ...], np.dtype]]) -> tuple[tuple[int, ...], np.dtype]:
        """Shape and dtype of this node from its children's, checked (TargetMismatchError naming the view)."""
        op, args = self._op, self._args
        shape, dtype = kids[0]
        if op == "transpose":
            axes = _axes(args, len(shape), self._text)
            return tuple(shape[a] for a in axes), dtype
        if op == "reshape":
            return _reshape_shape(shape, args, self._text), dtype
        if op == "astype":
            if dtype.kind == "c" and args.kind != "c":
                raise TargetMismatchError(f"{self._text}: cannot cast {dtype} to {args} (drops the imaginary part)")
            return shape, args
        if op == "index":
            return _index_plan(shape, args, self._text)[1], dtype
        if op in ("stack", "concat"):
            dtypes = {d for _, d in kids}
            if len(dtypes) > 1:
                raise TargetMismatchError(f"{self._text}: the views have different dtypes "
                                          f"({', '.join(sorted(map(str, dtypes)))}); cast them with .astype first")
            shapes = [s for s, _ in kids]
            if op == "stack":
                if len(set(shapes)) > 1:
                    raise TargetMismatchError(f"{self._text}: stacked views must have one shape, not {_shapes(shapes)}")
                axis = _axis(args, len(shape) + 1, self._text)
                return shape[:axis] + (len(kids),) + shape[axis:], dtype
            axis = _axis(args, len(shape), self._text)
            if any(len(s) != len(shape) or s[:axis] + s[axis + 1:] != shape[:axis] + shape[axis + 1:] for s in shapes):
                raise TargetMismatchError(f"{self._text}: concatenated views must match except along axis {axis}, "
                                          f"not {_shapes(shapes)}")
            return shape[:axis] + (sum(s[axis] for s in shapes),) + shape[axis + 1:], dtype
        raise AssertionError(op)

    def bind(self, lookup: Callable[[str], tuple[tuple[int, ...], np.dtype]]) -> View:
        """This view with every shape known: ``lookup(name)`` gives a saved tensor's (shape, dtype). Raises
        TargetMismatchError naming the first operation that does not fit its input."""
        if self._shape is not None:
            return self
        if self._op == "saved":
            shape, dtype = lookup(self._args)
            return View("saved", self._args, (), self._text, tuple(shape), np.dtype(dtype))
        kids = tuple(k.bind(lookup) for k in self._kids)
        return View(self._op, self._args, kids, self._text)

    # -- tracing ---------------------------------------------------------------------------------

    def trace(self, box: Box, dst: int = 0, strides: Sequence[int] | None = None) -> Iterator[Leaf]:
        """The saved boxes a box of this (bound) view reads, each with where its elements go in a buffer of
        the box's shape (C order unless ``strides``, per view dimension, are given).

        Example:
            >>> import numpy as np
            >>> v = View("saved", "w", (), "saved('w')", (4, 6), np.dtype("f4")).T
            >>> [(l.name, l.box, l.dst, l.strides) for l in v.trace(((0, 6), (2, 4)))]
            [('w', ((2, 4), (0, 6)), 0, (1, 2))]
        """
        shape = self.shape
        if len(box) != len(shape):
            raise TargetMismatchError(f"{self._text}: box {box} does not have {len(shape)} dimensions")
        if strides is None:
            strides = c_strides([b - a for a, b in box])
        if any(b <= a for a, b in box):
            return
        yield from self._trace(tuple(box), int(dst), tuple(strides), ())

    def _trace(self, box: Box, dst: int, strides: tuple[int, ...], casts: tuple[np.dtype, ...]) -> Iterator[Leaf]:
        op, args = self._op, self._args
        if op == "saved":
            yield Leaf(args, box, dst, strides, casts)
            return
        kid = self._kids[0]
        if op == "astype":
            yield from kid._trace(box, dst, strides, (args,) + casts)
        elif op == "transpose":
            axes = _axes(args, len(box), self._text)
            inb = [None] * len(box)
            ins = [0] * len(box)
            for i, a in enumerate(axes):
                inb[a] = box[i]
                ins[a] = strides[i]
            yield from kid._trace(tuple(inb), dst, tuple(ins), casts)
        elif op == "index":
            plan, _ = _index_plan(kid.shape, args, self._text)
            yield from _trace_index(kid, plan, box, dst, strides, casts)
        elif op == "reshape":
            yield from _trace_reshape(kid, self.shape, box, dst, strides, casts)
        elif op == "stack":
            axis = _axis(args, len(box), self._text)
            a, b = box[axis]
            rest = box[:axis] + box[axis + 1:]
            rs = strides[:axis] + strides[axis + 1:]
            for k in range(a, b):
                yield from self._kids[k]._trace(rest, dst + (k - a) * strides[axis], rs, casts)
        elif op == "concat":
            axis = _axis(args, len(box), self._text)
            a, b = box[axis]
            off = 0
            for k in self._kids:
                n = k.shape[axis]
                lo, hi = max(a, off), min(b, off + n)
                if lo < hi:
                    sub = box[:axis] + ((lo - off, hi - off),) + box[axis + 1:]
                    yield from k._trace(sub, dst + (lo - a) * strides[axis], strides, casts)
                off += n
        else:  # pragma: no cover
            raise AssertionError(op)


def saved(name: str) -> View:
    """A lazy view of the saved tensor ``name``; its shape is known when a checkpoint is given.

    Example:
        >>> import jreshard
        >>> jreshard.saved("model.embed.weight").T
        saved('model.embed.weight').T
    """
    if not isinstance(name, str):
        raise InvalidArgumentError(f"saved() takes a tensor name (str), not {type(name).__name__}")
    return View("saved", name, (), f"saved({name!r})")


def stack(views: Sequence[View | str], axis: int = 0) -> View:
    """The views stacked along a new dimension ``axis`` (as ``numpy.stack``); strings are saved names.

    Example:
        >>> import jreshard
        >>> jreshard.stack([f"layers.{i}.w" for i in range(2)])
        stack([saved('layers.0.w'), saved('layers.1.w')], axis=0)
    """
    kids = _views(views, "stack")
    axis = _int(axis, "stack axis")
    return View("stack", axis, kids, f"stack([{_join(kids)}], axis={axis})")


def concat(views: Sequence[View | str], axis: int = 0) -> View:
    """The views joined along an existing dimension ``axis`` (as ``numpy.concatenate``).

    Example:
        >>> import jreshard
        >>> jreshard.concat(["gate", "up"], axis=0)
        concat([saved('gate'), saved('up')], axis=0)
    """
    kids = _views(views, "concat")
    axis = _int(axis, "concat axis")
    return View("concat", axis, kids, f"concat([{_join(kids)}], axis={axis})")


def as_view(value: Any, where: str) -> View:
    """A mapping value as a view: a view itself, or a saved name."""
    if isinstance(value, View):
        return value
    if isinstance(value, str):
        return saved(value)
    raise InvalidArgumentError(f"mapping entry {where!r}: give a saved tensor name or a view "
                               f"(jreshard.saved(...)), not {type(value).__name__}")


# -- helpers ---------------------------------------------------------------------------------------


def _is_int(x: Any) -> bool:
    return isinstance(x, numbers.Integral) and not isinstance(x, bool)


def _int(x: Any, what: str) -> int:
    if not _is_int(x):
        raise InvalidArgumentError(f"{what} must be an integer, not {x!r}")
    return int(x)


def _views(views: Sequence[View | str], what: str) -> tuple[View, ...]:
    if isinstance(views, (str, View)) or not isinstance(views, (list, tuple)):
        raise InvalidArgumentError(f"{what}() takes a list of views")
    if not views:
        raise InvalidArgumentError(f"{what}() needs at least one view")
    return tuple(as_view(v, f"{what}() item") for v in views)


def _join(kids: Sequence[View]) -> str:
    if len(kids) > 6:
        return ", ".join(map(repr, kids[:3])) + f", ... ({len(kids) - 4} more), {kids[-1]!r}"
    return ", ".join(map(repr, kids))


def _shapes(shapes: Sequence[tuple[int, ...]]) -> str:
    distinct = list(dict.fromkeys(shapes))
    return ", ".join(map(str, distinct[:4])) + (" ..." if len(distinct) > 4 else "")


def _key_text(k: Any) -> str:
    if k is None:
        return "None"
    if k is Ellipsis:
        return "..."
    if isinstance(k, slice):
        text = f"{'' if k.start is None else k.start}:{'' if k.stop is None else k.stop}"
        return text + (f":{k.step}" if k.step is not None else "")
    return str(k)


def _axis(axis: int, ndim: int, text: str) -> int:
    if not -ndim <= axis < ndim:
        raise TargetMismatchError(f"{text}: axis {axis} is out of range for {ndim} dimensions")
    return axis % ndim


def _axes(axes: tuple[int, ...] | None, ndim: int, text: str) -> tuple[int, ...]:
    if axes is None:
        return tuple(range(ndim - 1, -1, -1))
    if len(axes) != ndim or sorted(a % ndim if -ndim <= a < ndim else -1 for a in axes) != list(range(ndim)):
        raise TargetMismatchError(f"{text}: axes {axes} are not a permutation of {ndim} dimensions")
    return tuple(a % ndim for a in axes)


def _reshape_shape(shape: tuple[int, ...], new: tuple[int, ...], text: str) -> tuple[int, ...]:
    total = math.prod(shape)
    if -1 in new:
        known = math.prod(s for s in new if s != -1)
        if known == 0 or total % known:
            raise TargetMismatchError(f"{text}: cannot reshape {shape} ({total} elements) to {new}")
        new = tuple(total // known if s == -1 else s for s in new)
    if math.prod(new) != total:
        raise TargetMismatchError(f"{text}: cannot reshape {shape} ({total} elements) to {new} "
                                  f"({math.prod(new)} elements)")
    return new


def _index_plan(shape: tuple[int, ...], key: tuple[Any, ...], text: str
                ) -> tuple[list[tuple[str, int, int, int]], tuple[int, ...]]:
    """Per input dimension and new axis, in output order: ("int", dim, i, 0), ("slice", dim, start, step) or
    ("new", -1, 0, 0); and the output shape."""
    n_real = sum(1 for k in key if k is not None and k is not Ellipsis)
    if sum(1 for k in key if k is Ellipsis) > 1:
        raise TargetMismatchError(f"{text}: at most one ...")
    if n_real > len(shape):
        raise TargetMismatchError(f"{text}: {n_real} indices for {len(shape)} dimensions")
    full: list[Any] = []
    for k in key:
        if k is Ellipsis:
            full.extend([slice(None)] * (len(shape) - n_real))
        else:
            full.append(k)
    if Ellipsis not in key:
        full.extend([slice(None)] * (len(shape) - n_real))
    plan: list[tuple[str, int, int, int]] = []
    out: list[int] = []
    d = 0
    for k in full:
        if k is None:
            plan.append(("new", -1, 0, 0))
            out.append(1)
            continue
        size = shape[d]
        if isinstance(k, slice):
            start, stop, step = k.indices(size)
            n = len(range(start, stop, step))
            plan.append(("slice", d, start, step))
            out.append(n)
        else:
            i = k + size if k < 0 else k
            if not 0 <= i < size:
                raise TargetMismatchError(f"{text}: index {k} is out of bounds for dimension {d} of size {size}")
            plan.append(("int", d, i, 0))
        d += 1
    return plan, tuple(out)


def _trace_index(kid: View, plan: list[tuple[str, int, int, int]], box: Box, dst: int, strides: tuple[int, ...],
                 casts: tuple[np.dtype, ...]) -> Iterator[Leaf]:
    ndim = len(kid.shape)
    inb: list[Any] = [None] * ndim
    ins = [0] * ndim
    stepped: list[tuple[int, int, int, int, int]] = []  # (input dim, start, step, out range start, out stride)
    o = 0
    for kind, d, a, step in plan:
        if kind == "int":
            inb[d] = (a, a + 1)
            continue
        if kind == "slice":
            lo, hi = box[o]
            if step == 1:
                inb[d] = (a + lo, a + hi)
                ins[d] = strides[o]
            else:
                stepped.append((d, a, step, o, strides[o]))
        o += 1
    if not stepped:
        yield from kid._trace(tuple(inb), dst, tuple(ins), casts)
        return
    # Strided slices: one box per selected index along those dimensions.
    ranges = [range(box[o][0], box[o][1]) for _, _, _, o, _ in stepped]
    for combo in _product(ranges):
        off = dst
        for (d, a, step, o, s), k in zip(stepped, combo):
            i = a + k * step
            inb[d] = (i, i + 1)
            off += (k - box[o][0]) * s
        yield from kid._trace(tuple(inb), off, tuple(ins), casts)


def _product(ranges: Sequence[range]) -> Iterator[tuple[int, ...]]:
    import itertools

    return itertools.product(*ranges)


def _groups(src: tuple[int, ...], dst: tuple[int, ...]) -> list[tuple[list[int], list[int]]]:
    """Dimensions of ``src`` and ``dst`` (size-1 dimensions left out) in groups of equal element counts, in
    order: each group is a reshape of a run of src dims into a run of dst dims."""
    a = [i for i, n in enumerate(src) if n != 1]
    b = [j for j, n in enumerate(dst) if n != 1]
    out: list[tuple[list[int], list[int]]] = []
    i = j = 0
    while i < len(a) or j < len(b):
        ga, gb = [a[i]], [b[j]]
        pa, pb = src[a[i]], dst[b[j]]
        i += 1
        j += 1
        while pa != pb:
            if pa < pb:
                ga.append(a[i])
                pa *= src[a[i]]
                i += 1
            else:
                gb.append(b[j])
                pb *= dst[b[j]]
                j += 1
        out.append((ga, gb))
    return out


def _trace_reshape(kid: View, shape: tuple[int, ...], box: Box, dst: int, strides: tuple[int, ...],
                   casts: tuple[np.dtype, ...]) -> Iterator[Leaf]:
    src = kid.shape
    if math.prod(src) == 0:
        return
    per_group = []
    for gin, gout in _groups(src, shape):
        per_group.append((gin, _group_regions([src[d] for d in gin], [shape[d] for d in gout],
                                              [box[d] for d in gout], [strides[d] for d in gout])))
    ones = [d for d, n in enumerate(src) if n == 1]
    for combo in _product([range(len(regions)) for _, regions in per_group]):
        inb: list[Any] = [None] * len(src)
        ins = [0] * len(src)
        off = dst
        for d in ones:
            inb[d] = (0, 1)
        for (gin, regions), r in zip(per_group, combo):
            rbox, rdst, rstrides = regions[r]
            off += rdst
            for d, b, s in zip(gin, rbox, rstrides):
                inb[d] = b
                ins[d] = s
        yield from kid._trace(tuple(inb), off, tuple(ins), casts)


def _group_regions(insz: list[int], outsz: list[int], box: list[tuple[int, int]], strides: list[int]
                   ) -> list[tuple[list[tuple[int, int]], int, list[int]]]:
    """A box of one reshape group's output dims (with its buffer strides) as boxes of the group's input dims:
    ``(input box, buffer offset, input strides)``."""
    m = len(outsz)
    # The output box as segments of the group's linear (C-order) index with one buffer stride: the trailing
    # dims after t are whole and nested in the buffer (stride_j = size_{j+1} * stride_{j+1}).
    t = m - 1
    while t > 0 and box[t] == (0, outsz[t]) and strides[t - 1] == outsz[t] * strides[t]:
        t -= 1
    lin = c_strides(outsz)
    seg = []
    for combo in _product([range(a, b) for a, b in box[:t]]):
        base = sum(i * lin[d] for d, i in enumerate(combo))
        off = sum((i - box[d][0]) * strides[d] for d, i in enumerate(combo))
        seg.append((base + box[t][0] * lin[t], base + box[t][1] * lin[t], off, strides[m - 1]))
    out = []
    for p, q, off, s in seg:
        for rbox, start in _linear_boxes(p, q, insz):
            inlin = c_strides(insz)
            out.append((rbox, off + (start - p) * s, [s * c for c in inlin]))
    return out


def _linear_boxes(p: int, q: int, sizes: list[int]) -> list[tuple[list[tuple[int, int]], int]]:
    """The C-order index range [p, q) over ``sizes`` as boxes, each with its first linear index."""
    if p >= q:
        return []
    if len(sizes) == 1:
        return [([(p, q)], p)]
    row = math.prod(sizes[1:])
    rest = sizes[1:]
    out: list[tuple[list[tuple[int, int]], int]] = []
    if p // row == (q - 1) // row:
        i = p // row
        return [([(i, i + 1)] + b, start + i * row) for b, start in _linear_boxes(p - i * row, q - i * row, rest)]
    if p % row:
        i = p // row
        out += [([(i, i + 1)] + b, start + i * row) for b, start in _linear_boxes(p % row, row, rest)]
        p = (i + 1) * row
    if q // row > p // row:
        out.append(([(p // row, q // row)] + [(0, n) for n in rest], p))
    if q % row:
        i = q // row
        out += [([(i, i + 1)] + b, start + i * row) for b, start in _linear_boxes(0, q % row, rest)]
    return out
