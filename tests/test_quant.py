"""The embedded model on its own GGUF blocks (int4 kernel) against its float32 dequantization.

Every mapped tensor's weights must equal the float32 reference bit for bit; logits and greedy text may
differ only as bfloat16 kernel arithmetic allows (stated tolerances below).
"""

from __future__ import annotations

import math
from typing import Any

import numpy as np
import pytest
import torch

from tests.conftest import RunningServer, Target
from tests.test_batching import PROMPTS
from verispec.backends.torch_ref import SmallBatchLinear, route_small_linears, use_float64_attention
from verispec.config import DEFAULT_MODEL, ModelConfig
from verispec.models import gguf_source
from verispec.quant.gguf import _decode
from verispec.quant.int4 import Int4Embedding, Int4Linear, PackedLayout, pack
from verispec_proto.v1 import generation_pb2 as pb

# Measured on the 64-token prompt below: max |diff| 1.9% of the largest logit, mean |diff| 0.09, mean
# KL(float32 || native) 9e-4, argmax equal at 63 of 64 positions.
MAX_REL_DIFF = 0.05
MAX_MEAN_ABS_DIFF = 0.15
MAX_MEAN_KL = 5e-3
NEAR_TIE = 0.15  # a greedy flip is allowed only where float32's top two logits are this close


def test_packed_layout_reads_back_every_code() -> None:
    layout = PackedLayout.detect()
    assert layout is not None
    codes = torch.randint(0, 16, (4 * layout.block_n, 96), dtype=torch.uint8)
    packed = pack(codes)
    assert torch.equal(layout.unpack(packed, 96), codes)
    rows = torch.tensor([0, 5, 3 * layout.block_n + 1, 4 * layout.block_n - 1])
    assert torch.equal(layout.unpack_rows(packed, 96, rows), codes[rows])


def test_native_weights_equal_the_float32_weights_bit_for_bit(target: Target, reference: Target) -> None:
    """Every Int4Linear (Q4_1 projections) and the Q8_0 embedding / tied head, per tensor."""
    dense = dict(reference.backend.model.named_parameters())
    checked: dict[str, int] = {}
    for name, module in target.backend.model.named_modules():
        if isinstance(module, Int4Linear) and f"{name}.weight" in dense:
            assert torch.equal(module.dequantize(), dense[f"{name}.weight"]), name
            kind = module.source.split()[0]
            checked[kind] = checked.get(kind, 0) + 1
    assert checked == {"Q4_1": 210}  # 30 layers x 7 projections
    embedding = target.backend.model.get_input_embeddings()
    assert isinstance(embedding, Int4Embedding) and embedding.weights.source.startswith("Q8_0")
    table = dense["model.embed_tokens.weight"]
    assert torch.equal(embedding.weights.dequantize(), table)
    ids = torch.tensor([[0, 1, 2, 49151], [17, 17, 4000, 123]])
    assert torch.equal(embedding(ids), table[ids])
    assert target.backend.model.lm_head is embedding.weights  # tied: one copy serves both


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q4_K", "Q8_0"])
def test_each_block_type_maps_exactly(type_name: str) -> None:
    """Random blocks of each mapped type: the layer's weights equal gguf-py's own dequantization, and its
    kernel output is that of the dequantized weights to bfloat16 accuracy."""
    import gguf

    rng = np.random.default_rng(7)
    n, k = 128, 512
    qtype = gguf.GGMLQuantizationType[type_name]
    block, size = gguf.GGML_QUANT_SIZES[qtype]
    raw = rng.integers(0, 256, size=(n * k // block, size), dtype=np.uint8)
    scales = rng.uniform(-0.02, 0.02, size=(raw.shape[0], 2)).astype(np.float16).view(np.uint8)
    raw[:, :4] = scales  # finite d (and m / dmin) where the type has them
    expected = torch.from_numpy(gguf.dequantize(raw.reshape(n, -1), qtype).reshape(n, k).astype(np.float32))
    codes, scale, offset = _decode(raw.reshape(n, -1), type_name, n, k)
    layer = Int4Linear("int8" if type_name == "Q8_0" else "int4", codes, scale, offset, source=type_name)
    assert torch.equal(layer.dequantize(), expected)
    x = torch.randn(3, k)
    got, want = layer(x), x @ expected.T
    assert float((got - want).abs().max()) < 0.02 * float(want.abs().max())


def _prompt_64(target: Target) -> list[int]:
    text = " ".join(PROMPTS) + " " + " ".join(reversed(PROMPTS))
    ids = target.tokenizer.encode(text)
    assert len(ids) >= 64
    return ids[:64]


def test_logits_of_a_64_token_prompt_match_float32(target: Target, reference: Target) -> None:
    ids = _prompt_64(target)
    native = target.backend.forward(target.backend.new_cache(), ids, 64)
    exact = reference.backend.forward(reference.backend.new_cache(), ids, 64)
    diff = (native - exact).abs()
    assert float(diff.max()) < MAX_REL_DIFF * float(exact.abs().max())
    assert float(diff.mean()) < MAX_MEAN_ABS_DIFF
    log_p, log_q = exact.log_softmax(-1), native.log_softmax(-1)
    assert float((log_p.exp() * (log_p - log_q)).sum(-1).mean()) < MAX_MEAN_KL
    assert int((native.argmax(-1) == exact.argmax(-1)).sum()) >= 62


def _greedy(target: Target, ids: list[int], n: int) -> tuple[list[int], list[torch.Tensor]]:
    backend = target.backend
    cache = backend.new_cache()
    logits = backend.forward(cache, ids, 1)
    tokens, rows = [], []
    for _ in range(n):
        rows.append(logits[0])
        tokens.append(int(logits[0].argmax()))
        logits = backend.forward(cache, [tokens[-1]], 1)
    return tokens, rows


def test_greedy_text_of_the_test_prompts_matches_float32_up_to_near_ties(target: Target, reference: Target) -> None:
    """Greedy continuations (32 tokens, chat-templated) of the test prompts on native and float32 weights are
    the same, or part where float32's own top two logits are within NEAR_TIE (printed with -s)."""
    flips = []
    for prompt in PROMPTS:
        ids = target.tokenizer.encode_chat([("user", prompt)])
        native, _ = _greedy(target, ids, 32)
        exact, rows = _greedy(reference, ids, 32)
        if native == exact:
            continue
        at = next(i for i, (a, b) in enumerate(zip(native, exact, strict=True)) if a != b)
        top = torch.topk(rows[at], 2)
        margin = float(top.values[0] - top.values[1])
        flips.append((prompt, at, margin))
        assert margin < NEAR_TIE, (prompt, at, margin)
        assert native[at] in top.indices.tolist(), (prompt, at)  # the runner-up, not some other token
    print(f"greedy flips at near-ties (prompt, position, float32 top-2 margin): {flips}")
    assert len(flips) <= len(PROMPTS) // 2


def test_model_info_and_health_report_the_native_weights(server: RunningServer) -> None:
    info = server.stub.ModelInfo(pb.ModelInfoRequest())
    assert info.quantization == "gguf-q4_1"
    assert math.isclose(info.bits_per_weight, 5.0)  # Q4_1: 4-bit codes + f16 scale and min per 32
    gguf = gguf_source(DEFAULT_MODEL, ModelConfig().cache_dir)
    assert gguf is not None
    assert 0 < info.weight_bytes <= 1.3 * gguf.stat().st_size
    assert server.stub.Health(pb.HealthRequest()).weight_bytes == info.weight_bytes


def test_float32_reference_reports_itself(reference: Target) -> None:
    info = reference.backend.info
    assert info.quantization == "gguf-q4_1-dequantized" and info.bits_per_weight == 32.0
    assert info.weight_bytes >= 4 * 134_000_000


def test_few_row_route_is_chosen_by_timing() -> None:
    """The W @ x^T route is taken only for row counts where it measured faster."""
    model = torch.nn.Sequential(torch.nn.Linear(256, 2048, bias=False), torch.nn.Linear(2048, 64, bias=False))
    route = route_small_linears(model)
    assert set(route.timings_ms) == {"1", "2", "4", "8"}
    routed = [m for m in model.modules() if isinstance(m, SmallBatchLinear)]
    assert len(routed) == route.linears
    for n, (linear, transposed) in route.timings_ms.items():
        if int(n) in route.rows:
            assert transposed < linear
    x = torch.randn(2, 256)
    first, second = model[0], model[1]
    assert isinstance(first, torch.nn.Linear) and isinstance(second, torch.nn.Linear)
    assert torch.allclose(model(x), x @ first.weight.T @ second.weight.T, rtol=1e-4, atol=1e-5)


def _tiny_causal_lm(architecture: str) -> Any:
    from transformers import Gemma3ForCausalLM, Gemma3TextConfig, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    shape: dict[str, Any] = {"vocab_size": 64, "hidden_size": 32, "intermediate_size": 64, "num_hidden_layers": 2}
    shape |= {"num_attention_heads": 2, "num_key_value_heads": 1, "attn_implementation": "sdpa"}
    model: Any
    if architecture == "llama":
        model = LlamaForCausalLM(LlamaConfig(**shape))
    else:
        layers = ["sliding_attention", "full_attention"]
        model = Gemma3ForCausalLM(Gemma3TextConfig(**shape, head_dim=16, sliding_window=4, layer_types=layers))
    return model.eval()


@pytest.mark.parametrize("architecture", ["llama", "gemma3"])
def test_float64_attention_masks_passes_over_a_filled_cache(architecture: str) -> None:
    """Under the float64 attention of int4-kernel models, a prompt fed in passes of 3 tokens over the
    cache (chunked prefill, verify) gives the logits of one plain SDPA forward of the whole prompt: causal
    from the cache's end, and Gemma 3's sliding window (4 here, the prompt 12) kept."""
    from transformers import DynamicCache

    model: Any = _tiny_causal_lm(architecture)
    ids = torch.randint(0, 64, (1, 12), generator=torch.Generator().manual_seed(1))
    with torch.inference_mode():
        whole = model(input_ids=ids).logits[0]
        use_float64_attention(model)
        cache = DynamicCache(config=model.config)
        passes = [
            model(input_ids=ids[:, i : i + 3], past_key_values=cache, use_cache=True).logits[0] for i in (0, 3, 6, 9)
        ]
    assert torch.allclose(torch.cat(passes), whole, atol=1e-5), float((torch.cat(passes) - whole).abs().max())
