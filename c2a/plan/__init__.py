"""Will a run fit, and how long will it take: `python -m c2a.plan --config FILE.toml --gpus N`.

`memory` holds the per-rank memory model (checked against torch's FSDPMemTracker in tests/test_plan.py);
`cli` resolves a training config into a workload, searches the settings that fit, and times the run.
"""

from c2a.plan.memory import MemoryPlan, Workload, plan_memory

__all__ = ["MemoryPlan", "Workload", "plan_memory"]
