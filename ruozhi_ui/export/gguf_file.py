"""GGUF files for llama.cpp and Ollama, written with the `gguf` package (no llama.cpp checkout or build).

Owns the mapping of a Qwen2-architecture transformers model to llama.cpp's `qwen2` architecture: the
hyper-parameters, the tensors (named through gguf's own TensorNameMap, stored as F16 or Q8_0), and the
tokenizer as llama.cpp reads a byte-level BPE: every token string with its type (special tokens are
CONTROL, so a chat's `<|im_start|>` parses as one token), the merges, the pre-tokenizer whose regex the
tokenizer really uses, the special token ids and the chat template. Also the Ollama `Modelfile` beside
it. Takes a loaded (LoRA already merged) model; knows nothing of runs, jobs or Gradio.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Callable, Literal

import numpy as np

from ..errors import ConfigError

Quant = Literal["f16", "q8_0"]
QUANTS: tuple[Quant, ...] = ("f16", "q8_0")
SUPPORTED_MODEL_TYPES = ("qwen2",)  # transformers model_type -> llama.cpp arch of the same name
# The split regex of Qwen2's tokenizer, which llama.cpp implements as pre-tokenizer "qwen2";
# GPT-2's own regex (a plain ByteLevel pre-tokenizer with use_regex) is "gpt2".
QWEN2_SPLIT = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|"
               r"\s*[\r\n]+|\s+(?!\S)|\s+")
MODELFILE = "Modelfile"


def gguf_name(quant: Quant) -> str:
    return f"model-{quant}.gguf"


def check_convertible(config) -> None:
    """Refuse an architecture we cannot write, naming those we can."""
    if getattr(config, "model_type", "") not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(key="err.export.arch", arch=getattr(config, "model_type", "?"),
                          supported=", ".join(SUPPORTED_MODEL_TYPES))


def check_quant(quant: str) -> Quant:
    if quant not in QUANTS:
        raise ConfigError(key="err.export.quant", quant=quant, quants=", ".join(QUANTS))
    return quant  # type: ignore[return-value]


def pre_tokenizer_type(tokenizer) -> str:
    """llama.cpp's name for the pre-tokenizer the (fast) tokenizer really runs; refused when it has none."""
    spec = json.loads(tokenizer.backend_tokenizer.to_str())
    pre = spec.get("pre_tokenizer") or {}
    if pre.get("type") == "ByteLevel" and pre.get("use_regex", True):
        return "gpt2"
    parts = pre.get("pretokenizers", []) if pre.get("type") == "Sequence" else []
    if (len(parts) == 2 and parts[0].get("type") == "Split" and parts[0].get("pattern", {}).get("Regex") == QWEN2_SPLIT
            and parts[1].get("type") == "ByteLevel" and not parts[1].get("use_regex", True)):
        return "qwen2"
    raise ConfigError(key="err.export.tokenizer", what=json.dumps(pre)[:200])


def token_table(tokenizer, n_vocab: int) -> tuple[list[str], list[int]]:
    """Every id's token string and llama.cpp token type, as the converter of llama.cpp builds them: the
    embedding rows past the tokenizer's last id are UNUSED padding tokens."""
    import gguf

    by_id = {i: s for s, i in tokenizer.get_vocab().items()}
    added = tokenizer.added_tokens_decoder
    tokens, types = [], []
    for i in range(n_vocab):
        if i not in by_id:
            tokens.append(f"[PAD{i}]")
            types.append(gguf.TokenType.UNUSED)
        elif i in added:
            tokens.append(added[i].content)
            types.append(gguf.TokenType.CONTROL if added[i].special else gguf.TokenType.USER_DEFINED)
        else:
            tokens.append(by_id[i])
            types.append(gguf.TokenType.NORMAL)
    return tokens, types


def _rope_theta(config) -> float:
    params = getattr(config, "rope_parameters", None) or {}
    return float(params.get("rope_theta") or getattr(config, "rope_theta", 10000.0))


def _tensor_data(name: str, array: np.ndarray, quant: Quant):
    """(data, raw type) as the llama.cpp converter stores them: 1-D tensors (norms, biases) F32; matrices
    F16, or Q8_0 where a row divides into its 32-value blocks (else F16, as llama.cpp falls back)."""
    import gguf

    if array.ndim < 2:
        return array.astype(np.float32), gguf.GGMLQuantizationType.F32
    if quant == "q8_0" and array.shape[-1] % gguf.GGML_QUANT_SIZES[gguf.GGMLQuantizationType.Q8_0][0] == 0:
        return gguf.quants.quantize(array.astype(np.float32), gguf.GGMLQuantizationType.Q8_0), \
            gguf.GGMLQuantizationType.Q8_0
    return array.astype(np.float16), gguf.GGMLQuantizationType.F16


def write_gguf(model, tokenizer, tokenizer_dir: Path, out_path: Path, quant: Quant, name: str,
               progress: Callable[[float], None] = lambda done: None) -> Path:
    """Write `model` (a transformers Qwen2 causal LM) and its tokenizer as one GGUF file at `out_path`;
    `tokenizer_dir` holds the tokenizer's files (merges, special tokens and chat template come from there).
    Written under a temporary name and renamed, so a cancelled export leaves no half file."""
    import gguf

    config = model.config
    check_convertible(config)
    quant = check_quant(quant)
    pre = pre_tokenizer_type(tokenizer)
    state = model.state_dict()
    n_vocab = state["model.embed_tokens.weight"].shape[0]
    names = gguf.TensorNameMap(gguf.MODEL_ARCH.QWEN2, config.num_hidden_layers)
    out_path = Path(out_path)
    tmp = out_path.with_name(f".tmp-{out_path.name}-{os.getpid()}")
    writer = gguf.GGUFWriter(str(tmp), gguf.MODEL_ARCH_NAMES[gguf.MODEL_ARCH.QWEN2])
    try:
        writer.add_name(name)
        writer.add_context_length(config.max_position_embeddings)
        writer.add_embedding_length(config.hidden_size)
        writer.add_block_count(config.num_hidden_layers)
        writer.add_feed_forward_length(config.intermediate_size)
        writer.add_head_count(config.num_attention_heads)
        writer.add_head_count_kv(config.num_key_value_heads)
        writer.add_rope_freq_base(_rope_theta(config))
        writer.add_layer_norm_rms_eps(config.rms_norm_eps)
        writer.add_file_type(gguf.LlamaFileType.MOSTLY_Q8_0 if quant == "q8_0" else gguf.LlamaFileType.MOSTLY_F16)
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
        tokens, types = token_table(tokenizer, n_vocab)
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre(pre)
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        special = gguf.SpecialVocab(tokenizer_dir, load_merges=True, n_vocab=n_vocab)
        special.add_to_gguf(writer)
        if special.chat_template is None and tokenizer.chat_template:
            writer.add_chat_template(tokenizer.chat_template)
        if tokenizer.eos_token_id is not None:  # <|im_end|>: where a chat turn ends
            writer.add_eot_token_id(tokenizer.eos_token_id)
        items = [(k, v) for k, v in state.items()
                 if not (k == "lm_head.weight" and getattr(config, "tie_word_embeddings", False))]
        for i, (key, tensor) in enumerate(items):
            target = names.get_name(key, try_suffixes=(".weight", ".bias"))
            if target is None:
                raise ConfigError(key="err.export.tensor", name=key)
            data, dtype = _tensor_data(target, tensor.detach().float().cpu().numpy(), quant)
            writer.add_tensor(target, data, raw_dtype=dtype)
            progress(0.5 * (i + 1) / len(items))
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file(progress=False)
        progress(1.0)
    except BaseException:
        writer.close()
        tmp.unlink(missing_ok=True)
        raise
    writer.close()
    tmp.replace(out_path)
    return out_path


def modelfile_text(gguf_file: str, system_prompt: str, stop_tokens: list[str]) -> str:
    """An Ollama Modelfile for the GGUF beside it: ChatML (Qwen's chat format), the run's system prompt."""
    system = system_prompt.replace('"""', '" " "')
    lines = [f"FROM ./{gguf_file}", "",
             'TEMPLATE """{{ if .System }}<|im_start|>system', "{{ .System }}<|im_end|>",
             "{{ end }}{{ if .Prompt }}<|im_start|>user", "{{ .Prompt }}<|im_end|>",
             "{{ end }}<|im_start|>assistant", '{{ .Response }}<|im_end|>', '"""', "",
             f'SYSTEM """{system}"""', ""]
    lines += [f'PARAMETER stop "{token}"' for token in stop_tokens]
    return "\n".join(lines) + "\n"


def stop_tokens(tokenizer) -> list[str]:
    """The end-of-turn and end-of-text tokens a chat must stop at."""
    names = [tokenizer.eos_token, "<|im_end|>", "<|endoftext|>"]
    vocab = tokenizer.get_vocab()
    return [n for n in dict.fromkeys(names) if n and n in vocab]
