"""DeepSpeed training building blocks: engine setup on a role subgroup, actor/critic/reference, micro-batching."""

from hpc_rlhf.training.batching import (
    MicroBatch,
    TokenSample,
    make_micro_batches,
    pad_micro_batch_count,
    scatter_to_samples,
)
from hpc_rlhf.training.deepspeed_setup import (
    DataParallelUnit,
    EngineConfig,
    engine_scope,
    init_engine,
    init_inference_engine,
    make_ds_config,
)
from hpc_rlhf.training.forwards import ForwardOutput
from hpc_rlhf.training.logprobs import token_log_probs
from hpc_rlhf.training.models import Actor, Critic, Reference, TokenValueModel

__all__ = [
    "Actor",
    "Critic",
    "DataParallelUnit",
    "EngineConfig",
    "ForwardOutput",
    "MicroBatch",
    "Reference",
    "TokenSample",
    "TokenValueModel",
    "engine_scope",
    "init_engine",
    "init_inference_engine",
    "make_ds_config",
    "make_micro_batches",
    "pad_micro_batch_count",
    "scatter_to_samples",
    "token_log_probs",
]
