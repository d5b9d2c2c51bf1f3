"""A griffe extension for the API reference: jreshard's docstrings as mkdocstrings renders them best.

jreshard's docstrings are written for ``help()`` and doctest: an ``Example:`` section of ``>>>`` lines, and
Sphinx roles (``:func:`jreshard.load```) for cross-references. Without this extension griffe's Google parser
takes ``Example:`` for an admonition (the ``>>>`` lines would render as nested block quotes) and the roles
render verbatim. This extension, run on every object before its docstring is parsed:

* renames a section title ``Example:`` to ``Examples:`` (griffe's examples section: code blocks);
* turns ``:func:`name``` (any role, ``~`` prefix included) into an optional mkdocs-autorefs reference: a link
  when ``name`` (or the same name next to the object: its class, its module, the ``jreshard`` package) is
  documented on some page, plain code otherwise.

It also undoes a shadowing: ``jreshard/__init__.py`` defines ``plan`` and re-exports ``rename``, and the
package has submodules of those names (``jreshard/plan.py``, ``jreshard/rename.py``). Python's attribute is the
function (assigned after the submodule is imported); griffe gives precedence to the submodule, which would
leave ``jreshard.plan`` and ``jreshard.rename`` out of the reference. Once the package is loaded, the
extension points the imports that go through those submodules (``from .plan import Plan``) at their objects,
then puts the functions back as the package's members, as Python has them.

It changes no source file.
"""

from __future__ import annotations

import re
from typing import Any

import griffe

_EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)
_ROLE = re.compile(r":(?:py:)?(?:func|class|meth|mod|attr|data|exc|obj|const):`(?P<tilde>~?)(?P<name>[\w.]+)(?:\(\))?`")


def _lookup(obj: griffe.Object, name: str) -> str:
    """The full path ``name`` most likely means in ``obj``'s docstring (itself when nothing better is known)."""
    if "." in name.lstrip("."):
        return name.lstrip(".")
    scope: griffe.Object | None = obj  # the object, then its class, module, package (never aliases)
    while scope is not None:
        if name in scope.members:
            return f"{scope.path}.{name}"
        scope = scope.parent
    return f"jreshard.{name}"


class JReshardDocstrings(griffe.Extension):
    """``Example:`` -> ``Examples:``, Sphinx roles -> optional autorefs (see the module docstring)."""

    def on_object(self, *, obj: griffe.Object, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        self._fix(obj)

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        # The whole tree, before any other extension's on_package moves members (objects reached only
        # through aliases get no on_object); fixing an object twice changes nothing.
        stack: list[griffe.Object] = [pkg]
        while stack:
            obj = stack.pop()
            self._fix(obj)
            stack.extend(m for m in obj.members.values() if not m.is_alias)

    def _fix(self, obj: griffe.Object) -> None:
        if obj.docstring is None:
            return
        text = _EXAMPLE.sub(r"\g<indent>Examples:", obj.docstring.value)

        def ref(m: re.Match[str]) -> str:
            name = m["name"]
            shown = name.rsplit(".", 1)[-1] if m["tilde"] else name
            return f'<autoref identifier="{_lookup(obj, name)}" optional><code>{shown}</code></autoref>'

        obj.docstring.value = _ROLE.sub(ref, text)


_PACKAGE = "jreshard"


def _walk_aliases(module: griffe.Module) -> list[griffe.Alias]:
    """Every alias defined in ``module`` and its submodules (not through other aliases)."""
    out: list[griffe.Alias] = []
    for member in list(module.members.values()):
        if member.is_alias:
            out.append(member)
        elif member.is_module:
            out.extend(_walk_aliases(member))
    return out


class JReshardShadowedFunctions(griffe.Extension):
    """``jreshard.plan`` / ``jreshard.rename``: the functions, as Python has them, not the submodules."""

    def __init__(self) -> None:
        super().__init__()
        self._functions: dict[str, griffe.Object] = {}  # functions defined in jreshard/__init__.py
        self._aliases: dict[str, griffe.Alias] = {}  # names jreshard/__init__.py imports

    def on_function_instance(self, *, node: Any, func: griffe.Function, agent: Any, **kwargs: Any) -> None:
        if func.parent is not None and func.parent.path == _PACKAGE:
            self._functions[func.name] = func

    def on_alias_instance(self, *, node: Any, alias: griffe.Alias, agent: Any, **kwargs: Any) -> None:
        if alias.parent is not None and alias.parent.path == _PACKAGE:
            self._aliases[alias.name] = alias

    def on_package(self, *, pkg: griffe.Module, loader: griffe.GriffeLoader, **kwargs: Any) -> None:
        if pkg.path != _PACKAGE:
            return
        shadowed = {name: member for name, member in pkg.members.items()
                    if not member.is_alias and member.is_module and (name in self._functions or name in self._aliases)}
        if not shadowed:
            return
        # Resolve, while the submodules are still reachable, every import that goes through one of them.
        for alias in _walk_aliases(pkg):
            for name, module in shadowed.items():
                prefix = f"{_PACKAGE}.{name}."
                if alias.target_path.startswith(prefix):
                    rest = alias.target_path[len(prefix):]
                    try:
                        alias.target = module[rest]
                    except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                        pass
        for name, module in shadowed.items():
            if name in self._functions:
                pkg.members[name] = self._functions[name]
            else:
                alias = self._aliases[name]
                try:
                    alias.target = module[name]
                except (KeyError, griffe.AliasResolutionError, griffe.CyclicAliasError):
                    continue
                pkg.members[name] = alias
