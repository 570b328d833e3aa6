"""Public mode, attacked as a visitor of a public Space would: gradio_client, raw HTTP, hidden events.

One app per module in public mode on 127.0.0.1 (the real engine on the demo model, parked by a
gate so "another visitor is training" is provably true while the attacks run). Each test is one
class of hole from the public-mode issue: code execution, reading server files, other visitors'
data, exhausting the machine, breaking the page. Every attack must be refused with a clear
message and have no effect; the checks look for effects (files, markers, other sessions' data),
not only for the refusal.
"""

from __future__ import annotations

import dataclasses
import json
import os
import uuid
from pathlib import Path

import httpx
import pytest
from gradio_client import Client
from gradio_client.exceptions import AppError

from browser_helpers import GatedTrain, free_port
from client_helpers import api_args, fn_index, poll_until, raw_call, raw_inputs, wait_until
from ruozhi_ui.jobs import JobRunner
from ruozhi_ui.policy import PUBLIC_LIMITS, Policy
from ruozhi_ui.ui import compare_tab, data_tab, train_tab
from ruozhi_ui.ui.shell import LAUNCH_KWARGS, build_app

REFUSED_MODEL = "This public app trains and serves only these models"
REFUSED_DATA = "In this public app a dataset is 'sample', a file you upload, or a Hub dataset"
GOOD = [{"instruction": f"问题{i}", "output": f"回答{i}"} for i in range(6)]


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_dir):
    root = tmp_path_factory.mktemp("public-runs")
    gate = GatedTrain(hold_at=1)
    policy = Policy(mode="public", runs_root=root, limits=PUBLIC_LIMITS)
    runner = JobRunner(root, train_fn=gate)
    demo = build_app(runner=runner, policy=policy)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **LAUNCH_KWARGS)
    url = f"http://127.0.0.1:{port}/"
    yield dataclasses.make_dataclass("App", ["demo", "runner", "gate", "url", "root", "policy"])(
        demo, runner, gate, url, root, policy)
    gate.release.set()
    runner.stop()
    runner.wait(60)
    demo.close()


def client(app) -> Client:
    return Client(app.url, analytics_enabled=False, verbose=False)


def upload(app, name: str, content: bytes) -> str:
    """POST /gradio_api/upload as an attacker does: the answer is the server path of the file."""
    answer = httpx.post(app.url + "gradio_api/upload", files={"files": (name, content)})
    assert answer.status_code == 200, answer.text
    return answer.json()[0]


def hidden(app, handler, data: list, session: str) -> dict:
    """Call a hidden (private) event over raw HTTP, as the page does."""
    return raw_call(app.url, fn_index(app.demo, handler), data, session)


def say(app, c: Client, text: str = "hi") -> None:
    """Send in Compare for client `c`'s session (the hidden step before /compare_respond): the server keeps the
    turn; /compare_respond takes no history."""
    sent = hidden(app, compare_tab.append_user, [text, "en"], c.session_hash)
    assert sent["success"] and sent["data"][3] == "", sent


def refused(call) -> str:
    with pytest.raises(AppError) as e:
        call()
    return str(e.value)


# ---------------------------------------------------------------- 1. code execution

def test_uploaded_model_code_never_runs_whatever_endpoint_names_its_folder(app, tmp_path):
    marker = tmp_path / f"pwned-{uuid.uuid4().hex}"
    code = f"import pathlib\npathlib.Path({str(marker)!r}).write_text('ran')\n".encode()
    py_path = upload(app, "modeling_evil.py", code)
    config = {"model_type": "evil", "auto_map": {"AutoConfig": "modeling_evil.EvilConfig",
                                                 "AutoModelForCausalLM": "modeling_evil.EvilModel"}}
    folder = str(Path(upload(app, "config.json", json.dumps(config).encode())).parent)
    c = client(app)
    attempts = [
        lambda: c.predict(*api_args(c, "/estimate", top={"app.model": folder}), api_name="/estimate"),
        lambda: c.predict("sample", folder, 10, "en", None, api_name="/load_data"),
        lambda: c.predict(*api_args(c, "/start_training", top={"app.model": folder}), api_name="/start_training"),
        lambda: say(app, c) or c.predict(folder, "x/checkpoints/final", "s", 8, False, 0.7, 0.9, 50, 1.0, "en", None,
                                         api_name="/compare_respond"),
    ]
    for attempt in attempts:
        assert REFUSED_MODEL in refused(attempt)
    fetch = hidden(app, train_tab.on_fetch_model, [folder, "en"], "attacker")  # the hidden step before Start
    assert not fetch["success"] and REFUSED_MODEL in fetch["error"]
    assert not marker.exists() and Path(py_path).exists()  # the file was there to run, and never ran


def test_trust_remote_code_is_not_a_visitor_input(app):
    c = client(app)
    labels = [p["label"] for p in c.view_api(return_format="dict")["named_endpoints"]["/load_data"]["parameters"]]
    assert {"key": "app.trust_remote_code", "_type": "translation_metadata"} not in labels
    assert not any(b.elem_id == "app-trust" for b in app.demo.blocks.values())
    assert app.policy.trust_remote_code("Qwen/Qwen2.5-0.5B-Instruct", asked=True) is False


# ---------------------------------------------------------------- 2. reading server files

@pytest.fixture
def secret(tmp_path):
    """A server file an attacker wants: a valid dataset holding a marker string."""
    marker = f"SECRET-{uuid.uuid4().hex}"
    folder = tmp_path / "server-data"
    folder.mkdir()
    path = folder / "secret.json"
    path.write_text(json.dumps([{"instruction": marker, "output": marker}]), encoding="utf-8")
    (folder / "notes.csv").write_text(f"instruction,output\n{marker},{marker}\n", encoding="utf-8")
    return path, marker


def test_server_files_are_never_read_as_data_and_errors_do_not_tell_if_they_exist(app, secret):
    path, marker = secret
    before = sorted(p.name for p in path.parent.iterdir())
    rel = os.path.relpath(path, Path.cwd())
    sources = [str(path), rel, f"../{path.name}", f"csv@{path.parent / 'notes.csv'}", f"json@{path.parent}/**/*.js?n",
               f"json@{app.url}gradio_api/info", f"upload:../{path.name}", f"upload:{path}",
               f"hfl/ruozhiba_gpt4@../{path.name}", "file:///etc/passwd", str(path.parent / "missing.json")]
    c = client(app)
    messages = set()
    for source in sources:
        message = refused(lambda: c.predict(source, "demo", 10, "en", None, api_name="/load_data"))
        assert marker not in message and str(path.parent) not in message
        messages.add(message.replace(source, "<source>"))
    assert len(messages) == 1  # the same words for an existing file, a missing one, a glob, a URL
    assert sorted(p.name for p in path.parent.iterdir()) == before  # no Arrow cache, no lock file written


def test_a_server_folder_is_never_a_model_or_a_checkpoint(app, secret, tmp_path):
    path, _ = secret
    c = client(app)
    for checkpoint in (str(path.parent), "../x/checkpoints/final", str(app.root / "x" / "checkpoints" / "final"),
                       ".uploads/checkpoints/x"):
        say(app, c)
        message = refused(lambda: c.predict("demo", checkpoint, "s", 8, False, 0.7, 0.9, 50, 1.0, "en",
                                            None, api_name="/compare_respond"))
        assert "is not one of your checkpoints" in message and str(app.root) not in message
    assert REFUSED_MODEL in refused(lambda: c.predict(*api_args(c, "/estimate", top={"app.model": str(path.parent)}),
                                                      api_name="/estimate"))
    picked = hidden(app, compare_tab.on_checkpoint_change, [str(path.parent), "mine", "en", None], "attacker")
    assert picked["success"] and picked["data"][0] == "mine"  # no system prompt read from a server folder


# ---------------------------------------------------------------- 3. other visitors' data

def test_a_visitor_sees_stops_and_reaches_only_their_own_runs(app):
    alice, bob = client(app), client(app)
    alice_upload = upload(app, "alice-private.json", json.dumps(GOOD, ensure_ascii=False).encode())
    source = hidden(app, data_tab.on_upload, [{"path": alice_upload, "meta": {"_type": "gradio.FileData"}}, None],
                    alice.session_hash)
    assert source["success"] and source["data"][0] == "upload:alice-private.json"
    assert not Path(alice_upload).exists()  # moved out of Gradio's served temp folder
    started = alice.predict(*api_args(alice, "/start_training", top={"app.data_source": "upload:alice-private.json"},
                                      run_name="alice-run", epochs=1), api_name="/start_training")
    assert started == "Started `alice-run`."
    wait_until(app.gate.held.is_set, what="alice's run parked mid-run")

    # Bob, a second visitor, while Alice's run is provably running:
    assert bob.predict(None, api_name="/poll_status")["status"] == "idle"
    assert bob.predict("en", None, api_name="/stop_training") == "No training is running."
    busy = refused(lambda: bob.predict(*api_args(bob, "/start_training", run_name="bob"), api_name="/start_training"))
    assert "Another visitor is training on this machine right now" in busy and "min left" in busy
    page = hidden(app, train_tab.on_page_load_form, [None], bob.session_hash)
    restored = hidden(app, train_tab.on_refresh, ["en", None], bob.session_hash)
    listed = hidden(app, compare_tab.refresh_checkpoints, [None, None], bob.session_hash)
    assert restored["success"] and 'data-status="idle"' in restored["data"][2]
    everything_bob_saw = json.dumps([busy, page, restored, listed], ensure_ascii=False)
    for secret_bit in ("alice-run", "alice-private", str(app.root)):
        assert secret_bit not in everything_bob_saw
    say(app, bob)
    stolen = refused(lambda: bob.predict("demo", "alice-run/checkpoints/final", "s", 8, False, 0.7, 0.9,
                                         50, 1.0, "en", None, api_name="/compare_respond"))
    assert "is not one of your checkpoints" in stolen
    bob_source = refused(lambda: bob.predict("upload:alice-private.json", "demo", 10, "en", None, api_name="/load_data"))
    assert "No uploaded file 'alice-private.json' in this session" in bob_source

    # Alice's run went on, and Alice sees it with paths relative to her own folder:
    assert app.runner.snapshot().status == "running"
    app.gate.release.set()
    status = poll_until(alice, lambda s: not s["active"], timeout=120)
    assert status["status"] in ("finished", "stopped") and status["run_dir"] == "alice-run"
    assert status["checkpoints"][-1] == "alice-run/checkpoints/final"
    assert str(app.root) not in json.dumps(status)
    assert bob.predict(None, api_name="/poll_status")["status"] == "idle"


# ---------------------------------------------------------------- 4. limits, through the API

@pytest.mark.parametrize("field,value", [("epochs", PUBLIC_LIMITS.epochs + 1), ("batch_size", PUBLIC_LIMITS.batch_size + 1),
                                         ("max_target_length", PUBLIC_LIMITS.max_target_length + 1),
                                         ("lora_rank", PUBLIC_LIMITS.lora_rank + 1), ("seed", 2**70)])
def test_a_limit_plus_one_is_refused_at_start(app, field, value):
    c = client(app)
    message = refused(lambda: c.predict(*api_args(c, "/start_training", **{field: value}), api_name="/start_training"))
    assert f"{field} must be at most" in message


def test_too_many_ab_prompts_and_tokens_are_refused(app):
    c = client(app)
    many = "\n".join(f"q{i}" for i in range(PUBLIC_LIMITS.ab_prompts + 1))
    message = refused(lambda: c.predict("demo", "r/checkpoints/final", "s", "pasted", PUBLIC_LIMITS.ab_prompts + 1, many,
                                        8, 1.0, "en", None, api_name="/compare_ab"))
    assert "Value 201 is greater than maximum value 200" in message  # the Number's own bound, then the policy's
    raw = hidden(app, compare_tab.run_ab, ["demo", "r/checkpoints/final", None, "s", "pasted", 10**6, many, 8, 1.0,
                                           "en", None], "raw")
    assert not raw["success"]
    say(app, c)
    tokens = refused(lambda: c.predict("demo", "r/checkpoints/final", "s", PUBLIC_LIMITS.max_new_tokens + 1,
                                       False, 0.7, 0.9, 50, 1.0, "en", None, api_name="/compare_respond"))
    assert "Value 513 is greater than maximum value 512" in tokens  # the slider's bound; the policy's is tested below
    respond = fn_index(app.demo, compare_tab.respond)
    raw_call(app.url, fn_index(app.demo, compare_tab.append_user), ["hi", "en"], "raw")
    direct = raw_call(app.url, respond, ["demo", "r/checkpoints/final", None, "s",
                                         PUBLIC_LIMITS.max_new_tokens + 1, False, 0.7, 0.9, 50, 1.0, "en", None], "raw")
    assert not direct["success"]


# ---------------------------------------------------------------- 5. breaking the page for everyone

def test_a_lone_surrogate_is_refused_and_nobody_elses_stream_breaks(app):
    alice, mallory = client(app), client(app)
    for source in ("\ud800", "sam\udfffple"):  # refused by the guard before any handler (every event: test_guard_http)
        message = hidden(app, data_tab.on_load, [source, "demo", None, 10, "en", None, "", "", "", ""], "mallory")
        assert not message["success"] and "invalid character U+D" in message["error"] and "lone surrogate" in message["error"]
    start = fn_index(app.demo, train_tab.on_start)
    named = raw_call(app.url, start, raw_inputs(app.demo, start, run_name="x\ud800", model="demo",
                                                data_source="sample"), "mallory")
    assert not named["success"] and "invalid character U+D800 in the request (a lone surrogate" in named["error"]
    bad_file = upload(app, "surrogate.json", b'[{"instruction": "a\\ud800", "output": "b"}]')
    loaded = hidden(app, data_tab.on_upload, [{"path": bad_file, "meta": {"_type": "gradio.FileData"}}, None], "m")
    assert loaded["success"]
    refused_file = hidden(app, data_tab.on_load, ["upload:surrogate.json", "demo", None, 10, "en", None,
                                                  "", "", "", ""], "m")
    assert not refused_file["success"]
    assert ("surrogate.json: record 0: field 'instruction' contains an invalid character (lone surrogate U+D800)"
            in refused_file["error"])
    assert alice.predict(None, api_name="/poll_status")["status"] in ("idle", "finished", "stopped")
    for snap in (app.runner.snapshot(),):
        json.dumps(snap.config, ensure_ascii=False).encode("utf-8")  # serialisable: nothing bad stored


def test_markdown_and_html_in_a_source_come_back_as_text(app):
    c = client(app)
    message = refused(lambda: c.predict("![x](http://example.invalid/x.png)<img src=http://example.invalid/y>",
                                        "demo", 10, "en", None, api_name="/load_data"))
    assert "<img" not in message and "![x]" not in message


# ---------------------------------------------------------------- 6. fair use of one machine (round 2)

def test_the_queue_and_the_sessions_kept_are_bounded_for_everyone(app):
    httpx.get(app.url)  # the guard hands Gradio the session bound with the first request
    assert app.demo._queue.max_size == PUBLIC_LIMITS.queue_size
    assert app.demo.server_app.state_holder.capacity == PUBLIC_LIMITS.sessions


def test_chat_answers_and_ab_tables_share_one_global_concurrency_limit(app):
    generating = [(f.name, f.concurrency_limit) for f in app.demo.fns.values()
                  if f.concurrency_id == "compare-generation"]
    assert sorted(generating) == [(name, PUBLIC_LIMITS.generation_concurrency)
                                  for name in ("respond", "respond", "run_ab")]  # Enter, Send, the A/B table


def test_the_runner_bounds_a_runs_time_and_a_visitors_restarts(app):
    assert (app.runner.max_seconds, app.runner.cooldown_s) == (PUBLIC_LIMITS.train_seconds,
                                                              PUBLIC_LIMITS.train_cooldown_s)
