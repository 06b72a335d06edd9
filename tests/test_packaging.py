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
from pathlib import Path

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
    """Under pip's isolation `import torch` fails in the backend; should asking the target
    interpreter fail, its site-packages (where this torch lies, unless it came from PYTHONPATH or a
    .pth file) still hold it."""
    here = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
    if here not in backend.target_site_packages():
        pytest.skip(f"this torch is not in the interpreter's site-packages ({here})")
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name, *args: None)
    monkeypatch.setattr(backend, "ask_target_interpreter", lambda: {"torch": None, "path": []})
    assert backend.find_target_torch() == here
    assert sys.path[-1] == here


def test_backend_without_any_torch_says_what_to_install(backend, monkeypatch):
    monkeypatch.setattr(backend.importlib.util, "find_spec", lambda name, *args: None)
    monkeypatch.setattr(backend, "ask_target_interpreter", lambda: {"torch": None, "path": []})
    monkeypatch.setattr(backend, "target_site_packages", lambda: [])
    with pytest.raises(SystemExit, match=r"torch is not installed in the environment of .*install torch first"):
        backend.get_requires_for_build_editable()


# -- torch where the target interpreter finds it: a .pth file, the user site, PYTHONPATH ----------------
# A bare interpreter (this Python's binary and standard library, site-packages empty, not a venv,
# whose user site is always off) gets this torch in one of three ways; the build backend runs in it
# the way pip runs it: PYTHONNOUSERSITE=1 and a PYTHONPATH of pip's own, whose sitecustomize drops the
# interpreter's site-packages. A torch folder copied for the test would cost gigabytes, so the three
# setups reach this torch's folder: a .pth file in the interpreter's site-packages, a .pth file in
# the user site under PYTHONUSERBASE, or PYTHONPATH. Objects of the real builds (--full) are shared
# with any build against this torch (build/<variant>-...-<hash of torch's folder>).
TORCH_SITE = os.path.dirname(os.path.dirname(os.path.abspath(torch.__file__)))
SETUPS = ["pth", "user site", "PYTHONPATH"]


def _bare_interpreter(folder) -> str:
    import sysconfig
    stdlib, version = sysconfig.get_paths()["stdlib"], f"python{sys.version_info.major}.{sys.version_info.minor}"
    (folder / "bin").mkdir(parents=True)
    lib = folder / "lib" / version
    (lib / "site-packages").mkdir(parents=True)
    for entry in os.listdir(stdlib):
        if entry != "site-packages":
            os.symlink(os.path.join(stdlib, entry), lib / entry)
    python = folder / "bin" / version
    shutil.copy2(os.path.realpath(sys.executable), python)
    return str(python)


def _setup(tmp_path, setup: str):
    """(python, environment) of a bare interpreter that imports this torch through ``setup``."""
    python = _bare_interpreter(tmp_path / "bare")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONNOUSERSITE", "PYTHONHOME")}
    env["PYTHONUSERBASE"] = str(tmp_path / "userbase")
    if setup == "pth":
        site_packages = subprocess.run([python, "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                                       env=env, capture_output=True, text=True, check=True).stdout.strip()
        (Path(site_packages) / "torch_here.pth").write_text(TORCH_SITE + "\n")
    elif setup == "user site":
        user_site = subprocess.run([python, "-c", "import site; print(site.getusersitepackages())"],
                                   env=env, capture_output=True, text=True, check=True).stdout.strip()
        os.makedirs(user_site)
        (Path(user_site) / "torch_here.pth").write_text(TORCH_SITE + "\n")
    else:
        env["PYTHONPATH"] = TORCH_SITE
    found = subprocess.run([python, "-c", "import importlib.util; print(importlib.util.find_spec('torch').origin)"],
                           env=env, capture_output=True, text=True)
    assert found.stdout.strip() == torch.__file__, found.stderr[-2000:]
    return python, env


# pip's build isolation, as pip 23 sets it up: this sitecustomize (its logic) on PYTHONPATH
ISOLATION_SITECUSTOMIZE = """\
import os, site, sys
original_sys_path = sys.path[:]
known_paths = set()
for path in {system_sites!r}:
    site.addsitedir(path, known_paths=known_paths)
system_paths = set(os.path.normcase(p) for p in sys.path[len(original_sys_path):])
sys.path = [p for p in original_sys_path if os.path.normcase(p) not in system_paths]
for path in {lib_dirs!r}:
    site.addsitedir(path)
"""


@pytest.mark.parametrize("setup", SETUPS)
def test_backend_under_isolation_finds_torch_where_the_interpreter_does(tmp_path, setup):
    """The backend in a process that pip's isolation hides torch from, started by a process with the
    user's environment (as pip is): it finds torch through the .pth file, the user site or PYTHONPATH."""
    python, env = _setup(tmp_path, setup)
    system_sites = subprocess.run([python, "-c", "import site; print(repr(site.getsitepackages()))"], env=env,
                                  capture_output=True, text=True, check=True).stdout.strip()
    isolation = tmp_path / "pip-build-env-test" / "site"
    isolation.mkdir(parents=True)
    build_requirements = tmp_path / "pip-build-env-test" / "overlay"   # setuptools, as pip installs it there
    build_requirements.mkdir()
    import setuptools
    for name in ("setuptools", "_distutils_hack", "pkg_resources"):
        source = os.path.join(os.path.dirname(os.path.dirname(setuptools.__file__)), name)
        if os.path.exists(source):
            os.symlink(source, build_requirements / name)
    (isolation / "sitecustomize.py").write_text(ISOLATION_SITECUSTOMIZE.format(
        system_sites=eval(system_sites), lib_dirs=[str(build_requirements)]))
    backend_code = ("import importlib.util, json, sys; hidden = importlib.util.find_spec('torch') is None; "
                    f"sys.path.insert(0, {os.path.join(ROOT, 'build_backend')!r}); import fused_preact_backend as b; "
                    "folder = b.find_target_torch(); "
                    "print(json.dumps({'hidden': hidden, 'folder': folder, "
                    "'torch': importlib.util.find_spec('torch').origin}))")
    launcher = ("import os, subprocess, sys; "
                "env = dict(os.environ, PYTHONNOUSERSITE='1', PYTHONPATH=sys.argv[1]); "
                "sys.exit(subprocess.run([sys.executable, '-c', sys.argv[2]], env=env).returncode)")
    done = subprocess.run([python, "-c", launcher, str(isolation), backend_code], env=env, cwd=str(tmp_path),
                          capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-3000:]
    report = json.loads(done.stdout.strip().splitlines()[-1])
    assert report["hidden"], "the simulated isolation did not hide torch"
    assert report["folder"] == TORCH_SITE and report["torch"] == torch.__file__


def test_backend_takes_pips_isolation_variables_back(backend, tmp_path):
    site = tmp_path / "pip-build-env-abc" / "site"
    site.mkdir(parents=True)
    (site / "sitecustomize.py").write_text("")
    isolated = {"PYTHONPATH": str(site), "PYTHONNOUSERSITE": "1", "PATH": "/x"}
    assert backend.target_environment(isolated, launched={"PYTHONPATH": "/modules/torch"}) == \
        {"PYTHONPATH": "/modules/torch", "PATH": "/x"}
    assert backend.target_environment(isolated, launched={"PYTHONNOUSERSITE": "1"}) == \
        {"PYTHONNOUSERSITE": "1", "PATH": "/x"}
    plain = {"PYTHONPATH": "/a", "PYTHONNOUSERSITE": "1"}
    assert backend.target_environment(plain, launched={}) == plain    # no isolation: left as it is


@pytest.mark.full   # pip installs the build requirements and builds (the CPU part, objects reused): ~1 min
@pytest.mark.parametrize("setup", SETUPS)
def test_pip_builds_the_extension_with_torch_where_the_interpreter_finds_it(tmp_path, setup):
    """`pip wheel` of this tree under build isolation (the default) for a bare interpreter that imports
    torch through ``setup``: the extension is built, against this torch."""
    import zipfile
    python, env = _setup(tmp_path, setup)
    env.update(FUSED_PREACT_CUDA="0", MAX_JOBS=env.get("MAX_JOBS", "2"))
    done = subprocess.run([sys.executable, "-m", "pip", "--python", python, "wheel", "--no-deps", "-w",
                           str(tmp_path / "wheels"), ROOT], env=env, capture_output=True, text=True, timeout=1800)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    (wheel,) = (tmp_path / "wheels").glob("fused_preact-*.whl")
    with zipfile.ZipFile(wheel) as archive:
        names = archive.namelist()
        info = json.loads(archive.read("fused_preact/_build_info.json"))
    assert any(n.startswith("fused_preact/_C") and n.endswith(".so") for n in names), names
    assert info["torch"] == torch.__version__ and info["cuda_not_built"] == "FUSED_PREACT_CUDA=0"
