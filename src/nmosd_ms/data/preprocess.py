"""``prepare``: a cohort of NIfTI scans becomes a cache of S³ float32 volumes.

Per subject, as in the paper: reorient to RAS, compute the crop kernel from the FLAIR's foreground
(brain mask when given, else Otsu + largest component; mask-only data use the brain or lesion
mask), crop the lesion image with the same box, resize to S³. Every subject is computed before
anything is written, so a bad subject leaves the cache untouched.

Cache layout::

    CACHE_DIR/arrays/<id>.<key>.npy   float32 (S, S, S), canonical RAS axes
    CACHE_DIR/arrays/<id>.<key>.json  that subject's index row, features and SpatialRecord
    CACHE_DIR/segmentations/<id>.<key>_wmh.nii.gz   the WMH mask of a subject segmented here
                              (--segment-missing), on the FLAIR's grid, and ``.png``, a montage
                              of it for review
    CACHE_DIR/index.tsv       one row per subject (paths, sha256, crop box in source voxels)
    CACHE_DIR/features.tsv    lesion-load features (nmosd_ms.data.features)
    CACHE_DIR/spatial.json    per-subject SpatialRecord for the inverse map
    CACHE_DIR/prepare.json    parameters, versions, cohort hash and the sha256 of the three
                              tables above: written last, it is the commit of a prepare run

``<key>`` is a hash of the preprocessing parameters and of the subject's input files, so a file
is never overwritten by one made differently: a prepare killed at any moment leaves the last
committed cache intact (its tables still name the old files), and a re-run reuses exactly the
subjects whose key still matches. A second prepare on the same folder is refused while one runs.
"""

from __future__ import annotations

import contextlib
import datetime as _dt
import json
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pandas as pd

from .. import LABELS, __version__
from ..config import PrepareConfig
from ..errors import NmosdError
from ..io import (
    inside,
    read_json,
    read_tsv,
    save_npy,
    sha256_file,
    sha256_text,
    write_bytes,
    write_json,
    write_tsv,
)
from ..locking import check_own_folder, writing_folder
from . import nifti
from .features import FEATURES, lesion_features
from .ingest import Cohort, Subject
from .spatial import SpatialRecord, crop_box, head_mask, resize, to_canonical

Progress = Callable[[int, int], None]


@dataclass
class PreparedSubject:
    array: np.ndarray
    row: dict
    features: dict
    record: SpatialRecord
    segmentation_bits: np.ndarray | None = None  # WMH mask made here, 1 bit per voxel
    segmentation_png: bytes | None = None  # its review montage (axial slices, outline)

    @property
    def segmentation(self) -> np.ndarray | None:
        """The WMH mask made for this subject (``--segment-missing``), on its FLAIR's grid."""
        if self.segmentation_bits is None:
            return None
        shape = self.record.source_shape
        bits = np.unpackbits(self.segmentation_bits, count=int(np.prod(shape)))
        return bits.reshape(shape).astype(bool)

    def save_segmentation(self, path: Path) -> Path:
        """Write the WMH mask made for this subject, on its FLAIR's grid and affine, and its
        review montage beside it (same name, ``.png``); returns the PNG's path."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        nifti.save(path, self.segmentation.astype(np.uint8), self.record.affine)
        png = _montage_path(path)
        write_bytes(png, self.segmentation_png)
        return png


def _montage_path(mask_path: Path) -> Path:
    """``<id>_wmh.png`` beside ``<id>_wmh.nii.gz``."""
    return mask_path.with_name(mask_path.name.removesuffix(".gz").removesuffix(".nii") + ".png")


def _normalise_flair(flair: np.ndarray, fg: np.ndarray | None) -> np.ndarray:
    values = flair[fg] if fg is not None and fg.any() else flair[flair > 0]
    scale = float(np.percentile(values, 99)) if values.size else 1.0
    return np.clip(flair / max(scale, 1e-6), 0.0, 2.0).astype(np.float32)


def prepare_subject(subject: Subject, config: PrepareConfig) -> PreparedSubject:
    """Load, validate and preprocess one subject (see the module docstring)."""
    pid = subject.participant_id
    flair = nifti.load(subject.flair, f"{pid} FLAIR") if subject.flair else None
    lesion = nifti.load(subject.lesion_mask, f"{pid} lesion mask") if subject.lesion_mask else None
    brain = nifti.load(subject.brain_mask, f"{pid} brain mask") if subject.brain_mask else None
    ref, ref_what = (flair, "FLAIR") if flair is not None else (lesion, "lesion mask")
    if ref is None:
        raise NmosdError(f"participant {pid}: neither a FLAIR nor a lesion mask is given")
    for img, what in ((lesion, "lesion mask"), (brain, "brain mask")):
        if img is not None and img is not ref:
            nifti.check_same_grid(ref, img, f"{pid} {ref_what}", f"{pid} {what}")
    if config.input in ("flair", "lesion-flair") and flair is None:
        raise NmosdError(f"participant {pid}: --input {config.input} needs a FLAIR image")

    lesion_source = "given"
    if lesion is None:
        if not config.segment_missing or flair is None:
            raise NmosdError(
                f"participant {pid}: no lesion mask (use --segment-missing with a FLAIR)"
            )
        from ..segment import WMHParams, segment_wmh

        seg = segment_wmh(
            flair.data,
            flair.zooms,
            brain.data > 0 if brain is not None else None,
            WMHParams(drop_symmetric=config.segment_drop_symmetric),
        )
        lesion = nifti.Image(seg.astype(np.float32), flair.affine, None)
        lesion_source = "segmented"
    bits = png = None
    if lesion_source == "segmented":
        bits = np.packbits(seg)  # on the FLAIR's grid

    affine = ref.affine
    lesion_c, canon_affine = to_canonical(lesion.data, affine)
    lesion_c = lesion_c > 0
    flair_c = to_canonical(flair.data, affine)[0] if flair is not None else None
    brain_c = to_canonical(brain.data, affine)[0] > 0 if brain is not None else None

    if brain_c is not None:
        fg, stride, crop_from = brain_c, 1, "brain-mask"
    elif flair_c is not None:
        (fg, stride), crop_from = head_mask(flair_c), "flair-otsu"
    else:
        fg, stride, crop_from = lesion_c, 1, "lesion-mask"
    lo, hi = crop_box(fg, stride, lesion_c.shape)
    box = tuple(slice(a, b) for a, b in zip(lo, hi, strict=True))

    if config.input == "lesion-mask":
        image = lesion_c[box].astype(np.float32)
    else:
        norm = _normalise_flair(flair_c[box], brain_c[box] if brain_c is not None else None)
        image = norm * lesion_c[box] if config.input == "lesion-flair" else norm
    array = resize(image, config.size, config.interpolation).astype(np.float32)

    record = SpatialRecord(
        source_shape=ref.shape,
        source_affine=tuple(tuple(float(v) for v in r) for r in affine),
        box_lo=lo,
        box_hi=hi,
        size=(config.size,) * 3,
    )
    if bits is not None:
        from ..viz import wmh_montage_png

        png = wmh_montage_png(pid, flair_c, lesion_c, ref.voxel_ml)
    zooms = np.sqrt((canon_affine[:3, :3] ** 2).sum(axis=0))
    feats = lesion_features(lesion_c, zooms, lo, hi, config.min_lesion_voxels)
    src_lo, src_hi = record.source_box()
    row = {
        "participant_id": pid,
        "diagnosis": subject.diagnosis,
        "array": f"{pid}.npy",
        "crop_box": ",".join(f"{a}:{b}" for a, b in zip(src_lo, src_hi, strict=True)),
        "crop_from": crop_from,
        "lesion_source": lesion_source,
        "lesion_voxels": int(lesion_c.sum()),
        "lesion_ml": float(lesion_c.sum()) * ref.voxel_ml,
        "flair": str(subject.flair or ""),
        "lesion_mask": str(subject.lesion_mask or ""),
        "brain_mask": str(subject.brain_mask or ""),
    }
    return PreparedSubject(array, row, feats, record, bits, png)


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
    """Prepare ``cohort`` into ``out_dir``; reuse subjects whose inputs and parameters are unchanged.

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
            previous = {r["participant_id"]: r for r in idx.to_dict("records")}

    hashes = {s.participant_id: _source_hashes(s) for s in cohort.subjects}
    keys = {pid: _subject_key(params, h) for pid, h in hashes.items()}
    todo, reused = [], {}
    for s in cohort.subjects:
        rec = _reusable(out, s.participant_id, keys[s.participant_id])
        if rec is not None:
            reused[s.participant_id] = rec
        else:
            todo.append(s)

    results: dict[str, PreparedSubject] = {}
    done = len(reused)
    if progress:
        progress(done, len(cohort))

    def work(s: Subject) -> tuple[str, PreparedSubject]:
        return s.participant_id, prepare_subject(s, config)

    # Threads suffice: gzip, numpy and torch release the GIL. One worker runs in order.
    with ThreadPoolExecutor(max_workers=max(1, workers)) as pool:
        for pid, res in pool.map(work, todo):
            results[pid] = res
            done += 1
            if progress:
                progress(done, len(cohort))

    # Everything validated and computed: now write, new files under new names only.
    rows, feature_rows, records = [], [], {}
    for s in cohort.subjects:
        pid, key = s.participant_id, keys[s.participant_id]
        if pid in results:
            r = results[pid]
            array = f"arrays/{pid}.{key}.npy"
            save_npy(inside(out, array), r.array)
            seg_file = ""
            if r.segmentation_bits is not None:
                seg_file = f"segmentations/{pid}.{key}_wmh.nii.gz"
                r.save_segmentation(inside(out, seg_file))
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
                "participant_id": pid,
                "diagnosis": s.diagnosis,
                **{k: rec["features"][k] for k in FEATURES},
            }
        )
        records[pid] = rec["record"]
    index = pd.DataFrame(rows)
    features = pd.DataFrame(feature_rows, columns=["participant_id", "diagnosis", *FEATURES])
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


def _remove_unreferenced(out: Path, index: pd.DataFrame, previous: dict[str, dict]) -> None:
    """Files of earlier prepare runs that the committed index no longer names."""
    keep = set(index["array"]) | {a.removesuffix(".npy") + ".json" for a in index["array"]}
    for seg in index["segmentation"]:
        if seg:
            keep |= {seg, _montage_path(Path(seg)).as_posix()}
    stale = [
        p.relative_to(out).as_posix()
        for d in ("arrays", "segmentations")
        if (out / d).is_dir()
        for p in (out / d).iterdir()
    ]
    for row in previous.values():  # caches written before arrays/ existed
        stale += [v for k in ("array", "segmentation") if isinstance(v := row.get(k), str) and v]
        if isinstance(seg := row.get("segmentation"), str) and seg:
            stale.append(_montage_path(Path(seg)).as_posix())
    for rel in set(stale) - keep:
        with contextlib.suppress(NmosdError, OSError):
            inside(out, rel).unlink(missing_ok=True)


@dataclass
class PreparedCohort:
    """A prepared cache loaded in memory (the whole cohort is small)."""

    path: Path
    index: pd.DataFrame
    volumes: np.ndarray  # (N, S, S, S) float32
    params: dict
    cohort_hash: str

    @property
    def ids(self) -> list[str]:
        return list(self.index["participant_id"])

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
        """Subjects whose lesion image was segmented here (``--segment-missing``)."""
        if "lesion_source" not in self.index:
            return []
        return list(self.index.loc[self.index["lesion_source"] == "segmented", "participant_id"])

    @property
    def lesion_sources(self) -> dict[str, dict[str, int]]:
        """Per diagnosis, how many lesion images were given and how many segmented here."""
        segmented = set(self.segmented_ids)
        table = {lab: {"given": 0, "segmented": 0} for lab in LABELS}
        for pid, dx in zip(self.ids, self.diagnoses, strict=True):
            table[dx]["segmented" if pid in segmented else "given"] += 1
        return table

    def features(self) -> pd.DataFrame:
        feats = read_tsv(self.path / "features.tsv").set_index("participant_id")
        return feats.loc[self.ids]

    def spatial(self, pid: str) -> SpatialRecord:
        return SpatialRecord.from_json(read_json(self.path / "spatial.json")[pid])


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
        ids = [str(i) for i in index["participant_id"]]
        bad = sorted(set(index["diagnosis"]) - set(LABELS))
    except (OSError, ValueError, KeyError, pd.errors.ParserError) as exc:
        raise NmosdError(f"prepared cache {cache}: cannot read index.tsv ({exc})") from None
    if bad:
        raise NmosdError(f"prepared cache {cache}: unknown diagnosis {', '.join(map(str, bad))}")
    from .ingest import validate_participant_id

    for pid in ids:
        validate_participant_id(pid, f"{cache}/index.tsv")
    vols = []
    for name in names:
        path = inside(cache, name)
        if not path.is_file():
            raise NmosdError(f"prepared cache {cache} is incomplete: {name} is missing")
        vols.append(_load_array(path, size, cache))
    return PreparedCohort(cache, index, np.stack(vols), info["params"], cohort_hash)
