"""Permutation structure of a network, derived from its ``torch.fx`` graph (ARCHITECTURE.md "Permutations").

Permuting a layer's output units together with the next layer's input axis leaves the function
unchanged (paper §2). :func:`permutation_spec` finds every set of units that must share one
permutation (a :class:`Group`) by tracing the model:

- the outputs of every conv/linear layer start a group; the network's input and its outputs are
  never permuted (a group that reaches them is dropped: it keeps the identity);
- element-wise binary ops (residual additions, gates) merge the groups of their operands;
- BatchNorm / LayerNorm / :class:`~vfnb.models.LayerNorm2d` parameters and buffers follow their
  channel; element-wise activations, dropout, pooling, padding pass the group through;
- a flatten/view of a conv map into a linear layer maps each channel to its contiguous block of
  ``H*W`` features (an :class:`Entry` with ``block=H*W``).

Anything else that touches a permuted axis raises :class:`UnsupportedOperationError`: the spec never
guesses.
"""
from __future__ import annotations

import copy
import math
import operator
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp, TensorMetadata

from .activations import to_model
from .structure import PERMUTABLE_NORM_TYPES, WEIGHT_TYPES, check_layer_count, layer_depths, trace
from .validate import UnsupportedOperationError

__all__ = ["UnsupportedOperationError", "Entry", "Capture", "Group", "PermutationSpec", "Permutation", "block_index",
           "active_groups",
           "permutation_spec", "random_permutation", "identity_permutation", "apply_permutation", "permute_tensor"]



class Entry(NamedTuple):
    """One axis of one state-dict tensor acted on by a group; unit ``i`` owns indices
    ``i*block .. (i+1)*block-1`` of that axis (``block > 1`` after a flatten)."""
    key: str
    axis: int
    block: int = 1


class Capture(NamedTuple):
    """An activation of a group: fx node ``node`` whose ``axis`` holds the group's units in blocks."""
    node: str
    axis: int
    block: int = 1


@dataclass(frozen=True)
class Group:
    """Units that share one permutation.

    ``producers`` are the conv/linear modules whose outputs are these units (several for a residual
    stream); ``producer_depths`` their 1-based layer index as the paper counts layers (conv/linear on
    the longest path, so shortcut convs get ``None``); ``depth`` is the deepest of them: the group
    permutes the outputs of layers up to ``depth`` only. ``captures`` are the alignment points for
    activation matching (see :mod:`vfnb.matching`).
    """
    index: int
    size: int
    depth: int
    producers: tuple[str, ...]
    producer_depths: tuple[int | None, ...]
    entries: tuple[Entry, ...]
    captures: tuple[Capture, ...]


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

    def by_key(self) -> dict[str, list[tuple[int, Entry]]]:
        """``key -> [(group index, entry), ...]``: every permuted axis of every tensor."""
        out: dict[str, list[tuple[int, Entry]]] = {}
        for g in self.groups:
            for e in g.entries:
                out.setdefault(e.key, []).append((g.index, e))
        return out

    def group_of(self, key: str, axis: int = 0) -> Group | None:
        """The group that permutes ``axis`` of state-dict tensor ``key`` (None: not permuted)."""
        if key not in self.shapes:
            raise KeyError(f"{key!r} is not in the state dict of this {self.model_type}")
        return next((g for g in self.groups for e in g.entries if e.key == key and e.axis == axis), None)

    def check_model(self, model: nn.Module) -> None:
        """Raise ``ValueError`` unless ``model`` has this spec's architecture (type and shapes)."""
        name = _type_name(model)
        shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
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
            lines.append(f"  [{g.index:2d}] size {g.size:4d}  depth {g.depth:2d}  {len(g.entries):2d} tensors  "
                         f"from {prods}")
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"PermutationSpec({self.model_type}, groups={len(self.groups)}, "
                f"sizes={[g.size for g in self.groups]}, num_layers={self.num_layers})")


# ---------------------------------------------------------------------------------------------------
# Op tables. Kinds: layer, norm, act (nonlinear, element-wise), same (linear element-wise / identity),
# pool1|2|3, binary, reshape, permute, reduce, pad, fnorm (F.layer_norm), meta (returns no tensor).
_MODULES: list[tuple[tuple[type, ...], str]] = [
    (WEIGHT_TYPES, "layer"),
    (PERMUTABLE_NORM_TYPES, "norm"),
    ((nn.ReLU, nn.ReLU6, nn.LeakyReLU, nn.ELU, nn.GELU, nn.SiLU, nn.Sigmoid, nn.Tanh, nn.Hardswish,
      nn.Hardsigmoid, nn.Hardtanh, nn.Mish, nn.Softplus), "act"),
    ((nn.Identity, nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d, nn.AlphaDropout), "same"),
    ((nn.MaxPool1d, nn.AvgPool1d, nn.AdaptiveAvgPool1d, nn.AdaptiveMaxPool1d), "pool1"),
    ((nn.MaxPool2d, nn.AvgPool2d, nn.AdaptiveAvgPool2d, nn.AdaptiveMaxPool2d), "pool2"),
    ((nn.MaxPool3d, nn.AvgPool3d, nn.AdaptiveAvgPool3d, nn.AdaptiveMaxPool3d), "pool3"),
    ((nn.Flatten,), "reshape"),
]
_FUNCTIONS: dict[Any, str] = {
    **dict.fromkeys([F.relu, torch.relu, F.relu_, torch.relu_, F.relu6, F.leaky_relu, F.elu, F.gelu, F.silu,
                     torch.sigmoid, F.sigmoid, torch.tanh, F.tanh, F.hardswish, F.hardtanh, F.mish,
                     F.softplus], "act"),
    **dict.fromkeys([F.dropout, F.dropout1d, F.dropout2d, F.dropout3d, torch.clone, operator.neg,
                     operator.pos], "same"),
    **dict.fromkeys([operator.add, operator.sub, operator.mul, operator.truediv, operator.iadd, operator.isub,
                     operator.imul, operator.itruediv, torch.add, torch.sub, torch.mul, torch.div,
                     torch.maximum, torch.minimum], "binary"),
    **dict.fromkeys([F.max_pool1d, F.avg_pool1d, F.adaptive_avg_pool1d, F.adaptive_max_pool1d], "pool1"),
    **dict.fromkeys([F.max_pool2d, F.avg_pool2d, F.adaptive_avg_pool2d, F.adaptive_max_pool2d], "pool2"),
    **dict.fromkeys([F.max_pool3d, F.avg_pool3d, F.adaptive_avg_pool3d, F.adaptive_max_pool3d], "pool3"),
    **dict.fromkeys([torch.flatten, torch.reshape], "reshape"),
    **dict.fromkeys([torch.permute, torch.transpose], "permute"),
    **dict.fromkeys([torch.mean, torch.sum], "reduce"),
    F.pad: "pad", F.layer_norm: "fnorm", getattr: "meta",
}
_METHODS: dict[str, str] = {
    **dict.fromkeys(["relu", "relu_", "sigmoid", "tanh"], "act"),
    **dict.fromkeys(["contiguous", "clone", "detach", "float", "double", "half", "to"], "same"),
    **dict.fromkeys(["add", "add_", "sub", "sub_", "mul", "mul_", "div", "div_"], "binary"),
    **dict.fromkeys(["flatten", "view", "reshape"], "reshape"),
    **dict.fromkeys(["permute", "transpose"], "permute"),
    **dict.fromkeys(["mean", "sum"], "reduce"),
    **dict.fromkeys(["size", "dim", "numel"], "meta"),
}
_FIXED = 0  # union-find id of "never permuted" (input, outputs, unknown constants)


class _V(NamedTuple):
    """Analysis value of a tensor: group ``g`` on ``axis`` (g=0: not permuted); ``key`` for parameters."""
    g: int
    axis: int = -1
    block: int = 1
    key: str | None = None


def _type_name(model: nn.Module) -> str:
    return f"{type(model).__module__}.{type(model).__qualname__}"


def _shape(node: fx.Node) -> tuple[int, ...] | None:
    meta = node.meta.get("tensor_meta")
    return tuple(meta.shape) if isinstance(meta, TensorMetadata) else None


def _kind(node: fx.Node, root: nn.Module) -> str | None:
    if node.op == "call_module":
        mod = root.get_submodule(node.target)
        kind = next((k for types, k in _MODULES if isinstance(mod, types)), None)
        if kind == "layer" and getattr(mod, "groups", 1) != 1:
            return None  # grouped/depthwise conv: channels are tied to their group
        return kind
    if node.op == "call_function":
        return _FUNCTIONS.get(node.target)
    return _METHODS.get(node.target) if node.op == "call_method" else None


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


class _Analysis:
    """One pass over the traced graph in execution order; groups live in a union-find."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.gm = gm
        self.parent = [_FIXED]
        self.entries: list[tuple[int, Entry]] = []
        self.producers: list[tuple[int, fx.Node]] = []
        self.acts: list[tuple[int, Capture]] = []      # nonlinearity outputs
        self.inputs: list[tuple[int, Capture]] = []    # values consumed by conv/linear layers
        self.env: dict[fx.Node, _V | None] = {}
        self.state_keys = set(gm.state_dict())

    # union-find
    def new(self) -> int:
        self.parent.append(len(self.parent))
        return len(self.parent) - 1

    def find(self, g: int) -> int:
        while self.parent[g] != g:
            self.parent[g] = self.parent[self.parent[g]]
            g = self.parent[g]
        return g

    def union(self, a: int, b: int) -> None:
        ra, rb = self.find(a), self.find(b)
        if ra != rb:  # the smaller id wins, so _FIXED absorbs
            self.parent[max(ra, rb)] = min(ra, rb)

    def params(self, node: fx.Node, names: tuple[str, ...]) -> list[str]:
        mod = self.gm.get_submodule(node.target)
        return [f"{node.target}.{n}" for n in names if isinstance(getattr(mod, n, None), torch.Tensor)]

    def fix_param(self, v: _V, shape: tuple[int, ...], skip: int | None = None) -> None:
        """A parameter used where it is not permuted: all its axes stay fixed."""
        for ax in range(len(shape)):
            if ax != skip and shape[ax] > 1:
                self.entries.append((_FIXED, Entry(v.key, ax)))

    def run(self) -> None:
        for node in self.gm.graph.nodes:
            self.env[node] = self.visit(node)

    def visit(self, node: fx.Node) -> _V | None:
        shape = _shape(node)
        if node.op == "placeholder":
            return _V(_FIXED) if shape is not None else None
        if node.op == "get_attr":
            return None if shape is None else _V(_FIXED, key=node.target if node.target in self.state_keys else None)
        args: list[tuple[fx.Node, _V]] = []
        fx.node.map_arg((node.args, node.kwargs), lambda n: args.append((n, self.env[n])) or n)
        args = [(n, v) for n, v in args if v is not None]
        if node.op == "output":
            for n, v in args:
                self.union(v.g, _FIXED)
                if v.key:
                    self.fix_param(v, _shape(n))
            return None
        kind = _kind(node, self.gm)
        if kind == "meta":  # x.size(), x.shape: no tensor comes out (a tensor would be unknown)
            if shape is None:
                return None
            kind = None
        if kind == "binary" and shape is not None:
            return self.binary(node, shape, args)
        grouped = [(n, v) for n, v in args if v.g]
        simple = len(grouped) == 1 and grouped[0][0] is node.args[0]
        if kind == "fnorm" and simple:
            return self.fnorm(node, grouped[0][1], len(_shape(node.args[0])))
        for n, v in args:  # parameters consumed anywhere else are never permuted
            if v.key:
                self.fix_param(v, _shape(n))
        if not grouped:
            if kind == "layer":
                self.layer(node, None, None)
                return _V(self.producers[-1][0], self.out_axis(node, shape))
            return None if shape is None else _V(_FIXED)
        if kind is None or shape is None or not simple:
            raise UnsupportedOperationError(
                f"cannot tell how {_where(node)} acts on permuted units (coming from "
                f"{', '.join(repr(n.name) for n, _ in grouped)}); vfnb handles conv/linear, norms, element-wise "
                "activations, residual additions, pooling, padding and flattening only")
        (src, v), ndim = grouped[0], len(_shape(grouped[0][0]))
        if kind == "layer":
            self.layer(node, src, v)
            return _V(self.producers[-1][0], self.out_axis(node, shape))
        if kind in ("act", "same"):
            if kind == "act":
                self.acts.append((v.g, Capture(node.name, v.axis, v.block)))
            return v
        if kind == "norm":
            return self.norm(node, v, ndim)
        if kind.startswith("pool"):
            if v.axis >= ndim - int(kind[-1]):
                self.fail(node, "pools over the permuted axis")
            return v
        if kind == "pad":
            pad = node.args[1] if len(node.args) > 1 else node.kwargs["pad"]
            d = ndim - 1 - v.axis
            if d < len(pad) // 2 and (pad[2 * d] or pad[2 * d + 1]):
                self.fail(node, "pads the permuted axis")
            return v
        if kind == "reshape":
            return self.reshape(node, v, _shape(src), shape)
        if kind == "permute":
            return self.permute(node, v, ndim)
        return self.reduce(node, v, ndim)

    def fail(self, node: fx.Node, why: str) -> None:
        raise UnsupportedOperationError(f"{_where(node)} {why}; its units cannot be permuted consistently")

    def out_axis(self, node: fx.Node, shape: tuple[int, ...]) -> int:
        return len(shape) - 1 if isinstance(self.gm.get_submodule(node.target), nn.Linear) else 1

    def layer(self, node: fx.Node, src: fx.Node | None, v: _V | None) -> None:
        """conv/linear: the input group acts on weight axis 1; a new group on weight/bias axis 0."""
        weight, *bias = self.params(node, ("weight", "bias"))
        if v is not None:
            ndim = len(_shape(src))
            linear = isinstance(self.gm.get_submodule(node.target), nn.Linear)
            if v.axis != (ndim - 1 if linear else 1) or (not linear and v.block != 1):
                self.fail(node, f"consumes the permuted units on axis {v.axis} (block {v.block}), not its "
                          "input-feature axis")
            self.entries.append((v.g, Entry(weight, 1, v.block)))
            self.inputs.append((v.g, Capture(src.name, v.axis, v.block)))
        g = self.new()
        self.producers.append((g, node))
        self.entries += [(g, Entry(k, 0)) for k in (weight, *bias)]

    def norm(self, node: fx.Node, v: _V, ndim: int) -> _V:
        """BatchNorm/LayerNorm2d normalize per channel (axis 1); LayerNorm over its trailing dims."""
        mod = self.gm.get_submodule(node.target)
        keys = self.params(node, ("weight", "bias", "running_mean", "running_var"))
        if isinstance(mod, nn.LayerNorm):
            return self.layer_norm(v, ndim, len(mod.normalized_shape), keys)
        if v.axis != 1:
            self.fail(node, f"normalizes axis 1 but the permuted units are on axis {v.axis}")
        self.entries += [(v.g, Entry(k, 0, v.block)) for k in keys]
        return v

    def layer_norm(self, v: _V, ndim: int, nlen: int, keys: list[str]) -> _V:
        """Statistics over the last ``nlen`` axes are symmetric in them: the affine parameters follow
        the units if the permuted axis is among them, and stay fixed otherwise."""
        first = ndim - nlen
        self.entries += [(v.g if a == v.axis - first else _FIXED, Entry(k, a, v.block if a == v.axis - first else 1))
                         for k in keys for a in range(nlen)]
        return v

    def fnorm(self, node: fx.Node, v: _V, ndim: int) -> _V:
        """``F.layer_norm(x, normalized_shape, weight, bias)`` with weight/bias from ``get_attr``."""
        args = list(node.args) + [None] * 4
        nshape = args[1] if args[1] is not None else node.kwargs["normalized_shape"]
        params = [p for p in (args[2], args[3], node.kwargs.get("weight"), node.kwargs.get("bias")) if p is not None]
        if any(not isinstance(p, fx.Node) or p.op != "get_attr" for p in params):
            self.fail(node, "is a layer_norm with computed parameters")
        return self.layer_norm(v, ndim, len(nshape), [str(p.target) for p in params])

    def binary(self, node: fx.Node, shape: tuple[int, ...], args: list[tuple[fx.Node, _V]]) -> _V:
        """Element-wise op: operands varying along the permuted axis share its permutation."""
        nd = len(shape)
        grouped = [(n, v) for n, v in args if v.g]
        if not grouped:
            for n, v in args:
                if v.key:
                    self.fix_param(v, _shape(n))
            return _V(_FIXED)
        axes = {(v.axis - len(_shape(n)) + nd, v.block) for n, v in grouped}
        if len(axes) > 1:
            self.fail(node, f"combines permuted units on different axes {sorted(axes)}")
        (axis, block), g = axes.pop(), grouped[0][1].g
        for n, v in args:
            s = _shape(n)
            a = axis - nd + len(s)
            if v.g:
                self.union(g, v.g)
            elif a >= 0 and s[a] > 1:  # varies along the permuted axis
                if v.key:
                    self.entries.append((g, Entry(v.key, a, block)))
                    self.fix_param(v, s, skip=a)
                else:
                    self.union(g, _FIXED)  # combined with an unpermuted tensor: keep the identity
            elif v.key:
                self.fix_param(v, s)
        return _V(g, axis, block)

    def reshape(self, node: fx.Node, v: _V, si: tuple[int, ...], so: tuple[int, ...]) -> _V:
        """A reshape keeps the units if their axis becomes the outermost factor of one output axis."""
        a, pre = v.axis, math.prod(si[:v.axis])
        for j in range(len(so)):
            if math.prod(so[:j]) == pre:
                for e in range(a, len(si)):
                    if so[j] == math.prod(si[a:e + 1]):
                        return v._replace(axis=j, block=v.block * math.prod(si[a + 1:e + 1]))
        self.fail(node, f"reshapes {list(si)} to {list(so)}, splitting or interleaving the permuted axis {a}")
        raise AssertionError

    def permute(self, node: fx.Node, v: _V, ndim: int) -> _V:
        rest = list(node.args[1:])
        if not rest:
            self.fail(node, "permutes axes given as keywords (not supported)")
        if node.target in ("transpose", torch.transpose):
            d0, d1 = (int(a) % ndim for a in rest[:2])
            return v._replace(axis={d0: d1, d1: d0}.get(v.axis, v.axis))
        dims = list(rest[0]) if len(rest) == 1 and isinstance(rest[0], (list, tuple)) else rest
        return v._replace(axis=[int(d) % ndim for d in dims].index(v.axis))

    def reduce(self, node: fx.Node, v: _V, ndim: int) -> _V:
        dim = node.args[1] if len(node.args) > 1 else node.kwargs.get("dim")
        keep = node.args[2] if len(node.args) > 2 else node.kwargs.get("keepdim", False)
        dims = None if dim is None else {int(d) % ndim for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
        if dims is None or v.axis in dims or not isinstance(keep, bool):
            self.fail(node, "reduces over the permuted axis")
        return v if keep else v._replace(axis=v.axis - sum(d < v.axis for d in dims))


class _ShapeProp(ShapeProp):
    def run_node(self, n: fx.Node) -> Any:
        self.current = n
        return super().run_node(n)


def permutation_spec(model: nn.Module, example_input: torch.Tensor) -> PermutationSpec:
    """Permutation groups of ``model``, from its fx graph and shapes on ``example_input`` (dim 0 = batch).

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
        prop = _ShapeProp(gm)
        try:
            with torch.no_grad():
                prop.propagate(x)
        except Exception as err:  # noqa: BLE001
            cause = err
            while cause.__cause__ is not None:
                cause = cause.__cause__
            raise ValueError(f"example_input of shape {list(example_input.shape)} does not fit "
                             f"{type(model).__name__}: {type(cause).__name__} at {_where(prop.current)}: "
                             f"{cause}") from err
    finally:
        model.train(training)
    an = _Analysis(gm)
    an.run()
    return _build_spec(model, gm, an)


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
    overlaps = [(ka, kb) for i, (la, ha, ka) in enumerate(spans) for lb, hb, kb in spans[i + 1:] if la < hb and lb < ha]
    if overlaps:
        ka, kb = overlaps[0]
        raise UnsupportedOperationError(f"state-dict tensors {ka!r} and {kb!r} share memory as different views (e.g. "
                                        "one is a transpose or slice of the other); their units cannot be permuted "
                                        "consistently. Untie them (clone one) before aligning")
    return alias


def _build_spec(model: nn.Module, gm: fx.GraphModule, an: _Analysis) -> PermutationSpec:
    state = model.state_dict()
    shapes = {k: tuple(v.shape) for k, v in state.items()}
    # tied weights (one Parameter held by two modules) are one tensor: its uses join their groups
    alias = _aliases(state)
    entries = [(g, e._replace(key=alias.get(e.key, e.key))) for g, e in an.entries]
    an.entries = entries
    # a tensor axis belongs to exactly one group: merge groups that share one (shared modules, tied weights)
    seen: dict[tuple[str, int], tuple[int, int]] = {}
    for g, e in an.entries:
        if (e.key, e.axis) in seen:
            g0, b0 = seen[(e.key, e.axis)]
            if b0 != e.block and an.find(g) != _FIXED and an.find(g0) != _FIXED:
                raise UnsupportedOperationError(f"{e.key!r} axis {e.axis} is permuted in blocks of {b0} and "
                                                f"of {e.block} by different uses")
            an.union(g0, g)
        else:
            seen[(e.key, e.axis)] = (g, e.block)
    layer_nodes = {n for _, n in an.producers}
    lp, main, total = layer_depths(gm.graph, layer_nodes)
    order = list(gm.graph.nodes)
    roots = sorted({an.find(g) for g, _ in an.producers} - {_FIXED},
                   key=lambda r: min(order.index(n) for g, n in an.producers if an.find(g) == r))
    groups = []
    for index, r in enumerate(roots):
        prods = [n for g, n in an.producers if an.find(g) == r]
        names = tuple(dict.fromkeys(str(n.target) for n in prods))
        pdepths = tuple(next((lp[n] for n in prods if str(n.target) == name and n in main), None) for name in names)
        main_d = [d for d in pdepths if d is not None]
        depth = max(main_d) if main_d else max(lp[n] for n in prods)
        entries = tuple(dict.fromkeys(e for g, e in an.entries if an.find(g) == r))
        size = shapes[f"{prods[0].target}.weight"][0]
        for e in entries:
            if e.key not in shapes:
                raise UnsupportedOperationError(f"{e.key!r} (acted on by group {index}) is not in the state dict "
                                                "of the model (a parametrized module?)")
            if shapes[e.key][e.axis] != size * e.block:
                raise UnsupportedOperationError(f"internal inconsistency: {e.key!r} axis {e.axis} has "
                                                f"{shapes[e.key][e.axis]} entries, expected {size}×{e.block}")
        acts = [c for g, c in an.acts if an.find(g) == r] or [c for g, c in an.inputs if an.find(g) == r]
        groups.append(Group(index, size, depth, names, pdepths, entries, tuple(dict.fromkeys(acts))))
    layers = tuple(dict.fromkeys(str(n.target) for n in sorted(main, key=lambda n: (lp[n], order.index(n)))))
    return PermutationSpec(tuple(groups), layers, total, _type_name(model), shapes, gm.graph)


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


def random_permutation(spec: PermutationSpec, seed: int) -> Permutation:
    """A uniformly random permutation of every group (``torch.Generator`` seeded with ``seed``)."""
    gen = torch.Generator().manual_seed(int(seed))
    return Permutation(spec, tuple(torch.randperm(g.size, generator=gen) for g in spec.groups))


def block_index(perm: torch.Tensor, block: int) -> torch.Tensor:
    """Index along an axis whose units are blocks of ``block`` entries."""
    return perm if block == 1 else (perm[:, None] * block + torch.arange(block)).reshape(-1)


def permute_tensor(t: torch.Tensor, entries: list[tuple[int, Entry]], perm: Permutation | Sequence[torch.Tensor],
                   skip: int | None = None) -> torch.Tensor:
    """``t`` reindexed along every entry's axis (except axis ``skip``)."""
    for g, e in entries:
        if e.axis != skip:
            t = t.index_select(e.axis, block_index(perm[g], e.block).to(t.device))
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
