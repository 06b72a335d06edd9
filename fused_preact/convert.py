"""``convert_to_fused``: swap the eager residual units of a model for fused ones.

Which modules are units, and what they compute, is decided by the computation,
not the class (``recognize``): any module holding, anywhere in its subtree, a few
BatchNorms and convs, whose recorded run from its input to its output is a full
pre-activation unit -- basic or bottleneck, stride on the first 1x1 or the 3x3,
shortcut identity, 1x1 projection of the pre-activated input, or 1x1 projection of
the raw input (bare conv or inside an ``nn.Sequential``), convs with their own
padding or behind an explicit zero pad of H/W (TensorFlow's "SAME", run as the
fused unit's per-side ``conv_padding``) -- is replaced by a fused unit that holds its very BatchNorm
and conv modules: the same parameter and buffer tensors (an optimizer built
before the conversion keeps working), and a state_dict with the original's keys
in the original's order, so checkpoints load with ``strict=True`` both ways.
Nesting does not matter (pytorchcv's ``PreResUnit`` keeps its BN and conv two
levels down, in ``body.conv1.bn`` ..., and its body returns a tuple): the walk goes
from the model down, and the module fused is the smallest that computes the whole
unit, input to residual sum; a module whose sum is one of its children's (an
``nn.Sequential`` of units, a wrapper) is walked into.

Original (post-activation) units -- ``relu(bn_n(conv_n(...)) + s)`` with ``s`` the
input, its zero-padded subsample (option A, zeros before and/or after x's channels), a 1x1 conv or a
1x1 conv + BN (torchvision's ``BasicBlock`` / ``Bottleneck``, CIFAR ports) -- become
``FusedOriginalBlock`` / ``FusedOriginalBottleneck`` the same way; grouped (ResNeXt)
and dilated convs stay eager, with that reason.

Two kinds are known by class: this project's ``PreActBlock`` / ``PreActBottleneck`` /
``OriginalBlock`` / ``OriginalBottleneck`` change class in place, and timm's ``resnetv2`` units (whose BN-act layers the
recording would not see as a plain BatchNorm) get a fused unit with timm's key names.

Every distinct unit configuration is then checked once (``unit_guard``): original
and fused copies in float64 on the CPU, training and eval. A unit that fails, or
that computes something else, stays as it is, and ``convert_to_fused`` says so:
one line "N of M residual units fused" (M: every module found computing a residual
sum, fused or not; a log record when all are, else a RuntimeWarning naming, per
class, each reason once with its count), and the same as a ``ConversionReport``
with ``return_report=True``.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from collections import OrderedDict
from dataclasses import dataclass, field
from functools import partial
from typing import Callable, Optional

import torch
from torch import nn

from . import dispatch, self_check
from .fused import (FUSED_CLASS, FusedOriginalBlock, FusedOriginalBottleneck, FusedPreActBlock,
                    FusedPreActBottleneck, _FusedUnitMixin)
from .recognize import OriginalUnitMatch, UnitMatch, recognize
from .unit_function import check_memory
from .unit_guard import HOOK_DICTS, SAMPLE_SIZE, check_replacement, describe_backend, guard_backend
from .units import BOTTLENECK_EXPANSION, PadShortcut

logger = logging.getLogger(__name__)

# our module name -> timm's, for state_dict keys
_TIMM_NAMES = {"bn1": "norm1", "bn2": "norm2", "bn3": "norm3", "shortcut": "downsample.conv"}


@dataclass
class ConversionReport:
    """What ``convert_to_fused`` did.

    ``fused``: paths of the residual units that are fused now; ``left_eager``: path
    -> why that unit stays eager; ``classes``: path -> the original class name of
    every residual unit; ``guard_backend``: who ran the fused copies of the exactness
    guard (``"cuda"``: the C++ CPU kernels; ``"eager"``: the fused class's eager path).
    Paths are ``named_modules`` names, ``""`` for the model itself.
    """
    fused: list[str] = field(default_factory=list)
    left_eager: dict[str, str] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)
    guard_backend: str = "eager"
    unrecognized: dict[str, str] = field(default_factory=dict)   # BN-conv modules that ran as no residual unit

    @property
    def num_fused(self) -> int:
        return len(self.fused)

    @property
    def num_units(self) -> int:
        return len(self.fused) + len(self.left_eager)

    def reasons_by_class(self) -> dict[str, dict[str, int]]:
        """class name -> {reason: number of its units left eager for it}."""
        table: dict[str, dict[str, int]] = {}
        for path, reason in self.left_eager.items():
            per_class = table.setdefault(self.classes[path], {})
            per_class[reason] = per_class.get(reason, 0) + 1
        return table

    def summary(self) -> str:
        line = f"convert_to_fused: {self.num_fused} of {self.num_units} residual units fused"
        if self.num_fused:
            line += (" (each configuration checked in float64 against eager with "
                     f"{describe_backend(self.guard_backend)})")
        if self.left_eager:
            parts = [f"{name} x{count}: {reason}" for name, reasons in self.reasons_by_class().items()
                     for reason, count in reasons.items()]
            line += "; left eager: " + "; ".join(parts)
        if not self.num_units and self.unrecognized:
            line += ("; found no residual unit among the modules holding BatchNorm and Conv2d modules: "
                     + "; ".join(f"{path or '(model)'}: {why}" for path, why in self.unrecognized.items()))
        return line

    __str__ = summary


def convert_to_fused(model: nn.Module, backend: str = "auto", *, memory: str = "default",
                     return_report: bool = False):
    """Replace every eager full pre-activation or original unit of ``model`` by its fused twin, in place.

    Returns the model (or, when ``model`` is itself a unit, its fused replacement);
    with ``return_report=True``, ``(model, ConversionReport)``. Outputs, gradients and
    running statistics stay what they were; units that would not are left eager and
    named in a RuntimeWarning (and the report). ``memory``: what the fused units keep
    for the backward, ``"default"`` or ``"min"`` (their input alone; see ``fused``);
    fused units already in ``model`` get ``backend`` and ``memory`` too.
    """
    dispatch.check_backend(backend)
    check_memory(memory)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    converter = _Converter(backend, memory)
    with _one_thread():
        root = converter.convert(model, "")
        if root is None:
            converter.visit(model, "")
        elif root is not model:
            model = root
    report = converter.report
    if report.left_eager or (not report.num_units and report.unrecognized):
        warnings.warn(report.summary(), RuntimeWarning, stacklevel=2)
    else:
        logger.info(report.summary())
    return (model, report) if return_report else model


# -- the walk over the model --------------------------------------------------------
@contextlib.contextmanager
def _one_thread():
    """The recordings and guard runs are tiny: one thread, as more only contend (measured 8x
    slower with 2 threads on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def _hooked(module: nn.Module, include_self: bool) -> bool:
    """Hooks on the unit's submodules (or on the unit itself, when it is replaced by a new module)."""
    return any(getattr(m, d, None) for m in module.modules() if include_self or m is not module
               for d in HOOK_DICTS)


def _may_be_unit(module: nn.Module) -> bool:
    """Holds, anywhere in its subtree, a BatchNorm and a conv, and is small enough to be one unit
    (<= 4 BNs, <= 8 convs: a bottleneck with a projection and a squeeze-excitation block fits).
    Nesting does not matter: pytorchcv's ``PreResUnit`` holds its BNs and convs two levels down."""
    bns = convs = 0
    for m in module.modules():
        bns += isinstance(m, nn.modules.batchnorm._BatchNorm)
        convs += isinstance(m, nn.modules.conv._ConvNd)
        if bns > 4 or convs > 8:
            return False
    return bns >= 1 and convs >= 1


def configuration_key(module: nn.Module) -> tuple:
    """What decides a unit's computation: classes, modes, scalar settings and tensor shapes of
    the module and its submodules. Units with equal keys compute alike."""
    parts = []
    for name, m in module.named_modules():
        settings = []
        for k, v in vars(m).items():
            if k.startswith("_") or k == "training":
                continue
            if isinstance(v, (bool, int, float, str, type(None))) or (
                    isinstance(v, tuple) and all(isinstance(e, (bool, int, float, str)) for e in v)):
                settings.append((k, v))
            elif isinstance(v, (list, dict, set, tuple)):
                settings.append((k, repr(v)))
            elif not isinstance(v, nn.Module):   # a patched forward, a tensor, an object: this instance's own
                settings.append((k, id(v)))
        tensors = tuple((k, None if t is None else (tuple(t.shape), t.dtype))
                        for k, t in list(m._parameters.items()) + list(m._buffers.items()))
        parts.append((name, type(m), m.training, tuple(sorted(settings, key=lambda kv: kv[0])), tensors))
    return tuple(parts)


class _Converter:
    def __init__(self, backend: str, memory: str = "default"):
        self.backend = backend
        self.memory = memory
        self.report = ConversionReport(guard_backend=guard_backend())
        self._recognized: dict[tuple, object] = {}    # configuration -> Recognition
        self._checked: dict[tuple, Optional[str]] = {}  # configuration -> guard's verdict

    def visit(self, module: nn.Module, prefix: str) -> None:
        for child_name, child in list(module.named_children()):
            path = f"{prefix}.{child_name}" if prefix else child_name
            replacement = self.convert(child, path)
            if replacement is None:
                self.visit(child, path)
            elif replacement is not child:
                setattr(module, child_name, replacement)

    def _with_memory(self, fused: nn.Module) -> nn.Module:
        fused._set_memory(self.memory)
        return fused

    def _left_eager(self, module: nn.Module, path: str, reason: str) -> nn.Module:
        self.report.classes[path] = type(module).__name__
        self.report.left_eager[path] = reason
        return module

    def _fused(self, original: nn.Module, path: str, fused: nn.Module) -> nn.Module:
        self.report.classes[path] = type(original).__name__
        self.report.fused.append(path)
        return fused

    def _guarded(self, module: nn.Module, path: str, key: tuple, in_channels: int,
                 build: Callable[[nn.Module, str], nn.Module], built: Optional[nn.Module] = None,
                 size: int = SAMPLE_SIZE) -> nn.Module:
        """``build(module, backend)`` (or ``built``, the same made already) if the guard passes for
        this configuration (on a ``size`` x ``size`` sample), else ``module``."""
        if _hooked(module, include_self=build is not _change_class):   # a class change keeps its own hooks
            return self._left_eager(module, path, "it has forward or backward hooks, which fused kernels "
                                                  "would not run")
        if key not in self._checked:
            twin = lambda copy: self._with_memory(build(copy, self.backend))   # noqa: E731
            self._checked[key] = (  # float64 on the CPU, then the backend on the model's own device
                check_replacement(module, twin, in_channels, self.report.guard_backend, size)
                or self_check.check_replacement_on_device(module, twin, in_channels, self.backend, size))
        verdict = self._checked[key]
        if verdict is not None:
            return self._left_eager(module, path, verdict)
        original_class = type(module).__name__
        fused = self._with_memory(built if built is not None else build(module, self.backend))
        self.report.classes[path] = original_class
        self.report.fused.append(path)
        return fused

    def convert(self, module: nn.Module, path: str) -> Optional[nn.Module]:
        """The module that takes ``module``'s place (itself when left eager), or None when it is no unit."""
        if isinstance(module, _FusedUnitMixin):
            module._set_backend(self.backend)
            return self._fused(module, path, self._with_memory(module))
        if type(module) in FUSED_CLASS:
            return self._guarded(module, path, configuration_key(module), module.in_channels, _change_class)
        if _is_timm_preact_unit(module):
            fused, reason = _from_timm(module, self.backend)
            if fused is None:
                return self._left_eager(module, path, reason)
            return self._guarded(module, path, configuration_key(module), module.conv1.in_channels,
                                 lambda unit, backend: _from_timm(unit, backend)[0], fused)
        if not _may_be_unit(module):
            return None
        key = configuration_key(module)
        if key not in self._recognized:
            self._recognized[key] = _recognize_any_width(module)
        recognition = self._recognized[key]
        if recognition.inner is not None:    # its residual sum is a child's: the unit is further down
            return None
        if not recognition.residual:
            if recognition.reason:
                self.report.unrecognized[path] = recognition.reason
            return None
        if recognition.match is None:
            return self._left_eager(module, path, recognition.reason)
        match = recognition.match
        build = _from_original_match if isinstance(match, OriginalUnitMatch) else _from_match
        fused, reason = build(module, match, self.backend)
        if fused is None:
            return self._left_eager(module, path, reason)
        return self._guarded(module, path, key, module.get_submodule(match.convs[0]).in_channels,
                             lambda unit, backend: build(unit, match, backend)[0], fused,
                             recognition.size)


def _recognize_any_width(module: nn.Module):
    """Recognize with the input width of the first BatchNorm, else of the first conv."""
    first_bn = next((m.num_features for m in module.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)),
                    None)
    first_conv = next((m.in_channels for m in module.modules() if isinstance(m, nn.Conv2d)), None)
    widths = list(dict.fromkeys(w for w in (first_bn, first_conv) if w is not None))
    first = None
    for width in widths:
        recognition = recognize(module, width)
        if recognition.residual or recognition.match is not None:
            return recognition
        first = first or recognition
    return first


def _change_class(unit: nn.Module, backend: str) -> nn.Module:
    unit.__class__ = FUSED_CLASS[type(unit)]
    unit._set_backend(backend)
    return unit


# -- a recognized unit ---------------------------------------------------------------
def _from_match(unit: nn.Module, match: UnitMatch, backend: str):
    """(fused unit holding ``unit``'s BN and conv modules, None) or (None, why it cannot be)."""
    bns = [unit.get_submodule(p) for p in match.bns]
    convs = [unit.get_submodule(p) for p in match.convs]
    for path, bn in zip(match.bns, bns):
        if type(bn) is not nn.BatchNorm2d:
            return None, f"{path} is a {type(bn).__name__}, not a plain nn.BatchNorm2d"
        if not bn.affine:
            return None, f"{path} has no affine parameters (affine=False)"
    for path, conv, pad in zip(match.convs, convs, match.pads or (None,) * len(convs)):
        reason = _plain_conv_reason(conv, path) if pad is None else _padded_conv_reason(conv, path, pad)
        if reason:
            return None, reason
    shape, reason = _branch_shape(convs)
    if shape is None:
        return None, reason
    stride, bottleneck, stride_on, in_channels, out_channels = shape
    shortcut = unit.get_submodule(match.shortcut_conv) if match.shortcut_conv else None
    if shortcut is not None:
        reason = _plain_conv_reason(shortcut, match.shortcut_conv)
        if reason or shortcut.kernel_size != (1, 1) or shortcut.stride != (stride, stride):
            return None, reason or f"its shortcut {match.shortcut_conv} is not a 1x1 conv of stride {stride}"
    state = list(unit.state_dict(keep_vars=True))

    projection = "raw" if match.shortcut == "raw_projection" else "B"
    with torch.device("meta"):
        if bottleneck:
            fused = FusedPreActBottleneck(in_channels, out_channels, stride, projection,
                                          stride_on=stride_on, backend=backend)
        else:
            fused = FusedPreActBlock(in_channels, out_channels, stride, projection, backend=backend)
    ours_to_theirs = {}
    for i, (path, bn) in enumerate(zip(match.bns, bns), start=1):
        setattr(fused, f"bn{i}", bn)
        ours_to_theirs[f"bn{i}"] = path
    for i, (path, conv) in enumerate(zip(match.convs, convs), start=1):
        setattr(fused, f"conv{i}", conv)
        ours_to_theirs[f"conv{i}"] = path
    fused.shortcut = shortcut      # also a projection where the shape does not change
    fused.shares_preact = match.shortcut == "projection"
    if match.pads is not None:     # the explicit pads plus the convs' own, run by the fused unit
        fused.conv_padding = tuple(_total_padding(conv, pad) for conv, pad in zip(convs, match.pads))
    if shortcut is not None:
        ours_to_theirs["shortcut"] = match.shortcut_conv
    fused.training = unit.training     # the submodules keep their own modes
    return _with_original_names(fused, unit, ours_to_theirs, state)


# -- a recognized original (post-activation) unit -------------------------------------
def _dense_conv_reason(conv: nn.Module, name: str) -> Optional[str]:
    """Why ``conv`` is no plain dense conv, naming grouped (ResNeXt) and dilated convs as such."""
    if isinstance(conv, nn.Conv2d) and conv.groups != 1:
        return (f"{name} is a grouped convolution (groups={conv.groups}, as in ResNeXt): the fused kernels "
                f"compute dense convolutions")
    if isinstance(conv, nn.Conv2d) and conv.dilation != (1, 1):
        return f"{name} is a dilated convolution (dilation={conv.dilation}): the fused kernels do not dilate"
    return _plain_conv_reason(conv, name)


def _from_original_match(unit: nn.Module, match: OriginalUnitMatch, backend: str):
    """(fused original unit holding ``unit``'s BN and conv modules, None) or (None, why it cannot be).

    As ``_from_match``: built on the meta device, then given the original's modules, in the
    original's module order, with its state_dict names (``downsample.0`` for our ``shortcut``)."""
    bn_paths = match.bns + ((match.shortcut_bn,) if match.shortcut_bn else ())
    conv_paths = match.convs + ((match.shortcut_conv,) if match.shortcut_conv else ())
    for path in bn_paths:
        bn = unit.get_submodule(path)
        if type(bn) is not nn.BatchNorm2d:
            return None, f"{path} is a {type(bn).__name__}, not a plain nn.BatchNorm2d"
        if not bn.affine:
            return None, f"{path} has no affine parameters (affine=False)"
    for path in conv_paths:
        reason = _dense_conv_reason(unit.get_submodule(path), path)
        if reason:
            return None, reason
    convs = [unit.get_submodule(p) for p in match.convs]
    shape, reason = _branch_shape(convs)
    if shape is None:
        return None, reason
    stride, bottleneck, stride_on, in_channels, out_channels = shape
    shortcut = unit.get_submodule(match.shortcut_conv) if match.shortcut_conv else None
    if shortcut is not None and (shortcut.kernel_size != (1, 1) or shortcut.stride != (stride, stride)):
        return None, f"its shortcut {match.shortcut_conv} is not a 1x1 conv of stride {stride}"
    if match.shortcut == "pad" and (match.pad_stride != stride
                                    or in_channels + match.pad_front + match.pad_back != out_channels):
        return None, (f"its option-A shortcut (stride {match.pad_stride}, {match.pad_front} + {match.pad_back} "
                      f"channels added) does not give the branch's shape")
    state = list(unit.state_dict(keep_vars=True))

    projection = "A" if match.shortcut == "pad" else "B"
    with torch.device("meta"):
        if bottleneck:
            fused = FusedOriginalBottleneck(in_channels, out_channels, stride, projection,
                                            stride_on=stride_on,
                                            shortcut_bn=match.shortcut_bn is not None, backend=backend)
        else:
            fused = FusedOriginalBlock(in_channels, out_channels, stride, projection,
                                       shortcut_bn=match.shortcut_bn is not None, backend=backend)
    ours_to_theirs = {}
    for i, (conv_path, bn_path) in enumerate(zip(match.convs, match.bns), start=1):
        setattr(fused, f"conv{i}", unit.get_submodule(conv_path))
        setattr(fused, f"bn{i}", unit.get_submodule(bn_path))
        ours_to_theirs[f"conv{i}"], ours_to_theirs[f"bn{i}"] = conv_path, bn_path
    # a projection where the shape does not change too (a 1x1 conv on every unit)
    fused.shortcut = shortcut
    fused.shortcut_bn = unit.get_submodule(match.shortcut_bn) if match.shortcut_bn else None
    if shortcut is not None:
        ours_to_theirs["shortcut"] = match.shortcut_conv
    if match.shortcut_bn:
        ours_to_theirs["shortcut_bn"] = match.shortcut_bn
    if match.shortcut == "pad":      # zero channels in front of x's too, as CIFAR ports pad
        fused.pad_shortcut = PadShortcut(in_channels, out_channels, stride, front_channels=match.pad_front)
    else:
        fused.pad_shortcut = None
    fused.training = unit.training     # the submodules keep their own modes
    return _with_original_names(fused, unit, ours_to_theirs, state)


def _branch_shape(convs: list) -> tuple:
    """((stride, bottleneck, stride_on, in_channels, out_channels), None) of a residual branch that the
    fused units run (3x3-3x3 or 1x1-3x3-1x1, one stride of 1 or 2, not on the last conv), or (None, why not)."""
    kernels = tuple(c.kernel_size[0] for c in convs)
    strides = [c.stride[0] for c in convs]
    stride = max(strides)
    if kernels not in ((3, 3), (1, 3, 1)):
        return None, f"its branch has {'x'.join(map(str, kernels))} convolutions, not 3-3 (basic) or 1-3-1 (bottleneck)"
    if any(c.stride[0] != c.stride[1] for c in convs) or stride not in (1, 2) or sum(s != 1 for s in strides) > 1:
        return None, f"its strides {strides} are not one stride of 1 or 2"
    bottleneck = len(convs) == 3
    if (not bottleneck and strides[1] != 1) or (bottleneck and strides[2] != 1):
        return None, f"its last convolution is strided ({strides})"
    in_channels, out_channels = convs[0].in_channels, convs[-1].out_channels
    if bottleneck and out_channels % BOTTLENECK_EXPANSION:
        return None, f"its bottleneck output of {out_channels} channels is not a multiple of 4"
    return (stride, bottleneck, "1x1" if strides[0] != 1 else "3x3", in_channels, out_channels), None


def _with_original_names(fused: nn.Module, unit: nn.Module, ours_to_theirs: dict[str, str], state: list):
    """(``fused`` with ``unit``'s module order and state_dict names, None), or (None, why not): ``state``
    is the original's state_dict keys, which the fused twin must give back in the same order."""
    # the original's module order, so parameters() and state_dict come out in its order
    positions = {name: i for i, (name, _) in enumerate(unit.named_modules())}
    ours = sorted(ours_to_theirs, key=lambda n: positions[ours_to_theirs[n]])
    fused._modules = OrderedDict([(n, fused._modules[n]) for n in ours]
                                 + [(n, m) for n, m in fused._modules.items() if n not in ours_to_theirs])
    if any(t.is_meta for t in fused.state_dict(keep_vars=True).values()):
        return None, "the fused unit would keep a tensor of its own"
    renames = {n: t for n, t in ours_to_theirs.items() if n != t}
    if renames:
        _keep_state_dict_names(fused, renames)
    if list(fused.state_dict(keep_vars=True)) != state:
        extra = [k for k in state if k not in set(fused.state_dict(keep_vars=True))]
        return None, (f"it holds state the fused unit would not carry ({', '.join(extra[:4])})" if extra
                      else "its state_dict order cannot be kept")
    return fused, None


# -- timm ---------------------------------------------------------------------
def _timm_unit_classes() -> tuple:
    try:
        from timm.models import resnetv2
    except ImportError:
        return ()
    return tuple(getattr(resnetv2, n) for n in ("PreActBasic", "PreActBottleneck") if hasattr(resnetv2, n))


def _is_timm_preact_unit(module: nn.Module) -> bool:
    classes = _timm_unit_classes()
    return bool(classes) and isinstance(module, classes)


def _plain_conv_reason(conv: nn.Module, name: str) -> Optional[str]:
    if type(conv) is not nn.Conv2d:
        return f"{name} is a {type(conv).__name__}, not a plain nn.Conv2d"
    k = conv.kernel_size[0]
    if (conv.bias is not None or conv.groups != 1 or conv.dilation != (1, 1) or conv.kernel_size != (k, k)
            or conv.padding != (k // 2, k // 2) or conv.padding_mode != "zeros"):
        return f"{name} has bias, groups, dilation or padding other than a plain {k}x{k} conv"
    return None


def _total_padding(conv: nn.Conv2d, pad: tuple[int, int, int, int]) -> tuple[int, int, int, int]:
    """(left, right, top, bottom) zero padding of ``conv``'s input: the explicit ``pad`` plus its own."""
    ph, pw = conv.padding
    left, right, top, bottom = pad
    return left + pw, right + pw, top + ph, bottom + ph


def _padded_conv_reason(conv: nn.Module, name: str, pad: tuple[int, int, int, int]) -> Optional[str]:
    """Why ``conv``, run on an explicitly zero-padded input, is no plain conv with per-side padding."""
    if type(conv) is not nn.Conv2d:
        return f"{name} is a {type(conv).__name__}, not a plain nn.Conv2d"
    k = conv.kernel_size[0]
    if (conv.bias is not None or conv.groups != 1 or conv.dilation != (1, 1) or conv.kernel_size != (k, k)
            or isinstance(conv.padding, str) or conv.padding_mode != "zeros"):
        return f"{name} has bias, groups, dilation or padding other than a plain {k}x{k} conv"
    total = _total_padding(conv, pad)
    if any(side > k // 2 for side in total):
        return (f"{name}'s zero padding {total} (left, right, top, bottom; explicit pad {pad} and its own) "
                f"is more than {k // 2} on a side")
    return None


def _bn_relu_reason(norm: nn.Module, name: str) -> Optional[str]:
    if not isinstance(norm, nn.BatchNorm2d):
        return f"{name} is a {type(norm).__name__}, not BatchNorm"
    if type(getattr(norm, "act", None)) is not nn.ReLU:
        return f"{name} is not followed by a ReLU"
    if not isinstance(getattr(norm, "drop", nn.Identity()), nn.Identity):
        return f"{name} applies dropout"
    return None


def _from_timm(unit: nn.Module, backend: str):
    """(fused unit sharing ``unit``'s tensors, None) or (None, why it cannot be fused)."""
    bottleneck = hasattr(unit, "conv3")
    names = ("1", "2", "3") if bottleneck else ("1", "2")
    convs = [getattr(unit, f"conv{i}") for i in names]
    norms = [getattr(unit, f"norm{i}") for i in names]
    for i, (conv, norm) in zip(names, zip(convs, norms)):
        reason = _plain_conv_reason(conv, f"conv{i}") or _bn_relu_reason(norm, f"norm{i}")
        if reason:
            return None, reason
    if not isinstance(unit.drop_path, nn.Identity):
        return None, "it uses stochastic depth (drop_path)"
    in_channels, out_channels = convs[0].in_channels, convs[-1].out_channels
    strides = [conv.stride[0] for conv in convs]
    stride = max(strides)
    if bottleneck and convs[0].out_channels * BOTTLENECK_EXPANSION != out_channels:
        return None, "its bottleneck ratio is not 1/4"
    if bottleneck and strides[2] != 1:
        return None, "its last 1x1 conv is strided"
    downsample = unit.downsample
    changes_shape = stride != 1 or in_channels != out_channels
    if changes_shape != (downsample is not None):
        return None, "its shortcut does not match its shape change"
    if downsample is not None:
        reason = _plain_conv_reason(downsample.conv, "downsample.conv")
        if reason or not isinstance(getattr(downsample, "norm", None), nn.Identity) \
                or downsample.conv.stride[0] != stride:
            return None, reason or "its downsample is not a bare pre-activated 1x1 projection"

    with torch.device("meta"):   # every tensor is replaced by timm's own below: no init, no RNG draws
        if bottleneck:
            fused = FusedPreActBottleneck(in_channels, out_channels, stride,
                                          stride_on="1x1" if strides[0] != 1 else "3x3", backend=backend)
        else:
            fused = FusedPreActBlock(in_channels, out_channels, stride, backend=backend)
    for i, (conv, norm) in zip(names, zip(convs, norms)):
        getattr(fused, f"conv{i}").weight = conv.weight
        setattr(fused, f"bn{i}", _shared_batchnorm(norm))
    if downsample is not None:
        fused.shortcut.weight = downsample.conv.weight
    fused.train(unit.training)
    # timm's module order, so its state_dict keys come out in the same order too
    timm_to_ours = {theirs.split(".")[0]: ours for ours, theirs in _TIMM_NAMES.items()}
    order = [timm_to_ours.get(n, n) for n in unit._modules if timm_to_ours.get(n, n) in fused._modules]
    fused._modules = OrderedDict((n, fused._modules[n]) for n in order + [n for n in fused._modules if n not in order])
    _keep_state_dict_names(fused, _TIMM_NAMES)
    if any(t.is_meta for t in fused.state_dict(keep_vars=True).values()):
        return None, "the fused unit would keep a tensor of its own"
    return fused, None


def _shared_batchnorm(norm: nn.BatchNorm2d) -> nn.BatchNorm2d:
    """A plain BatchNorm2d with ``norm``'s settings that holds ``norm``'s own tensors."""
    bn = nn.BatchNorm2d(norm.num_features, eps=norm.eps, momentum=norm.momentum, affine=norm.affine,
                        track_running_stats=norm.track_running_stats, device="meta")
    for name, tensor in list(norm.named_parameters(recurse=False)) + list(norm.named_buffers(recurse=False)):
        setattr(bn, name, tensor)
    bn.train(norm.training)
    return bn


def _rename(key: str, prefix: str, table: dict[str, str]) -> str:
    """``key`` with its first module name under ``prefix`` renamed by ``table``."""
    if key.startswith(prefix):
        local = key[len(prefix):]
        for old, new in sorted(table.items(), key=lambda kv: -len(kv[0])):   # "a.b" before "a"
            if local.startswith(old + "."):
                return prefix + new + local[len(old):]
    return key


def _save_with_names(renames: dict[str, str], module, state_dict, prefix, local_metadata) -> None:
    items = list(state_dict.items())   # rebuilt in place to keep the key order
    state_dict.clear()
    for key, value in items:
        state_dict[_rename(key, prefix, renames)] = value


def _load_with_names(renames: dict[str, str], module, state_dict, prefix, *args) -> None:
    back = {theirs: ours for ours, theirs in renames.items()}
    for key in [k for k in state_dict if k.startswith(prefix)]:
        new = _rename(key, prefix, back)
        if new != key:
            state_dict[new] = state_dict.pop(key)


def _keep_state_dict_names(module: nn.Module, renames: dict[str, str]) -> None:
    """Make ``module``'s state_dict use ``renames`` (ours -> theirs) for its keys;
    loading accepts both. Hooks are partials of module-level functions, so the
    model still pickles."""
    save, load = partial(_save_with_names, renames), partial(_load_with_names, renames)
    if hasattr(module, "register_state_dict_post_hook"):
        module.register_state_dict_post_hook(save)
        module.register_load_state_dict_pre_hook(load)
    else:   # torch < 2.5
        module._register_state_dict_hook(save)
        module._register_load_state_dict_pre_hook(load, with_module=True)
