"""GPU offload (issue 28), what can be checked on any machine: the build path's choice of
backend (``make GPU=auto|cuda|cpu``, dry runs with stand-in NVIDIA tools), the offload default
of the build, an offload request refused on a CPU build, the GPU memory check, and what
``capabilities`` and model info say. (On a GPU the same tests check the other branch.)"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from lorad.client import BadRequest, Client
from lorad.daemon import gpu
from lorad.protocol import ErrorCode, ProtocolError

ROOT = Path(__file__).resolve().parent.parent


# -- the build path --------------------------------------------------------------------------
def _tools(tmp_path: Path, *, nvcc: bool, compute_cap: str | None) -> dict[str, str]:
    """A PATH with stand-ins for ``nvcc`` and ``nvidia-smi`` (a driver that reports
    ``compute_cap``; None: no driver) in front of the system's directories only."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir(parents=True)
    if nvcc:
        (bin_dir / "nvcc").write_text("#!/bin/sh\necho 'Cuda compilation tools'\n")
    if compute_cap is not None:
        (bin_dir / "nvidia-smi").write_text(f"#!/bin/sh\necho {compute_cap}\n")
    for tool in bin_dir.iterdir():
        tool.chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}


def _install_plan(env: dict[str, str], *args: str) -> str:
    """What ``make`` would run to install the venv (``-n``: nothing runs), for a venv path of
    its own so that this checkout's stamp decides nothing."""
    out = subprocess.run(["make", "-n", "-C", str(ROOT), "VENV=/nonexistent/venv", *args,
                          "lint"], env=env, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_make_builds_for_the_gpu_it_finds(tmp_path: Path) -> None:
    plan = _install_plan(_tools(tmp_path, nvcc=True, compute_cap="9.0"))
    assert "-DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" in plan  # that GPU's only
    assert "--no-cache-dir" in plan and "--no-binary llama-cpp-python" in plan
    assert "'llama-cpp-python==0.3.36'" in plan
    assert "touch /nonexistent/venv/.installed-cuda" in plan


@pytest.mark.parametrize(("nvcc", "cap"), [(False, "8.6"), (True, None), (False, None)])
def test_make_builds_for_the_cpu_without_a_toolchain_and_a_driver(
        tmp_path: Path, nvcc: bool, cap: str | None) -> None:
    plan = _install_plan(_tools(tmp_path, nvcc=nvcc, compute_cap=cap))
    assert "GGML_CUDA" not in plan
    # a venv that holds a CUDA build gets the CPU one back
    assert "llama_supports_gpu_offload" in plan and "--force-reinstall" in plan
    assert "touch /nonexistent/venv/.installed-cpu" in plan


def test_make_takes_an_explicit_choice(tmp_path: Path) -> None:
    env = _tools(tmp_path, nvcc=True, compute_cap="8.9")
    assert "GGML_CUDA" not in _install_plan(env, "GPU=cpu")
    assert "CMAKE_CUDA_ARCHITECTURES=89" in _install_plan(env, "GPU=cuda")
    bare = _tools(tmp_path / "bare", nvcc=False, compute_cap=None)
    assert "CMAKE_CUDA_ARCHITECTURES=native" in _install_plan(bare, "GPU=cuda")
    out = subprocess.run(["make", "-n", "-C", str(ROOT), "GPU=metal", "lint"], env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode != 0 and "GPU must be auto, cuda or cpu" in out.stderr


# -- layers and memory (pure) ----------------------------------------------------------------
def test_layers_default_to_all_on_a_gpu_build_and_none_on_a_cpu_one() -> None:
    assert gpu.resolve_layers(None, supported=True) == gpu.ALL_LAYERS
    assert gpu.resolve_layers(None, supported=False) == 0
    assert gpu.resolve_layers(0, supported=False) == 0
    assert gpu.resolve_layers(12, supported=True) == 12
    with pytest.raises(ProtocolError) as err:
        gpu.resolve_layers(12, supported=False)
    assert err.value.code is ErrorCode.BAD_REQUEST
    assert err.value.details == {"field": "n_gpu_layers", "reason": "no_gpu_backend"}
    assert gpu.offloaded(-1, 18) == 19 and gpu.offloaded(5, 18) == 5
    assert gpu.offloaded(1000, 18) == 19


def test_a_model_that_does_not_fit_the_gpu_is_refused_with_the_figures() -> None:
    gib = 1 << 30
    gpu.check_fit(4 * gib, 31, 32, free_bytes=5 * gib)  # fits
    gpu.check_fit(4 * gib, 31, 0, free_bytes=0)  # nothing offloaded: nothing to check
    with pytest.raises(ProtocolError) as err:
        gpu.check_fit(8 * gib, 31, 32, free_bytes=5 * gib)
    assert err.value.code is ErrorCode.TOO_LARGE
    assert err.value.details["needed"] == 8 * gib and err.value.details["budget"] == 5 * gib
    gpu.check_fit(8 * gib, 31, 16, free_bytes=5 * gib)  # half the layers: 4 GiB, it fits


# -- through a real daemon -------------------------------------------------------------------
def test_capabilities_and_model_info_say_where_layers_go(client: Client,
                                                         tiny_model: Path) -> None:
    caps = client.capabilities()["gpu"]
    supported = caps["offload"]
    assert caps["default_n_gpu_layers"] == (-1 if supported else 0)
    cpu = [d for d in caps["devices"] if d["type"] == "cpu"]
    assert cpu and cpu[0]["total_bytes"] > 0
    assert supported == any(d["type"] in ("gpu", "igpu") for d in caps["devices"])
    info = client.load_model(tiny_model)
    assert info["params"]["n_gpu_layers"] == caps["default_n_gpu_layers"]
    assert info["offloaded_layers"] == (info["n_layer"] + 1 if supported else 0)


def test_an_offload_request_on_a_cpu_build_is_refused(client: Client, tiny_model: Path) -> None:
    if client.capabilities()["gpu"]["offload"]:
        info = client.load_model(tiny_model, n_gpu_layers=1)
        assert info["offloaded_layers"] == 1
        client.unload_model(info["id"])
        return
    with pytest.raises(BadRequest) as err:
        client.load_model(tiny_model, n_gpu_layers=1)
    assert err.value.details["reason"] == "no_gpu_backend"
    assert "make serve GPU=cuda" in str(err.value)


def test_serve_refuses_n_gpu_layers_without_a_model() -> None:
    out = subprocess.run([sys.executable, "-m", "lorad.daemon", "--endpoint",
                          "ipc:///nonexistent/x.sock", "--n-gpu-layers", "4"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "--n-gpu-layers needs --model" in out.stderr
