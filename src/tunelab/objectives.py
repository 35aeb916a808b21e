"""Training objectives, registered in ``OBJECTIVES``: what the loss asks of the model.

An objective is orthogonal to the tuning method (``method.kind``: which weights change). It says
what data it reads (``data``: ordinary examples, preference pairs or unpaired labelled answers),
whether it compares the policy with a reference model (``reference``: the base with the adapter
switched off, or log-probabilities computed once before training for full fine-tuning) and
whether it samples its own answers (``rollouts``). The data pipeline, the loop and the planner
ask the registered class; nothing compares objective names. Nothing heavy is imported here, so
the config reads the registry cheaply.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal


@dataclass(frozen=True)
class Objective:
    """One training objective and what it needs."""

    name: str
    title: str  # how reports name it
    data: Literal["examples", "pairs", "unpaired"]
    reference: bool = False  # compares with the reference model's log-probabilities
    rollouts: bool = False  # samples answers from the model being trained (reinforcement)

    @property
    def preference(self) -> bool:
        """Trains on preference data (pairs, or unpaired answers labelled good or bad)."""
        return self.data != "examples"


OBJECTIVES: dict[str, Objective] = {objective.name: objective for objective in (
    Objective("sft", "supervised fine-tuning", "examples"),
    Objective("dpo", "DPO", "pairs", reference=True),
    Objective("simpo", "SimPO", "pairs"),
    Objective("kto", "KTO", "unpaired", reference=True),
    Objective("grpo", "GRPO", "examples", rollouts=True),
    Objective("rloo", "RLOO", "examples", rollouts=True),
)}

# Reinforcement's policy-gradient loss over a batch of sampled answers: dapo averages over all
# answer tokens of the batch (DAPO's token-level loss), grpo over each answer's tokens and then
# the answers (the GRPO paper's), dr_grpo sums each answer's tokens over the longest allowed
# answer (Dr. GRPO: no length bias).
RL_LOSSES = ("dapo", "grpo", "dr_grpo")
