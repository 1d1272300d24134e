"""Training, pinning and inference on a real GPU (``-m cuda``: skipped where torch sees no CUDA
device; ``python -m benchmarks.gpu`` runs them on a GPU machine), and the CPU side of the GPU
options: ``channels_last`` and ``compile`` leave every CPU fold bit-identical."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from nmosd_ms.config import TrainConfig
from nmosd_ms.training import loop

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
cuda = [pytest.mark.cuda, needs_cuda]

TRAIN = TrainConfig(epochs=2, batch_size=4, shift=2)


def _cohort(n: int = 12, size: int = 24, seed: int = 0) -> tuple[torch.Tensor, np.ndarray]:
    """Lesion-like volumes (N, 1, S, S, S): a blob left for one class, right for the other."""
    rng = np.random.default_rng(seed)
    vols = np.zeros((n, 1, size, size, size), np.float32)
    labels = np.arange(n) % 2
    for i, y in enumerate(labels):
        x = size // 4 if y else 3 * size // 4
        c = rng.integers(size // 3, 2 * size // 3, 2)
        vols[i, 0, x - 2 : x + 2, c[0] - 2 : c[0] + 2, c[1] - 2 : c[1] + 2] = 1
    return torch.from_numpy(vols), labels


def _fold(model: str, device: str, config: TrainConfig = TRAIN, size: int = 24):
    vols, labels = _cohort(size=size)
    idx = np.arange(len(labels))
    torch.use_deterministic_algorithms(True, warn_only=True)
    fold = loop.FoldData(vols, labels, idx[:8], idx[8:])
    return loop.train_torch_fold(model, fold, config, seed=5, device=device)


def _same_fold(a, b) -> None:
    assert np.array_equal(a.prob_nmosd, b.prob_nmosd)
    assert a.state_dict.keys() == b.state_dict.keys()
    for k in a.state_dict:
        assert torch.equal(a.state_dict[k], b.state_dict[k]), k


@pytest.mark.parametrize("model", ["twoview-18", "resnet3d-18"])
def test_the_gpu_options_change_nothing_on_a_cpu(model):
    size = 24 if model.startswith("twoview") else 16
    plain = _fold(model, "cpu", size=size)
    tuned = _fold(
        model, "cpu", TRAIN.model_copy(update={"channels_last": True, "compile": True}), size
    )
    _same_fold(plain, tuned)


@pytest.mark.parametrize("model", ["twoview-18", "resnet3d-18"])
@pytest.mark.cuda
@needs_cuda
def test_a_fold_trains_on_the_gpu_and_hands_back_cpu_results(model):
    out = _fold(model, "cuda", size=24 if model.startswith("twoview") else 16)
    assert out.device.startswith("cuda") and torch.cuda.get_device_name(0) in out.device
    assert np.isfinite(out.prob_nmosd).all() and len(out.prob_nmosd) == 4
    assert all(t.device.type == "cpu" for t in out.state_dict.values())
    assert out.peak_memory_mb > 0  # the GPU's own peak, reset per fold


@pytest.mark.cuda
@needs_cuda
def test_fp32_folds_are_bit_identical_on_the_same_gpu():
    _same_fold(_fold("twoview-18", "cuda"), _fold("twoview-18", "cuda"))


@pytest.mark.cuda
@needs_cuda
def test_channels_last_keeps_the_weights_and_computes_the_same_function():
    """The same weights give the same outputs in either memory layout (cuDNN picks other
    algorithms: equal to rounding), and a fold trained channels-last hands back weights of the
    usual keys, shapes and layout. Its probabilities are not compared with a plain fold's: two
    epochs on 8 maps amplify rounding (and max-pool's non-deterministic backward) into other
    weights."""
    from nmosd_ms.models import get_spec

    torch.manual_seed(0)
    plain = get_spec("resnet3d-18").build(size=16).cuda().eval()
    last = get_spec("resnet3d-18").build(size=16).cuda().eval()
    last.load_state_dict(plain.state_dict())
    last.to(memory_format=torch.channels_last_3d)
    x = _cohort(size=16)[0][:4].cuda()
    with torch.no_grad():
        a, b = plain(x), last(x.contiguous(memory_format=torch.channels_last_3d))
    assert torch.allclose(a, b, atol=1e-3, rtol=1e-3), (a - b).abs().max()
    fold = _fold("resnet3d-18", "cuda", TRAIN.model_copy(update={"channels_last": True}), 16)
    reference = get_spec("resnet3d-18").build(size=16).state_dict()
    assert fold.state_dict.keys() == reference.keys()
    for k, v in fold.state_dict.items():
        assert v.shape == reference[k].shape and v.is_contiguous(), k


@pytest.mark.cuda
@needs_cuda
def test_batchnorm_recalibration_leaves_the_gpu_random_stream_alone():
    from nmosd_ms.models import get_spec

    model = get_spec("twoview-18").build(size=24).cuda()
    vols, _ = _cohort()
    before = torch.cuda.get_rng_state()
    cpu_before = torch.get_rng_state()
    loop.recalibrate_batchnorm(model, vols, "cuda", "fp32")
    assert torch.equal(torch.cuda.get_rng_state(), before)
    assert torch.equal(torch.get_rng_state(), cpu_before)


@pytest.mark.cuda
@needs_cuda
def test_two_folds_per_device_run_in_pinned_workers_of_one_gpu():
    from nmosd_ms.training.executors import FoldInputs, make_executor
    from nmosd_ms.training.plan import plan_splits, plan_tasks

    vols, labels = _cohort()
    plan = plan_splits(labels, 2, 1, 0)
    tasks = plan_tasks(plan, ["twoview-18"], {"twoview-18": 24}, 0)
    inputs = FoldInputs({24: vols.numpy()}, labels, np.zeros((12, 1)), TRAIN, "cuda")
    done = []
    with make_executor("dask", threads=1, device="cuda", folds_per_device=2) as ex:
        assert (
            ex.workers == 2 * torch.cuda.device_count() and ex.describe()["folds_per_device"] == 2
        )
        envs = ex.client.run(lambda: __import__("os").environ.get("CUDA_VISIBLE_DEVICES"))
        assert len(envs) == ex.workers and all(v is not None for v in envs.values())
        ex.run(tasks, inputs, lambda t, o: done.append((t, o)))
    assert len(done) == 2 and all(o.device.startswith("cuda") for _, o in done)
    torch.use_deterministic_algorithms(True, warn_only=True)  # as in every fold
    for t, o in done:  # a fold trained in a pinned worker equals the same fold trained here
        fold = loop.FoldData(vols, labels, t.train_idx, t.test_idx)
        here = loop.train_torch_fold("twoview-18", fold, TRAIN, seed=t.seed, device="cuda")
        assert np.allclose(here.prob_nmosd, o.prob_nmosd, atol=1e-5)


@pytest.mark.cuda
@needs_cuda
def test_predict_and_evaluate_run_on_the_gpu(small_run, phantom_cohort, tmp_path):
    from helpers import run_cli

    from nmosd_ms.bundle import load_bundle
    from nmosd_ms.export import export_bundle

    bundle = export_bundle(small_run, "twoview-18", tmp_path / "bundle")
    vols, _ = _cohort()
    on_cpu = load_bundle(bundle, "cpu").predict_volume(vols[0, 0].numpy())
    on_gpu = load_bundle(bundle, "cuda").predict_volume(vols[0, 0].numpy())
    assert np.allclose(on_cpu, on_gpu, atol=1e-4)
    out = tmp_path / "e"  # the bundle's own cohort: only where it runs is checked here
    res = run_cli(
        "evaluate", bundle, phantom_cohort, "--out", out, "--allow-overlap", "--device", "cuda"
    )
    assert res.exit_code == 0, res.stderr
