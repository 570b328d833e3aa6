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

import bisect
import copy
import dataclasses
import random
import re
from dataclasses import dataclass

import torch

from .data import Record
from .errors import ConfigError

IGNORE_INDEX = -100  # label value that cross-entropy skips


@dataclass(frozen=True)
class EncodedExample:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX on prompt tokens
    prompt_len: int  # tokens before the first trained token
    prompt_truncated: bool
    answer_truncated: bool
    history_len: int = 0  # prompt tokens of the earlier turns (on top of max_source_length)
    user_kept: int = 0  # tokens of the last user text kept after truncation
    user_len: int = 0  # tokens of the last user text before truncation

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
    backend = _plain_backend(tokenizer)
    if backend is None:
        return tokenizer(texts, add_special_tokens=False).input_ids
    return [e.ids for e in backend.encode_batch(texts, add_special_tokens=False)]


def _plain_backend(tokenizer):
    """The fast tokenizer's Rust backend when it can be used as is (no truncation or padding set), else None."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or backend.truncation is not None or backend.padding is not None:
        return None
    return backend


_LITERAL_ATTR = "_ruozhi_literal_backend"  # the copy lives on the tokenizer it was made from, and dies with it


def _literal_backend(tokenizer):
    """A copy of the backend that reads control-token text (`<|im_start|>`) as plain text. A copy, because
    transformers' `split_special_tokens` flips a switch on the shared backend, which a chat on another
    thread would see."""
    backend = _plain_backend(tokenizer)
    if backend is None:
        return None
    literal = getattr(tokenizer, _LITERAL_ATTR, None)
    if literal is None:  # two threads may both copy: the same copy either way, one is dropped
        literal = copy.deepcopy(backend)
        literal.encode_special_tokens = True
        setattr(tokenizer, _LITERAL_ATTR, literal)
    return literal


def control_tokens(tokenizer) -> tuple[str, ...]:
    """The special tokens' texts (`<|im_start|>`, `<|im_end|>`, `<|endoftext|>` for Qwen): text containing
    one becomes that control token when tokenised, as `apply_chat_template` does."""
    return tuple(t for t in getattr(tokenizer, "all_special_tokens", ()) or () if t)


def has_control_tokens(text: str, controls: tuple[str, ...]) -> bool:
    return any(c in text for c in controls)


def count_control_token_records(tokenizer, records: list[Record]) -> int:
    """Records whose texts contain a control token's text: training keeps them as the real token (a row can
    then inject a turn boundary), so the Data tab reports how many there are."""
    controls = control_tokens(tokenizer)
    if not controls:
        return 0
    def texts(r: Record):
        yield r.instruction
        yield r.output
        yield r.system or ""
        for user, assistant in r.history:
            yield user
            yield assistant
    return sum(any(has_control_tokens(t, controls) for t in texts(r)) for r in records)


@dataclass(frozen=True)
class PromptTokens:
    """A rendered prompt's ids with the kind of piece each token starts in."""
    ids: list[int]
    kinds: list[str]  # per token: "template", "user" (the last user text) or "assistant" (an earlier answer)
    history_len: int  # prompt tokens the earlier turns add (0 for a single turn)

    @property
    def last_turn_len(self) -> int:
        """System prompt, last user text and assistant header: what max_source_length bounds."""
        return len(self.ids) - self.history_len


def _pieces_tokens(tokenizer, all_pieces: list[list[tuple[str, str]]], escape_control: bool
                   ) -> list[tuple[list[int], list[str]]]:
    """(ids, kind per token) for each rendered prompt.

    A fast tokenizer reads each prompt whole, as `apply_chat_template(tokenize=True)` and the inference
    prompt do (pieces tokenised apart can differ at their seams: 'user\n' + '\nq' is one token longer
    than 'user\n\nq'), and each token takes the kind of the piece its first character is in. With
    `escape_control`, the texts (not the template) of a prompt that contains control-token text are
    tokenised apart, with that text read as plain characters.
    """
    backend = _plain_backend(tokenizer)
    controls = control_tokens(tokenizer) if escape_control else ()
    out: list = [None] * len(all_pieces)
    whole = [i for i, ps in enumerate(all_pieces)
             if backend is not None and not any(k != "template" and has_control_tokens(t, controls) for k, t in ps)]
    if whole:
        encodings = backend.encode_batch(["".join(t for _, t in all_pieces[i]) for i in whole],
                                         add_special_tokens=False)
        for i, enc in zip(whole, encodings):
            starts, at = [], 0
            for _, text in all_pieces[i]:
                starts.append(at)
                at += len(text)
            kinds = [all_pieces[i][bisect.bisect_right(starts, start) - 1][0] for start, _ in enc.offsets]
            out[i] = (list(enc.ids), kinds)
    apart = [i for i in range(len(all_pieces)) if out[i] is None]
    if apart:  # a slow tokenizer, or escaped control text: piece by piece
        literal = _literal_backend(tokenizer) if controls else None
        flat = [(k, t) for i in apart for k, t in all_pieces[i]]
        plain = batch_token_ids(tokenizer, [t for _, t in flat])
        if literal is not None:
            plain = [e.ids if k != "template" and has_control_tokens(t, controls) else ids
                     for (k, t), ids, e in zip(flat, plain, literal.encode_batch([t for _, t in flat],
                                                                              add_special_tokens=False))]
        at = 0
        for i in apart:
            ids, kinds = [], []
            for (kind, _), piece in zip(all_pieces[i], plain[at:at + len(all_pieces[i])]):
                ids += list(piece)
                kinds += [kind] * len(piece)
            at += len(all_pieces[i])
            out[i] = (ids, kinds)
    return out


def prompt_tokens(tokenizer, records: list[Record], system_prompt: str,
                  escape_control: bool = False) -> list[PromptTokens]:
    """Every record's rendered prompt as ids, each token's kind, and how many tokens its history adds
    (measured by rendering the last turn alone). One batch call to the tokenizer."""
    pieces = [prompt_pieces(tokenizer, r, system_prompt) for r in records]
    multi = [i for i, r in enumerate(records) if r.history]
    single = [prompt_pieces(tokenizer, dataclasses.replace(records[i], history=()), system_prompt) for i in multi]
    tokens = _pieces_tokens(tokenizer, pieces + single, escape_control)
    history = dict(zip(multi, (len(tokens[i][0]) - len(t[0]) for i, t in zip(multi, tokens[len(records):]))))
    return [PromptTokens(ids, kinds, history.get(i, 0)) for i, (ids, kinds) in enumerate(tokens[:len(records)])]


def _assemble(p: PromptTokens, end: int, max_source_length: int | None, train_all_turns: bool):
    """Prompt ids and labels, the last user text cut so that the last turn fits max_source_length (earlier
    turns come on top of it, whole); returns (ids, labels, truncated, user tokens kept)."""
    n_user = p.kinds.count("user")
    keep = n_user if max_source_length is None else max(max_source_length - (p.last_turn_len - n_user), 0)
    prompt, labels, seen_user, previous = [], [], 0, "template"
    for token, kind in zip(p.ids, p.kinds):
        if kind == "user":
            seen_user += 1
            if seen_user > keep:
                continue
        if kind == "assistant" and train_all_turns:
            labels.append(token)
        elif token == end and previous == "assistant" and train_all_turns:
            labels.append(end)  # the end token right after an earlier answer is learnt with it
        else:
            labels.append(IGNORE_INDEX)
        prompt.append(token)
        previous = kind
    return prompt, labels, n_user > keep, min(n_user, keep)


def encode_records(tokenizer, records: list[Record], system_prompt: str, max_source_length: int,
                   max_target_length: int, *, train_all_turns: bool = True,
                   label_truncated_end: bool = False) -> list[EncodedExample]:
    """Training examples: prompt ids (untruncated, exactly `apply_chat_template(..., add_generation_prompt=True)`
    tokenised), then the answer and the end-of-turn token.

    - Labels are on the answer and its end token; -100 elsewhere. With `train_all_turns` (default) the
      earlier assistant answers of a multi-turn record are labelled too, each with its end token.
    - max_source_length bounds the last turn's prompt (system prompt, last user text, assistant header) and
      cuts only the user text; a multi-turn record's earlier turns come on top of it, whole (so a dialogue
      is never cut to its headers). max_target_length cuts the last answer.
    - An answer cut at max_target_length ends without the end token unless `label_truncated_end`: a label
      there would teach the model to stop mid-sentence.
    - Control-token text inside a record (`<|im_end|>`) stays the control token, as `apply_chat_template`
      reads it (the Data tab counts such records; chat input escapes it, see `prompt_ids`).
    All texts go to the tokenizer in one batch call (2,600 records in ~0.3 s here).
    """
    if not records:
        return []
    prompts = prompt_tokens(tokenizer, records, system_prompt)
    answers = batch_token_ids(tokenizer, [r.output for r in records])
    end, examples = end_of_turn_id(tokenizer), []
    for p, full_answer in zip(prompts, answers):
        prompt, labels, prompt_truncated, user_kept = _assemble(p, end, max_source_length, train_all_turns)
        answer_truncated = len(full_answer) > max_target_length
        answer = full_answer[:max_target_length] + ([end] if label_truncated_end or not answer_truncated else [])
        examples.append(EncodedExample(
            input_ids=prompt + answer, labels=labels + answer, prompt_len=len(prompt),
            prompt_truncated=prompt_truncated, answer_truncated=answer_truncated,
            history_len=p.history_len, user_kept=user_kept, user_len=p.kinds.count("user")))
    return examples


def encode_record(tokenizer, record: Record, system_prompt: str, max_source_length: int,
                  max_target_length: int, **options) -> EncodedExample:
    return encode_records(tokenizer, [record], system_prompt, max_source_length, max_target_length, **options)[0]


def encode_prompt(tokenizer, record: Record, system_prompt: str, max_source_length: int | None,
                  escape_control: bool = False) -> tuple[list[int], bool]:
    """Prompt ids for generation, cut as training cuts them (the user text, never the assistant header);
    `max_source_length` None: never cut."""
    p = prompt_tokens(tokenizer, [record], system_prompt, escape_control)[0]
    prompt, _, truncated, _ = _assemble(p, end_of_turn_id(tokenizer), max_source_length, False)
    return prompt, truncated


def prompt_ids(tokenizer, record: Record, system_prompt: str, escape_control: bool = True) -> list[int]:
    """A chat's prompt as ids, never cut. Chat input escapes control-token text by default: a visitor typing
    `<|im_end|>` gets those characters, not a turn boundary (training data keeps the token, see above)."""
    return prompt_tokens(tokenizer, [record], system_prompt, escape_control)[0].ids


def questions_lost(examples: list[EncodedExample]) -> int:
    """Examples whose question max_source_length cut away entirely (a long system prompt leaves no room)."""
    return sum(1 for e in examples if e.user_len and not e.user_kept)


def check_questions_kept(examples: list[EncodedExample], max_source_length: int, field: str = "max_source_length"
                         ) -> None:
    """Refuse a run in which the limit leaves some prompt no user text at all: it would learn answers to nothing."""
    lost = [e for e in examples if e.user_len and not e.user_kept]
    if lost:
        template = max(e.prompt_len - e.history_len for e in lost)  # the last turn with its question cut away
        raise ConfigError(f"{field} {max_source_length} leaves no room for the question in {len(lost)} of "
                          f"{len(examples)} examples: the system prompt and chat template alone take "
                          f"{template} tokens; raise {field} to at least {template + 32} or shorten the system prompt")


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
