"""Shared fixtures: offline env, a session-wide demo model cache, the demo tokenizer and model.

Everything runs on the CPU with no network; the demo model is built once per
test session into a temporary cache and reused.
"""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("NO_PROXY", "127.0.0.1,localhost")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch


@pytest.fixture(scope="session", autouse=True)
def ruozhi_cache(tmp_path_factory):
    """Demo model cache and runs root for the whole session, never the user's home."""
    cache = tmp_path_factory.mktemp("ruozhi-cache")
    os.environ["RUOZHI_CACHE"] = str(cache)
    os.environ["RUOZHI_RUNS"] = str(tmp_path_factory.mktemp("ruozhi-runs"))
    torch.set_num_threads(2)
    return cache


@pytest.fixture(scope="session")
def demo_dir(ruozhi_cache):
    from ruozhi_ui.models import demo_model_dir

    return demo_model_dir()


@pytest.fixture(scope="session")
def tokenizer(demo_dir):
    from ruozhi_ui.models import load_tokenizer

    return load_tokenizer("demo")


@pytest.fixture
def demo_model(demo_dir):
    """A fresh copy per test: tests may train it."""
    from ruozhi_ui.models import load_model

    torch.manual_seed(0)
    return load_model("demo", device=torch.device("cpu"), dtype=torch.float32)
