"""Triton kernels of the fused pre-activation unit; reached only through fused_preact.dispatch."""
