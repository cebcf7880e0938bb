"""Image loading, preprocessing and data sets (Br35H built in, MedMNIST npz files).

No torch here: the diagnosis client imports this package and must stay light.
"""

from __future__ import annotations

from typing import Any

from medhe.data.images import image_to_gray01, load_image
from medhe.data.medmnist import default_pneumoniamnist_path, load_medmnist_npz
from medhe.data.preprocess import Preprocessing, fit_preprocessing

# br35h is imported lazily: importing it here would make `python -m medhe.data.br35h`
# find the module already loaded and warn.
_BR35H_NAMES = (
    "br35h_root",
    "br35h_test_files",
    "compute_groups",
    "list_br35h_files",
    "load_br35h",
    "load_split",
    "random_split_indices",
    "verify_split",
)

__all__ = [
    "Preprocessing",
    "default_pneumoniamnist_path",
    "fit_preprocessing",
    "image_to_gray01",
    "load_image",
    "load_medmnist_npz",
    *_BR35H_NAMES,
]


def __getattr__(name: str) -> Any:
    if name in _BR35H_NAMES:
        from medhe.data import br35h

        return getattr(br35h, name)
    raise AttributeError(f"module 'medhe.data' has no attribute {name!r}")
