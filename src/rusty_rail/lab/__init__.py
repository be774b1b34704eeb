"""The lab: the original's four test topologies (and a fifth with three servers) in network namespaces,
with real TCP and GRE endpoints."""

from .lab import Lab
from .topology import TOPOLOGIES, Host, Plan, plan

__all__ = ["TOPOLOGIES", "Host", "Lab", "Plan", "plan"]
