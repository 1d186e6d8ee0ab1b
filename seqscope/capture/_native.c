/* Backpropagation-through-time scans of recurrences.py, compiled (and, at the
 * end of this file, the largest eigenvalue of a Gram matrix for sigma_max).
 *
 * The same recurrences as recurrences.backward_scan (its docstring has the
 * equations), in the same order of operations per timestep: the elementwise
 * work of a timestep is one pass in C instead of four or five PyTorch calls,
 * and the one matrix product per timestep is the BLAS sgemm that PyTorch itself
 * links (passed in as a function pointer), so the loop never returns to Python.
 *
 * Built twice by native.py: -DSCALAR=float -DNAME(x)=x##_f32 (with sgemm) and
 * -DSCALAR=double -DNAME(x)=x##_f64 (with dgemm).
 *
 * Layout: row-major SCALAR. Sequence tensors are time-major [T, rows, unit]
 * with rows = R * S ordered (seed, sequence); per-sequence factors are
 * [T, S, ...] and row r uses sequence r % S. The caller (native.py) checks every
 * shape, dtype and contiguity before calling; nothing here allocates.
 */
#include <float.h>
#include <stddef.h>

#ifndef SCALAR
#error "build with -DSCALAR=float or -DSCALAR=double (see native.py)"
#endif

typedef SCALAR real;

/* The scans run with subnormal numbers flushed to zero (results, and inputs
 * read as zero) on the calling thread, and put its floating-point mode back
 * before they return. The propagation seed is one unit gradient at a
 * sequence's last step; where gradients vanish it shrinks by orders of
 * magnitude over the timesteps and passes through the subnormal range (below
 * 1.2e-38 in float32), where this machine's x86 cores are ~20 times slower (a
 * vectorized multiply: 8.2 ns an element instead of 0.43). The LSTM scan at
 * B64 T200 H512 took 0.65 s instead of 0.07 (results.md, session 25); with
 * this mode alone, 0.21 s, because the BLAS's worker threads keep their own
 * mode: the matrix product's inputs are also flushed below TINY (below).
 * Flushed values are 0, which the norms record as what they are: a gradient
 * too small for the dtype. Other architectures run in their default mode. */
#if defined(__SSE__) /* x86-64, and 32-bit x86 built with SSE */
#include <xmmintrin.h>
typedef unsigned int fpmode;
static fpmode flush_subnormals(void) {
    const fpmode saved = _mm_getcsr();
    _mm_setcsr(saved | 0x8040u); /* FTZ (bit 15) and DAZ (bit 6) */
    return saved;
}
static void restore_mode(fpmode saved) { _mm_setcsr(saved); }
#elif defined(__aarch64__)
typedef unsigned long long fpmode;
static fpmode flush_subnormals(void) {
    fpmode saved;
    __asm__ __volatile__("mrs %0, fpcr" : "=r"(saved));
    __asm__ __volatile__("msr fpcr, %0" : : "r"(saved | (1ull << 24))); /* FZ */
    return saved;
}
static void restore_mode(fpmode saved) { __asm__ __volatile__("msr fpcr, %0" : : "r"(saved)); }
#else
typedef int fpmode;
static fpmode flush_subnormals(void) { return 0; }
static void restore_mode(fpmode saved) { (void)saved; }
#endif
typedef void (*gemm_f)(const char *transa, const char *transb, const int *m, const int *n, const int *k,
                       const real *alpha, const real *a, const int *lda, const real *b, const int *ldb,
                       const real *beta, real *c, const int *ldc);

/* c[rows, n] = beta * c + a[rows, k] @ b[k, n], row-major: column-major BLAS
 * computes c^T = b^T a^T on the same memory. The sizes are passed in 64-bit
 * slots: a BLAS with 32-bit integers reads their low half, one with 64-bit
 * integers (ILP64) the whole, and both read the right value (little-endian;
 * native.py checks the results against the eager scan before first use). */
static void gemm_rm(gemm_f gemm, int rows, int n, int k, const real *a, const real *b, real beta, real *c) {
    const real one = 1;
    const long long m64 = n, n64 = rows, k64 = k;
    gemm("N", "N", (const int *)&m64, (const int *)&n64, (const int *)&k64, &one, b, (const int *)&m64, a,
         (const int *)&k64, &beta, c, (const int *)&m64);
}

/* Each timestep's elementwise work on one row, as a function of its own: its
 * pointers are restrict parameters (distinct arrays, or distinct rows of one),
 * which is what lets the compiler vectorize the loop. Restrict on local
 * pointers inside the scans was not enough for gcc 12: these loops ran scalar,
 * and the LSTM and GRU scans took 15-20% longer at H=64 (profiling.md, session
 * 11). Same operations, in the same order, per element: bit-identical results
 * to the eager scan above TINY (below). */
/* The matrix product's inputs are flushed to zero below TINY (2^-102 in float,
 * 2^-969 in double): the BLAS's worker threads run in their own floating-point
 * mode, and products of smaller inputs with weights of ordinary size are
 * subnormal there (see flush_subnormals). Above TINY a product is subnormal
 * only where a weight is below 2^-24 (2^-53) in magnitude. What this drops is
 * below float32's precision next to any normal-sized entry of the same row: a
 * row's norm changes only where the whole row is below ~1e-29. A NaN passes. */
#define TINY ((real)(sizeof(real) == sizeof(float) ? 0x1p-102 : 0x1p-969))
static inline real flushed(real v) { return (v < TINY && v > -TINY) ? 0 : v; }

static void lstm_scan_row(int H, const real *restrict dm, real *restrict dc, const real *restrict a,
                          const real *restrict p3, const real *restrict bo, real *restrict dp) {
    for (int u = 0; u < H; ++u) {
        const real m = dm[u];
        const real c = dc[u] + m * a[u]; /* dc_t += dm_t A_t */
        dc[u] = c;
        dp[u] = flushed(p3[u] * c); /* da_t[i, f, g] = dc_t P3_t */
        dp[H + u] = flushed(p3[H + u] * c);
        dp[2 * H + u] = flushed(p3[2 * H + u] * c);
        dp[3 * H + u] = flushed(m * bo[u]); /* da_t[o] = dm_t Bo_t */
    }
}

static void carry_row(int H, const real *restrict f, const real *restrict dc, real *restrict dc_prev) {
    for (int u = 0; u < H; ++u) dc_prev[u] += f[u] * dc[u]; /* dc_{t-1} += f_t dc_t */
}

static void gru_scan_row(int H, const real *restrict d, const real *restrict f3, const real *restrict z,
                         real *restrict q, real *restrict dp) {
    for (int u = 0; u < H; ++u) {
        const real g = d[u];
        dp[u] = flushed(f3[u] * g);
        dp[H + u] = flushed(f3[H + u] * g);
        dp[2 * H + u] = flushed(f3[2 * H + u] * g);
        q[u] += g * z[u]; /* dh_{t-1} += z_t dh_t */
    }
}

static void rnn_scan_row(int H, const real *restrict g, const real *restrict d, real *restrict o) {
    for (int u = 0; u < H; ++u) o[u] = flushed(g[u] * d[u]);
}

/* LSTM. dh [T, rows, P] holds the external gradients e_t on entry and dL/dh_t
 * on return; dc [T, rows, H] likewise (e^c_t, then dL/dc_t). Factors A, F, Bo
 * [T, S, H], P3 [T, S, 3, H]; w_hh [4H, P]; w_hr [P, H] or NULL (then P == H);
 * work: dpre [rows, 4H], dm [rows, H] (unused without w_hr). */
int NAME(seqscope_lstm_scan)(gemm_f gemm, int T, int R, int S, int H, int P, real *dh, real *dc, const real *A,
                       const real *F, const real *P3, const real *Bo, const real *w_hh, const real *w_hr,
                       real *dpre, real *dm_work) {
    const fpmode mode = flush_subnormals();
    const int rows = R * S;
    for (int t = T - 1; t >= 0; --t) {
        real *dh_t = dh + (size_t)t * rows * P;
        real *dc_t = dc + (size_t)t * rows * H;
        if (w_hr != NULL) gemm_rm(gemm, rows, H, P, dh_t, w_hr, 0, dm_work); /* dm = dh W_hr */
        for (int r = 0; r < rows; ++r) {
            const int s = r % S;
            const size_t off = ((size_t)t * S + s) * H;
            const real *dm = w_hr != NULL ? dm_work + (size_t)r * H : dh_t + (size_t)r * P;
            real *dcr = dc_t + (size_t)r * H;
            lstm_scan_row(H, dm, dcr, A + off, P3 + ((size_t)t * S + s) * 3 * H, Bo + off, dpre + (size_t)r * 4 * H);
            if (t > 0) carry_row(H, F + off, dcr, dcr - (size_t)rows * H);
        }
        if (t > 0) gemm_rm(gemm, rows, P, 4 * H, dpre, w_hh, 1, dh_t - (size_t)rows * P); /* += W_hh^T da_t */
    }
    restore_mode(mode);
    return 0;
}

/* GRU. dh [T, rows, H] (e_t in, dL/dh_t out); F3 [T, S, 3, H], Z [T, S, H];
 * w_hh [3H, H]; work: dpre [rows, 3H]. */
int NAME(seqscope_gru_scan)(gemm_f gemm, int T, int R, int S, int H, real *dh, const real *F3, const real *Z,
                      const real *w_hh, real *dpre) {
    const fpmode mode = flush_subnormals();
    const int rows = R * S;
    for (int t = T - 1; t > 0; --t) {
        real *dh_t = dh + (size_t)t * rows * H;
        real *dh_p = dh_t - (size_t)rows * H;
        for (int r = 0; r < rows; ++r) {
            const int s = r % S;
            gru_scan_row(H, dh_t + (size_t)r * H, F3 + ((size_t)t * S + s) * 3 * H, Z + ((size_t)t * S + s) * H,
                         dh_p + (size_t)r * H, dpre + (size_t)r * 3 * H);
        }
        gemm_rm(gemm, rows, H, 3 * H, dpre, w_hh, 1, dh_p); /* += W_hh^T (dh_t F3_t) */
    }
    restore_mode(mode);
    return 0;
}

/* Plain RNN. dh [T, rows, H] (e_t in, dL/dh_t out); D [T, S, H] = act'(a_t);
 * w_hh [H, H]; work: da [rows, H]. */
int NAME(seqscope_rnn_scan)(gemm_f gemm, int T, int R, int S, int H, real *dh, const real *D, const real *w_hh,
                      real *da) {
    const fpmode mode = flush_subnormals();
    const int rows = R * S;
    for (int t = T - 1; t > 0; --t) {
        real *dh_t = dh + (size_t)t * rows * H;
        for (int r = 0; r < rows; ++r)
            rnn_scan_row(H, dh_t + (size_t)r * H, D + ((size_t)t * S + r % S) * H, da + (size_t)r * H);
        gemm_rm(gemm, rows, H, H, da, w_hh, 1, dh_t - (size_t)rows * H);
    }
    restore_mode(mode);
    return 0;
}

/* LSTM cell states from the activated gates [T, S, 4, H] (rows i, f, g, o):
 * c_t = f_t c_{t-1} + i_t g_t, from c0 [S, H]; cell [T, S, H] out. */
int NAME(seqscope_lstm_cells)(int T, int S, int H, const real *gates, const real *c0, real *cell) {
    for (int t = 0; t < T; ++t) {
        for (int s = 0; s < S; ++s) {
            const real *g4 = gates + ((size_t)t * S + s) * 4 * H;
            const real *prev = t > 0 ? cell + ((size_t)(t - 1) * S + s) * H : c0 + (size_t)s * H;
            real *c = cell + ((size_t)t * S + s) * H;
            for (int u = 0; u < H; ++u) c[u] = g4[H + u] * prev[u] + g4[u] * g4[2 * H + u];
        }
    }
    return 0;
}

static void lstm_factors_row(int H, const real *restrict g4, const real *restrict th, const real *restrict cp,
                             real *restrict a, real *restrict f, real *restrict p3, real *restrict bo) {
    for (int u = 0; u < H; ++u) {
        const real i = g4[u], fg = g4[H + u], g = g4[2 * H + u], o = g4[3 * H + u], c = th[u];
        a[u] = o * (1 - c * c);             /* dc_t += dm_t A_t */
        p3[u] = g * i * (1 - i);            /* da_t[i] = dc_t P3_t[0] */
        p3[H + u] = cp[u] * fg * (1 - fg);  /* da_t[f] */
        p3[2 * H + u] = i * (1 - g * g);    /* da_t[g] */
        bo[u] = c * o * (1 - o);            /* da_t[o] = dm_t Bo_t */
        f[u] = fg;                          /* dc_{t-1} += f_t dc_t */
    }
}

/* The LSTM scan's factors (recurrences.forward_details): from the gates
 * [T, S, 4, H], tanh(c_t) and c_{t-1} [T, S, H] (c_prev NULL: the cell states
 * shifted by one, c0 first). valid [T, S] (NULL: no padding) zeroes every factor
 * on padding. Out: A, F, Bo [T, S, H], P3 [T, S, 3, H]. */
int NAME(seqscope_lstm_factors)(int T, int S, int H, const real *gates, const real *tc, const real *cell,
                                const real *c0, const real *c_prev, const unsigned char *valid, real *A, real *F,
                                real *P3, real *Bo) {
    for (int t = 0; t < T; ++t) {
        for (int s = 0; s < S; ++s) {
            const size_t ts = (size_t)t * S + s, off = ts * H;
            real *a = A + off, *f = F + off, *bo = Bo + off, *p3 = P3 + ts * 3 * H;
            if (valid != NULL && !valid[ts]) {
                for (int u = 0; u < H; ++u) a[u] = f[u] = bo[u] = p3[u] = p3[H + u] = p3[2 * H + u] = 0;
                continue;
            }
            const real *cp = c_prev != NULL ? c_prev + off
                             : (t > 0 ? cell + ((size_t)(t - 1) * S + s) * H : c0 + (size_t)s * H);
            lstm_factors_row(H, gates + ts * 4 * H, tc + off, cp, a, f, p3, bo);
        }
    }
    return 0;
}

static void gru_factors_row(int H, const real *restrict g3, const real *restrict hn, const real *restrict hp,
                            real *restrict f3, real *restrict zo) {
    for (int u = 0; u < H; ++u) {
        const real r = g3[u], z = g3[H + u], n = g3[2 * H + u];
        const real fn = (1 - z) * (1 - n * n);   /* dn = dh fn */
        f3[u] = fn * hn[u] * r * (1 - r);         /* dr = dn (W_hn h + b_hn) r (1 - r) */
        f3[H + u] = (hp[u] - n) * z * (1 - z);    /* dz = dh (h_{t-1} - n) z (1 - z) */
        f3[2 * H + u] = r * fn;                   /* r dn */
        zo[u] = z;                                /* dh_{t-1} += z dh_t */
    }
}

/* The GRU scan's factors (recurrences.forward_details): from the gates
 * [T, S, 3, H] (rows r, z, n, activated), the recurrent products gh [T, S, 3, H]
 * (W_hh h_{t-1} + b_hh; only the n rows are read) and h_{t-1} [T, S, H]. valid
 * [T, S] (NULL: no padding) zeroes every factor on padding. Out: F3 [T, S, 3, H],
 * Z [T, S, H]. Same products, in the same order, as the eager version. */
int NAME(seqscope_gru_factors)(int T, int S, int H, const real *gates, const real *gh, const real *h_prev,
                               const unsigned char *valid, real *F3, real *Z) {
    for (int t = 0; t < T; ++t) {
        for (int s = 0; s < S; ++s) {
            const size_t ts = (size_t)t * S + s;
            real *f3 = F3 + ts * 3 * H, *zo = Z + ts * H;
            if (valid != NULL && !valid[ts]) {
                for (int u = 0; u < H; ++u) f3[u] = f3[H + u] = f3[2 * H + u] = zo[u] = 0;
                continue;
            }
            gru_factors_row(H, gates + ts * 3 * H, gh + ts * 3 * H + 2 * H, h_prev + ts * H, f3, zo);
        }
    }
    return 0;
}

/* ---- before the scans: the propagation seed ---------------------------------------
 *
 * In double precision whatever SCALAR is, as recurrences.unit_seed computes it (one
 * pass here instead of ten PyTorch calls). The gradient norms stay PyTorch's: a
 * plain loop here (one accumulator: the compiler may not reorder the sum) was
 * slower than its vectorized, threaded reduction (profiling.md, session 15).
 */

/* The propagation seed in place (recurrences.unit_seed): for each sequence s at
 * its last step t = last[s] (NULL: T - 1), ext[t][1][s] = ext[t][0][s] / its norm,
 * or the uniform unit vector H^-1/2 where that norm is zero or not finite (NaN,
 * or a sum of squares that overflows). ext [T, 2, S, H]. */
int NAME(seqscope_unit_seed)(int T, int S, int H, real *ext, const long long *last) {
    const double uniform = 1.0 / __builtin_sqrt((double)H);
    for (int s = 0; s < S; ++s) {
        const long long t = last != NULL ? last[s] : T - 1;
        if (t < 0 || t >= T) return 1;
        const real *g = ext + (((size_t)t * 2) * S + s) * H;
        real *v = ext + (((size_t)t * 2 + 1) * S + s) * H;
        double sum = 0;
        for (int u = 0; u < H; ++u) sum += (double)g[u] * (double)g[u];
        const double norm = __builtin_sqrt(sum);
        if (norm > 0 && norm <= DBL_MAX) {
            for (int u = 0; u < H; ++u) v[u] = (real)((double)g[u] / norm);
        } else {
            for (int u = 0; u < H; ++u) v[u] = (real)uniform;
        }
    }
    return 0;
}

/* ---- sigma_max(W_hh): the largest eigenvalue of the Gram matrix -----------------
 *
 * A dense eigensolver reduces the whole matrix to tridiagonal form (4/3 n^3
 * flops, half of them matrix-vector work) to find all n eigenvalues; only the
 * largest is wanted. Lanczos with full reorthogonalization finds it in k << n
 * matrix-vector products (k ~ 20-60 for the Gram matrices of recurrent layers,
 * n = 64 to 512), and a Cholesky factorization of theta (1 + eps) I - G proves
 * it: the factorization exists only when every eigenvalue of G lies below
 * theta (1 + eps), and theta, a Ritz value, lies at or below the largest one.
 * When that proof fails (Lanczos stopped early, or converged to a lower
 * eigenvalue because the start vector missed the top one) the caller runs the
 * dense eigensolver. Everything here is in double precision, whatever SCALAR
 * is; the BLAS (dgemv, dpotrf) is PyTorch's own, passed in as pointers. */
#include <float.h>
#include <math.h>

typedef void (*dgemv_f)(const char *trans, const int *m, const int *n, const double *alpha, const double *a,
                        const int *lda, const double *x, const int *incx, const double *beta, double *y,
                        const int *incy);
typedef void (*dpotrf_f)(const char *uplo, const int *n, double *a, const int *lda, int *info);

/* y = alpha op(a) x + beta y, a column-major [m, n] with leading dimension lda
 * (sizes in 64-bit slots, as gemm_rm). */
static void dgemv_cm(dgemv_f f, const char *trans, int m, int n, int lda, double alpha, const double *a,
                     const double *x, double beta, double *y) {
    const long long m64 = m, n64 = n, lda64 = lda, inc = 1;
    f(trans, (const int *)&m64, (const int *)&n64, &alpha, a, (const int *)&lda64, x, (const int *)&inc, &beta, y,
      (const int *)&inc);
}

/* How many eigenvalues of the symmetric tridiagonal matrix (diagonal a[k],
 * squared off-diagonal b2[k - 1]) lie below x: the negative pivots of the LDL^T
 * factorization of T - x I (Sylvester's law of inertia). */
static int below(int k, const double *a, const double *b2, double x, double pivmin) {
    int count = 0;
    double d = 1;
    for (int i = 0; i < k; ++i) {
        d = a[i] - x - (i > 0 ? b2[i - 1] / d : 0);
        if (fabs(d) < pivmin) d = -pivmin;
        if (d < 0) ++count;
    }
    return count;
}

/* The largest eigenvalue of that tridiagonal matrix, by bisection to a few
 * units of rounding. The bracket is [lo, hi] where the hints hold (one count
 * each: in the Lanczos iteration the previous Ritz value and a little above it
 * usually do, and the bisection then takes ~10 steps instead of ~55), else
 * the Gershgorin bounds. Each count is a chain of k dependent divisions. */
static double tridiagonal_top(int k, const double *a, const double *b2, double lo_hint, double hi_hint) {
    double lo = a[0], hi = a[0], bmax = 0;
    for (int i = 0; i < k; ++i) {
        const double r = (i > 0 ? sqrt(b2[i - 1]) : 0) + (i + 1 < k ? sqrt(b2[i]) : 0);
        if (a[i] - r < lo) lo = a[i] - r;
        if (a[i] + r > hi) hi = a[i] + r;
        if (i + 1 < k && b2[i] > bmax) bmax = b2[i];
    }
    const double pivmin = DBL_MIN * (bmax > 1 ? bmax : 1);
    if (lo_hint > lo && lo_hint < hi && below(k, a, b2, lo_hint, pivmin) < k) lo = lo_hint;
    if (hi_hint > lo && hi_hint < hi && below(k, a, b2, hi_hint, pivmin) == k) hi = hi_hint;
    for (int it = 0; it < 200 && hi - lo > 4 * DBL_EPSILON * fmax(fabs(lo), fabs(hi)) + pivmin; ++it) {
        const double mid = lo + (hi - lo) / 2;
        if (below(k, a, b2, mid, pivmin) == k) hi = mid;
        else lo = mid;
    }
    return lo;
}

/* gram [n, n] (row-major SCALAR; its lower triangle, i >= j, is read, as
 * torch.linalg.eigvalsh reads it). work: n*n + (kmax+1)*n + n + (kmax+1) + 2*kmax
 * doubles. On return 0, *top holds the largest eigenvalue theta, proven to
 * within theta * eps above it. Returns 1 when not proven (the caller uses a
 * dense eigensolver), 3 when the matrix has a NaN or an infinity, 2 for bad
 * sizes. */
int NAME(seqscope_top_eigenvalue)(dgemv_f gemv, dpotrf_f potrf, int n, int kmax, double eps, const real *gram,
                                  double *work, double *top) {
    if (n <= 0 || kmax <= 0 || kmax > n) return 2;
    double *G = work;                          /* [n, n], symmetric */
    double *Q = G + (size_t)n * n;             /* [kmax + 1, n]: the Lanczos vectors */
    double *w = Q + (size_t)(kmax + 1) * n;    /* [n] */
    double *h = w + n;                         /* [kmax + 1] */
    double *a = h + kmax + 1, *b2 = a + kmax;  /* the tridiagonal matrix */
    for (int i = 0; i < n; ++i) {
        for (int j = 0; j <= i; ++j) {
            const double v = (double)gram[(size_t)i * n + j];
            if (!isfinite(v)) return 3;
            G[(size_t)i * n + j] = v;
            G[(size_t)j * n + i] = v;
        }
    }
    /* a fixed start vector (the same result every run), of pseudo-random entries */
    unsigned long long s = 0x9E3779B97F4A7C15ULL;
    double norm = 0;
    for (int i = 0; i < n; ++i) {
        s = s * 6364136223846793005ULL + 1442695040888963407ULL;
        Q[i] = (double)(s >> 11) * (1.0 / 9007199254740992.0) - 0.5;
        norm += Q[i] * Q[i];
    }
    norm = sqrt(norm);
    for (int i = 0; i < n; ++i) Q[i] /= norm;
    /* the Ritz value is found every `stride` steps: at small n a step's products
     * cost less than the bisection */
    const int stride = n < 128 ? 4 : 2;
    double theta = 0, previous = 0, change = 0, beta = 0, scale = 0;
    int k = 0;
    while (k < kmax) {
        const double *q = Q + (size_t)k * n;
        dgemv_cm(gemv, "N", n, n, n, 1, G, q, 0, w); /* w = G q_k (G symmetric: layout-free) */
        if (k > 0) {
            const double *q_prev = Q + (size_t)(k - 1) * n;
            for (int i = 0; i < n; ++i) w[i] -= beta * q_prev[i];
        }
        double alpha = 0;
        for (int i = 0; i < n; ++i) alpha += q[i] * w[i];
        for (int i = 0; i < n; ++i) w[i] -= alpha * q[i];
        for (int pass = 0; pass < 2; ++pass) { /* full reorthogonalization, twice */
            dgemv_cm(gemv, "T", n, k + 1, n, 1, Q, w, 0, h);  /* h = Q^T w */
            dgemv_cm(gemv, "N", n, k + 1, n, -1, Q, h, 1, w); /* w -= Q h */
        }
        a[k] = alpha;
        ++k;
        beta = 0;
        for (int i = 0; i < n; ++i) beta += w[i] * w[i];
        beta = sqrt(beta);
        if (fabs(alpha) > scale) scale = fabs(alpha);
        /* the Krylov space is exhausted (or invariant: beta vanishes against the
         * matrix's scale; the proof then shows whether it held the top eigenvalue) */
        const int exhausted = k == n || k == kmax || beta <= 1e-14 * scale;
        if (k % stride == 0 || exhausted) {
            /* the Ritz value only grows with k; it grew by `change` over the last stride */
            theta = tridiagonal_top(k, a, b2, previous, previous + 4 * change + 1e-12 * fabs(previous));
            change = theta - previous;
            /* converged: it moved by less than 1e-13 of itself over the last stride
             * (the proof below, not this test, decides) */
            if (exhausted || (k > stride && change <= 1e-13 * fabs(theta))) break;
            previous = theta;
        }
        b2[k - 1] = beta * beta;
        double *next = Q + (size_t)k * n;
        for (int i = 0; i < n; ++i) next[i] = w[i] / beta;
    }
    if (!isfinite(theta)) return 1; /* overflow in the iteration: the dense solver decides */
    /* the proof: Cholesky of (theta (1 + eps) + tiny) I - G, in place */
    const double shift = theta + fabs(theta) * eps + DBL_MIN * n;
    for (size_t i = 0; i < (size_t)n * n; ++i) G[i] = -G[i];
    for (int i = 0; i < n; ++i) G[(size_t)i * n + i] += shift;
    long long info = 0;
    const long long n64 = n;
    potrf("L", (const int *)&n64, G, (const int *)&n64, (int *)&info);
    if (info != 0) return 1;
    *top = theta;
    return 0;
}
