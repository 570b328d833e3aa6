"""Chat rendering, record -> (input_ids, labels), and batching.

One renderer (`render_prompt`) turns a record into the chat the model sees, with
the tokenizer's own chat template; training, statistics, the inspector and chat
all call it, so what is trained and what is asked cannot drift apart.
An encoded example is prompt ids + answer ids + the end-of-turn token, with
labels only on the answer and that end token, and no padding inside it.
Padding (right side only) or packing happens when examples become a batch.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

from .data import Record

IGNORE_INDEX = -100  # label value that cross-entropy skips


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens
    prompt_len: int  # tokens before the first trained token
    prompt_truncated: bool
    answer_truncated: bool

    def __len__(self) -> int:
        return len(self.input_ids)


def chat_messages(record: Record, system_prompt: str) -> list[dict]:
    """The conversation up to (not including) the answer to be trained or generated."""
    system = record.system if record.system is not None else system_prompt
    messages = [{"role": "system", "content": system}] if system else []
    for user, assistant in record.history:
        messages.append({"role": "user", "content": user})
        messages.append({"role": "assistant", "content": assistant})
    messages.append({"role": "user", "content": record.instruction})
    return messages


def render_prompt(tokenizer, record: Record, system_prompt: str) -> str:
    """The exact text the model reads before it answers, assistant header included."""
    return tokenizer.apply_chat_template(
        chat_messages(record, system_prompt), tokenize=False, add_generation_prompt=True
    )


def end_of_turn_id(tokenizer) -> int:
    """The token the model must learn to stop on: <|im_end|> for Qwen chat templates."""
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    if isinstance(im_end, int) and im_end != tokenizer.unk_token_id and im_end is not None:
        return im_end
    if tokenizer.eos_token_id is None:
        raise ValueError("tokenizer has neither <|im_end|> nor an eos token")
    return tokenizer.eos_token_id


def pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else end_of_turn_id(tokenizer)


def split_prompt(tokenizer, record: Record, system_prompt: str) -> tuple[str, str]:
    """The rendered prompt as (text up to the end of the user's text, the assistant header after it)."""
    text = render_prompt(tokenizer, record, system_prompt)
    cut = text.rfind(record.instruction) + len(record.instruction)
    return (text[:cut], text[cut:]) if record.instruction else (text, "")


def truncate_prompt(head: list[int], header: list[int], max_source_length: int) -> tuple[list[int], bool]:
    """Prompt ids, truncated inside the user text so the assistant header stays intact."""
    keep = max(max_source_length - len(header), 0)
    return head[:keep] + header, len(head) > keep


def encode_prompt(tokenizer, record: Record, system_prompt: str, max_source_length: int) -> tuple[list[int], bool]:
    """Prompt ids, truncated inside the user text so the assistant header stays intact."""
    head_text, header_text = split_prompt(tokenizer, record, system_prompt)
    # The template puts special tokens right after the user text, so tokenising the
    # two parts apart gives the same ids as tokenising them together.
    head = tokenizer(head_text, add_special_tokens=False).input_ids
    header = tokenizer(header_text, add_special_tokens=False).input_ids if header_text else []
    return truncate_prompt(head, header, max_source_length)


def batch_token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False).input_ids`, straight from a fast tokenizer's Rust
    backend when it neither truncates nor pads: transformers' per-text wrapping costs more than the
    tokenizing itself."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer(texts, add_special_tokens=False).input_ids
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def encode_records(tokenizer, records: list[Record], system_prompt: str, max_source_length: int,
                   max_target_length: int) -> list[EncodedExample]:
    """Training examples: the prompt's labels are IGNORE_INDEX, the answer (truncated) ends with the
    end-of-turn token. All texts go to the tokenizer in one batch call (one pass in Rust, not three
    Python calls a record: 2,600 records in 0.32 s instead of 0.78 s here)."""
    if not records:
        return []
    parts = [split_prompt(tokenizer, r, system_prompt) for r in records]
    texts = [head for head, _ in parts] + [header for _, header in parts] + [r.output for r in records]
    ids = batch_token_ids(tokenizer, texts)
    n, end = len(records), end_of_turn_id(tokenizer)
    examples = []
    for i in range(n):
        prompt, prompt_truncated = truncate_prompt(ids[i], ids[n + i], max_source_length)
        full_answer = ids[2 * n + i]
        answer = full_answer[:max_target_length] + [end]
        examples.append(EncodedExample(
            input_ids=prompt + answer,
            labels=[IGNORE_INDEX] * len(prompt) + answer,
            prompt_len=len(prompt),
            prompt_truncated=prompt_truncated,
            answer_truncated=len(full_answer) > max_target_length,
        ))
    return examples


def encode_record(tokenizer, record: Record, system_prompt: str, max_source_length: int,
                  max_target_length: int) -> EncodedExample:
    return encode_records(tokenizer, [record], system_prompt, max_source_length, max_target_length)[0]


def collate_padded(examples: list[EncodedExample], pad_token_id: int) -> dict[str, torch.Tensor]:
    """Right-pad to the longest example: pads have attention 0 and label IGNORE_INDEX."""
    width = max(len(e) for e in examples)
    input_ids = torch.full((len(examples), width), pad_token_id, dtype=torch.long)  # (B, T)
    labels = torch.full((len(examples), width), IGNORE_INDEX, dtype=torch.long)
    attention_mask = torch.zeros((len(examples), width), dtype=torch.long)
    for row, e in enumerate(examples):
        n = len(e)
        input_ids[row, :n] = torch.tensor(e.input_ids)
        labels[row, :n] = torch.tensor(e.labels)
        attention_mask[row, :n] = 1
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def collate_packed(examples: list[EncodedExample]) -> dict[str, torch.Tensor]:
    """Concatenate into one row with position_ids restarting at 0 per example.

    Run the model with attention_mask=None and use_cache=False: only then does
    transformers derive per-example attention from the restarting position_ids.
    Each example starts with prompt tokens (label IGNORE_INDEX), so no loss
    crosses from one example into the next.
    """
    input_ids, labels, positions = [], [], []
    for e in examples:
        input_ids += e.input_ids
        labels += e.labels
        positions += range(len(e))
    as_row = lambda xs: torch.tensor(xs, dtype=torch.long).unsqueeze(0)  # (1, sum T)
    return {"input_ids": as_row(input_ids), "position_ids": as_row(positions), "labels": as_row(labels)}


def length_grouped_batches(lengths: list[int], batch_size: int, seed: int) -> list[list[int]]:
    """Shuffled batches of similar-length examples, so little padding is needed.

    Shuffle, cut into mega-chunks of 32 batches, sort each chunk by length, cut
    into batches, then shuffle the batch order: random enough for SGD, tight
    enough that a batch's pads are a few percent instead of half.
    """
    rng = random.Random(seed)
    order = list(range(len(lengths)))
    rng.shuffle(order)
    chunk = batch_size * 32
    batches = []
    for start in range(0, len(order), chunk):
        group = sorted(order[start:start + chunk], key=lambda i: lengths[i], reverse=True)
        batches += [group[i:i + batch_size] for i in range(0, len(group), batch_size)]
    rng.shuffle(batches)
    return batches


def sequential_batches(n: int, batch_size: int) -> list[list[int]]:
    return [list(range(i, min(i + batch_size, n))) for i in range(0, n, batch_size)]
