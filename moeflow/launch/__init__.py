"""The `moeflow` command line: train, launch (local torchrun), slurm (sbatch files)."""

from moeflow.launch.cli import main
from moeflow.launch.slurm import SlurmJob, render_sbatch

__all__ = ["SlurmJob", "main", "render_sbatch"]
