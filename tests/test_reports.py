"""Totals: one value per declared counter, combined with each counter's declared reduction; ratios derived."""

from __future__ import annotations

import copy
import pickle

import pytest

from mask_monitor.counters import COUNTER, COUNTERS, FIELDS, MAX_FIELDS, RATIOS, SUM_FIELDS
from mask_monitor.reports import Totals


def test_fields_follow_the_declarations():
    assert FIELDS == tuple(c.name for c in COUNTERS)
    assert FIELDS == SUM_FIELDS + MAX_FIELDS  # sum-reduced first, so a stats vector combines by slicing
    assert set(MAX_FIELDS) == {c.name for c in COUNTERS if c.reduce == "max"}


def test_addition_uses_each_counters_reduction():
    a = Totals(**{f: 1.0 + i for i, f in enumerate(FIELDS)})
    b = Totals(**{f: 10.0 - i for i, f in enumerate(FIELDS)})
    total = a + b
    for i, f in enumerate(FIELDS):
        want = max(1.0 + i, 10.0 - i) if COUNTER[f].reduce == "max" else 11.0
        assert getattr(total, f) == want, f
    assert Totals.total([a, b, Totals()]) == total


def test_ratios_are_ratios_of_summed_counts_and_none_without_data():
    a = Totals(target_tokens=10, masked_tokens=9)
    b = Totals(target_tokens=30, masked_tokens=3)
    assert (a + b).masked_ratio == pytest.approx(12 / 40)  # not the mean of 0.9 and 0.1
    empty = Totals()
    for r in RATIOS:
        assert getattr(empty, r.name) is None, r.name


def test_as_dict_has_every_counter_and_ratio_with_counts_as_ints():
    d = Totals(supervised_tokens=3, loss_sum=1.5, max_masked_ratio=0.25).as_dict()
    assert set(d) == set(FIELDS) | {r.name for r in RATIOS}
    assert d["supervised_tokens"] == 3 and isinstance(d["supervised_tokens"], int)
    assert d["loss_sum"] == 1.5 and d["max_masked_ratio"] == 0.25


def test_constructors_round_trip():
    t = Totals(micro_batches=2, supervised_tokens=7, max_masked_ratio=0.5)
    assert Totals.from_values(t.values()) == t
    assert Totals.from_mapping({**t.as_dict(), "not_a_counter": 3}) == t
    with pytest.raises(TypeError, match="unknown counter"):
        Totals(supervised=1)
    with pytest.raises(ValueError, match="one per counter"):
        Totals.from_values([1.0, 2.0])


def test_immutable_hashable_and_picklable():
    t = Totals(sequences=4, fully_masked_sequences=1)
    with pytest.raises(AttributeError):
        t.sequences = 5  # type: ignore[misc]
    assert pickle.loads(pickle.dumps(t)) == t == copy.deepcopy(t)
    assert len({t, Totals(sequences=4, fully_masked_sequences=1)}) == 1
    assert repr(t) == "Totals(sequences=4, fully_masked_sequences=1)"
    with pytest.raises(AttributeError, match="no counter or ratio"):
        t.no_such_counter  # noqa: B018
