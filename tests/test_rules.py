from __future__ import annotations

import tomllib
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from actors.rules import ClassDef, Classifier, Record, RuleError, compile_rule

DEVICE: Record = {
    "device.id": "d-1",
    "device.model": "iPhone15,2",
    "device.os_version": "17.4.1",
    "device.app_version": "3.1.9",
    "device.locale": "en_GB",
    "device.environment": "production",
    "user.id": "u-1",
    "user.attributes.age": 34,
    "user.attributes.score": 7.5,
    "user.attributes.beta": True,
    "user.attributes.nickname": None,
    "permissions.alert": True,
    "permissions.background": False,
}


def matches(spec: Any, record: Record = DEVICE) -> bool:
    return compile_rule(spec).matches(record)


def cond(field: str, **op: Any) -> dict[str, Any]:
    """A condition; ``in_`` stands for the ``in`` operator (a Python keyword)."""
    return {"field": field, **{name.rstrip("_"): value for name, value in op.items()}}


# --- operators ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        (cond("device.locale", eq="en_GB"), True),
        (cond("device.locale", eq="en_US"), False),
        (cond("user.attributes.age", eq=34), True),
        (cond("user.attributes.age", eq=34.0), True),
        (cond("user.attributes.age", eq="34"), False),  # no coercion
        (cond("permissions.alert", eq=True), True),
        (cond("permissions.alert", eq=1), False),  # a bool is not a number
        (cond("user.attributes.beta", eq=1), False),
        (cond("permissions.background", eq=False), True),
        (cond("device.locale", ne="en_US"), True),
        (cond("device.locale", ne="en_GB"), False),
        (cond("user.attributes.age", ne="34"), True),  # different type: not equal
        (cond("device.model", in_=["iPhone15,2", "iPhone14,5"]), True),
        (cond("device.model", in_=["iPad13,1"]), False),
        (cond("user.attributes.age", in_=[1, 34]), True),
        (cond("user.attributes.age", in_=["34"]), False),
        (cond("permissions.alert", in_=[1]), False),
        (cond("permissions.alert", in_=[True, "x"]), True),
        (cond("device.model", not_in=["iPad13,1"]), True),
        (cond("device.model", not_in=["iPhone15,2"]), False),
        (cond("user.attributes.age", lt=35), True),
        (cond("user.attributes.age", lt=34), False),
        (cond("user.attributes.age", le=34), True),
        (cond("user.attributes.age", gt=33.5), True),
        (cond("user.attributes.age", gt=34), False),
        (cond("user.attributes.score", ge=7.5), True),
        (cond("user.attributes.score", ge=7.6), False),
        (cond("device.app_version", lt=4), False),  # a string is not a number
        (cond("permissions.alert", ge=0), False),  # nor is a bool
        (cond("device.locale", prefix="en"), True),
        (cond("device.locale", prefix="en_US"), False),
        (cond("device.locale", prefix=["fr", "en_"]), True),
        (cond("device.locale", prefix="EN"), False),  # case-sensitive
        (cond("user.attributes.age", prefix="3"), False),
        (cond("user.attributes.age", between=[34, 40]), True),
        (cond("user.attributes.age", between=[30, 34]), True),
        (cond("user.attributes.age", between=[35, 40]), False),
        (cond("user.attributes.score", between=[7, 7.5]), True),
        (cond("device.os_version", between=["16", "17.4.1"]), True),
        (cond("device.os_version", between=["17.4.2", "18"]), False),
        (cond("device.id", exists=True), True),
        (cond("device.id", exists=False), False),
    ],
)
def test_operator(spec: dict[str, Any], expected: bool) -> None:
    assert matches(spec) is expected


@pytest.mark.parametrize(
    ("op", "bound", "expected"),
    [
        ("semver_lt", "3.2", True),
        ("semver_lt", "3.1.9", False),
        ("semver_le", "3.1.9", True),
        ("semver_le", "3.1.8", False),
        ("semver_gt", "3.1", True),
        ("semver_gt", "3.1.9", False),
        ("semver_ge", "3.1.9", True),
        ("semver_ge", "3.1.10", False),  # numeric, not lexical: 10 > 9
        ("semver_eq", "3.1.9", True),
        ("semver_eq", "3.1.90", False),
    ],
)
def test_semver_operators(op: str, bound: str, expected: bool) -> None:
    assert matches(cond("device.app_version", **{op: bound})) is expected


@pytest.mark.parametrize(
    ("value", "op", "bound", "expected"),
    [
        ("3.2", "semver_eq", "3.2.0", True),  # missing parts are zero
        ("3", "semver_eq", "3.0.0", True),
        ("3.2.0", "semver_eq", "3.2", True),
        ("3.10.0", "semver_gt", "3.9.0", True),
        ("3.2.0-beta.1", "semver_lt", "3.2.0", True),  # a pre-release precedes its release
        ("3.2.0-beta.2", "semver_gt", "3.2.0-beta.1", True),
        ("3.2.0-beta.11", "semver_gt", "3.2.0-beta.2", True),
        ("3.2.0-rc.1", "semver_gt", "3.2.0-beta.9", True),
        ("3.2.0+build.7", "semver_eq", "3.2.0", True),  # build metadata is ignored
        # Not versions: never match, whatever the operator.
        ("v3.2", "semver_lt", "9.0", False),
        ("3.2.0.1", "semver_lt", "9.0", False),
        ("03.2", "semver_lt", "9.0", False),
        ("", "semver_lt", "9.0", False),
        ("latest", "semver_gt", "0.0.1", False),
        (320, "semver_lt", "9.0", False),
        (3.2, "semver_eq", "3.2", False),
    ],
)
def test_semver_edge_cases(value: Any, op: str, bound: str, expected: bool) -> None:
    rule = compile_rule(cond("device.app_version", **{op: bound}))
    assert rule.matches({"device.app_version": value}) is expected
    # Evaluating twice (memoised path) gives the same answer.
    assert rule.matches({"device.app_version": value}) is expected


def test_semver_memo_is_bounded_and_stays_correct() -> None:
    rule = compile_rule(cond("device.app_version", semver_lt="1000.0"))
    for minor in range(10_000):
        assert rule.matches({"device.app_version": f"1.{minor}"})
    assert not rule.matches({"device.app_version": "1000.0.1"})


@pytest.mark.parametrize(
    "spec",
    [
        cond("user.attributes.missing", eq="x"),
        cond("user.attributes.missing", ne="x"),
        cond("user.attributes.missing", in_=["x"]),
        cond("user.attributes.missing", not_in=["x"]),
        cond("user.attributes.missing", lt=1),
        cond("user.attributes.missing", semver_lt="1.0"),
        cond("user.attributes.missing", prefix="x"),
        cond("user.attributes.missing", between=[1, 2]),
        cond("user.attributes.missing", exists=True),
        cond("user.attributes.nickname", ne="x"),  # None counts as missing
        cond("user.attributes.nickname", exists=True),
    ],
)
def test_missing_field_does_not_match(spec: dict[str, Any]) -> None:
    assert matches(spec) is False


def test_exists_false_matches_missing_and_none() -> None:
    assert matches(cond("user.attributes.missing", exists=False))
    assert matches(cond("user.attributes.nickname", exists=False))


def test_unhashable_or_odd_values_never_match() -> None:
    for value in (["a", "b"], {"a": 1}, b"a"):
        record = {"user.attributes.tags": value}
        assert not compile_rule(cond("user.attributes.tags", in_=["a"])).matches(record)
        assert not compile_rule(cond("user.attributes.tags", eq="a")).matches(record)
        assert not compile_rule(cond("user.attributes.tags", prefix="a")).matches(record)


# --- combinators -------------------------------------------------------------------------

YES = cond("device.locale", prefix="en")
NO = cond("device.locale", prefix="fr")


@pytest.mark.parametrize(
    ("spec", "expected"),
    [
        ("always", True),
        ("never", False),
        ({"all": [YES]}, True),
        ({"all": [YES, YES]}, True),
        ({"all": [YES, NO]}, False),
        ({"all": [NO, YES, YES]}, False),
        ({"any": [NO]}, False),
        ({"any": [NO, YES]}, True),
        ({"any": [NO, NO, NO]}, False),
        ({"not": YES}, False),
        ({"not": NO}, True),
        ({"not": {"not": YES}}, True),
        ({"not": "never"}, True),
        ({"all": [YES, {"any": [NO, {"not": NO}]}]}, True),
        ({"any": [NO, {"all": [YES, {"not": YES}]}]}, False),
        # `not` of a semver test also matches a missing field or a non-version
        ({"not": cond("user.attributes.missing", semver_lt="1.0")}, True),
    ],
)
def test_combinators(spec: Any, expected: bool) -> None:
    assert matches(spec) is expected


# Trees of "always"/"never" under all/any/not, checked against a direct evaluation.
trees = st.recursive(
    st.sampled_from(["always", "never"]),
    lambda children: st.one_of(
        st.lists(children, min_size=1, max_size=4).map(lambda c: {"all": c}),
        st.lists(children, min_size=1, max_size=4).map(lambda c: {"any": c}),
        children.map(lambda c: {"not": c}),
    ),
    max_leaves=12,
)


def evaluate(tree: Any) -> bool:
    if tree == "always":
        return True
    if tree == "never":
        return False
    if "all" in tree:
        return all(evaluate(child) for child in tree["all"])
    if "any" in tree:
        return any(evaluate(child) for child in tree["any"])
    return not evaluate(tree["not"])


@settings(derandomize=True, database=None)
@given(trees)
def test_combinator_trees(tree: Any) -> None:
    assert matches(tree) is evaluate(tree)


# Release versions, possibly shortened ("3", "3.2"), against plain tuple order.
versions = st.lists(st.integers(min_value=0, max_value=30), min_size=1, max_size=3)


def as_text(parts: list[int]) -> str:
    return ".".join(map(str, parts))


def as_tuple(parts: list[int]) -> tuple[int, ...]:
    return tuple(parts + [0] * (3 - len(parts)))


@settings(derandomize=True, database=None)
@given(versions, versions)
def test_semver_order_matches_numeric_order(value: list[int], bound: list[int]) -> None:
    record = {"device.os_version": as_text(value)}
    v, b = as_tuple(value), as_tuple(bound)
    expected = {
        "semver_lt": v < b,
        "semver_le": v <= b,
        "semver_gt": v > b,
        "semver_ge": v >= b,
        "semver_eq": v == b,
    }
    for op, result in expected.items():
        assert (
            compile_rule(cond("device.os_version", **{op: as_text(bound)})).matches(record)
            is result
        )


# --- strict compilation ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("spec", "path", "fragment"),
    [
        ("sometimes", "rule", "unknown rule"),
        (42, "rule", "a rule is a table"),
        ([YES], "rule", "a rule is a table"),
        ({}, "rule", "exactly one of all/any/not"),
        ({"all": [YES], "any": [YES]}, "rule", "exactly one of all/any/not"),
        ({"al": [YES]}, "rule.al", "unknown key"),
        ({"all": []}, "rule.all", '"always"'),
        ({"any": []}, "rule.any", '"never"'),
        ({"all": YES}, "rule.all", "expected a list of rules"),
        ({"all": [YES, {"any": [YES, 7]}]}, "rule.all[1].any[1]", "a rule is a table"),
        ({"not": {"all": [YES, {"eq": 1}]}}, "rule.not.all[1]", "needs a 'field'"),
        (cond("device.locale", equals="en"), "rule.equals", "unknown operator"),
        (cond("device.locale"), "rule", "exactly one operator"),
        (cond("device.locale", eq="en", ne="fr"), "rule", "exactly one operator"),
        ({"field": 3, "eq": 1}, "rule.field", "expected a field name"),
        (cond("device.app_verison", eq="1"), "rule.field", "unknown field"),
        (cond("app_version", eq="1"), "rule.field", "unknown field"),
        (cond("user.attributes.", eq="1"), "rule.field", "unknown field"),
        (cond("device.locale", eq=["en"]), "rule.eq", "expected a string, number or boolean"),
        (cond("device.locale", eq={"a": 1}), "rule.eq", "expected a string, number or boolean"),
        (cond("device.locale", in_="en"), "rule.in", "expected a list"),
        (cond("device.locale", in_=[]), "rule.in", "empty list"),
        (cond("device.locale", not_in=["en", None]), "rule.not_in[1]", "expected a string"),
        (cond("user.attributes.age", lt="3"), "rule.lt", "expected a number"),
        (cond("user.attributes.age", ge=True), "rule.ge", "expected a number"),
        (cond("user.attributes.age", gt=float("nan")), "rule.gt", "finite"),
        (cond("device.app_version", semver_lt=3), "rule.semver_lt", "version string"),
        (cond("device.app_version", semver_ge="3.x"), "rule.semver_ge", "not a version"),
        (cond("device.app_version", semver_eq="v3"), "rule.semver_eq", "not a version"),
        (cond("device.locale", prefix=""), "rule.prefix", "empty prefix"),
        (cond("device.locale", prefix=["en", 1]), "rule.prefix[1]", "expected a string"),
        (cond("device.locale", prefix=[]), "rule.prefix", "empty list"),
        (cond("user.attributes.age", between=[1]), "rule.between", "[low, high]"),
        (cond("user.attributes.age", between=5), "rule.between", "[low, high]"),
        (cond("user.attributes.age", between=[5, 1]), "rule.between", "above"),
        (cond("user.attributes.age", between=[1, "2"]), "rule.between", "two numbers"),
        (cond("device.os_version", between=["18", "17"]), "rule.between", "above"),
        (cond("device.os_version", between=["17", "x"]), "rule.between[1]", "not a version"),
        (cond("device.id", exists="yes"), "rule.exists", "true or false"),
    ],
)
def test_compile_errors_name_the_path(spec: Any, path: str, fragment: str) -> None:
    with pytest.raises(RuleError) as info:
        compile_rule(spec)
    assert info.value.path == path
    assert fragment in info.value.message
    assert str(info.value).startswith(f"{path}: ")


def test_compile_error_uses_given_path() -> None:
    with pytest.raises(RuleError) as info:
        compile_rule({"any": [YES, {"bogus": 1}]}, path="targets[0].filter")
    assert info.value.path == "targets[0].filter.any[1].bogus"


# --- classifier --------------------------------------------------------------------------

CONFIG = """
[[classes]]
id = "sandbox"
rule = { field = "device.environment", eq = "sandbox" }

[[classes]]
id = "needs-update"
description = "app older than 3.2, English locales"
rule = { all = [ { field = "device.app_version", semver_lt = "3.2" },
                 { field = "device.locale", prefix = "en" } ] }

[[classes]]
id = "adults"
rule = { field = "user.attributes.age", ge = 18 }

[[classes]]
id = "default"
rule = "always"
"""


@pytest.fixture
def classifier() -> Classifier:
    return Classifier.from_config(tomllib.loads(CONFIG)["classes"])


def test_first_matching_class_wins(classifier: Classifier) -> None:
    assert classifier.classify(DEVICE) == "needs-update"  # also an adult: order decides
    assert classifier.classify({**DEVICE, "device.app_version": "3.2.0"}) == "adults"
    assert classifier.classify({**DEVICE, "device.environment": "sandbox"}) == "sandbox"
    assert classifier.classify({"device.id": "d-2"}) == "default"


def test_no_match_is_none() -> None:
    classifier = Classifier.from_config([{"id": "en", "rule": YES}])
    assert classifier.classify(DEVICE) == "en"
    assert classifier.classify({"device.locale": "fr_FR"}) is None
    assert Classifier.from_config([]).classify(DEVICE) is None


def test_rule_lookup_rechecks_a_device(classifier: Classifier) -> None:
    rule = classifier.rule("needs-update")
    assert rule is not None
    assert rule.matches(DEVICE)
    assert not rule.matches({**DEVICE, "device.app_version": "3.2.1"})  # updated meanwhile
    assert classifier.rule("nope") is None


def test_describe_returns_specs_in_order(classifier: Classifier) -> None:
    described = classifier.describe()
    assert [c["id"] for c in described] == ["sandbox", "needs-update", "adults", "default"]
    assert described[1]["description"] == "app older than 3.2, English locales"
    assert described[0]["description"] == ""
    assert described[0]["rule"] == {"field": "device.environment", "eq": "sandbox"}
    assert described[3]["rule"] == "always"
    described[0]["rule"]["eq"] = "mutated"  # a copy: the classifier is unaffected
    assert classifier.describe()[0]["rule"]["eq"] == "sandbox"


def test_config_is_copied_not_shared() -> None:
    classes = [{"id": "a", "rule": {"field": "device.locale", "eq": "en"}}]
    classifier = Classifier.from_config(classes)
    classes[0]["rule"]["eq"] = "fr"  # type: ignore[index]
    assert classifier.describe()[0]["rule"]["eq"] == "en"
    assert classifier.classify({"device.locale": "en"}) == "a"


def test_classifier_from_classdefs() -> None:
    en = ClassDef(id="en", rule=compile_rule(YES))
    classifier = Classifier([en, ClassDef(id="rest", rule=compile_rule("always"))])
    assert classifier.classes[0] is en
    assert len(classifier) == 2
    assert classifier.classify({"device.locale": "fr"}) == "rest"
    with pytest.raises(ValueError, match="duplicate"):
        Classifier([en, en])


@pytest.mark.parametrize(
    ("classes", "path", "fragment"),
    [
        ("always", "classes", "expected a list"),
        ({"id": "a"}, "classes", "expected a list"),
        ([{"id": "a", "rule": "always"}, "b"], "classes[1]", "expected a table"),
        ([{"id": "a", "rule": "always", "when": 1}], "classes[0].when", "unknown key"),
        ([{"rule": "always"}], "classes[0].id", "expected an id"),
        ([{"id": "", "rule": "always"}], "classes[0].id", "expected an id"),
        ([{"id": "has space", "rule": "always"}], "classes[0].id", "expected an id"),
        ([{"id": 7, "rule": "always"}], "classes[0].id", "expected an id"),
        (
            [{"id": "a", "rule": "always"}, {"id": "a", "rule": "never"}],
            "classes[1].id",
            "duplicate class id 'a' (first at classes[0])",
        ),
        ([{"id": "a", "rule": "always", "description": 1}], "classes[0].description", "string"),
        ([{"id": "unclassified", "rule": "always"}], "classes[0].id", "reserved"),
        ([{"id": "a"}], "classes[0]", "missing 'rule'"),
        (
            [{"id": "a", "rule": "always"}, {"id": "b", "rule": {"all": [{"field": "x"}]}}],
            "classes[1].rule.all[0].field",
            "unknown field",
        ),
    ],
)
def test_classifier_config_errors(classes: Any, path: str, fragment: str) -> None:
    with pytest.raises(RuleError) as info:
        Classifier.from_config(classes)
    assert info.value.path == path
    assert fragment in info.value.message


def test_toml_attribute_filter_form() -> None:
    doc = tomllib.loads(
        """
        filter = { any = [ { field = "user.attributes.plan", in = ["pro", "team"] },
                           { not = { field = "permissions.alert", eq = true } } ] }
        """
    )
    rule = compile_rule(doc["filter"], path="filter")
    assert rule.matches({"user.attributes.plan": "team", "permissions.alert": True})
    assert rule.matches({"user.attributes.plan": "free", "permissions.alert": False})
    assert not rule.matches({"user.attributes.plan": "free", "permissions.alert": True})


def test_a_rule_nested_too_deep_is_refused_with_its_path_not_a_recursion_error() -> None:
    ok: Any = {"field": "device.locale", "eq": "de_DE"}
    for _ in range(32):
        ok = {"not": ok}
    assert compile_rule(ok).matches({"device.locale": "de_DE"}) is True  # 32 nots: even
    deep: Any = {"field": "device.locale", "eq": "de_DE"}
    for _ in range(2000):
        deep = {"any": [deep]}
    with pytest.raises(RuleError, match="nested more than 32 levels deep"):
        compile_rule(deep, "target.filter")
