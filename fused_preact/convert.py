"""``convert_to_fused``: put fused units in the place of a model's eager residual units.

Which modules are units, and what they compute, is decided by the computation,
not the class (``recognize``): any module holding, anywhere in its subtree, a few
normalization layers and convs, whose recorded run from its input to its output is a full
pre-activation unit -- basic or bottleneck, stride on the first 1x1 or the 3x3,
shortcut identity, 1x1 projection of the pre-activated input, or 1x1 projection of
the raw input (bare conv or inside an ``nn.Sequential``), convs with their own
padding or behind an explicit zero pad of H/W (TensorFlow's "SAME", run as the
fused unit's per-side ``conv_padding``) -- is replaced by a ``converted.ConvertedUnit``
that holds that very module's submodules, parameters, buffers and hooks under their own
names (the same dictionaries), and runs its ``forward`` as its eager computation. So
``named_parameters``, ``named_modules``, ``state_dict``, ``get_submodule`` and
``functional_call`` with the original names, checkpoints (``strict=True`` both ways) and an
optimizer built before the conversion all work as before. Nesting does not matter
(pytorchcv's ``PreResUnit`` keeps its BN and conv two levels down, in ``body.conv1.bn`` ...,
and its body returns a tuple): the walk goes from the model down, and the module fused is
the smallest that computes the whole unit, input to residual sum; a module whose sum is
one of its children's (an ``nn.Sequential`` of units, a wrapper) is walked into.

Original (post-activation) units -- ``relu(bn_n(conv_n(...)) + s)`` with ``s`` the
input, its zero-padded subsample (option A, zeros before and/or after x's channels), a 1x1 conv or a
1x1 conv + BN (torchvision's ``BasicBlock`` / ``Bottleneck``, CIFAR ports) -- are fused the
same way; grouped (ResNeXt) and dilated convs stay eager, with that reason. BatchNorms may be
``nn.SyncBatchNorm`` (before or after ``init_process_group``): the fused unit synchronizes them.

Two kinds are known by class: this project's ``PreActBlock`` / ``PreActBottleneck`` /
``OriginalBlock`` / ``OriginalBottleneck`` become their fused twins (``fused.fused_twin``: a
new object of the fused subclass holding the same dictionaries), and timm's ``resnetv2``
units (whose BN-act layers the recording would not see as a plain BatchNorm) a
``ConvertedUnit`` with timm's own names. No class is changed in place, and no state_dict
hook renames anything. A hook on a module inside a unit makes that unit run its eager
computation while the hook is there (``unit_hooks``).

Every distinct unit configuration is then checked once (``unit_guard``): original
and fused copies in float64 on the CPU, training and eval. A unit that fails, or
that computes something else, stays as it is, and ``convert_to_fused`` says so:
one line "N of M residual units fused" (M: every module found computing a residual
sum, fused or not; a log record when all are, else a RuntimeWarning naming, per
class, each reason once with its count), and the same as a ``ConversionReport``
with ``return_report=True``. Fused units already in the model are checked the same way
with the new ``memory`` mode (and put back eager if that fails).

Where a fused unit's output feeds a fused pre-activation unit in an ``nn.Sequential``
chain, it computes its output's statistics for the next unit (``stats_handoff``).
``unconvert.to_eager`` is the inverse.
"""
from __future__ import annotations

import contextlib
import logging
import warnings
from dataclasses import dataclass, field
from typing import Callable, Optional

import torch
from torch import nn

from . import dispatch, self_check
from .converted import ConvertedUnit, UnitParts
from .fused import FUSED_CLASS, _FusedUnitMixin, fused_twin
from .kernel_view import KERNEL_BATCHNORMS
from .recognize import OriginalUnitMatch, UnitMatch, recognize
from .unit_function import check_memory
from .unit_guard import SAMPLE_SIZE, check_replacement, describe_backend, guard_backend
from .units import BOTTLENECK_EXPANSION, PadShortcut

logger = logging.getLogger(__name__)


@dataclass
class ConversionReport:
    """What ``convert_to_fused`` did.

    ``fused``: paths of the residual units that are fused now; ``left_eager``: path
    -> why that unit stays eager; ``classes``: path -> the original class name of
    every residual unit; ``backend``: the backend the fused units were given;
    ``guard_backend``: who ran the fused copies of the exactness guard (``"cuda"``: the
    C++ CPU kernels; ``"eager"``: what the kernels compute, in eager PyTorch).
    Paths are ``named_modules`` names, ``""`` for the model itself.
    """
    fused: list[str] = field(default_factory=list)
    left_eager: dict[str, str] = field(default_factory=dict)
    classes: dict[str, str] = field(default_factory=dict)
    guard_backend: str = "eager"
    unrecognized: dict[str, str] = field(default_factory=dict)   # conv modules that ran as no residual unit
    backend: str = "auto"

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
        if self.num_fused and self.backend == "eager":
            line += (" with backend='eager': they run their eager PyTorch computation, no fused kernel "
                     "(backend='auto', 'cuda' or 'triton' runs the kernels)")
        if self.num_fused:
            line += (" (each configuration checked in float64 against eager with "
                     f"{describe_backend(self.guard_backend)})")
        if self.left_eager:
            parts = [f"{name} x{count}: {reason}" for name, reasons in self.reasons_by_class().items()
                     for reason, count in reasons.items()]
            line += "; left eager: " + "; ".join(parts)
        if not self.num_units and self.unrecognized:
            line += ("; found no residual unit among the modules holding convolutions: "
                     + "; ".join(f"{path or '(model)'}: {why}" for path, why in self.unrecognized.items()))
        return line

    __str__ = summary


def convert_to_fused(model: nn.Module, backend: str = "auto", *, memory: str = "default",
                     return_report: bool = False):
    """Put a fused unit in the place of every full pre-activation or original unit of ``model``, in place.

    Returns the model (or, when ``model`` is itself a unit, its fused replacement);
    with ``return_report=True``, ``(model, ConversionReport)``. Module paths, parameter and
    buffer names and tensors, outputs, gradients and running statistics stay what they
    were; units that would not compute the same are left eager and named in a
    RuntimeWarning (and the report). ``memory``: what the fused units keep for the
    backward, ``"default"`` or ``"min"`` (their input alone; see ``fused``); fused units
    already in ``model`` get ``backend`` and ``memory`` too, checked as a first conversion.
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
    link_units(model)
    report = converter.report
    if report.left_eager or (not report.num_units and report.unrecognized):
        warnings.warn(report.summary(), RuntimeWarning, stacklevel=2)
    else:
        logger.info(report.summary())
    return (model, report) if return_report else model


def link_units(model: nn.Module) -> None:
    """Let each fused unit whose output feeds a fused pre-activation unit in an ``nn.Sequential``
    chain (nested Sequentials read as one) compute its output statistics for it
    (``stats_handoff``): ``_handoff`` is "sibling" when both are children of one Sequential,
    "chain" across Sequentials; None for every other unit."""
    for m in model.modules():
        if isinstance(m, _FusedUnitMixin):
            m._handoff = None
    for m in model.modules():
        if isinstance(m, nn.Sequential):
            chain = list(_flat_sequence(m, m))
            for (parent, unit), (following_parent, following) in zip(chain, chain[1:]):
                if (isinstance(unit, _FusedUnitMixin) and unit._preactivation()
                        and isinstance(following, _FusedUnitMixin) and following._preactivation()):
                    if unit._handoff != "sibling":
                        unit._handoff = "sibling" if parent is following_parent else "chain"


def _flat_sequence(sequence: nn.Sequential, parent: nn.Sequential):
    """(the Sequential holding it, module) for each module a Sequential runs, nested ones read through."""
    for child in sequence:
        if isinstance(child, nn.Sequential):
            yield from _flat_sequence(child, child)
        else:
            yield parent, child


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


# normalization layers a residual unit may hold (any of them counts it as a unit; the fused
# units take BatchNorms)
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.GroupNorm, nn.LayerNorm, nn.modules.instancenorm._InstanceNorm,
          nn.LocalResponseNorm)
_MAX_CONVS = 8      # a bottleneck with a projection and a squeeze-excitation block, a selective-kernel unit


def _may_be_unit(module: nn.Module) -> bool:
    """Holds convs anywhere in its subtree (nesting does not matter: pytorchcv's ``PreResUnit``
    holds its BNs and convs two levels down), is not itself a conv or a normalization layer, and
    is small enough to be one unit (<= 8 convs, <= 8 normalization layers). Any normalization
    counts (GroupNorm units are residual units too, reported eager with the reason)."""
    if isinstance(module, (nn.modules.conv._ConvNd,) + _NORMS):
        return False
    norms = convs = 0
    for m in module.modules():
        norms += isinstance(m, _NORMS)
        convs += isinstance(m, nn.modules.conv._ConvNd)
        if norms > _MAX_CONVS or convs > _MAX_CONVS:
            return False
    return convs >= 1


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
        self.report = ConversionReport(guard_backend=guard_backend(), backend=backend)
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

    def _left_eager(self, module: nn.Module, path: str, reason: str) -> nn.Module:
        self.report.classes[path] = type(module).__name__
        self.report.left_eager[path] = reason
        return module

    def _verdict(self, module: nn.Module, key: tuple, in_channels: int, build: Callable, size: int) -> Optional[str]:
        """The guard's verdict on ``build(module, backend)`` for this configuration (checked once)."""
        if key not in self._checked:
            twin = lambda copy: build(copy, self.backend, self.memory)   # noqa: E731
            self._checked[key] = (  # float64 on the CPU, then the backend on the model's own device
                check_replacement(module, twin, in_channels, self.report.guard_backend, size)
                or self_check.check_replacement_on_device(module, twin, in_channels, self.backend, size))
        return self._checked[key]

    def _guarded(self, module: nn.Module, path: str, key: tuple, in_channels: int, build: Callable,
                 size: int = SAMPLE_SIZE) -> nn.Module:
        """``build(module, backend, memory)`` if the guard passes for this configuration (on a ``size`` x
        ``size`` sample), else ``module``."""
        verdict = self._verdict(module, key, in_channels, build, size)
        if verdict is not None:
            return self._left_eager(module, path, verdict)
        self.report.classes[path] = type(module).__name__
        self.report.fused.append(path)
        return build(module, self.backend, self.memory)

    def _reconvert(self, unit: _FusedUnitMixin, path: str) -> nn.Module:
        """A fused unit already in the model: checked with this backend and memory mode as a first
        conversion is (from its eager module); given them if that passes, else put back eager."""
        eager = unit.eager_module()
        if isinstance(unit, ConvertedUnit):
            parts, padding = unit._parts, unit.conv_padding

            def build(module, backend, memory):
                return ConvertedUnit(module, parts, backend=backend, memory=memory, conv_padding=padding)
        else:
            build = fused_twin
        key = ("fused", configuration_key(eager), unit.conv_padding)
        verdict = self._verdict(eager, key, unit.in_channels, build, SAMPLE_SIZE)
        name = unit.original_class.__name__ if isinstance(unit, ConvertedUnit) else type(eager).__name__
        self.report.classes[path] = name
        if verdict is not None:
            self.report.left_eager[path] = verdict
            return eager
        unit._set_backend(self.backend)
        unit._set_memory(self.memory)
        self.report.fused.append(path)
        return unit

    def convert(self, module: nn.Module, path: str) -> Optional[nn.Module]:
        """The module that takes ``module``'s place (itself when left eager), or None when it is no unit."""
        if isinstance(module, _FusedUnitMixin):
            return self._reconvert(module, path)
        if type(module) in FUSED_CLASS:
            return self._guarded(module, path, configuration_key(module), module.in_channels, fused_twin)
        if _is_timm_preact_unit(module):
            parts, reason = _timm_parts(module)
            if parts is None:
                return self._left_eager(module, path, reason)
            return self._guarded(module, path, configuration_key(module), parts.in_channels, _builder(parts))
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
        parts_of = _original_parts if isinstance(match, OriginalUnitMatch) else _preact_parts
        parts, padding, reason = parts_of(module, match)
        if parts is None:
            return self._left_eager(module, path, reason)
        return self._guarded(module, path, key, parts.in_channels, _builder(parts, padding), recognition.size)


def _builder(parts: UnitParts, conv_padding=None) -> Callable:
    def build(module: nn.Module, backend: str, memory: str) -> ConvertedUnit:
        return ConvertedUnit(module, parts, backend=backend, memory=memory, conv_padding=conv_padding)
    return build


def _norm_width(m: nn.Module) -> Optional[int]:
    if isinstance(m, (nn.modules.batchnorm._BatchNorm, nn.modules.instancenorm._InstanceNorm)):
        return m.num_features
    return m.num_channels if isinstance(m, nn.GroupNorm) else None


def _recognize_any_width(module: nn.Module):
    """Recognize with the input width of the first normalization layer, else of the first conv, else
    the other widths its layers take (a selective-kernel unit's first conv takes half its input)."""
    first_bn = next((w for w in map(_norm_width, module.modules()) if w is not None), None)
    convs = [m.in_channels for m in module.modules() if isinstance(m, nn.Conv2d)]
    norms = [w for w in map(_norm_width, module.modules()) if w is not None]
    widths = list(dict.fromkeys([w for w in (first_bn, convs[0] if convs else None) if w is not None]
                                + convs + norms))
    first = None
    for width in widths:
        recognition = recognize(module, width)
        if recognition.residual or recognition.match is not None:
            return recognition
        first = first or recognition
    return first


# -- a recognized unit ---------------------------------------------------------------
def _batchnorm_reason(bn: nn.Module, path: str) -> Optional[str]:
    if type(bn) not in KERNEL_BATCHNORMS:
        return f"{path} is a {type(bn).__name__}, not a plain nn.BatchNorm2d or nn.SyncBatchNorm"
    return None


def _preact_parts(unit: nn.Module, match: UnitMatch):
    """(parts, conv_padding, None) of a recognized pre-activation unit, or (None, None, why it
    cannot be fused)."""
    convs = [unit.get_submodule(p) for p in match.convs]
    for path in match.bns:
        reason = _batchnorm_reason(unit.get_submodule(path), path)
        if reason:
            return None, None, reason
    for path, conv, pad in zip(match.convs, convs, match.pads or (None,) * len(convs)):
        reason = _plain_conv_reason(conv, path) if pad is None else _padded_conv_reason(conv, path, pad)
        if reason:
            return None, None, reason
    shape, reason = _branch_shape(convs)
    if shape is None:
        return None, None, reason
    stride, _, _, in_channels, _ = shape
    if match.shortcut_conv:    # also a projection where the shape does not change
        shortcut = unit.get_submodule(match.shortcut_conv)
        reason = _plain_conv_reason(shortcut, match.shortcut_conv)
        if reason or shortcut.kernel_size != (1, 1) or shortcut.stride != (stride, stride):
            return None, None, reason or f"its shortcut {match.shortcut_conv} is not a 1x1 conv of stride {stride}"
    parts = UnitParts(convs=match.convs, bns=match.bns, preact=True, stride=stride, in_channels=in_channels,
                      shortcut=match.shortcut_conv, shares_preact=match.shortcut == "projection")
    padding = None
    if match.pads is not None:     # the explicit pads plus the convs' own, run by the fused unit
        padding = tuple(_total_padding(conv, pad) for conv, pad in zip(convs, match.pads))
    return parts, padding, None


# -- a recognized original (post-activation) unit -------------------------------------
def _dense_conv_reason(conv: nn.Module, name: str) -> Optional[str]:
    """Why ``conv`` is no plain dense conv, naming grouped (ResNeXt) and dilated convs as such."""
    if isinstance(conv, nn.Conv2d) and conv.groups != 1:
        return (f"{name} is a grouped convolution (groups={conv.groups}, as in ResNeXt): the fused kernels "
                f"compute dense convolutions")
    if isinstance(conv, nn.Conv2d) and conv.dilation != (1, 1):
        return f"{name} is a dilated convolution (dilation={conv.dilation}): the fused kernels do not dilate"
    return _plain_conv_reason(conv, name)


def _original_parts(unit: nn.Module, match: OriginalUnitMatch):
    """(parts, None, None) of a recognized original unit, or (None, None, why it cannot be fused)."""
    bn_paths = match.bns + ((match.shortcut_bn,) if match.shortcut_bn else ())
    conv_paths = match.convs + ((match.shortcut_conv,) if match.shortcut_conv else ())
    for path in bn_paths:
        reason = _batchnorm_reason(unit.get_submodule(path), path)
        if reason:
            return None, None, reason
    for path in conv_paths:
        reason = _dense_conv_reason(unit.get_submodule(path), path)
        if reason:
            return None, None, reason
    convs = [unit.get_submodule(p) for p in match.convs]
    shape, reason = _branch_shape(convs)
    if shape is None:
        return None, None, reason
    stride, _, _, in_channels, out_channels = shape
    shortcut = unit.get_submodule(match.shortcut_conv) if match.shortcut_conv else None
    if shortcut is not None and (shortcut.kernel_size != (1, 1) or shortcut.stride != (stride, stride)):
        return None, None, f"its shortcut {match.shortcut_conv} is not a 1x1 conv of stride {stride}"
    pad = None
    if match.shortcut == "pad":      # zero channels in front of x's too, as CIFAR ports pad
        if match.pad_stride != stride or in_channels + match.pad_front + match.pad_back != out_channels:
            return None, None, (f"its option-A shortcut (stride {match.pad_stride}, {match.pad_front} + "
                                f"{match.pad_back} channels added) does not give the branch's shape")
        pad = PadShortcut(in_channels, out_channels, stride, front_channels=match.pad_front)
    parts = UnitParts(convs=match.convs, bns=match.bns, preact=False, stride=stride, in_channels=in_channels,
                      shortcut=match.shortcut_conv, shortcut_bn=match.shortcut_bn, pad_shortcut=pad)
    return parts, None, None


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


def _timm_parts(unit: nn.Module):
    """(parts of a timm resnetv2 unit, None) or (None, why it cannot be fused)."""
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
    if sum(s != 1 for s in strides) > 1 or stride not in (1, 2):
        return None, f"its strides {strides} are not one stride of 1 or 2"
    downsample = unit.downsample
    changes_shape = stride != 1 or in_channels != out_channels
    if changes_shape != (downsample is not None):
        return None, "its shortcut does not match its shape change"
    if downsample is not None:
        reason = _plain_conv_reason(downsample.conv, "downsample.conv")
        if reason or not isinstance(getattr(downsample, "norm", None), nn.Identity) \
                or downsample.conv.stride[0] != stride:
            return None, reason or "its downsample is not a bare pre-activated 1x1 projection"
    parts = UnitParts(convs=tuple(f"conv{i}" for i in names), bns=tuple(f"norm{i}" for i in names), preact=True,
                      stride=stride, in_channels=in_channels,
                      shortcut="downsample.conv" if downsample is not None else None,
                      shares_preact=downsample is not None,
                      norm_types=tuple(dict.fromkeys(KERNEL_BATCHNORMS + tuple(type(n) for n in norms))))
    return parts, None
