"""What a person reads on the page, for the browser tests of issue 24: visible text by tab, and what of it is
in the other language's script.

`visible_texts(page, skip)` collects every visible text node (Plotly's SVG text included) and visible
placeholder, leaving out what is data or model output rather than the page's own words (`CONTENT`).
`leftovers(texts, lang, allowed)` returns the words that do not belong on a page in `lang`: any CJK on the
English page; on the Chinese page any Latin word outside the names that stay as they are (`NAMES`).
"""

from __future__ import annotations

import re

# Data and model output, not the page's words: the sample's Chinese records, probe prompts and answers, chat
# messages, the reference prompts, the language picker's other language, run names, paths. And Gradio's footer:
# Gradio translates it by the browser's locale, and gives no way to switch it with the page (issue 24).
CONTENT = ("#app-lang", "#data-preview [role=gridcell]", "#data-preview tbody", "#data-inspect-text",
           "#data-inspect-tokens", "#train-probes tbody", "#compare-base-chat .message-row",
           "#compare-tuned-chat .message-row", ".gallery", "#compare-ab-table tbody",
           "#runs-table tbody", "#runs-selected", "#runs-pick", "#runs-settings", "#train-checkpoints code",
           "code", "#compare-checkpoint", "#data-search", "#compare-input", "#compare-ab-prompts", "footer",
           ".sr-only")  # Gradio's screen-reader status line: its own untranslated key "common.complete"

# Names that stay as they are on the Chinese page: products, formats, config fields and values the user types.
NAMES = {
    # dataset formats and the column mapping's field names (docs/datasets.md), export formats (docs/export.md)
    "instruction", "output", "question", "answer", "format", "sharegpt", "messages", "conversations", "user_tag",
    "assistant_tag", "human", "gpt", "config", "csv", "tsv", "parquet", "zip", "GGUF", "Ollama", "Modelfile", "F16", "Q8_0", "HF_TOKEN",
    "SFT", "Hub", "Hugging", "Face", "id", "demo", "sample", "json", "jsonl", "trust_remote_code", "Python",
    "epochs", "batch_size", "lr", "max_source_length", "max_target_length", "token", "tokens", "LoRA", "lora_rank",
    "lora_alpha", "lora_dropout", "max_steps", "seed", "weight_decay", "max_grad_norm", "warmup", "constant",
    "cosine", "AdamW", "GiB", "MiB", "RAM", "GPU", "GPUs", "CPU", "CUDA", "p95", "p50", "DDP", "FSDP2", "bf16",
    "fp32", "tok", "s", "M", "B", "K", "ETA", "CSV", "A", "ruozhiba", "Qwen", "Instruct", "hfl", "gpt4", "ruozhi",
    "sft", "Gradio", "API", "English", "safetensors", "checkpoints", "final", "epoch", "runs", "tb", "TensorBoard",
    "Plotly", "x", "y", "GitHub", "max_new_tokens", "val", "train", "upload", "assets", "system_prompt",
    "grad_accum_steps", "packing", "run_name", "save_merged", "mean", "min", "max", "padding", "im_end", "im_start",
    "system", "user", "assistant", "ckpt", "Adam", "Liger", "Triton", "torchrun", "Korthikanti",
}

CJK = re.compile(r"[\u3000-\u303f\u3400-\u4dbf\u4e00-\u9fff\uff00-\uffef]+")
LATIN_WORD = re.compile(r"[A-Za-z][A-Za-z0-9_]*")

VISIBLE_TEXTS_JS = """(skip) => {
    const skipped = skip.flatMap(s => [...document.querySelectorAll(s)]);
    const outside = el => !skipped.some(s => s.contains(el));
    const shown = el => el.checkVisibility({visibilityProperty: true});
    const texts = [];
    const walker = document.createTreeWalker(document.body, NodeFilter.SHOW_TEXT);
    while (walker.nextNode()) {
        const node = walker.currentNode, el = node.parentElement, text = node.textContent.trim();
        if (text && el && !el.closest('script, style') && outside(el) && shown(el)) texts.push(text);
    }
    document.querySelectorAll('[placeholder]').forEach(el => {
        if (el.placeholder && outside(el) && shown(el)) texts.push(el.placeholder);
    });
    return texts;
}"""


def visible_texts(page, skip=CONTENT) -> list[str]:
    return page.evaluate(VISIBLE_TEXTS_JS, list(skip))


def leftovers(texts: list[str], lang: str, allowed: set[str] = frozenset()) -> list[str]:
    """Words of the other script in `texts` (each word once, in page order)."""
    found = []
    for text in texts:
        if lang == "en":
            words = CJK.findall(text)
        else:
            words = [w for w in LATIN_WORD.findall(text) if w not in NAMES and w.lower() not in NAMES]
        found += [w for w in words if w not in allowed and w not in found]
    return found
