"""Hardening at the UI boundary: bad uploads, double starts, chatting while training, safety, crashes.

Plain tab handlers where the behaviour lives in them; gradio_client against an app on
127.0.0.1 where it only exists through Gradio (session state, the queue, two clients).
Every test waits on conditions with deadlines, never on timings. The engine-, data- and
checkpoint-level cases live in test_faults.py, test_data.py, test_safety.py and
test_large_inputs.py; docs/testing.md's hardening table maps every case to its test.
"""

import json
import os
import pickle
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import gradio as gr
import pytest
import torch
from gradio_client import Client
from gradio_client.exceptions import AppError

import app as app_module
from ruozhi_ui import data
from ruozhi_ui.train import step as step_module
from ruozhi_ui import generation as g
from ruozhi_ui.config import DataConfig, ModelConfig, TrainConfig, save_config
from browser_helpers import free_port
from client_helpers import api_args, poll_until, wait_until
from ruozhi_ui.jobs import JobRunner
from ruozhi_ui.policy import Policy
from ruozhi_ui.ui import compare_tab as ct
from ruozhi_ui.ui import data_tab, shell, train_tab
from ruozhi_ui.ui.context import AppContext
from ruozhi_ui.ui.shell import LAUNCH_KWARGS, build_app

PROMPT = "游泳比赛时把水喝光后跑步犯规吗"
SYSTEM = "你是一个有帮助的助手"


# ---------------------------------------------------------------- helpers

def form(**changes) -> dict:
    return {**train_tab.form_defaults(), **changes}


def local_ctx(root, runner=None) -> AppContext:
    return AppContext(policy=Policy(mode="local", runs_root=root), runner=runner or JobRunner(root))


def start(ctx, trust=False, **changes) -> str:
    """The Train tab's Start with the demo model and the sample, the form's defaults changed by `changes`."""
    return train_tab.on_start(ctx, "demo", trust, "sample", "en", **form(**changes))


def load(ctx, source, trust=False):
    return data_tab.on_load(ctx, source, "demo", trust, 10, "en")


def gr_error(call) -> str:
    """The message of the gr.Error that `call()` raises (str(gr.Error) is quoted; .message is not)."""
    with pytest.raises(gr.Error) as e:
        call()
    return e.value.message


def respond(ctx, checkpoint, message=PROMPT, max_new_tokens=8, request=None, trust=False):
    """Run the Compare tab's respond handler to the end; returns the last (base, tuned, titles...)."""
    ctx.chats.add_user(ct._session(request), message)  # Send: the turn is kept on the server, not sent back
    outputs = list(ct.respond(ctx, "demo", str(checkpoint), trust, SYSTEM, max_new_tokens, False,
                              0.7, 0.9, 50, 1.0, "en", None, request))
    return outputs[-1]


def make_checkpoint(model, tokenizer, folder: Path) -> Path:
    """A checkpoint folder as the engine writes one: safetensors weights, tokenizer, run_config.json."""
    folder.mkdir(parents=True)
    model.save_pretrained(folder, safe_serialization=True)
    tokenizer.save_pretrained(folder)
    save_config(TrainConfig(model=ModelConfig(spec="demo"), data=DataConfig(source="sample")), folder / "run_config.json")
    return folder


@pytest.fixture
def tuned_dir(tmp_path, demo_model, tokenizer):
    return make_checkpoint(demo_model, tokenizer, tmp_path / "runs" / "r" / "checkpoints" / "final")


@pytest.fixture
def count_loads(monkeypatch):
    """Every weight load the generation cache makes, as a list of specs (shared across threads)."""
    loads, real = [], g._load_uncached
    monkeypatch.setattr(g, "_load_uncached", lambda spec, *a: loads.append(spec) or real(spec, *a))
    return loads


@pytest.fixture
def ctx(tmp_path, demo_dir):
    """A local-mode app's services with a JobRunner on the real engine; whatever a test leaves running is
    stopped afterwards."""
    context = local_ctx(tmp_path / "runs")
    yield context
    context.runner.stop()
    assert context.runner.wait(60)


@pytest.fixture(scope="module")
def served(tmp_path_factory, demo_dir):
    """The whole app on 127.0.0.1 with the shared LAUNCH_KWARGS and the real engine."""
    runner = JobRunner(tmp_path_factory.mktemp("hardening-runs"))
    demo = build_app(runner=runner)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **LAUNCH_KWARGS)
    url = f"http://127.0.0.1:{port}/"
    yield SimpleNamespace(demo=demo, runner=runner, url=url,
                          client=lambda: Client(url, analytics_enabled=False, verbose=False))
    runner.stop()
    runner.wait(60)
    demo.close()


# ---------------------------------------------------------------- 1. data files in the UI

def _write(path: Path, content) -> str:
    if isinstance(content, bytes):
        path.write_bytes(content)
    else:
        path.write_text(content if isinstance(content, str) else json.dumps(content, ensure_ascii=False),
                        encoding="utf-8")
    return str(path)


GOOD = [{"instruction": f"问题{i}", "output": f"回答{i}"} for i in range(4)]
BAD_FILES = {  # name -> (content, the message the Load handler must show)
    "malformed.json": ('[\n{"instruction": "a", "output": "b"},\n{"instruction": "c" "output": "d"}\n]',
                       "malformed.json: line 3: invalid JSON"),
    "object.json": ({"instruction": "a", "output": "b"}, "the top level must be a list of records, got dict"),
    "missing.json": ([{"instruction": "a"}], "record 0: missing field 'output'"),
    "number.jsonl": ('{"instruction": "a", "output": 7}\n', "line 1: field 'output' must be a string, got int"),
    "blank.json": ([{"instruction": "a", "output": "   "}], "record 0: field 'output' is empty"),
    "empty.jsonl": ("\n\n", "empty.jsonl: the file is empty"),
    "gbk.jsonl": ('{"instruction": "中文", "output": "b"}\n'.encode("gbk"), "gbk.jsonl: line 1: not valid UTF-8"),
    "code.json": ("import os\nos.system('echo pwned')\n", "code.json: line 1: invalid JSON"),
}


@pytest.mark.parametrize("name", list(BAD_FILES))
def test_a_bad_data_file_is_a_gr_error_naming_file_line_and_field(tmp_path, name):
    # Guards: the Load handler turns every DataFormatError into a readable gr.Error, never a traceback.
    content, message = BAD_FILES[name]
    shown = gr_error(lambda: load(local_ctx(tmp_path), _write(tmp_path / name, content)))
    assert shown.startswith("Loading failed: ") and message in shown


def test_a_file_over_the_size_limit_is_a_gr_error(tmp_path, monkeypatch):
    # Guards: the size check reaches the UI as a message with the limit, before anything is parsed.
    monkeypatch.setattr(data, "MAX_FILE_BYTES", 16)
    path = _write(tmp_path / "big.json", GOOD)
    assert gr_error(lambda: load(local_ctx(tmp_path), path)) == (
        "Loading failed: big.json: file is 0 MB, over the 0 MB limit; split it or load it from the Hub")


def test_a_bom_file_loads(tmp_path, demo_dir):
    # Guards: a UTF-8 byte-order mark (Windows Notepad) is not mistaken for bad data.
    path = _write(tmp_path / "bom.json", b"\xef\xbb\xbf" + json.dumps(GOOD, ensure_ascii=False).encode("utf-8"))
    key, n_train, summary, table, *_ = load(local_ctx(tmp_path), path)
    assert key == data_tab.DataKey(path, "demo", False, "")
    assert sorted(row[2] for row in table["data"]) == [r["instruction"] for r in GOOD]


def test_duplicates_load_with_a_note_in_the_summary(tmp_path, demo_dir):
    # Guards: duplicates are reported on screen, not silently trained on twice.
    path = _write(tmp_path / "dup.json", GOOD + GOOD[:2])
    summary = load(local_ctx(tmp_path), path)[2]
    assert summary.endswith("\n\n- 2 duplicate record\\(s\\) found \\(same instruction and output\\)")


@pytest.mark.parametrize("protocol", [0, 4])
def test_a_pickle_renamed_json_is_a_format_error_and_never_unpickled(tmp_path, protocol):
    # Guards: uploads are parsed as JSON only; unpickling this file would create `marker`.
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return os.mkdir, (str(marker),)

    path = _write(tmp_path / "model.json", pickle.dumps(Payload(), protocol=protocol))
    expected = "line 1: invalid JSON" if protocol == 0 else "line 1: not valid UTF-8"
    assert expected in gr_error(lambda: load(local_ctx(tmp_path), path))
    assert not marker.exists()


def test_python_code_in_a_json_file_is_never_run(tmp_path):
    # Guards: a .json holding Python is a JSON error; running it would create `marker`.
    marker = tmp_path / "ran"
    path = _write(tmp_path / "evil.json", f"__import__('os').mkdir({str(marker)!r})\n")
    assert "evil.json: line 1: invalid JSON" in gr_error(lambda: load(local_ctx(tmp_path), path))
    assert not marker.exists()


def test_a_failed_load_keeps_the_previous_data_in_the_session(served, tmp_path):
    # Guards: a failed Load leaves the session's loaded data (gr.State) as it was: paging still shows the sample.
    client = served.client()
    _, first_page, *_ = client.predict("sample", "demo", False, 10, "en", api_name="/load_data")
    bad = _write(tmp_path / "broken.json", "[{")  # local mode: a server path is a fine source
    with pytest.raises(AppError, match=r"Loading failed: broken\.json: line 1: invalid JSON"):
        client.predict(bad, "demo", False, 10, "en", api_name="/load_data")
    table, page, _ = client.predict("", 1, 10, "en", api_name="/preview_page")
    assert page == 1 and table["data"] == first_page["data"]


def test_gradio_upload_limit_equals_the_data_size_limit(served):
    # Guards: Gradio refuses uploads above the size data.py would refuse anyway (launch kwarg max_file_size),
    # so a too-big file is stopped at upload, not after it filled the server's temp folder.
    import httpx

    assert LAUNCH_KWARGS["max_file_size"] == data.MAX_FILE_BYTES
    assert served.demo.max_file_size == data.MAX_FILE_BYTES
    assert httpx.get(served.url + "config").json()["max_file_size"] == data.MAX_FILE_BYTES


@pytest.mark.parametrize("command", ["stats", "train"])
@pytest.mark.parametrize("name", list(BAD_FILES))
def test_the_cli_reports_a_bad_data_file_in_one_line_and_exits_2(tmp_path, capsys, demo_dir, name, command):
    # Guards: the CLI's RuozhiError boundary: one "error: ..." line, exit code 2, no traceback, no run folder.
    from ruozhi_ui import cli

    content, message = BAD_FILES[name]
    path = _write(tmp_path / name, content)
    extra = ["--output", str(tmp_path / "runs" / "r"), "--device", "cpu"] if command == "train" else []
    assert cli.main([command, "--data", path, "--model", "demo", *extra]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and message in err[0]
    assert not (tmp_path / "runs").exists()


# ---------------------------------------------------------------- 2. concurrency

def test_a_double_clicked_start_starts_one_run(tmp_path):
    # Guards: two Start calls racing each other: the runner's lock lets exactly one through.
    release, runs = threading.Event(), []
    runner = JobRunner(tmp_path, train_fn=lambda cfg, emit, stop, root: runs.append(cfg) or release.wait(30))
    barrier, results, context = threading.Barrier(2), [], local_ctx(tmp_path, runner)

    def click():
        barrier.wait()
        try:
            results.append(start(context))
        except gr.Error as e:
            results.append(e)

    threads = [threading.Thread(target=click) for _ in range(2)]
    for th in threads:
        th.start()
    for th in threads:
        th.join(30)
    release.set()
    assert runner.wait(30)
    started = [r for r in results if isinstance(r, str)]
    refused = [r for r in results if isinstance(r, gr.Error)]
    assert started == ["Started `ruozhi-sft`."] and len(refused) == 1
    assert "already in progress" in refused[0].message
    assert len(runs) == 1


def test_start_from_two_clients_runs_one_job_and_another_client_can_stop_it(served):
    # Guards: the job is per process, not per browser: a second client is refused and can stop the first's run.
    alice, bob = served.client(), served.client()
    poll_until(alice, lambda s: not s["active"])
    args = api_args(alice, "/start_training", epochs=50, lr=1e-3, run_name="two-clients")
    jobs = [c.submit(*args, api_name="/start_training") for c in (alice, bob)]
    outcomes = []
    for job in jobs:
        try:
            outcomes.append(job.result(timeout=60))
        except AppError as e:
            outcomes.append(e)
    assert sorted(type(o).__name__ for o in outcomes) == ["AppError", "str"]
    assert "Cannot start training: A training run is already in progress" in str(
        next(o for o in outcomes if isinstance(o, AppError)))
    poll_until(bob, lambda s: s["status"] == "running")
    assert bob.predict("en", api_name="/stop_training").startswith("Stop requested")
    assert poll_until(alice, lambda s: not s["active"])["status"] == "stopped"


def test_chatting_while_training_works_and_loads_each_model_once(ctx, tuned_dir, count_loads):
    # Guards: Compare is usable during a run, and repeated chats reuse the cache (no second copy of a model).
    start(ctx, epochs=50, lr=1e-3, run_name="busy")
    wait_until(lambda: ctx.runner.snapshot().steps, what="the first training step")
    first = respond(ctx, tuned_dir)
    second = respond(ctx, tuned_dir, message="地球上有70亿人")
    assert first[0][-1]["role"] == second[1][-1]["role"] == "assistant"
    assert ctx.runner.snapshot().status == "running"
    assert sorted(count_loads) == sorted(["demo", str(tuned_dir)])


def test_two_users_chatting_at_once_both_finish_with_one_load_per_model(tmp_path, tuned_dir, count_loads):
    # Guards: the per-key load lock: two sessions asking for the same weights at once share one copy.
    barrier, answers, errors, context = threading.Barrier(2), {}, [], local_ctx(tmp_path)

    def user(name):
        barrier.wait()
        try:
            answers[name] = respond(context, tuned_dir, request=SimpleNamespace(session_hash=name))
        except Exception as e:  # surfaced by the assert below
            errors.append(e)

    threads = [threading.Thread(target=user, args=(n,)) for n in ("u1", "u2")]
    for th in threads:
        th.start()
    for th in threads:
        th.join(60)
    assert errors == [] and sorted(answers) == ["u1", "u2"]
    assert answers["u1"][:2] == answers["u2"][:2]  # greedy, same prompt, same weights: same answers
    assert sorted(count_loads) == sorted(["demo", str(tuned_dir)])
    assert ct._active.get("u1") == set() and ct._active.get("u2") == set()


# ---------------------------------------------------------------- 3. safety at the UI

def test_trust_remote_code_checkbox_is_off_and_its_warning_shows_only_when_ticked(tmp_path):
    demo = build_app(runner=JobRunner(tmp_path), runs_root=tmp_path)
    trust = next(b for b in demo.blocks.values() if b.elem_id == "app-trust")
    assert trust.value is False
    shown = shell.trust_warning(True, "en")
    assert shown["visible"] is True and shown["value"].startswith("⚠️ trust_remote_code is on")
    assert shell.trust_warning(False, "en") == {"__type__": "update", "value": "", "visible": False}


@pytest.mark.parametrize("ticked", [False, True])
def test_trust_remote_code_reaches_transformers_only_as_ticked(ctx, tuned_dir, monkeypatch, ticked):
    # Guards: every tab hands the checkbox through unchanged (local mode); nothing turns remote code on by itself.
    import transformers

    seen = []
    for cls in (transformers.AutoTokenizer, transformers.AutoModelForCausalLM):
        real = cls.from_pretrained
        monkeypatch.setattr(cls, "from_pretrained",
                            lambda *a, _real=real, **k: seen.append(k.get("trust_remote_code")) or _real(*a, **k))
    load(ctx, "sample", trust=ticked)  # Data tab: tokenizer
    respond(ctx, tuned_dir, trust=ticked)  # Compare tab: base and tuned, tokenizers and weights
    start(ctx, trust=ticked, run_name="trust")  # Train tab
    ctx.runner.stop()
    assert ctx.runner.wait(60)
    assert ctx.runner.snapshot().config["model"]["trust_remote_code"] is ticked
    assert len(seen) >= 7 and set(seen) == {ticked}


@pytest.mark.parametrize("name,folder", [
    ("../x", "x"), ("/etc/cron.d/x", "etc-cron.d-x"), ("长" * 300, "长" * 64),
])
def test_the_run_name_field_cannot_leave_the_runs_folder(ctx, tmp_path, name, folder):
    # Guards: whatever is typed as run name, the engine's run folder is a direct child of the runs root.
    start(ctx, run_name=name)
    ctx.runner.stop()  # the folder exists from setup on; no need to train
    assert ctx.runner.wait(60)
    snap = ctx.runner.snapshot()
    assert snap.status == "stopped", snap.error
    assert Path(snap.run_dir) == (tmp_path / "runs" / folder).resolve()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["runs"]


def test_a_run_name_with_control_characters_is_refused_at_start(tmp_path):
    runner = JobRunner(tmp_path, train_fn=lambda *a: pytest.fail("no job may start"))
    shown = gr_error(lambda: start(local_ctx(tmp_path, runner), run_name="a\x00b\nc\x1b[2J"))
    assert shown == "Cannot start training: run_name contains a control character (U+0000) at position 1: remove it"
    assert runner.snapshot().status == "idle"


def test_a_run_name_with_nothing_safe_left_is_refused_at_start(tmp_path):
    # Guards: '../..' used to start a job that failed a moment later; now Start refuses it at once.
    runner = JobRunner(tmp_path, train_fn=lambda *a: pytest.fail("no job may start"))
    shown = gr_error(lambda: start(local_ctx(tmp_path, runner), run_name="../.."))
    assert shown == ("Cannot start training: run_name is empty after removing unsafe characters; "
                     "use letters, digits, '-' or '_'")
    assert runner.snapshot().status == "idle"


@pytest.mark.parametrize("env,cli_host,expected", [
    ({}, None, "127.0.0.1"),
    ({"SYSTEM": "spaces"}, None, "0.0.0.0"),
    ({"SPACE_ID": "someone/ruozhi-sft"}, None, "0.0.0.0"),
    ({"RUOZHI_HOST": "0.0.0.0"}, None, "0.0.0.0"),
    ({}, "0.0.0.0", "0.0.0.0"),
])
def test_the_app_binds_localhost_unless_on_spaces_or_asked(monkeypatch, env, cli_host, expected):
    for var in ("SYSTEM", "SPACE_ID", "RUOZHI_HOST"):
        monkeypatch.delenv(var, raising=False)
    for var, value in env.items():
        monkeypatch.setenv(var, value)
    assert app_module.pick_host(cli_host) == expected


def test_main_launches_on_localhost_with_the_shared_launch_kwargs(monkeypatch):
    # Guards: `python app.py` really passes the picked host and the upload limit to launch().
    for var in ("SYSTEM", "SPACE_ID", "RUOZHI_HOST"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.delenv("RUOZHI_MODE", raising=False)
    launched, policies = {}, []
    monkeypatch.setattr(shell, "build_app",
                        lambda policy: policies.append(policy) or SimpleNamespace(launch=lambda **kw: launched.update(kw)))
    app_module.main(["--port", "7999"])
    assert (launched["server_name"], launched["server_port"]) == ("127.0.0.1", 7999)
    assert launched["max_file_size"] == data.MAX_FILE_BYTES
    assert policies[0].mode == "local"


# ---------------------------------------------------------------- 4. generation errors in the Compare tab

def test_an_empty_message_sent_straight_to_the_api_is_a_gr_error(tmp_path, tuned_dir):
    # Guards: the compare_respond endpoint can be called without append_user's check.
    assert gr_error(lambda: respond(local_ctx(tmp_path), tuned_dir, message="   ")) == (
        "Error: The message is empty: type a question or pick an example")


def test_a_prompt_longer_than_the_context_is_a_gr_error(tmp_path, tuned_dir):
    shown = gr_error(lambda: respond(local_ctx(tmp_path), tuned_dir, message=PROMPT * 100, max_new_tokens=64))
    assert shown.startswith("Error: The prompt is ") and "reads at most 1024 tokens and 64 are kept" in shown


def test_a_missing_checkpoint_folder_is_a_gr_error(tmp_path):
    gone, context = tmp_path / "runs" / "deleted" / "checkpoints" / "final", local_ctx(tmp_path / "runs")
    assert gr_error(lambda: respond(context, gone)).startswith(
        f"Error: Checkpoint folder '{gone}' does not exist")
    ab = gr_error(lambda: list(ct.run_ab(context, "demo", str(gone), False, SYSTEM, "pasted", 5, "一行", 4, 1.0,
                                         "en")))  # the A/B table too
    assert ab.startswith(f"Error: Checkpoint folder '{gone}' does not exist")


def _foreign_model(kind: str, vocab_size: int):
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    config_cls, model_cls = (Qwen2Config, Qwen2ForCausalLM) if kind == "qwen2" else (LlamaConfig, LlamaForCausalLM)
    torch.manual_seed(0)
    return model_cls(config_cls(vocab_size=vocab_size, hidden_size=32, intermediate_size=64, num_hidden_layers=1,
                                num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256))


@pytest.mark.parametrize("kind,extra_vocab,shown", [("qwen2", 64, "(qwen2, vocabulary {v})"),
                                                    ("llama", 0, "(llama, vocabulary {v})")])
def test_a_checkpoint_of_another_architecture_is_a_gr_error(tmp_path, tokenizer, kind, extra_vocab, shown):
    # Guards: check_pair in the respond path: a mismatched pair is refused before generating nonsense.
    vocab = len(tokenizer) + extra_vocab
    folder = make_checkpoint(_foreign_model(kind, vocab), tokenizer, tmp_path / "other" / "checkpoints" / "final")
    message = gr_error(lambda: respond(local_ctx(tmp_path), folder))
    assert "does not match the base" in message and shown.format(v=vocab) in message


# ---------------------------------------------------------------- 5. a crashing job leaves the app serving

def test_a_crash_in_the_engine_shows_failed_and_the_next_start_is_accepted(served, monkeypatch):
    # Guards: an exception inside a step ends as status 'failed' with its message; the app keeps serving.
    client = served.client()
    poll_until(client, lambda s: not s["active"])

    def crash(model, batch):
        raise RuntimeError("simulated crash inside a training step")

    monkeypatch.setattr(step_module, "batch_loss_sum", crash)
    client.predict(*api_args(client, "/start_training", run_name="crash"), api_name="/start_training")
    failed = poll_until(client, lambda s: not s["active"])
    assert failed["status"] == "failed"
    assert failed["error"] == "RuntimeError: simulated crash inside a training step"
    monkeypatch.undo()
    assert client.predict(*api_args(client, "/start_training", run_name="after-crash"),
                          api_name="/start_training") == "Started `after-crash`."
    assert client.predict("en", api_name="/stop_training").startswith(("Stop requested", "No training"))
    assert poll_until(client, lambda s: not s["active"])["status"] in ("stopped", "finished")
