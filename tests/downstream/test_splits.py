"""Case-level splits: disjoint, stable per seed, fixed val/test across fractions, nested fractions."""

from __future__ import annotations

import pytest

from raymim.downstream.splits import fraction_subset, make_split

CASES = [f"case_{i:03d}" for i in range(40)]


def test_split_disjoint_and_complete():
    s = make_split(CASES, split_seed=3, val_fraction=0.2, test_fraction=0.25)
    assert not (set(s.train) & set(s.val)) and not (set(s.train) & set(s.test)) and not (set(s.val) & set(s.test))
    assert sorted(s.train + s.val + s.test) == CASES
    assert (len(s.test), len(s.val)) == (10, 8)


def test_split_stable_per_seed_and_order_independent():
    a = make_split(CASES, split_seed=1)
    b = make_split(list(reversed(CASES)), split_seed=1)
    c = make_split(CASES, split_seed=2)
    assert a == b
    assert a.test != c.test


def test_fractions_nested_fixed_heldout_and_seeded():
    s = make_split(CASES, split_seed=0)
    for seed in range(3):
        subsets = [fraction_subset(s.train, f, seed) for f in (0.05, 0.1, 0.25, 0.5, 1.0)]
        for small, big in zip(subsets, subsets[1:]):
            assert set(small) <= set(big)
        assert subsets[-1] == sorted(s.train)
        assert len(subsets[0]) == 2  # ceil(0.05 * 24)
        assert all(not (set(x) & set(s.test + s.val)) for x in subsets)
    assert fraction_subset(s.train, 0.25, 0) == fraction_subset(s.train, 0.25, 0)
    assert fraction_subset(s.train, 0.25, 0) != fraction_subset(s.train, 0.25, 1)


def test_fixed_sides_and_small_sets():
    s = make_split(["a", "b", "c", "d"], fixed={"d": "test"}, val_fraction=0.0, test_fraction=0.34)
    assert "d" in s.test and "d" not in s.train
    s2 = make_split(["a", "b"], val_fraction=0.2, test_fraction=0.2)
    assert len(s2.train) == 1 and len(s2.test) == 1
    with pytest.raises(ValueError, match="at least one training"):
        make_split(["a"])


def test_split_keeps_each_patient_on_one_side():
    patients = {c: f"p{i // 3}" for i, c in enumerate(CASES)}  # 3 scans per patient
    for seed in range(5):
        s = make_split(CASES, split_seed=seed, val_fraction=0.2, test_fraction=0.25, groups=patients)
        side = {}
        for name in ("train", "val", "test"):
            for c in getattr(s, name):
                assert side.setdefault(patients[c], name) == name, f"patient {patients[c]} on two sides"
        assert sorted(s.train + s.val + s.test) == CASES and s.val and s.test
    # Without groups the split is the case-level one (unchanged behaviour).
    assert make_split(CASES, split_seed=1, groups={}) == make_split(CASES, split_seed=1)


def test_fixed_case_takes_its_patient_and_conflicts_are_refused():
    patients = {"case_000": "p", "case_001": "p"}
    s = make_split(CASES, split_seed=0, fixed={"case_000": "test"}, groups=patients)
    assert {"case_000", "case_001"} <= set(s.test)
    with pytest.raises(ValueError, match="patient 'p'"):
        make_split(CASES, fixed={"case_000": "test", "case_001": "train"}, groups=patients)
