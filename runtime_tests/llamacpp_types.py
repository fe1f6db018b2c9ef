"""ggml block types the installed llama.cpp has and gguf-py lacks (Q2_0), and gguf-py's reader taught them.

gguf-py 0.19 (the newest on PyPI) has no Q2_0: no GGMLQuantizationType member, so its reader raises on a file that
holds one, and no GGML_QUANT_SIZES entry, so its writer cannot size one. (It has Q1_0, without a dequantizer:
formats.gguf_blocks decodes both.) The type ids are never written here: they are the installed llama-cpp-python's
(llama_cpp.GGML_TYPE_<name>, LLAMA_FTYPE_MOSTLY_<name>), so a file only names a type the llama.cpp next to it knows.
Block size and bytes per block are the layout of ggml-common.h (block_q2_0); tests/test_gguf.py checks them against
the installed ggml's ggml_blck_size / ggml_type_size.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np


def installed_type_id(name: str, prefix: str = "GGML_TYPE_") -> int | None:
    """llama_cpp.<prefix><name> of the installed llama-cpp-python; None where it lacks the type or is not installed."""
    try:
        import llama_cpp
    except ImportError:
        return None
    value = getattr(llama_cpp, f"{prefix}{name}", None)
    return None if value is None else int(value)


@dataclass(frozen=True)
class LlamaCppOnlyType:
    """A ggml block type gguf-py lacks, standing where a GGMLQuantizationType would (``name``; ``value`` is the
    installed llama.cpp's id)."""

    name: str
    block_size: int
    type_size: int

    def missing(self) -> str | None:
        """None where the installed llama.cpp has the type, else why not (for a one-line error)."""
        if installed_type_id(self.name) is not None:
            return None
        from importlib.metadata import PackageNotFoundError, version

        try:
            installed = f"llama-cpp-python {version('llama-cpp-python')}"
        except PackageNotFoundError:
            installed = "llama-cpp-python is not installed"
        return f"the installed llama.cpp has no {self.name} ({installed})"

    @property
    def value(self) -> int:
        type_id = installed_type_id(self.name)
        if type_id is None:
            raise ValueError(f"{self.missing()}: upgrade llama-cpp-python")
        return type_id

    @property
    def file_type(self) -> int | None:
        """LLAMA_FTYPE_MOSTLY_<name> of the installed llama.cpp (general.file_type of a file mostly of this type)."""
        return installed_type_id(self.name, "LLAMA_FTYPE_MOSTLY_")


Q2_0 = LlamaCppOnlyType("Q2_0", 64, 2 + 64 // 4)  # block_q2_0: fp16 d, two bits per weight
LLAMA_CPP_ONLY_TYPES = {t.name: t for t in (Q2_0,)}


class GGUFFileReader(gguf.GGUFReader):
    """gguf-py's GGUFReader that also reads tensors of LLAMA_CPP_ONLY_TYPES: their ``tensor_type`` is the
    LlamaCppOnlyType, their ``data`` the raw blocks (uint8 [rows, bytes per row]), as gguf-py gives other block
    types. gguf-py builds its tensor list in _build_tensors (internal), raising on a type id it does not know: it
    builds the tensors it knows here too, the others are built alongside from the same tensor-info fields."""

    def _build_tensors(self, start_offs: int, fields: list) -> None:
        known_ids = {int(t) for t in gguf.GGMLQuantizationType}
        foreign = [f for f in fields if int(f.parts[4][0]) not in known_ids]  # parts: name, dims, type, offset
        super()._build_tensors(start_offs, [f for f in fields if int(f.parts[4][0]) in known_ids])
        if not foreign:
            return
        by_id = {t_id: t for t in LLAMA_CPP_ONLY_TYPES.values() if (t_id := installed_type_id(t.name)) is not None}
        tensors = {t.name: t for t in self.tensors}
        for field in foreign:
            _, name_data, _, dims, raw_type, offset = field.parts
            name = str(bytes(name_data), encoding="utf-8")
            ggml_type = by_id.get(int(raw_type[0]))
            if ggml_type is None:
                raise ValueError(f"tensor {name} has ggml type {int(raw_type[0])}, which neither gguf-py nor the "
                                 "installed llama.cpp knows")
            if name in tensors:
                raise ValueError(f"Found duplicated tensor with name {name}")
            n_elements = int(np.prod(dims))
            shape = tuple(reversed(dims.tolist()))  # ggml lists the row length first
            if shape[-1] % ggml_type.block_size:
                raise ValueError(f"tensor {name}: rows of {shape[-1]} are not whole {ggml_type.name} blocks")
            n_bytes = n_elements // ggml_type.block_size * ggml_type.type_size
            data_offset = int(start_offs + offset[0])
            data = self._get(data_offset, np.uint8, n_bytes).reshape(
                *shape[:-1], shape[-1] // ggml_type.block_size * ggml_type.type_size)
            tensors[name] = gguf.ReaderTensor(name=name, tensor_type=ggml_type, shape=dims, n_elements=n_elements,
                                              n_bytes=n_bytes, data_offset=data_offset, data=data, field=field)
        self.tensors = [tensors[str(bytes(f.parts[1]), encoding="utf-8")] for f in fields]
