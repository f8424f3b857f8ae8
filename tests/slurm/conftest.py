"""The real-SLURM tests use the `slurm_cluster` fixture of tests/conftest.py (hpc_rlhf.slurm.local_cluster)."""
