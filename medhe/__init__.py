"""medhe: privacy-preserving medical image diagnosis with CKKS homomorphic encryption."""

from medhe.errors import (
    BackendError,
    ConfigError,
    DataError,
    ImageLoadError,
    InsecureParametersError,
    InvalidMessage,
    MedHEError,
    MissingKeyError,
    ModelFormatError,
    PlanError,
    UnsupportedLayerError,
)

__version__ = "0.1.0"

__all__ = [
    "BackendError",
    "ConfigError",
    "DataError",
    "ImageLoadError",
    "InsecureParametersError",
    "InvalidMessage",
    "MedHEError",
    "MissingKeyError",
    "ModelFormatError",
    "PlanError",
    "UnsupportedLayerError",
]
