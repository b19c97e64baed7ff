"""Runtime helpers: device and precision resolution, autocast, seeding, torchrun environment."""

from __future__ import annotations

import random
import subprocess
import sys

import numpy as np
import pytest
import torch

from segsort_unsup import runtime as R
from segsort_unsup.errors import InputError

CPU = torch.device("cpu")


def test_importing_runtime_leaves_the_stages_alone():
    code = "import sys, segsort_unsup.runtime; print(sorted(m for m in sys.modules if m.startswith('segsort_unsup.')))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert "segsort_unsup.contours" not in out and "segsort_unsup.runtime" in out


def test_cpu_bf16_flag_matches_cpuinfo():
    try:
        text = open("/proc/cpuinfo", encoding="utf-8").read()
    except OSError:
        pytest.skip("no /proc/cpuinfo")
    flags = next((set(line.split(":", 1)[1].split()) for line in text.splitlines() if line.startswith("flags")), set())
    assert R.cpu_has_fast_bf16() == bool(flags & {"amx_bf16", "avx512_bf16"})


def test_resolve_device():
    assert R.resolve_device("cpu") == CPU
    assert R.resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(InputError, match="--device"):
        R.resolve_device("warp-drive")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the machine without CUDA")
def test_resolve_device_cuda_without_cuda():
    with pytest.raises(InputError, match="no CUDA device"):
        R.resolve_device("cuda")
    with pytest.raises(InputError, match="no CUDA device"):
        R.resolve_device("cuda:1")


def test_resolve_precision():
    fast = "bf16" if R.cpu_has_fast_bf16() else "fp32"
    assert R.resolve_precision("auto", CPU) == fast
    assert R.resolve_precision("auto", CPU, cpu_bf16=False) == "fp32"
    for given in ("fp32", "bf16", "fp16"):
        assert R.resolve_precision(given, CPU) == given
        assert R.resolve_precision(given, CPU, cpu_bf16=False) == given  # an explicit choice is kept
    with pytest.raises(InputError, match="choose one of"):
        R.resolve_precision("int8", CPU)


def test_autocast_bf16_gives_bf16_matmuls_on_cpu():
    a, b = torch.randn(8, 16), torch.randn(16, 4)
    with R.autocast(CPU, "bf16"):
        assert (a @ b).dtype == torch.bfloat16
    with R.autocast("cpu", "fp32"):
        assert (a @ b).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16), R.autocast(CPU, "fp32"):
        assert (a @ b).dtype == torch.float32  # fp32 means fp32, also inside an enclosing autocast
    assert (a @ b).dtype == torch.float32  # nothing leaks out of the block
    with pytest.raises(InputError, match="resolve it first"):
        with R.autocast(CPU, "auto"):
            pass


def _draws() -> tuple[float, np.ndarray, torch.Tensor]:
    return random.random(), np.random.rand(3), torch.rand(3)


def test_seed_everything_repeats_draws():
    R.seed_everything(1234)
    first = _draws()
    R.seed_everything(1234)
    again = _draws()
    R.seed_everything(4321)
    other = _draws()
    assert first[0] == again[0] and np.array_equal(first[1], again[1]) and torch.equal(first[2], again[2])
    assert first[0] != other[0] and not np.array_equal(first[1], other[1]) and not torch.equal(first[2], other[2])
    R.seed_everything(2**40 + 7)  # large seeds work for numpy's 32-bit seed too


def test_dist_info_from_torchrun_environment(monkeypatch):
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    assert R.dist_info() == (0, 1, 0) and R.is_main_process()
    monkeypatch.setenv("RANK", "3")
    monkeypatch.setenv("WORLD_SIZE", "4")
    monkeypatch.setenv("LOCAL_RANK", "1")
    assert R.dist_info() == (3, 4, 1) and not R.is_main_process()
    monkeypatch.setenv("RANK", "4")
    with pytest.raises(InputError, match="inconsistent"):
        R.dist_info()
    monkeypatch.setenv("RANK", "one")
    with pytest.raises(InputError, match="RANK"):
        R.dist_info()


def test_barrier_and_main_process_in_a_process_group(tmp_path, monkeypatch):
    import torch.distributed as dist

    R.barrier()  # no group: a no-op
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        monkeypatch.setenv("RANK", "1")  # once a group is initialised, its rank decides
        monkeypatch.setenv("WORLD_SIZE", "2")
        assert R.is_main_process()
        R.barrier()
    finally:
        dist.destroy_process_group()


def test_grad_scaler_is_on_for_fp16_only():
    assert R.grad_scaler(CPU, "fp16").is_enabled()
    assert not R.grad_scaler(CPU, "bf16").is_enabled()
    assert not R.grad_scaler(CPU, "fp32").is_enabled()


def test_an_fp16_autocast_step_through_the_scaler_on_cpu_matches_the_unscaled_gradient():
    """The scaler multiplies the loss and divides the gradients back: the step equals a plain one."""
    torch.manual_seed(0)
    x = torch.randn(4, 8, device=CPU)
    plain = torch.nn.Linear(8, 2).to(CPU)
    scaled = torch.nn.Linear(8, 2).to(CPU)
    scaled.load_state_dict(plain.state_dict())
    grads = []
    for module, precision in ((plain, "fp32"), (scaled, "fp16")):
        opt = torch.optim.SGD(module.parameters(), lr=0.1)
        scaler = R.grad_scaler(CPU, precision)
        with R.autocast(CPU, precision):
            loss = module(x).float().square().mean()
        scaler.scale(loss).backward()
        if precision == "fp16":  # the gradient was computed on the scaled loss
            assert scaler.get_scale() == 65536.0
        scaler.unscale_(opt)
        grads.append(module.weight.grad.clone())
        scaler.step(opt)
        scaler.update()
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-2, atol=1e-3)  # fp16 matmul rounding
    torch.testing.assert_close(scaled.weight, plain.weight, rtol=1e-2, atol=1e-3)


def test_deterministic_cuda_is_set_for_a_cuda_device_only():
    """Resumed GPU runs must end with the uninterrupted run's weights: deterministic kernels and the
    cuBLAS workspace are asked for on CUDA (checked in a fresh process; no GPU needed to set them)."""
    code = (
        "import os, torch\n"
        "from segsort_unsup.runtime import deterministic_cuda\n"
        "os.environ.pop('CUBLAS_WORKSPACE_CONFIG', None)\n"
        "deterministic_cuda(torch.device('cpu'))\n"
        "print(torch.are_deterministic_algorithms_enabled(), 'CUBLAS_WORKSPACE_CONFIG' in os.environ)\n"
        "deterministic_cuda(torch.device('cuda'))\n"
        "print(torch.are_deterministic_algorithms_enabled(), os.environ['CUBLAS_WORKSPACE_CONFIG'],"
        " torch.backends.cudnn.benchmark)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.split("\n")
    assert out[0] == "False False"
    assert out[1] == "True :4096:8 False"
