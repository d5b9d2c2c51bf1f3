"""Sharding rules: which saved tensor goes onto which ``PartitionSpec``, and the target of "load everything".

A rule is ``(pattern, spec)``. ``pattern`` is a Python regular expression searched (:func:`re.search`) in the
saved name, so ``r"\\.weight$"`` matches every name ending in ``.weight`` and ``"embed"`` every name containing
``embed``. The FIRST matching rule wins, in list (or file) order; a name no rule matches is replicated
(``P()``). An empty list of rules replicates everything; ``rules=None`` is the default heuristic instead
(:func:`default_spec`: dim ``i`` over mesh axis ``i`` where the axis size divides it, else not sharded).

``spec`` is a ``jax.sharding.PartitionSpec``, a tuple or list of entries (an axis name, ``None``, or a tuple of
axis names), or a string of comma-separated entries, each an axis name, ``_`` or ``None`` (the dim is not
sharded), or ``a+b`` / ``(a,b)`` (the dim is split over several mesh axes, major first); ``""`` is ``P()``.
For example ``"data,model"``, ``"_,model"``, ``"(data,model),_"``. A spec may have fewer entries than the
tensor has dims (the rest are not sharded) but not more; every axis it names must be a mesh axis, at most
once. A mesh axis whose size does not divide the dim is kept as given: the load then refuses it with a
:class:`~jreshard.errors.ShardingError` naming the tensor.

Rules as text (:func:`parse_rules`): a TOML file, or inline ``PATTERN=SPEC`` pairs separated by ``;`` or
newlines, each split at its LAST ``=``::

    # rules.toml; the optional [mesh] table is the mesh (the command line's --mesh wins over it)
    [mesh]
    data = 2
    model = 4

    [rules]          # first match wins, in file order; patterns are regexes searched in the name
    'embed\\.weight$' = "model,_"
    '\\.(w|weight)$' = "data,model"

Quote patterns in TOML (single quotes keep backslashes as they are): a bare dotted key would be a table.
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .errors import InvalidArgumentError, MissingDataError, TargetMismatchError

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_\-]*\Z")
_NOT_SHARDED = ("_", "None")
LEGACY_AXES = ("data", "model", "x", "y")  # the names of the dims of a mesh given as "2x4"


class _AllTensors:
    """The default of ``target`` in :func:`jreshard.load` / :func:`jreshard.plan`: every saved tensor."""

    def __repr__(self) -> str:
        return "<every saved tensor>"


ALL_TENSORS = _AllTensors()


# -- specs ----------------------------------------------------------------------------------------------


def _axis(name: str, text: str, where: str) -> str:
    if not _NAME.match(name) or name in _NOT_SHARDED:
        raise InvalidArgumentError(f"{where}: spec {text!r}: {name!r} is not a mesh axis name (letters, digits, _ "
                                   "and -, not starting with a digit; _ or None alone mean not sharded)")
    return name


def _split_top(text: str, where: str) -> list[str]:
    """``text`` split at the commas outside parentheses."""
    parts, depth, cur = [], 0, []
    for ch in text:
        if ch == "(":
            depth += 1
            if depth > 1:
                raise InvalidArgumentError(f"{where}: spec {text!r}: nested parentheses")
        elif ch == ")":
            depth -= 1
            if depth < 0:
                raise InvalidArgumentError(f"{where}: spec {text!r}: ')' without '('")
        if ch == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(ch)
    if depth:
        raise InvalidArgumentError(f"{where}: spec {text!r}: '(' without ')'")
    parts.append("".join(cur))
    return parts


def parse_spec(text: str, where: str = "rule") -> Any:
    """A ``PartitionSpec`` from its text form: comma-separated entries, each an axis name, ``_`` or ``None``
    (not sharded), or ``a+b`` / ``(a,b)`` (several mesh axes on one dim); ``""`` is ``P()``. ``where`` names
    the rule in error messages (:class:`~jreshard.errors.InvalidArgumentError`).

    Example:
        >>> parse_spec("data,model"), parse_spec("_,model"), parse_spec("(data,model),_"), parse_spec("")
        (P('data', 'model'), P(None, 'model'), P(('data', 'model'), None), P())
        >>> parse_spec("data+model") == parse_spec("(data,model)")
        True
    """
    from jax.sharding import PartitionSpec

    if not isinstance(text, str):
        raise InvalidArgumentError(f"{where}: a spec must be a string, not {type(text).__name__} {text!r}")
    if not text.strip():
        return PartitionSpec()
    entries: list[Any] = []
    for part in _split_top(text, where):
        e = part.strip()
        if not e:
            raise InvalidArgumentError(f"{where}: spec {text!r} has an empty entry; write _ for a dim not sharded")
        if e in _NOT_SHARDED:
            entries.append(None)
        elif e.startswith("(") or e.endswith(")"):
            if not (e.startswith("(") and e.endswith(")")):
                raise InvalidArgumentError(f"{where}: spec {text!r}: entry {e!r} is not a (a,b) group")
            names = [n.strip() for n in re.split(r"[,+]", e[1:-1])]
            if names == [""]:
                raise InvalidArgumentError(f"{where}: spec {text!r}: empty group (); write _ for a dim not sharded")
            entries.append(tuple(_axis(n, text, where) for n in names))
        elif "+" in e:
            entries.append(tuple(_axis(n.strip(), text, where) for n in e.split("+")))
        else:
            entries.append(_axis(e, text, where))
    spec = PartitionSpec(*entries)
    _check_repeats(spec, text, where)
    return spec


def _axes_of(spec: Any) -> list[str]:
    return [a for e in spec for a in ((e,) if isinstance(e, str) else e if isinstance(e, tuple) else ())]


def _check_repeats(spec: Any, text: Any, where: str) -> None:
    axes = _axes_of(spec)
    twice = sorted({a for a in axes if axes.count(a) > 1})
    if twice:
        raise InvalidArgumentError(f"{where}: spec {text!r} uses the mesh axis {twice[0]!r} more than once")


def format_spec(spec: Any) -> str:
    """The text form of a ``PartitionSpec`` (what :func:`parse_spec` reads back): ``_`` for a dim not sharded,
    ``(a,b)`` for several axes on one dim.

    Example:
        >>> from jax.sharding import PartitionSpec as P
        >>> format_spec(P(("data", "model"), None)), format_spec(P()), format_spec(P(None, "model"))
        ('(data,model),_', '', '_,model')
    """
    out = []
    for e in spec:
        if e is None or e == ():
            out.append("_")
        elif isinstance(e, str):
            out.append(e)
        else:
            out.append("(" + ",".join(e) + ")")
    return ",".join(out)


def as_spec(value: Any, where: str = "rule") -> Any:
    """``value`` as a ``PartitionSpec``: a PartitionSpec, its text form (:func:`parse_spec`), or a tuple or list
    of entries (an axis name, None, or a tuple/list of axis names).

    Example:
        >>> as_spec(["data", None]), as_spec("data+model"), as_spec((("data", "model"),))
        (P('data', None), P(('data', 'model'),), P(('data', 'model'),))
    """
    from jax.sharding import PartitionSpec

    if isinstance(value, PartitionSpec):
        spec = value
    elif isinstance(value, str):
        return parse_spec(value, where)
    elif isinstance(value, (tuple, list)):
        entries: list[Any] = []
        for e in value:
            if e is None or (isinstance(e, str) and e in _NOT_SHARDED):
                entries.append(None)
            elif isinstance(e, str):
                entries.append(_axis(e, str(value), where))
            elif isinstance(e, (tuple, list)) and e and all(isinstance(a, str) for a in e):
                entries.append(tuple(_axis(a, str(value), where) for a in e))
            else:
                raise InvalidArgumentError(f"{where}: spec {value!r}: entry {e!r} is not an axis name, None or a "
                                           "tuple of axis names")
        spec = PartitionSpec(*entries)
    else:
        raise InvalidArgumentError(f"{where}: a spec is a PartitionSpec, a string like 'data,model' or a tuple of "
                                   f"entries, not {type(value).__name__} {value!r}")
    for e in spec:
        if not (e is None or isinstance(e, str) or (isinstance(e, tuple) and all(isinstance(a, str) for a in e))):
            raise InvalidArgumentError(f"{where}: spec {spec}: entry {e!r} is not an axis name, None or a tuple of "
                                       "axis names")
    _check_repeats(spec, value, where)
    return spec


# -- rules ----------------------------------------------------------------------------------------------


def _q(text: str) -> str:
    """``text`` in quotes as the user wrote it (a regex's backslashes not doubled, as repr would)."""
    return f"'{text}'"


def _compile(pattern: Any, where: str) -> re.Pattern:
    if not isinstance(pattern, str):
        raise InvalidArgumentError(f"{where}: a pattern is a string (a regular expression), not "
                                   f"{type(pattern).__name__} {pattern!r}")
    try:
        return re.compile(pattern)
    except re.error as e:
        raise InvalidArgumentError(f"{where}: pattern {_q(pattern)} is not a regular expression: {e}") from None


def as_rules(rules: Any) -> list[tuple[str, Any]]:
    """``rules`` as a list of ``(pattern, PartitionSpec)``: a list of pairs, a dict ``{pattern: spec}`` (in its
    order) or text (:func:`parse_rules`). Patterns are checked to be regular expressions and specs parsed.

    Example:
        >>> as_rules({r"\\.w$": "data,model"}), as_rules(r"bias$=_")
        ([('\\\\.w$', P('data', 'model'))], [('bias$', P(None,))])
    """
    if isinstance(rules, (str, os.PathLike)):
        return parse_rules(rules)
    if isinstance(rules, Mapping):
        pairs = list(rules.items())
    elif isinstance(rules, Iterable):
        pairs = list(rules)
    else:
        raise InvalidArgumentError(f"rules are a list of (pattern, spec), a dict {{pattern: spec}} or text, not "
                                   f"{type(rules).__name__}")
    out = []
    for i, pair in enumerate(pairs):
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise InvalidArgumentError(f"rule {i}: {pair!r} is not a (pattern, spec) pair")
        pattern, spec = pair
        where = f"rule {i} ({_q(pattern)})"
        _compile(pattern, where)
        out.append((pattern, as_spec(spec, where)))
    return out


def _is_file(source: str | os.PathLike) -> bool:
    return isinstance(source, os.PathLike) or os.path.isfile(source) or str(source).endswith(".toml")


def _read_toml(path: str | os.PathLike) -> dict[str, Any]:
    try:
        with open(path, "rb") as f:
            doc = tomllib.load(f)
    except FileNotFoundError:
        raise MissingDataError(f"{os.fspath(path)}: no such rules file") from None
    except OSError as e:
        raise InvalidArgumentError(f"{os.fspath(path)}: cannot read the rules file: {e}") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
        raise InvalidArgumentError(f"{os.fspath(path)}: not valid TOML: {e}") from None
    unknown = sorted(set(doc) - {"mesh", "rules"})
    if unknown:
        raise InvalidArgumentError(f"{os.fspath(path)}: unknown key(s) {unknown}; a rules file has the tables "
                                   "[mesh] (optional) and [rules]")
    for key in ("mesh", "rules"):
        if key in doc and not isinstance(doc[key], dict):
            raise InvalidArgumentError(f"{os.fspath(path)}: {key!r} must be a table ([{key}])")
    return doc


def parse_rules(source: str | os.PathLike) -> list[tuple[str, Any]]:
    """Rules from text: the path of a TOML file (an existing file, or any name ending in ``.toml``) whose
    ``[rules]`` table maps patterns to specs in order, or inline ``PATTERN=SPEC`` pairs separated by ``;`` or
    newlines, each split at its last ``=`` (see the module docs for the semantics). Malformed input (bad TOML,
    a pattern that is not a regular expression, a bad spec, a pair without ``=``) raises
    :class:`~jreshard.errors.InvalidArgumentError` naming the file, pair or rule.

    Example:
        >>> parse_rules(r"embed\\.weight$=model,_; \\.(w|weight)$=data,model; bias=")
        [('embed\\\\.weight$', P('model', None)), ('\\\\.(w|weight)$', P('data', 'model')), ('bias', P())]
    """
    if _is_file(source):
        path = os.fspath(source)
        doc = _read_toml(path)
        out = []
        for pattern, value in doc.get("rules", {}).items():
            where = f"{path}: rule {_q(pattern)}"
            if isinstance(value, dict):
                raise InvalidArgumentError(f"{where} is a table, not a spec; quote patterns with dots "
                                           f"('{pattern}.…' = \"…\") so that TOML keeps them whole")
            _compile(pattern, where)
            out.append((pattern, as_spec(value, where)))
        return out
    if not isinstance(source, str):
        raise InvalidArgumentError(f"rules text must be a string or a path, not {type(source).__name__}")
    out = []
    for n, pair in enumerate(re.split(r"[;\n]", source), 1):
        if not pair.strip():
            continue
        where = f"rules pair {n} ({_q(pair.strip())})"
        if "=" not in pair:
            raise InvalidArgumentError(f"{where}: expected PATTERN=SPEC (e.g. '\\.weight$=data,model')")
        pattern, spec = pair.rsplit("=", 1)
        pattern = pattern.strip()
        if not pattern:
            raise InvalidArgumentError(f"{where}: empty pattern; '.' matches every name with a character")
        _compile(pattern, where)
        out.append((pattern, parse_spec(spec.strip(), where)))
    return out


def format_rules(rules: Sequence[tuple[str, Any]]) -> str:
    """Rules as inline text that :func:`parse_rules` reads back (patterns must not hold ``;`` or newlines).

    Example:
        >>> from jax.sharding import PartitionSpec as P
        >>> format_rules([(r"\\.w$", P("data", None)), ("b", P())])
        '\\\\.w$=data,_; b='
    """
    return "; ".join(f"{pattern}={format_spec(as_spec(spec))}" for pattern, spec in rules)


def mesh_from_rules_file(path: str | os.PathLike) -> dict[str, int] | None:
    """The ``[mesh]`` table of a TOML rules file (axis name -> size, in file order), or None without one.

    Example:
        >>> import pathlib, tempfile
        >>> p = pathlib.Path(tempfile.mkdtemp()) / "rules.toml"
        >>> _ = p.write_text('[mesh]\\ndata = 2\\nmodel = 4\\n[rules]\\n"w$" = "data"\\n')
        >>> mesh_from_rules_file(p)
        {'data': 2, 'model': 4}
    """
    table = _read_toml(path).get("mesh")
    if table is None:
        return None
    return _check_mesh(dict(table), f"{os.fspath(path)}: [mesh]")


def _check_mesh(mesh: dict[str, Any], where: str) -> dict[str, int]:
    if not mesh:
        raise InvalidArgumentError(f"{where}: a mesh needs at least one axis")
    for name, size in mesh.items():
        if not _NAME.match(name) or name in _NOT_SHARDED:
            raise InvalidArgumentError(f"{where}: {name!r} is not a mesh axis name")
        if isinstance(size, bool) or not isinstance(size, int) or size < 1:
            raise InvalidArgumentError(f"{where}: the size of axis {name!r} must be a positive integer, not {size!r}")
    return mesh


def parse_mesh(text: str, axes: Sequence[str] | None = None) -> dict[str, int]:
    """A mesh shape from text: ``"data=2,model=4"`` (axis names and sizes, in order), or the legacy ``"2x4"``
    whose axes are named ``axes`` (default ``data``, ``model``, ``x``, ``y`` in order).

    Example:
        >>> parse_mesh("data=2,model=4"), parse_mesh("2x4"), parse_mesh("8"), parse_mesh("4x2", ["fsdp", "tp"])
        ({'data': 2, 'model': 4}, {'data': 2, 'model': 4}, {'data': 8}, {'fsdp': 4, 'tp': 2})
    """
    where = f"mesh {text!r}"
    t = text.strip()
    if re.fullmatch(r"\d+(\s*x\s*\d+)*", t):
        sizes = [int(s) for s in t.split("x")]
        names = list(axes) if axes is not None else list(LEGACY_AXES[: len(sizes)])
        if axes is None and len(sizes) > len(LEGACY_AXES):
            raise InvalidArgumentError(f"{where}: more than {len(LEGACY_AXES)} dims; name the axes "
                                       "(data=2,model=2,x=2,y=2,z=2)")
        if len(names) != len(sizes):
            raise InvalidArgumentError(f"{where}: {len(sizes)} dims but {len(names)} axis names {names}")
        if len(set(names)) != len(names):
            raise InvalidArgumentError(f"{where}: axis names {names} repeat")
        return _check_mesh(dict(zip(names, sizes)), where)
    if axes is not None:
        raise InvalidArgumentError(f"{where}: axis names go either in the mesh (data=2,model=4) or in the axes "
                                   "with a mesh like 2x4, not both")
    out: dict[str, int] = {}
    for part in t.split(","):
        m = re.fullmatch(r"\s*([^=\s]+)\s*=\s*(\d+)\s*", part)
        if not m:
            raise InvalidArgumentError(f"{where}: expected AXIS=SIZE pairs separated by commas (data=2,model=4) or "
                                       "sizes separated by x (2x4)")
        if m.group(1) in out:
            raise InvalidArgumentError(f"{where}: the axis {m.group(1)!r} is given twice")
        out[m.group(1)] = int(m.group(2))
    return _check_mesh(out, where)


# -- targets --------------------------------------------------------------------------------------------


def default_spec(shape: Sequence[int], mesh: Any) -> Any:
    """The default heuristic: dim ``i`` over mesh axis ``i`` where the axis size divides it, else not sharded
    (mesh axes beyond the tensor's rank are unused).

    Example:
        >>> import jax, numpy as np
        >>> from jax.sharding import Mesh
        >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
        >>> default_spec((64, 32), mesh), default_spec((5,), mesh)
        (P('data', 'model'), P('data',))
    """
    from jax.sharding import PartitionSpec

    return PartitionSpec(*(axis if dim % mesh.shape[axis] == 0 else None
                           for dim, axis in zip(shape, mesh.axis_names)))


def _mesh_text(mesh: Any) -> str:
    return ",".join(f"{a}={n}" for a, n in mesh.shape.items())


def target_for(ckpt: Any, mesh: Any, rules: Any = None, *, names: Iterable[str] | None = None) -> dict[str, Any]:
    """A target for every saved tensor of ``ckpt`` (or those in ``names``): a flat dict of
    ``jax.ShapeDtypeStruct(shape, saved dtype, sharding=NamedSharding(mesh, spec))`` keyed by saved name, where
    ``spec`` comes from the first rule whose pattern is found in the name (replicated when none is), or from
    :func:`default_spec` when ``rules`` is None. ``rules``: a list of ``(pattern, spec)``, a dict
    ``{pattern: spec}`` or text (:func:`parse_rules`). Saved objects are not included.

    A spec with more entries than the tensor has dims, or naming an axis ``mesh`` does not have, raises
    :class:`~jreshard.errors.InvalidArgumentError` naming the tensor, the rule and the spec.

    ``mesh`` may be a ``jax.sharding.AbstractMesh`` (axis sizes and names, no devices): the target is then one
    to plan, not to load (``jreshard.plan(ckpt, target, devices_per_process=N, process_index=k)``), e.g.
    ``target_for(ckpt, AbstractMesh((16, 16), ("data", "model")), rules)`` on a laptop.

    Example:
        >>> import jax, numpy as np, jreshard
        >>> from jax.sharding import Mesh
        >>> mesh = Mesh(np.array(jax.devices()[:1]).reshape(1, 1), ("data", "model"))
        >>> ckpt = jreshard.open(jreshard.sample_path())
        >>> t = jreshard.target_for(ckpt, mesh, {r"embed": "model,_", r"\\.w\\d$": "_,data"})
        >>> [t[n].sharding.spec for n in ("model.embed.weight", "model.layers.0.w1", "model.head.bias")]
        [P('model', None), P(None, 'data'), P()]
    """
    import jax
    from jax.sharding import AbstractMesh, Mesh, NamedSharding

    if not isinstance(mesh, (Mesh, AbstractMesh)):
        raise InvalidArgumentError(f"mesh must be a jax.sharding.Mesh or AbstractMesh, not {type(mesh).__name__}")
    compiled = None if rules is None else [(p, re.compile(p), s) for p, s in as_rules(rules)]
    if names is None:
        names = list(ckpt.tensors)
    elif isinstance(names, str):
        raise InvalidArgumentError(f"names must be a list of tensor names, not the string {names!r}")
    out = {}
    for name in names:
        if name not in ckpt.tensors and name in getattr(ckpt.format, "object_refs", {}):
            raise TargetMismatchError(f"{ckpt.source}: {name!r} is a saved object, not a tensor (read it from "
                                      f"ckpt.objects[{name!r}])")
        info = ckpt.tensor(name)
        if compiled is None:
            spec, where = default_spec(info.shape, mesh), "the default rule"
        else:
            from jax.sharding import PartitionSpec

            spec, where = PartitionSpec(), "no rule (replicated)"
            for pattern, regex, s in compiled:
                if regex.search(name):
                    spec, where = s, f"rule {_q(pattern)}"
                    break
        text = format_spec(spec)
        if len(spec) > len(info.shape):
            raise InvalidArgumentError(f"{ckpt.source}: tensor {name!r} of shape {info.shape} has {len(info.shape)} "
                                       f"dim(s), but {where} gives it the spec {text!r} of {len(spec)} entries")
        unknown = [a for a in _axes_of(spec) if a not in mesh.axis_names]
        if unknown:
            raise InvalidArgumentError(f"{ckpt.source}: tensor {name!r}: {where} gives the spec {text!r}, whose axis "
                                       f"{unknown[0]!r} is not in the mesh ({_mesh_text(mesh)})")
        try:
            sharding = NamedSharding(mesh, spec)
        except (ValueError, TypeError) as e:
            raise InvalidArgumentError(f"{ckpt.source}: tensor {name!r}: {where} gives the spec {text!r}, which "
                                       f"the mesh ({_mesh_text(mesh)}) refuses: {e}") from None
        out[name] = jax.ShapeDtypeStruct(info.shape, info.dtype, sharding=sharding)
    return out


def resolve_target(ckpt: Any, target: Any, mesh: Any, rules: Any) -> Any:
    """``target`` as given, or for :data:`ALL_TENSORS` every saved tensor onto ``mesh`` (or the mesh set by
    ``jax.set_mesh``) by ``rules`` (:func:`target_for`); ``rules`` with a target given is an error.

    Example:
        >>> import jreshard
        >>> resolve_target(jreshard.open(jreshard.sample_path()), ALL_TENSORS, None, None)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        jreshard.errors.InvalidArgumentError: ...: no target and no mesh: pass a target, or a mesh ...
    """
    if target is not ALL_TENSORS:
        if rules is not None:
            raise InvalidArgumentError(f"{ckpt.source}: rules= places the tensors of a load without a target; with a "
                                       "target, the target's shardings say where each tensor goes (drop rules= or "
                                       "the target)")
        return target
    if mesh is None:
        from .targets import _context_mesh

        mesh = _context_mesh()
    if mesh is None:
        raise InvalidArgumentError(f"{ckpt.source}: no target and no mesh: pass a target, or a mesh (mesh=, or "
                                   "jax.set_mesh) to load every saved tensor onto it")
    return target_for(ckpt, mesh, rules)


__all__ = [
    "ALL_TENSORS",
    "as_rules",
    "as_spec",
    "default_spec",
    "format_rules",
    "format_spec",
    "mesh_from_rules_file",
    "parse_mesh",
    "parse_rules",
    "parse_spec",
    "resolve_target",
    "target_for",
]
