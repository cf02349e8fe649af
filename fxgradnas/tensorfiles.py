"""Safetensors checkpoint directories, read and written: the files of a (sharded) checkpoint, where each
tensor is, one tensor or a whole directory's read, and a file written one block of rows at a time.

Needs safetensors (the ``hf`` extra); it is imported where a file is read.
"""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from pathlib import Path

import torch

from .errors import ArgumentError

INDEX_FILE = "model.safetensors.index.json"
ITEMSIZE = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E4M3": 1, "F8_E5M2": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
            "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
BLOCK_BYTES = 64 * 2**20  # rows read, changed and written at a time

Header = tuple[dict | None, dict[str, tuple[str, tuple]]]
"""A file's metadata and, per tensor, its safetensors dtype ("BF16", ...) and shape."""
Rows = Callable[[str, int, int, torch.Tensor], torch.Tensor]
"""``rows(name, start, stop, block)``: what to write for rows ``start:stop`` (along axis 0) of tensor ``name``."""


def checkpoint_files(directory: Path) -> list[str]:
    """The safetensors files of a checkpoint directory: those its index names, else the one weights file."""
    if (directory / INDEX_FILE).is_file():
        return sorted(set(json.loads((directory / INDEX_FILE).read_text())["weight_map"].values()))
    files = sorted(p.name for p in directory.glob("*.safetensors"))
    if len(files) != 1:
        raise ArgumentError(f"{directory} must hold one .safetensors file or an {INDEX_FILE}, not {len(files)} "
                            "safetensors files")
    return files


def tensor_files(directory: Path) -> dict[str, Path]:
    """The file holding each tensor of a safetensors checkpoint directory."""
    from safetensors import safe_open

    located = {}
    for file in checkpoint_files(directory):
        with safe_open(directory / file, framework="pt") as f:
            located.update(dict.fromkeys(f.keys(), directory / file))
    return located


def read_tensor(file: Path, name: str, device: torch.device) -> torch.Tensor:
    """Tensor ``name`` of the safetensors ``file``, read onto ``device``."""
    from safetensors import safe_open

    with safe_open(file, framework="pt", device=str(device)) as f:
        return f.get_tensor(name)


def read_headers(directory: Path, files: list[str]) -> dict[str, Header]:
    """The header of each of the safetensors ``files`` of ``directory`` (no tensor data is read)."""
    from safetensors import safe_open

    headers = {}
    for file in files:
        with safe_open(directory / file, framework="pt") as f:
            headers[file] = (f.metadata(), {k: (f.get_slice(k).get_dtype(), tuple(f.get_slice(k).get_shape()))
                                            for k in f.keys()})
    return headers


def read_state(directory: Path) -> dict[str, torch.Tensor]:
    """Every tensor of every safetensors file in ``directory``, by name."""
    from safetensors.torch import load_file

    state = {}
    for file in sorted(directory.glob("*.safetensors")):
        state.update(load_file(file))
    return state


def write_in_blocks(source: Path, target: Path, metadata: dict | None,
                    tensors: dict[str, tuple[str, str, tuple, list[int]]], rows: Rows) -> int:
    """Write the safetensors file ``target`` from the tensors of ``source``, one block of rows at a time (the
    header first: every output shape is known). ``tensors`` maps each tensor of ``source`` to write to its
    name in ``target``, its dtype, its shape in ``source`` and its shape in ``target``; ``rows`` gives what to
    write for each block read. Returns the bytes of tensor data written."""
    from safetensors import safe_open

    offset, header = 0, {"__metadata__": metadata or {"format": "pt"}}
    for name, dtype, _, shape in tensors.values():
        size = math.prod(shape) * ITEMSIZE[dtype]
        header[name] = {"dtype": dtype, "shape": shape, "data_offsets": [offset, offset + size]}
        offset += size
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    with open(target, "wb") as out:
        out.write(len(text).to_bytes(8, "little"))
        out.write(text)
        for name, (_, dtype, shape, _) in tensors.items():
            step = max(1, BLOCK_BYTES // max(1, math.prod(shape[1:]) * ITEMSIZE[dtype])) if shape else 1
            for start in range(0, shape[0] if shape else 1, step):
                with safe_open(source, framework="pt") as f:  # reopened per block: the pages read are let go
                    block = f.get_slice(name)[start:start + step] if shape else f.get_tensor(name)
                block = rows(name, start, start + step, block)
                out.write(block.contiguous().reshape(-1).view(torch.uint8).numpy().data)
    return offset
