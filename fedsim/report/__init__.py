"""The comparison report: stored runs in, one offline HTML file (and its table as CSV) out."""

from fedsim.report.page import build_report
from fedsim.report.runs import collect_runs

__all__ = ["build_report", "collect_runs"]
