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
- ``BUILD`` state: a dict whose keys are the record's own dataclass fields (never ``__class__``,
  ``__dict__`` or any other attribute), no slot state;
- ``APPEND(S)`` / ``SETITEM(S)`` / ``ADDITEMS``: only on real lists, dicts and sets;
- ``INST``, ``OBJ``, ``EXT1/2/4``, ``PERSID`` / ``BINPERSID``: refused (DCP never writes them);
- every length an opcode announces is checked against the size of the data before anything is
  allocated, and the loaded object may nest at most :data:`MAX_DEPTH` levels (checked without
  recursion), so a 13-byte file cannot ask for 2 GB nor a 2M-deep tuple crash a later reader.

:func:`check_dcp_metadata` then checks the type of every field of the loaded ``Metadata``.

Torch zip files (``rank_N.pt``, DCP tensors and bytes entries, DeepSpeed's files) are read only by
``torch.load(weights_only=True)``, torch's own unpickler with the same kind of exact allow-list.
"""

from __future__ import annotations

import collections
import dataclasses
import importlib
import io
import os
import pickle
import struct
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


MAX_DEPTH = 32  # a DCP Metadata nests 7 deep (Metadata > dict > TensorStorageMetadata > list > Chunk > Size)


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
        self._size = len(file.getbuffer()) if isinstance(file, io.BytesIO) else None
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
        fields = {f.name for f in dataclasses.fields(type(inst))} if dataclasses.is_dataclass(inst) else set()
        if type(state) is not dict or not all(type(k) is str and k in fields for k in state):
            keys = sorted(map(repr, state))[:5] if isinstance(state, dict) else type(state).__name__
            raise UnsafePickleError(f"refusing BUILD of {type(inst).__name__} with state {keys}: only a dict of "
                                    f"its own fields ({', '.join(sorted(fields)) or 'none'})")
        inst.__dict__.update(state)

    def _announced(self, fmt: str, opcode: str) -> int:
        """The length an opcode announces, checked against the size of the data before any allocation."""
        (n,) = struct.unpack(fmt, self.read(struct.calcsize(fmt)))
        if n < 0 or (self._size is not None and n > self._size):
            raise UnsafePickleError(f"{opcode} announces {n} bytes in {self._size} bytes of data")
        return n

    def load_bytearray8(self) -> None:
        b = bytearray(self._announced("<Q", "BYTEARRAY8"))
        self.readinto(b)
        self.append(b)

    def load_binbytes8(self) -> None:
        self.append(self.read(self._announced("<Q", "BINBYTES8")))

    def load_binbytes(self) -> None:
        self.append(self.read(self._announced("<I", "BINBYTES")))

    def load_binunicode8(self) -> None:
        self.append(str(self.read(self._announced("<Q", "BINUNICODE8")), "utf-8", "surrogatepass"))

    def load_binunicode(self) -> None:
        self.append(str(self.read(self._announced("<I", "BINUNICODE")), "utf-8", "surrogatepass"))

    def load_binstring(self) -> None:
        self.append(self._decode_string(self.read(self._announced("<i", "BINSTRING"))))

    def load_long4(self) -> None:
        self.append(pickle.decode_long(self.read(self._announced("<i", "LONG4"))))

    def load_frame(self) -> None:
        self._unframer.load_frame(self._announced("<Q", "FRAME"))

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
    for _op in ("BYTEARRAY8", "BINBYTES8", "BINBYTES", "BINUNICODE8", "BINUNICODE", "BINSTRING", "LONG4", "FRAME"):
        dispatch[getattr(pickle, _op)[0]] = locals()[f"load_{_op.lower()}"]
    for _op in ("INST", "OBJ", "EXT1", "EXT2", "EXT4"):
        dispatch[getattr(pickle, _op)[0]] = _refuse(_op)
    del _op


def nesting_depth(obj: Any, limit: int = MAX_DEPTH) -> int:
    """How deep ``obj`` nests (containers and records), without recursion, each object visited once
    (shared objects too: no blow-up on a DAG); stops once past ``limit``."""
    depth: dict[int, int] = {}
    todo: list[tuple[Any, bool]] = [(obj, False)]
    keep = []  # hold the objects whose ids are in ``depth``
    while todo:
        o, done = todo.pop()
        if done:
            kids = _children(o)
            depth[id(o)] = 1 + max((depth.get(id(k), 0) for k in kids), default=0)
            if depth[id(o)] > limit:
                return depth[id(o)]
            continue
        if id(o) in depth:
            continue
        kids = _children(o)
        if not kids:
            depth[id(o)] = 0
            keep.append(o)
            continue
        depth[id(o)] = 0  # visiting: a cycle (impossible without BUILD on a container) ends here
        keep.append(o)
        todo.append((o, True))
        if len(todo) + len(kids) > 10_000_000:
            raise UnsafePickleError("the pickle holds too many objects")
        todo.extend((k, False) for k in kids)
    return depth[id(obj)]


def _children(o: Any) -> list:
    if type(o) in (tuple, list, set, frozenset):
        return list(o)
    if isinstance(o, dict):
        return [*o.keys(), *o.values()]
    if type(o) in _RECORD_TYPES:
        return list(vars(o).values())
    return []


def restricted_loads(data: bytes, max_depth: int = MAX_DEPTH) -> Any:
    """Unpickle ``data`` with :class:`RestrictedUnpickler` (raises UnsafePickleError naming what it refused,
    an announced length beyond the data, or nesting deeper than ``max_depth``)."""
    obj = RestrictedUnpickler(io.BytesIO(data)).load()
    depth = nesting_depth(obj, max_depth)
    if depth > max_depth:
        raise UnsafePickleError(f"the pickle nests more than {max_depth} levels deep (DCP metadata nests about 7)")
    return obj




def _is(x: Any, *kinds: type) -> bool:
    return type(x) in kinds


def _size_ok(x: Any) -> bool:
    return type(x) is torch.Size and all(type(d) is int and d >= 0 for d in x)


def check_dcp_metadata(m: Any) -> str | None:
    """What is wrong with an unpickled DCP ``Metadata`` (the first field of the wrong type, named), or
    None when every field has the type DCP itself writes."""
    from torch.distributed.checkpoint import metadata as dm
    from torch.distributed.checkpoint.filesystem import _StorageInfo

    if type(m) is not dm.Metadata:
        return f"the file holds a {type(m).__name__}, not DCP's Metadata"
    if not isinstance(m.state_dict_metadata, dict):
        return "state_dict_metadata is not a dict"
    for fqn, entry in m.state_dict_metadata.items():
        if type(fqn) is not str:
            return f"state_dict_metadata key {fqn!r} is not a string"
        if type(entry) is dm.BytesStorageMetadata:
            continue
        if type(entry) is not dm.TensorStorageMetadata:
            return f"state_dict_metadata[{fqn!r}] is a {type(entry).__name__}"
        p = entry.properties
        if (type(p) is not dm.TensorProperties or not isinstance(p.dtype, torch.dtype)
                or not isinstance(p.layout, torch.layout) or not _is(p.requires_grad, bool)
                or not isinstance(p.memory_format, torch.memory_format) or not _is(p.pin_memory, bool)):
            return f"state_dict_metadata[{fqn!r}].properties are malformed"
        if not _size_ok(entry.size) or type(entry.chunks) is not list:
            return f"state_dict_metadata[{fqn!r}] has size {entry.size!r} or chunks of the wrong type"
        for c in entry.chunks:
            if (type(c) is not dm.ChunkStorageMetadata or not _size_ok(c.offsets) or not _size_ok(c.sizes)
                    or len(c.offsets) != len(entry.size) or len(c.sizes) != len(entry.size)):
                return f"a chunk of state_dict_metadata[{fqn!r}] is malformed"
    if m.planner_data is not None and not isinstance(m.planner_data, dict):
        return "planner_data is not a dict"
    if m.storage_data is not None and not isinstance(m.storage_data, dict):
        return f"storage_data is a {type(m.storage_data).__name__}, not a dict"
    for index, info in (m.storage_data or {}).items():
        if (type(index) is not dm.MetadataIndex or type(index.fqn) is not str
                or not (index.offset is None or _size_ok(index.offset)) or not _is(index.index, int, type(None))):
            return f"storage_data key {index!r} is not a MetadataIndex"
        if (type(info) is not _StorageInfo or type(info.relative_path) is not str or type(info.offset) is not int
                or type(info.length) is not int):
            return f"storage_data[{index.fqn!r}] is not a storage record (relative_path, offset, length)"
        td = getattr(info, "transform_descriptors", None)
        if td is not None and not (type(td) in (list, tuple) and all(type(t) is str for t in td)):
            return f"storage_data[{index.fqn!r}].transform_descriptors is malformed"
    sm = getattr(m, "storage_meta", None)
    if sm is not None:
        if type(sm) is not dm.StorageMeta or not _is(sm.save_id, str, type(None)) \
                or not _is(sm.load_id, str, type(None)) or type(sm.modules) is not list \
                or not (sm.checkpoint_id is None or isinstance(sm.checkpoint_id, (str, os.PathLike))):
            return "storage_meta is malformed"
    if not _is(getattr(m, "version", None), str, type(None)):
        return "version is not a string"
    return None
