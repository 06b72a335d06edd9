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
"""
from __future__ import annotations

from typing import Optional

import torch

from . import dispatch, self_check
from .unit_function import check_memory, process_count
from .units import OriginalBlock, OriginalBottleneck, PreActBlock, PreActBottleneck, check_unit_input


class _FusedUnitMixin:
    """Forward through the dispatch layer; eager falls back to the reference unit."""

    backend: str
    num_convs: int
    memory: str = "default"   # a unit that changed class in place (convert_to_fused) has no __init__ call

    def _set_backend(self, backend: str) -> None:
        self.backend = dispatch.check_backend(backend)

    @property
    def conv_padding(self) -> Optional[tuple[tuple[int, int, int, int], ...]]:
        """None (each branch conv pads ``K // 2`` per side) or one ``(left, right, top, bottom)``
        per branch conv: the total zero padding of its activated input (see the module docstring)."""
        return getattr(self, "_conv_padding", None)

    @conv_padding.setter
    def conv_padding(self, value) -> None:
        self._conv_padding = check_conv_padding(value, self.num_convs, type(self).__name__)

    def _set_memory(self, memory: str) -> None:
        self.memory = check_memory(memory)

    def forward(self, x: torch.Tensor, stats_in=None, return_stats: bool = False):
        """``y = unit(x)``. Inside a model of fused units, ``stats_in`` carries the partial
        statistics of x from the previous unit's epilogue and ``return_stats=True``
        returns ``(y, partials of y)`` for the next one (``None`` when not computed)."""
        check_unit_input(x, self.in_channels, type(self).__name__)
        group = getattr(self, "stats_group", None)
        # batch statistics shared across processes (sync_batch_stats): only the fused path does that
        synchronized = group is not None and self.training and process_count(group) > 1
        # an empty batch does what eager does (kernels need rows): no kernel runs it
        name = dispatch.resolve_backend(self.backend, x, synchronized=synchronized) if x.numel() else "eager"
        name = self_check.checked_backend(self, x, name)   # eager when this configuration failed its first-use check
        if name == "eager":
            if synchronized and x.numel():
                raise RuntimeError(
                    f"{type(self).__name__}: its BN statistics are synchronized across processes "
                    f"(sync_batch_stats), which only the fused kernels do, but this input runs on the eager "
                    f"path (backend={self.backend!r}, x on {x.device}, {x.dtype}). Use a backend that runs it "
                    f"(backend='cuda' or 'triton'), or nn.SyncBatchNorm on eager units instead of "
                    f"sync_batch_stats.")
            y, stats = self._eager_forward(x), None
        else:
            y, stats = dispatch.run_unit(name, self, x, stats_in, return_stats)
        return (y, stats) if return_stats else y

    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The unit's eager PyTorch computation (the fallback, and the self-check's yardstick)."""
        return super().forward(x)

    def extra_repr(self) -> str:
        padding = "" if self.conv_padding is None else f", conv_padding={self.conv_padding}"
        return f"{super().extra_repr()}, backend={self.backend}, memory={self.memory}{padding}"


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
