"""Training on a ZeroGPU Space: the GPU work runs in `@spaces.GPU` leases, a long run in several.

`on_zerogpu()` asks the `spaces` package itself (it reads SPACES_ZERO_GPU); off a Space its
`spaces.GPU` returns the function unchanged and nothing here is used. The pieces, one job each:
plan.py (pure: how many leases of how many seconds, and what the visitor is told), lease.py (the
body that runs inside a lease: the same `train()` up to a step, events out as JSON lines),
supervisor.py (the app side: asks for leases one after another, forwards events, Stop), gpu.py (the
`@spaces.GPU`-decorated functions), standin.py (a stand-in runner doing what ZeroGPU does, for
tests and the GPU benchmark). The app process never initialises CUDA in this mode.
"""

from __future__ import annotations

import os

DEFAULT_MAX_LEASE_S = 120  # ZeroGPU's default lease is 60 s; signed-in visitors may ask for more (a Space sets this)
MAX_LEASE_ENV = "RUOZHI_ZEROGPU_MAX_LEASE_S"


def on_zerogpu() -> bool:
    """True on a ZeroGPU Space, as the `spaces` package decides it (absent package: False)."""
    try:
        from spaces.config import Config
    except ImportError:
        return False
    return bool(Config.zero_gpu)


def max_lease_s() -> int:
    """The longest lease this Space asks for (its owner may set RUOZHI_ZEROGPU_MAX_LEASE_S)."""
    return int(os.environ.get(MAX_LEASE_ENV, DEFAULT_MAX_LEASE_S))


def visitor_line(cfg, est, n_train: int, lang: str) -> str:
    """On a ZeroGPU Space, the paragraph the Train tab adds to its estimate (the quota it spends, in how many
    leases); "" elsewhere."""
    if not on_zerogpu():
        return ""
    from .plan import visitor_plan

    line = visitor_plan(cfg, est, n_train, max_lease_s(), lang)
    return "\n\n" + line if line else ""
