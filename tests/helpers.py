"""Helpers for running the CLI in-process and checking one-line errors."""

from __future__ import annotations

import shutil
import subprocess
import sys
import time
from pathlib import Path

from typer.testing import CliRunner

from nmosd_ms.cli import app

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # the benchmarks package, as ``python -m benchmarks`` sees it
    sys.path.insert(0, str(ROOT))

from benchmarks.interrupt import spawn  # noqa: E402  (one rule for children's signals)

__all__ = ["spawn", "wait_for"]

#: A hang guard: far above what any awaited event takes on a loaded 2-core machine.
HANG_S = 900


def wait_for(predicate, what: str, proc: subprocess.Popen | None = None) -> None:
    """Return once ``predicate()`` is true: an event of the run (a file, a lock), polled.
    Fails if ``proc`` ended first, or after the hang guard, naming ``what`` was awaited."""
    deadline = time.monotonic() + HANG_S
    while not predicate():
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"the process ended (exit {proc.returncode}) before {what}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what}: not seen in {HANG_S} s (hung?)")
        time.sleep(0.02)


def run_cli(*args: str):
    runner = CliRunner()
    return runner.invoke(app, [str(a) for a in args], catch_exceptions=False)


def assert_user_error(result, *fragments: str) -> str:
    """Exit code 2, exactly one line on stderr starting with 'error:', no traceback."""
    assert result.exit_code == 2, (result.exit_code, result.stdout, result.stderr)
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("error:")]
    assert len(errors) == 1 and len(lines) == 1, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    for f in fragments:
        assert f.lower() in errors[0].lower(), (f, errors[0])
    return errors[0]


def cached_path(cache, pid: str, column: str = "array"):
    """Where a prepared cache keeps one subject's array (or segmentation), from its index."""
    import pandas as pd

    index = pd.read_csv(cache / "index.tsv", sep="\t", dtype=str, keep_default_na=False)
    return cache / index.set_index("participant_id").loc[pid, column]


def cached_array(cache, pid: str):
    import numpy as np

    return np.load(cached_path(cache, pid))


def cv_command(cache, out, *extra, epochs: int = 2) -> list[str]:
    """``python -m nmosd_ms cv`` with the options of conftest's small run (same folds)."""
    import sys

    from conftest import SMALL_MODELS

    return [
        sys.executable,
        "-m",
        "nmosd_ms",
        "cv",
        str(cache),
        "--out",
        str(out),
        "--models",
        ",".join(SMALL_MODELS),
        "--repeats",
        "2",
        "--folds",
        "3",
        "--seed",
        "7",
        "--epochs",
        str(epochs),
        "--batch-size",
        "4",
        "--shift",
        "2",
        "--device",
        "cpu",
        "--threads",
        "1",
        *extra,
    ]


def bids_errors(dataset) -> list[dict]:
    """The errors the reference BIDS validator finds in ``dataset`` (bids-validator's schema
    engine, run by Deno; both installed from npm by ``.ci/run`` into tools/bids-validator).
    Skips the calling test, with the reason, where they are not installed."""
    import json
    import subprocess
    from pathlib import Path

    import pytest

    tools = Path(__file__).resolve().parents[1] / "tools" / "bids-validator" / "node_modules"
    deno = tools / ".bin" / "deno"
    engine = tools / "bids-validator" / "dist" / "validator" / "bids-validator.js"
    if not (deno.exists() and engine.is_file()):
        pytest.skip(
            f"the BIDS validator is not installed ({tools} is absent): run "
            "`npm ci --prefix tools/bids-validator` (.ci/run does)"
        )
    res = subprocess.run(
        [str(deno), "run", "-A", str(engine), str(dataset), "--json"],
        capture_output=True,
        text=True,
        timeout=300,
    )
    out = res.stdout[res.stdout.find("{") :]
    try:
        issues = json.loads(out)["issues"]["issues"]
    except (ValueError, KeyError) as exc:
        raise AssertionError(
            f"the validator gave no report ({exc}): {res.stderr[-2000:]}"
        ) from None
    return [i for i in issues if i.get("severity") == "error"]


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FLAGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
]


def render_in_chromium(page, tmp_path, window="1200,2000"):
    """Load ``page`` in headless Chromium: the DOM it built (checked to load without errors or
    console messages) and a screenshot of it (checked not blank). Returns (dom, screenshot)."""
    import numpy as np
    from PIL import Image

    url = page.resolve().as_uri()
    profile = ["--user-data-dir=" + str(tmp_path / "profile")]
    dom = subprocess.run(
        [CHROMIUM, *FLAGS, *profile, "--dump-dom", url], capture_output=True, text=True, timeout=120
    )
    assert dom.returncode == 0, dom.stderr[-2000:]
    console = [ln for ln in dom.stderr.splitlines() if "CONSOLE" in ln or "Uncaught" in ln]
    assert not console, console
    assert "Failed to load resource" not in dom.stderr
    shot = tmp_path / "page.png"
    res = subprocess.run(
        [CHROMIUM, *FLAGS, *profile, f"--window-size={window}", f"--screenshot={shot}", url],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert res.returncode == 0 and shot.stat().st_size > 20_000
    assert np.asarray(Image.open(shot).convert("L")).std() > 10  # not a blank page
    return dom.stdout, shot
