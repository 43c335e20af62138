// Few-row CPU kernels for decoding: y = x W^T for a handful of activation rows, and few-query attention.
//
// Why: a decoding step multiplies 1..~16 rows by every weight matrix, so the cost is reading the weights.
// These kernels read each weight once per call whatever the number of rows, and they are row-invariant by
// construction: every output element is computed by one thread, in a reduction order that depends only on
// K (and on the instruction-set path), never on the other rows, on how rows are grouped in registers, or on
// how the output features are split between threads.  So a row decoded alone and the same row inside a
// speculative-verification batch give bit-identical logits.
//
// Layout of this file: the common part (helpers, dispatch, Python bindings) is compiled once; the "ISA body"
// (generic kernels written over a small vector abstraction V) is included once per path, each inside its own
// namespace and `#pragma GCC target` region: scalar (plain C++), avx2 (AVX2+FMA+F16C), avx512
// (AVX-512 F/BW/VL/DQ/VNNI) and avx512bf16 (the same with BF16, for the bfloat16 kernel only).  The body is
// this same file, included again with FEWROW_ISA_BODY defined, so the paths share every line of kernel logic
// and differ only in their V.
//
// Formats: every weight matrix is stored as panels of 16 output features, so a vector holds one k (or four) of
// 16 features and the rows' activations are broadcast against it: no horizontal sums, and a pass of several
// rows keeps the FMA or VNNI units busy while the weights stream.  f32 and bf16 (PanelRun) multiply with float32
// FMAs, each output one chain over k; bf16 takes its activations rounded to bfloat16, as vdpbf16ps does.
// Q8_0 / Q4_0 / Q4_1 (PanelQRun) keep GGUF's blocks of 32 with their fp16 scales, only the bytes rearranged; the
// activation is quantized per row to int8 in blocks of 32 (scale = max|x| / 127, q = round-half-even(x / scale)),
// block dot products run in int32, then each block is scaled in fp32 and the blocks are summed in order.
//
// Work split: parallel over panels (at::parallel_for); the rows go in groups (kFloatRows, kQRows) that each pass
// over the panels once, each (row, feature) with its own accumulators.

#ifndef FEWROW_ISA_BODY

#include <torch/extension.h>
#include <ATen/Parallel.h>

#if defined(__x86_64__) || defined(__i386__)
#define FEWROW_X86 1  // the vector paths; elsewhere only the scalar one is built
#include <immintrin.h>
#else
#define FEWROW_X86 0
#endif

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <string>
#include <type_traits>
#include <utility>
#include <vector>

#include "fewrow.h"  // the C++ interface that layers.cpp calls

#define FR_INLINE inline __attribute__((always_inline))
#define FR_LAMBDA __attribute__((always_inline))  // a lambda of repeat(): inlined, so its registers stay registers

namespace fewrow {

// GGUF block formats this file reads.
// Fmt (Q8_0, Q4_0, Q4_1 and the float formats) is declared in fewrow.h.
constexpr int kBlock = 32;                      // elements per block (all three formats)
constexpr int block_bytes(int f) { return f == Q8_0 ? 34 : f == Q4_0 ? 18 : 20; }
constexpr int data_offset(int f) { return f == Q4_1 ? 4 : 2; }  // bytes of fp16 scale (and min) before the data
constexpr int panel_block_bytes(int f) { return 16 * block_bytes(f); }  // a block of a 16-feature panel
constexpr int panel_data(int f) { return 16 * data_offset(f); }  // where its weight vectors start
constexpr int32_t panel_zero(int f) { return f == Q8_0 ? 128 : f == Q4_0 ? 8 : 0; }  // the stored bytes' offset
constexpr const char* fmt_name(int f) { return f == Q8_0 ? "q8_0" : f == Q4_0 ? "q4_0" : "q4_1"; }

// IEEE half -> float, portable (the scalar path cannot assume F16C).
inline float half_to_float(uint16_t h) {
  const uint32_t sign = uint32_t(h & 0x8000) << 16;
  uint32_t exp = (h >> 10) & 0x1f, man = h & 0x3ff, bits;
  if (exp == 0x1f) {
    bits = sign | 0x7f800000u | (man << 13);          // inf / nan
  } else if (exp != 0) {
    bits = sign | ((exp + 112) << 23) | (man << 13);  // normal: rebias 15 -> 127
  } else if (man == 0) {
    bits = sign;                                      // +-0
  } else {                                            // subnormal half: normalise
    int e = -1;
    do { man <<= 1; ++e; } while ((man & 0x400) == 0);
    bits = sign | uint32_t(112 - e) << 23 | ((man & 0x3ff) << 13);
  }
  float f;
  std::memcpy(&f, &bits, 4);
  return f;
}


// The bfloat16 pairs that the avx512bf16 path's activations are, stored in a float buffer.
typedef uint16_t __attribute__((__may_alias__)) alias_u16;
typedef uint32_t __attribute__((__may_alias__)) alias_u32;

// float -> bfloat16, rounding to nearest even (NaN stays a quiet NaN): the bfloat16 kernels' activations.
inline uint16_t round_to_bf16(float f) {
  uint32_t u;
  std::memcpy(&u, &f, 4);
  if ((u & 0x7fffffffu) > 0x7f800000u) return uint16_t((u >> 16) | 0x40);
  return uint16_t((u + 0x7fffu + ((u >> 16) & 1)) >> 16);
}
inline float bf16_to_float(uint16_t h) {
  const uint32_t u = uint32_t(h) << 16;
  float f;
  std::memcpy(&f, &u, 4);
  return f;
}

// Software prefetch distance along the weight stream: far enough ahead to keep the memory busy while a group of
// rows computes (measured: 4-8 KiB).
constexpr int kPrefetchBytes = 4096;
constexpr int64_t kL2BlockBytes = 256 << 10;  // weights a thread keeps in L2 over the row groups of a long pass

inline int64_t round_up(int64_t a, int64_t b) { return (a + b - 1) / b * b; }

// Grain for at::parallel_for over panels: at least ~64 KiB of weights per task, so small matrices stay on one
// thread and big ones split evenly.
inline int64_t tile_grain(int64_t panel_bytes) {
  return std::max<int64_t>(1, (int64_t(1) << 16) / std::max<int64_t>(1, panel_bytes));
}

// ---- vector abstractions -------------------------------------------------------------------------------
// Each V gives: W float lanes; its panel tilings (kFloatRows, float_panels, kQRows); float ops, bf16 pair
// loads, a fixed-order horizontal sum and the pieces of exp; and for the block panels the byte vectors QW (16
// features x 4 bytes a vector), the nibble split and the int32 dot products of 4 bytes (qdot).

namespace scalar {
struct V {
  static constexpr int W = 1;  // float lanes
  // Float panels: rows per group, and panels per tile for a group of rb rows.
  static constexpr int kFloatRows = 4;
  static constexpr int float_panels(int /*rb*/) { return 1; }
  static constexpr bool kBF16Dot = false;  // bfloat16 products by vdpbf16ps (the avx512bf16 path)
  static constexpr int kQRows = 4;  // Q4 panels: rows per group
  using F = float;
  using I = int32_t;
  // Q4 panels: W lanes of 4 unsigned nibble values each (QW), multiplied by 4 signed activation bytes.
  using QW = uint32_t;
  static void nibbles(const uint8_t* p, QW& lo, QW& hi) {
    uint32_t b;
    std::memcpy(&b, p, 4);
    lo = b & 0x0f0f0f0fu, hi = (b >> 4) & 0x0f0f0f0fu;
  }
  static I qset1(int32_t c) { return c; }
  static I qadd(I a, I b) { return a + b; }
  static void bytes(const uint8_t* p, QW& w) { std::memcpy(&w, p, 4); }
  static I qdot(I acc, QW w, uint32_t x) {
    for (int t = 0; t < 4; ++t) acc += int32_t((w >> (8 * t)) & 0xff) * int32_t(int8_t(x >> (8 * t)));
    return acc;
  }
  static F load_half(const uint16_t* p) { return half_to_float(*p); }
  static F zero() { return 0.f; }
  static F set1(float a) { return a; }
  static F load(const float* p) { return *p; }
  static void store(float* p, F a) { *p = a; }
  // W features' bfloat16 weights at k and k + 1, interleaved (p[2j], p[2j + 1]), widened exactly to float32.
  static void load_bf16_pair(const uint16_t* p, F& even, F& odd) {
    const uint32_t lo = uint32_t(p[0]) << 16, hi = uint32_t(p[1]) << 16;
    std::memcpy(&even, &lo, 4);
    std::memcpy(&odd, &hi, 4);
  }
  static F add(F a, F b) { return a + b; }
  static F sub(F a, F b) { return a - b; }
  static F mul(F a, F b) { return a * b; }
  static F max(F a, F b) { return a > b ? a : b; }  // (a nan a gives b, as maxps does)
  static F min(F a, F b) { return a < b ? a : b; }
  static F div(F a, F b) { return a / b; }
  static F abs(F a) { return std::fabs(a); }
  static float hmax(F a) { return a; }
  static void store_i8(int8_t* p, F a) { *p = int8_t(a); }  // a: an integer in [-127, 127]
  static F fma(F a, F b, F c) { return a * b + c; }  // unfused: no FMA hardware assumed (-ffp-contract=off)
  static float sfma(float a, float b, float c) { return a * b + c; }
  static float hsum(F a) { return a; }
  static F cvt(I a) { return float(a); }
  // exp pieces
  static F round(F a) { return std::nearbyint(a); }
  static F pow2i(F n) {  // 2^n for integral n in [-126, 127]
    const uint32_t bits = uint32_t(int32_t(n) + 127) << 23;
    float f;
    std::memcpy(&f, &bits, 4);
    return f;
  }
  static F zero_below(F x, F lo, F r) { return x < lo ? 0.f : r; }
  static F select_ge(F x, F lo, F a, F b) { return x >= lo ? a : b; }

};
#define FEWROW_ISA_BODY
#include __FILE__
}  // namespace scalar

#if FEWROW_X86
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c")
namespace avx2 {
struct V {
  static constexpr int W = 8;
  // Float panels (16 registers): rb rows x 2 vectors a panel; 6 rows of one panel = 12 accumulators.
  static constexpr int kFloatRows = 6;
  static constexpr int float_panels(int rb) { return rb <= 2 ? 2 : 1; }
  static constexpr bool kBF16Dot = false;  // bfloat16 products by vdpbf16ps (the avx512bf16 path)
  static constexpr int kQRows = 2;  // Q4 panels: 2 rows x 2 vectors of two int sums and a float sum
  using F = __m256;
  using I = __m256i;
  using QW = __m256i;
  static FR_INLINE void nibbles(const uint8_t* p, QW& lo, QW& hi) {
    const __m256i b = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)), m = _mm256_set1_epi8(0x0f);
    lo = _mm256_and_si256(b, m), hi = _mm256_and_si256(_mm256_srli_epi16(b, 4), m);
  }
  static FR_INLINE I qset1(int32_t c) { return _mm256_set1_epi32(c); }
  static FR_INLINE I qadd(I a, I b) { return _mm256_add_epi32(a, b); }
  // No VNNI: sum(w * x) = sum((w - 128) * x) + 128 * sum(x), the first by maddubs on |w - 128| and x with its
  // sign (pairs within int16: |w - 128| <= 128, |x| <= 127), so exact for every byte w.
  static FR_INLINE I qdot(I acc, QW w, uint32_t x) {
    const __m256i centred = _mm256_xor_si256(w, _mm256_set1_epi8(char(0x80)));
    const __m256i pairs = _mm256_maddubs_epi16(_mm256_abs_epi8(centred),
                                               _mm256_sign_epi8(_mm256_set1_epi32(int(x)), centred));
    const int32_t xsum = int8_t(x) + int8_t(x >> 8) + int8_t(x >> 16) + int8_t(x >> 24);
    return _mm256_add_epi32(_mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))),
                            _mm256_set1_epi32(128 * xsum));
  }
  static FR_INLINE void bytes(const uint8_t* p, QW& w) { w = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
  static FR_INLINE F load_half(const uint16_t* p) {
    return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
  }
  static FR_INLINE F zero() { return _mm256_setzero_ps(); }
  static FR_INLINE F set1(float a) { return _mm256_set1_ps(a); }
  static FR_INLINE F load(const float* p) { return _mm256_loadu_ps(p); }
  static FR_INLINE void store(float* p, F a) { _mm256_storeu_ps(p, a); }
  static FR_INLINE void load_bf16_pair(const uint16_t* p, F& even, F& odd) {  // see the scalar V
    const __m256i u = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
    even = _mm256_castsi256_ps(_mm256_slli_epi32(u, 16));
    odd = _mm256_castsi256_ps(_mm256_and_si256(u, _mm256_set1_epi32(int(0xffff0000u))));
  }
  static FR_INLINE F add(F a, F b) { return _mm256_add_ps(a, b); }
  static FR_INLINE F sub(F a, F b) { return _mm256_sub_ps(a, b); }
  static FR_INLINE F mul(F a, F b) { return _mm256_mul_ps(a, b); }
  static FR_INLINE F max(F a, F b) { return _mm256_max_ps(a, b); }
  static FR_INLINE F min(F a, F b) { return _mm256_min_ps(a, b); }
  static FR_INLINE F div(F a, F b) { return _mm256_div_ps(a, b); }
  static FR_INLINE F abs(F a) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), a); }
  static FR_INLINE void store_i8(int8_t* p, F a) {  // a: integers in [-127, 127]
    const __m256i i = _mm256_cvttps_epi32(a);
    const __m128i w = _mm_packs_epi32(_mm256_castsi256_si128(i), _mm256_extracti128_si256(i, 1));
    _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(w, w));
  }
  static FR_INLINE float hmax(F a) {
    __m128 s = _mm_max_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_max_ps(s, _mm_movehl_ps(s, s));
    return _mm_cvtss_f32(_mm_max_ss(s, _mm_shuffle_ps(s, s, 1)));
  }
  static FR_INLINE F fma(F a, F b, F c) { return _mm256_fmadd_ps(a, b, c); }
  static FR_INLINE float sfma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
  static FR_INLINE float hsum(F a) {  // ((l0+l4)+(l2+l6)) + ((l1+l5)+(l3+l7))
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(a), _mm256_extractf128_ps(a, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  static FR_INLINE F cvt(I a) { return _mm256_cvtepi32_ps(a); }
  static FR_INLINE F round(F a) { return _mm256_round_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static FR_INLINE F pow2i(F n) {
    const __m256i e = _mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127));
    return _mm256_castsi256_ps(_mm256_slli_epi32(e, 23));
  }
  static FR_INLINE F zero_below(F x, F lo, F r) { return _mm256_and_ps(_mm256_cmp_ps(x, lo, _CMP_GE_OQ), r); }
  static FR_INLINE F select_ge(F x, F lo, F a, F b) { return _mm256_blendv_ps(b, a, _mm256_cmp_ps(x, lo, _CMP_GE_OQ)); }

};
#include __FILE__
}  // namespace avx2
#pragma GCC pop_options

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx2,fma,f16c")
namespace avx512 {
struct V {
  static constexpr int W = 16;
  // Float panels (32 registers): up to 12 rows x 2 panels = 24 accumulators, or 4 x 4.
  static constexpr int kFloatRows = 12;
  static constexpr int float_panels(int rb) { return rb <= 4 ? 4 : 2; }
  static constexpr bool kBF16Dot = false;  // bfloat16 products by vdpbf16ps (the avx512bf16 path)
  static constexpr int kQRows = 8;  // Q4 panels: 8 rows x two int sums and a float sum, two weight vectors
  using F = __m512;
  using I = __m512i;
  static FR_INLINE F zero() { return _mm512_setzero_ps(); }
  static FR_INLINE F set1(float a) { return _mm512_set1_ps(a); }
  static FR_INLINE F load(const float* p) { return _mm512_loadu_ps(p); }
  static FR_INLINE void store(float* p, F a) { _mm512_storeu_ps(p, a); }
  static FR_INLINE void load_bf16_pair(const uint16_t* p, F& even, F& odd) {  // see the scalar V
    const __m512i u = _mm512_loadu_si512(p);
    even = _mm512_castsi512_ps(_mm512_slli_epi32(u, 16));
    odd = _mm512_castsi512_ps(_mm512_and_si512(u, _mm512_set1_epi32(int(0xffff0000u))));
  }
  static FR_INLINE F add(F a, F b) { return _mm512_add_ps(a, b); }
  static FR_INLINE F sub(F a, F b) { return _mm512_sub_ps(a, b); }
  static FR_INLINE F mul(F a, F b) { return _mm512_mul_ps(a, b); }
  static FR_INLINE F max(F a, F b) { return _mm512_max_ps(a, b); }
  static FR_INLINE F min(F a, F b) { return _mm512_min_ps(a, b); }
  static FR_INLINE F div(F a, F b) { return _mm512_div_ps(a, b); }
  static FR_INLINE F abs(F a) { return _mm512_abs_ps(a); }
  static FR_INLINE float hmax(F a) { return _mm512_reduce_max_ps(a); }
  static FR_INLINE void store_i8(int8_t* p, F a) {  // a: integers in [-127, 127]
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(_mm512_cvttps_epi32(a)));
  }
  static FR_INLINE F fma(F a, F b, F c) { return _mm512_fmadd_ps(a, b, c); }
  static FR_INLINE float sfma(float a, float b, float c) { return __builtin_fmaf(a, b, c); }
  static FR_INLINE float hsum(F a) {  // halves first, then the same order as the AVX2 path
    const __m256 h = _mm256_add_ps(_mm512_castps512_ps256(a), _mm512_extractf32x8_ps(a, 1));
    __m128 s = _mm_add_ps(_mm256_castps256_ps128(h), _mm256_extractf128_ps(h, 1));
    s = _mm_add_ps(s, _mm_movehl_ps(s, s));
    s = _mm_add_ss(s, _mm_shuffle_ps(s, s, 1));
    return _mm_cvtss_f32(s);
  }
  static FR_INLINE F cvt(I a) { return _mm512_cvtepi32_ps(a); }
  using QW = __m512i;
  static FR_INLINE void nibbles(const uint8_t* p, QW& lo, QW& hi) {
    const __m512i b = _mm512_loadu_si512(p), m = _mm512_set1_epi8(0x0f);
    lo = _mm512_and_si512(b, m), hi = _mm512_and_si512(_mm512_srli_epi16(b, 4), m);
  }
  static FR_INLINE I qset1(int32_t c) { return _mm512_set1_epi32(c); }
  static FR_INLINE I qadd(I a, I b) { return _mm512_add_epi32(a, b); }
  static FR_INLINE I qdot(I acc, QW w, uint32_t x) { return _mm512_dpbusd_epi32(acc, w, _mm512_set1_epi32(int(x))); }
  static FR_INLINE void bytes(const uint8_t* p, QW& w) { w = _mm512_loadu_si512(p); }
  static FR_INLINE F load_half(const uint16_t* p) {
    return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
  }
  static FR_INLINE F round(F a) { return _mm512_roundscale_ps(a, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
  static FR_INLINE F pow2i(F n) {
    const __m512i e = _mm512_add_epi32(_mm512_cvtps_epi32(n), _mm512_set1_epi32(127));
    return _mm512_castsi512_ps(_mm512_slli_epi32(e, 23));
  }
  static FR_INLINE F zero_below(F x, F lo, F r) { return _mm512_maskz_mov_ps(_mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ), r); }
  static FR_INLINE F select_ge(F x, F lo, F a, F b) {
    return _mm512_mask_mov_ps(b, _mm512_cmp_ps_mask(x, lo, _CMP_GE_OQ), a);
  }

};
#include __FILE__
}  // namespace avx512
#pragma GCC pop_options

// AVX-512 with BF16 (Zen 4 and later, Cooper Lake, Sapphire Rapids): the avx512 path, but bfloat16 products by
// vdpbf16ps, 32 multiply-adds an instruction. Only the bfloat16 kernel is compiled again (FEWROW_BF16_DOT).
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx512vnni,avx512bf16,avx2,fma,f16c")
namespace avx512bf16 {
struct V : avx512::V {
  static constexpr bool kBF16Dot = true;
  using P = __m512bh;  // 16 lanes of bfloat16 pairs
  static FR_INLINE P load_pairs(const uint16_t* p) { return (P)_mm512_loadu_si512(p); }
  static FR_INLINE P set1_pair(uint32_t pair) { return (P)_mm512_set1_epi32(int(pair)); }
  // Per lane: acc + w_odd x_odd, rounded, then + w_even x_even, rounded (both products exact in float32), with
  // bfloat16 subnormals read as zero.
  static FR_INLINE F dot_pairs(F acc, P w, P x) { return _mm512_dpbf16_ps(acc, w, x); }
};
#define FEWROW_BF16_DOT
#include __FILE__
#undef FEWROW_BF16_DOT
}  // namespace avx512bf16
#pragma GCC pop_options
#endif  // FEWROW_X86

// ---- dispatch --------------------------------------------------------------------------------------------

enum class Isa : int { scalar = 0, avx2 = 1, avx512 = 2, avx512bf16 = 3 };
constexpr int kIsaCount = 4;
static const char* const kIsaNames[kIsaCount] = {"scalar", "avx2", "avx512", "avx512bf16"};

static bool isa_supported(Isa i) {
#if FEWROW_X86
  __builtin_cpu_init();
  switch (i) {
    case Isa::scalar: return true;
    case Isa::avx2:
      return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");  // every AVX2 CPU has F16C
    case Isa::avx512:
      return isa_supported(Isa::avx2) && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
             __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq") &&
             __builtin_cpu_supports("avx512vnni");
    case Isa::avx512bf16:
      return isa_supported(Isa::avx512) && __builtin_cpu_supports("avx512bf16");
  }
  return false;
#else
  return i == Isa::scalar;
#endif
}

static Isa best_isa() {
  if (isa_supported(Isa::avx512bf16)) return Isa::avx512bf16;
  if (isa_supported(Isa::avx512)) return Isa::avx512;
  if (isa_supported(Isa::avx2)) return Isa::avx2;
  return Isa::scalar;
}

static std::atomic<int> g_isa{int(best_isa())};

struct Impl {
  decltype(&scalar::linear_f32_impl) linear_f32;
  decltype(&scalar::linear_bf16_impl) linear_bf16;
  decltype(&scalar::linear_q_impl) linear_q;
  decltype(&scalar::attention_impl) attention;
  decltype(&scalar::silu_gate_impl) silu_gate;
};

static Impl impl() {
  switch (Isa(g_isa.load())) {
#if FEWROW_X86
    case Isa::avx512bf16:
      return {avx512::linear_f32_impl, avx512bf16::linear_bf16_impl, avx512::linear_q_impl, avx512::attention_impl,
              avx512::silu_gate_impl};
    case Isa::avx512:
      return {avx512::linear_f32_impl, avx512::linear_bf16_impl, avx512::linear_q_impl, avx512::attention_impl,
              avx512::silu_gate_impl};
    case Isa::avx2:
      return {avx2::linear_f32_impl, avx2::linear_bf16_impl, avx2::linear_q_impl, avx2::attention_impl,
              avx2::silu_gate_impl};
#endif
    default:
      return {scalar::linear_f32_impl, scalar::linear_bf16_impl, scalar::linear_q_impl, scalar::attention_impl,
              scalar::silu_gate_impl};
  }
}

// ---- Python entry points -----------------------------------------------------------------------------------

static void check_cpu(const at::Tensor& t, const char* name) {
  TORCH_CHECK(t.device().is_cpu(), name, " must be a CPU tensor");
}

static at::Tensor check_x(const at::Tensor& x) {
  check_cpu(x, "x");
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kFloat, "x must be float32 [R, K]");
  TORCH_CHECK(x.size(0) >= 1, "x needs at least one row");
  return x.contiguous();
}

// Float weights as panels holding out_features <= 16 P features (model/kernels/linear.py: float_panels): float32
// [P, K, 16]; bfloat16 [P, ceil(K / 2), 32], k and k + 1 interleaved.
static void check_panels(const at::Tensor& x, const at::Tensor& w, at::ScalarType dtype, int64_t out_features) {
  check_cpu(w, "w");
  const bool pairs = dtype == at::kBFloat16;
  const int64_t depth = pairs ? (x.size(1) + 1) / 2 : x.size(1), width = pairs ? 32 : 16;
  TORCH_CHECK(w.dim() == 3 && w.size(2) == width && w.scalar_type() == dtype && w.is_contiguous(),
              "w must be contiguous ", dtype, " panels [P, ", pairs ? "ceil(K/2), 32" : "K, 16", "]");
  TORCH_CHECK(w.size(1) == depth, "x is [R, ", x.size(1), "] but the panels are [P, ", w.size(1), ", ", width, "]");
  TORCH_CHECK(out_features > 16 * (w.size(0) - 1) && out_features <= 16 * w.size(0),
              "out_features = ", out_features, " does not fit ", w.size(0), " panels of 16");
}

at::Tensor linear_f32(const at::Tensor& x_, const at::Tensor& w, int64_t out_features) {
  const at::Tensor x = check_x(x_);
  check_panels(x, w, at::kFloat, out_features);
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  impl().linear_f32(x.data_ptr<float>(), w.data_ptr<float>(), x.size(0), out_features, x.size(1), y.data_ptr<float>());
  return y;
}

at::Tensor linear_bf16(const at::Tensor& x_, const at::Tensor& w, int64_t out_features) {
  const at::Tensor x = check_x(x_);
  check_panels(x, w, at::kBFloat16, out_features);
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  impl().linear_bf16(x.data_ptr<float>(), reinterpret_cast<const uint16_t*>(w.data_ptr<at::BFloat16>()), x.size(0),
                     out_features, x.size(1), y.data_ptr<float>());
  return y;
}

// Block weights as panels of 16 features (linear.py: block_panels), uint8 [ceil(N/16), K/32 * 16 * block bytes].
at::Tensor linear_q(int fmt, const at::Tensor& x_, const at::Tensor& w, int64_t out_features) {
  const at::Tensor x = check_x(x_);
  check_cpu(w, "w_blocks");
  const int64_t bb = panel_block_bytes(fmt);
  TORCH_CHECK(w.dim() == 2 && w.scalar_type() == at::kByte && w.is_contiguous(),
              "w_blocks must be contiguous uint8 panels [ceil(N/16), K/32*", bb, "] (", fmt_name(fmt), ")");
  TORCH_CHECK(w.size(1) % bb == 0, "w_blocks row of ", w.size(1), " bytes is not whole ", fmt_name(fmt), " blocks");
  const int64_t K = w.size(1) / bb * kBlock;
  TORCH_CHECK(K == x.size(1), "x is [R, ", x.size(1), "] but ", fmt_name(fmt), " w_blocks hold K = ", K);
  TORCH_CHECK(out_features > 16 * (w.size(0) - 1) && out_features <= 16 * w.size(0),
              "out_features = ", out_features, " does not fit ", w.size(0), " panels of 16");
  at::Tensor y = at::empty({x.size(0), out_features}, x.options());
  impl().linear_q(fmt, x.data_ptr<float>(), w.data_ptr<uint8_t>(), x.size(0), out_features, K, y.data_ptr<float>());
  return y;
}

at::Tensor silu_gate(const at::Tensor& gate_up) {
  check_cpu(gate_up, "gate_up");
  TORCH_CHECK(gate_up.dim() == 2 && gate_up.size(1) % 2 == 0 && gate_up.scalar_type() == at::kFloat,
              "gate_up must be float32 [R, 2 I]");
  const at::Tensor gu = gate_up.contiguous();
  at::Tensor out = at::empty({gu.size(0), gu.size(1) / 2}, gu.options());
  impl().silu_gate(gu.data_ptr<float>(), gu.size(0), gu.size(1) / 2, out.data_ptr<float>());
  return out;
}

std::vector<int64_t> row_starts(int64_t B, int64_t start_pos, const c10::optional<at::Tensor>& starts) {
  TORCH_CHECK(start_pos >= 0, "start_pos must be >= 0");
  if (!starts.has_value() || !starts->defined()) return std::vector<int64_t>(B, start_pos);
  const at::Tensor s = starts->to(at::kLong).contiguous();
  TORCH_CHECK(s.dim() == 1 && s.size(0) == B && s.device().is_cpu(), "starts must be int64 [B] on the CPU");
  std::vector<int64_t> out(s.data_ptr<int64_t>(), s.data_ptr<int64_t>() + B);
  for (int64_t v : out) TORCH_CHECK(v >= 0, "starts must be >= 0");
  return out;
}

std::vector<int64_t> cache_rows(int64_t B, int64_t cached, const c10::optional<at::Tensor>& rows) {
  if (!rows.has_value() || !rows->defined()) {
    TORCH_CHECK(cached == B, "without rows, the cache must have one row per batch row");
    std::vector<int64_t> out(B);
    for (int64_t b = 0; b < B; ++b) out[b] = b;
    return out;
  }
  const at::Tensor r = rows->to(at::kLong).contiguous();
  TORCH_CHECK(r.dim() == 1 && r.size(0) == B && r.device().is_cpu(), "rows must be int64 [B] on the CPU");
  std::vector<int64_t> out(r.data_ptr<int64_t>(), r.data_ptr<int64_t>() + B);
  for (int64_t v : out) TORCH_CHECK(0 <= v && v < cached, "rows must index the cache's rows");
  return out;
}

at::Tensor attention(const at::Tensor& q_, const at::Tensor& k_, const at::Tensor& v_, int64_t start_pos,
                            const c10::optional<at::Tensor>& attendable, const c10::optional<at::Tensor>& starts,
                            const c10::optional<at::Tensor>& rows) {
  check_cpu(q_, "q"); check_cpu(k_, "k"); check_cpu(v_, "v");
  TORCH_CHECK(q_.dim() == 4 && k_.dim() == 4 && v_.dim() == 4, "q, k, v must be [B, H, T, D], [B, Hkv, S, D]");
  TORCH_CHECK(q_.scalar_type() == at::kFloat && k_.scalar_type() == at::kFloat && v_.scalar_type() == at::kFloat,
              "q, k, v must be float32");
  // Strided views (a cache sliced along S) are used as they are; only the last dim must be contiguous.
  const at::Tensor q = q_.stride(3) == 1 ? q_ : q_.contiguous();
  const at::Tensor k = k_.stride(3) == 1 ? k_ : k_.contiguous();
  const at::Tensor v = v_.stride(3) == 1 ? v_ : v_.contiguous();
  const int64_t B = q.size(0), H = q.size(1), T = q.size(2), D = q.size(3), Hkv = k.size(1), S = k.size(2);
  const int64_t Bc = k.size(0);  // the cache's rows: q's row b reads k/v row rows[b]
  TORCH_CHECK(v.size(0) == Bc && v.size(1) == Hkv && v.size(2) == S && k.size(3) == D && v.size(3) == D,
              "k and v must be [Bc, Hkv, S, D] matching q [B, H, T, D]");
  TORCH_CHECK(Hkv >= 1 && H % Hkv == 0, "H must be a multiple of Hkv");
  const std::vector<int64_t> first = row_starts(B, start_pos, starts);
  const std::vector<int64_t> kv_rows = cache_rows(B, Bc, rows);
  const bool* att = nullptr;
  int64_t att_stride = 0;
  at::Tensor a;
  if (attendable.has_value() && attendable->defined()) {
    a = attendable->contiguous();
    check_cpu(a, "attendable");
    TORCH_CHECK(a.dim() == 2 && a.scalar_type() == at::kBool && a.size(0) == Bc && a.size(1) >= S,
                "attendable must be bool [Bc, S'] with S' >= S");
    att = a.data_ptr<bool>();
    att_stride = a.size(1);
  }
  at::Tensor out = at::empty({B, H, T, D}, q.options());
  const int64_t qs[3] = {q.stride(0), q.stride(1), q.stride(2)};
  const int64_t ks[3] = {k.stride(0), k.stride(1), k.stride(2)};
  const int64_t vs[3] = {v.stride(0), v.stride(1), v.stride(2)};
  impl().attention(q.data_ptr<float>(), qs, k.data_ptr<float>(), ks, v.data_ptr<float>(), vs, att, att_stride, B, H,
                   T, D, Hkv, S, first.data(), kv_rows.data(), out.data_ptr<float>());
  return out;
}

static std::string isa() { return kIsaNames[g_isa.load()]; }

static std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (int i = 0; i < kIsaCount; ++i)
    if (isa_supported(Isa(i))) out.push_back(kIsaNames[i]);
  return out;
}

static void set_isa(const std::string& name) {
  for (int i = 0; i < kIsaCount; ++i) {
    if (name == kIsaNames[i]) {
      TORCH_CHECK(isa_supported(Isa(i)), "this CPU does not support the ", name, " path");
      g_isa.store(i);
      return;
    }
  }
  TORCH_CHECK(false, "unknown ISA path '", name, "' (expected avx512bf16, avx512, avx2 or scalar)");
}

}  // namespace fewrow

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  using namespace fewrow;
  auto nogil = py::call_guard<py::gil_scoped_release>();
  m.doc() = "Few-row, row-invariant CPU kernels for decoding (y = x W^T and few-query attention).";
  m.def("linear_f32", &linear_f32, "x float32 [R, K] @ W^T -> [R, N], W float32 panels [ceil(N/16), K, 16]",
        py::arg("x"), py::arg("w"), py::arg("out_features"), nogil);
  m.def("linear_bf16", &linear_bf16, "x float32 [R, K] @ W^T -> [R, N], W bfloat16 panels [ceil(N/16), ceil(K/2), 32]",
        py::arg("x"), py::arg("w"), py::arg("out_features"), nogil);
  m.def("linear_q8_0", [](const at::Tensor& x, const at::Tensor& w, int64_t n) { return linear_q(Q8_0, x, w, n); },
        "x float32 [R, K] @ Q8_0 panels uint8 [ceil(N/16), K/32*544]^T -> [R, N]", py::arg("x"), py::arg("w_blocks"),
        py::arg("out_features"), nogil);
  m.def("linear_q4_0", [](const at::Tensor& x, const at::Tensor& w, int64_t n) { return linear_q(Q4_0, x, w, n); },
        "x float32 [R, K] @ Q4_0 panels uint8 [ceil(N/16), K/32*288]^T -> [R, N]", py::arg("x"), py::arg("w_blocks"),
        py::arg("out_features"), nogil);
  m.def("linear_q4_1", [](const at::Tensor& x, const at::Tensor& w, int64_t n) { return linear_q(Q4_1, x, w, n); },
        "x float32 [R, K] @ Q4_1 panels uint8 [ceil(N/16), K/32*320]^T -> [R, N]", py::arg("x"), py::arg("w_blocks"),
        py::arg("out_features"), nogil);
  m.def("attention", &attention, "few-query causal attention, q [B,H,T,D], k/v [B,Hkv,S,D] -> [B,H,T,D]",
        py::arg("q"), py::arg("k"), py::arg("v"), py::arg("start_pos"), py::arg("attendable") = py::none(),
        py::arg("starts") = py::none(), py::arg("rows") = py::none(), nogil);
  m.def("silu_gate", &silu_gate, "SiLU(gate) * up from gate_up float32 [R, 2 I] -> [R, I]", py::arg("gate_up"), nogil);
  m.def("isa", &isa, "the instruction-set path in use: avx512bf16, avx512, avx2 or scalar");
  m.def("available_isas", &available_isas, "the paths this CPU can run, best last");
  m.def("set_isa", &set_isa, "force a path (error if this CPU lacks it)", py::arg("name"));
  bind_layers(m);  // layers.cpp: decoder layers in one call
}

#else  // ---- FEWROW_ISA_BODY: generic kernels over V, compiled once per ISA namespace ---------------------

using F = V::F;

// fn(0), fn(1), ..., fn(n - 1), each index a compile-time constant: a loop unrolled whatever the compiler's limits.
template <class Fn, int... I>
FR_INLINE void repeat_each(Fn&& fn, std::integer_sequence<int, I...>) {
  (fn(std::integral_constant<int, I>{}), ...);
}
template <int N, class Fn>
FR_INLINE void repeat(Fn&& fn) {
  repeat_each(fn, std::make_integer_sequence<int, N>{});
}

// fn(rb) with rb = rows (1 <= rows <= G) as a compile-time constant: a group's row count sizes its registers.
template <int G, class Fn>
FR_INLINE void with_rows(int64_t rows, Fn&& fn) {
  if constexpr (G > 0) {
    if (rows == G) fn(std::integral_constant<int, G>{});
    else with_rows<G - 1>(rows, fn);
  }
}

// Software prefetch a fixed distance ahead of the weight stream (each thread reads one contiguous range).
static FR_INLINE void prefetch(const void* p, int bytes) {
  for (int o = 0; o < bytes; o += 64) __builtin_prefetch(static_cast<const char*>(p) + kPrefetchBytes + o, 0, 3);
}

// A pass of R rows over P panels of panel_bytes each, the rows in groups of G: visit(rb, r0, b0, b1) runs rows
// r0 .. r0 + rb - 1 (rb a compile-time constant) over panels [b0, b1). Parallel over panels; a pass of one group
// streams each thread's panels once. A longer pass takes each thread's panels in L2-sized blocks and runs every
// group over a block before the next, so the weights still come from memory once.
template <int G, class Visit>
static FR_INLINE void over_panels(int64_t R, int64_t P, int64_t panel_bytes, const Visit& visit) {
  const int64_t block = R > G ? std::max<int64_t>(1, kL2BlockBytes / panel_bytes) : P;
  at::parallel_for(0, P, tile_grain(panel_bytes), [&](int64_t p0, int64_t p1) {
    for (int64_t b0 = p0; b0 < p1; b0 += block) {
      const int64_t b1 = std::min(p1, b0 + block);
      for (int64_t r0 = 0; r0 < R; r0 += G)
        with_rows<G>(std::min<int64_t>(G, R - r0), [&](auto rb) FR_LAMBDA { visit(rb, r0, b0, b1); });
    }
  });
}

// ---- f32 / bf16 weights: panels ----
//
// Float weights are prepared as panels of kPanel output features, [P][K][kPanel] (model/kernels/linear.py:
// float_panels), so one vector load holds one k of 16 features. A tile multiplies a group of rows by a few
// panels: per k, the panels' vectors are loaded once and each row's x[r][k] is broadcast against them, so the
// accumulators are (row, feature) lanes and no horizontal sums are needed; the loads per multiply-add fall with
// both the rows and the panels, which keeps the FMA units busy once the rows' arithmetic outweighs the weight
// stream (the dot-product form, one weight row at a time, reached a third of the FMA rate at 8 rows).
//
// Each output element is one multiply-add chain over k = 0 .. K-1 in order, started from zero: how rows are
// grouped, how many panels a tile takes, and how threads split the panels change which elements run side by
// side, never an element's arithmetic. So results are row-invariant, and the same on the AVX2 and AVX-512 paths.

constexpr int kPanel = 16;                      // output features per panel
constexpr int kPanelVectors = kPanel / V::W;    // vectors per panel row

// A tile's results: rows r0 .. r0 + RB - 1 of y [R, N], features of panels p0 .. p0 + NP - 1.
template <int RB, int NP>
static FR_INLINE void store_panel_tile(const F (&acc)[RB * NP * kPanelVectors], float* y, int64_t N, int64_t r0,
                                       int64_t p0) {
  constexpr int NV = NP * kPanelVectors;
  for (int i = 0; i < RB; ++i) {
    float* yr = y + (r0 + i) * N;
    for (int p = 0; p < NP; ++p) {
      const int64_t n = (p0 + p) * kPanel;
      const F* out = acc + i * NV + p * kPanelVectors;
      if (n + kPanel <= N) {
        for (int v = 0; v < kPanelVectors; ++v) V::store(yr + n + v * V::W, out[v]);
      } else {  // the last panel's padding features are not outputs
        float lanes[kPanel];
        for (int v = 0; v < kPanelVectors; ++v) V::store(lanes + v * V::W, out[v]);
        std::copy(lanes, lanes + (N - n), yr + n);
      }
    }
  }
}

template <class WT>
struct PanelRun {
  const WT* w; float* y; int64_t N, K;
  int64_t xs;  // the activations' row stride, in 4-byte units (floats, or bfloat16 pairs)

  // acc[i][j] += x[i] * wv[j] for the group's RB rows (xk: row 0's element, rows xs apart) and NV weight vectors.
  template <int RB, int NV>
  FR_INLINE void multiply_add(F (&acc)[RB * NV], const F (&wv)[NV], const float* xk) const {
    repeat<RB>([&](auto i) FR_LAMBDA {
      const F xb = V::set1(xk[i * xs]);
      repeat<NV>([&](auto j) FR_LAMBDA { acc[i * NV + j] = V::fma(xb, wv[j], acc[i * NV + j]); });
    });
  }

  // The bfloat16 tile on the avx512bf16 path: per k pair, one vdpbf16ps per (row, vector), the pair of
  // activations (xp: a row's bfloat16 pairs, k in the low half) broadcast against 16 features' weight pairs.
  // (VV: V, made dependent so that other paths never compile this.)
  template <int RB, int NP, class VV = V>
  FR_INLINE void bf16_dots(F (&acc)[RB * NP * kPanelVectors], const alias_u32* xp, const WT* wp) const {
    constexpr int NV = NP * kPanelVectors;
    for (int64_t k = 0; k < K; k += 2) {
      typename VV::P wv[NV];
      repeat<NP>([&](auto p) FR_LAMBDA {
        const uint16_t* row = wp + (p * K + k) * kPanel;
        prefetch(row, 2 * kPanel * 2);
        wv[p] = VV::load_pairs(row);
      });
      const alias_u32* xk = xp + k / 2;
      repeat<RB>([&](auto i) FR_LAMBDA {
        const typename VV::P xb = VV::set1_pair(xk[i * xs]);
        repeat<NV>([&](auto j) FR_LAMBDA { acc[i * NV + j] = VV::dot_pairs(acc[i * NV + j], wv[j], xb); });
      });
    }
  }

  // Rows r0 .. r0 + RB - 1 (xg: row r0 of the activations) times panels p0 .. p0 + NP - 1. The loops over
  // rows and vectors are unrolled at compile time (repeat), so the RB x NV accumulators stay in registers.
  template <int RB, int NP>
  FR_INLINE void tile(const float* xg, int64_t r0, int64_t p0) const {
    constexpr int NV = NP * kPanelVectors;
    F acc[RB * NV];
    repeat<RB * NV>([&](auto a) FR_LAMBDA { acc[a] = V::zero(); });
    const WT* wp = w + p0 * K * kPanel;
    if constexpr (std::is_same_v<WT, float>) {
      for (int64_t k = 0; k < K; ++k) {
        F wv[NV];
        repeat<NP>([&](auto p) FR_LAMBDA {
          const float* row = wp + (p * K + k) * kPanel;
          prefetch(row, kPanel * 4);
          repeat<kPanelVectors>([&](auto v) FR_LAMBDA { wv[p * kPanelVectors + v] = V::load(row + v * V::W); });
        });
        multiply_add<RB, NV>(acc, wv, xg + k);
      }
    } else if constexpr (V::kBF16Dot) {
      bf16_dots<RB, NP>(acc, reinterpret_cast<const alias_u32*>(xg), wp);
    } else {  // bfloat16 panels hold k and k + 1 interleaved: one load and two bit operations widen both
      for (int64_t k = 0; k < K; k += 2) {
        F even[NV], odd[NV];
        repeat<NP>([&](auto p) FR_LAMBDA {
          const uint16_t* row = wp + (p * K + k) * kPanel;
          prefetch(row, 2 * kPanel * 2);
          repeat<kPanelVectors>([&](auto v) FR_LAMBDA {
            V::load_bf16_pair(row + 2 * v * V::W, even[p * kPanelVectors + v], odd[p * kPanelVectors + v]);
          });
        });
        multiply_add<RB, NV>(acc, odd, xg + k + 1);  // k + 1 first: the order vdpbf16ps adds in
        multiply_add<RB, NV>(acc, even, xg + k);
      }
    }
    store_panel_tile<RB, NP>(acc, y, N, r0, p0);
  }

  // Panels [b0, b1) for one group of RB rows: tiles of as many panels as the group's registers allow, then fewer.
  template <int RB>
  FR_INLINE void walk(const float* xg, int64_t r0, int64_t b0, int64_t b1) const {
    constexpr int NP = V::float_panels(RB);
    int64_t p = b0;
    for (; p + NP <= b1; p += NP) tile<RB, NP>(xg, r0, p);
    if constexpr (NP > 2)
      for (; p + 2 <= b1; p += 2) tile<RB, 2>(xg, r0, p);
    if constexpr (NP > 1)
      for (; p < b1; ++p) tile<RB, 1>(xg, r0, p);
  }
};

// The rows in groups of kFloatRows (over_panels), a tile broadcasting each row's activations from the rows as
// they are (bfloat16: rounded first, into a copy).
template <class WT>
static void linear_panels(const float* x, const WT* w, int64_t R, int64_t N, int64_t K, float* y) {
  const float* rows = x;
  int64_t stride = K;  // in 4-byte units
  std::vector<float> rounded;
  if constexpr (!std::is_same_v<WT, float>) {  // bfloat16 panels: k in pairs, K padded with a zero
    const int64_t Kw = round_up(K, 2);
    rounded.assign(R * Kw, 0.f);
    alias_u16* halves = reinterpret_cast<alias_u16*>(rounded.data());  // the avx512bf16 path: [R][Kw] bfloat16
    for (int64_t r = 0; r < R; ++r)
      for (int64_t k = 0; k < K; ++k) {
        const uint16_t h = round_to_bf16(x[r * K + k]);
        if constexpr (V::kBF16Dot) halves[r * Kw + k] = h;
        else rounded[r * Kw + k] = bf16_to_float(h);
      }
    rows = rounded.data(), stride = V::kBF16Dot ? Kw / 2 : Kw;
    K = Kw;
  }
  const PanelRun<WT> run{w, y, N, K, stride};
  over_panels<V::kFloatRows>(R, (N + kPanel - 1) / kPanel, K * kPanel * int64_t(sizeof(WT)),
                             [&](auto rb, int64_t r0, int64_t b0, int64_t b1) FR_LAMBDA {
                               run.template walk<decltype(rb)::value>(rows + r0 * stride, r0, b0, b1);
                             });
}

#ifndef FEWROW_BF16_DOT  // that namespace compiles only the bfloat16 kernel
void linear_f32_impl(const float* x, const float* w, int64_t R, int64_t N, int64_t K, float* y) {
  linear_panels(x, w, R, N, K, y);
}
#endif

void linear_bf16_impl(const float* x, const uint16_t* w, int64_t R, int64_t N, int64_t K, float* y) {
  linear_panels(x, w, R, N, K, y);
}

#ifndef FEWROW_BF16_DOT
// Quantize one block of 32 activations: scale = max|x| / 127, q = x / scale rounded half to even; returns the
// scale, and the sum of q in `sum` (integers, exact in float32 in any order). Division and rounding are exact
// IEEE operations, so every path gets the same q and scales.
static FR_INLINE float quantize_block(const float* xb, int8_t* qb, int32_t& sum) {
  F m = V::zero();
  for (int e = 0; e < kBlock; e += V::W) m = V::max(m, V::abs(V::load(xb + e)));
  const float d = V::hmax(m) / 127.f;
  if (d > 0.f) {
    const F db = V::set1(d), lo = V::set1(-127.f), hi = V::set1(127.f);
    F total = V::zero();
    for (int e = 0; e < kBlock; e += V::W) {  // the clamp also maps nan to a number
      const F q = V::min(V::max(V::round(V::div(V::load(xb + e), db)), lo), hi);
      V::store_i8(qb + e, q);
      total = V::add(total, q);
    }
    sum = int32_t(V::hsum(total));
  } else {
    std::memset(qb, 0, kBlock);
    sum = 0;
  }
  return d;
}

// ---- block-quantized weights: panels ----
//
// Q8_0, Q4_0 and Q4_1 weights are prepared as panels of 16 output features (model/kernels/linear.py:
// block_panels), per block of 32 k: the 16 features' fp16 scales, for Q4_1 their fp16 mins, then vectors of 16
// features x 4 bytes. Q8_0: 8 vectors, byte t of lane f of vector j = feature f's weight 4 j + t, stored + 128
// (unsigned). Q4: 4 vectors, byte t of lane f of vector j = the GGUF byte 4 j + t of feature f's block, whose low
// nibble is k = 4 j + t and high nibble k = 16 + 4 j + t. So a load (and for Q4 three bit operations) gives
// vectors of unsigned bytes, which vpdpbusd multiplies by 4 broadcast activation bytes into each feature's int32
// lane: no transposes, and the per-row work for 16 features and a block is 8 vpdpbusd, a conversion and two
// float operations.
//
// The activation is quantized per row in blocks of 32 (quantize_block). Per (row, feature, block), exactly:
// s = sum(u * q) - Z * sum(q) in int32 (u the stored byte or nibble; Z = 128 for Q8_0, 8 for Q4_0, 0 for Q4_1),
// then acc = fma(float(s), d_w * d_x, acc), and for Q4_1 acc = fma(m_w, d_x * sum(q), acc); blocks in order. The
// same on every path, so the AVX2 and AVX-512 results are identical.


// A group's quantized activations, by block: q [nb][rb][8] dwords, d [nb][rb], and per (block, row) the
// int32 -Z * sum(q) and the float d * sum(q) (Q4_1).
struct QGroup {
  const uint32_t* q = nullptr;
  const float* d = nullptr;
  const int32_t* corr = nullptr;
  const float* dsum = nullptr;
};

template <int FMT>
struct PanelQRun {
  const uint8_t* w; float* y; int64_t N, nb;
  static constexpr int BB = panel_block_bytes(FMT);

  // Rows r0 .. r0 + RB - 1 times panel p. One panel a tile: several panels' streams at once ran slower here.
  template <int RB>
  FR_INLINE void tile(const QGroup& g, int64_t r0, int64_t p) const {
    constexpr int PV = kPanelVectors;
    F acc[RB * PV];
    repeat<RB * PV>([&](auto a) FR_LAMBDA { acc[a] = V::zero(); });
    const uint8_t* panel = w + p * nb * BB;
    for (int64_t b = 0; b < nb; ++b) {
      const uint8_t* blk = panel + b * BB;
      prefetch(blk, BB);
      // Two int32 sums a (row, vector), for the low and the high nibbles: two dependency chains, summed exactly.
      typename V::I lo_sum[RB * PV], hi_sum[RB * PV];
      repeat<RB>([&](auto i) FR_LAMBDA {
        const int32_t c = FMT == Q4_1 ? 0 : g.corr[b * RB + i];
        repeat<PV>([&](auto v) FR_LAMBDA { lo_sum[i * PV + v] = V::qset1(c), hi_sum[i * PV + v] = V::qset1(0); });
      });
      const uint32_t* xq = g.q + b * RB * 8;
      for (int j = 0; j < 4; ++j) {  // two vectors of 4 k each: groups ga and gb of the block's 8
        typename V::QW lo[PV], hi[PV];
        const int ga = FMT == Q8_0 ? 2 * j : j, gb = FMT == Q8_0 ? 2 * j + 1 : j + 4;
        repeat<PV>([&](auto v) FR_LAMBDA {
          if constexpr (FMT == Q8_0) {
            V::bytes(blk + panel_data(FMT) + ga * 64 + v * V::W * 4, lo[v]);
            V::bytes(blk + panel_data(FMT) + gb * 64 + v * V::W * 4, hi[v]);
          } else {  // the low nibbles are group j, the high ones group j + 4
            V::nibbles(blk + panel_data(FMT) + j * 64 + v * V::W * 4, lo[v], hi[v]);
          }
        });
        repeat<RB>([&](auto i) FR_LAMBDA {
          const uint32_t xl = xq[i * 8 + ga], xh = xq[i * 8 + gb];
          repeat<PV>([&](auto v) FR_LAMBDA {
            lo_sum[i * PV + v] = V::qdot(lo_sum[i * PV + v], lo[v], xl);
            hi_sum[i * PV + v] = V::qdot(hi_sum[i * PV + v], hi[v], xh);
          });
        });
      }
      F dw[PV], mw[PV];
      repeat<PV>([&](auto v) FR_LAMBDA {
        dw[v] = V::load_half(reinterpret_cast<const uint16_t*>(blk) + v * V::W);
        if constexpr (FMT == Q4_1) mw[v] = V::load_half(reinterpret_cast<const uint16_t*>(blk + 32) + v * V::W);
      });
      repeat<RB>([&](auto i) FR_LAMBDA {
        const F dx = V::set1(g.d[b * RB + i]);
        repeat<PV>([&](auto v) FR_LAMBDA {
          const F sum = V::cvt(V::qadd(lo_sum[i * PV + v], hi_sum[i * PV + v]));
          acc[i * PV + v] = V::fma(sum, V::mul(dw[v], dx), acc[i * PV + v]);
        });
        if constexpr (FMT == Q4_1) {
          const F sl = V::set1(g.dsum[b * RB + i]);
          repeat<PV>([&](auto v) FR_LAMBDA { acc[i * PV + v] = V::fma(mw[v], sl, acc[i * PV + v]); });
        }
      });
    }
    store_panel_tile<RB, 1>(acc, y, N, r0, p);
  }
};

template <int FMT>
static void linear_q_panels(const float* x, const uint8_t* w, int64_t R, int64_t N, int64_t K, float* y) {
  constexpr int64_t G = V::kQRows;
  const int64_t nb = K / kBlock;
  std::vector<uint32_t> q(R * nb * 8);
  std::vector<float> d(R * nb), dsum(R * nb);
  std::vector<int32_t> corr(R * nb);
  at::parallel_for(0, R, 16, [&](int64_t ra, int64_t rz) {
    for (int64_t r = ra; r < rz; ++r) {
      const int64_t r0 = r / G * G, rb = std::min(G, R - r0), i = r - r0;
      for (int64_t b = 0; b < nb; ++b) {
        const int64_t at = r0 * nb + b * rb + i;
        int32_t sum;
        const float scale = quantize_block(x + r * K + b * kBlock, reinterpret_cast<int8_t*>(q.data() + at * 8), sum);
        d[at] = scale, corr[at] = -panel_zero(FMT) * sum, dsum[at] = scale * float(sum);
      }
    }
  });
  const PanelQRun<FMT> run{w, y, N, nb};
  over_panels<G>(R, (N + kPanel - 1) / kPanel, nb * panel_block_bytes(FMT),
                 [&](auto rb, int64_t r0, int64_t b0, int64_t b1) FR_LAMBDA {
                   const int64_t at = r0 * nb;  // the group's first record
                   const QGroup g{q.data() + at * 8, d.data() + at, corr.data() + at, dsum.data() + at};
                   for (int64_t p = b0; p < b1; ++p) run.template tile<decltype(rb)::value>(g, r0, p);
                 });
}

void linear_q_impl(int fmt, const float* x, const uint8_t* w, int64_t R, int64_t N, int64_t K, float* y) {
  if (fmt == Q8_0) linear_q_panels<Q8_0>(x, w, R, N, K, y);
  else if (fmt == Q4_0) linear_q_panels<Q4_0>(x, w, R, N, K, y);
  else linear_q_panels<Q4_1>(x, w, R, N, K, y);
}

// ---- attention ----

// exp(x) for x <= 0 (x may be -inf): Cody-Waite reduction x = n ln2 + r, |r| <= ln2/2, then the degree-7 Taylor
// polynomial of e^r (truncation error < 1e-8 relative) times 2^n; exactly 0 below -87 (where 2^n would leave the
// normal range).  Elementwise, so its result does not depend on the lanes around it.
static FR_INLINE F exp_nonpos(F x) {
  const F lo = V::set1(-87.f);
  const F xc = V::max(x, lo);
  const F n = V::round(V::mul(xc, V::set1(1.44269504088896341f)));
  F r = V::fma(n, V::set1(-0.693145751953125f), xc);  // ln2 high part: exact product with |n| <= 126
  r = V::fma(n, V::set1(-1.428606765330187e-06f), r);  // ln2 low part
  F p = V::set1(1.f / 5040.f);
  p = V::fma(p, r, V::set1(1.f / 720.f));
  p = V::fma(p, r, V::set1(1.f / 120.f));
  p = V::fma(p, r, V::set1(1.f / 24.f));
  p = V::fma(p, r, V::set1(1.f / 6.f));
  p = V::fma(p, r, V::set1(0.5f));
  p = V::fma(p, r, V::set1(1.f));
  p = V::fma(p, r, V::set1(1.f));
  return V::zero_below(x, lo, V::mul(p, V::pow2i(n)));
}

// ---- the gated MLP's activation ----

// SiLU(a) * up = a * sigmoid(a) * up, the sigmoid from t = exp(-|a|): 1 / (1 + t) for a >= 0, t / (1 + t) below.
static FR_INLINE F silu_gate_vector(F a, F up) {
  const F t = exp_nonpos(V::sub(V::zero(), V::abs(a)));
  const F s = V::div(V::set1(1.f), V::add(V::set1(1.f), t));
  return V::mul(V::mul(a, V::select_ge(a, V::zero(), s, V::mul(t, s))), up);
}

// out [R, I] = SiLU(gate) * up from gate_up [R, 2 I] (model/transformer.py's MLP), elementwise: row-invariant.
void silu_gate_impl(const float* gate_up, int64_t R, int64_t inner, float* out) {
  at::parallel_for(0, R, 16, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      const float* a = gate_up + r * 2 * inner;
      const float* up = a + inner;
      float* o = out + r * inner;
      int64_t i = 0;
      for (; i + V::W <= inner; i += V::W) V::store(o + i, silu_gate_vector(V::load(a + i), V::load(up + i)));
      if (i < inner) {  // the tail through one zero-padded vector: the same arithmetic per element
        float ta[V::W] = {}, tu[V::W] = {}, to[V::W];
        std::copy(a + i, a + inner, ta);
        std::copy(up + i, up + inner, tu);
        V::store(to, silu_gate_vector(V::load(ta), V::load(tu)));
        std::copy(to, to + (inner - i), o + i);
      }
    }
  });
}

static FR_INLINE float dot(const float* a, const float* b, int64_t D) {
  const int64_t dv = D - D % V::W;
  F acc = V::zero();
  for (int64_t d = 0; d < dv; d += V::W) acc = V::fma(V::load(a + d), V::load(b + d), acc);
  float s = V::hsum(acc);
  for (int64_t d = dv; d < D; ++d) s = V::sfma(a[d], b[d], s);
  return s;
}

// One query row over the keys it attends (s <= pos with its batch row's mask, and always its own position), taken
// in increasing s and packed together: scores, max, exp and its sum, then the weighted sum of V rows.  The result
// depends only on the sequence of attended keys, not on where masked keys sit between them: a query whose earlier
// neighbours are masked out (a tree draft's sibling, a padded row) gets exactly the bits it would get alone.
static void attend_one(const float* q, const float* k, int64_t ks, const float* v, int64_t vs, const bool* att,
                       int64_t pos, int64_t S, int64_t D, float scale, std::vector<float>& sc,
                       std::vector<int64_t>& keys, float* out) {
  const int64_t ns = std::min(S, pos + 1);
  keys.clear();
  for (int64_t s = 0; s < ns; ++s)
    if (!att || att[s] || s == pos) keys.push_back(s);
  const int64_t n = int64_t(keys.size());
  if (n == 0) {  // nothing attendable (only possible when pos >= S): zeros rather than nan
    std::fill(out, out + D, 0.f);
    return;
  }
  sc.assign(round_up(n, V::W), -std::numeric_limits<float>::infinity());
  float mx = -std::numeric_limits<float>::infinity();
  for (int64_t j = 0; j < n; ++j) {
    sc[j] = dot(q, k + keys[j] * ks, D) * scale;
    mx = std::max(mx, sc[j]);
  }
  const F m = V::set1(mx);
  F sum = V::zero();
  for (size_t j = 0; j < sc.size(); j += V::W) {
    const F p = exp_nonpos(V::sub(V::load(sc.data() + j), m));
    V::store(sc.data() + j, p);
    sum = V::add(sum, p);
  }
  const float inv = 1.f / V::hsum(sum);
  // Weighted sum of V, up to 8 vectors of the head dim at a time kept in registers; each output lane is its own
  // chain over the keys, so the grouping does not affect results.
  const int64_t dv = D - D % V::W;
  for (int64_t d0 = 0; d0 < dv; d0 += 8 * V::W) {
    const int64_t nc = std::min<int64_t>(8, (dv - d0) / V::W);
    F o[8];
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c) o[c] = V::zero();
    for (int64_t j = 0; j < n; ++j) {
      if (sc[j] == 0.f) continue;
      const F p = V::set1(sc[j]);
      const float* vr = v + keys[j] * vs + d0;
#pragma GCC unroll 8
      for (int c = 0; c < 8; ++c)
        if (c < nc) o[c] = V::fma(p, V::load(vr + c * V::W), o[c]);
    }
    const F iv = V::set1(inv);
#pragma GCC unroll 8
    for (int c = 0; c < 8; ++c)
      if (c < nc) V::store(out + d0 + c * V::W, V::mul(o[c], iv));
  }
  for (int64_t d = dv; d < D; ++d) {
    float o = 0.f;
    for (int64_t j = 0; j < n; ++j)
      if (sc[j] != 0.f) o = V::sfma(sc[j], v[keys[j] * vs + d], o);
    out[d] = o * inv;
  }
}

void attention_impl(const float* q, const int64_t* qs, const float* k, const int64_t* ks, const float* v,
                    const int64_t* vs, const bool* att, int64_t att_stride, int64_t B, int64_t H, int64_t T, int64_t D,
                    int64_t Hkv, int64_t S, const int64_t* starts, const int64_t* rows, float* out) {
  const float scale = 1.f / std::sqrt(float(D));
  const int64_t group = H / Hkv;
  at::parallel_for(0, B * H * T, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> sc;
    std::vector<int64_t> keys;
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / (H * T), h = i / T % H, t = i % T, hk = h / group;
      const int64_t c = rows[b];  // its cache row
      attend_one(q + b * qs[0] + h * qs[1] + t * qs[2], k + c * ks[0] + hk * ks[1], ks[2],
                 v + c * vs[0] + hk * vs[1], vs[2], att ? att + c * att_stride : nullptr, starts[b] + t, S, D, scale,
                 sc, keys, out + i * D);
    }
  });
}

#endif  // !FEWROW_BF16_DOT

#endif  // FEWROW_ISA_BODY
