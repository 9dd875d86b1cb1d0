"""Fuzz tests (issue 8, part 5): every generated input gets a right answer or a FieldlibError.

Hypothesis strategies write UAI model and evidence text, libDAI .fg text and factor
tensors: valid small models, and mutations of them (truncation, missing, extra, repeated or
swapped tokens, huge declared sizes, negative numbers, NaN/inf/1e400, non-numeric tokens,
empty files, junk text and bytes; tensors of wrong shapes and dtypes holding NaN, ±inf,
±1e308). For every input the reader, the factor or the engine raises a FieldlibError, or the
answer is right: log Z, marginals and the MAP score equal an enumeration in numpy (float64,
1e-9 relative to the model's magnitude) and the brute-force engine, marginals are finite and
sum to one, the mean-field ELBO is finite and at most log Z; no other exception, no NaN.
``fieldlib infer`` exits 0 or 2 and never prints a traceback. Charades CSV and submission
text: tests/test_fuzz_charades.py. Bounded: fixed seeds, few examples, tiny models.
"""

from __future__ import annotations

import math
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from fieldlib import (
    BlockDomain,
    Component,
    FactorGraph,
    FieldlibError,
    FrameIntent,
    GaussianKernel,
    KernelSum,
    KernelTemporal,
    ShapeError,
    SparseTable,
    Table,
    ZeroProbabilityError,
)
from fieldlib.cli import main
from fieldlib.inference import get_engine
from fieldlib.io import format_uai, parse_evidence, parse_fg, parse_uai


def fuzz(n: int):
    """Settings of every fuzz test: ``n`` examples, reproducible (derandomized, no database)."""
    return settings(max_examples=n, deadline=None, derandomize=True, database=None,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.function_scoped_fixture])


@pytest.fixture(autouse=True)
def _one_torch_thread():
    """Tiny tensors: one thread avoids OpenMP start-up costs on a busy machine."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


F64 = torch.float64
BUDGET = 2**26        # bytes a generated model may occupy: huge declared sizes are refused
JOINT_MAX = 1024      # models up to this many joint states are solved and checked
JUNK = ["3000000000", "-3000000000", "9" * 25, "-1", "-0", "0", "1", "2", "3", "nan", "NaN",
        "inf", "-inf", "1e400", "-1e400", "1e-400", "1e308", "5e-324", "2.5", "1e3", "+3",
        "0x1F", "1_0", "\u0663", "abc", "MARKOV", "BAYES", "#", "\x00", "\ufeff1"]
SEPS = [" ", " ", "\n", "\t", "  \n", "\r\n"]
VALUES = st.one_of(st.sampled_from([0.0, 1.0, 0.5, 2.0, 1e-300, 5e-324, 1e300, 7.25]),
                   st.floats(0, 100))
FORMATS = ["{!r}", "{:g}", "{:.8E}", "+{!r}"]


# -- an independent oracle: enumerate the joint in numpy --------------------------------------
def enumerate_joint(cards, scopes, tables, evidence=None) -> np.ndarray:
    """Log-score of every joint configuration, float64 of shape ``cards`` (potentials, not
    logs, in C order, as a TableModel holds them); -inf off the evidence."""
    n = len(cards)
    joint = np.zeros(cards)
    with np.errstate(divide="ignore"):
        for scope, table in zip(scopes, tables):
            shape = [cards[v] if v in scope else 1 for v in range(n)]
            log = np.log(np.asarray(table, dtype=np.float64))
            joint = joint + np.transpose(log, np.argsort(scope)).reshape(shape)
    for v, x in (evidence or {}).items():
        mask = np.full(cards[v], -np.inf)
        mask[x] = 0.0
        joint = joint + mask.reshape([cards[v] if i == v else 1 for i in range(n)])
    return joint


def magnitude(graph) -> float:
    """Σ over dense terms of the largest finite |log-potential|, plus log(joint states): the
    scale that rounding errors of log Z are relative to."""
    total = sum(math.log(v.cardinality) for v in graph.variables.values())
    for term in graph.terms(None):
        t = term.table.detach().double()
        finite = t[torch.isfinite(t)]
        total += float(finite.abs().max()) if finite.numel() else 0.0
    return total


def check_against_enumeration(graph, joint, evidence=None):
    """exact and bruteforce equal the enumeration ``joint`` (axes in graph order); the
    mean-field ELBO is finite and below log Z."""
    tol = 1e-9 * max(1.0, magnitude(graph))
    names = list(graph.variables)
    top = float(joint.max())
    log_z = None
    for name in ("exact", "bruteforce"):
        if top == -math.inf:
            with pytest.raises(ZeroProbabilityError):
                get_engine(name)(graph, evidence, map=True)
            continue
        r = get_engine(name)(graph, evidence, map=True)
        log_z = top + math.log(float(np.exp(joint - top).sum()))
        assert abs(float(r.log_z) - log_z) <= tol, (name, float(r.log_z), log_z)
        p = np.exp(joint - log_z)
        for i, v in enumerate(names):
            want = p.sum(axis=tuple(j for j in range(len(names)) if j != i))
            got = r.marginals[v].double().numpy()
            assert np.isfinite(got).all() and abs(got.sum() - 1.0) <= 1e-9
            np.testing.assert_allclose(got, want, rtol=0, atol=tol)
        state = tuple(int(r.map[v]) for v in names)
        assert joint[state] >= top - tol and abs(float(r.map_score) - top) <= tol
    check_meanfield(graph, evidence, None if log_z is None else torch.tensor(log_z, dtype=F64))


def check_meanfield(graph, evidence, log_z, **options):
    """Mean-field: no NaN; marginals sum to one on real positions; where log Z is finite the
    ELBO is finite and <= log Z. ``log_z`` None: log Z is -inf (then ZeroProbabilityError
    or an ELBO of -inf); +inf: unknown (the exact engines refused), any FieldlibError."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        try:
            r = get_engine("meanfield", max_iter=30, **options)(graph, evidence)
        except FieldlibError as exc:
            known = log_z is not None and bool(torch.isfinite(log_z).all())
            assert not known and (log_z is not None or isinstance(exc, ZeroProbabilityError)), \
                exc
            return
    elbo = r.elbo.detach()  # in the graph's dtype: float16 is not upcast, unlike exact
    assert not bool(torch.isnan(elbo).any()), elbo
    check_marginals(graph, r.marginals, rtol(elbo.dtype))
    if log_z is None:
        assert bool(torch.isneginf(elbo).all()), elbo
    elif bool(torch.isfinite(log_z).all()):
        # exact engines build a factor's terms in its own dtype (a float32 µ times the
        # kernel, in float32), mean-field in the graph's: they agree to the inputs' precision
        least = max([rtol(elbo.dtype), rtol(log_z.dtype)] + [
            rtol(t.dtype) for f in graph.factors for t in f.tensors() if t.is_floating_point()])
        tol = least * max(1.0, magnitude(graph))
        assert bool(torch.isfinite(elbo).all()), elbo
        assert bool((elbo.double() <= log_z.double() + tol).all()), (elbo, log_z)


def rtol(dtype: torch.dtype) -> float:
    """Tolerance of results computed in ``dtype``, relative to the model's magnitude."""
    return {torch.float64: 1e-9, torch.float32: 1e-5}.get(dtype, 1e-2)


def check_marginals(graph, marginals, tol):
    """Finite, non-negative rows summing to 1 on real positions and 0 on padding."""
    for v in graph.variables.values():
        m = marginals[v.name].detach().double().reshape(-1, v.cardinality)
        assert bool(torch.isfinite(m).all()) and bool((m >= 0).all()), (v.name, m)
        active = graph.active(v)
        want = torch.ones(()) if active is None else active.double()
        assert bool(((m.sum(-1) - want).abs() <= tol).all()), (v.name, m)


def solve_model(model, evidence=None):
    """Check the engines on a model read from a file, when it is small enough to enumerate."""
    graph = model.to_graph()
    if not model.cards:  # a .fg file without factors declares no variable
        with pytest.raises(FieldlibError, match="no variables"):
            get_engine("exact")(graph)
        return
    if math.prod(model.cards) > JOINT_MAX:
        return
    joint = enumerate_joint(model.cards, model.scopes, model.tables, evidence)
    names = {model.names[v]: x for v, x in (evidence or {}).items()}
    check_against_enumeration(graph, joint, names)


# -- text strategies ------------------------------------------------------------------------
@st.composite
def uai_models(draw):
    """``(tokens, (cards, scopes, tables))``: a valid small UAI model and its content."""
    n = draw(st.integers(1, 4))
    cards = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
    scopes = [tuple(draw(st.permutations(range(n)))[:draw(st.integers(0, min(3, n)))])
              for _ in range(draw(st.integers(0, 4)))]
    fmt = draw(st.sampled_from(FORMATS))
    tokens = [draw(st.sampled_from(["MARKOV", "BAYES", "markov"])), str(n), *map(str, cards),
              str(len(scopes))]
    for scope in scopes:
        tokens += [str(len(scope)), *map(str, scope)]
    tables = []
    for scope in scopes:
        shape = [cards[v] for v in scope]
        texts = [fmt.format(x) for x in draw(st.lists(VALUES, min_size=math.prod(shape),
                                                      max_size=math.prod(shape)))]
        tokens += [str(len(texts)), *texts]
        tables.append(np.array([float(t) for t in texts]).reshape(shape))
    return tokens, (cards, scopes, tables)


@st.composite
def fg_models(draw):
    """``(tokens, (cards, scopes, tables))`` of a valid small libDAI .fg model (first
    variable fastest in the file; the content in C order over labels sorted ascending)."""
    pool = draw(st.lists(st.sampled_from([0, 1, 2, 5, 42, 3000000000]), min_size=1,
                         max_size=4, unique=True))
    card = {label: draw(st.integers(1, 3)) for label in pool}
    fmt = draw(st.sampled_from(FORMATS))
    m = draw(st.integers(0, 4))
    tokens, factors = [str(m)], []
    for _ in range(m):
        labels = draw(st.permutations(pool))[:draw(st.integers(0, min(3, len(pool))))]
        shape = [card[label] for label in labels]
        size = math.prod(shape)
        listed = draw(st.one_of(st.permutations(range(size)),
                                st.lists(st.integers(0, size - 1), unique=True, max_size=size)))
        texts = [fmt.format(x) for x in draw(st.lists(VALUES, min_size=len(listed),
                                                      max_size=len(listed)))]
        tokens += [str(len(labels)), *map(str, labels), *map(str, shape), str(len(listed))]
        for index, text in zip(listed, texts):
            tokens += [str(index), text]
        table = np.zeros(shape)
        for index, text in zip(listed, texts):
            at = []
            for d in shape:  # first variable fastest
                at.append(index % d)
                index //= d
            table[tuple(at)] = float(text)
        factors.append((labels, table))
    used = sorted({label for labels, _ in factors for label in labels})
    scopes = [tuple(used.index(label) for label in labels) for labels, _ in factors]
    return tokens, ([card[label] for label in used], scopes, [t for _, t in factors])


@st.composite
def mutated(draw, tokens):
    """``tokens`` after 1-3 edits: truncation, deletion, insertion or replacement by a junk
    token, duplication, or a swap."""
    tokens = list(tokens)
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["truncate", "delete", "insert", "replace", "replace",
                                   "duplicate", "swap"]))
        i = draw(st.integers(0, len(tokens)))
        if op == "truncate":
            tokens = tokens[:i]
        elif op == "delete":
            del tokens[i:i + 1]
        elif op == "insert":
            tokens.insert(i, draw(st.sampled_from(JUNK)))
        elif op == "replace":
            tokens[i:i + 1] = [draw(st.sampled_from(JUNK))]
        elif op == "duplicate":
            tokens[i:i] = tokens[i:i + 1]
        elif tokens:
            j = draw(st.integers(0, len(tokens) - 1))
            i = min(i, len(tokens) - 1)
            tokens[i], tokens[j] = tokens[j], tokens[i]
    return tokens


@st.composite
def joined(draw, tokens, seps=SEPS):
    gaps = draw(st.lists(st.sampled_from(seps), min_size=len(tokens), max_size=len(tokens)))
    return "".join(t + s for t, s in zip(tokens, gaps))


@st.composite
def model_texts(draw, models, seps=SEPS, kinds=("valid", "mutated", "mutated", "junk")):
    """``(text, content or None)``: a valid model (content known), a mutated one, or junk."""
    tokens, content = draw(models)
    kind = draw(st.sampled_from(kinds))
    if kind == "junk":
        return draw(st.one_of(st.just(""), st.text(max_size=40))), None
    if kind == "mutated":
        tokens, content = draw(mutated(tokens)), None
    return draw(joined(tokens, seps)), content


FG_SEPS = SEPS + ["\n\n", "\n# a comment 1 2 3\n"]


def check_read(model, content):
    """A model a reader returned: consistent, finite non-negative tables, the content that
    was written (when known), the same after a UAI round trip, and solved right."""
    model.check()
    for table in model.tables:
        assert table.dtype == np.float64 and np.isfinite(table).all() and (table >= 0).all()
    if content is not None:
        cards, scopes, tables = content
        assert model.cards == cards and model.scopes == scopes
        for got, want in zip(model.tables, tables, strict=True):
            np.testing.assert_array_equal(got, want)
    if model.cards:
        again = parse_uai(format_uai(model), memory_budget=math.inf)
        assert again.cards == model.cards and again.scopes == model.scopes
        for got, want in zip(again.tables, model.tables, strict=True):
            np.testing.assert_array_equal(got, want)
    solve_model(model)


@fuzz(250)
@given(model_texts(uai_models()))
def test_uai_text_is_read_right_or_refused(case):
    text, content = case
    try:
        model = parse_uai(text, "fuzz.uai", memory_budget=BUDGET)
    except FieldlibError:
        assert content is None, "a valid UAI model was refused"
        return
    check_read(model, content)


@fuzz(250)
@given(model_texts(fg_models(), FG_SEPS))
def test_fg_text_is_read_right_or_refused(case):
    text, content = case
    try:
        model = parse_fg(text, "fuzz.fg", memory_budget=BUDGET)
    except FieldlibError:
        assert content is None, "a valid .fg model was refused"
        return
    check_read(model, content)


@fuzz(25)
@given(st.data())
def test_shared_uai_problems_mutated_are_read_or_refused(shared_data, data):
    """Real files (../shared/data/uai), cut and edited: read (consistently) or refused."""
    path = data.draw(st.sampled_from(sorted((shared_data / "uai").glob("*.uai"))))
    tokens = data.draw(mutated(path.read_text().split()))
    try:
        model = parse_uai(" ".join(tokens), path.name, memory_budget=BUDGET)
    except FieldlibError:
        return
    model.check()
    assert all(np.isfinite(t).all() and (t >= 0).all() for t in model.tables)


@st.composite
def evidence_texts(draw, cards):
    """``(text, observations or None)``: n v1 x1 .. (or the one-sample form), maybe mutated."""
    vs = draw(st.permutations(range(len(cards))))[:draw(st.integers(0, len(cards)))]
    obs = {v: draw(st.integers(0, cards[v] - 1)) for v in vs}
    tokens = [str(len(obs))] + [str(x) for item in obs.items() for x in item]
    if draw(st.booleans()):
        tokens = ["1", *tokens]
    if draw(st.booleans()):
        tokens, obs = draw(mutated(tokens)), None
    return draw(joined(tokens)), obs


@fuzz(120)
@given(uai_models().flatmap(lambda m: st.tuples(st.just(m), evidence_texts(m[1][0]))))
def test_evidence_text_is_read_right_or_refused(case):
    (tokens, content), (text, obs) = case
    model = parse_uai(" ".join(tokens))
    try:
        evidence = parse_evidence(text, "fuzz.evid", model)
    except FieldlibError:
        assert obs is None, "valid evidence was refused"
        return
    if obs is not None:
        assert evidence == obs
    for v, x in evidence.items():
        assert 0 <= v < len(model.cards) and 0 <= x < model.cards[v]
    solve_model(model, evidence)


# -- the command line, in-process -------------------------------------------------------------
ENGINES = ["exact", "exact", "exact[search_effort=0]", "bruteforce", "bruteforce",
           "meanfield[max_iter=20]", "meanfield[schedule=synchronous,damping=0.5,max_iter=20]",
           "bruteforce[max_states=1]", "nope", "meanfield[damping=2]", "exact[memory_budget=-1]",
           "meanfield[max_iter=abc]", "exact[", "meanfield[max_iter=1e400]", "exact[nan=1]"]


@st.composite
def cli_cases(draw):
    kind = draw(st.sampled_from(["uai", "uai", "fg"]))
    if draw(st.integers(0, 9)) == 0:
        data, content = draw(st.binary(max_size=40)), None
    else:
        data, content = draw(model_texts(uai_models() if kind == "uai" else fg_models(),
                                         kinds=("valid", "valid", "mutated")))
    evid = None
    if draw(st.integers(0, 2)) == 0:
        evid = draw(st.one_of(st.just(""), joined(["1", "0", "0"]), joined(["1", "2", "0"]),
                              mutated(["2", "0", "1", "1", "0"]).flatmap(joined)))
    task = draw(st.sampled_from(["PR", "MAR", "MAP"]))
    engine = draw(st.sampled_from(ENGINES))
    return kind, data, content, evid, task, engine


def run_cli(capsys, argv):
    capsys.readouterr()
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert code in (0, 2), (code, err)
    assert "Traceback" not in err and "Traceback" not in out
    if code == 2:  # one line: the error (after notes, if any)
        lines = err.rstrip("\n").split("\n")
        assert lines[-1].startswith("fieldlib: error: "), err
        assert all(line.startswith("fieldlib: ") for line in lines), err
    return code, out, err


@fuzz(100)
@given(cli_cases())
def test_cli_infer_exits_0_or_2_without_traceback(capsys, case):
    kind, data, content, evid, task, engine = case
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / f"m.{kind}"
        path.write_bytes(data if isinstance(data, bytes) else data.encode("utf-8"))
        argv = ["infer", path, "--task", task, "--engine", engine, "--memory-budget", "64M"]
        if evid is not None:
            (Path(tmp) / "e.evid").write_text(evid)
            argv += ["--evid", Path(tmp) / "e.evid"]
        code, out, err = run_cli(capsys, argv)
    if code == 2:
        return
    head, line = out.split("\n")[:2]
    assert head == task
    fields = line.split()
    assert all(math.isfinite(float(x)) for x in fields)
    if task == "MAR":
        pos = 1
        while pos < len(fields):
            d = int(fields[pos])
            assert abs(sum(float(x) for x in fields[pos + 1:pos + 1 + d]) - 1.0) <= 1e-8
            pos += 1 + d
    if task == "PR" and content is not None and evid is None and "meanfield" not in engine:
        cards, scopes, tables = content
        if cards and math.prod(cards) <= JOINT_MAX:
            joint = enumerate_joint(cards, scopes, tables)
            log_z = float(joint.max()) + math.log(float(np.exp(joint - joint.max()).sum()))
            scale = max(1.0, abs(log_z), sum(float(np.abs(np.log(t[t > 0])).max())
                                             for t in tables if (t > 0).any()))
            assert abs(float(fields[0]) * math.log(10) - log_z) <= 1e-9 * scale


def entry_point() -> list[str]:
    """The installed ``fieldlib`` script beside this interpreter, else ``python -m``."""
    script = Path(sys.executable).with_name("fieldlib")
    return [str(script)] if script.is_file() else [sys.executable, "-m", "fieldlib.cli"]


@pytest.mark.parametrize("name, data, task", [
    ("m.uai", b"MARKOV\n2\n2 3000000000\n1\n1 0\n2 0.5 nan\n", "PR"),
    ("m.fg", b"1\n\n2\n0 7\n2 2\n1\n3 1e400\n\xff\xfe", "MAR"),
])
def test_real_entry_point_exits_2_without_traceback(tmp_path, name, data, task):
    path = tmp_path / name
    path.write_bytes(data)
    proc = subprocess.run([*entry_point(), "infer", str(path), "--task", task],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert proc.stderr.startswith("fieldlib: error: ") and proc.stderr.count("\n") == 1


# -- factor tensors and API input -----------------------------------------------------------
DTYPES = [torch.float64] * 6 + [torch.float32, torch.float16, torch.int64]
BAD_DTYPES = [torch.bool, torch.complex128, torch.complex64]
EXTREMES = [math.nan, math.inf, 1e308, -1e308, -math.inf]
SIGMAS = [2.0, 2.0, 2.0, 0.5, 1e-300, 1e300, lambda delta: 1.0 / (1.0 + delta.abs()),
          KernelSum([GaussianKernel(1.0), GaussianKernel(3.0)], [1.0, -0.5]),
          KernelSum([GaussianKernel(1.0)], [1e308])]
BAD_SIGMAS = [0.0, -1.0, math.nan, math.inf, "2", True, None, lambda delta: delta / delta]
EVIDENCE = [0, 1, 2, -1, 3, 1.0, 0.5, math.nan, "a", True, None, [0, 1], [[0, 0, 0]], 10**20]


@st.composite
def tensors(draw, shape, finite=False):
    """Log-potentials meant to have ``shape``: random, some entries -inf (unless ``finite``),
    of a float or int dtype; one time in four broken: another shape, a bool or complex
    dtype, or NaN, ±inf, ±1e308 among the values."""
    shape = list(shape)
    broken = draw(st.sampled_from([None, None, None, "shape", "dtype", "values"]))
    if broken == "shape" and shape:
        i = draw(st.integers(0, len(shape) - 1))
        op = draw(st.sampled_from(["grow", "shrink", "drop", "add"]))
        if op == "grow":
            shape[i] += 1
        elif op == "shrink":
            shape[i] -= 1
        elif op == "drop":
            del shape[i]
        else:
            shape.insert(i, draw(st.integers(1, 2)))
    gen = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    t = torch.randn(shape, generator=gen, dtype=torch.float64)
    t = t * draw(st.sampled_from([1.0, 1.0, 30.0, 1e300]))
    flat = t.view(-1)
    specials = EXTREMES if broken == "values" else [0.0] if finite else [-math.inf, 0.0]
    for _ in range(draw(st.integers(broken == "values", 2)) if flat.numel() else 0):
        flat[draw(st.integers(0, flat.numel() - 1))] = draw(st.sampled_from(specials))
    dtype = draw(st.sampled_from(BAD_DTYPES if broken == "dtype" else DTYPES))
    if dtype == torch.bool:
        return t > 0
    if dtype == torch.int64:
        return t.nan_to_num(0.0, 2.0**62, -(2.0**62)).clamp(-(2.0**62), 2.0**62).long()
    return t.to(dtype)


@st.composite
def configs(draw, sizes):
    """Distinct configurations over components of ``sizes``, or a malformed list."""
    if draw(st.integers(0, 7)) == 0:
        return draw(st.sampled_from([[], [[0.5] * len(sizes)], [[0] * len(sizes)] * 2,
                                     [[5] * len(sizes)], [[-1] * len(sizes)], [[0]] * 3]))
    rows = [list(np.unravel_index(i, sizes)) for i in range(math.prod(sizes))]
    return draw(st.lists(st.sampled_from(rows), min_size=1, max_size=len(rows),
                         unique_by=tuple))


@st.composite
def api_cases(draw):
    """A recipe of a small graph: an array x (plain or block domain, maybe padded), up to
    two variables, an intent, 1-3 factors of every built-in type, and maybe evidence."""
    n = draw(st.sampled_from([None, None, 1, 2]))
    t = draw(st.integers(1, 3))
    tuples = draw(st.lists(st.sampled_from([(0, 0), (0, 1), (1, 0), (1, 1)]), min_size=1,
                           max_size=4, unique=True)) if draw(st.booleans()) else None
    s = len(tuples) if tuples else draw(st.integers(1, 3))
    lengths = draw(st.lists(st.integers(0, t), min_size=n, max_size=n)) \
        if n and draw(st.booleans()) else None
    cards = draw(st.lists(st.integers(1, 3), max_size=2))
    factors = []
    for kind in draw(st.lists(st.sampled_from(["table", "table", "sparse", "component",
                                               "intent", "kernel"]), min_size=1, max_size=3)):
        lead = [n] if n and draw(st.booleans()) else []
        slots = [draw(st.sampled_from(["x", *range(len(cards))])) for _ in range(2)]
        slots = list(dict.fromkeys(slots[:draw(st.integers(1, 2))]))
        sizes = [s if k == "x" else cards[k] for k in slots]
        pos = [t] if "x" in slots else []
        comp = draw(st.sampled_from([None, "o"])) if tuples else None
        d = 2 if comp else s
        if kind == "table":
            factors.append((kind, slots, draw(tensors(lead + pos + sizes))))
        elif kind == "sparse":
            c = draw(configs(sizes))
            factors.append((kind, slots, c, draw(tensors(lead + pos + [max(len(c), 1)]))))
        elif kind == "component" and tuples:
            comps = draw(st.sampled_from([("o",), ("p",), ("o", "p"), ("p", "o"), ("z",)]))
            c = draw(configs([2] * len(comps))) if draw(st.booleans()) else None
            core = [2] * len(comps) if c is None else [max(len(c), 1)]
            factors.append((kind, comps, draw(tensors(lead + [t] + core)), c))
        elif kind == "intent":
            factors.append((kind, draw(tensors(lead + [t, d, 2])), comp))
        elif kind == "kernel":
            times = draw(st.one_of(st.none(), tensors([t], finite=True)))
            if times is not None and times.dtype in DTYPES and draw(st.booleans()):
                times = times.sort().values
            sigma = draw(st.sampled_from(SIGMAS if draw(st.integers(0, 5)) else BAD_SIGMAS))
            factors.append((kind, draw(tensors(lead + [d, d], finite=True)), times, sigma,
                            comp))
    evidence = None
    if draw(st.integers(0, 2)) == 0:
        key = draw(st.sampled_from(["x", "x[0]", "x[0]", "I", "I", "nope"]
                                   + [f"v{i}" for i in range(len(cards))] * 2))
        value = draw(st.sampled_from(EVIDENCE) if key != "x" else
                     st.lists(st.integers(-1, 3), min_size=t, max_size=t))
        evidence = {key: value}
    schedule = draw(st.sampled_from(["sequential", "synchronous"])), \
        draw(st.sampled_from([0.0, 0.0, 0.5]))
    return n, t, tuples, s, lengths, cards, factors, evidence, schedule


def build(case) -> tuple[FactorGraph, dict | None]:
    _, t, tuples, s, lengths, cards, factors, evidence, _ = case
    g = FactorGraph()
    domain = BlockDomain({"o": 2, "p": 2}, tuples) if tuples else s
    x = g.array("x", t, domain, lengths=lengths)
    vs = [g.variable(f"v{i}", c) for i, c in enumerate(cards)]
    intent = g.variable("I", 2)
    for kind, *args in factors:
        if kind in ("table", "sparse"):
            scope = [x if k == "x" else vs[k] for k in args[0]]
            g.add(Table(scope, args[1]) if kind == "table" else
                  SparseTable(scope, args[1], args[2]))
        elif kind == "component":
            g.add(Component(x, args[0], args[1], configs=args[2]))
        elif kind == "intent":
            g.add(FrameIntent(x, intent, args[0], component=args[1]))
        else:
            g.add(KernelTemporal(x, args[0], times=args[1], kernel=args[2], component=args[3]))
    return g, evidence


def attempt(name, graph, evidence):
    try:
        return get_engine(name)(graph, evidence, map=True)
    except FieldlibError as exc:
        return exc


@fuzz(300)
@given(api_cases())
def test_factor_tensors_give_right_answers_or_fieldlib_errors(case):
    try:
        graph, evidence = build(case)
    except FieldlibError:
        return
    bf, ex = attempt("bruteforce", graph, evidence), attempt("exact", graph, evidence)
    if isinstance(bf, Exception) or isinstance(ex, Exception):
        assert type(bf) is type(ex), (bf, ex)
        # refused (e.g. out of range): log Z unknown (+inf), or -inf (None)
        log_z = None if isinstance(ex, ZeroProbabilityError) else torch.tensor(math.inf)
    else:
        tol = rtol(ex.log_z.dtype) * max(1.0, magnitude(graph))
        assert bool(torch.isfinite(ex.log_z).all())
        assert float((ex.log_z.double() - bf.log_z.double()).abs().max()) <= tol
        assert float((ex.map_score.double() - bf.map_score.double()).abs().max()) <= tol
        assert bool((ex.map_score.double() <= ex.log_z.double() + tol).all())
        for name in graph.variables:
            diff = (ex.marginals[name].double() - bf.marginals[name].double()).abs().max()
            assert float(diff) <= tol, name
        check_marginals(graph, ex.marginals, rtol(ex.log_z.dtype))
        check_marginals(graph, bf.marginals, rtol(ex.log_z.dtype))
        log_z = ex.log_z
    check_meanfield(graph, evidence, log_z, schedule=case[-1][0], damping=case[-1][1])


# -- minimal cases the fuzzing found ----------------------------------------------------------
def test_every_variable_observed_and_no_factor():
    """``MARKOV 1 1 0`` with evidence ``1 0 0``: no operand was left to contract and the exact
    engine raised a bare ValueError (a traceback from ``fieldlib infer``). log Z is 0."""
    model = parse_uai("MARKOV 2 1 2 0")
    for name in ("exact", "bruteforce"):
        r = get_engine(name)(model.to_graph(), {"v0": 0, "v1": 1}, map=True)
        assert float(r.log_z) == 0.0 and r.marginals["v1"].tolist() == [0.0, 1.0]
        assert int(r.map["v1"]) == 1


def test_a_batch_axis_of_size_zero_is_refused():
    """A tensor with a batch axis of size 0 made a batch of N = 0, on which every engine
    failed with a bare RuntimeError (reshape of 0 elements, max() of an empty tensor)."""
    g = FactorGraph()
    x = g.array("x", 1, 2)
    with pytest.raises(ShapeError, match="batch axis of size 0"):
        Table(x, torch.zeros(0, 1, 2))
    with pytest.raises(ShapeError, match="batch axis of size 0"):
        KernelTemporal(x, torch.zeros(2, 2), times=torch.zeros(0, 1))


def test_kernel_weights_are_read_in_float64():
    """Python floats as KernelSum weights became float32: 1e308 was refused as "inf" and
    0.1 was rounded."""
    k = KernelSum([GaussianKernel(1.0), GaussianKernel(2.0)], [1e308, 0.1])
    assert k.weights.dtype == torch.float64 and k.weights.tolist() == [1e308, 0.1]


@pytest.mark.parametrize("mu, kernel", [
    (torch.ones(1, 1), KernelSum([GaussianKernel(1.0)], [1e308])),  # float32 µ
    (torch.full((1, 1), 1e308, dtype=torch.float64),
     KernelSum([GaussianKernel(1.0), GaussianKernel(2.0)], [1.0, 1.0])),
    (torch.full((1, 1), 1e308, dtype=torch.float64), lambda delta: 2.0 + 0.0 * delta),
])
def test_kernel_beyond_the_dtype_range_is_refused(mu, kernel):
    """µ·k overflowed to +inf log-potentials: the exact engines said "log Z is inf", and on
    padding (inf x 0) mean-field returned a NaN ELBO."""
    g = FactorGraph()
    x = g.array("x", 2, 1, lengths=[1])
    with pytest.raises(FieldlibError, match="beyond the range of"):
        KernelTemporal(x, mu, kernel=kernel)


def test_bruteforce_marginals_sum_to_one_at_extreme_scores():
    """BruteForce normalises with exp(joint - log Z): at scores of 1e308, log Z = 1e308 +
    log 2 rounds to 1e308, and both states got probability 1. (Fix in inference/exact.py,
    BruteForce.run: p = softmax of the flattened joint, which sums to one at any scale.)"""
    g = FactorGraph()
    a = g.variable("a", 2)
    g.add(Table(a, torch.tensor([1e308, 1e308], dtype=torch.float64)))
    for name in ("exact", "bruteforce"):
        m = get_engine(name)(g).marginals["a"]
        assert m.tolist() == [0.5, 0.5], (name, m)


@pytest.mark.parametrize("engine", ["bruteforce", "meanfield"])
def test_memory_budget_with_every_engine(capsys, tmp_path, engine):
    """``--memory-budget`` bounds what the reader allocates, for every engine; it was also
    handed to engines that take no budget, which refused it (exit 2: "engine 'bruteforce'
    has no option 'memory_budget'"). Fixed with the engine specs of fieldlib/cli_infer.py."""
    path = tmp_path / "m.uai"
    path.write_text("MARKOV 1 2 1 1 0 2 1 1\n")
    code, out, _ = run_cli(capsys, ["infer", path, "--task", "MAR", "--engine", engine,
                                    "--memory-budget", "1G"])
    assert code == 0 and out == "MAR\n1 2 0.5 0.5\n"


def test_meanfield_refuses_scores_beyond_the_dtype_range():
    """Two tables of 1e308 on one variable: the exact engines refuse (scores overflow
    float64), but mean-field returned NaN marginals and a NaN ELBO. (Fix in
    inference/meanfield.py: refuse as inference/prepare.check_range does, or when a message
    or an energy is not finite.)"""
    g = FactorGraph()
    a = g.variable("a", 2)
    t = torch.full((2,), 1e308, dtype=torch.float64)
    g.add(Table(a, t), Table(a, t))
    with pytest.raises(FieldlibError, match="too large for the range"):
        get_engine("exact")(g)
    try:
        r = get_engine("meanfield")(g)
    except FieldlibError:
        return
    assert not torch.isnan(r.elbo) and not torch.isnan(r.marginals["a"]).any(), r
