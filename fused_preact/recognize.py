"""Recognize a full pre-activation residual unit by what it computes, not by its class.

``recognize(module, in_channels)`` runs a copy of ``module`` once on a small random
input under a ``TorchDispatchMode`` that records every executed ATen operator and
the data flow between them, then matches that graph against the fused unit's math::

    a1 = relu(bn_1(x))
    h1 = conv_1(a1);  a2 = relu(bn_2(h1));  h2 = conv_2(a2)  [; a3 = relu(bn_3(h2)); h3 = conv_3(a3)]
    y  = h_n + s,     s = x | conv_s(a1) | conv_s(x)

A recording, not a symbolic trace, so Python control flow in ``forward``
(``hasattr(self, "shortcut")``, ``if self.equalInOut``) is simply the branch that
ran. Values are followed through in-place operators (``out += shortcut``,
``nn.ReLU(inplace=True)``, one ReLU module used at several places): an in-place op
gives its tensor a new value in the graph. Batch norms and convolutions are tied to
their modules by the parameter tensors they were called with, so attribute names
never matter. The result names the module's own submodules by their paths, so
one recording serves every unit of the same configuration.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from .unit_guard import SAMPLE_SIZE, float64_copy



@dataclass(frozen=True)
class UnitMatch:
    """A module that computes a full pre-activation unit, in terms of its submodules' paths."""
    bns: tuple[str, ...]            # bn_1 .. bn_n, in the order the branch runs them
    convs: tuple[str, ...]          # conv_1 .. conv_n
    shortcut: str                   # "identity" | "projection" (of relu(bn_1(x))) | "raw_projection" (of x)
    shortcut_conv: Optional[str]    # the projection's conv, None for identity


@dataclass(frozen=True)
class Recognition:
    """What one recorded run says about a module.

    ``residual``: its output is a residual sum (possibly followed by one more
    op, as in post-activation units), so it counts as a residual unit.
    ``match``: how it maps onto a fused unit, or None with ``reason`` saying why not.
    """
    residual: bool
    match: Optional[UnitMatch] = None
    reason: Optional[str] = None


# -- the recording ------------------------------------------------------------------
@dataclass
class _Node:
    kind: str                               # input | bn | relu | conv | add | dropout | random | other
    inputs: tuple[int, ...] = ()
    module: Optional[str] = None            # path of the BN / conv module it ran
    op: str = ""                            # the ATen operator
    extra: dict = field(default_factory=dict)   # call settings that must agree with the module


_RELU_OPS = {"relu", "relu_"}
_ADD_OPS = {"add", "add_"}
_PASSTHROUGH_OPS = {"alias", "detach", "clone", "contiguous", "_to_copy", "lift_fresh"}
_RANDOM_SOURCES = {"empty_like", "empty", "zeros_like", "ones_like", "rand_like", "new_empty",
                   "bernoulli", "bernoulli_", "uniform_"}


def _key(t: torch.Tensor) -> tuple:
    """One value's identity: the same memory seen the same way (in-place ops keep it)."""
    return (t.untyped_storage().data_ptr(), t.storage_offset(), tuple(t.shape), tuple(t.stride()), t.dtype)


class _Recorder(TorchDispatchMode):
    """Records the data flow from the input through the ATen operators that run."""

    def __init__(self, owners: dict[int, tuple[str, str]]):
        super().__init__()
        self.owners = owners                # data_ptr of a parameter / buffer -> (module path, attribute)
        self.nodes: list[_Node] = []
        self.values: dict[tuple, int] = {}  # _key of a tensor -> node id of its current value
        self.keep: list = []                # every tensor seen stays alive, so no memory is reused

    def track(self, t: torch.Tensor, node: _Node) -> int:
        self.nodes.append(node)
        self.values[_key(t)] = len(self.nodes) - 1
        self.keep.append(t)
        return len(self.nodes) - 1

    def _node_of(self, a) -> Optional[int]:
        return self.values.get(_key(a)) if isinstance(a, torch.Tensor) else None

    def _owner(self, a) -> Optional[str]:
        if isinstance(a, torch.Tensor) and a.numel():
            owner = self.owners.get(a.untyped_storage().data_ptr())
            return owner[0] if owner else None
        return None

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        name = func.overloadpacket.__name__
        flat = list(args) + list(kwargs.values())
        ids = [self._node_of(a) for a in flat]
        tracked = [i for i in ids if i is not None]
        if name in _RANDOM_SOURCES:       # fresh or random values: a dropout mask being built
            if isinstance(out, torch.Tensor):
                self.track(out, _Node("random", op=name))
            return out
        if not tracked:          # parameters, buffers (num_batches_tracked += 1)
            return out
        kinds = [self.nodes[i].kind for i in tracked]
        first = out[0] if isinstance(out, (tuple, list)) else out
        if not isinstance(first, torch.Tensor):
            return out
        if name in _PASSTHROUGH_OPS and len(tracked) == 1:   # a copy or view: the same value, no new node
            self.values[_key(first)] = tracked[0]
            self.keep.append(first)
            return out
        node = self._classify(name, args, kwargs, ids, tracked, kinds)
        self.track(first, node)
        if isinstance(out, (tuple, list)):       # BN's saved statistics etc. are no activations
            for extra in out[1:]:
                if isinstance(extra, torch.Tensor):
                    self.keep.append(extra)
        return out

    def _classify(self, name, args, kwargs, ids, tracked, kinds) -> _Node:
        data = [i for i, kind in zip(tracked, kinds) if kind != "random"]
        if all(kind == "random" for kind in kinds):          # the dropout mask being built
            return _Node("random", tuple(tracked), op=name)
        if name == "mul" and len(data) == 1 and len(tracked) == 2:
            return _Node("dropout", tuple(data), op=name)
        if name in ("native_dropout", "dropout", "feature_dropout"):
            return _Node("dropout", tuple(data), op=name)
        if "batch_norm" in name and ids[0] is not None:
            module = self._owner(args[1]) or self._owner(args[3] if len(args) > 3 else None)
            training = next((a for a in args[5:] if isinstance(a, bool)), None)
            floats = [a for a in args[5:] if isinstance(a, float)]
            return _Node("bn", (ids[0],), module, name, extra={"training": training, "floats": floats})
        if name == "convolution" and ids[0] is not None:
            stride, padding, dilation, transposed, _, groups = args[3:9]
            return _Node("conv", (ids[0],), self._owner(args[1]), name,
                         extra={"stride": tuple(stride), "padding": tuple(padding), "dilation": tuple(dilation),
                                "transposed": transposed, "groups": groups, "bias": args[2] is not None})
        if name in _RELU_OPS and len(tracked) == 1:
            return _Node("relu", (tracked[0],), op=name)
        if name in ("clamp", "clamp_min", "clamp_", "clamp_min_") and len(tracked) == 1:
            bounds = list(args[1:]) + list(kwargs.values())
            if bounds and bounds[0] == 0 and all(b is None for b in bounds[1:]):
                return _Node("relu", (tracked[0],), op=name)
        if name in ("threshold", "threshold_") and len(tracked) == 1 and list(args[1:3]) == [0, 0]:
            return _Node("relu", (tracked[0],), op=name)
        if name in _ADD_OPS and len(tracked) == 2 and kwargs.get("alpha", 1) == 1 and len(args) == 2:
            return _Node("add", tuple(tracked), op=name)
        return _Node("other", tuple(tracked), op=name)


def _describe(node: _Node) -> str:
    if node.kind in ("bn", "conv"):
        return f"{node.module or 'a ' + node.kind}"
    if node.kind in ("relu", "add", "dropout", "input"):
        return {"relu": "a ReLU", "add": "a sum", "dropout": "dropout", "input": "the input"}[node.kind]
    return f"aten.{node.op}"


# -- matching ---------------------------------------------------------------------
def _branch(nodes: list[_Node], end: int):
    """The BN-ReLU-conv triples ending at node ``end``, first to last, or the reason they are not."""
    triples = []
    at = end
    while True:
        conv = nodes[at]
        if conv.kind != "conv":
            return None, f"its residual branch ends in {_describe(conv)}, not a convolution"
        act = nodes[conv.inputs[0]]
        if act.kind == "dropout":
            return None, "it applies dropout between its convolutions (the fused unit has no dropout)"
        if act.kind != "relu":
            return None, f"{conv.module} takes {_describe(act)}, not a ReLU of a BatchNorm"
        bn = nodes[act.inputs[0]]
        if bn.kind != "bn":
            return None, f"the ReLU before {conv.module} takes {_describe(bn)}, not a BatchNorm"
        triples.append((bn.module, conv.inputs[0], conv.module))
        source = nodes[bn.inputs[0]]
        if source.kind == "input":
            if len(triples) < 2:
                return None, f"its residual branch is the single convolution {conv.module}"
            return triples[::-1], None
        if source.kind != "conv":
            return None, f"{bn.module} takes {_describe(source)}, not the input or a convolution"
        at = bn.inputs[0]


def _shortcut(nodes: list[_Node], at: int, first_relu: int):
    node = nodes[at]
    if node.kind == "input":
        return ("identity", None), None
    if node.kind == "conv":
        if node.inputs[0] == 0:
            return ("raw_projection", node.module), None
        if node.inputs[0] == first_relu:
            return ("projection", node.module), None
        return None, f"its shortcut convolves {_describe(nodes[node.inputs[0]])}"
    return None, f"its shortcut is {_describe(node)}, not the input or a 1x1 projection"


def _match(nodes: list[_Node], out: int) -> tuple[Optional[UnitMatch], Optional[str]]:
    total = nodes[out]
    reasons = []
    for branch_end, shortcut_end in (total.inputs, total.inputs[::-1]):
        triples, why = _branch(nodes, branch_end)
        if triples is None:
            reasons.append(((nodes[branch_end].kind == "conv") + (nodes[branch_end].kind != "input"), why))
            continue
        shortcut, why = _shortcut(nodes, shortcut_end, triples[0][1])
        if shortcut is None:
            reasons.append((2, why))
            continue
        return UnitMatch(bns=tuple(t[0] for t in triples), convs=tuple(t[2] for t in triples),
                         shortcut=shortcut[0], shortcut_conv=shortcut[1]), None
    # the reason from the side that looked like a branch, dropout first (the most specific)
    reasons.sort(key=lambda r: (not r[1].startswith("it applies dropout"), -r[0]))
    return None, reasons[0][1]


def _check_calls(nodes: list[_Node], match: UnitMatch, module: nn.Module) -> Optional[str]:
    """Each BN and conv runs once, with its own module's settings."""
    convs = match.convs + ((match.shortcut_conv,) if match.shortcut_conv else ())
    for path in match.bns + convs:
        if path is None:
            return "a BatchNorm or convolution it runs is not one of its submodules"
        calls = [n for n in nodes if n.module == path and n.kind in ("bn", "conv")]
        if len(calls) != 1:
            return f"it runs {path} {len(calls)} times"
        sub, call = module.get_submodule(path), calls[0]
        if call.kind == "bn":
            if call.extra["training"] is not None and call.extra["training"] != (
                    sub.training or sub.running_mean is None):
                return f"it calls {path} in another mode than the module's"
            if sub.eps not in call.extra["floats"]:
                return f"it calls {path} with another eps than the module's"
        else:
            expected = {"stride": tuple(sub.stride), "padding": tuple(sub.padding) if not isinstance(sub.padding, str)
                        else call.extra["padding"], "dilation": tuple(sub.dilation), "groups": sub.groups,
                        "bias": sub.bias is not None, "transposed": False}
            if any(call.extra[k] != v for k, v in expected.items()):
                return f"it calls {path} with other settings than the module's"
    return None


def recognize(module: nn.Module, in_channels: int) -> Recognition:
    """Record ``module`` on a random float64 input of ``in_channels`` channels and match it.

    Runs a float64 CPU copy in training mode (so dropout shows), under the global
    random state's fork (the caller's random stream is left as it was)."""
    replica = float64_copy(module)
    replica.train()
    owners = {}
    for path, sub in replica.named_modules():
        for attr, t in list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False)):
            if t is not None and t.numel():
                owners[t.untyped_storage().data_ptr()] = (path, attr)
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, in_channels, SAMPLE_SIZE, SAMPLE_SIZE, generator=generator, dtype=torch.float64)
    recorder = _Recorder(owners)
    recorder.track(x, _Node("input"))
    with torch.random.fork_rng(devices=[]), torch.no_grad():
        try:
            with recorder:
                y = replica(x)
        except Exception as error:   # not a unit of this input: its forward says why
            first_line = (str(error).splitlines() or [""])[0]
            return Recognition(False, reason=f"it does not run on a ({', '.join(map(str, x.shape))}) input: "
                                             f"{type(error).__name__}: {first_line}")
    nodes = recorder.nodes
    if not isinstance(y, torch.Tensor) or _key(y) not in recorder.values:
        return Recognition(False, reason="its output does not come from its input through operators it runs")
    out = recorder.values[_key(y)]
    final = nodes[out]
    if final.kind != "add":
        before = nodes[final.inputs[0]] if len(final.inputs) == 1 else None
        if before is not None and before.kind == "add":
            return Recognition(True, reason=f"its output is {_describe(final)} of the residual sum, not the sum "
                                            f"itself (the fused unit is a full pre-activation unit)")
        return Recognition(False, reason=f"its output is {_describe(final)}, not a residual sum")
    if recorder.values.get(_key(x)) != 0:
        return Recognition(True, reason="it modifies its input in place")
    match, reason = _match(nodes, out)
    if match is None:
        return Recognition(True, reason=reason)
    reason = _check_calls(nodes, match, replica)
    if reason is not None:
        return Recognition(True, reason=reason)
    return Recognition(True, match=match)
