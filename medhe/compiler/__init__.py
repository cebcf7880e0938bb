"""Compiler: trace a trained model -> depth-optimisation passes -> CKKS parameters -> plan."""

from medhe.compiler.compile import compile_ensemble, compile_model, compile_ops, join_plans
from medhe.plan import Plan
from medhe.plan.report import format_report

__all__ = ["Plan", "compile_ensemble", "compile_model", "compile_ops", "format_report", "join_plans"]
