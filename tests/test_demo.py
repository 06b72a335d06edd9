"""The demo (`python -m fused_preact.demo`, the README's first command) at a small depth, and its
verdict line computed from the numbers (both outcomes, on errors constructed here)."""
import re

import pytest
import torch

from fused_preact import _extension, demo


def test_demo_reports_every_comparison_and_a_verdict_from_its_numbers(capsys):
    demo.main(["--depth", "11", "--batch", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "fused units run: " in out and "backend='auto' on this input runs: " in out and "speed-up" in out
    if _extension.available():   # the C++ CPU kernels, said as such, not a bare "cuda"
        assert "fused units run: cuda backend: C++ extension, CPU kernels" in out
    rows = {}
    for line in out.splitlines():
        match = re.match(r"(unit [a-z ]+|ResNet-11 [a-z_() ]+?)\s{2,}([-+.e\d]+)\s+([-+.e\d]+)\s+([.\d]+)x"
                         r"(?:\s+(\S+))?$", line)
        if match:
            rows[match.group(1).strip()] = match.groups()[1:]
    assert set(rows) == {"unit output", "unit input gradient", "unit parameter gradients",
                         "unit running statistics", "ResNet-11 logits (convert_to_fused)",
                         "ResNet-11 parameter gradients"}
    # float32 both: norm-wise errors near float32 rounding for the unit's output and input gradient
    assert float(rows["unit output"][0]) < 1e-5 and float(rows["unit input gradient"][0]) < 1e-4
    assert float(rows["unit running statistics"][0]) < 1e-4
    assert rows["unit parameter gradients"][3] in {"bn1.weight", "bn1.bias", "conv1.weight", "bn2.weight",
                                                   "bn2.bias", "conv2.weight", "bn3.weight", "bn3.bias",
                                                   "conv3.weight"}
    assert rows["ResNet-11 parameter gradients"][3].startswith(("stem", "stages", "head", "bn", "fc", "conv"))
    close = all(float(f) <= demo.VERDICT_FACTOR * float(e) + demo.VERDICT_FLOOR for f, e, *_ in rows.values())
    (verdict,) = [line for line in out.splitlines() if line.startswith("verdict: ")]
    assert verdict.startswith("verdict: fused is as close to float64 as eager" if close
                              else "verdict: fused is FURTHER from float64 than eager")


def test_normwise_error_is_the_norm_of_the_difference_over_the_norm():
    exact = torch.tensor([3.0, 4.0], dtype=torch.float64)
    assert demo.normwise_error(torch.tensor([3.0, 4.5]), exact) == 0.5 / 5.0
    assert demo.normwise_error(torch.zeros(2), torch.zeros(2)) == 0.0
    assert demo.normwise_error(torch.ones(2), torch.zeros(2)) == float("inf")


def test_a_running_mean_is_measured_against_the_spread_it_averages():
    """A running mean of nearly zero-mean data: a rounding-sized difference is tiny against the data's
    spread (sqrt of the running variance), though large against the mean itself."""
    exact_mean = torch.randn(64, dtype=torch.float64) * 1e-3
    exact_var = torch.rand(64, dtype=torch.float64) + 0.5
    rounded = exact_mean + torch.randn(64, dtype=torch.float64) * 1e-8
    against_spread = demo.normwise_error_of_mean(rounded, exact_mean, exact_var)
    assert against_spread == pytest.approx((rounded - exact_mean).norm().item() / exact_var.sqrt().norm().item())
    assert against_spread < 1e-7 < demo.normwise_error(rounded, exact_mean)
    errors = demo.tensor_errors({"bn.running_mean": rounded, "bn.running_var": exact_var},
                                {"bn.running_mean": exact_mean, "bn.running_var": exact_var})
    assert errors == {"bn.running_mean": against_spread, "bn.running_var": 0.0}


def test_verdict_says_as_close_when_fused_is_within_twice_eager():
    rows = [demo.Row("unit output", {"output": 3e-7}, {"output": 2e-7}),
            demo.Row("unit parameter gradients", {"conv1.weight": 1e-4, "bn1.bias": 4e-4},
                     {"conv1.weight": 5e-4, "bn1.bias": 2.5e-4}),
            demo.Row("unit running statistics", {"bn1.running_mean": 0.0}, {"bn1.running_mean": 0.0})]
    assert rows[1].worst_tensor == "bn1.bias"
    assert demo.verdict(rows) == ("verdict: fused is as close to float64 as eager (each row's error within 2x "
                                  "eager's; at most 1.50x)")


def test_verdict_says_fused_is_worse_and_by_how_much():
    rows = [demo.Row("unit output", {"output": 3e-7}, {"output": 2e-7}),
            demo.Row("unit parameter gradients", {"conv1.weight": 1e-4, "bn1.bias": 3e-3},
                     {"conv1.weight": 5e-4, "bn1.bias": 2.5e-4}),
            demo.Row("ResNet-11 logits", {"output": 7e-6}, {"output": 2e-6})]
    assert demo.verdict(rows) == ("verdict: fused is FURTHER from float64 than eager: unit parameter gradients "
                                  "(bn1.bias) 3.00e-03, 6.0x eager's 5.00e-04; 1 more row(s) beyond 2x")
