"""Slice planner: profile a stage, fit TeraPipe's latency model, solve for the best slicing, keep
plans in a plan file, and show a plan's pipeline timeline."""
from .fit import FitReport, LatencyModel, fit_profile
from .plan_file import PlanEntry, PlanFileError, find_plan, read_plans, write_plan
from .solve import Plan, solve
from .timeline import predict

__all__ = ["FitReport", "LatencyModel", "fit_profile", "PlanEntry", "PlanFileError", "find_plan", "read_plans",
           "write_plan", "Plan", "solve", "predict"]
