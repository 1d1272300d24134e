"""nmosd-ms: tell NMOSD from MS on 3D T2-FLAIR white-matter-lesion maps."""

__version__ = "0.1.0"

#: Class labels. NMOSD is the positive class (label 1) everywhere in the toolkit.
LABELS = ("MS", "NMOSD")
POSITIVE = "NMOSD"
