"""Do the pinned requirements resolve on the platforms users install on? Run by the install step of CI.

`uv pip compile --python-platform ...` resolves `requirements.txt` for another platform as binary
wheels only, evaluating the environment markers for that platform (pip's own `--platform` option
evaluates markers for the machine it runs on, so pip cannot tell whether liger-kernel's marker keeps
Triton off Windows). Nothing is installed. It needs the package registry, so it belongs to the install
step of the README's test command, never to the tests:

    python tools/check_platforms.py          # every target; exit 1 naming each one that fails
    python tools/check_platforms.py windows  # one target
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PYTHON_VERSION = "3.11"  # the Python of the quick start and of the Space
ZEROGPU_PYTHON = "3.10"  # the one Python a ZeroGPU Space runs (docs/zerogpu.md)
# name -> (uv's platform, extra environment, Python): torch's macOS wheels are for macOS 14 and later.
TARGETS = {
    "macos-arm64": ("aarch64-apple-darwin", {"MACOSX_DEPLOYMENT_TARGET": "14.0"}, PYTHON_VERSION),
    "windows": ("x86_64-pc-windows-msvc", {}, PYTHON_VERSION),
    "linux-x86_64": ("x86_64-manylinux_2_28", {}, PYTHON_VERSION),
    "linux-aarch64": ("aarch64-manylinux_2_28", {}, PYTHON_VERSION),
    "linux-zerogpu": ("x86_64-manylinux_2_28", {}, ZEROGPU_PYTHON),
}
TRITON_ONLY = ("triton", "liger-kernel")  # Triton has no macOS or Windows wheels


def resolve_command(platform: str, python: str = PYTHON_VERSION, requirements: Path = ROOT / "requirements.txt") -> list[str]:
    """The uv command that prints the pinned set `requirements` resolve to on `platform`."""
    return [sys.executable, "-m", "uv", "pip", "compile", "--quiet", "--no-header", "--no-annotate",
            "--only-binary", ":all:", "--python-platform", platform, "--python-version", python,
            str(requirements)]


def check(name: str) -> str | None:
    """None when requirements.txt resolves for target `name`, else why not."""
    platform, env, python = TARGETS[name]
    done = subprocess.run(resolve_command(platform, python), capture_output=True, text=True, env={**os.environ, **env})
    if done.returncode:
        return done.stderr.strip()[-2000:]
    pinned = {line.split("==")[0].strip().lower() for line in done.stdout.splitlines() if "==" in line}
    if not name.startswith("linux") and pinned & set(TRITON_ONLY):
        return f"pulls {', '.join(sorted(pinned & set(TRITON_ONLY)))}, which has no wheel there"
    print(f"{name} ({platform}, Python {python}): requirements.txt resolves to {len(pinned)} packages")
    return None


def main(argv: list[str]) -> int:
    failures = {name: why for name in (argv or TARGETS) if (why := check(name))}
    for name, why in failures.items():
        print(f"{name}: requirements.txt does NOT resolve: {why}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
