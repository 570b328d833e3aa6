"""Chat rendering, record -> (input_ids, labels), and batching.

One renderer (`render_prompt`) turns a record into the chat the model sees, with
the tokenizer's own chat template; training, statistics, the inspector and chat
all call it, so what is trained and what is asked cannot drift apart.
An encoded example is prompt ids + answer ids + the end-of-turn token, with
labels only on the answer and that end token (and, for a multi-turn record, on
each earlier answer), and no padding inside it. The prompt is split into pieces by
the template itself (`prompt_pieces`), so cutting and labelling happen in token
space at known positions.
Padding (right side only) or packing happens when examples become a batch.
"""

from __future__ import annotations

import dataclasses
import random
import re
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


# Placeholders the template renders where the texts we cut or label go. A record can never contain NUL
# (data.py refuses it), so a placeholder can only be found where we put it.
_USER = "\x00U\x00"
_ASSISTANT = "\x00A{}\x00"
_PLACEHOLDER = re.compile(r"\x00(U|A\d+)\x00")


def prompt_pieces(tokenizer, record: Record, system_prompt: str) -> list[tuple[str, str]]:
    """The rendered prompt as (kind, text) pieces: "template" (the chat template's own text), "user" (the
    last user text, the one truncation may cut) and "assistant" (an earlier answer in the history).

    The template renders the conversation with placeholders where those texts go, and the pieces are
    split at the placeholders, so the user's text is found by position, never by searching for it
    (an instruction such as 'a' or 'user' also occurs inside the template).
    """
    messages = chat_messages(record, system_prompt)
    answers = []
    for i, message in enumerate(messages):
        if message["role"] == "assistant":
            answers.append(message["content"])
            messages[i] = {"role": "assistant", "content": _ASSISTANT.format(len(answers) - 1)}
    messages[-1] = {"role": "user", "content": _USER}
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    pieces, parts = [], _PLACEHOLDER.split(text)
    for i, part in enumerate(parts):
        if i % 2 == 0:
            if part:
                pieces.append(("template", part))
        elif part == "U":
            pieces.append(("user", record.instruction))
        else:
            pieces.append(("assistant", answers[int(part[1:])]))
    return pieces


def batch_token_ids(tokenizer, texts: list[str]) -> list[list[int]]:
    """`tokenizer(texts, add_special_tokens=False).input_ids`, straight from a fast tokenizer's Rust
    backend when it neither truncates nor pads: transformers' per-text wrapping costs more than the
    tokenizing itself."""
    if not texts:
        return []
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return tokenizer(texts, add_special_tokens=False).input_ids
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def _fixed_length(pieces, ids) -> int:
    return sum(len(i) for (kind, _), i in zip(pieces, ids) if kind != "user")


def _assemble(pieces, ids, end: int, max_source_length: int, train_all_turns: bool, history_length: int = 0):
    """Prompt ids and labels from tokenized pieces, the last user text cut to fit max_source_length
    (earlier turns, `history_length` tokens of them, come on top of it)."""
    fixed = _fixed_length(pieces, ids) - history_length
    prompt, labels, truncated = [], [], False
    for (kind, _), piece in zip(pieces, ids):
        if kind == "user":
            keep = max(max_source_length - fixed, 0)
            truncated = len(piece) > keep
            piece = piece[:keep]
        labelled = kind == "assistant" and train_all_turns
        if kind == "template" and labels and labels[-1] != IGNORE_INDEX and piece and piece[0] == end:
            labels.append(end)  # the end token right after an earlier answer is learnt with it
            labels += [IGNORE_INDEX] * (len(piece) - 1)
        else:
            labels += list(piece) if labelled else [IGNORE_INDEX] * len(piece)
        prompt += piece
    return prompt, labels, truncated


def encode_records(tokenizer, records: list[Record], system_prompt: str, max_source_length: int,
                   max_target_length: int, *, train_all_turns: bool = True,
                   label_truncated_end: bool = False) -> list[EncodedExample]:
    """Training examples: prompt ids (the chat template's own, untruncated they equal
    `apply_chat_template(..., add_generation_prompt=True)`), then the answer and the end-of-turn token.

    - Labels are on the answer and its end token; -100 elsewhere. With `train_all_turns` (default) the
      earlier assistant answers of a multi-turn record are labelled too, each with its end token.
    - max_source_length bounds the last turn's prompt (system prompt, last user text, assistant header) and
      cuts only the user text; a multi-turn record's earlier turns come on top of it, whole (so a dialogue
      is never cut to its headers). max_target_length cuts the last answer.
    - An answer cut at max_target_length ends without the end token unless `label_truncated_end`: a label
      there would teach the model to stop mid-sentence.
    All texts go to the tokenizer in one batch call (2,600 records in ~0.3 s here).
    """
    if not records:
        return []
    pieces = [prompt_pieces(tokenizer, r, system_prompt) for r in records]
    # A multi-turn record's last turn alone, to know how many prompt tokens its history adds.
    single = [prompt_pieces(tokenizer, dataclasses.replace(r, history=()), system_prompt) if r.history else []
              for r in records]
    texts = [text for ps in pieces + single for _, text in ps] + [r.output for r in records]
    ids = batch_token_ids(tokenizer, texts)
    end, examples, at = end_of_turn_id(tokenizer), [], 0
    answers = ids[len(ids) - len(records):]
    piece_ids = []
    for ps in pieces + single:
        piece_ids.append(ids[at:at + len(ps)])
        at += len(ps)
    for i, full_answer in enumerate(answers):
        ps, own = pieces[i], piece_ids[i]
        history = _fixed_length(ps, own) - _fixed_length(single[i], piece_ids[len(records) + i]) if single[i] else 0
        prompt, labels, prompt_truncated = _assemble(ps, own, end, max_source_length, train_all_turns, history)
        answer_truncated = len(full_answer) > max_target_length
        answer = full_answer[:max_target_length] + ([end] if label_truncated_end or not answer_truncated else [])
        examples.append(EncodedExample(
            input_ids=prompt + answer, labels=labels + answer, prompt_len=len(prompt),
            prompt_truncated=prompt_truncated, answer_truncated=answer_truncated))
    return examples


def encode_record(tokenizer, record: Record, system_prompt: str, max_source_length: int,
                  max_target_length: int, **options) -> EncodedExample:
    return encode_records(tokenizer, [record], system_prompt, max_source_length, max_target_length, **options)[0]


def encode_prompt(tokenizer, record: Record, system_prompt: str, max_source_length: int) -> tuple[list[int], bool]:
    """Prompt ids for generation, cut as training cuts them (the user text, never the assistant header)."""
    pieces = prompt_pieces(tokenizer, record, system_prompt)
    ids = batch_token_ids(tokenizer, [text for _, text in pieces])
    prompt, _, truncated = _assemble(pieces, ids, end_of_turn_id(tokenizer), max_source_length, False)
    return prompt, truncated


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
