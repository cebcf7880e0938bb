"""Typed exceptions. Every error medhe raises derives from MedHEError."""


class MedHEError(Exception):
    """Base class of all medhe errors."""


class ConfigError(MedHEError):
    """A setting or argument is invalid."""


class ModelChangedError(ConfigError):
    """A server's model is not the version pinned at first use (its client spec digest changed)."""


class DataError(MedHEError):
    """A data set or split could not be loaded or is inconsistent."""


class ImageLoadError(DataError):
    """A single image file could not be read or is not usable (names the file)."""


class ModelFormatError(MedHEError):
    """A saved model directory is missing files or is inconsistent."""


class InsecureParametersError(MedHEError):
    """CKKS parameters below 128-bit security were requested without the explicit opt-in."""


class UnsupportedLayerError(MedHEError):
    """The model contains a layer the compiler cannot lower."""


class PlanError(MedHEError):
    """A compiled plan is invalid, does not fit the parameters, or does not match."""


class MissingKeyError(MedHEError):
    """An evaluation key (relinearization, Galois) or a registered key id is missing."""


class BackendError(MedHEError):
    """The FHE library failed; the original exception is chained."""


class InvalidMessage(MedHEError):
    """A serialized message is malformed, of the wrong version, or for another plan or key."""


class ConflictError(MedHEError):
    """A request would replace something another party registered (e.g. a clinic's encrypted model)."""


class RemoteError(MedHEError):
    """The diagnosis server refused a request or could not be reached (status 0)."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code = status, code
