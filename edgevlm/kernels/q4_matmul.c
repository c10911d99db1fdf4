/* edgevlm's 4-bit matrix kernel as an ONNX Runtime custom op (domain "ai.edgevlm", op "MatMulQ4").
 *
 * Y[..., N] = A[..., K] x dequant(B)^T, with B, scales in the layout of ONNX Runtime's com.microsoft.MatMulNBits
 * (bits 4, block BS = a power of two >= 32, symmetric: no zero points, so each weight is (q - 8) * scale):
 *   B      uint8 [N, K/BS, BS/2]  byte j of a block holds element 2j (low nibble) and 2j+1 (high nibble)
 *   scales float [N * K/BS]
 *   bias   float [N], optional (a fourth input): added to every row, so the Add that follows a biased linear layer
 *          goes into the op (edgevlm.kernels.rewrite folds it: one node less per biased product and step)
 * so a decoder's graph keeps its initializers and only the node's op changes (edgevlm.kernels.rewrite).
 *
 * Two paths. From GEMM_MIN_ROWS rows of activations on (prompts), a register-tiled product over unpacked panels
 * of weights (see "Many rows" below). Below that (decode steps, M = 1), one row at a time: activations are
 * quantized per 32-block to int8 once, then every weight row is streamed once. Per pair of blocks: 32 bytes of nibbles widen to 64 unsigned bytes,
 * one AVX-512 VNNI dot product against the int8 activations (laid out to match the nibble order), one float
 * multiply-add with the two blocks' scales; the (q - 8) offset is applied once per row from per-block
 * activation sums. Rows are prefetched ahead: streaming, not arithmetic, sets the pace on CPUs with few cores.
 * CPUs without AVX-512 VNNI run the same scheme in AVX2 (maddubs + madd in place of the VNNI dot product);
 * without AVX2 and FMA the library refuses to register its op. EDGEVLM_Q4_ISA=avx2 picks the AVX2 path
 * anywhere (tests).
 */
#include <immintrin.h>
#include <math.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "onnxruntime_c_api.h"

#define BLOCK 32
#define ROWS_PER_TASK 32
#define PREFETCH_BYTES 4096

static const OrtApi *api;

struct Act_;
typedef struct {
  int64_t K, N, block;
  float (*dot)(const uint8_t *, const float *, const struct Act_ *, int64_t, int64_t);
} Q4Kernel;

typedef struct Act_ {     /* one activation row, quantized and arranged for the dot products */
  int8_t *q;              /* K bytes: per block pair, [even of b, even of b+1, odd of b, odd of b+1] */
  float *lane_scale;      /* 16 floats per block pair: activation scale of the block each int32 lane sums */
  float *corr;            /* per weight block: 8 * sum over its 32-blocks of scale * sum(q), the (q_w - 8) offset */
  int64_t block;          /* the weights' block size */
} Act;

static void quantize_row(const float *a, int64_t K, Act *x) {
  const int64_t nb = K / BLOCK;
  memset(x->corr, 0, sizeof(float) * (size_t)(K / x->block));
  for (int64_t b = 0; b < nb; b++) {
    const float *v = a + b * BLOCK;
    float m = 0.f;
    for (int i = 0; i < BLOCK; i++) m = fmaxf(m, fabsf(v[i]));
    const float s = m / 127.f, inv = m > 0.f ? 127.f / m : 0.f;
    int8_t *d = x->q + (b / 2) * 64 + (b & 1) * 16;
    int sum = 0;
    for (int j = 0; j < 16; j++) {
      const int lo = (int)lrintf(v[2 * j] * inv), hi = (int)lrintf(v[2 * j + 1] * inv);
      d[j] = (int8_t)lo;
      d[32 + j] = (int8_t)hi;
      sum += lo + hi;
    }
    x->corr[b * BLOCK / x->block] += 8.f * s * (float)sum;
    for (int l = 0; l < 4; l++) {
      x->lane_scale[(b / 2) * 16 + (b & 1) * 4 + l] = s;
      x->lane_scale[(b / 2) * 16 + 8 + (b & 1) * 4 + l] = s;
    }
  }
}

#define AVX512 __attribute__((target("avx512f,avx512bw,avx512vl,avx512vnni,fma")))

/* one weight row: B its K/2 bytes, S its K/block scales, nb its 32-blocks */
static AVX512 float row_dot_avx512(const uint8_t *B, const float *S, const Act *x, int64_t nb, int64_t pairs_per_scale) {
  const __m512i pick = _mm512_set_epi32(1, 1, 1, 1, 0, 0, 0, 0, 1, 1, 1, 1, 0, 0, 0, 0);
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  __m512 acc0 = _mm512_setzero_ps(), acc1 = _mm512_setzero_ps();
  const int64_t pairs = nb / 2;
  const int pair_shift = pairs_per_scale ? __builtin_ctzll((unsigned long long)pairs_per_scale) : 0;
  for (int64_t p = 0; p < pairs; p++) {
    _mm_prefetch((const char *)(B + p * 32 + PREFETCH_BYTES), _MM_HINT_T0);
    const __m256i raw = _mm256_loadu_si256((const __m256i *)(B + p * 32));
    const __m256i lo = _mm256_and_si256(raw, low4);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
    const __m512i w = _mm512_inserti64x4(_mm512_castsi256_si512(lo), hi, 1);
    const __m512i dot = _mm512_dpbusd_epi32(_mm512_setzero_si512(), w, _mm512_loadu_si512(x->q + p * 64));
    const __m512 ws = pairs_per_scale
                          ? _mm512_set1_ps(S[p >> pair_shift])
                          : _mm512_permutexvar_ps(pick, _mm512_castps128_ps512(_mm_castpd_ps(
                                                            _mm_load_sd((const double *)(S + 2 * p)))));
    const __m512 scale = _mm512_mul_ps(ws, _mm512_loadu_ps(x->lane_scale + p * 16));
    if (p & 1)
      acc1 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc1);
    else
      acc0 = _mm512_fmadd_ps(_mm512_cvtepi32_ps(dot), scale, acc0);
  }
  const int64_t ns = pairs_per_scale ? pairs / pairs_per_scale : nb;
  __m512 c = _mm512_setzero_ps();
  int64_t b = 0;
  for (; b + 16 <= ns; b += 16) c = _mm512_fmadd_ps(_mm512_loadu_ps(S + b), _mm512_loadu_ps(x->corr + b), c);
  float r = _mm512_reduce_add_ps(_mm512_add_ps(acc0, acc1)) - _mm512_reduce_add_ps(c);
  for (; b < ns; b++) r -= S[b] * x->corr[b];
  return r;
}

static float row_dot_avx2(const uint8_t *B, const float *S, const Act *x, int64_t nb, int64_t pairs_per_scale) {
  const __m256i pick = _mm256_set_epi32(1, 1, 1, 1, 0, 0, 0, 0);
  const __m256i low4 = _mm256_set1_epi8(0x0F), ones = _mm256_set1_epi16(1);
  __m256 acc0 = _mm256_setzero_ps(), acc1 = _mm256_setzero_ps();
  const int64_t pairs = nb / 2;
  const int pair_shift = pairs_per_scale ? __builtin_ctzll((unsigned long long)pairs_per_scale) : 0;
  for (int64_t p = 0; p < pairs; p++) {
    _mm_prefetch((const char *)(B + p * 32 + PREFETCH_BYTES), _MM_HINT_T0);
    const __m256i raw = _mm256_loadu_si256((const __m256i *)(B + p * 32));
    const __m256i lo = _mm256_and_si256(raw, low4);
    const __m256i hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
    /* |15 * 127 * 2| per product pair, two pairs summed: far inside int16 */
    const __m256i s16 = _mm256_add_epi16(
        _mm256_maddubs_epi16(lo, _mm256_loadu_si256((const __m256i *)(x->q + p * 64))),
        _mm256_maddubs_epi16(hi, _mm256_loadu_si256((const __m256i *)(x->q + p * 64 + 32))));
    const __m256i dot = _mm256_madd_epi16(s16, ones);       /* lanes 0-3: block 2p, 4-7: block 2p+1 */
    const __m256 ws = pairs_per_scale
                          ? _mm256_set1_ps(S[p >> pair_shift])
                          : _mm256_permutevar8x32_ps(
                                _mm256_castps128_ps256(_mm_castpd_ps(_mm_load_sd((const double *)(S + 2 * p)))), pick);
    const __m256 scale = _mm256_mul_ps(ws, _mm256_loadu_ps(x->lane_scale + p * 16));
    if (p & 1)
      acc1 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc1);
    else
      acc0 = _mm256_fmadd_ps(_mm256_cvtepi32_ps(dot), scale, acc0);
  }
  const int64_t ns = pairs_per_scale ? pairs / pairs_per_scale : nb;
  __m256 c = _mm256_setzero_ps();
  int64_t b = 0;
  for (; b + 8 <= ns; b += 8) c = _mm256_fmadd_ps(_mm256_loadu_ps(S + b), _mm256_loadu_ps(x->corr + b), c);
  const __m256 t = _mm256_sub_ps(_mm256_add_ps(acc0, acc1), c);
  __m128 h = _mm_add_ps(_mm256_castps256_ps128(t), _mm256_extractf128_ps(t, 1));
  h = _mm_add_ps(h, _mm_movehl_ps(h, h));
  h = _mm_add_ss(h, _mm_movehdup_ps(h));
  float r = _mm_cvtss_f32(h);
  for (; b < ns; b++) r -= S[b] * x->corr[b];
  return r;
}

typedef float (*RowDot)(const uint8_t *, const float *, const Act *, int64_t, int64_t);

/* 2: AVX-512 VNNI, 1: AVX2 + FMA, 0: neither (EDGEVLM_Q4_ISA=avx2 caps it at 1) */
int edgevlm_q4_isa(void) {
  __builtin_cpu_init();
  if (!(__builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma"))) return 0;
  const char *want = getenv("EDGEVLM_Q4_ISA");
  if (want && strcmp(want, "avx2") == 0) return 1;
  return __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
                 __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512vnni")
             ? 2
             : 1;
}

static RowDot pick_row_dot(void) { return edgevlm_q4_isa() == 2 ? row_dot_avx512 : row_dot_avx2; }

typedef struct {
  RowDot dot;
  const uint8_t *B;
  const float *S;
  const Act *x;
  const float *bias;                       /* [N] or NULL */
  float *y;
  int64_t M, N, nb, ns, pairs_per_scale;   /* ns: scales per row; pairs_per_scale: 0 for block 32 */
} Job;

static void run_rows(void *data, size_t task) {
  const Job *j = (const Job *)data;
  const int64_t n0 = (int64_t)task * ROWS_PER_TASK;
  const int64_t n1 = n0 + ROWS_PER_TASK < j->N ? n0 + ROWS_PER_TASK : j->N;
  for (int64_t m = 0; m < j->M; m++)
    for (int64_t n = n0; n < n1; n++)
      j->y[m * j->N + n] = j->dot(j->B + n * j->nb * 16, j->S + n * j->ns, &j->x[m], j->nb, j->pairs_per_scale) +
                           (j->bias ? j->bias[n] : 0.f);
}

/* ---- Many rows (prompts): a register-tiled int8 product over 4-bit panels --------------------------------------
 *
 * From GEMM_MIN_ROWS activation rows on, the weights are not streamed once per row. Each task takes a panel of
 * PANEL weight rows (output columns), unpacks its nibbles once into a buffer laid out for the dot products
 * (for every 4 consecutive k, the 4 bytes of each of the PANEL columns side by side: one 64-byte load feeds 16
 * columns), and then runs every activation row against it, MR rows at a time. Activations are rounded to int8
 * per 32-block exactly as for one row, but kept in their natural order: 4 bytes are broadcast per dot product.
 * Per 32-block and (row, 16 columns): 8 dot products into an int32 accumulator that starts at -8 * the block's
 * activation sum (the (q - 8) offset), one conversion and one multiply-add with the weight scales times the
 * activation scale. The unpacked panel (PANEL * K bytes) stays in the core's cache while the rows pass.
 */
#define PANEL 32
#define GEMM_MIN_ROWS 4

typedef struct {
  int8_t *q;       /* [Mp][K] activations rounded to int8 per 32-block, natural order */
  float *s;        /* [Mp][K/32] their scales */
  int32_t *c8;     /* [Mp][K/32] 8 * each block's sum of int8 values */
} Rows;

/* Rows m_begin .. m_end-1; rows m >= M (padding up to the register tile) are zero with scale 0. Same rounding as
 * quantize_row. */
static void quantize_rows(const float *a, int64_t M, int64_t m_begin, int64_t m_end, int64_t K, Rows *x) {
  const int64_t nb = K / BLOCK;
  for (int64_t m = m_begin; m < m_end; m++) {
    int8_t *q = x->q + m * K;
    float *s = x->s + m * nb;
    int32_t *c = x->c8 + m * nb;
    if (m >= M) {
      memset(q, 0, (size_t)K);
      memset(s, 0, sizeof(float) * (size_t)nb);
      memset(c, 0, sizeof(int32_t) * (size_t)nb);
      continue;
    }
    const float *v = a + m * K;
    for (int64_t b = 0; b < nb; b++, v += BLOCK, q += BLOCK) {
      const __m256 sign = _mm256_set1_ps(-0.f);
      const __m256 v0 = _mm256_loadu_ps(v), v1 = _mm256_loadu_ps(v + 8), v2 = _mm256_loadu_ps(v + 16),
                   v3 = _mm256_loadu_ps(v + 24);
      __m256 mx = _mm256_max_ps(_mm256_max_ps(_mm256_andnot_ps(sign, v0), _mm256_andnot_ps(sign, v1)),
                                _mm256_max_ps(_mm256_andnot_ps(sign, v2), _mm256_andnot_ps(sign, v3)));
      __m128 h = _mm_max_ps(_mm256_castps256_ps128(mx), _mm256_extractf128_ps(mx, 1));
      h = _mm_max_ps(h, _mm_movehl_ps(h, h));
      h = _mm_max_ss(h, _mm_movehdup_ps(h));
      const float m_ = _mm_cvtss_f32(h);
      const float inv = m_ > 0.f ? 127.f / m_ : 0.f;
      const __m256 vi = _mm256_set1_ps(inv);
      /* round to nearest even, as lrintf does under the default rounding mode */
      const __m256i i0 = _mm256_cvtps_epi32(_mm256_mul_ps(v0, vi)), i1 = _mm256_cvtps_epi32(_mm256_mul_ps(v1, vi)),
                    i2 = _mm256_cvtps_epi32(_mm256_mul_ps(v2, vi)), i3 = _mm256_cvtps_epi32(_mm256_mul_ps(v3, vi));
      /* int32 -> int16 -> int8 (values within +-127: no saturation), then undo the packs' lane interleave */
      const __m256i w01 = _mm256_packs_epi32(i0, i1), w23 = _mm256_packs_epi32(i2, i3);
      const __m256i b8 = _mm256_permutevar8x32_epi32(_mm256_packs_epi16(w01, w23),
                                                     _mm256_setr_epi32(0, 4, 1, 5, 2, 6, 3, 7));
      _mm256_storeu_si256((__m256i *)q, b8);
      __m256i t = _mm256_add_epi32(_mm256_add_epi32(i0, i1), _mm256_add_epi32(i2, i3));
      __m128i u = _mm_add_epi32(_mm256_castsi256_si128(t), _mm256_extracti128_si256(t, 1));
      u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0x4E));
      u = _mm_add_epi32(u, _mm_shuffle_epi32(u, 0xB1));
      s[b] = m_ / 127.f;
      c[b] = 8 * _mm_cvtsi128_si32(u);
    }
  }
}

/* Weight rows n0 .. n0+PANEL-1 into P[K/4][PANEL] (4 consecutive unsigned nibble values of one column per
 * uint32) and their scales into PS[ns][PANEL]; columns past N get zero weights and scales. */
static void unpack_panel(const uint8_t *B, const float *S, int64_t n0, int64_t N, int64_t K, int64_t ns,
                         uint32_t *P, float *PS) {
  const __m128i low4 = _mm_set1_epi8(0x0F);
  for (int r = 0; r < PANEL; r++) {
    const int64_t n = n0 + r;
    if (n >= N) {
      for (int64_t w = 0; w < K / 4; w++) P[w * PANEL + r] = 0;
      for (int64_t b = 0; b < ns; b++) PS[b * PANEL + r] = 0.f;
      continue;
    }
    const uint8_t *row = B + n * (K / 2);      /* byte i: element 2i (low nibble), 2i+1 (high) */
    for (int64_t c = 0; c < K / 32; c++) {
      const __m128i raw = _mm_loadu_si128((const __m128i *)(row + c * 16));
      const __m128i lo = _mm_and_si128(raw, low4), hi = _mm_and_si128(_mm_srli_epi16(raw, 4), low4);
      uint32_t w[8];
      _mm_storeu_si128((__m128i *)w, _mm_unpacklo_epi8(lo, hi));
      _mm_storeu_si128((__m128i *)(w + 4), _mm_unpackhi_epi8(lo, hi));
      uint32_t *d = P + c * 8 * PANEL + r;
      for (int j = 0; j < 8; j++) d[j * PANEL] = w[j];
    }
    for (int64_t b = 0; b < ns; b++) PS[b * PANEL + r] = S[n * ns + b];
  }
}

/* unpack_panel with AVX-512: per 16 rows and 64 k, the nibbles widen to 16 registers of 16 words (one row each)
 * and a 16 x 16 transpose of 32-bit words (four rounds of two-source permutes) turns them into 16 registers of
 * one k-quad each, stored whole. A panel reaching past N takes the plain loop. */
static AVX512 void unpack_panel_avx512(const uint8_t *B, const float *S, int64_t n0, int64_t N, int64_t K,
                                       int64_t ns, uint32_t *P, float *PS) {
  if (n0 + PANEL > N) {
    unpack_panel(B, S, n0, N, K, ns, P, PS);
    return;
  }
  __m512i lo_idx[4], hi_idx[4];
  for (int st = 0; st < 4; st++) {
    const int d = 8 >> st;
    int32_t lo[16], hi[16];
    for (int e = 0; e < 16; e++) {
      lo[e] = (e & d) ? 16 + e - d : e;       /* rows i, i+d: keep i's elements where bit d is clear, ... */
      hi[e] = (e & d) ? 16 + e : e + d;
    }
    lo_idx[st] = _mm512_loadu_si512(lo);
    hi_idx[st] = _mm512_loadu_si512(hi);
  }
  const __m256i low4 = _mm256_set1_epi8(0x0F);
  for (int g = 0; g < PANEL; g += 16) {
    const uint8_t *rows = B + (n0 + g) * (K / 2);
    for (int64_t c = 0; c < K / 64; c++) {
      __m512i z[16];
      for (int r = 0; r < 16; r++) {
        const __m256i raw = _mm256_loadu_si256((const __m256i *)(rows + r * (K / 2) + c * 32));
        const __m256i lo = _mm256_and_si256(raw, low4), hi = _mm256_and_si256(_mm256_srli_epi16(raw, 4), low4);
        const __m256i a = _mm256_unpacklo_epi8(lo, hi), b = _mm256_unpackhi_epi8(lo, hi);  /* 0-15|32-47, 16-31|48-63 */
        z[r] = _mm512_inserti64x4(_mm512_castsi256_si512(_mm256_permute2x128_si256(a, b, 0x20)),
                                  _mm256_permute2x128_si256(a, b, 0x31), 1);
      }
      for (int st = 0; st < 4; st++) {
        const int d = 8 >> st;
        for (int i = 0; i < 16; i++) {
          if (i & d) continue;
          const __m512i a = z[i], b = z[i + d];
          z[i] = _mm512_permutex2var_epi32(a, lo_idx[st], b);
          z[i + d] = _mm512_permutex2var_epi32(a, hi_idx[st], b);
        }
      }
      for (int j = 0; j < 16; j++) _mm512_store_si512((void *)(P + (c * 16 + j) * PANEL + g), z[j]);
    }
  }
  for (int r = 0; r < PANEL; r++)
    for (int64_t b = 0; b < ns; b++) PS[b * PANEL + r] = S[(n0 + r) * ns + b];
}

static inline int32_t load4(const int8_t *p) {
  int32_t v;
  memcpy(&v, p, 4);
  return v;
}

#define MR512 4          /* 6 rows measured the same, 8 slower (registers spill) */
/* Rows m0 .. m0+mr-1 against one unpacked panel (mr <= MR512, a constant where it is inlined, so the loops over
 * r unroll); writes y[m][n0 .. n0+cols) through the column masks. */
static inline __attribute__((always_inline)) AVX512 void tile_avx512(
    const uint32_t *P, const float *PS, const Rows *x, int64_t m0, const int mr, int64_t K, int shift, float *y,
    int64_t N, int64_t n0, __mmask16 k0, __mmask16 k1, const float *bias) {
  const int64_t nb = K / BLOCK;
  __m512 f[MR512][2];
  const __m512 b0 = bias ? _mm512_maskz_loadu_ps(k0, bias + n0) : _mm512_setzero_ps();
  const __m512 b1 = bias && k1 ? _mm512_maskz_loadu_ps(k1, bias + n0 + 16) : _mm512_setzero_ps();
  for (int r = 0; r < mr; r++) {
    f[r][0] = b0;
    f[r][1] = b1;
  }
  const int8_t *a = x->q + m0 * K;
  for (int64_t b = 0; b < nb; b++) {
    __m512i acc[MR512][2];
    for (int r = 0; r < mr; r++) acc[r][0] = acc[r][1] = _mm512_set1_epi32(-x->c8[(m0 + r) * nb + b]);
    const uint32_t *pw = P + b * 8 * PANEL;
    for (int w = 0; w < 8; w++) {
      const __m512i w0 = _mm512_load_si512((const void *)(pw + w * PANEL));
      const __m512i w1 = _mm512_load_si512((const void *)(pw + w * PANEL + 16));
      for (int r = 0; r < mr; r++) {
        const __m512i av = _mm512_set1_epi32(load4(a + r * K + b * BLOCK + w * 4));
        acc[r][0] = _mm512_dpbusd_epi32(acc[r][0], w0, av);
        acc[r][1] = _mm512_dpbusd_epi32(acc[r][1], w1, av);
      }
    }
    const __m512 s0 = _mm512_load_ps(PS + (b >> shift) * PANEL), s1 = _mm512_load_ps(PS + (b >> shift) * PANEL + 16);
    for (int r = 0; r < mr; r++) {
      const __m512 sa = _mm512_set1_ps(x->s[(m0 + r) * nb + b]);
      f[r][0] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][0]), _mm512_mul_ps(s0, sa), f[r][0]);
      f[r][1] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(acc[r][1]), _mm512_mul_ps(s1, sa), f[r][1]);
    }
  }
  for (int r = 0; r < mr; r++) {
    _mm512_mask_storeu_ps(y + (m0 + r) * N + n0, k0, f[r][0]);
    if (k1) _mm512_mask_storeu_ps(y + (m0 + r) * N + n0 + 16, k1, f[r][1]);
  }
}

/* All M rows against one unpacked panel, MR512 at a time and the last M % MR512 in one narrower tile (no padding
 * rows: a 33-row prompt is 8 tiles of 4 and one of 1, not 9 of 4). */
static AVX512 void panel_avx512(const uint32_t *P, const float *PS, const Rows *x, int64_t M, int64_t Mp, int64_t K,
                                int shift, float *y, int64_t N, int64_t n0, const float *bias) {
  (void)Mp;
  const int64_t cols = N - n0 < PANEL ? N - n0 : PANEL;
  const __mmask16 k0 = cols >= 16 ? 0xFFFF : (__mmask16)((1u << cols) - 1);
  const __mmask16 k1 = cols >= 32 ? 0xFFFF : cols > 16 ? (__mmask16)((1u << (cols - 16)) - 1) : 0;
  int64_t m0 = 0;
  for (; m0 + MR512 <= M; m0 += MR512) tile_avx512(P, PS, x, m0, MR512, K, shift, y, N, n0, k0, k1, bias);
  switch (M - m0) {
    case 3: tile_avx512(P, PS, x, m0, 3, K, shift, y, N, n0, k0, k1, bias); break;
    case 2: tile_avx512(P, PS, x, m0, 2, K, shift, y, N, n0, k0, k1, bias); break;
    case 1: tile_avx512(P, PS, x, m0, 1, K, shift, y, N, n0, k0, k1, bias); break;
    default: break;
  }
}

#define MR256 2
/* The same in AVX2: 8 columns per register, maddubs + madd for the dot products, two rows x 16 columns a tile. */
static void panel_avx2(const uint32_t *P, const float *PS, const Rows *x, int64_t M, int64_t Mp, int64_t K,
                       int shift, float *y, int64_t N, int64_t n0, const float *bias) {
  const int64_t nb = K / BLOCK;
  const int64_t cols = N - n0 < PANEL ? N - n0 : PANEL;
  const __m256i ones = _mm256_set1_epi16(1);
  for (int g = 0; g < PANEL; g += 16) {
    if (g >= cols) break;
    for (int64_t m0 = 0; m0 < Mp; m0 += MR256) {
      __m256 f[MR256][2];
      for (int r = 0; r < MR256; r++) f[r][0] = f[r][1] = _mm256_setzero_ps();
      const int8_t *a = x->q + m0 * K;
      for (int64_t b = 0; b < nb; b++) {
        __m256i acc[MR256][2];
        for (int r = 0; r < MR256; r++) acc[r][0] = acc[r][1] = _mm256_set1_epi32(-x->c8[(m0 + r) * nb + b]);
        const uint32_t *pw = P + b * 8 * PANEL + g;
        for (int w = 0; w < 8; w += 2) {    /* two k-quads per madd: |2 * 2 * 15 * 127| fits int16 */
          const __m256i w0 = _mm256_load_si256((const __m256i *)(pw + w * PANEL));
          const __m256i w1 = _mm256_load_si256((const __m256i *)(pw + w * PANEL + 8));
          const __m256i v0 = _mm256_load_si256((const __m256i *)(pw + (w + 1) * PANEL));
          const __m256i v1 = _mm256_load_si256((const __m256i *)(pw + (w + 1) * PANEL + 8));
          for (int r = 0; r < MR256; r++) {
            const __m256i a0 = _mm256_set1_epi32(load4(a + r * K + b * BLOCK + w * 4));
            const __m256i a1 = _mm256_set1_epi32(load4(a + r * K + b * BLOCK + w * 4 + 4));
            acc[r][0] = _mm256_add_epi32(acc[r][0], _mm256_madd_epi16(
                _mm256_add_epi16(_mm256_maddubs_epi16(w0, a0), _mm256_maddubs_epi16(v0, a1)), ones));
            acc[r][1] = _mm256_add_epi32(acc[r][1], _mm256_madd_epi16(
                _mm256_add_epi16(_mm256_maddubs_epi16(w1, a0), _mm256_maddubs_epi16(v1, a1)), ones));
          }
        }
        const __m256 s0 = _mm256_load_ps(PS + (b >> shift) * PANEL + g);
        const __m256 s1 = _mm256_load_ps(PS + (b >> shift) * PANEL + g + 8);
        for (int r = 0; r < MR256; r++) {
          const __m256 sa = _mm256_set1_ps(x->s[(m0 + r) * nb + b]);
          f[r][0] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][0]), _mm256_mul_ps(s0, sa), f[r][0]);
          f[r][1] = _mm256_fmadd_ps(_mm256_cvtepi32_ps(acc[r][1]), _mm256_mul_ps(s1, sa), f[r][1]);
        }
      }
      for (int r = 0; r < MR256 && m0 + r < M; r++) {
        float out[16];
        _mm256_storeu_ps(out, f[r][0]);
        _mm256_storeu_ps(out + 8, f[r][1]);
        const int64_t take = cols - g < 16 ? cols - g : 16;
        if (bias)
          for (int64_t c = 0; c < take; c++) out[c] += bias[n0 + g + c];
        memcpy(y + (m0 + r) * N + n0 + g, out, sizeof(float) * (size_t)take);
      }
    }
  }
}

typedef void (*PanelFn)(const uint32_t *, const float *, const Rows *, int64_t, int64_t, int64_t, int, float *,
                        int64_t, int64_t, const float *);

typedef struct {
  PanelFn panel;
  const uint8_t *B;
  const float *S;
  const Rows *x;
  const float *bias;    /* [N] or NULL */
  float *y;
  int64_t M, Mp, K, N, ns;
  int shift;            /* log2(block / 32): a 32-block's weight scale index is b >> shift */
  int failed;           /* a task could not get its panel buffer */
} GemmJob;

/* Each thread keeps its panel buffer between tasks and calls (PANEL * K bytes + the scales: 256 KiB at K = 8192),
 * so a task does not pay an allocation (for such sizes, an mmap and its page faults) per panel. It lives as long
 * as the thread (ONNX Runtime's pool threads live as long as their session's environment). */
static __thread char *panel_buf;
static __thread size_t panel_cap;

static void run_panel(void *data, size_t task) {
  GemmJob *j = (GemmJob *)data;
  const int64_t n0 = (int64_t)task * PANEL;
  const size_t wbytes = (size_t)j->K * PANEL, need = wbytes + (size_t)j->ns * PANEL * sizeof(float);
  if (need > panel_cap) {
    free(panel_buf);
    panel_cap = 0;
    panel_buf = (char *)aligned_alloc(64, (need + 63) / 64 * 64);
    if (!panel_buf) {
      __atomic_store_n(&j->failed, 1, __ATOMIC_RELAXED);
      return;
    }
    panel_cap = need;
  }
  uint32_t *P = (uint32_t *)panel_buf;
  float *PS = (float *)(panel_buf + wbytes);        /* wbytes is a multiple of 64 (K is of 64) */
  (j->panel == panel_avx512 ? unpack_panel_avx512 : unpack_panel)(j->B, j->S, n0, j->N, j->K, j->ns, P, PS);
  j->panel(P, PS, j->x, j->M, j->Mp, j->K, j->shift, j->y, j->N, n0, j->bias);
}

#define QUANT_ROWS 16     /* activation rows a quantizing task takes */

typedef struct {
  const float *a;
  Rows *x;
  int64_t M, Mp, K;
} QuantJob;

static void run_quant(void *data, size_t task) {
  QuantJob *j = (QuantJob *)data;
  const int64_t m0 = (int64_t)task * QUANT_ROWS, m1 = m0 + QUANT_ROWS < j->Mp ? m0 + QUANT_ROWS : j->Mp;
  quantize_rows(j->a, j->M, m0, m1, j->K, j->x);
}

/* y[M][N] = a[M][K] x dequant(B)^T over panels; `parallel` runs the tasks (ORT's thread pool, or a plain loop):
 * first the activations' rounding, QUANT_ROWS rows a task, then the panels. */
static int gemm_rows(const float *a, const uint8_t *B, const float *S, const float *bias, float *y, int64_t M,
                     int64_t K, int64_t N, int64_t block, void (*parallel)(void *, void (*)(void *, size_t), size_t, void *), void *ctx) {
  const int isa = edgevlm_q4_isa();
  const int mr = isa == 2 ? 1 : MR256;         /* the AVX-512 path takes any row count; AVX2 pads to its tile */
  const int64_t Mp = (M + mr - 1) / mr * mr, nb = K / BLOCK;
  Rows x;
  x.q = (int8_t *)aligned_alloc(64, ((size_t)(Mp * K) + 63) / 64 * 64);
  x.s = (float *)malloc(sizeof(float) * (size_t)(Mp * nb));
  x.c8 = (int32_t *)malloc(sizeof(int32_t) * (size_t)(Mp * nb));
  if (!x.q || !x.s || !x.c8) {
    free(x.q);
    free(x.s);
    free(x.c8);
    return -1;
  }
  QuantJob quant = {a, &x, M, Mp, K};
  parallel(ctx, run_quant, (size_t)((Mp + QUANT_ROWS - 1) / QUANT_ROWS), &quant);
  GemmJob job = {isa == 2 ? panel_avx512 : panel_avx2, B, S, &x, bias, y, M, Mp, K, N, K / block,
                 __builtin_ctzll((unsigned long long)(block / BLOCK)), 0};
  parallel(ctx, run_panel, (size_t)((N + PANEL - 1) / PANEL), &job);
  free(x.q);
  free(x.s);
  free(x.c8);
  return job.failed ? -1 : 0;
}

static void serial_for(void *ctx, void (*fn)(void *, size_t), size_t n, void *data) {
  (void)ctx;
  for (size_t i = 0; i < n; i++) fn(data, i);
}

/* The many-row path on M rows, for tests (one thread): y[M][N] (+ bias[N] unless NULL). Returns 0, or -1 out of
 * memory. */
int edgevlm_q4_gemm(const float *a, const uint8_t *B, const float *S, const float *bias, float *y, int64_t M,
                    int64_t K, int64_t N, int64_t block) {
  return gemm_rows(a, B, S, bias, y, M, K, N, block, serial_for, NULL);
}

#define TRY(expr)                       \
  do {                                  \
    OrtStatus *st_ = (expr);            \
    if (st_) return st_;                \
  } while (0)

typedef struct {
  OrtKernelContext *ctx;
  OrtStatus *status;
} OrtFor;

static void ort_for(void *c, void (*fn)(void *, size_t), size_t n, void *data) {
  OrtFor *f = (OrtFor *)c;
  if (!f->status) f->status = api->KernelContext_ParallelFor(f->ctx, fn, n, 0, data);   /* the first failure stays */
}

static OrtStatus *compute(void *kernel, OrtKernelContext *ctx) {
  const Q4Kernel *k = (const Q4Kernel *)kernel;
  const OrtValue *a_v, *b_v, *s_v;
  TRY(api->KernelContext_GetInput(ctx, 0, &a_v));
  TRY(api->KernelContext_GetInput(ctx, 1, &b_v));
  TRY(api->KernelContext_GetInput(ctx, 2, &s_v));
  size_t n_in = 0;
  const OrtValue *bias_v = NULL;
  TRY(api->KernelContext_GetInputCount(ctx, &n_in));
  if (n_in > 3) TRY(api->KernelContext_GetInput(ctx, 3, &bias_v));      /* NULL where the optional input is empty */
  OrtTensorTypeAndShapeInfo *info;
  TRY(api->GetTensorTypeAndShape(a_v, &info));
  size_t rank = 0;
  int64_t dims[8];
  OrtStatus *st = api->GetDimensionsCount(info, &rank);
  if (!st && (rank < 1 || rank > 8)) st = api->CreateStatus(ORT_INVALID_ARGUMENT, "MatMulQ4: A must have rank 1-8");
  if (!st) st = api->GetDimensions(info, dims, rank);
  api->ReleaseTensorTypeAndShapeInfo(info);
  if (st) return st;
  if (dims[rank - 1] != k->K) return api->CreateStatus(ORT_INVALID_ARGUMENT, "MatMulQ4: A's last dimension is not K");
  int64_t M = 1;
  for (size_t i = 0; i + 1 < rank; i++) M *= dims[i];
  dims[rank - 1] = k->N;
  OrtValue *y_v;
  TRY(api->KernelContext_GetOutput(ctx, 0, dims, rank, &y_v));
  const float *a;
  const uint8_t *B;
  const float *S;
  float *y;
  TRY(api->GetTensorMutableData((OrtValue *)a_v, (void **)&a));
  TRY(api->GetTensorMutableData((OrtValue *)b_v, (void **)&B));
  TRY(api->GetTensorMutableData((OrtValue *)s_v, (void **)&S));
  TRY(api->GetTensorMutableData(y_v, (void **)&y));
  const float *bias = NULL;
  if (bias_v) {
    size_t count = 0;
    TRY(api->GetTensorTypeAndShape(bias_v, &info));
    st = api->GetTensorShapeElementCount(info, &count);
    api->ReleaseTensorTypeAndShapeInfo(info);
    if (st) return st;
    if ((int64_t)count != k->N) return api->CreateStatus(ORT_INVALID_ARGUMENT, "MatMulQ4: bias must have N elements");
    TRY(api->GetTensorMutableData((OrtValue *)bias_v, (void **)&bias));
  }
  if (M == 0) return NULL;
  if (M >= GEMM_MIN_ROWS) {
    OrtFor pf = {ctx, NULL};
    if (gemm_rows(a, B, S, bias, y, M, k->K, k->N, k->block, ort_for, &pf) != 0 && !pf.status)
      return api->CreateStatus(ORT_FAIL, "MatMulQ4: out of memory for the quantized activations");
    return pf.status;
  }
  const int64_t nb = k->K / BLOCK;
  /* per row: K int8 + 16 floats per block pair + one float per block */
  const size_t per_row = (size_t)k->K + (size_t)nb * 8 * sizeof(float) + (size_t)nb * sizeof(float) + 64;
  char *scratch = (char *)aligned_alloc(64, ((per_row * (size_t)M) + 63) / 64 * 64);
  Act *acts = (Act *)malloc(sizeof(Act) * (size_t)M);
  if (!scratch || !acts) {
    free(scratch);
    free(acts);
    return api->CreateStatus(ORT_FAIL, "MatMulQ4: out of memory for the quantized activations");
  }
  for (int64_t m = 0; m < M; m++) {
    char *p = scratch + per_row * (size_t)m;
    acts[m].q = (int8_t *)p;
    acts[m].lane_scale = (float *)(p + k->K);
    acts[m].corr = acts[m].lane_scale + nb * 8;
    acts[m].block = k->block;
    quantize_row(a + m * k->K, k->K, &acts[m]);
  }
  const int64_t pps = k->block == BLOCK ? 0 : k->block / (2 * BLOCK);
  Job job = {k->dot, B, S, acts, bias, y, M, k->N, nb, k->K / k->block, pps};
  const size_t tasks = (size_t)((k->N + ROWS_PER_TASK - 1) / ROWS_PER_TASK);
  st = api->KernelContext_ParallelFor(ctx, run_rows, tasks, 0, &job);
  free(scratch);
  free(acts);
  return st;
}

static OrtStatus *create_kernel(const OrtCustomOp *op, const OrtApi *a, const OrtKernelInfo *info, void **out) {
  (void)op;
  Q4Kernel *k = (Q4Kernel *)calloc(1, sizeof(Q4Kernel));
  if (!k) return a->CreateStatus(ORT_FAIL, "MatMulQ4: out of memory");
  OrtStatus *st = a->KernelInfoGetAttribute_int64(info, "K", &k->K);
  if (!st) st = a->KernelInfoGetAttribute_int64(info, "N", &k->N);
  if (!st) st = a->KernelInfoGetAttribute_int64(info, "block_size", &k->block);
  if (!st && (k->block < BLOCK || (k->block & (k->block - 1)) != 0))
    st = a->CreateStatus(ORT_INVALID_ARGUMENT, "MatMulQ4: block_size must be a power of two, at least 32");
  if (!st && (k->K <= 0 || k->K % (2 * BLOCK) != 0 || k->K % k->block != 0 || k->N <= 0))
    st = a->CreateStatus(ORT_INVALID_ARGUMENT,
                         "MatMulQ4: K must be a positive multiple of 64 and of block_size, and N positive");
  if (st) {
    free(k);
    return st;
  }
  k->dot = pick_row_dot();
  *out = k;
  return NULL;
}

static void destroy_kernel(void *k) { free(k); }
static const char *op_name(const OrtCustomOp *op) { (void)op; return "MatMulQ4"; }
static const char *op_ep(const OrtCustomOp *op) { (void)op; return "CPUExecutionProvider"; }
static size_t n_inputs(const OrtCustomOp *op) { (void)op; return 4; }
static size_t n_outputs(const OrtCustomOp *op) { (void)op; return 1; }
static ONNXTensorElementDataType input_type(const OrtCustomOp *op, size_t i) {
  (void)op;
  return i == 1 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_UINT8 : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static ONNXTensorElementDataType output_type(const OrtCustomOp *op, size_t i) {
  (void)op;
  (void)i;
  return ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static OrtCustomOpInputOutputCharacteristic required(const OrtCustomOp *op, size_t i) {
  (void)op;
  (void)i;
  return INPUT_OUTPUT_REQUIRED;
}
static OrtCustomOpInputOutputCharacteristic input_kind(const OrtCustomOp *op, size_t i) {
  (void)op;
  return i == 3 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;      /* the bias */
}
static OrtMemType input_memory(const OrtCustomOp *op, size_t i) {
  (void)op;
  (void)i;
  return OrtMemTypeDefault;
}
static int one(const OrtCustomOp *op) { (void)op; return 1; }
static int zero(const OrtCustomOp *op) { (void)op; return 0; }
static int end_version(const OrtCustomOp *op) { (void)op; return 2147483647; }

static OrtCustomOp q4_op;
static OrtCustomOpDomain *domain;


/* ---- One decode step's attention (ai.edgevlm DecodeAttention) ---------------------------------------------------
 *
 * com.microsoft.GroupQueryAttention for one new position (batch 1, S = 1), as edgevlm's fused decoders call it:
 * the same inputs (query, or q|k|v packed in it; past key/value [1, kv_heads, buffer, D]; seqlens_k; the total
 * length; optional cos/sin caches with position_ids for non-interleaved RoPE on the first 2 x cache-width dims;
 * an additive attention_bias [.., total]) and outputs (out [1, 1, heads * D]; present key/value, the past buffer
 * itself when the caller binds both to one buffer, else a copy of it). A step reads the layer's whole FP32 cache
 * once (at 96 positions of the 0.5B benchmark decoder, 0.8 MB a layer, from memory: the weights streamed since
 * evicted it), so the time goes to that read: per head, the scores in AVX2 dot products, a softmax, the weighted
 * sum of V; heads split over the thread pool from 1024 head-positions on (below that one thread is quicker than
 * waking another). Measured there: about 0.1 ms a layer for ONNX Runtime's kernel, 0.067 ms for this one.
 * Prompts keep GroupQueryAttention (edgevlm.kernels.rewrite_decode_attention makes the decode graph). */
typedef struct {
  int64_t heads, kv_heads;
  float scale;
  int64_t rotary;
} AttnKernel;

typedef struct {
  const float *q;        /* [heads][D], rotated */
  const float *K, *V;    /* [kv_heads][cap][D] */
  const float *bias;     /* [T] or NULL */
  float *out;            /* [heads][D] */
  int64_t heads, group, cap, D, T;
  float scale;
} AttnJob;

static void attn_head(void *data, size_t h) {
  const AttnJob *j = (const AttnJob *)data;
  const int64_t D = j->D, T = j->T, g = (int64_t)h / j->group;
  const float *q = j->q + h * D, *K = j->K + g * j->cap * D, *V = j->V + g * j->cap * D;
  float stack[1024];
  float *p = T <= 1024 ? stack : (float *)malloc(sizeof(float) * (size_t)T);
  float *o = j->out + h * D;
  if (!p) {                                     /* no memory for the scores: a NaN row, never a silent zero */
    for (int64_t d = 0; d < D; d++) o[d] = NAN;
    return;
  }
  float mx = -INFINITY;
  const int64_t D8 = D & ~(int64_t)7;
  for (int64_t t = 0; t < T; t++) {
    const float *k = K + t * D;
    __m256 a0 = _mm256_setzero_ps(), a1 = _mm256_setzero_ps();
    int64_t e = 0;
    for (; e + 16 <= D8; e += 16) {
      a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + e), _mm256_loadu_ps(k + e), a0);
      a1 = _mm256_fmadd_ps(_mm256_loadu_ps(q + e + 8), _mm256_loadu_ps(k + e + 8), a1);
    }
    if (e < D8) a0 = _mm256_fmadd_ps(_mm256_loadu_ps(q + e), _mm256_loadu_ps(k + e), a0);
    a0 = _mm256_add_ps(a0, a1);
    __m128 h = _mm_add_ps(_mm256_castps256_ps128(a0), _mm256_extractf128_ps(a0, 1));
    h = _mm_add_ps(h, _mm_movehl_ps(h, h));
    h = _mm_add_ss(h, _mm_movehdup_ps(h));
    float acc = _mm_cvtss_f32(h);
    for (int64_t r = D8; r < D; r++) acc += q[r] * k[r];
    p[t] = acc * j->scale + (j->bias ? j->bias[t] : 0.f);
    mx = p[t] > mx ? p[t] : mx;
  }
  float sum = 0.f;
  for (int64_t t = 0; t < T; t++) {
    p[t] = expf(p[t] - mx);
    sum += p[t];
  }
  const float inv = 1.f / sum;
  for (int64_t d = 0; d < D; d++) o[d] = 0.f;
  for (int64_t t = 0; t < T; t++) {
    const float w = p[t] * inv, *v = V + t * D;
    for (int64_t d = 0; d < D; d++) o[d] += w * v[d];
  }
  if (p != stack) free(p);
}

static void rope(float *x, int64_t r2, const float *c, const float *s) {
  for (int64_t i = 0; i < r2; i++) {
    const float a = x[i], b = x[i + r2];
    x[i] = a * c[i] - b * s[i];
    x[i + r2] = b * c[i] + a * s[i];
  }
}

static OrtStatus *tensor(OrtKernelContext *ctx, size_t i, const OrtValue **v, int64_t *dims, size_t *rank,
                         const float **data) {
  *v = NULL;
  *rank = 0;
  size_t n = 0;
  TRY(api->KernelContext_GetInputCount(ctx, &n));
  if (i >= n) return NULL;
  TRY(api->KernelContext_GetInput(ctx, i, v));
  if (!*v) return NULL;
  OrtTensorTypeAndShapeInfo *info;
  TRY(api->GetTensorTypeAndShape(*v, &info));
  OrtStatus *st = api->GetDimensionsCount(info, rank);
  if (!st && *rank > 4) st = api->CreateStatus(ORT_INVALID_ARGUMENT, "DecodeAttention: an input of rank > 4");
  if (!st) st = api->GetDimensions(info, dims, *rank);
  api->ReleaseTensorTypeAndShapeInfo(info);
  if (st) return st;
  if (data) TRY(api->GetTensorMutableData((OrtValue *)*v, (void **)data));
  return NULL;
}

#define ATTN_FAIL(msg) api->CreateStatus(ORT_INVALID_ARGUMENT, "DecodeAttention: " msg)

static OrtStatus *attn_compute(void *kernel, OrtKernelContext *ctx) {
  const AttnKernel *k = (const AttnKernel *)kernel;
  const OrtValue *v[11];
  int64_t dims[11][4];
  size_t rank[11];
  const float *d[11] = {0};
  for (size_t i = 0; i < 11; i++) {
    if (i == 5 || i == 6 || i == 9) TRY(tensor(ctx, i, &v[i], dims[i], &rank[i], NULL));
    else TRY(tensor(ctx, i, &v[i], dims[i], &rank[i], &d[i]));
  }
  if (!v[0] || !v[3] || !v[4] || !v[5] || !v[6]) return ATTN_FAIL("query, past key/value, seqlens_k and the total length are required");
  if (rank[0] != 3 || dims[0][0] != 1 || dims[0][1] != 1) return ATTN_FAIL("one position of one sequence only (prompts run GroupQueryAttention)");
  const int64_t H = k->heads, Hk = k->kv_heads;
  const int64_t width = dims[0][2], packed = !v[1];
  const int64_t D = packed ? width / (H + 2 * Hk) : width / H;
  if (D <= 0 || (packed ? D * (H + 2 * Hk) : D * H) != width) return ATTN_FAIL("the query's width does not fit the heads");
  if (!packed && (!v[2] || dims[1][2] != Hk * D || dims[2][2] != Hk * D)) return ATTN_FAIL("key and value must be [1, 1, kv_heads * D]");
  if (rank[3] != 4 || dims[3][0] != 1 || dims[3][1] != Hk || dims[3][3] != D || rank[4] != 4 ||
      dims[4][2] != dims[3][2] || dims[4][1] != Hk || dims[4][3] != D)
    return ATTN_FAIL("past key/value must be [1, kv_heads, buffer, D]");
  const int32_t *seqlens, *total_p;
  TRY(api->GetTensorMutableData((OrtValue *)v[5], (void **)&seqlens));
  TRY(api->GetTensorMutableData((OrtValue *)v[6], (void **)&total_p));
  const int64_t T = (int64_t)seqlens[0] + 1, cap_past = dims[3][2];
  if (T != (int64_t)total_p[0] || T < 1) return ATTN_FAIL("seqlens_k + 1 must equal total_sequence_length");
  const int64_t cap = cap_past > T ? cap_past : T;
  int64_t pos = T - 1;
  if (v[9]) {
    int64_t n = 1;
    for (size_t i = 0; i < rank[9]; i++) n *= dims[9][i];
    if (n != 1) return ATTN_FAIL("position_ids must hold the one new position");
    const int64_t *pid;
    TRY(api->GetTensorMutableData((OrtValue *)v[9], (void **)&pid));
    pos = pid[0];
  }
  int64_t r2 = 0;
  if (k->rotary) {
    if (!v[7] || !v[8] || rank[7] != 2 || rank[8] != 2 || dims[7][1] != dims[8][1] || dims[8][0] != dims[7][0] ||
        2 * dims[7][1] > D)
      return ATTN_FAIL("do_rotary needs cos/sin caches [positions, rotary_dim / 2]");
    if (pos < 0 || pos >= dims[7][0]) return ATTN_FAIL("a position past the rotary caches");
    r2 = dims[7][1];
  }
  const float *bias = NULL;
  if (v[10]) {
    if (rank[10] < 1) return ATTN_FAIL("attention_bias must be a tensor of rank 1-4");
    if (dims[10][rank[10] - 1] < T) return ATTN_FAIL("attention_bias is shorter than the total length");
    int64_t n = 1;
    for (size_t i = 0; i < rank[10]; i++) n *= dims[10][i];
    if (n != dims[10][rank[10] - 1]) return ATTN_FAIL("attention_bias must hold one row");
    bias = d[10];
  }
  int64_t odims[3] = {1, 1, H * D}, pdims[4] = {1, Hk, cap, D};
  OrtValue *ov, *pk, *pv;
  float *out, *K, *V;
  TRY(api->KernelContext_GetOutput(ctx, 0, odims, 3, &ov));
  TRY(api->KernelContext_GetOutput(ctx, 1, pdims, 4, &pk));
  TRY(api->KernelContext_GetOutput(ctx, 2, pdims, 4, &pv));
  TRY(api->GetTensorMutableData(ov, (void **)&out));
  TRY(api->GetTensorMutableData(pk, (void **)&K));
  TRY(api->GetTensorMutableData(pv, (void **)&V));
  for (int pass = 0; pass < 2; pass++) {           /* the past into present when they are not one buffer */
    const float *src = pass ? d[4] : d[3];
    float *dst = pass ? V : K;
    if (src != dst)
      for (int64_t g = 0; g < Hk; g++) memcpy(dst + g * cap * D, src + g * cap_past * D, sizeof(float) * (size_t)((T - 1) * D));
  }
  const float *qin = d[0], *kin = packed ? d[0] + H * D : d[1], *vin = packed ? d[0] + (H + Hk) * D : d[2];
  float qbuf[4096];
  float *q = H * D <= 4096 ? qbuf : (float *)malloc(sizeof(float) * (size_t)(H * D));
  if (!q) return api->CreateStatus(ORT_FAIL, "DecodeAttention: out of memory");
  memcpy(q, qin, sizeof(float) * (size_t)(H * D));
  const float *cs = r2 ? d[7] + pos * r2 : NULL, *sn = r2 ? d[8] + pos * r2 : NULL;
  for (int64_t g = 0; g < Hk; g++) {
    float *kd = K + (g * cap + T - 1) * D, *vd = V + (g * cap + T - 1) * D;
    memcpy(kd, kin + g * D, sizeof(float) * (size_t)D);
    memcpy(vd, vin + g * D, sizeof(float) * (size_t)D);
    if (r2) rope(kd, r2, cs, sn);
  }
  if (r2)
    for (int64_t h = 0; h < H; h++) rope(q + h * D, r2, cs, sn);
  AttnJob job = {q, K, V, bias, out, H, H / Hk, cap, D, T, k->scale ? k->scale : 1.f / sqrtf((float)D)};
  OrtStatus *st = NULL;
  if (T * H >= 1024) st = api->KernelContext_ParallelFor(ctx, attn_head, (size_t)H, 0, &job);
  else
    for (int64_t h = 0; h < H; h++) attn_head(&job, (size_t)h);
  if (q != qbuf) free(q);
  return st;
}

static OrtStatus *attn_create(const OrtCustomOp *op, const OrtApi *a, const OrtKernelInfo *info, void **out) {
  (void)op;
  AttnKernel *k = (AttnKernel *)calloc(1, sizeof(AttnKernel));
  if (!k) return a->CreateStatus(ORT_FAIL, "DecodeAttention: out of memory");
  int64_t interleaved = 0;
  OrtStatus *st = a->KernelInfoGetAttribute_int64(info, "num_heads", &k->heads);
  if (!st) st = a->KernelInfoGetAttribute_int64(info, "kv_num_heads", &k->kv_heads);
  if (!st) st = a->KernelInfoGetAttribute_float(info, "scale", &k->scale);
  if (!st) st = a->KernelInfoGetAttribute_int64(info, "do_rotary", &k->rotary);
  if (!st) st = a->KernelInfoGetAttribute_int64(info, "rotary_interleaved", &interleaved);
  if (!st && (k->heads <= 0 || k->kv_heads <= 0 || k->heads % k->kv_heads || interleaved))
    st = a->CreateStatus(ORT_INVALID_ARGUMENT, "DecodeAttention: heads a multiple of kv_heads, non-interleaved RoPE");
  if (st) {
    free(k);
    return st;
  }
  *out = k;
  return NULL;
}

static const char *attn_name(const OrtCustomOp *op) { (void)op; return "DecodeAttention"; }
static size_t attn_n_inputs(const OrtCustomOp *op) { (void)op; return 11; }
static size_t attn_n_outputs(const OrtCustomOp *op) { (void)op; return 3; }
static ONNXTensorElementDataType attn_input_type(const OrtCustomOp *op, size_t i) {
  (void)op;
  return i == 5 || i == 6 ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT32
         : i == 9         ? ONNX_TENSOR_ELEMENT_DATA_TYPE_INT64
                          : ONNX_TENSOR_ELEMENT_DATA_TYPE_FLOAT;
}
static OrtCustomOpInputOutputCharacteristic attn_input_kind(const OrtCustomOp *op, size_t i) {
  (void)op;
  return i == 1 || i == 2 || i >= 7 ? INPUT_OUTPUT_OPTIONAL : INPUT_OUTPUT_REQUIRED;
}
static OrtCustomOp attn_op;

/* The kernel on one row, for tests: y[n] for n < N from a[K], weights in blocks of `block`. */
void edgevlm_q4_gemv(const float *a, const uint8_t *B, const float *S, const float *bias, float *y, int64_t K,
                     int64_t N, int64_t block) {
  const int64_t nb = K / BLOCK, ns = K / block, pps = block == BLOCK ? 0 : block / (2 * BLOCK);
  char *scratch = (char *)aligned_alloc(64, ((size_t)K + (size_t)nb * 36 + 64 + 63) / 64 * 64);
  Act x = {(int8_t *)scratch, (float *)(scratch + K), NULL, block};
  x.corr = x.lane_scale + nb * 8;
  quantize_row(a, K, &x);
  const RowDot dot = pick_row_dot();
  for (int64_t n = 0; n < N; n++) y[n] = dot(B + n * nb * 16, S + n * ns, &x, nb, pps) + (bias ? bias[n] : 0.f);
  free(scratch);
}

OrtStatus *ORT_API_CALL RegisterCustomOps(OrtSessionOptions *options, const OrtApiBase *base) {
  api = base->GetApi(ORT_API_VERSION);
  if (!api) return NULL;  /* an ONNX Runtime older than these headers; nothing can be reported through it */
  if (!edgevlm_q4_isa()) return api->CreateStatus(ORT_FAIL, "edgevlm MatMulQ4 needs AVX2 and FMA; this CPU lacks them");
  if (domain) return api->AddCustomOpDomain(options, domain);   /* one domain for every session */
  memset(&q4_op, 0, sizeof q4_op);
  q4_op.version = ORT_API_VERSION;
  q4_op.GetName = op_name;
  q4_op.GetExecutionProviderType = op_ep;
  q4_op.GetInputType = input_type;
  q4_op.GetInputTypeCount = n_inputs;
  q4_op.GetOutputType = output_type;
  q4_op.GetOutputTypeCount = n_outputs;
  q4_op.GetInputCharacteristic = input_kind;
  q4_op.GetOutputCharacteristic = required;
  q4_op.GetInputMemoryType = input_memory;
  q4_op.GetVariadicInputMinArity = one;
  q4_op.GetVariadicInputHomogeneity = zero;
  q4_op.GetVariadicOutputMinArity = one;
  q4_op.GetVariadicOutputHomogeneity = zero;
  q4_op.CreateKernelV2 = create_kernel;
  q4_op.KernelComputeV2 = compute;
  q4_op.KernelDestroy = destroy_kernel;
  q4_op.GetStartVersion = one;
  q4_op.GetEndVersion = end_version;
  attn_op = q4_op;
  attn_op.GetName = attn_name;
  attn_op.GetInputType = attn_input_type;
  attn_op.GetInputTypeCount = attn_n_inputs;
  attn_op.GetOutputTypeCount = attn_n_outputs;
  attn_op.GetInputCharacteristic = attn_input_kind;
  attn_op.CreateKernelV2 = attn_create;
  attn_op.KernelComputeV2 = attn_compute;
  TRY(api->CreateCustomOpDomain("ai.edgevlm", &domain));
  TRY(api->CustomOpDomain_Add(domain, &q4_op));
  TRY(api->CustomOpDomain_Add(domain, &attn_op));
  return api->AddCustomOpDomain(options, domain);
}
