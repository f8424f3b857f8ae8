"""Vision-language GRPO on the CPU with builtin:tiny-vlm: each prompt shows a solid-colour image and the reward checks
that the answer names the colour. The images travel end to end: the shard holds their PNG bytes, and the log-probs the
trainer side (the reference) recomputes from the shard alone equal the generator's, which depend on the image."""

from __future__ import annotations

import io
import json
import textwrap
from pathlib import Path

import pytest
import torch
from PIL import Image
from transformers import AutoProcessor

from hpc_rlhf.builtin_models.resolve import resolve_model_path
from hpc_rlhf.data.images import decode_png, image_png_bytes
from hpc_rlhf.data.records import RowRef
from hpc_rlhf.generation.engine import SamplingParams
from hpc_rlhf.generation.hf_engine import HFEngine
from hpc_rlhf.rollouts import RolloutReader
from hpc_rlhf.training.batching import TokenSample, make_micro_batches
from hpc_rlhf.training.forwards import causal_lm_log_probs

COLOURS = {"red": (255, 0, 0), "green": (0, 160, 0), "blue": (0, 0, 255), "white": (255, 255, 255)}

REWARD = '''
def reward_func(queries, prompts, labels, **_):
    """1 when the response (the text after the prompt) names the image's colour, else 0."""
    rewards = []
    for query, prompt, label in zip(queries, prompts, labels):
        assert query.startswith(prompt), (query, prompt)
        rewards.append(1.0 if label in query[len(prompt):] else 0.0)
    return {"rewards": rewards, "scores": rewards, "extra_logs": {}}
'''


def colour_dataset(folder: Path) -> Path:
    """One prompt per colour: the image as a file path relative to the dataset, the colour name as the label."""
    for name, rgb in COLOURS.items():
        Image.new("RGB", (20, 20), rgb).save(folder / f"{name}.png")
    rows = [{"input": "Which colour is this image?", "label": name, "images": [f"{name}.png"]} for name in COLOURS]
    path = folder / "colours.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    return path


@pytest.mark.timeout(300)
def test_grpo_with_images_keeps_them_from_generator_to_trainer(tmp_path, jobs):
    data = colour_dataset(tmp_path)
    reward = tmp_path / "colour_reward.py"
    reward.write_text(textwrap.dedent(REWARD))
    run_dir = tmp_path / "run"
    jobs.run(run_dir, "--actor.pretrain=builtin:tiny-vlm", f"--data.prompt_data={data}", "--data.input_key=input",
             "--data.label_key=label", "--data.apply_chat_template=true", "--data.max_images_per_prompt=1",
             f"--reward.reward_func_path={reward}", "--algo.init_kl_coef=0.01", "--layout.reference.gpus=1",
             "--train.max_iterations=2", "--algo.off_policy_correction=tis")

    reader = RolloutReader(run_dir)
    for iteration in range(2):
        table = reader.read(iteration, require_filled=["reward", "score", "reference_log_probs"])
        rows = table.to_pylist()
        assert len(rows) == 4
        for row in rows:
            # The shard holds the prompt's image: the PNG of the labelled colour, as the dataset gave it.
            expected = image_png_bytes(f"{row['label']}.png", RowRef(file=data, row=0))
            assert row["images"] == [expected]
            assert decode_png(row["images"])[0].getpixel((3, 3)) == COLOURS[row["label"]]
            assert row["reward"] in (0.0, 1.0)
        if iteration == 0:
            # Iteration 0 was sampled with the initial weights, which the reference holds: the log-probs it
            # recomputed from the shard (token ids + image bytes) are the generator's.
            for row in rows:
                assert torch.allclose(torch.tensor(row["reference_log_probs"]),
                                      torch.tensor(row["behaviour_log_probs"]), atol=1e-4)
    metrics = [m for m in jobs.metrics(run_dir) if "train/policy_loss" in m]
    assert len(metrics) == 2 and all(jobs.finite(m["train/policy_loss"]) for m in metrics)
    # The actor's own log-probs of the shard's rows (the PPO ratio's old policy, with the generator's weights of that
    # iteration) agree with the generator's: train/rollout_kl is their mean difference.
    assert all(abs(m["train/rollout_kl"]) < 1e-5 for m in metrics), [m["train/rollout_kl"] for m in metrics]


def test_trainer_log_probs_follow_the_image():
    """The generator's log-probs are recomputed exactly by the trainer's forward from (token ids, PNG bytes), in one
    padded micro-batch that mixes image and text rows, and the same tokens under another image score differently."""
    path = resolve_model_path("builtin:tiny-vlm")
    engine = HFEngine.from_pretrained(path)
    processor = AutoProcessor.from_pretrained(path)
    prompt = "<s><|user|><image>Which colour?</s><|assistant|>"
    pngs = {}
    for name in ("red", "blue"):
        buffer = io.BytesIO()
        Image.new("RGB", (20, 20), COLOURS[name]).save(buffer, format="PNG")
        pngs[name] = buffer.getvalue()
    ids = processor(text=[prompt], images=[decode_png([pngs["red"]])], add_special_tokens=False)["input_ids"][0]
    assert ids.count(processor.tokenizer.convert_tokens_to_ids("<image>")) == 4  # (28 / 14) ** 2 patches
    text_ids = processor.tokenizer("<s><|user|>Which colour?</s><|assistant|>", add_special_tokens=False)["input_ids"]
    (red,), (text,) = engine.generate([ids, text_ids], SamplingParams(max_new_tokens=6, seed=5),
                                      images=[(pngs["red"],), ()])

    def trainer_log_probs(image: bytes | None) -> list[torch.Tensor]:
        samples = [TokenSample(prompt_ids=torch.tensor(red.prompt_ids), response_ids=torch.tensor(red.response_ids),
                               images=(image,) if image else ()),
                   TokenSample(prompt_ids=torch.tensor(text.prompt_ids), response_ids=torch.tensor(text.response_ids))]
        (batch,) = make_micro_batches(samples, micro_batch_size=2, pad_token_id=0)
        with torch.no_grad():
            out = causal_lm_log_probs(engine.model, batch, torch.device("cpu"), image_processor=engine.image_processor)
        return [out.log_probs[0, :len(red.response_ids)], out.log_probs[1, :len(text.response_ids)]]

    with_red, text_row = trainer_log_probs(pngs["red"])
    assert torch.allclose(with_red, torch.tensor(red.log_probs), atol=1e-5)
    assert torch.allclose(text_row, torch.tensor(text.log_probs), atol=1e-5)
    with_blue, _ = trainer_log_probs(pngs["blue"])
    assert (with_blue - with_red).abs().max() > 1e-3  # the image reaches the model: another one changes the scores
    with pytest.raises(ValueError, match="cannot be packed"):
        make_micro_batches([TokenSample(prompt_ids=torch.tensor(red.prompt_ids),
                                        response_ids=torch.tensor(red.response_ids), images=(pngs["red"],))],
                           micro_batch_size=1, packing=True)
