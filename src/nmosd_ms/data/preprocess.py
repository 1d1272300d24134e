"""Preprocessing of one subject, as in the paper: the lesion image becomes an S³ float32 volume.

Reorient to RAS, compute the crop kernel from the FLAIR's foreground (brain mask when given, else
Otsu + largest component; mask-only data use the brain or lesion mask), crop the lesion image with
the same box, resize to S³. :func:`preprocess_arrays` works on arrays in memory (no files);
:func:`prepare_subject` reads a subject's NIfTI files, checks them and calls it. Writing a cohort
of prepared subjects to disk is :mod:`.cache`'s job.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import nifti
from ..config import PrepareConfig
from ..derivatives import montage_path
from ..errors import NmosdError
from ..io import write_bytes
from ..spatial import SpatialRecord, crop_box, head_mask, resize, to_canonical
from .features import lesion_features
from .ingest import Subject, scan_key


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
        png = montage_path(path)
        write_bytes(png, self.segmentation_png)
        return png


def _normalise_flair(flair: np.ndarray, fg: np.ndarray | None) -> np.ndarray:
    values = flair[fg] if fg is not None and fg.any() else flair[flair > 0]
    scale = float(np.percentile(values, 99)) if values.size else 1.0
    return np.clip(flair / max(scale, 1e-6), 0.0, 2.0).astype(np.float32)


def prepare_subject(subject: Subject, config: PrepareConfig) -> PreparedSubject:
    """Load, validate and preprocess one subject's NIfTI files with ``config`` (see the module
    docstring and :func:`preprocess_arrays`)."""
    pid = subject.key  # names the scan in messages (participant, or participant_session)
    flair = nifti.load(subject.flair, f"{pid} FLAIR") if subject.flair else None
    lesion = nifti.load(subject.lesion_mask, f"{pid} lesion mask") if subject.lesion_mask else None
    brain = nifti.load(subject.brain_mask, f"{pid} brain mask") if subject.brain_mask else None
    ref, ref_what = (flair, "FLAIR") if flair is not None else (lesion, "lesion mask")
    if ref is None:
        raise NmosdError(f"participant {pid}: neither a FLAIR nor a lesion mask is given")
    for img, what in ((lesion, "lesion mask"), (brain, "brain mask")):
        if img is not None and img is not ref:
            nifti.check_same_grid(ref, img, f"{pid} {ref_what}", f"{pid} {what}")
    prep = _preprocess(
        subject.participant_id,
        subject.session_id,
        subject.diagnosis,
        ref.affine,
        None if lesion is None else lesion.data,
        None if flair is None else flair.data,
        None if brain is None else brain.data,
        config,
        flair.zooms if flair is not None else None,
    )
    prep.row.update(
        flair=str(subject.flair or ""),
        lesion_mask=str(subject.lesion_mask or ""),
        brain_mask=str(subject.brain_mask or ""),
    )
    return prep


def preprocess_arrays(
    affine: np.ndarray,
    lesion: np.ndarray | None = None,
    flair: np.ndarray | None = None,
    brain: np.ndarray | None = None,
    config: PrepareConfig | None = None,
    participant_id: str = "subject",
    diagnosis: str = "",
    session_id: str = "",
) -> PreparedSubject:
    """Preprocess one subject given as arrays on one voxel grid (no files are read or written).

    Parameters
    ----------
    affine : array of shape (4, 4)
        Voxel-to-world (RAS mm) matrix of the grid, as a NIfTI's ``affine``.
    lesion : array of shape (X, Y, Z), optional
        Lesion mask (non-zero = lesion). Without it, ``config.segment_missing`` must be set and
        ``flair`` given: the white-matter hyperintensities are segmented from the FLAIR.
    flair : array of shape (X, Y, Z), optional
        FLAIR intensities; its foreground gives the crop box when ``brain`` is not given.
    brain : array of shape (X, Y, Z), optional
        Brain mask (non-zero = brain): the crop box.
    config : PrepareConfig, optional
        Output size, input kind and interpolation (default: the paper's, 100³ lesion masks).
    participant_id : str
        Validated as every participant ID (it names files later).
    diagnosis : str
        "NMOSD", "MS", or "" (unknown, for prediction).
    session_id : str
        "" or a BIDS session label (``ses-<label>``) when a participant has several scans.

    Returns
    -------
    PreparedSubject
        ``array`` (S, S, S) float32 in canonical RAS axes, ``features`` (lesion load), ``record``
        (crop box and source grid, to map results back) and ``row`` (what the cache indexes).
    """
    pid = Subject(participant_id, diagnosis, None, None, session_id=session_id).participant_id
    affine = np.asarray(affine, dtype=np.float64)
    if affine.shape != (4, 4) or not np.isfinite(affine).all():
        raise NmosdError(f"participant {pid}: the affine must be a finite 4x4 matrix")
    if abs(np.linalg.det(affine[:3, :3])) < 1e-12:
        raise NmosdError(f"participant {pid}: the affine is singular")
    given = {
        k: v for k, v in (("lesion", lesion), ("flair", flair), ("brain", brain)) if v is not None
    }
    if not given:
        raise NmosdError(f"participant {pid}: neither a FLAIR nor a lesion mask is given")
    arrays = {k: np.asarray(v) for k, v in given.items()}
    shapes = {k: v.shape for k, v in arrays.items()}
    if any(len(sh) != 3 for sh in shapes.values()) or len(set(shapes.values())) != 1:
        raise NmosdError(f"participant {pid}: the arrays must be 3D and on one grid ({shapes})")
    zooms = np.sqrt((affine[:3, :3] ** 2).sum(axis=0))
    return _preprocess(
        pid,
        session_id,
        diagnosis,
        affine,
        arrays.get("lesion"),
        arrays.get("flair"),
        arrays.get("brain"),
        config or PrepareConfig(),
        zooms,
    )


def _preprocess(pid, session, diagnosis, affine, lesion, flair, brain, config, flair_zooms):
    """The transform itself, on arrays that share one grid and ``affine``."""
    key = scan_key(pid, session)
    if config.input in ("flair", "lesion-flair") and flair is None:
        raise NmosdError(f"participant {pid}: input '{config.input}' needs a FLAIR image")
    ref = flair if flair is not None else lesion
    voxel_ml = float(np.prod(np.sqrt((affine[:3, :3] ** 2).sum(axis=0)))) / 1000.0
    lesion_source = "given"
    bits = png = None
    if lesion is None:
        if not config.segment_missing or flair is None:
            raise NmosdError(f"participant {pid}: no lesion mask (segment_missing needs a FLAIR)")
        from ..segment import SegmentConfig, segment_wmh

        seg = segment_wmh(
            flair,
            flair_zooms,
            brain > 0 if brain is not None else None,
            SegmentConfig(drop_symmetric=config.segment_drop_symmetric),
        )
        lesion = seg.astype(np.float32)
        lesion_source = "segmented"
        bits = np.packbits(seg)  # on the FLAIR's grid

    lesion_c, canon_affine = to_canonical(lesion, affine)
    lesion_c = lesion_c > 0
    flair_c = to_canonical(flair, affine)[0] if flair is not None else None
    brain_c = to_canonical(brain, affine)[0] > 0 if brain is not None else None

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
        source_shape=tuple(int(n) for n in ref.shape),
        source_affine=tuple(tuple(float(v) for v in r) for r in affine),
        box_lo=lo,
        box_hi=hi,
        size=(config.size,) * 3,
    )
    if bits is not None:
        from ..viz import wmh_montage_png

        png = wmh_montage_png(key, flair_c, lesion_c, voxel_ml)
    zooms = np.sqrt((canon_affine[:3, :3] ** 2).sum(axis=0))
    feats = lesion_features(  # min_lesion_voxels (old records) replaces min_lesion_mm3 if set
        lesion_c, zooms, lo, hi, config.min_lesion_voxels, config.min_lesion_mm3
    )
    src_lo, src_hi = record.source_box()
    row = {
        "participant_id": pid,
        **({"session_id": session} if session else {}),
        "diagnosis": diagnosis,
        "array": f"{key}.npy",
        "crop_box": ",".join(f"{a}:{b}" for a, b in zip(src_lo, src_hi, strict=True)),
        "crop_from": crop_from,
        "lesion_source": lesion_source,
        "lesion_voxels": int(lesion_c.sum()),
        "lesion_ml": float(lesion_c.sum()) * voxel_ml,
        "flair": "",
        "lesion_mask": "",
        "brain_mask": "",
    }
    return PreparedSubject(array, row, feats, record, bits, png)
