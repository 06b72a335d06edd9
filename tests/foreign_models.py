"""Pre-activation ResNets written the way the most-copied public code writes them, for
``convert_to_fused``'s tests. Re-typed from the structure of those definitions (module
names, forward control flow, in-place ops), not copied:

- ``kuangliu_*``: kuangliu/pytorch-cifar ``models/preact_resnet.py``: ``F.relu`` calls, a
  shortcut ``nn.Sequential`` of the pre-activated input that exists only when the shape
  changes (``hasattr(self, "shortcut")``), ``out += shortcut``; bottleneck stride on the 3x3.
- ``wide_resnet``: xternalz/WideResNet-pytorch ``wideresnet.py``: ``equalInOut`` decides
  whether ``x`` itself is rebound to its pre-activation, ``convShortcut`` projects it,
  ``nn.ReLU(inplace=True)`` modules, optional dropout between the convs, ``torch.add``.
- ``fb_preresnet``: ports of fb.resnet.torch (bearpaw/pytorch-classification
  ``models/cifar/preresnet.py``): one in-place ReLU module used at every place,
  ``downsample`` = ``nn.Sequential(conv1x1)`` of the *raw* input, ``if self.downsample is
  not None``; ``stride_on`` places a bottleneck's stride on the 3x3 (the port) or the
  first 1x1 (the paper's Torch code).
- ``tf_same_preresnet``: the way TensorFlow ports write "SAME" padding: ``padding=0`` convs after
  an explicit zero pad, ``(1, 1, 1, 1)`` for a 3x3 of stride 1 and ``(0, 1, 0, 1)`` for a 3x3 of
  stride 2 (TensorFlow's split for even inputs: the extra row and column at the bottom and right),
  as an ``nn.ZeroPad2d`` module or an ``F.pad`` call; ``pad="dynamic"`` computes the pad from
  the input's size on every call, as TensorFlow's SAME does.
"""
import torch
import torch.nn.functional as F
from torch import nn


# -- kuangliu/pytorch-cifar style -------------------------------------------------
class KLPreActBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out += shortcut
        return out


class KLPreActBottleneck(nn.Module):
    expansion = 4

    def __init__(self, in_planes, planes, stride=1):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, self.expansion * planes, kernel_size=1, bias=False)
        if stride != 1 or in_planes != self.expansion * planes:
            self.shortcut = nn.Sequential(
                nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False))

    def forward(self, x):
        out = F.relu(self.bn1(x))
        shortcut = self.shortcut(out) if hasattr(self, "shortcut") else x
        out = self.conv1(out)
        out = self.conv2(F.relu(self.bn2(out)))
        out = self.conv3(F.relu(self.bn3(out)))
        out += shortcut
        return out


class KLPreActResNet(nn.Module):
    def __init__(self, block, num_blocks, widths=(64, 128, 256, 512), num_classes=10):
        super().__init__()
        self.in_planes = widths[0]
        self.conv1 = nn.Conv2d(3, widths[0], kernel_size=3, stride=1, padding=1, bias=False)
        layers = []
        for i, (width, n) in enumerate(zip(widths, num_blocks)):
            layers.append(self._make_layer(block, width, n, stride=1 if i == 0 else 2))
        self.layer1, self.layer2, self.layer3, self.layer4 = (layers + [nn.Identity()] * 4)[:4]
        self.linear = nn.Linear(widths[len(num_blocks) - 1] * block.expansion, num_classes)

    def _make_layer(self, block, planes, num_blocks, stride):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(block(self.in_planes, planes, s))
            self.in_planes = planes * block.expansion
        return nn.Sequential(*layers)

    def forward(self, x):
        out = self.conv1(x)
        out = self.layer4(self.layer3(self.layer2(self.layer1(out))))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.linear(out.view(out.size(0), -1))


def kuangliu_preact_resnet18(widths=(64, 128, 256, 512), num_blocks=(2, 2, 2, 2)):
    return KLPreActResNet(KLPreActBlock, num_blocks, widths)


def kuangliu_preact_resnet50(widths=(64, 128, 256, 512), num_blocks=(3, 4, 6, 3)):
    return KLPreActResNet(KLPreActBottleneck, num_blocks, widths)


# -- xternalz/WideResNet-pytorch style --------------------------------------------
class WideBasicBlock(nn.Module):
    def __init__(self, in_planes, out_planes, stride, dropRate=0.0):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(out_planes)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(out_planes, out_planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.droprate = dropRate
        self.equalInOut = in_planes == out_planes
        self.convShortcut = (not self.equalInOut) and nn.Conv2d(
            in_planes, out_planes, kernel_size=1, stride=stride, padding=0, bias=False) or None

    def forward(self, x):
        if not self.equalInOut:
            x = self.relu1(self.bn1(x))
        else:
            out = self.relu1(self.bn1(x))
        out = self.relu2(self.bn2(self.conv1(out if self.equalInOut else x)))
        if self.droprate > 0:
            out = F.dropout(out, p=self.droprate, training=self.training)
        out = self.conv2(out)
        return torch.add(x if self.equalInOut else self.convShortcut(x), out)


class WideNetworkBlock(nn.Module):
    def __init__(self, nb_layers, in_planes, out_planes, stride, dropRate=0.0):
        super().__init__()
        self.layer = nn.Sequential(*[WideBasicBlock(i == 0 and in_planes or out_planes, out_planes,
                                                    i == 0 and stride or 1, dropRate) for i in range(nb_layers)])

    def forward(self, x):
        return self.layer(x)


class WideResNet(nn.Module):
    def __init__(self, depth, widen_factor=1, dropRate=0.0, num_classes=10, base=16):
        super().__init__()
        channels = [base, base * widen_factor, 2 * base * widen_factor, 4 * base * widen_factor]
        n = (depth - 4) // 6
        self.conv1 = nn.Conv2d(3, channels[0], kernel_size=3, stride=1, padding=1, bias=False)
        self.block1 = WideNetworkBlock(n, channels[0], channels[1], 1, dropRate)
        self.block2 = WideNetworkBlock(n, channels[1], channels[2], 2, dropRate)
        self.block3 = WideNetworkBlock(n, channels[2], channels[3], 2, dropRate)
        self.bn1 = nn.BatchNorm2d(channels[3])
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(channels[3], num_classes)

    def forward(self, x):
        out = self.block3(self.block2(self.block1(self.conv1(x))))
        out = self.relu(self.bn1(out))
        out = F.adaptive_avg_pool2d(out, 1)
        return self.fc(out.view(out.size(0), -1))


def wide_resnet(depth=16, widen_factor=2, dropRate=0.0, base=4):
    return WideResNet(depth, widen_factor, dropRate, base=base)


# -- fb.resnet.torch ports (bearpaw/pytorch-classification style) -----------------
class FBBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride=1, downsample=None, stride_on="3x3"):
        super().__init__()
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.relu = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        residual = x
        out = self.bn1(x)
        out = self.relu(out)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv2(out)
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return out


class FBBottleneck(nn.Module):
    expansion = 4

    def __init__(self, inplanes, planes, stride=1, downsample=None, stride_on="3x3"):
        super().__init__()
        first, middle = (stride, 1) if stride_on == "1x1" else (1, stride)
        self.bn1 = nn.BatchNorm2d(inplanes)
        self.conv1 = nn.Conv2d(inplanes, planes, kernel_size=1, stride=first, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=middle, padding=1, bias=False)
        self.bn3 = nn.BatchNorm2d(planes)
        self.conv3 = nn.Conv2d(planes, planes * 4, kernel_size=1, bias=False)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = downsample
        self.stride = stride

    def forward(self, x):
        residual = x
        out = self.bn1(x)
        out = self.relu(out)
        out = self.conv1(out)
        out = self.bn2(out)
        out = self.relu(out)
        out = self.conv2(out)
        out = self.bn3(out)
        out = self.relu(out)
        out = self.conv3(out)
        if self.downsample is not None:
            residual = self.downsample(x)
        out += residual
        return out


class FBPreResNet(nn.Module):
    def __init__(self, depth, num_classes=10, block_name="BasicBlock", base=16, stride_on="3x3"):
        super().__init__()
        if block_name.lower() == "basicblock":
            n, block = (depth - 2) // 6, FBBasicBlock
        else:
            n, block = (depth - 2) // 9, FBBottleneck
        self.inplanes = base
        self.stride_on = stride_on
        self.conv1 = nn.Conv2d(3, base, kernel_size=3, padding=1, bias=False)
        self.layer1 = self._make_layer(block, base, n)
        self.layer2 = self._make_layer(block, 2 * base, n, stride=2)
        self.layer3 = self._make_layer(block, 4 * base, n, stride=2)
        self.bn = nn.BatchNorm2d(4 * base * block.expansion)
        self.relu = nn.ReLU(inplace=True)
        self.fc = nn.Linear(4 * base * block.expansion, num_classes)

    def _make_layer(self, block, planes, blocks, stride=1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(nn.Conv2d(self.inplanes, planes * block.expansion, kernel_size=1,
                                                 stride=stride, bias=False))
        layers = [block(self.inplanes, planes, stride, downsample, self.stride_on)]
        self.inplanes = planes * block.expansion
        layers += [block(self.inplanes, planes, stride_on=self.stride_on) for _ in range(1, blocks)]
        return nn.Sequential(*layers)

    def forward(self, x):
        x = self.layer3(self.layer2(self.layer1(self.conv1(x))))
        x = self.relu(self.bn(x))
        x = F.adaptive_avg_pool2d(x, 1)
        return self.fc(x.view(x.size(0), -1))


def fb_preresnet(depth=20, block_name="BasicBlock", base=4, stride_on="3x3"):
    return FBPreResNet(depth, block_name=block_name, base=base, stride_on=stride_on)


# -- TensorFlow ports: explicit "SAME" padding before padding=0 convs ------------------
def same_pad(size, kernel, stride):
    """TensorFlow's SAME padding of one dimension: (before, after)."""
    total = max((-(-size // stride) - 1) * stride + kernel - size, 0)
    return total // 2, total - total // 2


class TFSamePreActBlock(nn.Module):
    def __init__(self, in_planes, planes, stride=1, pad="module", pad_value=0.0):
        super().__init__()
        self.stride, self.pad_kind, self.pad_value = stride, pad, pad_value
        self.bn1 = nn.BatchNorm2d(in_planes)
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=0, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=0, bias=False)
        static = (0, 1, 0, 1) if stride == 2 else (1, 1, 1, 1)
        if pad == "module":
            self.pad1, self.pad2 = nn.ZeroPad2d(static), nn.ZeroPad2d(1)
        self.static = static
        self.downsample = None
        if stride != 1 or in_planes != planes:
            self.downsample = nn.Conv2d(in_planes, planes, kernel_size=1, stride=stride, bias=False)

    def _pad(self, x, which, stride):
        if self.pad_kind == "module":
            return (self.pad1 if which == 1 else self.pad2)(x)
        if self.pad_kind == "dynamic":
            top, bottom = same_pad(x.shape[2], 3, stride)
            left, right = same_pad(x.shape[3], 3, stride)
            return F.pad(x, (left, right, top, bottom))
        widths = self.static if which == 1 else (1, 1, 1, 1)
        return F.pad(x, widths, value=self.pad_value)

    def forward(self, x):
        preact = F.relu(self.bn1(x))
        shortcut = x if self.downsample is None else self.downsample(preact)
        out = self.conv1(self._pad(preact, 1, self.stride))
        out = self.conv2(self._pad(F.relu(self.bn2(out)), 2, 1))
        return out + shortcut


class TFSamePreResNet(nn.Module):
    def __init__(self, widths=(4, 8), units_per_stage=1, pad="module", num_classes=10):
        super().__init__()
        self.stem = nn.Conv2d(3, widths[0], kernel_size=3, padding=1, bias=False)
        blocks, in_planes = [], widths[0]
        for i, width in enumerate(widths):
            for j in range(units_per_stage):
                blocks.append(TFSamePreActBlock(in_planes, width, 2 if i and not j else 1, pad))
                in_planes = width
        self.blocks = nn.Sequential(*blocks)
        self.norm = nn.BatchNorm2d(in_planes)
        self.fc = nn.Linear(in_planes, num_classes)

    def forward(self, x):
        x = F.relu(self.norm(self.blocks(self.stem(x))))
        return self.fc(F.adaptive_avg_pool2d(x, 1).flatten(1))


def tf_same_preresnet(widths=(4, 8), units_per_stage=1, pad="module"):
    return TFSamePreResNet(widths, units_per_stage, pad)


# -- original (post-activation) CIFAR ResNets, the two ways public ports write option A ---------
# akamaster/pytorch_resnet_cifar10 style: the option-A shortcut is a ``LambdaLayer`` wrapping a
# lambda that subsamples with ``x[:, :, ::2, ::2]`` and zero-pads channels on *both* sides
# (``planes // 4`` each), an empty ``nn.Sequential`` is the identity, option B is
# ``nn.Sequential(conv1x1, BatchNorm2d)``; ``F.relu`` calls, ``out += self.shortcut(x)``.
class LambdaLayer(nn.Module):
    def __init__(self, lambd):
        super().__init__()
        self.lambd = lambd

    def forward(self, x):
        return self.lambd(x)


class AKBasicBlock(nn.Module):
    expansion = 1

    def __init__(self, in_planes, planes, stride=1, option="A"):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, kernel_size=3, stride=stride, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.shortcut = nn.Sequential()
        if stride != 1 or in_planes != planes:
            if option == "A":
                side = planes // 4
                self.shortcut = LambdaLayer(
                    lambda x: F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, side, side), "constant", 0))
            else:
                self.shortcut = nn.Sequential(
                    nn.Conv2d(in_planes, self.expansion * planes, kernel_size=1, stride=stride, bias=False),
                    nn.BatchNorm2d(self.expansion * planes))

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += self.shortcut(x)
        out = F.relu(out)
        return out


class AKResNet(nn.Module):
    def __init__(self, num_blocks, option="A", base=16, num_classes=10):
        super().__init__()
        self.in_planes = base
        self.conv1 = nn.Conv2d(3, base, kernel_size=3, stride=1, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(base)
        self.layer1 = self._make_layer(base, num_blocks[0], 1, option)
        self.layer2 = self._make_layer(2 * base, num_blocks[1], 2, option)
        self.layer3 = self._make_layer(4 * base, num_blocks[2], 2, option)
        self.linear = nn.Linear(4 * base, num_classes)

    def _make_layer(self, planes, num_blocks, stride, option):
        layers = []
        for s in [stride] + [1] * (num_blocks - 1):
            layers.append(AKBasicBlock(self.in_planes, planes, s, option))
            self.in_planes = planes
        return nn.Sequential(*layers)

    def forward(self, x):
        out = F.relu(self.bn1(self.conv1(x)))
        out = self.layer3(self.layer2(self.layer1(out)))
        out = F.avg_pool2d(out, out.size()[3])
        return self.linear(out.view(out.size(0), -1))


def akamaster_resnet(depth=20, option="A", base=4):
    n = (depth - 2) // 6
    return AKResNet((n, n, n), option, base)


# The other common way (ports of the Torch "resnet.lua" CIFAR nets): the block itself decides
# in ``forward`` that its shape changes and builds the option-A shortcut inline with
# ``F.pad`` of the strided input, the new channels appended after the input's; one in-place
# ``nn.ReLU`` module at both places, ``residual`` rebound, ``out = out + residual``.
class PadBasicBlock(nn.Module):
    def __init__(self, inplanes, planes, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(inplanes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.stride = stride
        self.extra = planes - inplanes

    def forward(self, x):
        residual = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        if self.stride != 1 or self.extra:
            residual = F.pad(x[:, :, ::self.stride, ::self.stride], (0, 0, 0, 0, 0, self.extra))
        out = out + residual
        return self.relu(out)


class PadResNet(nn.Module):
    def __init__(self, depth, base=16, num_classes=10):
        super().__init__()
        n = (depth - 2) // 6
        self.conv = nn.Conv2d(3, base, 3, 1, 1, bias=False)
        self.bn = nn.BatchNorm2d(base)
        self.relu = nn.ReLU(inplace=True)
        blocks, inplanes = [], base
        for stage, planes in enumerate((base, 2 * base, 4 * base)):
            for i in range(n):
                blocks.append(PadBasicBlock(inplanes, planes, 2 if i == 0 and stage else 1))
                inplanes = planes
        self.blocks = nn.Sequential(*blocks)
        self.fc = nn.Linear(inplanes, num_classes)

    def forward(self, x):
        x = self.blocks(self.relu(self.bn(self.conv(x))))
        return self.fc(torch.flatten(F.adaptive_avg_pool2d(x, 1), 1))


def pad_resnet(depth=20, base=4):
    return PadResNet(depth, base)
