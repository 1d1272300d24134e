"""Atomic file writes, path checks and hashing shared by every step.

Every output is written to a temporary file in the destination folder, flushed, then renamed
over the destination, so a killed process never leaves a half-written file behind. Files and
folders get the permissions the process's umask allows (``mkstemp``/``mkdtemp`` alone would make
them private to the owner, which a lab's group could not read). Temporary names start with ``.``
and contain ``.tmp``: :func:`remove_stale_temporaries` clears those a killed writer left.
"""

from __future__ import annotations

import contextlib
import hashlib
import io
import json
import os
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd


def regular_file(path: str | os.PathLike, what: str) -> Path:
    """``path`` if it is a regular file; else one user error saying whether it is missing or
    something else (a folder, a device: a symlink to /dev/zero is not "not found")."""
    from .errors import NmosdError

    path = Path(path)
    if not path.exists():
        raise NmosdError(f"{what} not found: {path}")
    if not path.is_file():
        raise NmosdError(f"{what} {path} is not a regular file")
    return path


def available_memory_bytes() -> int | None:
    """Memory available to this process now, for checks made before large allocations
    (``None`` where it cannot be read: the caller then skips that check)."""
    try:
        import psutil

        return int(psutil.virtual_memory().available)
    except Exception:  # psutil missing or unable to read the machine
        return None


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (``os.umask`` can only
    be read by setting it, which races with other threads creating files)."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError, IndexError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _chmod_default(path: Path, directory: bool) -> None:
    os.chmod(path, (0o777 if directory else 0o666) & ~current_umask())


def inside(root: str | os.PathLike, *parts: str | os.PathLike, action: str = "write") -> Path:
    """``root/parts…``, refused unless it resolves inside ``root``: every writer builds the paths
    of its outputs through this, so no identifier or name read from input can steer a write
    elsewhere (``../``, absolute paths, symlinks out of the folder)."""
    root = Path(root)
    path = root.joinpath(*parts)
    base = root.resolve()
    target = path.resolve()
    if target != base and base not in target.parents:
        from .errors import NmosdError

        raise NmosdError(f"refusing to {action} {path}: it is outside the folder {root}")
    return path


def remove_stale_temporaries(folder: str | os.PathLike, recursive: bool = True) -> int:
    """Delete temporary files and folders a killed writer left in ``folder`` (the caller must
    hold the folder's writer lock, so none of them belongs to a live writer). Returns how many."""
    import shutil

    folder = Path(folder)
    if not folder.is_dir():
        return 0
    found = folder.rglob(".*") if recursive else folder.glob(".*")
    stale = [p for p in found if ".tmp" in p.name or "-tmp-" in p.name]
    for p in sorted(stale, key=lambda q: len(q.parts), reverse=True):
        if p.is_dir() and not p.is_symlink():
            shutil.rmtree(p, ignore_errors=True)
        else:
            with contextlib.suppress(FileNotFoundError):
                p.unlink()
    return len(stale)


@contextlib.contextmanager
def atomic_path(dest: str | os.PathLike, suffix: str = "") -> Iterator[Path]:
    """Yield a temporary path next to ``dest``; rename it onto ``dest`` if the block succeeds."""
    dest = Path(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", suffix=".tmp" + suffix, dir=dest.parent)
    os.close(fd)
    _chmod_default(Path(tmp), directory=False)
    tmp_path = Path(tmp)
    try:
        yield tmp_path
        with open(tmp_path, "rb") as fh:
            os.fsync(fh.fileno())
        _chmod_default(tmp_path, directory=False)  # again: some writers replace the file
        os.replace(tmp_path, dest)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp_path.unlink()


@contextlib.contextmanager
def atomic_dir(dest: str | os.PathLike, replace: bool = False) -> Iterator[Path]:
    """Yield a temporary folder next to ``dest``; move it onto ``dest`` if the block succeeds.

    With ``replace`` an existing ``dest`` is swapped out only after the new folder is complete;
    without it an existing ``dest`` is an error (outputs are never overwritten).
    """
    import shutil

    dest = Path(dest)
    if dest.exists() and not replace:
        raise FileExistsError(dest)
    dest.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{dest.name}-tmp-", dir=dest.parent))
    _chmod_default(tmp, directory=True)
    try:
        yield tmp
        if dest.exists() and replace:
            old = dest.parent / f".{dest.name}-tmp-old-{tmp.name}"
            dest.rename(old)
            tmp.rename(dest)
            shutil.rmtree(old, ignore_errors=True)
        else:
            try:
                tmp.rename(dest)
            except OSError:  # another writer created dest meanwhile: never overwrite it
                from .errors import NmosdError

                raise NmosdError(
                    f"{dest} was created by another process while this one wrote it; "
                    "nothing was replaced"
                ) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def write_bytes(dest: str | os.PathLike, data: bytes) -> None:
    with atomic_path(dest) as tmp:
        tmp.write_bytes(data)


def write_text(dest: str | os.PathLike, text: str) -> None:
    write_bytes(dest, text.encode("utf-8"))


def _json_default(obj: Any) -> Any:
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, np.ndarray):
        return obj.tolist()
    if isinstance(obj, Path):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


def dumps_json(obj: Any) -> str:
    return json.dumps(obj, indent=2, sort_keys=False, default=_json_default) + "\n"


def write_json(dest: str | os.PathLike, obj: Any) -> None:
    write_text(dest, dumps_json(obj))


def read_json(path: str | os.PathLike, what: str = "") -> Any:
    """Parse a JSON file; a truncated, invalid or unreadable one is a user error naming it."""
    from .errors import NmosdError

    path = Path(path)
    label = f"{what} {path}" if what else str(path)
    if path.exists() and not path.is_file():
        raise NmosdError(f"{label} is not a regular file")
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise NmosdError(f"{label} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise NmosdError(f"{label} is not valid JSON (truncated or edited?): {exc}") from None
    except OSError as exc:
        raise NmosdError(f"cannot read {label}: {exc.strerror or exc}") from None


def write_tsv(dest: str | os.PathLike, df: pd.DataFrame, float_format: str | None = None) -> None:
    buf = io.StringIO()
    df.to_csv(buf, sep="\t", index=False, float_format=float_format, lineterminator="\n")
    write_text(dest, buf.getvalue())


def read_tsv(path: str | os.PathLike, keep_empty: bool = False) -> pd.DataFrame:
    """Read a TSV; ``keep_empty`` keeps empty cells as "" instead of NaN (path columns)."""
    return pd.read_csv(
        path, sep="\t", dtype={"participant_id": str}, keep_default_na=not keep_empty
    )


def save_npy(dest: str | os.PathLike, array: np.ndarray) -> None:
    with atomic_path(dest, suffix=".npy") as tmp:
        np.save(tmp, array, allow_pickle=False)


def write_tensors(
    path: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None
) -> None:
    """Write ``tensors`` (torch tensors, or numpy arrays) as a safetensors file at ``path``.
    safetensors reports a failed write (a full disk, a removed folder) as its own error type,
    not ``OSError``; it is raised as ``OSError`` here, so that every writer's callers see a
    refused write the same way (one ``error:`` line at the command line)."""
    from safetensors import SafetensorError

    if any(isinstance(v, np.ndarray) for v in tensors.values()):
        from safetensors.numpy import save_file
    else:
        from safetensors.torch import save_file
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as exc:
        raise OSError(f"cannot write {path}: {exc}") from None


def save_tensors(
    dest: str | os.PathLike, tensors: dict, metadata: dict[str, str] | None = None
) -> None:
    """:func:`write_tensors` atomically (a temporary file renamed onto ``dest``)."""
    with atomic_path(dest, suffix=".safetensors") as tmp:
        write_tensors(tmp, tensors, metadata)


def sha256_file(path: str | os.PathLike, chunk: int = 1 << 20) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        while block := fh.read(chunk):
            h.update(block)
    return h.hexdigest()


def sha256_text(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()
