"""Token halting across blocks and timesteps (A-SSA). Model-agnostic: imports nothing of the
project; a model opts in by implementing :class:`HaltableModel`."""
from .plugin import Halted, HaltingConfig, HaltingConfigError, HaltingResult, run_halting
from .protocol import HaltableBlock, HaltableModel, run_stepwise

__all__ = ["HaltableBlock", "HaltableModel", "run_stepwise", "HaltingConfig",
           "HaltingConfigError", "HaltingResult", "Halted", "run_halting"]
