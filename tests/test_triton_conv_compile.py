"""Ahead-of-time compile of every Triton conv configuration for sm_80 and sm_90.

Every entry of ``aot_variants()`` of the three conv kernels (each dtype, weight dtype, product
precision, epilogue switch, padding switch and tile configuration; kernel size and stride are
runtime sizes)
must compile without spilling to local memory, and the entries marked ``tensor_cores`` must
contain HMMA/HGMMA (float64 entries DMMA). The compile runs in a subprocess without
TRITON_INTERPRET (under the interpreter the kernels are not JIT functions), two workers at a
time; Triton's cache makes a rerun of unchanged kernels quick, the first run takes minutes.
Deselect with ``-m "not slow"``.

All 112 variants with the default padding have a twin with per-side padding (``_pad``) and the
forward and weight-gradient kernels have variants without prologue (``_raw``); every variant x 2
archs takes well over the 15 minutes the 112 took on the 2-core CI machine with a cold cache,
too long for the default run. The fixture compiles the variants whose tests are selected: by
default the first variant of every (kernel, dtype, weight dtype, precision), for sm_80 and sm_90 in
turn, plus the training path (bf16 activations with fp32 weights) with every epilogue switch on, at
the large tile (the most registers), for sm_90, and on sm_90 the large tile's per-side padding twins (forward residual+stats,
dgrad add+h, wgrad) and no-prologue variants (forward stats, wgrad); ``pytest --full``
(``bench/device_run.sh`` passes it) compiles every variant for both.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
from concurrent.futures import ProcessPoolExecutor

import pytest

from gpu_code import ARCHS, assert_no_spills, assert_tensor_cores, sass

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
MODULES = ("fused_preact.kernels.conv_bnrelu_fwd", "fused_preact.kernels.conv_dgrad", "fused_preact.kernels.conv_wgrad")


def _all_variants():
    import importlib
    for module in MODULES:
        yield from importlib.import_module(module).aot_variants()


def _family(name: str) -> str:
    """kernel, dtype, weight dtype and precision of a variant: its name without switches and tile."""
    return "_".join(p for p in name.split("_")
                    if p not in ("residual", "stats", "add", "h", "pad", "raw") and not p.startswith("m"))


# per-side padding twins compiled by default: training path, large tile, every epilogue on (6 more
# compiles, about 10 s of CPU time cold)
DEFAULT_PADDED = ("conv_bnrelu_fwd_bf16_wfp32_ieee_residual_stats_pad_m128n64k32",
                  "conv_dgrad_bf16_wfp32_ieee_add_h_pad_m128n64k32",
                  "conv_wgrad_bf16_ieee_pad_m128n64k32")
# convs without prologue compiled by default: the training path's large tile
DEFAULT_RAW = ("conv_bnrelu_fwd_bf16_wfp32_ieee_stats_raw_m128n64k32", "conv_wgrad_bf16_ieee_raw_m128n64k32")


def _default_cases() -> set:
    """(name, arch) of the default run: see the module docstring."""
    cases, seen = set(), set()
    for v in _all_variants():
        name = v["name"]
        if _family(name) not in seen:
            seen.add(_family(name))
            cases.add((name, ARCHS[len(seen) % len(ARCHS)]))
        if "_pad_" in name or "_raw_" in name:
            if name in DEFAULT_PADDED or name in DEFAULT_RAW:
                cases.add((name, 90))
        elif ("_bf16_wfp32_ieee_residual_stats_m128" in name or "_bf16_wfp32_ieee_add_h_m128" in name
                or name.startswith("conv_wgrad_bf16_ieee_m128")):
            cases.add((name, 90))
    return cases


def _compile_one(job):
    name, arch, folder = job
    from gpu_code import compile_triton
    variant = next(v for v in _all_variants() if v["name"] == name)
    cubin = compile_triton(variant["kernel"], variant["signature"], variant["constexprs"], arch,
                           variant["num_warps"], variant["num_stages"])
    path = os.path.join(folder, f"{name}.sm{arch}.cubin")
    with open(path, "wb") as f:
        f.write(cubin)
    return path


def compile_all(folder: str, cases) -> None:
    """Entry point of the subprocess: write ``<name>.sm<arch>.cubin`` for each (name, arch) given."""
    jobs = [(name, arch, folder) for name, arch in cases]
    with ProcessPoolExecutor(max_workers=min(2, os.cpu_count() or 1)) as pool:
        list(pool.map(_compile_one, jobs))


VARIANTS = {v["name"]: v for v in _all_variants()}
DEFAULT_CASES = _default_cases()


@pytest.fixture(scope="module")
def cubins(request, tmp_path_factory):
    folder = str(tmp_path_factory.mktemp("conv_cubins"))
    cases = sorted({(item.callspec.params["name"], item.callspec.params["arch"]) for item in request.session.items
                    if getattr(item, "originalname", None) == "test_conv_variant_compiles_without_spills"
                    and item.path == request.path})
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    code = (f"import sys; sys.path[:0] = [{ROOT!r}, {os.path.join(ROOT, 'tests')!r}]; "
            f"from test_triton_conv_compile import compile_all; compile_all({folder!r}, {cases!r})")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-4000:]
    return folder


@pytest.mark.slow
@pytest.mark.default_cases(keep=lambda params: (params["name"], params["arch"]) in DEFAULT_CASES)
@pytest.mark.parametrize("arch", ARCHS)
@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_conv_variant_compiles_without_spills(cubins, name, arch):
    with open(os.path.join(cubins, f"{name}.sm{arch}.cubin"), "rb") as f:
        cubin = f.read()
    what = f"{name} sm_{arch}"
    assert_no_spills(cubin, what)
    if VARIANTS[name]["tensor_cores"]:
        assert_tensor_cores(cubin, what)
    if "_fp64_" in name:
        assert "DMMA" in sass(cubin), f"{what}: float64 product without DMMA"


def test_variants_cover_every_switch():
    """The variant list spans every dtype, weight dtype, product precision and epilogue switch."""
    names = {v["name"] for v in _all_variants()}
    for io in ("fp32", "bf16", "fp16", "fp64"):
        assert any(n.startswith(f"conv_bnrelu_fwd_{io}_") for n in names)
        assert any(n.startswith(f"conv_dgrad_{io}_") for n in names)
        assert any(n.startswith(f"conv_wgrad_{io}_") for n in names)
    for io in ("bf16", "fp16"):
        assert any(n.startswith(f"conv_bnrelu_fwd_{io}_wfp32") for n in names)
        assert any(n.startswith(f"conv_dgrad_{io}_wfp32") for n in names)
    assert any("_tf32" in n for n in names) and any("fp32_wfp32_ieee" in n for n in names)
    for switch in ("_residual_stats_", "_residual_m", "_stats_m", "_stats_raw_m", "_raw_m"):
        assert any(switch in n for n in names if n.startswith("conv_bnrelu_fwd_"))
    assert any("_raw_m" in n for n in names if n.startswith("conv_wgrad_"))
    for switch in ("_add_h_", "_add_m", "_h_m"):
        assert any(switch in n for n in names if n.startswith("conv_dgrad_"))
    # every variant has its per-side padding twin, and the default run compiles the named ones
    assert all("_pad_m".join(n.rsplit("_m", 1)) in names for n in names if "_pad_" not in n)
    assert len([n for n in names if "_pad_" in n]) * 2 == len(names)
    assert set(DEFAULT_PADDED) <= names and set(DEFAULT_PADDED) <= set(VARIANTS)
    assert all(v["tensor_cores"] for v in _all_variants() if "bf16" in v["name"] or "fp16" in v["name"])
