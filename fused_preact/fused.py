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
"""
from __future__ import annotations

import torch

from . import dispatch
from .unit_function import process_count
from .units import OriginalBlock, OriginalBottleneck, PreActBlock, PreActBottleneck, check_unit_input


class _FusedUnitMixin:
    """Forward through the dispatch layer; eager falls back to the reference unit."""

    backend: str

    def _set_backend(self, backend: str) -> None:
        self.backend = dispatch.check_backend(backend)

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
        if name == "eager":
            if synchronized and x.numel():
                raise RuntimeError(
                    f"{type(self).__name__}: its BN statistics are synchronized across processes "
                    f"(sync_batch_stats), which only the fused kernels do, but this input runs on the eager "
                    f"path (backend={self.backend!r}, x on {x.device}, {x.dtype}). Use a backend that runs it "
                    f"(backend='cuda' or 'triton'), or nn.SyncBatchNorm on eager units instead of "
                    f"sync_batch_stats.")
            y, stats = super().forward(x), None
        else:
            y, stats = dispatch.run_unit(name, self, x, stats_in, return_stats)
        return (y, stats) if return_stats else y

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, backend={self.backend}"


class FusedPreActBlock(_FusedUnitMixin, PreActBlock):
    """Fused full pre-activation basic unit; see ``PreActBlock`` for the math."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, projection: str = "B",
                 *, backend: str = "auto"):
        super().__init__(in_channels, out_channels, stride, projection)
        self._set_backend(backend)


class FusedPreActBottleneck(_FusedUnitMixin, PreActBottleneck):
    """Fused full pre-activation bottleneck unit; see ``PreActBottleneck`` for the math."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, projection: str = "B",
                 stride_on: str = "1x1", *, backend: str = "auto"):
        super().__init__(in_channels, out_channels, stride, projection, stride_on)
        self._set_backend(backend)


class FusedOriginalBlock(_FusedUnitMixin, OriginalBlock):
    """Fused original (post-activation) basic unit; see ``OriginalBlock`` for the math."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, projection: str = "B",
                 *, shortcut_bn: bool = True, shortcut: str = "identity", backend: str = "auto"):
        super().__init__(in_channels, out_channels, stride, projection, shortcut_bn=shortcut_bn, shortcut=shortcut)
        self._set_backend(backend)


class FusedOriginalBottleneck(_FusedUnitMixin, OriginalBottleneck):
    """Fused original (post-activation) bottleneck unit; see ``OriginalBottleneck`` for the math."""

    def __init__(self, in_channels: int, out_channels: int, stride: int = 1, projection: str = "B",
                 stride_on: str = "3x3", *, shortcut_bn: bool = True, shortcut: str = "identity",
                 backend: str = "auto"):
        super().__init__(in_channels, out_channels, stride, projection, stride_on, shortcut_bn=shortcut_bn,
                         shortcut=shortcut)
        self._set_backend(backend)


FUSED_CLASS = {PreActBlock: FusedPreActBlock, PreActBottleneck: FusedPreActBottleneck,
               OriginalBlock: FusedOriginalBlock, OriginalBottleneck: FusedOriginalBottleneck}
