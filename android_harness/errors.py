"""The harness's error: :class:`DeployError`, a ``FedmoeError`` (so ``fedmoe-android`` prints it as one line).

Raised before anything is written on the target when a probe fails (unreachable target, refused key, no
Python, too little disk or memory, a coordinator the device cannot reach), and after a failed install once the
half-installed files are removed. The message always names the next step.
"""

from __future__ import annotations

from device_runtime.errors import FedmoeError


class DeployError(FedmoeError):
    """A target cannot be reached, probed, installed to or controlled."""
