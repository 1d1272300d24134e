"""The GPU check: the CUDA-marked tests, then one fold of each of the paper's networks at 100³
timed on the GPU with the paper's settings for a few epochs, several folds per GPU timed, and
the 15 × 5 × 100-epoch protocol extrapolated from those measurements (marked as such); where
the time allows, two-view-18's whole protocol is run for real, in bf16 and fp32 on the same folds.

    scripts/gpu_check.sh                          # a GPU machine without internet (wheels/)
    python -m benchmarks.gpu [--epochs 4] [--budget-s 420] [--out benchmarks/results]

Writes ``gpu.json`` and ``gpu.md`` (GPU, driver, torch, measured step times and shares of the
GPU's peak). Without a CUDA device it says so, runs the CPU side of the GPU code (the equality
tests of ``tests/test_cuda.py``) and exits 0 without touching the committed results.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks import ArgumentParser
from nmosd_ms.errors import NmosdError

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
#: The paper's networks; its six arms are these four, the two-view ones twice (from scratch and
#: from ImageNet weights, which change the initial values, not the work).
MODELS = ("twoview-18", "twoview-34", "resnet3d-18", "resnet3d-34")
ARMS = {"twoview-18": 2, "twoview-34": 2, "resnet3d-18": 1, "resnet3d-34": 1}
FOLDS, EPOCHS, SUBJECTS = 75, 100, 88
#: Dense tensor-core peaks (TFLOP/s) from the vendors' data sheets, for the share of peak.
NOMINAL_TFLOPS = {
    "H200": {"bf16": 989.4, "fp32": 66.9},
    "H100": {"bf16": 989.4, "fp32": 66.9},
    "A100": {"bf16": 312.0, "fp32": 19.5},
    "L40S": {"bf16": 362.1, "fp32": 91.6},
}


def log(msg: str) -> None:
    print(f"[gpu-check {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def gpu_info(setup: Setup) -> dict:
    if setup.device != "cuda":
        name, smi = f"none (a dry run on {setup.device})", "-"
    else:
        query = ["--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"]
        smi = subprocess.run(["nvidia-smi", *query], capture_output=True, text=True).stdout.strip()
        name = torch.cuda.get_device_name(0)
    return {
        "gpu": name,
        "gpus": torch.cuda.device_count() if setup.device == "cuda" else 0,
        "nvidia_smi": smi,
        "torch": torch.__version__,
        "cuda": torch.version.cuda,
        "cudnn": torch.backends.cudnn.version(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "nominal_tflops": next((v for k, v in NOMINAL_TFLOPS.items() if k in name), None),
    }


def run_tests(marker: str) -> dict:
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", marker,
           "tests/test_cuda.py"]  # fmt: skip
    res = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    tail = res.stdout.strip().splitlines()[-1:] or [res.stderr[-300:]]
    return {"command": " ".join(cmd[2:]), "exit_code": res.returncode, "summary": tail[0],
            "output_tail": res.stdout[-3000:]}  # fmt: skip


def gemm_tflops(dtype: torch.dtype, n: int = 8192, reps: int = 20) -> float:
    """Best of three timings of ``reps`` n×n products on the GPU (fp32 without TF32)."""
    torch.backends.cuda.matmul.allow_tf32 = False
    a = torch.randn(n, n, device="cuda", dtype=dtype)
    b = torch.randn(n, n, device="cuda", dtype=dtype)
    for _ in range(3):
        a @ b
    best = 0.0
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        for _ in range(reps):
            a @ b
        torch.cuda.synchronize()
        best = max(best, 2 * n**3 * reps / (time.perf_counter() - t) / 1e12)
    return best


@dataclass(frozen=True)
class Setup:
    """Where and at what size the check runs: the GPU at the paper's 100³ and 88 subjects, or
    (``--device cpu``, for the tests) a small dry run of every stage."""

    device: str = "cuda"
    size: int = 100
    n_nmosd: int = 41
    n_ms: int = 47


def make_cohort(work: Path, setup: Setup) -> tuple[object, dict]:
    """The synthetic paper cohort (41 NMOSD / 47 MS) prepared at 100³, timed."""
    from nmosd_ms.config import PrepareConfig
    from nmosd_ms.data.cache import load_prepared, prepare
    from nmosd_ms.data.dataset import load_cohort
    from nmosd_ms.phantom import generate_cohort

    workers = max(1, min(16, os.cpu_count() or 1))
    t = time.perf_counter()
    generate_cohort(work / "bids", n_nmosd=setup.n_nmosd, n_ms=setup.n_ms, seed=0, workers=workers)
    t_phantom = time.perf_counter() - t
    t = time.perf_counter()
    config = PrepareConfig(size=setup.size)
    prepare(load_cohort(work / "bids"), work / "cache", config, workers=workers)
    t_prepare = time.perf_counter() - t
    cohort = load_prepared(work / "cache")
    return cohort, {"phantom_s": round(t_phantom, 1), "prepare_s": round(t_prepare, 1)}


def time_fold(cohort, setup: Setup, model: str, precision: str, **options) -> dict:
    """One fold of the first split, held-out evaluation only at the end: seconds per epoch
    (median over the epochs after the first, which includes cuDNN's autotuning and the
    allocations), per training step, and for the whole fold. ``options``: TrainConfig fields
    (``epochs`` among them)."""
    from nmosd_ms.config import TrainConfig
    from nmosd_ms.training.loop import FoldData, train_torch_fold
    from nmosd_ms.training.plan import plan_splits

    split = plan_splits(cohort.labels, 5, 1, 0)[0]
    train = TrainConfig(precision=precision, eval_every=options["epochs"], **options)
    vols = torch.from_numpy(np.ascontiguousarray(cohort.volumes[:, None]))
    torch.use_deterministic_algorithms(True, warn_only=True)
    idx = (split.train_idx, split.test_idx)
    t = time.perf_counter()
    fold = FoldData(vols, cohort.labels, *idx)
    out = train_torch_fold(model, fold, train, seed=0, device=setup.device)
    total = time.perf_counter() - t
    steps = len(split.train_idx) // train.batch_size
    epoch_s = [r["seconds"] for r in out.curves]
    steady = float(np.median(epoch_s[1:-1] if len(epoch_s) > 2 else epoch_s[-1:]))
    extra = {k: v for k, v in options.items() if k != "epochs"}
    return {
        "model": model, "precision": precision, **extra, "epochs": train.epochs,
        "epoch_s": round(steady, 4), "first_epoch_s": round(epoch_s[0], 3),
        "step_s": steady / steps, "fold_s": round(total, 2), "steps_per_epoch": steps,
        "peak_memory_mb": round(out.peak_memory_mb), "inference_ms": round(out.inference_ms, 2),
    }  # fmt: skip


def step_flops(model: str, setup: Setup) -> float:
    """FLOPs one training step executes at batch 8 (FlopCounterMode on the autograd graph, as
    the CPU benchmark counts them)."""
    from torch.utils.flop_counter import FlopCounterMode

    from nmosd_ms.models import build_model

    s = setup.size
    net = build_model(model, s).to(setup.device)
    x = torch.rand(8, 1, s, s, s, device=setup.device)
    y = torch.randint(0, 2, (8,), device=setup.device)
    with FlopCounterMode(display=False) as counter:
        torch.nn.functional.cross_entropy(net(x), y).backward()
    return float(counter.get_total_flops())


def time_concurrent(cohort, setup: Setup, model: str, epochs: int, per_device: int) -> dict:
    """``per_device`` folds at once in bf16 through the Dask executor (one process each, pinned
    to the GPU), after a warm-up round that starts the workers and their CUDA contexts: the
    wall time of two rounds of ``per_device`` folds."""
    from nmosd_ms.config import TrainConfig
    from nmosd_ms.training.executors import FoldInputs, make_executor
    from nmosd_ms.training.plan import plan_splits, plan_tasks

    s, precision = setup.size, "bf16"
    tasks = plan_tasks(plan_splits(cohort.labels, 5, 15, 0), [model], {model: s}, 0)
    vols = {s: cohort.volumes[:, None].astype(np.float32)}
    feats = np.zeros((len(cohort.labels), 1))
    warm = TrainConfig(epochs=1, precision=precision)
    timed = TrainConfig(epochs=epochs, precision=precision, eval_every=epochs)
    pinned = per_device if setup.device == "cuda" else 1  # a CPU dry run: plain workers
    with make_executor(
        "dask", workers=per_device, threads=1, device=setup.device, folds_per_device=pinned
    ) as ex:
        warm_inputs = FoldInputs(vols, cohort.labels, feats, warm, setup.device)
        ex.run(tasks[:per_device], warm_inputs, lambda t, o: None)
        n = 2 * per_device
        inputs = FoldInputs(vols, cohort.labels, feats, timed, setup.device)
        t = time.perf_counter()
        ex.run(tasks[per_device : per_device + n], inputs, lambda t, o: None)
        wall = time.perf_counter() - t
    return {"model": model, "precision": precision, "folds_per_device": per_device,
            "folds": n, "epochs": epochs, "wall_s": round(wall, 2),
            "fold_s_effective": round(wall / n, 3)}  # fmt: skip


def extrapolate(folds: list[dict], concurrent: list[dict]) -> dict:
    """Hours of the 15 × 5 × 100-epoch protocol per arm, from the measured epoch times and the
    best measured concurrency (extrapolated, not measured)."""
    out = {}
    for model in MODELS:
        rows = [
            r
            for r in folds
            if r["model"] == model and not r.get("channels_last") and "error" not in r
        ]
        for r in rows:
            fixed = max(r["fold_s"] - r["epochs"] * r["epoch_s"], 0.0)
            one = fixed + EPOCHS * r["epoch_s"]
            best = _speedup(concurrent, model, r["precision"])
            out[f"{model}@{r['precision']}"] = {
                "fold_s_100_epochs": round(one, 1),
                "protocol_min_one_fold_at_a_time": round(FOLDS * one / 60, 1),
                "speedup_several_folds": round(best, 2),
                "protocol_min": round(FOLDS * one / best / 60, 1),
            }
    return out


def _speedup(concurrent: list[dict], model: str, precision: str) -> float:
    """Effective fold time one at a time over the best with several at once (1: not measured)."""
    rows = [c for c in concurrent if c["model"] == model and c["precision"] == precision]
    single = [c for c in rows if c["folds_per_device"] == 1]
    if not rows or not single:
        return 1.0
    base = single[0]["fold_s_effective"]
    return max(base / c["fold_s_effective"] for c in rows)


def real_protocol(work: Path, setup: Setup, precision: str, per_device: int) -> dict:
    """two-view-18's whole protocol (15 × 5 folds, 100 epochs) through ``run_cv``, timed."""
    import pandas as pd

    from nmosd_ms.config import CVConfig, TrainConfig
    from nmosd_ms.training.cv import executor_for, run_cv

    config = CVConfig(
        models=("twoview-18",), repeats=15, folds=5, seed=0,
        train=TrainConfig(precision=precision, eval_every=100),
    )  # fmt: skip
    pinned = per_device if setup.device == "cuda" else 1
    ex = executor_for("dask", None, per_device, 1, setup.device, pinned)
    run = work / f"run-{precision}"
    t = time.perf_counter()
    run_cv(work / "cache", run, config, device=setup.device, executor=ex)
    wall = time.perf_counter() - t
    folds = pd.read_csv(run / "results" / "folds.tsv", sep="\t")
    net, stump = (folds[folds["model"] == m] for m in ("twoview-18", "lesionload-stump"))
    return {"precision": precision, "folds_per_device": per_device,
            "wall_min": round(wall / 60, 2), "folds": len(net),
            "accuracy": round(float(net["accuracy"].mean()), 4),
            "auc": round(float(net["auc"].mean()), 4),
            "shortcut_accuracy": round(float(stump["accuracy"].mean()), 4)}  # fmt: skip


def write(res: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "gpu.json").write_text(json.dumps(res, indent=1) + "\n")
    (out / "gpu.md").write_text(to_markdown(res))


def to_markdown(res: dict) -> str:
    """The results page: what was measured, then what is extrapolated from it, marked so."""
    nominal = res.get("nominal_tflops") or {}
    gemm = res.get("gemm_tflops", {})
    lines = [
        f"Measured on {res['gpu']} ({res['nvidia_smi']}), torch {res['torch']}, CUDA "
        f"{res['cuda']}, cuDNN {res['cudnn']}, Python {res['python']}, {res['cpu_count']} CPU "
        f"cores; {res['measured']}, commit {res['commit']}; `{res['command']}` "
        "(`scripts/gpu_check.sh`).",
        "",
        f"- CUDA-marked tests (`{res['tests']['command']}`): **{res['tests']['summary']}**",
    ]
    if gemm:
        lines.append(
            f"- GEMM peak measured (8192³, fp32 without TF32): bf16 **{gemm['bf16']:.0f}** "
            f"TFLOP/s, fp32 **{gemm['fp32']:.1f}** TFLOP/s; data-sheet dense peaks "
            f"{nominal.get('bf16', '?')} and {nominal.get('fp32', '?')}"
        )
    if "cohort" in res:
        c = res["cohort"]
        lines.append(
            f"- Synthetic paper cohort (88 subjects): phantom {c['phantom_s']} s, prepare at "
            f"100³ {c['prepare_s']} s (CPU, {min(16, res['cpu_count'])} workers)"
        )
    if res.get("folds"):
        lines += [
            "",
            "One fold (first split of the paper's plan: 70 training subjects, batch 8, 100³, SGD "
            "as the paper), timed over a few epochs; s/epoch is the median after the first epoch. "
            "FLOPs per step: FlopCounterMode on the autograd graph (as the CPU benchmark); share "
            "of the measured GEMM peak of the step's precision and of the data-sheet peak.",
            "",
            "| model | precision | s / epoch | ms / step | TFLOP/s | % GEMM peak | % data sheet "
            "| first epoch (s) | peak memory (MiB) |",
            "|---|---|---|---|---|---|---|---|---|",
        ]
        for r in res["folds"]:
            prec = r["precision"] + (", channels-last" if r.get("channels_last") else "")
            if "error" in r:
                lines.append(f"| {r['model']} | {prec} | {r['error']} |||||||")
                continue
            tflops = res["step_gflop"][r["model"]] / r["step_s"] / 1000
            peak = gemm.get(r["precision"])
            sheet = nominal.get(r["precision"])
            lines.append(
                f"| {r['model']} | {prec} | {r['epoch_s']:.3f} | {1000 * r['step_s']:.1f} | "
                f"{tflops:.1f} | {100 * tflops / peak:.0f} % | "
                f"{f'{100 * tflops / sheet:.0f} %' if sheet else '–'} | {r['first_epoch_s']} | "
                f"{r['peak_memory_mb']} |"
                if peak
                else f"| {r['model']} | {prec} | {r['epoch_s']:.3f} | – | – | – | – | – | – |"
            )
    if res.get("concurrent"):
        lines += [
            "",
            "Several folds at once on the GPU (`cv --executor dask --folds-per-device K`, one "
            "process per fold), two rounds of K folds timed after a warm-up round:",
            "",
            "| model | precision | K | folds | wall (s) | s per fold |",
            "|---|---|---|---|---|---|",
        ]
        lines += [
            f"| {c['model']} | {c['precision']} | {c['folds_per_device']} | {c['folds']} | "
            f"{c['wall_s']} | {c['fold_s_effective']} |"
            for c in res["concurrent"]
        ]
    if res.get("protocol_estimate"):
        lines += _protocol_lines(res)
    for run in res.get("protocol_runs", []):
        lines.append(
            f"- **Measured**: two-view-18's whole protocol (15 × 5 folds, 100 epochs, "
            f"{run['precision']}, K = {run['folds_per_device']}) through `nmosd-ms cv`: "
            f"**{run['wall_min']} min**; mean fold accuracy {run['accuracy']}, AUC {run['auc']} "
            f"(lesion-load stump on the same folds {run['shortcut_accuracy']})"
        )
    if "wall_s" in res:
        lines.append(f"\nWall time of the check: {res['wall_s']} s.")
    return "\n".join(lines) + "\n"


def _protocol_lines(res: dict) -> list[str]:
    est = res["protocol_estimate"]
    lines = [
        "",
        "**Extrapolated, not measured**: the paper's protocol (15 × 5 folds, 100 epochs) from the "
        "epoch times above (plus each fold's fixed cost) and the best measured several-folds "
        "speed-up of that network (1.0 where none was measured):",
        "",
        "| arm | minutes, one fold at a time | speed-up | minutes |",
        "|---|---|---|---|",
    ]
    lines += [
        f"| {k} | {v['protocol_min_one_fold_at_a_time']} | {v['speedup_several_folds']} | "
        f"{v['protocol_min']} |"
        for k, v in est.items()
    ]
    for precision in ("bf16", "fp32"):
        keys = [f"{m}@{precision}" for m in MODELS]
        if all(k in est for k in keys):
            six = sum(ARMS[m] * est[f"{m}@{precision}"]["protocol_min"] for m in MODELS)
            lines.append(
                f"\nSix arms ({precision}; the two-view networks twice, from scratch and "
                f"pretrained): **{six:.0f} min** extrapolated; two-view-18 alone "
                f"{est[f'twoview-18@{precision}']['protocol_min']} min."
            )
    return lines


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=4, help="epochs per timed fold (>= 3)")
    ap.add_argument("--budget-s", type=float, default=420, help="no new stage after this")
    ap.add_argument("--per-device", type=int, nargs="+", default=[1, 4, 8])
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for gpu.md and gpu.json")
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: temp)")
    ap.add_argument("--device", default="cuda", help="cpu: a small dry run of every stage")
    args = ap.parse_args(argv)
    if args.epochs < 3 or min(args.per_device) < 1:
        ap.error("--epochs must be at least 3 (the first is not timed), --per-device at least 1")
    if args.device == "cuda" and not torch.cuda.is_available():
        return no_cuda()
    setup = Setup() if args.device == "cuda" else Setup(args.device, 24, 6, 6)
    start = time.perf_counter()
    res = check(setup, args, start)
    res["wall_s"] = round(time.perf_counter() - start, 1)
    write(res, args.out)
    log(f"done in {res['wall_s']} s -> {args.out / 'gpu.md'}")
    return 0


def no_cuda() -> int:
    """Without a CUDA device: say so, run the CPU side of the GPU code, write nothing."""
    t = time.perf_counter()
    log("no CUDA device here: running the CPU side of the GPU code only; no results written")
    tests = run_tests("not cuda")
    log(f"CPU tests of the GPU code: {tests['summary']}")
    log(f"done in {time.perf_counter() - t:.0f} s (exit 0: nothing else here needs a GPU)")
    return 0 if tests["exit_code"] in (0, 5) else 1


def check(setup: Setup, args, start: float) -> dict:
    """Every stage in order, the results written after each (a run stopped early keeps them)."""
    res: dict = {"measured": time.strftime("%Y-%m-%d"), "command": "python -m benchmarks.gpu",
                 "commit": _commit(), **gpu_info(setup)}  # fmt: skip
    log(f"{res['gpu']} ({res['nvidia_smi']}), torch {res['torch']}, CUDA {res['cuda']}")
    res["tests"] = run_tests("cuda")
    log(f"CUDA tests: {res['tests']['summary']}")
    if setup.device == "cuda":
        bf16, fp32 = gemm_tflops(torch.bfloat16), gemm_tflops(torch.float32)
        res["gemm_tflops"] = {"bf16": bf16, "fp32": fp32}
        log(f"GEMM peak measured: {res['gemm_tflops']}")
    write(res, args.out)
    work = Path(tempfile.mkdtemp(prefix="gpu-check-", dir=args.work))
    cohort, res["cohort"] = make_cohort(work, setup)
    log(f"cohort: {res['cohort']}")
    res["folds"], res["step_gflop"] = [], {}
    runs = [(m, p, {}) for m in MODELS for p in ("bf16", "fp32")]
    runs.append(("resnet3d-18", "bf16", {"channels_last": True}))
    for model, precision, options in runs:
        res["step_gflop"][model] = res["step_gflop"].get(model) or step_flops(model, setup) / 1e9
        try:
            fold = time_fold(cohort, setup, model, precision, epochs=args.epochs, **options)
        except NmosdError as exc:  # a diverged fold is a finding, not the end of the check
            fold = {"model": model, "precision": precision, **options, "error": str(exc)}
        res["folds"].append(fold)
        log(str(fold))
        write(res, args.out)
    res["concurrent"] = []
    plan = [("twoview-18", args.per_device), ("resnet3d-18", [1, 2, 4]),
            ("twoview-34", [1, max(args.per_device)]), ("resnet3d-34", [1, 4])]  # fmt: skip
    for model, ks in plan:
        for k in ks:
            if time.perf_counter() - start > args.budget_s:
                break
            epochs = max(args.epochs, 10)  # the per-run scatter of the cohort stays small
            res["concurrent"].append(time_concurrent(cohort, setup, model, epochs, k))
            log(str(res["concurrent"][-1]))
            write(res, args.out)
    res["protocol_estimate"] = extrapolate(res["folds"], res["concurrent"])
    res["protocol_runs"] = []
    for precision in ("bf16", "fp32"):
        est = res["protocol_estimate"].get(f"twoview-18@{precision}", {}).get("protocol_min", 1e9)
        if time.perf_counter() - start + 60 * est * 1.5 > args.budget_s:
            log(f"not running two-view-18's protocol in {precision}: estimate {est} min")
            continue
        res["protocol_runs"].append(real_protocol(work, setup, precision, max(args.per_device)))
        log(str(res["protocol_runs"][-1]))
        write(res, args.out)
    return res


def _commit() -> str:
    """The commit measured: NMOSD_MS_COMMIT when the checkout travelled without its .git."""
    if os.environ.get("NMOSD_MS_COMMIT"):
        return os.environ["NMOSD_MS_COMMIT"]
    res = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
    )
    return res.stdout.strip() or "unknown"


if __name__ == "__main__":
    sys.exit(main())
