"""Classification rules: a small declarative language over flat device/user records.

A rule is plain data (it comes from ``config.toml``) compiled once into closures. The
language is documented for operators in ``docs/rules.md``; in short, a rule is one of

* ``"always"`` / ``"never"``;
* a condition ``{ field = "device.app_version", <operator> = <operand> }`` with exactly one
  operator (eq, ne, in, not_in, lt, le, gt, ge, semver_lt, semver_le, semver_gt, semver_ge,
  semver_eq, prefix, between, exists);
* a combinator ``{ all = [rule, ...] }``, ``{ any = [rule, ...] }`` or ``{ not = rule }``.

A missing field (absent or ``None``) never matches, except ``exists = false``. Values of the
wrong type never match (no coercion: ``"5"`` is not the number 5). Compilation is strict:
every mistake raises :class:`RuleError` naming the path of the offending key.
"""

from __future__ import annotations

import copy
import math
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final, Protocol, final

import semver

__all__ = [
    "KNOWN_FIELDS",
    "ClassDef",
    "Classifier",
    "Record",
    "Rule",
    "RuleError",
    "compile_rule",
]

Record = Mapping[str, Any]
Predicate = Callable[[Record], bool]

# Fields the registry puts in a record; ``user.attributes.<name>`` is open-ended.
KNOWN_FIELDS: Final = frozenset(
    {
        "device.id",
        "device.model",
        "device.os_version",
        "device.app_version",
        "device.locale",
        "device.time_zone",
        "device.environment",
        "device.topic",
        "user.id",
        "permissions.alert",
        "permissions.background",
    }
)
_ATTRIBUTE_PREFIX: Final = "user.attributes."
_ATTRIBUTE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*")
_CLASS_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._\-]{0,63}")

# A per-condition memo of version comparisons is cleared when it grows past this size; a
# fleet has few distinct version strings, so in practice it never is.
_VERSION_MEMO_LIMIT: Final = 4096

_COMBINATORS: Final = ("all", "any", "not")
_CLASS_KEYS: Final = ("id", "description", "rule")


class RuleError(ValueError):
    """A rule or class definition is invalid; ``path`` locates the offending key."""

    def __init__(self, path: str, message: str) -> None:
        super().__init__(f"{path}: {message}")
        self.path = path
        self.message = message


class Rule(Protocol):
    def matches(self, record: Record) -> bool: ...


@final
class CompiledRule:
    """A compiled rule; ``spec`` is the rule as written."""

    __slots__ = ("_predicate", "spec")

    def __init__(self, predicate: Predicate, spec: Any) -> None:
        self._predicate = predicate
        self.spec = spec

    def matches(self, record: Record) -> bool:
        return self._predicate(record)

    def __repr__(self) -> str:
        return f"CompiledRule({self.spec!r})"


def compile_rule(spec: Any, path: str = "rule") -> Rule:
    """Compile ``spec`` (see module docs) into a :class:`Rule`; raise :class:`RuleError`."""
    return CompiledRule(_compile(spec, path), spec)


# --- compilation -------------------------------------------------------------------------


def _always(record: Record) -> bool:
    return True


def _never(record: Record) -> bool:
    return False


MAX_DEPTH = 32  # nested all/any/not: deeper is refused (evaluation recurses per level)


def _compile(spec: Any, path: str, depth: int = 0) -> Predicate:
    if depth > MAX_DEPTH:
        raise RuleError(path, f"nested more than {MAX_DEPTH} levels deep")
    if isinstance(spec, str):
        if spec == "always":
            return _always
        if spec == "never":
            return _never
        raise RuleError(path, f'unknown rule {spec!r}: a rule is a table, "always" or "never"')
    if not isinstance(spec, Mapping):
        raise RuleError(path, f'a rule is a table, "always" or "never", not {_kind(spec)}')
    if "field" in spec:
        return _compile_condition(spec, path)
    for key in spec:
        if key not in _COMBINATORS:
            if key in _OPERATORS:
                raise RuleError(path, f"condition {key!r} needs a 'field'")
            raise RuleError(f"{path}.{key}", f"unknown key {key!r}")
    if len(spec) != 1:
        found = ", ".join(sorted(spec)) or "nothing"
        raise RuleError(path, f"a combinator table has exactly one of all/any/not; found {found}")
    (key,) = spec
    if key == "not":
        inner = _compile(spec["not"], f"{path}.not", depth + 1)
        return lambda record: not inner(record)
    children = spec[key]
    if not isinstance(children, list):
        raise RuleError(f"{path}.{key}", f"expected a list of rules, not {_kind(children)}")
    if not children:
        hint = '"always"' if key == "all" else '"never"'
        raise RuleError(f"{path}.{key}", f"empty list; write {hint} if that is what you mean")
    preds = tuple(_compile(child, f"{path}.{key}[{i}]", depth + 1) for i, child in enumerate(children))
    if len(preds) == 1:
        return preds[0]
    return _all_of(preds) if key == "all" else _any_of(preds)


def _all_of(preds: tuple[Predicate, ...]) -> Predicate:
    def matches(record: Record) -> bool:
        return all(pred(record) for pred in preds)

    return matches


def _any_of(preds: tuple[Predicate, ...]) -> Predicate:
    def matches(record: Record) -> bool:
        return any(pred(record) for pred in preds)

    return matches


def _compile_condition(spec: Mapping[str, Any], path: str) -> Predicate:
    field = _check_field(spec["field"], f"{path}.field")
    ops = [key for key in spec if key != "field"]
    for key in ops:
        if key not in _OPERATORS:
            raise RuleError(f"{path}.{key}", f"unknown operator {key!r}")
    if len(ops) != 1:
        found = ", ".join(ops) or "none"
        raise RuleError(
            path,
            f"a condition has exactly one operator (use all = [...] to combine); found {found}",
        )
    (op,) = ops
    return _OPERATORS[op](field, spec[op], f"{path}.{op}")


def _check_field(field: Any, path: str) -> str:
    if not isinstance(field, str):
        raise RuleError(path, f"expected a field name, not {_kind(field)}")
    if field in KNOWN_FIELDS:
        return field
    if field.startswith(_ATTRIBUTE_PREFIX) and _ATTRIBUTE_NAME.fullmatch(
        field[len(_ATTRIBUTE_PREFIX) :]
    ):
        return field
    known = ", ".join(sorted(KNOWN_FIELDS))
    raise RuleError(path, f"unknown field {field!r}; known: {known}, user.attributes.<name>")


# --- operand checks ----------------------------------------------------------------------


def _kind(value: Any) -> str:
    if isinstance(value, Mapping):
        return "a table"
    if isinstance(value, list):
        return "a list"
    return f"{type(value).__name__} {value!r}"


def _is_number(value: Any) -> bool:
    # bool is an int subclass; type() keeps True from passing for 1.
    kind = type(value)
    return kind is int or kind is float


def _number(value: Any, path: str) -> int | float:
    if not _is_number(value):
        raise RuleError(path, f"expected a number, not {_kind(value)}")
    if not math.isfinite(value):
        raise RuleError(path, "expected a finite number")
    return value


def _scalar(value: Any, path: str) -> str | bool | int | float:
    if isinstance(value, str | bool):
        return value
    if _is_number(value):
        return _number(value, path)
    raise RuleError(path, f"expected a string, number or boolean, not {_kind(value)}")


def _parse_version(text: str) -> semver.Version | None:
    try:
        return semver.Version.parse(text, optional_minor_and_patch=True)
    except ValueError:
        return None


def _version(value: Any, path: str) -> semver.Version:
    if not isinstance(value, str):
        raise RuleError(path, f"expected a version string, not {_kind(value)}")
    version = _parse_version(value)
    if version is None:
        raise RuleError(
            path, f"{value!r} is not a version (expected e.g. 3, 3.2, 3.2.0, 3.2.0-beta.1)"
        )
    return version


def _version_test(test: Callable[[semver.Version], bool]) -> Callable[[Any], bool]:
    """Wrap ``test`` so that it takes a record value: non-strings and non-versions are False.

    Parsing and comparing with ``semver`` costs microseconds, so results are memoised per
    version string (bounded)."""
    memo: dict[str, bool] = {}

    def accepts(value: Any) -> bool:
        if type(value) is not str:
            return False
        result = memo.get(value)
        if result is None:
            version = _parse_version(value)
            result = version is not None and test(version)
            if len(memo) >= _VERSION_MEMO_LIMIT:
                memo.clear()
            memo[value] = result
        return result

    return accepts


def _equal_to(expected: str | bool | int | float) -> Callable[[Any], bool]:
    if isinstance(expected, bool):
        return lambda value: value is expected
    if isinstance(expected, str):
        return lambda value: type(value) is str and value == expected
    return lambda value: _is_number(value) and value == expected


def _member_of(values: Any, path: str) -> Callable[[Any], bool]:
    if not isinstance(values, list):
        raise RuleError(path, f"expected a list, not {_kind(values)}")
    if not values:
        raise RuleError(path, "empty list")
    strings: set[str] = set()
    numbers: set[int | float] = set()
    bools: set[bool] = set()
    for i, item in enumerate(values):
        value = _scalar(item, f"{path}[{i}]")
        if isinstance(value, bool):
            bools.add(value)
        elif isinstance(value, str):
            strings.add(value)
        else:
            numbers.add(value)
    frozen_strings, frozen_numbers = frozenset(strings), frozenset(numbers)

    def accepts(value: Any) -> bool:
        kind = type(value)
        if kind is str:
            return value in frozen_strings
        if kind is bool:
            return value in bools
        if kind is int or kind is float:
            return value in frozen_numbers
        return False

    return accepts


# --- operators: each takes (field, operand, path) and returns a record predicate ----------


def _present(field: str, accepts: Callable[[Any], bool]) -> Predicate:
    """Matches when the field is present (not None) and its value is accepted."""

    def matches(record: Record) -> bool:
        value = record.get(field)
        return value is not None and accepts(value)

    return matches


def _present_and_not(field: str, accepts: Callable[[Any], bool]) -> Predicate:
    """Matches when the field is present (not None) and its value is *not* accepted."""

    def matches(record: Record) -> bool:
        value = record.get(field)
        return value is not None and not accepts(value)

    return matches


def _op_eq(field: str, operand: Any, path: str) -> Predicate:
    return _present(field, _equal_to(_scalar(operand, path)))


def _op_ne(field: str, operand: Any, path: str) -> Predicate:
    return _present_and_not(field, _equal_to(_scalar(operand, path)))


def _op_in(field: str, operand: Any, path: str) -> Predicate:
    return _present(field, _member_of(operand, path))


def _op_not_in(field: str, operand: Any, path: str) -> Predicate:
    return _present_and_not(field, _member_of(operand, path))


def _numeric(compare: Callable[[Any, Any], bool]) -> Callable[[str, Any, str], Predicate]:
    def build(field: str, operand: Any, path: str) -> Predicate:
        bound = _number(operand, path)
        return _present(field, lambda value: _is_number(value) and compare(value, bound))

    return build


def _semver(compare: Callable[[Any, Any], bool]) -> Callable[[str, Any, str], Predicate]:
    def build(field: str, operand: Any, path: str) -> Predicate:
        bound = _version(operand, path)
        return _present(field, _version_test(lambda version: compare(version, bound)))

    return build


def _op_prefix(field: str, operand: Any, path: str) -> Predicate:
    items = operand if isinstance(operand, list) else [operand]
    if not items:
        raise RuleError(path, "empty list")
    for i, item in enumerate(items):
        item_path = f"{path}[{i}]" if isinstance(operand, list) else path
        if not isinstance(item, str):
            raise RuleError(item_path, f"expected a string, not {_kind(item)}")
        if not item:
            raise RuleError(item_path, "empty prefix (it would match every string)")
    prefixes = tuple(items)
    return _present(field, lambda value: type(value) is str and value.startswith(prefixes))


def _op_between(field: str, operand: Any, path: str) -> Predicate:
    if not isinstance(operand, list) or len(operand) != 2:
        raise RuleError(path, "expected [low, high]")
    low, high = operand
    if _is_number(low) and _is_number(high):
        lo, hi = _number(low, f"{path}[0]"), _number(high, f"{path}[1]")
        if lo > hi:
            raise RuleError(path, f"low {lo!r} is above high {hi!r}")
        return _present(field, lambda value: _is_number(value) and lo <= value <= hi)
    if isinstance(low, str) and isinstance(high, str):
        vlo, vhi = _version(low, f"{path}[0]"), _version(high, f"{path}[1]")
        if vlo > vhi:
            raise RuleError(path, f"low {low!r} is above high {high!r}")
        return _present(field, _version_test(lambda version: vlo <= version <= vhi))
    raise RuleError(path, "expected two numbers or two version strings")


def _op_exists(field: str, operand: Any, path: str) -> Predicate:
    if not isinstance(operand, bool):
        raise RuleError(path, f"expected true or false, not {_kind(operand)}")
    if operand:
        return lambda record: record.get(field) is not None
    return lambda record: record.get(field) is None


_OPERATORS: Final[Mapping[str, Callable[[str, Any, str], Predicate]]] = {
    "eq": _op_eq,
    "ne": _op_ne,
    "in": _op_in,
    "not_in": _op_not_in,
    "lt": _numeric(operator.lt),
    "le": _numeric(operator.le),
    "gt": _numeric(operator.gt),
    "ge": _numeric(operator.ge),
    "semver_lt": _semver(operator.lt),
    "semver_le": _semver(operator.le),
    "semver_gt": _semver(operator.gt),
    "semver_ge": _semver(operator.ge),
    "semver_eq": _semver(operator.eq),
    "prefix": _op_prefix,
    "between": _op_between,
    "exists": _op_exists,
}


# --- classes -----------------------------------------------------------------------------


@dataclass(frozen=True)
class ClassDef:
    id: str
    rule: Rule
    description: str = ""
    spec: Any = None  # the rule as written, shown by `pushctl classes`


class Classifier:
    """An ordered list of classes; a record belongs to the first class whose rule matches.

    Immutable: a config reload builds a new Classifier and swaps it in."""

    __slots__ = ("_by_id", "_classes", "_ordered")

    def __init__(self, classes: Sequence[ClassDef]) -> None:
        by_id: dict[str, ClassDef] = {}
        for class_def in classes:
            if class_def.id in by_id:
                raise ValueError(f"duplicate class id {class_def.id!r}")
            by_id[class_def.id] = class_def
        self._classes = tuple(classes)
        self._by_id = by_id
        self._ordered = tuple((c.id, _predicate_of(c.rule)) for c in self._classes)

    @classmethod
    def from_config(cls, classes: Sequence[Mapping[str, Any]], path: str = "classes") -> Classifier:
        """Build from the ``[[classes]]`` tables of the config; raise :class:`RuleError`."""
        if isinstance(classes, str | bytes | Mapping) or not isinstance(classes, Sequence):
            raise RuleError(path, f"expected a list of class tables, not {_kind(classes)}")
        defs: list[ClassDef] = []
        first_seen: dict[str, str] = {}
        for i, entry in enumerate(classes):
            entry_path = f"{path}[{i}]"
            if not isinstance(entry, Mapping):
                raise RuleError(entry_path, f"expected a table, not {_kind(entry)}")
            for key in entry:
                if key not in _CLASS_KEYS:
                    raise RuleError(
                        f"{entry_path}.{key}",
                        f"unknown key {key!r} (allowed: id, description, rule)",
                    )
            class_id = entry.get("id")
            if not isinstance(class_id, str) or not _CLASS_ID.fullmatch(class_id):
                raise RuleError(
                    f"{entry_path}.id",
                    "expected an id of 1-64 letters, digits, '.', '_' or '-' (not starting with '.', '_' or '-')",
                )
            if class_id == "unclassified":
                # pushd's own mark for "no class matched": the node does not re-check it
                raise RuleError(f"{entry_path}.id", "'unclassified' is reserved (a device no class matches)")
            if class_id in first_seen:
                raise RuleError(
                    f"{entry_path}.id",
                    f"duplicate class id {class_id!r} (first at {first_seen[class_id]})",
                )
            first_seen[class_id] = entry_path
            description = entry.get("description", "")
            if not isinstance(description, str):
                raise RuleError(
                    f"{entry_path}.description", f"expected a string, not {_kind(description)}"
                )
            if "rule" not in entry:
                raise RuleError(entry_path, "missing 'rule'")
            spec = copy.deepcopy(entry["rule"])
            rule = compile_rule(spec, f"{entry_path}.rule")
            defs.append(ClassDef(id=class_id, rule=rule, description=description, spec=spec))
        return cls(defs)

    @property
    def classes(self) -> tuple[ClassDef, ...]:
        return self._classes

    def __len__(self) -> int:
        return len(self._classes)

    def classify(self, record: Record) -> str | None:
        """The id of the first class whose rule matches ``record``; None if none does."""
        for class_id, predicate in self._ordered:
            if predicate(record):
                return class_id
        return None

    def rule(self, class_id: str) -> Rule | None:
        class_def = self._by_id.get(class_id)
        return None if class_def is None else class_def.rule

    def describe(self) -> list[dict[str, Any]]:
        """Plain data (msgpack-able) for the ``classes`` control op, in match order."""
        return [
            {"id": c.id, "description": c.description, "rule": copy.deepcopy(c.spec)}
            for c in self._classes
        ]


def _predicate_of(rule: Rule) -> Predicate:
    if isinstance(rule, CompiledRule):
        return rule._predicate
    return rule.matches
