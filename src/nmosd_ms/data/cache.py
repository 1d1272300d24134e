"""The prepared cache: its one owner. ``prepare`` writes it, cross-validation and ``fit`` read it.

Layout::

    CACHE_DIR/arrays/<id>.<key>.npy   float32 (S, S, S), canonical RAS axes
    CACHE_DIR/arrays/<id>.<key>.json  that subject's index row, features and SpatialRecord
    CACHE_DIR/segmentations/   the WMH masks of subjects segmented here (segment_missing), a
                              BIDS derivative dataset: sub-X/[ses-Y/]anat/
                              sub-X[_ses-Y]_space-orig_label-WMH_desc-<key>_mask.nii.gz on the
                              FLAIR's grid, its JSON sidecar, and a PNG montage for review
    CACHE_DIR/index.tsv       one row per subject (paths, sha256, crop box in source voxels)
    CACHE_DIR/features.tsv    lesion-load features (nmosd_ms.data.features)
    CACHE_DIR/spatial.json    per-subject SpatialRecord for the inverse map
    CACHE_DIR/prepare.json    parameters, versions, cohort hash and the sha256 of the three
                              tables above: written last, it is the commit of a prepare run

``<key>`` is a hash of the preprocessing parameters and of the subject's input files, so a file
is never overwritten by one made differently: a prepare killed at any moment leaves the last
committed cache intact (its tables still name the old files), and a re-run reuses exactly the
subjects whose key still matches. A second prepare on the same folder is refused while one runs.
Every subject is computed (:func:`~.preprocess.prepare_subject`) before anything is written, so
a bad subject leaves the cache untouched.

A :class:`PreparedCohort` is the cache in memory; :meth:`PreparedCohort.from_subjects` builds
one from subjects preprocessed in memory (:func:`~.preprocess.preprocess_arrays`), with no files.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import hashlib
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from ..config import PrepareConfig
from ..constants import LABELS, __version__
from ..derivatives import (
    DESCRIPTION_FILES,
    DerivativeDataset,
    montage_path,
    sidecar_path,
    wmh_sidecar,
)
from ..errors import NmosdError
from ..io import (
    inside,
    read_json,
    read_tsv,
    save_npy,
    sha256_file,
    sha256_text,
    write_json,
    write_tsv,
)
from ..locking import check_own_folder, writing_folder
from ..pools import pool_map, stopping_pool
from ..spatial import SpatialRecord
from .features import FEATURES
from .ingest import Cohort, Subject, scan_key, validate_participant_id
from .preprocess import PreparedSubject, prepare_subject

Progress = Callable[[int, int], None]


def _source_hashes(subject: Subject) -> dict[str, str]:
    return {
        f"{k}_sha256": sha256_file(p) if p else ""
        for k, p in (
            ("flair", subject.flair),
            ("lesion_mask", subject.lesion_mask),
            ("brain_mask", subject.brain_mask),
        )
    }


def _params(config: PrepareConfig) -> dict:
    return config.model_dump(mode="json")


TABLES = ("index.tsv", "features.tsv", "spatial.json")


def _subject_key(params: dict, hashes: dict[str, str]) -> str:
    """What a subject's cached files were made from: the parameters and its inputs' contents."""
    made_from = {"params": params, "inputs": hashes}
    return sha256_text(json.dumps(made_from, sort_keys=True, separators=(",", ":")))[:16]


def _reusable(out: Path, pid: str, key: str) -> dict | None:
    """The sidecar of a subject cached under ``key`` if its array is there too."""
    side = out / "arrays" / f"{pid}.{key}.json"
    if not side.is_file() or not (out / "arrays" / f"{pid}.{key}.npy").is_file():
        return None
    try:
        rec = read_json(side)
    except NmosdError:
        return None
    if not isinstance(rec, dict) or not {"row", "features", "record"} <= set(rec):
        return None
    seg = rec["row"].get("segmentation") or ""
    return None if seg and not (out / seg).is_file() else rec


def prepare(
    cohort: Cohort,
    out_dir: str | Path,
    config: PrepareConfig,
    workers: int = 1,
    progress: Progress | None = None,
) -> dict:
    """Prepare ``cohort`` into the cache folder ``out_dir``; reuse subjects whose inputs and
    parameters are unchanged.

    Parameters
    ----------
    cohort : Cohort
        From :func:`~nmosd_ms.data.dataset.load_cohort`; every subject is validated and computed
        before anything is written.
    out_dir : path
        The cache folder (created, or updated when it is already a cache; locked while written).
    config : PrepareConfig
        Size, input kind, interpolation, segmentation of missing masks.
    workers : int
        Subjects processed in parallel (threads).

    Returns a summary dict (also the content of prepare.json).
    """
    out = Path(out_dir)
    check_own_folder(out, "prepare.json", "a prepare cache")
    with writing_folder(out, "cache"):
        return _prepare_locked(cohort, out, config, workers, progress)


def _prepare_locked(cohort, out: Path, config, workers, progress) -> dict:
    params = _params(config)
    previous: dict[str, dict] = {}
    if (out / "prepare.json").is_file() and (out / "index.tsv").is_file():
        with contextlib.suppress(NmosdError, ValueError, KeyError, OSError):
            idx = read_tsv(out / "index.tsv", keep_empty=True)
            previous = {r["array"]: r for r in idx.to_dict("records")}

    # files and maps are keyed by the scan (participant, or participant_session)
    hashes = {s.key: _source_hashes(s) for s in cohort.subjects}
    keys = {pid: _subject_key(params, h) for pid, h in hashes.items()}
    todo, reused = [], {}
    for s in cohort.subjects:
        rec = _reusable(out, s.key, keys[s.key])
        if rec is not None:
            reused[s.key] = rec
        else:
            todo.append(s)

    results: dict[str, PreparedSubject] = {}
    done = len(reused)
    if progress:
        progress(done, len(cohort))

    def work(s: Subject) -> tuple[str, PreparedSubject]:
        return s.key, prepare_subject(s, config)

    # Threads suffice: gzip, numpy and torch release the GIL. One worker runs in order.
    pool = ThreadPoolExecutor(max_workers=max(1, workers))
    with stopping_pool(pool):
        for pid, res in pool_map(pool, work, todo):
            results[pid] = res
            done += 1
            if progress:
                progress(done, len(cohort))

    # Everything validated and computed: now write, new files under new names only.
    rows, feature_rows, records = [], [], {}
    for s in cohort.subjects:
        pid, key = s.key, keys[s.key]
        if pid in results:
            r = results[pid]
            array = f"arrays/{pid}.{key}.npy"
            save_npy(inside(out, array), r.array)
            seg_file = ""
            if r.segmentation_bits is not None:
                seg_file = _save_segmentation(out, s, key, r)
            rec = {
                "row": {**r.row, "array": array, "segmentation": seg_file},
                "features": r.features,
                "record": r.record.to_json(),
            }
            write_json(inside(out, f"arrays/{pid}.{key}.json"), rec)
        else:
            rec = reused[pid]
        paths = {
            "flair": str(s.flair or ""),
            "lesion_mask": str(s.lesion_mask or ""),
            "brain_mask": str(s.brain_mask or ""),
        }
        rows.append({**rec["row"], "diagnosis": s.diagnosis, **paths, **hashes[pid]})
        feature_rows.append(
            {
                "participant_id": s.participant_id,
                "session_id": s.session_id,
                "diagnosis": s.diagnosis,
                **{k: rec["features"][k] for k in FEATURES},
            }
        )
        records[pid] = rec["record"]
    sessions = any(s.session_id for s in cohort.subjects)
    index = pd.DataFrame(rows)
    index = index.assign(session_id=[s.session_id for s in cohort.subjects]) if sessions else index
    index = index.drop(columns=[] if sessions else ["session_id"], errors="ignore")
    columns = ["participant_id", *(["session_id"] if sessions else []), "diagnosis", *FEATURES]
    features = pd.DataFrame(feature_rows)[columns]
    write_tsv(out / "index.tsv", index)
    write_tsv(out / "features.tsv", features)
    write_json(out / "spatial.json", records)
    summary = {
        "tool": "nmosd-ms prepare",
        "version": __version__,
        "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "source": cohort.source,
        "params": params,
        "n_subjects": len(index),
        "counts": {lab: int((index["diagnosis"] == lab).sum()) for lab in LABELS},
        "reused": len(reused),
        "computed": len(results),
        "cohort_hash": sha256_text(
            index.drop(columns=["flair", "lesion_mask", "brain_mask"]).to_csv(sep="\t")
        ),
        "tables": {name: sha256_file(out / name) for name in TABLES},
    }
    write_json(out / "prepare.json", summary)  # the commit
    _remove_unreferenced(out, index, previous)
    return summary


#: The WMH masks made by segment_missing: a BIDS derivative dataset inside the cache.
SEGMENTATIONS = "segmentations"


def _save_segmentation(out: Path, subject: Subject, key: str, prepared: PreparedSubject) -> str:
    """Write the WMH mask made for ``subject`` into the cache's derivative dataset, named by
    BIDS entities and ``desc-<key>`` (so a mask made differently never overwrites it); returns
    its path relative to the cache."""
    dataset = DerivativeDataset(
        out / SEGMENTATIONS, "nmosd-ms WMH segmentations", "prepare --segment-missing"
    ).start()
    mask = dataset.path(
        subject.participant_id, subject.session_id, "mask", space="orig", label="WMH", desc=key
    )
    prepared.save_segmentation(mask)
    dataset.sidecar(mask, wmh_sidecar(subject.flair, "nmosd-ms segment (prepare's options)"))
    return mask.relative_to(out).as_posix()


def _remove_unreferenced(out: Path, index: pd.DataFrame, previous: dict[str, dict]) -> None:
    """Files of earlier prepare runs that the committed index no longer names."""
    keep = set(index["array"]) | {a.removesuffix(".npy") + ".json" for a in index["array"]}
    for seg in index["segmentation"]:
        if seg:
            keep |= {seg, montage_path(Path(seg)).as_posix(), sidecar_path(Path(seg)).as_posix()}
    keep |= {f"{SEGMENTATIONS}/{name}" for name in DESCRIPTION_FILES}
    stale = [
        p.relative_to(out).as_posix()
        for d in ("arrays", SEGMENTATIONS)
        if (out / d).is_dir()
        for p in (out / d).rglob("*")
        if p.is_file() or p.is_symlink()
    ]
    for row in previous.values():  # caches written before arrays/ existed
        stale += [v for k in ("array", "segmentation") if isinstance(v := row.get(k), str) and v]
        if isinstance(seg := row.get("segmentation"), str) and seg:
            stale.append(montage_path(Path(seg)).as_posix())
    for rel in set(stale) - keep:
        with contextlib.suppress(NmosdError, OSError):
            inside(out, rel).unlink(missing_ok=True)


@dataclass
class PreparedCohort:
    """A prepared cohort in memory (the whole cohort is small): one row of ``index`` per subject,
    its volume (N, S, S, S) float32, its lesion-load features and its spatial record (the crop
    box and source grid, for mapping back). ``path`` is the cache it was read from, or ``None``
    for a cohort built in memory."""

    path: Path | None
    index: pd.DataFrame
    volumes: np.ndarray  # (N, S, S, S) float32
    params: dict
    cohort_hash: str
    feature_table: pd.DataFrame = field(default_factory=pd.DataFrame)  # indexed by scan (ids)
    records: dict[str, dict] = field(default_factory=dict)  # scan (ids) -> SpatialRecord JSON

    @classmethod
    def from_subjects(
        cls, subjects: list[PreparedSubject], config: PrepareConfig | None = None
    ) -> PreparedCohort:
        """A cohort of subjects preprocessed in memory (:func:`~.preprocess.preprocess_arrays`
        or :func:`~.preprocess.prepare_subject`); each needs a diagnosis ("NMOSD" or "MS")."""
        if not subjects:
            raise NmosdError("a cohort needs at least one subject")
        ids = [scan_key(s.row["participant_id"], s.row.get("session_id", "")) for s in subjects]
        if len(set(ids)) != len(ids):
            raise NmosdError("a participant (and session) is given twice")
        bad = sorted({str(s.row["diagnosis"]) for s in subjects} - set(LABELS))
        if bad:
            raise NmosdError(f"every subject needs a diagnosis NMOSD or MS, not {', '.join(bad)}")
        shapes = {s.array.shape for s in subjects}
        if len(shapes) != 1:
            raise NmosdError(f"the subjects were prepared at different sizes: {sorted(shapes)}")
        index = pd.DataFrame([s.row for s in subjects])
        if "session_id" in index and not index["session_id"].astype(bool).any():
            index = index.drop(columns="session_id")
        params = (config or PrepareConfig(size=next(iter(shapes))[0])).model_dump(mode="json")
        features = pd.DataFrame(
            [{"scan": k, **s.features} for k, s in zip(ids, subjects, strict=False)]
        )
        features = features.set_index("scan")
        h = hashlib.sha256(json.dumps(params, sort_keys=True).encode())
        for s in subjects:  # what a run is made from: parameters, IDs, labels and the volumes
            h.update(f"{scan_key(s.row['participant_id'], s.row.get('session_id', ''))}\t".encode())
            h.update(f"{s.row['diagnosis']}\n".encode())
            h.update(np.ascontiguousarray(s.array, dtype=np.float32).tobytes())
        digest = h.hexdigest()
        return cls(
            None,
            index,
            np.stack([s.array for s in subjects]).astype(np.float32),
            params,
            digest,
            features,
            {k: s.record.to_json() for k, s in zip(ids, subjects, strict=True)},
        )

    def subset(self, positions) -> PreparedCohort:
        """The rows at ``positions`` (in that order) as a cohort in memory (``path`` None).

        Its hash is that of this cohort and the chosen scans, so a bundle fitted on it records
        which part of which cohort it saw. All rows in their own order give this cohort back.
        """
        pos = [int(i) for i in positions]
        if not pos:
            raise NmosdError("a cohort needs at least one subject")
        if len(set(pos)) != len(pos) or min(pos) < 0 or max(pos) >= len(self.index):
            raise NmosdError(
                f"subset positions must be distinct and between 0 and {len(self.index) - 1}"
            )
        if pos == list(range(len(self.index))):
            return self
        ids = [self.ids[i] for i in pos]
        scans = "\n".join(ids)
        digest = hashlib.sha256(f"{self.cohort_hash}\n{scans}".encode()).hexdigest()
        return PreparedCohort(
            None,
            self.index.iloc[pos].reset_index(drop=True),
            self.volumes[pos],
            self.params,
            digest,
            self.feature_table.loc[ids] if len(self.feature_table) else self.feature_table,
            {k: self.records[k] for k in ids if k in self.records},
        )

    @property
    def ids(self) -> list[str]:
        """One unique name per row: the participant, or participant_session with sessions."""
        return [scan_key(p, s) for p, s in zip(self.participants, self.sessions, strict=True)]

    @property
    def participants(self) -> list[str]:
        """The person of each row (cross-validation never splits one person's sessions)."""
        return [str(p) for p in self.index["participant_id"]]

    @property
    def sessions(self) -> list[str]:
        """The session of each row ("" without sessions)."""
        if "session_id" not in self.index:
            return [""] * len(self.index)
        return [str(s) if isinstance(s, str) else "" for s in self.index["session_id"]]

    @property
    def has_sessions(self) -> bool:
        return any(self.sessions)

    @property
    def diagnoses(self) -> list[str]:
        return list(self.index["diagnosis"])

    @property
    def labels(self) -> np.ndarray:
        return np.array([LABELS.index(d) for d in self.diagnoses], dtype=np.int64)

    @property
    def counts(self) -> dict[str, int]:
        return {lab: int(sum(d == lab for d in self.diagnoses)) for lab in LABELS}

    @property
    def segmented_ids(self) -> list[str]:
        """Subjects whose lesion image was segmented here (``segment_missing``)."""
        if "lesion_source" not in self.index:
            return []
        segmented = (self.index["lesion_source"] == "segmented").to_numpy()
        return [k for k, seg in zip(self.ids, segmented, strict=True) if seg]

    @property
    def lesion_sources(self) -> dict[str, dict[str, int]]:
        """Per diagnosis, how many lesion images were given and how many segmented here."""
        segmented = set(self.segmented_ids)
        table = {lab: {"given": 0, "segmented": 0} for lab in LABELS}
        for pid, dx in zip(self.ids, self.diagnoses, strict=True):
            table[dx]["segmented" if pid in segmented else "given"] += 1
        return table

    @property
    def inputs(self) -> dict[str, list[str]]:
        """Who and what the cohort was made from, for leakage checks: ``participant_ids``
        (people, not scans) and ``input_sha256`` of the FLAIRs and lesion masks (a brain mask
        may be one template file that every subject of two cohorts shares)."""
        cols = [c for c in ("flair_sha256", "lesion_mask_sha256") if c in self.index]
        hashes = {str(v) for c in cols for v in self.index[c] if isinstance(v, str) and v}
        return {"participant_ids": sorted(set(self.participants)), "input_sha256": sorted(hashes)}

    def features(self) -> pd.DataFrame:
        """Lesion-load features, one row per subject in cohort order."""
        return self.feature_table.loc[self.ids]

    def spatial(self, pid: str) -> SpatialRecord:
        return SpatialRecord.from_json(self.records[pid])


def _load_array(path: Path, size: int, cache: Path) -> np.ndarray:
    """One cached volume, its header checked before any data are read."""
    try:
        arr = np.load(path, mmap_mode="r", allow_pickle=False)
        if arr.shape != (size,) * 3 or arr.dtype != np.float32:
            raise NmosdError(
                f"prepared cache {cache}: {path.name} holds {arr.dtype} {arr.shape}, not float32 "
                f"{(size,) * 3}; run nmosd-ms prepare again"
            )
        return arr  # header checked; the data are read once, when the cohort is stacked
    except NmosdError:
        raise
    except (OSError, ValueError) as exc:
        raise NmosdError(f"prepared cache {cache}: cannot read {path.name}: {exc}") from None


def load_prepared(cache_dir: str | Path) -> PreparedCohort:
    """Read the prepared cache ``cache_dir`` into memory: prepare.json and its table hashes
    checked, every ID validated, every array's header checked before it is read."""
    cache = Path(cache_dir)
    meta = cache / "prepare.json"
    if not meta.is_file():
        raise NmosdError(f"{cache} is not a prepared cache (no prepare.json; run nmosd-ms prepare)")
    info = read_json(meta, "prepare record")
    try:
        size = int(info["params"]["size"])
        cohort_hash = str(info["cohort_hash"])
        tables = info.get("tables") or {}
    except (KeyError, TypeError, ValueError):
        raise NmosdError(f"{meta} is incomplete or edited; run nmosd-ms prepare again") from None
    if not 8 <= size <= 512:
        raise NmosdError(f"{meta}: size {size} is outside 8..512; run nmosd-ms prepare again")
    for name, digest in tables.items():
        if name not in TABLES:
            continue
        if not (cache / name).is_file() or sha256_file(cache / name) != digest:
            raise NmosdError(
                f"prepared cache {cache} is inconsistent: {name} does not match prepare.json "
                "(an interrupted or concurrent prepare?); run nmosd-ms prepare again"
            )
    try:
        index = read_tsv(cache / "index.tsv", keep_empty=True)
        names = [str(n) for n in index["array"]]
        people = [str(i) for i in index["participant_id"]]
        sessions = [str(v) for v in index["session_id"]] if "session_id" in index else None
        ids = [scan_key(p, s) for p, s in zip(people, sessions or [""] * len(people), strict=False)]
        bad = sorted(set(index["diagnosis"]) - set(LABELS))
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as exc:
        raise NmosdError(f"prepared cache {cache}: cannot read index.tsv ({exc})") from None
    if bad:
        raise NmosdError(f"prepared cache {cache}: unknown diagnosis {', '.join(map(str, bad))}")
    for pid in ids:
        validate_participant_id(pid, f"{cache}/index.tsv")
    if len(set(ids)) != len(ids):
        raise NmosdError(f"prepared cache {cache}: index.tsv names a scan twice")
    vols = []
    for name in names:
        path = inside(cache, name)
        if not path.is_file():
            raise NmosdError(f"prepared cache {cache} is incomplete: {name} is missing")
        vols.append(_load_array(path, size, cache))
    try:
        features = read_tsv(cache / "features.tsv", keep_empty=True)
        sessions = features["session_id"] if "session_id" in features else [""] * len(features)
        features.index = [
            scan_key(p, s) for p, s in zip(features["participant_id"], sessions, strict=False)
        ]
        records = read_json(cache / "spatial.json", "spatial records")
        missing = sorted(set(ids) - set(features.index) | set(ids) - set(records))
    except (OSError, ValueError, KeyError, TypeError, pd.errors.ParserError) as exc:
        raise NmosdError(f"prepared cache {cache}: cannot read its tables ({exc})") from None
    if missing:
        raise NmosdError(f"prepared cache {cache}: no features or records for {missing[0]}")
    return PreparedCohort(
        cache, index, np.stack(vols), info["params"], cohort_hash, features, records
    )


class PreparedCache:
    """The prepared-cache folder at ``path``: :meth:`write` (``nmosd-ms prepare``) and
    :meth:`load`. The module functions :func:`prepare` and :func:`load_prepared` are the same."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def write(
        self,
        cohort: Cohort,
        config: PrepareConfig,
        workers: int = 1,
        progress: Progress | None = None,
    ) -> dict:
        return prepare(cohort, self.path, config, workers, progress)

    def load(self) -> PreparedCohort:
        return load_prepared(self.path)

    def exists(self) -> bool:
        return (self.path / "prepare.json").is_file()
