"""Pre-flight estimate of a training run: parameters trained, memory, number of steps.

Parameters are counted exactly by building the model on PyTorch's "meta" device
from its config (no weights are read or downloaded beyond config.json). Memory
is a rough formula stated in `estimate_memory_bytes`. Knows nothing of Gradio;
the Train tab formats the result.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import lru_cache

from .errors import ModelLoadError, first_line

ACTIVATION_BYTES_PER_TOKEN_LAYER_HIDDEN = 34  # Korthikanti et al. 2022, 16-bit, no recompute, no s^2 term (SDPA)
GIB = 2 ** 30


@dataclass(frozen=True)
class ModelShape:
    params_total: int
    hidden_size: int
    num_layers: int
    lora_in_out: tuple[tuple[str, int, int], ...]  # (module leaf name, in_features, out_features) per Linear


@dataclass(frozen=True)
class Estimate:
    params_total: int
    params_trained: int
    num_steps: int | None  # None until the data is loaded (n_train unknown)
    memory_gib: float
    weights_gib: float
    optimizer_gib: float  # grads + AdamW moments
    activations_gib: float


@lru_cache(maxsize=8)
def read_config(spec: str, trust_remote_code: bool = False):
    """The model's config.json only (a Hub download of a few KB, or a local read)."""
    from transformers import AutoConfig

    from .models import resolve_spec

    path = resolve_spec(spec)
    try:
        return AutoConfig.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:  # offline without a cached config, missing repo, ...
        raise ModelLoadError(key="err.model.config", spec=spec, cause=first_line(e)) from None


@lru_cache(maxsize=8)
def model_shape(spec: str, trust_remote_code: bool = False) -> ModelShape:
    """Exact parameter count and Linear shapes from the config alone (meta device, no weights).
    Callers check the config's size first (`Policy.check_config_shape`): building is what costs."""
    import torch
    from transformers import AutoModelForCausalLM

    config = read_config(spec, trust_remote_code)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, trust_remote_code=trust_remote_code)
    linears = tuple((name.rsplit(".", 1)[-1], m.in_features, m.out_features)
                    for name, m in model.named_modules() if isinstance(m, torch.nn.Linear))
    text_config = config.get_text_config() if hasattr(config, "get_text_config") else config
    return ModelShape(params_total=sum(p.numel() for p in model.parameters()),
                      hidden_size=int(text_config.hidden_size), num_layers=int(text_config.num_hidden_layers),
                      lora_in_out=linears)


def lora_params(shape: ModelShape, rank: int, target_modules: tuple[str, ...]) -> int:
    """A LoRA adapter on a Linear(in, out) adds A (rank x in) and B (out x rank)."""
    return sum(rank * (i + o) for name, i, o in shape.lora_in_out if name in target_modules)


def bytes_per_parameter(cfg, cuda_bf16: bool) -> tuple[int, int]:
    """(weight bytes per parameter, gradient + AdamW bytes per trained parameter), as `train/precision.py`
    chooses: a full-parameter run on one bf16 GPU keeps bf16 weights and gradients with fp32 moments (2, 2 + 8);
    every other run fp32 weights (4, 4 + 8), computing in bf16 autocast where the GPU has it."""
    if cuda_bf16 and cfg.method == "full" and cfg.gpus == 1:
        return 2, 2 + 8
    return 4, 4 + 8


def estimate_memory_bytes(shape: ModelShape, params_trained: int, micro_batch: int, seq_len: int,
                          weight_bytes: int = 4, optimizer_bytes: int = 12) -> tuple[int, int, int]:
    """(weights, grads + optimizer, activations) in bytes, per GPU (each of several holds the whole model: DDP).

    weights     = weight_bytes x all parameters (see `bytes_per_parameter`)
    grads+AdamW = optimizer_bytes x trained parameters (gradient, two fp32 moments)
    activations = 34 B x micro_batch x seq_len x hidden x layers (Korthikanti et al. 2022,
                  16-bit activations, no recomputation; flash/SDPA attention stores no s^2 term;
                  the loss is computed at label positions in chunks, so full logits are not counted)
    """
    weights = weight_bytes * shape.params_total
    optimizer = optimizer_bytes * params_trained
    activations = ACTIVATION_BYTES_PER_TOKEN_LAYER_HIDDEN * micro_batch * seq_len * shape.hidden_size * shape.num_layers
    return weights, optimizer, activations


def num_steps(n_train: int, epochs: int, batch_size: int, max_steps: int = 0, gpus: int = 1) -> int:
    """epochs x the global batches of an epoch (batch_size per GPU x gpus; a last batch smaller than the
    number of GPUs is left out, as `train/step.plan_epoch` does), capped by max_steps when it is set."""
    global_batch = max(1, int(batch_size)) * max(1, int(gpus))
    batches, last = math.ceil(int(n_train) / global_batch), int(n_train) % global_batch
    steps = int(epochs) * (batches - (0 < last < gpus))
    return min(steps, int(max_steps)) if max_steps else steps


def cuda_bf16_likely(device: str) -> bool:
    """Whether the run will train on a bf16 GPU, asked without starting CUDA here (the app's process never
    touches the GPU): every CUDA GPU this app targets (A100, H100, L4, ZeroGPU) has bf16."""
    if device == "cpu":
        return False
    import torch

    return torch.cuda.is_available()


def estimate(cfg, n_train: int | None, check_config=None, cuda_bf16: bool | None = None) -> Estimate:
    """The estimate for a TrainConfig; `n_train` None or 0 leaves the step count unknown. `check_config`
    (e.g. `Policy.check_config_shape`) sees the config before any model is built from it; `cuda_bf16` None
    asks `cuda_bf16_likely`."""
    if check_config is not None:
        check_config(read_config(cfg.model.spec, cfg.model.trust_remote_code))
    shape = model_shape(cfg.model.spec, cfg.model.trust_remote_code)
    trained = shape.params_total if cfg.method == "full" else lora_params(shape, cfg.lora_rank, cfg.lora_target_modules)
    seq_len = cfg.data.max_source_length + cfg.data.max_target_length + 1  # + <|im_end|>
    micro_batch = max(1, cfg.batch_size // max(1, cfg.grad_accum_steps))
    per_weight, per_trained = bytes_per_parameter(cfg, cuda_bf16_likely(cfg.device) if cuda_bf16 is None else cuda_bf16)
    weights, optimizer, activations = estimate_memory_bytes(shape, trained, micro_batch, seq_len, per_weight, per_trained)
    steps = num_steps(n_train, cfg.epochs, cfg.batch_size, cfg.max_steps, cfg.gpus) if n_train else None
    return Estimate(params_total=shape.params_total, params_trained=trained, num_steps=steps,
                    memory_gib=(weights + optimizer + activations) / GIB, weights_gib=weights / GIB,
                    optimizer_gib=optimizer / GIB, activations_gib=activations / GIB)
