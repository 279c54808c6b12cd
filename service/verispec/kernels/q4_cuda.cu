// Weight-only 4-bit GEMMs for few rows, written in CUDA where Triton cannot keep the dequantized weights in
// registers: `q4_mma` (tensor cores, 1 to 64 rows) and `q4_gemv` (CUDA cores, 1 to 16 rows). Both read
// ExLlamaV2's loaded tensors in place, nothing repacked:
//
//   qweight  int32 [K/8, N]  eight 4-bit codes of eight consecutive (sorted) rows of K per word: rows 0, 2,
//                            4, 6 in nibbles 0-3 and rows 1, 3, 5, 7 in nibbles 4-7 (ExLlamaV2's load-time
//                            order), so nibbles p and p + 4 hold rows 2p and 2p + 1
//   EXL2     scale codes int32 [G, N/8] (4-bit, plain order), scale_max fp16 [G]; zero point 8;
//            scale = fp16((code + 1)^2) * scale_max[g]
//   GPTQ     scales fp16 [G, N], zeros int32 [G, N/8] (4-bit, plain order); zero point = code + 1
//
// A weight is fp16(q - zero) * scale with one rounding, ExLlamaV2's `reconstruct`, so the matrix multiplied
// by is get_weight_tensor_dq()'s bit for bit. K is cut into runs fixed by the shape alone (the same number for
// every block of columns, or even shares of the whole launch: q4_mma_kernel); each run's fp32 sums are added
// in run order by the last block to finish (finish_slices), so a row's result depends on its own input only,
// whichever rows share its launch (batched greedy = solo greedy).
//
// A launch takes up to three such products that share rows and K (q, k and v; gate and up), one after another
// along the grid. Beside them, a layer's small steps in one kernel each: SiLU(gate) * up, and RoPE on q and k
// with the KV-cache write. Built by kernels/cuda_build.py with nvcc into a shared library that
// kernels/q4_cuda.py calls through ctypes (C entry points at the end; every launch goes on the caller's stream,
// so CUDA graphs capture it).

#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include <cstddef>
#include <cstdint>
#include <type_traits>

namespace {

// ---- Shared pieces ------------------------------------------------------------------------------------

// (a & b) | c in one instruction: with b = 0x000f000f and c = 0x64006400 the codes in bits 0-3 and 16-19
// become the fp16 pair (1024 + q).
__device__ __forceinline__ uint32_t lop3_or_and(uint32_t a, uint32_t b, uint32_t c) {
  uint32_t out;
  asm("lop3.b32 %0, %1, %2, %3, 0xea;" : "=r"(out) : "r"(a), "r"(b), "r"(c));
  return out;
}

__device__ __forceinline__ half2 as_half2(uint32_t bits) { return *reinterpret_cast<half2*>(&bits); }
__device__ __forceinline__ uint32_t as_bits(half2 value) { return *reinterpret_cast<uint32_t*>(&value); }

// One column's dequantization constants for one group: the scale, 1024 + zero, and -(64 + zero), each twice.
struct ColumnScale {
  half2 scale;
  half2 offset;     // 1024 + zero: (1024 + q) - offset = q - zero, exact
  half2 offset_16;  // -(64 + zero): (1024 + 16q) / 16 - (64 + zero) = q - zero, exact in one fma
};

__device__ __forceinline__ ColumnScale column_scale(half scale, int zero) {
  return {__half2half2(scale), __half2half2(__int2half_rn(1024 + zero)), __half2half2(__int2half_rn(-(64 + zero)))};
}

// The eight weights of one word as four fp16 pairs: pair p = sorted rows (2p, 2p + 1) = nibbles (p, p + 4).
// Pairs 1 and 3 are taken from bits 4-7 / 20-23 without a shift: (1024 + 16q) is exact, and the fma by 1/16
// lands on q - zero exactly; every pair is then multiplied by the scale with one rounding.
__device__ __forceinline__ void dequantize_word(uint32_t word, const ColumnScale& s, uint32_t (&pairs)[4]) {
  const half2 sixteenth = as_half2(0x2c002c00u);  // 1/16 (by its bits: conversions are not folded)
  const uint32_t high = word >> 8;
  pairs[0] = as_bits(__hmul2(__hsub2(as_half2(lop3_or_and(word, 0x000f000fu, 0x64006400u)), s.offset), s.scale));
  pairs[1] = as_bits(
      __hmul2(__hfma2(as_half2(lop3_or_and(word, 0x00f000f0u, 0x64006400u)), sixteenth, s.offset_16), s.scale));
  pairs[2] = as_bits(__hmul2(__hsub2(as_half2(lop3_or_and(high, 0x000f000fu, 0x64006400u)), s.offset), s.scale));
  pairs[3] = as_bits(
      __hmul2(__hfma2(as_half2(lop3_or_and(high, 0x00f000f0u, 0x64006400u)), sixteenth, s.offset_16), s.scale));
}

// The scales of four consecutive columns (the first a multiple of 4) in group `group`, from the words they
// are stored in (scale_words, or the same words staged by q4_mma): EXL2 {scale codes, scale_max pair},
// GPTQ {four fp16 scales, zero codes}.
template <bool GPTQ>
__device__ __forceinline__ void meta_scales(const uint4& meta, int group, int column, ColumnScale (&out)[4]) {
  if constexpr (GPTQ) {
    const half* scale = reinterpret_cast<const half*>(&meta);  // meta.x, meta.y: four fp16 scales
    const uint32_t zero_word = meta.z >> (4 * (column % 8));
#pragma unroll
    for (int c = 0; c < 4; ++c) out[c] = column_scale(scale[c], ((zero_word >> (4 * c)) & 0xF) + 1);
  } else {
    // Two columns at a time: their codes become the fp16 pair (1024 + code), less 1023 that is code + 1, and
    // its square (at most 256) is exact too, so the product with scale_max is the one rounding ExLlamaV2 makes.
    const uint32_t code_word = meta.x >> (4 * (column % 8));
    const half2 pair = as_half2(meta.y);
    const half2 top = (group & 1) ? __high2half2(pair) : __low2half2(pair);
    // Constants by their bits (conversions are not folded): zero point 8 gives 1032 and -72; and 1023.
    const half2 offset = as_half2(0x64086408u), offset_16 = as_half2(0xd480d480u), bias = as_half2(0x63fe63feu);
#pragma unroll
    for (int c = 0; c < 4; c += 2) {
      const uint32_t codes = code_word >> (4 * c);  // columns c and c + 1 in nibbles 0 and 1
      const half2 plus_one =
          __hsub2(as_half2(lop3_or_and(codes << 12, 0x000f0000u, lop3_or_and(codes, 0x0000000fu, 0x64006400u))), bias);
      const half2 scales = __hmul2(__hmul2(plus_one, plus_one), top);
      out[c] = {__low2half2(scales), offset, offset_16};
      out[c + 1] = {__high2half2(scales), offset, offset_16};
    }
  }
}

struct Problem {
  const half* x;  // [rows, K], row stride x_stride, columns in sorted order, 16-byte aligned rows
  const void* qweight;
  const void* scales;
  const half* scale_max;   // EXL2
  const uint32_t* zeros;   // GPTQ
  const half* residual;    // [rows, N] or null
  half* out;               // [rows, N]
  float* partial;          // [runs, rows, N] where a block of columns is cut into runs of K
  int* arrivals;           // a count per block of columns, zero between launches
  int rows, n, k, x_stride, group_size;
  int l2_prefetch;         // q4_mma: batches of weights asked into L2 ahead of the loads (0: none)
};

// The products of one launch, up to kMaxParts (q, k and v of one input; gate and up): the same rows, K, group
// size and cut of K, each with its own input, weights and output. Their blocks of columns follow one another
// along the grid's x, so a launch of two or three parts costs one launch, not two or three.
constexpr int kMaxParts = 3;

struct Problems {
  Problem part[kMaxParts];
  int first_block[kMaxParts];  // grid x where each part's blocks of columns begin (part 0 at 0)
  int parts;
  int column_blocks;  // of all parts
  int stages;  // q4_mma through shared memory: batches staged at once, 2 to kMaxStages
};

// The product block of columns `block` of the launch is in (blockIdx.x, where the grid's x is the launch's blocks
// of columns), and its index `column_block` within that product's columns.
__device__ __forceinline__ Problem part_of_block(const Problems& set, int block, int& column_block) {
  int which = 0;
#pragma unroll
  for (int i = 1; i < kMaxParts; ++i) {
    if (i < set.parts && block >= set.first_block[i]) which = i;
  }
  column_block = block - set.first_block[which];
  return which == 0 ? set.part[0] : which == 1 ? set.part[1] : set.part[2];
}

// Which run of K a block's sums cover: run `index` of the `count` its block of columns is cut into (one: the
// sums are the results), and `arrival`, that block of columns' place in the launch, where finish_slices counts
// the runs that are done.
struct KRun {
  int index, count, arrival;
};

// The run of a kernel whose grid's y cuts every block of columns (grid x) alike.
__device__ __forceinline__ KRun grid_run() { return {(int)blockIdx.y, (int)gridDim.y, (int)blockIdx.x}; }

// Where run `index` of `count` runs of `units` begins: the runs differ in length by one unit at most.
__host__ __device__ __forceinline__ int run_start(long long units, long long index, long long count) {
  return static_cast<int>(index * units / count);
}

// Stores WIDTH (1 or 4) sums of consecutive columns of one row, the first at `at` in [rows, N], into out in
// fp16, with the residual added where there is one.
template <int WIDTH>
__device__ __forceinline__ void store_out(const Problem& p, size_t at, const float (&sums)[WIDTH]) {
  half results[WIDTH];
#pragma unroll
  for (int c = 0; c < WIDTH; ++c) {
    results[c] = __float2half_rn(sums[c] + (p.residual != nullptr ? __half2float(p.residual[at + c]) : 0.0f));
  }
  if constexpr (WIDTH == 4) {
    *reinterpret_cast<uint2*>(p.out + at) = *reinterpret_cast<uint2*>(results);
  } else {
    p.out[at] = results[0];
  }
}

// Adds up the runs of K, inside the launch. Every block has stored its run's fp32 sums for the columns
// first_column .. + width (a multiple of 4) of every row; the block of those columns that arrives last (counted
// in arrivals[run.arrival], one count per block of columns of the launch, whichever part it is in) adds them in
// run order, then the residual, into fp16 out, and sets the count back to zero for the next launch. The order
// is fixed whichever block arrives last, so a row's bits depend on neither timing nor the rows beside it.
//
// This runs after the block's last batch, mostly when every other block is done too, so its time is the
// launch's tail: each thread takes four columns at a time and asks for kRunsInFlight runs' sums at once, so
// that a row's sums cost one trip to L2 rather than one per run.
constexpr int kRunsInFlight = 8;

__device__ void finish_slices(const Problem& p, int first_column, int width, const KRun& run) {
  __shared__ bool last;
  __threadfence();  // this thread's partial sums reach the whole device before its block is counted
  __syncthreads();
  if (threadIdx.x == 0) last = atomicAdd(p.arrivals + run.arrival, 1) == run.count - 1;
  __syncthreads();
  if (!last) return;
  __threadfence();
  const size_t run_floats = (size_t)p.rows * p.n;  // from one run's sums to the next's
  const int quads = width / 4;
  for (int index = threadIdx.x; index < p.rows * quads; index += blockDim.x) {
    const int row = index / quads, column = first_column + 4 * (index % quads);
    if (column >= p.n) continue;
    const size_t at = (size_t)row * p.n + column;
    const float4* sums = reinterpret_cast<const float4*>(p.partial + at);
    float total[4] = {0.0f, 0.0f, 0.0f, 0.0f};
    for (int first = 0; first < run.count; first += kRunsInFlight) {
      float4 in_flight[kRunsInFlight];
#pragma unroll
      for (int r = 0; r < kRunsInFlight; ++r) {
        if (first + r < run.count) in_flight[r] = __ldcg(sums + (first + r) * run_floats / 4);
      }
#pragma unroll
      for (int r = 0; r < kRunsInFlight; ++r) {
        if (first + r >= run.count) break;
        total[0] += in_flight[r].x;
        total[1] += in_flight[r].y;
        total[2] += in_flight[r].z;
        total[3] += in_flight[r].w;
      }
    }
    store_out<4>(p, at, total);
  }
  if (threadIdx.x == 0) p.arrivals[run.arrival] = 0;
}

// The 16 bytes of weight words in word row `word_row` for the four columns from `column` (a multiple of 4).
__device__ __forceinline__ const uint4* weight_words(const Problem& p, int word_row, int column) {
  return static_cast<const uint4*>(p.qweight) + (size_t)word_row * (p.n / 4) + column / 4;
}

// Where the scales of group `group` for the four columns from `column` are stored: EXL2 {the scale codes'
// word, the scale_max pair: 4 bytes each}, GPTQ {four fp16 scales: 8 bytes, the zero codes' word: 4}.
struct ScaleSources {
  const void* first;
  const uint32_t* second;
};

template <bool GPTQ>
__device__ __forceinline__ ScaleSources scale_sources(const Problem& p, int group, int column) {
  if constexpr (GPTQ) {
    return {static_cast<const half*>(p.scales) + (size_t)group * p.n + column,
            p.zeros + (size_t)group * (p.n / 8) + column / 8};
  } else {
    return {static_cast<const uint32_t*>(p.scales) + (size_t)group * (p.n / 8) + column / 8,
            reinterpret_cast<const uint32_t*>(p.scale_max + (group & ~1))};
  }
}

// The words meta_scales reads for group `group` and four columns from `column`, straight from memory.
template <bool GPTQ>
__device__ __forceinline__ uint4 scale_words(const Problem& p, int group, int column) {
  const ScaleSources at = scale_sources<GPTQ>(p, group, column);
  if constexpr (GPTQ) {
    const uint2 scales = *static_cast<const uint2*>(at.first);
    return make_uint4(scales.x, scales.y, *at.second, 0);
  } else {
    return make_uint4(*static_cast<const uint32_t*>(at.first), *at.second, 0, 0);
  }
}

// Stores WIDTH (1 or 4) sums of consecutive columns of one row, the first at `at` in [rows, N]: out
// (+ residual) in fp16 when its block of columns is one run of K, else this run's fp32 partial sums.
template <int WIDTH>
__device__ __forceinline__ void store_run(const Problem& p, size_t at, const float (&sums)[WIDTH], const KRun& run) {
  static_assert(WIDTH == 1 || WIDTH == 4, "a run of one column or of a thread's four");
  if (run.count == 1) {
    store_out<WIDTH>(p, at, sums);
  } else {
    float* partial = p.partial + (size_t)run.index * p.rows * p.n + at;
    if constexpr (WIDTH == 4) {
      *reinterpret_cast<float4*>(partial) = make_float4(sums[0], sums[1], sums[2], sums[3]);
    } else {
      *partial = sums[0];
    }
  }
}

// ---- q4_mma: tensor cores, dequantized in registers ---------------------------------------------------
//
// mma.sync m16n8k16 computes D[16 x 8] += A[16 x 16] B[16 x 8]. Here A is a tile of W^T (16 output columns
// by 16 positions of K), B is the input (16 positions of K by 8 rows of x) and D is out^T. Which column and
// which k each fragment slot stands for is ours to choose, as long as A and B agree, and ExLlamaV2's word
// order makes a choice in which every thread's data is one 16-byte load of weights and one of input:
//
//   lane = 4 g + t. Thread (g, t) loads the words of word row kw0 + t for the columns c0 + 4g .. c0 + 4g + 3
//   (16 bytes; a warp reads four 128-byte runs of four word rows). Tile u (0, 1) takes columns
//   c0 + 4g + 2u as A's row g and c0 + 4g + 2u + 1 as row g + 8. Step s (0, 1) takes pairs 2s and 2s + 1 of
//   each word as A's slots (2t, 2t + 1) and (2t + 8, 2t + 9): sorted rows 8 (kw0 + t) + 4s .. + 3. B's slots
//   (2t, 2t + 1), (2t + 8, 2t + 9) of column g are then x[row g][8 (kw0 + t) + 4s .. + 3]: the thread's
//   eight input values x[g][8 (kw0 + t) .. + 7] are one 16-byte load, halves 0-3 for step 0, 4-7 for step 1.
//
// A block of kMmaWarps warps owns 32 columns a warp; all its warps walk the same run of K in batches of
// 128 (4 word-row quads), staged through shared memory by cp.async, stages - 1 batches ahead: each warp's
// weights, the scales, and the input rows the whole block shares. Rows come in tiles of 8 (M_TILES of them):
// the weights of a quad are dequantized once and multiplied against every tile. A stage grows with the tiles
// (2 KB of input each), so more tiles launch with fewer stages: every tile count keeps resident the blocks
// per SM the grid is cut for (staged_stages).

constexpr int kMmaWarps = 4;
constexpr int kMmaThreads = 32 * kMmaWarps;
constexpr int kBatchK = 128;               // positions of K per batch: a group divides into batches
constexpr int kQuads = kBatchK / 32;       // word-row quads per batch
constexpr int kMaxStages = 4;

// The word row that thread row t (lane % 4) reads of quad `quad` of batch `batch`.
__device__ __forceinline__ int batch_word_row(int batch, int quad, int t) {
  return (batch * kBatchK) / 8 + 4 * quad + t;
}

// Asks L2 for a warp's words of batches [from, to) below `end` (a batch: K positions batch * 128 .. + 127)
// in its 32 columns from `warp_column`: sixteen word rows of 128 bytes a batch, one line each for lanes 0-15.
// Nothing waits on it and no register or shared memory holds it; the loads that come later find the words in
// L2 instead of memory. The kernels ask l2_prefetch batches past the ones they have loaded or in flight
// (none when it is 0).
__device__ __forceinline__ void prefetch_batches(const Problem& p, int from, int to, int end, int warp_column, int lane) {
  constexpr int kWordRows = kBatchK / 8;  // word rows per batch
  if (p.l2_prefetch == 0 || lane >= kWordRows || warp_column >= p.n) return;
  for (int batch = from; batch < min(to, end); ++batch) {
    asm volatile("prefetch.global.L2 [%0];" ::"l"(weight_words(p, batch * kWordRows + lane, warp_column)));
  }
}

// Per thread: EXL2 {scale codes, scale_max pair}, GPTQ {four fp16 scales, zero codes, unused}.
template <bool GPTQ>
using StagedMeta = std::conditional_t<GPTQ, uint4, uint2>;

__device__ __forceinline__ uint4 widened(const uint2& meta) { return make_uint4(meta.x, meta.y, 0, 0); }
__device__ __forceinline__ uint4 widened(const uint4& meta) { return meta; }

template <int M_TILES, bool GPTQ>
struct MmaStage {
  uint4 weights[kMmaWarps][kQuads][32];
  StagedMeta<GPTQ> meta[kMmaWarps][32];
  uint4 x[8 * M_TILES][kBatchK / 8];  // 16-byte chunks of the input rows, at x_chunk's places
};

// Where chunk `chunk` (16 bytes) of input row `row` sits in a stage: odd rows swap the halves of each 128-byte
// run, so that the eight lanes of a quarter-warp, which read four chunks of two neighbouring rows, hit 32
// different banks without padding the rows.
__device__ __forceinline__ int x_chunk(int row, int chunk) { return chunk ^ ((row & 1) << 2); }

// `value`, opaque to the compiler: a value worked out from the thread's index is then kept in its register
// rather than worked out again from the index inside a loop.
__device__ __forceinline__ uint32_t kept(uint32_t value) {
  asm volatile("" : "+r"(value));
  return value;
}

constexpr uint32_t kQuadBytes = 32 * sizeof(uint4);           // a warp's words of one quad in a stage
constexpr uint32_t kTileBytes = 8 * (kBatchK / 8) * sizeof(uint4);  // eight input rows in a stage
constexpr int kCopyRows = kMmaThreads / (kBatchK / 8);  // input rows the block's threads copy at once
constexpr uint32_t kCopyBytes = kCopyRows * (kBatchK / 8) * sizeof(uint4);
// Copies of kCopyRows rows that fill a stage's M_TILES tiles of input.
template <int M_TILES>
__host__ __device__ constexpr int copy_rounds() { return (8 * M_TILES + kCopyRows - 1) / kCopyRows; }

// One thread's places in a stage, in bytes from the stage's start, worked out once: so that the loop copies and
// reads at a stage's address plus constants. Each thread reads back the weights and scale words it copied in.
// The input chunk this thread copies into a stage (the block's threads cover kCopyRows rows of 16 chunks; copy
// round v is kCopyRows v rows further down): its row, and its chunk of that row.
__device__ __forceinline__ int copy_row() { return threadIdx.x / (kBatchK / 8); }
__device__ __forceinline__ int copy_chunk() { return threadIdx.x % (kBatchK / 8); }

template <int M_TILES, bool GPTQ>
struct StagePlaces {
  uint32_t weights;    // its words of quad 0; quad q kQuadBytes * q further on
  uint32_t meta;       // its scale words
  uint32_t x_copy;     // the input chunk it copies in (copy_row, copy_chunk); round v kCopyBytes * v further on
  uint32_t x_read[2];  // the chunks of row g it reads for quads 0 and 1; quads 2 and 3 128 bytes further on

  __device__ StagePlaces(int warp, int lane) {
    using Stage = MmaStage<M_TILES, GPTQ>;
    const int g = lane / 4, t = lane % 4;
    weights = kept((warp * kQuads * 32 + lane) * sizeof(uint4));
    meta = kept(offsetof(Stage, meta) + (warp * 32 + lane) * sizeof(StagedMeta<GPTQ>));
    const int row = copy_row();
    x_copy = kept(offsetof(Stage, x) + (row * (kBatchK / 8) + x_chunk(row, copy_chunk())) * sizeof(uint4));
#pragma unroll
    for (int quad = 0; quad < 2; ++quad) {
      x_read[quad] = kept(offsetof(Stage, x) + (g * (kBatchK / 8) + x_chunk(g, 4 * quad + t)) * sizeof(uint4));
    }
  }
};

__device__ __forceinline__ uint32_t shared_address(const void* shared) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(shared));
}

// Copies of BYTES (4, 8 or 16) from global to shared memory, by cp.async, where `copy` holds: predicated
// rather than branched around, so that the addresses they take stay worked out outside the loop.
template <int BYTES>
__device__ __forceinline__ void cp_async(uint32_t shared, const void* global, bool copy) {
  asm volatile(
      "{\n.reg .pred p;\nsetp.ne.b32 p, %2, 0;\n@p cp.async.ca.shared.global [%0], [%1], %3;\n}\n" ::"r"(shared),
      "l"(global), "r"(static_cast<int>(copy)), "n"(BYTES));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int PENDING>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(PENDING));
}

__device__ __forceinline__ void mma_16816(float (&d)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  asm(
      "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
      "{%0, %1, %2, %3};\n"
      : "+f"(d[0]), "+f"(d[1]), "+f"(d[2]), "+f"(d[3])
      : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
}

// Which group of scales a run of consecutive batches is in, counted instead of divided: a batch is 128
// positions of K, a group group_size / 128 batches.
struct GroupCounter {
  int group, left, per_group;  // left: batches of `group` still to come, this one included

  __device__ GroupCounter(int batch, int group_size) : per_group(group_size / kBatchK) {
    group = batch / per_group;
    left = per_group - batch % per_group;
  }

  // Moves on a batch; whether that starts a new group.
  __device__ __forceinline__ bool next() {
    if (--left != 0) return false;
    ++group;
    left = per_group;
    return true;
  }
};

// This thread's copies of consecutive batches into stages, by cp.async: its words of each quad and its scale
// words (where its columns exist), and its share of the block's input rows: a chunk of 16 bytes per copy
// round, the same chunk of rows copy_row(), copy_row() + kCopyRows, ... Rows of x past `rows` (or past the
// stage's tiles) are never copied, and never read (their B slots are zero). The sources move on by a batch at
// every copy, the scale words' at every new group, with no division.
template <int M_TILES, bool GPTQ>
struct BatchCopies {
  const uint4* words;         // word row t of the next batch's first quad, this thread's four columns
  const half* x;              // this thread's input chunk of the next batch (copy_row, copy_chunk)
  const uint32_t* first;      // the next group's scale words: EXL2 scale codes, GPTQ four fp16 scales
  const uint32_t* second;     // EXL2 the scale_max pair, GPTQ the zero codes
  int quad_stride;            // uint4s from one quad's word rows to the next (4 word rows of N / 4)
  int round_stride;           // halves from a chunk to the same chunk kCopyRows rows down
  int first_step, second_step;  // uint32s the scale words move on by at a new group (EXL2 second: see next)
  int x_rounds;               // copy rounds whose chunk row copy_row() + kCopyRows v exists
  StagePlaces<M_TILES, GPTQ> places;
  GroupCounter groups;

  __device__ BatchCopies(const Problem& p, int first_batch, int warp, int lane, int column)
      : words(weight_words(p, batch_word_row(first_batch, 0, lane % 4), column)),
        x(p.x + (size_t)copy_row() * p.x_stride + first_batch * kBatchK + 8 * copy_chunk()),
        quad_stride(p.n),
        round_stride(kCopyRows * p.x_stride),
        first_step(GPTQ ? p.n / 2 : p.n / 8),
        second_step(GPTQ ? p.n / 8 : 1),
        x_rounds(0),
        places(warp, lane),
        groups(first_batch, p.group_size) {
    const ScaleSources at = scale_sources<GPTQ>(p, groups.group, column);
    first = static_cast<const uint32_t*>(at.first);
    second = at.second;
    const int copied_rows = min(p.rows, 8 * M_TILES);
    while (x_rounds < copy_rounds<M_TILES>() && copy_row() + kCopyRows * x_rounds < copied_rows) ++x_rounds;
    x_rounds = kept(x_rounds);
  }

  // Copies the next batch into the stage at shared address `stage` where `copy` holds (the weights and scale
  // words where `active` holds too); moves on a batch either way.
  __device__ __forceinline__ void issue(uint32_t stage, bool copy, bool active) {
    const bool mine = copy && active;
#pragma unroll
    for (int quad = 0; quad < kQuads; ++quad) {
      cp_async<16>(stage + places.weights + quad * kQuadBytes, words + quad * quad_stride, mine);
    }
    if constexpr (GPTQ) {
      cp_async<8>(stage + places.meta, first, mine);
      cp_async<4>(stage + places.meta + 8, second, mine);
    } else {
      cp_async<4>(stage + places.meta, first, mine);
      cp_async<4>(stage + places.meta + 4, second, mine);
    }
#pragma unroll
    for (int v = 0; v < copy_rounds<M_TILES>(); ++v) {
      cp_async<16>(stage + places.x_copy + v * kCopyBytes, x + v * round_stride, copy && v < x_rounds);
    }
    words += kQuads * quad_stride;
    x += kBatchK;
    if (groups.next()) {
      first += first_step;
      // EXL2's scale_max pairs: the next pair from an even group on.
      second += GPTQ || (groups.group & 1) == 0 ? second_step : 0;
    }
  }
};

// acc += W^T tile products for one batch of 128 positions of K: words_at(quad), this thread's words of each of
// the batch's four quads (its word row t, its four columns); its scale words; and input_at(v, quad): the 16
// bytes x[8 v + g][batch * 128 + 32 quad + 8 t ..] of a row below `rows` (rows past it are never read: zero).
template <int M_TILES, bool GPTQ, typename WordsAt, typename InputAt>
__device__ __forceinline__ void multiply_batch(float (&acc)[2][M_TILES][4], WordsAt words_at, const uint4& meta,
                                               int group, int column, int rows, int lane, InputAt input_at) {
  const int g = lane / 4;
  ColumnScale scale[4];
  meta_scales<GPTQ>(meta, group, column, scale);
#pragma unroll
  for (int quad = 0; quad < kQuads; ++quad) {
    const uint4 words = words_at(quad);
    const uint32_t word[4] = {words.x, words.y, words.z, words.w};
    uint32_t pairs[4][4];  // [column of the four][pair]
#pragma unroll
    for (int c = 0; c < 4; ++c) dequantize_word(word[c], scale[c], pairs[c]);
    // Tile by tile, each tile's input fragment loaded just before its products: acc[u][v] still adds its
    // products in the same order (quad, then step s), and fewer input registers are live at once.
#pragma unroll
    for (int v = 0; v < M_TILES; ++v) {
      const uint4 input = 8 * v + g < rows ? input_at(v, quad) : make_uint4(0, 0, 0, 0);
#pragma unroll
      for (int s = 0; s < 2; ++s) {
#pragma unroll
        for (int u = 0; u < 2; ++u) {
          const uint32_t a[4] = {pairs[2 * u][2 * s], pairs[2 * u + 1][2 * s], pairs[2 * u][2 * s + 1],
                                 pairs[2 * u + 1][2 * s + 1]};
          mma_16816(acc[u][v], a, s == 0 ? input.x : input.z, s == 0 ? input.y : input.w);
        }
      }
    }
  }
}

// The sums of this thread's D slots: out (+ residual) in fp16 when its block of columns is one run of K, else
// this run's fp32 partial sums. acc[u][v] = {(col + 2u, row 8v + 2t), (col + 2u, row 8v + 2t + 1),
// (col + 2u + 1, row 8v + 2t), (col + 2u + 1, row 8v + 2t + 1)}.
template <int M_TILES>
__device__ __forceinline__ void store_sums(const float (&acc)[2][M_TILES][4], const Problem& p, int column,
                                           const KRun& run) {
  const int t = threadIdx.x % 4;
#pragma unroll
  for (int v = 0; v < M_TILES; ++v) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
      const int row = 8 * v + 2 * t + r;
      if (row >= p.rows) continue;
      const float sums[4] = {acc[0][v][r], acc[0][v][2 + r], acc[1][v][r], acc[1][v][2 + r]};
      store_run<4>(p, (size_t)row * p.n + column, sums, run);
    }
  }
}

// Waits until at most `pending` (0 to kMaxStages - 2) groups of copies are in flight.
__device__ __forceinline__ void cp_async_wait_for(int pending) {
  if (pending >= 2) {
    cp_async_wait<2>();
  } else if (pending == 1) {
    cp_async_wait<1>();
  } else {
    cp_async_wait<0>();
  }
}

// Blocks of q4_mma_kernel one SM is built to hold: registers are capped for it (128 a thread), and the stages
// fit shared memory to it: 16 warps.
constexpr int kMmaBlocksPerSm = 16 / kMmaWarps;

// One block's run of K [first, end) (in batches) for block of columns `block` of the launch, through the
// stages in shared memory: its sums stored, and where the run is one of several, added up by the last.
template <int M_TILES, bool GPTQ>
__device__ __forceinline__ void multiply_run(const Problems& set, int block, int first, int end, const KRun& run) {
  using Stage = MmaStage<M_TILES, GPTQ>;
  constexpr uint32_t kStageBytes = sizeof(Stage);
  extern __shared__ uint4 shared_memory[];
  const char* shared = reinterpret_cast<const char*>(shared_memory);
  const uint32_t shared_base = kept(shared_address(shared_memory));
  const uint32_t ring = set.stages * kStageBytes;  // stages in the ring: all but one copied ahead of the one multiplied
  int column_block;
  const Problem p = part_of_block(set, block, column_block);
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
  const int warp_column = (column_block * kMmaWarps + warp) * 32;
  const int column = warp_column + 4 * (lane / 4);  // this thread's first of four
  const bool active = kept(column < p.n) != 0;

  __syncthreads();  // every warp is done with the stages of the block's run before
  BatchCopies<M_TILES, GPTQ> copies(p, first, warp, lane, column);
  const StagePlaces<M_TILES, GPTQ> places = copies.places;
  for (int s = 0; s + 1 < set.stages; ++s) {
    copies.issue(shared_base + s * kStageBytes, first + s < end, active);
    cp_async_commit();
  }
  prefetch_batches(p, first + set.stages - 1, first + set.stages - 1 + p.l2_prefetch, end, warp_column, lane);

  float acc[2][M_TILES][4] = {};
  GroupCounter groups(first, p.group_size);
  uint32_t read = 0, write = ring - kStageBytes;  // the stages multiplied and copied into next, in bytes
  for (int batch = first; batch < end; ++batch) {
    cp_async_wait_for(set.stages - 2);
    __syncthreads();  // the batch in `read` is in for every thread; the stage read last round is free again
    const int ahead = batch + set.stages - 1;
    copies.issue(shared_base + write, ahead < end, active);
    cp_async_commit();
    prefetch_batches(p, ahead + p.l2_prefetch, ahead + p.l2_prefetch + 1, end, warp_column, lane);
    write = write + kStageBytes == ring ? 0 : write + kStageBytes;

    const char* stage = shared + read;
    multiply_batch<M_TILES, GPTQ>(
        acc, [&](int quad) { return *reinterpret_cast<const uint4*>(stage + places.weights + quad * kQuadBytes); },
        widened(*reinterpret_cast<const StagedMeta<GPTQ>*>(stage + places.meta)), groups.group, column, p.rows, lane,
        [&](int v, int quad) {
          return *reinterpret_cast<const uint4*>(stage + places.x_read[quad % 2] + 128 * (quad / 2) + v * kTileBytes);
        });
    read = read + kStageBytes == ring ? 0 : read + kStageBytes;
    groups.next();
  }
  cp_async_wait<0>();
  if (active) store_sums<M_TILES>(acc, p, column, run);
  if (run.count > 1) finish_slices(p, column_block * 32 * kMmaWarps, 32 * kMmaWarps, run);
}

// The launch's work is its blocks of columns times their `batches` of K, in that order; block b of the grid
// takes the units from run_start(units, b, gridDim.x) on, which may end inside a block of columns and go on in
// the next. So a grid of exactly the blocks the SMs hold at once keeps every SM busy to the end, whatever the
// count of blocks of columns (gate and up of a 70B layer: 448 of them for 528 places on an H100). Each block
// of columns is thereby cut into runs of K by the shape and the grid alone, never by the rows.
template <int M_TILES, bool GPTQ>
__global__ void __launch_bounds__(kMmaThreads, kMmaBlocksPerSm) q4_mma_kernel(Problems set, int batches) {
  const long long units = (long long)set.column_blocks * batches;
  // The grid block holding unit u: the last whose runs begin at or before it.
  const auto holder = [&](long long unit) { return static_cast<int>(((unit + 1) * gridDim.x - 1) / units); };
  int unit = run_start(units, blockIdx.x, gridDim.x);
  const int end = run_start(units, blockIdx.x + 1, gridDim.x);
  while (unit < end) {
    const int block = unit / batches, first = unit % batches;
    const int last = min(batches, first + end - unit);
    const int first_holder = holder((long long)block * batches);
    const KRun run{(int)blockIdx.x - first_holder, holder((long long)block * batches + batches - 1) - first_holder + 1,
                   block};
    multiply_run<M_TILES, GPTQ>(set, block, first, last, run);
    unit += last - first;
  }
}

// ---- q4_mma, weights streamed through registers -------------------------------------------------------
//
// The same tiles and fragments, without shared memory or barriers: each warp loads its own weights and
// scales straight into registers, STAGES batches ahead, and reads its input fragments from global memory,
// where they stay in L1 (the warps of a slice read the same input). Warps run independently; the loads bypass
// L1 so that the weights, read once, do not evict the input.

__device__ __forceinline__ uint4 load_streaming(const void* address) {
  uint4 v;
  asm("ld.global.nc.L1::no_allocate.v4.u32 {%0, %1, %2, %3}, [%4];"
      : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w)
      : "l"(address));
  return v;
}

// This thread's words of batch `batch` (its word row of each quad, its four columns) and its scale words.
template <bool GPTQ>
__device__ __forceinline__ void load_batch(const Problem& p, int batch, int t, int column, uint4 (&words)[kQuads],
                                           uint4& meta) {
#pragma unroll
  for (int quad = 0; quad < kQuads; ++quad) {
    words[quad] = load_streaming(weight_words(p, batch_word_row(batch, quad, t), column));
  }
  meta = scale_words<GPTQ>(p, (batch * kBatchK) / p.group_size, column);
}

template <int M_TILES, bool GPTQ, int STAGES>
__global__ void __launch_bounds__(kMmaThreads) q4_mma_registers_kernel(Problems set, int batches) {
  int column_block;
  const Problem p = part_of_block(set, blockIdx.x, column_block);
  const KRun run = grid_run();
  const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, t = lane % 4;
  const int warp_column = (column_block * kMmaWarps + warp) * 32;
  const int column = warp_column + 4 * (lane / 4);
  const bool active = column < p.n;  // lanes past it still join every mma.sync, on zero words
  const int first = run_start(batches, run.index, run.count), end = run_start(batches, run.index + 1, run.count);

  uint4 words[STAGES][kQuads], meta[STAGES];
#pragma unroll
  for (int s = 0; s < STAGES; ++s) {
    meta[s] = make_uint4(0, 0, 0, 0);
#pragma unroll
    for (int quad = 0; quad < kQuads; ++quad) words[s][quad] = make_uint4(0, 0, 0, 0);
    if (active && first + s < end) load_batch<GPTQ>(p, first + s, t, column, words[s], meta[s]);
  }
  prefetch_batches(p, first + STAGES, first + STAGES + p.l2_prefetch, end, warp_column, lane);
  float acc[2][M_TILES][4] = {};
  const half* x = p.x + 8 * t;
  for (int base = first; base < end; base += STAGES) {
#pragma unroll
    for (int s = 0; s < STAGES; ++s) {
      const int batch = base + s;
      if (batch >= end) break;
      uint4 current[kQuads];
#pragma unroll
      for (int quad = 0; quad < kQuads; ++quad) current[quad] = words[s][quad];
      const uint4 current_meta = meta[s];
      if (active && batch + STAGES < end) load_batch<GPTQ>(p, batch + STAGES, t, column, words[s], meta[s]);
      prefetch_batches(p, batch + STAGES + p.l2_prefetch, batch + STAGES + p.l2_prefetch + 1, end, warp_column, lane);
      const half* x_batch = x + batch * kBatchK;
      multiply_batch<M_TILES, GPTQ>(acc, [&](int quad) { return current[quad]; }, current_meta,
                                    (batch * kBatchK) / p.group_size, column, p.rows, lane,
                                    [&](int v, int quad) {
                                      return __ldg(reinterpret_cast<const uint4*>(
                                          x_batch + (size_t)(8 * v + lane / 4) * p.x_stride + 32 * quad));
                                    });
    }
  }
  if (active) store_sums<M_TILES>(acc, p, column, run);
  if (run.count > 1) finish_slices(p, column_block * 32 * kMmaWarps, 32 * kMmaWarps, run);
}

using KernelFunction = void (*)(Problems, int);  // every kernel here: its products and their cut of K

// A kernel of the library with the dynamic shared memory and the stages (q4_mma_kernel) it launches with.
struct Kernel {
  KernelFunction function;
  int shared_bytes;
  int stages;
};

// ---- How q4_mma_kernel launches on the current device ---------------------------------------------------
//
// The grid is cut for the blocks one SM holds at once (q4_cuda.py's mma_grid), the same at every tile count of
// rows so that a row's sums never depend on its batch. A stage grows by 2 KB a tile, so each
// tile count takes the most stages (kMaxStages down to 2) that still keep that many blocks resident: more
// stages bought with fewer blocks would leave part of the grid for a second wave.

constexpr int kDevices = 64;  // devices whose launch shapes are kept (others are worked out at every launch)

// `value` as find(value) gives it, kept per device in `known` (0: not yet found).
template <typename Find>
cudaError_t once_per_device(int (&known)[kDevices], int& value, Find find) {
  int device = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error != cudaSuccess) return error;
  if (device < kDevices && known[device] != 0) {
    value = known[device];
    return cudaSuccess;
  }
  error = find(value);
  if (error == cudaSuccess && device < kDevices) known[device] = value;
  return error;
}

// Blocks of q4_mma_kernel<M_TILES, GPTQ> one SM holds with `stages` stages (0 where they exceed a block's
// shared memory), its dynamic shared memory limit set to them.
template <int M_TILES, bool GPTQ>
cudaError_t staged_blocks(int stages, int& blocks) {
  const int bytes = stages * static_cast<int>(sizeof(MmaStage<M_TILES, GPTQ>));
  int device = 0, most = 0;
  blocks = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&most, cudaDevAttrMaxSharedMemoryPerBlockOptin, device);
  if (error != cudaSuccess || bytes > most) return error;
  error = cudaFuncSetAttribute(q4_mma_kernel<M_TILES, GPTQ>, cudaFuncAttributeMaxDynamicSharedMemorySize, bytes);
  if (error != cudaSuccess) return error;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(&blocks, q4_mma_kernel<M_TILES, GPTQ>, kMmaThreads, bytes);
}

// The most blocks of q4_mma_kernel<M_TILES, GPTQ> one SM holds, at the stage count that fits the most.
template <int M_TILES, bool GPTQ>
cudaError_t most_staged_blocks(int& most) {
  most = 0;
  for (int stages = 2; stages <= kMaxStages; ++stages) {
    int blocks = 0;
    const cudaError_t error = staged_blocks<M_TILES, GPTQ>(stages, blocks);
    if (error != cudaSuccess) return error;
    most = blocks > most ? blocks : most;
  }
  return cudaSuccess;
}

// The blocks per SM that every tile count of rows keeps resident, kMmaBlocksPerSm at most: the grid's unit.
template <bool GPTQ>
cudaError_t staged_resident_blocks(int& resident) {
  static int known[kDevices] = {};
  return once_per_device(known, resident, [](int& value) {
    int counts[6] = {};
    cudaError_t error = most_staged_blocks<1, GPTQ>(counts[0]);
    if (error == cudaSuccess) error = most_staged_blocks<2, GPTQ>(counts[1]);
    if (error == cudaSuccess) error = most_staged_blocks<3, GPTQ>(counts[2]);
    if (error == cudaSuccess) error = most_staged_blocks<4, GPTQ>(counts[3]);
    if (error == cudaSuccess) error = most_staged_blocks<6, GPTQ>(counts[4]);
    if (error == cudaSuccess) error = most_staged_blocks<8, GPTQ>(counts[5]);
    value = kMmaBlocksPerSm;
    for (const int count : counts) value = count < value ? count : value;
    return error;
  });
}

// The stages q4_mma_kernel<M_TILES, GPTQ> launches with: the most that keep staged_resident_blocks resident
// (two where none does), its shared memory limit set to them.
template <int M_TILES, bool GPTQ>
cudaError_t staged_stages(int& stages) {
  static int known[kDevices] = {};
  return once_per_device(known, stages, [](int& value) {
    int resident = 0, blocks = 0;
    cudaError_t error = staged_resident_blocks<GPTQ>(resident);
    for (value = kMaxStages; error == cudaSuccess && value > 2; --value) {
      error = staged_blocks<M_TILES, GPTQ>(value, blocks);
      if (blocks >= resident) break;
    }
    return error == cudaSuccess ? staged_blocks<M_TILES, GPTQ>(value, blocks) : error;
  });
}

// The q4_mma kernel for M_TILES tiles of rows and `pipeline` (0 staged, else registers that many batches
// ahead; past two tiles of rows a deeper register pipeline spills, so two there), its shared memory size set.
template <int M_TILES, bool GPTQ>
cudaError_t mma_kernel(int pipeline, Kernel& kernel) {
  KernelFunction function = q4_mma_kernel<M_TILES, GPTQ>;
  if constexpr (M_TILES >= 3) {
    if (pipeline != 0) function = q4_mma_registers_kernel<M_TILES, GPTQ, 2>;
  } else if (pipeline == 2) {
    function = q4_mma_registers_kernel<M_TILES, GPTQ, 2>;
  } else if (pipeline == 3) {
    function = q4_mma_registers_kernel<M_TILES, GPTQ, 3>;
  } else if (pipeline == 4) {
    function = q4_mma_registers_kernel<M_TILES, GPTQ, 4>;
  }
  kernel = {function, 0, 0};
  if (pipeline != 0) return cudaSuccess;
  const cudaError_t error = staged_stages<M_TILES, GPTQ>(kernel.stages);
  kernel.shared_bytes = kernel.stages * static_cast<int>(sizeof(MmaStage<M_TILES, GPTQ>));
  return error;
}

// Tiles of 8 rows: 1, 2, 3, 4, 6 or 8 of them, so that passes of 24 and 48 rows (CUDA-graph buckets of the
// runner) multiply their own rows, not 32 and 64.
template <bool GPTQ>
cudaError_t mma_kernel_for_rows(int rows, int pipeline, Kernel& kernel) {
  if (rows <= 8) return mma_kernel<1, GPTQ>(pipeline, kernel);
  if (rows <= 16) return mma_kernel<2, GPTQ>(pipeline, kernel);
  if (rows <= 24) return mma_kernel<3, GPTQ>(pipeline, kernel);
  if (rows <= 32) return mma_kernel<4, GPTQ>(pipeline, kernel);
  if (rows <= 48) return mma_kernel<6, GPTQ>(pipeline, kernel);
  return mma_kernel<8, GPTQ>(pipeline, kernel);
}

cudaError_t mma_kernel_for(int rows, bool gptq, int pipeline, Kernel& kernel) {
  return gptq ? mma_kernel_for_rows<true>(rows, pipeline, kernel) : mma_kernel_for_rows<false>(rows, pipeline, kernel);
}

// Through shared memory a grid of `blocks` blocks, each taking its run of the launch's work (q4_mma_kernel);
// through registers every block of columns cut into `slices` runs of K, one block each.
cudaError_t launch_mma(const Problems& set, bool gptq, int slices, int blocks, int pipeline, cudaStream_t stream) {
  Kernel kernel{};
  const cudaError_t error = mma_kernel_for(set.part[0].rows, gptq, pipeline, kernel);
  if (error != cudaSuccess) return error;
  Problems staged = set;
  staged.stages = kernel.stages;
  const dim3 grid = pipeline == 0 ? dim3(blocks) : dim3(set.column_blocks, slices);
  kernel.function<<<grid, kMmaThreads, kernel.shared_bytes, stream>>>(staged, set.part[0].k / kBatchK);
  return cudaGetLastError();
}

// ---- q4_gemv: CUDA cores ------------------------------------------------------------------------------
//
// A block of 4 warps owns 128 columns (4 a thread, one 16-byte load per word row); each warp takes whole
// groups of K, the block's warps sum through shared memory, and blocks along the grid's y take slices of K.
// Products are summed in fp16 pairs over 64 rows of K at most, then in fp32.

constexpr int kGemvWarps = 4;
constexpr int kGemvThreads = 32 * kGemvWarps;
constexpr int kGemvColumns = 4 * 32;
constexpr int kChunkWords = 8;  // word rows loaded at once (64 rows of K): the fp16 sums' length

__device__ __forceinline__ void load_chunk(uint4 (&words)[kChunkWords], const Problem& p, int first_word, int column) {
#pragma unroll
  for (int j = 0; j < kChunkWords; ++j) words[j] = __ldg(weight_words(p, first_word + j, column));
}

// PREFETCH: a chunk's words are loaded while the one before it is multiplied (32 more registers).
template <int MAX_ROWS, bool GPTQ, bool PREFETCH>
__global__ void __launch_bounds__(kGemvThreads) q4_gemv_kernel(Problems set, int groups_per_warp) {
  int column_block;
  const Problem p = part_of_block(set, blockIdx.x, column_block);
  const KRun run = grid_run();
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int column = column_block * kGemvColumns + 4 * lane;  // this thread's first of four
  const int words_per_group = p.group_size / 8;
  const int first_group = (blockIdx.y * kGemvWarps + warp) * groups_per_warp;
  const int first_word = first_group * words_per_group;
  const int end_word = min(first_group + groups_per_warp, p.k / p.group_size) * words_per_group;
  const bool active = column < p.n && first_word < end_word;

  float sums[MAX_ROWS][4];
#pragma unroll
  for (int m = 0; m < MAX_ROWS; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) sums[m][c] = 0.0f;

  uint4 words[kChunkWords];
  if (PREFETCH && active) load_chunk(words, p, first_word, column);
  ColumnScale scale[4];
  for (int w0 = first_word; active && w0 < end_word; w0 += kChunkWords) {
    if (w0 % words_per_group == 0) {
      const int group = w0 / words_per_group;
      meta_scales<GPTQ>(scale_words<GPTQ>(p, group, column), group, column, scale);
    }
    uint4 current[kChunkWords];
    if constexpr (PREFETCH) {
#pragma unroll
      for (int j = 0; j < kChunkWords; ++j) current[j] = words[j];
      if (w0 + kChunkWords < end_word) load_chunk(words, p, w0 + kChunkWords, column);
    } else {
      load_chunk(current, p, w0, column);
    }
    half2 chunk[MAX_ROWS][4];
#pragma unroll
    for (int m = 0; m < MAX_ROWS; ++m)
#pragma unroll
      for (int c = 0; c < 4; ++c) chunk[m][c] = __float2half2_rn(0.0f);
#pragma unroll
    for (int j = 0; j < kChunkWords; ++j) {
      const uint32_t word[4] = {current[j].x, current[j].y, current[j].z, current[j].w};
      uint32_t pairs[4][4];
#pragma unroll
      for (int c = 0; c < 4; ++c) dequantize_word(word[c], scale[c], pairs[c]);
#pragma unroll
      for (int m = 0; m < MAX_ROWS; ++m) {
        if (m >= p.rows) break;
        // The input's eight columns of this word row as pairs (2p, 2p + 1), matching the weight pairs.
        const uint4 x_bits = *reinterpret_cast<const uint4*>(p.x + (size_t)m * p.x_stride + 8 * (w0 + j));
        const uint32_t x2[4] = {x_bits.x, x_bits.y, x_bits.z, x_bits.w};
#pragma unroll
        for (int c = 0; c < 4; ++c) {
#pragma unroll
          for (int q = 0; q < 4; ++q) chunk[m][c] = __hfma2(as_half2(pairs[c][q]), as_half2(x2[q]), chunk[m][c]);
        }
      }
    }
#pragma unroll
    for (int m = 0; m < MAX_ROWS; ++m)
#pragma unroll
      for (int c = 0; c < 4; ++c) sums[m][c] += __low2float(chunk[m][c]) + __high2float(chunk[m][c]);
  }

  // The block's four warps: their sums through shared memory, added in warp order.
  __shared__ float shared[kGemvWarps][MAX_ROWS][kGemvColumns];
#pragma unroll
  for (int m = 0; m < MAX_ROWS; ++m)
#pragma unroll
    for (int c = 0; c < 4; ++c) shared[warp][m][4 * lane + c] = sums[m][c];
  __syncthreads();
  for (int index = threadIdx.x; index < p.rows * kGemvColumns; index += kGemvThreads) {
    const int m = index / kGemvColumns, local = index % kGemvColumns;
    const int out_column = column_block * kGemvColumns + local;
    if (out_column >= p.n) continue;
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kGemvWarps; ++w) total += shared[w][m][local];
    const float sum[1] = {total};
    store_run<1>(p, (size_t)m * p.n + out_column, sum, run);
  }
  if (run.count > 1) finish_slices(p, column_block * kGemvColumns, kGemvColumns, run);
}

template <int MAX_ROWS, bool PREFETCH>
Kernel gemv_kernel(bool gptq) {
  return {gptq ? q4_gemv_kernel<MAX_ROWS, true, PREFETCH> : q4_gemv_kernel<MAX_ROWS, false, PREFETCH>, 0, 0};
}

// The q4_gemv kernel compiled for the fewest rows that hold `rows`.
template <bool PREFETCH>
Kernel gemv_kernel_for_rows(int rows, bool gptq) {
  if (rows == 1) return gemv_kernel<1, PREFETCH>(gptq);
  if (rows == 2) return gemv_kernel<2, PREFETCH>(gptq);
  if (rows <= 4) return gemv_kernel<4, PREFETCH>(gptq);
  if (rows <= 8) return gemv_kernel<8, PREFETCH>(gptq);
  return gemv_kernel<16, PREFETCH>(gptq);
}

Kernel gemv_kernel_for(int rows, bool gptq, bool prefetch) {
  return prefetch ? gemv_kernel_for_rows<true>(rows, gptq) : gemv_kernel_for_rows<false>(rows, gptq);
}

cudaError_t launch_gemv(const Problems& set, int column_blocks, bool gptq, int slices, int groups_per_warp,
                        bool prefetch, cudaStream_t stream) {
  const Kernel kernel = gemv_kernel_for(set.part[0].rows, gptq, prefetch);
  kernel.function<<<dim3(column_blocks, slices), kGemvThreads, 0, stream>>>(set, groups_per_warp);
  return cudaGetLastError();
}

// ---- SiLU(gate) * up: the MLP's activation between its GEMMs --------------------------------------------
//
// One kernel for what torch's F.silu, mul_ and clamp_ do in three, with their roundings: silu in fp32
// rounded to fp16, times up in fp32 rounded to fp16, kept finite (ExLlamaV2 clamps to fp16's range too).

constexpr int kActivationThreads = 256;

__global__ void __launch_bounds__(kActivationThreads) silu_mul_kernel(const half* gate, const half* up, half* out,
                                                                      int count) {
  for (int i = blockIdx.x * blockDim.x + threadIdx.x; i < count; i += gridDim.x * blockDim.x) {
    const float g = __half2float(gate[i]);
    const float silu = __half2float(__float2half_rn(g / (1.0f + expf(-g))));
    out[i] = __float2half_rn(fminf(fmaxf(silu * __half2float(up[i]), -65504.0f), 65504.0f));
  }
}

// ---- RoPE on q and k, then k and v into the KV cache: four kernels of a layer in one -------------------
//
// Each row (token) is rotated at its own position by ExLlamaV2's rope_ arithmetic, operation for operation in
// half2, so the bits are its own: NeoX pairs columns (c, c + rotary / 2), GPT-J neighbours (c, c + 1); columns
// past `rotary` (partial rotary) stay as they are. Then the row's k and v are copied to its slot of the layer's
// caches ([slots, kv_heads, head_dim]). One block per row.

constexpr int kRopeThreads = 128;

// Rotates the pair of head columns (c, c + 1) and its partner as rope_ does, with the position's sin and cos.
template <bool NEOX>
__device__ __forceinline__ void rotate(half* head, const half* sin, const half* cos, int c, int rotary) {
  if constexpr (NEOX) {
    const int half_rotary = rotary / 2;
    const half2 cos2 = *reinterpret_cast<const half2*>(cos + c);
    const half2 sin2 = *reinterpret_cast<const half2*>(sin + c);
    const half2 left = *reinterpret_cast<const half2*>(head + c);
    const half2 right = *reinterpret_cast<const half2*>(head + c + half_rotary);
    const half2 left_sin = __hmul2(right, __hneg2(sin2));
    const half2 right_sin = __hmul2(left, sin2);
    *reinterpret_cast<half2*>(head + c) = __hfma2(left, cos2, left_sin);
    *reinterpret_cast<half2*>(head + c + half_rotary) = __hfma2(right, cos2, right_sin);
  } else {
    const half2 cos01 = *reinterpret_cast<const half2*>(cos + c);
    const half2 sin01 = as_half2(as_bits(*reinterpret_cast<const half2*>(sin + c)) ^ (1u << 15));  // -sin c, sin c+1
    const half2 x01 = *reinterpret_cast<const half2*>(head + c);
    *reinterpret_cast<half2*>(head + c) = __hfma2(__lowhigh2highlow(x01), sin01, __hmul2(x01, cos01));
  }
}

template <bool NEOX>
__global__ void __launch_bounds__(kRopeThreads)
    rope_store_kernel(half* q, half* k, const half* v, const half* sin, const half* cos, const int* positions,
                      const int64_t* slots, half* k_cache, half* v_cache, int heads, int kv_heads, int head_dim,
                      int rotary) {
  const int row = blockIdx.x;
  const half* sin_row = sin + (size_t)max(positions[row], 0) * rotary;
  const half* cos_row = cos + (size_t)max(positions[row], 0) * rotary;
  const int pairs = NEOX ? rotary / 4 : rotary / 2;  // pairs of columns a head's rotation touches
  for (int index = threadIdx.x; index < (heads + kv_heads) * pairs; index += kRopeThreads) {
    const int head = index / pairs, c = 2 * (index % pairs);
    half* x = head < heads ? q + ((size_t)row * heads + head) * head_dim
                           : k + ((size_t)row * kv_heads + head - heads) * head_dim;
    rotate<NEOX>(x, sin_row, cos_row, c, rotary);
  }
  __syncthreads();  // the row's k is rotated before it is copied
  const int chunks = kv_heads * head_dim / 8;  // 16-byte chunks of a row's keys (and of its values)
  const size_t from = (size_t)row * chunks, to = (size_t)slots[row] * chunks;
  for (int index = threadIdx.x; index < chunks; index += kRopeThreads) {
    reinterpret_cast<uint4*>(k_cache)[to + index] = reinterpret_cast<const uint4*>(k)[from + index];
    reinterpret_cast<uint4*>(v_cache)[to + index] = reinterpret_cast<const uint4*>(v)[from + index];
  }
}

}  // namespace

// ---- C entry points (ctypes) --------------------------------------------------------------------------
// Shapes and alignment are checked by the Python caller (kernels/q4_cuda.py); these return a cudaError_t.
//
// Both products take `parts` (1 to 3) products of `rows` rows and K = `k`, laid out per part in
// `pointers` (eight each: x, qweight, scales, scale_max, zeros, residual, out, partial; residual and partial
// may be null, and zeros is null for EXL2, set for GPTQ, the same for every part) and `sizes` (two each: N and
// x's row stride): x [rows, K] fp16 @ W [K, N] (+ residual [rows, N]) -> out [rows, N] fp16. Where a block
// of columns may be cut into up to `slices` > 1 runs of K, each part's `partial` holds [slices, rows, N] fp32,
// and `arrivals` one int per block of columns of the whole launch, zero (and zero again when the launch ends).
// Launches that share `arrivals` must not overlap (one stream).

namespace {

// The parts as the kernels read them; the grid's blocks of columns for `columns_per_block` in `column_blocks`.
Problems problems(int parts, void* const* pointers, const int* sizes, void* arrivals, int rows, int k, int group_size,
                  int l2_prefetch, int columns_per_block, int& column_blocks) {
  Problems set{};
  set.parts = parts;
  column_blocks = 0;
  for (int i = 0; i < parts; ++i) {
    void* const* at = pointers + 8 * i;
    set.part[i] = Problem{static_cast<const half*>(at[0]), at[1], at[2], static_cast<const half*>(at[3]),
                          static_cast<const uint32_t*>(at[4]), static_cast<const half*>(at[5]), static_cast<half*>(at[6]),
                          static_cast<float*>(at[7]), static_cast<int*>(arrivals), rows, sizes[2 * i], k,
                          sizes[2 * i + 1], group_size, l2_prefetch};
    set.first_block[i] = column_blocks;
    column_blocks += (sizes[2 * i] + columns_per_block - 1) / columns_per_block;
  }
  set.column_blocks = column_blocks;
  return set;
}

}  // namespace

extern "C" {

// On the tensor cores: rows 1..64, K a multiple of 128 and of the group size, which is a multiple of 128.
// `pipeline`: 0 stages weights through shared memory in a grid of `blocks` blocks (at most the launch's blocks of
// columns times its batches of K), 2 to 4 streams them through registers that many batches ahead, each block of
// columns in `slices` runs of K; `slices` is also the most runs of one block of columns, for which the partial
// sums have room. `l2_prefetch`: batches past those asked of L2 (0: none).
int verispec_q4_mma(int parts, void* const* pointers, const int* sizes, void* arrivals, int rows, int k,
                    int group_size, int slices, int blocks, int pipeline, int l2_prefetch, void* stream_handle) {
  if (parts < 1 || parts > kMaxParts) return cudaErrorInvalidValue;
  int column_blocks = 0;
  const Problems set =
      problems(parts, pointers, sizes, arrivals, rows, k, group_size, l2_prefetch, 32 * kMmaWarps, column_blocks);
  if (pipeline == 0 && (blocks < 1 || (long long)blocks > (long long)column_blocks * (k / kBatchK))) {
    return cudaErrorInvalidValue;
  }
  return launch_mma(set, pointers[4] != nullptr, slices, blocks, pipeline, static_cast<cudaStream_t>(stream_handle));
}

// On the CUDA cores: rows 1..16; group size a multiple of 64, K cut into `slices` runs of whole groups.
int verispec_q4_gemv(int parts, void* const* pointers, const int* sizes, void* arrivals, int rows, int k,
                     int group_size, int slices, int groups_per_warp, int prefetch, void* stream_handle) {
  if (parts < 1 || parts > kMaxParts) return cudaErrorInvalidValue;
  int column_blocks = 0;
  const Problems set = problems(parts, pointers, sizes, arrivals, rows, k, group_size, 0, kGemvColumns, column_blocks);
  return launch_gemv(set, column_blocks, pointers[4] != nullptr, slices, groups_per_warp, prefetch != 0,
                     static_cast<cudaStream_t>(stream_handle));
}

// How the q4_mma kernel for `rows` and `pipeline` launches on the current device: the stages it takes through
// shared memory (0 for the register pipelines) and the blocks of it one SM holds at once.
int verispec_q4_mma_occupancy(int rows, int gptq, int pipeline, int* stages, int* blocks) {
  Kernel kernel{};
  const cudaError_t error = mma_kernel_for(rows, gptq != 0, pipeline, kernel);
  if (error != cudaSuccess) return error;
  *stages = kernel.stages;
  return cudaOccupancyMaxActiveBlocksPerMultiprocessor(blocks, kernel.function, kMmaThreads, kernel.shared_bytes);
}

// The blocks per SM a q4_mma grid is cut for: through shared memory (pipeline 0) the count every tile of rows
// keeps resident, through registers the count of one tile's kernel.
int verispec_q4_mma_resident_blocks(int gptq, int pipeline, int* blocks) {
  if (pipeline == 0) return gptq ? staged_resident_blocks<true>(*blocks) : staged_resident_blocks<false>(*blocks);
  int stages = 0;
  return verispec_q4_mma_occupancy(8, gptq, pipeline, &stages, blocks);
}

// out [count] = SiLU(gate) * up, fp16, on the caller's stream.
int verispec_silu_mul(const void* gate, const void* up, void* out, int count, void* stream_handle) {
  const int blocks = (count + kActivationThreads - 1) / kActivationThreads;
  silu_mul_kernel<<<blocks < 1024 ? blocks : 1024, kActivationThreads, 0, static_cast<cudaStream_t>(stream_handle)>>>(
      static_cast<const half*>(gate), static_cast<const half*>(up), static_cast<half*>(out), count);
  return cudaGetLastError();
}

// q [rows, heads, head_dim] and k [rows, kv_heads, head_dim] rotated in place at positions [rows] (int32)
// by the sin and cos tables [positions, rotary] (ExLlamaV2's, NeoX or GPT-J style), then k and v [rows, kv_heads,
// head_dim] copied to rows slots [rows] (int64) of k_cache and v_cache [slots, kv_heads, head_dim]. fp16, all
// contiguous; head_dim a multiple of 8, rotary of 4 (NeoX) or 2 (GPT-J) and at most head_dim.
int verispec_rope_store(void* q, void* k, const void* v, const void* sin, const void* cos, const void* positions,
                        const void* slots, void* k_cache, void* v_cache, int rows, int heads, int kv_heads,
                        int head_dim, int rotary, int neox, void* stream_handle) {
  if (rows < 1) return cudaSuccess;
  auto kernel = neox ? rope_store_kernel<true> : rope_store_kernel<false>;
  kernel<<<rows, kRopeThreads, 0, static_cast<cudaStream_t>(stream_handle)>>>(
      static_cast<half*>(q), static_cast<half*>(k), static_cast<const half*>(v), static_cast<const half*>(sin),
      static_cast<const half*>(cos), static_cast<const int*>(positions), static_cast<const int64_t*>(slots),
      static_cast<half*>(k_cache), static_cast<half*>(v_cache), heads, kv_heads, head_dim, rotary);
  return cudaGetLastError();
}

const char* verispec_error_string(int error) { return cudaGetErrorString(static_cast<cudaError_t>(error)); }

}  // extern "C"
