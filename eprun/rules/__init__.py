"""Learning rules, keyed by the recipe's ``rule.kind``.

A rule turns a batch into parameter updates written into ``.grad`` (so any torch optimiser
applies them) and scores a batch. Adding a rule is one file plus one line here.
"""

from eprun.rules.bp import BP
from eprun.rules.bptt import BPTT
from eprun.rules.cep import CEP
from eprun.rules.dtp import DRL, DTP, TP, VanillaDTP
from eprun.rules.ep import EP

RULES = {
    "ep": EP,
    "bp": BP,
    "cep": CEP,
    "bptt": BPTT,
    "dtp": DTP,
    "drl": DRL,
    "vanilla_dtp": VanillaDTP,
    "tp": TP,
}


def rule_configs() -> dict[str, type]:
    """``{kind: ConfigClass}`` for the recipe validator."""
    return {kind: cls.Config for kind, cls in RULES.items()}
