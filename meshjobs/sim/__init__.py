"""Adversary simulation against the real runtime: ``meshjobs sim``.

Real worker processes (several simulated peers each, every peer with its own
identity and connection), the real trust service and the real submit path, on
a private embedded broker; cheaters follow a scenario
(:mod:`meshjobs.sim.scenarios`), the harness keeps ground truth
(:mod:`meshjobs.sim.report`) and :func:`run_sim` returns the numbers.
"""

from meshjobs.sim.harness import SimConfig, SimError
from meshjobs.sim.runner import run_sim
from meshjobs.sim.scenarios import SCENARIOS

__all__ = ["SCENARIOS", "SimConfig", "SimError", "run_sim"]
