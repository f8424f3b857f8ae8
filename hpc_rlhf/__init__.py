"""hpc_rlhf: RLHF and RL for LLMs on SLURM clusters, without Ray."""

__version__ = "0.1.0"
