"""Load a model and tokenizer from one spec: a Hub id, a local folder, or "demo".

"demo" is a tiny Qwen2-architecture model with a byte-level BPE tokenizer that
is built here, deterministically, from the bundled sample the first time it is
asked for, saved to the cache folder, and from then on loaded through the same
`from_pretrained` path as a real model. Weights load from safetensors only, and
remote code runs only when the caller opts in. Device and dtype choice live here.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
import threading
from pathlib import Path

import torch

from . import specs
from .errors import ModelLoadError, first_line

DEMO_SPEC = "demo"
DEMO_VERSION = "v1"  # bump when the recipe below changes, so old caches are rebuilt
DEMO_VOCAB_SIZE = 3000
SPECIAL_TOKENS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
# Qwen2.5's template, minus tool calling: the demo model must read chats exactly
# as the real one does so that everything the app renders is the same shape.
QWEN_STYLE_CHAT_TEMPLATE = (
    "{%- if messages[0]['role'] == 'system' %}"
    "{{- '<|im_start|>system\\n' + messages[0]['content'] + '<|im_end|>\\n' }}"
    "{%- else %}{{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}{%- endif %}"
    "{%- for message in messages %}"
    "{%- if message['role'] != 'system' %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endif %}{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}{%- endif %}"
)
_demo_lock = threading.Lock()


def cache_root() -> Path:
    """Where built artefacts (the demo model) live; RUOZHI_CACHE overrides."""
    return Path(os.environ.get("RUOZHI_CACHE", Path.home() / ".cache" / "ruozhi-sft"))


def pick_device(preference: str = "auto") -> torch.device:
    if preference == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(key="err.model.no_cuda")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def pick_dtype(device: torch.device) -> torch.dtype:
    """bf16 compute where the GPU supports it; fp32 elsewhere (CPU bf16 is slow and lossy)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported():
        return torch.bfloat16
    return torch.float32


def is_demo(spec: str) -> bool:
    return specs.model_kind(spec, look_at_disk=False) == "demo"


def train_chat_tokenizer(texts: list[str], vocab_size: int = DEMO_VOCAB_SIZE):
    """A byte-level BPE with Qwen's special tokens and chat template, trained on `texts`."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer=trainer)
    return PreTrainedTokenizerFast(
        tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
        additional_special_tokens=["<|im_start|>"], chat_template=QWEN_STYLE_CHAT_TEMPLATE,
        model_max_length=1024, padding_side="right")


def _demo_texts() -> list[str]:
    from .config import DEFAULT_SYSTEM_PROMPT, REFERENCE_PROMPTS
    from .data import SAMPLE_DIR

    texts = [DEFAULT_SYSTEM_PROMPT, "You are a helpful assistant.", *REFERENCE_PROMPTS, "system", "user", "assistant"]
    for name in ("train.json", "val.json"):
        for obj in json.loads((SAMPLE_DIR / name).read_text(encoding="utf-8")):
            texts += [obj["instruction"], obj.get("input", ""), obj["output"]]
    return texts


def build_demo_model(folder: Path) -> None:
    """Write the demo tokenizer and a seeded random ~1M-parameter Qwen2 into `folder`."""
    from transformers import Qwen2Config, Qwen2ForCausalLM

    tokenizer = train_chat_tokenizer(_demo_texts())
    config = Qwen2Config(
        vocab_size=len(tokenizer), hidden_size=128, intermediate_size=344, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=1024,
        tie_word_embeddings=True, bos_token_id=None, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, rope_theta=10000.0)
    state = torch.random.get_rng_state()
    torch.manual_seed(0)
    model = Qwen2ForCausalLM(config)
    torch.random.set_rng_state(state)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)


def demo_model_dir() -> Path:
    """The demo model's folder, built on first use (thread-safe, atomic rename)."""
    folder = cache_root() / f"demo-model-{DEMO_VERSION}"
    with _demo_lock:
        if not (folder / "config.json").exists():
            folder.parent.mkdir(parents=True, exist_ok=True)
            tmp = Path(tempfile.mkdtemp(prefix=".demo-build-", dir=folder.parent))
            try:
                build_demo_model(tmp)
                if folder.exists():
                    shutil.rmtree(folder)
                tmp.rename(folder)
            finally:
                shutil.rmtree(tmp, ignore_errors=True)
    return folder


def resolve_spec(spec: str) -> str:
    """A spec as `from_pretrained` takes it: the demo folder, a local folder, or a Hub id."""
    spec = spec.strip()
    if not spec:
        raise ModelLoadError(key="err.model.none")
    kind = specs.model_kind(spec)
    if kind == "demo":
        return str(demo_model_dir())
    if kind == "hub":
        return spec
    path = Path(spec).expanduser()
    if not path.exists():
        raise ModelLoadError(key="err.model.no_folder", spec=spec)
    if not path.is_dir():
        raise ModelLoadError(key="err.model.is_file", spec=spec)
    return str(path.resolve())


def _load_error(spec: str, what: str, e: Exception) -> ModelLoadError:
    key = "err.model.load_hub" if specs.model_kind(spec) == "hub" else "err.model.load"
    return ModelLoadError(key=key, what=what, spec=spec, cause=first_line(e))


def check_weights_match(spec: str, info: dict) -> None:
    """Refuse weights that do not fill the model the config describes: transformers would leave the
    missing tensors randomly initialised and train them silently."""
    def named(key) -> str:  # mismatched entries are (name, checkpoint shape, model shape)
        if isinstance(key, tuple):
            return f"{key[0]} {list(key[1])} in the weights, {list(key[2])} in the config"
        return str(key)

    problems = [(name, sorted(info.get(key) or (), key=str)) for name, key in
                (("missing", "missing_keys"), ("unexpected", "unexpected_keys"), ("mis-shaped", "mismatched_keys"))]
    problems = [(name, keys) for name, keys in problems if keys]
    if problems:
        detail = "; ".join(f"{len(keys)} {name} (first: {', '.join(named(k) for k in keys[:3])})"
                           for name, keys in problems)
        raise ModelLoadError(key="err.model.mismatch", spec=spec, detail=detail)


# What a causal LM needs from a Hub repo: configs, tokenizer files and safetensors (never pickles).
HUB_FILE_PATTERNS = ["*.json", "*.safetensors", "*.txt", "*.model", "*.jinja", "*.tiktoken"]


def fetch_model_files(spec: str) -> str:
    """Download a Hub model into the Hugging Face cache; a no-op for `demo` and local folders.

    UI events call this under `gr.Progress(track_tqdm=True)` before a long job, so
    the ~1 GB download shows its progress in the page instead of stalling a thread.
    """
    path = resolve_spec(spec)
    if Path(path).exists():
        return path
    from huggingface_hub import snapshot_download

    try:
        return snapshot_download(path, allow_patterns=HUB_FILE_PATTERNS)
    except Exception as e:
        raise _load_error(spec, "model files", e) from None


def load_tokenizer(spec: str, trust_remote_code: bool = False):
    """Only the tokenizer: enough for statistics, never loads weights."""
    from transformers import AutoTokenizer

    path = resolve_spec(spec)
    try:
        tokenizer = AutoTokenizer.from_pretrained(path, trust_remote_code=trust_remote_code)
    except Exception as e:
        raise _load_error(spec, "tokenizer", e) from None
    if tokenizer.chat_template is None:
        raise ModelLoadError(key="err.model.no_template", spec=spec)
    return tokenizer


def load_model(spec: str, device: torch.device | None = None, dtype: torch.dtype | None = None,
               trust_remote_code: bool = False):
    """AutoModelForCausalLM from safetensors only, moved to `device` in `dtype`."""
    from transformers import AutoModelForCausalLM

    device = device or pick_device()
    dtype = dtype or pick_dtype(device)
    path = resolve_spec(spec)
    folder = Path(path)
    if folder.is_dir() and not list(folder.glob("*.safetensors")) and list(folder.glob("*.bin")) + list(folder.glob("*.pt")):
        raise ModelLoadError(
            f"'{spec}' holds only pickled weights (.bin/.pt), which can run code when loaded; this app loads "
            "safetensors only. Convert it once with transformers: from_pretrained(...).save_pretrained(out, safe_serialization=True)")
    try:
        model, info = AutoModelForCausalLM.from_pretrained(
            path, dtype=dtype, use_safetensors=True, trust_remote_code=trust_remote_code, output_loading_info=True,
            ignore_mismatched_sizes=True)  # reported by check_weights_match, naming the tensors
    except Exception as e:
        raise _load_error(spec, "model", e) from None
    check_weights_match(spec, info)
    return model.to(device)


def describe_spec(spec: str) -> str:
    """What the UI shows next to a pane: the exact weights in use."""
    return "demo (tiny offline model, random weights)" if is_demo(spec) else spec
