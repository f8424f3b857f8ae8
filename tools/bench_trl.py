"""Peer benchmark: TRL's GRPOTrainer (trl 1.16.0) on the same random model, prompts and batch shapes as
tools/bench_e2e.py, timed per GRPO iteration.

    python tools/bench_trl.py --shape qwen2.5-0.5b --iterations 4 --out trl.json
    python tools/bench_trl.py --shape tiny --device cpu --iterations 3 --rollout-batch-size 4 --n-samples 4 \
        --prompt-len 16 --gen-len 16 --train-batch-size 8 --micro-batch-size 4          # the CPU smoke setting
    python tools/bench_trl.py --dry-run        # print the GRPOConfig of these settings and exit

Needs trl==1.16.0 and datasets (5.2.0 tested) with their pure-Python dependencies (dill, multiprocess, xxhash,
pandas); nothing from a hub: HF_HUB_OFFLINE=1 and the model and prompts come from
`hpc_rlhf.benchmarks.task.prepare_task`, the same folder and JSONL file bench_e2e.py uses under the same --work-dir.

One iteration, as in hpc_rlhf: B = --rollout-batch-size prompts x K = --n-samples samples are generated with the
current policy, rewarded (fraction of even token ids, `hpc_rlhf.benchmarks.task.even_fraction`), and trained on for
one epoch, one optimizer step per T = --train-batch-size samples, in micro-batches of M = --micro-batch-size. In TRL
that is one generation batch: `_prepare_inputs` generates B*K completions once every `steps_per_generation`
micro-batches and the trainer steps the optimizer every `gradient_accumulation_steps` micro-batches.

Mapping onto GRPOConfig 1.16.0 (one process, one GPU):
    per_device_train_batch_size = M          samples per forward/backward
    gradient_accumulation_steps = T / M      micro-batches per optimizer step
    generation_batch_size       = B * K      so steps_per_generation = B*K / M micro-batches (TRL derives it)
    num_generations             = K          group size; TRL's RepeatSampler puts K copies of B prompts in a batch
    max_completion_length       = G          max_new_tokens of the HF generate call (vLLM: max_tokens)
    max_steps                   = iterations * B*K / T optimizer steps; the dataset holds iterations * B prompts
    beta = 0.0 (--beta)          no reference model, no KL term
    loss_type = "dapo"           token-level loss over the tokens of the whole optimizer step = hpc_rlhf token_mean
    epsilon = 0.2, epsilon_high = None (= 0.2), num_iterations = 1 (one epoch per generation batch)
    scale_rewards = "group"      (r - group mean) / (group std + 1e-4) = hpc_rlhf group_norm (eps 1e-4 vs its own)
    temperature = 1.0, top_p = 1.0, top_k = 0 (off), min_p = None, repetition_penalty = 1.0
    learning_rate = --lr, lr_scheduler_type = "constant", warmup_steps = 0
    optim = adamw_torch_fused (CUDA) / adamw_torch (CPU), adam betas (0.9, 0.95), weight_decay 0, max_grad_norm 1.0
    gradient_checkpointing = False (--gradient-checkpointing turns it on; TRL's own default is True)
    disable_dropout = True, shuffle_dataset = True (seeded), report_to = "none", save_strategy = "no",
    logging_steps = B*K/T (one log line per iteration), use_vllm = False unless --use-vllm (vllm_mode "colocate")
    model_init_kwargs = {dtype, attn_implementation: "sdpa"}; precision from --precision:
        bf16 (CUDA default): weights loaded in bf16 and bf16=True; AdamW updates the bf16 weights directly
        bf16-autocast: weights in fp32 (TRL's default load) with bf16 autocast: fp32 master weights, bf16 matmuls
        fp32 (CPU default, as hpc_rlhf on CPU): fp32 weights, bf16=False

What cannot be matched exactly:
    - precision: hpc_rlhf trains bf16 weights with fp32 master copies inside DeepSpeed's optimizer; TRL has either
      bf16 weights and bf16 optimizer arithmetic (bf16) or fp32 weights under autocast (bf16-autocast, whose HF
      generation also runs under autocast and re-casts every weight at every decode step).
    - generation: TRL's HF path calls `generate` once on the whole B*K batch (no --gen-micro-batch-size); in vLLM
      colocate mode TRL's engine takes max_num_seqs = B*K and max_num_batched_tokens = 4096.
    - log-probs: TRL recomputes the behaviour ("old") log-probs with a forward pass only when a generation batch
      spans more than one optimizer step (B*K > T) or with vLLM; hpc_rlhf's actor log-prob pass runs every iteration.
      TRL also computes the entropy of every token in the training forward (for its logs).
    - sample order: TRL shuffles the generation batch before cutting micro-batches; a micro-batch is padded to its
      longest sequence in both systems (all prompts are P tokens; the random model rarely emits eos).
    - timing: an iteration is the wall time between the optimizer steps that close two consecutive generation
      batches (CUDA synchronised), so it also holds TRL's logging and data loading. `experience` is TRL's
      `_generate_and_score_completions` (generation, decoding, reward, old log-probs); `update` is the rest.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import torch  # noqa: E402

from hpc_rlhf.benchmarks.report import markdown_table  # noqa: E402
from hpc_rlhf.benchmarks.task import even_fraction, prepare_task  # noqa: E402

try:
    import datasets
    import transformers
    import trl
    from transformers import PreTrainedTokenizerFast, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer
except ImportError as error:  # a clear word instead of a stack trace on a machine without TRL
    raise SystemExit(f"bench_trl needs trl==1.16.0 and datasets (pip install -e '.[peer]', or trl==1.16.0 datasets): {error}")

TRL_VERSION = "1.16.0"
PRECISIONS = ("bf16", "bf16-autocast", "fp32")
# GRPOConfig fields that shape the work of an iteration: printed by --dry-run and stored in the JSON.
REPORTED_FIELDS = (
    "per_device_train_batch_size", "gradient_accumulation_steps", "generation_batch_size", "steps_per_generation",
    "num_generations", "max_completion_length", "max_steps", "num_iterations", "beta", "loss_type", "epsilon",
    "epsilon_high", "delta", "scale_rewards", "importance_sampling_level", "mask_truncated_completions",
    "top_entropy_quantile", "entropy_coef", "temperature", "top_p", "top_k", "min_p", "repetition_penalty",
    "learning_rate", "lr_scheduler_type", "warmup_steps", "optim", "adam_beta1", "adam_beta2", "adam_epsilon",
    "weight_decay", "max_grad_norm", "bf16", "fp16", "gradient_checkpointing", "model_init_kwargs",
    "disable_dropout", "shuffle_dataset", "seed", "use_cpu", "use_vllm", "vllm_mode", "vllm_gpu_memory_utilization",
    "vllm_max_model_length", "vllm_enable_sleep_mode", "vllm_importance_sampling_correction", "pad_to_multiple_of",
    "cache_implementation", "use_transformers_continuous_batching", "torch_compile", "report_to", "logging_steps",
    "save_strategy", "output_dir",
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--shape", default="qwen2.5-0.5b", help="model shape (hpc_rlhf.benchmarks.task.MODEL_SHAPES)")
    p.add_argument("--work-dir", default="/tmp/hpc_rlhf_bench", help="where the model and prompts are (re)built")
    p.add_argument("--iterations", type=int, default=4, help="generation batches, warm-up included")
    p.add_argument("--warmup", type=int, default=1, help="leading iterations left out of the medians")
    p.add_argument("--rollout-batch-size", type=int, default=64, help="prompts per iteration (B)")
    p.add_argument("--n-samples", type=int, default=8, help="samples per prompt, TRL's num_generations (K)")
    p.add_argument("--prompt-len", type=int, default=128, help="tokens per prompt (P)")
    p.add_argument("--gen-len", type=int, default=512, help="max new tokens per sample (G)")
    p.add_argument("--train-batch-size", type=int, default=128, help="samples per optimizer step (T)")
    p.add_argument("--micro-batch-size", type=int, default=16, help="samples per forward/backward (M)")
    p.add_argument("--lr", type=float, default=1e-6)
    p.add_argument("--beta", type=float, default=0.0, help="KL coefficient (> 0 loads a reference model, k3 KL)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    p.add_argument("--precision", choices=PRECISIONS, help="default: bf16 on cuda, fp32 on cpu (see the docstring)")
    p.add_argument("--gradient-checkpointing", action="store_true")
    p.add_argument("--use-vllm", action="store_true", help="TRL's colocated vLLM engine instead of HF generate")
    p.add_argument("--gpu-memory-utilization", type=float, default=0.35, help="vllm_gpu_memory_utilization")
    p.add_argument("--vllm-sleep-mode", action="store_true", help="vllm_enable_sleep_mode (offload between phases)")
    p.add_argument("--dry-run", action="store_true", help="print the GRPOConfig of these settings and exit")
    p.add_argument("--out", help="write settings, config, per-iteration records and the table as JSON")
    args = p.parse_args(argv)
    if args.precision is None:
        args.precision = "bf16" if args.device == "cuda" else "fp32"
    return args


@dataclass(frozen=True)
class BatchPlan:
    """The counts of one iteration, identical in hpc_rlhf and TRL for valid settings."""

    sequences: int  # B * K generated samples
    optimizer_steps: int  # B*K / T
    micro_batches: int  # B*K / M
    gradient_accumulation_steps: int  # T / M


def plan_batches(args: argparse.Namespace) -> BatchPlan:
    """Check that the batch flags divide as TRL needs (whole optimizer steps, whole micro-batches) and count."""
    for flag in ("iterations", "rollout_batch_size", "n_samples", "prompt_len", "gen_len", "train_batch_size",
                 "micro_batch_size"):
        if getattr(args, flag) < 1:
            raise SystemExit(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")
    if args.n_samples < 2:
        raise SystemExit(f"--n-samples must be >= 2 (GRPO groups), got {args.n_samples}")
    if not 0 <= args.warmup < args.iterations:
        raise SystemExit(f"--warmup must be in [0, --iterations), got {args.warmup} with {args.iterations} iterations")
    sequences = args.rollout_batch_size * args.n_samples
    if args.train_batch_size % args.micro_batch_size:
        raise SystemExit(f"--train-batch-size {args.train_batch_size} must be a multiple of --micro-batch-size "
                         f"{args.micro_batch_size} (gradient_accumulation_steps is a whole number)")
    if sequences % args.train_batch_size:
        raise SystemExit(f"--rollout-batch-size x --n-samples = {sequences} must be a multiple of --train-batch-size "
                         f"{args.train_batch_size} (an iteration is a whole number of optimizer steps)")
    return BatchPlan(sequences=sequences, optimizer_steps=sequences // args.train_batch_size,
                     micro_batches=sequences // args.micro_batch_size,
                     gradient_accumulation_steps=args.train_batch_size // args.micro_batch_size)


def grpo_config_kwargs(args: argparse.Namespace, plan: BatchPlan, output_dir: Path) -> dict[str, Any]:
    """The GRPOConfig arguments of these settings (the mapping in the module docstring)."""
    cuda = args.device == "cuda"
    kwargs: dict[str, Any] = dict(
        output_dir=str(output_dir),
        per_device_train_batch_size=args.micro_batch_size,
        gradient_accumulation_steps=plan.gradient_accumulation_steps,
        generation_batch_size=plan.sequences,
        num_generations=args.n_samples,
        max_completion_length=args.gen_len,
        max_steps=args.iterations * plan.optimizer_steps,
        num_iterations=1,
        beta=args.beta,
        loss_type="dapo",
        epsilon=0.2,
        epsilon_high=None,
        scale_rewards="group",
        temperature=1.0,
        top_p=1.0,
        top_k=0,
        min_p=None,
        repetition_penalty=1.0,
        learning_rate=args.lr,
        lr_scheduler_type="constant",
        warmup_steps=0,
        optim="adamw_torch_fused" if cuda else "adamw_torch",
        adam_beta1=0.9,
        adam_beta2=0.95,
        weight_decay=0.0,
        max_grad_norm=1.0,
        bf16=args.precision != "fp32",
        gradient_checkpointing=args.gradient_checkpointing,
        model_init_kwargs={"dtype": "bfloat16" if args.precision == "bf16" else "float32",
                           "attn_implementation": "sdpa"},
        disable_dropout=True,
        shuffle_dataset=True,
        seed=args.seed,
        use_cpu=not cuda,
        report_to="none",
        logging_strategy="steps",
        logging_steps=plan.optimizer_steps,
        save_strategy="no",
        eval_strategy="no",
        disable_tqdm=True,
        use_vllm=args.use_vllm,
    )
    if args.use_vllm:
        kwargs.update(vllm_mode="colocate", vllm_gpu_memory_utilization=args.gpu_memory_utilization,
                      vllm_max_model_length=args.prompt_len + args.gen_len,
                      vllm_enable_sleep_mode=args.vllm_sleep_mode)
    return kwargs


def resolved_config(kwargs: dict[str, Any]) -> tuple[Any, str]:
    """GRPOConfig(**kwargs), or on a host without a GPU the same with use_cpu=True (only to show derived fields)."""
    try:
        return GRPOConfig(**kwargs), ""
    except ValueError as error:
        if kwargs.get("use_cpu") or "bf16" not in str(error):
            raise
        return GRPOConfig(**{**kwargs, "use_cpu": True}), f"(resolved with use_cpu=True on this host: {error})"


def config_summary(config: Any) -> dict[str, Any]:
    """The REPORTED_FIELDS of a resolved GRPOConfig, as JSON-friendly values."""
    out = {}
    for name in REPORTED_FIELDS:
        value = getattr(config, name)
        out[name] = value if isinstance(value, (int, float, str, bool, type(None), dict, list)) else str(value)
    return out


def even_id_reward(completions: list[str], **_unused: Any) -> list[float]:
    """The benchmark reward: the fraction of even token ids in each completion (as hpc_rlhf's reward_func)."""
    return [even_fraction(text) for text in completions]


def load_prompts(prompt_file: Path, count: int) -> datasets.Dataset:
    """The first `count` prompts of the JSONL file as a plain-text `prompt` column (no chat template)."""
    rows = []
    with prompt_file.open() as f:
        for line_no, line in enumerate(f, start=1):
            if len(rows) == count:
                break
            row = json.loads(line)
            if not isinstance(row.get("input"), str):
                raise ValueError(f"{prompt_file}:{line_no}: expected a string 'input' field")  # noqa: TRY004
            rows.append({"prompt": row["input"]})
    if len(rows) < count:
        raise ValueError(f"{prompt_file} holds {len(rows)} prompts, the run needs {count}")
    return datasets.Dataset.from_list(rows)


def load_tokenizer(model_dir: Path, sample_prompt: str, prompt_len: int) -> Any:
    """The word tokenizer of the model folder, checked to encode a prompt word-for-word (`w<i>` -> i, no bos)."""
    tokenizer = PreTrainedTokenizerFast.from_pretrained(str(model_dir))
    tokenizer.padding_side = "left"
    ids = tokenizer(text=[sample_prompt])["input_ids"][0]
    expected = [int(word[1:]) for word in sample_prompt.split()]
    if ids != expected or len(ids) != prompt_len:
        raise SystemExit(f"{model_dir}: {type(tokenizer).__name__} does not give the word tokenizer back "
                         f"({len(ids)} ids, first {ids[:5]}; expected {prompt_len}, first {expected[:5]})")
    return tokenizer


@dataclass
class PhaseTotals:
    """What the trainer did since the last iteration boundary (seconds are CUDA-synchronised wall time)."""

    generate_s: float = 0.0  # TRL's generation call (vLLM: includes weight_sync_s)
    weight_sync_s: float = 0.0  # vLLM only: pushing the trained weights into the engine
    experience_s: float = 0.0  # _generate_and_score_completions: generation, reward, old log-probs
    generate_calls: int = 0
    sequences: int = 0
    prompt_tokens: int = 0
    generated_tokens: int = 0


@dataclass
class IterationRecord(PhaseTotals):
    """One iteration: its wall time, phase totals and the counts the check compares with the plan."""

    seconds: float = 0.0
    optimizer_steps: int = 0
    micro_batches: int = 0
    end_unix_s: float = 0.0


class PhaseClock:
    """Accumulates phase times and token counts; `synchronize` makes device work finish before a clock is read."""

    def __init__(self, synchronize: Callable[[], None]) -> None:
        self.synchronize = synchronize
        self.totals = PhaseTotals()

    @contextmanager
    def phase(self, name: str) -> Iterator[None]:
        self.synchronize()
        start = time.perf_counter()
        try:
            yield
        finally:
            self.synchronize()
            key = f"{name}_s"
            setattr(self.totals, key, getattr(self.totals, key) + time.perf_counter() - start)

    def take(self) -> PhaseTotals:
        totals, self.totals = self.totals, PhaseTotals()
        return totals


class TimedGRPOTrainer(GRPOTrainer):
    """GRPOTrainer with its generation and experience phases timed; the algorithm is TRL's, untouched."""

    def __init__(self, *args: Any, clock: PhaseClock, **kwargs: Any) -> None:
        self.clock = clock
        super().__init__(*args, **kwargs)
        if self.use_vllm:
            engine = self.vllm_generation
            sync_weights = engine.sync_weights

            def timed_sync_weights() -> None:
                with clock.phase("weight_sync"):
                    sync_weights()

            engine.sync_weights = timed_sync_weights

    def _generate_single_turn(self, prompt_ids, *args, **kwargs):
        """TRL's generation call, timed, with the sequences and tokens it produced counted."""
        with self.clock.phase("generate"):
            completion_ids, logprobs = super()._generate_single_turn(prompt_ids, *args, **kwargs)
        totals = self.clock.totals
        totals.generate_calls += 1
        totals.sequences += len(completion_ids)
        totals.prompt_tokens += sum(len(ids) for ids in prompt_ids)
        totals.generated_tokens += sum(len(ids) for ids in completion_ids)
        return completion_ids, logprobs

    def _generate_and_score_completions(self, inputs):
        """TRL's whole experience step (generation, reward, old log-probs), timed."""
        with self.clock.phase("experience"):
            return super()._generate_and_score_completions(inputs)


class IterationTimer(TrainerCallback):
    """Closes an iteration at every `steps_per_iteration`-th optimizer step and keeps TRL's log lines."""

    def __init__(self, clock: PhaseClock, steps_per_iteration: int) -> None:
        self.clock = clock
        self.steps_per_iteration = steps_per_iteration
        self.records: list[IterationRecord] = []
        self.logs: list[dict[str, Any]] = []
        self.model_facts: dict[str, Any] = {}
        self._start = 0.0
        self._steps = 0
        self._micro_batches = 0

    def on_train_begin(self, args, state, control, model=None, **kwargs):
        if model is not None:
            parameter = next(model.parameters())
            # transformers >= 5.23 renamed the flag; read the new name first, the old one before it
            checkpointing = getattr(model, "is_activation_checkpointing", None)
            if checkpointing is None:
                checkpointing = getattr(model, "is_gradient_checkpointing", False)
            self.model_facts = {"gradient_checkpointing": bool(checkpointing),
                                "parameter_dtype": str(parameter.dtype), "device": str(parameter.device),
                                "attn_implementation": getattr(model.config, "_attn_implementation", None),
                                "parameters": sum(p.numel() for p in model.parameters())}
        self.clock.synchronize()
        self._start = time.perf_counter()

    def on_substep_end(self, args, state, control, **kwargs):
        self._micro_batches += 1

    def on_step_end(self, args, state, control, **kwargs):
        self._micro_batches += 1
        self._steps += 1
        if state.global_step % self.steps_per_iteration:
            return
        self.clock.synchronize()
        now = time.perf_counter()
        totals = self.clock.take()
        self.records.append(IterationRecord(**asdict(totals), seconds=now - self._start, optimizer_steps=self._steps,
                                            micro_batches=self._micro_batches, end_unix_s=time.time()))
        self._start, self._steps, self._micro_batches = now, 0, 0

    def on_log(self, args, state, control, logs=None, **kwargs):
        self.logs.append({"step": state.global_step, **(logs or {})})


def count_checks(records: list[IterationRecord], plan: BatchPlan) -> list[str]:
    """Differences between each iteration's counts and hpc_rlhf's for the same flags (empty when all agree)."""
    problems = []
    for index, record in enumerate(records):
        for field_name, expected in (("sequences", plan.sequences), ("optimizer_steps", plan.optimizer_steps),
                                     ("micro_batches", plan.micro_batches), ("generate_calls", 1)):
            actual = getattr(record, field_name)
            if actual != expected:
                problems.append(f"iteration {index}: {field_name} = {actual}, hpc_rlhf's iteration has {expected}")
    return problems


def summarize(records: list[IterationRecord], warmup: int) -> dict[str, Any]:
    """Medians over the iterations after the warm-up: seconds per phase and tokens per second."""
    measured = records[warmup:] or records

    def med(values: list[float]) -> float:
        return statistics.median(values) if values else 0.0

    rows = []
    for record in measured:
        update_s = record.seconds - record.experience_s
        train_tokens = record.prompt_tokens + record.generated_tokens
        rows.append({
            "iteration_s": record.seconds, "generate_s": record.generate_s - record.weight_sync_s,
            "weight_sync_s": record.weight_sync_s, "experience_rest_s": record.experience_s - record.generate_s,
            "update_s": update_s, "generated_tokens": record.generated_tokens,
            "generated_tokens_per_s": record.generated_tokens / record.seconds,
            "generate_tokens_per_s": record.generated_tokens / max(record.generate_s - record.weight_sync_s, 1e-9),
            "update_tokens_per_s": train_tokens / max(update_s, 1e-9),
            "mean_response_len": record.generated_tokens / max(record.sequences, 1),
        })
    return {key: med([row[key] for row in rows]) for key in rows[0]} | {"iterations_measured": len(measured)}


def print_table(args: argparse.Namespace, plan: BatchPlan, summary: dict[str, Any]) -> str:
    iteration = summary["iteration_s"]
    phases = [("generate", "generate_s", "generate_tokens_per_s"), ("weight sync", "weight_sync_s", None),
              ("reward + old log-probs", "experience_rest_s", None), ("update", "update_s", "update_tokens_per_s")]
    rows = [{"phase": name, "seconds": summary[key], "share": 100 * summary[key] / iteration,
             "tok_s": summary[rate] if rate else None}
            for name, key, rate in phases if key != "weight_sync_s" or args.use_vllm]
    rows.append({"phase": "iteration", "seconds": iteration, "share": 100.0,
                 "tok_s": summary["generated_tokens_per_s"]})
    table = markdown_table(rows, [("phase", "phase", ""), ("seconds", "s/iter", ".2f"), ("share", "% of iter", ".1f"),
                                  ("tok_s", "tokens/s", ",.0f")])
    head = (f"trl {trl.__version__} GRPO {args.shape} generation={'vllm' if args.use_vllm else 'hf'} "
            f"precision={args.precision} device={args.device}: iteration {iteration:.2f} s (median of "
            f"{summary['iterations_measured']}), {plan.sequences} sequences x {summary['mean_response_len']:.0f} "
            f"new tokens, {plan.optimizer_steps} optimizer steps of {plan.gradient_accumulation_steps} micro-batches\n"
            f"tokens/s: generate = new tokens / generate s; update = (prompt + new) tokens / update s; "
            f"iteration = new tokens / iteration s")
    text = head + "\n" + table
    print(text, flush=True)
    return text


def versions() -> dict[str, str | None]:
    """Versions of the stack that ran, and the GPU's name."""
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    out = {"torch": torch.__version__, "transformers": transformers.__version__, "trl": trl.__version__,
           "datasets": datasets.__version__, "gpu": gpu}
    for name in ("accelerate", "vllm"):
        try:
            out[name] = __import__(name).__version__
        except ImportError:
            out[name] = None
    return out


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    plan = plan_batches(args)
    if trl.__version__ != TRL_VERSION:
        print(f"warning: the GRPOConfig mapping was written for trl {TRL_VERSION}, this is {trl.__version__}",
              file=sys.stderr)
    cuda = args.device == "cuda"
    if cuda and not args.dry_run and not torch.cuda.is_available():
        raise SystemExit("--device cuda but torch sees no GPU (use --device cpu)")
    work = Path(args.work_dir)
    name = f"trl-grpo-{args.shape}-{'vllm' if args.use_vllm else 'hf'}-{args.precision}"
    kwargs = grpo_config_kwargs(args, plan, work / "runs" / name)
    if args.dry_run:
        config, note = resolved_config(kwargs)
        print(json.dumps({"plan": asdict(plan), "grpo_config_kwargs": kwargs, "resolved": config_summary(config)},
                         indent=1))
        if note:
            print(note)
        return 0

    model_dir, prompt_file = prepare_task(work, args.shape, prompts=args.rollout_batch_size * args.iterations,
                                          prompt_len=args.prompt_len, seed=args.seed,
                                          device="cuda" if cuda else "cpu")
    dataset = load_prompts(prompt_file, args.rollout_batch_size * args.iterations)
    tokenizer = load_tokenizer(model_dir, dataset[0]["prompt"], args.prompt_len)
    config = GRPOConfig(**kwargs)
    clock = PhaseClock(torch.cuda.synchronize if cuda else (lambda: None))
    timer = IterationTimer(clock, plan.optimizer_steps)
    trainer = TimedGRPOTrainer(model=str(model_dir), reward_funcs=even_id_reward, args=config, train_dataset=dataset,
                               processing_class=tokenizer, callbacks=[timer], clock=clock)
    started = time.time()
    trainer.train()
    wall_s = time.time() - started
    records = timer.records
    if len(records) != args.iterations:
        print(f"expected {args.iterations} iterations, timed {len(records)}", file=sys.stderr)
        return 1
    problems = count_checks(records, plan)
    summary = summarize(records, args.warmup)
    table = print_table(args, plan, summary)
    print(f"model: {timer.model_facts}")
    print("counts per iteration match hpc_rlhf's (sequences, optimizer steps, micro-batches, one generation): "
          + ("yes" if not problems else "NO\n  " + "\n  ".join(problems)))
    if args.out:
        Path(args.out).write_text(json.dumps({
            "settings": vars(args), "plan": asdict(plan), "grpo_config": config_summary(config),
            "versions": versions(), "model": timer.model_facts, "summary": summary, "table": table,
            "iterations": [asdict(record) for record in records], "trl_logs": timer.logs,
            "count_problems": problems, "wall_s": wall_s,
        }, indent=1, default=str))
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
