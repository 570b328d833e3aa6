"""The running app through gradio_client: load data, stats, start a tiny real run, poll, stop.

One server per module on 127.0.0.1 and a free port, with the demo model, the
bundled sample and the real engine capped by max_steps.
"""

import time

import pytest
from gradio_client import Client

from browser_helpers import free_port
from client_helpers import api_args
from ruozhi_ui.jobs import JobRunner
from ruozhi_ui.ui import train_tab
from ruozhi_ui.ui.shell import LAUNCH_KWARGS, build_app


@pytest.fixture(scope="module")
def app(tmp_path_factory, demo_dir):
    runner = JobRunner(tmp_path_factory.mktemp("client-runs"))  # the real engine
    demo = build_app(runner=runner)
    port = free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True, **LAUNCH_KWARGS)
    client = Client(f"http://127.0.0.1:{port}/", analytics_enabled=False, verbose=False)
    yield client, runner
    runner.stop()
    runner.wait(30)
    demo.close()


def _wait_status(client, done, timeout=60.0):
    deadline = time.time() + timeout
    while time.time() < deadline:
        status = client.predict(api_name="/poll_status")
        if done(status):
            return status
        time.sleep(0.2)
    raise AssertionError(f"status did not settle: {status}")


def test_load_data_then_stats_through_the_api(app):
    client, _ = app
    summary, table, page, page_info, search = client.predict("sample", "demo", False, 10, "en", api_name="/load_data")
    assert "training" in summary and len(table["data"]) == 10 and page == 1
    stats_table, _, truncation, src, tgt = client.predict("all", "你是一个有帮助的助手", 62, 151, "en",
                                                          api_name="/data_stats")
    assert [row[0] for row in stats_table["data"]] == ["Instruction", "Output", "Templated prompt", "Total"]
    assert src > 0 and tgt > 0 and "max_target_length 151" in truncation


def test_poll_status_is_idle_before_a_run(app):
    client, runner = app
    if runner.snapshot().status == "idle":
        assert client.predict(api_name="/poll_status")["status"] == "idle"


def test_start_runs_a_real_tiny_job_to_a_checkpoint(app):
    client, _ = app
    msg = client.predict(*api_args(client, "/start_training", epochs=1, max_steps=2, lr=1e-3, run_name="client"),
                         api_name="/start_training")
    assert msg == "Started `client`."
    status = _wait_status(client, lambda s: not s["active"])
    assert status["status"] == "finished" and status["step"] == 2
    assert len(status["losses"]) == 2 and status["checkpoints"][-1].endswith("final")


def test_stop_with_nothing_running_says_so(app):
    client, _ = app
    _wait_status(client, lambda s: not s["active"])
    assert client.predict("en", api_name="/stop_training") == "No training is running."


def test_stop_through_the_api_stops_a_running_job(app):
    client, _ = app
    _wait_status(client, lambda s: not s["active"])
    client.predict(*api_args(client, "/start_training", epochs=50, lr=1e-3, run_name="client-stop"),
                   api_name="/start_training")
    _wait_status(client, lambda s: s["step"] >= 1)
    assert client.predict("en", api_name="/stop_training").startswith("Stop requested")
    status = _wait_status(client, lambda s: not s["active"])
    assert status["status"] == "stopped" and status["checkpoints"][-1].endswith("final")
