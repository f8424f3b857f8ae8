"""Generation: the engine interface, the hf and vllm backends, and the single-/multi-turn agent executors.

    engine = make_engine("hf", model_path, dtype="float32", device="cpu", micro_batch_size=16, seed=0)
    samples = engine.generate(prompt_token_ids, SamplingParams(max_new_tokens=64, temperature=1.0, n=4, seed=7))
    executor = make_executor(engine, tokenizer, agent_func_path=None)   # or an AgentInstance file, multi-turn
    trajectories = executor.run(prompt_token_ids, params, prompt_texts=texts, labels=labels)
"""

from hpc_rlhf.generation.agents import AgentError, Trajectory, load_agent_class
from hpc_rlhf.generation.engine import GeneratedSample, GenerationEngine, GenerationError, SamplingParams
from hpc_rlhf.generation.executors import SingleTurnExecutor, make_executor
from hpc_rlhf.generation.factory import make_engine
from hpc_rlhf.generation.hf_engine import HFEngine
from hpc_rlhf.generation.hosted import EngineSpec, ProcessHostedEngine
from hpc_rlhf.generation.multi_turn import MultiTurnExecutor
from hpc_rlhf.generation.vllm_engine import VllmEngine

__all__ = [
    "AgentError",
    "EngineSpec",
    "GeneratedSample",
    "GenerationEngine",
    "GenerationError",
    "HFEngine",
    "MultiTurnExecutor",
    "ProcessHostedEngine",
    "SamplingParams",
    "SingleTurnExecutor",
    "Trajectory",
    "VllmEngine",
    "load_agent_class",
    "make_engine",
    "make_executor",
]
