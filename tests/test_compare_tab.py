"""Compare tab handlers as plain functions, plus one layout build."""

import os
import time
from pathlib import Path

import gradio as gr
import pytest
import torch

from ruozhi_ui import generation as g
from ruozhi_ui.config import DataConfig, GenConfig, ModelConfig, TrainConfig, save_config
from ruozhi_ui.jobs import JobRunner
from ruozhi_ui.policy import Policy
from ruozhi_ui.ui import compare_tab as ct
from ruozhi_ui.ui.context import AppContext

PROMPT = "游泳比赛时把水喝光后跑步犯规吗"
TUNED_SYSTEM = "你是弱智吧吧友"
# respond's widget values: system prompt, max_new_tokens, do_sample, temperature, top_p, top_k, repetition_penalty
GREEDY = dict(max_new_tokens=12, do_sample=False, temperature=0.7, top_p=0.9, top_k=50, repetition_penalty=1.0)


def make_checkpoint(model, tokenizer, folder: Path) -> Path:
    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    cfg = TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source="sample", system_prompt=TUNED_SYSTEM))
    save_config(cfg, folder / "run_config.json")
    return folder


OLD, NEW = "r1/checkpoints/epoch-1", "r1/checkpoints/epoch-2"  # as the dropdown names them


@pytest.fixture
def runs(tmp_path, demo_model, tokenizer):
    """A runs root with two checkpoints of one run; epoch-2 is the newer."""
    root = tmp_path / "runs"
    old = make_checkpoint(demo_model, tokenizer, root / OLD)
    with torch.no_grad():
        torch.manual_seed(1)
        demo_model.model.norm.weight.mul_(torch.randn_like(demo_model.model.norm.weight) * 4)
    new = make_checkpoint(demo_model, tokenizer, root / NEW)
    os.utime(old, (time.time() - 100, time.time() - 100))
    return root, old, new


@pytest.fixture
def ctx(runs):
    """A local-mode app's services over `runs`."""
    return AppContext(policy=Policy(mode="local", runs_root=runs[0]), runner=JobRunner(runs[0]))


def send(ctx, text, lang="en"):
    """Send in the page: the message becomes the session's pending turn on the server."""
    return ct.append_user(ctx, text, lang)


def run_respond(ctx, checkpoint, lang="en", **overrides):
    widgets = {**GREEDY, **overrides}
    return ct.respond(ctx, "demo", checkpoint, False, "你是一个有帮助的助手", widgets["max_new_tokens"],
                      widgets["do_sample"], widgets["temperature"], widgets["top_p"], widgets["top_k"],
                      widgets["repetition_penalty"], lang, None)


def ask(ctx, checkpoint, text=PROMPT, **overrides):
    send(ctx, text)
    return run_respond(ctx, checkpoint, **overrides)


def test_append_user_stores_the_turn_on_the_server_and_shows_it_in_both_panes(ctx):
    box, base, tuned, notice = send(ctx, "问")
    assert (box, notice) == ("", "")
    assert base == tuned == [{"role": "user", "content": "问"}]
    assert [t.user for t in ctx.chats.turns_of("local")] == ["问"]


def test_an_empty_send_is_one_line_in_the_notice_and_changes_nothing(ctx):
    box, base, tuned, notice = send(ctx, "  ")
    assert all(isinstance(v, type(gr.skip())) for v in (box, base, tuned))
    assert notice == "<span class='rz-error'>Type a question first, or pick a reference prompt</span>"
    assert ctx.chats.turns_of("local") == []


def test_a_refused_send_is_one_line_in_the_notice(ctx):
    *_, notice = send(ctx, "x" * (ctx.policy.limits.text_chars + 1))
    assert notice.startswith("<span class='rz-error'>message is ") and "characters long" in notice
def test_refresh_preselects_the_newest_checkpoint_and_keeps_a_valid_choice(runs, ctx):
    root, old, new = runs
    assert ct.checkpoint_choices(root) == [(NEW, NEW), (OLD, OLD)]
    assert ct.refresh_checkpoints(ctx, None).value == NEW
    assert ct.refresh_checkpoints(ctx, OLD).value == OLD
    assert ct.refresh_checkpoints(ctx, "/gone").value == NEW


def test_picking_a_checkpoint_sets_its_training_system_prompt_and_title(ctx):
    prompt, title = ct.on_checkpoint_change(ctx, NEW, "old prompt", "en")
    assert prompt == TUNED_SYSTEM
    assert title == f"**Fine-tuned model**　`{NEW}` (full fine-tune of `demo (tiny offline model, random weights)`)"
    assert ct.on_checkpoint_change(ctx, None, "old prompt", "en") == ("old prompt", ct.t("compare.tuned_none", "en"))


def test_respond_streams_both_panes_titled_with_the_weights_used(runs, ctx):
    _, _, new = runs
    outputs = list(ask(ctx, NEW))
    base_hist, tuned_hist, base_title, tuned_title = outputs[-1]
    base, tuned = ctx.models.get("demo"), ctx.models.get(str(new))
    gen = GenConfig(max_new_tokens=12)
    assert base_title.startswith("**Base model**　`demo (tiny offline model, random weights)`  \n"
                                 "<small>Decoding: greedy · ")
    assert tuned_title.startswith(f"**Fine-tuned model**　`{NEW}` (full fine-tune of ")
    assert "stops at &lt;\\|im\\_end\\|&gt;" in base_title  # the end token shown as text, never as a tag
    user = {"role": "user", "content": PROMPT}
    assert base_hist == [user, {"role": "assistant", "content": g.generate_answer(base, PROMPT, "你是一个有帮助的助手", gen)[0]}]
    assert tuned_hist[-1]["content"] == g.generate_answer(tuned, PROMPT, "你是一个有帮助的助手", gen)[0]
    texts = [o[0][-1]["content"] for o in outputs]
    assert all(b.startswith(a) for a, b in zip(texts, texts[1:]))


def test_pane_titles_and_the_decoding_line_follow_the_page_language(ctx):
    *_, base_title, tuned_title = list(ask(ctx, NEW, lang="zh"))[-1]
    assert base_title.startswith("**基座模型**　`demo（离线小模型，随机权重）`  \n<small>解码：贪心解码")
    assert tuned_title.startswith(f"**微调模型**　`{NEW}` （全参数微调，基于 ")
    for english in ("greedy", "stops at", "new tokens", "base:", "tuned:", "full, from"):
        assert english not in base_title + tuned_title


def test_each_pane_answers_with_its_own_server_side_history(ctx):
    first_base, first_tuned, *_ = list(ask(ctx, NEW, "甲"))[-1]
    base_hist, tuned_hist, *_ = list(ask(ctx, NEW))[-1]
    base = ctx.models.get("demo")
    expected = g.generate_answer(base, PROMPT, "你是一个有帮助的助手", GenConfig(max_new_tokens=12),
                                 history=[("甲", first_base[-1]["content"])])[0]
    assert base_hist[-1]["content"] == expected
    assert base_hist[:2] == first_base and tuned_hist[:2] == first_tuned and len(tuned_hist) == 4


def test_respond_without_a_pending_user_turn_yields_nothing(ctx):
    assert list(run_respond(ctx, NEW)) == []


def test_respond_without_a_checkpoint_is_a_gr_error(ctx):
    with pytest.raises(gr.Error, match="Pick a fine-tuned checkpoint first"):
        list(ask(ctx, ""))


def test_clear_forgets_the_sessions_conversation(ctx):
    list(ask(ctx, NEW))
    assert ct.clear_chats(ctx) == ([], [], "")
    assert ctx.chats.turns_of("local") == []


def test_stop_generation_ends_the_session_streams_early(ctx):
    full = list(ask(ctx, NEW, max_new_tokens=200))[-1][0][-1]["content"]
    stream = ask(ctx, NEW, max_new_tokens=200)
    next(stream)  # titles, empty answers
    first = next(stream)  # first delta
    ct.stop_generation(None)
    last = list(stream)
    answer = (last[-1] if last else first)[0][-1]["content"]
    assert len(answer) < len(full)
    assert ct._active.get("local", set()) == set()
    assert ctx.chats.turns_of("local")[-1].base == answer  # the stored turn is what the pane shows


def test_a_visitor_answers_one_thing_at_a_time(ctx):
    stream = ask(ctx, NEW, max_new_tokens=200)
    next(stream)
    with pytest.raises(gr.Error, match="You already have an answer or an A/B table being generated"):
        list(ct.run_ab(ctx, "demo", NEW, False, "s", "pasted", 5, "q", 4, 1.0, "en"))
    stream.close()
    assert not ctx.long_work.busy("local")  # local mode: the session's slot


def test_run_ab_on_pasted_prompts_gives_one_row_per_line(ctx):
    outputs = list(ct.run_ab(ctx, "demo", NEW, False, "你是一个有帮助的助手", "pasted", 50,
                             "地球上有70亿人\n\n一些高中想提高升学率\n", 6, 1.0, "en"))
    loss_md, table = outputs[-1]
    assert loss_md == ct.t("compare.ab_no_loss", "en")
    assert list(table["prompt"]) == ["地球上有70亿人", "一些高中想提高升学率"]


def test_run_ab_on_the_validation_set_uses_the_checkpoints_own_data_and_shows_both_losses(ctx):
    from ruozhi_ui.data import load_source

    outputs = list(ct.run_ab(ctx, "demo", NEW, False, TUNED_SYSTEM, "validation", 2, "", 4, 1.0, "en"))
    loss_md, table = outputs[-1]
    assert loss_md.startswith("Validation loss (2 records, the training objective): base **")
    assert list(table["prompt"]) == [r.instruction for r in load_source("sample").val[:2]]  # the run's source


def test_build_gives_every_component_its_elem_id(tmp_path):
    with gr.Blocks() as demo:
        ctx = AppContext(policy=Policy(runs_root=tmp_path), runner=JobRunner(tmp_path), visitor=gr.BrowserState(),
                         model_spec=gr.Dropdown(["demo"], value="demo"), trust_remote_code=gr.Checkbox(False),
                         data_source=gr.Textbox("sample"), lang=gr.Radio(["zh", "en"], value="zh"))
        with gr.Tabs():
            with gr.Tab("compare"):
                handles = ct.build(ctx)
    ids = {b.elem_id for b in demo.blocks.values()}
    assert {"compare-checkpoint", "compare-refresh", "compare-input", "compare-send", "compare-stop", "compare-clear",
            "compare-base-label", "compare-tuned-label", "compare-base-chat", "compare-tuned-chat", "compare-ab-run",
            "compare-ab-table", "compare-ab-csv", "compare-notice"} <= ids
    assert handles.max_new_tokens.value == GenConfig().max_new_tokens


def test_fetch_base_model_is_a_no_op_for_the_demo_and_a_gr_error_offline(demo_dir, ctx):
    send(ctx, PROMPT)  # something to answer: otherwise fetching is skipped
    assert isinstance(ct.fetch_base_model(ctx, "demo", "r/checkpoints/final", "en"), type(gr.skip()))
    with pytest.raises(gr.Error, match="Could not load the model files"):
        ct.fetch_base_model(ctx, "no-such-owner/no-such-model-xyz", "r/checkpoints/final", "en")  # offline in tests
    with pytest.raises(gr.Error, match="checkpoint"):
        ct.fetch_base_model(ctx, "no-such-owner/no-such-model-xyz", None, "en")  # no download before that error
