"""Slurm launchers: train.sbatch (multi-node training with self-requeue), prep.sbatch (sharding
as a job array plus a dependent merge), `python -m slurm.submit`, `python -m slurm.prep`."""
