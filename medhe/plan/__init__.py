"""The plan format: the contract between the compiler (which writes it) and the runtime and
protocol (which read it). Needs numpy only: no torch, no compiler passes, no FHE library.

- `ClientSpec`: the public half a clinic loads (no weight in any encoding).
- `Plan`: the latency-mode server plan (slot instructions with weights).
- `BatchPlan`: the throughput-mode server plan.
"""

from medhe.plan.batch_plan import BatchPlan, BatchStep, load_plan_dir
from medhe.plan.client_spec import SPEC_FILE, ClientSpec
from medhe.plan.instructions import (INSTRUCTION_KINDS, AddPlain, Branch, Instruction, Linear, RotSum, SquareOp,
                                     member_segments, rescale_factors)
from medhe.plan.layout import Layout, signed_step
from medhe.plan.server_plan import Plan

__all__ = ["INSTRUCTION_KINDS", "SPEC_FILE", "AddPlain", "BatchPlan", "Branch", "BatchStep", "ClientSpec", "Instruction",
           "Layout", "Linear", "Plan", "RotSum", "SquareOp", "load_plan_dir", "member_segments", "rescale_factors",
           "signed_step"]
