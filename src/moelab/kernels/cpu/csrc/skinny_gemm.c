/* Skinny GEMM for decoding: y[m, n] = x[m, k] . W[n, k]^T with m <= 8 rows, fp32 accumulation.
 *
 * With one to four token rows per expert, a GEMM is a pass over the expert's weights: the work is
 * memory traffic, and a BLAS GEMM that first packs W into its own layout reads and writes the
 * weights once more than the math needs (MKL's fp32 path reads them at a third of the memory
 * bandwidth on our machine; oneDNN's bf16 path at a half). Here every row of W is streamed once,
 * front to back, and dotted with the m rows of x, which stay in L1. Two independent accumulators
 * per x row hide the FMA latency; the output rows are split evenly across OpenMP threads (the
 * same runtime PyTorch uses: libgomp.so.1 is already loaded by torch, so the loader reuses it).
 *
 * W may be fp32 (x fp32) or bf16 (x bf16, AVX512-BF16 dot products: pairs of bf16 products summed
 * into fp32). y is always fp32. Built at run time with -march=native by moelab/ops/fast/skinny.py;
 * without AVX-512 (or AVX512-BF16 for bf16) skinny_linear returns -1 and the caller falls back.
 *
 * Requirements (checked by the caller): x, W row-major and contiguous, k a multiple of 32.
 */
#include <stdint.h>
#include <omp.h>
#if defined(__AVX512F__)
#include <immintrin.h>
#endif

#if defined(__AVX512F__)
#define F32_ROWS(M)                                                                                  \
  static void f32_rows##M(const float* x, const float* W, float* y, long n, long k, long j0,       \
                          long j1) {                                                               \
    for (long j = j0; j < j1; j++) {                                                               \
      const float* w = W + j * k;                                                                  \
      __m512 a0[M], a1[M];                                                                         \
      for (int i = 0; i < M; i++) a0[i] = a1[i] = _mm512_setzero_ps();                            \
      for (long kk = 0; kk < k; kk += 32) {                                                        \
        __m512 w0 = _mm512_loadu_ps(w + kk), w1 = _mm512_loadu_ps(w + kk + 16);                    \
        for (int i = 0; i < M; i++) {                                                              \
          a0[i] = _mm512_fmadd_ps(w0, _mm512_loadu_ps(x + i * k + kk), a0[i]);                     \
          a1[i] = _mm512_fmadd_ps(w1, _mm512_loadu_ps(x + i * k + kk + 16), a1[i]);                \
        }                                                                                          \
      }                                                                                            \
      for (int i = 0; i < M; i++) y[i * n + j] = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i])); \
    }                                                                                              \
  }
F32_ROWS(1)
F32_ROWS(2)
F32_ROWS(3)
F32_ROWS(4)
F32_ROWS(5)
F32_ROWS(6)
F32_ROWS(7)
F32_ROWS(8)
#endif

#if defined(__AVX512BF16__)
#define BF16_ROWS(M)                                                                                 \
  static void bf16_rows##M(const uint16_t* x, const uint16_t* W, float* y, long n, long k,         \
                           long j0, long j1) {                                                     \
    for (long j = j0; j < j1; j++) {                                                               \
      const uint16_t* w = W + j * k;                                                               \
      __m512 a0[M], a1[M];                                                                         \
      for (int i = 0; i < M; i++) a0[i] = a1[i] = _mm512_setzero_ps();                            \
      for (long kk = 0; kk < k; kk += 64) {                                                        \
        __m512bh w0 = (__m512bh)_mm512_loadu_si512(w + kk);                                        \
        __m512bh w1 = (__m512bh)_mm512_loadu_si512(w + kk + 32);                                   \
        for (int i = 0; i < M; i++) {                                                              \
          a0[i] = _mm512_dpbf16_ps(a0[i], w0, (__m512bh)_mm512_loadu_si512(x + i * k + kk));       \
          a1[i] = _mm512_dpbf16_ps(a1[i], w1, (__m512bh)_mm512_loadu_si512(x + i * k + kk + 32));  \
        }                                                                                          \
      }                                                                                            \
      for (int i = 0; i < M; i++) y[i * n + j] = _mm512_reduce_add_ps(_mm512_add_ps(a0[i], a1[i])); \
    }                                                                                              \
  }
BF16_ROWS(1)
BF16_ROWS(2)
BF16_ROWS(3)
BF16_ROWS(4)
BF16_ROWS(5)
BF16_ROWS(6)
BF16_ROWS(7)
BF16_ROWS(8)
#endif

/* What this build can do: bit 0 fp32, bit 1 bf16. */
int skinny_capabilities(void) {
  int caps = 0;
#if defined(__AVX512F__)
  caps |= 1;
#endif
#if defined(__AVX512BF16__)
  caps |= 2;
#endif
  return caps;
}

/* 0 on success; -1 when this build cannot run the request (the caller falls back). */
int skinny_linear(const void* x, const void* W, float* y, long m, long n, long k, int bf16,
                  int nthreads) {
  if (m < 1 || m > 8 || n < 1 || k < 1) return -1;
  if (bf16 ? (k % 64) : (k % 32)) return -1;
  if (!(skinny_capabilities() & (bf16 ? 2 : 1))) return -1;
#if defined(__AVX512F__)
#pragma omp parallel num_threads(nthreads)
  {
    int t = omp_get_thread_num(), nt = omp_get_num_threads();
    long j0 = n * t / nt, j1 = n * (t + 1) / nt;
    if (!bf16) {
      const float* xf = (const float*)x;
      const float* wf = (const float*)W;
      switch (m) {
        case 1: f32_rows1(xf, wf, y, n, k, j0, j1); break;
        case 2: f32_rows2(xf, wf, y, n, k, j0, j1); break;
        case 3: f32_rows3(xf, wf, y, n, k, j0, j1); break;
        case 4: f32_rows4(xf, wf, y, n, k, j0, j1); break;
        case 5: f32_rows5(xf, wf, y, n, k, j0, j1); break;
        case 6: f32_rows6(xf, wf, y, n, k, j0, j1); break;
        case 7: f32_rows7(xf, wf, y, n, k, j0, j1); break;
        default: f32_rows8(xf, wf, y, n, k, j0, j1); break;
      }
    }
#if defined(__AVX512BF16__)
    else {
      const uint16_t* xb = (const uint16_t*)x;
      const uint16_t* wb = (const uint16_t*)W;
      switch (m) {
        case 1: bf16_rows1(xb, wb, y, n, k, j0, j1); break;
        case 2: bf16_rows2(xb, wb, y, n, k, j0, j1); break;
        case 3: bf16_rows3(xb, wb, y, n, k, j0, j1); break;
        case 4: bf16_rows4(xb, wb, y, n, k, j0, j1); break;
        case 5: bf16_rows5(xb, wb, y, n, k, j0, j1); break;
        case 6: bf16_rows6(xb, wb, y, n, k, j0, j1); break;
        case 7: bf16_rows7(xb, wb, y, n, k, j0, j1); break;
        default: bf16_rows8(xb, wb, y, n, k, j0, j1); break;
      }
    }
#endif
  }
  return 0;
#else
  (void)x; (void)W; (void)y; (void)nthreads;
  return -1;
#endif
}
