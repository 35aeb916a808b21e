"""Data quality report: duplicates, near-duplicates, leakage between splits, balance, lengths.

``quality_report`` returns plain JSON-serialisable data (what ``tunelab data check --json``
prints); ``render_quality_report`` draws it with rich. Lists of places are cut to the first
``MAX_PLACES``; every count is complete.

Near-duplicates are found with MinHash over character 5-gram shingles of the lower-cased,
whitespace-collapsed text, using one-permutation hashing with rotation densification (one hash
per shingle, 128 bins) and LSH banding, all in numpy; the Jaccard similarity of each candidate
pair is then computed exactly, so reported similarities carry no estimation noise. Character
shingles rather than word 5-shingles because fine-tuning examples are short: one changed word
among 40 leaves word 5-shingles only ~0.76 similar, character 5-grams ~0.9. Two adjustments
keep this honest and fast on large or templated data:

- shingles found in more than half of all texts (a shared system prompt, the Alpaca preamble,
  a "Review: ... Sentiment:" scaffold) are ignored, so similarity measures the content;
- past ``MAX_SHINGLES`` shingles in total, a fixed hash-range subsample is used for every text,
  which keeps the similarity unbiased.

An LSH bucket is compared within a window of ``MAX_BUCKET_WINDOW`` neighbours, so in a cluster of
more than ~100 mutual near-duplicates the pair count is a lower bound.
"""

from __future__ import annotations

from collections import Counter, defaultdict
from typing import TYPE_CHECKING, Any

import numpy as np
from rich.console import Console
from rich.panel import Panel
from rich.table import Table

from tunelab.data.formats import Example, example_prompt, example_target, example_text

if TYPE_CHECKING:
    from tunelab.data.preference import PreferenceExample

MAX_PLACES = 10
MAX_BALANCE_LABELS = 50
SHINGLE_BYTES = 5
N_BINS = 128  # MinHash signature length
MAX_SHINGLES = 4_000_000
COMMON_SHINGLE_SHARE = 0.5
MIN_COMMON_SHINGLE_TEXTS = 20  # below this many texts, no shingle counts as boilerplate
COMMON_SHINGLE_SAMPLE = 2_000  # texts sampled to find boilerplate shingles
MAX_BUCKET_WINDOW = 100  # an LSH bucket is compared within this many neighbours
ESTIMATE_MARGIN = 0.15  # candidates estimated this far below the threshold are not checked

_U64_MAX = np.iinfo(np.uint64).max
_BIN_SHIFT = np.uint64(64 - 7)  # 2**7 == N_BINS
_VALUE_MASK = np.uint64((1 << 57) - 1)
_SAMPLE_SALT = 0x5851F42D4C957F2D


def quality_report(
    train: list[Example],
    validation: list[Example] | None = None,
    test: list[Example] | None = None,
    *,
    token_lengths: dict[str, list[int]] | None = None,
    max_seq_len: int | None = None,
    near_duplicate_threshold: float = 0.8,
    conflicting_targets: bool = True,
) -> dict:
    """Check the examples of each split and the overlap of every pair; return JSON-ready data.

    ``token_lengths[split]`` (one length per example) adds length percentiles and, with
    ``max_seq_len``, the share that will be truncated. ``leakage`` has one entry per pair of
    splits given (train/validation, train/test, validation/test), each counting the examples of
    the later split that the earlier one already holds. ``warnings`` says what to fix.
    ``conflicting_targets=False`` counts none (KTO's answers: one prompt, good and bad answers).
    """
    splits = {"train": train}
    if validation is not None:
        splits["validation"] = validation
    if test is not None:
        splits["test"] = test
    texts = {
        name: [example_text(example) for example in examples] for name, examples in splits.items()
    }
    near = _near_duplicates_by_split(splits, texts, near_duplicate_threshold)
    report: dict[str, Any] = {"near_duplicate_threshold": near_duplicate_threshold, "splits": {}}
    for name, examples in splits.items():
        lengths = (token_lengths or {}).get(name)
        report["splits"][name] = {
            "n_records": len(examples),
            "formats": dict(Counter(example.format for example in examples)),
            "token_length": _length_stats(lengths, len(examples), name),
            "truncated": _truncation(lengths, max_seq_len),
            "exact_duplicates": _exact_duplicates(examples, texts[name]),
            "near_duplicates": near[name],
            "conflicting_targets": _conflicting_targets(examples if conflicting_targets
                                                        else []),
            "label_balance": _label_balance(examples),
            "empty_targets": _empty_targets(examples),
        }
    report["leakage"] = {
        f"{earlier}/{later}": {
            "exact": _exact_leakage(splits, texts, earlier, later),
            "near": near[f"{earlier}/{later}"],
            "prompt_overlap": _prompt_overlap(splits, texts, earlier, later,
                                              near_duplicate_threshold),
        }
        for earlier, later in split_pairs(list(splits))
    }
    report["warnings"] = _warnings(report)
    return report


def split_pairs(names: list[str]) -> list[tuple[str, str]]:
    """Every (earlier, later) pair of splits, in the order given: train/validation, train/test,
    validation/test. Leakage is counted in the later split of each pair."""
    return [(a, b) for i, a in enumerate(names) for b in names[i + 1:]]


def leaked_examples(
    source: list[Example], target: list[Example], *, threshold: float = 0.8
) -> dict[int, dict]:
    """Indices of ``target`` examples that leak from ``source``: the same text, a near-duplicate
    text, or the same (or a nearly identical) prompt. Each maps to how it leaks and where."""
    splits = {"source": source, "target": target}
    texts = {name: [example_text(ex) for ex in examples] for name, examples in splits.items()}
    found: dict[int, dict] = {}
    source_index = {text: i for i, text in reversed(list(enumerate(texts["source"])))}
    for i, text in enumerate(texts["target"]):
        if text in source_index:
            found[i] = {"kind": "same text", "source": source[source_index[text]].where}
    for kind, pairs in (("near-duplicate", _near_pairs(texts, threshold)),
                        ("same prompt", _prompt_pairs(splits, texts, threshold))):
        for i, (j, similarity) in pairs.items():
            found.setdefault(i, {"kind": kind, "source": source[j].where,
                                 "similarity": round(similarity, 3)})
    return dict(sorted(found.items()))


# --- per-split checks -----------------------------------------------------------------------


def _length_stats(lengths: list[int] | None, n_examples: int, split: str) -> dict | None:
    if lengths is None:
        return None
    if len(lengths) != n_examples:
        raise ValueError(
            f"token_lengths['{split}'] has {len(lengths)} entries for {n_examples} examples"
        )
    if not lengths:
        return None
    values = np.asarray(lengths)
    p50, p90, p99 = np.percentile(values, [50, 90, 99])
    return {
        "min": int(values.min()),
        "p50": float(p50),
        "p90": float(p90),
        "p99": float(p99),
        "max": int(values.max()),
        "mean": round(float(values.mean()), 2),
    }


def _truncation(lengths: list[int] | None, max_seq_len: int | None) -> dict | None:
    if lengths is None or max_seq_len is None or not lengths:
        return None
    count = int((np.asarray(lengths) > max_seq_len).sum())
    return {"max_seq_len": max_seq_len, "count": count, "share": round(count / len(lengths), 4)}


def _exact_duplicates(examples: list[Example], texts: list[str]) -> dict:
    places_by_text: dict[str, list[int]] = defaultdict(list)
    for index, text in enumerate(texts):
        places_by_text[text].append(index)
    groups = sorted((g for g in places_by_text.values() if len(g) > 1), key=len, reverse=True)
    return {
        "n_groups": len(groups),
        "redundant": sum(len(group) - 1 for group in groups),
        "groups": [
            {
                "count": len(group),
                "places": [examples[i].where for i in group[:MAX_PLACES]],
                "preview": _preview(texts[group[0]]),
            }
            for group in groups[:MAX_PLACES]
        ],
    }


def _conflicting_targets(examples: list[Example]) -> dict:
    """The same non-empty prompt with different targets inside one split (label noise)."""
    by_prompt: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(examples):
        prompt = example_prompt(example).strip()
        if prompt:
            by_prompt[prompt].append(index)
    groups = []
    for prompt, indices in by_prompt.items():
        targets = {example_target(examples[i]) for i in indices}
        if len(targets) > 1:
            groups.append((prompt, indices, sorted(targets)))
    return {
        "count": len(groups),
        "groups": [
            {
                "prompt": _preview(prompt),
                "targets": [_preview(target) for target in targets[:MAX_PLACES]],
                "places": [examples[i].where for i in indices[:MAX_PLACES]],
            }
            for prompt, indices, targets in groups[:MAX_PLACES]
        ],
    }


def _label_balance(examples: list[Example]) -> dict | None:
    counts = Counter(example.label for example in examples if example.label is not None)
    if not counts:
        return None
    total = sum(counts.values())
    if len(counts) > MAX_BALANCE_LABELS:
        return {
            "n_labels": len(counts),
            "n_labelled": total,
            "counts": None,
            "shares": None,
            "imbalance_ratio": None,
        }
    ordered = counts.most_common()
    return {
        "n_labels": len(counts),
        "n_labelled": total,
        "counts": dict(ordered),
        "shares": {label: round(count / total, 4) for label, count in ordered},
        "imbalance_ratio": round(ordered[0][1] / ordered[-1][1], 2),
    }


def _empty_targets(examples: list[Example]) -> dict:
    places = [example.where for example in examples if not example_target(example).strip()]
    return {"count": len(places), "places": places[:MAX_PLACES]}


# --- leakage --------------------------------------------------------------------------------


def _exact_leakage(
    splits: dict[str, list[Example]], texts: dict[str, list[str]], earlier: str, later: str
) -> dict:
    first_index: dict[str, int] = {}
    for index, text in enumerate(texts[earlier]):
        first_index.setdefault(text, index)
    leaked = [(i, first_index[text]) for i, text in enumerate(texts[later]) if text in first_index]
    return {
        "count": len(leaked),
        "places": [
            {later: splits[later][i].where, earlier: splits[earlier][j].where}
            for i, j in leaked[:MAX_PLACES]
        ],
    }


def _prompt_overlap(
    splits: dict[str, list[Example]], texts: dict[str, list[str]], earlier: str, later: str,
    threshold: float,
) -> dict:
    """Examples of ``later`` whose prompt equals or nearly equals a prompt of ``earlier`` (the
    inputs leak). Examples whose whole text is in ``earlier`` are left out: exact leakage
    reports them."""
    found = _prompt_pairs({"source": splits[earlier], "target": splits[later]},
                          {"source": texts[earlier], "target": texts[later]}, threshold)
    earlier_texts = set(texts[earlier])
    leaked = sorted(i for i in found if texts[later][i] not in earlier_texts)
    return {
        "count": len(leaked),
        "places": [
            {
                later: splits[later][i].where,
                earlier: splits[earlier][found[i][0]].where,
                "similarity": round(found[i][1], 3),
            }
            for i in leaked[:MAX_PLACES]
        ],
    }


def _prompt_pairs(
    splits: dict[str, list[Example]], texts: dict[str, list[str]], threshold: float
) -> dict[int, tuple[int, float]]:
    """Target index -> (source index, similarity) for targets whose prompt equals or nearly
    equals a source prompt."""
    source_prompt_index: dict[str, int] = {}
    for index, example in enumerate(splits["source"]):
        prompt = example_prompt(example).strip()
        if prompt:
            source_prompt_index.setdefault(prompt, index)
    target_indices_by_prompt: dict[str, list[int]] = defaultdict(list)
    for index, example in enumerate(splits["target"]):
        prompt = example_prompt(example).strip()
        if prompt:
            target_indices_by_prompt[prompt].append(index)
    found: dict[int, tuple[int, float]] = {}
    for prompt, indices in target_indices_by_prompt.items():
        if prompt in source_prompt_index:
            found.update((i, (source_prompt_index[prompt], 1.0)) for i in indices)
    source_prompts, target_prompts = list(source_prompt_index), list(target_indices_by_prompt)
    n_source = len(source_prompts)
    left, right, similarity = _near_duplicate_pairs(source_prompts + target_prompts, threshold)
    cross = (left < n_source) & (right >= n_source)
    for i, j, sim in zip(
        left[cross].tolist(), right[cross].tolist(), similarity[cross].tolist(), strict=True
    ):
        source_index = source_prompt_index[source_prompts[i]]
        for target_index in target_indices_by_prompt[target_prompts[j - n_source]]:
            found.setdefault(target_index, (source_index, sim))
    return found


def _near_pairs(texts: dict[str, list[str]], threshold: float) -> dict[int, tuple[int, float]]:
    """Target index -> (source index, similarity) for target texts near-duplicating a source
    text (and not equal to it)."""
    n_source = len(texts["source"])
    left, right, similarity = _near_duplicate_pairs(texts["source"] + texts["target"], threshold)
    found: dict[int, tuple[int, float]] = {}
    cross = (left < n_source) & (right >= n_source)
    for i, j, sim in sorted(zip(left[cross].tolist(), right[cross].tolist(),
                                similarity[cross].tolist(), strict=True), key=lambda p: -p[2]):
        if texts["source"][i] != texts["target"][j - n_source]:
            found.setdefault(j - n_source, (i, sim))
    return found


# --- near-duplicates ------------------------------------------------------------------------


def _near_duplicates_by_split(
    splits: dict[str, list[Example]], texts: dict[str, list[str]], threshold: float
) -> dict[str, dict]:
    """Near-duplicate pairs inside each split and across each pair of splits
    (``"earlier/later"``: the pair count, and ``count`` of later-split examples)."""
    order = {name: position for position, name in enumerate(splits)}
    owners: list[tuple[str, int]] = []  # (split, example index) of each distinct text
    distinct: list[str] = []
    for name in splits:
        seen: set[str] = set()
        for index, text in enumerate(texts[name]):
            if text not in seen:
                seen.add(text)
                owners.append((name, index))
                distinct.append(text)
    left, right, similarity = _near_duplicate_pairs(distinct, threshold)
    pairs_by_kind: dict[str, list[tuple[float, str, str]]] = defaultdict(list)
    for i, j, sim in zip(left.tolist(), right.tolist(), similarity.tolist(), strict=True):
        if distinct[i] == distinct[j]:
            continue  # the same text in two splits: exact leakage, reported there
        (split_a, index_a), (split_b, index_b) = sorted((owners[i], owners[j]),
                                                        key=lambda owner: order[owner[0]])
        kind = split_a if split_a == split_b else f"{split_a}/{split_b}"
        a, b = splits[split_a][index_a], splits[split_b][index_b]
        pairs_by_kind[kind].append((sim, a.where, b.where))  # a is from the earlier split
    result = {name: _pair_summary(pairs_by_kind[name]) for name in splits}
    for earlier, later in split_pairs(list(splits)):
        leaks = pairs_by_kind[f"{earlier}/{later}"]
        result[f"{earlier}/{later}"] = _pair_summary(leaks)
        result[f"{earlier}/{later}"]["count"] = len({b for _, _, b in leaks})  # later examples
    return result


def _pair_summary(pairs: list[tuple[float, str, str]]) -> dict:
    pairs = sorted(pairs, key=lambda pair: -pair[0])
    return {
        "count": len(pairs),
        "pairs": [
            {"a": a, "b": b, "similarity": round(sim, 3)} for sim, a, b in pairs[:MAX_PLACES]
        ],
    }


def _near_duplicate_pairs(texts: list[str], threshold: float) -> tuple[np.ndarray, ...]:
    """Index pairs (i < j) whose shingle sets have Jaccard similarity at least ``threshold``.

    MinHash + LSH find candidates; their similarity is then computed exactly, so the numbers
    reported carry no estimation noise. Returns (left, right, similarity) arrays. Texts
    shorter than one shingle are skipped.
    """
    empty = (np.empty(0, np.int64), np.empty(0, np.int64), np.empty(0, np.float64))
    text_ids, hashes = _shingle_hashes(texts)
    text_ids, hashes = _drop_common_shingles(text_ids, hashes, len(texts))
    if len(hashes) == 0:
        return empty
    members, signatures = _signatures(text_ids, hashes, len(texts))
    rows = _rows_per_band(threshold)
    left, right = _lsh_candidates(signatures, rows, N_BINS // rows)
    step = 50_000  # pairs per block: bounds the (pairs, N_BINS) comparison in memory
    estimate = np.concatenate(
        [
            (signatures[left[s : s + step]] == signatures[right[s : s + step]]).mean(axis=1)
            for s in range(0, len(left), step)
        ]
        + [np.empty(0)]
    )
    # the estimate's spread is under 0.05: far-off candidates need no exact check
    plausible = estimate >= threshold - ESTIMATE_MARGIN
    left, right = members[left[plausible]], members[right[plausible]]
    similarity = _exact_jaccard(text_ids, hashes, left, right, len(texts))
    keep = similarity >= threshold
    return left[keep], right[keep], similarity[keep]


def _exact_jaccard(
    text_ids: np.ndarray, hashes: np.ndarray, left: np.ndarray, right: np.ndarray, n_texts: int
) -> np.ndarray:
    """Jaccard similarity of the shingle sets of each pair, vectorised over pairs."""
    if len(left) == 0:
        return np.empty(0)
    involved = np.zeros(n_texts, bool)
    involved[left] = involved[right] = True
    selected = involved[text_ids]
    ids, values = text_ids[selected], hashes[selected]
    order = np.lexsort((values, ids))  # by text, then hash: each text's set, sorted
    ids, values = ids[order], values[order]
    distinct = np.concatenate(([True], (ids[1:] != ids[:-1]) | (values[1:] != values[:-1])))
    ids, values = ids[distinct], values[distinct]
    sizes = np.bincount(ids, minlength=n_texts)
    starts = np.concatenate(([0], np.cumsum(sizes)[:-1]))
    overlap = np.concatenate(
        [
            _overlap_counts(values, starts, sizes, left[s : s + 20_000], right[s : s + 20_000])
            for s in range(0, len(left), 20_000)
        ]
    )
    return overlap / (sizes[left] + sizes[right] - overlap)


def _overlap_counts(
    values: np.ndarray, starts: np.ndarray, sizes: np.ndarray, left: np.ndarray, right: np.ndarray
) -> np.ndarray:
    """|A ∩ B| per pair: put both sets of each pair side by side and count repeated hashes."""
    pair_sizes = sizes[left] + sizes[right]
    pair_of_element = np.repeat(np.arange(len(left)), pair_sizes)
    # element k of a pair comes from left's set for k < sizes[left], then from right's
    within_pair = np.arange(len(pair_of_element)) - np.repeat(
        np.cumsum(pair_sizes) - pair_sizes, pair_sizes
    )
    from_left = within_pair < sizes[left][pair_of_element]
    source = np.where(
        from_left,
        starts[left][pair_of_element] + within_pair,
        starts[right][pair_of_element] + within_pair - sizes[left][pair_of_element],
    )
    element_values = values[source]
    order = np.lexsort((element_values, pair_of_element))
    pairs_sorted, values_sorted = pair_of_element[order], element_values[order]
    repeated = (pairs_sorted[1:] == pairs_sorted[:-1]) & (values_sorted[1:] == values_sorted[:-1])
    return np.bincount(pairs_sorted[1:][repeated], minlength=len(left)).astype(np.float64)


def _shingle_hashes(texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """(text id, 64-bit hash) of every byte 5-gram of each normalised text, subsampled if huge."""
    encoded = [" ".join(text.lower().split()).encode() for text in texts]
    lengths = np.fromiter((len(b) for b in encoded), np.int64, len(encoded))
    total = int(np.clip(lengths - SHINGLE_BYTES + 1, 0, None).sum())
    if total == 0:
        return np.empty(0, np.int64), np.empty(0, np.uint64)
    # a fixed hash range keeps the same shingles in every text: similarity stays unbiased
    keep_below = _U64_MAX if total <= MAX_SHINGLES else np.uint64(int(2**64 * MAX_SHINGLES / total))
    ids_parts, hash_parts = [], []
    chunk_start = 0
    while chunk_start < len(encoded):
        chunk_end = chunk_start + 1
        chunk_bytes = len(encoded[chunk_start])
        while chunk_end < len(encoded) and chunk_bytes < 8_000_000:
            chunk_bytes += len(encoded[chunk_end])
            chunk_end += 1
        ids, hashes = _chunk_hashes(encoded[chunk_start:chunk_end], lengths[chunk_start:chunk_end])
        # sample on a second hash: the first one's top bits pick the MinHash bin
        keep = _mix64(hashes ^ np.uint64(_SAMPLE_SALT)) <= keep_below
        ids_parts.append(ids[keep] + chunk_start)
        hash_parts.append(hashes[keep])
        chunk_start = chunk_end
    return np.concatenate(ids_parts), np.concatenate(hash_parts)


def _chunk_hashes(encoded: list[bytes], lengths: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    buffer = np.frombuffer(b"".join(encoded), dtype=np.uint8)
    n_windows = len(buffer) - SHINGLE_BYTES + 1
    if n_windows <= 0:
        return np.empty(0, np.int64), np.empty(0, np.uint64)
    codes = np.zeros(n_windows, np.uint64)
    for offset in range(SHINGLE_BYTES):  # the 5 bytes themselves: an exact 40-bit code
        codes |= buffer[offset : offset + n_windows].astype(np.uint64) << np.uint64(8 * offset)
    starts = np.concatenate(([0], np.cumsum(lengths)[:-1]))
    text_ids = np.repeat(np.arange(len(encoded)), lengths)[:n_windows]
    inside = np.arange(n_windows) - starts[text_ids] <= lengths[text_ids] - SHINGLE_BYTES
    return text_ids[inside], _mix64(codes[inside])


def _mix64(values: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser: a fixed, well-spread bijection on 64-bit integers."""
    values = values ^ (values >> np.uint64(30))
    values = values * np.uint64(0xBF58476D1CE4E5B9)
    values = values ^ (values >> np.uint64(27))
    values = values * np.uint64(0x94D049BB133111EB)
    return values ^ (values >> np.uint64(31))


def _drop_common_shingles(
    text_ids: np.ndarray, hashes: np.ndarray, n_texts: int
) -> tuple[np.ndarray, np.ndarray]:
    """Drop boilerplate: shingles present in more than half of the texts.

    Document frequencies come from an evenly spaced sample of texts: a shingle in more than
    half of all texts is in about half of any large sample, and counting there is cheap.
    """
    if n_texts < MIN_COMMON_SHINGLE_TEXTS:
        return text_ids, hashes
    in_sample = np.zeros(n_texts, bool)
    in_sample[np.linspace(0, n_texts - 1, min(n_texts, COMMON_SHINGLE_SAMPLE)).astype(int)] = True
    n_sample = int(in_sample.sum())
    sampled = in_sample[text_ids]
    sample_ids, sample_hashes = text_ids[sampled], hashes[sampled]
    # one entry per (text, shingle), then count the texts each shingle occurs in
    pair_keys = _mix64(sample_hashes ^ _mix64(sample_ids.astype(np.uint64)))
    _, first = np.unique(pair_keys, return_index=True)
    unique_hashes, text_counts = np.unique(sample_hashes[first], return_counts=True)
    common = unique_hashes[text_counts > COMMON_SHINGLE_SHARE * n_sample]
    if len(common) == 0:
        return text_ids, hashes
    positions = np.minimum(np.searchsorted(common, hashes), len(common) - 1)  # common is sorted
    keep = common[positions] != hashes
    return text_ids[keep], hashes[keep]


def _signatures(
    text_ids: np.ndarray, hashes: np.ndarray, n_texts: int
) -> tuple[np.ndarray, np.ndarray]:
    """One-permutation MinHash: the minimum hash in each of N_BINS hash ranges, densified."""
    flat = np.full(n_texts * N_BINS, _U64_MAX, np.uint64)
    bins = (hashes >> _BIN_SHIFT).astype(np.int64)
    np.minimum.at(flat, text_ids * N_BINS + bins, hashes & _VALUE_MASK)
    signatures = flat.reshape(n_texts, N_BINS)
    filled = signatures != _U64_MAX
    members = np.flatnonzero(filled.any(axis=1))
    signatures, filled = signatures[members], filled[members]
    step = 10_000  # rows per block: bounds the (rows, 2 * N_BINS) work arrays in memory
    dense = [
        _densify(signatures[s : s + step], filled[s : s + step])
        for s in range(0, len(members), step)
    ]
    return members, np.concatenate(dense) if dense else signatures


def _densify(signatures: np.ndarray, filled: np.ndarray) -> np.ndarray:
    """Rotation densification: an empty bin borrows the next filled bin to its right (cyclic),
    tagged with the distance so that borrowed values only match values borrowed the same way."""
    doubled = np.concatenate([signatures, signatures], axis=1)
    positions = np.where(
        np.concatenate([filled, filled], axis=1), np.arange(2 * N_BINS), 2 * N_BINS
    )
    next_filled = np.minimum.accumulate(positions[:, ::-1], axis=1)[:, ::-1][:, :N_BINS]
    distance = (next_filled - np.arange(N_BINS)).astype(np.uint64)
    borrowed = np.take_along_axis(doubled, next_filled, axis=1)
    return borrowed ^ (distance * np.uint64(0x9E3779B97F4A7C15))


def _rows_per_band(threshold: float) -> int:
    """The most rows per band that still finds a pair at the threshold with 99% probability."""
    best = 1
    for rows in range(1, 17):
        bands = N_BINS // rows
        if 1 - (1 - threshold**rows) ** bands >= 0.99:
            best = rows
    return best


def _lsh_candidates(signatures: np.ndarray, rows: int, bands: int) -> tuple[np.ndarray, ...]:
    """Pairs (i < j) that agree on all rows of at least one band."""
    pair_codes = []
    n = len(signatures)
    for band in range(bands):
        keys = np.zeros(n, np.uint64)
        for column in range(band * rows, (band + 1) * rows):
            keys = _mix64(keys ^ signatures[:, column])
        order = np.argsort(keys, kind="stable")
        sorted_keys = keys[order]
        for distance in range(1, min(MAX_BUCKET_WINDOW, n - 1) + 1):
            same = np.flatnonzero(sorted_keys[distance:] == sorted_keys[:-distance])
            if len(same) == 0:
                break  # no bucket holds more than `distance` members
            a, b = order[same], order[same + distance]
            pair_codes.append(np.minimum(a, b) * n + np.maximum(a, b))
    if not pair_codes:
        return np.empty(0, np.int64), np.empty(0, np.int64)
    codes = np.unique(np.concatenate(pair_codes))
    return codes // n, codes % n


# --- warnings -------------------------------------------------------------------------------


def _warnings(report: dict) -> list[str]:
    """One line per problem: what is wrong, and what to do."""
    warnings: list[str] = []
    threshold = report["near_duplicate_threshold"]
    for split, stats in report["splits"].items():
        warnings.extend(_split_warnings(split, stats, threshold))
    for pair, leakage in report["leakage"].items():
        earlier, later = pair.split("/")
        warnings.extend(_leakage_warnings(leakage, earlier, later, threshold))
        if earlier == "train":
            warnings.extend(_unseen_label_warnings(report["splits"], later))
    return warnings


def _split_warnings(split: str, stats: dict, threshold: float) -> list[str]:
    warnings = []
    truncated = stats["truncated"]
    if truncated and truncated["count"]:
        warnings.append(
            f"{truncated['share']:.1%} of {split} examples ({truncated['count']:,}) "
            f"{_are(truncated['count'])} longer than max_seq_len={truncated['max_seq_len']} and "
            "will be truncated: raise train.max_seq_len or shorten them"
        )
    duplicates = stats["exact_duplicates"]
    if duplicates["redundant"]:
        warnings.append(
            f"{_n(duplicates['redundant'], 'exact duplicate')} in {split} "
            f"({_n(duplicates['n_groups'], 'text')} repeated, e.g. "
            f"{_places(duplicates['groups'][0]['places'])}): deduplicate; repeated examples are "
            "over-learned and skew the loss"
        )
    near = stats["near_duplicates"]
    if near["count"]:
        first = near["pairs"][0]
        warnings.append(
            f"{_n(near['count'], 'near-duplicate pair')} in {split} (similarity >= {threshold}), "
            f"e.g. {first['a']} and {first['b']}: review them and keep one of each pair"
        )
    conflicts = stats["conflicting_targets"]
    if conflicts["count"]:
        warnings.append(
            f"{_n(conflicts['count'], 'prompt')} in {split} {_appear(conflicts['count'])} with "
            f"different targets, e.g. {_places(conflicts['groups'][0]['places'])}: check the "
            "labels; contradictory examples teach noise"
        )
    empty = stats["empty_targets"]
    if empty["count"]:
        warnings.append(
            f"{_n(empty['count'], f'{split} example')} {'has' if empty['count'] == 1 else 'have'} "
            f"an empty target, e.g. {_places(empty['places'])}: it teaches nothing; fill in the "
            "target or drop the example"
        )
    warnings.extend(_balance_warnings(split, stats["label_balance"]))
    return warnings


def _balance_warnings(split: str, balance: dict | None) -> list[str]:
    if not balance or not balance["shares"] or balance["n_labels"] < 2:
        return []
    rare_share = 1 / (3 * balance["n_labels"])  # a third of an even share
    rare = [(label, share) for label, share in balance["shares"].items() if share < rare_share]
    return [
        f"label '{label}' is {share:.1%} of {split} ({balance['counts'][label]:,} of "
        f"{balance['n_labelled']:,}): add examples of it or up-sample it, or the model may learn "
        "to rarely predict it"
        for label, share in rare[:MAX_PLACES]
    ]


def _leakage_warnings(leakage: dict, earlier: str, later: str, threshold: float) -> list[str]:
    warnings = []
    inflates = "they inflate test scores" if later == "test" else "they inflate validation scores"
    exact = leakage["exact"]
    if exact["count"]:
        place = exact["places"][0]
        warnings.append(
            f"{_n(exact['count'], f'{later} example')} also {_appear(exact['count'])} in "
            f"{earlier} (leakage), e.g. {place[later]} = {place[earlier]}: remove them from "
            f"{later}; {inflates}"
        )
    near = leakage["near"]
    if near["count"]:
        pair = near["pairs"][0]
        warnings.append(
            f"{_n(near['count'], f'{later} example')} {_are(near['count'])} near-duplicates of "
            f"{earlier} examples (similarity >= {threshold}), e.g. {pair['b']} ~ {pair['a']}: "
            f"remove them from {later}; {inflates}"
        )
    overlap = leakage["prompt_overlap"]
    if overlap["count"]:
        place = overlap["places"][0]
        warnings.append(
            f"{_n(overlap['count'], f'{later} example')} "
            f"{'has' if overlap['count'] == 1 else 'have'} the same or a nearly identical prompt "
            f"as a {earlier} example, e.g. {place[later]} ~ {place[earlier]}: the inputs leak "
            f"even where the targets differ; remove them from {later}"
        )
    return warnings


def _unseen_label_warnings(splits: dict, later: str) -> list[str]:
    train_counts = (splits["train"]["label_balance"] or {}).get("counts")
    later_counts = (splits[later]["label_balance"] or {}).get("counts")
    if not train_counts or not later_counts:
        return []
    unseen = [label for label in later_counts if label not in train_counts]
    return [
        f"label '{label}' appears in {later} ({_n(later_counts[label], 'example')}) but never "
        "in train: add training examples for it"
        for label in unseen[:MAX_PLACES]
    ]


def _n(count: int, noun: str) -> str:
    return f"{count:,} {noun}" + ("" if count == 1 else "s")


def _are(count: int) -> str:
    return "is" if count == 1 else "are"


def _appear(count: int) -> str:
    return "appears" if count == 1 else "appear"


def _places(places: list[str], limit: int = 3) -> str:
    return ", ".join(places[:limit])


def _preview(text: str, limit: int = 80) -> str:
    flat = " ".join(text.split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


# --- rendering ------------------------------------------------------------------------------


def render_quality_report(report: dict, console: Console) -> None:
    """Draw the report: an overview table per split, leakage, label balance, then warnings."""
    console.print(_overview_table(report))
    if report["leakage"]:
        console.print(_leakage_table(report["leakage"]))
    for split, stats in report["splits"].items():
        balance = stats["label_balance"]
        if balance and balance["counts"]:
            console.print(_balance_table(split, balance))
    if report["warnings"]:
        body = "\n".join(f"• {warning}" for warning in report["warnings"])
        console.print(Panel(body, title="Warnings", border_style="yellow", style="yellow"))
    else:
        console.print(Panel("No problems found.", border_style="green", style="green"))


def _overview_table(report: dict) -> Table:
    table = Table(title="Data check", title_justify="left")
    table.add_column("")
    for split in report["splits"]:
        table.add_column(split, justify="right")
    rows = {
        "records": lambda s: f"{s['n_records']:,}",
        "formats": lambda s: ", ".join(f"{name} {count:,}" for name, count in s["formats"].items()),
        "tokens p50 / p90 / max": lambda s: (
            f"{s['token_length']['p50']:.0f} / {s['token_length']['p90']:.0f} / "
            f"{s['token_length']['max']}"
            if s["token_length"]
            else "-"
        ),
        "truncated": lambda s: (
            f"{s['truncated']['count']:,} ({s['truncated']['share']:.1%})"
            if s["truncated"]
            else "-"
        ),
        "exact duplicates": lambda s: f"{s['exact_duplicates']['redundant']:,}",
        "near-duplicate pairs": lambda s: f"{s['near_duplicates']['count']:,}",
        "conflicting targets": lambda s: f"{s['conflicting_targets']['count']:,}",
        "empty targets": lambda s: f"{s['empty_targets']['count']:,}",
    }
    for name, cell in rows.items():
        table.add_row(name, *(cell(stats) for stats in report["splits"].values()))
    return table


def _leakage_table(leakage_by_pair: dict) -> Table:
    table = Table(title="Leakage between splits (examples of the later split)",
                  title_justify="left")
    table.add_column("splits")
    table.add_column("same text", justify="right")
    table.add_column("near-duplicate", justify="right")
    table.add_column("same prompt", justify="right")
    table.add_column("e.g.")
    for pair, leakage in leakage_by_pair.items():
        earlier, later = pair.split("/")
        exact, near, overlap = leakage["exact"], leakage["near"], leakage["prompt_overlap"]
        example = (_first_pair(exact["places"], later, earlier)
                   or _first_pair(near["pairs"], "b", "a")
                   or _first_pair(overlap["places"], later, earlier))
        table.add_row(f"{earlier} → {later}", f"{exact['count']:,}", f"{near['count']:,}",
                      f"{overlap['count']:,}", example)
    return table


def _first_pair(places: list[dict], left: str, right: str) -> str:
    return f"{places[0][left]} ~ {places[0][right]}" if places else ""


def _balance_table(split: str, balance: dict) -> Table:
    table = Table(
        title=f"Labels in {split}",
        title_justify="left",
        caption=f"largest / smallest = {balance['imbalance_ratio']}",
        caption_justify="left",
    )
    table.add_column("label")
    table.add_column("count", justify="right")
    table.add_column("share", justify="right")
    for label, count in balance["counts"].items():
        table.add_row(_preview(label, 40), f"{count:,}", f"{balance['shares'][label]:.1%}")
    return table


# --- preference data ------------------------------------------------------------------------

PREFERENCE_PLACES = 3
#: Outside this share of pairs whose chosen answer is the longer, length is what the pairs teach.
CHOSEN_LONGER_RANGE = (0.25, 0.75)
#: Outside this share of desirable answers, KTO's two losses need weighting.
DESIRABLE_RANGE = (0.1, 0.9)


def preference_report(examples: list[PreferenceExample],
                      token_lengths: list[tuple[int, int | None]] | None = None, *,
                      split: str = "train") -> dict:
    """What preference examples teach beyond their answers: pairs whose chosen and rejected
    answers are the same, how often the chosen answer is the longer, KTO's desirable share.

    ``token_lengths`` (chosen, rejected) per example compares the answers in tokens, else in
    characters (a pair's two sides share their prompt, so the whole lengths compare the
    answers). ``chosen_longer_share`` counts the pairs whose answers differ in length.
    """
    pairs = [(i, ex) for i, ex in enumerate(examples) if ex.rejected is not None]
    identical = [ex.where for _, ex in pairs
                 if example_text(ex.chosen) == example_text(ex.rejected)]
    unit = "tokens" if token_lengths is not None else "characters"
    longer = Counter()
    for index, example in pairs:
        chosen, rejected = (token_lengths[index] if token_lengths is not None else
                            map(len, map(example_text, (example.chosen, example.rejected))))
        longer["chosen" if chosen > rejected else "rejected" if rejected > chosen else "same"] += 1
    differing = longer["chosen"] + longer["rejected"]
    labelled = [ex.desirable for ex in examples if ex.desirable is not None]
    report = {
        "split": split, "n_examples": len(examples), "n_pairs": len(pairs),
        "identical_pairs": {"count": len(identical), "places": identical[:PREFERENCE_PLACES]},
        "length_unit": unit,
        "chosen_longer": longer["chosen"], "rejected_longer": longer["rejected"],
        "same_length": longer["same"],
        "chosen_longer_share": round(longer["chosen"] / differing, 4) if differing else None,
        "desirable": sum(labelled), "undesirable": len(labelled) - sum(labelled),
        "desirable_share": round(sum(labelled) / len(labelled), 4) if labelled else None,
        "contradictory_labels": _contradictory_labels(examples),
    }
    report["warnings"] = _preference_warnings(report)
    return report


def _contradictory_labels(examples: list[PreferenceExample]) -> dict:
    """KTO: the same prompt and answer labelled both desirable and undesirable."""
    labels: dict[str, set[bool]] = defaultdict(set)
    first: dict[str, str] = {}
    for example in examples:
        if example.desirable is not None:
            text = example_text(example.chosen)
            labels[text].add(example.desirable)
            first.setdefault(text, example.where)
    places = [first[text] for text, seen in labels.items() if len(seen) > 1]
    return {"count": len(places), "places": places[:PREFERENCE_PLACES]}


def _preference_warnings(report: dict) -> list[str]:
    split, warnings = report["split"], []
    identical = report["identical_pairs"]
    if identical["count"]:
        have = "has" if identical["count"] == 1 else "have"
        warnings.append(
            f"{_n(identical['count'], f'{split} pair')} {have} the same chosen and rejected "
            f"answer, e.g. {_places(identical['places'])}: they teach nothing; fix the rejected "
            "answer or drop the pair")
    share, (low, high) = report["chosen_longer_share"], CHOSEN_LONGER_RANGE
    if share is not None and not low <= share <= high:
        prefers = "long" if share > high else "short"
        warnings.append(
            f"the chosen answer is the longer in {share:.0%} of the {split} pairs whose answers "
            f"differ in length ({report['length_unit']}): length exploitation: a model can "
            f"learn to prefer {prefers} answers; balance the pairs by length, or use "
            "method.objective: simpo (length-normalised)")
    share, (low, high) = report["desirable_share"], DESIRABLE_RANGE
    if share is not None and not low <= share <= high:
        fewer, weight = (("desirable", "desirable_weight") if share < low
                         else ("undesirable", "undesirable_weight"))
        warnings.append(
            f"desirable answers are {share:.0%} of {split} ({report['desirable']:,} of "
            f"{report['desirable'] + report['undesirable']:,}): raise method.{weight} so that "
            f"the {fewer} answers weigh as much in the loss (the KTO paper keeps "
            "desirable_weight × desirable / (undesirable_weight × undesirable) between 1 and "
            "4/3)")
    contradictory = report["contradictory_labels"]
    if contradictory["count"]:
        warnings.append(
            f"{_n(contradictory['count'], f'{split} answer')} {_are(contradictory['count'])} "
            f"labelled both desirable and undesirable, e.g. {_places(contradictory['places'])}: "
            "check the labels; contradictory examples teach noise")
    return warnings


def render_preference_report(reports: dict[str, dict], console: Console) -> None:
    """One table of the preference checks, a column per split (warnings go with the others)."""
    table = Table(title="Preference data", title_justify="left")
    table.add_column("")
    for split in reports:
        table.add_column(split, justify="right")
    share = lambda value: "-" if value is None else f"{value:.1%}"  # noqa: E731
    rows = {
        "pairs": lambda r: f"{r['n_pairs']:,}",
        "identical pairs": lambda r: f"{r['identical_pairs']['count']:,}",
        "chosen longer": lambda r: (f"{share(r['chosen_longer_share'])} ({r['length_unit']})"
                                    if r["n_pairs"] else "-"),
        "desirable": lambda r: share(r["desirable_share"]),
        "contradictory labels": lambda r: f"{r['contradictory_labels']['count']:,}",
    }
    paired = any(r["n_pairs"] for r in reports.values())
    for name, cell in rows.items():
        if paired == (name in ("pairs", "identical pairs", "chosen longer")):
            table.add_row(name, *(cell(report) for report in reports.values()))
    console.print(table)
