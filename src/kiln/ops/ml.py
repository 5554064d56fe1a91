"""Classic machine-learning operators of the ``ai.onnx.ml`` domain.

LabelEncoder, TreeEnsemble, ArrayFeatureExtractor and Binarizer. Numeric work is vectorized
torch; string keys and values are looked up on the host (string tensors are NumPy arrays).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from kiln.ops.registry import register

ML_DOMAIN = "ai.onnx.ml"


# --- LabelEncoder -----------------------------------------------------------------------------


def _key_positions(x, keys, device) -> torch.Tensor:
    """For each element of ``x``, the position of its key in ``keys`` (the last one when repeated,
    as ONNX asks), or -1 when absent."""
    if isinstance(x, np.ndarray):
        position = {key: i for i, key in enumerate(keys)}
        found = [position.get(item, -1) for item in x.reshape(-1)]
        return torch.tensor(found, dtype=torch.int64, device=device).reshape(x.shape)
    keys = torch.as_tensor(keys, device=x.device).to(x.dtype)
    matches = x.unsqueeze(-1) == keys
    if x.is_floating_point():  # a NaN key matches every NaN input
        matches |= x.isnan().unsqueeze(-1) & keys.isnan()
    index = torch.arange(keys.numel(), device=x.device)
    return torch.where(matches, index, -1).amax(-1)


def _values_at(positions: torch.Tensor, values, default):
    """``values[positions]``, with ``default`` where the position is -1."""
    if isinstance(values, np.ndarray):  # strings
        table = np.append(values, np.asarray(default, dtype=object))
        return table[positions.cpu().numpy()]  # -1 picks the appended default
    values = values.to(positions.device)
    default = torch.as_tensor(default, dtype=values.dtype, device=values.device).reshape(1)
    return torch.cat([values, default])[positions]


@register("LabelEncoder", since=1, domain=ML_DOMAIN)
def label_encoder_1(
    x: np.ndarray | torch.Tensor,
    *,
    classes_strings: Sequence[str] = (),
    default_int64: int = -1,
    default_string: str = "_Unused",
    _device,
):
    """Strings to their index in ``classes_strings``, or int64 indices back to those strings."""
    if isinstance(x, np.ndarray):
        positions = _key_positions(x, classes_strings, _device)
        return _values_at(positions, torch.arange(len(classes_strings)), default_int64)
    positions = torch.where((x >= 0) & (x < len(classes_strings)), x, -1)
    return _values_at(positions, np.asarray(classes_strings, dtype=object), default_string)


def _first_set(*candidates):
    """The one attribute, of several alternatives, that the node sets."""
    return next((c for c in candidates if c is not None), None)


@register("LabelEncoder", since=2, domain=ML_DOMAIN)
def label_encoder(
    x: np.ndarray | torch.Tensor,
    *,
    keys_int64s: Sequence[int] | None = None,
    keys_floats: Sequence[float] | None = None,
    keys_strings: Sequence[str] | None = None,
    keys_tensor: torch.Tensor | np.ndarray | None = None,
    values_int64s: Sequence[int] | None = None,
    values_floats: Sequence[float] | None = None,
    values_strings: Sequence[str] | None = None,
    values_tensor: torch.Tensor | np.ndarray | None = None,
    default_int64: int = -1,
    default_float: float = -0.0,
    default_string: str = "_Unused",
    default_tensor: torch.Tensor | np.ndarray | None = None,
    _device,
):
    """Maps each element through ``keys_*`` -> ``values_*``; unknown elements get ``default_*``.

    Covers versions 2 (list attributes) and 4 (adds ``*_tensor`` attributes, more types).
    """
    keys = _first_set(keys_int64s, keys_floats, keys_strings, keys_tensor)
    if isinstance(keys, torch.Tensor):
        keys = keys.reshape(-1)
    elif isinstance(keys, np.ndarray):  # a string tensor
        keys = keys.reshape(-1).tolist()
    positions = _key_positions(x, keys, _device)

    if values_strings is not None:
        values, default = np.asarray(values_strings, dtype=object), default_string
    elif values_int64s is not None:
        values, default = torch.tensor(values_int64s), default_int64
    elif values_floats is not None:
        values, default = torch.tensor(values_floats, dtype=torch.float32), default_float
    else:
        values = values_tensor.reshape(-1)
        default = default_tensor.reshape(-1) if default_tensor is not None else (
            "_Unused" if isinstance(values, np.ndarray)  # ONNX's defaults per value type
            else -0.0 if values.is_floating_point() else -1
        )
    return _values_at(positions, values, default)


# --- TreeEnsemble ------------------------------------------------------------------------------

_MEMBER = 6  # node modes 0-5 are LEQ, LT, GTE, GT, EQ, NEQ: the order of `outcomes` below
_AVERAGE, _SUM, _MIN, _MAX = range(4)
_NONE, _SOFTMAX, _LOGISTIC, _SOFTMAX_ZERO, _PROBIT = range(5)


def _set_members(modes: list[int], membership_values: torch.Tensor | None) -> torch.Tensor:
    """``[nodes, widest set]`` members of each BRANCH_MEMBER node's set, NaN-padded.

    ``membership_values`` lists the sets in node order, each one ended by a NaN.
    """
    sets: list[list[float]] = []
    if membership_values is not None:
        current: list[float] = []
        for value in membership_values.double().cpu().tolist():
            if np.isnan(value):
                sets.append(current)
                current = []
            else:
                current.append(value)
    members = iter(sets)
    rows = [next(members) if mode == _MEMBER else [] for mode in modes]
    width = max((len(r) for r in rows), default=0)
    padded = [r + [float("nan")] * (width - len(r)) for r in rows]
    return torch.tensor(padded, dtype=torch.float64).reshape(len(rows), width)


def _max_depth(roots, true_ids, false_ids, true_leafs, false_leafs) -> int:
    """The number of decisions on the longest root-to-leaf path of any tree."""
    depth, frontier = 0, list(roots)
    while frontier:
        depth += 1
        branches = [(true_ids[n], true_leafs[n]) for n in frontier]
        branches += [(false_ids[n], false_leafs[n]) for n in frontier]
        frontier = [child for child, is_leaf in branches if not is_leaf]
    return depth


def _aggregate(leaf_weights, leaf_targets, n_targets, aggregate_function, trees):
    """``[batch, trees]`` leaf weights and targets -> ``[batch, n_targets]`` scores."""
    scores = torch.zeros(leaf_weights.shape[0], n_targets, dtype=leaf_weights.dtype,
                         device=leaf_weights.device)
    if aggregate_function in (_SUM, _AVERAGE):
        scores.scatter_add_(1, leaf_targets, leaf_weights)
        return scores / trees if aggregate_function == _AVERAGE else scores
    # Targets no tree reaches stay 0, as in onnxruntime.
    reduce = "amin" if aggregate_function == _MIN else "amax"
    return scores.scatter_reduce(1, leaf_targets, leaf_weights, reduce, include_self=False)


def _post_transform(scores: torch.Tensor, post_transform: int) -> torch.Tensor:
    if post_transform == _SOFTMAX:
        return torch.softmax(scores, dim=1)
    if post_transform == _LOGISTIC:
        return torch.sigmoid(scores)
    if post_transform == _SOFTMAX_ZERO:  # softmax over the non-zero scores; zeros stay zero
        exp = torch.where(scores != 0, torch.exp(scores - scores.amax(1, keepdim=True)), 0.0)
        return exp / exp.sum(1, keepdim=True)
    if post_transform == _PROBIT:
        return torch.special.erfinv(2 * scores - 1) * math.sqrt(2)
    return scores


@register("TreeEnsemble", since=5, domain=ML_DOMAIN)
def tree_ensemble(
    x: torch.Tensor,
    *,
    tree_roots: Sequence[int],
    nodes_modes: torch.Tensor,
    nodes_featureids: Sequence[int],
    nodes_splits: torch.Tensor,
    nodes_truenodeids: Sequence[int],
    nodes_trueleafs: Sequence[int],
    nodes_falsenodeids: Sequence[int],
    nodes_falseleafs: Sequence[int],
    leaf_targetids: Sequence[int],
    leaf_weights: torch.Tensor,
    n_targets: int | None = None,
    aggregate_function: int = _SUM,
    post_transform: int = _NONE,
    membership_values: torch.Tensor | None = None,
    nodes_missing_value_tracks_true: Sequence[int] | None = None,
    nodes_hitrates: torch.Tensor | None = None,  # a performance hint only
) -> torch.Tensor:
    """Scores of ``x`` ``[batch, features]`` by an ensemble of decision trees.

    All samples walk all trees at once: each step moves every (sample, tree) pair that is still at
    an interior node to the chosen child. Comparisons run in float64 so that float32 features
    compare with double thresholds exactly as the ONNX reference does.
    """
    device = x.device

    def tensor(values, dtype=torch.int64):
        return torch.as_tensor(values, dtype=dtype, device=device)

    modes = nodes_modes.reshape(-1).long().cpu().tolist()
    mode, feature = tensor(modes), tensor(nodes_featureids)
    split = nodes_splits.reshape(-1).to(device, torch.float64)
    members = _set_members(modes, membership_values).to(device)
    true_id, false_id = tensor(nodes_truenodeids), tensor(nodes_falsenodeids)
    true_leaf = tensor(nodes_trueleafs, torch.bool)
    false_leaf = tensor(nodes_falseleafs, torch.bool)
    missing_true = tensor(nodes_missing_value_tracks_true or [0] * len(modes), torch.bool)

    roots = tensor(tree_roots)
    # A tree that is a single leaf: a root whose branches both name the same leaf.
    single_leaf = true_leaf[roots] & false_leaf[roots] & (true_id[roots] == false_id[roots])
    batch = x.shape[0]
    current = torch.where(single_leaf, true_id[roots], roots).expand(batch, -1)  # [batch, trees]
    at_leaf = single_leaf.expand(batch, -1)
    features = x.to(torch.float64)

    depth = _max_depth(tree_roots, nodes_truenodeids, nodes_falsenodeids,
                       nodes_trueleafs, nodes_falseleafs)
    for _ in range(depth):
        node = torch.where(at_leaf, 0, current)  # leaves index leaf_*: park them on node 0
        value = features.gather(1, feature[node])
        threshold = split[node]
        outcomes = torch.stack([
            value <= threshold, value < threshold, value >= threshold, value > threshold,
            value == threshold, value != threshold,
            (value.unsqueeze(-1) == members[node]).any(-1),
        ], dim=-1)
        go_true = outcomes.gather(-1, mode[node].unsqueeze(-1)).squeeze(-1)
        go_true |= missing_true[node] & value.isnan()
        current = torch.where(at_leaf, current, torch.where(go_true, true_id[node], false_id[node]))
        at_leaf = at_leaf | torch.where(go_true, true_leaf[node], false_leaf[node])

    weights = leaf_weights.reshape(-1).to(device, torch.float64)[current]
    targets = tensor(leaf_targetids)[current]
    if n_targets is None:
        n_targets = max(leaf_targetids) + 1
    scores = _aggregate(weights, targets, n_targets, aggregate_function, len(tree_roots))
    return _post_transform(scores, post_transform).to(x.dtype)


# --- ArrayFeatureExtractor, Binarizer ---------------------------------------------------------


@register("ArrayFeatureExtractor", since=1, domain=ML_DOMAIN)
def array_feature_extractor(x: torch.Tensor | np.ndarray, y: torch.Tensor):
    """Picks the elements at indices ``y`` (flattened) along the last axis of ``x``.

    A 1-D ``x`` gives a ``[1, k]`` result, as in onnxruntime.
    """
    if x.ndim == 1:
        x = x.reshape(1, -1)
    if isinstance(x, np.ndarray):
        return np.take(x, y.reshape(-1).cpu().numpy(), axis=-1)
    return x.index_select(-1, y.reshape(-1))


@register("Binarizer", since=1, domain=ML_DOMAIN)
def binarizer(x: torch.Tensor, *, threshold: float = 0.0) -> torch.Tensor:
    """1 where ``x > threshold``, else 0, in ``x``'s type."""
    return (x > threshold).to(x.dtype)
