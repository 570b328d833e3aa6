"""One reader per dataset format, all producing `Record`s, and the detection that picks one.

Formats: alpaca (`instruction`, optional `input`, `output`, `system`, `history` of [user, assistant]
pairs; a table's columns under any names, mapped to these), OpenAI `messages` (`role`/`content`, roles
system/user/assistant) and ShareGPT `conversations` (`from`/`value`, roles human/gpt/system and the common
variants). A `ColumnMap` (written `instruction=question,output=answer`, the CLI's `--columns` and the run's
`DataConfig.columns`) says which field is which; what it leaves empty is detected from the first record's
field names, and a guess from names other than alpaca's own is flagged so the Data tab asks to check it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Iterable, Literal, get_args

from ..errors import DataFormatError
from .records import Record, join_instruction, string_field

Format = Literal["alpaca", "messages", "sharegpt"]
FORMATS: tuple[str, ...] = get_args(Format)
ROLES = ("system", "user", "assistant")  # OpenAI messages: exactly these

# Field names a table commonly uses, in the order they are tried (lower case).
INSTRUCTION_NAMES = ("instruction", "question", "prompt", "query", "input", "problem", "user")
OUTPUT_NAMES = ("output", "answer", "response", "completion", "target", "solution", "assistant")
SYSTEM_NAMES = ("system", "system_prompt")
CONVERSATION_NAMES = ("messages", "conversations", "conversation")
ROLE_KEYS, CONTENT_KEYS = ("role", "from"), ("content", "value")
# ShareGPT role names and what they mean (a mapping's *_tag adds to these).
TAGS = {"user": ("human", "user"), "assistant": ("gpt", "assistant", "bot", "model", "chatgpt"), "system": ("system",)}


@dataclass(frozen=True)
class ColumnMap:
    """Which field of a record is which; "" = detect it."""
    format: str = ""  # alpaca | messages | sharegpt
    instruction: str = ""  # alpaca / tables: the question's column
    input: str = ""  # alpaca: extra input, joined to the instruction on a new line
    output: str = ""  # the answer's column
    system: str = ""  # the record's own system prompt
    history: str = ""  # alpaca: earlier [user, assistant] pairs
    messages: str = ""  # messages / sharegpt: the conversation's column
    role: str = ""  # key of a message's role ('role', 'from')
    content: str = ""  # key of a message's text ('content', 'value')
    user_tag: str = ""  # sharegpt: the user's role name(s), '|'-separated
    assistant_tag: str = ""
    system_tag: str = ""

    def __str__(self) -> str:
        return ",".join(f"{f.name}={getattr(self, f.name)}" for f in dataclasses.fields(self) if getattr(self, f.name))


KEYS = tuple(f.name for f in dataclasses.fields(ColumnMap))


def parse_columns(text: str | None) -> ColumnMap:
    """'instruction=question,output=answer' -> ColumnMap (DataFormatError naming a bad part)."""
    values = {}
    for part in (text or "").split(","):
        if not part.strip():
            continue
        key, eq, value = (s.strip() for s in part.partition("="))
        if not eq or not value:
            raise DataFormatError(key="err.data.columns_syntax", part=part.strip())
        if key not in KEYS:
            raise DataFormatError(key="err.data.columns_key", name=key, keys=", ".join(KEYS))
        values[key] = value
    if values.get("format", "alpaca") not in FORMATS:
        raise DataFormatError(key="err.data.columns_format", name=values["format"], formats=", ".join(FORMATS))
    return ColumnMap(**values)


def _pick(names: Iterable[str], columns: list[str]) -> str:
    lower = {c.lower(): c for c in reversed(columns)}
    return next((lower[n] for n in names if n in lower), "")


def detect(first: dict, given: ColumnMap) -> tuple[ColumnMap, bool]:
    """The full mapping for records shaped like `first`, and whether a column was guessed by its name."""
    columns = [str(k) for k in first]
    fmt = given.format
    conversation = given.messages or _pick(CONVERSATION_NAMES, columns)
    if not fmt:
        fmt = "alpaca"
        if conversation and isinstance(first.get(conversation), list) and not given.instruction:
            message = next((m for m in first[conversation] if isinstance(m, dict)), {})
            fmt = "sharegpt" if "from" in message or conversation == "conversations" else "messages"
    if fmt != "alpaca":
        message = next((m for m in first.get(conversation) or [] if isinstance(m, dict)), {}) \
            if isinstance(first.get(conversation), list) else {}
        keys = list(message)
        return dataclasses.replace(given, format=fmt, messages=conversation or CONVERSATION_NAMES[fmt == "sharegpt"],
                                   role=given.role or _pick(ROLE_KEYS, keys) or ROLE_KEYS[fmt == "sharegpt"],
                                   content=given.content or _pick(CONTENT_KEYS, keys)
                                   or CONTENT_KEYS[fmt == "sharegpt"]), False
    instruction = given.instruction or _pick(INSTRUCTION_NAMES, columns)
    output = given.output or _pick([n for n in OUTPUT_NAMES], [c for c in columns if c != instruction])
    missing = [name for name, value in (("instruction", instruction), ("output", output)) if not value]
    if missing and {"instruction", "output"} & set(columns):  # alpaca with a field left out: said at the record
        instruction, output = instruction or "instruction", output or "output"
    elif missing:
        raise DataFormatError(key="err.data.no_mapping", missing=", ".join(missing),
                              columns=", ".join(columns) or "-")
    extra = given.input or (_pick(("input",), columns) if instruction.lower() != "input" else "")
    guessed = (instruction != "instruction" and not given.instruction) or (output != "output" and not given.output)
    return dataclasses.replace(given, format="alpaca", instruction=instruction, output=output, input=extra,
                               system=given.system or _pick(SYSTEM_NAMES, [c for c in columns if c != instruction]),
                               history=given.history or _pick(("history",), columns)), guessed


# --- readers: one record object -> Record -------------------------------------------------------------------
def read_alpaca(obj: dict, where, m: ColumnMap) -> Record:
    """{instruction, input?, output, system?, history?} under the mapping's names."""
    instruction = string_field(obj, m.instruction, where)
    extra = string_field(obj, m.input, where, required=False) if m.input else ""
    output = string_field(obj, m.output, where)
    system = string_field(obj, m.system, where, required=False) if m.system else ""
    history = _alpaca_history(obj.get(m.history) if m.history else None, where, m.history)
    return Record(instruction=join_instruction(instruction, extra), output=output, system=system or None,
                  history=history)


def _alpaca_history(value, where, name: str) -> tuple[tuple[str, str], ...]:
    if value is None:
        return ()
    if not isinstance(value, list):
        raise DataFormatError(key="err.data.history", where=where, field=name)
    pairs = []
    for j, pair in enumerate(value):
        if not (isinstance(pair, (list, tuple)) and len(pair) == 2):
            raise DataFormatError(key="err.data.history", where=where.at_message(j, name), field=name)
        at = where.at_message(j, name)
        pairs.append((string_field({"user": pair[0]}, "user", at), string_field({"assistant": pair[1]}, "assistant", at)))
    return tuple(pairs)


def read_messages(obj: dict, where, m: ColumnMap) -> Record:
    """OpenAI chat: [{role, content}], an optional system message first, then user/assistant turns."""
    return _dialogue(obj, where, m, lambda role: role if role in ROLES else None, ROLES)


def read_sharegpt(obj: dict, where, m: ColumnMap) -> Record:
    """ShareGPT: [{from, value}] with human/gpt/system (and the variants in TAGS, plus the mapping's tags)."""
    tags = {}
    for meaning, names in TAGS.items():
        own = getattr(m, f"{meaning}_tag")
        for name in (own.split("|") if own else []) + list(names):
            tags.setdefault(name.strip(), meaning)
    return _dialogue(obj, where, m, tags.get, tuple(tags))


def _dialogue(obj: dict, where, m: ColumnMap, meaning_of, allowed: tuple[str, ...]) -> Record:
    messages = obj.get(m.messages)
    if not isinstance(messages, list) or not messages:
        raise DataFormatError(key="err.data.messages_list", where=where)
    system, turns = None, []
    for j, message in enumerate(messages):
        at = where.at_message(j, m.messages)
        if not isinstance(message, dict):
            raise DataFormatError(key="err.data.message_object", where=at)
        name = string_field(message, m.role, at)
        role = meaning_of(name)
        if role is None:
            raise DataFormatError(key="err.data.role", where=at, roles=", ".join(allowed), role=name)
        content = string_field(message, m.content, at)
        if role == "system":
            if j != 0:
                raise DataFormatError(key="err.data.system_first", where=at)
            system = content
        else:
            turns.append((role, content))
    expected = ["user", "assistant"] * (len(turns) // 2)
    if len(turns) < 2 or [r for r, _ in turns] != expected:
        raise DataFormatError(key="err.data.alternate", where=where)
    pairs = [(turns[i][1], turns[i + 1][1]) for i in range(0, len(turns), 2)]
    return Record(instruction=pairs[-1][0], output=pairs[-1][1], system=system, history=tuple(pairs[:-1]))


READERS = {"alpaca": read_alpaca, "messages": read_messages, "sharegpt": read_sharegpt}


def read_records(rows: Iterable[tuple[object, object]], given: ColumnMap) -> tuple[list[Record], ColumnMap, bool]:
    """(record object, where) pairs -> (records, the mapping used, whether it was guessed). The mapping is
    detected from the first record; each record is then read, and any bad one reported where it is."""
    records, mapping, guessed, reader = [], None, False, None
    for obj, where in rows:
        if not isinstance(obj, dict):
            raise DataFormatError(key="err.data.record_object", where=where, type=type(obj).__name__)
        if mapping is None:
            mapping, guessed = detect(obj, given)
            reader = READERS[mapping.format]
        records.append(reader(obj, where, mapping))
    return records, mapping or given, guessed


def parse_record(obj, where) -> Record:
    """One alpaca ({instruction, input?, output}), messages or ShareGPT object -> Record, detected alone."""
    return read_records([(obj, where)], ColumnMap())[0][0]
