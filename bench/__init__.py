"""Benchmarks of fused-preact: ``python bench/fused_vs_eager.py`` (see bench/README.md).

The helper modules (cases, measure, floors, kernel_profile, cudnn_fused, environment,
report) are imported as ``bench.<name>`` by the script and by ``tests/test_bench.py``.
"""
