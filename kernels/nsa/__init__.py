"""Native sparse attention (NSA) branches: naive reference and a gather path linear in S."""

from longshard.kernels.nsa.gather import nsa_branches_gather
from longshard.kernels.nsa.naive import nsa_branches_naive
from longshard.kernels.nsa.select import NSAGeometry, select_blocks

__all__ = ["NSAGeometry", "nsa_branches_gather", "nsa_branches_naive", "select_blocks"]
