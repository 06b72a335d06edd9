"""Every operator of the contract (``unit_ops``) on one backend and device, against float64.

For ``python -m fused_preact.check``: each operator runs on random inputs of a ``Shape`` chosen to
hit tile boundaries (rows that are no multiple of a tile, 3 or 17 channels, odd H and W, stride 2,
asymmetric padding, a grid past 65,535 blocks), in the dtype asked for; its outputs are compared
with ``reference_ops`` in float64, and the same operator computed as eager PyTorch would in that
dtype (``reference_ops``' ``eager=True``) gives the yardstick: ``accuracy.judge`` per output, the
worst output decides. Statistics partials are compared merged (their row count is the backend's
choice); a mean against the spread of what it averages.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional

import torch

from . import accuracy
from . import reference_ops as ref
from .unit_ops import padded_output_shape, statistics_dtype


@dataclass(frozen=True)
class Shape:
    """One conv geometry: input [n, h, w, cin] NHWC, weight [cout, cin, k, k], stride, padding."""
    name: str
    n: int
    h: int
    w: int
    cin: int
    cout: int
    k: int
    stride: int
    padding: Optional[tuple[int, int, int, int]] = None

    @property
    def output_hw(self) -> tuple[int, int]:
        return padded_output_shape(self.h, self.w, self.k, self.stride, self.padding)

    def __str__(self) -> str:
        pad = "" if self.padding is None else f" pad {list(self.padding)}"
        return (f"{self.name}: {self.k}x{self.k} s{self.stride} {self.cin}->{self.cout} "
                f"[{self.n}, {self.h}, {self.w}]{pad}")


@dataclass
class OperatorResult:
    """One operator variant on one shape and dtype: per output, the backend's error and eager's."""
    operator: str
    variant: str
    verdicts: dict                 # output name -> accuracy.Verdict
    failure: Optional[str] = None  # the backend raised
    skipped: Optional[str] = None  # the backend does not take this dtype (TypeError naming it)

    @property
    def passed(self) -> bool:
        return self.skipped is not None or (self.failure is None and all(v.passed for v in self.verdicts.values()))


# -- inputs --------------------------------------------------------------------------------------------
class _Inputs:
    """Random inputs of one shape and dtype on one device (fresh per call, never zeros)."""

    def __init__(self, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int):
        self.shape, self.dtype, self.device = shape, dtype, device
        self.stat = statistics_dtype(dtype)
        self.generator = torch.Generator(device=device).manual_seed(seed)   # drawn where they are used

    def _randn(self, *size) -> torch.Tensor:
        return torch.randn(*size, generator=self.generator, dtype=torch.float32, device=self.device)

    def data(self, *size, scale: float = 1.5, offset: float = 0.3) -> torch.Tensor:
        return (self._randn(*size) * scale + offset).to(self.dtype).contiguous()

    def vector(self, channels: int, low: float, high: float) -> torch.Tensor:
        t = torch.rand(channels, generator=self.generator, dtype=torch.float32, device=self.device)
        return (t * (high - low) + low).to(self.stat)

    def weight(self, cout: int, cin: int, k: int) -> torch.Tensor:
        return self._randn(cout, cin, k, k) / math.sqrt(cin * k * k)

    def batchnorm(self, h: torch.Tensor):
        """A BN of ``h`` as the unit would run it: its own batch statistics, random affine
        parameters: (mean, invstd, scale, shift), about half of the ReLU's inputs positive."""
        rows = h.reshape(-1, h.shape[-1]).double()
        var, mean = torch.var_mean(rows, dim=0, correction=0)
        invstd = torch.rsqrt(var + 1e-5)
        weight = self.vector(h.shape[-1], 0.5, 1.5).double()
        bias = self.vector(h.shape[-1], -0.5, 0.5).double()
        scale = weight * invstd
        return tuple(t.to(self.stat) for t in (mean, invstd, scale, bias - mean * scale))


# -- what is compared --------------------------------------------------------------------------------
def _merged(pmean, pm2, pcount) -> dict:
    mean, m2, n = ref.merge_partials(pmean, pm2, pcount)
    return {"mean": mean, "var": m2 / n, "count": n.reshape(1)}


def _judge(outputs: dict, exact: dict, eager: dict, dtypes: dict) -> dict:
    """{output: Verdict}; a merged "mean" against the spread of its "var", a "var" with the
    conditioning of its data (``accuracy.variance_condition``)."""
    verdicts = {}
    for name, got in outputs.items():
        condition = 1.0
        if name.endswith("mean") and name[:-4] + "var" in exact:
            var = exact[name[:-4] + "var"]
            error = accuracy.error_of_mean(got, exact[name], var)
            eager_error = accuracy.error_of_mean(eager[name], exact[name], var)
        else:
            error = accuracy.normwise_error(got, exact[name])
            eager_error = accuracy.normwise_error(eager[name], exact[name])
            if name.endswith("var") and name[:-3] + "mean" in exact:
                condition = accuracy.variance_condition(exact[name[:-3] + "mean"], exact[name])
        verdicts[name] = accuracy.judge(error, eager_error, dtypes[name], condition)
    return verdicts


@dataclass(frozen=True)
class _Variant:
    operator: str
    variant: str
    make: Callable            # _Inputs -> args (a tuple)
    outputs: Callable         # (result of the op, args) -> {name: tensor}


def _clone(args):
    return tuple(a.clone() if isinstance(a, torch.Tensor) else a for a in args)


def _variants(shape: Shape) -> list:
    n, h, w, cin, cout, k, stride, padding = (shape.n, shape.h, shape.w, shape.cin, shape.cout, shape.k,
                                              shape.stride, shape.padding)
    ho, wo = shape.output_hw
    pad = () if padding is None else (list(padding),)

    def channel_stats(i):
        return (i.data(n, h, w, cin, scale=0.5, offset=3.0),)

    def bn_finalize(i):
        x = i.data(n, h, w, cin)
        pmean, pm2, pcount = ref.channel_stats(x)
        return (pmean, pm2, pcount, i.vector(cin, 0.5, 1.5), i.vector(cin, -0.5, 0.5),
                i.vector(cin, -0.3, 0.3), i.vector(cin, 0.5, 2.0), None, 0.1, 1e-5)

    def conv_bnrelu(prologue, residual):
        def make(i):
            x = i.data(n, h, w, cin)
            scale, shift = i.batchnorm(x)[2:] if prologue else (None, None)
            res = i.data(n, ho, wo, cout) if residual else None
            return (x, i.weight(cout, cin, k), scale, shift, res, stride, True, *pad)
        return make

    def conv_dgrad(with_h, with_add):
        def make(i):
            hh = i.data(n, h, w, cin)
            mean, invstd, scale, shift = i.batchnorm(hh)
            add = i.data(n, h, w, cin, scale=0.5, offset=0.0) if with_add else None
            if not with_h:
                hh = mean = invstd = scale = shift = None
            return (i.data(n, ho, wo, cout, scale=1.0, offset=0.0), i.weight(cout, cin, k), hh, scale, shift,
                    mean, invstd, add, stride, h, w, *pad)
        return make

    def conv_wgrad(i):
        x = i.data(n, h, w, cin)
        scale, shift = i.batchnorm(x)[2:]
        return (i.data(n, ho, wo, cout, scale=1.0, offset=0.0), x, scale, shift, i.weight(cout, cin, k),
                stride, *pad)

    def bn_backward_finish(with_add, batch_stats):
        def make(i):
            hh = i.data(n, h, w, cin)
            mean, invstd, _, _ = i.batchnorm(hh)
            g = i.data(n, h, w, cin, scale=1.0, offset=0.1)
            rows = g.double().reshape(-1, cin)
            xhat = (hh.double().reshape(-1, cin) - mean.double()) * invstd.double()
            sum_g, sum_gx = rows.sum(0).to(i.stat), (rows * xhat).sum(0).to(i.stat)
            add = i.data(n, h, w, cin, scale=0.5, offset=0.0) if with_add else None
            return (g, hh, mean, invstd, i.vector(cin, 0.5, 1.5), sum_g, sum_gx, float(n * h * w), add, batch_stats)
        return make

    def bn_add_relu(residual_bn):
        def make(i):
            hh = i.data(n, h, w, cin)
            residual = i.data(n, h, w, cin)
            _, _, scale, shift = i.batchnorm(hh)
            rscale, rshift = i.batchnorm(residual)[2:] if residual_bn else (None, None)
            return (hh, scale, shift, residual, rscale, rshift)
        return make

    def bn_add_relu_backward(i):
        hh = i.data(n, h, w, cin)
        residual = i.data(n, h, w, cin)
        mean, invstd, scale, shift = i.batchnorm(hh)
        rmean, rinvstd, rscale, rshift = i.batchnorm(residual)
        y = ref.bn_add_relu(hh, scale, shift, residual, rscale, rshift)
        return (i.data(n, h, w, cin, scale=1.0, offset=0.0), y, hh, mean, invstd, residual, rmean, rinvstd)

    def stats_out(result, args):
        return _merged(*result)

    def finalize_out(result, args):
        return dict(zip(("mean", "invstd", "scale", "shift", "running_mean", "running_var"),
                        (*result, args[5], args[6])))

    def conv_out(result, args):
        return {"y": result[0], **{f"y {k}": v for k, v in _merged(*result[1:]).items()}}

    def dgrad_out(result, args):
        return dict(zip(("g", "sum_g", "sum_g_xhat"), result)) if args[2] is not None else {"g": result[0]}

    def single(name):
        return lambda result, args: {name: result}

    def backward_out(result, args):
        return dict(zip(("g", "sum_g", "sum_g_xhat", "residual_sum_g_xhat"), result))

    return [
        _Variant("channel_stats", "", channel_stats, stats_out),
        _Variant("bn_finalize", "running statistics", bn_finalize, finalize_out),
        _Variant("conv_bnrelu", "prologue, residual, stats", conv_bnrelu(True, True), conv_out),
        _Variant("conv_bnrelu", "raw input, stats", conv_bnrelu(False, False), conv_out),
        _Variant("conv_dgrad", "mask, add", conv_dgrad(True, True), dgrad_out),
        _Variant("conv_dgrad", "no mask", conv_dgrad(False, False), dgrad_out),
        _Variant("conv_wgrad", "prologue", conv_wgrad, single("dweight")),
        _Variant("bn_backward_finish", "batch statistics, add", bn_backward_finish(True, True), single("dh")),
        _Variant("bn_backward_finish", "running statistics", bn_backward_finish(False, False), single("dh")),
        _Variant("bn_add_relu", "residual BN", bn_add_relu(True), single("y")),
        _Variant("bn_add_relu", "identity residual", bn_add_relu(False), single("y")),
        _Variant("bn_add_relu_backward", "residual BN", bn_add_relu_backward, backward_out),
    ]


def run_operators(ops, shape: Shape, dtype: torch.dtype, device: torch.device, seed: int = 0,
                  operators: Optional[set] = None) -> list:
    """Every operator variant (of ``operators``, all by default) of ``ops`` on ``shape`` in ``dtype``:
    a list of ``OperatorResult``."""
    results = []
    for index, variant in enumerate(_variants(shape)):
        if operators is not None and variant.operator not in operators:
            continue
        args = variant.make(_Inputs(shape, dtype, device, seed * 1000 + index))
        exact_args, eager_args = _clone(args), _clone(args)
        exact = variant.outputs(getattr(ref, variant.operator)(*exact_args), exact_args)
        eager = variant.outputs(getattr(ref, variant.operator)(*eager_args, eager=True), eager_args)
        backend_args = _clone(args)
        try:
            got = variant.outputs(getattr(ops, variant.operator)(*backend_args), backend_args)
        except TypeError as error:    # a dtype the backend does not take (float64 on Triton's GPU kernels)
            if dtype == torch.float64:
                results.append(OperatorResult(variant.operator, variant.variant, {}, skipped=str(error)))
                continue
            results.append(OperatorResult(variant.operator, variant.variant, {},
                                          failure=f"{type(error).__name__}: {error}"))
            continue
        except Exception as error:
            results.append(OperatorResult(variant.operator, variant.variant, {},
                                          failure=f"{type(error).__name__}: {error}"))
            continue
        # each output judged in the dtype it is stored in; merged statistics (float64) in the statistics'
        # dtype, those of a stored output ("y var") in that output's: a y one rounding step off moves
        # them by that much (measured: one of 384 fp16 values a step off, near a tie, moved the
        # variance of its 24 rows by 5e-5)
        stat = statistics_dtype(dtype)
        dtypes = {name: got[name.split(" ")[0]].dtype if " " in name
                  else t.dtype if t.is_floating_point() and t.dtype != torch.float64 else stat
                  for name, t in got.items()}
        results.append(OperatorResult(variant.operator, variant.variant, _judge(got, exact, eager, dtypes)))
    return results
