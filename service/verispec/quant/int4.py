"""Linear and embedding layers on torch's int4 CPU kernel (affine int4 in groups of 32), exact in storage.

A layer keeps the 4-bit codes in the kernel's packed layout and the block parameters exactly as the
source stored them, so `dequantize()` reproduces the source's float32 weights bit for bit. The kernel
itself runs on bfloat16: on x86 only `_weight_int4pack_mm_for_cpu`'s bfloat16 path is vectorised
(measured on the 2-core CI machine, SmolLM2's 49152x576 head: 0.8-0.9 ms per token in bfloat16 against
26 ms with float32 activations and 20-22 ms for a float32 `F.linear`), so activations go in as bfloat16,
the per-group scale and zero point are given to it rounded to bfloat16, and its output (bfloat16) comes
back in the caller's dtype. Everything around the linear layers (norms, attention, residuals) stays in
the model's dtype.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

GROUP = 32  # the kernel's group size used here: GGUF's block (Q4_0, Q4_1, Q8_0) and Q4_K's sub-block
_PROBE_ROWS = 256
_CHECKED: set[tuple[int, int]] = set()
_PROBE_COLS = 32


def pack(codes: torch.Tensor) -> torch.Tensor:
    """[N, K] codes in 0..15 -> the kernel's packed uint8 [N, K/2] (its layout depends on the CPU)."""
    packed: torch.Tensor = torch.ops.aten._convert_weight_to_int4pack_for_cpu(codes.to(torch.int32).contiguous(), 1)
    return packed


@dataclass(frozen=True)
class PackedLayout:
    """Where `pack` puts each code: blocks of `block_n` rows, one run of `block_n` nibbles per column k
    inside a block, row r of the block at nibble `nibble_of_row[r]` of that run (nibble 2b is the low
    half of byte b). Learnt from the packing function itself, so it follows torch's CPU dispatch."""

    block_n: int
    nibble_of_row: torch.Tensor  # [block_n] int64

    @staticmethod
    @functools.cache
    def detect() -> PackedLayout | None:
        """The layout of this process's `pack`, from probe patterns; None if it is not of this form."""
        rows = torch.arange(_PROBE_ROWS).unsqueeze(1).expand(_PROBE_ROWS, _PROBE_COLS)
        cols = torch.arange(_PROBE_COLS).unsqueeze(0).expand(_PROBE_ROWS, _PROBE_COLS)
        row_at = _nibbles(pack(rows % 16)).long() + 16 * _nibbles(pack(rows // 16)).long()
        col_at = _nibbles(pack(cols % 16)).long() + 16 * _nibbles(pack(cols // 16)).long()
        position = torch.empty(_PROBE_ROWS, _PROBE_COLS, dtype=torch.long)
        position[row_at, col_at] = torch.arange(row_at.numel())
        if sorted(set((row_at * _PROBE_COLS + col_at).tolist())) != list(range(row_at.numel())):
            return None  # not a one-to-one placement of codes
        for block_n in (2, 4, 8, 16, 32, 64, 128, 256):
            if int(row_at[: block_n * _PROBE_COLS].max()) == block_n - 1:
                break
        nibble_of_row = position[:block_n, 0].clone()
        r, k = torch.arange(_PROBE_ROWS).unsqueeze(1), torch.arange(_PROBE_COLS).unsqueeze(0)
        expected = (r // block_n) * block_n * _PROBE_COLS + k * block_n + nibble_of_row[r % block_n]
        if not torch.equal(expected, position):
            return None
        return PackedLayout(block_n, nibble_of_row)

    def unpack(self, packed: torch.Tensor, k: int) -> torch.Tensor:
        """The codes [N, K] (uint8) of a packed matrix."""
        n = packed.shape[0]
        runs = _nibbles(packed).view(n // self.block_n, k, self.block_n)
        return runs[:, :, self.nibble_of_row].transpose(1, 2).reshape(n, k)

    def unpack_rows(self, packed: torch.Tensor, k: int, rows: torch.Tensor) -> torch.Tensor:
        """The codes [len(rows), K] (uint8) of the given rows of a packed matrix."""
        n = packed.shape[0]
        blocks = packed.view(n // self.block_n, k, self.block_n // 2)[rows // self.block_n]  # [R, K, bn/2]
        nibble = self.nibble_of_row[rows % self.block_n]  # [R]
        byte = blocks.gather(2, (nibble // 2).view(-1, 1, 1).expand(-1, k, 1)).squeeze(2)
        shift = (4 * (nibble % 2)).to(torch.uint8).view(-1, 1)
        return (byte >> shift) & 15


def _nibbles(packed: torch.Tensor) -> torch.Tensor:
    """Bytes -> their nibbles in order (low half first), flattened."""
    flat = packed.reshape(-1)
    return torch.stack((flat & 15, flat >> 4), dim=1).reshape(-1)


class Int4Linear(torch.nn.Module):
    """y = x W^T (+ bias) on torch's int4 CPU kernel, with W held exactly.

    kind "int4": W = codes * scale - offset, per row and group of 32 (Q4_0, Q4_1, Q4_K).
    kind "int8": W = (16 * hi + lo - 128) * scale, two 4-bit halves of an int8 code (Q8_0). They are packed
    side by side as one [N, 2K] matrix (groups of hi, then groups of lo) and the input is given twice,
    [x, x]: one kernel call whose fp32 accumulation adds both halves before its single bfloat16 rounding
    (16*scale, and 8*scale for the low half's zero point, are scale times a power of two: exact).
    """

    packed0: torch.Tensor
    kernel0: torch.Tensor
    scale: torch.Tensor
    offset: torch.Tensor | None

    def __init__(
        self,
        kind: str,
        codes: list[torch.Tensor],
        scale: torch.Tensor,
        offset: torch.Tensor | None,
        bias: torch.Tensor | None = None,
        source: str = "",
    ) -> None:
        super().__init__()
        layout = PackedLayout.detect()
        if layout is None:
            raise RuntimeError("torch's int4 CPU packing has a layout this build does not know")
        n, k = codes[0].shape
        if k % GROUP or n % layout.block_n:
            raise ValueError(f"shape {n}x{k}: needs K % {GROUP} == 0 and N % {layout.block_n} == 0")
        self.kind, self.source = kind, source
        self.in_features, self.out_features = k, n
        self.layout = layout
        s32 = scale.float()
        if kind == "int4":
            assert offset is not None
            s, z = s32, 8 * s32 - offset.float()  # the kernel computes (code - 8) * scale + zero
        else:
            s = torch.cat((16 * s32, s32), dim=1)
            z = torch.cat((torch.zeros_like(s32), 8 * s32), dim=1)
        self.parts = len(codes)
        codes_all = torch.cat(codes, dim=1) if self.parts > 1 else codes[0]
        packed = pack(codes_all)
        width = k * self.parts
        if (n, width) not in _CHECKED:  # the layout was learnt on a probe: check it once per shape
            rows = torch.unique(torch.cat((torch.tensor([0, n - 1]), torch.randperm(n)[:64])))
            if not torch.equal(layout.unpack_rows(packed, width, rows), codes_all[rows].to(torch.uint8)):
                raise RuntimeError(f"{source}: packed codes do not read back")
            _CHECKED.add((n, width))
        self.register_buffer("packed0", packed)
        # [K*parts/32, N, 2]: scale and zero of each group, in the kernel's bfloat16.
        self.register_buffer("kernel0", torch.stack((s, z), dim=2).transpose(0, 1).contiguous().bfloat16())
        self.register_buffer("scale", scale)
        self.register_buffer("offset", offset)
        self.bias = torch.nn.Parameter(bias, requires_grad=False) if bias is not None else None

    @staticmethod
    def fused(layers: list[Int4Linear]) -> Int4Linear:
        """One layer computing the given layers' outputs side by side (q, k, v; gate, up): one kernel call
        instead of several. Each packed matrix is whole blocks of rows, so the fused codes are the layers'
        codes one after another; the layers' own packed codes become views of the fused ones (no copy)."""
        first = layers[0]
        if any(x.kind != "int4" or x.in_features != first.in_features or x.bias is not None for x in layers):
            raise ValueError("only bias-free int4 layers of one input size fuse")
        fused = Int4Linear.__new__(Int4Linear)
        torch.nn.Module.__init__(fused)
        fused.kind, fused.layout, fused.source = "int4", first.layout, "+".join(x.source for x in layers)
        fused.parts = 1
        fused.in_features, fused.out_features = first.in_features, sum(x.out_features for x in layers)
        fused.register_buffer("packed0", torch.cat([x.packed0 for x in layers]))
        fused.register_buffer("kernel0", torch.cat([x.kernel0 for x in layers], dim=1))
        fused.register_buffer("scale", None)  # the exact weights stay with the layers themselves
        fused.register_buffer("offset", None)
        fused.bias = None
        start = 0
        for x in layers:  # views: the layers' own forward (transformers' path) makes its scales contiguous
            x.packed0 = fused.packed0[start : start + x.out_features]
            x.kernel0 = fused.kernel0[:, start : start + x.out_features]
            start += x.out_features
        return fused

    def _codes(self, i: int, rows: torch.Tensor | None) -> torch.Tensor:
        """Codes of part i (int8: 0 the high half, 1 the low) of `rows` (all when None), uint8 [R, K]."""
        width = self.in_features * self.parts
        if rows is None:
            codes = self.layout.unpack(self.packed0, width)
        else:
            codes = self.layout.unpack_rows(self.packed0, width, rows)
        return codes[:, i * self.in_features : (i + 1) * self.in_features]

    def _weights(self, rows: torch.Tensor | None) -> torch.Tensor:
        """Exact float32 weights of `rows` (all rows when None), as the source's dequantization gives them."""
        scale = (self.scale if rows is None else self.scale[rows]).float().repeat_interleave(GROUP, dim=1)
        if self.kind == "int4":
            assert self.offset is not None
            offset = self.offset if rows is None else self.offset[rows]
            return self._codes(0, rows).float() * scale - offset.float().repeat_interleave(GROUP, dim=1)
        q = 16 * self._codes(0, rows).to(torch.int16) + self._codes(1, rows).to(torch.int16) - 128
        return q.float() * scale

    def dequantize(self) -> torch.Tensor:
        """W as float32 [N, K], bit for bit the source's own dequantization."""
        return self._weights(None)

    def rows(self, ids: torch.Tensor) -> torch.Tensor:
        """Rows `ids` of W as float32 [len(ids), K] (an embedding lookup), exact."""
        return self._weights(ids)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.forward_bf16(x).to(x.dtype)

    def forward_bf16(self, x: torch.Tensor) -> torch.Tensor:
        """The kernel's own bfloat16 output (plus bias); the runner adds it to a float32 residual directly,
        which promotes it exactly and saves a conversion per layer."""
        a = x.reshape(-1, self.in_features).to(torch.bfloat16)
        if not a.is_contiguous():
            a = a.contiguous()
        if a.shape[0] == 0:
            return x.new_zeros(*x.shape[:-1], self.out_features, dtype=torch.bfloat16)
        if self.parts > 1:
            a = torch.cat([a] * self.parts, dim=1)
        kernel = self.kernel0 if self.kernel0.is_contiguous() else self.kernel0.contiguous()
        y: torch.Tensor = torch.ops.aten._weight_int4pack_mm_for_cpu(a, self.packed0, GROUP, kernel)
        if self.bias is not None:
            y = y + self.bias
        return y.reshape(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, source={self.source}"


class Int4Embedding(torch.nn.Module):
    """An embedding table read from an Int4Linear's exact rows (the tied head's weights, or its own)."""

    embed_scale: torch.Tensor | None

    def __init__(self, weights: Int4Linear, embed_scale: torch.Tensor | None = None) -> None:
        super().__init__()
        self.weights = weights
        self.embedding_dim = weights.in_features
        self.num_embeddings = weights.out_features
        self.register_buffer("embed_scale", embed_scale, persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        out = self.weights.rows(ids.reshape(-1)).reshape(*ids.shape, self.embedding_dim)
        if self.embed_scale is not None:  # Gemma's scaled embedding
            out = out * self.embed_scale.to(out.dtype)
        return out


def tensor_bytes(module: torch.nn.Module) -> int:
    """Bytes of every distinct tensor (parameters and buffers) of `module`."""
    seen: set[int] = set()
    total = 0
    for tensor in [*module.parameters(), *module.buffers()]:
        key = tensor.untyped_storage().data_ptr()
        if key in seen or tensor.device.type == "meta":
            continue
        seen.add(key)
        total += tensor.untyped_storage().nbytes()
    return total
