"""The pieces the benchmarks share (verispec.tools.common), and the direction of imports inside tools."""

from __future__ import annotations

import argparse
import ast
from pathlib import Path

import pytest

from verispec.tools.common import PositionCounts, concurrency_list

TOOLS = Path(__file__).resolve().parents[1] / "service" / "verispec" / "tools"


def test_concurrency_list_reads_positive_counts() -> None:
    assert concurrency_list("1,2, 8,") == (1, 2, 8)
    for bad in ("", "0,2", "two"):
        with pytest.raises(argparse.ArgumentTypeError):
            concurrency_list(bad)


def test_position_counts_count_only_while_enabled() -> None:
    counts = PositionCounts()
    counts.on_step("ngram", 3, 1, 0.0, 0.0)
    assert counts.rates() == {}
    counts.enabled = True
    counts.on_step("ngram", 3, 1, 0.0, 0.0)
    counts.on_step("ngram", 2, 2, 0.0, 0.0)
    assert counts.rates() == {"1": 1.0, "2": 0.5, "3": 0.0}
    counts.clear()
    assert counts.rates() == {}


def _imported(path: Path) -> set[str]:
    names: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom) and node.module:
            names.add(node.module)
        elif isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
    return names


def test_no_tool_imports_the_bench_command_module() -> None:
    """bench.py dispatches to the other tools; they take what they share from tools.common, never from
    bench.py, so imports inside tools point one way."""
    back = {
        path.name
        for path in TOOLS.glob("*.py")
        if path.name != "bench.py" and "verispec.tools.bench" in _imported(path)
    }
    assert back == set()
    assert not [name for name in _imported(TOOLS / "common.py") if name.startswith("verispec.tools")]
