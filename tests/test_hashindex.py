"""The multi-index hash returns exactly the pairs brute force returns, boundary distances included."""

from __future__ import annotations

import numpy as np
import pytest

from covidscan.data.hashindex import (
    MultiHashPlan,
    brute_force_pairs,
    index_pairs,
    near_duplicate_pairs,
    nearest_distances,
    plan_multihash,
)


def _flip(rng: np.random.Generator, code: np.ndarray, distance: int) -> np.ndarray:
    bits = np.unpackbits(code.view(np.uint8))
    bits[rng.choice(bits.size, distance, replace=False)] ^= 1
    return np.packbits(bits).view(np.uint64)


def _planted(n: int, words: int, threshold: int, seed: int) -> np.ndarray:
    """Random hashes plus copies at every distance from 0 to threshold + 2 (so both sides of the
    boundary), some chained (a copy of a copy), and a cluster of near-identical hashes."""
    rng = np.random.default_rng(seed)
    hashes = rng.integers(0, 2**63, size=(n, words), dtype=np.uint64)
    targets = rng.permutation(n)
    k = 0
    for distance in list(range(threshold + 3)) * 4 + [threshold] * 20:
        source, target = targets[k], targets[k + 1]
        hashes[target] = _flip(rng, hashes[source], distance)
        k += 2
    for member in targets[k : k + 30]:  # a tight cluster: many pairs among themselves
        hashes[member] = _flip(rng, hashes[targets[k]], int(rng.integers(0, threshold // 2 + 1)))
    return hashes


def _reference(hashes: np.ndarray, threshold: int) -> set[tuple[int, int, int]]:
    bits = np.unpackbits(hashes.view(np.uint8), axis=1)
    found = set()
    for i in range(len(hashes)):
        distance = (bits[i + 1 :] != bits[i]).sum(axis=1)
        found |= {(i, i + 1 + int(j), int(distance[j])) for j in np.nonzero(distance <= threshold)[0]}
    return found


@pytest.mark.parametrize(("n", "words", "threshold"), [(3000, 4, 24), (2500, 1, 6), (2000, 4, 0)])
def test_index_returns_exactly_the_brute_force_pairs(n, words, threshold):
    hashes = _planted(n, words, threshold, seed=n)
    expected = _reference(hashes, threshold)
    brute = brute_force_pairs(hashes, threshold, block=97)
    index = index_pairs(hashes, threshold)
    assert {tuple(map(int, p)) for p in brute} == expected
    assert np.array_equal(index, brute[np.lexsort((brute[:, 1], brute[:, 0]))])
    assert any(d == threshold for _, _, d in expected), "the boundary distance must be exercised"


def test_pairs_just_outside_the_threshold_are_left_out():
    rng = np.random.default_rng(7)
    base = rng.integers(0, 2**63, size=(1, 4), dtype=np.uint64)
    hashes = np.concatenate([base, _flip(rng, base[0], 24)[None], _flip(rng, base[0], 25)[None]])
    hashes = np.concatenate([hashes, rng.integers(0, 2**63, size=(5000, 4), dtype=np.uint64)])
    pairs = near_duplicate_pairs(hashes, 24, method="index")
    assert (0, 1, 24) in {tuple(map(int, p)) for p in pairs}
    assert not any({int(i), int(j)} == {0, 2} for i, j, _ in pairs)
    assert np.array_equal(pairs, near_duplicate_pairs(hashes, 24, method="brute"))


def test_auto_picks_brute_force_for_small_inputs_and_results_agree():
    hashes = _planted(300, 4, 24, seed=1)
    assert np.array_equal(near_duplicate_pairs(hashes, 24), near_duplicate_pairs(hashes, 24, method="index"))


@pytest.mark.parametrize(("n", "bits", "radius"), [(10, 256, 24), (150_000, 256, 24), (10**6, 256, 24), (10**5, 64, 6)])
def test_plans_are_exact_by_the_pigeonhole_principle(n, bits, radius):
    plan = plan_multihash(n, bits, radius)
    assert plan.tables * plan.bits <= bits
    assert plan.tables * (plan.flips + 1) > radius


def test_a_plan_that_could_miss_pairs_is_refused():
    hashes = _planted(600, 4, 24, seed=2)
    with pytest.raises(ValueError, match="cannot find every pair"):
        index_pairs(hashes, 24, plan=MultiHashPlan(tables=8, bits=32, flips=1))


def test_bad_inputs_are_refused():
    with pytest.raises(ValueError, match="uint64"):
        near_duplicate_pairs(np.zeros(8, np.uint64), 3)
    with pytest.raises(ValueError, match=">= 0"):
        near_duplicate_pairs(np.zeros((2, 1), np.uint64), -1)
    with pytest.raises(ValueError, match="method"):
        near_duplicate_pairs(np.zeros((2, 1), np.uint64), 1, method="fast")


def test_nearest_distances_match_an_exhaustive_comparison():
    rng = np.random.default_rng(3)
    reference = rng.integers(0, 2**63, size=(400, 4), dtype=np.uint64)
    queries = np.stack([_flip(rng, reference[k], k % 30) for k in range(50)])
    bits_q = np.unpackbits(queries.view(np.uint8), axis=1)
    bits_r = np.unpackbits(reference.view(np.uint8), axis=1)
    expected = [int((bits_r != row).sum(axis=1).min()) for row in bits_q]
    assert nearest_distances(queries, reference).tolist() == expected
    assert nearest_distances(queries, reference[:0]).tolist() == [-1] * 50
