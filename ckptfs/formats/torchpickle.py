"""Element widths of the storages a torch.save pickle (``data.pkl``) refers to, without torch and
without running the pickle.

torch.save pickles each tensor as ``_rebuild_tensor_v2(<persistent id>, ...)`` where the persistent
id is ``('storage', torch.<Dtype>Storage, '<key>', '<location>', numel)`` and ``data/<key>`` is the
record holding the bytes. The unpickler below resolves every global to an inert stand-in — nothing
named in the file is imported or called — and only notes which storage type each key has. Pure;
callable from any thread.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

# bytes per element of torch's storage types; complex numbers are pairs of floats, grouped as floats
_WIDTHS = {
    "DoubleStorage": 8,
    "FloatStorage": 4,
    "HalfStorage": 2,
    "BFloat16Storage": 2,
    "LongStorage": 8,
    "IntStorage": 4,
    "ShortStorage": 2,
    "CharStorage": 1,
    "ByteStorage": 1,
    "BoolStorage": 1,
    "ComplexFloatStorage": 4,
    "ComplexDoubleStorage": 8,
}
MAX_PICKLE = 64 * 1024 * 1024  # larger pickles are not parsed (widths are then found by sampling)


class _Inert:
    """Stands in for every class and function the pickle names: accepts any construction and state."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        pass

    def __call__(self, *args: Any, **kwargs: Any) -> _Inert:
        return _Inert()

    def __setstate__(self, state: Any) -> None:
        pass

    def __setitem__(self, key: Any, value: Any) -> None:
        pass

    def append(self, value: Any) -> None:
        pass

    def extend(self, values: Any) -> None:
        pass


class _StorageType(_Inert):
    def __init__(self, name: str) -> None:
        self.width = _WIDTHS.get(name, 0)


class _Unpickler(pickle.Unpickler):
    def __init__(self, data: bytes) -> None:
        super().__init__(io.BytesIO(data))
        self.widths: dict[str, int] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name.endswith("Storage"):
            return _StorageType(name)
        return _Inert

    def persistent_load(self, pid: Any) -> Any:
        if isinstance(pid, tuple) and len(pid) >= 3 and pid[0] == "storage" and isinstance(pid[1], _StorageType):
            if pid[1].width:
                self.widths[str(pid[2])] = pid[1].width
        return _Inert()


def storage_widths(data: bytes) -> dict[str, int]:
    """Map storage key -> element width for a torch.save ``data.pkl``; ``{}`` when it cannot be read."""
    if len(data) > MAX_PICKLE:
        return {}
    unpickler = _Unpickler(data)
    try:
        unpickler.load()
    except Exception:  # noqa: BLE001 - any malformed or unexpected pickle only costs the width hints
        return {}
    return unpickler.widths
