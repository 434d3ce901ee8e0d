"""Sweeps: one recipe over a grid of overrides, each point an ordinary run in one sweep directory.

Modules, one job each: ``grid`` (the ``-s`` options into axes and points), ``record`` (the sweep
directory's layout and sweep.json), ``worker`` (one point's ``eprun train`` process and its
outcome), ``backend`` (what a backend provides), ``local`` and ``slurm`` (the backends),
``slurm_settings`` (Slurm's resources from flags or YAML), ``driver`` (the loop that runs the
points and keeps sweep.json current), ``session`` (starting and resuming a sweep).

Nothing heavy is imported here: Slurm's nodes import :mod:`eprun.sweep.slurm` to run a point.
"""
