"""Report: the paper's Table 2, Table 3 and Figure 4, ROC curves, per-subject plots, one HTML page."""

from .build import build_report, report_status

__all__ = ["build_report", "report_status"]
