"""Generation for the Compare tab: a model cache, streaming answers, the A/B pair and table.

Owns: loading each distinct set of weights once (a small LRU cache), turning a
chat into the exact prompt training used (`encoding.render_prompt`), streaming
one answer with a real stop, streaming two answers at once, and the batch A/B
table with each model's validation loss. Knows nothing of Gradio: the UI only
appends what these generators yield.
"""

from __future__ import annotations

import dataclasses
import itertools
import queue
import threading
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from . import specs
from .cache import LoadingLRU
from .config import GenConfig, TrainConfig, load_config
from .data import Record
from .encoding import encode_records, end_of_turn_id, pad_id, render_prompt
from .errors import GenerationError, ModelLoadError, first_line
from .models import describe_spec, load_model, load_tokenizer, pick_device, pick_dtype, resolve_spec

MAX_CACHED_MODELS = 3  # base + tuned + one more to switch back to; each Qwen2.5-0.5B is ~2 GB in fp32
RUN_CONFIG = "run_config.json"


@dataclass(frozen=True)
class LoadedModel:
    model: torch.nn.Module
    tokenizer: object
    label: str  # the exact weights, as the UI shows them above a pane
    path: str  # what was loaded: a checkpoint folder, a local folder or a Hub id
    kind: str  # "base" | "full" | "lora"
    trained_from: str | None = None  # the base spec a checkpoint was trained from (run_config.json)


# ---------------------------------------------------------------- models

def is_checkpoint_dir(path: Path) -> bool:
    return path.is_dir() and ((path / RUN_CONFIG).is_file() or (path / "adapter_config.json").is_file())


def checkpoint_config(path: str | Path) -> TrainConfig | None:
    """The TrainConfig a checkpoint was trained with, or None when it has no run_config.json."""
    file = Path(path) / RUN_CONFIG
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
    if (path / "adapter_config.json").is_file():
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
    if not is_checkpoint_dir(path):
        model = load_model(spec, device, dtype, trust_remote_code=trust_remote_code).eval()
        return LoadedModel(model, load_tokenizer(spec, trust_remote_code), describe_base(spec), spec, "base")
    cfg = checkpoint_config(path)
    trained_from = cfg.model.spec if cfg else None
    tokenizer = load_tokenizer(str(path), trust_remote_code)  # the checkpoint's own tokenizer
    if (path / "adapter_config.json").is_file():
        if not trained_from:
            raise ModelLoadError(f"LoRA checkpoint '{path}' has no {RUN_CONFIG} naming its base model")
        # A second copy of the base under the adapter, not the cached base with
        # `disable_adapter()`: Compare runs both models at once in two threads, and
        # disabling an adapter is a switch on shared modules, so the base pane would
        # race the tuned one. The price is the base's memory twice.
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
                             lambda: _load_uncached(spec, device, trust_remote_code))

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


# ---------------------------------------------------------------- prompts

def build_generation_prompt(tokenizer, message: str, history, system_prompt: str) -> str:
    """The chat as training renders it: same renderer, same system prompt rule."""
    record = Record(instruction=message, output="", system=None,
                    history=tuple((str(u), str(a)) for u, a in (history or ())))
    return render_prompt(tokenizer, record, system_prompt)


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def prompt_ids(loaded: LoadedModel, message: str, history, system_prompt: str, gen: GenConfig) -> torch.Tensor:
    """(1, T) prompt ids on the model's device; GenerationError when empty or too long."""
    if not message or not message.strip():
        raise GenerationError("The message is empty: type a question or pick an example")
    text = build_generation_prompt(loaded.tokenizer, message, history, system_prompt)
    ids = loaded.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids  # (1, T)
    context = getattr(loaded.model.config, "max_position_embeddings", None)
    if context and ids.shape[1] > context - gen.max_new_tokens:
        raise GenerationError(
            f"The prompt is {ids.shape[1]} tokens, but {loaded.label} reads at most {context} tokens and "
            f"{gen.max_new_tokens} are kept for the answer: shorten the message, clear the conversation, "
            "or lower max_new_tokens")
    return ids.to(_device_of(loaded.model))


def _generate_kwargs(loaded: LoadedModel, ids: torch.Tensor, gen: GenConfig) -> dict:
    tok = loaded.tokenizer
    stop_ids = sorted({end_of_turn_id(tok), *([tok.eos_token_id] if tok.eos_token_id is not None else [])})
    kwargs = dict(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=gen.max_new_tokens,
                  do_sample=gen.do_sample, repetition_penalty=gen.repetition_penalty,
                  eos_token_id=stop_ids, pad_token_id=pad_id(tok))
    if gen.do_sample:  # greedy ignores these; passing them anyway only earns warnings
        kwargs.update(temperature=gen.temperature, top_p=gen.top_p, top_k=gen.top_k)
    return kwargs


# ---------------------------------------------------------------- streaming

class _StopOnEvent:
    """A StoppingCriteria that ends generate() at the next token once `event` is set."""

    def __init__(self, event):
        self.event = event

    def __call__(self, input_ids: torch.Tensor, scores, **kwargs) -> torch.Tensor:
        return torch.full((input_ids.shape[0],), self.event.is_set(), dtype=torch.bool, device=input_ids.device)


class _EitherEvent:
    """Set when either the caller's cancel or this stream's own event is; `set()` sets only its own."""

    def __init__(self, outer, own: threading.Event):
        self.outer, self.own = outer, own

    def is_set(self) -> bool:
        return self.outer.is_set() or self.own.is_set()

    def set(self) -> None:
        self.own.set()


_thread_ids = itertools.count(1)


def stream_answer(loaded: LoadedModel, message: str, history, system_prompt: str, gen: GenConfig,
                  cancel: threading.Event) -> Iterator[str]:
    """Yield the answer so far after every decoded piece; setting `cancel` stops generate().

    `cancel` is set when the generator ends for any reason (finished, closed by a
    cancelled UI event, error), so pass a fresh Event per call.
    """
    from transformers import StoppingCriteriaList, TextIteratorStreamer

    ids = prompt_ids(loaded, message, history, system_prompt, gen)
    streamer = TextIteratorStreamer(loaded.tokenizer, skip_prompt=True, skip_special_tokens=True)
    kwargs = _generate_kwargs(loaded, ids, gen)
    kwargs.update(streamer=streamer, stopping_criteria=StoppingCriteriaList([_StopOnEvent(cancel)]))
    failure: list[BaseException] = []

    def run() -> None:
        try:
            loaded.model.generate(**kwargs)
        except BaseException as e:  # surfaced to the consumer below
            failure.append(e)
            streamer.end()  # generate() ends the streamer only when it returns normally

    thread = threading.Thread(target=run, name=f"ruozhi-generate-{next(_thread_ids)}", daemon=True)
    thread.start()
    text = ""
    try:
        for delta in streamer:
            if delta:
                text += delta
                yield text
        thread.join()
        if failure:
            raise GenerationError(f"Generation failed in {loaded.label}: {failure[0]}") from failure[0]
    finally:
        cancel.set()
        thread.join()


def stream_pair(base: LoadedModel, tuned: LoadedModel, message: str, history_base, history_tuned,
                system_prompt: str, gen: GenConfig, cancel: threading.Event) -> Iterator[tuple[str, str]]:
    """Yield (base_text, tuned_text) after every delta of either; each model runs in its own thread."""
    if not message or not message.strip():
        raise GenerationError("The message is empty: type a question or pick an example")
    updates: queue.Queue = queue.Queue()  # (side, kind, value); unbounded, so producers never block

    def pump(side: str, loaded: LoadedModel, history) -> None:
        try:
            for text in stream_answer(loaded, message, history, system_prompt, gen,
                                      _EitherEvent(cancel, threading.Event())):
                updates.put((side, "text", text))
        except BaseException as e:
            updates.put((side, "error", e))
        finally:
            updates.put((side, "done", None))

    producers = [threading.Thread(target=pump, args=args, name=f"ruozhi-pair-{args[0]}", daemon=True)
                 for args in (("base", base, history_base), ("tuned", tuned, history_tuned))]
    for p in producers:
        p.start()
    texts, running = {"base": "", "tuned": ""}, len(producers)
    try:
        while running:
            side, kind, value = updates.get()
            if kind == "text":
                texts[side] = value
                yield texts["base"], texts["tuned"]
            elif kind == "error":
                raise value
            else:
                running -= 1
    finally:
        cancel.set()  # the other stream stops too when this one failed or the consumer left
        for p in producers:
            p.join()


# ---------------------------------------------------------------- batch A/B

@torch.no_grad()
def generate_answer(loaded: LoadedModel, message: str, system_prompt: str, gen: GenConfig,
                    history=()) -> tuple[str, int]:
    """One complete answer, no streaming: (text, generated token count)."""
    ids = prompt_ids(loaded, message, history, system_prompt, gen)
    out = loaded.model.generate(**_generate_kwargs(loaded, ids, gen))
    new = out[0, ids.shape[1]:]
    return loaded.tokenizer.decode(new, skip_special_tokens=True), int(new.shape[0])


def iter_batch_ab(base: LoadedModel, tuned: LoadedModel, prompts: list[str], references: list[str] | None,
                  system_prompt: str, gen: GenConfig, cancel: threading.Event | None = None) -> Iterator[dict]:
    """One row per prompt as it is done; greedy whatever `gen` says, so tables are reproducible."""
    greedy = dataclasses.replace(gen, do_sample=False)
    if references is not None and len(references) != len(prompts):
        raise GenerationError(f"{len(prompts)} prompts but {len(references)} references: give one per prompt")
    for i, prompt in enumerate(prompts):
        if cancel is not None and cancel.is_set():
            return
        base_answer, base_len = generate_answer(base, prompt, system_prompt, greedy)
        tuned_answer, tuned_len = generate_answer(tuned, prompt, system_prompt, greedy)
        yield {"prompt": prompt, "reference": references[i] if references else "",
               "base_answer": base_answer, "tuned_answer": tuned_answer,
               "base_len": base_len, "tuned_len": tuned_len}  # lengths in generated tokens


def batch_ab(base: LoadedModel, tuned: LoadedModel, prompts: list[str], references: list[str] | None,
             system_prompt: str, gen: GenConfig) -> list[dict]:
    """Rows {prompt, reference, base_answer, tuned_answer, base_len, tuned_len}, one per prompt."""
    return list(iter_batch_ab(base, tuned, prompts, references, system_prompt, gen))


def validation_loss(loaded: LoadedModel, records: list[Record], system_prompt: str, max_source_length: int,
                    max_target_length: int, batch_size: int = 8) -> float:
    """Mean cross-entropy over every label token of `records`: the training objective, no grad."""
    from .train.evaluate import mean_label_loss

    if not records:
        raise GenerationError("No validation records to score: the dataset has no validation split")
    tok = loaded.tokenizer
    examples = encode_records(tok, records, system_prompt, max_source_length, max_target_length)
    return mean_label_loss(loaded.model, examples, pad_id(tok), _device_of(loaded.model), batch_size)


AB_COLUMNS = ["prompt", "reference", "base_answer", "tuned_answer", "base_len", "tuned_len"]
