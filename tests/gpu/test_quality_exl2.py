"""`bench quality-exl2` on the GPU: ExLlamaV2 reads the fp16 export as torch does, and a small run converts
with ExLlamaV2's own converter, measures the point with the exl2 backend and drafts with it.

Both need the embedded model in verispec's cache (the GPU machine has no network: `verispec fetch` it, or
carry its GGUF as `bench quality-exl2 --prepare` does).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from verispec.config import DEFAULT_MODEL, default_cache_dir
from verispec.tokenizer import Tokenizer
from verispec.tools.exl2_convert import export_fp16

pytestmark = pytest.mark.gpu

TEXT = (
    "And God said, Let there be a firmament in the midst of the waters, and let it divide the waters from the "
    "waters. And God made the firmament, and divided the waters which were under the firmament from the waters "
    "which were above the firmament: and it was so. And God called the firmament Heaven."
)


@pytest.fixture(scope="module")
def export_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("exllamav2")
    source = default_cache_dir() / "models" / DEFAULT_MODEL
    if not (source / ".verispec-converted").is_file():
        pytest.skip("the embedded model is not in verispec's cache")
    return export_fp16(source, tmp_path_factory.mktemp("fp16"))


def _kl_and_top1(reference: torch.Tensor, logits: torch.Tensor) -> tuple[float, float]:
    """Mean KL(reference || logits) per position and the share of positions whose argmax agrees."""
    ref, mine = torch.log_softmax(reference.float(), -1), torch.log_softmax(logits.float(), -1)
    kl = float((ref.exp() * (ref - mine)).sum(-1).mean())
    return kl, float((ref.argmax(-1) == mine.argmax(-1)).float().mean())


def test_exllamav2_reads_the_export_as_torch_does(export_dir: Path) -> None:
    """Unquantized, ExLlamaV2 on the export gives torch's float32 distribution to fp16 noise, with the rotary
    base of config.json's top level; with ExLlamaV2's default base instead (what a transformers-5 config alone
    would give it) the distribution is far off."""
    from exllamav2 import ExLlamaV2, ExLlamaV2Cache, ExLlamaV2Config

    from verispec.backends.exl2 import _use_causal_attention
    from verispec.backends.torch_ref import TorchRefBackend

    _use_causal_attention()  # as the exl2 backend does: multi-token forwards stay causal without flash-attn
    ids = Tokenizer(export_dir).encode(TEXT)
    torch_ref = TorchRefBackend(export_dir, "fp16-export", "cuda", "float32")
    reference = torch_ref.forward(torch_ref.new_cache(), ids, len(ids))
    results = {}
    for base in (None, 10000.0):
        config = ExLlamaV2Config(str(export_dir))
        if base is None:
            assert config.rotary_embedding_base == json.loads((export_dir / "config.json").read_text())["rope_theta"]
        else:
            config.rotary_embedding_base = base
        model: Any = ExLlamaV2(config)
        cache = ExLlamaV2Cache(model, max_seq_len=256, lazy=True)
        model.load_autosplit(cache)
        with torch.inference_mode():
            logits = model.forward(torch.tensor([ids]), cache, last_id_only=False)[0]
        results[base] = _kl_and_top1(reference, logits)
        model.unload()
    kl, top1 = results[None]
    assert kl < 5e-3 and top1 >= 0.95
    assert results[10000.0][0] > 10 * kl


def test_a_small_run_converts_measures_and_drafts(export_dir: Path, tmp_path: Path) -> None:
    """One point at 4 bpw from a short calibration, measured on 2,048 tokens and as a draft: the JSON has the
    point's stored bits near its target, fewer bytes than the export, a KL above the fp16 floor's and greedy
    drafts equal to plain decoding; run again, it reuses the measurement and the point."""
    output = tmp_path / "quality-exl2.json"
    command = [sys.executable, "-m", "verispec", "bench", "quality-exl2", "--bpw", "4", "--calibration-length", "256"]
    command += ["--tokens", "2048", "--draft-prompts", "1", "--draft-new-tokens", "16", "--decode-tokens", "16"]
    command += ["--work-dir", str(tmp_path / "work"), "--output", str(output)]
    subprocess.run(command, check=True, timeout=900, stdout=subprocess.DEVNULL)
    result = json.loads(output.read_text())
    assert result["status"] == "complete", result["status"]
    section = result["exl2"]
    (row,) = section["points"]
    assert "error" not in row and "speed_error" not in row, row
    assert 3.8 < row["decoder_bits_per_weight"] < 4.6 and row["head_bits_per_weight"] > 6
    assert row["weight_bytes"] < section["reference"]["weight_bytes"]
    rounding, half = section["reference"]["checks"]
    assert rounding["kl_divergence"] < 1e-3 and half["kl_divergence"] < 1e-2
    assert half["kl_divergence"] < row["kl_divergence"] < 2 and 0.3 < row["top1_agreement"] < 1
    assert row["decode_tokens_per_s"] > 0 and row["as_draft"]["greedy_outputs_identical"] is True
    assert set(row["as_draft"]["acceptance_by_position"]) <= {"1", "2", "3", "4"}
    subprocess.run(command, check=True, timeout=900, stdout=subprocess.DEVNULL)
    again = json.loads(output.read_text())["exl2"]
    assert again["converter"]["measurement_seconds"] is None and again["points"][0]["convert_seconds"] is None
    assert again["points"][0]["perplexity"] == pytest.approx(row["perplexity"], rel=1e-3)
