"""The wheel folder the GPU check installs from on a machine without internet.

Run it where the package index is reachable; it writes the project's own wheel and the wheels of
every dependency that a CUDA machine with PyTorch preinstalled usually lacks (pure-Python wheels,
and manylinux x86-64 ones for CPython 3.10, 3.11 and 3.12), at the versions ``constraints.txt``
pins. PyTorch and the scientific stack that ships beside it on GPU images (``PREINSTALLED``) are
left out, which keeps the folder small; ``python -m benchmarks.gpu`` names any of them the GPU
machine lacks.

    python -m benchmarks.gpu_wheels [--out wheels] [--python 3.10 3.11 3.12]

Then copy the repository with ``wheels/`` to the GPU machine and run ``scripts/gpu_check.sh``.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import sys
from pathlib import Path

from benchmarks import ArgumentParser

ROOT = Path(__file__).resolve().parents[1]
#: Expected on a CUDA machine with PyTorch: torch and what it brings, and the compiled
#: scientific stack GPU images ship (NGC, cloud deep-learning images): their wheels alone would
#: exceed 150 MiB for three Python versions. Everything else, small pure-Python packages such as
#: typing_extensions included, is in the folder: pip keeps an installed version that fits and
#: takes the folder's where none does.
PREINSTALLED = {
    "torch", "numpy", "scipy", "pandas", "scikit-learn", "scikit-image", "matplotlib", "pillow",
    "sympy", "networkx", "contourpy", "kiwisolver", "fonttools", "imageio", "tifffile", "ruff",
}  # fmt: skip
PLATFORMS = [
    "manylinux_2_28_x86_64", "manylinux_2_27_x86_64", "manylinux_2_24_x86_64",
    "manylinux_2_17_x86_64", "manylinux2014_x86_64", "manylinux1_x86_64",
]  # fmt: skip
LIMIT_MIB = 60


def canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pinned() -> dict[str, str]:
    """``constraints.txt`` as {canonical name: version}."""
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        line = line.split("#")[0].strip()
        if "==" in line:
            name, version = line.split("==")
            pins[canonical(name)] = version.strip()
    return pins


def _download(spec: str, out: Path, python: str) -> bool:
    tags = [f"--platform={p}" for p in PLATFORMS]
    cmd = [
        sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--only-binary=:all:",
        "--dest", str(out), "--python-version", python, "--implementation", "cp", *tags, spec,
    ]  # fmt: skip
    return subprocess.run(cmd, capture_output=True, text=True).returncode == 0


def _build_wheel(spec: str, out: Path) -> None:
    """A wheel built here from a source distribution (a pure-Python package with none on the
    index, such as docopt)."""
    cmd = [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "-w", str(out), spec]
    subprocess.run(cmd, check=True, capture_output=True)


#: What an older Python needs beside the pins (pytest's backports).
BACKPORTS = {"3.10": ("exceptiongroup", "tomli")}


def _fetch(name: str, version: str, out: Path, pythons: list[str]) -> list[str]:
    """Download ``name`` at its pin for each Python; where a Python has no wheel of the pin
    (a release newer than that Python), the newest release that has one. Returns what failed."""
    spec = f"{name}=={version}"
    ok = [_download(spec, out, py) for py in pythons]
    if not any(ok):
        try:
            _build_wheel(spec, out)
            return []
        except subprocess.CalledProcessError:
            return [spec]
    return [f"{name} for Python {py}" for py, k in zip(pythons, ok, strict=True)
            if not k and not _download(name, out, py)]  # fmt: skip


def main(argv: list[str] | None = None) -> int:
    ap = ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "wheels", help="the wheel folder")
    ap.add_argument("--python", nargs="+", default=["3.10", "3.11", "3.12"])
    args = ap.parse_args(argv)
    if args.out.exists():
        shutil.rmtree(args.out)
    args.out.mkdir(parents=True)
    _build_wheel(str(ROOT), args.out)  # the project itself: pure Python
    missing = []
    for name, version in sorted(pinned().items()):
        if name not in PREINSTALLED:
            missing += _fetch(name, version, args.out, args.python)
    for py in args.python:
        for name in BACKPORTS.get(py, ()):
            if not _download(name, args.out, py):
                missing.append(f"{name} for Python {py}")
    size = sum(p.stat().st_size for p in args.out.iterdir()) / 2**20
    print(f"{len(list(args.out.iterdir()))} wheels, {size:.1f} MiB -> {args.out}")
    for m in missing:
        print(f"warning: {m}")
    if size > LIMIT_MIB:
        print(f"error: the wheel folder is {size:.1f} MiB, over {LIMIT_MIB} MiB", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
