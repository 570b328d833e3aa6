"""The `@spaces.GPU` functions. Imported by the app before it launches: ZeroGPU registers them at launch.

Off a ZeroGPU Space `spaces.GPU` returns each function unchanged, so importing this is harmless
everywhere. On a Space, each call runs in a forked GPU process for the duration it asks (a callable
of the call's own arguments), its argument and result pickled.
"""

from __future__ import annotations

import spaces

from .lease import lease_duration, run_lease

gpu_lease = spaces.GPU(duration=lease_duration)(run_lease)  # one training lease: LeaseSpec -> LeaseResult
