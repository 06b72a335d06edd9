"""fused-preact: pre-activation ResNets (He et al., ECCV 2016) with fused BN-ReLU-conv units.

Modules: ``units`` (the four standard units, eager), ``variants`` (the paper's other
units), ``models`` (CIFAR and ImageNet nets), ``fused`` (drop-in fused units),
``convert`` (``convert_to_fused``; ``recognize`` finds units by what they compute,
``unit_guard`` checks each replacement, ``converted`` holds a user's unit fused),
``unconvert`` (``to_eager``), ``dispatch`` (backend choice).
"""
from .convert import ConversionReport, convert_to_fused
from .converted import ConvertedUnit
from .dispatch import BACKENDS, available_backends
from .fused import FusedOriginalBlock, FusedOriginalBottleneck, FusedPreActBlock, FusedPreActBottleneck
from .sync_bn import sync_batch_stats
from .unconvert import to_eager
from .models import MODELS, ResNet, cifar_resnet, create_model, imagenet_resnet
from .units import OriginalBlock, OriginalBottleneck, PreActBlock, PreActBottleneck, ResidualUnit
from .variants import ACTIVATIONS, SHORTCUTS, SingleConvUnit, VariantUnit, make_unit

__version__ = "0.1.0"

__all__ = [
    "ACTIVATIONS", "BACKENDS", "MODELS", "SHORTCUTS", "ConversionReport", "ConvertedUnit", "FusedOriginalBlock", "FusedOriginalBottleneck",
    "FusedPreActBlock", "FusedPreActBottleneck", "OriginalBlock", "OriginalBottleneck", "PreActBlock", "PreActBottleneck", "ResNet", "ResidualUnit", "SingleConvUnit", "VariantUnit", "available_backends", "cifar_resnet",
    "convert_to_fused", "create_model", "imagenet_resnet", "make_unit", "sync_batch_stats", "to_eager",
]
