"""The server-side bounds of public mode, round 2, as plain objects: chat store, visitor slots, dataset sizes,
training time and cool-down, the shared disk cap, log and Markdown escaping, plot text."""

from __future__ import annotations

import io

import pytest

from ruozhi_ui import bounds, plots
from ruozhi_ui.chats import ChatStore, messages, pairs, pending
from ruozhi_ui.data import Record
from ruozhi_ui.errors import DataFormatError, JobConflict, PolicyError
from ruozhi_ui.events import JobFinished, StepLogged
from ruozhi_ui.jobs import JobRunner
from ruozhi_ui.policy import PUBLIC_LIMITS, Policy
from ruozhi_ui.safelog import SafeStream, escape_controls
from ruozhi_ui.slots import VisitorSlots
from ruozhi_ui.ui.boundary import md_code
from ruozhi_ui.ui.guard import bad_text


# ---------------------------------------------------------------- chats

def test_a_conversation_holds_at_most_its_turns():
    store = ChatStore(sessions=10, turns=2, chars=10**6)
    for text in ("a", "b"):
        store.add_user("s", text)
        store.answer("s", "x", "y")
    with pytest.raises(PolicyError, match="reached 2 turns"):
        store.add_user("s", "c")


def test_a_conversation_holds_at_most_its_characters_counted_before_the_turn_is_added():
    store = ChatStore(sessions=10, turns=100, chars=10)
    store.add_user("s", "12345")
    store.answer("s", "12", "")
    with pytest.raises(PolicyError, match="would be 11 characters long, at most 10"):
        store.add_user("s", "1234")
    assert len(store.turns_of("s")) == 1


def test_the_store_keeps_at_most_its_sessions_least_recently_used_dropped():
    store = ChatStore(sessions=3, turns=10, chars=100)
    for i in range(50):
        store.add_user(f"s{i}", "hi")
    assert len(store) == 3 and store.turns_of("s0") == [] and store.turns_of("s49")[0].user == "hi"


def test_an_unanswered_turn_is_replaced_by_the_next_send():
    store = ChatStore(sessions=3, turns=10, chars=100)
    store.add_user("s", "first")
    turns = store.add_user("s", "second")
    assert [t.user for t in turns] == ["second"] and pending(turns) == "second"


def test_pane_messages_are_plain_text_built_from_the_store():
    store = ChatStore(sessions=3, turns=10, chars=1000)
    store.add_user("s", "q1")
    store.answer("s", "b1", "t1")
    turns = store.add_user("s", "q2")
    assert messages(turns, "base", "b2…") == [{"role": "user", "content": "q1"}, {"role": "assistant", "content": "b1"},
                                            {"role": "user", "content": "q2"}, {"role": "assistant", "content": "b2…"}]
    assert pairs(turns, "tuned") == [("q1", "t1")]


# ---------------------------------------------------------------- one at a time per visitor

def test_a_visitor_holds_one_slot_and_another_visitor_is_not_blocked():
    slots = VisitorSlots()
    with slots.hold("alice"):
        with pytest.raises(PolicyError, match="You already have an answer or an A/B table"):
            with slots.hold("alice"):
                pass
        with slots.hold("bob"):
            assert slots.busy("bob")
    assert not slots.busy("alice") and not slots.busy("bob")


# ---------------------------------------------------------------- dataset sizes

@pytest.fixture
def small_bounds():
    bounds.configure(record_chars=10, file_chars=25)
    yield
    bounds.configure(**vars(bounds.RecordBounds()))


def test_a_record_over_its_characters_is_refused_naming_it(small_bounds):
    with pytest.raises(DataFormatError, match="big.json: record 1 is 11 characters long; this app reads records of at most 10"):
        bounds.check_records([Record("ab", "c"), Record("x" * 10, "y")], "big.json")


def test_a_record_counts_its_history_and_system_prompt(small_bounds):
    with pytest.raises(DataFormatError, match="record 0 is 12 characters"):
        bounds.check_records([Record("a", "b", system="cccc", history=(("dd", "eeee"),))], "h.json")


def test_a_dataset_over_its_characters_is_refused(small_bounds):
    with pytest.raises(DataFormatError, match="the dataset is over 25 characters"):
        bounds.check_records([Record("a" * 5, "b" * 4)] * 3, "many.json")


def test_load_source_checks_sizes_before_returning_records(small_bounds, tmp_path):
    from ruozhi_ui.data import load_source

    (tmp_path / "one.json").write_text('[{"instruction": "问题问题问题问题问题问题", "output": "答"}]', encoding="utf-8")
    with pytest.raises(DataFormatError, match="record 0 is 13 characters"):
        load_source("upload:one.json", uploads_dir=tmp_path)


# ---------------------------------------------------------------- training time and cool-down

def steps_until_stopped(cfg, emit, stop_event, runs_root):
    step = 0
    while not stop_event.is_set() and step < 10_000:
        step += 1
        emit(StepLogged(step=step, epoch=0.0, loss=1.0, lr=1e-4, tok_per_s=1.0, elapsed_s=0.0, eta_s=1.0,
                        mem_gib=0.0, num_steps=10_000))
        stop_event.wait(0.01)
    emit(JobFinished(status="stopped" if stop_event.is_set() else "finished", run_dir=str(runs_root),
                     final_checkpoint="", elapsed_s=0.0))


def test_a_run_over_the_time_limit_is_stopped_by_the_runner(tmp_path):
    from ruozhi_ui.config import TrainConfig

    runner = JobRunner(tmp_path, train_fn=steps_until_stopped)
    runner.max_seconds = 1e-9  # any step after the start is over it
    runner.start(TrainConfig(), owner="v1")
    assert runner.wait(60)
    snap = runner.snapshot()
    assert snap.status == "stopped" and len(snap.steps) < 10_000


def test_the_same_visitor_waits_out_the_cool_down_and_another_does_not(tmp_path):
    from ruozhi_ui.config import TrainConfig

    runner = JobRunner(tmp_path, train_fn=steps_until_stopped)
    runner.max_seconds, runner.cooldown_s = 1e-9, 3600
    runner.start(TrainConfig(), owner="v1")
    assert runner.wait(60)
    with pytest.raises(JobConflict, match="you can start another in about 60 min"):
        runner.start(TrainConfig(), owner="v1")
    runner.start(TrainConfig(), owner="v2")
    assert runner.wait(60)


# ---------------------------------------------------------------- disk shared by all visitors

def test_visitors_together_are_capped_and_idle_folders_go_first(tmp_path):
    import dataclasses
    import os
    import time

    policy = Policy(mode="public", runs_root=tmp_path,
                    limits=dataclasses.replace(PUBLIC_LIMITS, visitors_disk_mb=1, visitor_idle_h=1))
    old, fresh, me = (policy.visitor(f"{i:032x}") for i in range(3))
    for v in (old, fresh):
        v.uploads.mkdir(parents=True)
        (v.uploads / "d.json").write_bytes(b"x" * 600_000)
    past = time.time() - 7200
    for path in (old.uploads / "d.json", old.uploads, old.runs_root):
        os.utime(path, (past, past))
    policy.make_room(me)
    assert not old.runs_root.exists() and fresh.runs_root.exists()  # the idle visitor's folder made the room
    (fresh.uploads / "e.json").write_bytes(b"x" * 600_000)
    with pytest.raises(PolicyError, match="shared by all visitors, is full"):
        policy.make_room(me)


# ---------------------------------------------------------------- escaping

@pytest.mark.parametrize("breaker", ["\r", "\n", "\r\n", "\u2028", "\u2029", "\x0b", "\x0c", "\x85", "`"])
def test_inline_code_stays_one_span_whatever_the_text_holds(breaker):
    code = md_code(f"a{breaker}![x](http://evil.invalid/x.png)")
    assert code.count("`") == 2 and code.startswith("`a") and code.endswith(")`")
    assert not any(ch in code[1:-1] for ch in "\r\n\u2028\u2029\x0b\x0c\x85`")


def test_log_lines_escape_terminal_controls_and_carriage_returns():
    out = io.StringIO()
    SafeStream(out).write("ok\tline\n\x1b[2Jfake\rprefix\x07\ud800\n")
    assert out.getvalue() == "ok\tline\n\\x1b[2Jfake\\rprefix\\x07\\ud800\n"


def test_escape_controls_leaves_text_and_newlines_alone():
    assert escape_controls("训练 loss 1.0\n") == "训练 loss 1.0\n"


def test_plot_text_is_entity_escaped():
    assert plots.plain('<a href="http://evil.invalid">x</a>') == "&lt;a href=&quot;http://evil.invalid&quot;&gt;x&lt;/a&gt;"
    figure = plots.runs_figure([type("Run", (), {"name": "<b>r</b>", "steps": [(1, 1.0)], "evals": []})()], "en")
    assert "<b>" not in figure.data[0].name and "&lt;b&gt;r&lt;/b&gt;" in figure.data[0].name


@pytest.mark.parametrize("value,found", [({"a": ["ok", {"k\x1b": 1}]}, "U+001B"), (["\ud800"], "U+D800"),
                                         ({"t": "tab\tnew\nline\rok"}, None), ("\x9b", "U+009B")])
def test_the_guard_finds_a_bad_character_anywhere_in_a_json_value(value, found):
    assert bad_text(value) == found
