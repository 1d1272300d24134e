"""Benchmarks measured in one process, so that ratios cancel machine noise.

``python -m benchmarks --quick`` (under 3 minutes on 2 cores): fp32 GEMM peak, training-step
time of twoview-18 and resnet3d-18, prepare seconds per real native scan, WMH segmentation
seconds per real 1 mm FLAIR. Writes
``benchmarks/results/quick.json`` and ``quick.md``.

``python -m benchmarks`` (full): also twoview-34, threeview-18, resnet3d-34, bf16, the full-protocol
estimate and predict (with and without saliency). Writes ``full.json`` and ``full.md``.
"""

from __future__ import annotations

import json
import math
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from benchmarks import ArgumentParser

HERE = Path(__file__).resolve().parent
SHARED = Path(os.environ.get("NMOSD_MS_SHARED_DATA", HERE.parent.parent / "shared" / "data"))


GEMM_SIZES = (1024, 2048, 3072, 4096)


def gemm_gflops(n: int = 2048, reps: int = 10, trials: int = 5, dtype=torch.float32) -> float:
    """Best of ``trials`` timings of ``reps`` n×n matrix products in ``dtype``."""
    a, b = torch.randn(n, n).to(dtype), torch.randn(n, n).to(dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(trials):
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e9)
    return best


def measured_peaks(sizes=GEMM_SIZES) -> dict:
    """The machine's measured peak per precision: the best GEMM throughput over several square
    shapes (one 2048² product alone under-reads it). Returns GFLOP/s per precision and the
    shape that gave it."""
    out = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        rates = {
            n: gemm_gflops(n, reps=max(2, int(10 * (2048 / n) ** 3)), dtype=dtype) for n in sizes
        }
        best = max(rates, key=rates.get)
        out[name] = {"gflops": rates[best], "best_n": best, "by_n": rates}
    return out


def nominal_peaks() -> dict:
    """The processor's nominal peak from its flags and the clock the kernel reports:
    cores × GHz × FLOPs per cycle, assuming two FMA units (fp32: 64 FLOPs/cycle with AVX-512,
    32 with AVX2+FMA; bf16 twice fp32 where AVX512_BF16 dot products exist). A boost clock above
    the reported one, or one FMA unit instead of two, moves it; it is an order of magnitude
    check, the measured GEMM peak is the reference."""
    flags, mhz = set(), None
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
            elif line.startswith("cpu MHz") and mhz is None:
                mhz = float(line.split(":", 1)[1])
    except (OSError, ValueError):
        pass
    if not mhz:
        return {}
    fp32 = 64 if "avx512f" in flags else 32 if {"avx2", "fma"} <= flags else 16
    bf16 = 2 * fp32 if "avx512_bf16" in flags else fp32
    cores = os.cpu_count() or 1
    ghz = mhz / 1000
    return {
        "ghz": ghz,
        "cores": cores,
        "flops_per_cycle": {"fp32": fp32, "bf16": bf16},
        "fp32": cores * ghz * fp32,
        "bf16": cores * ghz * bf16,
    }


def step_seconds(
    name: str, size: int = 100, batch: int = 8, precision: str = "fp32", steps: int = 3
) -> float:
    from nmosd_ms.config import TrainConfig
    from nmosd_ms.models import build_model
    from nmosd_ms.training.loop import make_optimizer

    torch.manual_seed(0)
    model = build_model(name, size)
    model.train()
    opt = make_optimizer(model, TrainConfig())  # the optimiser training uses
    x = torch.rand(batch, 1, size, size, size)
    if precision == "bf16":  # as in training: the cohort is held in the autocast dtype
        x = x.to(torch.bfloat16)
    y = torch.randint(0, 2, (batch,))
    ctx = (
        torch.autocast("cpu", dtype=torch.bfloat16)
        if precision == "bf16"
        else torch.autocast("cpu", enabled=False)
    )

    def one():
        with ctx:
            loss = torch.nn.functional.cross_entropy(model(x).float(), y)
        opt.zero_grad()
        loss.backward()
        opt.step()

    for _ in range(3):  # warm-up: oneDNN builds its kernels on the first calls
        one()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        one()
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def one_thread_step_seconds(name: str, precision: str) -> float:
    """Step time on one torch thread: the unit of ``cv --executor dask --threads 1``."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return step_seconds(name, precision=precision, steps=7)
    finally:
        torch.set_num_threads(previous)


def train_flops(name: str, size: int, batch: int) -> float:
    """FLOPs one training step executes (forward + backward), counted by torch's
    FlopCounterMode on the real autograd graph: the first layer's input gradient, which autograd
    never computes (the input needs no gradient), is not counted (checked in the tests)."""
    from torch.utils.flop_counter import FlopCounterMode

    from nmosd_ms.models import build_model

    model = build_model(name, size)
    x = torch.rand(batch, 1, size, size, size)
    y = torch.randint(0, 2, (batch,))
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(model(x), y).backward()
    return float(counter.get_total_flops())


def prepare_seconds(n: int) -> float | None:
    from nmosd_ms.config import PrepareConfig
    from nmosd_ms.data.ingest import Subject
    from nmosd_ms.data.preprocess import prepare_subject

    root = SHARED / "lesjak2017"
    if not root.is_dir():
        return None
    subs = sorted(root.glob("sub-*"))[:n]
    cfg = PrepareConfig(size=100)
    t = time.perf_counter()
    for s in subs:
        prepare_subject(
            Subject(s.name, "MS", None, s / "lesion_mask.nii.gz", s / "brain_mask.nii.gz"), cfg
        )
    return (time.perf_counter() - t) / len(subs)


def segment_seconds() -> dict | None:
    """WMH segmentation of the two real 1 mm MNI FLAIRs (182×218×182), with and without the
    symmetry step (seconds per scan, images already in memory)."""
    import nibabel as nib

    from nmosd_ms.segment import SegmentConfig, segment_wmh

    paths = sorted((SHARED / "lesjak2017").glob("sub-*/flair_mni.nii.gz"))
    if not paths:
        return None
    images = [(np.asarray(nib.load(p).dataobj, np.float32), nib.load(p)) for p in paths]
    out = {}
    for key, params in (
        ("default", SegmentConfig()),
        ("keep_symmetric", SegmentConfig(drop_symmetric=False)),
    ):
        t = time.perf_counter()
        for data, img in images:
            segment_wmh(data, img.header.get_zooms()[:3], data > 0, params)
        out[key] = (time.perf_counter() - t) / len(images)
    return out


def predict_seconds(saliency: bool, folds: int = 5) -> float | None:
    """A bundle of ``folds`` randomly initialised twoview-18 models (timing does not depend on
    the weights' values) predicting one real native scan."""
    from safetensors.torch import save_file

    from nmosd_ms.config import PrepareConfig
    from nmosd_ms.data.ingest import Subject
    from nmosd_ms.io import sha256_file, write_json
    from nmosd_ms.models import build_model
    from nmosd_ms.predict import load_bundle, predict_subjects

    root = SHARED / "lesjak2017" / "sub-01"
    if not root.is_dir():
        return None
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        files = []
        for k in range(folds):
            torch.manual_seed(k)
            path = tmp / "weights" / f"fold-{k}.safetensors"
            path.parent.mkdir(exist_ok=True)
            save_file(build_model("twoview-18", 100).state_dict(), str(path))
            files.append({"file": f"weights/{path.name}", "sha256": sha256_file(path)})
        write_json(
            tmp / "model.json",
            {
                "format": "nmosd-ms-bundle/1",
                "model": "twoview-18",
                "size": 100,
                "files": files,
                "preprocessing": {
                    **PrepareConfig(size=100).model_dump(mode="json"),
                    "cache_size": 100,
                },
            },
        )
        bundle = load_bundle(tmp)
        subject = Subject(
            "bench", "", None, root / "lesion_mask.nii.gz", root / "brain_mask.nii.gz"
        )
        t = time.perf_counter()
        predict_subjects(bundle, [subject], tmp / "out", saliency=saliency)
        return time.perf_counter() - t


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
    }


def main(argv=None) -> int:
    ap = ArgumentParser(prog="python -m benchmarks")
    ap.add_argument("--quick", action="store_true", help="step ratio and prepare only (<3 min)")
    args = ap.parse_args(argv)
    t0 = time.perf_counter()
    res: dict = {"machine": machine(), "batch": 8, "size": 100}
    res["peak_gflops"] = measured_peaks((2048,) if args.quick else GEMM_SIZES)
    res["nominal_gflops"] = nominal_peaks()
    models = (
        ["twoview-18", "resnet3d-18"]
        if args.quick
        else ["twoview-18", "twoview-34", "threeview-18", "resnet3d-18", "resnet3d-34"]
    )
    precisions = ["fp32"] if args.quick else ["fp32", "bf16"]
    res["step_seconds"] = {}
    res["step_gflops"] = {}
    for p in precisions:
        for m in models:
            key = m if p == "fp32" else f"{m}@{p}"
            s = step_seconds(m, precision=p, steps=3 if m.startswith("resnet3d") else 7)
            res["step_seconds"][key] = s
            res["step_gflops"][key] = train_flops(m, 100, 8) / s / 1e9
            print(f"{key:>20}: {s:.3f} s/step, {res['step_gflops'][key]:.1f} GFLOP/s", flush=True)
    res["ratio_resnet3d18_twoview18"] = (
        res["step_seconds"]["resnet3d-18"] / res["step_seconds"]["twoview-18"]
    )
    res["twoview18_fraction_of_gemm_peak"] = (
        res["step_gflops"]["twoview-18"] / res["peak_gflops"]["fp32"]["gflops"]
    )
    res["prepare_seconds_per_subject"] = prepare_seconds(5 if args.quick else 20)
    res["segment_seconds_per_scan"] = segment_seconds()
    if not args.quick:
        steps = math.ceil(70 / 8)  # 88 subjects, 5 folds: ~70 training subjects per fold
        res["full_protocol_hours"] = {
            m: res["step_seconds"][m] * steps * 100 * 75 / 3600 for m in models
        }
        # The fastest way on 2 cores: two Dask workers of one thread each, bf16.
        one = one_thread_step_seconds("twoview-18", "bf16")
        res["step_seconds_one_thread"] = {"twoview-18@bf16": one}
        res["full_protocol_minutes_two_workers_bf16"] = {
            "twoview-18": one * steps * 100 * 75 / (os.cpu_count() or 1) / 60
        }
        res["predict_seconds"] = predict_seconds(False)
        res["predict_with_saliency_seconds"] = predict_seconds(True)
    res["wall_seconds"] = time.perf_counter() - t0
    name = "quick" if args.quick else "full"
    (HERE / "results").mkdir(exist_ok=True)
    (HERE / "results" / f"{name}.json").write_text(json.dumps(res, indent=2) + "\n")
    (HERE / "results" / f"{name}.md").write_text(to_markdown(res))
    print(to_markdown(res))
    return 0


def to_markdown(res: dict) -> str:
    m = res["machine"]
    lines = [
        f"Machine: {m['cpu']}, {m['cores']} cores, torch {m['torch']} "
        f"({m['torch_threads']} threads); batch {res['batch']}, S = {res['size']}.",
        "",
    ]
    peaks, nominal = res["peak_gflops"], res.get("nominal_gflops") or {}
    for prec, p in peaks.items():
        shapes = ", ".join(f"{n}²" for n in p["by_n"])
        nom = ""
        if prec in nominal:
            nom = (
                f"; nominal {nominal[prec]:.0f} GFLOP/s ({nominal['cores']} cores × "
                f"{nominal['ghz']:.2f} GHz × {nominal['flops_per_cycle'][prec]} FLOPs/cycle)"
            )
            if p["gflops"] > nominal[prec]:
                implied = p["gflops"] / (nominal["cores"] * nominal["flops_per_cycle"][prec])
                nom += (
                    f" † — the GEMM ran above it: the cores run faster than the "
                    f"{nominal['ghz']:.2f} GHz the kernel reports (boost; it implies "
                    f"{implied:.2f} GHz at {nominal['flops_per_cycle'][prec]} FLOPs/cycle)"
                )
        lines.append(
            f"- {prec} measured peak: **{p['gflops']:.1f} GFLOP/s** (best torch.matmul over "
            f"{shapes}: {p['best_n']}²){nom}"
        )
    lines += [
        "",
        "FLOPs are those a training step executes (torch FlopCounterMode on the autograd graph). "
        "Each share is of the measured GEMM peak of the step's own precision; ‡ marks a share "
        "above 100 %: the convolution kernels (oneDNN) then ran faster than torch.matmul did, "
        "so that GEMM figure is not the machine's ceiling — the nominal share beside it is the "
        "physical check; † marks a share above the nominal peak, which only a clock above the "
        "reported one (boost) or more FMA units than assumed can explain.",
        "",
        "| model | s / training step | GFLOP/s | % of measured peak | % of nominal |",
        "|---|---|---|---|---|",
    ]
    for k, s in res["step_seconds"].items():
        g = res["step_gflops"][k]
        prec = k.split("@")[1] if "@" in k else "fp32"
        share = 100 * g / peaks[prec]["gflops"]
        mark = " ‡" if share > 100 else ""
        nom = "–"
        if prec in nominal:
            nshare = 100 * g / nominal[prec]
            nom = f"{nshare:.0f} %" + (" †" if nshare > 100 else "")
        lines.append(f"| {k} | {s:.3f} | {g:.1f} | {share:.0f} %{mark} | {nom} |")
    lines += [
        "",
        f"resnet3d-18 / twoview-18 step-time ratio: **{res['ratio_resnet3d18_twoview18']:.1f}×**",
    ]
    if res.get("prepare_seconds_per_subject") is not None:
        lines.append(
            f"prepare, real native 192×512×512 scans: "
            f"**{res['prepare_seconds_per_subject']:.2f} s / subject**"
        )
    seg = res.get("segment_seconds_per_scan")
    if seg is not None:
        lines += [
            "",
            f"WMH segmentation, real 1 mm FLAIRs (182×218×182): **{seg['default']:.1f} s / scan** "
            f"({seg['keep_symmetric']:.1f} s without the symmetry step)",
        ]
    if "full_protocol_hours" in res:
        lines += [
            "",
            "Full paper protocol estimate (15 × 5 folds, 100 epochs, ~70 training "
            "subjects, fp32, training steps only):",
            "",
        ]
        lines += [f"- {k}: {h:.1f} h" for k, h in res["full_protocol_hours"].items()]
    if "full_protocol_minutes_two_workers_bf16" in res:
        one = res["step_seconds_one_thread"]["twoview-18@bf16"]
        mins = res["full_protocol_minutes_two_workers_bf16"]["twoview-18"]
        lines += [
            "",
            f"twoview-18, bf16, one thread: {one:.3f} s / step; full protocol with one Dask "
            f"worker of one thread per core (`cv --executor dask --threads 1 --precision bf16`), "
            f"training steps only, no contention between workers: **{mins:.0f} min**",
        ]
    if res.get("predict_seconds") is not None:
        lines += [
            "",
            f"predict (5-fold twoview-18 ensemble, one native scan): "
            f"{res['predict_seconds']:.1f} s; with occlusion saliency: "
            f"{res['predict_with_saliency_seconds']:.1f} s",
        ]
    lines.append(f"\nwall time of this benchmark: {res['wall_seconds']:.0f} s\n")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
