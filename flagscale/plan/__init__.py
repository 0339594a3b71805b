"""Memory planning: which tensor/pipeline/data-parallel layouts of a model fit on N GPUs."""

from flagscale.plan.memory import (DEVICE_MEMORY_GIB, FRAGMENTATION, RESERVED_GIB, MemoryEstimate,
                                   estimate_memory, usable_gib)
from flagscale.plan.planner import (TP_SIZES, LayoutPlan, Plan, configured_layout, format_plan,
                                    plan_for, plan_layouts, require_fit)

__all__ = ["DEVICE_MEMORY_GIB", "FRAGMENTATION", "RESERVED_GIB", "TP_SIZES", "LayoutPlan",
           "MemoryEstimate", "Plan", "configured_layout", "estimate_memory", "format_plan",
           "plan_for", "plan_layouts", "require_fit", "usable_gib"]
