"""Entry point of ruozhi-sft studio (also the Hugging Face Space's app_file).

    python app.py                   # http://127.0.0.1:7860
    python app.py --host 0.0.0.0    # or RUOZHI_HOST=0.0.0.0; a Space binds 0.0.0.0 itself
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

    from ruozhi_ui.ui.shell import LAUNCH_KWARGS, build_app

    demo = build_app()
    demo.launch(server_name=pick_host(args.host), server_port=args.port, **LAUNCH_KWARGS)


if __name__ == "__main__":
    main()
