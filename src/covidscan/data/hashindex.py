"""Exact Hamming-radius self-join over perceptual hashes: every pair of images within ``r`` bits.

Comparing every hash with every other costs N² (150,000 slices: 19 minutes; a million: hours).
For more than a few thousand hashes this module uses multi-index hashing (Norouzi, Punjani & Fleet,
"Fast exact search in Hamming space with multi-index hashing", TPAMI 2014) in its generalised
pigeonhole form (Qin et al., "GPH: similarity search in Hamming space", ICDE 2018): the code's bits
are dealt into disjoint substrings ("tables"), table ``k`` with its own radius ``t_k`` in 0-2, such
that ``sum(t_k + 1) > r``. Two hashes within ``r`` bits then differ in at most ``t_k`` bits on at
least one table, so the pairs that agree within ``t_k`` on some table are a superset of the answer;
each candidate is checked on its full distance, so the result is *exact*: the pairs brute force
returns.

Why not FAISS's ``IndexBinaryMultiHash`` (which this module used first): it answers one query at a
time, probing every substring variant with up to ``t`` flipped bits. Its cost is either many probes
(``C(b, 2)`` per table for ``t = 2``) or, with few flips, short substrings whose buckets fill up as
N grows, so the total grew like N^1.9 (1M random hashes: 942 s on 2 loaded cores, benchmarks/README).
Finding *all* pairs is a self-join, and a join needs no probing: per table, the distinct substring
keys and their one-bit variants are sorted together once; equal values in that sorted array are key
pairs within 2 bits (``k1 ^ e_p == k2 ^ e_q``: the flips are split between both sides, the
"meet in the middle" that a per-query index cannot do), found with a sort of ``(b + 1)`` entries per
distinct key instead of ``C(b, 2)`` probes per query. Substrings are wide (~28 bits for 256-bit
hashes at radius 24), so random collisions stay rare up to millions of hashes and the cost is a few
sorts per table: O(N log N). No library offers this join (FAISS, scikit-learn and SciPy search one
query at a time), hence the hand-written NumPy.

Details that keep it exact and bounded:

* identical codes (blank slices, a file listed twice) are joined once and expanded to every pair of
  their rows at the end, so a code repeated ``g`` times costs its ``g²/2`` output pairs, not that
  many candidates in every table;
* identical keys are collapsed first (a series of near-identical slices shares its keys), and every
  candidate pair is kept only by the *first* table whose radius it meets, so pairs found by several
  tables are neither repeated nor collected and de-duplicated later;
* bits are dealt to tables round-robin (table ``k`` gets bits ``k, k + m, ...``): a perceptual
  hash's low-frequency bits are biased and correlated, and contiguous substrings of them collide
  far more often than random ones (3x more candidates on the shared CT datasets' hashes);
* tables run in a thread pool (NumPy's sorts and ufuncs release the GIL), one per usable CPU;
* candidate pairs are generated and verified in chunks of :data:`_CHUNK`: memory is O(N x b) for
  one table's sorted keys plus the result, never N x N.

The plan (how many tables of which width and radius) comes from a cost model calibrated on measured
sort and candidate costs (:func:`plan_join`); ``benchmarks/scale.py --index-hashes N`` measures it.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from covidscan.data.parallel import usable_cpus

BRUTE_FORCE_MAX = 4096  # below this many hashes a vectorised scan beats the join
_MAX_TABLE_BITS = 32  # a key, its flip code and its id must share one uint64 sort value
_MAX_TABLE_RADIUS = 2  # one flipped bit on each side of the join
_CHUNK = 1 << 21  # candidate pairs generated and verified at once (~100 bytes each in temporaries)
# Seconds per unit of work, measured on the project's 2-core machine (benchmarks/scale.py): one
# sorted key entry (generate, sort, scan), one candidate pair (gather, XOR, popcount), one pair
# compared by brute force. Only their ratios matter for choosing a plan.
_COST_ENTRY = 3e-8
_COST_CANDIDATE = 1e-7
_COST_BRUTE_PAIR = 3e-9


@dataclass(frozen=True)
class Table:
    """A substring of ``bits`` bits on which pairs within ``radius`` (0-2) bits are joined."""

    bits: int
    radius: int


@dataclass(frozen=True)
class JoinPlan:
    """The tables of one self-join; exact for ``threshold`` when ``sum(radius + 1) > threshold``."""

    tables: tuple[Table, ...]

    def covers(self, threshold: int) -> bool:
        return sum(t.radius + 1 for t in self.tables) > threshold

    def substrings(self, code_bits: int) -> list[np.ndarray]:
        """Bit positions of each table, dealt round-robin so correlated neighbouring bits spread out."""
        if sum(t.bits for t in self.tables) > code_bits:
            raise ValueError(f"{self} needs more than the {code_bits} bits of the codes")
        positions: list[list[int]] = [[] for _ in self.tables]
        open_tables = [k for k, t in enumerate(self.tables) if t.bits > 0]
        bit = 0
        while open_tables:
            for k in list(open_tables):
                positions[k].append(bit)
                bit += 1
                if len(positions[k]) == self.tables[k].bits:
                    open_tables.remove(k)
        return [np.array(p, dtype=np.int64) for p in positions]


def _as_hashes(hashes: np.ndarray) -> np.ndarray:
    hashes = np.ascontiguousarray(hashes, dtype=np.uint64)
    if hashes.ndim != 2:
        raise ValueError(f"hashes must be (N, words) uint64, got shape {hashes.shape}")
    return hashes


def _variants(bits: int, radius: int) -> int:
    return sum(math.comb(bits, k) for k in range(radius + 1))


def _table_cost(n: int, table: Table) -> float:
    """Expected seconds for one table on ``n`` well-spread codes: sorted entries plus random candidates."""
    entries = n * (1 if table.radius == 0 else table.bits + 2)
    candidates = n * (n - 1) / 2 * _variants(table.bits, table.radius) / 2.0**table.bits
    return _COST_ENTRY * entries + _COST_CANDIDATE * candidates


def plan_join(n: int, code_bits: int, radius: int) -> JoinPlan:
    """The cheapest exact plan by :func:`_table_cost`: ``n2`` tables of radius 2, ``n1`` of radius 1
    and ``n0`` of radius 0 with ``3 n2 + 2 n1 + n0 > radius``, each kind of one width, all within
    ``code_bits`` bits (bits left over are simply not indexed: the pigeonhole bound still holds)."""
    widths = range(1, _MAX_TABLE_BITS + 1)
    cost = {(b, r): _table_cost(n, Table(b, r)) for b in widths for r in range(_MAX_TABLE_RADIUS + 1)}
    best: tuple[float, JoinPlan] | None = None
    need = radius + 1
    for n2 in range(need // 3 + 2):
        for n1 in range((max(0, need - 3 * n2) + 1) // 2 + 1):
            n0 = max(0, need - 3 * n2 - 2 * n1)
            for b2 in widths if n2 else [0]:
                for b1 in widths if n1 else [0]:
                    left = code_bits - n2 * b2 - n1 * b1
                    b0 = min(_MAX_TABLE_BITS, left // n0) if n0 else 0
                    if left < 0 or (n0 and b0 < 1):
                        continue
                    total = n2 * cost.get((b2, 2), 0) + n1 * cost.get((b1, 1), 0) + n0 * cost.get((b0, 0), 0)
                    if best is None or total < best[0]:
                        tables = (Table(b2, 2),) * n2 + (Table(b1, 1),) * n1 + (Table(b0, 0),) * n0
                        best = (total, JoinPlan(tables))
    if best is None:
        raise ValueError(f"no exact plan for radius {radius} on {code_bits}-bit codes")
    return best[1]


def brute_force_pairs(hashes: np.ndarray, threshold: int, block: int = 256) -> np.ndarray:
    """All pairs ``i < j`` within ``threshold`` bits by comparing each row block with the rows after
    it (XOR + ``np.bitwise_count``): O(N²) time, O(block x N) memory. The reference for the join."""
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


def _substring_keys(hashes: np.ndarray, positions: list[np.ndarray], rows: int = 1 << 16) -> np.ndarray:
    """(N, tables) uint64 keys: the bits at ``positions[k]`` of each code, packed (row blocks bound memory)."""
    keys = np.zeros((len(hashes), len(positions)), np.uint64)
    for start in range(0, len(hashes), rows):
        bits = np.unpackbits(hashes[start : start + rows].view(np.uint8), axis=1, bitorder="little")
        for k, where in enumerate(positions):
            packed = np.packbits(bits[:, where], axis=1, bitorder="little")
            padded = np.zeros((len(packed), 8), np.uint8)
            padded[:, : packed.shape[1]] = packed
            keys[start : start + rows, k] = padded.view(np.uint64)[:, 0]
    return keys


def _masks(positions: list[np.ndarray], words: int) -> np.ndarray:
    """(tables, words) uint64: each table's bits as a mask on the full code."""
    masks = np.zeros((len(positions), words), np.uint64)
    for k, where in enumerate(positions):
        np.bitwise_or.at(masks[k], where // 64, np.left_shift(np.uint64(1), (where % 64).astype(np.uint64)))
    return masks


def _ranges(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """``concatenate([arange(s, s + n) for s, n in zip(starts, lengths)])``, vectorised."""
    ends = np.cumsum(lengths)
    return np.repeat(starts - ends + lengths, lengths) + np.arange(ends[-1] if len(ends) else 0)


def _slices(weights: np.ndarray, limit: int) -> Iterator[slice]:
    """Consecutive slices of ``weights`` summing to at most ``limit`` (or a single item above it)."""
    totals = np.cumsum(weights)
    start = 0
    while start < len(weights):
        before = int(totals[start - 1]) if start else 0
        end = max(start + 1, int(np.searchsorted(totals, before + limit, side="right")))
        yield slice(start, end)
        start = end


def _row_pairs(rows: np.ndarray, seg_start: np.ndarray, seg_len: np.ndarray) -> Iterator[tuple[np.ndarray, ...]]:
    """Pairs ``(rows[k], seg_start[k] + x)`` for ``x < seg_len[k]``, in chunks of about :data:`_CHUNK`."""
    for part in _slices(seg_len, _CHUNK):
        yield np.repeat(rows[part], seg_len[part]), _ranges(seg_start[part], seg_len[part])


def _run_pairs(sorted_keys: np.ndarray, same_below: int | None = None) -> Iterator[tuple[np.ndarray, ...]]:
    """Position pairs ``p < q`` within runs of equal values of a sorted array (equal above bit
    ``same_below`` when given), in chunks."""
    limit = np.uint64(1) << np.uint64(same_below) if same_below is not None else None
    linked = []  # positions whose successor is in the same run
    for start in range(0, len(sorted_keys) - 1, _CHUNK):
        block = sorted_keys[start : start + _CHUNK + 1]
        equal = (block[1:] ^ block[:-1]) < limit if limit is not None else block[1:] == block[:-1]
        linked.append(np.flatnonzero(equal) + start)
    positions = np.concatenate(linked) if linked else np.zeros(0, np.int64)
    if not len(positions):
        return
    last = np.flatnonzero(np.diff(positions) != 1)  # a run ends where the linked positions stop
    run_end = np.append(positions[last], positions[-1]) + 2  # exclusive end of each run
    run_size = np.diff(np.concatenate([[-1], last, [len(positions) - 1]]))
    yield from _row_pairs(positions, positions + 1, np.repeat(run_end, run_size) - positions - 1)


class _Join:
    """One self-join: the hashes, the plan's keys and masks, and the pairs each table keeps."""

    def __init__(self, hashes: np.ndarray, threshold: int, plan: JoinPlan) -> None:
        self.hashes, self.threshold, self.plan = hashes, threshold, plan
        positions = plan.substrings(hashes.shape[1] * 64)
        self.keys = _substring_keys(hashes, positions)
        self.masks = _masks(positions, hashes.shape[1])
        self.index_dtype = np.int32 if len(hashes) < 2**31 else np.int64

    def _verify(self, table: int, a: np.ndarray, b: np.ndarray) -> tuple[np.ndarray, ...]:
        """Candidates within the threshold that no earlier table finds (so each pair is kept once)."""
        x = self.hashes[a] ^ self.hashes[b]
        distance = np.bitwise_count(x).sum(axis=1, dtype=np.uint16)
        keep = distance <= self.threshold
        a, b, distance, x = a[keep], b[keep], distance[keep], x[keep]
        for earlier in range(table):
            keep = np.bitwise_count(x & self.masks[earlier]).sum(axis=1) > self.plan.tables[earlier].radius
            a, b, distance, x = a[keep], b[keep], distance[keep], x[keep]
        return np.minimum(a, b).astype(self.index_dtype), np.maximum(a, b).astype(self.index_dtype), distance

    def table_pairs(self, table: int) -> list[tuple[np.ndarray, ...]]:
        keys = self.keys[:, table]
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        found = [self._verify(table, order[p], order[q]) for p, q in _run_pairs(sorted_keys)]
        radius = self.plan.tables[table].radius
        if radius == 0:
            return found
        starts = np.flatnonzero(np.concatenate([[True], sorted_keys[1:] != sorted_keys[:-1]]))
        sizes = np.diff(np.append(starts, len(keys)))
        for first, second in self._key_pairs(sorted_keys[starts], radius, self.plan.tables[table].bits):
            # every element of the first key's group against every element of the second's
            for part in _slices(sizes[first], _CHUNK):
                rows = _ranges(starts[first[part]], sizes[first[part]])
                groups = np.repeat(second[part], sizes[first[part]])
                for p, q in _row_pairs(rows, starts[groups], sizes[groups]):
                    found.append(self._verify(table, order[p], order[q]))
        return found

    @staticmethod
    def _key_pairs(unique: np.ndarray, radius: int, bits: int) -> Iterator[tuple[np.ndarray, ...]]:
        """Index pairs of distinct keys 1 to ``radius`` (1 or 2) bits apart, each pair once.

        Sorted together: every key (flip code 0) and its ``bits`` one-bit variants (code p + 1). Two
        keys one bit apart meet as (key, variant), two bits apart as (variant, variant); within a
        run the flip codes increase (distinct keys), and a pair is kept when the first entry's key
        index is the smaller, which happens in exactly one of the two runs where it meets."""
        id_bits = max(1, int(len(unique) - 1).bit_length())
        flip_bits = bits.bit_length()
        shift = id_bits + flip_bits
        if bits + shift > 64:
            raise ValueError(f"too many distinct keys ({len(unique):,}) for a {bits}-bit table")
        ids = np.arange(len(unique), dtype=np.uint64)
        entries = np.empty(len(unique) * (bits + 1), np.uint64)
        for code in range(bits + 1):
            variant = unique if code == 0 else unique ^ (np.uint64(1) << np.uint64(code - 1))
            entries[code * len(unique) : (code + 1) * len(unique)] = (
                (variant << np.uint64(shift)) | (np.uint64(code) << np.uint64(id_bits)) | ids
            )
        entries.sort()
        id_mask = np.uint64((1 << id_bits) - 1)
        for p, q in _run_pairs(entries, same_below=shift):
            first, second = entries[p], entries[q]
            keep = (first & id_mask) < (second & id_mask)
            if radius == 1:  # one side must be the key itself
                keep &= (first >> np.uint64(id_bits)) & np.uint64((1 << flip_bits) - 1) == 0
            yield (first[keep] & id_mask).astype(np.int64), (second[keep] & id_mask).astype(np.int64)


def _original_pairs(
    distinct_pairs: list[tuple[np.ndarray, ...]], inverse: np.ndarray, dtype: type
) -> list[tuple[np.ndarray, ...]]:
    """Pairs of distinct codes as pairs of the original rows (every row of one code with every row
    of the other), plus every pair of identical rows at distance 0; in chunks of :data:`_CHUNK`."""
    members: np.ndarray = np.argsort(inverse, kind="stable").astype(dtype)  # rows grouped by their distinct code
    sizes = np.bincount(inverse)
    starts = np.cumsum(sizes) - sizes
    found: list[tuple[np.ndarray, ...]] = [
        (members[p], members[q], np.zeros(len(p), np.uint16)) for p, q in _run_pairs(inverse[members])
    ]
    for first, second, distance in distinct_pairs:
        for part in _slices(sizes[first] * sizes[second], _CHUNK):
            rows = _ranges(starts[first[part]], sizes[first[part]])
            other = np.repeat(second[part], sizes[first[part]])
            a = np.repeat(members[rows], sizes[other])
            b = members[_ranges(starts[other], sizes[other])]
            d = np.repeat(np.repeat(distance[part], sizes[first[part]]), sizes[other])
            found.append((np.minimum(a, b), np.maximum(a, b), d))
    return found


def join_pairs(
    hashes: np.ndarray, threshold: int, plan: JoinPlan | None = None, workers: int | None = None
) -> np.ndarray:
    """All pairs ``i < j`` within ``threshold`` bits through the multi-index self-join (exact)."""
    hashes = _as_hashes(hashes)
    code_bits = hashes.shape[1] * 64
    if threshold >= code_bits:  # every pair qualifies; the join would only add overhead
        return brute_force_pairs(hashes, threshold)
    distinct, inverse = np.unique(hashes, axis=0, return_inverse=True)  # identical codes are joined once
    plan = plan or plan_join(len(distinct), code_bits, threshold)
    if not plan.covers(threshold) or any(not 0 <= t.radius <= _MAX_TABLE_RADIUS for t in plan.tables):
        raise ValueError(f"{plan} cannot find every pair within {threshold} bits of {code_bits}-bit codes")
    if any(not 1 <= t.bits <= _MAX_TABLE_BITS for t in plan.tables):
        raise ValueError(f"{plan}: tables must have 1 to {_MAX_TABLE_BITS} bits")
    join = _Join(distinct, threshold, plan)
    with ThreadPoolExecutor(max_workers=min(len(plan.tables), workers or usable_cpus())) as pool:
        distinct_pairs = [part for found in pool.map(join.table_pairs, range(len(plan.tables))) for part in found]
    parts = _original_pairs(distinct_pairs, inverse.reshape(-1), join.index_dtype)
    i, j, distance = (np.concatenate([p[k] for p in parts]) if parts else np.zeros(0, np.int64) for k in range(3))
    order = np.argsort(i.astype(np.uint64) * np.uint64(len(hashes)) + j.astype(np.uint64))
    pairs = np.empty((len(order), 3), np.int64)
    pairs[:, 0], pairs[:, 1], pairs[:, 2] = i[order], j[order], distance[order]
    return pairs


def near_duplicate_pairs(hashes: np.ndarray, threshold: int, *, method: str = "auto") -> np.ndarray:
    """All pairs ``i < j`` with Hamming distance <= ``threshold``, as an (n, 3) int64 array
    ``(i, j, distance)`` sorted by ``(i, j)``; ``hashes`` is (N, words) uint64.

    ``method``: ``"brute"`` (O(N²)), ``"join"`` (multi-index self-join, O(N log N) for spread-out
    hashes) or ``"auto"`` (brute force up to :data:`BRUTE_FORCE_MAX` hashes). All give the same pairs.
    """
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0 bits, got {threshold}")
    if method not in ("auto", "brute", "join"):
        raise ValueError(f"method must be 'auto', 'brute' or 'join', got {method!r}")
    hashes = _as_hashes(hashes)
    if method == "brute" or (method == "auto" and len(hashes) <= BRUTE_FORCE_MAX):
        return brute_force_pairs(hashes, threshold)
    return join_pairs(hashes, threshold)


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
