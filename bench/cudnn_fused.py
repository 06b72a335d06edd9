"""NVIDIA's own fused engine as a contender: cuDNN's scale-bias-ReLU-conv-genstats graph.

    y = conv(relu(scale * x + bias), w);  sum[c] = sum(y), sq_sum[c] = sum(y * y)

built with the ``cudnn`` Python module of the ``nvidia-cudnn-frontend`` package: the
same BN-apply prologue and statistics epilogue as our ``conv_bnrelu``, which cuDNN
offers for fp16 NHWC only. The GPU machine has no package registry:
``bench/fetch_cudnn_frontend.sh`` downloads the wheel into ``.wheels/`` and
``bench/device_run.sh`` installs it from there.
"""
from __future__ import annotations

from typing import Optional

import torch

DTYPE = torch.float16


def _import_cudnn():
    try:
        import cudnn
    except ImportError as error:
        return None, (f"the cudnn Python module is not installed ({error}); run bench/fetch_cudnn_frontend.sh "
                      "and install .wheels/nvidia_cudnn_frontend-*.whl")
    except Exception as error:  # noqa: BLE001 - a broken install (missing libcudnn, ...) says why
        return None, f"the cudnn Python module failed to load: {type(error).__name__}: {error}"
    return cudnn, None


def unavailable_reason(device: torch.device, dtype: torch.dtype) -> Optional[str]:
    """Why the cuDNN fused graph cannot run here; None when it may (the graph build has the last word)."""
    if torch.device(device).type != "cuda":
        return "cuDNN's fused conv engine needs a CUDA GPU"
    if dtype != DTYPE:
        return f"cuDNN's scale-bias-ReLU-conv-genstats engine takes fp16 NHWC only (this run: {dtype})"
    return _import_cudnn()[1]


class ConvGenstats:
    """One built cuDNN graph for NHWC ``x`` (a channels_last NCHW tensor), ``weight`` and
    per-channel ``scale``/``bias``; calling it runs the graph and returns (y, sum, sq_sum)."""

    def __init__(self, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, bias: torch.Tensor,
                 stride: int):
        cudnn, reason = _import_cudnn()
        if cudnn is None:
            raise RuntimeError(reason)
        n, c, h, w = x.shape
        k = weight.shape[-1]
        self.x = x.to(DTYPE, memory_format=torch.channels_last)
        self.weight = weight.to(DTYPE, memory_format=torch.channels_last)
        self.scale = scale.reshape(1, c, 1, 1).to(DTYPE).contiguous(memory_format=torch.channels_last)
        self.bias = bias.reshape(1, c, 1, 1).to(DTYPE).contiguous(memory_format=torch.channels_last)
        self.handle = cudnn.create_handle()
        cudnn.set_stream(handle=self.handle, stream=torch.cuda.current_stream().cuda_stream)

        half, fp32 = cudnn.data_type.HALF, cudnn.data_type.FLOAT
        graph = cudnn.pygraph(io_data_type=half, intermediate_data_type=half, compute_data_type=fp32,
                              handle=self.handle)

        def tensor(name, t):
            return graph.tensor(name=name, dim=list(t.shape), stride=list(t.stride()), data_type=half)

        X, W, S, B = (tensor("X", self.x), tensor("W", self.weight), tensor("S", self.scale),
                      tensor("B", self.bias))
        activated = graph.relu(name="relu", input=graph.bias(name="bias", input=graph.scale(
            name="scale", input=X, scale=S), bias=B))
        pad = k // 2
        Y = graph.conv_fprop(image=activated, weight=W, padding=[pad, pad], stride=[stride, stride],
                             dilation=[1, 1])
        Y.set_output(True)
        SUM, SQ_SUM = graph.genstats(name="genstats", input=Y)
        SUM.set_output(True).set_data_type(fp32)
        SQ_SUM.set_output(True).set_data_type(fp32)
        graph.validate()
        graph.build_operation_graph()
        graph.create_execution_plans([cudnn.heur_mode.A, cudnn.heur_mode.FALLBACK])
        graph.check_support()      # raises cudnnGraphNotSupportedError with cuDNN's reason
        graph.build_plans()

        ho = (h + 2 * pad - k) // stride + 1
        wo = (w + 2 * pad - k) // stride + 1
        self.y = torch.empty(n, weight.shape[0], ho, wo, device=x.device, dtype=DTYPE,
                             memory_format=torch.channels_last)
        self.sum = torch.empty(1, weight.shape[0], 1, 1, device=x.device, dtype=torch.float32)
        self.sq_sum = torch.empty_like(self.sum)
        self.workspace = torch.empty(graph.get_workspace_size(), device=x.device, dtype=torch.uint8)
        self.graph = graph
        self.variant_pack = {X: self.x, W: self.weight, S: self.scale, B: self.bias, Y: self.y,
                             SUM: self.sum, SQ_SUM: self.sq_sum}

    def __call__(self):
        self.graph.execute(self.variant_pack, self.workspace, handle=self.handle)
        return self.y, self.sum, self.sq_sum
