"""Batch A/B on chat data (issue 23, defect 7): a validation record is asked as training rendered it, and its
loss is scored with the checkpoint's own turn and truncation settings."""

import pytest

from ruozhi_ui import generation as g
from ruozhi_ui.config import GenConfig
from ruozhi_ui.data import Record
from ruozhi_ui.encoding import encode_records, pad_id
from ruozhi_ui.train.evaluate import mean_label_loss

CPU = "cpu"
SYSTEM = "你是一个有帮助的助手"
DIALOGUE = Record("第二问", "第二答", system="自己的系统提示", history=(("第一问", "第一答"),))


@pytest.fixture
def demo():
    return g.LoadedModel(*_demo())


def _demo():
    model = g.ModelCache().get("demo", device=CPU)
    return model.model, model.tokenizer, model.label, model.path, model.kind


def test_a_dialogue_in_batch_ab_is_asked_with_its_history_and_own_system_prompt(demo, monkeypatch):
    asked = []

    def answer_in_batches(jobs, prompt_lists, cancel):
        asked.extend(prompt_lists)
        return iter(())

    monkeypatch.setattr(g, "answer_in_batches", answer_in_batches)
    list(g.iter_batch_ab(demo, demo, [DIALOGUE.instruction], [DIALOGUE.output], SYSTEM, GenConfig(), records=[DIALOGUE]))
    messages = [{"role": "system", "content": "自己的系统提示"}, {"role": "user", "content": "第一问"},
                {"role": "assistant", "content": "第一答"}, {"role": "user", "content": "第二问"}]
    text = demo.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert asked == [[demo.tokenizer(text, add_special_tokens=False).input_ids]] * 2


def test_the_validation_loss_uses_the_checkpoint_s_turn_setting(demo):
    tok = demo.tokenizer
    last_only = encode_records(tok, [DIALOGUE], SYSTEM, 62, 151, train_all_turns=False)
    expected = mean_label_loss(demo.model, last_only, pad_id(tok), demo.model.device, 8)
    assert g.validation_loss(demo, [DIALOGUE], SYSTEM, 62, 151, train_all_turns=False) == pytest.approx(expected)
