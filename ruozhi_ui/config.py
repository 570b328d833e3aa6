"""Run settings as frozen dataclasses, with the reference write-up's defaults.

Defaults live here and nowhere else. A run stores `asdict(cfg)` as `config.json`
beside its checkpoints; `train_config_from_dict` reads it back. `validate` is the
one place that rejects bad combinations, with the fix in the message. This module
knows nothing of torch, Gradio or the file system beyond JSON.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path

from .checkpoints import sanitize_run_name
from .errors import ConfigError

DEFAULT_MODEL = "Qwen/Qwen2.5-0.5B-Instruct"
DEFAULT_DATASET = "hfl/ruozhiba_gpt4"
DEFAULT_SYSTEM_PROMPT = "你是一个有帮助的助手"
# The reference's three before/after test prompts: probes at each epoch end and
# the Compare tab's examples.
REFERENCE_PROMPTS = (
    "地球上有70亿人，为什么只有86w人关注弱智吧，难道弱智这么少吗",
    "游泳比赛时把水喝光后跑步犯规吗",
    "一些高中想提高升学率，为什么不直接招大学生？",
)


@dataclass(frozen=True)
class ModelConfig:
    spec: str = DEFAULT_MODEL  # Hub id, local folder, or "demo" (tiny offline model)
    trust_remote_code: bool = False  # runs code shipped with the model: only on explicit opt-in


@dataclass(frozen=True)
class DataConfig:
    source: str = DEFAULT_DATASET  # Hub dataset id, a .json/.jsonl/.csv/.tsv/.parquet path, or "sample"
    columns: str = ""  # which field is which, "instruction=question,output=answer" (data/formats.py); "" = detect
    subset: str = ""  # a Hub dataset's config ("" = its default, or the first of several)
    train_split: str = ""  # the Hub split to train on ("" = 'train', or the first)
    val_split: str = ""  # the Hub split to validate on ("" = validation/valid/val/test, else a held-out val_fraction)
    system_prompt: str = DEFAULT_SYSTEM_PROMPT  # same in training, stats and chat
    max_source_length: int = 62  # tokens of templated prompt; reference: i_95 32 + ~30 template
    max_target_length: int = 151  # tokens of answer before <|im_end|>; reference: o_95 151.6
    val_fraction: float = 0.05  # held out when the source has no validation split
    seed: int = 42  # for the held-out split
    train_all_turns: bool = True  # multi-turn records: learn every assistant answer, not only the last
    label_truncated_end: bool = False  # an answer cut at max_target_length still learns <|im_end|> (teaches stopping mid-sentence)


@dataclass(frozen=True)
class TrainConfig:
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    run_name: str = "ruozhi-sft"  # folder under the runs root; sanitised
    method: str = "full"  # "full" (reference) or "lora"
    lora_rank: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.05
    lora_target_modules: tuple[str, ...] = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")
    save_merged: bool = False  # LoRA only: also save base+adapter merged as a plain model
    epochs: int = 3
    batch_size: int = 12  # examples per optimiser step (split over grad_accum_steps micro-batches)
    grad_accum_steps: int = 1  # micro-batches per optimiser step
    lr: float = 1e-4
    lr_schedule: str = "constant"  # "constant" (reference) or "cosine"
    warmup_steps: int = 0  # linear warmup before the schedule
    weight_decay: float = 0.01  # torch AdamW's default, as the reference used
    max_grad_norm: float = 1.0  # 0 turns clipping off (the reference did not clip)
    packing: bool = False  # concatenate examples instead of padding (position_ids restart)
    seed: int = 42  # model init of LoRA, batch order, dropout
    log_every_steps: int = 0  # losses are read back every N steps (each read syncs a GPU); 0 = 1 on CPU, 10 on CUDA
    probe_prompts: tuple[str, ...] = REFERENCE_PROMPTS  # generated greedily at each epoch end
    probe_max_new_tokens: int = 151  # the reference's max_new_tokens
    save_every_epoch: bool = True  # the reference saved each epoch
    resume_from: str = ""  # checkpoint folder to continue from ("" = fresh run)
    device: str = "auto"  # "auto", "cpu", "cuda"
    cuda_graphs: str = "auto"  # "auto": full-parameter bf16 steps on CUDA replay as CUDA graphs; "on": refuse to run otherwise; "off": eager
    fast_layers: str = "auto"  # "auto": inside those graphs, fused-kernel (Qwen2) or compiled decoder layers; "off"
    save_resume_state: bool = True  # keep optimizer/RNG state (2x the model) with the newest checkpoint for resume
    max_steps: int = 0  # stop after this many optimiser steps (0 = no limit; for smoke tests)
    keep_checkpoints: int = 0  # epoch checkpoints kept besides `final`, the newest (0 = all)
    gpus: int = 1  # processes under torchrun, one per GPU (on the CPU: gloo processes, for tests); 1 = in-process
    shard: str = "auto"  # several GPUs: "ddp" (each holds the model), "fsdp" (FSDP2 shards it), "auto" picks by size


@dataclass(frozen=True)
class GenConfig:
    """Decoding settings for probes, Compare and A/B. None means "the model's own": its
    generation_config, or transformers' default where that leaves a value unset.
    `decoding.resolve_settings` turns this into the settings a given model decodes with."""

    max_new_tokens: int = 151  # the reference's test setting
    do_sample: bool | None = False  # greedy, like the reference's top_k=1; None = the model's (Qwen2.5-Instruct: True)
    temperature: float | None = None  # sampling only; None = the model's (Qwen2.5-Instruct: 0.7)
    top_p: float | None = None  # sampling only; None = the model's (Qwen2.5-Instruct: 0.8)
    top_k: int | None = None  # sampling only, 0 = off; None = the model's (Qwen2.5-Instruct: 20)
    repetition_penalty: float | None = None  # 1.0 = off; None = the model's (Qwen2.5-Instruct: 1.05)
    eos_token_ids: tuple[int, ...] | None = None  # None = the model's end ids and the tokenizer's; () = never stop


def validate(cfg: TrainConfig) -> TrainConfig:
    """Raise ConfigError naming the field and the fix; return cfg unchanged when fine."""
    d = cfg.data
    checks = [
        (cfg.method in ("full", "lora"), "method must be 'full' or 'lora'"),
        (cfg.epochs >= 1, "epochs must be at least 1"),
        (cfg.batch_size >= 1, "batch_size must be at least 1"),
        (cfg.grad_accum_steps >= 1, "grad_accum_steps must be at least 1"),
        (cfg.batch_size % cfg.grad_accum_steps == 0,
         f"batch_size ({cfg.batch_size}) must be a multiple of grad_accum_steps ({cfg.grad_accum_steps})"),
        (0 < cfg.lr < 1, "lr must be between 0 and 1 (the reference used 1e-4)"),
        (cfg.lr_schedule in ("constant", "cosine"), "lr_schedule must be 'constant' or 'cosine'"),
        (cfg.warmup_steps >= 0, "warmup_steps must be 0 or more"),
        (cfg.max_grad_norm >= 0, "max_grad_norm must be 0 (off) or more"),
        (d.max_source_length >= 8, "max_source_length must be at least 8 tokens (the chat template alone needs ~20)"),
        (d.max_target_length >= 1, "max_target_length must be at least 1 token"),
        (0 <= d.val_fraction < 1, "val_fraction must be in [0, 1)"),
        (cfg.lora_rank >= 1, "lora_rank must be at least 1"),
        (cfg.lora_alpha >= 1, "lora_alpha must be at least 1"),
        (0 <= cfg.lora_dropout < 1, "lora_dropout must be in [0, 1)"),
        (cfg.method != "lora" or len(cfg.lora_target_modules) > 0, "lora_target_modules must name at least one module"),
        (cfg.device in ("auto", "cpu", "cuda"), "device must be 'auto', 'cpu' or 'cuda'"),
        (cfg.cuda_graphs in ("auto", "on", "off"), "cuda_graphs must be 'auto', 'on' or 'off'"),
        (cfg.fast_layers in ("auto", "off"), "fast_layers must be 'auto' or 'off'"),
        (cfg.keep_checkpoints >= 0, "keep_checkpoints must be 0 (all) or more"),
        (cfg.log_every_steps >= 0, "log_every_steps must be 0 (auto) or more"),
        (cfg.max_steps >= 0, "max_steps must be 0 (no limit) or more"),
        (1 <= cfg.gpus <= 64, "gpus must be between 1 and 64"),
        (cfg.shard in ("auto", "ddp", "fsdp"), "shard must be 'auto', 'ddp' or 'fsdp'"),
        (cfg.gpus == 1 or cfg.cuda_graphs != "on",
         "cuda_graphs='on' runs on one GPU; several GPUs take eager steps (use cuda_graphs='auto')"),
        (bool(cfg.model.spec.strip()), "model spec is empty: give a Hub id, a local folder or 'demo'"),
        (bool(d.source.strip()), "dataset source is empty: give a Hub id, a .json/.jsonl file or 'sample'"),
    ]
    for ok, message in checks:
        if not ok:
            raise ConfigError(message)
    sanitize_run_name(cfg.run_name)  # refuses a name with nothing safe left, before any job starts
    return cfg


def config_to_dict(cfg) -> dict:
    return dataclasses.asdict(cfg)


def _build(cls, values: dict):
    """Build a dataclass from a dict, ignoring unknown keys (older/newer run files)."""
    names = {f.name: f for f in dataclasses.fields(cls)}
    kwargs = {}
    for key, value in values.items():
        if key not in names:
            continue
        if isinstance(value, list):
            value = tuple(value)
        kwargs[key] = value
    return cls(**kwargs)


def train_config_from_dict(values: dict) -> TrainConfig:
    values = dict(values)
    model = _build(ModelConfig, values.pop("model", {}) or {})
    data = _build(DataConfig, values.pop("data", {}) or {})
    return dataclasses.replace(_build(TrainConfig, values), model=model, data=data)


def save_config(cfg: TrainConfig, path: str | Path) -> None:
    Path(path).write_text(json.dumps(config_to_dict(cfg), ensure_ascii=False, indent=2), encoding="utf-8")


def load_config(path: str | Path) -> TrainConfig:
    return train_config_from_dict(json.loads(Path(path).read_text(encoding="utf-8")))
