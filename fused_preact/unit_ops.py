"""The operator contract every fused backend implements.

A fused pre-activation unit is a chain of BN-ReLU-conv triples plus a shortcut; a
fused original (post-activation) unit is the same chain whose first conv reads its
raw input (no prologue), ended by ``relu(bn_k(h_k) + s)``. ``fused_preact.unit_function``
writes their forward and backward once, in terms of the eight operators below; each backend
(Triton in ``kernels/``, the C++/CUDA extension in ``csrc/``) registers them with ``torch.library``
under its own namespace with exactly these schemas, so one implementation serves both and
``torch.compile`` sees opaque operators with fake implementations. The whole unit is itself an
operator (see "The unit operators" at the end).

Conventions shared by every operator
------------------------------------
- Activations are NHWC: contiguous 4-D tensors ``[N, H, W, C]`` (a channels_last
  ``[N, C, H, W]`` tensor permuted with ``.permute(0, 2, 3, 1)``). Matrices of
  per-row data flatten them to ``[N*H*W, C]``.
- A conv weight is the ``nn.Conv2d`` weight ``[Cout, Cin, K, K]`` with K in (1, 3),
  any strides, float32 or the activation dtype. Dilation 1, groups 1, no bias.
  Padding: the three conv operators take an optional ``padding = [left, right, top,
  bottom]`` (``F.pad``'s order for the last two dims: W sides, then H sides), four
  non-negative ints, of zeros around the conv input's pre-activation (so an
  ``F.pad`` / ``nn.ZeroPad2d`` before a ``padding=0`` conv, asymmetric "SAME"
  padding too); ``None`` (the default) is ``K // 2`` on every side. The output is
  ``Ho = (H + top + bottom - K) // stride + 1``, ``Wo = (W + left + right - K) //
  stride + 1``; the padded input must hold one window (a clear error naming
  ``padding`` otherwise). The op rounds the weight to the activation dtype before the
  product (as autocast does), accumulates in fp32, and returns weight gradients in
  the weight's own dtype.
- The "pre-activation" of a conv input ``h`` is ``a = relu(scale[c] * h + shift[c])``
  computed in fp32, then rounded to the activation dtype for the product. NaN and Inf as eager:
  every ReLU keeps a NaN (``torch.relu``), and every ReLU mask is ``threshold_backward``'s,
  zero where the ReLU's input (or output) is ``<= 0`` and the gradient elsewhere, so a NaN
  passes the gradient. Spatial
  zero padding is applied to ``a``, not ``h`` (padded positions are 0 after the
  activation, as in eager). ``a`` is never written to memory.
- Per-channel statistics travel as *partials*: ``pmean [T, C]``, ``pm2 [T, C]`` and
  ``pcount [T]``, all float32 (float64 for float64 activations), where row t holds the mean and the sum of squared
  deviations from that mean (M2) of ``pcount[t]`` rows of the tensor. Partials are
  merged with Chan's formula, so a tensor with mean 100 and std 0.01 keeps its
  variance (no E[x^2] - E[x]^2 anywhere). Rows with ``pcount == 0`` are allowed.
  T is the backend's choice.
- Float64 activations are supported by backends that can (the C++ CPU path); a
  backend that cannot raises a TypeError naming ``x``. With float64 activations every
  float32 output named below (statistics, partials, sums) is float64 instead.

Operators (schemas as registered)
---------------------------------
``channel_stats(Tensor x) -> (Tensor pmean, Tensor pm2, Tensor pcount)``
    Partials of the per-channel statistics of NHWC ``x`` in one read pass.

``bn_finalize(Tensor pmean, Tensor pm2, Tensor pcount, Tensor weight, Tensor bias,
              Tensor(a!)? running_mean, Tensor(b!)? running_var,
              Tensor? num_batches_tracked, float momentum, float eps)
              -> (Tensor mean, Tensor invstd, Tensor scale, Tensor shift)``
    Merge the partials into the batch mean and biased variance ``var = M2 / n``
    (n = sum of pcount), ``invstd = 1 / sqrt(var + eps)``, ``scale = weight * invstd``,
    ``shift = bias - mean * scale`` (all float32 ``[C]``). When ``running_mean`` is
    given, update in place exactly as ``nn.BatchNorm2d`` in training:
    ``running = (1 - f) * running + f * stat`` with the unbiased variance
    ``M2 / (n - 1)``, where ``f = momentum``, or ``f = 1 / num_batches_tracked``
    when ``momentum < 0`` (BatchNorm's ``momentum=None``; the caller has already
    incremented ``num_batches_tracked``). Nothing here reads a value back to the host.

``conv_bnrelu(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, Tensor? residual,
              int stride, bool stats, int[]? padding=None)
              -> (Tensor y, Tensor pmean, Tensor pm2, Tensor pcount)``
    ``y = conv(pad(relu(scale * x + shift), padding), weight, stride) (+ residual)``, NHWC, in
    x's dtype. With ``scale`` and ``shift`` None (both or neither) there is no
    prologue: the conv reads x as it is (zero padding as usual), as the original
    unit's first conv and its projection shortcut do. ``residual`` has y's shape and dtype and is added in the epilogue
    (fp32, before rounding y). With ``stats=True`` the epilogue also emits the
    partials of y's per-channel statistics (of the value after the residual add,
    as rounded and stored); with ``stats=False`` they are empty tensors.

``conv_dgrad(Tensor dy, Tensor weight, Tensor? h, Tensor? scale, Tensor? shift,
             Tensor? mean, Tensor? invstd, Tensor? add, int stride, int height, int width,
             int[]? padding=None) -> (Tensor g, Tensor sum_g, Tensor sum_g_xhat)``
    The data gradient of ``conv_bnrelu``'s convolution (same ``stride`` and ``padding``):
    ``t = conv_input_grad(dy, weight)`` of NHWC shape ``[N, height, width, Cin]`` (the
    gradient of the unpadded input; ``height``/``width`` must give dy's size), plus ``add`` when given
    (a gradient that joins at the same point, e.g. the projection shortcut's). With
    ``h`` given (the conv's raw input, before its BN-ReLU): ``g = t`` where ``scale * h +
    shift`` is not ``<= 0``, else 0 (the ReLU mask, recomputed) and the float32 ``[Cin]`` reductions
    ``sum_g = sum(g)``, ``sum_g_xhat = sum(g * (h - mean) * invstd)`` over N, H, W
    (the BN weight and bias gradients). With ``h`` None: ``g = t`` and both sums are
    empty tensors. ``g`` is in dy's dtype.

``conv_wgrad(Tensor dy, Tensor x, Tensor? scale, Tensor? shift, Tensor weight,
             int stride, int[]? padding=None) -> Tensor dweight``
    The weight gradient of ``conv_bnrelu`` (same ``stride`` and ``padding``): the input's pre-activation is recomputed
    from ``x`` as it is loaded (x as it is when ``scale`` and ``shift`` are None). ``weight`` is only read for its shape and dtype;
    ``dweight`` is ``[Cout, Cin, K, K]`` contiguous, in weight's dtype.

``bn_backward_finish(Tensor g, Tensor h, Tensor mean, Tensor invstd, Tensor weight,
                     Tensor sum_g, Tensor sum_g_xhat, float count, Tensor? add,
                     bool batch_stats) -> Tensor dh``
    Finish BN backward in one elementwise pass: with batch statistics,
    ``dh = weight * invstd * (g - sum_g / count - xhat * sum_g_xhat / count)``,
    ``xhat = (h - mean) * invstd``; with running statistics (eval),
    ``dh = weight * invstd * g``. ``add`` (same shape as g) is added in the same pass
    (the identity shortcut's gradient). In g's dtype.

``bn_add_relu(Tensor h, Tensor scale, Tensor shift, Tensor residual, Tensor? residual_scale,
              Tensor? residual_shift) -> Tensor y``
    The end of an original unit in one elementwise pass:
    ``y = relu(scale * h + shift + s)`` with ``s = residual`` (the identity or option-A
    shortcut, a projection without BN), or ``s = residual_scale * residual +
    residual_shift`` when both are given (the projection's own BN, torchvision's
    ``downsample``). ``residual`` has h's shape and dtype; arithmetic in fp32 (fp64
    for fp64), y rounded once to h's dtype.

``bn_add_relu_backward(Tensor dy, Tensor y, Tensor h, Tensor mean, Tensor invstd,
                       Tensor? residual, Tensor? residual_mean, Tensor? residual_invstd)
                       -> (Tensor g, Tensor sum_g, Tensor sum_g_xhat, Tensor residual_sum_g_xhat)``
    Its backward up to the BN-backward finishes, in one pass: ``g = dy`` where ``y`` is not
    ``<= 0``, else 0 (the ReLU mask read from the saved output y, which the next unit keeps as its input
    anyway), in dy's dtype, and the float32 ``[C]`` sums ``sum_g = sum(g)``,
    ``sum_g_xhat = sum(g * (h - mean) * invstd)`` and, with ``residual`` (the
    projection's raw output h_s) and its statistics given, ``residual_sum_g_xhat =
    sum(g * (residual - residual_mean) * residual_invstd)`` (empty otherwise). g is the
    gradient of both BN outputs and of a BN-less shortcut; ``bn_backward_finish`` turns
    it into dh per BN (``sum_g`` serves both BNs).

The unit operators: autograd, export, torch.func (``fused_preact.unit_function``)
-------------------------------------------------------------------------------
The eight operators above are the backends' kernels; the autograd of a whole unit sits one level
up, as four functional ``torch.library.custom_op`` operators in the ``fused_preact_unit``
namespace, defined (with their fake implementations, autograd, vmap rules and FLOP formulas) when
``fused_preact.unit_function`` is imported, which ``import fused_preact`` does:

``preact(Tensor x, Tensor? x_mean, Tensor? x_m2, Tensor? x_count, Tensor[] conv_weights,
         Tensor[] bn_weights, Tensor[] bn_biases, Tensor?[] running_means, Tensor?[] running_vars,
         Tensor?[] batches_tracked, Tensor? shortcut_weight, str plan, str backend, str? group,
         bool want_stats) -> (Tensor y, Tensor y_mean, Tensor y_m2, Tensor y_count,
         Tensor[] new_running_means, Tensor[] new_running_vars, Tensor[] saved_h, Tensor[] means,
         Tensor[] invstds, Tensor[] scales, Tensor[] shifts)``
``original(...)``: the same without the statistics of x and y (no BN reads them).
``preact_backward(Tensor dy, Tensor x, Tensor[] saved_h, <the four statistics lists>,
         Tensor[] conv_weights, Tensor[] bn_weights, Tensor? shortcut_weight, str plan, str backend,
         str? group, bool[] needs) -> (Tensor dx, Tensor[] conv_weight_grads, Tensor[] bn_weight_grads,
         Tensor[] bn_bias_grads, Tensor shortcut_weight_grad)``
``original_backward(...)``: the same with the unit's output ``y`` after ``x`` (its ReLU mask).

- ``plan``: the unit's static structure (``unit_plan.UnitPlan.encode``: kind, each conv's kernel,
  stride and padding, each BN's mode, the shortcut, the memory mode); ``backend``: an operator set
  by name (``"triton"``, ``"cuda"``: ``dispatch`` registers them, loading their operators on first
  use); ``group``: the process group of synchronized BN by name (None: not synchronized);
  ``needs``: which gradients to form (``unit_plan.GradNeeds``). BN lists are in BN order: the
  branch BNs, then an original unit's projection BN. Gradients nobody asked for come back as
  empty tensors (an operator cannot return None).
- Functional, as ``register_autograd`` requires (``torch._library.utils.is_functional_schema``):
  the new running statistics are returned and copied into the BN buffers by the caller
  (``run_fused_unit``; a plain ``copy_``, so ``torch.export`` records it as a buffer mutation and
  ``torch.compile`` as a graph op). Outputs never alias inputs or each other.
- ``register_autograd`` on the forward operators (the backward calls the backward operator under
  ``no_grad``, ``create_graph=True`` then gets a node that raises the double-backward message when
  differentiated); ``register_fake`` runs the same Python forward and backward on fake tensors
  (every backend operator has a fake; collectives by shape only).
- The forward operators in standard ATen ops (``fused_preact.unit_decomposition``): what the
  exporters record (``torch.onnx.export``, both exporters; ``torch.jit.trace``), also registered in
  torch's decomposition table for graphs that hold the operators (``torch.onnx.export`` of an
  ``ExportedProgram``).

Why this design: ``torch.export`` inlines an ``autograd.Function`` and loses its backward (an
exported program of a unit written as an autograd Function trains without gradients); an operator with
``register_autograd`` stays one node in the exported graph, and its backward runs when the loaded
program trains, in a process that only imported ``fused_preact``. One operator per unit kind
rather than autograd per backend operator: the BN statistics, the shortcut and the gradient
selection are the unit's, not a kernel's, and it keeps the exported graph one node per unit.

torch.func: ``torch.library``'s generated autograd Function has no ``setup_context`` and cannot run
under torch.func transforms (measured on torch 2.14: "must override the setup_context
staticmethod"), so under a transform the same operators run through an autograd Function in the
``forward`` + ``setup_context`` style around the same setup and backward (``_FunctorchUnit``):
``grad``, ``vjp`` and ``jacrev`` (the backward operators have a vmap rule that loops over the
batch). ``vmap`` of a fused forward and nested gradient transforms raise a message naming
``backend="eager"``.
"""
from __future__ import annotations

from typing import Optional

import torch

OPERATORS = ("channel_stats", "bn_finalize", "conv_bnrelu", "conv_dgrad", "conv_wgrad",
             "bn_backward_finish", "bn_add_relu", "bn_add_relu_backward")

SCHEMAS = {
    "channel_stats": "(Tensor x) -> (Tensor pmean, Tensor pm2, Tensor pcount)",
    "bn_finalize": ("(Tensor pmean, Tensor pm2, Tensor pcount, Tensor weight, Tensor bias, "
                    "Tensor(a!)? running_mean, Tensor(b!)? running_var, Tensor? num_batches_tracked, "
                    "float momentum, float eps) -> (Tensor mean, Tensor invstd, Tensor scale, Tensor shift)"),
    "conv_bnrelu": ("(Tensor x, Tensor weight, Tensor? scale, Tensor? shift, Tensor? residual, "
                    "int stride, bool stats, int[]? padding=None) "
                    "-> (Tensor y, Tensor pmean, Tensor pm2, Tensor pcount)"),
    "conv_dgrad": ("(Tensor dy, Tensor weight, Tensor? h, Tensor? scale, Tensor? shift, Tensor? mean, "
                   "Tensor? invstd, Tensor? add, int stride, int height, int width, "
                   "int[]? padding=None) -> (Tensor g, Tensor sum_g, Tensor sum_g_xhat)"),
    "conv_wgrad": ("(Tensor dy, Tensor x, Tensor? scale, Tensor? shift, Tensor weight, int stride, "
                   "int[]? padding=None) -> Tensor dweight"),
    "bn_backward_finish": ("(Tensor g, Tensor h, Tensor mean, Tensor invstd, Tensor weight, "
                           "Tensor sum_g, Tensor sum_g_xhat, float count, Tensor? add, bool batch_stats) "
                           "-> Tensor dh"),
    "bn_add_relu": ("(Tensor h, Tensor scale, Tensor shift, Tensor residual, Tensor? residual_scale, "
                    "Tensor? residual_shift) -> Tensor y"),
    "bn_add_relu_backward": ("(Tensor dy, Tensor y, Tensor h, Tensor mean, Tensor invstd, Tensor? residual, "
                             "Tensor? residual_mean, Tensor? residual_invstd) "
                             "-> (Tensor g, Tensor sum_g, Tensor sum_g_xhat, Tensor residual_sum_g_xhat)"),
}


Padding = tuple[int, int, int, int]   # (left, right, top, bottom)


def statistics_dtype(activation_dtype: torch.dtype) -> torch.dtype:
    """The dtype of every per-channel statistic, partial and sum for activations of
    ``activation_dtype``: float64 for float64 activations, else float32 (the one rule; the C++
    operators follow it too, ``stat_dtype`` in ``csrc/unit_ops.h``)."""
    return torch.float64 if activation_dtype == torch.float64 else torch.float32


def conv_padding(padding, kernel_size: int) -> Padding:
    """The conv operators' ``padding`` checked, as ``(left, right, top, bottom)``;
    ``None`` is ``kernel_size // 2`` on every side. Raises ValueError naming ``padding``."""
    if padding is None:
        return (kernel_size // 2,) * 4
    if isinstance(padding, (str, bytes)) or not hasattr(padding, "__len__") or len(padding) != 4:
        raise ValueError(f"padding must be 4 ints [left, right, top, bottom] (F.pad's order) or None, "
                         f"got {padding!r}")
    if not all(isinstance(p, int) and not isinstance(p, bool) and p >= 0 for p in padding):
        raise ValueError(f"padding must be 4 non-negative ints [left, right, top, bottom], got {padding!r}")
    return tuple(padding)


def conv_output_size(size: int, kernel_size: int, stride: int, before: Optional[int] = None,
                     after: Optional[int] = None) -> int:
    """Output height/width of a conv with ``before`` + ``after`` zero padding
    (``kernel_size // 2`` each when None)."""
    before = kernel_size // 2 if before is None else before
    after = kernel_size // 2 if after is None else after
    return (size + before + after - kernel_size) // stride + 1


def padded_output_shape(height: int, width: int, kernel_size: int, stride: int, padding) -> tuple[int, int]:
    """``(Ho, Wo)`` of a conv operator's output for its (checked) ``padding``; raises ValueError
    naming ``padding`` when the padded input holds no window."""
    left, right, top, bottom = conv_padding(padding, kernel_size)
    if height + top + bottom < kernel_size or width + left + right < kernel_size:
        raise ValueError(f"padding {[left, right, top, bottom]} (left, right, top, bottom) of a {height}x{width} "
                         f"input is smaller than the {kernel_size}x{kernel_size} kernel")
    return (conv_output_size(height, kernel_size, stride, top, bottom),
            conv_output_size(width, kernel_size, stride, left, right))
