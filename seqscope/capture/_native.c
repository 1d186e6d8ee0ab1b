/* Backpropagation-through-time scans of recurrences.py, compiled.
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
#include <stddef.h>

#ifndef SCALAR
#error "build with -DSCALAR=float or -DSCALAR=double (see native.py)"
#endif

typedef SCALAR real;
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
 * 11). Same operations, in the same order, per element: bit-identical results. */
static void lstm_scan_row(int H, const real *restrict dm, real *restrict dc, const real *restrict a,
                          const real *restrict p3, const real *restrict bo, real *restrict dp) {
    for (int u = 0; u < H; ++u) {
        const real m = dm[u];
        const real c = dc[u] + m * a[u]; /* dc_t += dm_t A_t */
        dc[u] = c;
        dp[u] = p3[u] * c; /* da_t[i, f, g] = dc_t P3_t */
        dp[H + u] = p3[H + u] * c;
        dp[2 * H + u] = p3[2 * H + u] * c;
        dp[3 * H + u] = m * bo[u]; /* da_t[o] = dm_t Bo_t */
    }
}

static void carry_row(int H, const real *restrict f, const real *restrict dc, real *restrict dc_prev) {
    for (int u = 0; u < H; ++u) dc_prev[u] += f[u] * dc[u]; /* dc_{t-1} += f_t dc_t */
}

static void gru_scan_row(int H, const real *restrict d, const real *restrict f3, const real *restrict z,
                         real *restrict q, real *restrict dp) {
    for (int u = 0; u < H; ++u) {
        const real g = d[u];
        dp[u] = f3[u] * g;
        dp[H + u] = f3[H + u] * g;
        dp[2 * H + u] = f3[2 * H + u] * g;
        q[u] += g * z[u]; /* dh_{t-1} += z_t dh_t */
    }
}

static void rnn_scan_row(int H, const real *restrict g, const real *restrict d, real *restrict o) {
    for (int u = 0; u < H; ++u) o[u] = g[u] * d[u];
}

/* LSTM. dh [T, rows, P] holds the external gradients e_t on entry and dL/dh_t
 * on return; dc [T, rows, H] likewise (e^c_t, then dL/dc_t). Factors A, F, Bo
 * [T, S, H], P3 [T, S, 3, H]; w_hh [4H, P]; w_hr [P, H] or NULL (then P == H);
 * work: dpre [rows, 4H], dm [rows, H] (unused without w_hr). */
int NAME(seqscope_lstm_scan)(gemm_f gemm, int T, int R, int S, int H, int P, real *dh, real *dc, const real *A,
                       const real *F, const real *P3, const real *Bo, const real *w_hh, const real *w_hr,
                       real *dpre, real *dm_work) {
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
    return 0;
}

/* GRU. dh [T, rows, H] (e_t in, dL/dh_t out); F3 [T, S, 3, H], Z [T, S, H];
 * w_hh [3H, H]; work: dpre [rows, 3H]. */
int NAME(seqscope_gru_scan)(gemm_f gemm, int T, int R, int S, int H, real *dh, const real *F3, const real *Z,
                      const real *w_hh, real *dpre) {
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
    return 0;
}

/* Plain RNN. dh [T, rows, H] (e_t in, dL/dh_t out); D [T, S, H] = act'(a_t);
 * w_hh [H, H]; work: da [rows, H]. */
int NAME(seqscope_rnn_scan)(gemm_f gemm, int T, int R, int S, int H, real *dh, const real *D, const real *w_hh,
                      real *da) {
    const int rows = R * S;
    for (int t = T - 1; t > 0; --t) {
        real *dh_t = dh + (size_t)t * rows * H;
        for (int r = 0; r < rows; ++r)
            rnn_scan_row(H, dh_t + (size_t)r * H, D + ((size_t)t * S + r % S) * H, da + (size_t)r * H);
        gemm_rm(gemm, rows, H, H, da, w_hh, 1, dh_t - (size_t)rows * H);
    }
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
