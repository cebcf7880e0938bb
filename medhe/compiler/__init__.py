"""Compiler: trace a trained model -> depth-optimisation passes -> CKKS parameters -> plan."""

from medhe.compiler.compile import compile_model, compile_ops, format_report
from medhe.plan import Plan

__all__ = ["Plan", "compile_model", "compile_ops", "format_report"]
