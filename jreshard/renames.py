"""Bulk renames: regular expressions over saved names build a whole mapping, stacking what they index.

A rule is ``(pattern, template)`` or ``(pattern, template, transform)``. Every saved name that the pattern
matches in full (first matching rule wins) becomes the target name ``match.expand(template)``, read through
``transform(view)`` when a transform is given (e.g. ``lambda v: v.T``). A template ending in index suffixes
such as ``[\\1]`` or ``[\\1][\\2]`` stacks: all names that give the same target with indices ``0 .. n-1`` are
stacked along new leading axes, in index order (layers, or layers x experts).
"""

from __future__ import annotations

import re
from typing import Any, Callable, Iterable, Sequence

from .errors import InvalidArgumentError, TargetMismatchError
from .views import View, saved, stack

Rule = tuple[str, str] | tuple[str, str, Callable[[View], View]]
_SUFFIX = re.compile(r"\[(-?\d+)\]$")


def rename(names: Iterable[str] | Any, rules: Sequence[Rule], *, strict: bool = False) -> dict[str, View]:
    """A mapping for :func:`jreshard.load` from regex rules over saved ``names`` (a list of names, or a
    :class:`~jreshard.Checkpoint`, whose tensor names are used). Names that no rule matches are left out
    (``strict=True``: an error listing them). Stacked indices must run 0 .. n-1 without gaps.

    Example:
        >>> import jreshard
        >>> names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(2)] + ["model.norm.weight"]
        >>> m = jreshard.rename(names, [
        ...     (r"model\\.layers\\.(\\d+)\\.mlp\\.up_proj\\.weight", r"layers.mlp.up.kernel[\\1]", lambda v: v.T),
        ...     (r"model\\.norm\\.weight", "norm.scale"),
        ... ])
        >>> m["layers.mlp.up.kernel"]
        stack([saved('model.layers.0.mlp.up_proj.weight').T, saved('model.layers.1.mlp.up_proj.weight').T], axis=0)
        >>> m["norm.scale"]
        saved('model.norm.weight')
    """
    tensors = getattr(names, "tensors", None)
    if tensors is not None:
        names = list(tensors)
    if isinstance(names, str):
        raise InvalidArgumentError("rename() takes a list of saved names (or a Checkpoint), not one string")
    compiled = []
    for rule in rules:
        if not isinstance(rule, (tuple, list)) or len(rule) not in (2, 3):
            raise InvalidArgumentError(f"a rename rule is (pattern, template[, transform]), not {rule!r}")
        pattern, template = rule[0], rule[1]
        transform = rule[2] if len(rule) == 3 else None
        if transform is not None and not callable(transform):
            raise InvalidArgumentError(f"rule {pattern!r}: the transform must be callable")
        try:
            compiled.append((re.compile(pattern), template, transform))
        except re.error as e:
            raise InvalidArgumentError(f"rule {pattern!r}: not a regular expression: {e}") from None
    plain: dict[str, View] = {}
    stacked: dict[str, dict[tuple[int, ...], View]] = {}
    unmatched: list[str] = []
    for name in names:
        for rx, template, transform in compiled:
            m = rx.fullmatch(name)
            if m is None:
                continue
            try:
                target = m.expand(template)
            except (re.error, IndexError) as e:
                raise InvalidArgumentError(f"rule {rx.pattern!r}: template {template!r}: {e}") from None
            view = saved(name)
            if transform is not None:
                view = transform(view)
                if not isinstance(view, View):
                    raise InvalidArgumentError(f"rule {rx.pattern!r}: the transform returned a "
                                               f"{type(view).__name__}, not a view")
            base, index = _split(target)
            where = f"{name!r} (rule {rx.pattern!r})"
            if not index:
                if target in plain or target in stacked:
                    raise TargetMismatchError(f"rename: target {target!r} is made twice; the second from {where}")
                plain[target] = view
            else:
                if base in plain:
                    raise TargetMismatchError(f"rename: target {base!r} is both stacked and not, from {where}")
                group = stacked.setdefault(base, {})
                if group and len(next(iter(group))) != len(index):
                    raise TargetMismatchError(f"rename: target {base!r} is stacked with different depths, from {where}")
                if index in group:
                    raise TargetMismatchError(f"rename: target {target!r} is made twice; the second from {where}")
                group[index] = view
            break
        else:
            unmatched.append(name)
    if strict and unmatched:
        raise TargetMismatchError(f"rename: {len(unmatched)} saved names match no rule: "
                                  f"{', '.join(map(repr, unmatched[:8]))}{' ...' if len(unmatched) > 8 else ''}")
    out = dict(plain)
    for base, group in stacked.items():
        out[base] = _nest(base, group, ())
    return out


def _split(target: str) -> tuple[str, tuple[int, ...]]:
    """``"a.b[3][1]"`` -> ``("a.b", (3, 1))``."""
    index: list[int] = []
    while True:
        m = _SUFFIX.search(target)
        if m is None:
            return target, tuple(reversed(index))
        index.append(int(m.group(1)))
        target = target[: m.start()]


def _nest(base: str, group: dict[tuple[int, ...], View], prefix: tuple[int, ...]) -> View:
    depth = len(next(iter(group)))
    level = len(prefix)
    present = sorted({k[level] for k in group if k[:level] == prefix})
    if present != list(range(len(present))):
        missing = sorted(set(range(max(present) + 1)) - set(present))
        where = f"{base}{''.join(f'[{i}]' for i in prefix)}"
        raise TargetMismatchError(f"rename: stacking {where!r} needs indices 0..{max(present)}; missing "
                                  f"{missing[:8]}{' ...' if len(missing) > 8 else ''}")
    if level + 1 == depth:
        return stack([group[prefix + (i,)] for i in present], axis=0)
    return stack([_nest(base, group, prefix + (i,)) for i in present], axis=0)
