"""Text operators: string normalization, concatenation, splitting, regex matching and TF-IDF.

String tensors are NumPy object arrays of Python ``str``, so the string work runs on the host.
Numeric outputs are torch tensors on the execution device. TfIdfVectorizer maps strings to
integer ids on the host and counts n-grams with torch ops, which also serve integer inputs.
"""

from __future__ import annotations

import operator
import re
from collections.abc import Sequence

import numpy as np
import torch

from kiln.ops.registry import register


def _strings(values) -> np.ndarray:
    return np.asarray(values, dtype=object)


@register("StringNormalizer", since=10)
def string_normalizer(
    x: np.ndarray,
    *,
    case_change_action: str = "NONE",
    is_case_sensitive: int = 0,
    locale: str | None = None,  # Python's case mapping is Unicode-wide; no locale is needed
    stopwords: Sequence[str] | None = None,
) -> np.ndarray:
    """Drops elements equal to a stop word, then changes case. ``x`` is ``[C]`` or ``[1, C]``."""

    def comparable(word: str) -> str:
        return word if is_case_sensitive else word.lower()

    change_case = {"LOWER": str.lower, "UPPER": str.upper, "NONE": str}[case_change_action]
    stops = {comparable(w) for w in stopwords or ()}
    kept = [change_case(w) for w in x.reshape(-1) if comparable(w) not in stops]
    # ONNX keeps an output of one empty string when every element was removed.
    kept = kept or [""]
    return _strings(kept).reshape(x.shape[:-1] + (len(kept),))


@register("StringConcat", since=20)
def string_concat(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Element-wise ``x + y`` with broadcasting."""
    return _strings(np.frompyfunc(operator.add, 2, 1)(x, y))


@register("StringSplit", since=20)
def string_split(
    x: np.ndarray, *, delimiter: str | None = None, maxsplit: int | None = None, _device
) -> tuple[np.ndarray, torch.Tensor]:
    """Splits every element; pads the pieces with ``""`` to ``x.shape + [max pieces]``.

    Without a delimiter (or with ``""``), runs of whitespace separate the pieces, as in Python.
    Also returns the number of pieces of each element.
    """
    separator = delimiter or None
    pieces = [s.split(separator, -1 if maxsplit is None else maxsplit) for s in x.reshape(-1)]
    width = max((len(p) for p in pieces), default=0)
    padded = [p + [""] * (width - len(p)) for p in pieces]
    substrings = _strings(padded).reshape(x.shape + (width,))
    counts = torch.tensor([len(p) for p in pieces], dtype=torch.int64, device=_device)
    return substrings, counts.reshape(x.shape)


@register("RegexFullMatch", since=20)
def regex_full_match(x: np.ndarray, *, pattern: str, _device) -> torch.Tensor:
    """Whether each element matches ``pattern`` as a whole.

    ONNX specifies RE2 syntax; Python's ``re`` accepts the RE2 constructs models use in practice.
    """
    regex = re.compile(pattern)
    matches = [regex.fullmatch(s) is not None for s in x.reshape(-1)]
    return torch.tensor(matches, dtype=torch.bool, device=_device).reshape(x.shape)


def _token_ids(x: np.ndarray | torch.Tensor, pool: Sequence, device) -> tuple:
    """The input and the pool as indices into the pool's vocabulary (int64 tensors), and the
    vocabulary's size. Items missing from the vocabulary get its size as their index."""
    if isinstance(x, torch.Tensor):
        pool_values = torch.tensor(pool, dtype=torch.int64, device=x.device)
        vocabulary, pool_ids = torch.unique(pool_values, return_inverse=True)
        x = x.to(torch.int64)
        position = torch.searchsorted(vocabulary, x).clamp(max=len(vocabulary) - 1)
        known = vocabulary[position] == x
        return torch.where(known, position, len(vocabulary)), pool_ids, len(vocabulary)
    vocabulary = {word: i for i, word in enumerate(dict.fromkeys(pool))}
    ids = [vocabulary.get(word, len(vocabulary)) for word in x.reshape(-1)]
    input_ids = torch.tensor(ids, dtype=torch.int64, device=device).reshape(x.shape)
    pool_ids = torch.tensor([vocabulary[w] for w in pool], dtype=torch.int64, device=device)
    return input_ids, pool_ids, len(vocabulary)


def _count_ngrams(rows: torch.Tensor, grams: torch.Tensor, skip: int, base: int):
    """``[rows, n_grams]``: how often each n-gram occurs with items ``skip + 1`` apart.

    Tokens are vocabulary indices below ``base``. The n-grams' prefixes are numbered one length at
    a time (prefix number * base + next token, made dense again), which finds every window's
    n-gram by binary search and never overflows int64.
    """
    n = grams.shape[1]
    starts = torch.arange(max(rows.shape[1] - (n - 1) * (skip + 1), 0), device=rows.device)
    positions = starts.unsqueeze(1) + (skip + 1) * torch.arange(n, device=rows.device)
    windows = rows[:, positions]  # [rows, starts, n]
    gram_prefix = torch.zeros(len(grams), dtype=torch.int64, device=rows.device)
    window_prefix = torch.zeros(windows.shape[:2], dtype=torch.int64, device=rows.device)
    for k in range(n):
        known, gram_prefix = torch.unique(gram_prefix * base + grams[:, k], return_inverse=True)
        code = window_prefix * base + windows[..., k]
        position = torch.searchsorted(known, code).clamp(max=len(known) - 1)
        # An unknown prefix gets number len(known), whose codes exceed every known one.
        window_prefix = torch.where(known[position] == code, position, len(known))
    counts = torch.zeros(rows.shape[0], len(known) + 1, device=rows.device)
    counts.scatter_add_(1, window_prefix, torch.ones_like(window_prefix, dtype=counts.dtype))
    return counts[:, gram_prefix]


@register("TfIdfVectorizer", since=9)
def tfidf_vectorizer(
    x: np.ndarray | torch.Tensor,
    *,
    mode: str,
    min_gram_length: int,
    max_gram_length: int,
    max_skip_count: int,
    ngram_counts: Sequence[int],
    ngram_indexes: Sequence[int],
    pool_int64s: Sequence[int] | None = None,
    pool_strings: Sequence[str] | None = None,
    weights: Sequence[float] | None = None,
    _device,
) -> torch.Tensor:
    """Counts the pool's n-grams in each row of ``x`` (``[C]`` or ``[B, C]``), then weighs them.

    The pool lists all 1-grams, then all 2-grams, ...; ``ngram_counts[i]`` is where the
    (i+1)-grams start. The k-th pool n-gram is counted in output column ``ngram_indexes[k]``.
    n-grams may skip up to ``max_skip_count`` items between their elements; 1-grams are counted
    once, whatever the skip.
    """
    pool = list(pool_int64s) if pool_int64s else list(pool_strings or ())
    ids, pool_ids, vocabulary_size = _token_ids(x, pool, _device)
    rows = ids.reshape(1, -1) if ids.dim() < 2 else ids
    columns = torch.tensor(ngram_indexes, dtype=torch.int64, device=ids.device)
    frequencies = torch.zeros(rows.shape[0], max(ngram_indexes) + 1, device=ids.device)

    bounds = [*ngram_counts, len(pool)]
    first_id = 0  # n-gram ids run on through every size, counted or not
    for size, (begin, end) in enumerate(zip(bounds, bounds[1:]), start=1):
        count = (end - begin) // size
        if min_gram_length <= size <= max_gram_length and count > 0:
            grams = pool_ids[begin : begin + count * size].reshape(count, size)
            skips = range(max_skip_count + 1) if size > 1 else [0]
            counted = sum(_count_ngrams(rows, grams, skip, vocabulary_size + 1) for skip in skips)
            frequencies.index_add_(1, columns[first_id : first_id + count], counted)
        first_id += count

    weight = torch.ones(frequencies.shape[1], device=ids.device)
    if weights:  # weights[k] belongs to the k-th pool n-gram, hence to column ngram_indexes[k]
        weight.scatter_(0, columns, torch.tensor(weights, dtype=torch.float32, device=ids.device))
    if mode == "IDF":
        result = (frequencies > 0) * weight
    elif mode == "TFIDF":
        result = frequencies * weight
    else:  # TF
        result = frequencies
    return result if ids.dim() == 2 else result[0]
