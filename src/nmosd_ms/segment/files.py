"""The ``segment`` step on files: read a FLAIR (and brain mask), segment, write the mask and an
optional review montage. Nothing is written before every input is checked, and no output file
is ever overwritten."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .. import nifti
from ..config import SegmentConfig
from ..derivatives import DerivativeDataset, montage_path, wmh_sidecar
from ..errors import NmosdError
from ..ids import ids_in_bids_name, validate_participant_id, validate_session_id
from ..io import write_bytes
from ..locking import writing_folder
from .wmh import segment_wmh

NIFTI = (".nii", ".nii.gz")


@dataclass(frozen=True)
class SegmentResult:
    """What :func:`segment_file` wrote: the mask's path, voxels and volume, the montage's path."""

    mask_path: Path
    voxels: int
    volume_ml: float
    qc_path: Path | None = None


def segment_file(
    flair: str | Path,
    out: str | Path,
    brain_mask: str | Path | None = None,
    config: SegmentConfig | None = None,
    skull_stripped: bool = False,
    qc: str | Path | None = None,
    participant_id: str | None = None,
    session_id: str = "",
) -> SegmentResult:
    """Segment the white-matter hyperintensities of one FLAIR NIfTI.

    Parameters
    ----------
    flair : path
        The FLAIR (3D NIfTI).
    out : path
        The mask to write (``.nii.gz``), on the FLAIR's grid and affine; it must not exist. A
        path without a NIfTI suffix is a folder: a BIDS derivative dataset
        (:mod:`nmosd_ms.derivatives`) receives
        ``sub-X[/ses-Y]/anat/sub-X[_ses-Y]_space-orig_label-WMH_mask.nii.gz``, its sidecar and a
        review montage.
    brain_mask : path, optional
        A brain mask on the FLAIR's grid (recommended); without it the brain is found by Otsu's
        threshold and a 6 mm erosion, or, with ``skull_stripped``, is the FLAIR's non-zero voxels.
    config : SegmentConfig, optional
        The method's thresholds (default: :class:`~nmosd_ms.config.SegmentConfig`).
    qc : path, optional
        A new ``.png``: axial slices holding lesions with the mask outlined, for review.
    participant_id, session_id : str, optional
        Dataset output only: the participant (and session) the mask is named for; by default
        read from the FLAIR's BIDS name (``sub-01_ses-02_FLAIR.nii.gz``).
    """
    out, qc = Path(out), None if qc is None else Path(qc)
    if not out.name.endswith(NIFTI):  # a folder: a BIDS derivative dataset
        return _segment_into_dataset(
            Path(flair), out, brain_mask, config, skull_stripped, participant_id, session_id
        )
    if out.exists():
        raise NmosdError(f"the output {out} exists; it is never overwritten", option="out")
    if qc is not None and (qc.exists() or qc.suffix.lower() != ".png"):
        raise NmosdError(
            f"the review image {qc}: give a new .png path (never overwritten)", option="qc"
        )
    img = nifti.load(flair, "FLAIR")
    brain = None
    if brain_mask is not None:
        b = nifti.load(brain_mask, "brain mask")
        nifti.check_same_grid(img, b, "FLAIR", "brain mask")
        brain = b.data > 0
    elif skull_stripped:
        brain = img.data > 0
    mask = segment_wmh(img.data, img.zooms, brain, config or SegmentConfig())
    nifti.save(out, mask.astype(np.uint8), img.affine)
    if qc is not None:
        from ..spatial import to_canonical
        from ..viz import wmh_montage_png

        flair_c = to_canonical(img.data, img.affine)[0]
        mask_c = to_canonical(mask, img.affine)[0]
        write_bytes(qc, wmh_montage_png(Path(flair).name, flair_c, mask_c, img.voxel_ml))
    voxels = int(mask.sum())
    return SegmentResult(out, voxels, voxels * img.voxel_ml, qc)


def _segment_into_dataset(flair, root, brain_mask, config, skull_stripped, pid, ses):
    name = flair.name
    if pid is None:
        found = ids_in_bids_name(name)
        if found is None:
            raise NmosdError(
                f"{name} is not named as BIDS (sub-<label>_...): give the participant's ID",
                option="participant_id",
            )
        pid, named_session = found
        ses = ses or named_session
    validate_session_id(ses, validate_participant_id(pid))
    dataset = DerivativeDataset(root, "nmosd-ms WMH segmentations", "nmosd-ms segment")
    mask = dataset.path(pid, ses, "mask", space="orig", label="WMH")
    if mask.exists():
        raise NmosdError(f"{mask} exists; it is never overwritten", option="out")
    with writing_folder(root, "segmentation dataset"):
        dataset.start()
        png = montage_path(mask)
        mask.parent.mkdir(parents=True, exist_ok=True)
        result = segment_file(flair, mask, brain_mask, config, skull_stripped, png)
        dataset.sidecar(mask, wmh_sidecar(flair, f"nmosd-ms segment {_options(config)}"))
        written = sorted(
            {p.name.split("_")[0] for p in root.glob("sub-*/**/*_mask.nii.gz")}
            | {f"sub-{dataset.label(pid)}"}
        )
        dataset.write_participants(written)
    return result


def _options(config: SegmentConfig | None) -> str:
    cfg = (config or SegmentConfig()).model_dump()
    return ", ".join(f"{k}={v}" for k, v in cfg.items())
