"""Time to accuracy on a real model: hpc_rlhf's GRPO against TRL's GRPOTrainer, same model, task and settings.

    python tools/bench_accuracy.py hpc --config configs/smollm2_grpo_1gpu.yaml --budget-s 300 --out bench/ [--k=v ...]
    python tools/bench_accuracy.py trl --config configs/smollm2_grpo_1gpu.yaml --budget-s 300 --out bench/ [--k=v ...]
    python tools/bench_accuracy.py report bench/ [more_results/ ...] [--png bench/curves.png]

Both systems read one hpc_rlhf config (plus `--section.key=value` overrides), so the model, prompts, group size,
lengths, learning rate and batch shapes are the same by construction. Each run trains until `--budget-s` seconds of
training have passed (evaluation and start-up excluded) or train.max_iterations iterations are done, and writes
OUT/<system>.json: the held-out greedy accuracy curve against training seconds (`hpc_rlhf.benchmarks.accuracy`),
per-iteration seconds and token counts. `report` prints the table (seconds to 50% and 80%, final accuracy, median
iteration), each hpc_rlhf run's ratio to the TRL run of the same label, accuracy by iteration, iteration time and
completion tokens/s early and late, and draws the curves. `tools/trl_parity.py` checks, on one batch, that the two
take the same step.

- hpc: runs `python -m hpc_rlhf.train` as it is and reads its metrics.jsonl: the trainer evaluates greedily on
  eval.data every eval.steps iterations and times that evaluation (time/eval_s), which is taken off the clock. When
  the budget is spent the run gets SIGTERM, which the trainer honours at the next iteration boundary.
- trl: GRPOTrainer (trl 1.16) on the same prompts as conversations (TRL applies the same chat template), the
  task's reward function behind TRL's reward signature, and a callback that evaluates with
  `hpc_rlhf.tasks.evaluation` every eval.steps iterations with the training clock stopped. Precision is TRL's
  default: fp32 weights under bf16 autocast on CUDA (fp32 master weights, as hpc_rlhf's DeepSpeed bf16).
"""

from __future__ import annotations

import argparse
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from hpc_rlhf.benchmarks.accuracy import (  # noqa: E402
    CurvePoint,
    accuracy_at,
    curve_from_json,
    curve_from_metrics,
    curve_to_json,
    phase_speed,
    plot_curves,
    ratio_line,
    read_metrics,
    summarize,
    training_seconds,
)
from hpc_rlhf.benchmarks.report import markdown_table  # noqa: E402

SYSTEMS = ("hpc", "trl")


def parse_args(argv: list[str] | None) -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("system", choices=SYSTEMS + ("report",))
    p.add_argument("out", nargs="*", help="report: the folders holding the hpc_rlhf*.json / trl*.json results")
    p.add_argument("--config", help="hpc_rlhf YAML config both systems run")
    p.add_argument("--budget-s", type=float, default=300.0, help="training seconds (evaluation excluded)")
    p.add_argument("--out", dest="out_dir", help="folder for <system>.json (and the hpc run dir)")
    p.add_argument("--png", help="report: write the curves here (default: curves.png in the first folder)")
    p.add_argument("--label", default="", help="a word added to the run's name in the report")
    p.add_argument("--stop-at-accuracy", type=float, default=None,
                   help="also stop once a held-out evaluation reaches this accuracy (saves machine time)")
    args, overrides = p.parse_known_args(argv)
    if args.system != "report" and (not args.config or not args.out_dir):
        p.error(f"{args.system} needs --config and --out")
    if args.system == "report" and not args.out:
        p.error("report needs the folder holding the JSON results")
    bad = [o for o in overrides if not o.startswith("--")]
    if bad:
        p.error(f"unexpected arguments {bad}; config overrides look like --section.key=value")
    return args, overrides


# ----- hpc_rlhf ---------------------------------------------------------------------------------------------------
def run_hpc(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """Run the trainer as a user would, stop it when the training budget is spent, read its curve."""
    out = Path(args.out_dir)
    run_dir = out / f"hpc{args.label}"
    metrics_file = run_dir / "metrics.jsonl"
    command = [sys.executable, "-m", "hpc_rlhf.train", "--config", args.config, f"--train.run_dir={run_dir}",
               "--overwrite-run-dir", *overrides]
    print("+", " ".join(command), flush=True)
    started = time.time()
    process = subprocess.Popen(command, cwd=REPO)
    stopped_at = None
    while process.poll() is None:
        time.sleep(1.0)
        if stopped_at is None and metrics_file.exists():
            try:
                rows = read_metrics(metrics_file)
            except ValueError:  # a line being written
                continue
            reached = reached_target(curve_from_metrics(rows), args.stop_at_accuracy)
            if sum(training_seconds(r) for r in rows) >= args.budget_s or reached:
                stopped_at = time.time()
                why = "target accuracy reached" if reached else f"training budget {args.budget_s:.0f} s spent"
                print(f"bench: {why} after {len(rows)} iterations; stopping", flush=True)
                process.send_signal(signal.SIGTERM)
    if process.returncode not in (0, None) and stopped_at is None:
        raise SystemExit(f"hpc_rlhf.train exited with {process.returncode}")
    rows = read_metrics(metrics_file)
    curve = curve_from_metrics(rows)
    first_end = rows[0].get("time/end_unix_s", started) if rows else started
    iteration_s = [training_seconds(r) for r in rows if "time/iteration_s" in r]
    keep = ("time/iteration_s", "time/eval_s", "time/generate_engine_s", "time/actor_update_s",
            "time/actor_logprob_s", "time/weight_sync_s", "rollout/reward_mean", "rollout/response_length",
            "throughput/generate_tokens_per_s", "throughput/train_tokens_per_s", "eval/accuracy")
    return {"system": "hpc_rlhf", "name": f"hpc_rlhf{args.label}", "curve": curve_to_json(curve),
            "iteration_s": iteration_s,
            "startup_s": first_end - started - (rows[0].get("time/iteration_s", 0.0) if rows else 0.0),
            "iterations": [{k: r[k] for k in ("step", *keep) if k in r} for r in rows],
            "generation": generation_of(args.config, overrides), "command": command, "versions": versions()}


def reached_target(curve: list[CurvePoint], target: float | None) -> bool:
    """True once the newest held-out evaluation is at or above `target` (never when no target is set)."""
    return target is not None and bool(curve) and curve[-1].accuracy >= target


# ----- TRL ---------------------------------------------------------------------------------------------------------
def trl_rows(cfg: Any) -> list[dict[str, Any]]:
    """The config's training prompts as TRL conversations (one user message; TRL applies the chat template)."""
    from hpc_rlhf.data.records import iter_records

    data = cfg.data
    return [{"prompt": [{"role": "user", "content": row[data.input_key]}], "label": str(row[data.label_key])}
            for _, row in iter_records(data.prompt_data, columns=[data.input_key, data.label_key])]


def trl_reward(tokenizer: Any, task_reward: Any) -> Any:
    """The task's reward function (hpc_rlhf's signature: queries, prompts, labels) behind TRL's signature."""

    def reward(prompts: list, completions: list, label: list[str], **_unused: Any) -> list[float]:
        texts = [tokenizer.apply_chat_template(p, tokenize=False, add_generation_prompt=True) for p in prompts]
        queries = [t + c[0]["content"] for t, c in zip(texts, completions)]
        return [float(x) for x in task_reward(queries, texts, label)["rewards"]]

    return reward


def samples_per_iteration(cfg: Any) -> int:
    """Samples generated in one iteration: prompts x samples per prompt."""
    return cfg.rollout.batch_size * cfg.rollout.n_samples_per_prompt


def optimizer_steps_per_iteration(cfg: Any) -> int:
    """Optimizer steps of one iteration: its samples over the train batch (TRL counts steps, hpc_rlhf iterations)."""
    return samples_per_iteration(cfg) // cfg.train.train_batch_size


def trl_grpo_config(cfg: Any, output_dir: Path, cuda: bool, use_vllm: bool = False) -> Any:
    """The GRPOConfig of an hpc_rlhf config: same batch shapes, lengths, clip range, learning rate and optimizer;
    with `use_vllm`, TRL's colocated vLLM engine with the config's memory share and sleep setting."""
    from trl import GRPOConfig

    rollout, train, actor, algo = cfg.rollout, cfg.train, cfg.actor, cfg.algo
    sequences = samples_per_iteration(cfg)
    steps_per_iteration = optimizer_steps_per_iteration(cfg)
    # hpc_rlhf warms up over lr_warmup_ratio of max_iterations' optimizer steps; TRL takes the same count of steps
    warmup_steps = math.ceil(actor.lr_warmup_ratio * (train.max_iterations or 0) * steps_per_iteration)
    return GRPOConfig(
        output_dir=str(output_dir),
        # TRL has no token-budget micro-batches: it takes micro_train_batch_size samples per pass whatever
        # train.max_tokens_per_microbatch says
        per_device_train_batch_size=train.micro_train_batch_size,
        gradient_accumulation_steps=train.train_batch_size // train.micro_train_batch_size,
        generation_batch_size=sequences, num_generations=rollout.n_samples_per_prompt,
        max_completion_length=rollout.generate_max_len,
        max_steps=(train.max_iterations or 10**6) * steps_per_iteration, num_iterations=train.max_epochs,
        beta=algo.init_kl_coef if algo.use_kl_loss else 0.0,
        loss_type="dapo" if algo.loss_agg_mode == "token_mean" else "grpo",
        epsilon=algo.eps_clip_low, epsilon_high=algo.eps_clip_high, scale_rewards="group",
        temperature=rollout.temperature, top_p=rollout.top_p, top_k=max(rollout.top_k, 0), min_p=None,
        repetition_penalty=1.0, learning_rate=actor.learning_rate,
        lr_scheduler_type="constant" if actor.lr_scheduler == "constant_with_warmup" else "cosine",
        warmup_steps=warmup_steps, optim="adamw_torch_fused" if cuda else "adamw_torch",
        adam_beta1=actor.adam_betas[0], adam_beta2=actor.adam_betas[1], weight_decay=actor.weight_decay,
        max_grad_norm=actor.max_norm, bf16=cuda, gradient_checkpointing=actor.gradient_checkpointing,
        model_init_kwargs={"dtype": "float32", "attn_implementation": "sdpa"}, disable_dropout=True,
        shuffle_dataset=True, seed=train.seed, use_cpu=not cuda, report_to="none", logging_strategy="steps",
        logging_steps=steps_per_iteration, save_strategy="no", eval_strategy="no", disable_tqdm=True,
        use_vllm=use_vllm, **(trl_vllm_kwargs(cfg) if use_vllm else {}),
    )


def trl_vllm_kwargs(cfg: Any) -> dict[str, Any]:
    """TRL's colocated vLLM settings that match hpc_rlhf's engine of the same config."""
    return {"vllm_mode": "colocate", "vllm_gpu_memory_utilization": cfg.vllm.gpu_memory_utilization,
            "vllm_enable_sleep_mode": cfg.vllm.enable_sleep,
            "vllm_max_model_length": cfg.rollout.prompt_max_len + cfg.rollout.generate_max_len}


def run_trl(args: argparse.Namespace, overrides: list[str]) -> dict[str, Any]:
    """GRPOTrainer on the config's model, prompts and settings, with timed held-out evaluation between steps."""
    import datasets
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import GRPOTrainer

    from hpc_rlhf.builtin_models.resolve import resolve_model_path
    from hpc_rlhf.config.loading import load_config
    from hpc_rlhf.data.prompts import load_prompts
    from hpc_rlhf.generation.vllm_engine import prefer_torch_sampler
    from hpc_rlhf.rewards.reward_func import load_reward_func
    from hpc_rlhf.tasks.evaluation import evaluate
    from hpc_rlhf.trainers.generation_setup import generation_backend

    started = time.time()
    cfg = load_config(args.config, overrides).config
    cuda = torch.cuda.is_available() and cfg.train.device != "cpu"
    model_path = resolve_model_path(cfg.actor.pretrain)
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    tokenizer.padding_side = "left"
    data = cfg.data
    rows = trl_rows(cfg)
    eval_examples = load_prompts(cfg.eval.data, input_key=data.input_key, label_key=data.label_key,
                                 apply_chat_template=True, tokenizer=tokenizer, max_samples=cfg.eval.max_samples)
    task_reward = load_reward_func(cfg.reward.reward_func_path)
    reward = trl_reward(tokenizer, task_reward)
    rollout = cfg.rollout
    steps_per_iteration = optimizer_steps_per_iteration(cfg)
    # the generation backend hpc_rlhf would pick for this config (vllm.backend: auto = vLLM where installed)
    use_vllm = cuda and generation_backend(cfg) == "vllm"
    if use_vllm:
        prefer_torch_sampler()  # the sampler of hpc_rlhf's engine; FlashInfer's is optional
    config = trl_grpo_config(cfg, Path(args.out_dir) / f"trl{args.label}", cuda, use_vllm=use_vllm)
    print(f"trl generation: {'vLLM (colocate)' if use_vllm else 'Hugging Face generate'}", flush=True)
    sync = torch.cuda.synchronize if cuda else (lambda: None)

    class Clock(TrainerCallback):
        """Training seconds with evaluation taken out; evaluates every eval.steps iterations; stops at the budget."""

        def __init__(self) -> None:
            self.curve: list[CurvePoint] = []
            self.iteration_s: list[float] = []
            self.train_s = 0.0
            self._mark = 0.0
            self.model = None

        def _evaluate(self, model: Any, iteration: int) -> None:
            sync()
            accuracy = evaluate(model, tokenizer, eval_examples, reward_func=task_reward,
                                max_new_tokens=rollout.generate_max_len, batch_size=256)["greedy"]["accuracy"]
            self.curve.append(CurvePoint(iteration=iteration, train_s=self.train_s, accuracy=accuracy))
            print(f"trl eval: iteration {iteration}, {self.train_s:.1f} s, accuracy {accuracy:.3f}", flush=True)
            # the curve so far, so that a run cut off by a machine's time limit still leaves its result
            partial = {"system": "trl", "name": f"trl{args.label}", "curve": curve_to_json(self.curve),
                       "iteration_s": self.iteration_s, "partial": True, "versions": versions()}
            (Path(args.out_dir) / f"trl{args.label}.json").write_text(json.dumps(partial, indent=1, default=str))

        def on_train_begin(self, args_, state, control, model=None, **kwargs):
            self.model = model
            self._evaluate(model, 0)
            sync()
            self._mark = time.perf_counter()

        def on_step_end(self, args_, state, control, model=None, **kwargs):
            if state.global_step % steps_per_iteration:
                return
            sync()
            now = time.perf_counter()
            self.iteration_s.append(now - self._mark)
            self.train_s += now - self._mark
            iteration = state.global_step // steps_per_iteration
            done = self.train_s >= args.budget_s or state.global_step >= state.max_steps
            if done or (cfg.eval.steps > 0 and iteration % cfg.eval.steps == 0):
                model.eval()
                self._evaluate(model, iteration)
                model.train()
                done = done or reached_target(self.curve, args.stop_at_accuracy)
            if done:
                control.should_training_stop = True
            sync()
            self._mark = time.perf_counter()

    clock = Clock()
    trainer = GRPOTrainer(model=model_path, reward_funcs=reward, args=config,
                          train_dataset=datasets.Dataset.from_list(rows), processing_class=tokenizer,
                          callbacks=[clock])
    startup_s = time.time() - started
    trainer.train()
    return {"system": "trl", "name": f"trl{args.label}", "curve": curve_to_json(clock.curve),
            "iteration_s": clock.iteration_s, "startup_s": startup_s, "command": sys.argv,
            "trl_logs": trainer.state.log_history, "generation": "vllm" if use_vllm else "hf", "versions": versions()}


def generation_of(config: str, overrides: list[str]) -> str:
    """The generation backend a run of this config uses here (`vllm.backend: auto` resolved)."""
    from hpc_rlhf.config.loading import load_config
    from hpc_rlhf.trainers.generation_setup import generation_backend

    return generation_backend(load_config(config, overrides).config)


def versions() -> dict[str, Any]:
    import importlib.metadata as md

    out: dict[str, Any] = {}
    for name in ("torch", "transformers", "deepspeed", "trl", "vllm"):
        try:
            out[name] = md.version(name)
        except md.PackageNotFoundError:
            out[name] = None
    try:
        import torch

        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    except Exception:  # noqa: BLE001 - versions are informative only
        out["gpu"] = None
    return out


# ----- report ------------------------------------------------------------------------------------------------------
def completion_tokens(result: dict[str, Any], sequences: int) -> list[float]:
    """Completion tokens of each timed iteration of a result (in the order of its iteration_s): hpc_rlhf's from the
    generation engine's tokens/s and seconds, TRL's from its logged mean completion length (one log per iteration)."""
    if result["system"] == "hpc_rlhf":
        return [r.get("throughput/generate_tokens_per_s", 0.0) * r.get("time/generate_engine_s", 0.0)
                for r in result["iterations"] if "time/iteration_s" in r]
    return [e["completions/mean_length"] * sequences for e in result.get("trl_logs", [])
            if "completions/mean_length" in e]


def sequences_per_iteration(result: dict[str, Any]) -> int:
    """Samples per iteration of the config and overrides the run was made with."""
    from hpc_rlhf.config.loading import load_config

    return samples_per_iteration(load_config(str(REPO / result["config"]), result["overrides"]).config)


def speed_rows(results: list[dict[str, Any]], first_span: int = 12, last_span: int = 10) -> list[dict[str, Any]]:
    """Iteration time and completion tokens/s of each run over iterations 1-12 (long early responses; iteration 0
    warms up) and over the last 10 iterations that it and its peer (same label) both ran (short responses)."""
    label = {r["name"]: r["name"].removeprefix(r["system"]) for r in results}
    ran = {r["name"]: len(r["iteration_s"]) for r in results}
    rows = []
    for result in results:
        if "config" not in result:  # a partial result (its run was cut off) does not say its batch
            continue
        common = min(n for name, n in ran.items() if label[name] == label[result["name"]])
        sequences = sequences_per_iteration(result)
        tokens = completion_tokens(result, sequences)
        spans = ((1, min(1 + first_span, common)), (max(1, common - last_span), common))
        for first, last in dict.fromkeys(spans):  # one row where the run is too short for two spans
            if last <= first:
                continue
            speed = phase_speed(result["iteration_s"], tokens, sequences, first, last)
            rows.append({"run": result["name"], "span": f"{speed.first}-{speed.last - 1}",
                         "iter_s": speed.median_iteration_s, "length": speed.completion_length,
                         "tokens_per_s": speed.completion_tokens_per_s})
    return rows


def report(folders: list[Path], png: Path | None) -> str:
    """The time-to-accuracy table, the ratio of each hpc_rlhf run to the peer run of its label, accuracy by
    iteration, the speed of early and late iterations, and the curves as a PNG."""
    paths = sorted(p for folder in folders for p in folder.glob("*.json") if p.stem.startswith(SYSTEMS))
    if not paths:
        raise SystemExit(f"{', '.join(map(str, folders))}: no hpc*.json or trl*.json results")
    results = [json.loads(p.read_text()) for p in paths]
    summaries = {r["name"]: summarize(r["name"], curve_from_json(r["curve"]), r["iteration_s"]) for r in results}
    rows = [{"run": s.name, "iterations": s.iterations, "train_s": s.train_s, "iter_s": s.median_iteration_s,
             "start": s.start_accuracy, "final": s.final_accuracy, "best": s.best_accuracy,
             "t50": s.seconds_to["0.5"], "t80": s.seconds_to["0.8"]} for s in summaries.values()]
    lines = [markdown_table(rows, [("run", "run", ""), ("iterations", "iterations", "d"),
                                   ("train_s", "training s", ".0f"), ("iter_s", "median s/iteration", ".2f"),
                                   ("start", "accuracy at start", ".3f"), ("final", "final", ".3f"),
                                   ("best", "best", ".3f"), ("t50", "s to 50%", ".0f"), ("t80", "s to 80%", ".0f")])]
    for result in results:
        peer = "trl" + result["name"].removeprefix("hpc_rlhf")
        if result["system"] == "hpc_rlhf" and peer in summaries:
            lines += [ratio_line(summaries[result["name"]], summaries[peer], t) for t in ("0.5", "0.8")]
    evaluated = sorted({p["iteration"] for r in results for p in r["curve"] if p["iteration"] <= 100})[:12]
    by_iteration = [{"run": r["name"], **dict(zip(map(str, evaluated), accuracy_at(curve_from_json(r["curve"]),
                                                                                  evaluated)))} for r in results]
    lines += ["", "held-out accuracy after each evaluated iteration:",
              markdown_table(by_iteration, [("run", "run", ""), *[(str(i), str(i), ".2f") for i in evaluated]])]
    lines += ["", "speed (training seconds; completion tokens of all samples over them):",
              markdown_table(speed_rows(results), [("run", "run", ""), ("span", "iterations", ""),
                                                   ("iter_s", "median s/iteration", ".2f"),
                                                   ("length", "mean completion tokens", ".1f"),
                                                   ("tokens_per_s", "completion tokens/s", ",.0f")])]
    text = "\n".join(lines)
    print(text)
    target = png or folders[0] / "curves.png"
    plot_curves({r["name"]: curve_from_json(r["curve"]) for r in results}, target,
                title="held-out greedy accuracy vs training time")
    print(f"curves: {target}")
    return text


def main(argv: list[str] | None = None) -> int:
    args, overrides = parse_args(argv)
    if args.system == "report":
        report([Path(folder) for folder in args.out], Path(args.png) if args.png else None)
        return 0
    Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    result = run_hpc(args, overrides) if args.system == "hpc" else run_trl(args, overrides)
    result.update({"budget_s": args.budget_s, "config": args.config, "overrides": overrides})
    out = Path(args.out_dir) / f"{result['name']}.json"
    out.write_text(json.dumps(result, indent=1, default=str))
    curve = curve_from_json(result["curve"])
    print(f"{result['name']}: {len(curve)} eval points, final accuracy "
          f"{curve[-1].accuracy if curve else float('nan'):.3f} after {curve[-1].train_s if curve else 0:.0f} "
          f"training s -> {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
