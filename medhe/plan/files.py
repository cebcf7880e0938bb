"""Writing plan directories: arrays first, then the JSON that names them, each through a
temporary file renamed into place, so a reader never sees a half-written plan."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np


def write_plan_files(directory: Path, json_name: str, doc: dict, arrays_name: str | None = None,
                     arrays: dict | None = None) -> None:
    if arrays_name is not None:
        tmp = directory / (arrays_name + ".part.npz")
        np.savez_compressed(tmp, **arrays)
        os.replace(tmp, directory / arrays_name)
    tmp = directory / (json_name + ".part")
    tmp.write_text(json.dumps(doc, indent=1))
    os.replace(tmp, directory / json_name)
