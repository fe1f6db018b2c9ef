"""Every output format, by name: the one place that lists them. The commands ask this module, never a name.

    fmt = format_named("gguf")            # an ExportFormat
    fmt, path = detect_artifact(p)        # which format a file or folder is, and the path its runtime opens
"""

from __future__ import annotations

import os
from pathlib import Path

from formats.executorch_format import ExecuTorchFormat
from formats.gguf_format import GGUFFormat
from formats.onnx_format import OnnxFormat
from formats.protocol import ArtifactError, ExportFormat

# in the card's order of preference (the Hub library_name is the first present)
FORMATS: dict[str, ExportFormat] = {f.name: f for f in (GGUFFormat(), OnnxFormat(), ExecuTorchFormat())}
NAMES = tuple(FORMATS)


def format_named(name: str) -> ExportFormat:
    try:
        return FORMATS[name]
    except KeyError:
        raise ArtifactError(f"unknown format {name!r}: choose from {', '.join(NAMES)}") from None


def detect_artifact(artifact: str | os.PathLike) -> tuple[ExportFormat, Path]:
    """The format of an exported file or folder (by its content: magic bytes, model.onnx), and the path its runtime
    opens (the file, or the ONNX folder)."""
    path = Path(artifact)
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: give a .gguf file, an ONNX folder (model.onnx) or a .pte file")
    for fmt in FORMATS.values():
        found = fmt.detect(path)
        if found is not None:
            return fmt, found
    what = ("a folder without model.onnx and genai_config.json, not an exported ONNX decoder folder" if path.is_dir()
            else "not an exported file")
    raise ArtifactError(f"cannot tell the format of {path} ({what}): give a .gguf file, an ONNX folder "
                        "(model.onnx) or a .pte file")
