"""Recognize a residual unit by what it computes, not by its class: full pre-activation
units (``UnitMatch``) and original, post-activation ones (``OriginalUnitMatch``, below).

``recognize(module, in_channels)`` runs a copy of ``module`` once on a small random
input under a ``TorchDispatchMode`` that records every executed ATen operator and
the data flow between them, then matches that graph against the fused unit's math::

    a1 = relu(bn_1(x))
    h1 = conv_1(a1);  a2 = relu(bn_2(h1));  h2 = conv_2(a2)  [; a3 = relu(bn_3(h2)); h3 = conv_3(a3)]
    y  = h_n + s,     s = x | conv_s(a1) | conv_s(x)

where each ``conv_i`` may take its activation through an explicit zero padding of H
and W (``F.pad``, ``nn.ZeroPad2d``: ``aten.constant_pad_nd`` with value 0), as
TensorFlow-ported code writes "SAME" padding before a ``padding=0`` conv; the match
keeps those pads per conv (``UnitMatch.pads``), and a pad that changes with the
input size (computed from ``x.shape``) is refused;

or the original unit's (a ReLU after the sum; see ``OriginalUnitMatch``)::

    h1 = conv_1(x);  h2 = conv_2(relu(bn_1(h1)))  [; h3 = conv_3(relu(bn_2(h2)))]
    y  = relu(bn_n(h_n) + s),   s = x | pad(x[:, :, ::k, ::k]) | conv_s(x) | bn_s(conv_s(x))

A recording, not a symbolic trace, so Python control flow in ``forward``
(``hasattr(self, "shortcut")``, ``if self.equalInOut``) is simply the branch that
ran. Values are followed through in-place operators (``out += shortcut``,
``nn.ReLU(inplace=True)``, one ReLU module used at several places): an in-place op
gives its tensor a new value in the graph. Batch norms and convolutions are tied to
their modules by the parameter tensors they were called with, so attribute names
never matter. The result names the module's own submodules by their paths, so
one recording serves every unit of the same configuration.

What counts is the module's input and its output: submodules may return tuples
(pytorchcv's ``PreResBlock`` returns ``(x, x_pre_activ)``), the data flow is
followed through them. A module whose residual sum is computed inside one of its
children (an ``nn.Sequential`` of units, a wrapper) only contains a unit:
``Recognition.inner`` names that child, so the smallest module holding the whole
unit is the one fused.
"""
from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Optional

import torch
from torch import nn
from torch.utils import _pytree as pytree
from torch.utils._python_dispatch import TorchDispatchMode

from .unit_guard import SAMPLE_SIZE, float64_copy



class Mismatch(enum.Enum):
    """The kind of reason a side of a residual sum is not the fused unit's branch or shortcut:
    which reason a refusal names, when both sides fail, is chosen by kind, never by wording."""
    DROPOUT = "dropout between the branch's convolutions"     # the most specific: named first
    SHORTCUT = "the other side is a branch, this is no shortcut the fused unit has"
    BRANCH = "no chain of the fused unit's BN, ReLU and conv"
    SINGLE_CONV = "a single convolution (a projection, or a one-conv branch)"


@dataclass(frozen=True)
class Reason:
    """Why a side of the residual sum does not match: its kind, and the words the report gives."""
    kind: Mismatch
    text: str


@dataclass(frozen=True)
class UnitMatch:
    """A module that computes a full pre-activation unit, in terms of its submodules' paths."""
    bns: tuple[str, ...]            # bn_1 .. bn_n, in the order the branch runs them
    convs: tuple[str, ...]          # conv_1 .. conv_n
    shortcut: str                   # "identity" | "projection" (of relu(bn_1(x))) | "raw_projection" (of x)
    shortcut_conv: Optional[str]    # the projection's conv, None for identity
    # explicit zero padding (left, right, top, bottom) of each conv's activated input before the
    # conv (its own padding not included); None when no conv has one
    pads: Optional[tuple[tuple[int, int, int, int], ...]] = None


@dataclass(frozen=True)
class Recognition:
    """What one recorded run says about a module.

    ``residual``: its output is a residual sum (possibly followed by one more
    op, as in post-activation units), so it counts as a residual unit.
    ``match``: how it maps onto a fused unit, or None with ``reason`` saying why not.
    ``inner``: the direct child whose forward computed that residual sum, when it is
    one of the children's (then the module only contains a unit, the child or deeper).
    """
    residual: bool
    match: Optional[UnitMatch | OriginalUnitMatch] = None
    reason: Optional[str] = None
    inner: Optional[str] = None
    size: int = SAMPLE_SIZE         # the input size it was recorded at (the guard checks it there too)


# -- the recording ------------------------------------------------------------------
@dataclass
class _Node:
    kind: str                               # input | bn | relu | conv | pad | add | dropout | random | other
    inputs: tuple[int, ...] = ()
    module: Optional[str] = None            # path of the BN / conv module it ran
    op: str = ""                            # the ATen operator
    extra: dict = field(default_factory=dict)   # call settings that must agree with the module


_RELU_OPS = {"relu", "relu_"}
_ADD_OPS = {"add", "add_"}
_PASSTHROUGH_OPS = {"alias", "detach", "clone", "contiguous", "_to_copy", "lift_fresh"}
_SPLIT_OPS = {"split", "split_with_sizes", "unbind", "chunk", "tensor_split", "unsafe_split",
              "unsafe_split_with_sizes"}
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
        self.child_calls: dict[str, list] = {}   # direct child -> [first node, end node] of each call
        self.running: list[str] = []        # the BatchNorm modules being called (a BN without tensors
                                            # of its own, affine=False and no running statistics)
        self.input: Optional[torch.Tensor] = None

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
        flat = pytree.tree_leaves((args, kwargs))    # the tensors of torch.stack's list too
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
        if isinstance(out, (tuple, list)):
            for extra in out[1:]:
                if not isinstance(extra, torch.Tensor):
                    continue
                if name in _SPLIT_OPS:           # each piece of x is a value of its own
                    self.track(extra, _Node(node.kind, node.inputs, node.module, node.op, dict(node.extra)))
                else:                            # BN's saved statistics etc. are no activations
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
            module = (self._owner(args[1]) or self._owner(args[3] if len(args) > 3 else None)
                      or (self.running[-1] if self.running else None))
            training = next((a for a in args[5:] if isinstance(a, bool)), None)
            floats = [a for a in args[5:] if isinstance(a, float)]
            return _Node("bn", (ids[0],), module, name, extra={"training": training, "floats": floats})
        if name == "convolution" and ids[0] is not None:
            stride, padding, dilation, transposed, _, groups = args[3:9]
            return _Node("conv", (ids[0],), self._owner(args[1]), name,
                         extra={"stride": tuple(stride), "padding": tuple(padding), "dilation": tuple(dilation),
                                "transposed": transposed, "groups": groups, "bias": args[2] is not None})
        if name == "constant_pad_nd" and ids[0] is not None and len(tracked) == 1:
            value = args[2] if len(args) > 2 else kwargs.get("value", 0)
            return _Node("pad", (ids[0],), op=name, extra={"pad": tuple(args[1]), "value": value})
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
        return _Node("other", tuple(tracked), op=name,
                     extra={"args": tuple(a for a in list(args[1:]) + list(kwargs.values())
                                          if not isinstance(a, torch.Tensor))})


def _describe(node: _Node) -> str:
    if node.kind in ("bn", "conv"):
        return f"{node.module or 'a ' + node.kind}"
    if node.kind in ("relu", "add", "dropout", "input"):
        return {"relu": "a ReLU", "add": "a sum", "dropout": "dropout", "input": "the input"}[node.kind]
    if node.op in ("mul", "mul_") and len(node.inputs) == 2:
        return "aten.mul of two computed tensors (a gate or squeeze-excitation scale)"
    return f"aten.{node.op}"


# -- matching ---------------------------------------------------------------------
def _explicit_pad(nodes: list[_Node], at: int, conv_path: Optional[str]):
    """(pad, id of the node it pads, None) for a zero pad of H/W at node ``at``; (None, at, None)
    when ``at`` is no pad; (None, at, why) for a pad the fused unit cannot take."""
    node = nodes[at]
    if node.kind != "pad":
        return None, at, None
    widths, value = node.extra["pad"], node.extra["value"]
    if value != 0:
        return None, at, f"{conv_path} takes a constant pad of value {value}, not a zero padding"
    if len(widths) % 2 or (len(widths) > 4 and any(widths[4:])):
        return None, at, f"{conv_path} takes a pad of dimensions other than H and W ({list(widths)})"
    if any(w < 0 for w in widths):
        return None, at, f"{conv_path} takes a cropping pad (negative widths {list(widths)})"
    left, right, top, bottom = (tuple(widths[:4]) + (0, 0))[:4]
    return (left, right, top, bottom), node.inputs[0], None


_DROPOUT = Reason(Mismatch.DROPOUT, "it applies dropout between its convolutions (the fused unit has no dropout)")


def _branch(nodes: list[_Node], end: int):
    """The (bn, relu node, conv, explicit pad) of each BN-ReLU-[pad-]conv ending at node ``end``,
    first to last, or the reason they are not."""
    triples = []
    at = end
    while True:
        conv = nodes[at]
        if conv.kind != "conv":
            what = f"a BatchNorm ({conv.module})" if conv.kind == "bn" else _describe(conv)
            return None, Reason(Mismatch.BRANCH, f"its residual branch ends in {what}, not a convolution")
        pad, act_id, why = _explicit_pad(nodes, conv.inputs[0], conv.module)
        if why:
            return None, Reason(Mismatch.BRANCH, why)
        act = nodes[act_id]
        if act.kind == "dropout":
            return None, _DROPOUT
        if act.kind != "relu":
            return None, Reason(Mismatch.BRANCH, f"{conv.module} takes {_describe(act)}, not a ReLU of a BatchNorm")
        bn = nodes[act.inputs[0]]
        if bn.kind != "bn":
            return None, Reason(Mismatch.BRANCH,
                                f"the ReLU before {conv.module} takes {_describe(bn)}, not a BatchNorm")
        triples.append((bn.module, act_id, conv.module, pad))
        source = nodes[bn.inputs[0]]
        if source.kind == "input":
            if len(triples) < 2:
                return None, Reason(Mismatch.SINGLE_CONV,
                                    f"its residual branch is the single convolution {conv.module}")
            return triples[::-1], None
        if source.kind != "conv":
            return None, Reason(Mismatch.BRANCH,
                                f"{bn.module} takes {_describe(source)}, not the input or a convolution")
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
    reasons = []     # (how much that side looked like the branch, Reason)
    for branch_end, shortcut_end in (total.inputs, total.inputs[::-1]):
        triples, why = _branch(nodes, branch_end)
        if triples is None:
            # how much this side looks like the branch: a conv, else any op but the input; a lone
            # conv of the pre-activation (a projection, or a single-conv branch) less than an op
            if why.kind is Mismatch.SINGLE_CONV:
                score = 0.5
            else:
                score = (nodes[branch_end].kind == "conv") + (nodes[branch_end].kind != "input")
            reasons.append((score, why))
            continue
        shortcut, why = _shortcut(nodes, shortcut_end, triples[0][1])
        if shortcut is None:
            reasons.append((2, Reason(Mismatch.SHORTCUT, why)))
            continue
        pads = tuple(t[3] or (0, 0, 0, 0) for t in triples) if any(t[3] for t in triples) else None
        return UnitMatch(bns=tuple(t[0] for t in triples), convs=tuple(t[2] for t in triples),
                         shortcut=shortcut[0], shortcut_conv=shortcut[1], pads=pads), None
    # the reason from the side that looked like a branch, dropout first (the most specific)
    reasons.sort(key=lambda r: (r[1].kind is not Mismatch.DROPOUT, -r[0]))
    return None, reasons[0][1].text


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


def _record(replica: nn.Module, owners: dict, in_channels: int, size: int):
    """(recorder, output, None) of one run of ``replica`` on a random (2, C, size, size) float64
    input, with the node range each direct child's calls created; (None, None, why) when it
    does not run."""
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(2, in_channels, size, size, generator=generator, dtype=torch.float64)
    recorder = _Recorder(owners)
    recorder.track(x, _Node("input"))
    handles = []

    def leave(module, args, output):
        recorder.running.pop()
    for path, sub in replica.named_modules():
        if isinstance(sub, nn.modules.batchnorm._BatchNorm) and not sub.affine and sub.running_mean is None:
            def enter(module, args, path=path):
                recorder.running.append(path)
            try:
                handles += [sub.register_forward_pre_hook(enter), sub.register_forward_hook(leave)]
            except RuntimeError:   # a scripted module takes no hooks
                pass
    for name, child in replica.named_children():
        def before(module, args, name=name):
            recorder.child_calls.setdefault(name, []).append([len(recorder.nodes), None])

        def after(module, args, output, name=name):
            recorder.child_calls[name][-1][1] = len(recorder.nodes)
        try:
            handles += [child.register_forward_pre_hook(before), child.register_forward_hook(after)]
        except RuntimeError:   # a scripted child takes no hooks: its calls are not told apart
            pass
    try:
        with torch.random.fork_rng(devices=[]), torch.no_grad():
            with recorder:
                y = replica(x)
    except Exception as error:   # not a unit of this input: its forward says why
        first_line = (str(error).splitlines() or [""])[0]
        return None, None, (f"it does not run on a ({', '.join(map(str, x.shape))}) input: "
                            f"{type(error).__name__}: {first_line}")
    finally:
        for handle in handles:
            handle.remove()
    recorder.input = x
    return recorder, y, None


def _computed_by_child(recorder: _Recorder, node: int) -> Optional[str]:
    """The direct child whose call created ``node``, if any."""
    for name, calls in recorder.child_calls.items():
        if any(first <= node < (end if end is not None else len(recorder.nodes)) for first, end in calls):
            return name
    return None


def _pads(nodes: list[_Node]) -> list:
    return [n.extra["pad"] for n in nodes if n.kind == "pad"]


def recognize(module: nn.Module, in_channels: int) -> Recognition:
    """Record ``module`` on a random float64 input of ``in_channels`` channels and match it.

    Runs a float64 CPU copy in training mode (so dropout shows), under the global
    random state's fork (the caller's random stream is left as it was). A unit with
    explicit padding is recorded once more at another input size, to refuse pads
    computed from the input's shape. Every ``Recognition`` it returns is residual when the
    module's output is a residual sum (one op after it counts too)."""
    replica = float64_copy(module)
    replica.train()
    owners = {}
    for path, sub in replica.named_modules():
        for attr, t in list(sub.named_parameters(recurse=False)) + list(sub.named_buffers(recurse=False)):
            if t is not None and t.numel():
                owners[t.untyped_storage().data_ptr()] = (path, attr)
    # odd first (stride-2 rounding shows); an even size for units that run only there (a static
    # "SAME" pad (0, 1, 0, 1) before a stride-2 conv beside a stride-2 projection)
    size = SAMPLE_SIZE
    recorder, y, why = _record(replica, owners, in_channels, size)
    if recorder is None:
        size = SAMPLE_SIZE + 1
        recorder, y, _ = _record(replica, owners, in_channels, size)
    if recorder is None:
        return Recognition(False, reason=why)
    nodes, x = recorder.nodes, recorder.input
    if isinstance(y, (tuple, list)) and any(isinstance(t, torch.Tensor) for t in y):
        return Recognition(False, reason=f"its output is a {type(y).__name__} of tensors, not one residual sum")
    if not isinstance(y, torch.Tensor) or _key(y) not in recorder.values:
        return Recognition(False, reason="its output does not come from its input through operators it runs")
    out = recorder.values[_key(y)]
    final = nodes[out]
    if final.kind != "add":
        # a residual sum followed by a few one-input ops (the ReLU of an original unit; BN and ReLU
        # after the addition, the paper's Fig. 4(b); another activation): still a residual unit, which
        # the report counts
        after, at = [], out
        while nodes[at].kind in ("relu", "bn", "other") and len(nodes[at].inputs) == 1 and len(after) < 3:
            after.append(nodes[at])
            at = nodes[at].inputs[0]
        if after and nodes[at].kind == "add":
            inner = _computed_by_child(recorder, at)
            # relu(bn_n(h_n) + s): an original (post-activation) unit, unless one child computed both
            # the sum and its ReLU (then that child is the smaller module holding the unit)
            if after == [final] and final.kind == "relu" and (
                    inner is None or _computed_by_child(recorder, out) != inner):
                if recorder.values.get(_key(x)) != 0:
                    return Recognition(True, reason="it modifies its input in place")
                recognition = _recognize_original(nodes, at, replica, size)
                if recognition.match is not None or inner is None:
                    return recognition
            ops = " of ".join(_describe(node) for node in after)
            return Recognition(True, reason=f"its output is {ops} of the residual sum, not the sum itself or its "
                                            f"ReLU (the fused units: full pre-activation and original)", inner=inner)
        return Recognition(False, reason=f"its output is {_describe(final)}, not a residual sum")
    inner = _computed_by_child(recorder, out)
    if inner is not None:
        return Recognition(True, reason=f"its residual sum is computed by its child {inner}", inner=inner)
    if recorder.values.get(_key(x)) != 0:
        return Recognition(True, reason="it modifies its input in place")
    match, reason = _match(nodes, out)
    if match is None:
        return Recognition(True, reason=reason)
    reason = _check_calls(nodes, match, replica)
    if reason is not None:
        return Recognition(True, reason=reason)
    if match.pads is not None:
        other_size = SAMPLE_SIZE + 1 if size == SAMPLE_SIZE else size + 2
        other, _, why = _record(replica, owners, in_channels, other_size)
        if other is None or _pads(other.nodes) != _pads(nodes):
            seen = why or f"{_pads(nodes)} at {size} px, {_pads(other.nodes)} at {other_size} px"
            return Recognition(True, reason=f"its explicit padding depends on the input size ({seen})")
    return Recognition(True, match=match, size=size)


# -- the original (post-activation) unit --------------------------------------------
# He et al. 2015's unit, torchvision's BasicBlock / Bottleneck and the CIFAR ports:
#
#     h1 = conv_1(x);  h2 = conv_2(relu(bn_1(h1)))  [; h3 = conv_3(relu(bn_2(h2)))]
#     y  = relu(bn_n(h_n) + s),   s = x | pad(x[:, :, ::k, ::k]) (option A) | conv_s(x) | bn_s(conv_s(x))
@dataclass(frozen=True)
class OriginalUnitMatch:
    """A module that computes an original (post-activation) unit, in terms of its submodules' paths.

    ``bns[i]`` normalizes ``convs[i]``'s output. The option-A shortcut subsamples x
    by ``pad_stride`` and puts ``pad_front`` zero channels before x's channels and
    ``pad_back`` after them."""
    convs: tuple[str, ...]          # conv_1 .. conv_n
    bns: tuple[str, ...]            # bn_1 .. bn_n
    shortcut: str                   # "identity" | "pad" | "projection" (1x1 conv of x, with or without a BN)
    shortcut_conv: Optional[str] = None
    shortcut_bn: Optional[str] = None
    pad_stride: int = 1
    pad_front: int = 0
    pad_back: int = 0


_FULL_SLICE = (0, None, 1)     # start, end (None: to the end), step of a slice that keeps a whole dim


def _slice_of(node: _Node) -> Optional[tuple[int, int, Optional[int], int]]:
    """(dim, start, end, step) of a recorded ``aten.slice``, end None when it runs to the end."""
    defaults = [0, None, None, 1]         # aten.slice(self, dim=0, start=None, end=None, step=1)
    args = list(node.extra.get("args", ()))[:4]
    dim, start, end, step = args + defaults[len(args):]
    start = 0 if start is None else start
    end = None if end is None or end >= 2 ** 62 else end
    return dim, start, end, step


def _pad_shortcut(nodes: list[_Node], at: int):
    """((stride, front, back), None) when node ``at`` is x subsampled and zero-padded along the
    channels, else (None, why not)."""
    pad = nodes[at]
    widths, value = list(pad.extra["pad"]), pad.extra["value"]
    if len(widths) != 6 or any(widths[:4]) or value != 0 or min(widths[4:]) < 0:
        return None, f"its shortcut pads x by {widths} with {value} (option A pads only channels, with zeros)"
    steps = {}
    at = pad.inputs[0]
    while nodes[at].kind == "other" and nodes[at].op == "slice":
        dim, start, end, step = _slice_of(nodes[at])
        dim = dim % 4
        if dim in steps or (dim in (0, 1) and (start, end, step) != _FULL_SLICE) or start != 0 or end is not None:
            return None, "its shortcut crops or subsamples x other than x[:, :, ::k, ::k]"
        steps[dim] = step
        at = nodes[at].inputs[0]
    if nodes[at].kind != "input":
        return None, f"its zero-padded shortcut takes {_describe(nodes[at])}, not the input"
    stride = steps.get(2, 1)
    if steps.get(3, 1) != stride:
        return None, f"its shortcut subsamples height and width by different steps ({steps})"
    return (stride, widths[4], widths[5]), None


def _original_shortcut(nodes: list[_Node], at: int):
    """(fields of OriginalUnitMatch for the shortcut, None) or (None, why not)."""
    node = nodes[at]
    if node.kind == "input":
        return {"shortcut": "identity"}, None
    if node.kind == "bn" and nodes[node.inputs[0]].kind == "conv":
        conv = nodes[node.inputs[0]]
        if conv.inputs[0] == 0:
            return {"shortcut": "projection", "shortcut_conv": conv.module, "shortcut_bn": node.module}, None
        return None, f"its shortcut convolves {_describe(nodes[conv.inputs[0]])}, not the input"
    if node.kind == "conv":
        if node.inputs[0] == 0:
            return {"shortcut": "projection", "shortcut_conv": node.module}, None
        return None, f"its shortcut convolves {_describe(nodes[node.inputs[0]])}, not the input"
    if node.kind == "pad":
        pad, why = _pad_shortcut(nodes, at)
        if pad is None:
            return None, why
        return {"shortcut": "pad", "pad_stride": pad[0], "pad_front": pad[1], "pad_back": pad[2]}, None
    return None, (f"its shortcut is {_describe(node)}, not the input, a zero-padded subsampled input or a "
                  f"1x1 projection")


def _original_branch(nodes: list[_Node], end: int):
    """The conv-BN pairs of an original unit's branch ending at node ``end`` (first to last), or why not."""
    pairs = []
    at = end
    while True:
        bn = nodes[at]
        if bn.kind != "bn":
            return None, Reason(Mismatch.BRANCH,
                                f"its residual branch ends in {_describe(bn)}, not a BatchNorm of a convolution")
        conv = nodes[bn.inputs[0]]
        if conv.kind != "conv":
            return None, Reason(Mismatch.BRANCH, f"{bn.module} takes {_describe(conv)}, not a convolution")
        pairs.append((conv.module, bn.module))
        source = nodes[conv.inputs[0]]
        if source.kind == "input":
            if len(pairs) < 2:
                return None, Reason(Mismatch.SINGLE_CONV,
                                    f"its residual branch is the single convolution {conv.module}")
            return pairs[::-1], None
        if source.kind == "dropout":
            return None, _DROPOUT
        if source.kind != "relu":
            return None, Reason(Mismatch.BRANCH,
                                f"{conv.module} takes {_describe(source)}, not the input or a ReLU of a BatchNorm")
        at = source.inputs[0]


def _match_original(nodes: list[_Node], total: int) -> tuple[Optional[OriginalUnitMatch], Optional[str]]:
    """Match ``relu(node total)`` with ``total = bn_n(h_n) + s`` against the original unit."""
    reasons = []     # (order, Reason): a shortcut's reason first, else the first side's
    for branch_end, shortcut_end in (nodes[total].inputs, nodes[total].inputs[::-1]):
        pairs, why = _original_branch(nodes, branch_end)
        if pairs is None:
            reasons.append((len(reasons), why))
            continue
        shortcut, why = _original_shortcut(nodes, shortcut_end)
        if shortcut is None:
            reasons.append((-1, Reason(Mismatch.SHORTCUT, why)))   # the other side was a branch
            continue
        return OriginalUnitMatch(convs=tuple(p[0] for p in pairs), bns=tuple(p[1] for p in pairs), **shortcut), None
    reasons.sort(key=lambda r: (r[1].kind is not Mismatch.DROPOUT, r[0]))
    return None, reasons[0][1].text


def _recognize_original(nodes: list[_Node], total: int, replica: nn.Module, size: int) -> Recognition:
    match, reason = _match_original(nodes, total)
    if match is None:
        return Recognition(True, reason=reason)
    bns = match.bns + ((match.shortcut_bn,) if match.shortcut_bn else ())
    reason = _check_calls(nodes, UnitMatch(bns=bns, convs=match.convs, shortcut=match.shortcut,
                                           shortcut_conv=match.shortcut_conv), replica)
    if reason is not None:
        return Recognition(True, reason=reason)
    return Recognition(True, match=match, size=size)
