"""The fedmoe exception tree, for every package (device runtime, coordinator, export).

::

    FedmoeError                      base of everything fedmoe raises on purpose
    +-- ConfigError                  a bad flag, config file value or device profile
    +-- BundleError                  a bundle is missing, malformed or fails verification
    |   +-- BundleIntegrityError     a file's sha256 differs from the manifest (corrupted / tampered)
    |       +-- BundleSignatureError the manifest is unsigned or its signature does not verify
    +-- ModelError                   a checkpoint cannot be loaded or is not a supported MoE family
    |   +-- UnsupportedArchitectureError
    +-- BudgetError                  no expert subset fits the device's budget
    +-- ExportError                  ONNX export or ORT artifact generation failed
    +-- DataError                    a local data file is malformed or empty
    +-- ProtocolError                a wire message is malformed, oversized or out of order (has ``.code``)
    +-- AuthError                    enrollment or challenge-response authentication failed
    +-- UpdateRejected               a client update failed validation at the coordinator (has ``.reason``)

Messages say what to do next where there is something to do.
"""


class FedmoeError(Exception):
    """Base class of every error fedmoe raises on purpose."""


class ConfigError(FedmoeError):
    """A flag, config value or device profile is invalid."""


class BundleError(FedmoeError):
    """A bundle is missing, malformed, or of an unsupported format version."""


class BundleIntegrityError(BundleError):
    """A bundle file's sha256 does not match its manifest: corrupted in transit or tampered with."""


class BundleSignatureError(BundleIntegrityError):
    """A bundle's manifest is unsigned, or its signature does not verify against the coordinator key the
    device pinned at enrollment (``device_runtime.signing``)."""


class ModelError(FedmoeError):
    """A model checkpoint cannot be loaded."""


class UnsupportedArchitectureError(ModelError):
    """The checkpoint's architecture is not one of the supported MoE families."""


class BudgetError(FedmoeError):
    """No expert subset fits the device's memory / compute budget."""


class ExportError(FedmoeError):
    """ONNX export or ORT training-artifact generation failed."""


class DataError(FedmoeError):
    """A local data file is malformed or holds no usable example."""


class ProtocolError(FedmoeError):
    """A wire message is malformed, oversized or unexpected.

    Attributes:
        code: a stable machine-readable error code sent back to the peer (e.g. ``"bad_frame"``).
    """

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code


class AuthError(FedmoeError):
    """Enrollment or challenge-response authentication failed."""


class UpdateRejected(FedmoeError):
    """A client update failed validation (names, shapes, dtypes, finiteness, norm bound)."""

    def __init__(self, reason: str):
        super().__init__(reason)
        self.reason = reason
