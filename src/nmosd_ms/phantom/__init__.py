"""Synthetic NMOSD/MS cohorts grounded in published neuroradiology (see README, Phantom)."""

from .anatomy import Anatomy, load_anatomy
from .generate import DIFFICULTIES, generate_cohort
from .lesions import paint, sample_lesion_map, sample_lesions

__all__ = [
    "DIFFICULTIES",
    "Anatomy",
    "generate_cohort",
    "load_anatomy",
    "paint",
    "sample_lesion_map",
    "sample_lesions",
]
