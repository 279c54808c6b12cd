"""`verispec bench cpu-peer`: verispec's single-stream greedy decode against llama.cpp on the same GGUF file.

llama.cpp comes from the optional `cpu-peer` extra (llama-cpp-python, built from its source distribution:
`pip install -e '.[cpu-peer]'`), outside `make test`. Both run in this process, one after the other in
every round (ABBA order), on the same prompt token ids and the same thread count, because other
processes may share the cores: each round's ratio compares like with like, and min / median / max over
rounds are reported. Decode speed excludes the prompt: tokens after the first over the time after it.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

PROMPTS = (
    "Write a short story about a lighthouse keeper who finds a message in a bottle.",
    "Explain in a few sentences why the sky is blue.",
)


def add_cpu_peer_arguments(kinds: Any) -> None:
    peer = kinds.add_parser(
        "cpu-peer",
        help="single-stream greedy decode: verispec (native GGUF weights) vs llama.cpp on the same file",
        description="Greedy decoding of the same prompts by verispec's runner (the engine's own forward, native "
        "weights) and by llama.cpp (llama-cpp-python, the cpu-peer extra) on the same GGUF file and thread "
        "count, in ABBA rounds; prints decode tokens/s of both, their ratio (min, median, max over rounds) and "
        "resident weight memory against the file size.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    peer.add_argument("--model", default=None, help="the embedded model (default) or a .gguf file")
    peer.add_argument("--weights", default="native", help="verispec's weights: native or float32")
    peer.add_argument("--max-new-tokens", type=int, default=64, help="greedy tokens per run")
    peer.add_argument("--repeats", type=int, default=3, help="ABBA rounds per prompt")
    peer.add_argument("--threads", type=int, default=0, help="threads of both (0: what verispec chose at load)")
    peer.add_argument(
        "--with-float32",
        action="store_true",
        help="also time verispec on --weights float32 (the dequantized reference) in the same rounds",
    )
    peer.add_argument("--output", type=Path, default=None, help="also write the JSON here")


def run_cpu_peer(args: argparse.Namespace, progress: Callable[[str], None]) -> dict[str, Any]:
    import torch

    try:
        import llama_cpp
    except ImportError as exc:
        raise SystemExit("bench cpu-peer needs llama-cpp-python: pip install -e '.[cpu-peer]'") from exc
    from verispec.config import DEFAULT_MODEL, EngineConfig, ModelConfig
    from verispec.loader import load_backend
    from verispec.models import gguf_source
    from verispec.runner import build_runner

    spec = args.model or DEFAULT_MODEL
    config = ModelConfig(model=spec, device="cpu", weights=args.weights)
    gguf = gguf_source(spec, config.cache_dir)
    if gguf is None:
        raise SystemExit(f"bench cpu-peer needs a GGUF model (the embedded default or a .gguf file), not {spec!r}")
    progress(f"loading {spec} in verispec ({args.weights} weights)")
    backend, tokenizer = load_backend(config, spec)
    runner = build_runner(backend, EngineConfig(max_active_requests=1))
    threads = args.threads or torch.get_num_threads()  # what the native load chose, for every contender
    reference = None
    if args.with_float32:
        progress(f"loading {spec} in verispec (float32 weights)")
        dense, _ = load_backend(ModelConfig(model=spec, device="cpu", weights="float32"), spec)
        reference = build_runner(dense, EngineConfig(max_active_requests=1))
    torch.set_num_threads(threads)
    progress(f"loading {gguf.name} in llama.cpp {llama_cpp.__version__} ({threads} threads)")
    context = 2 * args.max_new_tokens + 256
    peer = llama_cpp.Llama(
        model_path=str(gguf), n_ctx=context, n_threads=threads, n_threads_batch=threads, verbose=False
    )
    suppress = sorted(tokenizer.eos_token_ids)
    contenders: dict[str, Callable[[list[int], int], tuple[float, list[int]]]] = {
        "verispec": lambda ids, n: _verispec_decode(runner, ids, n, suppress),
        "llama.cpp": lambda ids, n: _llama_decode(peer, ids, n, suppress),
    }
    if reference is not None:
        contenders["verispec_float32"] = lambda ids, n: _verispec_decode(reference, ids, n, suppress)
    rounds, agreement = _rounds(contenders, tokenizer, args.max_new_tokens, args.repeats, progress)
    extra: dict[str, Any] = {}
    if reference is not None:
        extra["decode_ratio_native_over_float32"] = _spread([r["verispec"] / r["verispec_float32"] for r in rounds])
    file_bytes = gguf.stat().st_size
    weight_bytes = backend.info.weight_bytes
    return {
        "benchmark": "cpu-peer",
        "model": spec,
        "gguf": gguf.name,
        "quantization": backend.info.quantization,
        "bits_per_weight": backend.info.bits_per_weight,
        "llama_cpp_version": llama_cpp.__version__,
        "torch_version": torch.__version__,
        "threads": threads,
        "max_new_tokens": args.max_new_tokens,
        "rounds_tokens_per_s": rounds,
        "decode_ratio_verispec_over_llama_cpp": _spread([r["verispec"] / r["llama.cpp"] for r in rounds]),
        **extra,
        "tokens_per_s_median": {name: round(statistics.median(r[name] for r in rounds), 2) for name in contenders},
        "greedy_same_prefix_tokens_verispec_llama_cpp": agreement,
        "gguf_file_bytes": file_bytes,
        "verispec_weight_bytes": weight_bytes,
        "weight_bytes_over_file": round(weight_bytes / file_bytes, 3),
    }


def _rounds(
    contenders: dict[str, Callable[[list[int], int], tuple[float, list[int]]]],
    tokenizer: Any,
    n: int,
    repeats: int,
    progress: Callable[[str], None],
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """Per prompt and round, each contender's decode tokens/s (mean of its two runs in ABC..CBA order)."""
    rounds: list[dict[str, Any]] = []
    agreement: dict[str, int] = {}
    names = list(contenders)
    for index, prompt in enumerate(PROMPTS):
        ids = tokenizer.encode_chat([("user", prompt)])
        for name in names:
            contenders[name](ids, 4)  # warm-up
        for repeat in range(repeats):
            progress(f"prompt {index + 1}/{len(PROMPTS)}, round {repeat + 1}/{repeats}")
            runs: dict[str, list[tuple[float, list[int]]]] = {name: [] for name in names}
            for name in (*names, *reversed(names)):
                runs[name].append(contenders[name](ids, n))
            row: dict[str, Any] = {"prompt": index}
            row.update({name: round(statistics.mean(r[0] for r in runs[name]), 2) for name in names})
            rounds.append(row)
            ours, theirs = runs["verispec"][0][1], runs["llama.cpp"][0][1]
            same = next((i for i, (a, b) in enumerate(zip(ours, theirs, strict=False)) if a != b), n)
            agreement[str(index)] = same
    return rounds, agreement


def _spread(values: list[float]) -> dict[str, float]:
    return {
        "min": round(min(values), 3),
        "median": round(statistics.median(values), 3),
        "max": round(max(values), 3),
    }


def _verispec_decode(runner: Any, ids: list[int], n: int, suppress: list[int]) -> tuple[float, list[int]]:
    """Decode tokens/s (after the first token) and the greedy tokens, through the engine's runner."""
    import torch

    from verispec.kv.pages import PageTable
    from verispec.runner.base import scratch_entry

    pool, table = runner.kv.new_pool(), PageTable()
    tokens: list[int] = []
    try:
        with torch.inference_mode():
            logits = runner.forward([scratch_entry(pool, table, ids, 0, 1)])[0]
            first = time.perf_counter()
            for i in range(n):
                logits[:, suppress] = float("-inf")
                tokens.append(int(logits[0].argmax()))
                if i < n - 1:
                    logits = runner.forward([scratch_entry(pool, table, [tokens[-1]], len(ids) + i, 1)])[0]
            elapsed = time.perf_counter() - first
    finally:
        runner.free(-1)
    return (n - 1) / elapsed, tokens


def _llama_decode(peer: Any, ids: list[int], n: int, suppress: list[int]) -> tuple[float, list[int]]:
    """The same through llama.cpp: prompt eval, then one eval per greedy token (end-of-sequence masked)."""
    import numpy as np

    peer.reset()
    peer.eval(ids)
    tokens: list[int] = []
    first = time.perf_counter()
    for i in range(n):
        # The last evaluated token's logits (llama-cpp-python keeps no scores without logits_all).
        logits = np.ctypeslib.as_array(peer._ctx.get_logits(), shape=(peer.n_vocab(),)).copy()
        logits[suppress] = -np.inf
        tokens.append(int(logits.argmax()))
        if i < n - 1:
            peer.eval([tokens[-1]])
    elapsed = time.perf_counter() - first
    return (n - 1) / elapsed, tokens
