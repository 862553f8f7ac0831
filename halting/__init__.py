"""Token halting across blocks and timesteps (A-SSA). Model-agnostic: imports nothing of the
project; a model opts in by implementing :class:`HaltableModel`."""
from .plugin import (DEFAULT_EXECUTION, Halted, HaltingConfig, HaltingConfigError,
                     HaltingResult, run_halting)
from .protocol import HaltableBlock, HaltableModel, HaltingDefaults, run_stepwise

__all__ = ["HaltableBlock", "HaltableModel", "HaltingDefaults", "run_stepwise",
           "HaltingConfig", "HaltingConfigError", "HaltingResult", "Halted", "run_halting",
           "DEFAULT_EXECUTION"]
