"""A restricted unpickler for the one raw pickle a checkpoint holds: DCP's ``.metadata``.

Python's pickle can call any importable function while loading. This reader admits exactly the
(module, name) pairs listed in :data:`DCP_METADATA_GLOBALS` — compared as whole strings, never by
prefix, and never resolved attribute by attribute, so ``(torch.distributed.checkpoint.x, os.system)``
is refused like any other unknown pair — and checks what every opcode may do with them:

- ``GLOBAL`` / ``STACK_GLOBAL``: the pair must be listed; the object is taken from the list (nothing
  is imported while loading);
- ``REDUCE``: only the listed callables (``torch.Size``, the layout lookup, the memory-format enum,
  paths, ``OrderedDict``), with a tuple of arguments;
- ``NEWOBJ`` / ``NEWOBJ_EX`` / ``BUILD``: only instances of the listed record classes (DCP's
  dataclasses), never a class object, state given as a dict;
- ``APPEND(S)`` / ``SETITEM(S)`` / ``ADDITEMS``: only on real lists, dicts and sets;
- ``INST``, ``OBJ``, ``EXT1/2/4``, ``PERSID`` / ``BINPERSID``: refused (DCP never writes them).

Torch zip files (``rank_N.pt``, DCP tensors and bytes entries, DeepSpeed's files) are read only by
``torch.load(weights_only=True)``, torch's own unpickler with the same kind of exact allow-list.
"""

from __future__ import annotations

import collections
import importlib
import io
import pickle
from typing import Any

import torch

# Every global a DCP .metadata file pickles (read off checkpoints of DDP/FSDP2 models and their
# optimizers, torch 2.6-2.13), by role. Records: built with NEWOBJ + BUILD. Callables: REDUCE targets.
_RECORDS = {
    "torch.distributed.checkpoint.metadata": (
        "Metadata", "MetadataIndex", "StorageMeta", "TensorProperties", "TensorStorageMetadata",
        "BytesStorageMetadata", "ChunkStorageMetadata",
    ),
    "torch.distributed.checkpoint.filesystem": ("_StorageInfo",),
}
_CALLABLES = {
    "torch": ("Size",),
    "torch.serialization": ("_get_layout",),
    "torch.distributed.checkpoint.metadata": ("_MEM_FORMAT_ENCODING",),
    "pathlib": ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"),
    "pathlib._local": ("PosixPath", "PurePosixPath", "WindowsPath", "PureWindowsPath"),  # Python >= 3.13
    "collections": ("OrderedDict",),
}
_DTYPES = tuple(name for name, value in vars(torch).items() if isinstance(value, torch.dtype))


def _resolve(table: dict[str, tuple[str, ...]]) -> dict[tuple[str, str], Any]:
    """(module, name) -> object for the pairs that exist in this torch/Python (imported now, once)."""
    found = {}
    for module, names in table.items():
        try:
            mod = importlib.import_module(module)
        except ImportError:
            continue
        for name in names:
            if name in vars(mod):  # the module's own attribute, never a dotted path
                found[(module, name)] = vars(mod)[name]
    return found


RECORDS = _resolve(_RECORDS)
CALLABLES = _resolve(_CALLABLES)
DCP_METADATA_GLOBALS: dict[tuple[str, str], Any] = {
    **RECORDS, **CALLABLES, **{("torch", d): getattr(torch, d) for d in _DTYPES},
}
_RECORD_TYPES = tuple(set(RECORDS.values()))
_CALLABLE_IDS = {id(v) for v in CALLABLES.values()}


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle asks for something outside the allow-list (the message names it)."""


def _refuse(opcode: str):
    def load(self) -> None:
        raise UnsafePickleError(f"refusing opcode {opcode} (it can call arbitrary code; DCP never writes it)")

    return load


class RestrictedUnpickler(pickle._Unpickler):
    """Pure-Python unpickler with an exact allow-list (see the module docstring).

    Args:
        file: a binary stream (already read into memory by the caller: check and use are one read).
        allowed: (module, name) -> object; nothing else is admitted.
        records: the classes that may be instantiated (NEWOBJ) and filled (BUILD).
        callables: the objects REDUCE may call.
    """

    dispatch = dict(pickle._Unpickler.dispatch)

    def __init__(self, file: io.BufferedIOBase, allowed: dict[tuple[str, str], Any] | None = None,
                 records: tuple[type, ...] | None = None, callables: set[int] | None = None) -> None:
        super().__init__(file)
        self.allowed = DCP_METADATA_GLOBALS if allowed is None else allowed
        self.records = _RECORD_TYPES if records is None else records
        self.callables = _CALLABLE_IDS if callables is None else callables

    def find_class(self, module: str, name: str) -> Any:
        key = (module, name)
        if key not in self.allowed:
            raise UnsafePickleError(f"refusing to load global {module}.{name}" if "." not in name else
                                    f"refusing to load global ({module!r}, {name!r}) (a dotted name)")
        return self.allowed[key]

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafePickleError("refusing a persistent id (PERSID/BINPERSID)")

    def _record_class(self, cls: Any, opcode: str) -> type:
        if not (isinstance(cls, type) and cls in self.records):
            raise UnsafePickleError(f"refusing {opcode} of {cls!r}: not one of the checkpoint's record classes")
        return cls

    def load_reduce(self) -> None:
        args = self.stack.pop()
        func = self.stack[-1]
        if id(func) not in self.callables or type(args) is not tuple:
            raise UnsafePickleError(f"refusing REDUCE of {func!r}: not an allowed constructor")
        self.stack[-1] = func(*args)

    def load_newobj(self) -> None:
        args = self.stack.pop()
        cls = self._record_class(self.stack.pop(), "NEWOBJ")
        if type(args) is not tuple:
            raise UnsafePickleError("refusing NEWOBJ with non-tuple arguments")
        self.append(cls.__new__(cls, *args))

    def load_newobj_ex(self) -> None:
        kwargs = self.stack.pop()
        args = self.stack.pop()
        cls = self._record_class(self.stack.pop(), "NEWOBJ_EX")
        if type(args) is not tuple or type(kwargs) is not dict:
            raise UnsafePickleError("refusing NEWOBJ_EX with malformed arguments")
        self.append(cls.__new__(cls, *args, **kwargs))

    def load_build(self) -> None:
        state = self.stack.pop()
        inst = self.stack[-1]
        self._record_class(type(inst), "BUILD")
        setstate = getattr(type(inst), "__setstate__", None)
        if setstate is not None and setstate is not getattr(object, "__setstate__", None):
            setstate(inst, state)  # the record class's own method (TensorProperties: enum -> memory format)
            return
        slots = None
        if type(state) is tuple and len(state) == 2:
            state, slots = state
        for part in (state, slots):
            if part is not None and (type(part) is not dict or not all(type(k) is str for k in part)):
                raise UnsafePickleError("refusing BUILD with a state that is not a dict of attribute names")
        for k, v in (state or {}).items():
            inst.__dict__[k] = v
        for k, v in (slots or {}).items():
            object.__setattr__(inst, k, v)

    def load_append(self) -> None:
        value = self.stack.pop()
        self._target(list, "APPEND").append(value)

    def load_appends(self) -> None:
        items = self.pop_mark()
        self._target(list, "APPENDS").extend(items)

    def load_setitem(self) -> None:
        value = self.stack.pop()
        key = self.stack.pop()
        self._target(dict, "SETITEM")[key] = value

    def load_setitems(self) -> None:
        items = self.pop_mark()
        target = self._target(dict, "SETITEMS")
        for i in range(0, len(items), 2):
            target[items[i]] = items[i + 1]

    def load_additems(self) -> None:
        items = self.pop_mark()
        self._target(set, "ADDITEMS").update(items)

    def _target(self, kind: type, opcode: str) -> Any:
        target = self.stack[-1]
        if type(target) is not kind and not (kind is dict and type(target) is collections.OrderedDict):
            raise UnsafePickleError(f"refusing {opcode} on a {type(target).__name__} (only on a {kind.__name__})")
        return target

    dispatch[pickle.REDUCE[0]] = load_reduce
    dispatch[pickle.NEWOBJ[0]] = load_newobj
    dispatch[pickle.NEWOBJ_EX[0]] = load_newobj_ex
    dispatch[pickle.BUILD[0]] = load_build
    dispatch[pickle.APPEND[0]] = load_append
    dispatch[pickle.APPENDS[0]] = load_appends
    dispatch[pickle.SETITEM[0]] = load_setitem
    dispatch[pickle.SETITEMS[0]] = load_setitems
    dispatch[pickle.ADDITEMS[0]] = load_additems
    for _op in ("INST", "OBJ", "EXT1", "EXT2", "EXT4"):
        dispatch[getattr(pickle, _op)[0]] = _refuse(_op)
    del _op


def restricted_loads(data: bytes) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (raises UnsafePickleError naming what it refused)."""
    return RestrictedUnpickler(io.BytesIO(data)).load()


