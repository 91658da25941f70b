"""Pipeline schedules as data: compute orders (``orders``), their lowering to per-stage programs
with communication (``lowering``), the simulator that checks and times them (``simulator``), and
their DeepSpeed instructions (``instructions``)."""
from .actions import Action
from .lowering import lower, lower_orders
from .orders import SCHEDULES, Schedule, get_schedule
from .simulator import Costs, ScheduleError, Segment, SimResult, simulate, token_costs

__all__ = ["Action", "Costs", "SCHEDULES", "Schedule", "ScheduleError", "Segment", "SimResult", "get_schedule",
           "lower", "lower_orders", "simulate", "token_costs"]
