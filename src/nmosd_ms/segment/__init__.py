"""Open white-matter-hyperintensity (WMH) segmentation from FLAIR."""

from .wmh import WMHParams, brain_mask_from_flair, segment_wmh

__all__ = ["WMHParams", "brain_mask_from_flair", "segment_wmh"]
