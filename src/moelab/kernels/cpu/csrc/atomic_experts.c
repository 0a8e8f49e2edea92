/* Atomic (single-neuron) expert pools: y[t] = sum over assignments (t, e, w) of w act(u_e . x_t) v_e.
 *
 * PEER (He 2024, Eq. 4) and OmniMoE route each token to many of ~10^6 experts whose weights are
 * one row of u [E, D] and one of v [E, O]. The work is reading those rows: a dot product with x_t
 * and an axpy into y_t per assignment. PyTorch code gathers the rows into [chunk, D] copies first
 * and reads them again; these loops read every row once, straight from the tables, with no
 * temporaries. Three entry points, each for float (dtype 0) and double (dtype 1):
 *
 *   atomic_forward          per token: h[n] = u_e . x_t, y_t = sum w[n] act(h[n]) v_e
 *   atomic_backward_tokens  per token: gs = gy_t . v_e; grad_w[n] = act(h) gs; s[n] = w act(h);
 *                           gh[n] = w act'(h) gs; grad_x_t = sum gh[n] u_e
 *   atomic_table_grad       per expert, rows in ascending order (the assignments sorted by
 *                           expert): g_e = sum coef[n] src_{tok[n]}, and 0 for experts without
 *                           any. Every row of g is written exactly once (no memset, then a
 *                           read-modify-write per assignment): the "expert-centric" update.
 *
 * A token's assignments: with k > 0, n = t k .. t k + k - 1 (token-major top-k); with k == 0,
 * order[row_start[t] .. row_start[t + 1]) (any COO routing, sorted by token by the caller).
 * Tokens are split across OpenMP threads (libgomp, the runtime PyTorch has loaded), each writing
 * only its own rows of y / grad_x; expert rows are split into contiguous blocks the same way.
 * Activations: 0 = gelu (exact, erf), 1 = relu, 2 = silu; derivatives as ATen's backward kernels.
 * Indices are trusted (the Python caller checks their range).
 */
#include <math.h>
#include <stdint.h>
#include <string.h>
#include <omp.h>

#define DEFINE_ATOMIC(T, SUF, ERF, EXP)                                                             \
  static inline T act_##SUF(T h, int act) {                                                         \
    if (act == 0) return (T)0.5 * h * ((T)1 + ERF(h * (T)0.70710678118654752440));                  \
    if (act == 1) return h > 0 ? h : (T)0;                                                          \
    return h / ((T)1 + EXP(-h));                                                                    \
  }                                                                                                 \
  static inline T dact_##SUF(T h, int act) {                                                        \
    if (act == 0)                                                                                   \
      return (T)0.5 * ((T)1 + ERF(h * (T)0.70710678118654752440)) +                                 \
             h * EXP((T)-0.5 * h * h) * (T)0.39894228040143267794;                                  \
    if (act == 1) return h > 0 ? (T)1 : (T)0;                                                       \
    T sig = (T)1 / ((T)1 + EXP(-h));                                                                \
    return sig * ((T)1 + h * ((T)1 - sig));                                                         \
  }                                                                                                 \
  static inline T dot_##SUF(const T* a, const T* b, long d) {                                       \
    T acc = 0;                                                                                      \
    _Pragma("omp simd reduction(+:acc)") for (long i = 0; i < d; i++) acc += a[i] * b[i];           \
    return acc;                                                                                     \
  }                                                                                                 \
  static inline void axpy_##SUF(T* y, T s, const T* x, long d) {                                    \
    _Pragma("omp simd") for (long i = 0; i < d; i++) y[i] += s * x[i];                              \
  }                                                                                                 \
  static void forward_##SUF(const T* x, const T* u, const T* v, const int64_t* e, const T* w,      \
                            const int64_t* row_start, const int64_t* order, long k, T* h, T* y,     \
                            long nt, long D, long O, int act, int threads) {                        \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                               \
    for (long t = 0; t < nt; t++) {                                                                 \
      T* yt = y + t * O;                                                                            \
      const T* xt = x + t * D;                                                                      \
      memset(yt, 0, (size_t)O * sizeof(T));                                                        \
      long j0 = k ? t * k : row_start[t], j1 = k ? t * k + k : row_start[t + 1];                    \
      for (long j = j0; j < j1; j++) {                                                              \
        long n = k ? j : order[j];                                                                  \
        int64_t ex = e[n];                                                                          \
        T hh = dot_##SUF(u + ex * D, xt, D);                                                        \
        h[n] = hh;                                                                                  \
        axpy_##SUF(yt, w[n] * act_##SUF(hh, act), v + ex * O, O);                                   \
      }                                                                                             \
    }                                                                                               \
  }                                                                                                 \
  static void backward_tokens_##SUF(const T* gy, const T* u, const T* v, const int64_t* e,         \
                                    const T* w, const T* h, const int64_t* row_start,               \
                                    const int64_t* order, long k, T* grad_x, T* grad_w, T* s,       \
                                    T* gh, long nt, long D, long O, int act, int threads) {         \
    _Pragma("omp parallel for num_threads(threads) schedule(static)")                               \
    for (long t = 0; t < nt; t++) {                                                                 \
      const T* gyt = gy + t * O;                                                                    \
      T* gxt = grad_x ? grad_x + t * D : 0;                                                         \
      if (gxt) memset(gxt, 0, (size_t)D * sizeof(T));                                              \
      long j0 = k ? t * k : row_start[t], j1 = k ? t * k + k : row_start[t + 1];                    \
      for (long j = j0; j < j1; j++) {                                                              \
        long n = k ? j : order[j];                                                                  \
        int64_t ex = e[n];                                                                          \
        T gs = dot_##SUF(gyt, v + ex * O, O);                                                       \
        T hh = h[n], a = act_##SUF(hh, act);                                                        \
        T ghn = w[n] * gs * dact_##SUF(hh, act);                                                    \
        if (grad_w) grad_w[n] = a * gs;                                                             \
        if (s) s[n] = w[n] * a;                                                                     \
        if (gh) gh[n] = ghn;                                                                        \
        if (gxt) axpy_##SUF(gxt, ghn, u + ex * D, D);                                               \
      }                                                                                             \
    }                                                                                               \
  }                                                                                                 \
  static void table_grad_##SUF(const T* src, const int64_t* se, const int64_t* tok,                \
                               const T* coef, T* g, long N, long E, long D, int threads) {          \
    _Pragma("omp parallel num_threads(threads)") {                                                  \
      int nth = omp_get_num_threads(), id = omp_get_thread_num();                                   \
      long r0 = E * id / nth, r1 = E * (id + 1) / nth;                                              \
      long lo = 0, hi = N; /* first sorted assignment of an expert >= r0 */                         \
      while (lo < hi) {                                                                             \
        long m = lo + (hi - lo) / 2;                                                                \
        if (se[m] < r0) lo = m + 1; else hi = m;                                                    \
      }                                                                                             \
      long n = lo, r = r0;                                                                          \
      while (r < r1) {                                                                              \
        long next = n < N ? se[n] : E;                                                              \
        if (next > r1) next = r1;                                                                   \
        if (next > r) { /* experts r .. next - 1 received nothing */                                \
          memset(g + r * D, 0, (size_t)(next - r) * D * sizeof(T));                                \
          r = next;                                                                                 \
          continue;                                                                                 \
        }                                                                                           \
        T* gr = g + r * D;                                                                          \
        const T* first = src + tok[n] * D;                                                          \
        T c = coef[n];                                                                              \
        _Pragma("omp simd") for (long i = 0; i < D; i++) gr[i] = c * first[i];                     \
        for (n++; n < N && se[n] == r; n++) axpy_##SUF(gr, coef[n], src + tok[n] * D, D);           \
        r++;                                                                                        \
      }                                                                                             \
    }                                                                                               \
  }

DEFINE_ATOMIC(float, f32, erff, expf)
DEFINE_ATOMIC(double, f64, erf, exp)

int atomic_forward(int dtype, const void* x, const void* u, const void* v, const int64_t* e,
                   const void* w, const int64_t* row_start, const int64_t* order, long k, void* h,
                   void* y, long nt, long D, long O, int act, int threads) {
  if (dtype == 0)
    forward_f32(x, u, v, e, w, row_start, order, k, h, y, nt, D, O, act, threads);
  else if (dtype == 1)
    forward_f64(x, u, v, e, w, row_start, order, k, h, y, nt, D, O, act, threads);
  else
    return -1;
  return 0;
}

int atomic_backward_tokens(int dtype, const void* gy, const void* u, const void* v,
                           const int64_t* e, const void* w, const void* h,
                           const int64_t* row_start, const int64_t* order, long k, void* grad_x,
                           void* grad_w, void* s, void* gh, long nt, long D, long O, int act,
                           int threads) {
  if (dtype == 0)
    backward_tokens_f32(gy, u, v, e, w, h, row_start, order, k, grad_x, grad_w, s, gh, nt, D, O, act,
                        threads);
  else if (dtype == 1)
    backward_tokens_f64(gy, u, v, e, w, h, row_start, order, k, grad_x, grad_w, s, gh, nt, D, O, act,
                        threads);
  else
    return -1;
  return 0;
}

int atomic_table_grad(int dtype, const void* src, const int64_t* sorted_e, const int64_t* tok,
                      const void* coef, void* g, long N, long E, long D, int threads) {
  if (dtype == 0)
    table_grad_f32(src, sorted_e, tok, coef, g, N, E, D, threads);
  else if (dtype == 1)
    table_grad_f64(src, sorted_e, tok, coef, g, N, E, D, threads);
  else
    return -1;
  return 0;
}
