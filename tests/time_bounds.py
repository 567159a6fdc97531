"""How long tests wait, in one place, and why.

Two kinds of wait, kept apart so that no test races the machine's load:

- A **hang guard** (`HANG_GUARD_SECONDS`) only stops a test from waiting forever on something
  that should happen: a server starting, a subprocess or Slurm job finishing, spawned ranks
  returning. It claims nothing about speed, so it is generous: CI's 2 cores are shared, and
  this suite has run at load averages of 25-40 (12-20 runnable processes per core), where a
  bare `python -m slurm.submit` took over 60 s to import torch and `mlflow server` over 90 s
  to become healthy.
- A **claimed bound** is a property under test ("a hung rank ends the job within the collective
  timeout plus Slurm's KillWait"). It is the configured timeouts the property follows from, plus
  `LOAD_MARGIN_SECONDS` for the work around them that a loaded machine slows down: a Python
  process with torch loaded tearing down (11 s seen at load 30), torchrun and srun reacting,
  slurmctld recording the end, the test's own polling. Each test keeps the failure it looks for
  (a hang of the 600 s default timeout, or forever) well beyond its bound.
"""

HANG_GUARD_SECONDS = 900.0
LOAD_MARGIN_SECONDS = 60.0
