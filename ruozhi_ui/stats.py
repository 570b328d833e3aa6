"""Token-length statistics of a dataset: the reference's table, truncation and padding.

Owns the numbers the Data tab and `python -m ruozhi_ui stats` show: per-field
length summaries (min/max/mean/percentiles), how many examples the length limits
would truncate, how much of a batch would be padding, and suggested limits.
Needs only a tokenizer (never model weights) and prompts tokenised by
`encoding.prompt_tokens`, the encoder's own, so the counts match what training feeds
the model: max_source_length bounds a record's last turn, and a multi-turn record's
earlier turns (its history) come on top of it, counted apart.
"""

from __future__ import annotations

import math
import random
from dataclasses import asdict, dataclass

import numpy as np

from .data import Record
from .encoding import count_control_token_records, length_grouped_batches, prompt_tokens
from .errors import DataFormatError

FIELDS = ("instruction", "output", "prompt", "total")
HISTORY = "history"  # a row of its own, before total, when some record has earlier turns
TOKENIZE_CHUNK = 1000  # texts per tokenizer call: fast-tokenizer batches without huge peaks


@dataclass(frozen=True)
class LengthSummary:
    min: int
    max: int
    mean: float
    p50: float
    p90: float
    p95: float
    p99: float


@dataclass(frozen=True)
class TokenStats:
    n: int  # records measured
    n_total: int  # records before any subsampling
    instruction: LengthSummary  # raw instruction text, as the reference counted it
    output: LengthSummary  # raw answer text, as the reference counted it
    prompt: LengthSummary  # the last turn's templated prompt: system prompt, user turn, assistant header
    total: LengthSummary  # history + prompt + answer + 1 end-of-turn token, untruncated
    lengths: dict[str, list[int]]  # FIELDS -> per-example lengths, for histograms
    max_source_length: int  # the limits the shares below refer to
    max_target_length: int
    prompt_truncated_share: float  # examples whose prompt exceeds max_source_length
    output_truncated_share: float  # examples whose answer exceeds max_target_length
    prompt_truncated_count: int  # how many: their user text is cut
    output_truncated_count: int  # how many: their answer is cut and learns no end token
    any_truncated_share: float
    padding_waste_reference: float  # pad share when all rows are max_source + max_target + 1 wide
    padding_waste_grouped: float  # pad share with length-grouped batches padded to their longest
    suggested_max_source_length: int  # ceil(p95 of prompt)
    suggested_max_target_length: int  # ceil(p95 of output)
    subsampled: bool
    history: LengthSummary | None = None  # tokens the earlier turns add (None: no record has any)
    question_lost_count: int = 0  # prompts whose whole question max_source_length cuts away (training refuses)
    control_token_count: int = 0  # records with control-token text (`<|im_end|>`): trained as the real token


def summarize(lengths: list[int]) -> LengthSummary:
    """min/max/mean and linear-interpolated percentiles (numpy's default, as the reference)."""
    a = np.asarray(lengths, dtype=np.float64)
    p50, p90, p95, p99 = (float(x) for x in np.percentile(a, [50, 90, 95, 99]))
    return LengthSummary(min=int(a.min()), max=int(a.max()), mean=float(a.mean()),
                         p50=p50, p90=p90, p95=p95, p99=p99)


def token_lengths(tokenizer, texts: list[str], add_special_tokens: bool = True) -> list[int]:
    """`len(tokenizer(text).input_ids)` for each text, tokenised in batches for speed."""
    out: list[int] = []
    for start in range(0, len(texts), TOKENIZE_CHUNK):
        ids = tokenizer(texts[start:start + TOKENIZE_CHUNK], add_special_tokens=add_special_tokens).input_ids
        out += [len(x) for x in ids]
    return out


def padding_waste_grouped(lengths: list[int], batch_size: int, seed: int = 0) -> float:
    """Pad share when examples are length-grouped as in training and right-padded per batch."""
    pads = slots = 0
    for batch in length_grouped_batches(lengths, batch_size, seed):
        width = max(lengths[i] for i in batch)
        slots += width * len(batch)
        pads += sum(width - lengths[i] for i in batch)
    return pads / slots if slots else 0.0


def _subsample(records: list[Record], max_records: int, seed: int) -> list[Record]:
    # Sorted indices keep the file's order, so per-example lengths line up with the data.
    keep = sorted(random.Random(seed).sample(range(len(records)), max_records))
    return [records[i] for i in keep]


def compute_stats(records: list[Record], tokenizer, system_prompt: str, max_source_length: int,
                  max_target_length: int, batch_size: int = 12, max_records: int = 20000,
                  seed: int = 0) -> TokenStats:
    """Measure `records` with `tokenizer` against the given length limits."""
    if not records:
        raise DataFormatError("No records to measure: the dataset split is empty; choose another split or source")
    n_total = len(records)
    subsampled = n_total > max_records
    if subsampled:  # a 100k-record file would take a minute to tokenise; a seeded sample is enough
        records = _subsample(records, max_records, seed)

    # The reference counted the instruction without alpaca's `input`; Record.instruction
    # already has it joined (it is what the model reads). For the reference data, whose
    # `input` fields are empty, the two are the same.
    instruction = token_lengths(tokenizer, [r.instruction for r in records])
    output = token_lengths(tokenizer, [r.output for r in records])
    # Training tokenises the answer without special tokens; Qwen adds none, so this is
    # usually the same list and the second pass is skipped.
    n_added = len(tokenizer("").input_ids)
    answer = token_lengths(tokenizer, [r.output for r in records], add_special_tokens=False) if n_added else output
    prompts = prompt_tokens(tokenizer, records, system_prompt)
    prompt = [p.last_turn_len for p in prompts]  # what max_source_length bounds
    history = [p.history_len for p in prompts]  # on top of it, never cut
    users = [p.kinds.count("user") for p in prompts]
    total = [h + p + a + 1 for h, p, a in zip(history, prompt, answer)]  # + <|im_end|>

    n = len(records)
    prompt_cut = [p > max_source_length for p in prompt]
    answer_cut = [a > max_target_length for a in answer]
    # What training actually feeds: the history whole, the last turn with its user text cut to fit, the answer
    # capped, plus the end token.
    kept_prompt = [h + p - u + min(u, max(max_source_length - (p - u), 0)) for h, p, u in zip(history, prompt, users)]
    capped = [k + min(a, max_target_length) + 1 for k, a in zip(kept_prompt, answer)]
    reference_width = max_source_length + max_target_length + 1
    return TokenStats(
        n=n, n_total=n_total,
        instruction=summarize(instruction), output=summarize(output),
        prompt=summarize(prompt), total=summarize(total),
        lengths={"instruction": instruction, "output": output, "prompt": prompt, "total": total, HISTORY: history},
        max_source_length=max_source_length, max_target_length=max_target_length,
        prompt_truncated_share=sum(prompt_cut) / n,
        output_truncated_share=sum(answer_cut) / n,
        prompt_truncated_count=sum(prompt_cut), output_truncated_count=sum(answer_cut),
        any_truncated_share=sum(p or a for p, a in zip(prompt_cut, answer_cut)) / n,
        padding_waste_reference=1 - sum(capped) / sum(max(c, h + reference_width) for c, h in zip(capped, history)),
        padding_waste_grouped=padding_waste_grouped(capped, batch_size, seed=0),
        suggested_max_source_length=math.ceil(summarize(prompt).p95),
        suggested_max_target_length=math.ceil(summarize(output).p95),
        subsampled=subsampled,
        history=summarize(history) if any(history) else None,
        question_lost_count=sum(1 for p, u in zip(prompt, users) if u and p - u >= max_source_length),
        control_token_count=count_control_token_records(tokenizer, records),
    )


def fields(stats: TokenStats) -> tuple[str, ...]:
    """The rows to show: the reference's four, with the history's before total when there is one."""
    return FIELDS if stats.history is None else FIELDS[:3] + (HISTORY,) + FIELDS[3:]


def reference_table(stats: TokenStats) -> list[list]:
    """Rows [name, min, max, mean, p95]: the reference's instruction/output, then prompt/total."""
    return [[name, s.min, s.max, s.mean, s.p95]
            for name, s in ((f, getattr(stats, f)) for f in fields(stats))]


def stats_to_dict(stats: TokenStats, include_lengths: bool = False) -> dict:
    """JSON-able view: one summary object per field, plus shares, padding and suggestions."""
    d = asdict(stats)
    if not include_lengths:
        del d["lengths"]
    return d


def _fmt(x) -> str:
    return f"{x:.3f}" if isinstance(x, float) else str(x)


def format_table(stats: TokenStats) -> str:
    """Plain-text report for the CLI, the reference's instruction/output rows first."""
    header = ["field", "min", "max", "mean", "p50", "p90", "p95", "p99"]
    rows = [[f] + [_fmt(v) for v in asdict(getattr(stats, f)).values()] for f in fields(stats)]
    widths = [max(len(str(r[i])) for r in [header] + rows) for i in range(len(header))]
    line = lambda cells: "  ".join(str(c).rjust(w) if i else str(c).ljust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths)))
    measured = f"{stats.n} records" + (f" (seeded sample of {stats.n_total})" if stats.subsampled else "")
    out = [f"token lengths over {measured}", line(header), line(["-" * w for w in widths])]
    out += [line(r) for r in rows[:2]] + [line(["-" * w for w in widths])] + [line(r) for r in rows[2:]]
    out += [
        "",
        "prompt = the last turn's chat-templated prompt (system prompt + user text + assistant header), what "
        "max_source_length bounds; history = earlier turns, on top of it; total = history + prompt + answer + end token",
        f"limits: max_source_length {stats.max_source_length}, max_target_length {stats.max_target_length}",
        f"truncated: prompt {stats.prompt_truncated_share:.1%} ({stats.prompt_truncated_count}), "
        f"answer {stats.output_truncated_share:.1%} ({stats.output_truncated_count}: trained without the end token), "
        f"either {stats.any_truncated_share:.1%}",
        f"padding: {stats.padding_waste_reference:.1%} padded to max_source+max_target+1 (reference), "
        f"{stats.padding_waste_grouped:.1%} with length-grouped batches",
        *([f"{stats.question_lost_count} prompt(s) keep no question at max_source_length "
           f"{stats.max_source_length}: training refuses it"] if stats.question_lost_count else []),
        *([f"{stats.control_token_count} record(s) contain control-token text such as <|im_end|>: trained as "
           "the real token"] if stats.control_token_count else []),
        f"suggested (p95): max_source_length {stats.suggested_max_source_length}, "
        f"max_target_length {stats.suggested_max_target_length}",
    ]
    return "\n".join(out)
