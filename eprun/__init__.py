"""eprun: an experiment runner for Equilibrium Propagation, its variants, and their baselines."""

__version__ = "0.1.0"
