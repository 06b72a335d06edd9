"""The test suite itself: its helpers import whatever else is installed (a foreign top-level
`tests` package included), and ``@pytest.mark.default_cases`` keeps a sample of a cross product in
the default run, the rest marked ``full``."""
import os
import subprocess
import sys
from pathlib import Path

import pytest

import conftest

REPO = Path(__file__).resolve().parents[1]


def test_a_foreign_top_level_tests_package_changes_nothing(tmp_path):
    """Some packages on the registry install a top-level `tests` package into site-packages: with one
    importable (as a regular package it wins over this folder, which has no __init__.py, wherever
    it sits on the path), the tests that import the helpers collect and pass."""
    foreign = tmp_path / "site" / "tests"
    foreign.mkdir(parents=True)
    (foreign / "__init__.py").write_text("FOREIGN = True   # another project's test package\n")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(tmp_path / "site"), os.environ.get("PYTHONPATH", "")])}
    shadowed = subprocess.run([sys.executable, "-c", "import tests; print(tests.__file__)"], cwd=REPO, env=env,
                              capture_output=True, text=True)
    assert shadowed.stdout.strip() == str(foreign / "__init__.py"), shadowed.stderr
    selection = ["tests/test_original_units.py::test_fused_original_units_keep_the_eager_state",  # comparisons
                 "tests/test_triton_conv_compile.py::test_variants_cover_every_switch"]           # gpu_code
    done = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *selection], cwd=REPO,
                          env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-2000:]
    assert "2 passed" in done.stdout, done.stdout[-2000:]


class _Item:
    """The parts of a pytest item that conftest.pytest_itemcollected reads."""

    def __init__(self, marker, params, id_):
        self.marker, self.marks = marker, []
        self.callspec = type("CallSpec", (), {"params": params, "id": id_})()

    def get_closest_marker(self, name):
        return self.marker if name == "default_cases" else None

    def add_marker(self, mark):
        self.marks.append(mark.name)


@pytest.mark.parametrize("marker, params, id_, marked_full", [
    (pytest.mark.default_cases(keep=lambda p: p["backend"] == "cuda").mark, {"backend": "cuda"}, "cuda", False),
    (pytest.mark.default_cases(keep=lambda p: p["backend"] == "cuda").mark, {"backend": "triton"}, "triton", True),
    (pytest.mark.default_cases(ids=["eager"]).mark, {"backend": "eager"}, "eager", False),
    (pytest.mark.default_cases(ids=["eager"]).mark, {"backend": "auto"}, "auto", True),
])
def test_default_cases_mark_the_rest_of_the_product_full(marker, params, id_, marked_full):
    item = _Item(marker, params, id_)
    conftest.pytest_itemcollected(item)
    assert item.marks == (["full"] if marked_full else [])
