"""The layout rules that import-linter cannot see: formats are dispatched through formats.registry, never compared by
name outside formats/; the supported architectures are listed once (paretoq_export/canonical/model_description.py)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("paretoq_export", "qat", "formats", "runtime_tests")
FORMAT_NAME = r"""["'](?:gguf|onnx|executorch|GGUF|ONNX|ExecuTorch)["']"""
COMPARISON = re.compile(rf"(?:[=!]=|\bin)\s*\(?\s*{FORMAT_NAME}|{FORMAT_NAME}\s*[=!]=")


def _sources(*packages: str):
    for package in packages:
        yield from sorted((ROOT / package).rglob("*.py"))


# Known exceptions, each with the change that removes it; delete the entry when that lands.
NAME_COMPARISON_EXCEPTIONS: set[str] = set()


def test_no_format_name_compared_outside_formats():
    hits = [f"{path.relative_to(ROOT)}:{i}: {line.strip()}"
            for path in _sources("paretoq_export", "qat", "runtime_tests")
            if path.relative_to(ROOT).as_posix() not in NAME_COMPARISON_EXCEPTIONS
            for i, line in enumerate(path.read_text().splitlines(), 1) if COMPARISON.search(line)]
    assert not hits, "dispatch through formats.registry instead:\n" + "\n".join(hits)


def test_supported_architectures_listed_once():
    table = ROOT / "paretoq_export" / "canonical" / "model_description.py"
    hits = [f"{path.relative_to(ROOT)}:{i}" for path in _sources(*PACKAGES) if path != table
            for i, line in enumerate(path.read_text().splitlines(), 1)
            if re.search(r"""["'](?:Llama|Qwen2|Qwen3)ForCausalLM["']""", line)]
    assert not hits, "use paretoq_export.canonical.model_description.FAMILIES:\n" + "\n".join(hits)


def test_grid_container_rule_defined_once():
    """Half-integer zeros held as odd integers with half the step: canonical.grids.integer_form, nowhere else."""
    hits = [f"{path.relative_to(ROOT)}:{i}" for path in _sources("formats")
            for i, line in enumerate(path.read_text().splitlines(), 1)
            if re.search(r"grid\.zero\)?\s*!=\s*int\(|0\.5 if .*half|\"seq2\":\s*Container", line)]
    assert not hits, "\n".join(hits)
