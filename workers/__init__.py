"""Ray worker actors, one per tensor-parallel rank, and the group that drives them."""

from workers.group import PlacementStrategy, WorkerGroup, WorkerGroupError
from workers.group_engine import GroupEngine

__all__ = ["GroupEngine", "PlacementStrategy", "WorkerGroup", "WorkerGroupError"]
