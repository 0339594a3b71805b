"""Memory planning: which tensor/pipeline/data-parallel layouts of a model fit on N GPUs."""

from flagscale.plan.memory import (DEVICE_MEMORY_GIB, FRAGMENTATION, RESERVED_GIB, MemoryEstimate,
                                   estimate_memory, usable_gib)
from flagscale.plan.planner import (TP_SIZES, LayoutPlan, Plan, format_plan, plan_for,
                                    plan_layouts)

__all__ = ["DEVICE_MEMORY_GIB", "FRAGMENTATION", "RESERVED_GIB", "TP_SIZES", "LayoutPlan",
           "MemoryEstimate", "Plan", "estimate_memory", "format_plan", "plan_for", "plan_layouts",
           "usable_gib"]
