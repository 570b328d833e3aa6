"""One generation engine for the probes, Compare and A/B.

    settings.py  GenConfig + the model's generation_config -> DecodeSettings; choose_next (token selection)
    runners.py   forward passes: EagerRunner (DynamicCache, the simple path) and StaticSlot/StaticRunner
                 (StaticCache + a one-token step captured as a CUDA graph)
    engine.py    Decoder (one per model: static slots, background warm-up), Batch, advance_together (one
                 loop steps several models), decode_ids
    chat.py      prompts as training renders them, text that grows token by token, stream_texts (the
                 Compare panes), answer_in_batches (A/B), generate_batch (the probes)

Knows nothing of Gradio, checkpoint folders or the model cache (`generation.py` has those).
"""

from .chat import AB_BATCH_ROWS, IncrementalText, answer_in_batches, chat_prompt_ids, generate_batch, stream_texts
from .engine import Batch, Decoder, advance_together, decode_ids
from .settings import DecodeSettings, choose_next, resolve_settings

__all__ = ["AB_BATCH_ROWS", "Batch", "DecodeSettings", "Decoder", "IncrementalText", "advance_together",
           "answer_in_batches", "chat_prompt_ids", "choose_next", "decode_ids", "generate_batch", "resolve_settings",
           "stream_texts"]
