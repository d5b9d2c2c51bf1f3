"""Sharding rules (jreshard/rules.py): text forms of specs, rules and meshes, ``target_for``, and loading every
saved tensor without writing a target (checked against torch's own reading of the checkpoint)."""

from __future__ import annotations

import re

import jax
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

import jreshard
from jreshard.rules import (
    as_rules,
    format_rules,
    format_spec,
    mesh_from_rules_file,
    parse_mesh,
    parse_rules,
    parse_spec,
    target_for,
)
from tests.helpers import check_loaded_array, make_mesh

# -- specs as text ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("text, spec", [
    ("", P()),
    ("  ", P()),
    ("data", P("data")),
    ("data,model", P("data", "model")),
    ("_,model", P(None, "model")),
    ("None, model", P(None, "model")),
    ("(data,model),_", P(("data", "model"), None)),
    ("data+model, _", P(("data", "model"), None)),
    ("( data , model )", P(("data", "model"))),
    ("(data)", P(("data",))),
    ("_,_,x-y", P(None, None, "x-y")),
])
def test_parse_spec(text, spec):
    assert parse_spec(text) == spec


@pytest.mark.parametrize("text, why", [
    ("data,,model", "empty entry"),
    ("data,", "empty entry"),
    ("(data,model", "'(' without ')'"),
    ("data)", "')' without '('"),
    ("((a,b))", "nested"),
    ("()", "empty group"),
    ("data,data", "more than once"),
    ("(a,b),a", "more than once"),
    ("1data", "not a mesh axis name"),
    ("a b", "not a mesh axis name"),
    ("a+", "not a mesh axis name"),
])
def test_parse_spec_refuses(text, why):
    with pytest.raises(jreshard.InvalidArgumentError, match=re.escape(why)) as e:
        parse_spec(text, where="rule 7")
    assert str(e.value).startswith("rule 7: ") and repr(text) in str(e.value)


_AXIS = st.from_regex(r"[A-Za-z][A-Za-z0-9_]{0,5}", fullmatch=True).filter(lambda s: s != "None")


@st.composite
def _specs(draw):
    names = draw(st.lists(_AXIS, unique=True, max_size=6))
    entries, used = [], 0
    for _ in range(draw(st.integers(0, 5))):
        kind = draw(st.sampled_from(["none", "one", "group"]))
        if kind == "none" or used >= len(names):
            entries.append(None)
        elif kind == "one":
            entries.append(names[used])
            used += 1
        else:
            k = draw(st.integers(1, 3))
            entries.append(tuple(names[used:used + k]))
            used += len(entries[-1])
    return P(*entries)


@settings(max_examples=200, deadline=None)
@given(spec=_specs(), spaced=st.booleans())
def test_specs_round_trip_through_text(spec, spaced):
    text = format_spec(spec)
    if spaced:
        text = text.replace(",", " , ")
    assert parse_spec(text) == spec, text
    # the a+b form of a group is the same spec
    plus = ",".join("+".join(e) if isinstance(e, tuple) and len(e) > 1 else format_spec(P(e)) for e in spec)
    assert parse_spec(plus) == spec, plus


# -- rules as text ----------------------------------------------------------------------------------------

_PIECES = [r"\.", "w", "weight", "$", "^", r"\d", "(a|b)", "=", "[0-9]+", "layers", "mp", "_"]


@settings(max_examples=100, deadline=None)
@given(rules=st.lists(st.tuples(st.lists(st.sampled_from(_PIECES), min_size=1, max_size=5).map("".join), _specs()),
                      max_size=5),
       sep=st.sampled_from(["; ", "\n", ";\n;"]))
def test_inline_rules_round_trip(rules, sep):
    text = sep.join(f"{p}={format_spec(s)}" for p, s in rules)
    assert parse_rules(text) == rules, text  # split at the LAST '=', order kept
    assert parse_rules(format_rules(rules)) == rules


def test_inline_rules_examples():
    assert parse_rules(r"embed\.weight$=model,_; \.(w|weight)$ = data,model" + "\n\n bias=") == [
        (r"embed\.weight$", P("model", None)), (r"\.(w|weight)$", P("data", "model")), ("bias", P())]
    assert parse_rules("") == [] and parse_rules(" ; \n") == []
    assert parse_rules("a=b=data") == [("a=b", P("data"))]


@pytest.mark.parametrize("text, words", [
    ("w=data; nothing", ["pair 2", "'nothing'", "PATTERN=SPEC"]),
    ("[=data", ["pair 1", "'['", "not a regular expression"]),
    ("w=data,,model", ["pair 1", "empty entry"]),
    ("=data", ["pair 1", "empty pattern"]),
    ("w=data\nb=(x", ["pair 2", "'(' without ')'"]),
])
def test_inline_rules_refused(text, words):
    with pytest.raises(jreshard.InvalidArgumentError) as e:
        parse_rules(text)
    assert all(w in str(e.value) for w in words), str(e.value)


TOML = r"""
# the mesh is optional
[mesh]
data = 4
model = 2

[rules]          # first match wins
'^mp\.(a|b)$' = "data,model"
'^mp\.' = ["model", "_"]
"\\.w$" = "_,model"
'grp' = [["data", "model"], "None"]
'scalar' = ""
"""


def test_toml_rules(tmp_path):
    path = tmp_path / "rules.toml"
    path.write_text(TOML)
    want = [(r"^mp\.(a|b)$", P("data", "model")), (r"^mp\.", P("model", None)), (r"\.w$", P(None, "model")),
            ("grp", P(("data", "model"), None)), ("scalar", P())]
    assert parse_rules(path) == want
    assert parse_rules(str(path)) == want  # an existing file, as text
    assert mesh_from_rules_file(path) == {"data": 4, "model": 2}
    assert list(mesh_from_rules_file(path)) == ["data", "model"]
    path.write_text("[rules]\n'w' = 'data'\n")
    assert mesh_from_rules_file(path) is None


@pytest.mark.parametrize("text, words", [
    ("[rules]\n'a' = \n", ["not valid TOML", "line 2"]),
    ("[rules]\nmp.a = 'data'\n", ["rule 'mp'", "table", "quote"]),
    ("[rules]\n'[' = 'data'\n", ["rule '['", "not a regular expression"]),
    ("[rules]\n'a' = 'data,,model'\n", ["rule 'a'", "empty entry"]),
    ("[rules]\n'a' = 3\n", ["rule 'a'", "not int"]),
    ("[rules]\n'a' = ['data', 3]\n", ["rule 'a'", "entry 3"]),
    ("[rulez]\n'a' = 'data'\n", ["unknown key", "rulez"]),
    ("rules = 'a=data'\n", ["'rules' must be a table"]),
])
def test_toml_rules_refused(tmp_path, text, words):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(jreshard.InvalidArgumentError) as e:
        parse_rules(path)
    msg = str(e.value)
    assert msg.startswith(str(path)) and all(w in msg for w in words), msg


@pytest.mark.parametrize("text", ["[mesh]\ndata = 0\n", "[mesh]\ndata = 'two'\n", "[mesh]\ndata = true\n",
                                  "[mesh]\n", "[mesh]\n'_' = 2\n"])
def test_toml_mesh_refused(tmp_path, text):
    path = tmp_path / "bad.toml"
    path.write_text(text)
    with pytest.raises(jreshard.InvalidArgumentError, match=re.escape(f"{path}: [mesh]")):
        mesh_from_rules_file(path)


def test_missing_rules_file(tmp_path):
    with pytest.raises(jreshard.MissingDataError, match="no such rules file"):
        parse_rules(tmp_path / "none.toml")
    with pytest.raises(jreshard.MissingDataError):
        parse_rules(str(tmp_path / "none.toml"))  # text ending in .toml is a file name, not inline rules


@pytest.mark.parametrize("text, axes, mesh", [
    ("data=2,model=4", None, {"data": 2, "model": 4}),
    (" fsdp = 8 , tp=1 ", None, {"fsdp": 8, "tp": 1}),
    ("2x4", None, {"data": 2, "model": 4}),
    ("8", None, {"data": 8}),
    ("1x2x2x2", None, {"data": 1, "model": 2, "x": 2, "y": 2}),
    ("4x2", ["a", "b"], {"a": 4, "b": 2}),
])
def test_parse_mesh(text, axes, mesh):
    got = parse_mesh(text, axes)
    assert got == mesh and list(got) == list(mesh)


@pytest.mark.parametrize("text, axes, why", [
    ("2,4", None, "AXIS=SIZE"),
    ("data=2,data=2", None, "given twice"),
    ("data=0", None, "positive integer"),
    ("data=-1", None, "AXIS=SIZE"),
    ("2x2x2x2x2", None, "more than 4 dims"),
    ("2x4", ["a"], "2 dims but 1 axis names"),
    ("2x4", ["a", "a"], "repeat"),
    ("data=2", ["a"], "not both"),
    ("", None, "AXIS=SIZE"),
])
def test_parse_mesh_refused(text, axes, why):
    with pytest.raises(jreshard.InvalidArgumentError, match=re.escape(why)):
        parse_mesh(text, axes)


# -- target_for -------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def plain(checkpoints):
    ck = jreshard.open(checkpoints.dirs["plain"])
    yield ck
    ck.close()


RULES = [(r"^mp\.(a|b)$", "data,model"), (r"^mp\.", "model,_"), (r"^plain\.w$", "_,model"), (r"^mp\.a$", "_"),
         (r"^d2\.s0s1$", "(data,model),_")]


def test_target_for_first_match_wins(plain):
    mesh = make_mesh("2x4")
    t = target_for(plain, mesh, RULES)
    assert set(t) == set(plain.tensors) and "step" not in t
    want = {"mp.a": P("data", "model"), "mp.b": P("data", "model"), "mp.c": P("model", None),
            "mp.d": P("model", None), "plain.w": P(None, "model"), "plain.scalar": P(), "dtypes.plain.int64": P(),
            "d2.s0s1": P(("data", "model"), None)}
    for name, spec in want.items():
        assert t[name].sharding == NamedSharding(mesh, spec), name
    for name, info in plain.tensors.items():
        assert (t[name].shape, t[name].dtype) == (info.shape, info.dtype), name
        if not name.startswith(("mp.", "plain.w", "d2.s0s1")):
            assert t[name].sharding.spec == P(), name
    # the same rules as a dict, as inline text, as a TOML file
    assert target_for(plain, mesh, dict(RULES)) == t
    assert target_for(plain, mesh, format_rules(as_rules(RULES))) == t
    # no rule: replicated; a subset of names
    assert all(s.sharding.spec == P() for s in target_for(plain, mesh, []).values())
    assert list(target_for(plain, mesh, RULES, names=["plain.w", "mp.a"])) == ["plain.w", "mp.a"]


def test_target_for_default_rule(plain):
    """rules=None: dim i over mesh axis i where the axis size divides it (the old cli.default_target)."""
    mesh = make_mesh("2x4")
    t = target_for(plain, mesh)
    for name, info in plain.tensors.items():
        spec = tuple(a if d % n == 0 else None for d, (a, n) in zip(info.shape, mesh.shape.items()))
        assert t[name].sharding == NamedSharding(mesh, P(*spec)), name
    assert t["d2.uneven_s0s1"].sharding.spec == P(None, None)  # (10, 3)
    assert t["mp.a"].sharding.spec == P("data", "model")
    from jreshard.cli import default_target

    assert default_target(plain, mesh) == t


@pytest.mark.parametrize("rules, words", [
    ([(r"^plain\.w$", "data,model,_")], ["'plain.w'", "(24, 16)", r"rule '^plain\.w$'", "'data,model,_'", "3 entries"]),
    ([(r"^plain\.scalar$", "data")], ["'plain.scalar'", "0 dim(s)", "'data'"]),
    ([(r"^mp\.a$", "data,fsdp")], ["'mp.a'", "'fsdp'", "not in the mesh", "data=2,model=4"]),
])
def test_target_for_refuses(plain, rules, words):
    with pytest.raises(jreshard.InvalidArgumentError) as e:
        target_for(plain, make_mesh("2x4"), rules)
    assert all(w in str(e.value) for w in words), str(e.value)


def test_target_for_bad_names_and_mesh(plain):
    mesh = make_mesh("2x4")
    with pytest.raises(jreshard.TargetMismatchError, match="'step' is a saved object"):
        target_for(plain, mesh, names=["step"])
    with pytest.raises(jreshard.TargetMismatchError, match="did you mean 'plain.w'"):
        target_for(plain, mesh, names=["plain.ww"])
    with pytest.raises(jreshard.InvalidArgumentError, match="jax.sharding.Mesh"):
        target_for(plain, None)
    with pytest.raises(jreshard.InvalidArgumentError, match="not a .pattern, spec. pair"):
        target_for(plain, mesh, [("a", "b", "c")])
    with pytest.raises(jreshard.InvalidArgumentError, match="rule 0 .'a'.: a spec is .* not int 3"):
        target_for(plain, mesh, {"a": 3})


# -- load and plan without a target -----------------------------------------------------------------------


@pytest.mark.parametrize("variant", ["plain", "safetensors"])
def test_load_without_target(checkpoints, variant):
    """Every saved tensor onto the mesh by the rules: the values torch reads, the rules' shardings; the plan of
    the same call is what the load reads."""
    ref = checkpoints.reference(variant)
    mesh = make_mesh("2x4")
    with jreshard.open(checkpoints.dirs[variant]) as ck:
        rules = [(p, s) for p, s in RULES if variant == "plain" or not p.startswith(r"^plain")]
        plan = jreshard.plan(ck, mesh=mesh, rules=rules)
        before = (ck.io_stats.bytes_read, ck.io_stats.num_reads)
        out = jreshard.load(ck, mesh=mesh, rules=rules)
        after = (ck.io_stats.bytes_read, ck.io_stats.num_reads)
        target = target_for(ck, mesh, rules)
        assert set(out) == set(ck.tensors) == set(checkpoints.names[variant])
        for name, arr in out.items():
            check_loaded_array(arr, target[name], ref[name], f"{variant}:{name}")
        assert out["d2.s0s1"].sharding.spec == P(("data", "model"), None)
        assert (after[0] - before[0], after[1] - before[1]) == (plan.bytes_to_read, plan.num_reads)
        assert plan.processes == jreshard.plan(ck, target).processes
        # Checkpoint.load / plan, default rule, by path
        again = ck.load(mesh=mesh)
        assert again["d2.s0s1"].sharding == NamedSharding(mesh, P("data", "model"))
        assert ck.plan(mesh=mesh).processes == jreshard.plan(ck, target_for(ck, mesh)).processes
    by_path = jreshard.load(checkpoints.dirs[variant], mesh=mesh, rules=rules)
    assert all(np.array_equal(np.asarray(by_path[n]), np.asarray(out[n])) for n in out)


def test_load_without_target_under_set_mesh(checkpoints):
    mesh = make_mesh("4x2")
    with jreshard.open(checkpoints.dirs["plain"]) as ck, jax.set_mesh(mesh):
        out = ck.load(rules={r"^mp\.a$": "model,data"})
        assert out["mp.a"].sharding == NamedSharding(mesh, P("model", "data"))
        check_loaded_array(out["mp.a"], out["mp.a"], checkpoints.reference("plain")["mp.a"], "mp.a")


def test_load_without_target_errors(checkpoints):
    mesh = make_mesh("2x4")
    with jreshard.open(checkpoints.dirs["plain"]) as ck:
        for call in (jreshard.load, jreshard.plan, lambda c, **kw: c.load(**kw), lambda c, **kw: c.plan(**kw)):
            with pytest.raises(jreshard.InvalidArgumentError, match="no target and no mesh: pass a target, or a mesh"):
                call(ck)
            with pytest.raises(jreshard.InvalidArgumentError, match="A target is a pytree"):
                call(ck, target=None, mesh=mesh)  # an explicit None stays an error
        target = target_for(ck, mesh, names=["mp.a"])
        with pytest.raises(jreshard.InvalidArgumentError, match="rules= places the tensors of a load without a target"):
            jreshard.load(ck, target, rules=RULES)
        # a mesh axis that does not divide the dim: a ShardingError naming the tensor, from the load itself
        with pytest.raises(jreshard.ShardingError, match="'plain.w' of shape .24, 16.") as e:
            jreshard.load(ck, mesh=Mesh(np.array(jax.devices()[:5]), ("data",)), rules={r"^plain\.w$": "data"})
        assert isinstance(e.value, jreshard.JReshardError)
