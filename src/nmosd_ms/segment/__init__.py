"""Open white-matter-hyperintensity (WMH) segmentation from FLAIR."""

from ..config import SegmentConfig
from .files import SegmentResult, segment_file
from .wmh import brain_mask_from_flair, segment_wmh

__all__ = ["SegmentConfig", "SegmentResult", "brain_mask_from_flair", "segment_file", "segment_wmh"]
