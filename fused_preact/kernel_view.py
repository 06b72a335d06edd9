"""What the fused unit autograd code reads of a unit, resolved from the module at each call.

``unit_function.run_fused_unit(backend, unit, x, ...)`` reads a unit only through these
attributes: ``num_convs``, ``conv1..convN``, ``bn1..bnN``, ``shortcut`` (1x1 conv or
None), ``shortcut_bn`` (or None), ``pad_shortcut`` (or None; ``.extra_channels``,
``.front_channels``), ``preact``, ``shares_preact``, ``stride``, ``in_channels``,
``conv_padding``, ``memory``, ``stats_group``. A ``KernelView`` holds exactly those, taken
from a fused unit when it runs, so the kernels see what the module holds now: a BN the
user replaced by an ``nn.SyncBatchNorm`` after conversion, a module moved to another
device. A fused unit made from a user's module keeps that module's own names (its
``downsample.0`` is the view's ``shortcut``), and the view maps them.

Two things are adapted on the way, both exact:

- a BN without affine parameters (``affine=False``) is handed over as ``weight = 1``,
  ``bias = 0`` (what it computes), so the kernels, which scale and shift, run it;
- the statistics group (``stats_group``): the group ``sync_batch_stats`` set on the unit,
  else, when the unit's BNs are ``nn.SyncBatchNorm`` and a process group is initialized,
  theirs (``process_group``, or the whole world), so a unit of synchronized BNs
  synchronizes through the fused path as eager ``SyncBatchNorm`` does.

A fused unit's ``_kernel_view(x)`` (``fused.FusedUnitMixin``) returns the view, or why the fused
path cannot run the unit as it is now (a submodule that is no plain conv or BN any more, BNs
synchronized over different groups); the unit then runs its eager computation.
``reference_forward`` is what the kernels compute on those modules, in eager PyTorch.
"""
from __future__ import annotations

from typing import NamedTuple, Optional, Sequence, Union

import torch
import torch.nn.functional as F
from torch import nn

_BatchNorm = nn.modules.batchnorm._BatchNorm


class UnitPieces(NamedTuple):
    """A fused unit's modules and shape as the kernels take them, looked up at one call."""
    convs: tuple            # the branch convs, in the order they run
    bns: tuple              # bns[i] belongs to convs[i]
    shortcut: Optional[nn.Module]       # the 1x1 projection conv
    shortcut_bn: Optional[nn.Module]    # its BN (original units)
    pad_shortcut: object                # option A (``.extra_channels``, ``.front_channels``), or None
    preact: bool
    shares_preact: bool
    stride: int
    in_channels: int
    norm_types: tuple       # the BatchNorm classes the kernels may take for this unit

    def norms(self) -> tuple:
        """Every BatchNorm of the unit, the shortcut's included."""
        return self.bns if self.shortcut_bn is None else self.bns + (self.shortcut_bn,)

    def cannot_run(self) -> Optional[str]:
        """Why the kernels cannot take these modules, or None."""
        if all(type(c) is nn.Conv2d for c in self.convs) and (
                self.shortcut is None or type(self.shortcut) is nn.Conv2d) and all(
                type(bn) in self.norm_types for bn in self.norms()):
            return None
        roles = [(c, f"conv {i}") for i, c in enumerate(self.convs, start=1)]
        for conv, role in roles + [(self.shortcut, "shortcut projection")]:
            reason = None if conv is None else plain_conv_reason(conv, role)
            if reason:
                return reason
        for i, bn in enumerate(self.norms(), start=1):
            reason = batchnorm_reason(bn, "shortcut BatchNorm" if i > len(self.bns) else f"BatchNorm {i}",
                                      self.norm_types)
            if reason:
                return reason
        return None


class KernelView:
    """The attributes the unit autograd code reads (see the module docstring)."""

    def __init__(self, *, convs: Sequence[nn.Module], bns: Sequence[object], shortcut: Optional[nn.Module],
                 shortcut_bn: Optional[object], pad_shortcut, preact: bool, shares_preact: bool, stride: int,
                 in_channels: int, conv_padding, memory: str, stats_group):
        self.num_convs = len(convs)
        for i, (conv, bn) in enumerate(zip(convs, bns), start=1):
            setattr(self, f"conv{i}", conv)
            setattr(self, f"bn{i}", bn)
        self.shortcut = shortcut
        self.shortcut_bn = shortcut_bn
        self.pad_shortcut = pad_shortcut
        self.preact = preact
        self.shares_preact = shares_preact
        self.stride = stride
        self.in_channels = in_channels
        self.conv_padding = conv_padding
        self.memory = memory
        self.stats_group = stats_group


# the autograd code names the unit in its messages by ``type(unit).__name__``: one view class per
# fused class, of that name (made here, once, not while torch.compile traces)
FUSED_CLASS_NAMES = ("FusedPreActBlock", "FusedPreActBottleneck", "FusedOriginalBlock", "FusedOriginalBottleneck",
                     "ConvertedUnit")
_VIEW_CLASSES = {name: type(name, (KernelView,), {"__module__": __name__, "__qualname__": f"views.{name}"})
                 for name in FUSED_CLASS_NAMES}


def view_class(unit_class_name: str) -> type:
    """The ``KernelView`` class named after a fused unit class (``KernelView`` for another name)."""
    return _VIEW_CLASSES.get(unit_class_name, KernelView)


class UnitScaleBatchNorm:
    """A BN without affine parameters as the kernels take it: ``weight = 1``, ``bias = 0`` (made
    on each call, in the dtype and on the device of the BN's running statistics or of ``like``),
    its own running statistics and settings."""

    def __init__(self, bn: _BatchNorm, like: torch.Tensor):
        reference = bn.running_mean if bn.running_mean is not None else like
        self.weight = torch.ones(bn.num_features, dtype=reference.dtype, device=reference.device)
        self.bias = torch.zeros(bn.num_features, dtype=reference.dtype, device=reference.device)
        self.running_mean, self.running_var = bn.running_mean, bn.running_var
        self.num_batches_tracked = bn.num_batches_tracked
        self.training, self.track_running_stats = bn.training, bn.track_running_stats
        self.momentum, self.eps, self.num_features = bn.momentum, bn.eps, bn.num_features


def kernel_batchnorm(bn: _BatchNorm, like: torch.Tensor):
    """``bn`` as the kernels take it (see ``UnitScaleBatchNorm``)."""
    return bn if bn.affine else UnitScaleBatchNorm(bn, like)


def _distributed() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def synchronized_bn_group(bns: Sequence[nn.Module]) -> Union[None, object, str]:
    """The process group the unit's ``nn.SyncBatchNorm`` modules synchronize over: None when
    none is a SyncBatchNorm or no process group is initialized (then they compute as plain BNs);
    a string saying why not when only some are, or over different groups."""
    if not any(isinstance(bn, nn.SyncBatchNorm) for bn in bns):
        return None
    synced = [bn for bn in bns if isinstance(bn, nn.SyncBatchNorm)]
    if len(synced) != len(bns):
        plain = [type(bn).__name__ for bn in bns if not isinstance(bn, nn.SyncBatchNorm)]
        return (f"{len(synced)} of its {len(bns)} BatchNorms are nn.SyncBatchNorm and the others "
                f"({', '.join(sorted(set(plain)))}) are not, and the fused kernels synchronize all of a unit's "
                f"BatchNorms or none")
    if not _distributed():
        return None
    groups = {id(bn.process_group): bn.process_group for bn in synced}
    if len(groups) > 1:
        return "its nn.SyncBatchNorm modules synchronize over different process groups"
    group = next(iter(groups.values()))
    return torch.distributed.group.WORLD if group is None else group


def plain_conv_reason(conv: object, role: str) -> Optional[str]:
    """Why ``conv`` (the unit's ``role``) cannot go to the kernels: None for an ``nn.Conv2d``."""
    if type(conv) is not nn.Conv2d:
        return f"its {role} is a {type(conv).__name__}, not an nn.Conv2d"
    return None


# the BatchNorm classes whose computation the kernels are: a plain BN, and a synchronized one
KERNEL_BATCHNORMS = (nn.BatchNorm2d, nn.SyncBatchNorm)


def batchnorm_reason(bn: object, role: str, allowed: tuple = KERNEL_BATCHNORMS) -> Optional[str]:
    """Why ``bn`` (the unit's ``role``) cannot go to the kernels: None for one of the ``allowed``
    classes (exact classes: a subclass may compute something else)."""
    if type(bn) not in allowed:
        names = " or ".join(f"nn.{c.__name__}" if c.__module__.startswith("torch.nn") else c.__name__
                            for c in allowed)
        return f"its {role} is a {type(bn).__name__}, not an {names}"
    return None


def reference_forward(pieces: UnitPieces, conv_padding, x: torch.Tensor) -> torch.Tensor:
    """What the fused kernels compute for a unit, in eager PyTorch, on the very modules they read:
    the exactness guard runs this when no kernel can run on its float64 CPU copy, so the mapping of
    modules is still proven."""
    convs, bns = pieces.convs, pieces.bns

    def conv(i: int, h: torch.Tensor) -> torch.Tensor:
        if conv_padding is None:
            return convs[i](h)
        c = convs[i]
        return F.conv2d(F.pad(h, tuple(conv_padding[i])), c.weight, c.bias, c.stride, 0, c.dilation, c.groups)

    def shortcut(source: torch.Tensor) -> torch.Tensor:
        if pieces.shortcut is not None:
            s = pieces.shortcut(source)
            return pieces.shortcut_bn(s) if pieces.shortcut_bn is not None else s
        if pieces.pad_shortcut is not None:
            return pieces.pad_shortcut(x)
        return x

    if pieces.preact:
        x_preact = F.relu(bns[0](x))
        h = conv(0, x_preact)
        for i in range(1, len(convs)):
            h = conv(i, F.relu(bns[i](h)))
        return shortcut(x_preact if pieces.shares_preact else x) + h
    h = x
    for i in range(len(convs)):
        h = bns[i](conv(i, h))
        if i < len(convs) - 1:
            h = F.relu(h)
    return F.relu(shortcut(x) + h)
