"""The model card an export carries: `README.md` with Hub metadata, in zh and en, and its loss curve.

Built with huggingface_hub's ModelCard/ModelCardData, so the YAML block is what the Hub validates.
The text says what was trained (method and settings), on which data (the Data tab's token-length
table, measured again with the checkpoint's tokenizer), the final losses, the loss curve (an SVG
drawn here from the run's numbers: no browser, no plotting backend), the probe prompts' answers at
the first and the last epoch, and how to load the result (transformers, peft, GGUF/Ollama).
"""

from __future__ import annotations

import html
from pathlib import Path

from .. import specs
from ..i18n import LANGS, t
from .source import ExportSource

CARD = "README.md"
LOSS_IMAGE = "loss_curve.svg"
KNOWN_LICENSES = {"Qwen/Qwen2.5-0.5B-Instruct": "apache-2.0"}  # base models whose license we know offline
SVG_W, SVG_H, PAD = 640, 320, 40
ANSWER_CHARS = 300  # of each probe answer in the card's table


def loss_svg(steps: tuple, evals: tuple) -> str:
    """Train loss (grey) and validation loss (red) against the step, as a self-contained SVG."""
    points = [*steps, *evals]
    if not points:
        return f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_W}" height="{SVG_H}"></svg>\n'
    x_max = max(s for s, _ in points) or 1
    losses = [v for _, v in points if v == v]
    lo, hi = (min(losses), max(losses)) if losses else (0.0, 1.0)
    hi = hi if hi > lo else lo + 1.0

    def xy(step, loss):
        return (PAD + (SVG_W - 2 * PAD) * step / x_max, SVG_H - PAD - (SVG_H - 2 * PAD) * (loss - lo) / (hi - lo))

    def line(series, color):
        pts = " ".join(f"{x:.1f},{y:.1f}" for x, y in (xy(s, v) for s, v in series if v == v))
        return f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{pts}"/>'

    return "\n".join([
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{SVG_W}" height="{SVG_H}" font-family="sans-serif" font-size="12">',
        f'<rect width="{SVG_W}" height="{SVG_H}" fill="white"/>',
        f'<line x1="{PAD}" y1="{SVG_H - PAD}" x2="{SVG_W - PAD}" y2="{SVG_H - PAD}" stroke="black"/>',
        f'<line x1="{PAD}" y1="{PAD}" x2="{PAD}" y2="{SVG_H - PAD}" stroke="black"/>',
        f'<text x="{PAD}" y="{PAD - 8}">loss {hi:.3f}</text>',
        f'<text x="{PAD}" y="{SVG_H - PAD + 16}">{lo:.3f}</text>',
        f'<text x="{SVG_W - PAD}" y="{SVG_H - PAD + 16}" text-anchor="end">step {x_max}</text>',
        line(steps, "#94a3b8"), line(evals, "#dc2626"),
        f'<text x="{SVG_W - PAD}" y="{PAD - 8}" text-anchor="end" fill="#dc2626">validation</text>',
        f'<text x="{SVG_W - PAD - 80}" y="{PAD - 8}" text-anchor="end" fill="#64748b">train</text>',
        "</svg>", ""])


def card_data(source: ExportSource, merged: bool = False):
    from huggingface_hub import ModelCardData

    cfg = source.config
    base = cfg.model.spec if cfg and specs.model_kind(cfg.model.spec, look_at_disk=False) == "hub" else None
    dataset = None
    if cfg and specs.data_kind(cfg.data.source, look_at_disk=False) == "hub":
        dataset = (specs.split_hub_dataset(cfg.data.source) or (cfg.data.source,))[0]
    lora = source.kind == "lora" and not merged
    tags = ["ruozhi-sft", "sft", "qwen2", *(["lora"] if source.kind == "lora" else [])]
    return ModelCardData(base_model=base, datasets=[dataset] if dataset else None,
                         library_name="peft" if lora else "transformers", pipeline_tag="text-generation",
                         language=["zh", "en"], license=KNOWN_LICENSES.get(base or ""), tags=tags)


def data_table(source: ExportSource, uploads_dir: Path | None = None) -> list[list] | None:
    """The Data tab's token-length table for the run's data, or None when the data is not at hand here
    (a Hub dataset is not downloaded just for a card)."""
    cfg = source.config
    if cfg is None or specs.data_kind(cfg.data.source, look_at_disk=False) == "hub":
        return None
    from ..data import load_source
    from ..errors import RuozhiError
    from ..models import load_tokenizer
    from ..stats import compute_stats, reference_table

    try:
        splits = load_source(cfg.data.source, cfg.data.val_fraction, cfg.data.seed, uploads_dir=uploads_dir)
        stats = compute_stats(splits.train, load_tokenizer(str(source.path)), cfg.data.system_prompt,
                              cfg.data.max_source_length, cfg.data.max_target_length, cfg.batch_size)
    except (RuozhiError, OSError):
        return None  # the upload was deleted since, or the file moved: the card says so
    return reference_table(stats)


def _md(text: str) -> str:
    """User text (prompts, answers, names) shown as text, never as markup the Hub would render."""
    return html.escape(str(text)).replace("|", "&#124;").replace("\n", " ").replace("`", "&#96;")


def _section(source: ExportSource, lang: str, table, repo_id: str, gguf_files: list[str], merged: bool) -> str:
    cfg, record = source.config, source.record
    tr = lambda key, **kw: t(f"card.{key}", lang, **kw)
    out = [f"## {tr('title')}", ""]
    if cfg is not None:
        method = "LoRA" if cfg.method == "lora" else tr("full")
        rows = [(tr("method"), method + (f" (r={cfg.lora_rank}, alpha={cfg.lora_alpha})" if cfg.method == "lora" else "")),
                (tr("base"), cfg.model.spec), (tr("data"), cfg.data.source), (tr("epochs"), cfg.epochs),
                (tr("batch"), cfg.batch_size), (tr("lr"), f"{cfg.lr:g} ({cfg.lr_schedule})"),
                (tr("max_lengths"), f"{cfg.data.max_source_length} / {cfg.data.max_target_length}"),
                (tr("system_prompt"), cfg.data.system_prompt)]
        out += [f"| {tr('setting')} | {tr('value')} |", "|---|---|", *(f"| {k} | {_md(v)} |" for k, v in rows), ""]
    out += [f"### {tr('data_title')}", ""]
    if table:
        out += [f"| {tr('field')} | min | max | mean | p95 |", "|---|---|---|---|---|"]
        out += [f"| {name} | {lo} | {hi} | {mean:.1f} | {p95:.1f} |" for name, lo, hi, mean, p95 in table]
    else:
        out.append(tr("data_none"))
    out += ["", f"### {tr('loss_title')}", ""]
    if record is not None:
        train = f"{record.steps[-1][1]:.4f}" if record.steps else "—"
        val = f"{record.final_val_loss:.4f}" if record.final_val_loss is not None else "—"
        out += [tr("losses", train=train, val=val), "", f"![{tr('loss_title')}]({LOSS_IMAGE})"]
    else:
        out.append(tr("no_run"))
    probes = source.probes()
    if probes:
        shown = [probes[0], probes[-1]] if len(probes) > 1 else probes[:1]
        out += ["", f"### {tr('probes_title')}", "",
                "| " + " | ".join([tr("prompt"), *(tr("epoch", n=s.epoch) for s in shown)]) + " |",
                "|---" * (1 + len(shown)) + "|"]
        answers = [dict(s.answers) for s in shown]
        out += ["| " + " | ".join([_md(p), *(_md(a.get(p, "")[:ANSWER_CHARS]) for a in answers)]) + " |"
                for p, _ in shown[0].answers]
    out += ["", f"### {tr('use_title')}", "", "```python"]
    if source.kind == "lora" and not merged:
        out += ["from peft import AutoPeftModelForCausalLM", "from transformers import AutoTokenizer",
                f'model = AutoPeftModelForCausalLM.from_pretrained("{repo_id}")']
    else:
        out += ["from transformers import AutoModelForCausalLM, AutoTokenizer",
                f'model = AutoModelForCausalLM.from_pretrained("{repo_id}")']
    out += [f'tokenizer = AutoTokenizer.from_pretrained("{repo_id}")', "```", ""]
    if gguf_files:
        out += [tr("gguf_use"), "", "```bash", f"llama-cli -m {gguf_files[0]} -cnv", f"ollama create {source.name} -f Modelfile",
                f"ollama run {source.name}", "```", ""]
    else:
        out += [tr("gguf_later"), ""]
    return "\n".join(out)


def build_card(source: ExportSource, repo_id: str = "", gguf_files: list[str] = (), merged: bool = False,
               uploads_dir: Path | None = None):
    """The ModelCard (both languages) for `source`; `repo_id` is what the loading snippets name."""
    from huggingface_hub import ModelCard

    repo_id = repo_id or source.name
    table = data_table(source, uploads_dir)
    body = "\n\n".join(_section(source, lang, table, repo_id, list(gguf_files), merged) for lang in LANGS)
    text = f"---\n{card_data(source, merged).to_yaml()}\n---\n\n# {source.name}\n\n{body}"
    return ModelCard(text)


def write_card(source: ExportSource, folder: Path, **kwargs) -> list[Path]:
    """README.md and the loss curve into `folder`; returns both paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    record = source.record
    (folder / LOSS_IMAGE).write_text(loss_svg(record.steps if record else (), record.evals if record else ()),
                                     encoding="utf-8")
    build_card(source, **kwargs).save(folder / CARD)
    return [folder / CARD, folder / LOSS_IMAGE]
