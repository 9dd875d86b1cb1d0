"""The elimination-order search does not depend on the machine's speed or load (issue 8).

Its budget is counted in work (scores evaluated, neighbours visited), not seconds: with a
clock that runs a thousand times fast (a busy machine, simulated) the same problem gets the
same restarts, the same order and the same answer or refusal as on a quiet one.
"""

from __future__ import annotations

import itertools
import random
import time
import warnings
from pathlib import Path

import pytest
import torch

from fieldlib import FactorGraph, Table
from fieldlib.errors import FieldlibError, TooLargeError
from fieldlib.inference import VariableElimination, get_engine, ordering
from fieldlib.inference.ordering import elimination_order

UAI = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "uai"


def _problem(seed: int = 0, n: int = 40, factors: int = 90):
    """Labels, cardinalities and variables of a random pairwise/triple model, big enough
    that randomised restarts happen."""
    rng = random.Random(seed)
    cards = {v: rng.choice([2, 3, 4]) for v in range(n)}
    scopes = []
    for _ in range(factors):
        k = rng.choice([2, 2, 3])
        scopes.append(tuple(rng.sample(range(n), k)))
    return scopes, cards, list(range(n))


def make_busy(monkeypatch):
    """Every perf_counter reading is one second after the previous one: to a search timed in
    seconds the machine looks a thousand times slower than it is."""
    ticks = itertools.count()
    monkeypatch.setattr(time, "perf_counter", lambda: float(next(ticks)))


def _search(*problem, **options):
    s = elimination_order(*problem, **options)
    return s.order, s.cost, s.restarts, s.work


def test_random_restarts_happen_on_this_problem():
    """(So the next tests test something: the search goes past its deterministic runs.)"""
    assert _search(*_problem())[2] > 2


def test_same_order_on_a_busy_machine(monkeypatch):
    problem = _problem()
    quiet = _search(*problem)
    make_busy(monkeypatch)
    assert _search(*problem) == quiet


def test_same_order_under_a_cpu_hog():
    """A real competing load (a busy thread holding the GIL half the time) changes nothing."""
    import threading

    problem = _problem(seed=1)
    quiet = _search(*problem)
    stop = threading.Event()

    def hog():
        while not stop.is_set():
            sum(range(20000))

    thread = threading.Thread(target=hog)
    thread.start()
    try:
        busy = _search(*problem)
    finally:
        stop.set()
        thread.join()
    assert busy == quiet


def test_effort_and_caps_are_counted_in_work():
    problem = _problem()
    zero = elimination_order(*problem, effort=0)
    assert zero.restarts == 2 and zero.heuristic in ("fill", "weight")
    more = elimination_order(*problem, effort=10)
    base = elimination_order(*problem)
    assert more.restarts >= base.restarts and more.cost <= base.cost
    assert elimination_order(*problem, effort=10, max_restarts=5).restarts == 5
    assert elimination_order(*problem, max_work=0).restarts == 2
    with pytest.raises(ValueError):
        elimination_order(*problem, effort=-1)


def test_deprecated_time_budget_is_converted_to_work(monkeypatch):
    problem = _problem()
    expected = _search(*problem, max_work=0.3 / ordering.SECONDS_PER_WORK)
    make_busy(monkeypatch)
    with pytest.warns(DeprecationWarning, match="time_budget"):
        timed = elimination_order(*problem, 0.3)
    assert (timed.order, timed.cost, timed.restarts, timed.work) == expected


def _graph(seed: int = 0):
    scopes, cards, variables = _problem(seed)
    gen = torch.Generator().manual_seed(seed)
    g = FactorGraph()
    vs = [g.variable(f"x{v}", cards[v]) for v in variables]
    for k, scope in enumerate(scopes):
        shape = tuple(cards[v] for v in scope)
        g.add(Table([vs[v] for v in scope], torch.randn(shape, generator=gen,
                                                        dtype=torch.float64), name=f"f{k}"))
    return g


def test_engine_gives_the_same_plan_answer_and_refusal_when_busy(monkeypatch):
    g = _graph()
    quiet = VariableElimination()(g, marginals=False)
    make_busy(monkeypatch)
    busy = VariableElimination()(g, marginals=False)
    for key in ("restarts", "heuristic", "search_work", "estimated_bytes"):
        assert busy.info[key] == quiet.info[key], key
    assert torch.equal(busy.log_z, quiet.log_z)
    # a budget just under the quiet estimate is refused the same way, busy or not
    budget = quiet.info["estimated_bytes"] - 1
    with pytest.raises(TooLargeError):
        VariableElimination(memory_budget=budget)(g, marginals=False)


def test_engine_options_search_effort_and_deprecated_search_time():
    g = _graph(seed=2)
    base = VariableElimination(search_effort=0)(g, marginals=False)
    assert base.info["restarts"] == 2
    with pytest.warns(DeprecationWarning, match="search_effort"):
        old = VariableElimination(search_time=0.0)
    assert old(g, marginals=False).info["restarts"] == 2
    with pytest.raises(FieldlibError, match="search_effort must be >= 0"):
        VariableElimination(search_effort=-1)
    with pytest.raises(FieldlibError, match="search_time must be >= 0"):
        VariableElimination(search_time=-1)
    assert get_engine("exact", search_effort=3).search_effort == 3.0


def test_engine_memory_budget_accepts_inf_and_fractions():
    assert VariableElimination(memory_budget=float("inf")).memory_budget == float("inf")
    assert VariableElimination(memory_budget=10**400).memory_budget == float("inf")
    assert VariableElimination(memory_budget=0.5).memory_budget == 1
    for bad in (0, -1, float("nan"), "1G"):
        with pytest.raises(FieldlibError, match="positive number of bytes"):
            VariableElimination(memory_budget=bad)
    g = _graph(seed=3)
    assert VariableElimination(memory_budget=float("inf"))(g, marginals=False).log_z.isfinite()


@pytest.mark.parametrize("name", ["ObjectDetection_11", "DBN_11", "CSP_12"])
def test_uai_problem_orders_do_not_depend_on_the_clock(name, monkeypatch):
    """The shared problems where restarts run longest: same order with a fast clock."""
    path = UAI / f"{name}.uai"
    if not path.is_file():
        pytest.skip(f"UAI reference problem not found at {path}")
    from fieldlib.inference.prepare import prepare
    from fieldlib.io import load_model

    _, graph, evidence = load_model(path, UAI / f"{name}.uai.evid")
    prep = prepare(graph, evidence, probes=True)
    free = [graph.index(v) for v in prep.free]
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        quiet = _search(prep.labels, prep.cards, free)
        make_busy(monkeypatch)
        busy = _search(prep.labels, prep.cards, free)
    assert busy == quiet
