"""Constants every step shares; this module imports nothing, so any module may import it."""

__version__ = "0.1.0"

#: Class labels: index 0 = MS, index 1 = NMOSD. NMOSD is the positive class everywhere.
LABELS = ("MS", "NMOSD")
POSITIVE = "NMOSD"
#: P(NMOSD) at or above which a subject is called NMOSD (every table, bundle and prediction).
THRESHOLD = 0.5
