"""A griffe extension for the API reference: jreshard's docstrings as mkdocstrings renders them best.

jreshard's docstrings are written for ``help()`` and doctest: an ``Example:`` section of ``>>>`` lines, and
Sphinx roles (``:func:`jreshard.load```) for cross-references. Without this extension griffe's Google parser
takes ``Example:`` for an admonition (the ``>>>`` lines would render as nested block quotes) and the roles
render verbatim. This extension, run on every object before its docstring is parsed:

* renames a section title ``Example:`` to ``Examples:`` (griffe's examples section: code blocks);
* turns ``:func:`name``` (any role, ``~`` prefix included) into an optional mkdocs-autorefs reference: a link
  when ``name`` (or the same name next to the object: its class, its module, the ``jreshard`` package) is
  documented on some page, plain code otherwise.

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


