"""What a run keeps in its run directory, and how it writes it so that a crash or a requeue loses nothing.

    directory.py       the recorded config, and refusing a run directory that holds another run
    checkpoint.py      DeepSpeed engine states + trainer state + RNG, written to a temporary folder and committed
    metrics.py         metrics.jsonl, TensorBoard, the progress line and curves.png
    rank_metrics.py    per-phase timing (`timed`) and how each metric family combines over ranks
    durable.py         fsync + atomic rename, used by every writer above and by the rollout shards

Nothing here imports torch.distributed roles or the trainers; importing the package imports none of its modules.
"""
