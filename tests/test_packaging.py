"""Packaging: the extension sources ship inside the package, the default build needs no torch,
and a prebuilt library in the package is loaded before, and instead of, a just-in-time build.

The end-to-end proof (both wheels built, each installed into a fresh virtual environment outside
the checkout and smoke-tested there, the ahead-of-time one with no compiler and no ninja
reachable) is .ci/wheel_smoke.sh, which CI runs. Here a copy of the package in a temporary
directory stands in for an installed one, with the library this session built just in time
placed where setup.py puts a prebuilt one (same sources and flags).
"""

from __future__ import annotations

import fnmatch
import json
import os
import shutil
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
import torch

from belm_kernels import extension
from belm_kernels._extension_specs import PREBUILT_INFO, SPECS, prebuilt_module

REPO = Path(__file__).resolve().parent.parent
BLOCK_TORCH = "import sys; sys.modules['torch'] = None; "  # any `import torch` then fails


def run_setup(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess:
    """Run setup.py with ``args`` in a fresh interpreter in which torch cannot be imported."""
    code = BLOCK_TORCH + ("import runpy; sys.argv = ['setup.py', *sys.argv[1:]]; "
                          "runpy.run_path('setup.py', run_name='__main__')")
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BELM_KERNELS_")}
    return subprocess.run([sys.executable, "-c", code, *args], cwd=str(REPO), capture_output=True,
                          text=True, timeout=120, env={**full_env, **(env or {})})


def test_default_build_does_not_import_torch():
    # So pip's isolated build environment never needs (and never downloads) a torch.
    proc = run_setup("--name")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "belm-kernels"


def test_pyproject_keeps_torch_out_of_the_build_and_ships_every_source():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    config = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert not [r for r in config["build-system"]["requires"] if r.lower().startswith("torch")]
    setuptools = config["tool"]["setuptools"]
    assert setuptools["package-dir"]["belm_kernels.csrc"] == "csrc"
    patterns = setuptools["package-data"]["belm_kernels.csrc"]
    sources = [p.name for p in (REPO / "csrc").iterdir() if p.is_file()]
    assert sources
    for name in sources:
        assert any(fnmatch.fnmatch(name, pat) for pat in patterns), f"csrc/{name} not shipped"


def test_ahead_of_time_build_without_torch_says_how():
    proc = run_setup("--name", env={"BELM_KERNELS_AOT": "1"})
    assert proc.returncode != 0
    assert "torch cannot be imported" in proc.stderr
    assert "--no-build-isolation" in proc.stderr


def test_ahead_of_time_build_rejects_an_unknown_kernel():
    proc = run_setup("--name", env={"BELM_KERNELS_AOT": "cpu,metal"})
    assert proc.returncode != 0
    assert "BELM_KERNELS_AOT='cpu,metal'" in proc.stderr and "cpu, cuda" in proc.stderr


# --------------------------------------------------------------------------------------------
# A copy of the package standing in for an installed one.


LOADER_SCRIPT = """
    import json, warnings, torch
    warnings.simplefilter("always")
    with warnings.catch_warnings(record=True) as caught:
        import belm_kernels as bk
        from belm_kernels import extension
        listed = bk.available_backends("cpu")
        x, y, z = torch.randn(3, 33), torch.randn(3, 33), torch.randn(3, 33)
        coef = torch.tensor([0.5, 0.25, -2.0])
        ref = 0.5 * x + 0.25 * y - 2.0 * z
        ok = None
        if "cpu" in listed:
            ok = bool(torch.allclose(bk.lincomb3_(x.clone(), y, z, coef, backend="cpu"), ref,
                                     atol=1e-5))
    ours = [str(w.message) for w in caught if "belm_kernels" in str(w.message)]
    print(json.dumps({"file": bk.__file__, "listed": listed, "ok": ok,
                      "origin": extension.origin("cpu"), "csrc": str(extension.csrc_dir()),
                      "reason": extension._load("cpu"), "warnings": ours}))
"""


@pytest.fixture
def jit_library():
    reason = extension.get_backend("cpu").unavailable_reason(torch.device("cpu"))
    assert reason is None, f"the CPU extension did not build: {reason}"
    from torch.utils import cpp_extension

    return extension.build_dir("cpu") / f"{SPECS['cpu'].lib_name}{cpp_extension.LIB_EXT}"


def install_copy(site: Path, *, sources: bool, prebuilt: Path | None = None,
                 built_for: str = torch.__version__) -> Path:
    """Copy the package to ``site/belm_kernels`` the way a wheel lays it out: with the sources
    in belm_kernels/csrc if ``sources``, and ``prebuilt`` as the prebuilt CPU library."""
    package = site / "belm_kernels"
    shutil.copytree(REPO / "belm_kernels", package, ignore=shutil.ignore_patterns("__pycache__"))
    if sources:
        shutil.copytree(REPO / "csrc", package / "csrc")
    if prebuilt is not None:
        name = prebuilt_module("cpu").split(".")[-1] + sysconfig.get_config_var("EXT_SUFFIX")
        shutil.copy2(prebuilt, package / name)
        info = {"torch": built_for, "torch_cuda": None, "built": {"cpu": name},
                "skipped": {"cuda": "torch is a CPU build"}}
        (package / PREBUILT_INFO).write_text(json.dumps(info))
    return package


def run_installed(site: Path, env: dict[str, str]) -> dict:
    """LOADER_SCRIPT in a fresh interpreter that imports the copy in ``site``."""
    full_env = {k: v for k, v in os.environ.items() if not k.startswith("BELM_KERNELS_")}
    full_env.update(env, PYTHONPATH=str(site))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(LOADER_SCRIPT)], cwd=str(site),
                          capture_output=True, text=True, timeout=120, env=full_env)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert Path(result["file"]).is_relative_to(site)  # the copy, not the checkout
    result["stderr"] = proc.stderr
    return result


def no_toolchain(tmp_path: Path) -> dict[str, str]:
    """Environment in which no compiler and no ninja can be found, and builds go to tmp_path."""
    return {"PATH": str(tmp_path / "empty-bin"), "CC": "/nonexistent/cc",
            "CXX": "/nonexistent/c++", "BELM_KERNELS_BUILD_DIR": str(tmp_path / "jit")}


def test_installed_package_finds_its_own_sources(tmp_path):
    package = install_copy(tmp_path / "site", sources=True)
    result = run_installed(tmp_path / "site", no_toolchain(tmp_path))
    assert result["csrc"] == str(package / "csrc")
    assert "ninja is not installed" in result["reason"]  # sources found: only ninja is missing


def test_prebuilt_library_loads_without_sources_compiler_or_ninja(tmp_path, jit_library):
    install_copy(tmp_path / "site", sources=False, prebuilt=jit_library)
    result = run_installed(tmp_path / "site", no_toolchain(tmp_path))
    assert result["listed"][0] == "cpu" and result["ok"] and result["reason"] is None
    assert result["origin"].startswith("prebuilt library " + str(tmp_path / "site"))
    assert torch.__version__ in result["origin"]
    assert result["warnings"] == [] and "compiling" not in result["stderr"]
    assert not (tmp_path / "jit").exists()  # no build was attempted


def test_prebuilt_library_for_another_torch_is_not_loaded(tmp_path, jit_library):
    # Its C++ ABI may not match: it must not be loaded. With the sources but no toolchain, the
    # reason names both the mismatch and why a just-in-time build did not work either.
    install_copy(tmp_path / "site", sources=True, prebuilt=jit_library, built_for="2.0.0+cpu")
    result = run_installed(tmp_path / "site", no_toolchain(tmp_path))
    assert "cpu" not in result["listed"] and result["origin"] is None
    reason = result["reason"]
    for text in ("was built for torch 2.0.0+cpu", f"this is torch {torch.__version__}",
                 "BELM_KERNELS_AOT=1", "ninja is not installed"):
        assert text in reason, (text, reason)
    assert len(result["warnings"]) == 1 and reason in result["warnings"][0]
