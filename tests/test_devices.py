"""GPU handling that can be checked without a GPU (mocked torch.cuda), and the worker-side
device: a client without a GPU can drive GPU workers, and each fold records where it ran."""

from __future__ import annotations

import os

import pytest
import torch

from nmosd_ms.errors import NmosdError
from nmosd_ms.training import device


@pytest.fixture
def fake_gpu(monkeypatch):
    calls = []
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "Fake T4")
    monkeypatch.setattr(torch.cuda, "reset_peak_memory_stats", lambda *a: calls.append("reset"))
    monkeypatch.setattr(torch.cuda, "synchronize", lambda *a: calls.append("sync"))
    # restored after the test whatever prepare_device sets
    monkeypatch.setattr(torch.backends.cudnn, "allow_tf32", True)
    monkeypatch.delenv("CUBLAS_WORKSPACE_CONFIG", raising=False)
    precision = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision("high")  # TF32 allowed, as a user might have set
    yield calls
    torch.set_float32_matmul_precision(precision)


def test_a_gpu_without_native_bf16_is_refused_with_fp16_named(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a: False)
    with pytest.raises(NmosdError, match="no native bf16.*use fp16") as err:
        device.prepare_device(torch.device("cuda"), "bf16")
    assert err.value.option == "precision"
    device.prepare_device(torch.device("cuda"), "fp16")  # fp16 is fine there


def test_fp32_on_a_gpu_means_fp32_and_each_fold_has_its_own_peak(fake_gpu, monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a: True)
    device.prepare_device(torch.device("cuda"), "fp32")
    assert torch.backends.cudnn.allow_tf32 is False
    assert torch.get_float32_matmul_precision() == "highest"
    assert os.environ["CUBLAS_WORKSPACE_CONFIG"] == ":4096:8"  # deterministic cuBLAS
    assert fake_gpu == ["reset"]
    assert device.clock(torch.device("cuda")) > 0 and fake_gpu[-1] == "sync"  # timers wait
    fake_gpu.clear()
    device.prepare_device(torch.device("cpu"), "bf16")  # nothing to do on a CPU
    device.clock(torch.device("cpu"))
    assert fake_gpu == []


def test_the_client_resolves_no_device_for_remote_workers(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with pytest.raises(NmosdError, match="no CUDA device"):  # folds here: checked here
        device.resolve_device("cuda")
    # for workers elsewhere the name is only parsed (a login node has no GPU)
    assert device.resolve_device("cuda", check=False).type == "cuda"
    assert device.resolve_device("auto").type == "cpu"


def test_each_fold_records_its_device(small_run):
    import json

    records = [json.loads(p.read_text()) for p in (small_run / "folds").rglob("fold-*.json")]
    assert records and all("device" in r and r["device"]["name"] for r in records)


def test_torch_threads_sets_the_number_for_the_block_and_restores_it():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        with device.torch_threads(1):
            assert torch.get_num_threads() == 1
        assert torch.get_num_threads() == 2
        with pytest.raises(RuntimeError), device.torch_threads(1):
            raise RuntimeError("a failing fold")
        assert torch.get_num_threads() == 2  # restored after an error too
        with device.torch_threads(0):
            assert torch.get_num_threads() == 2  # 0 leaves torch's setting
        with pytest.raises(ValueError, match="threads"), device.torch_threads(-1):
            pass
    finally:
        torch.set_num_threads(before)
