"""Local and global group fairness: information-theoretic disparities, their partial information
decomposition, and the accuracy / fairness frontier (AGLFOP)."""

from fedsim.fairness.aglfop import aglfop, aglfop_frontier, aglfop_predictor
from fedsim.fairness.pid import mutual_information, pid_decomposition

__all__ = ["aglfop", "aglfop_frontier", "aglfop_predictor", "mutual_information", "pid_decomposition"]
