"""fused-preact's PEP 517 build backend: setuptools' own, run so that the build sees the torch of
the environment the package is being installed into.

The C++/CUDA extension must be compiled against the torch it will run with (same version, same CUDA),
and that torch is the one the target interpreter imports. With pip's default build isolation the
backend runs in that interpreter, but in an environment that holds only the build requirements: pip
sets PYTHONNOUSERSITE=1 (no user site) and replaces PYTHONPATH with a folder of its own whose
``sitecustomize`` drops the interpreter's site-packages from ``sys.path``. So torch installed in the
target's site-packages, reached through a ``.pth`` file, in the user site (``pip install --user``,
PYTHONUSERBASE) or on PYTHONPATH (cluster environment modules) is invisible to ``import torch`` here.
This backend asks the target interpreter itself: a subprocess of ``sys.executable`` run in the
environment pip was started with (pip's isolation variables taken back: PYTHONNOUSERSITE and
PYTHONPATH as pip found them, read from pip's process on Linux, else dropped) says where ``torch``
lies and which ``sys.path`` entries it has; those this process lacks are appended to the end of
``sys.path``, so that ``import torch`` in setup.py finds that torch (and what torch imports) while
setuptools, wheel and ninja still come from the build environment. With ``--no-build-isolation``
torch is importable anyway and nothing is asked.

Why not the other way, asking in ``get_requires_for_build_*`` for ``torch==<the installed version>``
so that pip installs that torch into the isolated environment: measured on the 2-core dev machine
(torch 2.14.1 from local disk, notes/packaging.md), that costs every `pip install -e .` 5.4 GB of
temporary disk (torch with its nvidia-* and triton dependencies) and 95 s of installing, rebuilds of
an unchanged tree included (8 s this way); it needs a registry holding that exact build (local
versions such as +cpu are not on PyPI, where `torch==2.x.y` is a CUDA build; the GPU machine has no
registry at all); and it builds against a second copy, the same torch only while pip resolves the
same wheel.

When the target environment has no torch at all, the build stops at once with what to install
(setup.py says the same when run directly): a package installed without its extension would only
fail later, at run time. A frontend whose isolated environment runs another interpreter (``python -m
build``, ``uv``) cannot be looked through this way: use ``pip wheel .`` or their
``--no-isolation`` / ``--no-build-isolation``.
"""
from __future__ import annotations

import importlib.util
import json
import os
import site
import subprocess
import sys
import sysconfig
import tempfile

from setuptools import build_meta as _setuptools
from setuptools.build_meta import (  # noqa: F401  (the hooks that need no torch, as setuptools has them)
    build_sdist, get_requires_for_build_sdist, prepare_metadata_for_build_editable,
    prepare_metadata_for_build_wheel)


def target_site_packages() -> list:
    """The site-packages folders of the interpreter running this backend (under pip's isolation: the
    environment being installed into), those of a venv's base included when it sees them."""
    folders = [sysconfig.get_paths()[key] for key in ("purelib", "platlib")]
    try:
        folders += site.getsitepackages()
    except AttributeError:   # old virtualenv's site.py
        pass
    seen = []
    for folder in folders:
        if folder and folder not in seen and os.path.isdir(folder):
            seen.append(folder)
    return seen


def _isolation_folder(folder: str) -> bool:
    """The folder pip's build isolation puts on PYTHONPATH: ``<temp>/pip-build-env-*/site``, whose
    ``sitecustomize.py`` hides the target interpreter's site-packages."""
    return "pip-build-env" in folder and os.path.isfile(os.path.join(folder, "sitecustomize.py"))


def _launch_environment(pid: int):
    """The environment process ``pid`` was started with (Linux ``/proc``), or None."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as f:
            entries = f.read().split(b"\0")
    except OSError:
        return None
    pairs = (entry.decode(errors="surrogateescape").partition("=") for entry in entries if b"=" in entry)
    return {name: value for name, _, value in pairs}


def target_environment(environ=None, launched=None) -> dict:
    """The environment variables the target interpreter sees outside pip's build isolation.

    ``environ``: this process's (default ``os.environ``). Under isolation (pip's site folder on
    PYTHONPATH) PYTHONPATH and PYTHONNOUSERSITE are taken back from ``launched``, the environment
    pip was started with (default: read from the parent process, pip, on Linux); where that is
    unknown, pip's values are dropped (the user site on, no PYTHONPATH)."""
    env = dict(os.environ if environ is None else environ)
    entries = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p]
    if not any(_isolation_folder(p) for p in entries):
        return env   # no isolation: --no-build-isolation, or a frontend of another kind
    if launched is None:
        launched = _launch_environment(os.getppid()) or {}
    for name in ("PYTHONPATH", "PYTHONNOUSERSITE"):
        if name in launched:
            env[name] = launched[name]
        else:
            env.pop(name, None)
    kept = [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p and not _isolation_folder(p)]
    if kept:
        env["PYTHONPATH"] = os.pathsep.join(kept)
    else:
        env.pop("PYTHONPATH", None)
    return env


_PROBE = ("import importlib.util, json, sys; spec = importlib.util.find_spec('torch'); "
          "print(json.dumps({'torch': spec.origin if spec else None, 'path': sys.path[1:]}))")


def ask_target_interpreter(environ=None) -> dict:
    """``{"torch": torch/__init__.py or None, "path": sys.path}`` of ``sys.executable`` run in
    ``target_environment(environ)`` (torch itself is found, not imported); an empty answer when the
    subprocess fails."""
    try:
        done = subprocess.run([sys.executable, "-c", _PROBE], env=target_environment(environ),
                              cwd=tempfile.gettempdir(), capture_output=True, text=True, timeout=300)
        answer = json.loads(done.stdout.strip().splitlines()[-1])
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return {"torch": None, "path": []}
    return answer


def find_target_torch() -> str | None:
    """Make the target environment's torch importable; returns the folder holding it, or None."""
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.origin:
        return os.path.dirname(os.path.dirname(spec.origin))
    answer = ask_target_interpreter()
    if answer["torch"]:
        for entry in answer["path"]:   # last: the build environment's setuptools and wheel stay first
            if entry and entry not in sys.path and os.path.isdir(entry):
                sys.path.append(entry)
        importlib.invalidate_caches()
        if importlib.util.find_spec("torch") is not None:
            return os.path.dirname(os.path.dirname(answer["torch"]))
    for folder in target_site_packages():   # the interpreter's own site-packages, should the question fail
        if os.path.isfile(os.path.join(folder, "torch", "__init__.py")):
            sys.path.append(folder)
            importlib.invalidate_caches()
            return folder
    return None


def require_target_torch() -> str:
    folder = find_target_torch()
    if folder is None:
        raise SystemExit(
            f"fused-preact: torch is not installed in the environment of {sys.executable} "
            f"(looked in {', '.join(target_site_packages()) or 'no site-packages'}). The C++ extension "
            "is built against the torch it will run with: install torch first (`pip install torch`, or "
            "the build for your CUDA version from pytorch.org), then install fused-preact again. (Frontends "
            "that build in an environment of their own interpreter, such as `python -m build` or uv, "
            "need their --no-isolation / --no-build-isolation flag.)")
    return folder


def get_requires_for_build_wheel(config_settings=None):
    require_target_torch()
    return _setuptools.get_requires_for_build_wheel(config_settings)


def get_requires_for_build_editable(config_settings=None):
    require_target_torch()
    return _setuptools.get_requires_for_build_editable(config_settings)


def build_wheel(wheel_directory, config_settings=None, metadata_directory=None):
    require_target_torch()
    return _setuptools.build_wheel(wheel_directory, config_settings, metadata_directory)


def build_editable(wheel_directory, config_settings=None, metadata_directory=None):
    require_target_torch()
    return _setuptools.build_editable(wheel_directory, config_settings, metadata_directory)
