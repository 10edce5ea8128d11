"""The multi-index self-join returns exactly the pairs brute force returns: boundary distances,
clusters of near-identical hashes (a CT series), identical hashes, every kind of table and chunking."""

from __future__ import annotations

import numpy as np
import pytest

from covidscan.data import hashindex
from covidscan.data.hashindex import (
    JoinPlan,
    Table,
    brute_force_pairs,
    join_pairs,
    near_duplicate_pairs,
    nearest_distances,
    plan_join,
)


def _flip(rng: np.random.Generator, code: np.ndarray, distance: int) -> np.ndarray:
    bits = np.unpackbits(code.view(np.uint8))
    bits[rng.choice(bits.size, distance, replace=False)] ^= 1
    return np.packbits(bits).view(np.uint64)


def _random(rng: np.random.Generator, n: int, words: int) -> np.ndarray:
    return rng.integers(0, 2**64, size=(n, words), dtype=np.uint64, endpoint=False)


def _planted(n: int, words: int, threshold: int, seed: int) -> np.ndarray:
    """Random hashes plus copies at every distance from 0 to threshold + 2 (so both sides of the
    boundary), some chained (a copy of a copy), and a cluster of near-identical hashes."""
    rng = np.random.default_rng(seed)
    hashes = _random(rng, n, words)
    targets = rng.permutation(n)
    k = 0
    for distance in list(range(threshold + 3)) * 4 + [threshold] * 20:
        source, target = targets[k], targets[k + 1]
        hashes[target] = _flip(rng, hashes[source], distance)
        k += 2
    for member in targets[k : k + 30]:  # a tight cluster: many pairs among themselves
        hashes[member] = _flip(rng, hashes[targets[k]], int(rng.integers(0, threshold // 2 + 1)))
    return hashes


def _series(n: int, words: int, seed: int, per_patient: int = 100, spread: int = 14) -> np.ndarray:
    """CT-like: "patients" of ``per_patient`` slices, each slice a few random bits from the patient's
    base hash (so most pairs inside a patient are near-duplicates, some just over the threshold),
    several identical slices, and the slices shuffled."""
    rng = np.random.default_rng(seed)
    bases = _random(rng, -(-n // per_patient), words)
    hashes = np.stack([_flip(rng, bases[k // per_patient], int(rng.integers(0, spread + 1))) for k in range(n)])
    hashes[rng.choice(n, 40, replace=False)] = hashes[0]  # blank slices: one hash many times
    return hashes[rng.permutation(n)]


def _reference(hashes: np.ndarray, threshold: int) -> set[tuple[int, int, int]]:
    bits = np.unpackbits(hashes.view(np.uint8), axis=1)
    found = set()
    for i in range(len(hashes)):
        distance = (bits[i + 1 :] != bits[i]).sum(axis=1)
        found |= {(i, i + 1 + int(j), int(distance[j])) for j in np.nonzero(distance <= threshold)[0]}
    return found


@pytest.mark.parametrize(
    ("kind", "n", "words", "threshold"),
    [("planted", 3000, 4, 24), ("planted", 2500, 1, 6), ("planted", 2000, 4, 0), ("series", 3000, 4, 24)],
)
def test_join_returns_exactly_the_brute_force_pairs(kind, n, words, threshold):
    hashes = _planted(n, words, threshold, seed=n) if kind == "planted" else _series(n, words, seed=n)
    expected = _reference(hashes, threshold)
    brute = brute_force_pairs(hashes, threshold, block=97)
    joined = join_pairs(hashes, threshold)
    assert {tuple(map(int, p)) for p in brute} == expected
    assert np.array_equal(joined, brute[np.lexsort((brute[:, 1], brute[:, 0]))])
    assert any(d == threshold for _, _, d in expected), "the boundary distance must be exercised"
    if kind == "series":
        assert any(d == threshold + 1 for d in brute_force_pairs(hashes, threshold + 1)[:, 2])
        assert len(expected) > 20 * n, "clusters must give many more pairs than hashes"


PLANS = {
    "radius 2 and 0": JoinPlan((Table(28, 2),) * 8 + (Table(32, 0),)),
    "radius 1": JoinPlan((Table(19, 1),) * 13),
    "radius 0 only": JoinPlan((Table(10, 0),) * 25),
    "mixed, bits left over": JoinPlan((Table(12, 2),) * 5 + (Table(9, 1),) * 4 + (Table(7, 0),) * 2),
}


@pytest.mark.parametrize("plan", PLANS.values(), ids=PLANS.keys())
def test_every_kind_of_table_and_small_chunks_give_the_same_pairs(plan, monkeypatch):
    monkeypatch.setattr(hashindex, "_CHUNK", 257)  # many chunks, runs and groups split across them
    hashes = _series(2000, 4, seed=11)
    expected = brute_force_pairs(hashes, 24)
    for workers in (1, 2):
        assert np.array_equal(join_pairs(hashes, 24, plan, workers=workers), expected)


def test_pairs_just_outside_the_threshold_are_left_out():
    rng = np.random.default_rng(7)
    base = _random(rng, 1, 4)
    hashes = np.concatenate([base, _flip(rng, base[0], 24)[None], _flip(rng, base[0], 25)[None]])
    hashes = np.concatenate([hashes, _random(rng, 5000, 4)])
    pairs = near_duplicate_pairs(hashes, 24, method="join")
    assert (0, 1, 24) in {tuple(map(int, p)) for p in pairs}
    assert not any({int(i), int(j)} == {0, 2} for i, j, _ in pairs)
    assert np.array_equal(pairs, near_duplicate_pairs(hashes, 24, method="brute"))


def test_identical_hashes_give_every_pair_once():
    rng = np.random.default_rng(5)
    codes = _random(rng, 3, 4)
    codes = np.concatenate([codes, _flip(rng, codes[0], 3)[None]])  # a near-duplicate of the first code
    hashes = np.repeat(codes, [50, 1, 30, 4], axis=0)[rng.permutation(85)]
    pairs = join_pairs(hashes, 24)
    assert len(pairs) == 50 * 49 // 2 + 30 * 29 // 2 + 4 * 3 // 2 + 50 * 4
    assert np.array_equal(pairs, brute_force_pairs(hashes, 24))


def test_auto_picks_brute_force_for_small_inputs_and_results_agree(monkeypatch):
    hashes = _planted(300, 4, 24, seed=1)
    monkeypatch.setattr(hashindex, "join_pairs", None)  # auto must not reach the join for 300 hashes
    assert np.array_equal(near_duplicate_pairs(hashes, 24), brute_force_pairs(hashes, 24))


@pytest.mark.parametrize("n", [0, 1])
def test_empty_and_single_inputs(n):
    assert join_pairs(np.zeros((n, 4), np.uint64), 24).shape == (0, 3)


@pytest.mark.parametrize(
    ("n", "bits", "radius"), [(10, 256, 24), (150_000, 256, 24), (10**6, 256, 24), (10**5, 64, 6), (10**5, 576, 50)]
)
def test_plans_are_exact_by_the_pigeonhole_principle(n, bits, radius):
    plan = plan_join(n, bits, radius)
    assert plan.covers(radius)
    assert sum(t.bits for t in plan.tables) <= bits
    assert all(1 <= t.bits <= 32 and 0 <= t.radius <= 2 for t in plan.tables)
    positions = np.concatenate(plan.substrings(bits))
    assert len(np.unique(positions)) == len(positions) and positions.max() < bits  # disjoint substrings


def test_a_plan_that_could_miss_pairs_is_refused():
    hashes = _planted(600, 4, 24, seed=2)
    with pytest.raises(ValueError, match="cannot find every pair"):
        join_pairs(hashes, 24, plan=JoinPlan((Table(32, 2),) * 8))
    with pytest.raises(ValueError, match="more than the 256 bits"):
        join_pairs(hashes, 24, plan=JoinPlan((Table(30, 2),) * 9))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="uint64"):
        near_duplicate_pairs(np.zeros(8, np.uint64), 3)
    with pytest.raises(ValueError, match=">= 0"):
        near_duplicate_pairs(np.zeros((2, 1), np.uint64), -1)
    with pytest.raises(ValueError, match="method"):
        near_duplicate_pairs(np.zeros((2, 1), np.uint64), 1, method="fast")


def test_nearest_distances_match_an_exhaustive_comparison():
    rng = np.random.default_rng(3)
    reference = _random(rng, 400, 4)
    queries = np.stack([_flip(rng, reference[k], k % 30) for k in range(50)])
    bits_q = np.unpackbits(queries.view(np.uint8), axis=1)
    bits_r = np.unpackbits(reference.view(np.uint8), axis=1)
    expected = [int((bits_r != row).sum(axis=1).min()) for row in bits_q]
    assert nearest_distances(queries, reference).tolist() == expected
    assert nearest_distances(queries, reference[:0]).tolist() == [-1] * 50
