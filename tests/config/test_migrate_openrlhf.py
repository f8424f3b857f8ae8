"""OpenRLHF command lines -> hpc_rlhf configs (hpc_rlhf.config.openrlhf, tools/from_openrlhf.py): both flag namings
give the hand-checked config, the YAML loads with hpc_rlhf's loader, and untranslated or bad flags are named."""

from __future__ import annotations

import dataclasses
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from hpc_rlhf.config.schema import Config
from hpc_rlhf.config.loading import apply_mapping, load_config
from hpc_rlhf.config.openrlhf import MigrationError, migrate
from hpc_rlhf.config.openrlhf_flags import ALL, ENTRY_TRAINERS, FLAGS, OPENRLHF_DEFAULTS

REPO = Path(__file__).resolve().parents[2]
TOOL = REPO / "tools" / "from_openrlhf.py"

# OpenRLHF's hybrid-engine example (README, 0.8) turned into GRPO as its README says (group_norm, KL as a k3 loss,
# 8 samples per prompt), with a rule reward file: the older flat flag names ...
GRPO_FLAT = """
   --ref_num_nodes 1 --ref_num_gpus_per_node 8 --actor_num_nodes 1 --actor_num_gpus_per_node 8
   --vllm_num_engines 4 --vllm_tensor_parallel_size 2 --colocate_all_models --vllm_gpu_memory_utilization 0.5
   --pretrain Qwen/Qwen2.5-7B-Instruct --remote_rm_url /openrlhf/examples/python/reward_func.py
   --save_path /checkpoints/qwen2.5-7b-grpo --ckpt_path /checkpoints/qwen2.5-7b-grpo/ckpt --save_hf_ckpt
   --micro_train_batch_size 8 --train_batch_size 128 --micro_rollout_batch_size 16 --rollout_batch_size 128
   --n_samples_per_prompt 8 --max_epochs 1 --prompt_max_len 1024 --max_samples 100000 --generate_max_len 1024
   --advantage_estimator group_norm --use_kl_loss --kl_estimator k3 --init_kl_coef 1e-3
   --zero_stage 3 --bf16 --actor_learning_rate 5e-7 --critic_learning_rate 9e-6
   --prompt_data /data/math/train.jsonl --input_key context_messages --label_key answer --apply_chat_template
   --normalize_reward --gradient_checkpointing --packing_samples --vllm_sync_backend nccl --enforce_eager
   --vllm_enable_sleep --deepspeed_enable_sleep --use_wandb {wandb_token}
"""
# ... and the same run in the nested groups of OpenRLHF 0.10+ (max_len is prompt + response there).
GRPO_NESTED = """
   --ref.num_nodes 1 --ref.num_gpus_per_node 8 --actor.num_nodes 1 --actor.num_gpus_per_node 8
   --vllm.num_engines 4 --vllm.tensor_parallel_size 2 --train.colocate_all --vllm.gpu_memory_utilization 0.5
   --actor.model_name_or_path Qwen/Qwen2.5-7B-Instruct --reward.remote_url /openrlhf/examples/python/reward_func.py
   --ckpt.output_dir /checkpoints/qwen2.5-7b-grpo --ckpt.path /checkpoints/qwen2.5-7b-grpo/ckpt --ckpt.save_hf
   --train.micro_batch_size 8 --train.batch_size 128 --rollout.micro_batch_size 16 --rollout.batch_size 128
   --rollout.n_samples_per_prompt 8 --train.max_epochs 1 --data.max_len 2048 --data.max_samples 100000
   --rollout.max_new_tokens 1024
   --algo.advantage.estimator group_norm --algo.kl.use_loss --algo.kl.estimator k3 --algo.kl.init_coef 1e-3
   --ds.zero_stage 3 --ds.param_dtype bf16 --actor.adam.lr 5e-7 --critic.adam.lr 9e-6
   --data.prompt_dataset /data/math/train.jsonl --data.input_key context_messages --data.label_key answer
   --data.apply_chat_template --reward.normalize_enable --actor.gradient_checkpointing_enable --ds.packing_samples
   --vllm.sync_backend nccl --vllm.enforce_eager --vllm.enable_sleep --ds.enable_sleep --logger.wandb.key tok
"""
GRPO_EXPECTED = {
    "actor": {"learning_rate": 5e-7, "gradient_checkpointing": True, "pretrain": "Qwen/Qwen2.5-7B-Instruct"},
    "ref": {"micro_batch_size": 16},
    "logger": {"use_wandb": True},  # --use_wandb TOKEN: the token itself is left to WANDB_API_KEY
    "reward": {"reward_func_path": "/openrlhf/examples/python/reward_func.py", "micro_batch_size": 16},
    "vllm": {"gpu_memory_utilization": 0.5, "enable_sleep": True, "enforce_eager": True},
    "rollout": {"batch_size": 128, "n_samples_per_prompt": 8, "prompt_max_len": 1024, "generate_max_len": 1024},
    "data": {"prompt_data": "/data/math/train.jsonl", "input_key": "context_messages", "label_key": "answer",
             "apply_chat_template": True, "max_samples": 100000},
    "train": {"trainer": "ppo", "max_epochs": 1, "train_batch_size": 128, "micro_train_batch_size": 8,
              "packing_samples": True, "run_dir": "/checkpoints/qwen2.5-7b-grpo"},
    # KL as a loss weighted by init_kl_coef, as OpenRLHF does; the group std epsilon is OpenRLHF's
    "algo": {"advantage_estimator": "group_norm", "init_kl_coef": 0.0, "use_kl_loss": True, "kl_loss_coef": 0.001,
             "kl_estimator": "k3", "group_std_eps": 1e-9, "normalize_reward": True,
             "reward_clip_stage": "after_baseline"},
    "eval": {"data": None},
    "ds": {"zero_stage": 3, "bf16": True, "enable_sleep": True},
    # hybrid engine: every role on the actor's 8 GPUs, 4 vLLM engines of TP 2; no critic (group_norm), no reward model
    "layout": {"generator": {"gpus": 8, "tp": 2}, "actor": {"gpus": 8}, "critic": {"gpus": 0},
               "reward": {"gpus": 0}, "reference": {"gpus": 8}, "colocate": True},
    "slurm": {"nodes": 1, "gpus_per_node": 8},
}


def translate(command: str, entry: str = "train_ppo_ray", launcher: tuple[str, ...] = ()):
    return migrate(shlex.split(command), entry, launcher)


def write_yaml(tmp_path: Path, config: dict) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return path


def run_tool(*args: str, cwd: Path = REPO) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TOOL), *args], cwd=cwd, capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize("command", [GRPO_FLAT, GRPO_NESTED], ids=["flat", "nested"])
def test_grpo_command_gives_the_expected_config(command):
    config, notes = translate(command)
    assert config == GRPO_EXPECTED
    assert [note.flag for note in notes] == (
        ["--ckpt_path", "--save_hf_ckpt", "--critic_learning_rate"] if command is GRPO_FLAT else
        ["--ckpt.path", "--ckpt.save_hf", "--critic.adam.lr"])
    assert all(note.reason for note in notes)


def test_translated_yaml_loads_with_the_config_loader(tmp_path):
    config, _ = translate(GRPO_FLAT)
    loaded = load_config(write_yaml(tmp_path, config)).config
    assert loaded.algo.advantage_estimator == "group_norm" and loaded.algo.kl_loss_coef == 0.001
    assert loaded.layout.world_size() == loaded.slurm.nodes * loaded.slurm.gpus_per_node == 8
    assert loaded.layout.generator.tp == 2 and loaded.layout.colocate
    assert loaded.reward.reward_func_path.endswith("reward_func.py") and loaded.reward.pretrain is None


@pytest.mark.parametrize("command", ["--lora_rank 8 --lora_alpha 16 --lora_dropout 0.05 --target_modules q_proj v_proj",
                                     "--ds.lora.rank 8 --ds.lora.alpha 16 --ds.lora.dropout 0.05 "
                                     "--ds.lora.target_modules q_proj v_proj"], ids=["flat", "nested"])
def test_lora_flags_of_a_ppo_command_give_the_actor_adapters(command, tmp_path):
    config, notes = translate("--pretrain m --prompt_data p.jsonl --remote_rm_url u --advantage_estimator group_norm "
                              "--n_samples_per_prompt 4 --colocate_all_models " + command + " --load_in_4bit")
    assert config["lora"] == {"rank": 8, "alpha": 16, "dropout": 0.05, "target_modules": ["q_proj", "v_proj"]}
    reasons = {note.flag: note.reason for note in notes}
    assert "4-bit base" in reasons["--load_in_4bit"]  # QLoRA stays off where a generator runs the policy
    loaded = load_config(write_yaml(tmp_path, config)).config
    assert (loaded.train.trainer, loaded.lora.rank, loaded.lora.load_in_4bit) == ("ppo", 8, False)


def test_unknown_and_untranslatable_flags_are_listed_never_dropped():
    config, notes = translate("--pretrain m --prompt_data p.jsonl --remote_rm_url http://rm:5000/get_reward "
                              "--advantage_estimator rloo --n_samples_per_prompt 4 --vllm_num_engines 1 "
                              "--actor_num_gpus_per_node 1 --colocate_all_models --frobnicate 3 --no_such_switch "
                              "--ring_head_stride 2 --ds_tensor_parallel_size 1 --use_wandb tok --ptx_coef 0.05")
    reasons = {note.flag: note.reason for note in notes}
    assert "unknown" in reasons["--frobnicate"] and "unknown" in reasons["--no_such_switch"]
    assert "no equivalent" in reasons["--ring_head_stride"] and "ring" in reasons["--ring_head_stride"]
    assert "--ptx_coef" in reasons and "--use_wandb" not in reasons
    assert config["logger"] == {"use_wandb": True}  # the key itself stays out of the config
    assert "--ds_tensor_parallel_size" not in reasons  # 1 changes nothing in OpenRLHF either
    assert config["reward"]["remote_url"] == "http://rm:5000/get_reward"


@pytest.mark.parametrize("spelling", ["--use_ds_universal_ckpt", "--ds.use_universal_ckpt"])
def test_universal_checkpoint_flag_sets_ds_universal_ckpt(spelling):
    config, notes = translate(f"--pretrain m --prompt_data p.jsonl --remote_rm_url http://rm:5000/get_reward "
                              f"--vllm_num_engines 1 --actor_num_gpus_per_node 1 --colocate_all_models {spelling}")
    assert config["ds"]["universal_ckpt"] is True
    assert spelling not in {note.flag for note in notes}


@pytest.mark.parametrize("command, flag, words", [
    ("--rollout_batch_size abc", "--rollout_batch_size", "'abc'"),
    ("--n_samples_per_prompt 1.5", "--n_samples_per_prompt", "'1.5'"),
    ("--lr_scheduler linear", "--lr_scheduler", "linear"),
    ("--advantage_estimator flash_reinforce", "--advantage_estimator", "flash_reinforce"),
    ("--algo.kl.estimator k4", "--algo.kl.estimator", "k4"),
    ("--reward_pretrain a/rm1,b/rm2", "--reward_pretrain", "several reward models"),
    ("--bf16 yes", "--bf16", "takes no value"),
])
def test_a_value_that_cannot_be_converted_names_its_flag(command, flag, words):
    with pytest.raises(MigrationError) as err:
        translate(f"--pretrain m --prompt_data p.jsonl {command}")
    lines = str(err.value).splitlines()
    assert len(lines) == 1 and lines[0].startswith(flag) and words in lines[0], lines


def test_kl_loss_without_coefficient_and_disaggregated_layout(tmp_path):
    config, _ = translate(
        "--pretrain m --prompt_data p.jsonl --reward_pretrain rm --ref_num_gpus_per_node 4 "
        "--reward_num_gpus_per_node 4 --critic_num_gpus_per_node 4 --actor_num_gpus_per_node 4 "
        "--vllm_num_engines 2 --vllm_tensor_parallel_size 2 "
        "--colocate_critic_reward --colocate_actor_ref --rollout_batch_size 8 --train_batch_size 8 "
        "--micro_train_batch_size 2 --eps_clip 0.1")
    layout = config["layout"]
    assert config["algo"]["advantage_estimator"] == "gae" and config["algo"]["init_kl_coef"] == 0.01  # defaults
    assert config["critic"]["pretrain"] == "rm"  # OpenRLHF starts the critic from the reward model
    assert (config["algo"]["eps_clip_low"], config["algo"]["eps_clip_high"]) == (0.1, 0.1)
    assert layout["colocate"] is False and layout["generator"] == {"gpus": 4, "tp": 2}
    assert layout["reference"] == {"gpus": 4, "share_with": "actor"}
    assert layout["reward"] == {"gpus": 4, "share_with": "critic"}
    assert config["slurm"] == {"nodes": 3, "gpus_per_node": 4}  # generator 4 + actor 4 + critic 4; the others share
    assert load_config(write_yaml(tmp_path, config)).config.layout.world_size() == 12
    no_kl, _ = translate("--pretrain m --prompt_data p.jsonl --remote_rm_url u --advantage_estimator rloo "
                         "--n_samples_per_prompt 4 --use_kl_loss --init_kl_coef 0 --vllm_num_engines 8 "
                         "--colocate_all_models")
    assert no_kl["algo"]["init_kl_coef"] == 0.0 and "use_kl_loss" not in no_kl["algo"]
    assert no_kl["layout"]["reference"] == {"gpus": 0}  # OpenRLHF starts no reference model then


@pytest.mark.parametrize("entry", [e for e in ENTRY_TRAINERS if e not in ("train_ppo", "train_ppo_ray")])
def test_every_entry_gives_its_trainer_and_a_config_that_loads(entry, tmp_path):
    flags = {"train_sft": "--pretrain m --dataset d.jsonl --input_key q --output_key a --lora_rank 8",
             "train_rm": "--pretrain m --dataset d.jsonl --prompt_key prompt --loss logexp --margin_loss",
             "train_dpo": "--pretrain m --dataset d.jsonl --prompt_key prompt --beta 0.1 --ipo --ref_pretrain r",
             "train_kto": "--pretrain m --dataset d.jsonl --desirable_loss_weight 1.3",
             "train_prm": "--pretrain m --dataset d.jsonl --placeholder_token ки --reward_tokens + -",
             "train_kd": "--pretrain m --dataset d.jsonl --teacher_model t --kd_coef 0.5",
             "batch_inference": "--eval_task generate_vllm --pretrain m --dataset d.jsonl --best_of_n 4 --tp_size 2 "
                                "--max_new_tokens 512"}[entry]
    config, notes = translate(flags, entry, ("deepspeed", "--num_gpus", "2", "--module"))
    assert config["train"]["trainer"] == ENTRY_TRAINERS[entry]
    assert config["layout"] == {"generator": {"gpus": 2} | ({"tp": 2} if entry == "batch_inference" else {}),
                                "actor": {"gpus": 2}, "colocate": True}
    if entry == "batch_inference":  # the generation step alone has no reward: the note says what to add
        assert any("reward.pretrain" in note.reason for note in notes)
        config["reward"]["reward_func_path"] = "hpc_rlhf.tasks.arithmetic"
    loaded = load_config(write_yaml(tmp_path, config)).config
    assert loaded.slurm.nodes * loaded.slurm.gpus_per_node == 2


def test_table_spellings_keys_and_defaults_are_consistent():
    for trainer in ALL:  # a spelling means one flag per entry
        names = [name for flag in FLAGS if trainer in flag.trainers for name in flag.names]
        assert len(names) == len(set(names)), [n for n in names if names.count(n) > 1]
    for flag in FLAGS:
        assert flag.keys or flag.note or flag.how, flag.names
        for key in flag.keys:
            node = Config()
            for part in key.split("."):
                assert dataclasses.is_dataclass(node) and part in {f.name for f in dataclasses.fields(node)}, key
                node = getattr(node, part)
    for trainer, defaults in OPENRLHF_DEFAULTS.items():
        nested: dict = {}
        for key, value in defaults.items():
            section, field = key.split(".")
            nested.setdefault(section, {})[field] = value
        assert apply_mapping(Config(), nested, trainer, {}) == [], trainer


GRPO_SCRIPT = """#!/bin/bash
set -x
MODEL=Qwen/Qwen2.5-7B-Instruct
export SAVE="/checkpoints/qwen2.5-7b-grpo"

ray job submit --address="http://127.0.0.1:8265" \\
   --runtime-env-json='{"working_dir": "/openrlhf"}' \\
   -- python3 -m openrlhf.cli.train_ppo_ray \\
   --pretrain $MODEL \\
   --save_path ${SAVE} \\
   --input_template $'User: {}\\nAssistant: ' \\
""" + "".join(f"   {line.strip()} \\\n" for line in GRPO_FLAT.strip().splitlines()
              if line.strip()).replace("--pretrain Qwen/Qwen2.5-7B-Instruct ", "").replace(
    "--save_path /checkpoints/qwen2.5-7b-grpo ", "") + "   --frobnicate 1 2>&1 | tee train.log\n"


def test_cli_translates_a_script_end_to_end(tmp_path):
    script = tmp_path / "train_grpo.sh"
    script.write_text(GRPO_SCRIPT)
    out = tmp_path / "out" / "grpo.yaml"
    result = run_tool(str(script), "--out", str(out))
    assert result.returncode == 0, result.stderr
    assert "--save_hf_ckpt" in result.stdout and "--frobnicate" in result.stdout
    text = out.read_text()
    assert text.startswith("# Translated from OpenRLHF") and "#   --frobnicate: unknown flag" in text
    loaded = load_config(out).config
    document = yaml.safe_load(text)
    assert document == GRPO_EXPECTED | {"data": GRPO_EXPECTED["data"] | {"input_template": "User: {}\nAssistant: "}}
    assert loaded.data.input_template == "User: {}\nAssistant: "


def test_cli_reads_a_deepspeed_heredoc_script_and_reports_bad_values(tmp_path):
    script = tmp_path / "train_sft.sh"
    script.write_text("set -x\n\nread -r -d '' training_commands <<EOF\nopenrlhf.cli.train_sft \\\n"
                      "   --max_len 2048 \\\n   --dataset /data/sft.jsonl \\\n   --pretrain /models/llama \\\n"
                      "   --train_batch_size 256 --micro_train_batch_size 2 \\\n   --bf16 --learning_rate 5e-6\nEOF\n"
                      "    # --use_wandb [WANDB_TOKENS]\n\nif [[ ${1} != \"slurm\" ]]; then\n"
                      "    deepspeed --module $training_commands\nfi\n")
    out = tmp_path / "sft.yaml"
    result = run_tool(str(script), "--out", str(out))
    assert result.returncode == 0, result.stderr
    config = load_config(out).config
    assert (config.train.trainer, config.data.max_len, config.actor.learning_rate) == ("sft", 2048, 5e-6)
    assert "deepspeed --num_gpus" in result.stdout  # GPU count not in the script: said, with what was written
    bad = run_tool("--out", str(tmp_path / "bad.yaml"), "--", "python3", "-m", "openrlhf.cli.train_ppo_ray",
                   "--rollout_batch_size", "many")
    assert bad.returncode == 2 and "--rollout_batch_size: expected an integer, got 'many'" in bad.stderr
    assert not (tmp_path / "bad.yaml").exists()


def test_vision_language_flags_translate():
    """OpenRLHF's VLM options (0.10+ names): the image column and the image budget; freezing the vision tower is
    listed as untranslated."""
    config, notes = translate("--actor.model_name_or_path m --data.prompt_dataset p.jsonl --reward.remote_url r.py "
                              "--data.image_key pics --data.max_images_per_prompt 2 --actor.freeze_visual_encoder")
    assert config["data"]["image_key"] == "pics" and config["data"]["max_images_per_prompt"] == 2
    assert "--actor.freeze_visual_encoder" in [note.flag for note in notes]


def test_ring_attn_size_becomes_sequence_parallelism():
    config, notes = translate("--pretrain m --prompt_data p.jsonl --packing_samples --ring_attn_size 2")
    assert config["ds"]["ring_attn_size"] == 2
    assert config["train"]["packing_samples"] is True
    assert not [note for note in notes if note.flag == "--ring_attn_size"]


@pytest.mark.parametrize("flag", ["--partial_rollout", "--train.partial_rollout_enable"])
def test_partial_rollout_translates_with_async_training(flag):
    config, notes = translate(f"--pretrain m --prompt_data p.jsonl --async_train --vllm_num_engines 2 {flag}")
    assert config["rollout"]["partial_rollout"] is True and config["rollout"]["async_queue"] == 1
    assert not [note for note in notes if note.flag == flag]
    config, notes = translate(f"--pretrain m --prompt_data p.jsonl {flag}")  # synchronous: listed, not set
    assert "partial_rollout" not in config["rollout"]
    assert [note.flag for note in notes if note.flag == flag] == [flag]
