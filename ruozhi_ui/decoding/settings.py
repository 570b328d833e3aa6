"""The decoding settings a model actually uses, and the one function that picks each next token.

`resolve_settings` fills every `GenConfig` field left at None from the model's own
`generation_config` (transformers' defaults where that leaves one unset), so the
probes, Compare and A/B decode the same weights the same way. `choose_next` is
transformers' `generate` token selection (repetition penalty, then temperature,
top-k, top-p, then argmax or one multinomial draw) with one difference, written
down at `apply_repetition_penalty`. Knows nothing of caches, devices or text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..config import GenConfig
from ..encoding import end_of_turn_id, pad_id

# What transformers' generate() uses when a generation_config leaves a value unset
# (GenerationConfig._get_default_generation_params in transformers 5).
TRANSFORMERS_DEFAULTS = {"do_sample": False, "temperature": 1.0, "top_p": 1.0, "top_k": 50, "repetition_penalty": 1.0}
SAMPLING_FIELDS = ("temperature", "top_p", "top_k")


@dataclass(frozen=True)
class DecodeSettings:
    max_new_tokens: int  # tokens generated at most, the end token included
    do_sample: bool  # False: argmax (greedy)
    temperature: float  # sampling only
    top_p: float  # sampling only; 1.0 = off
    top_k: int  # sampling only; 0 = off
    repetition_penalty: float  # 1.0 = off; > 1 makes every token already in the prompt or answer less likely
    eos_token_ids: tuple[int, ...]  # decoding of a row ends at the first of these; () = never
    pad_token_id: int  # left padding of batched prompts
    from_model: tuple[str, ...] = ()  # the fields taken from the model's generation_config (for `describe`)
    eos_tokens: tuple[str, ...] = ()  # the end ids as text, for `describe`

    def describe(self) -> str:
        """One short line for the UI, e.g. 'greedy · repetition penalty 1.05 (model) · stops at <|im_end|> (model) ·
        at most 151 new tokens'."""
        def mark(name: str) -> str:
            return " (model)" if name in self.from_model else ""

        if self.do_sample:
            how = (f"sampling{mark('do_sample')}: temperature {self.temperature:g}{mark('temperature')}, "
                   f"top-p {self.top_p:g}{mark('top_p')}, top-k {self.top_k}{mark('top_k')}")
        else:
            how = f"greedy{mark('do_sample')}"
        penalty = (f"repetition penalty {self.repetition_penalty:g}{mark('repetition_penalty')}"
                   if self.repetition_penalty != 1.0 else f"no repetition penalty{mark('repetition_penalty')}")
        ends = ", ".join(self.eos_tokens or map(str, self.eos_token_ids))
        stops = f"stops at {ends}{mark('eos_token_ids')}" if self.eos_token_ids else "never stops early"
        return f"{how} · {penalty} · {stops} · at most {self.max_new_tokens} new tokens"


def _as_ids(value) -> list[int]:
    if value is None:
        return []
    return [int(v) for v in (value if isinstance(value, (list, tuple)) else [value])]


def resolve_settings(model, tokenizer, gen: GenConfig) -> DecodeSettings:
    """The settings `model` decodes with under `gen`: each None field is the model's own.

    End ids by default: every id in the model's generation_config, plus the chat
    template's end of turn (`<|im_end|>`, the token training teaches) and the
    tokenizer's eos, so that a base model whose config names only `<|endoftext|>`
    still ends a chat turn.
    """
    config = getattr(model, "generation_config", None)
    values, from_model = {}, []
    for name in ("do_sample", "repetition_penalty", *SAMPLING_FIELDS):
        value = getattr(gen, name)
        if value is None:
            own = getattr(config, name, None) if config is not None else None
            value = TRANSFORMERS_DEFAULTS[name] if own is None else own
            from_model.append(name)
        values[name] = value
    if gen.eos_token_ids is None:
        ids = _as_ids(getattr(config, "eos_token_id", None) if config is not None else None)
        ids += [end_of_turn_id(tokenizer), *_as_ids(tokenizer.eos_token_id)]
        eos = tuple(dict.fromkeys(ids))  # in order, once each
        from_model.append("eos_token_ids")
    else:
        eos = tuple(int(i) for i in gen.eos_token_ids)
    return DecodeSettings(
        max_new_tokens=int(gen.max_new_tokens), do_sample=bool(values["do_sample"]),
        temperature=float(values["temperature"]), top_p=float(values["top_p"]), top_k=int(values["top_k"]),
        repetition_penalty=float(values["repetition_penalty"]), eos_token_ids=eos, pad_token_id=pad_id(tokenizer),
        from_model=tuple(from_model), eos_tokens=tuple(tokenizer.convert_ids_to_tokens(list(eos))))


# ---------------------------------------------------------------- token selection

def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """transformers' RepetitionPenaltyLogitsProcessor over a (B, V) mask of the tokens each row has seen.

    The same arithmetic (divide a positive logit, multiply a negative one), but the
    mask holds only a row's real tokens: transformers penalises the left padding too,
    and since the pad `<|endoftext|>` is also an end id, a padded row would then
    answer differently from the same prompt alone.
    """
    penalised = torch.where(logits < 0, logits * penalty, logits / penalty)
    return torch.where(seen, penalised, logits)


def sampling_warpers(settings: DecodeSettings) -> list:
    """transformers' own warpers, in generate()'s order, each only where it changes anything."""
    from transformers import TemperatureLogitsWarper, TopKLogitsWarper, TopPLogitsWarper

    warpers = []
    if settings.temperature != 1.0:
        warpers.append(TemperatureLogitsWarper(settings.temperature))
    if settings.top_k != 0:
        warpers.append(TopKLogitsWarper(top_k=settings.top_k, min_tokens_to_keep=1))
    if settings.top_p < 1.0:
        warpers.append(TopPLogitsWarper(top_p=settings.top_p, min_tokens_to_keep=1))
    return warpers


def choose_next(logits: torch.Tensor, seen: torch.Tensor | None, settings: DecodeSettings,
                warpers: list = ()) -> torch.Tensor:
    """(B,) next token ids from (B, V) fp32 logits, as generate() picks them."""
    if settings.repetition_penalty != 1.0:
        logits = apply_repetition_penalty(logits, seen, settings.repetition_penalty)
    if not settings.do_sample:
        return logits.argmax(dim=-1)
    for warper in warpers:
        logits = warper(None, logits)
    probs = torch.nn.functional.softmax(logits, dim=-1)
    return torch.multinomial(probs, num_samples=1).squeeze(1)
