"""Dataset rows -> token ids for the supervised and preference trainers, with OpenRLHF's data options.

A row's prompt (`data.input_key`) is text, or a list of chat messages. It is rendered with the tokenizer's chat template
(`data.apply_chat_template`, ending in the assistant header) or formatted into `data.input_template`; a response is then
the text the template adds for the assistant turn, or the response text followed by the eos token. Prompt and response
are tokenized separately, so the boundary between them is exact; the prompt gets the tokenizer's special tokens (bos),
the response none.

Kinds of rows:
- SFT: {input, response}; `sft.pretrain_mode`: {input} is plain text, every token trained; `sft.multiturn`: {input} is
  a whole chat, every assistant turn trained; `sft.condition_key`: conditional SFT, the value joins the prompt.
- pairs (rm, dpo): {input, chosen, rejected} (+ optional margin and precomputed reference log-probs).
- unpaired (kto): {input, response, label} with a boolean label (desirable or not).
Rows longer than `data.max_len` tokens have their response cut; rows whose prompt alone fills it are skipped and
counted, so a bad setting shows up in the log instead of as silently missing data.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, TypeVar

import torch

from hpc_rlhf.config.schema import Config
from hpc_rlhf.data import DatasetError, RowRef, mixed_records
from hpc_rlhf.data.prompts import check_messages, field_of
from hpc_rlhf.training.batching import TokenSample

if TYPE_CHECKING:
    from transformers import PreTrainedTokenizerBase

T = TypeVar("T")


@dataclass(frozen=True)
class Encoded:
    """Prompt and response token ids; `trained` marks the response tokens the loss sees (None = all)."""

    prompt_ids: tuple[int, ...]
    response_ids: tuple[int, ...]
    trained: Optional[tuple[bool, ...]] = None

    @property
    def num_tokens(self) -> int:
        return len(self.prompt_ids) + len(self.response_ids)

    def to_sample(self, response_tensors: Optional[dict[str, torch.Tensor]] = None) -> TokenSample:
        """The TokenSample the micro-batching functions take."""
        mask = None if self.trained is None else torch.tensor(self.trained, dtype=torch.bool)
        return TokenSample(prompt_ids=torch.tensor(self.prompt_ids, dtype=torch.long),
                           response_ids=torch.tensor(self.response_ids, dtype=torch.long), action_mask=mask,
                           response_tensors=response_tensors or {})


@dataclass(frozen=True)
class PairExample:
    """A preference pair for rm / dpo; `ref_*` are precomputed reference log-probs when the dataset has them."""

    chosen: Encoded
    rejected: Encoded
    margin: float = 0.0
    ref_chosen: Optional[float] = None
    ref_rejected: Optional[float] = None
    prompt: str = ""


@dataclass(frozen=True)
class LabelledExample:
    """An unpaired kto sample: a response and whether it is desirable."""

    encoded: Encoded
    desirable: bool


@dataclass
class LoadReport:
    """How many rows were read and skipped (prompt too long, nothing to train on), for the log."""

    path: str
    rows: int = 0
    skipped: list[str] = field(default_factory=list)

    def summary(self) -> str:
        text = f"{self.path}: {self.rows - len(self.skipped)} of {self.rows} rows used"
        if self.skipped:
            text += f"; skipped {len(self.skipped)} (first: {self.skipped[0]})"
        return text


class TextEncoder:
    """Renders prompts and responses the way `data.*` asks and tokenizes them; see the module docstring."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, *, apply_chat_template: bool = False,
                 input_template: Optional[str] = None, max_len: int = 512) -> None:
        if apply_chat_template and getattr(tokenizer, "chat_template", None) is None:
            raise ValueError("data.apply_chat_template needs a tokenizer that has a chat template")
        if input_template is not None and not apply_chat_template and "{}" not in input_template:
            raise ValueError(f"data.input_template must contain '{{}}' where the input goes, got {input_template!r}")
        if max_len < 2:
            raise ValueError(f"data.max_len must be >= 2, got {max_len}")
        self.tokenizer = tokenizer
        self.apply_chat_template = apply_chat_template
        self.input_template = input_template
        self.max_len = max_len

    @classmethod
    def from_config(cls, cfg: Config, tokenizer: PreTrainedTokenizerBase) -> TextEncoder:
        data = cfg.data
        return cls(tokenizer, apply_chat_template=data.apply_chat_template, input_template=data.input_template,
                   max_len=data.max_len)

    # ----- text ---------------------------------------------------------------------------------------
    def prompt_text(self, value: Any, where: RowRef | str) -> str:
        """The rendered prompt: chat template with the generation header, or input_template, or the text itself."""
        if self.apply_chat_template:
            return self.chat(as_messages(value, where), add_generation_prompt=True)
        if not isinstance(value, str):
            raise DatasetError(f"input of {where} is a {type(value).__name__}, not text; chat messages need "
                               "data.apply_chat_template: true")
        return self.input_template.format(value) if self.input_template else value

    def response_text(self, prompt_value: Any, response: Any, where: RowRef | str) -> str:
        """What follows the rendered prompt: the template's assistant turn, or the response and the eos token."""
        if not isinstance(response, str):
            raise DatasetError(f"response of {where} is a {type(response).__name__}, expected text")
        if not self.apply_chat_template:
            return response + (self.tokenizer.eos_token or "")
        messages = as_messages(prompt_value, where)
        prompt = self.chat(messages, add_generation_prompt=True)
        full = self.chat(messages + [{"role": "assistant", "content": response}], add_generation_prompt=False)
        if not full.startswith(prompt):
            raise DatasetError(f"{where}: the chat template renders the conversation without the prompt as its "
                               "prefix, so prompt and response cannot be told apart")
        return full[len(prompt):]

    def chat(self, messages: list[dict], *, add_generation_prompt: bool) -> str:
        """The tokenizer's chat template rendered as text."""
        return self.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=add_generation_prompt)

    # ----- tokens -------------------------------------------------------------------------------------
    def prompt_ids(self, text: str) -> list[int]:
        # A chat template writes its own special tokens (bos); plain text gets the tokenizer's.
        return list(self.tokenizer(text, add_special_tokens=not self.apply_chat_template)["input_ids"])

    def text_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def encode(self, prompt_value: Any, response: Any, where: RowRef | str) -> Optional[Encoded]:
        """Prompt + response of one row, fitted into max_len; None when the prompt leaves no room."""
        prompt_ids = self.prompt_ids(self.prompt_text(prompt_value, where))
        response_ids = self.text_ids(self.response_text(prompt_value, response, where))
        return self.fit(prompt_ids, response_ids, None)

    def fit(self, prompt_ids: list[int], response_ids: list[int],
            trained: Optional[list[bool]]) -> Optional[Encoded]:
        """Cut the response so that the sample has at most max_len tokens; None when nothing is left to train."""
        room = self.max_len - len(prompt_ids)
        if room < 1 or not prompt_ids or not response_ids:
            return None
        response_ids = response_ids[:room]
        if trained is not None:
            trained = trained[:room]
            if not any(trained):
                return None
        return Encoded(tuple(prompt_ids), tuple(response_ids), None if trained is None else tuple(trained))


def as_messages(value: Any, where: RowRef | str) -> list[dict]:
    """A prompt as chat messages: text becomes one user message; a list must hold {role, content} dicts."""
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    return check_messages(value, where)


def _rows(path: str | Path, max_samples: Optional[int], cfg: Config) -> Iterator[tuple[RowRef, dict]]:
    """The first max_samples rows of `path`; the datasets of data.dataset mixed by data.dataset_probs (train.seed)."""
    probabilities = cfg.data.dataset_probs if path == cfg.data.dataset else None
    return mixed_records(path, probabilities=probabilities, seed=cfg.train.seed, max_samples=max_samples)


def encode_rows(path: str | Path, rows: Iterable[tuple[RowRef, dict]],
                encode: Callable[[dict, RowRef], Optional[T]]) -> tuple[list[T], LoadReport]:
    """The examples `encode(row, where)` makes of the `rows` read from `path`; a row it returns None for (nothing left
    to train once fitted into data.max_len) is skipped and counted in the report."""
    report = LoadReport(str(path))
    examples = []
    for where, row in rows:
        report.rows += 1
        example = encode(row, where)
        if example is None:
            report.skipped.append(str(where))
        else:
            examples.append(example)
    return examples, report


# ----- SFT --------------------------------------------------------------------------------------------------------
def encode_sft_row(row: dict, where: RowRef, encoder: TextEncoder, cfg: Config) -> Optional[Encoded]:
    """One SFT row in the mode `sft.*` selects (plain, pretrain, multi-turn, conditional)."""
    data, sft = cfg.data, cfg.sft
    value = field_of(row, data.input_key, where)
    if sft.pretrain_mode:
        if not isinstance(value, str):
            raise DatasetError(f"input of {where} must be text in sft.pretrain_mode, got {type(value).__name__}")
        ids = encoder.prompt_ids(value) + encoder.text_ids(encoder.tokenizer.eos_token or "")
        return encoder.fit(ids[:1], ids[1:], None)
    if sft.multiturn:
        return encode_chat(as_messages(value, where), where, encoder)
    if sft.condition_key:
        if not isinstance(value, str):
            raise DatasetError(f"input of {where} must be text for conditional SFT, got {type(value).__name__}")
        condition = field_of(row, sft.condition_key, where)
        value = sft.condition_template.format(input=value, condition=condition)
    return encoder.encode(value, field_of(row, data.output_key, where), where)


def encode_chat(messages: list[dict], where: RowRef | str, encoder: TextEncoder) -> Optional[Encoded]:
    """A whole chat: everything up to the first assistant turn is the prompt; assistant turns are trained, the
    user/system turns between them are not. Each turn is the text its message adds to the rendered chat."""
    if not encoder.apply_chat_template:
        raise DatasetError(f"{where}: multi-turn chats need data.apply_chat_template: true")
    if not any(m["role"] == "assistant" for m in messages):
        raise DatasetError(f"{where}: the chat has no assistant turn to train on")
    prompt_ids: list[int] = []
    response_ids: list[int] = []
    trained: list[bool] = []
    rendered = ""
    for index, message in enumerate(messages):
        is_assistant = message["role"] == "assistant"
        if is_assistant:  # the assistant header belongs to the context, not to what the model must write
            header = encoder.chat(messages[:index], add_generation_prompt=True)
            _append_segment(header, rendered, where, encoder, prompt_ids, response_ids, trained, train=False)
            rendered = header
        full = encoder.chat(messages[: index + 1], add_generation_prompt=False)
        _append_segment(full, rendered, where, encoder, prompt_ids, response_ids, trained, train=is_assistant)
        rendered = full
    return encoder.fit(prompt_ids, response_ids, trained)


def _append_segment(text: str, before: str, where: RowRef | str, encoder: TextEncoder, prompt_ids: list[int],
                    response_ids: list[int], trained: list[bool], *, train: bool) -> None:
    """Tokenize what `text` adds to `before`: into the prompt until the first trained token, else the response."""
    if not text.startswith(before):
        raise DatasetError(f"{where}: the chat template does not render the chat turn by turn (a later rendering "
                           "does not start with an earlier one), so turns cannot be masked")
    added = text[len(before):]
    if not added:
        return
    ids = encoder.text_ids(added)  # the chat template writes every special token itself
    if not response_ids and not train:
        prompt_ids.extend(ids)
    else:
        response_ids.extend(ids)
        trained.extend([train] * len(ids))


def load_sft_examples(path: str | Path, cfg: Config, tokenizer: PreTrainedTokenizerBase, *,
                      max_samples: Optional[int] = None) -> tuple[list[Encoded], LoadReport]:
    """Every usable SFT row of the file or folder at `path`."""
    encoder = TextEncoder.from_config(cfg, tokenizer)
    return encode_rows(path, _rows(path, max_samples, cfg),
                       lambda row, where: encode_sft_row(row, where, encoder, cfg))


# ----- pairs ------------------------------------------------------------------------------------------------------
def _float_field(row: dict, key: str, where: RowRef) -> float:
    value = field_of(row, key, where)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise DatasetError(f"key {key!r} of {where} must be a number, got {type(value).__name__} {value!r}")
    return float(value)


def encode_pair(row: dict, where: RowRef, encoder: TextEncoder, cfg: Config) -> Optional[PairExample]:
    """One row {input, chosen, rejected} (+ margin and reference log-prob columns); None when a side does not fit."""
    data, pref = cfg.data, cfg.pref
    prompt = field_of(row, data.input_key, where)
    chosen = encoder.encode(prompt, field_of(row, data.chosen_key, where), where)
    rejected = encoder.encode(prompt, field_of(row, data.rejected_key, where), where)
    if chosen is None or rejected is None:
        return None
    return PairExample(
        chosen=chosen, rejected=rejected,
        margin=_float_field(row, pref.margin_key, where) if pref.margin_key else 0.0,
        ref_chosen=_float_field(row, pref.ref_chosen_logps_key, where) if pref.ref_chosen_logps_key else None,
        ref_rejected=_float_field(row, pref.ref_rejected_logps_key, where) if pref.ref_rejected_logps_key else None,
        prompt=encoder.prompt_text(prompt, where))


def load_pairs(path: str | Path, cfg: Config, tokenizer: PreTrainedTokenizerBase, *,
               max_samples: Optional[int] = None) -> tuple[list[PairExample], LoadReport]:
    """Preference pairs {input, chosen, rejected} with the optional margin and reference log-prob columns."""
    encoder = TextEncoder.from_config(cfg, tokenizer)
    return encode_rows(path, _rows(path, max_samples, cfg),
                       lambda row, where: encode_pair(row, where, encoder, cfg))


def encode_labelled(row: dict, where: RowRef, encoder: TextEncoder, cfg: Config) -> Optional[LabelledExample]:
    """One kto row {input, response, label}; None when the response does not fit."""
    data = cfg.data
    label = field_of(row, data.label_key, where)
    if not isinstance(label, bool):
        raise DatasetError(f"key {data.label_key!r} of {where} must be true or false (desirable or not), "
                           f"got {label!r}")
    encoded = encoder.encode(field_of(row, data.input_key, where), field_of(row, data.output_key, where), where)
    return None if encoded is None else LabelledExample(encoded, label)


def load_unpaired(path: str | Path, cfg: Config, tokenizer: PreTrainedTokenizerBase, *,
                  max_samples: Optional[int] = None) -> tuple[list[LabelledExample], LoadReport]:
    """KTO rows {input, response, label}: the label says whether the response is desirable (a boolean)."""
    if not cfg.data.label_key:
        raise ValueError("kto needs data.label_key: the column saying whether each response is desirable")
    encoder = TextEncoder.from_config(cfg, tokenizer)
    return encode_rows(path, _rows(path, max_samples, cfg),
                       lambda row, where: encode_labelled(row, where, encoder, cfg))


def write_jsonl(rows: list[dict], path: str | Path) -> Path:
    """Write rows as JSON lines through a temporary file and a rename, so readers never see half a file."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    with open(temporary, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    temporary.replace(path)
    return path


def read_jsonl(path: str | Path) -> list[dict]:
    """The rows of a JSON-lines file written by `write_jsonl` (blank lines skipped)."""
    with open(path, encoding="utf-8") as handle:
        return [json.loads(line) for line in handle if line.strip()]
