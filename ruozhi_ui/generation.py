"""Generation for the Compare tab: a model cache, streaming answers, the A/B pair and table.

Owns: loading each distinct set of weights once (a small LRU cache) with its
`decoding.Decoder` (on CUDA its captured decode steps are built in the background
as the model loads), checking a chat fits the model, streaming one answer or two
at once with a real stop, the batch A/B table and each model's validation loss.
Decoding itself (settings, batches, the one loop for both panes) is `decoding/`,
the same engine the training probes use. Knows nothing of Gradio: the UI only
shows what these generators yield.
"""

from __future__ import annotations

import dataclasses
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator, Literal

import torch

from . import specs
from .cache import LoadingLRU
from .checkpoints import ADAPTER_CONFIG, CHECKPOINT_CONFIG, is_run_checkpoint
from .config import GenConfig, TrainConfig, load_config
from .data import Record
from .decoding import (DecodeSettings, Decoder, answer_in_batches, chat_prompt_ids, decode_ids, resolve_settings,
                       stream_texts)
from .encoding import encode_records, pad_id, render_prompt
from .encoding import prompt_ids as record_ids
from .errors import GenerationError, ModelLoadError, first_line
from .models import describe_spec, load_model, load_tokenizer, pick_device, pick_dtype, resolve_spec

MAX_CACHED_MODELS = 3  # base + tuned + one more to switch back to; each Qwen2.5-0.5B is ~2 GB in fp32


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    label: str  # the exact weights, as the UI shows them above a pane
    path: str  # what was loaded: a checkpoint folder, a local folder or a Hub id
    kind: Literal["base", "full", "lora"]
    trained_from: str | None = None  # the base spec a checkpoint was trained from (run_config.json)
    decoder: Decoder | None = field(default=None, compare=False)  # this model's decoding engine; made when None

    def __post_init__(self):
        if self.decoder is None:
            object.__setattr__(self, "decoder", Decoder(self.model))


# ---------------------------------------------------------------- models

def checkpoint_config(path: str | Path) -> TrainConfig | None:
    """The TrainConfig a checkpoint was trained with, or None when it has no run_config.json."""
    file = Path(path) / CHECKPOINT_CONFIG
    if not file.is_file():
        return None
    try:
        return load_config(file)
    except (ValueError, TypeError) as e:
        raise ModelLoadError(f"{file}: unreadable run config ({e}); the checkpoint folder may be damaged") from None


def checkpoint_system_prompt(path: str | Path) -> str | None:
    cfg = checkpoint_config(path)
    return cfg.data.system_prompt if cfg else None


def describe_checkpoint(path: str | Path, shown: str | None = None) -> str:
    """'tuned: <shown or path> (full, from demo)': what a tuned pane's label names, before or after loading."""
    path = Path(path)
    cfg = checkpoint_config(path) if path.is_dir() else None
    shown = shown or str(path)
    if cfg is None:
        return f"tuned: {shown}"
    if (path / ADAPTER_CONFIG).is_file():
        how = f"LoRA r={cfg.lora_rank} on {cfg.model.spec}"
    elif cfg.method == "lora":
        how = f"LoRA merged, from {cfg.model.spec}"
    else:
        how = f"full, from {cfg.model.spec}"
    return f"tuned: {shown} ({how})"


def describe_base(spec: str) -> str:
    return f"base: {describe_spec(spec)}"


def _load_uncached(spec: str, device: torch.device, trust_remote_code: bool) -> LoadedModel:
    path = Path(spec).expanduser()
    if specs.model_kind(spec) == "path" and not path.exists():
        raise ModelLoadError(f"Checkpoint folder '{spec}' does not exist (deleted or moved?): "
                             "press refresh and pick another checkpoint")
    dtype = pick_dtype(device)
    if not is_run_checkpoint(path):
        model = load_model(spec, device, dtype, trust_remote_code=trust_remote_code).eval()
        return LoadedModel(model, load_tokenizer(spec, trust_remote_code), describe_base(spec), spec, "base")
    cfg = checkpoint_config(path)
    trained_from = cfg.model.spec if cfg else None
    tokenizer = load_tokenizer(str(path), trust_remote_code)  # the checkpoint's own tokenizer
    if (path / ADAPTER_CONFIG).is_file():
        if not trained_from:
            raise ModelLoadError(f"LoRA checkpoint '{path}' has no {CHECKPOINT_CONFIG} naming its base model")
        # A second copy of the base under the adapter, not the cached base with
        # `disable_adapter()`: Compare steps both models in one loop, interleaved, and
        # disabling an adapter is a switch on shared modules (a captured step would
        # also keep whichever modules ran when it was recorded). The price is the
        # base's memory twice.
        from peft import PeftModel

        base = load_model(trained_from, device, dtype, trust_remote_code=trust_remote_code)
        try:
            model = PeftModel.from_pretrained(base, str(path), is_trainable=False)
        except Exception as e:  # shape mismatch, missing/damaged adapter file
            raise ModelLoadError(f"LoRA adapter '{path}' does not fit its base '{trained_from}': {first_line(e)}. "
                                 "Pick a checkpoint trained from a model that is available here") from None
        return LoadedModel(model.eval(), tokenizer, describe_checkpoint(path), str(path), "lora", trained_from)
    model = load_model(str(path), device, dtype, trust_remote_code=trust_remote_code).eval()
    return LoadedModel(model, tokenizer, describe_checkpoint(path), str(path), "full", trained_from)


def _load_and_warm_up(spec: str, device: torch.device, trust_remote_code: bool) -> LoadedModel:
    """Load, then start building the captured decode steps on a thread (CUDA only): the first
    answer does not wait for them, it decodes on the simple path meanwhile."""
    loaded = _load_uncached(spec, device, trust_remote_code)
    loaded.decoder.start_warm_up()
    return loaded


def _cache_key(spec: str, device: torch.device, trust_remote_code: bool) -> tuple:
    kind = specs.model_kind(spec)
    where = resolve_spec(spec) if kind == "demo" else str(Path(spec).expanduser().resolve()) if kind == "path" else spec
    return where, str(device), trust_remote_code


class ModelCache:
    """Each distinct set of weights loaded once (an app keeps one of these in its context)."""

    def __init__(self, size: int = MAX_CACHED_MODELS):
        self._lru = LoadingLRU(size)

    def get(self, spec_or_path: str, device: torch.device | str | None = None,
            trust_remote_code: bool = False) -> LoadedModel:
        """The loaded model for a spec or checkpoint folder, loading it only the first time."""
        if not spec_or_path or not str(spec_or_path).strip():
            raise ModelLoadError("No model given: choose a base model in the top bar and a checkpoint")
        spec = str(spec_or_path).strip()
        device = torch.device(device) if device is not None else pick_device()
        return self._lru.get(_cache_key(spec, device, trust_remote_code),
                             lambda: _load_and_warm_up(spec, device, trust_remote_code))

    def clear(self) -> None:
        self._lru.clear()

    def labels(self) -> list[str]:
        return [m.label for m in self._lru.values()]


def check_pair(base: LoadedModel, tuned: LoadedModel) -> None:
    """Refuse a pair whose architectures or vocabularies differ: the comparison would be meaningless."""
    def shape(m: LoadedModel) -> tuple[str, int]:
        return getattr(m.model.config, "model_type", "?"), m.model.get_input_embeddings().weight.shape[0]

    (base_type, base_vocab), (tuned_type, tuned_vocab) = shape(base), shape(tuned)
    if (base_type, base_vocab) != (tuned_type, tuned_vocab):
        source = f" was trained from '{tuned.trained_from}'" if tuned.trained_from else ""
        raise GenerationError(
            f"Checkpoint '{tuned.path}'{source} ({tuned_type}, vocabulary {tuned_vocab}) does not match the base "
            f"'{base.path}' ({base_type}, vocabulary {base_vocab}): choose its base model in the top bar, "
            "or pick a checkpoint trained from the current base")


# ---------------------------------------------------------------- prompts and settings

def build_generation_prompt(tokenizer, message: str, history, system_prompt: str) -> str:
    """The chat as training renders it: same renderer, same system prompt rule."""
    record = Record(instruction=message, output="", system=None,
                    history=tuple((str(u), str(a)) for u, a in (history or ())))
    return render_prompt(tokenizer, record, system_prompt)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _check_message(message: str) -> None:
    if not message or not message.strip():
        raise GenerationError("The message is empty: type a question or pick an example")


def _prompt(loaded: LoadedModel, message: str, history, system_prompt: str, gen: GenConfig) -> list[int]:
    """Prompt ids; GenerationError when the message is empty or the prompt leaves no room for the answer."""
    _check_message(message)
    ids = chat_prompt_ids(loaded.tokenizer, message, history, system_prompt)
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    if context and len(ids) > context - gen.max_new_tokens:
        raise GenerationError(
            f"The prompt is {len(ids)} tokens, but {loaded.label} reads at most {context} tokens and "
            f"{gen.max_new_tokens} are kept for the answer: shorten the message, clear the conversation, "
            "or lower max_new_tokens")
    return ids


def prompt_ids(loaded: LoadedModel, message: str, history, system_prompt: str, gen: GenConfig) -> torch.Tensor:
    """(1, T) prompt ids on the model's device; GenerationError when empty or too long."""
    return torch.tensor([_prompt(loaded, message, history, system_prompt, gen)], device=_device_of(loaded.model))


def settings_for(loaded: LoadedModel, gen: GenConfig) -> DecodeSettings:
    """What `loaded` decodes with under `gen` (None fields: the model's generation_config)."""
    return resolve_settings(loaded.model, loaded.tokenizer, gen)


def describe_settings(loaded: LoadedModel, gen: GenConfig) -> str:
    """One line for the UI: 'greedy · repetition penalty 1.05 (model) · stops at <|im_end|>, ... (model) · ...'."""
    return settings_for(loaded, gen).describe()


# ---------------------------------------------------------------- streaming

def stream_answer(loaded: LoadedModel, message: str, history, system_prompt: str, gen: GenConfig,
                  cancel: threading.Event) -> Iterator[str]:
    """Yield the answer so far each time it grows; setting `cancel` (or closing the generator) stops decoding
    before the next token. `cancel` is set when the generator ends for any reason: pass a fresh Event per call."""
    try:
        ids = _prompt(loaded, message, history, system_prompt, gen)
        job = (loaded.decoder, loaded.tokenizer, ids, settings_for(loaded, gen))
        for (text,) in stream_texts([job], cancel):
            yield text
    finally:
        cancel.set()


def stream_pair(base: LoadedModel, tuned: LoadedModel, message: str, history_base, history_tuned,
                system_prompt: str, gen: GenConfig, cancel: threading.Event) -> Iterator[tuple[str, str]]:
    """Yield (base_text, tuned_text) whenever either grew: both models advance in one loop, a token each per
    tick (on CUDA each on its own stream, so their steps overlap). The last yield holds both finished answers."""
    _check_message(message)
    jobs = [(m.decoder, m.tokenizer, _prompt(m, message, history, system_prompt, gen), settings_for(m, gen))
            for m, history in ((base, history_base), (tuned, history_tuned))]
    try:
        yield from stream_texts(jobs, cancel)
    finally:
        cancel.set()


# ---------------------------------------------------------------- batch A/B

def generate_answer(loaded: LoadedModel, message: str, system_prompt: str, gen: GenConfig,
                    history=()) -> tuple[str, int]:
    """One complete answer, no streaming: (text, answer tokens, the end token not counted)."""
    ids = _prompt(loaded, message, history, system_prompt, gen)
    tokens = decode_ids(loaded.decoder, [ids], settings_for(loaded, gen))[0]
    return loaded.tokenizer.decode(tokens, skip_special_tokens=True), len(tokens)


def record_prompt_ids(loaded: LoadedModel, record: Record, system_prompt: str, gen: GenConfig) -> list[int]:
    """A dataset record's prompt as training renders it: its history and its own system prompt (else
    `system_prompt`), never cut; GenerationError when it leaves no room for the answer."""
    ids = record_ids(loaded.tokenizer, record, system_prompt, escape_control=False)  # as training read it
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    if context and len(ids) > context - gen.max_new_tokens:
        raise GenerationError(f"A validation prompt is {len(ids)} tokens, but {loaded.label} reads at most {context} "
                              f"tokens and {gen.max_new_tokens} are kept for the answer: lower max_new_tokens")
    return ids


def iter_batch_ab(base: LoadedModel, tuned: LoadedModel, prompts: list[str], references: list[str] | None,
                  system_prompt: str, gen: GenConfig, cancel: threading.Event | None = None,
                  records: list[Record] | None = None) -> Iterator[dict]:
    """Rows as their batch finishes: prompts are length-sorted into batches of AB_BATCH_ROWS, both models
    decode each batch in one loop. Rows come batch by batch, not in prompt order: each carries its
    `index` in `prompts` (ascending within a batch). Greedy whatever `gen` says, so tables are reproducible.
    With `records` (one per prompt: validation data), each is asked as training rendered it, history and
    own system prompt included."""
    greedy = dataclasses.replace(gen, do_sample=False)
    if references is not None and len(references) != len(prompts):
        raise GenerationError(f"{len(prompts)} prompts but {len(references)} references: give one per prompt")
    if not prompts:
        return
    models = (base, tuned)
    if records is not None:
        prompt_lists = [[record_prompt_ids(m, r, system_prompt, greedy) for r in records] for m in models]
    else:
        prompt_lists = [[_prompt(m, p, (), system_prompt, greedy) for p in prompts] for m in models]
    jobs = [(m.decoder, m.tokenizer, settings_for(m, greedy)) for m in models]
    for indices, (base_answers, tuned_answers) in answer_in_batches(jobs, prompt_lists, cancel):
        for i, (base_answer, base_len), (tuned_answer, tuned_len) in zip(indices, base_answers, tuned_answers):
            yield {"index": i, "prompt": prompts[i], "reference": references[i] if references else "",
                   "base_answer": base_answer, "tuned_answer": tuned_answer,
                   "base_len": base_len, "tuned_len": tuned_len}  # lengths in answer tokens


def batch_ab(base: LoadedModel, tuned: LoadedModel, prompts: list[str], references: list[str] | None,
             system_prompt: str, gen: GenConfig) -> list[dict]:
    """Rows {index, prompt, reference, base_answer, tuned_answer, base_len, tuned_len}, in prompt order."""
    return sorted(iter_batch_ab(base, tuned, prompts, references, system_prompt, gen), key=lambda r: r["index"])


def validation_loss(loaded: LoadedModel, records: list[Record], system_prompt: str, max_source_length: int,
                    max_target_length: int, batch_size: int = 8, *, train_all_turns: bool = True,
                    label_truncated_end: bool = False) -> float:
    """Mean cross-entropy over every label token of `records`: the training objective, no grad, encoded with
    the checkpoint's own settings (pass its DataConfig's limits and turn options)."""
    from .train.evaluate import mean_label_loss

    if not records:
        raise GenerationError("No validation records to score: the dataset has no validation split")
    tok = loaded.tokenizer
    examples = encode_records(tok, records, system_prompt, max_source_length, max_target_length,
                              train_all_turns=train_all_turns, label_truncated_end=label_truncated_end)
    return mean_label_loss(loaded.model, examples, pad_id(tok), _device_of(loaded.model), batch_size)


AB_COLUMNS = ["prompt", "reference", "base_answer", "tuned_answer", "base_len", "tuned_len"]
