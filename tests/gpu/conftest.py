"""GPU fixtures: synthetic EXL2 checkpoints, the ExLlamaV2 backend, and its dequantized torch twin."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch

pytestmark = pytest.mark.gpu


def _need_gpu() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    pytest.importorskip("exllamav2")


def _synth_tiny(factory: pytest.TempPathFactory, name: str, seed: int) -> Path:
    _need_gpu()
    from verispec.tools.synth import synth

    path = factory.mktemp(name)
    synth("tiny", path, bits=4, seed=seed, device="cuda")
    return path


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The target: a tiny Llama, 4-bit EXL2, random weights."""
    return _synth_tiny(tmp_path_factory, "tiny-exl2", seed=1)


@pytest.fixture(scope="session")
def tiny_draft_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A draft of the same shape and vocabulary with other random weights: almost no draft is accepted."""
    return _synth_tiny(tmp_path_factory, "tiny-draft-exl2", seed=2)


@pytest.fixture(scope="session")
def exl2(tiny_dir: Path) -> Any:
    from verispec.backends.exl2 import Exl2Backend

    return Exl2Backend(tiny_dir, "tiny")


def dequantized_checkpoint(backend: Any, source: Path, out: Path) -> Path:
    """An fp16 transformers checkpoint whose weights are exactly the EXL2 weights, dequantized."""
    from exllamav2.linear import ExLlamaV2Linear
    from safetensors import safe_open
    from safetensors.torch import save_file

    state: dict[str, torch.Tensor] = {}
    for module in backend.model.modules:
        for sub in [module, *getattr(module, "submodules", [])]:
            if isinstance(sub, ExLlamaV2Linear):
                state[f"{sub.key}.weight"] = sub.get_weight_tensor_dq().T.contiguous().half().cpu()
    for path in source.glob("*.safetensors"):
        with safe_open(str(path), framework="pt") as handle:
            for key in handle.keys():  # noqa: SIM118
                if key.endswith(".weight") and not key.endswith(("q_weight",)):
                    state[key] = handle.get_tensor(key).half()
    out.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out / "model.safetensors"))
    config = json.loads((source / "config.json").read_text())
    config.pop("quantization_config")
    (out / "config.json").write_text(json.dumps(config))
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(source / name, out / name)
    return out


@pytest.fixture(scope="session")
def reference(exl2: Any, tiny_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Any:
    from verispec.backends.torch_ref import TorchRefBackend

    directory = dequantized_checkpoint(exl2, tiny_dir, tmp_path_factory.mktemp("tiny-dequantized"))
    return TorchRefBackend(directory, "tiny-dequantized", device="cuda", dtype="float32")


def paged_runner(backend: Any, engine: Any, gemm: str, cuda_graphs: bool = True) -> Any:
    """The exl2 paged runner with a given 4-bit GEMM mode (auto, verispec, exllamav2), with or without CUDA
    graphs, sized as build_runner sizes it."""
    from verispec.runner.exl2 import Exl2Runner

    max_tokens = engine.max_active_requests * (backend.info.max_context_length + engine.kv_page_size)
    return Exl2Runner(
        backend, engine.kv_page_size, engine.kv_cache_memory, max_tokens, gemm=gemm, cuda_graphs=cuda_graphs
    )
