"""Permutation structure of a network, derived from its ``torch.fx`` graph (ARCHITECTURE.md "Permutations").

Permuting a layer's output units together with every tensor that reads them leaves the function
unchanged (paper §2). :func:`permutation_spec` finds every set of units that must share one
permutation (a :class:`Group`) by running the traced model once and following **labels**: every
value carries an integer tensor of its own shape that names, at each position, the unit stored
there (``FIX`` for values that must not move, ``NONE`` for constants such as zero padding).

- A conv/linear layer (also grouped and depthwise convs, ``F.linear`` and attention projections)
  starts new units; its weight's input axis is tied to the units it reads.
- Pure data movement (view, reshape, permute, transpose, flatten, cat, stack, chunk, split, indexing,
  roll, flip, pad, expand, channel shuffle) is applied to the labels exactly as to the data, so any
  layout is followed: concatenated branches, interleaved channels, heads split out of a feature axis,
  class tokens and positional embeddings on the token axis.
- Element-wise ops (activations, residual additions, gates, layer scales, identity-in-eval functions
  such as dropout and stochastic depth) tie the units that meet at one position; a parameter
  element that meets a unit moves with it.
- Norms: BatchNorm/LayerNorm2d parameters follow their channel; LayerNorm and softmax over the
  permuted axis are symmetric in it; GroupNorm keeps each channel group.
- Units that must stay within a subset (a channel group of a grouped conv, one attention head, the
  part of an axis that a slice keeps) form a *preserved set*; groups are the atoms of these sets.
- A unit that reaches the network's input or output, or meets a fixed value along its own axis, is
  never permuted.

Attention heads (``nn.MultiheadAttention``) are permuted as wholes *and* inside each head: the q/k
units of all heads form one group and the v units another, each carrying :class:`Heads` blocks; a
valid permutation moves every block onto one block, with the same head order in both groups (q and
k together, v with the output projection's input). Hand-written attention and Swin's windowed
attention (whose relative-position bias is per head) keep every head in place and align inside it.
Anything else that touches a permuted axis raises
:class:`UnsupportedOperationError`, naming the operation and where it is: the spec never guesses.
"""
from __future__ import annotations

import bisect
import copy
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .activations import to_model
from .structure import BN_TYPES, WEIGHT_TYPES, check_layer_count, layer_depths, trace
from .models.norm import LayerNorm2d
from .validate import UnsupportedOperationError, attention_layout

__all__ = ["UnsupportedOperationError", "Entry", "Capture", "Heads", "Group", "PermutationSpec", "Permutation", "block_index",
           "active_groups", "head_order", "from_head_orders",
           "permutation_spec", "random_permutation", "identity_permutation", "apply_permutation", "permute_tensor"]


class Entry(NamedTuple):
    """One axis of one state-dict tensor acted on by a group.

    ``positions`` is ``None`` when the group's units fill the whole axis in order, unit ``i`` owning
    indices ``i*block .. (i+1)*block-1`` (``block > 1`` after a flatten). Otherwise it lists, unit
    after unit, the ``block`` indices each unit owns (a concatenated or interleaved axis, one head
    of a projection). ``rows = (axis, start, stop)`` restricts the entry to that slice of another
    axis (the weight of one channel group of a grouped conv)."""
    key: str
    axis: int
    block: int = 1
    positions: tuple[int, ...] | None = None
    rows: tuple[int, int, int] | None = None

    def index(self, length: int) -> torch.Tensor:
        """The indices of the axis (of ``length`` entries) the units own, unit after unit."""
        return torch.arange(length) if self.positions is None else torch.tensor(self.positions, dtype=torch.long)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """``t`` (restricted to ``rows``) with the entry's units on axis 0: ``[units, rest]``, unit ``i``'s
        row holding its ``block`` entries and every other axis."""
        if self.rows is not None:
            t = t.narrow(self.rows[0], self.rows[1], self.rows[2] - self.rows[1])
        if self.positions is not None:
            t = t.index_select(self.axis, self.index(t.shape[self.axis]).to(t.device))
        n = t.shape[self.axis] // self.block
        return t.movedim(self.axis, 0).reshape(n, -1)


class Capture(NamedTuple):
    """An activation of a group: fx node ``node`` whose ``axis`` holds the group's units (in blocks of
    ``block``; at ``positions``, unit after unit, when they do not fill the axis in order).

    ``proj = (weight key, bias key or None, start, stop)``: the units are not in the node's value but in
    its projection by rows ``start:stop`` of that weight (each model's own), as the q, k and v units of
    ``nn.MultiheadAttention``, whose projections run inside the module; ``positions`` then index the
    projected axis."""
    node: str
    axis: int
    block: int = 1
    positions: tuple[int, ...] | None = None
    proj: tuple[str, str | None, int, int] | None = None

    def take(self, t: torch.Tensor) -> torch.Tensor:
        """The captured units of activation ``t`` on its capture axis (other axes unchanged)."""
        if self.positions is None:
            return t
        return t.index_select(self.axis, torch.tensor(self.positions, dtype=torch.long, device=t.device))


class Heads(NamedTuple):
    """The attention heads inside a group: ``blocks[h]`` lists the group's unit indices that belong to
    head ``h`` (within-head order). Groups with the same ``link`` (the q/k and the v/output units of one
    attention) must move their heads in one common order: a permutation maps every block onto a whole
    block, ``blocks[h] ← blocks[σ(h)]`` in some order, with one ``σ`` for the linked groups."""
    link: int
    blocks: tuple[tuple[int, ...], ...]


@dataclass(frozen=True)
class Group:
    """Units that share one permutation.

    ``producers`` are the modules whose outputs are these units (several for a residual stream);
    ``producer_depths`` their 1-based layer index as the paper counts layers (conv/linear on the
    longest path, so shortcut convs get ``None``); ``depth`` is the deepest of them: the group
    permutes the outputs of layers up to ``depth`` only. ``captures`` are the alignment points for
    activation matching (see :mod:`vfnb.matching`). ``heads`` is set for the q/k and v units of an
    attention, whose heads move as wholes (:class:`Heads`).
    """
    index: int
    size: int
    depth: int
    producers: tuple[str, ...]
    producer_depths: tuple[int | None, ...]
    entries: tuple[Entry, ...]
    captures: tuple[Capture, ...]
    heads: Heads | None = None


@dataclass(frozen=True, eq=False)
class PermutationSpec:
    """The permutation groups of one architecture (see module docstring).

    ``num_layers`` counts the conv/linear layers on the longest input→output path, as the paper counts
    layers (VGG16 14, ResNet20 20); ``layers`` names them in order (depth ``i`` is ``layers[i-1]`` for
    chain-like nets); ``shapes`` are the state-dict shapes of the traced model.
    """
    groups: tuple[Group, ...]
    layers: tuple[str, ...]
    num_layers: int
    model_type: str
    shapes: dict[str, tuple[int, ...]] = field(repr=False)
    graph: fx.Graph = field(repr=False)
    attention: dict[str, tuple[int, bool]] = field(default_factory=dict, repr=False)

    def by_key(self) -> dict[str, list[tuple[int, Entry]]]:
        """``key -> [(group index, entry), ...]``: every permuted axis of every tensor."""
        out: dict[str, list[tuple[int, Entry]]] = {}
        for g in self.groups:
            for e in g.entries:
                out.setdefault(e.key, []).append((g.index, e))
        return out

    def group_of(self, key: str, axis: int = 0) -> Group | None:
        """The group that permutes ``axis`` of state-dict tensor ``key`` (None: not permuted; the first
        such group when several share the axis, e.g. after a concatenation)."""
        if key not in self.shapes:
            raise KeyError(f"{key!r} is not in the state dict of this {self.model_type}")
        return next((g for g in self.groups for e in g.entries if e.key == key and e.axis == axis), None)

    def check_in_order(self, method: str, groups: Sequence[int] | None = None) -> None:
        """Raise :class:`UnsupportedOperationError` if a group does not fill its axes in order (a
        concatenation, attention heads, a grouped conv): ``method`` maps whole axes linearly."""
        for g in (self.groups if groups is None else [self.groups[i] for i in groups]):
            odd = next((e for e in g.entries if e.positions is not None or e.rows is not None), None)
            if odd is not None:
                kind = "a grouped conv's channel group" if odd.rows is not None else \
                    "part of an axis (a concatenation, an attention head, a grouped conv)"
                raise UnsupportedOperationError(
                    f"{method} maps whole axes of a layer, but group {g.index} (from {', '.join(g.producers)}) "
                    f"holds {kind} in {odd.key!r} axis {odd.axis}. Use weight or activation matching, which "
                    "handle these groups")

    def head_links(self) -> dict[int, list[int]]:
        """``{link: [group indices]}``: the groups whose attention heads share one head order."""
        out: dict[int, list[int]] = {}
        for g in self.groups:
            if g.heads is not None:
                out.setdefault(g.heads.link, []).append(g.index)
        return out

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless ``model`` has this spec's architecture (type and shapes)."""
        name = _type_name(model)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
        if self.attention and attention_layout(model) != self.attention:
            raise ValueError(f"this permutation belongs to a {self.model_type} whose attention layers have (num_heads, "
                             f"batch_first) {self.attention}; this model's are {attention_layout(model)}")
        if name != self.model_type or shapes != self.shapes:
            diff = next((k for k in sorted(set(shapes) | set(self.shapes)) if shapes.get(k) != self.shapes.get(k)),
                        None)
            detail = (f"{diff!r} is {shapes.get(diff)} in the model but {self.shapes.get(diff)} in the spec"
                      if diff else f"model type {name}")
            raise ValueError(f"this permutation belongs to another model (a {self.model_type}); it does not "
                             f"fit this {name}: {detail}")

    def summary(self) -> str:
        lines = [f"PermutationSpec of {self.model_type}: {len(self.groups)} groups, {self.num_layers} layers"]
        for g in self.groups:
            prods = ", ".join(p if d is None else f"{p}@{d}" for p, d in zip(g.producers, g.producer_depths))
            heads = "" if g.heads is None else f"  ({len(g.heads.blocks)} heads, moved as wholes)"
            lines.append(f"  [{g.index:2d}] size {g.size:4d}  depth {g.depth:2d}  {len(g.entries):2d} tensors  "
                         f"from {prods}{heads}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"PermutationSpec({self.model_type}, groups={len(self.groups)}, "
                f"sizes={[g.size for g in self.groups]}, num_layers={self.num_layers})")


# ---------------------------------------------------------------------------------------------------
# Op tables: how each operation acts on labels.
_ACT_MODULES = (nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.SELU, nn.CELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh,
                nn.Hardswish, nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus, nn.PReLU)
_SAME_MODULES = (nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout,
                 nn.FeatureAlphaDropout, nn.Softmax, nn.LogSoftmax, nn.Softmax2d)
_POOL_MODULES = {1: (nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d),
                 2: (nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d),
                 0: (nn.Upsample, nn.UpsamplingNearest2d, nn.UpsamplingBilinear2d),
                 3: (nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d)}
_SHAPE_MODULES = (nn.Flatten, nn.Unflatten, nn.ChannelShuffle)
_EDGE_PAD_MODULES = (nn.ReflectionPad1d, nn.ReflectionPad2d, nn.ReflectionPad3d, nn.ReplicationPad1d,
                     nn.ReplicationPad2d, nn.ReplicationPad3d, nn.CircularPad1d, nn.CircularPad2d, nn.CircularPad3d)
_PAD_MODULES = (nn.ZeroPad1d, nn.ZeroPad2d, nn.ZeroPad3d, nn.ConstantPad1d, nn.ConstantPad2d, nn.ConstantPad3d)

_ACT_FUNCTIONS = {F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.selu, F.celu, F.gelu,
                  F.silu, torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardsigmoid, F.hardtanh,
                  F.mish, F.softplus}
_SAME_FUNCTIONS = {F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, F.alpha_dropout, torch.clone, operator.neg,
                   operator.pos, torch.neg, torch.abs, torch.exp, torch.log, torch.sqrt, torch.rsqrt, torch.square,
                   torch.erf, torch.sin, torch.cos, torch.clamp, torch.clip, torch.nan_to_num, F.softmax,
                   F.log_softmax, torch.softmax, torch.log_softmax, F.normalize, torch.detach}
_BINARY_FUNCTIONS = {operator.add, operator.sub, operator.mul, operator.truediv, operator.floordiv, operator.pow,
                     operator.iadd, operator.isub, operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul,
                     torch.div, torch.maximum, torch.minimum, torch.pow, torch.where, torch.lerp, torch.addcmul,
                     torch.addcdiv, operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
                     operator.and_, operator.or_, torch.masked_fill}
_SHAPE_FUNCTIONS = {operator.getitem, torch.flatten, torch.reshape, torch.permute, torch.transpose, torch.swapaxes,
                    torch.movedim, torch.cat, torch.concat, torch.stack, torch.chunk, torch.split, torch.unbind,
                    torch.squeeze, torch.unsqueeze, torch.narrow, torch.select, torch.roll, torch.flip,
                    torch.index_select, torch.tile, torch.t, F.channel_shuffle, torch.channel_shuffle}
_REDUCE_FUNCTIONS = {torch.mean, torch.sum, torch.amax, torch.amin, torch.std, torch.var, torch.logsumexp,
                     torch.prod, torch.norm}
_POOL_FUNCTIONS = {**dict.fromkeys([F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d], 1),
                   **dict.fromkeys([F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d], 2),
                   **dict.fromkeys([F.interpolate, F.upsample], 0),  # 0: every axis after the channels
                   **dict.fromkeys([F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d], 3)}
_MATMUL_FUNCTIONS = {torch.matmul, operator.matmul, torch.bmm}
#: functions that only move data, known by name (torchvision wraps them as fx leaves)
_SHAPE_NAMES = {"_patch_merging_pad", "_get_relative_position_bias"}

_ACT_METHODS = {"relu", "relu_", "sigmoid", "tanh", "gelu", "silu"}
_SAME_METHODS = {"clone", "detach", "float", "double", "half", "to", "type", "type_as", "neg", "abs",
                 "exp", "log", "sqrt", "rsqrt", "square", "clamp", "clamp_", "clip", "softmax", "log_softmax",
                 "sigmoid_", "requires_grad_", "cpu", "cuda"}
_BINARY_METHODS = {"add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_", "pow", "masked_fill", "masked_fill_",
                   "maximum", "minimum", "lerp", "eq", "ne", "lt", "le", "gt", "ge"}
_SHAPE_METHODS = {"contiguous", "flatten", "unflatten", "view", "reshape", "permute", "transpose", "swapaxes", "movedim", "t",
                  "expand", "repeat", "tile", "squeeze", "unsqueeze", "chunk", "split", "unbind", "narrow", "select",
                  "roll", "flip", "index_select", "view_as", "reshape_as", "expand_as", "__getitem__"}
_REDUCE_METHODS = {"mean", "sum", "amax", "amin", "std", "var", "logsumexp", "prod", "norm"}
_META_METHODS = {"size", "dim", "numel", "ndimension", "nelement", "stride"}

_NONE, _FIX = -1, 0
_LAYER_MODULES = WEIGHT_TYPES + (nn.MultiheadAttention,)
_CREATION = {"zeros_like", "ones_like", "full_like", "empty_like", "new_zeros", "new_ones", "new_full", "new_empty",
             "new_tensor", "zeros", "ones", "full", "empty", "arange", "tensor", "rand_like", "randn_like"}


def _makes_units(fn: Any) -> bool:
    """A function that creates units even from fixed inputs: ``F.linear`` and torchvision's (fx-wrapped)
    shifted-window attention."""
    return fn is F.linear or getattr(fn, "__name__", "").startswith("shifted_window_attention")


def _type_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _where(node: fx.Node) -> str:
    """Human-readable location of a node: fx name, op, target, enclosing module, source line."""
    target = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", str(node.target))
    stack = node.meta.get("nn_module_stack") or {}
    module = node.target if node.op == "call_module" else (next(reversed(stack.values()))[0] if stack else "")
    lines = (node.stack_trace or "").splitlines()
    src = next((lines[i].strip() + " | " + lines[i + 1].strip() for i in range(len(lines) - 2, -1, -1)
                if lines[i].strip().startswith("File") and "/torch/" not in lines[i]), "")
    return (f"fx node {node.name!r} ({node.op} {target}) in module {module or '<top level>'!r}"
            + (f" at {src}" if src else ""))


def _tensors(x: Any) -> list[torch.Tensor]:
    """Every tensor in a (nested) value."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, (list, tuple)):
        return [t for v in x for t in _tensors(v)]
    if isinstance(x, dict):
        return [t for v in x.values() for t in _tensors(v)]
    return []


def _fixed_like(x: Any) -> Any:
    """FIX labels shaped like every tensor of a (nested) value; None for non-tensors."""
    if isinstance(x, torch.Tensor):
        return torch.zeros(x.shape, dtype=torch.long)
    if isinstance(x, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in _tensors(x)):
        return type(x)(_fixed_like(v) for v in x) if not hasattr(x, "_fields") else tuple(_fixed_like(v) for v in x)
    return None


def _varying_axes(lab: torch.Tensor) -> list[int]:
    """Axes along which ``lab`` holds different labels where a unit is involved (NONE ignored)."""
    out = []
    for a in range(lab.dim()):
        if lab.shape[a] < 2:
            continue
        first = lab.narrow(a, 0, 1)
        if ((lab != first) & (lab >= 0) & (first >= 0) & ((lab > 0) | (first > 0))).any():
            out.append(a)
    return out


class _UnionFind:
    """Integer ids in a union-find; id 0 is FIX (a unit joined to it is never permuted)."""

    def __init__(self) -> None:
        self.parent = [0]

    def new(self, n: int) -> int:
        start = len(self.parent)
        self.parent.extend(range(start, start + n))
        return start

    def find(self, a: int) -> int:
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller id wins, so FIX absorbs
            self.parent[max(ra, rb)] = min(ra, rb)

    def union_arrays(self, a: torch.Tensor, b: torch.Tensor) -> None:
        """Join ``a[i]`` with ``b[i]`` wherever both are ≥ 0 (NONE entries are skipped)."""
        a, b = a.reshape(-1), b.reshape(-1)
        keep = (a >= 0) & (b >= 0) & (a != b)
        if not keep.any():
            return
        pairs = torch.unique(a[keep] * (1 << 32) + b[keep])
        for code in pairs.tolist():
            self.union(code >> 32, code & 0xFFFFFFFF)

    def roots(self) -> np.ndarray:
        parent = np.asarray(self.parent, dtype=np.int64)
        while True:
            nxt = parent[parent]
            if np.array_equal(nxt, parent):
                return parent
            parent = nxt


class _Origin(NamedTuple):
    """New units made by one layer (one channel group of a grouped conv; q, k, v of an attention)."""
    start: int
    size: int
    node: fx.Node
    module: str


class _Analysis(fx.Interpreter):
    """Runs the traced model once, carrying a label tensor beside every value (module docstring)."""

    def __init__(self, gm: fx.GraphModule, state: dict[str, torch.Tensor], alias: dict[str, str]) -> None:
        super().__init__(gm)
        self.gm = gm
        self.uf = _UnionFind()
        self.state, self.alias = state, alias
        self.labels: dict[fx.Node, Any] = {}
        self.origins: list[_Origin] = []
        self.kinds: list[tuple[int, str]] = []                        # (range start, kind) for every id range
        self.axis_ranges: dict[tuple[str, int, tuple | None], tuple[int, int]] = {}
        self.param_ranges: dict[str, tuple[int, tuple[int, ...]]] = {}
        self.preserved: list[torch.Tensor] = []
        self.head_sets: list[tuple[torch.Tensor, torch.Tensor]] = []  # (q ids [H, d], v ids [H, d]) per attention
        self.roles: dict[tuple[str, int, tuple | None], torch.Tensor] = {}
        self.projections: list[tuple] = []                            # attention q/k/v: (node, axis, labels, proj)
        self.acts: list[tuple[str, int, torch.Tensor]] = []           # nonlinearity outputs: (node, axis, labels)
        self.inputs: list[tuple[str, int, torch.Tensor]] = []         # values read by layers
        self.outputs: list[tuple[str, int, torch.Tensor]] = []        # layer outputs (the last resort)
        self.layer_nodes: list[fx.Node] = []
        self.current: fx.Node | None = None
        self.uses = {n: len(n.users) for n in gm.graph.nodes}

    # ids ------------------------------------------------------------------------------------------
    def new(self, n: int, kind: str) -> torch.Tensor:
        start = self.uf.new(n)
        self.kinds.append((start, kind))
        return torch.arange(start, start + n)

    def kind_of(self, i: int) -> str:
        return self.kinds[bisect.bisect_right(self.kinds, (i, "\x7f")) - 1][1]

    def key(self, name: str) -> str:
        return self.alias.get(name, name)

    def axis_ids(self, key: str, axis: int, n: int, rows: tuple[int, int, int] | None = None) -> torch.Tensor:
        """Ids of the ``n`` indices of ``axis`` of state tensor ``key`` (the same ids on every use)."""
        k = (self.key(key), axis, rows)
        if k not in self.axis_ranges:
            self.axis_ranges[k] = (int(self.new(n, "axis")[0]), n)
        start, m = self.axis_ranges[k]
        return torch.arange(start, start + m)

    def tie(self, labels: torch.Tensor, key: str, axis: int, n: int, rows: tuple[int, int, int] | None = None) -> None:
        """Tie the indices of ``axis`` of weight ``key`` to the units ``labels`` they read or write; the
        first labels seen are kept as each index's *role* (which unit of a tied class it holds)."""
        ids = self.axis_ids(key, axis, n, rows)
        self.pair(ids, labels)
        self.roles.setdefault((self.key(key), axis, rows), labels.clone())

    def param_ids(self, key: str) -> torch.Tensor:
        """Ids of every element of state tensor ``key``, shaped like it."""
        key = self.key(key)
        if key not in self.param_ranges:
            shape = tuple(self.state[key].shape)
            self.param_ranges[key] = (int(self.new(max(1, math.prod(shape)), "param")[0]), shape)
        start, shape = self.param_ranges[key]
        return torch.arange(start, start + math.prod(shape)).view(shape)

    def origin(self, node: fx.Node, n: int, module: str) -> torch.Tensor:
        ids = self.new(n, "unit")
        self.origins.append(_Origin(int(ids[0]), n, node, module))
        return ids

    def pair(self, a: torch.Tensor, b: torch.Tensor) -> None:
        self.uf.union_arrays(a, b)

    def fix(self, lab: torch.Tensor) -> None:
        lab = lab[lab > 0]
        if lab.numel():
            self.pair(lab, torch.zeros_like(lab))

    def preserve(self, lab: torch.Tensor) -> None:
        units = torch.unique(lab[lab > 0])
        if units.numel():
            self.preserved.append(units)

    def fail(self, why: str) -> None:
        raise UnsupportedOperationError(f"{_where(self.current)} {why}; its units cannot be permuted consistently")

    # running --------------------------------------------------------------------------------------
    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        value = super().run_node(n)
        if isinstance(value, torch.Tensor):  # shapes for later passes (PFM's mapped stems)
            n.meta["vfnb_shape"] = tuple(value.shape)
        self.labels[n] = self.label(n, value) if _tensors(value) or n.op == "output" else None
        for i in n.all_input_nodes:
            self.uses[i] -= 1
            if self.uses[i] == 0:
                self.labels.pop(i, None)
        return value

    def arg_labels(self, n: fx.Node) -> tuple[tuple, dict]:
        return fx.node.map_arg((n.args, n.kwargs), lambda m: self.labels.get(m))

    def label(self, n: fx.Node, value: Any) -> Any:
        if n.op == "placeholder":
            return _fixed_like(value)
        if n.op == "get_attr":
            key = self.key(str(n.target))
            if key in self.state and isinstance(value, torch.Tensor):
                return self.param_ids(key)
            return self.constant(value)
        if n.op == "output":
            for lab in _tensors(self.arg_labels(n)[0]):
                self.fix(lab)
            return None
        args, kwargs = self.arg_labels(n)
        real_args, real_kwargs = self.fetch_args_kwargs_from_env(n)
        inputs = _tensors((args, kwargs))
        if n.op == "call_module" and isinstance(self.gm.get_submodule(n.target), _LAYER_MODULES):
            return self.on_module(n, self.gm.get_submodule(n.target), args, kwargs, real_args, value)
        if n.op == "call_function" and _makes_units(n.target):
            return self.on_function(n, n.target, args, kwargs, real_args, real_kwargs, value)
        if getattr(n.target, "__name__", n.target) in _CREATION:
            return self.constant(value)
        if not any((t > 0).any() for t in inputs):
            if n.op == "call_module":  # its own parameters read only fixed values: they stay fixed
                self.fix_module(str(n.target))
            return self.constant(value) if not inputs else _fixed_like(value)
        if n.op == "call_module":
            return self.on_module(n, self.gm.get_submodule(n.target), args, kwargs, real_args, value)
        if n.op == "call_method":
            return self.on_method(n, str(n.target), args, kwargs, real_args, real_kwargs, value)
        return self.on_function(n, n.target, args, kwargs, real_args, real_kwargs, value)

    def finish(self) -> None:
        """A weight read both as a layer weight and elsewhere as a fixed value (an embedding tied to an
        output layer) keeps its axes fixed."""
        for (key, axis, rows), (start, n) in self.axis_ranges.items():
            if key in self.param_ranges:
                ids = self.param_ids(key).reshape(-1).tolist()
                if any(self.uf.find(i) == 0 for i in ids):
                    self.fix(torch.arange(start, start + n))

    def fix_module(self, name: str) -> None:
        """Every state tensor of module ``name`` stays where it is (an opaque module, or one that reads
        only fixed values: an input embedding whose weight is tied to an output layer)."""
        for key in self.state:
            if key.startswith(name + ".") and self.state[key].is_floating_point():
                self.fix(self.param_ids(key))

    def constant(self, value: Any) -> Any:
        """Labels of a value computed without the input: NONE where it is one constant (zeros, padding)."""
        if isinstance(value, torch.Tensor):
            flat = value.detach().reshape(-1)
            same = flat.numel() <= 1 or bool((flat == flat[0]).all())
            return torch.full(value.shape, _NONE if same else _FIX, dtype=torch.long)
        return _fixed_like(value)

    def unknown(self, n: fx.Node, inputs: list[torch.Tensor], value: Any, what: str) -> Any:
        ids = torch.unique(torch.cat([t[t > 0] for t in inputs])) if inputs else torch.empty(0, dtype=torch.long)
        if any(self.kind_of(i) != "param" for i in ids.tolist()):
            raise UnsupportedOperationError(
                f"cannot tell how {_where(n)} acts on permuted units ({what}). vfnb follows layers, norms, "
                "element-wise ops, data movement and attention (the book page "
                "'Which models vfnb can align'); rewrite this step with those, or keep its input unpermuted")
        self.fix(ids)  # parameters read by an operation vfnb does not model stay where they are
        return _fixed_like(value)

    # dispatch -------------------------------------------------------------------------------------
    def on_module(self, n, mod, args, kwargs, real_args, value):
        x = args[0] if args else None
        if isinstance(mod, WEIGHT_TYPES):
            return self.layer(n, mod, str(n.target), x, value)
        if isinstance(mod, _ACT_MODULES):
            if isinstance(mod, nn.PReLU) and mod.weight.numel() > 1:
                return self.binary([x, self.param_ids(f"{n.target}.weight").view(-1, *[1] * (x.dim() - 2))], value)
            self.record(self.acts, n, x)
            return x
        if isinstance(mod, _SAME_MODULES):
            return x
        for k, types in _POOL_MODULES.items():
            if isinstance(mod, types):
                return self.mix(x, list(range(x.dim() - (k or x.dim() - 2), x.dim())), value,
                                "pools over the permuted axis")
        if isinstance(mod, BN_TYPES + (LayerNorm2d,)):
            return self.channel_norm(n, x, str(n.target))
        if isinstance(mod, nn.GroupNorm):
            chan = self.channels(x, 1)
            m = mod.num_channels // mod.num_groups
            for k in range(mod.num_groups):
                self.preserve(chan[k * m:(k + 1) * m])
            return self.channel_norm(n, x, str(n.target))
        if isinstance(mod, nn.LayerNorm):
            return self.trailing_norm(x, [self.param_ids(f"{n.target}.{p}") for p in ("weight", "bias")
                                          if isinstance(getattr(mod, p, None), torch.Tensor)])
        if isinstance(mod, _PAD_MODULES):  # constant padding: the new positions hold no unit
            return F.pad(x, mod.padding, value=_NONE)
        if isinstance(mod, _EDGE_PAD_MODULES):  # copies along the padded (spatial) axes only
            return self.mix(x, list(range(x.dim() - len(mod.padding) // 2, x.dim())), value,
                            "pads the permuted axis")
        if isinstance(mod, _SHAPE_MODULES):
            return self.shape(lambda *a: mod(*a), args, {}, value)
        if isinstance(mod, nn.MultiheadAttention):
            return self.attention(n, mod, args, kwargs, value)
        self.fix_module(str(n.target))
        return self.unknown(n, _tensors(args), value, f"module type {type(mod).__name__}")

    def on_method(self, n, name, args, kwargs, real_args, real_kwargs, value):
        x = args[0]
        if name in _META_METHODS:
            return None
        if name in _ACT_METHODS:
            self.record(self.acts, n, x)
            return x
        if name in ("clamp", "clamp_", "clip", "clip_") and len(_tensors((args[1:], kwargs))) > 0:
            return self.binary([x, *_tensors((args[1:], kwargs))], value)
        if name in _SAME_METHODS:
            return x if isinstance(value, torch.Tensor) and x.shape == value.shape else self.unknown(
                n, [x], value, name)
        if name in _BINARY_METHODS:
            return self.binary(list(args) + list(kwargs.values()), value)
        if name in _SHAPE_METHODS:
            call = "reshape" if name == "view" else name  # labels may be non-contiguous views
            return self.shape(lambda t, *a, **k: getattr(t, call)(*a, **k), args, kwargs, value,
                              reals=(real_args, real_kwargs))
        if name in _REDUCE_METHODS:
            return self.reduce(n, x, real_args, real_kwargs, value)
        if name in ("matmul", "bmm", "__matmul__"):
            return self.matmul(args[0], args[1], value)
        if name in ("max", "min") and len(real_args) == 1 and not real_kwargs:
            return self.reduce(n, x, real_args, real_kwargs, value)
        return self.unknown(n, _tensors((args, kwargs)), value, f"method {name}")

    def on_function(self, n, fn, args, kwargs, real_args, real_kwargs, value):
        name = getattr(fn, "__name__", str(fn))
        x = args[0] if args else None
        if fn in _ACT_FUNCTIONS:
            self.record(self.acts, n, x)
            return x
        if fn in (torch.clamp, torch.clip) and len(_tensors((args[1:], kwargs))) > 0:
            return self.binary([x, *_tensors((args[1:], kwargs))], value)
        if fn in _SAME_FUNCTIONS or name == "stochastic_depth":
            training = real_kwargs.get("training", real_args[3] if len(real_args) > 3 else True)
            if name == "stochastic_depth" and training and real_args[1] > 0:
                self.fail("is stochastic depth in training mode (put the model in eval mode)")
            return x
        if fn in _BINARY_FUNCTIONS:
            return self.binary(list(args) + list(kwargs.values()), value)
        if fn in _SHAPE_FUNCTIONS or name in _SHAPE_NAMES:
            return self.shape(fn, args, kwargs, value, reals=(real_args, real_kwargs))
        if fn is F.pad:
            return self.pad(n, args, real_args, real_kwargs, value)
        if fn in (torch.max, torch.min) and len(real_args) > 1 and isinstance(real_args[1], torch.Tensor):
            return self.binary(list(args[:2]), value)
        if fn is getattr and real_args[1] in ("T", "mT", "data"):
            return getattr(x, real_args[1]) if real_args[1] != "data" else x
        if fn in _REDUCE_FUNCTIONS or fn in (torch.max, torch.min):
            return self.reduce(n, x, real_args, real_kwargs, value)
        if fn in _POOL_FUNCTIONS:
            k = _POOL_FUNCTIONS[fn] or x.dim() - 2
            return self.mix(x, list(range(x.dim() - k, x.dim())), value, "pools over the permuted axis")
        if fn in _MATMUL_FUNCTIONS:
            return self.matmul(args[0], args[1], value)
        if fn is torch.einsum:
            return self.einsum(real_args[0], [a for a in args[1:]] if not isinstance(args[1], (list, tuple))
                               else list(args[1]), value)
        if fn is F.layer_norm:
            params = [p for p in (args[2:4] if len(args) > 2 else ()) if isinstance(p, torch.Tensor)]
            params += [kwargs[k] for k in ("weight", "bias") if isinstance(kwargs.get(k), torch.Tensor)]
            return self.trailing_norm(x, params)
        if fn is F.linear:
            weight = n.args[1] if len(n.args) > 1 else n.kwargs.get("weight")
            bias = n.args[2] if len(n.args) > 2 else n.kwargs.get("bias")
            if not isinstance(weight, fx.Node) or weight.op != "get_attr" or (
                    bias is not None and (not isinstance(bias, fx.Node) or bias.op != "get_attr")):
                self.fail("is F.linear with a computed weight")
            return self.linear(n, str(weight.target), None if bias is None else str(bias.target), x, value)
        if fn is F.scaled_dot_product_attention:
            q, k, v = args[:3]
            logits = self.matmul(q, k.transpose(-2, -1), None)
            return self.matmul(logits, v, value)
        if name.startswith("shifted_window_attention"):
            return self.window_attention(n, args, real_args, real_kwargs, value)
        return self.unknown(n, _tensors((args, kwargs)), value, f"function {name}")

    # rules ----------------------------------------------------------------------------------------
    def record(self, where: list, n: fx.Node, lab: torch.Tensor | None, axis: int | None = None) -> None:
        """Remember the units along one axis of ``n``'s value (activation-matching captures)."""
        if not isinstance(lab, torch.Tensor) or not (lab > 0).any():
            return
        axes = _varying_axes(lab) if axis is None else [axis % lab.dim()]
        if len(axes) != 1:
            return
        a = axes[0]
        moved = lab.movedim(a, 0).reshape(lab.shape[a], -1)
        hi = moved.amax(1)
        if ((moved != hi[:, None]) & (moved >= 0)).any():
            return
        where.append((n.name, a, hi.clone()))

    def channels(self, lab: torch.Tensor, axis: int) -> torch.Tensor:
        """One label per index of ``axis``: the unit all its positions hold (NONE if none). Different
        labels at one index are tied together (a weight column reads them all)."""
        moved = lab.movedim(axis, 0).reshape(lab.shape[axis], -1)
        hi = moved.amax(1)
        mixed = (moved != hi[:, None]) & (moved >= 0)
        if mixed.any():
            self.pair(moved[mixed], hi[:, None].expand_as(moved)[mixed])
        return hi

    def layer(self, n: fx.Node, mod: nn.Module, name: str, x: torch.Tensor, value: torch.Tensor) -> torch.Tensor:
        """conv/linear: the input units tie to the weight's input axis; the outputs are new units."""
        if isinstance(mod, nn.Linear):
            return self.linear(n, f"{name}.weight", f"{name}.bias" if mod.bias is not None else None, x, value,
                               module=name)
        if f"{name}.weight" not in self.state:
            self.fail("has a parametrized weight (weight_norm, spectral_norm, ...); remove the parametrization "
                      "(torch.nn.utils.parametrize.remove_parametrizations) before aligning")
        if x.dim() != {nn.Conv1d: 3, nn.Conv2d: 4, nn.Conv3d: 5}.get(type(mod), x.dim()):
            self.fail("is a convolution on an unbatched input (add the batch axis)")
        self.record(self.inputs, n.args[0], x, 1)
        self.layer_nodes.append(n)
        chan = self.channels(x, 1)
        cin, cout, groups = chan.numel(), mod.out_channels, mod.groups
        wkey, bkey = f"{name}.weight", (f"{name}.bias" if mod.bias is not None else None)
        if groups == 1:
            self.tie(chan, wkey, 1, cin)
            out = self.origin(n, cout, name)
        elif groups == cin:  # depthwise: output channel c·m + r reads input channel c only
            out = chan.repeat_interleave(cout // cin).clamp_min(_FIX)
        else:  # grouped: each channel group keeps its units; new units per group
            m, k = cin // groups, cout // groups
            outs = []
            for j in range(groups):
                seg = chan[j * m:(j + 1) * m]
                self.preserve(seg)
                self.tie(seg, wkey, 1, m, rows=(0, j * k, (j + 1) * k))
                outs.append(self.origin(n, k, name))
            out = torch.cat(outs)
        self.tie(out, wkey, 0, cout)
        if bkey is not None:
            self.pair(self.param_ids(bkey), out)
        if groups == 1 or groups != cin:
            self.outputs.append((n.name, 1, out.clone()))
        shape = [1] * value.dim()
        shape[1] = cout
        return out.view(shape).expand(value.shape).clone()

    def linear(self, n: fx.Node, wkey: str, bkey: str | None, x: torch.Tensor, value: torch.Tensor,
               module: str | None = None) -> torch.Tensor:
        if self.key(wkey) not in self.state:
            self.fail("has a parametrized weight (weight_norm, spectral_norm, ...); remove the parametrization "
                      "(torch.nn.utils.parametrize.remove_parametrizations) before aligning")
        self.record(self.inputs, n.args[0], x, -1)
        self.layer_nodes.append(n)
        chan = self.channels(x, x.dim() - 1)
        cout = value.shape[-1]
        self.tie(chan, wkey, 1, chan.numel())
        out = self.origin(n, cout, module or wkey.rsplit(".", 1)[0])
        self.tie(out, wkey, 0, cout)
        if bkey is not None:
            self.pair(self.param_ids(bkey), out)
        self.outputs.append((n.name, value.dim() - 1, out.clone()))
        return out.expand(value.shape).clone()

    def channel_norm(self, n: fx.Node, x: torch.Tensor, name: str) -> torch.Tensor:
        """BatchNorm / LayerNorm2d / GroupNorm: one parameter (and running statistic) per channel."""
        chan = self.channels(x, 1)
        mod = self.gm.get_submodule(name)
        for p in ("weight", "bias", "running_mean", "running_var"):
            if isinstance(getattr(mod, p, None), torch.Tensor) and f"{name}.{p}" in self.state:
                self.pair(self.param_ids(f"{name}.{p}"), chan)
        return x

    def trailing_norm(self, x: torch.Tensor, params: list[torch.Tensor]) -> torch.Tensor:
        """LayerNorm over the trailing axes: symmetric in them; the affine parameters sit on them."""
        for p in params:
            self.pair(p.expand(x.shape), x)
        return x

    def binary(self, labs: list, value: torch.Tensor) -> torch.Tensor:
        """Element-wise op: what meets at one position is tied (a fixed value fixes the units it meets).
        An operand broadcast along another's unit axes (a scalar gain, a spatial gate, a positional
        bias over tokens) is the same for every unit: it ties nothing, must itself stay fixed, and the
        result carries the other operand's units. Units of two operands on different axes (an outer
        product) are refused."""
        shape = value.shape
        nd = len(shape)
        ops = []
        for lab in labs:
            if isinstance(lab, torch.Tensor):
                full = (1,) * (nd - lab.dim()) + tuple(lab.shape)
                b = torch.broadcast_to(lab, shape)
                ops.append((full, b, set(_varying_axes(b))))
        under = [any(vi and all(fj[a] == 1 for a in vi) for k, (_, _, vi) in enumerate(ops) if k != j)
                 for j, (fj, _, _) in enumerate(ops)]
        for j, (fj, bj, vj) in enumerate(ops):
            if under[j]:
                ids = torch.unique(bj[bj > 0])
                if vj and any(self.kind_of(i) == "unit" for i in ids.tolist()):
                    self.fail("combines permuted units that lie on different axes (an outer product)")
                self.fix(ids)
        kept = [b for (_, b, _), u in zip(ops, under) if not u] or [ops[0][1]]
        for i, bi in enumerate(kept):
            for bj in kept[i + 1:]:
                self.pair(bi, bj)
        out = torch.stack(kept).amax(0) if len(kept) > 1 else kept[0].clone()
        return self.canon(out) if any((b == _FIX).any() for b in kept) else out

    def canon(self, lab: torch.Tensor) -> torch.Tensor:
        """``lab`` with every id that has been fixed replaced by FIX."""
        ids = torch.unique(lab[lab > 0])
        fixed = [i for i in ids.tolist() if self.uf.find(i) == 0]
        return torch.where(torch.isin(lab, torch.tensor(fixed, dtype=torch.long)), _FIX, lab) if fixed else lab

    def shape(self, fn, args, kwargs, value, reals=None) -> Any:
        """Data movement: applied to the labels exactly as to the data (the moved value is the first
        argument; sizes, indices and other tensors come from the real run)."""
        if reals is not None:
            real_args, real_kwargs = reals
            largs, lk = [args[0], *real_args[1:]], dict(real_kwargs)
        else:
            largs, lk = list(args), dict(kwargs)
        if isinstance(largs[0], (list, tuple)):
            largs[0] = [t if isinstance(t, torch.Tensor) else torch.full((), _NONE) for t in largs[0]]
        try:
            out = fn(*largs, **lk)
        except Exception as err:  # noqa: BLE001
            self.fail(f"moves data in a way vfnb could not replay on its labels ({type(err).__name__}: {err})")
        src = _tensors(largs[0])
        units_in = torch.unique(torch.cat([t[t > 0].reshape(-1) for t in src])) if src else None
        if units_in is not None and units_in.numel():
            for piece in _tensors(out):
                kept = torch.unique(piece[piece > 0])
                if 0 < kept.numel() < units_in.numel():
                    self.preserved.append(kept)  # a slice keeps its units to itself
        return out

    def pad(self, n, args, real_args, real_kwargs, value):
        x = args[0]
        pad = real_args[1] if len(real_args) > 1 else real_kwargs["pad"]
        mode = real_args[2] if len(real_args) > 2 else real_kwargs.get("mode", "constant")
        if mode == "constant":
            return F.pad(x, pad, value=_NONE)
        axes = [x.dim() - 1 - i // 2 for i in range(0, len(pad), 2) if pad[i] or pad[i + 1]]
        return self.mix(x, axes, value, f"pads the permuted axis in {mode} mode")

    def mix(self, x: torch.Tensor, axes: list[int], value: torch.Tensor, why: str) -> torch.Tensor:
        """An op that mixes positions along ``axes`` (pooling, upsampling): the units must not vary there."""
        axes = [a % x.dim() for a in axes]
        if set(_varying_axes(x)) & set(axes):
            self.fail(why)
        hi = x.amax(axes, keepdim=True) if axes else x
        results = _tensors(value)  # (values, indices) of a pooling with return_indices
        return (tuple(torch.broadcast_to(hi, r.shape).clone() for r in results) if len(results) > 1
                else torch.broadcast_to(hi, results[0].shape).clone())

    def reduce(self, n, x, real_args, real_kwargs, value):
        """Reductions: over the units' axis they are symmetric (the result is fixed); elsewhere the
        units pass through. An argmax over the units' axis is refused."""
        name = getattr(n.target, "__name__", n.target)
        pos = 2 if name == "norm" else 1
        dim = real_args[pos] if len(real_args) > pos else real_kwargs.get("dim", real_kwargs.get("axis"))
        keep = real_kwargs.get("keepdim", False)
        if len(real_args) > pos + 1 and isinstance(real_args[pos + 1], bool) and name not in ("std", "var"):
            keep = real_args[pos + 1]
        if isinstance(dim, torch.Tensor):
            self.fail("reduces with a tensor argument")
        dims = list(range(x.dim())) if dim is None else sorted({int(d) % x.dim() for d in
                                                                (dim if isinstance(dim, (list, tuple)) else [dim])})
        varying = set(_varying_axes(x))
        over_units = bool(varying & set(dims))
        if name in ("max", "min") and dim is not None and over_units:
            self.fail("takes an argmax/argmin over the permuted axis")
        lab = x.amax(dims, keepdim=keep) if dims else x
        if over_units and varying - set(dims):
            # units folded onto a kept axis (maxout, a sum over a split channel axis, a mean over
            # heads): what is reduced into one output position moves together
            self.pair(x, x.amax(dims, keepdim=True).expand_as(x))
        elif over_units:
            lab = torch.zeros_like(lab)
        results = _tensors(value)
        return (tuple(torch.broadcast_to(lab, r.shape).clone() for r in results) if len(results) > 1
                else torch.broadcast_to(lab, results[0].shape).clone())

    def matmul(self, a: torch.Tensor, b: torch.Tensor, value: torch.Tensor | None) -> torch.Tensor:
        """``a @ b``: units on the contracted axis of both are tied; units on ``a``'s rows or ``b``'s
        columns pass to the result; units along batch axes stay in their batch slice."""
        if a.dim() < 2 or b.dim() < 2:
            if (a > 0).any() or (b > 0).any():
                self.fail("is a matrix-vector product on permuted units")
        batch = torch.broadcast_shapes(a.shape[:-2], b.shape[:-2])
        A = torch.broadcast_to(a, (*batch, *a.shape[-2:]))
        B = torch.broadcast_to(b, (*batch, *b.shape[-2:]))
        va, vb = set(_varying_axes(A)), set(_varying_axes(B))
        nb = len(batch)
        a_rows, a_k = nb in va, nb + 1 in va
        b_k, b_cols = nb in vb, nb + 1 in vb
        if (a_rows and a_k) or (b_k and b_cols):
            self.fail("multiplies a matrix whose rows and columns both carry permuted units")
        if a_k or b_k:
            ka = A.amax(nb, keepdim=False)  # [*batch, k]
            kb = B.amax(nb + 1, keepdim=False)
            self.pair(ka, kb)  # q·k: the two sides' units move together (a fixed side fixes them)
        for lab, varying in ((A, va), (B, vb)):
            if any(d < nb for d in varying):
                flat = lab.reshape(-1, *lab.shape[nb:]) if nb else lab[None]
                for s in flat:
                    self.preserve(s)
        rows = A.amax(nb + 1, keepdim=True) if a_rows else None
        cols = B.amax(nb, keepdim=True) if b_cols else None
        if rows is not None and cols is not None and (rows > 0).any() and (cols > 0).any():
            self.fail("forms an outer product of two sets of permuted units")
        shape = (*batch, a.shape[-2], b.shape[-1])
        lab = rows if rows is not None else cols if cols is not None else torch.zeros((), dtype=torch.long)
        out = torch.broadcast_to(lab, shape).clone()
        return out if value is None else out.reshape(value.shape)

    def einsum(self, equation: str, labs: list[torch.Tensor], value: torch.Tensor) -> torch.Tensor:
        """Two-operand ``einsum`` as a batched matmul: indices in both operands and the result are batch
        axes, indices in both operands only are contracted, the rest are rows and columns."""
        eq = equation.replace(" ", "")
        if "->" not in eq or "." in eq or len(labs) != 2:
            self.fail("is an einsum vfnb cannot map to a matrix product (two operands and an explicit '->' "
                      "are needed)")
        ins, out = eq.split("->")
        sa, sb = ins.split(",")
        if len(set(sa)) != len(sa) or len(set(sb)) != len(sb) or set(out) - set(sa) - set(sb):
            self.fail("is an einsum with repeated or new indices")
        a, b = labs
        batch = [c for c in out if c in sa and c in sb]
        con = [c for c in sa if c in sb and c not in out]
        fa = [c for c in sa if c not in batch and c not in con]
        fb = [c for c in sb if c not in batch and c not in con]
        if set(fa) - set(out) or set(fb) - set(out):
            self.fail("is an einsum that sums over an index of one operand only")
        dims = {c: s for c, s in zip(sa, a.shape)} | {c: s for c, s in zip(sb, b.shape)}
        A = a.permute([sa.index(c) for c in batch + fa + con]).reshape(
            *[dims[c] for c in batch], math.prod(dims[c] for c in fa), math.prod(dims[c] for c in con))
        B = b.permute([sb.index(c) for c in batch + con + fb]).reshape(
            *[dims[c] for c in batch], math.prod(dims[c] for c in con), math.prod(dims[c] for c in fb))
        lab = self.matmul(A, B, None).reshape(*[dims[c] for c in batch + fa + fb])
        order = batch + fa + fb
        return lab.permute([order.index(c) for c in out]).reshape(value.shape).clone()

    def heads(self, n: fx.Node, name: str, heads: int, embed: int, chan: torch.Tensor, in_w: str,
              in_b: str | None, out_w: str, out_b: str | None, value_shape: torch.Size,
              wholes: bool = True, source: tuple[str, int] | None = None) -> torch.Tensor:
        """Multi-head attention with one packed ``[3E, E]`` input projection: q and k units are tied
        pairwise (their dot products must not change), v units with the output projection's input.
        ``wholes``: heads may move as wholes (recorded in ``head_sets``; :func:`_build_spec` keeps them
        in place if the groups do not come out as whole heads); otherwise every unit stays in its head.
        ``source = (node, axis)``: the one input that q, k and v are projected from (self-attention); the
        q/k and v units are then captured there, through the projection (:class:`Capture` ``proj``).
        Returns the labels of the output projection's units."""
        self.layer_nodes.append(n)
        self.tie(chan, in_w, 1, chan.numel())
        q, k, v = self.origin(n, embed, name), self.origin(n, embed, name), self.origin(n, embed, name)
        self.pair(q, k)
        d = embed // heads
        if wholes:
            self.head_sets.append((q.view(heads, d), v.view(heads, d)))
        else:
            for h in range(heads):
                self.preserve(q[h * d:(h + 1) * d])
                self.preserve(v[h * d:(h + 1) * d])
        qkv = torch.cat([q, k, v])
        self.tie(qkv, in_w, 0, 3 * embed)
        if source is not None:
            self.projections.append((*source, torch.cat([q, k]), (self.key(in_w), in_b and self.key(in_b), 0, 2 * embed)))
            self.projections.append((*source, v.clone(), (self.key(in_w), in_b and self.key(in_b), 2 * embed, 3 * embed)))
        if in_b is not None:
            self.pair(self.param_ids(in_b), qkv)
        self.tie(v, out_w, 1, embed)
        out = self.origin(n, embed, out_w.rsplit(".", 1)[0])
        self.tie(out, out_w, 0, embed)
        if out_b is not None:
            self.pair(self.param_ids(out_b), out)
        return out.expand(value_shape).clone()

    def attention(self, n, mod: nn.MultiheadAttention, args, kwargs, value):
        name = str(n.target)
        if not mod._qkv_same_embed_dim or mod.bias_k is not None or mod.add_zero_attn:
            self.fail("is a MultiheadAttention with separate q/k/v weights, bias_k/bias_v or add_zero_attn "
                      "(only the packed in_proj_weight form is supported)")
        query, key, val = (list(args) + [kwargs.get(k) for k in ("query", "key", "value")][len(args):])[:3]
        chans = [self.channels(t, t.dim() - 1) for t in (query, key, val)]
        chan = torch.stack(chans).amax(0)
        for c in chans:
            self.pair(c, chan)
        out_shape = _tensors(value)[0].shape
        # per-head weights returned, or a per-head mask: the heads' order is observable, so they stay in place
        mask = (list(args) + [None] * 6)[5] if len(args) > 5 else kwargs.get("attn_mask")
        weights = value[1] if isinstance(value, (tuple, list)) and len(value) > 1 else None
        wholes = not ((isinstance(weights, torch.Tensor) and weights.dim() == 4)
                      or (isinstance(mask, torch.Tensor) and mask.dim() == 3))
        src = (list(n.args) + [n.kwargs.get(k) for k in ("query", "key", "value")][len(n.args):])[:3]
        source = ((src[0].name, query.dim() - 1) if all(isinstance(s, fx.Node) for s in src)
                  and src[0] is src[1] is src[2] else None)  # self-attention: q, k, v from one value
        out = self.heads(n, name, mod.num_heads, mod.embed_dim, chan, f"{name}.in_proj_weight",
                         f"{name}.in_proj_bias" if mod.in_proj_bias is not None else None,
                         f"{name}.out_proj.weight", f"{name}.out_proj.bias" if mod.out_proj.bias is not None else None,
                         out_shape, wholes=wholes, source=source)
        return (out, None if weights is None else torch.zeros(weights.shape, dtype=torch.long))

    def window_attention(self, n, args, real_args, real_kwargs, value):
        """torchvision's shifted-window attention (Swin): windows move tokens only; the channels
        behave as in :meth:`heads`, with the ``qkv`` and ``proj`` linear layers' weights."""
        def node_key(i: int, kw: str) -> str | None:
            src = n.args[i] if i is not None and len(n.args) > i else n.kwargs.get(kw)
            if src is None:
                return None
            if not isinstance(src, fx.Node) or src.op != "get_attr":
                self.fail(f"gets its {kw} from a computation, not a parameter")
            return str(src.target)
        x = args[0]
        qkv_w, proj_w = node_key(1, "qkv_weight"), node_key(2, "proj_weight")
        qkv_b, proj_b = node_key(None, "qkv_bias"), node_key(None, "proj_bias")
        bias = args[3] if len(args) > 3 else None
        if isinstance(bias, torch.Tensor):
            self.fix(bias)
        logit_scale = real_kwargs.get("logit_scale")
        if logit_scale is not None:
            self.fix(self.param_ids(node_key(None, "logit_scale")))
        heads = real_args[5] if len(real_args) > 5 else real_kwargs["num_heads"]
        embed = x.shape[-1]
        chan = self.channels(x, x.dim() - 1)
        # the relative-position bias (and Swin v2's logit scale) is indexed by head: heads stay in place
        return self.heads(n, qkv_w.rsplit(".", 2)[0], heads, embed, chan, qkv_w, qkv_b, proj_w, proj_b, value.shape,
                          wholes=False)



def permutation_spec(model: nn.Module, example_input: torch.Tensor) -> PermutationSpec:
    """Permutation groups of ``model``, from its fx graph run once on ``example_input`` (dim 0 = batch).

    The model is traced and run once in eval mode without gradients; its mode is restored.
    """
    if not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    training = model.training
    model.eval()
    try:
        gm = trace(model, stack_traces=True, what="Permutation structure")
        x = example_input.detach()
        if x.dim() and x.shape[0] == 1:  # a batch of 2 keeps the batch axis apart from the others
            x = x.expand(2, *x.shape[1:])
        x = to_model(x, model)
        state = model.state_dict()
        an = _Analysis(gm, state, _aliases(state))
        try:
            with torch.no_grad():
                an.run(x)
            an.finish()
        except UnsupportedOperationError:
            raise
        except Exception as err:  # noqa: BLE001
            cause = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise ValueError(f"example_input of shape {list(example_input.shape)} does not fit "
                             f"{type(model).__name__}: {type(cause).__name__} at {_where(an.current)}: "
                             f"{cause}") from err
    finally:
        model.train(training)
    return _build_spec(model, gm, an, state)


def _aliases(state: dict[str, torch.Tensor]) -> dict[str, str]:
    """``{key: first key}`` for state-dict entries that are the same tensor as an earlier entry (tied
    weights). Tensors that only overlap in memory (views of one another) are refused."""
    first: dict[tuple, str] = {}
    spans: list[tuple[int, int, str]] = []
    alias: dict[str, str] = {}
    for k, v in state.items():
        if v.numel() == 0:
            continue
        ident = (v.device, v.data_ptr(), tuple(v.shape), tuple(v.stride()), v.dtype)
        if ident in first:
            alias[k] = first[ident]
            continue
        first[ident] = k
        lo = v.data_ptr()
        spans.append((lo, lo + v.numel() * v.element_size(), k))
    spans.sort()
    for (la, ha, ka), (lb, hb, kb) in zip(spans, spans[1:]):
        if lb < ha:
            raise UnsupportedOperationError(f"state-dict tensors {ka!r} and {kb!r} share memory as different views "
                                            "(e.g. one is a transpose or slice of the other); their units cannot be "
                                            "permuted consistently. Untie them (clone one) before aligning")
    return alias


def _build_spec(model: nn.Module, gm: fx.GraphModule, an: _Analysis,
                state: dict[str, torch.Tensor]) -> PermutationSpec:
    """Groups = atoms of the origins and preserved sets over the classes of tied units."""
    roots = an.uf.roots()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    n_orig = len(an.origins)
    # heads move as wholes where each attention's q/k and v units come out as two whole groups;
    # elsewhere every head is kept in place (a preserved set per head), and the atoms are recomputed
    kept: list[int] = []
    while True:
        preserved = list(an.preserved) + [ids[h] for i in kept for ids in an.head_sets[i]
                                          for h in range(ids.shape[0])]
        sig, first_unit, atoms_sorted = _atoms(an, roots, preserved)
        unit_of = {r: (gi, k) for gi, rs in enumerate(atoms_sorted) for k, r in enumerate(rs)}
        sizes = [len(rs) for rs in atoms_sorted]
        heads_of: dict[int, Heads] = {}
        bad = [i for i, hs in enumerate(an.head_sets) if i not in kept
               and not _whole_heads(hs, roots, unit_of, sizes, i, heads_of)]
        if not bad:
            break
        kept += bad

    rank: dict[int, int] = {}  # a unit's place among the units of its class (tied units keep their roles)
    seen_in: dict[int, int] = {}
    for o in an.origins:
        for u, r in zip(range(o.start, o.start + o.size), roots[o.start:o.start + o.size].tolist()):
            if r in unit_of:
                rank[u] = seen_in.get(r, 0)
                seen_in[r] = rank[u] + 1
    live_root = np.zeros(len(roots), dtype=bool)
    live_root[np.fromiter(unit_of, dtype=np.int64, count=len(unit_of))] = True
    entries: list[list[Entry]] = [[] for _ in atoms_sorted]
    for (key, axis, rows), (start, n) in an.axis_ranges.items():
        roles = an.roles.get((key, axis, rows))
        order = None if roles is None else [rank.get(r, -1) for r in roles.tolist()]
        _axis_entries(entries, unit_of, sizes, key, axis, rows, roots[start:start + n], shapes[key][axis], order)
    for key, (start, shape) in an.param_ranges.items():
        cls = roots[start:start + max(1, math.prod(shape))].reshape(shape) if shape else roots[start:start + 1]
        live = live_root[cls]
        if not live.any():
            continue
        varying = [a for a in range(cls.ndim) if cls.shape[a] > 1 and not (cls == cls.take([0], axis=a)).all()]
        if len(varying) != 1:
            raise UnsupportedOperationError(f"parameter {key!r} of shape {list(shape)} follows the permuted units "
                                            f"along {len(varying)} axes {varying}; vfnb permutes one axis per "
                                            "group of a parameter")
        a = varying[0]
        line = np.moveaxis(cls, a, 0).reshape(cls.shape[a], -1)[:, 0]
        _axis_entries(entries, unit_of, sizes, key, a, None, line, shape[a])

    counted = {n for n in an.layer_nodes if n.op == "call_module"
               and isinstance(gm.get_submodule(n.target), WEIGHT_TYPES)}
    lp, main, total = layer_depths(gm.graph, counted)
    captures = _captures(an, roots, unit_of, sizes, rank)
    groups = []
    for gi, rs in enumerate(atoms_sorted):
        origin_ids = sorted({oi for r in rs for oi in sig[r] if oi < n_orig})
        names = tuple(dict.fromkeys(an.origins[oi].module for oi in origin_ids))
        depth_of: dict[str, tuple[int, bool]] = {}
        for oi in origin_ids:
            o = an.origins[oi]
            depth_of.setdefault(o.module, (lp[o.node] + (o.node not in counted), o.node in main))
        pdepths = tuple(depth_of[m][0] if depth_of[m][1] else None for m in names)
        main_d = [d for d in pdepths if d is not None]
        depth = max(main_d) if main_d else max(d for d, _ in depth_of.values())
        groups.append(Group(gi, sizes[gi], depth, names, pdepths, tuple(entries[gi]), captures[gi],
                            heads_of.get(gi)))
    layers = tuple(dict.fromkeys(str(n.target) for n in sorted(main, key=lambda n: (lp[n], list(gm.graph.nodes)
                                                                                      .index(n)))))
    return PermutationSpec(tuple(groups), layers, total, _type_name(model), shapes, gm.graph,
                           attention_layout(model))


def _atoms(an: _Analysis, roots: np.ndarray, preserved: list[torch.Tensor]):
    """``(signatures, first unit of each class, atoms)``: classes of new units grouped by which origins
    and preserved sets they meet; atoms of one class (no freedom) are dropped, the rest are ordered by
    their first unit."""
    sig: dict[int, list[int]] = {}
    first_unit: dict[int, tuple[int, int]] = {}
    for oi, o in enumerate(an.origins):
        for u, r in enumerate(roots[o.start:o.start + o.size].tolist()):
            if r == 0:
                continue
            s = sig.setdefault(r, [])
            if not s or s[-1] != oi:
                s.append(oi)
            first_unit.setdefault(r, (oi, u))
    n_orig = len(an.origins)
    seen_sets: dict[frozenset, int] = {}
    for units in preserved:
        rs = frozenset(int(r) for r in roots[units.numpy()].tolist() if r in sig)
        if rs and rs not in seen_sets:
            seen_sets[rs] = n_orig + len(seen_sets)
    for rs, si in seen_sets.items():
        for r in rs:
            sig[r].append(si)
    atoms: dict[tuple[int, ...], list[int]] = {}
    for r, s in sig.items():
        atoms.setdefault(tuple(sorted(set(s))), []).append(r)
    atoms_sorted = sorted((sorted(rs, key=first_unit.__getitem__) for rs in atoms.values() if len(rs) > 1),
                          key=lambda rs: first_unit[rs[0]])
    return sig, first_unit, atoms_sorted


def _whole_heads(head_set: tuple[torch.Tensor, torch.Tensor], roots: np.ndarray, unit_of: dict, sizes: list[int],
                 link: int, out: dict[int, Heads]) -> bool:
    """Record the :class:`Heads` of an attention's q/k and v groups in ``out`` if each is one whole
    group made of exactly the attention's heads (distinct units); else return False."""
    found: dict[int, Heads] = {}
    for ids in head_set:
        where = [unit_of.get(int(r)) for r in roots[ids.reshape(-1).numpy()].tolist()]
        if any(w is None for w in where):
            return False
        gis = {g for g, _ in where}
        ks = [k for _, k in where]
        if len(gis) != 1 or len(set(ks)) != len(ks) or sizes[next(iter(gis))] != len(ks):
            return False
        gi = gis.pop()
        if gi in found or gi in out:
            return False
        d = ids.shape[1]
        found[gi] = Heads(link, tuple(tuple(ks[h * d:(h + 1) * d]) for h in range(ids.shape[0])))
    out.update(found)
    return True


def _positions(unit_of: dict[int, tuple[int, int]], sizes: list[int], line: np.ndarray, what: str,
               order: list[int] | None = None) -> dict[int, tuple[int, tuple[int, ...] | None]]:
    """``{group: (block, positions or None)}`` for one axis whose index ``i`` holds class ``line[i]``.
    A class of several tied units owns several indices; they are listed by ``order[i]``, the rank of
    the unit index ``i`` holds within its class (its role), then by index."""
    per: dict[int, dict[int, list[int]]] = {}
    for i, r in enumerate(line.tolist()):
        gk = unit_of.get(r)
        if gk is not None:
            per.setdefault(gk[0], {}).setdefault(gk[1], []).append(i)
    if order is not None:
        for units in per.values():
            for idx in units.values():
                if len(idx) > 1:
                    idx.sort(key=lambda i: (order[i], i))
    out = {}
    for g, units in per.items():
        counts = {len(v) for v in units.values()}
        if len(units) != sizes[g] or len(counts) != 1:
            raise UnsupportedOperationError(f"{what} holds {len(units)} of the {sizes[g]} units of one group, with "
                                            f"{sorted(counts)} entries each; these units cannot be permuted together")
        block = counts.pop()
        pos = tuple(i for k in range(sizes[g]) for i in units[k])
        out[g] = (block, None if pos == tuple(range(len(line))) else pos)
    return out


def _axis_entries(entries, unit_of, sizes, key, axis, rows, line, length, order=None) -> None:
    where = f"axis {axis} of {key!r}" + (f" (rows {rows[1]}:{rows[2]})" if rows else "")
    for g, (block, pos) in _positions(unit_of, sizes, np.asarray(line), where, order).items():
        entries[g].append(Entry(key, axis, block, pos, rows))


def _captures(an: _Analysis, roots: np.ndarray, unit_of, sizes, rank) -> list[tuple[Capture, ...]]:
    """Per group: the projections of an attention's input that hold its q/k or v units, else the
    nonlinearity outputs that hold all its units (else the values layers read, else the layer outputs)."""
    out: list[tuple[Capture, ...]] = [() for _ in sizes]
    for records in (an.projections, an.acts, an.inputs, an.outputs):
        tier: list[list[Capture]] = [[] for _ in sizes]
        for name, axis, labels, *proj in records:
            try:
                per = _positions(unit_of, sizes, roots[labels.clamp_min(0).numpy()], name,
                                 [rank.get(r, -1) for r in labels.tolist()])
            except UnsupportedOperationError:
                continue
            for g, (block, pos) in per.items():
                tier[g].append(Capture(name, axis, block, pos, proj[0] if proj else None))
        out = [have or tuple(dict.fromkeys(new)) for have, new in zip(out, tier)]
    return out


# ---------------------------------------------------------------------------------------------------
@dataclass(eq=False)
class Permutation:
    """One permutation per group of ``spec``: in group ``i``, new unit ``j`` is old unit ``perms[i][j]``."""
    spec: PermutationSpec
    perms: tuple[torch.Tensor, ...]

    def __post_init__(self) -> None:
        self.perms = tuple(torch.as_tensor(p, dtype=torch.long).cpu() for p in self.perms)
        if len(self.perms) != len(self.spec.groups):
            raise ValueError(f"{len(self.perms)} permutations given for {len(self.spec.groups)} groups")
        for g, p in zip(self.spec.groups, self.perms):
            if p.shape != (g.size,) or not torch.equal(p.sort().values, torch.arange(g.size)):
                raise ValueError(f"group {g.index} needs a permutation of range({g.size}), got {p.tolist()[:8]}...")
        for link, gis in self.spec.head_links().items():
            orders = {gi: head_order(self.spec.groups[gi].heads, self.perms[gi]) for gi in gis}
            if any(o is None for o in orders.values()) or len({tuple(o) for o in orders.values()}) > 1:
                names = ", ".join(self.spec.groups[gis[0]].producers)
                raise ValueError(f"groups {gis} hold the attention heads of {names}: a permutation must move every "
                                 f"head as a whole (all its units onto one head's units), in one head order for "
                                 f"the q/k and the v units; got head orders "
                                 f"{ {gi: o for gi, o in orders.items()} } (None: a head is split)")

    def __getitem__(self, i: int) -> torch.Tensor:
        return self.perms[i]

    def __len__(self) -> int:
        return len(self.perms)

    def __iter__(self) -> Iterator[torch.Tensor]:
        return iter(self.perms)

    def __eq__(self, other: object) -> bool:
        return (isinstance(other, Permutation) and len(self) == len(other)
                and all(torch.equal(p, q) for p, q in zip(self.perms, other.perms)))

    def restrict(self, layers: int) -> Permutation:
        """This permutation on the groups of the first ``layers`` layers only; every deeper group keeps the
        identity (paper Fig. 4 left, "permute only the first l layers"). A group's depth is the deepest
        layer whose outputs it permutes. For activation matching this equals
        ``activation_matching(..., layers=l)``: each group is solved on its own correlations."""
        active = set(active_groups(self.spec, layers))
        return Permutation(self.spec, tuple(p if g.index in active else torch.arange(g.size)
                                            for g, p in zip(self.spec.groups, self.perms)))

    def inverse(self) -> Permutation:
        return Permutation(self.spec, tuple(torch.argsort(p) for p in self.perms))

    def __repr__(self) -> str:
        moved = sum(not torch.equal(p, torch.arange(len(p))) for p in self.perms)
        return f"Permutation({len(self)} groups, {moved} not identity, of {self.spec.model_type})"


def active_groups(spec: PermutationSpec, layers: int | None) -> list[int]:
    """Indices of the groups whose depth is at most ``layers`` (all groups for None)."""
    if layers is None:
        return [g.index for g in spec.groups]
    layers = check_layer_count(layers, spec.num_layers)
    return [g.index for g in spec.groups if g.depth <= layers]


def identity_permutation(spec: PermutationSpec) -> Permutation:
    return Permutation(spec, tuple(torch.arange(g.size) for g in spec.groups))


def head_order(heads: Heads, perm: torch.Tensor) -> list[int] | None:
    """``σ`` with new head ``h`` = old head ``σ[h]`` under ``perm`` (new unit ``j`` = old unit ``perm[j]``),
    or ``None`` if ``perm`` splits a head."""
    head_of = {k: h for h, block in enumerate(heads.blocks) for k in block}
    order = []
    for block in heads.blocks:
        src = {head_of[int(perm[k])] for k in block}
        if len(src) != 1:
            return None
        order.append(src.pop())
    return order if sorted(order) == list(range(len(order))) else None


def from_head_orders(heads: Heads, order: Sequence[int], within: Sequence[Sequence[int]]) -> torch.Tensor:
    """The permutation of a group with ``heads`` that puts old head ``order[h]`` at head ``h``, its units
    in the order ``within[h]`` (indices into the old head's block)."""
    size = sum(len(b) for b in heads.blocks)
    perm = torch.empty(size, dtype=torch.long)
    for h, block in enumerate(heads.blocks):
        src = heads.blocks[int(order[h])]
        perm[list(block)] = torch.tensor([src[int(i)] for i in within[h]], dtype=torch.long)
    return perm


def random_permutation(spec: PermutationSpec, seed: int) -> Permutation:
    """A uniformly random permutation of every group (``torch.Generator`` seeded with ``seed``); attention
    heads move as wholes, in one random head order per attention (:class:`Heads`)."""
    gen = torch.Generator().manual_seed(int(seed))
    perms = [torch.randperm(g.size, generator=gen) for g in spec.groups]
    for gis in spec.head_links().values():
        order = torch.randperm(len(spec.groups[gis[0]].heads.blocks), generator=gen)
        for gi in gis:
            blocks = spec.groups[gi].heads.blocks
            perms[gi] = from_head_orders(spec.groups[gi].heads, order,
                                         [torch.randperm(len(b), generator=gen) for b in blocks])
    return Permutation(spec, tuple(perms))


def block_index(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Index along an axis whose units are blocks of ``block`` entries."""
    return perm if block == 1 else (perm[:, None] * block + torch.arange(block)).reshape(-1)


def permute_tensor(t: torch.Tensor, entries: list[tuple[int, Entry]], perm: Permutation | Sequence[torch.Tensor],
                   skip: int | None = None) -> torch.Tensor:
    """``t`` reindexed along every entry's axis (except axis ``skip``): unit ``j`` of group ``g``
    takes the entries of old unit ``perm[g][j]``. Entries on one axis (a concatenation, the heads of
    a projection) are combined into one index; an entry with ``rows`` acts on that slice only."""
    by_axis: dict[tuple[int, tuple | None], list[tuple[int, Entry]]] = {}
    for g, e in entries:
        if e.axis != skip:
            by_axis.setdefault((e.axis, e.rows), []).append((g, e))
    for (axis, rows), ents in sorted(by_axis.items(), key=lambda kv: kv[0][1] is not None):
        length = t.shape[axis]
        if len(ents) == 1 and ents[0][1].positions is None:
            g, e = ents[0]
            idx = block_index(perm[g], e.block)
        else:
            idx = torch.arange(length)
            for g, e in ents:
                pos = e.index(length)
                idx[pos] = pos.view(-1, e.block)[perm[g]].reshape(-1)
        idx = idx.to(t.device)
        if rows is None:
            t = t.index_select(axis, idx)
        else:
            ra, lo, hi = rows
            t = t.clone()
            sub = t.narrow(ra, lo, hi - lo)
            sub.copy_(sub.index_select(axis, idx))
    return t


@torch.no_grad()
def apply_permutation(model: nn.Module, perm: Permutation) -> nn.Module:
    """A new model with every permuted axis reindexed by ``perm``; ``model`` is left untouched.

    The function is unchanged (paper §2); ``num_batches_tracked`` and the input/output axes are not permuted.
    """
    if not isinstance(perm, Permutation):
        raise TypeError(f"perm must be a Permutation, got {type(perm).__name__}")
    perm.spec.check_model(model)
    new = copy.deepcopy(model)
    state = new.state_dict()
    for key, entries in perm.spec.by_key().items():  # a tied tensor has one key here, so it moves once
        state[key].copy_(permute_tensor(state[key], entries, perm))
    return new
