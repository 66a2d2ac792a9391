"""Checkpoint files: lazy, tensor-by-tensor reading and atomic writing.

Readers (:func:`open_checkpoint`) list names, shapes and dtypes without reading tensor data, and read
one tensor at a time with positioned reads (``os.preadv``) into a fresh array, so a loader's peak memory
is the target cell plus one tensor, whatever the file size. (A whole-file mmap would leave every
touched page of the file resident in the process, which is file size plus cell size again.)

* ``.safetensors`` (also ``*.safetensors.index.json`` shards and diffusers/transformers folders): the
  8-byte header length, the JSON header, then raw little-endian data; bfloat16 is widened to float32.
* ``.ckpt`` (MindSpore): a concatenation of protobuf ``Checkpoint`` messages
  (``mindspore/train/checkpoint.proto``: ``value {tag, tensor {dims, tensor_type, tensor_content}}``).
  MindSpore splits tensors over 512 MB into consecutive records with the same tag; they are joined.
  ``str`` entries (``append_dict``) are metadata. The optional ``crc_num`` trailer is skipped.
* ``.bin``/``.pt``/``.pth`` (PyTorch pickles): only through ``torch.load(weights_only=True)``, which
  refuses anything but tensors and plain containers. Without torch they are refused: unpickling runs
  arbitrary code, so these files are never opened with plain ``pickle``.

Writing (:func:`save_checkpoint`, :func:`write_tensors`) is atomic: a temporary file in the target's
directory is written, fsync'ed and renamed over the target, so a crash mid-save leaves any existing file
as it was. safetensors files are streamed one tensor at a time; ``.ckpt`` files are written by MindSpore's
own ``ms.save_checkpoint`` (metadata as ``str`` entries), so ``ms.load_checkpoint`` reads them.
"""
from __future__ import annotations

import json
import os
import tempfile
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import numpy as np

SAFETENSORS = ".safetensors"
MINDSPORE_CKPT = ".ckpt"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
SAVE_DTYPES = {"fp32": np.float32, "fp16": np.float16}
# Metadata keys of a .ckpt are str entries named with this prefix (safetensors has a metadata header).
CKPT_METADATA_PREFIX = "__metadata__."

# Files looked for, in order, when a folder is given (diffusers and transformers save_pretrained names).
_FOLDER_FILES = ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.safetensors.index.json",
                 "model.safetensors", "model.safetensors.index.json",
                 "diffusion_pytorch_model.bin", "diffusion_pytorch_model.bin.index.json",
                 "pytorch_model.bin", "pytorch_model.bin.index.json")

_SAFETENSORS_DTYPES = {"F64": np.float64, "F32": np.float32, "F16": np.float16, "BF16": "bfloat16",
                       "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8,
                       "U16": np.uint16, "U32": np.uint32, "U64": np.uint64, "BOOL": np.bool_}
_SAFETENSORS_CODES = {np.dtype(v): k for k, v in _SAFETENSORS_DTYPES.items() if v != "bfloat16"}
_CKPT_DTYPES = {"Float64": np.float64, "Float32": np.float32, "Float16": np.float16, "BFloat16": "bfloat16",
                "Int64": np.int64, "Int32": np.int32, "Int16": np.int16, "Int8": np.int8, "UInt8": np.uint8,
                "UInt16": np.uint16, "UInt32": np.uint32, "UInt64": np.uint64, "Bool": np.bool_}
_MAX_HEADER = 100 * 1024 * 1024
_CRC_TRAILER = 17  # b"crc_num" + 10 bytes, appended by ms.save_checkpoint(crc_check=True)


class CheckpointError(ValueError):
    """A checkpoint file cannot be read or written: unknown format, truncated, corrupt or unsafe."""


@dataclass(frozen=True)
class TensorInfo:
    """What a file says about one tensor. ``dtype`` is the stored type (``bfloat16`` is read as float32)."""

    name: str
    shape: Tuple[int, ...]
    dtype: str

    @property
    def numel(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))


def _itemsize(dtype) -> int:
    return 2 if dtype == "bfloat16" else np.dtype(dtype).itemsize


def _dtype_name(dtype) -> str:
    return "bfloat16" if dtype == "bfloat16" else np.dtype(dtype).name


def _pread_into(fd: int, buffer: memoryview, offset: int, path: str) -> None:
    """Fill ``buffer`` from ``offset`` (looping: one read returns at most ~2 GB on Linux)."""
    done = 0
    while done < len(buffer):
        n = os.preadv(fd, [buffer[done:]], offset + done)
        if n == 0:
            raise CheckpointError(f"{path}: file ends at byte {offset + done}, inside a tensor that needs "
                                  f"{len(buffer)} bytes from byte {offset}: the file is truncated")
        done += n


class CheckpointReader:
    """Lazy read access to the tensors of one checkpoint (a context manager; close when done).

    ``keys()`` and ``info(name)`` read no tensor data; ``get(name)`` reads that tensor's bytes only and
    returns a new numpy array (bfloat16 widened to float32). ``metadata`` is a ``{str: str}`` dict.
    """

    format: str = ""

    def __init__(self, path: str):
        self.path = path
        self.metadata: Dict[str, str] = {}

    def keys(self) -> List[str]:
        raise NotImplementedError

    def info(self, name: str) -> TensorInfo:
        raise NotImplementedError

    def get(self, name: str) -> np.ndarray:
        raise NotImplementedError

    def close(self) -> None:
        pass

    def __contains__(self, name) -> bool:
        return name in set(self.keys())

    def __len__(self) -> int:
        return len(self.keys())

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def _unknown(self, name: str) -> KeyError:
        return KeyError(f"{self.path} has no tensor {name!r} ({len(self)} tensors)")


class _SpanReader(CheckpointReader):
    """A file whose tensors are byte spans: ``{name: (info, [(offset, length), ...])}``, indexed by the
    subclass's ``_parse`` (the file is closed again when that fails)."""

    def __init__(self, path: str):
        super().__init__(path)
        self._fd = os.open(path, os.O_RDONLY)
        self._size = os.fstat(self._fd).st_size
        self._entries: Dict[str, Tuple[TensorInfo, List[Tuple[int, int]]]] = {}
        try:
            self._parse()
        except BaseException:
            self.close()
            raise

    def _parse(self) -> None:
        raise NotImplementedError

    def keys(self) -> List[str]:
        return list(self._entries)

    def __contains__(self, name) -> bool:
        return name in self._entries

    def info(self, name: str) -> TensorInfo:
        if name not in self._entries:
            raise self._unknown(name)
        return self._entries[name][0]

    def get(self, name: str) -> np.ndarray:
        info, spans = self._entries.get(name, (None, None))
        if info is None:
            raise self._unknown(name)
        stored = np.uint16 if info.dtype == "bfloat16" else np.dtype(info.dtype)
        out = np.empty(info.shape, dtype=stored)
        raw = memoryview(out.reshape(-1).view(np.uint8))
        done = 0
        for offset, length in spans:
            _pread_into(self._fd, raw[done:done + length], offset, self.path)
            done += length
        if info.dtype == "bfloat16":  # bfloat16 is the upper half of a float32
            out = (out.astype(np.uint32) << 16).view(np.float32)
        return out

    def _add(self, info: TensorInfo, spans: List[Tuple[int, int]]) -> None:
        stored = sum(length for _, length in spans)
        expected = info.numel * _itemsize(info.dtype)
        if stored != expected:
            raise CheckpointError(f"{self.path}: tensor {info.name!r} holds {stored} bytes but shape {info.shape} "
                                  f"of {info.dtype} needs {expected}: the file is corrupt or truncated")
        end = max((offset + length for offset, length in spans), default=0)
        if end > self._size:
            raise CheckpointError(f"{self.path}: tensor {info.name!r} ends at byte {end} but the file has "
                                  f"{self._size} bytes: the file is truncated")
        self._entries[info.name] = (info, spans)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1


class SafetensorsReader(_SpanReader):
    format = "safetensors"

    def _parse(self) -> None:
        if self._size < 8:
            raise CheckpointError(f"{self.path}: {self._size} bytes is too short for a safetensors file "
                                  "(truncated or empty)")
        header_size = int.from_bytes(os.pread(self._fd, 8, 0), "little")
        if header_size > _MAX_HEADER or 8 + header_size > self._size:
            raise CheckpointError(f"{self.path}: the safetensors header claims {header_size} bytes but the file has "
                                  f"{self._size}: not a safetensors file, or truncated")
        try:
            header = json.loads(os.pread(self._fd, header_size, 8))
        except (UnicodeDecodeError, json.JSONDecodeError) as err:
            raise CheckpointError(f"{self.path}: the safetensors header is not valid JSON ({err})") from None
        self.metadata = dict(header.pop("__metadata__", None) or {})
        data_start = 8 + header_size
        for name, entry in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            code = entry.get("dtype")
            if code not in _SAFETENSORS_DTYPES:
                raise CheckpointError(f"{self.path}: tensor {name!r} has dtype {code!r}; readable dtypes are "
                                      f"{sorted(_SAFETENSORS_DTYPES)}")
            begin, end = entry["data_offsets"]
            info = TensorInfo(name, tuple(int(d) for d in entry["shape"]), _dtype_name(_SAFETENSORS_DTYPES[code]))
            self._add(info, [(data_start + begin, end - begin)])


class MindSporeCheckpointReader(_SpanReader):
    """Index of a MindSpore ``.ckpt`` built from the protobuf framing alone (tensor bytes are skipped)."""

    format = "ckpt"

    def _parse(self) -> None:
        end = self._size
        if end >= _CRC_TRAILER and os.pread(self._fd, 7, end - _CRC_TRAILER) == b"crc_num":
            end -= _CRC_TRAILER
        cursor = _Cursor(self._fd, 0, end, self.path)
        records: List[Tuple[str, Tuple[int, ...], str, int, int]] = []
        while cursor.pos < end:
            key = cursor.varint()
            if key != (1 << 3 | 2):  # field 1 (Checkpoint.value), length-delimited
                raise CheckpointError(
                    f"{self.path}: byte {cursor.pos} is not a MindSpore checkpoint record (field {key >> 3}, wire "
                    f"type {key & 7}): not a .ckpt file, or an encrypted one (decrypt it with mindspore first)")
            length = cursor.varint()
            record_end = cursor.pos + length
            if record_end > end:
                raise CheckpointError(f"{self.path}: the record at byte {cursor.pos} needs {length} bytes but the file "
                                      f"ends at byte {end}: the file is truncated")
            records.append(self._value(cursor, record_end))
            cursor.seek(record_end)
        self._join(records)

    def _value(self, cursor: "_Cursor", end: int):
        tag, tensor = None, None
        while cursor.pos < end:
            key = cursor.varint()
            field, wire = key >> 3, key & 7
            if wire != 2:
                raise CheckpointError(f"{self.path}: malformed checkpoint record at byte {cursor.pos}")
            length = cursor.varint()
            if field == 1:
                tag = cursor.read(length).decode("utf-8")
            elif field == 2:
                tensor = self._tensor(cursor, cursor.pos + length)
            elif field == 3:
                raise CheckpointError(f"{self.path}: entry {tag!r} is a MapParameter (embedding cache), which is not a "
                                      "model weight and is not supported")
            else:
                cursor.skip(length)
        if tag is None or tensor is None:
            raise CheckpointError(f"{self.path}: a checkpoint record ending at byte {end} has no "
                                  f"{'tag' if tag is None else 'tensor'}: the file is corrupt")
        return (tag,) + tensor

    def _tensor(self, cursor: "_Cursor", end: int):
        dims: List[int] = []
        tensor_type, content = None, None
        while cursor.pos < end:
            key = cursor.varint()
            field, wire = key >> 3, key & 7
            if field == 1 and wire == 0:
                dims.append(cursor.varint())
            elif field == 1 and wire == 2:  # packed dims
                stop = cursor.pos + cursor.varint()
                while cursor.pos < stop:
                    dims.append(cursor.varint())
            elif wire == 2:
                length = cursor.varint()
                if field == 2:
                    tensor_type = cursor.read(length).decode("ascii")
                elif field == 3:
                    content = (cursor.pos, length)
                    cursor.skip(length)
                else:
                    cursor.skip(length)
            else:
                raise CheckpointError(f"{self.path}: malformed tensor record at byte {cursor.pos}")
        if tensor_type is None or content is None:
            raise CheckpointError(f"{self.path}: a tensor record ending at byte {end} lacks its type or data")
        return tuple(dims), tensor_type, content[0], content[1]

    def _join(self, records) -> None:
        """Consecutive records with one tag are slices of one tensor; ``str`` entries are metadata."""
        i = 0
        while i < len(records):
            tag, dims, tensor_type, _, _ = records[i]
            j = i
            while j + 1 < len(records) and records[j + 1][0] == tag:
                j += 1
            spans = [(offset, length) for _, _, _, offset, length in records[i:j + 1]]
            if tag in self._entries or tag in self.metadata:
                raise CheckpointError(f"{self.path}: entry {tag!r} appears twice, apart: the file is corrupt")
            if tensor_type == "str":
                raw = b"".join(os.pread(self._fd, length, offset) for offset, length in spans)
                key = tag[len(CKPT_METADATA_PREFIX):] if tag.startswith(CKPT_METADATA_PREFIX) else tag
                self.metadata[key] = str(np.frombuffer(raw, dtype=f"<U{len(raw) // 4}")[0]) if raw else ""
            elif tensor_type not in _CKPT_DTYPES:
                raise CheckpointError(f"{self.path}: entry {tag!r} has tensor_type {tensor_type!r}; readable types "
                                      f"are {sorted(_CKPT_DTYPES)}")
            else:
                # MindSpore writes a 0-d tensor with dims [0].
                shape = () if tuple(dims) == (0,) and sum(s[1] for s in spans) else tuple(dims)
                self._add(TensorInfo(tag, shape, _dtype_name(_CKPT_DTYPES[tensor_type])), spans)
            i = j + 1


class _Cursor:
    """Forward reads over a byte range of a file through a small buffer; ``skip`` reads nothing."""

    _CHUNK = 1 << 16

    def __init__(self, fd: int, pos: int, end: int, path: str):
        self.fd, self.pos, self.end, self.path = fd, pos, end, path
        self._buffer, self._buffer_pos = b"", 0

    def _fill(self, n: int) -> None:
        offset = self.pos - self._buffer_pos
        if 0 <= offset and offset + n <= len(self._buffer):
            return
        self._buffer_pos = self.pos
        self._buffer = os.pread(self.fd, max(n, self._CHUNK), self.pos)
        if len(self._buffer) < n:
            raise CheckpointError(f"{self.path}: the file ends at byte {self.pos + len(self._buffer)} inside a "
                                  "record: the file is truncated")

    def read(self, n: int) -> bytes:
        if self.pos + n > self.end:
            raise CheckpointError(f"{self.path}: a field at byte {self.pos} runs past its record: the file is corrupt")
        self._fill(n)
        start = self.pos - self._buffer_pos
        self.pos += n
        return self._buffer[start:start + n]

    def varint(self) -> int:
        result, shift = 0, 0
        while True:
            byte = self.read(1)[0]
            result |= (byte & 0x7F) << shift
            if byte < 0x80:
                return result
            shift += 7
            if shift > 63:
                raise CheckpointError(f"{self.path}: malformed varint at byte {self.pos}: the file is corrupt")

    def skip(self, n: int) -> None:
        self.pos += n

    def seek(self, pos: int) -> None:
        self.pos = pos


class ShardedReader(CheckpointReader):
    """A shard index, ``*.safetensors.index.json`` or ``*.bin.index.json`` (``weight_map``: name -> shard
    file), as one reader."""

    format = "sharded"

    def __init__(self, path: str):
        super().__init__(path)
        with open(path, "r", encoding="utf-8") as f:
            try:
                index = json.load(f)
            except json.JSONDecodeError as err:
                raise CheckpointError(f"{path}: not a valid shard index ({err})") from None
        if not isinstance(index.get("weight_map"), dict):
            raise CheckpointError(f"{path}: a shard index needs a 'weight_map' of tensor name -> shard file")
        self.metadata = {k: str(v) for k, v in (index.get("metadata") or {}).items()}
        folder = os.path.dirname(path)
        self._shards: Dict[str, CheckpointReader] = {}
        self._where: Dict[str, CheckpointReader] = {}
        try:
            for name, shard in index["weight_map"].items():
                if shard not in self._shards:
                    self._shards[shard] = open_checkpoint(os.path.join(folder, shard))
                if name not in self._shards[shard]:
                    raise CheckpointError(f"{path}: the index places {name!r} in {shard}, which does not hold it")
                self._where[name] = self._shards[shard]
        except BaseException:
            self.close()
            raise

    def keys(self) -> List[str]:
        return list(self._where)

    def info(self, name: str) -> TensorInfo:
        if name not in self._where:
            raise self._unknown(name)
        return self._where[name].info(name)

    def get(self, name: str) -> np.ndarray:
        if name not in self._where:
            raise self._unknown(name)
        return self._where[name].get(name)

    def close(self) -> None:
        for shard in self._shards.values():
            shard.close()


class TorchPickleReader(CheckpointReader):
    """A PyTorch pickle read by ``torch.load(weights_only=True, mmap=True)``: tensors and plain containers
    only, never arbitrary objects. A ``state_dict`` entry holding the weights is unwrapped."""

    format = "torch"

    def __init__(self, path: str):
        super().__init__(path)
        try:
            import torch
        except ImportError:
            raise CheckpointError(
                f"{path}: PyTorch pickle files are only read through torch.load(weights_only=True), and torch is not "
                "installed. Unpickling runs arbitrary code, so this package never opens them with plain pickle: "
                "install torch, or convert the file to .safetensors where it was made") from None
        import pickle
        try:
            try:
                state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
            except RuntimeError as err:
                if "mmap" not in str(err):
                    raise
                state = torch.load(path, map_location="cpu", weights_only=True)  # legacy (non-zip) format
        except pickle.UnpicklingError as err:
            raise CheckpointError(f"{path}: refused: the pickle holds objects other than tensors, which "
                                  "torch.load(weights_only=True) does not load "
                                  f"({str(err).splitlines()[0]}). Such files "
                                  "can run code when unpickled; get a .safetensors file instead") from None
        except (RuntimeError, EOFError) as err:
            raise CheckpointError(f"{path}: not a readable PyTorch file, or truncated ({err})") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: expected a dict of tensors, found a {type(state).__name__}")
        self._tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}

    def keys(self) -> List[str]:
        return list(self._tensors)

    def info(self, name: str) -> TensorInfo:
        if name not in self._tensors:
            raise self._unknown(name)
        tensor = self._tensors[name]
        return TensorInfo(name, tuple(tensor.shape), str(tensor.dtype).replace("torch.", ""))

    def get(self, name: str) -> np.ndarray:
        import torch

        if name not in self._tensors:
            raise self._unknown(name)
        tensor = self._tensors[name]
        if tensor.dtype == torch.bfloat16:
            tensor = tensor.float()
        return tensor.numpy().copy()


def resolve_checkpoint_path(path: str) -> str:
    """A weights file, or the weights file inside a diffusers/transformers model folder."""
    if os.path.isdir(path):
        for name in _FOLDER_FILES:
            candidate = os.path.join(path, name)
            if os.path.isfile(candidate):
                return candidate
        raise CheckpointError(f"{path} is a folder without a weights file; looked for {', '.join(_FOLDER_FILES)}")
    if not os.path.isfile(path):
        raise CheckpointError(f"{path}: no such file")
    return path


def open_checkpoint(path: str) -> CheckpointReader:
    """Open a checkpoint for lazy reading, chosen by file name: ``.safetensors``, ``.ckpt``,
    ``.bin``/``.pt``/``.pth`` (safe torch loader only) or a shard index ``*.index.json``; a folder is
    searched for the diffusers/transformers weights file."""
    path = resolve_checkpoint_path(path)
    lower = path.lower()
    if lower.endswith(SAFETENSORS):
        return SafetensorsReader(path)
    if lower.endswith(".index.json"):
        return ShardedReader(path)
    if lower.endswith(MINDSPORE_CKPT):
        return MindSporeCheckpointReader(path)
    if lower.endswith(PICKLE_SUFFIXES):
        return TorchPickleReader(path)
    raise CheckpointError(f"{path}: unknown checkpoint type; readable: .safetensors, .ckpt (MindSpore), "
                          ".bin/.pt/.pth through torch.load(weights_only=True), and *.index.json shard indexes")


# ---- writing -------------------------------------------------------------------------------------

# One tensor to write: name, shape, dtype, and a function that produces its values when called.
TensorSource = Tuple[str, Tuple[int, ...], np.dtype, Callable[[], np.ndarray]]


@dataclass(frozen=True)
class SaveSummary:
    path: str
    tensors: int
    parameters: int
    bytes: int


def output_dtype(dtype: Optional[str]):
    """numpy dtype for ``fp32``/``fp16`` (None keeps each tensor's dtype)."""
    if dtype is None:
        return None
    if dtype not in SAVE_DTYPES:
        raise CheckpointError(f"unknown save dtype {dtype!r}; valid: {', '.join(SAVE_DTYPES)} (or None to keep)")
    return np.dtype(SAVE_DTYPES[dtype])


def cast_for_saving(name: str, value: np.ndarray, dtype) -> np.ndarray:
    """``value`` in ``dtype`` if it is floating (other tensors keep theirs); refuses float16 overflow."""
    value = np.asarray(value)
    if dtype is None or not np.issubdtype(value.dtype, np.floating) or value.dtype == dtype:
        return value
    with np.errstate(over="ignore"):  # overflow is reported below, by name
        cast = value.astype(dtype)
    if dtype == np.float16 and not np.isfinite(cast).all() and np.isfinite(value).all():
        raise CheckpointError(f"tensor {name!r} has values beyond the float16 range (max |x| = "
                              f"{float(np.abs(value).max()):.4g} > 65504); save it as fp32")
    return cast


def _contiguous(value: np.ndarray) -> np.ndarray:
    """C-contiguous ``value`` (unlike ``np.ascontiguousarray``, keeps 0-d arrays 0-d)."""
    return value if value.flags.c_contiguous else value.copy(order="C")


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def atomic_output(path: str) -> Iterator[str]:
    """Yield a temporary path beside ``path``; on success fsync it and rename it over ``path``.

    On any error (or interrupt) the temporary file is removed and ``path`` is untouched.
    """
    path = os.path.abspath(path)
    folder, base = os.path.split(path)
    if not os.path.isdir(folder):
        raise CheckpointError(f"cannot save {path}: folder {folder} does not exist")
    suffix = os.path.splitext(base)[1]
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=f".{base}.", suffix=f".partial{suffix}")
    os.close(fd)
    try:
        yield tmp
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, 0o666 & ~_current_umask())
        os.replace(tmp, path)
    except BaseException:
        # MindSpore's writer stages its data in "<name>.tmp" before renaming onto our temporary name.
        for leftover in (tmp, os.path.splitext(tmp)[0] + ".tmp"):
            if os.path.exists(leftover):
                os.remove(leftover)
        raise
    dir_fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)


def _safetensors_header(specs: Sequence[Tuple[str, Tuple[int, ...], np.dtype]], metadata: Mapping[str, str]) -> bytes:
    header: Dict[str, object] = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, shape, dtype in specs:
        if np.dtype(dtype) not in _SAFETENSORS_CODES:
            raise CheckpointError(f"tensor {name!r}: dtype {np.dtype(dtype)} cannot be stored in safetensors")
        size = int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize
        header[name] = {"dtype": _SAFETENSORS_CODES[np.dtype(dtype)], "shape": list(shape),
                        "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)  # data starts 8-byte aligned, as the safetensors library writes it
    return len(raw).to_bytes(8, "little") + raw


def _write_safetensors(tmp: str, sources: Sequence[TensorSource], dtype, metadata, progress) -> int:
    specs = [(name, tuple(shape), dtype if dtype is not None and np.issubdtype(src_dtype, np.floating) else src_dtype)
             for name, shape, src_dtype, _ in sources]
    total = 0
    with open(tmp, "wb") as f:
        f.write(_safetensors_header(specs, metadata))
        for (name, shape, stored), (_, _, _, load) in zip(specs, sources):
            value = _contiguous(cast_for_saving(name, load(), dtype))
            if value.shape != shape or value.dtype != stored:
                raise CheckpointError(f"tensor {name!r}: announced {shape} {np.dtype(stored)}, produced "
                                      f"{value.shape} {value.dtype}")
            f.write(memoryview(value.reshape(-1).view(np.uint8)))
            total += value.nbytes
            if progress is not None:
                progress(name, value.nbytes)
        f.flush()
    return total


def _write_mindspore(tmp: str, sources: Sequence[TensorSource], dtype, metadata, progress) -> int:
    import mindspore as ms

    entries, total = [], 0
    for name, _, _, load in sources:
        value = _contiguous(cast_for_saving(name, load(), dtype))
        entries.append({"name": name, "data": ms.Tensor(value)})
        total += value.nbytes
        if progress is not None:
            progress(name, value.nbytes)
    append = {CKPT_METADATA_PREFIX + k: str(v) for k, v in metadata.items()} or None
    ms.save_checkpoint(entries, tmp, append_dict=append)
    return total


def write_tensors(path: str, sources: Iterable[TensorSource], dtype: Optional[str] = None,
                  metadata: Optional[Mapping[str, str]] = None,
                  progress: Optional[Callable[[str, int], None]] = None) -> SaveSummary:
    """Atomically write tensors produced one at a time to ``path`` (``.safetensors`` or ``.ckpt``).

    safetensors streams (memory: one tensor); ``.ckpt`` goes through ``ms.save_checkpoint``, which
    takes all tensors at once. ``dtype``: ``fp32``/``fp16`` casts floating tensors (None keeps them).
    ``metadata``: ``{str: str}``. ``progress(name, nbytes)`` is called after each tensor.
    """
    sources = list(sources)
    np_dtype = output_dtype(dtype)
    metadata = {str(k): str(v) for k, v in (metadata or {}).items()}
    names = [s[0] for s in sources]
    if len(set(names)) != len(names):
        raise CheckpointError(f"cannot save {path}: duplicate tensor names")
    lower = path.lower()
    if lower.endswith(SAFETENSORS):
        writer = _write_safetensors
    elif lower.endswith(MINDSPORE_CKPT):
        writer = _write_mindspore
    else:
        raise CheckpointError(f"cannot save {path}: the name must end in {SAFETENSORS} or {MINDSPORE_CKPT}")
    with atomic_output(path) as tmp:
        total = writer(tmp, sources, np_dtype, metadata, progress)
    parameters = sum(int(np.prod(shape, dtype=np.int64)) for _, shape, _, _ in sources)
    return SaveSummary(os.path.abspath(path), len(sources), parameters, total)


def tensor_sources(source) -> List[TensorSource]:
    """A cell, a ``{name: array or Tensor}`` mapping or a :class:`CheckpointReader` as tensor sources."""
    from mindspore import nn

    from .state import numpy_dtype

    if isinstance(source, nn.Cell):  # names relative to the cell, also for a sub-cell
        return [(name, tuple(p.shape), numpy_dtype(p.dtype), p.asnumpy)
                for name, p in source.parameters_and_names()]
    if isinstance(source, CheckpointReader):
        out = []
        for name in source.keys():
            info = source.info(name)
            dtype = np.float32 if info.dtype == "bfloat16" else np.dtype(info.dtype)
            out.append((name, info.shape, np.dtype(dtype), lambda name=name: source.get(name)))
        return out
    if isinstance(source, Mapping):
        out = []
        for name, value in source.items():
            array = value.asnumpy() if hasattr(value, "asnumpy") else np.asarray(value)
            out.append((name, array.shape, array.dtype, lambda array=array: array))
        return out
    raise TypeError(f"cannot save a {type(source).__name__}: give a Cell, a dict of arrays or a CheckpointReader")


def save_checkpoint(source, path: str, dtype: Optional[str] = None, metadata: Optional[Mapping[str, str]] = None,
                    progress: Optional[Callable[[str, int], None]] = None) -> SaveSummary:
    """Atomically save a cell's parameters, a ``{name: array}`` dict or a reader's tensors to ``path``.

    The format follows the suffix (``.safetensors`` or ``.ckpt``); see :func:`write_tensors`.
    """
    return write_tensors(path, tensor_sources(source), dtype=dtype, metadata=metadata, progress=progress)


def load_tensors(path: str, names: Optional[Union[Sequence[str], Callable[[str], bool]]] = None
                 ) -> Dict[str, np.ndarray]:
    """Read tensors of ``path`` into a dict (all, those in ``names``, or those ``names(name)`` accepts).

    This holds them all in memory; to load a cell, :func:`pangu_draw_ms.io.layouts.load_component`
    streams instead.
    """
    with open_checkpoint(path) as reader:
        keys = reader.keys()
        if callable(names):
            keys = [k for k in keys if names(k)]
        elif names is not None:
            missing = [n for n in names if n not in reader]
            if missing:
                raise KeyError(f"{path} lacks {len(missing)} requested tensor(s): {', '.join(missing[:10])}")
            keys = list(names)
        return {k: reader.get(k) for k in keys}
