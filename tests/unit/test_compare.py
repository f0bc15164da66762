"""Declared comparisons: when two results of one job count as the same."""

from __future__ import annotations

import pytest

from meshjobs.compare import EXACT, parse, spec_of, valid_comparison
from meshjobs.errors import UsageError


def test_the_default_is_exact_json_equality() -> None:
    exact = parse(None)
    assert exact.exact and exact.spec == EXACT == spec_of("exact") == spec_of(" exact ")
    assert exact.same({"a": [1, "x"], "b": None}, {"b": None, "a": [1, "x"]})
    assert exact.same(5, 5.0)  # JSON has one kind of number, as the canonical form says
    assert not exact.same(0.1 + 0.2, 0.3)
    assert not exact.same([1, 2], [2, 1]) and not exact.same("a ", "a")


def test_types_never_mix() -> None:
    loose = parse("rel=0.5,abs=10,strip,casefold,unordered")
    assert not loose.same(True, 1) and not loose.same(1, "1") and not loose.same(None, 0)
    assert not loose.same([1], {"0": 1}) and not loose.same(False, 0.0)


def test_numbers_within_a_relative_or_absolute_tolerance() -> None:
    rel = parse("rel=1e-9")
    assert rel.same(0.1 + 0.2, 0.3) and rel.same({"mean": [1e12, 2.0]}, {"mean": [1e12 + 1, 2.0]})
    assert not rel.same(1.0, 1.0 + 1e-6) and not rel.same(0.0, 1e-300)  # near zero only abs= helps
    both = parse("abs=1e-12,rel=1e-9")
    assert both.same(0.0, 1e-13) and both.same(1e6, 1e6 + 1e-4) and not both.same(0.0, 1e-11)


def test_arrays_in_any_order_when_declared() -> None:
    unordered = parse("unordered")
    assert unordered.same([3, 1, 2], [1, 2, 3]) and unordered.same([{"k": "b"}, {"k": "a"}], [{"k": "a"}, {"k": "b"}])
    assert not unordered.same([1, 1, 2], [1, 2, 2]) and not unordered.same([1, 2], [1, 2, 2])
    # With a tolerance, near-equal items still pair up, even where sorting their text would not line them up.
    near = parse("rel=1e-6,unordered")
    a = [{"a": 0.9999999, "b": "q"}, {"a": 1.0, "b": "p"}]  # sorted by text: q first here, p first below
    assert near.same(a, [{"a": 1.0000001, "b": "q"}, {"a": 1.0, "b": "p"}])
    assert not near.same([1.0, 5.0], [1.0, 5.1])


def test_ignored_keys_at_any_depth_and_text_normalised() -> None:
    c = parse("ignore=took_ms|host,strip,casefold")
    assert c.same({"v": "Hello  World ", "took_ms": 3, "nested": [{"host": "a", "y": 1}]},
                  {"v": "hello world", "took_ms": 9, "nested": [{"host": "b", "y": 1}]})  # fmt: skip
    assert not c.same({"v": "a", "took_ms": 1}, {"v": "a", "extra": 1})  # other keys still count
    assert not c.same({"v": "hello"}, {"v": "hell o"})


def test_the_canonical_text_names_one_comparison_however_written() -> None:
    assert spec_of("unordered, rel=1e-9,ignore=b|a") == spec_of("ignore=a|b,rel=0.000000001,unordered")
    assert spec_of("unordered,rel=1e-9,ignore=b|a") == "ignore=a|b,rel=1e-09,unordered"
    assert parse(spec_of("abs=0.5,casefold,strip")) == parse("strip,casefold,abs=0.5")
    assert valid_comparison("exact") is None and valid_comparison("rel=0.1") == "rel=0.1"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("fuzzy", "unknown comparison term 'fuzzy'"),
        ("rel=1", "the tolerance must be at least 0 and below 1"),
        ("rel=-0.1", "the tolerance must be at least 0 and below 1"),
        ("abs=nan", "a finite number, at least 0"),
        ("rel=x", "the tolerance must be"),
        ("rel=0.1,rel=0.2", "given twice"),
        ("ignore=", "unknown comparison term"),
        ("ignore=a b", "keys are 1-64 characters"),
        ("unordered=yes", "unknown comparison term"),
        ("exact,unordered", "unknown comparison term 'exact'"),
        ("x" * 300, "at most 256 characters"),
    ],
)
def test_bad_comparisons_are_one_line_errors(spec: str, message: str) -> None:
    with pytest.raises(UsageError) as caught:
        parse(spec)
    assert message in str(caught.value) and "\n" not in str(caught.value)
    with pytest.raises(ValueError, match="comparison|tolerance|characters"):
        valid_comparison(spec)


def test_absurd_nesting_is_never_the_same() -> None:
    deep: object = 1
    for _ in range(100):
        deep = [deep]
    assert not parse("rel=0.1").same(deep, deep)
