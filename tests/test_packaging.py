"""Packaging: the extension is built where it can be, is loaded only under the torch it was built
against, the package owns the import name of its Triton kernels, and the build backend finds the
target environment's torch."""
import importlib.util
import json
import os
import shutil
import subprocess
import sys
import warnings

import pytest
import torch

from fused_preact import _extension

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code, **kwargs):
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, **kwargs)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    return done.stdout


def test_extension_is_built_where_torch_and_a_compiler_are():
    """An install that silently built no extension must not pass: torch is here (this test imports
    it), so only a missing C++ compiler excuses a missing extension."""
    from torch.utils.cpp_extension import get_cxx_compiler
    if shutil.which(get_cxx_compiler()) is None:
        pytest.skip(f"no C++ compiler ({get_cxx_compiler()}) on this machine")
    assert _extension.available(), _extension.unavailable_reason()


@pytest.fixture(scope="module")
def probe(tmp_path_factory):
    """One fresh process (imports take seconds) that imports fused_preact with an unrelated top-level
    `kernels` package first on sys.path, loads the Triton kernels, then loads the extension against
    a build record of another torch. Returns its report."""
    tmp_path = tmp_path_factory.mktemp("probe")
    (tmp_path / "kernels").mkdir()
    (tmp_path / "kernels" / "__init__.py").write_text("raise ImportError('the unrelated kernels package was imported')\n")
    (tmp_path / "kernels" / "ops.py").write_text("raise ImportError('the unrelated kernels.ops was imported')\n")
    info = tmp_path / "_build_info.json"
    info.write_text(json.dumps({"torch": "2.4.0+cu121", "torch_cuda": "12.1", "cuda": True}))
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), ROOT, os.environ.get("PYTHONPATH", "")]))
    env.setdefault("TRITON_INTERPRET", "1")
    code = ("import json, sys, torch\n"
            "from fused_preact import _extension, dispatch\n"
            "report = {'triton_error': dispatch._triton_import_error()}\n"
            "report['ops_file'] = getattr(sys.modules.get('fused_preact.kernels.ops'), '__file__', None)\n"
            "report['registered'] = hasattr(torch.ops.fused_preact_triton, 'conv_bnrelu')\n"
            "report['other_kernels'] = [m for m in sys.modules if m == 'kernels' or m.startswith('kernels.')]\n"
            f"_extension.BUILD_INFO = {str(info)!r}\n"
            "import warnings\n"
            "with warnings.catch_warnings(record=True) as caught:\n"
            "    warnings.simplefilter('always')\n"
            "    _extension.warn_at_import()\n"
            "report['import_warning'] = [str(w.message) for w in caught]\n"
            "report['available'] = _extension.available()\n"
            "report['so_loaded'] = 'fused_preact._C' in sys.modules\n"
            "report['reason'] = _extension.unavailable_reason()\n"
            "print(json.dumps(report))\n")
    return json.loads(_run(code, cwd=str(tmp_path), env=env).splitlines()[-1])


def test_fused_preact_finds_its_own_kernels_past_an_unrelated_top_level_kernels(probe):
    """`kernels` is another project's name on PyPI: with such a package first on sys.path,
    fused_preact still loads its own Triton kernels, and never imports the other one."""
    assert probe["triton_error"] is None and probe["registered"]
    assert os.path.join("fused_preact", "kernels", "ops.py") in probe["ops_file"]
    assert probe["other_kernels"] == []


def test_extension_built_against_another_torch_refuses_to_load_naming_both(probe):
    if not _extension.available():
        pytest.skip(f"no built extension here: {_extension.unavailable_reason()}")
    assert not probe["available"] and not probe["so_loaded"], "the .so was loaded"
    assert len(probe["import_warning"]) == 1 and "built against torch 2.4.0+cu121" in probe["import_warning"][0]
    assert "built against torch 2.4.0+cu121 (CUDA 12.1)" in probe["reason"]
    assert f"this is torch {torch.__version__} (CUDA {torch.version.cuda})" in probe["reason"]
    assert "pip install -e ." in probe["reason"]


def test_installed_distribution_has_no_top_level_kernels_package():
    from importlib import metadata
    try:
        dist = metadata.distribution("fused-preact")
    except metadata.PackageNotFoundError:
        pytest.skip("fused-preact is not installed (a source checkout on PYTHONPATH)")
    direct_url = json.loads(dist.read_text("direct_url.json") or "{}")
    if direct_url.get("dir_info", {}).get("editable") and \
            os.path.realpath(direct_url["url"].removeprefix("file://")) != os.path.realpath(ROOT):
        pytest.skip(f"the installed fused-preact is an editable install of another tree ({direct_url['url']})")
    top_level = (dist.read_text("top_level.txt") or "fused_preact").split()
    assert top_level == ["fused_preact"]


def test_missing_build_record_refuses_to_load():
    assert "has no build record" in _extension.mismatch(None)


def test_recorded_cuda_build_failure_warns_and_a_deliberate_cpu_build_is_quiet():
    failed = {"torch": torch.__version__, "cuda": False,
              "cuda_failure": "the CUDA toolkit at CUDA_HOME=/opt/broken has no libcudart (lib64/ or lib/)"}
    with pytest.warns(RuntimeWarning, match=r"built without its CUDA part: the CUDA toolkit at "
                                            r"CUDA_HOME=/opt/broken has no libcudart.*FUSED_PREACT_CUDA=1"):
        _extension.warn_of_build_failure(failed)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        _extension.warn_of_build_failure({"torch": torch.__version__, "cuda": False,
                                          "cuda_not_built": "FUSED_PREACT_CUDA=0", "cuda_failure": None})


# -- the build backend ------------------------------------------------------------
@pytest.fixture
def backend(monkeypatch):
    pytest.importorskip("setuptools")
    spec = importlib.util.spec_from_file_location(
        "fused_preact_backend_under_test", os.path.join(ROOT, "build_backend", "fused_preact_backend.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    monkeypatch.setattr(sys, "path", list(sys.path))
    return module


def test_backend_finds_the_target_environments_torch_when_isolation_hides_it(backend, monkeypatch):
    """Under pip's isolation `import torch` fails in the backend; the target interpreter's
    site-packages (where this torch lies, unless it came from PYTHONPATH) hold it."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    if here not in backend.target_site_packages():
        pytest.skip(f"this torch is not in the interpreter's site-packages ({here})")
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name, *args: None)
    assert backend.find_target_torch() == here
    assert sys.path[-1] == here


def test_backend_without_any_torch_says_what_to_install(backend, monkeypatch):
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name, *args: None)
    monkeypatch.setattr(backend, "target_site_packages", lambda: [])
    with pytest.raises(SystemExit, match=r"torch is not installed in the environment of .*install torch first"):
        backend.get_requires_for_build_editable()
