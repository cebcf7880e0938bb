"""medhe: privacy-preserving medical image diagnosis with CKKS homomorphic encryption."""

from medhe.errors import (
    BackendError,
    ConfigError,
    ConflictError,
    DataError,
    ImageLoadError,
    InsecureParametersError,
    InvalidMessage,
    MedHEError,
    MissingKeyError,
    ModelFormatError,
    PlanError,
    RemoteError,
    UnsupportedLayerError,
)

__version__ = "0.1.0"

# The public API, imported on first use so `import medhe` stays light (no torch, no SEAL).
_LAZY = {
    "Client": "medhe.protocol.client",
    "Server": "medhe.protocol.server",
    "ModelOwner": "medhe.protocol.owner",
    "RemoteClient": "medhe.protocol.remote",
    "compile_model": "medhe.compiler",
    "Plan": "medhe.plan",
    "ClientSpec": "medhe.plan",
    "CKKSParams": "medhe.params",
    "load_model": "medhe.nn.io",
    "resolve_model_dir": "medhe.nn.modeldir",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'medhe' has no attribute {name!r}")

__all__ = [
    "CKKSParams",
    "Client",
    "ClientSpec",
    "ModelOwner",
    "Plan",
    "RemoteClient",
    "Server",
    "compile_model",
    "load_model",
    "resolve_model_dir",
    "BackendError",
    "ConfigError",
    "ConflictError",
    "DataError",
    "ImageLoadError",
    "InsecureParametersError",
    "InvalidMessage",
    "MedHEError",
    "MissingKeyError",
    "ModelFormatError",
    "PlanError",
    "RemoteError",
    "UnsupportedLayerError",
]
