"""Ctrl-C latency of every verb that works for more than a moment: the time from SIGINT to the
process's exit, sent at several moments of each run, with what the run left checked.

Each moment is an event the run itself reports, never a delay: a line of its progress log
(``NMOSD_MS_PROGRESS_FILE``, one line per progress report, the first when the work starts) or,
for ``segment``, the lock of the folder it writes. Each command gets SIGINT back to its default
disposition (a suite or a job started in the background has it ignored, and children inherit
that). A result counts as a pass when the command exited with 130, its last stderr line is
``error: interrupted``, no traceback was printed and nothing partial was left: no temporary file,
no half-written output (a cv run folder keeps only its finished fold records, which a resume
reuses).

    python -m benchmarks.interrupt [--work DIR] [--busy N] [--repeats K] [--out results/]

``--busy N`` runs N CPU-bound processes beside the commands (2 on a 2-core machine: "both cores
busy"). Writes ``results/interrupt.md`` and ``interrupt.json`` (``interrupt-busy.*`` with
``--busy``). The goals (at most 2 s idle, 10 s with both cores busy) are printed beside each
figure, not asserted: the tests check the behaviour, this file measures the time.
"""

from __future__ import annotations

import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from benchmarks import ArgumentParser

RESULTS = Path(__file__).parent / "results"
PROGRESS_FILE = "NMOSD_MS_PROGRESS_FILE"  # nmosd_ms.cli.PROGRESS_FILE (no import: no torch here)
#: Hang guards only: far above the time any command here needs on a loaded 2-core machine.
HANG_S = 900
GOALS_S = {"idle": 2.0, "busy": 10.0}


def default_signals() -> None:
    """In the child before it runs: SIGINT and SIGTERM back to their default dispositions."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    signal.signal(signal.SIGTERM, signal.SIG_DFL)


def spawn(cmd: list[str], **kwargs) -> subprocess.Popen:
    """``Popen`` independent of how the caller was started: standard input closed (``/dev/null``)
    and SIGINT/SIGTERM at their defaults in the child (``nohup cmd &`` ignores SIGINT)."""
    kwargs.setdefault("stdin", subprocess.DEVNULL)
    return subprocess.Popen(cmd, preexec_fn=default_signals, **kwargs)  # noqa: PLW1509


@dataclass(frozen=True)
class Inputs:
    """What the commands read: a BIDS cohort, its prepared cache, a bundle fitted on it, a 1 mm
    FLAIR (for segment) and a prediction manifest of the cohort's lesion masks."""

    bids: Path
    cache: Path
    bundle: Path
    flair: Path
    manifest: Path


@dataclass(frozen=True)
class Moment:
    """When to send SIGINT: ``reached(progress_lines, out)`` is true once the run has got there."""

    name: str
    reached: Callable[[list[list[str]], Path], bool]


def _done_at_least(k: int | None) -> Callable[[list[list[str]], Path], bool]:
    """A progress line with ``done >= k`` (``None``: half of the total)."""

    def reached(lines: list[list[str]], out: Path) -> bool:
        for label, done, total in lines:
            need = int(total) // 2 if k is None else k
            if int(done) >= max(need, 0) and not label.startswith("waiting"):
                return True
        return False

    return reached


def _epoch_line(lines: list[list[str]], out: Path) -> bool:
    return any(" epoch " in label for label, _, _ in lines)


def _folder_locked(lines: list[list[str]], out: Path) -> bool:
    return (out / ".nmosd-ms.lock").exists()


STARTED = Moment("started", _done_at_least(0))
FIRST = Moment("first item done", _done_at_least(1))
HALF = Moment("half done", _done_at_least(None))


@dataclass(frozen=True)
class Scenario:
    """One command to interrupt: ``args(out)`` after ``python -m nmosd_ms``; ``out`` the new
    location it writes; ``keeps`` the files an interrupted run may rightly leave there."""

    name: str
    args: Callable[[Path], list[str]]
    moments: tuple[Moment, ...]
    keeps: Callable[[Path], bool] = lambda p: False


def _cv_keeps(path: Path) -> bool:
    """A cv run folder keeps its record, splits, finished folds' records and weights, and its
    lock and writer files (released by the kernel); never a temporary file."""
    return ".tmp" not in path.name and "-tmp-" not in path.name


def scenarios(inp: Inputs) -> list[Scenario]:
    """The verbs and moments measured, on ``inp`` (sized so that each run lasts seconds)."""
    cpu = ["--device", "cpu"]
    return [
        Scenario(
            "phantom",
            lambda o: ["phantom", str(o), "--n-nmosd", "4", "--n-ms", "4", "--difficulty", "easy"],
            (STARTED, FIRST, HALF),
        ),
        Scenario(
            "phantom --workers 2",
            lambda o: ["phantom", str(o), "--n-nmosd", "4", "--n-ms", "4", "--workers", "2"],
            (STARTED, FIRST, HALF),
        ),
        Scenario(
            "prepare",
            lambda o: ["prepare", str(inp.bids), "--out", str(o), "--size", "64"],
            (STARTED, FIRST, HALF),
        ),
        Scenario(
            "prepare --workers 2",
            lambda o: ["prepare", str(inp.bids), "--out", str(o), "--size", "64", "--workers", "2"],
            (STARTED, FIRST, HALF),
        ),
        Scenario(
            "segment",
            lambda o: ["segment", "--flair", str(inp.flair), "--out", str(o), "--skull-stripped"],
            (Moment("started", _folder_locked),),
        ),
        Scenario(
            "cv",
            lambda o: [
                "cv",
                str(inp.cache),
                "--out",
                str(o),
                "--models",
                "twoview-18",
                "--repeats",
                "1",
                "--folds",
                "3",
                "--epochs",
                "20",
                "--no-shortcut",
                "--threads",
                "1",
                *cpu,
            ],  # fmt: skip
            (STARTED, Moment("first epoch", _epoch_line), FIRST),
            keeps=_cv_keeps,
        ),
        Scenario(
            "fit",
            lambda o: [
                "fit",
                str(inp.cache),
                "--model",
                "twoview-18",
                "--out",
                str(o),
                "--epochs",
                "20",
                "--threads",
                "1",
                *cpu,
            ],  # fmt: skip
            (STARTED, FIRST, HALF),
        ),
        Scenario(
            "predict",
            lambda o: [
                "predict",
                str(inp.bundle),
                "--manifest",
                str(inp.manifest),
                "--out",
                str(o),
                "--saliency",
                "--occlusion-size",
                "4",
                *cpu,
            ],  # fmt: skip
            (STARTED, FIRST, HALF),
        ),
        Scenario(
            "evaluate",
            lambda o: [
                "evaluate",
                str(inp.bundle),
                str(inp.bids),
                "--out",
                str(o),
                "--allow-overlap",
                *cpu,
            ],  # fmt: skip
            (STARTED, FIRST, HALF),
        ),
    ]


def _progress(path: Path) -> list[list[str]]:
    if not path.exists():
        return []
    lines = path.read_text(encoding="utf-8").splitlines()
    return [ln.split("\t") for ln in lines if ln.count("\t") == 2]


def _new_paths(root: Path, before: set[Path]) -> list[Path]:
    return sorted(p for p in root.rglob("*") if p not in before)


def interrupt(scenario: Scenario, moment: Moment, work: Path) -> dict:
    """Run ``scenario`` in a new folder of ``work``, send SIGINT once ``moment`` is reached, and
    say what happened: latency (s), exit code, last stderr line, what was left, and whether the
    run had already ended before the moment came (then nothing was measured)."""
    root = Path(tempfile.mkdtemp(prefix="interrupt-", dir=work))
    out, log = root / "out", root / "progress.log"
    env = {**os.environ, PROGRESS_FILE: str(log)}
    cmd = [sys.executable, "-m", "nmosd_ms", *scenario.args(out)]
    with open(root / "stdout", "w") as so, open(root / "stderr", "w") as se:
        proc = spawn(cmd, stdout=so, stderr=se, env=env)
        deadline = time.monotonic() + HANG_S
        while proc.poll() is None and not moment.reached(_progress(log), out):
            if time.monotonic() > deadline:
                proc.kill()
                raise AssertionError(f"{scenario.name}: never reached '{moment.name}'")
            time.sleep(0.01)  # polling the run's own reports, not waiting for a guessed time
        ended_first = proc.poll() is not None
        sent = time.monotonic()
        if not ended_first:
            proc.send_signal(signal.SIGINT)
        code = proc.wait(timeout=HANG_S)
        latency = time.monotonic() - sent
    err = (root / "stderr").read_text()
    lines = [ln for ln in err.splitlines() if ln.strip()]
    left = [
        p.relative_to(root).as_posix()
        for p in _new_paths(root, {root / "stdout", root / "stderr", log})
        if (p.is_file() and not scenario.keeps(p)) or (p.is_dir() and "tmp" in p.name)
    ]
    result = {
        "scenario": scenario.name,
        "moment": moment.name,
        "ended_before_signal": ended_first,
        "latency_s": None if ended_first else round(latency, 3),
        "exit_code": code,
        "last_line": lines[-1] if lines else "",
        "traceback": "Traceback" in err,
        "left": left,
    }
    result["ok"] = (
        not ended_first
        and code == 130
        and result["last_line"] == "error: interrupted"
        and not result["traceback"]
        and not result["left"]
    )
    shutil.rmtree(root, ignore_errors=True)
    return result


def make_inputs(work: Path) -> Inputs:
    """A 16-subject easy cohort, its 24³ cache, a 1-epoch bundle, a 1 mm FLAIR and a manifest."""
    nm = [sys.executable, "-m", "nmosd_ms"]
    bids, cache, bundle = work / "bids", work / "c24", work / "bundle"
    steps = [
        ["phantom", bids, "--n-nmosd", "8", "--n-ms", "8", "--seed", "3", "--difficulty", "easy"],
        ["phantom", work / "hires", "--n-nmosd", "1", "--n-ms", "0", "--resolution", "1"],
        ["prepare", bids, "--out", cache, "--size", "24"],
        ["fit", cache, "--model", "twoview-18", "--out", bundle, "--epochs", "1", "--device", "cpu"],
    ]  # fmt: skip
    for step in steps:
        cmd = [*nm, *map(str, step)]
        subprocess.run(cmd, check=True, capture_output=True, stdin=subprocess.DEVNULL)
    flair = next((work / "hires").glob("sub-*/anat/*_FLAIR.nii.gz"))
    return Inputs(bids, cache, bundle, flair, manifest_of(bids, work / "predict.tsv"))


def manifest_of(bids: Path, path: Path) -> Path:
    """A predict manifest of every lesion mask of a phantom cohort."""
    masks = sorted((bids / "derivatives" / "lesions").glob("sub-*/anat/*_mask.nii.gz"))
    rows = ["participant_id\tlesion_mask"]
    rows += [f"{m.name.split('_')[0].removeprefix('sub-')}\t{m}" for m in masks]
    path.write_text("\n".join(rows) + "\n")
    return path


def busy_processes(n: int) -> list[subprocess.Popen]:
    return [spawn([sys.executable, "-c", "while True: pass"]) for _ in range(n)]


def table(rows: list[dict], goal: float) -> str:
    head = "| verb | moment | SIGINT → exit (s) | exit | last line | left | ok |\n|---|---|---|---|---|---|---|"
    body = []
    for r in rows:
        lat = "ended first" if r["latency_s"] is None else f"{r['latency_s']:.2f}"
        flag = "" if r["latency_s"] is None or r["latency_s"] <= goal else " (over goal)"
        body.append(
            f"| {r['scenario']} | {r['moment']} | {lat}{flag} | {r['exit_code']} | "
            f"`{r['last_line']}` | {', '.join(r['left']) or 'nothing'} | {'yes' if r['ok'] else 'NO'} |"
        )
    return "\n".join([head, *body])


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--work", type=Path, default=None, help="scratch folder (default: a new temp)")
    ap.add_argument("--busy", type=int, default=0, help="CPU-bound processes run beside")
    ap.add_argument("--repeats", type=int, default=1, help="measurements per verb and moment")
    ap.add_argument("--out", type=Path, default=RESULTS, help="folder for interrupt.md/.json")
    args = ap.parse_args(argv)
    if args.busy < 0 or args.repeats < 1:
        ap.error("--busy must be >= 0 and --repeats >= 1")
    work = Path(tempfile.mkdtemp(prefix="nmosd-interrupt-", dir=args.work))
    t0 = time.monotonic()
    inputs = make_inputs(work)
    busy = busy_processes(args.busy)
    try:
        rows = [
            interrupt(s, m, work)
            for s in scenarios(inputs)
            for m in s.moments
            for _ in range(args.repeats)
        ]
    finally:
        for p in busy:
            p.kill()
            p.wait()
        shutil.rmtree(work, ignore_errors=True)
    mode = "busy" if args.busy else "idle"
    goal = GOALS_S[mode]
    measured = [r["latency_s"] for r in rows if r["latency_s"] is not None]
    summary = {
        "mode": mode,
        "busy_processes": args.busy,
        "cpu_count": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "goal_s": goal,
        "max_latency_s": max(measured) if measured else None,
        "all_ok": all(r["ok"] for r in rows),
        "wall_s": round(time.monotonic() - t0, 1),
        "rows": rows,
    }
    stem = "interrupt" if mode == "idle" else "interrupt-busy"
    text = (
        f"SIGINT latency, {mode} ({args.busy} busy processes beside), {os.cpu_count()} cores, "
        f"Python {summary['python']}; goal ≤ {goal:g} s. Command: `python -m benchmarks.interrupt"
        f"{f' --busy {args.busy}' if args.busy else ''}`.\n\n{table(rows, goal)}\n\n"
        f"Longest: **{summary['max_latency_s']} s**; every run as required: "
        f"**{'yes' if summary['all_ok'] else 'no'}**.\n"
    )
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / f"{stem}.json").write_text(json.dumps(summary, indent=1) + "\n")
    (args.out / f"{stem}.md").write_text(text)
    print(text)
    return 0 if summary["all_ok"] else 1


if __name__ == "__main__":
    sys.exit(main())
