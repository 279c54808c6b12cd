"""The ExLlamaV2 backend on a GPU: logits against the torch reference, rollback, lossless speculation."""

from __future__ import annotations

import secrets
from pathlib import Path
from typing import Any

import grpc
import pytest
import torch

from tests.conftest import spawn_serve
from tests.receivers import OtlpGrpcReceiver
from verispec.config import EngineConfig
from verispec.engine.core import EngineCore, run_to_completion
from verispec.request import (
    Request,
    ResponseOptions,
    SamplingParams,
    SpeculationMode,
    SpeculationParams,
    StoppingCriteria,
)
from verispec.spec.drafters import ModelDrafter, NgramDrafter
from verispec_proto.v1 import generation_pb2 as pb
from verispec_proto.v1 import generation_pb2_grpc as pb_grpc

from .conftest import paged_runner

pytestmark = pytest.mark.gpu

# fp16 activations and kernels against an fp32 reference on the same (dequantized) weights:
# (two fp16 runs of different shapes, e.g. rolled-back vs fresh caches, agree to within 0.5%)
# logits agree to within 2% of their range, and the argmax agrees nearly everywhere.
RELATIVE_TOLERANCE = 0.02

PROMPT = list(range(300, 340))
# Several runners share one GPU in these tests: each gets a modest KV pool.
SMALL_KV = EngineConfig(kv_cache_memory=2.0, max_active_requests=8)


def _close(actual: torch.Tensor, expected: torch.Tensor) -> tuple[float, float]:
    """(max |difference| / max |expected|, share of rows whose argmax agrees)."""
    expected = expected.to(actual.device)
    relative = float((actual - expected).abs().max() / expected.abs().max())
    agree = float((actual.argmax(-1) == expected.argmax(-1)).float().mean())
    return relative, agree


def test_prefill_and_verify_logits_match_the_reference(exl2: Any, reference: Any) -> None:
    a, b = exl2.new_cache(), reference.new_cache()
    relative, agree = _close(exl2.forward(a, PROMPT, 1), reference.forward(b, PROMPT, 1))
    print(f"prefill: relative {relative:.5f}, argmax agreement {agree:.3f}")
    assert relative < RELATIVE_TOLERANCE and agree == 1.0
    drafts = [401, 402, 403, 404, 405]  # a k+1 = 5 verify pass
    relative, agree = _close(exl2.forward(a, drafts, 5), reference.forward(b, drafts, 5))
    print(f"verify k+1=5: relative {relative:.5f}, argmax agreement {agree:.3f}")
    assert relative < RELATIVE_TOLERANCE and agree >= 0.8


def test_rollback_equals_fresh_prefill(exl2: Any) -> None:
    rolled, fresh = exl2.new_cache(), exl2.new_cache()
    exl2.forward(rolled, [*PROMPT, 1, 2, 3, 4, 5, 6], 1)
    exl2.rollback(rolled, len(PROMPT) + 2)
    exl2.forward(fresh, [*PROMPT, 1, 2], 1)
    assert rolled.length == fresh.length
    relative, agree = _close(exl2.forward(rolled, [77], 1), exl2.forward(fresh, [77], 1))
    assert relative < 5e-3 and agree == 1.0


def _request(mode: SpeculationMode, k: int, request_id: str) -> Request:
    return Request(
        request_id=request_id,
        prompt_token_ids=tuple(PROMPT),
        sampling=SamplingParams(),
        stopping=StoppingCriteria(max_new_tokens=48),
        response=ResponseOptions(),
        speculation=SpeculationParams(mode=mode, num_draft_tokens=k),
    )


@pytest.mark.parametrize("gemm", ["auto", "verispec", "exllamav2"])
@pytest.mark.parametrize("drafter", ["self", "random", "ngram"])
def test_greedy_speculative_equals_greedy_plain_on_gpu(
    exl2: Any, tiny_draft_dir: Path, drafter: str, gemm: str
) -> None:
    from verispec.backends.exl2 import Exl2Backend
    from verispec.tokenizer import Tokenizer

    if drafter == "ngram":
        drafters: dict[SpeculationMode, Any] = {SpeculationMode.NGRAM: NgramDrafter(1, 3)}
        mode = SpeculationMode.NGRAM
    else:
        draft = exl2 if drafter == "self" else Exl2Backend(tiny_draft_dir, "tiny-draft")
        drafters = {SpeculationMode.DRAFT_MODEL: ModelDrafter(paged_runner(draft, SMALL_KV, gemm))}
        mode = SpeculationMode.DRAFT_MODEL
    core = EngineCore(paged_runner(exl2, SMALL_KV, gemm), Tokenizer(tiny_draft_dir), drafters, SMALL_KV)
    core.start()
    try:
        plain = [t for o in run_to_completion(core, _request(SpeculationMode.OFF, 0, "plain")) for t in o.token_ids]
        outputs = run_to_completion(core, _request(mode, 4, "spec"))
    finally:
        core.stop(10)
    assert [t for o in outputs for t in o.token_ids] == plain
    stats = outputs[-1].spec
    assert stats is not None
    print(f"{drafter}: {stats.num_accepted_tokens}/{stats.num_draft_tokens} accepted in {stats.num_steps} steps")
    if drafter == "self":
        assert stats.num_accepted_tokens == stats.num_draft_tokens > 0


def test_two_gpu_split_matches_one_gpu(tmp_path_factory: pytest.TempPathFactory) -> None:
    """A Llama-8B-shape checkpoint (about 5 GB at 4 bits) with a 3 GB share on GPU 0 spreads over both
    GPUs and gives the same logits as on one GPU. (ExLlamaV2 keeps ~0.7 GB of each share for scratch.)"""
    if torch.cuda.device_count() < 2:
        pytest.skip(f"needs 2 GPUs, {torch.cuda.device_count()} visible")
    from verispec.backends.exl2 import Exl2Backend
    from verispec.tools.synth import synth

    path = tmp_path_factory.mktemp("llama-8b-exl2")
    synth("llama-8b", path, bits=4, seed=3, device="cuda")
    one = Exl2Backend(path, "one-gpu", gpu_split=(16.0,), max_context_length=2048)
    split = Exl2Backend(path, "two-gpus", gpu_split=(3.0, 16.0), max_context_length=2048)
    assert one.info.devices == ("cuda:0",)
    assert split.info.devices == ("cuda:0", "cuda:1")
    relative, agree = _close(split.forward(split.new_cache(), PROMPT, 1), one.forward(one.new_cache(), PROMPT, 1))
    print(f"2-GPU split vs 1 GPU: max relative difference {relative:.2e}, argmax agreement {agree:.3f}")
    assert relative < 5e-3 and agree == 1.0


def test_server_streams_with_the_exl2_backend(tiny_dir: Path, tiny_draft_dir: Path, tmp_path: Path) -> None:
    """`serve --backend exl2` streams a greedy answer with speculation, exports one draft and one verify
    span per step under the caller's trace to a real OTLP receiver, and reports device memory."""
    receiver = OtlpGrpcReceiver()
    env = {"OTEL_TRACES_EXPORTER": "otlp", "OTEL_EXPORTER_OTLP_ENDPOINT": receiver.endpoint}
    flags = ["--backend", "exl2", "--model", str(tiny_dir), "--draft-model", str(tiny_draft_dir)]
    serve = spawn_serve(tmp_path / "serve.log", *flags, "--cache-mode", "q4", env=env)
    trace_id = secrets.token_hex(16)
    try:
        with grpc.insecure_channel(serve.address) as channel:
            stub = pb_grpc.GenerationServiceStub(channel)
            request = pb.StreamGenerateRequest(
                prompt="Hello world",
                max_new_tokens=16,
                min_new_tokens=16,
                speculation=pb.SpeculationParams(mode=pb.SPECULATION_MODE_DRAFT_MODEL),
            )
            metadata = [("traceparent", f"00-{trace_id}-{secrets.token_hex(8)}-01")]
            messages = list(stub.StreamGenerate(request, metadata=metadata, timeout=120))
            assert sum(len(m.token_ids) for m in messages) == 16
            stats = messages[-1].speculation
            assert stats.num_draft_tokens > 0
            info = stub.ModelInfo(pb.ModelInfoRequest())
            assert info.backend == "exl2" and info.cache_mode == "q4" and info.quantization == "exl2"
            health = stub.Health(pb.HealthRequest())
            assert health.devices and health.devices[0].device.startswith("cuda:")
            assert health.devices[0].used_bytes > 0
        spans = receiver.wait_for(trace_id, "verispec.v1.GenerationService/StreamGenerate")
    finally:
        serve.stop()
        receiver.close()
    names = [s.name for s in spans]
    assert names.count("spec.draft") == names.count("spec.verify") == stats.num_steps
    verifies = [s for s in spans if s.name == "spec.verify"]
    assert sum(s.attributes["verispec.spec.num_draft_tokens"] for s in verifies) == stats.num_draft_tokens
    assert all(s.attributes["verispec.spec.drafter"] == "draft_model" for s in verifies)
    print(f"exl2 server: {len(spans)} spans, {stats.num_steps} steps, {stats.num_draft_tokens} drafts")
