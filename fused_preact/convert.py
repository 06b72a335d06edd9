"""``convert_to_fused``: swap the eager pre-activation units of a model for fused ones.

Handled units:
- this project's ``PreActBlock`` / ``PreActBottleneck``: the unit changes class in
  place (same parameters, buffers, hooks and state_dict keys);
- timm's ``resnetv2`` ``PreActBasic`` / ``PreActBottleneck`` built with BatchNorm+ReLU
  norm layers and plain convolutions: a fused unit takes their place, holding the
  very same parameter and buffer tensors (an optimizer built before the conversion
  keeps working), and its state_dict keeps timm's key names so timm checkpoints
  load with ``strict=True`` before and after.

Units that compute something else (weight-standardized or dilated convs, group
norm, stochastic depth, other bottleneck ratios) stay as they are, with one
warning that names them.
"""
from __future__ import annotations

import warnings
from collections import OrderedDict
from functools import partial
from typing import Optional

from torch import nn

from . import dispatch
from .fused import FUSED_CLASS, FusedPreActBlock, FusedPreActBottleneck
from .units import BOTTLENECK_EXPANSION

# our module name -> timm's, for state_dict keys
_TIMM_NAMES = {"bn1": "norm1", "bn2": "norm2", "bn3": "norm3", "shortcut": "downsample.conv"}


def convert_to_fused(model: nn.Module, backend: str = "auto") -> nn.Module:
    """Replace every eager pre-activation unit of ``model`` by its fused twin, in place.

    Returns the model (or, when ``model`` is itself a timm unit, its fused
    replacement). Outputs, gradients and running statistics stay what they were.
    """
    dispatch.check_backend(backend)
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be an nn.Module, got {type(model).__name__}")
    skipped: list[str] = []

    def convert(module: nn.Module, name: str) -> Optional[nn.Module]:
        """The fused replacement of ``module`` (possibly itself), or None."""
        if type(module) in FUSED_CLASS:
            module.__class__ = FUSED_CLASS[type(module)]
            module._set_backend(backend)
            return module
        if isinstance(module, (FusedPreActBlock, FusedPreActBottleneck)):
            module._set_backend(backend)
            return module
        if _is_timm_preact_unit(module):
            fused, reason = _from_timm(module, backend)
            if fused is None:
                skipped.append(f"{name or type(module).__name__} ({reason})")
            return fused
        return None

    root = convert(model, "")
    if root is not None:
        model = root
    else:
        for parent_name, parent in list(model.named_modules()):
            for child_name, child in list(parent.named_children()):
                full = f"{parent_name}.{child_name}" if parent_name else child_name
                fused = convert(child, full)
                if fused is not None and fused is not child:
                    setattr(parent, child_name, fused)
    if skipped:
        warnings.warn("convert_to_fused left these units eager, since no fused unit computes the same: "
                      + ", ".join(skipped), RuntimeWarning, stacklevel=2)
    return model


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

    device = convs[0].weight.device
    if bottleneck:
        fused = FusedPreActBottleneck(in_channels, out_channels, stride,
                                      stride_on="1x1" if strides[0] != 1 else "3x3", backend=backend)
    else:
        fused = FusedPreActBlock(in_channels, out_channels, stride, backend=backend)
    fused.to(device)
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
        for old, new in table.items():
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
