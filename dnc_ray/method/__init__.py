"""The method, defined once: strategies as short sequences of model steps over a row (see strategies.py).

Every runtime (the Ray Data stage, the Serve ingress, the benchmarks) runs a strategy through
`run_row(strategy, row, models, options)`; only the `Model`s it passes differ.
"""

from dnc_ray.method.run import MethodOptions, Model, Step, StepFailed, Strategy, run_row
from dnc_ray.method.strategies import STRATEGIES

__all__ = ["STRATEGIES", "MethodOptions", "Model", "Step", "StepFailed", "Strategy", "run_row"]
