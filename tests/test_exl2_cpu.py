"""The exl2 backend's CPU-side parts: split planning and the synthetic checkpoint writer."""

from __future__ import annotations

import json
import subprocess
from pathlib import Path

import pytest
import torch

from tests.conftest import BIN
from verispec.backends.exl2 import GIB, checkpoint_sizes, plan_split
from verispec.errors import ConfigError
from verispec.tools.synth import SHAPES, layer_bytes, linear_bytes, synth


def _fixed(shape_name: str) -> int:
    shape = SHAPES[shape_name]
    return shape.vocab * shape.hidden * 2 + linear_bytes(shape.hidden, shape.vocab, 4) + shape.hidden * 2


def test_70b_at_4_bits_is_refused_on_two_24gb_cards_with_the_shortfall() -> None:
    layers = layer_bytes(SHAPES["llama-70b"], 4)
    total_gb = (sum(layers) + _fixed("llama-70b")) / GIB
    assert 34 < total_gb < 36, "a 4.0 bpw 70B is about 35 GB of weights"
    with pytest.raises(ConfigError) as info:
        plan_split(layers, _fixed("llama-70b"), [16, 16])
    assert info.value.setting == "--gpu-split"
    assert "GB short" in str(info.value) and "GPU 1 overflows" in str(info.value)


def test_70b_split_fits_two_24gb_cards() -> None:
    layers = layer_bytes(SHAPES["llama-70b"], 4)
    placement = plan_split(layers, _fixed("llama-70b"), [17.5, 19])
    assert placement[0] == 0 and placement[-1] == 1
    assert placement == sorted(placement), "layers fill GPU 0, then GPU 1"


def test_synth_tiny_checkpoint(tmp_path: Path) -> None:
    """The tiny shape is written with EXL2 tensors whose sizes match the planner's arithmetic."""
    summary = synth("tiny", tmp_path, bits=4, seed=1)
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "exl2"
    layers, fixed = checkpoint_sizes(tmp_path)
    assert layers == layer_bytes(SHAPES["tiny"], 4)
    assert sum(layers) + fixed == summary["bytes"]
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tokenizer) == SHAPES["tiny"].vocab
    ids = tokenizer("Hello, world!")["input_ids"]
    assert tokenizer.decode(ids) == "Hello, world!"
    # bench exl2's roofline counts every byte a pass reads: all of it but the fp16 embedding table
    from verispec.tools.bench_exl2 import _weight_bytes_per_pass

    embedding = SHAPES["tiny"].vocab * config["hidden_size"] * 2
    assert _weight_bytes_per_pass(str(tmp_path)) == summary["bytes"] - embedding


def test_synthetic_tokenizer_reaches_llama3_vocabulary(tmp_path: Path) -> None:
    from transformers import AutoTokenizer

    from verispec.tools.synth import write_tokenizer

    write_tokenizer(tmp_path, 128256)
    tokenizer = AutoTokenizer.from_pretrained(str(tmp_path))
    assert len(tokenizer) == 128256
    assert tokenizer.decode(tokenizer("The quick brown fox")["input_ids"]) == "The quick brown fox"


def test_bench_exl2_refuses_bad_input_before_gpu_work(tmp_path: Path) -> None:
    """A bad split names its flag (exit 2); no CUDA device is said plainly (exit 1), not a torch traceback."""
    bench = [str(BIN / "verispec"), "bench", "exl2", "--model", str(tmp_path), "--draft-model", str(tmp_path)]
    bad = subprocess.run([*bench, "--gpu-split", "2,x"], capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "--gpu-split: cannot read '2,x'" in bad.stderr, bad.stderr
    if torch.cuda.is_available():
        return
    no_gpu = subprocess.run(bench, capture_output=True, text=True, timeout=120, check=False)
    assert no_gpu.returncode == 1 and "needs a CUDA device" in no_gpu.stderr and "Traceback" not in no_gpu.stderr


def test_bench_gemm_refuses_bad_rows_and_says_plainly_that_it_needs_cuda() -> None:
    """--rows is checked by the parser (exit 2); without a CUDA device the bench says so (exit 1)."""
    bench = [str(BIN / "verispec"), "bench", "gemm"]
    bad = subprocess.run([*bench, "--rows", "1,x"], capture_output=True, text=True, timeout=120, check=False)
    assert bad.returncode == 2 and "--rows" in bad.stderr, bad.stderr
    if torch.cuda.is_available():
        return
    no_gpu = subprocess.run(bench, capture_output=True, text=True, timeout=120, check=False)
    assert no_gpu.returncode == 1 and "needs a CUDA device" in no_gpu.stderr and "Traceback" not in no_gpu.stderr


def test_a_pass_replays_the_smallest_captured_bucket_that_holds_it() -> None:
    """7 rows run in the bucket of 8; a bucket whose capture failed passes to the next one captured; no
    rows, or more than the largest bucket, launch eagerly."""
    from verispec.runner.exl2_graphs import GRAPH_BUCKETS, bucket_for

    every = set(GRAPH_BUCKETS)
    assert [bucket_for(n, every) for n in (1, 3, 5, 7, 13, 64)] == [1, 3, 5, 8, 16, 64]
    assert bucket_for(7, every - {8}) == 12
    assert bucket_for(0, every) is None
    assert bucket_for(GRAPH_BUCKETS[-1] + 1, every) is None
    assert bucket_for(2, set()) is None


def test_graph_segments_follow_the_gpu_split() -> None:
    """One graph per run of modules on one GPU, after the embedding; a module without a GPU of its own
    stays in the run around it."""
    from types import SimpleNamespace

    from verispec.runner.exl2_graphs import segments

    def modules(*devices: int | None) -> list[SimpleNamespace]:
        return [SimpleNamespace(device_idx=d) for d in devices]

    one = segments(modules(-1, 0, 0, 0, 0))
    assert [(s.device, s.start, s.stop) for s in one] == [(0, 1, 5)]
    split = segments(modules(-1, 0, 0, None, 0, 1, 1, 1))
    assert [(s.device, s.start, s.stop) for s in split] == [(0, 1, 5), (1, 5, 8)]
    with pytest.raises(ValueError, match="no module"):
        segments(modules(-1, None))
