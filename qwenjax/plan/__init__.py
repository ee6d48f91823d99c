"""Plan before paying: compile an experiment's real programs for a Cloud TPU slice on any
machine (libtpu's compile-only devices, no TPU needed) and report whether they fit, what they
communicate, which kernels they use and a roofline step-time estimate (`qwenjax plan`).

    chips.py     slice names -> topologies, the per-chip figures, compile-only devices
    build.py     abstract sharded train state / batch / cache; lower the step, prefill, decode
    hlo.py       collectives (loop trip counts included), custom calls, largest buffers
    estimate.py  model FLOPs per step and the roofline
    run.py       the report, the batch search, the table, the output directory
"""

from qwenjax.plan.chips import CHIPS, PlanError, Slice, parse_slice
from qwenjax.plan.run import does_not_fit_line, format_table, plan

__all__ = ["CHIPS", "PlanError", "Slice", "does_not_fit_line", "format_table", "parse_slice",
           "plan"]
