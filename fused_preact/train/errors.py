"""The trainer's refusals and failures, each a kind of its own, so that callers (the command line,
the experiments runner, tests) decide by type, never by the wording of a message.

``exit_status`` is what ``python -m fused_preact.train`` exits with (its ``--help`` lists them):
2 a refusal before anything is trained or written (flags, ``--out``, ``--resume``), 1 a failure
while running (a checkpoint that could not be written), 3 a run that diverged.
"""
from __future__ import annotations


class TrainerError(Exception):
    """A run that cannot start or go on; the message names the file or flag and the cause."""
    exit_status = 2


class RunFailed(TrainerError):
    """Something the run needs failed while it ran (a checkpoint write); what was kept is named."""
    exit_status = 1
