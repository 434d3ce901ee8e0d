"""``eprun bench``: eprun's training step and evaluation timed against the autograd-of-Φ
formulation of the same step (:mod:`eprun.reference.autograd_ep`), side by side in one process.

Modules, one job each: :mod:`~eprun.bench.cases` (what is measured, the options),
:mod:`~eprun.bench.baselines` (what each rule is timed against), :mod:`~eprun.bench.cost`
(multiply-adds from the shapes), :mod:`~eprun.bench.timing` (clock, matmul peak, memory),
:mod:`~eprun.bench.measure` (one case, and a whole run) and :mod:`~eprun.bench.report` (the table).
Adding a case is one :class:`~eprun.bench.cases.Case`; a rule needs its baseline in
:data:`~eprun.bench.baselines.BASELINES`.
"""

from eprun.bench.cases import CASES, BenchOptions
from eprun.bench.measure import run
from eprun.bench.report import footnotes, table

__all__ = ["CASES", "BenchOptions", "footnotes", "run", "table"]
