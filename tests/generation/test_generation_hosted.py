"""An engine hosted in a real child process (the hf backend here) behaves like the same engine in this process."""

from __future__ import annotations

import os
import signal

import pytest

from hpc_rlhf.generation import (
    EngineSpec,
    GenerationEngine,
    GenerationError,
    HFEngine,
    ProcessHostedEngine,
    SamplingParams,
    make_engine,
)
from hpc_rlhf.generation.hosted import resolve_factory

FACTORY = "hpc_rlhf.generation.factory:make_engine"


@pytest.fixture(autouse=True, scope="module")
def _one_thread_children():
    """Engine processes inherit this at spawn: one torch thread each (see conftest)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("OMP_NUM_THREADS", "1")
        yield


@pytest.fixture(scope="module")
def hosted(model_dirs, _one_thread_children):
    spec = EngineSpec(factory=FACTORY, kwargs={"backend": "hf", "model_path": str(model_dirs[0]),
                                               "micro_batch_size": 64, "seed": 0},
                      env={"HPC_RLHF_TEST_MARK": "child"})
    engine = ProcessHostedEngine(spec, start_timeout_s=120, call_timeout_s=120, weight_chunk_bytes=40_000)
    yield engine
    engine.close()


@pytest.mark.timeout(180)
def test_hosted_generation_equals_in_process_generation(hosted, make_model, prompts):
    assert isinstance(hosted, GenerationEngine)
    local = HFEngine(make_model(0), max_batch_size=64)
    for params in (SamplingParams(max_new_tokens=8, temperature=0.0),
                   SamplingParams(max_new_tokens=8, temperature=1.0, n=2, seed=21)):
        remote, here = hosted.generate(prompts, params), local.generate(prompts, params)
        assert [[s.response_ids for s in row] for row in remote] == [[s.response_ids for s in row] for row in here]
        for row_remote, row_here in zip(remote, here):
            for a, b in zip(row_remote, row_here):
                assert a.log_probs == pytest.approx(b.log_probs, abs=1e-6)
    assert "HPC_RLHF_TEST_MARK" not in os.environ  # the child's environment overrides stay in the child


@pytest.mark.timeout(180)
def test_weights_stream_to_the_child_in_chunks(hosted, make_model, prompts):
    params = SamplingParams(max_new_tokens=8, temperature=0.0)
    target = HFEngine(make_model(1)).generate(prompts, params)
    assert hosted.generate(prompts, params) != target
    source = make_model(1)
    assert hosted.load_weights(source.named_parameters()) == len(list(source.named_parameters()))
    assert [s[0].response_ids for s in hosted.generate(prompts, params)] == [s[0].response_ids for s in target]
    hosted.load_weights(make_model(0).named_parameters())  # back to the fixture's model for the other tests


@pytest.mark.timeout(180)
def test_child_errors_come_back_with_their_message(hosted, make_model, prompts):
    consumed = []

    def stream():
        for name, tensor in make_model(0).named_parameters():
            consumed.append(name)
            yield (name if len(consumed) != 2 else "model.bogus.weight"), tensor

    with pytest.raises(GenerationError, match="'model.bogus.weight' has no parameter of that name"):
        hosted.load_weights(stream())
    assert len(consumed) == len(list(make_model(0).named_parameters()))
    hosted.sleep()
    with pytest.raises(GenerationError, match="(?s)engine process failed in generate:.*asleep"):
        hosted.generate(prompts, SamplingParams(max_new_tokens=2))
    hosted.wake_up()
    assert len(hosted.generate(prompts[:1], SamplingParams(max_new_tokens=2))[0]) == 1


@pytest.mark.timeout(120)
def test_a_failing_factory_is_reported_at_start(tmp_path):
    with pytest.raises(GenerationError, match="engine process failed in start:.*"):
        ProcessHostedEngine(EngineSpec(factory=FACTORY, kwargs={"backend": "hf", "model_path": str(tmp_path / "no")}),
                            start_timeout_s=100)
    with pytest.raises(GenerationError, match="has no attribute 'nothing_here'"):
        ProcessHostedEngine(EngineSpec(factory="hpc_rlhf.generation.factory:nothing_here"), start_timeout_s=100)


@pytest.mark.timeout(120)
def test_a_dead_child_is_reported_and_close_is_safe(model_dirs, prompts):
    spec = EngineSpec(factory=FACTORY, kwargs={"backend": "hf", "model_path": str(model_dirs[0])})
    engine = ProcessHostedEngine(spec, start_timeout_s=100, call_timeout_s=100)
    os.kill(engine.child_pid, signal.SIGKILL)
    engine.process.join(30)
    with pytest.raises(GenerationError, match="exited with code -9"):
        engine.generate(prompts, SamplingParams(max_new_tokens=2))
    engine.close()
    engine.close()
    with pytest.raises(GenerationError, match="closed"):
        engine.generate(prompts, SamplingParams(max_new_tokens=2))


@pytest.mark.timeout(180)
def test_the_child_ignores_stop_signals_that_reach_the_whole_task(hosted, prompts):
    """SLURM and a terminal signal every process of a task; the parent decides when its engine stops."""
    before = hosted.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.0))
    for signum in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGTERM, signal.SIGINT):
        os.kill(hosted.child_pid, signum)
    assert hosted.generate(prompts, SamplingParams(max_new_tokens=4, temperature=0.0)) == before
    assert hosted.process.is_alive()


@pytest.mark.timeout(180)
def test_make_engine_hosts_an_hf_engine_in_a_child_process_on_request(model_dirs, make_model, prompts):
    engine = make_engine("hf", str(model_dirs[0]), micro_batch_size=64, seed=0, child_process=True)
    try:
        assert isinstance(engine, ProcessHostedEngine) and engine.child_pid != os.getpid()
        params = SamplingParams(max_new_tokens=6, temperature=1.0, n=2, seed=5)
        here = HFEngine(make_model(0), max_batch_size=64).generate(prompts, params)
        assert [[s.response_ids for s in row] for row in engine.generate(prompts, params)] == \
            [[s.response_ids for s in row] for row in here]
    finally:
        engine.close()


def test_a_factory_may_name_a_class_method():
    assert resolve_factory("hpc_rlhf.generation.hf_engine:HFEngine.from_pretrained") == HFEngine.from_pretrained
    with pytest.raises(GenerationError, match="has no attribute 'HFEngine.nothing'"):
        resolve_factory("hpc_rlhf.generation.hf_engine:HFEngine.nothing")
