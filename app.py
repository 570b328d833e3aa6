"""Entry point of ruozhi-sft studio (also the Hugging Face Space's app_file).

    python app.py                   # http://127.0.0.1:7860, local mode (one trusted user)
    python app.py --host 0.0.0.0    # or RUOZHI_HOST=0.0.0.0; public mode, as on a Space (RUOZHI_MODE overrides)
Builds the UI with `ruozhi_ui.ui.shell.build_app()` and launches it with the shared
LAUNCH_KWARGS. torch/transformers load lazily, on the first handler that needs them.
"""

from __future__ import annotations

import argparse
import os

# Quiet before anything imports transformers/tokenizers (they read these at import).
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("TRANSFORMERS_NO_ADVISORY_WARNINGS", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
os.environ.setdefault("HF_HUB_DISABLE_TELEMETRY", "1")


def on_spaces() -> bool:
    return os.environ.get("SYSTEM") == "spaces" or bool(os.environ.get("SPACE_ID"))


def pick_host(cli_host: str | None) -> str:
    """127.0.0.1 unless asked (--host, RUOZHI_HOST) or running on a Space, which must listen on all interfaces."""
    if cli_host:
        return cli_host
    if os.environ.get("RUOZHI_HOST"):
        return os.environ["RUOZHI_HOST"]
    return "0.0.0.0" if on_spaces() else "127.0.0.1"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="ruozhi-sft studio")
    parser.add_argument("--host", default=None, help="interface to bind (default 127.0.0.1; 0.0.0.0 on Spaces)")
    parser.add_argument("--port", type=int, default=int(os.environ.get("GRADIO_SERVER_PORT", 7860)))
    args = parser.parse_args(argv)
    from ruozhi_ui import safelog

    safelog.install()  # before anything logs: data and visitors' text cannot forge or rewrite log lines

    from ruozhi_ui.checkpoints import runs_root
    from ruozhi_ui.policy import policy_from_env
    from ruozhi_ui.ui.shell import LAUNCH_KWARGS, build_app
    from ruozhi_ui.zerogpu import on_zerogpu

    if on_zerogpu():  # ZeroGPU registers the @spaces.GPU functions that exist when the app launches
        import ruozhi_ui.zerogpu.gpu  # noqa: F401

    host = pick_host(args.host)
    policy = policy_from_env(runs_root(), host)  # public on a Space or any non-loopback host; RUOZHI_MODE decides
    print(f"ruozhi-sft studio: {policy.mode} mode on {host}:{args.port}")
    demo = build_app(policy=policy)
    # Gradio refuses a bigger upload itself, before it fills the temp folder.
    demo.launch(server_name=host, server_port=args.port, **{**LAUNCH_KWARGS, "max_file_size": policy.limits.upload_mb * 2**20})


if __name__ == "__main__":
    main()
