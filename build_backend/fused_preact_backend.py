"""fused-preact's PEP 517 build backend: setuptools' own, run so that the build sees the torch of
the environment the package is being installed into.

The C++/CUDA extension must be compiled against the torch it will run with (same version, same CUDA),
and that torch is the one already installed where `pip install` installs. With pip's default build
isolation the backend runs in a temporary environment that holds only the build requirements; this
backend then appends the target environment's site-packages (pip's isolation hides them from sys.path,
but the interpreter, and so ``sysconfig``'s paths, are the target's) to the end of ``sys.path``, so
that ``import torch`` in setup.py finds that torch while setuptools, wheel and ninja still come from
the build environment. With ``--no-build-isolation`` torch is importable anyway and nothing is added.

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
import os
import site
import sys
import sysconfig

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


def find_target_torch() -> str | None:
    """Make the target environment's torch importable; returns where it is, or None without one."""
    spec = importlib.util.find_spec("torch")
    if spec is not None and spec.origin:
        return os.path.dirname(os.path.dirname(spec.origin))
    for folder in target_site_packages():
        if os.path.isfile(os.path.join(folder, "torch", "__init__.py")):
            sys.path.append(folder)   # last: the build environment's setuptools and wheel stay first
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
