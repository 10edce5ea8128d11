"""Leakage guard: what is in a dataset, and what its splits share.

``audit_samples`` reports class counts, image sizes and modes, unreadable files, exact duplicates
(SHA-256 of the file bytes) and near-duplicates (perceptual hash, ImageHash ``phash``, within a
Hamming distance) inside the dataset and across train/val/test, plus patients that span splits.
``check_split_leakage`` is the trainer's guard: it warns, or raises with ``strict``, when val/test
share near-duplicates or patients with train. The rule lives in one place,
:meth:`LeakageFindings.problems`, which ``covidscan data audit --strict`` applies too.

Results are dataclasses (:class:`AuditReport`, :class:`LeakageFindings`) read by attribute; their
``to_dict()`` is the JSON written to ``audit.json`` / ``leakage.json``.

Every format is read through its registered reader (``Reader.preview``): volumes (DICOM series
folders, NIfTI files) are hashed on their middle slice, lung-windowed; JPEGs are decoded at a
reduced scale, all a perceptual hash needs.

At scale (hundreds of thousands of slices): images are hashed in worker processes, hashes are
cached per file (:mod:`covidscan.data.hashcache`) so the trainer's check after an audit, or a second
audit, does not decode anything again, and near-duplicate pairs come from an exact multi-index hash
(:mod:`covidscan.data.hashindex`) instead of comparing every image with every other.
"""

from __future__ import annotations

import hashlib
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from covidscan.config import ReadLimits
from covidscan.data.hashcache import FileKey, HashCache, file_key
from covidscan.data.hashindex import near_duplicate_pairs, nearest_distances
from covidscan.data.parallel import map_chunks, usable_cpus
from covidscan.data.readers import get_reader
from covidscan.data.records import DataError, DataIssue, Sample, SampleSet
from covidscan.data.splits import SPLIT_NAMES, warn_leakage_once
from covidscan.errors import UsageError
from covidscan.progress import progress as show_progress

# A 16x16 phash (256 bits) within 24 bits: on covid-ct such pairs are the same patient or the same
# figure re-used under two labels; the 8x8 hash matched different patients' slices (docs/data.md).
DEFAULT_HASH_SIZE = 16
DEFAULT_NEAR_THRESHOLD = 24
_HASH_DECODE_SIZE = 128  # JPEG draft size: phash looks at 4 * hash_size pixels, so skip full decodes
_MAX_LISTED_PAIRS = 2000
_MAX_PLOTTED_QUERIES = 2000
HASH_VERSION = 2  # bump when hashing changes, so the cache does not serve hashes of the old kind
PARALLEL_MIN_IMAGES = 2000  # fewer images to hash than this: worker start-up would cost more than it saves
_WORKER_CHUNK = 256
_CACHE_WRITE_EVERY = 5000


@dataclass
class ImageFacts:
    """What the audit learns about one sample; ``error`` is set when it could not be read."""

    sample: Sample
    sha256: str | None = None
    phash: np.ndarray | None = None  # uint64 words of the perceptual hash
    size: str | None = None  # "WxH" for images, "DxHxW" for volumes
    mode: str | None = None
    error: str | None = None


@dataclass
class FileProblem:
    """A file the audit could not read, or the loader skipped, and why."""

    path: str
    reason: str


@dataclass
class SizeSummary:
    """Image sizes seen: how many distinct, the most common, and the 2D width/height extent."""

    distinct: int = 0
    most_common: list[tuple[str, int]] = field(default_factory=list)
    width_range: list[int] | None = None  # 2D images only
    height_range: list[int] | None = None

    def to_dict(self) -> dict[str, Any]:
        if not self.distinct:
            return {}
        return {key: value for key, value in asdict(self).items() if value is not None}


@dataclass
class ExactDuplicates:
    """Files with identical bytes (SHA-256); ``groups`` lists at most 200 groups of paths."""

    n_groups: int
    n_redundant_files: int
    n_groups_with_conflicting_labels: int
    groups: list[list[str]]


@dataclass
class NearDuplicatePair:
    a: str
    b: str
    distance: int  # Hamming distance in hash bits


@dataclass
class NearDuplicates:
    """Pairs within ``threshold_bits`` of each other; ``pairs`` lists the closest 2,000."""

    hash: str
    threshold_bits: int
    n_pairs: int
    n_images_involved: int
    n_pairs_with_conflicting_labels: int
    pairs: list[NearDuplicatePair]


@dataclass
class SplitLeak:
    """How many of one split's images have a near-duplicate in train (``examples``: the first 10)."""

    size: int
    with_train_near_duplicate: int
    with_train_near_duplicate_fraction: float
    examples: list[str]


@dataclass
class LeakageFindings:
    """What val/test share with train: near-duplicates and patients. ``problems()`` is the one leakage
    rule (the trainer's guard and ``data audit --strict`` both apply it)."""

    hash: str
    threshold_bits: int
    cross_split_near_duplicate_pairs: dict[str, int]
    val: SplitLeak
    test: SplitLeak
    patients_spanning_splits: int
    patients_spanning_splits_examples: list[str]

    def problems(self) -> list[str]:
        """One sentence per kind of leakage found; empty when the splits are clean."""
        problems = []
        for name, leak in (("test", self.test), ("val", self.val)):
            if leak.with_train_near_duplicate:
                problems.append(
                    f"{leak.with_train_near_duplicate} of {leak.size} {name} images have a near-duplicate "
                    f"(phash distance <= {self.threshold_bits}) in train, e.g. {leak.examples[0]}"
                )
        if self.patients_spanning_splits:
            problems.append(
                f"{self.patients_spanning_splits} patients appear in more than one split, e.g. "
                f"{self.patients_spanning_splits_examples[0]}"
            )
        return problems

    def message(self) -> str | None:
        """The leakage warning (or refusal) text, None when there is nothing to say."""
        problems = self.problems()
        if not problems:
            return None
        return (
            "possible leakage between splits: "
            + "; ".join(problems)
            + ". Use a patient-grouped split (manifest with patient_id) or remove the duplicates; "
            "see `covidscan data audit`"
        )

    def to_dict(self, with_hash: bool = True) -> dict[str, Any]:
        """``leakage.json``'s content; ``with_hash=False`` for the audit report, which states the hash once."""
        result: dict[str, Any] = {"hash": self.hash, "threshold_bits": self.threshold_bits} if with_hash else {}
        result["cross_split_near_duplicate_pairs"] = self.cross_split_near_duplicate_pairs
        for name, leak in (("val", self.val), ("test", self.test)):
            result[f"{name}_size"] = leak.size
            result[f"{name}_with_train_near_duplicate"] = leak.with_train_near_duplicate
            result[f"{name}_with_train_near_duplicate_fraction"] = leak.with_train_near_duplicate_fraction
            result[f"{name}_examples"] = leak.examples
        result["patients_spanning_splits"] = self.patients_spanning_splits
        result["patients_spanning_splits_examples"] = self.patients_spanning_splits_examples
        return result


@dataclass
class AuditReport:
    """Everything :func:`audit_samples` found; ``splits``/``leakage`` are None for unsplit data."""

    n_samples: int
    classes: dict[str, int]
    patients: int | None
    splits: dict[str, dict[str | None, int]] | None  # per split, items per label (None: unlabeled)
    image_sizes: SizeSummary
    modes: dict[str | None, int]
    unreadable: list[FileProblem]
    skipped_at_load: list[FileProblem]
    manifest_issues: list[DataIssue]  # duplicates, missing patient ids... found while loading
    exact_duplicates: ExactDuplicates
    near_duplicates: NearDuplicates
    leakage: LeakageFindings | None = None
    plot: str | None = None  # the nearest-train-distance histogram, when drawn
    source: str | None = None  # set by `covidscan data audit`: what was audited
    splits_file: str | None = None

    def to_dict(self) -> dict[str, Any]:
        result: dict[str, Any] = {"source": self.source, "splits_file": self.splits_file} if self.source else {}
        result.update(
            n_samples=self.n_samples,
            classes=self.classes,
            patients=self.patients,
            splits=self.splits,
            image_sizes=self.image_sizes.to_dict(),
            modes=self.modes,
            unreadable=[asdict(item) for item in self.unreadable],
            skipped_at_load=[asdict(item) for item in self.skipped_at_load],
            manifest_issues=[issue.to_dict() for issue in self.manifest_issues],
            exact_duplicates=asdict(self.exact_duplicates),
            near_duplicates=asdict(self.near_duplicates),
        )
        if self.leakage is not None:
            result["leakage"] = self.leakage.to_dict(with_hash=False)
        if self.plot is not None:
            result["plot"] = self.plot
        return result


def _file_digest(path: Path) -> str:
    if path.is_dir():  # a DICOM series: digest of its files' digests, in name order
        combined = hashlib.sha256()
        for file in sorted(p for p in path.iterdir() if p.is_file()):
            combined.update(_file_digest(file).encode())
        return combined.hexdigest()
    with path.open("rb") as handle:
        return hashlib.file_digest(handle, "sha256").hexdigest()


def _hash_words(image: Image.Image, hash_size: int) -> np.ndarray:
    import imagehash

    bits = imagehash.phash(image, hash_size=hash_size).hash.flatten()
    return np.frombuffer(np.packbits(bits).tobytes(), dtype=">u8").astype(np.uint64)


def _gray_to_pil(array: np.ndarray) -> Image.Image:
    """8-bit grayscale; rounding makes an 8-bit image's round trip through [0, 1] exact."""
    return Image.fromarray(np.round(np.clip(array, 0, 1) * 255).astype(np.uint8))


def inspect_sample(sample: Sample, hash_size: int = DEFAULT_HASH_SIZE) -> ImageFacts:
    """Hash and describe one sample; never raises on bad files (the error is recorded instead)."""
    facts = ImageFacts(sample)
    path = Path(sample.path)
    try:
        reader = get_reader(path)
        header = reader.header(path)
        facts.sha256 = _file_digest(path)
        depth, height, width = header.shape
        if reader.volumetric:
            facts.size, facts.mode = f"{depth}x{height}x{width}", "volume"
        else:
            facts.size, facts.mode = f"{width}x{height}", header.mode
        preview = reader.preview(path, header, limits=ReadLimits(), size=_HASH_DECODE_SIZE)
        facts.phash = _hash_words(_gray_to_pil(preview), hash_size)
    except DataError as exc:
        facts.error = str(exc)
    except Exception as exc:  # PIL/pydicom raise many types for corrupt files; the audit reports them all
        facts.error = f"{path}: unreadable ({type(exc).__name__}: {exc})"
    return facts


def _inspect_chunk(samples: Sequence[Sample], hash_size: int) -> list[ImageFacts]:
    """Worker-process entry point (module level, so it pickles under the spawn start method)."""
    return [inspect_sample(s, hash_size) for s in samples]


def _hash_stream(samples: Sequence[Sample], hash_size: int, workers: int) -> Iterator[ImageFacts]:
    """Facts in input order; in ``workers`` spawned processes when there are enough images to repay
    their start-up (each imports covidscan), otherwise in this process."""
    if workers <= 1 or len(samples) < PARALLEL_MIN_IMAGES:
        yield from (inspect_sample(s, hash_size) for s in samples)
        return
    for facts in map_chunks(_inspect_chunk, samples, _WORKER_CHUNK, workers, hash_size):
        yield from facts


def inspect_samples(
    samples: Sequence[Sample],
    hash_size: int = DEFAULT_HASH_SIZE,
    progress: bool | None = True,
    *,
    workers: int | None = None,
    cache: bool = True,
) -> list[ImageFacts]:
    """Hash and describe every sample, in input order.

    Files seen before with the same size and modification time come from the hash cache
    (:mod:`covidscan.data.hashcache`); the rest are hashed in ``workers`` processes (default: the
    CPUs this process may use) and added to it. ``progress=None`` shows a bar for large inputs only.
    """
    if hash_size < 8 or (hash_size * hash_size) % 64:
        raise UsageError(f"hash_size must be 8, 16, 24, ... (hash bits a multiple of 64), got {hash_size}")
    facts = [ImageFacts(s) for s in samples]
    keys: list[FileKey | None] = []
    for s in samples:
        try:
            keys.append(file_key(s.path))
        except OSError:  # missing or unreadable: inspect_sample records the reason
            keys.append(None)
    store = HashCache(f"phash{hash_size}-v{HASH_VERSION}") if cache else None
    known = [i for i, key in enumerate(keys) if key is not None]
    hits = store.lookup([key for key in keys if key is not None]) if store else {}
    for position, (sha256, phash, size, mode) in hits.items():
        target = facts[known[position]]
        target.sha256, target.size, target.mode = sha256, size, mode
        target.phash = np.frombuffer(phash, dtype=np.uint64).copy()
    hit_indices = {known[p] for p in hits}
    todo = [i for i in range(len(samples)) if i not in hit_indices]
    show = len(samples) >= PARALLEL_MIN_IMAGES if progress is None else progress
    fresh: list[tuple[FileKey, tuple[str, bytes, str | None, str | None]]] = []
    with show_progress(total=len(samples), desc="hashing images", unit="img", disable=not show) as bar:
        bar.update(len(hits))
        stream = _hash_stream([samples[i] for i in todo], hash_size, workers or usable_cpus())
        for index, result in zip(todo, stream):
            facts[index] = result
            key = keys[index]
            if store and key is not None and result.sha256 is not None and result.phash is not None:
                fresh.append((key, (result.sha256, result.phash.astype(np.uint64).tobytes(), result.size, result.mode)))
                if len(fresh) >= _CACHE_WRITE_EVERY:  # an interrupted audit keeps what it hashed
                    store.store(fresh)
                    fresh = []
            bar.update()
    if store:
        store.store(fresh)
    return facts


def _hash_matrix(facts: Sequence[ImageFacts]) -> np.ndarray:
    """The (N, words) uint64 perceptual hashes of ``facts`` (those without one are left out)."""
    return np.stack([f.phash for f in facts if f.phash is not None])


def plot_nearest_train_distances(hashed: Sequence[ImageFacts], threshold: int, path: str | Path) -> Path:
    """Histogram of each val/test image's distance to its nearest train image, threshold marked:
    a bump at the far left is the near-duplicate leak the audit counts.

    The nearest distance is an exhaustive search, so at most :data:`_MAX_PLOTTED_QUERIES` images
    per split (a fixed random sample, said in the legend) are placed: the histogram's shape, at a
    cost linear in the train size. The counts in the report come from the exact pair search."""
    from covidscan.plotting import new_figure, save_figure

    by_split = {
        name: _hash_matrix([f for f in hashed if f.sample.split == name])
        for name in SPLIT_NAMES
        if any(f.sample.split == name for f in hashed)
    }
    figure = new_figure(figsize=(7, 4), layout="tight")
    axis = figure.subplots()
    bits = by_split["train"].shape[1] * 64 if "train" in by_split else 64
    bins = np.arange(0, bits // 2 + 2, 2)
    for name in ("val", "test"):
        if name in by_split and "train" in by_split:
            queries = by_split[name]
            label: str = name
            if len(queries) > _MAX_PLOTTED_QUERIES:
                pick = np.random.default_rng(0).choice(len(queries), _MAX_PLOTTED_QUERIES, replace=False)
                queries, label = queries[np.sort(pick)], f"{name} (random {_MAX_PLOTTED_QUERIES} of {len(queries)})"
            axis.hist(nearest_distances(queries, by_split["train"]), bins=bins.tolist(), alpha=0.6, label=label)
    axis.axvline(threshold + 0.5, color="black", linestyle="--", label=f"near-duplicate threshold ({threshold})")
    axis.set_xlabel(f"Hamming distance to the nearest train image (phash bits of {bits})")
    axis.set_ylabel("images")
    axis.set_title("How close val/test images are to training images")
    axis.legend()
    return save_figure(figure, path, dpi=120)


def _split_pair(first: str, second: str) -> str:
    order = {name: k for k, name in enumerate(SPLIT_NAMES)}
    return "-".join(sorted((first, second), key=lambda n: order.get(n, 9)))


def _codes(values: Sequence[str | None]) -> tuple[list[str], np.ndarray]:
    """Distinct values (``None`` as ``"none"``) and each item's index into them, so per-pair
    comparisons over millions of pairs are array operations instead of Python loops."""
    names: dict[str, int] = {}
    codes = np.array([names.setdefault(v or "none", len(names)) for v in values], dtype=np.int64)
    return list(names), codes


def patient_key(sample: Sample, several_sources: bool) -> str:
    """A patient's identity: its id, within its source when there are several (patient ``7`` of two
    hospitals are two people), as the splitter groups them."""
    return f"{sample.source}/{sample.patient_id}" if several_sources else str(sample.patient_id)


def _count_patients(samples: Sequence[Sample]) -> int | None:
    several_sources = len({s.source for s in samples}) > 1
    return len({patient_key(s, several_sources) for s in samples if s.patient_id}) or None


def _leakage(
    samples: Sequence[Sample], hashed: Sequence[Sample], pairs: np.ndarray, hash_name: str, threshold: int
) -> LeakageFindings:
    """Val/test samples with a near-duplicate or a patient in train (the figures that matter).

    ``pairs`` index into ``hashed`` (the readable samples); split sizes and patients use ``samples``.
    """
    split_names, split = _codes([s.split for s in hashed])
    first, second = split[pairs[:, 0]], split[pairs[:, 1]]
    kinds, counts = np.unique(np.stack([first, second])[:, first != second], axis=1, return_counts=True)
    cross: Counter[str] = Counter()
    for (a, b), count in zip(kinds.T.tolist(), counts.tolist()):
        cross[_split_pair(split_names[a], split_names[b])] += count
    held_out = np.isin(split, [k for k, name in enumerate(split_names) if name in ("val", "test")])
    train = split == (split_names.index("train") if "train" in split_names else -1)
    twins = np.concatenate(
        [pairs[held_out[pairs[:, 0]] & train[pairs[:, 1]], 0], pairs[held_out[pairs[:, 1]] & train[pairs[:, 0]], 1]]
    )
    with_train_twin = {hashed[k].path for k in np.unique(twins).tolist()}
    splits_of: dict[str, set[str]] = defaultdict(set)
    several_sources = len({s.source for s in samples}) > 1
    for s in samples:
        if s.patient_id:
            splits_of[patient_key(s, several_sources)].add(s.split or "none")
    spanning = sorted(p for p, names in splits_of.items() if len(names) > 1)

    def split_leak(name: str) -> SplitLeak:
        members = [s.path for s in samples if s.split == name]
        leaked = [p for p in members if p in with_train_twin]
        fraction = round(len(leaked) / len(members), 4) if members else 0.0
        return SplitLeak(len(members), len(leaked), fraction, leaked[:10])

    return LeakageFindings(
        hash=hash_name,
        threshold_bits=threshold,
        cross_split_near_duplicate_pairs=dict(sorted(cross.items())),
        val=split_leak("val"),
        test=split_leak("test"),
        patients_spanning_splits=len(spanning),
        patients_spanning_splits_examples=spanning[:20],
    )


def audit_samples(
    sample_set: SampleSet,
    *,
    threshold: int = DEFAULT_NEAR_THRESHOLD,
    hash_size: int = DEFAULT_HASH_SIZE,
    progress: bool | None = True,
    plot_path: str | Path | None = None,
    workers: int | None = None,
    cache: bool = True,
) -> AuditReport:
    """The full audit (see the module docstring for what it covers); with splits and ``plot_path``,
    also the nearest-train-distance histogram (:func:`plot_nearest_train_distances`)."""
    if threshold < 0:
        raise UsageError(f"near-duplicate threshold must be >= 0 bits, got {threshold}")
    facts = inspect_samples(sample_set.samples, hash_size, progress, workers=workers, cache=cache)
    readable = [f for f in facts if f.error is None]
    has_splits = any(f.sample.split for f in facts)
    by_digest: dict[str, list[ImageFacts]] = defaultdict(list)
    for f in readable:
        if f.sha256 is not None:
            by_digest[f.sha256].append(f)
    groups = [g for g in by_digest.values() if len(g) > 1]
    hashed = [f for f in readable if f.phash is not None]
    pairs = near_duplicate_pairs(_hash_matrix(hashed), threshold) if hashed else np.zeros((0, 3), int)
    involved = np.unique(pairs[:, :2])
    label = _codes([f.sample.label for f in hashed])[1]
    hash_name = f"phash {hash_size}x{hash_size} ({hash_size * hash_size} bits)"
    report = AuditReport(
        n_samples=len(facts),
        classes=sample_set.class_counts(),
        patients=_count_patients([f.sample for f in facts]),
        splits=(
            {name: dict(Counter(f.sample.label for f in facts if f.sample.split == name)) for name in SPLIT_NAMES}
            if has_splits
            else None
        ),
        image_sizes=_size_summary([f.size for f in readable]),
        modes=dict(Counter(f.mode for f in readable).most_common()),
        unreadable=[FileProblem(f.sample.path, f.error) for f in facts if f.error],
        skipped_at_load=[FileProblem(p, r) for p, r in sample_set.skipped],
        manifest_issues=list(sample_set.issues),
        exact_duplicates=ExactDuplicates(
            n_groups=len(groups),
            n_redundant_files=sum(len(g) - 1 for g in groups),
            n_groups_with_conflicting_labels=sum(len({f.sample.label for f in g}) > 1 for g in groups),
            groups=[[f.sample.path for f in g] for g in groups[:200]],
        ),
        near_duplicates=NearDuplicates(
            hash=hash_name,
            threshold_bits=threshold,
            n_pairs=len(pairs),
            n_images_involved=len(involved),
            n_pairs_with_conflicting_labels=int(np.count_nonzero(label[pairs[:, 0]] != label[pairs[:, 1]])),
            pairs=[  # the closest first; ties in (i, j) order
                NearDuplicatePair(hashed[i].sample.path, hashed[j].sample.path, int(d))
                for i, j, d in pairs[np.argsort(pairs[:, 2], kind="stable")[:_MAX_LISTED_PAIRS]].tolist()
            ],
        ),
    )
    if has_splits:
        report.leakage = _leakage([f.sample for f in facts], [f.sample for f in hashed], pairs, hash_name, threshold)
        if plot_path is not None and hashed:
            report.plot = str(plot_nearest_train_distances(hashed, threshold, plot_path))
    return report


def _size_summary(sizes: Sequence[str | None]) -> SizeSummary:
    known = [s for s in sizes if s]
    if not known:
        return SizeSummary()
    dims = np.array([[int(v) for v in s.split("x")] for s in known if s.count("x") == 1])
    summary = SizeSummary(len(set(known)), Counter(known).most_common(5))
    if len(dims):
        summary.width_range = [int(dims[:, 0].min()), int(dims[:, 0].max())]
        summary.height_range = [int(dims[:, 1].min()), int(dims[:, 1].max())]
    return summary


def check_split_leakage(
    sample_set: SampleSet,
    strict: bool = False,
    report_path: str | Path | None = None,
    *,
    threshold: int = DEFAULT_NEAR_THRESHOLD,
    hash_size: int = DEFAULT_HASH_SIZE,
    progress: bool | None = None,
) -> LeakageFindings:
    """Warn (or raise ``DataError`` when ``strict``) if val/test share near-duplicates or patients with
    train; return the findings, also written to ``report_path`` as JSON when given."""
    from covidscan.runtime import write_json

    if not any(s.split for s in sample_set.samples):
        raise ValueError("check_split_leakage needs samples with splits assigned (assign_splits first)")
    findings = audit_samples(sample_set, threshold=threshold, hash_size=hash_size, progress=progress).leakage
    assert findings is not None  # split samples always get leakage findings
    if report_path is not None:
        write_json(report_path, findings.to_dict())
    enforce_leakage_rule(findings, strict, "--strict / training.strict_leakage")
    return findings


def enforce_leakage_rule(findings: LeakageFindings, strict: bool, refused_because: str) -> None:
    """Raise ``DataError`` (``strict``) or warn once when :meth:`LeakageFindings.problems` finds leakage."""
    message = findings.message()
    if message is None:
        return
    if strict:
        raise DataError(f"{message} (refused because of {refused_because})")
    warn_leakage_once(message, message)


def format_report(report: AuditReport) -> str:
    """A short human summary of :func:`audit_samples`' report (the JSON holds the details)."""
    near, exact, sizes = report.near_duplicates, report.exact_duplicates, report.image_sizes
    extent = f", width {sizes.width_range}, height {sizes.height_range}" if sizes.width_range else ""
    lines = [
        f"samples: {report.n_samples}  classes: {report.classes}  patients: {report.patients or 'unknown'}",
        f"sizes: {sizes.distinct} distinct{extent}, most common {sizes.most_common[:3]}  modes: {report.modes}",
        f"unreadable: {len(report.unreadable)}  skipped at load: {len(report.skipped_at_load)}",
        f"exact duplicates: {exact.n_groups} groups, {exact.n_redundant_files} redundant files, "
        f"{exact.n_groups_with_conflicting_labels} with conflicting labels",
        f"near-duplicates ({near.hash}, distance <= {near.threshold_bits}): {near.n_pairs} pairs over "
        f"{near.n_images_involved} images, {near.n_pairs_with_conflicting_labels} with conflicting labels",
    ]
    for item in report.unreadable[:5]:
        lines.append(f"  unreadable: {item.reason}")
    if report.splits and report.leakage is not None:
        leak = report.leakage
        lines.append(f"splits: {report.splits}")
        lines.append(
            f"across splits: near-duplicate pairs {leak.cross_split_near_duplicate_pairs}; "
            f"test images with a train near-duplicate: {leak.test.with_train_near_duplicate}/"
            f"{leak.test.size} ({leak.test.with_train_near_duplicate_fraction:.1%}); val: "
            f"{leak.val.with_train_near_duplicate}/{leak.val.size}; patients spanning splits: "
            f"{leak.patients_spanning_splits}"
        )
    return "\n".join(lines)
