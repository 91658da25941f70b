"""Slice planner: profile a stage, fit TeraPipe's latency model, solve for the best slicing, keep
plans in a plan file, and price and show a plan's pipeline timeline (one cost model, ``costs``)."""
from .costs import Candidate, CostModel
from .fit import FitReport, LatencyModel, fit_profile
from .plan_file import PlanEntry, PlanFileError, find_plan, read_plans, write_plan
from .solve import Plan, solve

__all__ = ["Candidate", "CostModel", "FitReport", "LatencyModel", "fit_profile", "PlanEntry", "PlanFileError",
           "find_plan", "read_plans", "write_plan", "Plan", "solve"]
