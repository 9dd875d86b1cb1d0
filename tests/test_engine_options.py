"""Engines declare their options; engines are built from names or libDAI-style spec strings
(issue 9): a wrong option is one FieldlibError listing the engine's options."""

from __future__ import annotations

import math

import pytest

from fieldlib import FieldlibError
from fieldlib.inference import (
    Engine,
    engine_names,
    engine_options,
    get_engine,
    parse_engine_spec,
    register_engine,
)


def test_every_registered_engine_declares_typed_options_with_help():
    for name in engine_names():
        options = engine_options(name)
        for o in options:
            assert o.kind in ("int", "float", "bool", "str")
            assert o.help, f"{name}.{o.name} has no help line in its docstring"


def test_spec_string_sets_typed_options():
    e = get_engine("meanfield[schedule=synchronous, damping=0.5,max_iter=7,track_elbo=no]")
    assert (e.schedule, e.damping, e.max_iter, e.track_elbo) == ("synchronous", 0.5, 7, False)
    e = get_engine("exact[memory_budget=inf,seed=3]")
    assert e.memory_budget == math.inf and e.seed == 3
    assert parse_engine_spec("bruteforce") == ("bruteforce", {})


@pytest.mark.parametrize("spec,kwargs,match", [
    ("meanfield", {"schedul": "x"}, r"no option 'schedul' \(did you mean 'schedule'\?\); its "
                                    r"options: schedule, damping"),
    ("exact[schedule=synchronous]", {}, r"engine 'exact' has no option 'schedule'"),
    ("exact[seed=abc]", {}, r"option seed='abc': expected int"),
    ("meanfield[damping]", {}, r"'damping' is not key=value"),
    ("meanfield[tol=1,tol=2]", {}, r"given twice"),
    ("meanfield[tol=1]", {"tol": 2}, r"given twice"),
    ("nosuch", {}, r"unknown engine 'nosuch'"),
    ("meanfield[", {}, r"expected NAME or NAME\[key=value"),
])
def test_bad_specs_and_options_are_one_clear_error(spec, kwargs, match):
    with pytest.raises(FieldlibError, match=match):
        get_engine(spec, **kwargs)


def test_a_user_engine_is_declared_by_its_signature_and_docstring():
    @register_engine("test-constant")
    class Constant(Engine):
        """An engine for this test.

        Args:
            value: the log Z it reports.
            verbose: say more.
        """

        supports = frozenset({"log_z"})

        def __init__(self, value: float = 0.0, verbose: bool = False):
            self.value, self.verbose = value, verbose

    options = {o.name: o for o in engine_options("test-constant")}
    assert options["value"].kind == "float" and options["value"].help == "the log Z it reports."
    assert options["verbose"].kind == "bool" and options["verbose"].default is False
    e = get_engine("test-constant[value=2.5,verbose=true]")
    assert (e.value, e.verbose) == (2.5, True)
