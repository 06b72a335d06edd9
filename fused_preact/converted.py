"""A fused unit made from a user's module: the module's own submodules, names and computation.

``convert_to_fused`` recognizes residual units by what they compute (torchvision's
``BasicBlock``, pytorchcv's ``PreResUnit``, timm's ``resnetv2`` units, CIFAR ports...) and
puts a ``ConvertedUnit`` in their place. It is the user's module as far as anything that
walks the model can tell:

- it holds the very same dictionaries of submodules, parameters, buffers and hooks as the
  original module (shared, not copied), so ``named_parameters``, ``named_buffers``,
  ``named_modules``, ``state_dict``, ``get_submodule("downsample.0")``,
  ``torch.func.functional_call`` and an optimizer built before the conversion see exactly
  what they saw; a submodule replaced later (``nn.SyncBatchNorm.convert_sync_batchnorm``,
  ``unit.bn1 = ...``) is replaced in the original too;
- its eager computation is the original module's own ``forward`` (kept, unregistered, as
  ``_original``), which runs where the fused path cannot (an inner hook, ``backend="eager"``);
- other attributes read through to the original (``block.stride``, ``block.expansion``).

``UnitParts`` says where the kernels find the convs and BNs, as paths inside the module
(``downsample.0`` is the shortcut projection of a torchvision block), and what the shortcut
is; they are looked up at each call (``kernel_view``).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import torch
from torch import nn

from .fused import _FusedUnitMixin
from .kernel_view import KERNEL_BATCHNORMS, UnitPieces
from .units import PadShortcut

# the dictionaries and sets nn.Module.__init__ makes: submodules, parameters, buffers, hooks
_MODULE_STATE = tuple(k for k, v in vars(nn.Module()).items() if isinstance(v, (dict, set)))


@dataclass(frozen=True)
class UnitParts:
    """Where a converted unit's pieces are (paths inside the user's module) and its shape."""
    convs: tuple[str, ...]              # branch convs, in the order they run
    bns: tuple[str, ...]                # bns[i] belongs to convs[i] (before it: pre-activation; after: original)
    preact: bool                        # full pre-activation (else the original, post-activation unit)
    stride: int
    in_channels: int
    shortcut: Optional[str] = None      # the 1x1 projection conv
    shortcut_bn: Optional[str] = None   # its BN (original units)
    shares_preact: bool = False         # the projection takes relu(bn1(x)), not x
    pad_shortcut: Optional[PadShortcut] = None    # option A: x subsampled and zero-padded (no parameters)
    norm_types: tuple = KERNEL_BATCHNORMS          # the BN classes the kernels may take here

    def describe(self) -> str:
        kind = "pre-activation" if self.preact else "original"
        shape = "bottleneck" if len(self.convs) == 3 else "basic"
        if self.shortcut:
            shortcut = f"projection {self.shortcut}" + (f" + {self.shortcut_bn}" if self.shortcut_bn else "")
            shortcut += " of the pre-activation" if self.shares_preact else ""
        else:
            shortcut = "zero-padded" if self.pad_shortcut is not None else "identity"
        return f"{kind} {shape}, stride {self.stride}, {shortcut} shortcut"


def _submodule(module: nn.Module, path: str) -> nn.Module:
    for atom in path.split("."):
        child = module.__dict__["_modules"].get(atom)
        if child is None:
            raise LookupError(path)
        module = child
    return module


class ConvertedUnit(_FusedUnitMixin, nn.Module):
    """A residual unit of the user's, fused (see the module docstring).

    ``ConvertedUnit(original, parts, backend=, memory=, conv_padding=)``: ``original`` is the
    user's module, ``parts`` where its convs and BNs are."""

    def __init__(self, original: nn.Module, parts: UnitParts, *, backend: str = "auto", memory: str = "default",
                 conv_padding=None):
        nn.Module.__init__(self)
        self.__dict__.update({k: v for k, v in vars(original).items() if k in _MODULE_STATE})
        self.__dict__["_original"] = original      # not registered: a module of no name
        self._is_full_backward_hook = original._is_full_backward_hook
        self.training = original.training
        self._parts = parts
        self._set_backend(backend)
        self._set_memory(memory)
        self.conv_padding = conv_padding

    @property
    def in_channels(self) -> int:
        return self._parts.in_channels

    @property
    def num_convs(self) -> int:
        return len(self._parts.convs)

    @property
    def original_class(self) -> type:
        """The class of the module this unit was made from."""
        return type(self._original)

    def _unit_name(self) -> str:
        return f"{type(self._original).__name__} (fused)"

    def _kernel_pieces(self) -> UnitPieces:
        parts = self._parts
        return UnitPieces(tuple(_submodule(self, p) for p in parts.convs),
                          tuple(_submodule(self, p) for p in parts.bns),
                          _submodule(self, parts.shortcut) if parts.shortcut else None,
                          _submodule(self, parts.shortcut_bn) if parts.shortcut_bn else None, parts.pad_shortcut,
                          parts.preact, parts.shares_preact, parts.stride, parts.in_channels, parts.norm_types)

    def _eager_forward(self, x: torch.Tensor) -> torch.Tensor:
        """The original module's own forward (its hooks ran around this unit's call already)."""
        original = self._original
        if original.__dict__["_modules"] is not self.__dict__["_modules"]:
            # a replica (nn.DataParallel copies the dictionaries): the forward on its own modules
            twin = object.__new__(type(original))
            twin.__dict__.update(vars(original))
            twin.__dict__.update({k: self.__dict__[k] for k in _MODULE_STATE})
            twin.training = self.training
            return twin.forward(x)
        if original.training != self.training:
            original.training = self.training
        return original.forward(x)

    def _preactivation(self) -> bool:
        return self._parts.preact

    def eager_module(self) -> nn.Module:
        """The original module, as it is now: what ``to_eager`` puts back."""
        original = self._original
        original.training = self.training
        original._is_full_backward_hook = self._is_full_backward_hook
        return original

    def train(self, mode: bool = True):
        super().train(mode)
        self._original.training = mode
        return self

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)      # parameters, buffers, submodules
        except AttributeError:
            original = self.__dict__.get("_original")
            if original is None or name.startswith("_"):
                raise
            return getattr(original, name)

    def extra_repr(self) -> str:
        padding = "" if self.conv_padding is None else f", conv_padding={self.conv_padding}"
        return (f"fused {type(self._original).__name__}: {self._parts.describe()}, backend={self.backend}, "
                f"memory={self.memory}{padding}")
