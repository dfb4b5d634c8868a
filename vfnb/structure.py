"""Network structure, traced once (ARCHITECTURE.md "Structure").

Every method that needs to know "which layers a network has" asks this module:

- the **layer-type constants** (conv/linear, norms, BatchNorm, the outputs the diagnostics measure);
- the ``torch.fx`` **trace** of a model (:func:`trace`), with one clear error when a forward cannot be
  traced;
- the **layers as the paper counts them** (:func:`structure_of`): conv/linear modules on a longest
  input→output path, in order (VGG16 14, ResNet20 20; ResNet shortcut convs are not counted), each
  layer's longest-path **depth**, and its **pre-activation point** (the norm that directly follows it,
  else the layer itself: where REPAIR measures and folds);
- the **cut after layer l** (:func:`cut`): the graph split into a front part (every node up to
  layer ``l``) and a back part, with the values that cross the cut. Preserve-First Merging and
  partial zipping are built on it;
- the **execution order** of the measured outputs (:func:`execution_order`) for the diagnostics.

The permutation analysis of :mod:`vfnb.graph` builds on the same trace and the same depths.
"""
from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from .activations import to_model
from .models.norm import LayerNorm2d
from .validate import UnsupportedOperationError

__all__ = ["WEIGHT_TYPES", "BN_TYPES", "NORM_TYPES", "PERMUTABLE_NORM_TYPES", "OUTPUT_TYPES", "Tracer", "trace",
           "layer_depths", "Structure", "structure_of", "conv_linear_layers", "repair_layers", "block_depths", "check_layer_count",
           "Cut", "cut", "execution_order"]

#: Layers with a weight matrix: what the paper counts as layers, and what pruning prunes.
WEIGHT_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d, nn.Linear)
#: BatchNorm layers (RESET re-estimates their running statistics).
BN_TYPES: tuple[type[nn.Module], ...] = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
#: Norms whose per-channel affine parameters follow a permutation of their channels.
PERMUTABLE_NORM_TYPES: tuple[type[nn.Module], ...] = BN_TYPES + (nn.LayerNorm, LayerNorm2d)
#: Every norm layer: a pre-activation point when it directly follows a conv/linear layer.
NORM_TYPES: tuple[type[nn.Module], ...] = PERMUTABLE_NORM_TYPES + (nn.GroupNorm,)
#: The outputs the vanishing-feature diagnostics measure ("layers" of Def. 5.1).
OUTPUT_TYPES: tuple[type[nn.Module], ...] = WEIGHT_TYPES + NORM_TYPES


class Tracer(fx.Tracer):
    """``torch.fx`` tracer that keeps vfnb's own norm modules as leaves."""

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        return isinstance(m, LayerNorm2d) or super().is_leaf_module(m, qualname)


def trace(model: nn.Module, stack_traces: bool = False, what: str = "this method") -> fx.GraphModule:
    """The ``torch.fx`` graph of ``model`` as a GraphModule sharing its submodules.

    ``stack_traces`` records source lines for error messages (about 20× slower to trace). Any tracing
    failure becomes one :class:`~vfnb.graph.UnsupportedOperationError` that says why.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    tracer = Tracer()
    tracer.record_stack_traces = stack_traces
    try:
        graph = tracer.trace(model)
    except Exception as err:  # noqa: BLE001 - any tracing failure becomes one clear error
        raise UnsupportedOperationError(
            f"torch.fx cannot trace {type(model).__name__}: {type(err).__name__}: {err}. {what} needs the layer "
            "structure, i.e. a forward without data-dependent control flow") from err
    return fx.GraphModule(tracer.root, graph, type(model).__name__)


def layer_depths(graph: fx.Graph, is_layer: set[fx.Node]) -> tuple[dict[fx.Node, int], set[fx.Node], int]:
    """Longest-path layer counts ``(lp, main, L)``: ``lp[n]`` layers from the input up to node ``n``;
    ``main`` the layers on a longest input→output path (the ones the paper counts; shortcut convs are
    not); ``L`` the number of layers on that path."""
    nodes = list(graph.nodes)
    lp: dict[fx.Node, int] = {}
    for n in nodes:
        lp[n] = max((lp[i] for i in n.all_input_nodes), default=0) + (n in is_layer)
    rp: dict[fx.Node, int] = {}
    for n in reversed(nodes):
        rp[n] = max((rp[u] for u in n.users), default=0) + (n in is_layer)
    total = max((lp[n] for n in nodes if n.op == "output"), default=0)
    main = {n for n in is_layer if lp[n] + rp[n] - 1 == total}
    return lp, main, total


_ADDS = (operator.add, operator.iadd, torch.add, "add", "add_")


@dataclass(frozen=True, eq=False)
class Structure:
    """The layers of one traced model.

    ``layers``: the paper's L layers in order (shortcut convs excluded); ``all_layers``: every
    conv/linear module in graph order; ``depth``: each conv/linear module's longest-path depth
    (1-based; a shortcut conv gets the depth of the block it runs beside); ``point``: the module whose
    output is each layer's pre-activation; ``residual``: the graph adds two computed tensors (or has
    shortcut layers); ``graph``: the traced GraphModule.
    """
    layers: tuple[str, ...]
    all_layers: tuple[str, ...]
    depth: dict[str, int]
    point: dict[str, str]
    residual: bool
    graph: fx.GraphModule

    @property
    def num_layers(self) -> int:
        """L, as the paper counts layers."""
        return len(self.layers)

    def block_depths(self, blocks: Sequence[str]) -> list[int]:
        """For each named submodule (a transformer block, a ResNet stage), the number of layers l as the
        paper counts them up to its end: the depth of the deepest conv/linear layer inside it. PFM keeps
        the first ``k`` blocks with ``layers = block_depths(...)[k-1]``."""
        out = []
        for b in blocks:
            inside = [d for n, d in self.depth.items() if n == b or n.startswith(b + ".")]
            if not inside:
                raise ValueError(f"{b!r} holds no conv/linear layer of this model; choose among the modules "
                                 f"that contain {list(self.all_layers)[:4]}...")
            out.append(max(inside))
        if out != sorted(out):
            raise ValueError(f"blocks {list(blocks)} are not in depth order (their depths are {out})")
        return out

    def repair_layers(self, what: str = "the model") -> list[str]:
        """REPAIR/RESCALE's default layers (appendix A.3): every layer but the classifier for chain
        networks; for residual networks the layers inside the blocks (without the stem and the classifier)."""
        layers = list(self.layers[1:-1] if self.residual else self.layers[:-1])
        if not layers:
            raise ValueError(f"{what} has {len(self.layers)} conv/linear layer(s); REPAIR needs a hidden layer before "
                             "the classifier")
        return layers

    def check_layers(self, layers: Sequence[str] | None, default: Sequence[str]) -> list[str]:
        """``layers`` (or ``default`` for None) checked against this model's conv/linear layers, sorted
        into graph order."""
        if layers is None:
            return list(default)
        if isinstance(layers, str):
            raise TypeError(f"layers must be a list of layer names, got the string {layers!r}")
        layers = list(layers)
        if not layers:
            raise ValueError("layers is empty; pass None for the default layers")
        bad = [n for n in layers if n not in self.point]
        if bad:
            raise ValueError(f"{bad} are not conv/linear layers of this model; choose among {list(self.all_layers)}")
        order = {n: i for i, n in enumerate(self.all_layers)}
        return sorted(dict.fromkeys(layers), key=order.__getitem__)


def structure_of(model: nn.Module) -> Structure:
    """The :class:`Structure` of ``model``, from its fx graph (no forward pass is run)."""
    gm = trace(model)
    modules = dict(model.named_modules())
    calls: dict[str, list[fx.Node]] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module" and isinstance(modules.get(str(node.target)), WEIGHT_TYPES):
            calls.setdefault(str(node.target), []).append(node)
    if not calls:
        raise ValueError(f"{type(model).__name__} has no conv or linear layers")
    shared = [n for n, nodes in calls.items() if len(nodes) > 1]
    if shared:
        raise ValueError(f"layer(s) {shared} are called more than once per forward pass (shared weights); their "
                         "outputs cannot be told apart, normalized or cut separately")
    point = {}
    for name, (node,) in calls.items():
        users = list(node.users)
        nxt = users[0] if len(users) == 1 else None
        is_norm = nxt is not None and nxt.op == "call_module" and isinstance(modules.get(str(nxt.target)), NORM_TYPES)
        point[name] = str(nxt.target) if is_norm else name
    nodes = [n for (n,) in calls.values()]
    lp, main, _ = layer_depths(gm.graph, set(nodes))
    order = list(gm.graph.nodes)
    layers = tuple(str(n.target) for n in sorted(main, key=lambda n: (lp[n], order.index(n))))
    residual = len(main) < len(nodes) or any(
        n.op in ("call_function", "call_method") and n.target in _ADDS
        and sum(isinstance(a, fx.Node) for a in n.args) >= 2 for n in order)
    return Structure(layers, tuple(str(n.target) for n in nodes), {str(n.target): lp[n] for n in nodes}, point,
                     residual, gm)


def conv_linear_layers(model: nn.Module, example_input: torch.Tensor | None = None) -> list[str]:
    """The paper's L layers: conv/linear module names in execution order, without ResNet shortcut convs
    (VGG16: 14, ResNet20: 20). Layer l of bias calibration and PFM is element l−1 of this list.

    The structure comes from the model's fx graph, so ``example_input`` is optional and only checked to
    be a tensor."""
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    return list(structure_of(model).layers)


def block_depths(model: nn.Module, blocks: Sequence[str]) -> list[int]:
    """The paper's layer count l at the end of each submodule named in ``blocks``
    (:meth:`Structure.block_depths`): e.g. ``[1, 3, 5, 7, 9]`` for a ViT's patch embedding and four
    encoder blocks, so that PFM can preserve whole transformer blocks (appendix A.8.4, Table 5)."""
    return structure_of(model).block_depths(blocks)


def repair_layers(model: nn.Module, example_input: torch.Tensor | None = None) -> list[str]:
    """REPAIR/RESCALE's default layers (paper appendix A.3): every conv/linear except the classifier for
    chain networks (VGG, MLP); for residual networks (ResNet) the convs inside the residual blocks, i.e.
    the L layers without the stem and the classifier."""
    if example_input is not None and not isinstance(example_input, torch.Tensor):
        raise TypeError(f"example_input must be a tensor, got {type(example_input).__name__}")
    return structure_of(model).repair_layers(type(model).__name__)


def check_layer_count(layers: object, total: int, what: str = "layers") -> int:
    """``layers`` as an int in [0, total] (a number of layers as the paper counts them), or a clear error."""
    if isinstance(layers, bool) or not isinstance(layers, (int, np.integer)) or not 0 <= layers <= total:
        raise ValueError(f"{what} must be an integer in [0, {total}] (this model has {total} conv/linear layers as "
                         f"the paper counts them), got {layers!r}")
    return int(layers)


# ---------------------------------------------------------------------------------------------------
# the cut after layer l
@dataclass(frozen=True)
class Cut:
    """A graph split after layer ``depth``: ``front`` computes every value ``back`` reads from it.

    ``crossing`` names (fx node names) the values that cross, in order; ``front_layers`` and
    ``back_layers`` the conv/linear modules of each part (graph order)."""
    depth: int
    front: fx.Graph
    back: fx.Graph
    crossing: tuple[str, ...]
    front_layers: tuple[str, ...]
    back_layers: tuple[str, ...]


def _keeps(node: fx.Node) -> bool:
    """Dead-code elimination keeps the inputs and the output; every module call here is pure."""
    return node.op in ("placeholder", "output")


def cut(model: nn.Module, graph: fx.Graph, depth: int) -> Cut:
    """Split ``graph`` (a trace of ``model``) after layer ``depth``, with no per-architecture code: every
    conv/linear node whose longest-path depth exceeds ``depth``, and every node computed from one, goes
    to the back part; everything else to the front part. A layer's norm, activation and pooling thus
    stay with it, and a shortcut conv goes to the side of the block it runs beside. An
    ``nn.MultiheadAttention`` counts as a layer here (depth: the layers before it + 1), so a cut at the end
    of a transformer block keeps the next block's attention behind it (its pre-norm LayerNorm stays in
    front, and its output is averaged at the cut). The front part
    returns every value the back part reads (for a chain the input of layer ``depth + 1``; for a ResNet
    cut inside a block the residual stream and the block's inner branch). Constants (``get_attr``) are
    copied to both parts."""
    nodes = list(graph.nodes)
    if sum(n.op == "placeholder" for n in nodes) != 1:
        raise UnsupportedOperationError("PFM and partial zipping need a model with exactly one input")
    modules = dict(model.named_modules())
    layer_nodes = [n for n in nodes if n.op == "call_module" and isinstance(modules.get(str(n.target)), WEIGHT_TYPES)]
    names = [str(n.target) for n in layer_nodes]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise UnsupportedOperationError(f"layer(s) {twice} run more than once per forward pass; a cut between their "
                                        "calls would duplicate shared weights")
    lp, _, _ = layer_depths(graph, set(layer_nodes))
    # an attention module makes new units but is not counted as a layer (its projections are not separate
    # modules); it starts the block it belongs to, so it goes where a layer of depth lp + 1 would go
    anchors = {n for n in nodes if n.op == "call_module"
               and isinstance(modules.get(str(n.target)), nn.MultiheadAttention) and lp[n] >= depth}
    dep: set[fx.Node] = set()   # nodes computed from the input
    back: set[fx.Node] = set()
    is_layer = set(layer_nodes)
    for n in nodes:
        if n.op == "placeholder" or any(i in dep for i in n.all_input_nodes):
            dep.add(n)
        if (n in is_layer and lp[n] > depth) or n in anchors or n.op == "output" \
                or (n in dep and any(i in back for i in n.all_input_nodes)):
            back.add(n)
    crossing = [n for n in nodes if n not in back and n in dep and any(u in back for u in n.users)]

    front = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for n in nodes:
        if n not in back:
            env[n] = front.node_copy(n, lambda m: env[m])
    front.output(tuple(env[c] for c in crossing))
    front.eliminate_dead_code(is_impure_node=_keeps)

    rear = fx.Graph()
    renv: dict[fx.Node, fx.Node] = {c: rear.placeholder(c.name) for c in crossing}

    def get(m: fx.Node) -> fx.Node:  # constants the back part needs are copied, never averaged
        if m not in renv:
            renv[m] = rear.node_copy(m, get)
        return renv[m]

    for n in nodes:
        if n in back:
            renv[n] = rear.node_copy(n, get)
    rear.eliminate_dead_code(is_impure_node=_keeps)
    in_front = {str(n.target) for n in front.nodes if n.op == "call_module"}
    in_back = {str(n.target) for n in rear.nodes if n.op == "call_module"}
    return Cut(depth, front, rear, tuple(c.name for c in crossing), tuple(n for n in names if n in in_front),
               tuple(n for n in names if n in in_back))


# ---------------------------------------------------------------------------------------------------
@torch.no_grad()
def execution_order(model: nn.Module, example: torch.Tensor, types: tuple[type, ...] = OUTPUT_TYPES) -> list[str]:
    """Names of the modules of ``types`` in the order one forward pass on ``example[:1]`` runs them
    (works for any module, also composite ones such as a PFM model's stems and tail)."""
    order: list[str] = []
    hooks = [m.register_forward_hook(lambda mod, i, o, n=name: order.append(n))
             for name, m in model.named_modules() if isinstance(m, types)]
    was_training = model.training
    try:
        model.eval()(to_model(example[:1], model))
    finally:
        model.train(was_training)
        for h in hooks:
            h.remove()
    if not order:
        raise ValueError(f"{type(model).__name__} has no conv, linear or norm layers to diagnose")
    return list(dict.fromkeys(order))
