"""Exact Hamming-radius search over perceptual hashes: every pair of images within ``r`` bits.

Comparing every hash with every other costs N² (150,000 slices: 19 minutes; a million: hours). For
more than a few thousand hashes this module uses multi-index hashing (Norouzi, Punjani & Fleet,
"Fast exact search in Hamming space with multi-index hashing", TPAMI 2014) as FAISS implements it
(``faiss.IndexBinaryMultiHash``): the hash is cut into ``m`` substrings of ``b`` bits, one hash
table each. Two hashes within ``r`` bits differ in at most ``r // m`` bits on at least one substring
(pigeonhole), so probing every table with the query's substring and all its variants with up to
``r // m`` flipped bits reaches every true neighbour; each candidate is then checked on its full
Hamming distance. The result is therefore *exact* — the same pairs brute force returns — while the
work per query is ``m`` x (probes) x (bucket size), about constant for well-spread hashes, so the
total grows close to linearly with N. ``m`` and ``b`` come from a small cost model
(:func:`plan_multihash`).

Nothing here is N x N: the brute-force path (kept for small N, and as the reference in tests) works
in row blocks, and the index path queries in blocks whose results are reduced to ``i < j`` pairs.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

BRUTE_FORCE_MAX = 4096  # below this many hashes a vectorised scan beats building an index
_QUERY_BLOCK = 32768  # queries per FAISS range search (bounds the temporary result arrays)
_MAX_TABLE_BITS = 32


@dataclass(frozen=True)
class MultiHashPlan:
    """``tables`` substrings of ``bits`` bits each, probed with up to ``flips`` flipped bits."""

    tables: int
    bits: int
    flips: int


def _as_hashes(hashes: np.ndarray) -> np.ndarray:
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    if hashes.ndim != 2:
        raise ValueError(f"hashes must be (N, words) uint64, got shape {hashes.shape}")
    return hashes


def plan_multihash(n: int, code_bits: int, radius: int) -> MultiHashPlan:
    """Cheapest exact table layout for ``n`` codes: minimise tables x probes x (1 + expected bucket
    size), where probes = sum of C(b, k) for k <= radius // tables and a bucket holds n / 2^b codes
    when the bits are spread evenly."""
    best: tuple[float, MultiHashPlan] | None = None
    for tables in range(1, code_bits + 1):
        bits = min(code_bits // tables, _MAX_TABLE_BITS)
        if bits < 1:
            break
        flips = radius // tables
        probes = sum(math.comb(bits, k) for k in range(min(flips, bits) + 1))
        cost = tables * probes * (1.0 + n / 2.0**bits)
        if best is None or cost < best[0]:
            best = (cost, MultiHashPlan(tables, bits, flips))
    assert best is not None
    return best[1]


def brute_force_pairs(hashes: np.ndarray, threshold: int, block: int = 256) -> np.ndarray:
    """All pairs ``i < j`` within ``threshold`` bits by comparing each row block with the rows after
    it (XOR + ``np.bitwise_count``): O(N²) time, O(block x N) memory. The reference for the index."""
    hashes = _as_hashes(hashes)
    found = [np.zeros((0, 3), np.int64)]
    for start in range(0, len(hashes), block):
        rows = hashes[start : start + block]
        rest = hashes[start:]
        distance = np.bitwise_count(rows[:, None, :] ^ rest[None, :, :]).sum(axis=-1, dtype=np.int32)
        i, j = np.nonzero(distance <= threshold)
        keep = j > i  # rest starts at row `start`, so column j is row start + j and row i is start + i
        i, j = i[keep], j[keep]
        found.append(np.stack([i + start, j + start, distance[i, j]], axis=1).astype(np.int64))
    return np.concatenate(found)


def index_pairs(hashes: np.ndarray, threshold: int, plan: MultiHashPlan | None = None) -> np.ndarray:
    """All pairs ``i < j`` within ``threshold`` bits through a FAISS multi-index hash (exact)."""
    import faiss

    hashes = _as_hashes(hashes)
    codes = np.ascontiguousarray(hashes.view(np.uint8))
    code_bits = codes.shape[1] * 8
    if threshold >= code_bits:  # every pair qualifies; the index would only add overhead
        return brute_force_pairs(hashes, threshold)
    plan = plan or plan_multihash(len(codes), code_bits, threshold)
    if plan.tables * (plan.flips + 1) <= threshold or plan.tables * plan.bits > code_bits:
        raise ValueError(f"{plan} cannot find every pair within {threshold} bits of {code_bits}-bit codes")
    index = faiss.IndexBinaryMultiHash(code_bits, plan.tables, plan.bits)
    index.nflip = plan.flips
    index.add(codes)
    found = [np.zeros((0, 3), np.int64)]
    for start in range(0, len(codes), _QUERY_BLOCK):
        # FAISS keeps distances strictly below the radius
        limits, distances, labels = index.range_search(codes[start : start + _QUERY_BLOCK], threshold + 1)
        queries = np.repeat(np.arange(start, start + len(limits) - 1, dtype=np.int64), np.diff(limits).astype(np.int64))
        keep = labels > queries
        found.append(np.stack([queries[keep], labels[keep], distances[keep].astype(np.int64)], axis=1))
    pairs = np.concatenate(found)
    return pairs[np.lexsort((pairs[:, 1], pairs[:, 0]))]


def near_duplicate_pairs(hashes: np.ndarray, threshold: int, *, method: str = "auto") -> np.ndarray:
    """All pairs ``i < j`` with Hamming distance <= ``threshold``, as an (n, 3) int64 array
    ``(i, j, distance)`` sorted by ``(i, j)``; ``hashes`` is (N, words) uint64.

    ``method``: ``"brute"`` (O(N²)), ``"index"`` (multi-index hashing, close to linear) or
    ``"auto"`` (brute force up to :data:`BRUTE_FORCE_MAX` hashes). Both give the same pairs.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 bits, got {threshold}")
    if method not in ("auto", "brute", "index"):
        raise ValueError(f"method must be 'auto', 'brute' or 'index', got {method!r}")
    hashes = _as_hashes(hashes)
    if method == "brute" or (method == "auto" and len(hashes) <= BRUTE_FORCE_MAX):
        return brute_force_pairs(hashes, threshold)
    return index_pairs(hashes, threshold)


def nearest_distances(queries: np.ndarray, reference: np.ndarray) -> np.ndarray:
    """Hamming distance from each query hash to its closest reference hash (-1 without references).

    Exhaustive (FAISS ``IndexBinaryFlat``, popcount in C++, memory O(batch)): cost queries x
    references, so callers at scale pass a sample of queries (:func:`plot_nearest_train_distances`).
    """
    import faiss

    queries, reference = _as_hashes(queries), _as_hashes(reference)
    if len(reference) == 0:
        return np.full(len(queries), -1, np.int32)
    if len(queries) == 0:
        return np.zeros(0, np.int32)
    index = faiss.IndexBinaryFlat(reference.shape[1] * 64)
    index.add(np.ascontiguousarray(reference.view(np.uint8)))
    distances, _ = index.search(np.ascontiguousarray(queries.view(np.uint8)), 1)
    return distances[:, 0].astype(np.int32)
