"""The demo (`python -m fused_preact.demo`, the README's first command) at a small depth."""
import re

from fused_preact import _extension, demo


def test_demo_reports_every_comparison_and_the_fused_unit_is_close_to_float64(capsys):
    demo.main(["--depth", "11", "--batch", "2", "--repeats", "1"])
    out = capsys.readouterr().out
    assert "fused units run: " in out and "backend='auto' on this input runs: " in out and "speed-up" in out
    if _extension.available():   # the C++ CPU kernels, said as such, not a bare "cuda"
        assert "fused units run: cuda backend: C++ extension, CPU kernels" in out
    rows = {}
    for line in out.splitlines():
        match = re.match(r"(unit [a-z ]+|ResNet-11 [a-z_() ]+?)\s{2,}([-+.e\d]+)(?:\s+([-+.e\d]+)\s+([-+.e\d]+))?$", line)
        if match:
            rows[match.group(1).strip()] = [float(v) for v in match.groups()[1:] if v is not None]
    assert set(rows) == {"unit output", "unit input gradient", "unit parameter gradients",
                         "unit running statistics", "ResNet-11 logits (convert_to_fused)",
                         "ResNet-11 parameter gradients"}
    assert rows["unit output"][1] < 1e-5 and rows["unit input gradient"][1] < 1e-4
    assert rows["unit running statistics"][0] < 1e-4
