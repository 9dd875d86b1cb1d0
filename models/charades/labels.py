"""Charades label vocabularies: the 157 activity classes, objects, verbs, scenes and the
class -> (object, verb) mapping (MATH.md §1 and §9).

Files (all plain text, one entry a line, fields separated by whitespace):

- ``Charades_v1_classes.txt``: ``cNNN Name of the class`` (157 lines, c000..c156).
- ``Charades_v1_mapping.txt``: ``cNNN oNNN vNNN``: each class's object and verb.
- ``Charades_v1_objectclasses.txt``: ``oNNN name`` (38 entries, one of them "no object").
- ``Charades_v1_verbclasses.txt``: ``vNNN name`` (33 entries).

Only the classes file ships with the dataset release used here; the mapping files are read
when the user has them. Without them, frames are category-only (object and verb absent,
index ``-1``); :func:`derived_mapping` invents a fixed, documented object/verb per class for
the synthetic videos so that the object/verb structure exists in generated data.

A class's index is the number in its id (``c042`` -> 42), which is the column of its score
in a submission (the official scripts use ``str2double(id(2:end)) + 1``). Object and verb
indices are positions in their files, ids kept as the files give them.

Errors: every reader raises :class:`fieldlib.errors.FormatError` naming the file, the line
and the field for a malformed line, a duplicate id, or a gap in the class numbering.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from fieldlib.errors import FieldlibError, FormatError

#: Number of activity classes in Charades v1 (also the number of submission score columns).
N_CLASSES = 157
#: Sizes of the official object and verb vocabularies (MATH.md §1).
N_OBJECTS = 38
N_VERBS = 33

_CLASS_ID = re.compile(r"c(\d{3})")


@dataclass(frozen=True)
class Vocabulary:
    """An ordered list of ids with display names; ``index(id)`` gives the position.

    Shapes: ``ids`` and ``names`` have one entry per item, in file order.
    """

    ids: tuple[str, ...]
    names: tuple[str, ...]
    _pos: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if len(self.ids) != len(self.names):
            raise FieldlibError(f"vocabulary: {len(self.ids)} ids but {len(self.names)} names")
        pos = {}
        for i, key in enumerate(self.ids):
            if key in pos:
                raise FieldlibError(f"vocabulary: duplicate id {key!r}")
            pos[key] = i
        object.__setattr__(self, "_pos", pos)

    def __len__(self) -> int:
        return len(self.ids)

    def __contains__(self, key: object) -> bool:
        return key in self._pos

    def index(self, key: str) -> int:
        """Position of ``key``; raises KeyError when absent."""
        return self._pos[key]

    def get(self, key: str, default: int = -1) -> int:
        return self._pos.get(key, default)

    @classmethod
    def from_names(cls, names: Iterable[str]) -> Vocabulary:
        """A vocabulary whose ids are its names (used for scenes)."""
        names = tuple(names)
        return cls(names, names)


def class_index(text: str) -> int | None:
    """``'c042'`` -> 42; ``None`` when ``text`` is not ``c`` followed by three digits."""
    m = _CLASS_ID.fullmatch(text)
    return int(m.group(1)) if m else None


def read_text(path: str | Path) -> str:
    """A file's UTF-8 text; FormatError naming the file when it cannot be read."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except OSError as exc:
        raise FormatError(f"{path}: cannot read: {exc.strerror or exc}") from exc
    except UnicodeDecodeError as exc:
        raise FormatError(f"{path}: not UTF-8 text: {exc}") from exc


def _read_lines(path: str | Path) -> list[tuple[int, str]]:
    text = read_text(path)
    return [(n, line.strip()) for n, line in enumerate(text.splitlines(), 1) if line.strip()]


def _read_id_name(path: str | Path, prefix: str, what: str) -> Vocabulary:
    ids, names = [], []
    seen: dict[str, int] = {}
    pattern = re.compile(rf"{prefix}\d+")
    for n, line in _read_lines(path):
        key, *rest = line.split(None, 1)
        name = rest[0] if rest else ""
        if not pattern.fullmatch(key):
            raise FormatError(
                f"{path}: line {n}: field {what} id: {key!r} is not '{prefix}' followed by digits"
            )
        if key in seen:
            raise FormatError(f"{path}: line {n}: field {what} id: duplicate {key!r} "
                              f"(first on line {seen[key]})")
        seen[key] = n
        ids.append(key)
        names.append(name.strip() or key)
    if not ids:
        raise FormatError(f"{path}: no {what} entries")
    return Vocabulary(tuple(ids), tuple(names))


def read_classes(path: str | Path) -> Vocabulary:
    """Read ``Charades_v1_classes.txt``: ids must be c000, c001, ... without gaps.

    Returns a :class:`Vocabulary` whose position ``k`` is class ``cNNN`` with NNN = k.
    Raises FormatError for a malformed id, a duplicate, or ids out of order.
    """
    vocab = _read_id_name(path, "c", "class")
    lines = [n for n, _ in _read_lines(path)]
    for k, (key, n) in enumerate(zip(vocab.ids, lines)):
        if class_index(key) != k:
            raise FormatError(
                f"{path}: line {n}: field class id: expected c{k:03d}, found {key!r} "
                "(class ids must be c000, c001, ... in order)"
            )
    return vocab


def default_classes(n: int = N_CLASSES) -> Vocabulary:
    """Class vocabulary without names: ids ``c000..`` used as names."""
    ids = tuple(f"c{k:03d}" for k in range(n))
    return Vocabulary(ids, ids)


def read_object_classes(path: str | Path) -> Vocabulary:
    """Read ``Charades_v1_objectclasses.txt`` (``oNNN name`` a line; ids kept as given)."""
    return _read_id_name(path, "o", "object")


def read_verb_classes(path: str | Path) -> Vocabulary:
    """Read ``Charades_v1_verbclasses.txt`` (``vNNN name`` a line; ids kept as given)."""
    return _read_id_name(path, "v", "verb")


def read_mapping(
    path: str | Path, classes: Vocabulary, objects: Vocabulary, verbs: Vocabulary
) -> tuple[np.ndarray, np.ndarray]:
    """Read ``Charades_v1_mapping.txt`` (``cNNN oNNN vNNN`` a line).

    Returns ``(class_object, class_verb)``, int64 arrays of shape [n_classes] holding the
    object and verb index of each class. Every class must be mapped exactly once.
    Raises FormatError naming the line and field for an unknown id, a wrong field count, a
    duplicate class, or (naming the file) a class left unmapped.
    """
    n_cls = len(classes)
    obj = np.full(n_cls, -1, dtype=np.int64)
    verb = np.full(n_cls, -1, dtype=np.int64)
    first: dict[int, int] = {}
    for n, line in _read_lines(path):
        parts = line.split()
        if len(parts) != 3:
            raise FormatError(f"{path}: line {n}: expected 3 fields 'cNNN oNNN vNNN', "
                              f"found {len(parts)}")
        c_id, o_id, v_id = parts
        if c_id not in classes:
            raise FormatError(f"{path}: line {n}: field class: unknown class id {c_id!r}")
        if o_id not in objects:
            raise FormatError(f"{path}: line {n}: field object: unknown object id {o_id!r}")
        if v_id not in verbs:
            raise FormatError(f"{path}: line {n}: field verb: unknown verb id {v_id!r}")
        c = classes.index(c_id)
        if c in first:
            raise FormatError(f"{path}: line {n}: field class: {c_id} mapped twice "
                              f"(first on line {first[c]})")
        first[c] = n
        obj[c] = objects.index(o_id)
        verb[c] = verbs.index(v_id)
    missing = np.flatnonzero(obj < 0)
    if missing.size:
        names = ", ".join(classes.ids[k] for k in missing[:5])
        raise FormatError(f"{path}: {missing.size} classes have no mapping line (e.g. {names})")
    return obj, verb


def derived_mapping(
    n_classes: int = N_CLASSES, n_objects: int = N_OBJECTS, n_verbs: int = N_VERBS,
    seed: int = 157,
) -> tuple[np.ndarray, np.ndarray]:
    """A fixed synthetic class -> (object, verb) mapping for when no mapping file exists.

    Class ``k`` gets object ``perm_o[k % n_objects]`` and verb ``perm_v[k % n_verbs]``,
    where ``perm_o``/``perm_v`` are permutations drawn with ``numpy.random.default_rng(seed)``:
    every object and verb is used, classes share objects and verbs the way the real
    mapping does (about four classes an object), and the result never changes for a seed.
    Returns ``(class_object, class_verb)``, int64 arrays of shape [n_classes].
    """
    rng = np.random.default_rng(seed)
    perm_o = rng.permutation(n_objects)
    perm_v = rng.permutation(n_verbs)
    k = np.arange(n_classes)
    return perm_o[k % n_objects].astype(np.int64), perm_v[k % n_verbs].astype(np.int64)


@dataclass(frozen=True)
class LabelSpace:
    """Classes, and when known their objects and verbs (MATH.md §1).

    ``class_object`` / ``class_verb``: int64 [n_classes] or ``None`` (category-only frames).
    ``derived`` is true when the mapping came from :func:`derived_mapping`, not a file.
    """

    classes: Vocabulary
    objects: Vocabulary | None = None
    verbs: Vocabulary | None = None
    class_object: np.ndarray | None = None
    class_verb: np.ndarray | None = None
    derived: bool = False

    @property
    def n_classes(self) -> int:
        return len(self.classes)

    @property
    def has_mapping(self) -> bool:
        return self.class_object is not None

    def with_derived_mapping(self, seed: int = 157) -> LabelSpace:
        """This label space, with :func:`derived_mapping` filled in if no mapping exists."""
        if self.has_mapping:
            return self
        obj, verb = derived_mapping(self.n_classes, seed=seed)
        objects = Vocabulary(tuple(f"o{k:03d}" for k in range(N_OBJECTS)),
                             tuple(f"synthetic object {k}" for k in range(N_OBJECTS)))
        verbs = Vocabulary(tuple(f"v{k:03d}" for k in range(N_VERBS)),
                           tuple(f"synthetic verb {k}" for k in range(N_VERBS)))
        return LabelSpace(self.classes, objects, verbs, obj, verb, derived=True)


def load_labels(
    classes: str | Path | None = None,
    mapping: str | Path | None = None,
    objects: str | Path | None = None,
    verbs: str | Path | None = None,
) -> LabelSpace:
    """Build a :class:`LabelSpace` from whichever files the user has.

    ``classes=None`` gives unnamed classes c000..c156. ``mapping`` needs ``objects`` and
    ``verbs`` too (the mapping refers to their ids); giving only some of the three raises
    FieldlibError.
    """
    vocab = read_classes(classes) if classes is not None else default_classes()
    given = [p is not None for p in (mapping, objects, verbs)]
    if any(given) and not all(given):
        raise FieldlibError("the class mapping needs all three files: mapping, object "
                            "classes and verb classes")
    if not any(given):
        return LabelSpace(vocab)
    obj_vocab = read_object_classes(objects)
    verb_vocab = read_verb_classes(verbs)
    c_obj, c_verb = read_mapping(mapping, vocab, obj_vocab, verb_vocab)
    return LabelSpace(vocab, obj_vocab, verb_vocab, c_obj, c_verb)


def scene_vocabulary(scenes: Sequence[str]) -> Vocabulary:
    """The distinct scene strings, sorted (15-16 in Charades), as a :class:`Vocabulary`."""
    return Vocabulary.from_names(sorted(set(scenes)))
