"""The Train form as plain values: its fields and defaults, widget values -> TrainConfig, the checks shown
beside Start, and the pre-flight estimate.

Defaults are read from the TrainConfig dataclass, never restated. `form_problem` runs the checks the page
shows beside Start while the user types (a field's bound, named in the page's language), before a click
could fail; `truncation_warning` says when max_target_length would cut most answers of the loaded data.
No Gradio here: the tab (train_tab.py) wires these to components.
"""

from __future__ import annotations

import dataclasses

from ..config import ModelConfig, TrainConfig, validate
from ..errors import ConfigError
from ..i18n import t
from ..zerogpu import visitor_line

DEFAULTS = TrainConfig()
INT_FIELDS = ("epochs", "batch_size", "grad_accum_steps", "warmup_steps", "max_source_length", "max_target_length",
              "lora_rank", "lora_alpha", "max_steps", "seed", "gpus")
FLOAT_FIELDS = ("lr", "lora_dropout", "weight_decay", "max_grad_norm")
DATA_FIELDS = ("max_source_length", "max_target_length", "system_prompt")
# The form's fields in the order of the Start handler's inputs (after model, trust, source).
FORM_FIELDS = ("method", "epochs", "batch_size", "grad_accum_steps", "lr", "lr_schedule", "warmup_steps",
               "max_source_length", "max_target_length", "packing", "run_name", "save_merged", "lora_rank",
               "lora_alpha", "lora_dropout", "max_steps", "seed", "weight_decay", "max_grad_norm", "system_prompt",
               "gpus", "shard")


# Each number's bound as validate() holds it, checked here first so that the page can name the field in its
# own language and give the bound (a test checks both agree). (low, high, low_included, high_included)
BOUNDS = {
    "epochs": (1, None, True, False), "batch_size": (1, None, True, False),
    "grad_accum_steps": (1, None, True, False), "warmup_steps": (0, None, True, False),
    "max_source_length": (8, None, True, False), "max_target_length": (1, None, True, False),
    "lora_rank": (1, None, True, False), "lora_alpha": (1, None, True, False), "max_steps": (0, None, True, False),
    "max_grad_norm": (0, None, True, False), "lr": (0, 1, False, False), "lora_dropout": (0, 1, True, False),
}
MOST_ANSWERS_CUT = 0.5  # warn before a run whose max_target_length cuts more than this share of the answers


class FieldName(str):
    """A form field's name in an error: the CLI's English says `epochs`, the page says the field's label."""

    def localized(self, lang: str) -> str:
        return t(f"train.{self}", lang)


def check_bounds(values: dict) -> None:
    """Raise ConfigError naming the first number outside its bound (the field and the bound, in the page's
    language); the numbers are already parsed."""
    for name, (low, high, low_in, high_in) in BOUNDS.items():
        value = values[name]
        low_ok = value >= low if low_in else value > low
        high_ok = high is None or (value <= high if high_in else value < high)
        if low_ok and high_ok:
            continue
        key = "err.form.min" if high is None else "err.form.open_range" if not low_in else "err.form.half_open"
        raise ConfigError(key=key, name=FieldName(name), low=low, high=high, value=value)
    if values["batch_size"] % values["grad_accum_steps"]:
        raise ConfigError(key="err.form.multiple", batch=values["batch_size"], accum=values["grad_accum_steps"])


def truncation_warning(stats, lang: str) -> str:
    """A line beside Start when max_target_length would cut most answers of the loaded data, else ''."""
    if stats is None or stats.output_truncated_share <= MOST_ANSWERS_CUT:
        return ""
    return t("train.warn_truncation", lang, share=stats.output_truncated_share, tgt=stats.max_target_length,
             p95=stats.output.p95)


def form_defaults() -> dict:
    """Every form field's default, read from TrainConfig / DataConfig."""
    return {name: getattr(DEFAULTS.data if name in DATA_FIELDS else DEFAULTS, name) for name in FORM_FIELDS}


def _number(name: str, value, kind):
    if value is None or value == "":
        raise ConfigError(key="err.form.empty", name=FieldName(name))
    try:
        number = float(value) if not isinstance(value, int) or isinstance(value, bool) else value
    except (TypeError, ValueError):
        raise ConfigError(key="err.form.number", name=FieldName(name), value=repr(str(value)[:40])) from None
    if number != number or number in (float("inf"), float("-inf")):
        raise ConfigError(key="err.form.finite", name=FieldName(name))
    if kind is int:
        if isinstance(number, float) and number != int(number):
            raise ConfigError(key="err.form.whole_got", name=FieldName(name), value=value)
        return int(number)
    return float(number)


def build_train_config(model_spec: str, trust_remote_code: bool, data_source: str, **form) -> TrainConfig:
    """Widget values -> a validated TrainConfig; fields not on the form keep their defaults."""
    options = form.pop("data_options", None) or {}  # the Data tab's column mapping, subset, splits (its last load)
    if options.get("source") != (data_source or "").strip():
        options = {}  # they were chosen for another source
    unknown = set(form) - set(FORM_FIELDS)
    if unknown:
        raise ConfigError(f"unknown form field(s): {', '.join(sorted(unknown))}")
    values = {**form_defaults(), **form}
    for name in INT_FIELDS:
        values[name] = _number(name, values[name], int)
    for name in FLOAT_FIELDS:
        values[name] = _number(name, values[name], float)
    check_bounds(values)
    values["packing"], values["save_merged"] = bool(values["packing"]), bool(values["save_merged"])
    data = dataclasses.replace(DEFAULTS.data, source=(data_source or "").strip(),
                               **{k: str(options.get(k) or "") for k in ("columns", "subset", "train_split", "val_split")},
                               **{k: values.pop(k) for k in DATA_FIELDS})
    model = ModelConfig(spec=(model_spec or "").strip(), trust_remote_code=bool(trust_remote_code))
    return validate(dataclasses.replace(DEFAULTS, model=model, data=data, **values))


# --- pre-flight estimate ---------------------------------------------------------------------
def _fmt_count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.2f} M" if n >= 1e6 else f"{n:,}"


def preflight_markdown(cfg: TrainConfig, n_train: int, lang: str, check_config=None) -> str:
    from ..preflight import estimate

    import torch

    est = estimate(cfg, n_train, check_config)
    steps = str(est.num_steps) if est.num_steps is not None else t("train.steps_unknown", lang)
    on_gpu = cfg.device != "cpu" and torch.cuda.is_available()
    return t("train.estimate", lang, trained=_fmt_count(est.params_trained), total=_fmt_count(est.params_total),
             memory=t("train.memory_gpu" if on_gpu else "train.memory_cpu", lang),
             share=est.params_trained / max(1, est.params_total), steps=steps, mem=est.memory_gib,
             weights=est.weights_gib, optim=est.optimizer_gib, act=est.activations_gib) \
        + visitor_line(cfg, est, n_train, lang)  # on a ZeroGPU Space: the quota it spends, in how many leases
