"""Drop-in fused residual units.

``FusedPreActBlock`` and ``FusedPreActBottleneck`` (full pre-activation) and
``FusedOriginalBlock`` and ``FusedOriginalBottleneck`` (the original,
post-activation unit) take the same constructor arguments as ``PreActBlock`` /
``PreActBottleneck`` / ``OriginalBlock`` / ``OriginalBottleneck`` (plus ``backend``)
and are their subclasses, so they hold the same modules under the same names: a
``state_dict`` saved from either class loads into the other with ``strict=True``.

``backend`` chooses who computes the unit: ``"triton"``, ``"cuda"``, ``"eager"``
or ``"auto"`` (the fastest backend that can run the input; eager, with one
warning, when none can). The choice is made per call from the input, so a unit
built on the CPU can move to a GPU. The backend is not part of the state.

``conv_padding`` (not state either; ``None`` by default) describes nets that pad
explicitly, e.g. ``F.pad`` / ``nn.ZeroPad2d`` before a ``padding=0`` conv, "SAME"
padding of TensorFlow ports included: one ``(left, right, top, bottom)`` per branch
conv (``conv1`` .. ``convN``), the total zero padding of that conv's activated input.
The fused kernels pad per side in their prologue; the eager path runs ``F.pad`` and
the conv without padding. Shortcut projections take no padding.

``memory`` chooses what the fused kernels keep for the backward: ``"default"`` the
unit's input and the raw conv outputs that feed a BN, ``"min"`` the unit's input
alone (plus per-channel statistics): the backward recomputes the rest with the
forward kernels from the saved BN scale and shift, so gradients and running
statistics are those of ``"default"`` (running statistics are updated once, unlike
``torch.utils.checkpoint``, which re-runs BN in training mode). The original units
(``FusedOriginalBlock`` / ``FusedOriginalBottleneck``) take it too: ``"default"`` keeps
x, every conv's raw output h_1 .. h_k, the projection's h_s (with its BN) and the output
y; ``"min"`` keeps x and y (the next unit's input in a chain) and recomputes the rest.
It applies where a fused backend runs the unit; the eager path (``backend="eager"``, or ``"auto"``
falling back to eager) saves what eager PyTorch saves. Not part of the state either.

Every fused unit (these four, and ``converted.ConvertedUnit``, which ``convert_to_fused`` makes
from other codebases' units) shares ``_FusedUnitMixin.forward``:

- hooks on the unit itself run as on any module (the unit returns one tensor); a hook on a
  module inside it makes it run its eager computation while the hook is there, with one
  warning (``unit_hooks``);
- the kernels read the unit through a ``kernel_view.KernelView`` made at each call, so they
  see what the module holds now (a BN replaced by an ``nn.SyncBatchNorm`` after conversion
  synchronizes through the fused path; an ``affine=False`` BN runs fused, exactly);
- a unit whose input is the previous fused unit's output, unchanged, takes that output's
  statistics from it (``stats_handoff``) instead of a pass over x;
- ``_eager_forward(x)`` is the unit's eager PyTorch computation (the fallback, and what the
  fused path is checked against).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch
from torch import nn

from . import dispatch, self_check, stats_handoff
from .kernel_view import (KERNEL_BATCHNORMS, UnitPieces, kernel_batchnorm, reference_forward, synchronized_bn_group,
                          view_class)
from .unit_function import check_memory, process_count
from .unit_hooks import global_hooks, inner_hook
from .units import OriginalBlock, OriginalBottleneck, PreActBlock, PreActBottleneck, check_unit_input

_warned_global_hooks = False
_CONV_NAMES = ("conv1", "conv2", "conv3")
_BN_NAMES = ("bn1", "bn2", "bn3")


class _FusedUnitMixin:
    """Forward through the dispatch layer; the unit's eager computation where it cannot (see the
    module docstring). Subclasses provide ``in_channels``, ``num_convs``, ``_unit_name()``,
    ``_kernel_pieces()`` and ``_eager_forward(x)``."""

    backend: str
    memory: str = "default"
    _stats_group = None      # set by sync_batch_stats
    # set by convert_to_fused (link_units): the next unit takes this unit's output statistics;
    # "sibling" when both are children of one nn.Sequential, "chain" across nested Sequentials
    _handoff: Optional[str] = None
    _eager_reason = None     # why the last call ran eager (one warning per reason in a row)

    # what a fused unit holds beyond the eager unit's state (``to_eager`` leaves it behind)
    FUSED_STATE = ("backend", "memory", "_conv_padding", "_stats_group", "_handoff", "_eager_reason")

    def _set_backend(self, backend: str) -> None:
        self.backend = dispatch.check_backend(backend)

    def _set_memory(self, memory: str) -> None:
        self.memory = check_memory(memory)

    @property
    def conv_padding(self) -> Optional[tuple[tuple[int, int, int, int], ...]]:
        """None (each branch conv pads ``K // 2`` per side) or one ``(left, right, top, bottom)``
        per branch conv: the total zero padding of its activated input (see the module docstring)."""
        return self.__dict__.get("_conv_padding")

    @conv_padding.setter
    def conv_padding(self, value) -> None:
        self._conv_padding = check_conv_padding(value, self.num_convs, self._unit_name())

    @property
    def stats_group(self):
        """The process group the unit's BN statistics are synchronized over, or None: the one
        ``sync_batch_stats`` set, else that of its ``nn.SyncBatchNorm`` modules (when a process group
        is initialized)."""
        if self._stats_group is not None:
            return self._stats_group
        group = synchronized_bn_group(self._kernel_pieces().norms())
        return None if isinstance(group, str) else group

    @stats_group.setter
    def stats_group(self, group) -> None:
        self._stats_group = group

    def _unit_name(self) -> str:
        return type(self).__name__

    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unit's eager PyTorch computation."""
        return super().forward(x)

    def _reference_forward(self, x: torch.Tensor) -> torch.Tensor:
        """What the kernels compute for this unit, in eager PyTorch, on the modules they read
        (``kernel_view.reference_forward``): how the guard proves the mapping without kernels."""
        return reference_forward(self._kernel_pieces(), self.conv_padding, x)

    def eager_module(self) -> nn.Module:
        """The plain PyTorch module this unit stands for, holding the same modules, parameters,
        buffers and hooks (what ``to_eager`` puts back)."""
        return eager_twin(self)

    def _preactivation(self) -> bool:
        """Whether the unit is a full pre-activation unit (its first BN reads its input)."""
        return self.preact

    def _kernel_pieces(self) -> UnitPieces:
        """The unit's modules and shape as the kernels take them (raises LookupError or
        AttributeError naming a submodule that is gone)."""
        state = self.__dict__            # read directly: this runs on every call
        modules = state["_modules"]
        n = state["num_convs"]
        return UnitPieces(tuple(modules[name] for name in _CONV_NAMES[:n]),
                          tuple(modules[name] for name in _BN_NAMES[:n]),
                          modules.get("shortcut", state.get("shortcut")),
                          modules.get("shortcut_bn", state.get("shortcut_bn")),
                          modules.get("pad_shortcut", state.get("pad_shortcut")), self.preact, self.shares_preact,
                          state["stride"], state["in_channels"], KERNEL_BATCHNORMS)

    def _kernel_view(self, x: torch.Tensor):
        """(the ``KernelView`` the kernels read, None), or (None, why the fused path cannot run the
        unit as it is now)."""
        try:
            pieces = self._kernel_pieces()
        except (LookupError, AttributeError) as error:    # a submodule the user deleted
            return None, f"it no longer holds {error.args[0]}"
        reason = pieces.cannot_run()
        if reason is not None:
            return None, reason
        group = self._stats_group
        if group is None:
            group = synchronized_bn_group(pieces.norms())
            if isinstance(group, str):
                return None, group
        bns, shortcut_bn = pieces.bns, pieces.shortcut_bn
        if not all(bn.affine for bn in pieces.norms()):
            like = pieces.convs[0].weight
            bns = [kernel_batchnorm(bn, like) for bn in bns]
            shortcut_bn = None if shortcut_bn is None else kernel_batchnorm(shortcut_bn, like)
        view = view_class(type(self).__name__)(
            convs=pieces.convs, bns=bns, shortcut=pieces.shortcut, shortcut_bn=shortcut_bn,
            pad_shortcut=pieces.pad_shortcut, preact=pieces.preact, shares_preact=pieces.shares_preact,
            stride=pieces.stride, in_channels=pieces.in_channels, conv_padding=self.conv_padding,
            memory=self.memory, stats_group=group)
        return view, None

    def _run_kernels(self, name: str, x: torch.Tensor, stats_in=None, want_stats: bool = False):
        """``dispatch.run_unit`` of backend ``name`` on this unit as it is now (its kernel view):
        ``(y, partials or None)``; for callers other than ``forward`` (a self-check)."""
        view, reason = self._kernel_view(x)
        if view is None:
            raise RuntimeError(f"{self._unit_name()}: the fused kernels cannot run it: {reason}")
        return dispatch.run_unit(name, view, x, stats_in, want_stats)

    def _warn_eager(self, reason: str) -> None:
        if reason != self._eager_reason and not torch.compiler.is_compiling():
            self._eager_reason = reason
            warnings.warn(f"{self._unit_name()} runs its eager PyTorch computation, not the fused kernels: "
                          f"{reason}. It runs fused again once that is no longer so.", RuntimeWarning,
                          stacklevel=3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``y = unit(x)``, fused where the backend and the unit allow, else its eager computation."""
        check_unit_input(x, self.in_channels, self._unit_name())
        if self.backend == "eager" and self._stats_group is None:    # asked for: nothing to check
            return self._eager_forward(x)
        hooked = inner_hook(self)
        view, reason = (None, f"{hooked}, which the fused kernels would not run") if hooked else self._kernel_view(x)
        if view is None:
            self._warn_eager(reason)
            return self._eager_forward(x)
        if self._eager_reason is not None:
            self._eager_reason = None
        _warn_global_hooks()
        group = view.stats_group
        # batch statistics shared across processes: nn.SyncBatchNorm modules, or sync_batch_stats
        synchronized = group is not None and self.training and process_count(group) > 1
        # an empty batch does what eager does (kernels need rows): no kernel runs it
        name = dispatch.resolve_backend(self.backend, x, synchronized=synchronized) if x.numel() else "eager"
        name = self_check.checked_backend(self, x, name)   # eager when this configuration failed its first-use check
        if name == "eager":
            if synchronized and x.numel() and self._stats_group is not None:
                raise RuntimeError(
                    f"{self._unit_name()}: its BN statistics are synchronized across processes "
                    f"(sync_batch_stats), which only the fused kernels do, but this input runs on the eager "
                    f"path (backend={self.backend!r}, x on {x.device}, {x.dtype}). Use a backend that runs it "
                    f"(backend='cuda' or 'triton'), or nn.SyncBatchNorm instead of sync_batch_stats.")
            return self._eager_forward(x)
        compiling = torch.compiler.is_compiling()
        # statistics of x from the previous unit, and of y for the next (see stats_handoff)
        stats_in = None if compiling and self._forward_pre_hooks else stats_handoff.partials_of(x)
        want_stats = self.training and (self._handoff == "sibling" or (self._handoff == "chain" and not compiling))
        if compiling and self._forward_hooks:
            want_stats = False
        y, partials = dispatch.run_unit(name, view, x, stats_in, want_stats)
        if partials is not None:
            stats_handoff.attach(y, partials)
        return y

    def extra_repr(self) -> str:
        padding = "" if self.conv_padding is None else f", conv_padding={self.conv_padding}"
        return f"{super().extra_repr()}, backend={self.backend}, memory={self.memory}{padding}"


def _warn_global_hooks() -> None:
    """One warning per process while global module hooks are registered (see ``unit_hooks``)."""
    global _warned_global_hooks
    if _warned_global_hooks or torch.compiler.is_compiling():
        return
    hooks = global_hooks()
    if hooks:
        _warned_global_hooks = True
        warnings.warn(f"fused-preact: {hooks} registered: fused units run their BatchNorms and convolutions "
                      f"inside fused kernels, so such hooks see each fused unit but not the modules inside it "
                      f"(results are unchanged; a hook registered on one of those modules makes its unit run "
                      f"eager)", RuntimeWarning, stacklevel=4)


def check_conv_padding(value, num_convs: int, unit_name: str) -> Optional[tuple[tuple[int, int, int, int], ...]]:
    """``conv_padding`` checked: None, or ``num_convs`` entries of 4 non-negative ints each."""
    if value is None:
        return None
    entries = tuple(value) if isinstance(value, (tuple, list)) else None
    if entries is None or len(entries) != num_convs:
        raise ValueError(f"{unit_name}: conv_padding must be None or {num_convs} (left, right, top, bottom) "
                         f"tuples, one per branch conv, got {value!r}")
    checked = []
    for i, entry in enumerate(entries, start=1):
        if (not isinstance(entry, (tuple, list)) or len(entry) != 4
                or not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in entry)):
            raise ValueError(f"{unit_name}: conv_padding entry {i} (conv{i}) must be 4 non-negative ints "
                             f"(left, right, top, bottom), got {entry!r}")
        checked.append(tuple(entry))
    return tuple(checked)


class FusedPreActBlock(_FusedUnitMixin, PreActBlock):
    """Fused full pre-activation basic unit; see ``PreActBlock`` for the math."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, projection: str = "B",
                 *, backend: str = "auto", memory: str = "default"):
        super().__init__(in_channels, out_channels, stride, projection)
        self._set_backend(backend)
        self._set_memory(memory)


class FusedPreActBottleneck(_FusedUnitMixin, PreActBottleneck):
    """Fused full pre-activation bottleneck unit; see ``PreActBottleneck`` for the math."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, projection: str = "B",
                 stride_on: str = "1x1", *, backend: str = "auto", memory: str = "default"):
        super().__init__(in_channels, out_channels, stride, projection, stride_on)
        self._set_backend(backend)
        self._set_memory(memory)


class FusedOriginalBlock(_FusedUnitMixin, OriginalBlock):
    """Fused original (post-activation) basic unit; see ``OriginalBlock`` for the math."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, projection: str = "B",
                 *, shortcut_bn: bool = True, shortcut: str = "identity", backend: str = "auto",
                 memory: str = "default"):
        super().__init__(in_channels, out_channels, stride, projection, shortcut_bn=shortcut_bn, shortcut=shortcut)
        self._set_backend(backend)
        self._set_memory(memory)


class FusedOriginalBottleneck(_FusedUnitMixin, OriginalBottleneck):
    """Fused original (post-activation) bottleneck unit; see ``OriginalBottleneck`` for the math."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, projection: str = "B",
                 stride_on: str = "3x3", *, shortcut_bn: bool = True, shortcut: str = "identity",
                 backend: str = "auto", memory: str = "default"):
        super().__init__(in_channels, out_channels, stride, projection, stride_on, shortcut_bn=shortcut_bn,
                         shortcut=shortcut)
        self._set_backend(backend)
        self._set_memory(memory)


FUSED_CLASS = {PreActBlock: FusedPreActBlock, PreActBottleneck: FusedPreActBottleneck,
               OriginalBlock: FusedOriginalBlock, OriginalBottleneck: FusedOriginalBottleneck}
EAGER_CLASS = {fused: eager for eager, fused in FUSED_CLASS.items()}


def fused_twin(unit, backend: str, memory: str = "default"):
    """A fused unit of ``unit``'s class (one of ``FUSED_CLASS``) that holds ``unit``'s very modules,
    parameters, buffers and hooks (the same dictionaries) and its settings: a new object, ``unit``
    itself unchanged."""
    fused = object.__new__(FUSED_CLASS[type(unit)])
    state = dict(vars(unit))
    padding = state.pop("conv_padding", None)     # an eager unit's explicit padding, if it has one
    fused.__dict__.update(state)
    fused._set_backend(backend)
    fused._set_memory(memory)
    fused.conv_padding = padding
    return fused


def eager_twin(unit):
    """The eager unit of a fused one of ``FUSED_CLASS``: same modules, parameters, buffers, hooks
    and settings (its ``conv_padding`` too), none of the fused unit's own state."""
    eager = object.__new__(EAGER_CLASS[type(unit)])
    eager.__dict__.update({k: v for k, v in vars(unit).items() if k not in _FusedUnitMixin.FUSED_STATE})
    if unit.conv_padding is not None:
        eager.conv_padding = unit.conv_padding
    return eager
