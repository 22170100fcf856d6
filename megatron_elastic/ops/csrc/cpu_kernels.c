/* Compiled CPU kernels of the Mamba-2 mixer's forward pass (no backward: the torch paths serve training).
 *
 * Built and loaded by megatron_elastic/ops/native.py (the system C compiler, once per machine, cached); called
 * through ctypes with float32 buffers. Work is split over (batch, group, heads), (batch, time step) or rows across
 * `nthreads` threads (parallel_ranges). The argument structs are mirrored field by field in native.py; *_args_size()
 * lets it check them. The fused conv: ssd_args below.
 *
 * ssd_scan_forward: Mamba-2's recurrence token by token, the semantics of ssd.py's chunked torch scan:
 *   dt_t = clamp(softplus(dt_t + dt_bias)),  S_t = exp(dt_t A) S_{t-1} + dt_t x_t B_t^T,  y_t = S_t C_t + D x_t,
 *   y_t *= silu(z_t).  Each head's state (headdim x d_state) is kept transposed (d_state rows of headdim) so that a
 *   vector holds W consecutive state rows: every step is then multiply-adds over vectors with B_t, C_t broadcast
 *   (no horizontal sums), TB steps per pass over the state (it is read and written once per TB steps).
 *
 * causal_conv1d_forward: y[b, t, d] = act(bias[d] + sum_k w[k, d] x[b, t - (width - 1) + k, d]), zeros before 0.
 *
 * gated_rmsnorm_forward: per group of group_size channels, y = h / sqrt(mean(h^2) + eps) * weight with h = x silu(z)
 *   (or y = that of h = x, times silu(z), with norm_before_gate), in one pass over each row.
 */
#include <math.h>
#include <pthread.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#define W 16  /* floats per vector: one AVX-512 register; the compiler splits it where vectors are narrower */
#define RB 4  /* state rows per pass: RB vectors */
#define TB 2  /* time steps per pass over the state */
#define MAX_THREADS 256 /* without OpenMP */

typedef float vec __attribute__((vector_size(W * sizeof(float))));
static inline vec load(const float *p) { vec v; memcpy(&v, p, sizeof v); return v; }
static inline void store(float *p, vec v) { memcpy(p, &v, sizeof v); }
static inline vec broadcast(float f) { return (vec){0} + f; }
/* exp(v) for float32 in plain arithmetic (so that loops over it vectorize, as libm's expf does not): v = n ln2 + r
 * with |r| <= ln2 / 2, exp(r) by its degree-6 Taylor polynomial (relative error below 2e-7 on that range), times 2^n
 * put into the exponent bits. Arguments are clamped to [-87, 88] (exp(-87) = 1.6e-38, just above the smallest
 * normal float; the results below it are the nearest normal instead of a subnormal or 0). */
static inline float exp_approx(float v) {
  v = v < -87.0f ? -87.0f : (v > 88.0f ? 88.0f : v);
  const float n = (v * 1.44269504f + 12582912.0f) - 12582912.0f; /* round to nearest: 1.5 * 2^23 */
  const float r = (v - n * 0.693145752f) - n * 1.42860677e-6f;  /* ln2 in two parts: n * hi is exact */
  const float p =
      1.0f + r * (1.0f + r * (0.5f + r * (1.66666672e-1f + r * (4.16666679e-2f + r * (8.33333377e-3f + r * 1.38888892e-3f)))));
  union { float f; int32_t i; } u = {p};
  u.i += (int32_t)n << 23;
  return u.f;
}
static inline float silu(float v) { return v / (1.0f + exp_approx(-v)); }

/* Run fn(args, begin, end) over tasks 0 .. tasks split across up to nthreads threads, each with at least `grain`
 * tasks. Built with OpenMP (the default), the threads are those of the OpenMP runtime already in the process:
 * torch's own intra-op pool (a second pool would compete with torch's workers, which spin for a while after each
 * parallel region). Without OpenMP, POSIX threads started per call (the caller is one). */
typedef void (*range_fn)(void *args, int64_t begin, int64_t end);
#ifdef _OPENMP
#include <omp.h>
static void parallel_ranges(range_fn fn, void *args, int64_t tasks, int64_t grain, int nthreads) {
  if (nthreads > tasks / grain) nthreads = (int)(tasks / grain);
  if (nthreads <= 1) { fn(args, 0, tasks); return; }
#pragma omp parallel num_threads(nthreads)
  {
    const int64_t k = omp_get_thread_num(), n = omp_get_num_threads();
    fn(args, tasks * k / n, tasks * (k + 1) / n);
  }
}
#else
typedef struct { range_fn fn; void *args; int64_t begin, end; } range_job;
static void *run_range(void *p) { range_job *j = p; j->fn(j->args, j->begin, j->end); return NULL; }
static void parallel_ranges(range_fn fn, void *args, int64_t tasks, int64_t grain, int nthreads) {
  if (nthreads > tasks / grain) nthreads = (int)(tasks / grain);
  if (nthreads > MAX_THREADS) nthreads = MAX_THREADS;
  if (nthreads <= 1) { fn(args, 0, tasks); return; }
  range_job jobs[MAX_THREADS];
  pthread_t threads[MAX_THREADS];
  int started[MAX_THREADS] = {0};
  for (int k = 0; k < nthreads; ++k) jobs[k] = (range_job){fn, args, tasks * k / nthreads, tasks * (k + 1) / nthreads};
  for (int k = 1; k < nthreads; ++k) started[k] = pthread_create(&threads[k], NULL, run_range, &jobs[k]) == 0;
  run_range(&jobs[0]);
  for (int k = 1; k < nthreads; ++k) {
    if (started[k]) pthread_join(threads[k], NULL);
    else run_range(&jobs[k]); /* no thread to be had: this one does it */
  }
}
#endif

/* ---------------------------------------------------------------------------------------------- SSD scan */

typedef struct {
  int64_t batch, seqlen, nheads, headdim, ngroups, dstate;
  const float *x; int64_t x_sb, x_st;   /* x[b, t, h, p] at x + b*x_sb + t*x_st + h*headdim + p */
  const float *dt; int64_t dt_sb, dt_st; /* dt[b, t, h] at dt + b*dt_sb + t*dt_st + h */
  const float *A, *dt_bias;              /* (nheads,); dt_bias may be NULL */
  int64_t softplus; float dt_min, dt_max;
  const float *B; int64_t B_sb, B_st;    /* B[b, t, g, n] at B + b*B_sb + t*B_st + g*dstate + n; C alike */
  const float *C; int64_t C_sb, C_st;
  const float *D; int64_t D_per_channel; /* (nheads,) or (nheads, headdim); may be NULL */
  const float *z; int64_t z_sb, z_st;    /* like x; may be NULL */
  const float *initial;                  /* (batch, nheads, headdim, dstate) contiguous; may be NULL */
  float *y;                              /* (batch, seqlen, nheads, headdim) contiguous */
  float *final;                          /* (batch, nheads, headdim, dstate) contiguous; may be NULL */
  /* The mixer's causal conv (+ silu) fused in front, or conv_width 0: then x, B and C are the conv's inputs, and
   * conv_x/B/C point at the columns of a (conv_width, conv_stride) weight for x's, B's and C's channels (biases
   * alike, or NULL). */
  int64_t conv_width, conv_stride;
  const float *conv_x, *conv_B, *conv_C, *conv_bias_x, *conv_bias_B, *conv_bias_C;
} ssd_args;

int64_t ssd_args_size(void) { return (int64_t)sizeof(ssd_args); }

#define AT(p, offset) ((p) ? (p) + (offset) : NULL)
#define TL 64 /* time steps per block: a block's inputs (TL x (headdim + 2 dstate) floats) stay in cache */

/* One time step t of the causal depthwise conv over channels [0, width) of `in` (step stride in_st) into out: bias,
 * the taps (weight rows of stride w_st; steps before 0 are zeros), silu if asked. */
static inline void conv_step(const float *in, int64_t in_st, const float *w, int64_t w_st, const float *bias,
                             int64_t K, int64_t width, int64_t t, int64_t act, float *out) {
  for (int64_t c = 0; c < width; ++c) out[c] = bias ? bias[c] : 0.0f;
  for (int64_t k = 0; k < K; ++k) {
    const int64_t s = t - (K - 1) + k;
    if (s < 0) continue;
    const float *is = in + s * in_st, *wk = w + k * w_st;
    for (int64_t c = 0; c < width; ++c) out[c] += wk[c] * is[c];
  }
  if (act)
    for (int64_t c = 0; c < width; ++c) out[c] = silu(out[c]);
}

/* Channels [0, width) of steps t0 .. t1 of `in` (step stride in_st) into out (row stride width): copied, or through
 * the causal conv and silu (weight w: conv_width rows of stride conv_stride). */
static void block_inputs(const ssd_args *a, const float *in, int64_t in_st, const float *w, const float *bias,
                         int64_t width, int64_t t0, int64_t t1, float *out) {
  for (int64_t t = t0; t < t1; ++t) {
    float *o = out + (t - t0) * width;
    if (a->conv_width == 0) memcpy(o, in + t * in_st, sizeof(float) * width);
    else conv_step(in, in_st, w, a->conv_stride, bias, a->conv_width, width, t, 1, o);
  }
}

/* State rows i0 .. i0 + R*W (S transposed: S[n * P + i]) over `steps` steps, T at a time, of inputs xs (row stride
 * P), Bs, Cs (row stride N) into ys (row stride y_st). */
static inline __attribute__((always_inline)) void scan_rows(const int R, const int T, int64_t P, int64_t N,
                                                           int64_t i0, int64_t steps, float *S, const float *xs,
                                                           const float *Bs, const float *Cs, const float *dts,
                                                           const float *decays, float *ys, int64_t y_st) {
  for (int64_t t = 0; t + T <= steps; t += T) {
    vec decay[TB], input[TB][RB], out[TB][RB];
    for (int u = 0; u < T; ++u) {
      decay[u] = broadcast(decays[t + u]);
      for (int r = 0; r < R; ++r) {
        input[u][r] = load(xs + (t + u) * P + i0 + r * W) * dts[t + u];
        out[u][r] = broadcast(0.0f);
      }
    }
    for (int64_t n = 0; n < N; ++n) {
      vec Bn[TB], Cn[TB];
      for (int u = 0; u < T; ++u) {
        Bn[u] = broadcast(Bs[(t + u) * N + n]);
        Cn[u] = broadcast(Cs[(t + u) * N + n]);
      }
      float *s = S + n * P + i0;
      for (int r = 0; r < R; ++r) {
        vec v = load(s + r * W);
        for (int u = 0; u < T; ++u) {
          v = decay[u] * v + input[u][r] * Bn[u];
          out[u][r] += v * Cn[u];
        }
        store(s + r * W, v);
      }
    }
    for (int u = 0; u < T; ++u)
      for (int r = 0; r < R; ++r) store(ys + (t + u) * y_st + i0 + r * W, out[u][r]);
  }
}

static inline __attribute__((always_inline)) void scan_rows_all_steps(const int R, int64_t P, int64_t N, int64_t i0,
                                                                     int64_t steps, float *S, const float *xs,
                                                                     const float *Bs, const float *Cs,
                                                                     const float *dts, const float *decays,
                                                                     float *ys, int64_t y_st) {
  const int64_t whole = steps - steps % TB;
  scan_rows(R, TB, P, N, i0, whole, S, xs, Bs, Cs, dts, decays, ys, y_st);
  scan_rows(R, 1, P, N, i0, steps - whole, S, xs + whole * P, Bs + whole * N, Cs + whole * N, dts + whole,
            decays + whole, ys + whole * y_st, y_st);
}

/* State rows i0 .. P (fewer than W), scalar loops. */
static void scan_rows_tail(int64_t P, int64_t N, int64_t i0, int64_t steps, float *S, const float *xs,
                           const float *Bs, const float *Cs, const float *dts, const float *decays, float *ys,
                           int64_t y_st) {
  for (int64_t t = 0; t < steps; ++t)
    for (int64_t i = i0; i < P; ++i) {
      const float input = dts[t] * xs[t * P + i];
      float out = 0.0f;
      for (int64_t n = 0; n < N; ++n) {
        const float v = decays[t] * S[n * P + i] + input * Bs[t * N + n];
        S[n * P + i] = v;
        out += v * Cs[t * N + n];
      }
      ys[t * y_st + i] = out;
    }
}

/* Tasks: (batch, group, part of the group's heads), parts_per_group parts. Each time block's B and C (through the
 * conv if fused) are made once for the part's heads; its heads' states live through the whole sequence. */
typedef struct { const ssd_args *a; int64_t parts_per_group; } ssd_work;

static void ssd_parts(void *work, int64_t begin, int64_t end) {
  const ssd_args *a = ((const ssd_work *)work)->a;
  const int64_t parts = ((const ssd_work *)work)->parts_per_group;
  const int64_t P = a->headdim, N = a->dstate, H = a->nheads, L = a->seqlen, G = a->ngroups, per_group = H / G;
  const int64_t most = (per_group + parts - 1) / parts; /* heads in a part, at most */
  float *S = malloc(sizeof(float) * (most * (P * N + 2 * L) + TL * (P + 2 * N) + 2));
  float *dts = S + most * P * N, *decays = dts + most * L, *xs = decays + most * L, *Bs = xs + TL * P, *Cs = Bs + TL * N;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / (G * parts), g = task / parts % G, part = task % parts;
    const int64_t h0 = g * per_group + per_group * part / parts, h1 = g * per_group + per_group * (part + 1) / parts;
    for (int64_t h = h0; h < h1; ++h) {
      float *Sh = S + (h - h0) * P * N, *dth = dts + (h - h0) * L, *dech = decays + (h - h0) * L;
      const float *init = a->initial ? a->initial + (b * H + h) * P * N : NULL;
      for (int64_t i = 0; i < P; ++i)
        for (int64_t n = 0; n < N; ++n) Sh[n * P + i] = init ? init[i * N + n] : 0.0f;
      const float A = a->A[h], bias = a->dt_bias ? a->dt_bias[h] : 0.0f;
      for (int64_t t = 0; t < L; ++t) {
        float v = a->dt[b * a->dt_sb + t * a->dt_st + h] + bias;
        if (a->softplus) v = v > 20.0f ? v : log1pf(expf(v)); /* torch's softplus (threshold 20) */
        v = v < a->dt_min ? a->dt_min : (v > a->dt_max ? a->dt_max : v);
        dth[t] = v;
        dech[t] = expf(v * A);
      }
    }
    const int64_t bc = g * N; /* the group's first B (and C) channel */
    for (int64_t t0 = 0; t0 < L; t0 += TL) {
      const int64_t t1 = t0 + TL < L ? t0 + TL : L, steps = t1 - t0;
      block_inputs(a, a->B + b * a->B_sb + bc, a->B_st, AT(a->conv_B, bc), AT(a->conv_bias_B, bc), N, t0, t1, Bs);
      block_inputs(a, a->C + b * a->C_sb + bc, a->C_st, AT(a->conv_C, bc), AT(a->conv_bias_C, bc), N, t0, t1, Cs);
      for (int64_t h = h0; h < h1; ++h) {
        float *Sh = S + (h - h0) * P * N;
        const float *dth = dts + (h - h0) * L + t0, *dech = decays + (h - h0) * L + t0;
        const int64_t xc = h * P; /* the head's first x channel */
        block_inputs(a, a->x + b * a->x_sb + xc, a->x_st, AT(a->conv_x, xc), AT(a->conv_bias_x, xc), P, t0, t1, xs);
        float *ys = a->y + ((b * L + t0) * H + h) * P;
        int64_t i0 = 0;
        for (; i0 + RB * W <= P; i0 += RB * W)
          scan_rows_all_steps(RB, P, N, i0, steps, Sh, xs, Bs, Cs, dth, dech, ys, H * P);
        for (; i0 + W <= P; i0 += W) scan_rows_all_steps(1, P, N, i0, steps, Sh, xs, Bs, Cs, dth, dech, ys, H * P);
        if (i0 < P) scan_rows_tail(P, N, i0, steps, Sh, xs, Bs, Cs, dth, dech, ys, H * P);
        for (int64_t t = 0; t < steps && (a->D || a->z); ++t) { /* the skip connection, then the gate */
          float *yt = ys + t * H * P;
          if (a->D)
            for (int64_t i = 0; i < P; ++i) yt[i] += (a->D_per_channel ? a->D[h * P + i] : a->D[h]) * xs[t * P + i];
          if (a->z) {
            const float *zt = a->z + b * a->z_sb + (t0 + t) * a->z_st + h * P;
            for (int64_t i = 0; i < P; ++i) yt[i] *= silu(zt[i]);
          }
        }
      }
    }
    if (a->final)
      for (int64_t h = h0; h < h1; ++h)
        for (int64_t i = 0; i < P; ++i)
          for (int64_t n = 0; n < N; ++n) a->final[((b * H + h) * P + i) * N + n] = S[(h - h0) * P * N + n * P + i];
  }
  free(S);
}

void ssd_scan_forward(ssd_args *args, int64_t nthreads) {
  /* enough tasks for the threads; more parts of a group only repeat its B and C (and their conv) */
  const int64_t per_group = args->nheads / args->ngroups, groups = args->batch * args->ngroups;
  int64_t parts = (nthreads + groups - 1) / groups;
  parts = parts < 1 ? 1 : (parts > per_group ? per_group : parts);
  ssd_work work = {args, parts};
  parallel_ranges(ssd_parts, &work, groups * parts, 1, (int)nthreads);
}

/* ------------------------------------------------------------------------------------- causal depthwise conv */

typedef struct {
  int64_t batch, seqlen, dim, width;
  const float *x; int64_t x_sb, x_st; /* x[b, t, d] at x + b*x_sb + t*x_st + d */
  const float *weight;                /* (width, dim) contiguous */
  const float *bias;                  /* (dim,); may be NULL */
  int64_t silu;
  float *y;                           /* (batch, seqlen, dim) contiguous */
} conv_args;

int64_t conv_args_size(void) { return (int64_t)sizeof(conv_args); }

static void conv_steps(void *args, int64_t begin, int64_t end) { /* tasks: (batch, time step) */
  const conv_args *a = args;
  const int64_t D = a->dim, K = a->width;
  for (int64_t task = begin; task < end; ++task) {
    const int64_t b = task / a->seqlen, t = task % a->seqlen;
    conv_step(a->x + b * a->x_sb, a->x_st, a->weight, D, a->bias, K, D, t, a->silu, a->y + task * D);
  }
}

void causal_conv1d_forward(conv_args *args, int64_t nthreads) {
  const int64_t per_step = args->dim * args->width, grain = per_step >= (1 << 16) ? 1 : (1 << 16) / per_step;
  parallel_ranges(conv_steps, args, args->batch * args->seqlen, grain, (int)nthreads);
}
/* ------------------------------------------------------------------------------------------ gated RMSNorm */

typedef struct {
  int64_t outer, inner, dim, group_size; /* rows (o, i): o < outer, i < inner */
  const float *x; int64_t x_so, x_si;   /* row (o, i) at x + o*x_so + i*x_si, dim floats */
  const float *z; int64_t z_so, z_si;   /* like x; may be NULL (no gate) */
  const float *weight;                  /* (dim,) */
  float eps;
  int64_t norm_before_gate;
  float *y;                             /* (outer, inner, dim) contiguous */
} norm_args;

int64_t norm_args_size(void) { return (int64_t)sizeof(norm_args); }

static void norm_rows(void *args, int64_t begin, int64_t end) {
  const norm_args *a = args;
  const int64_t D = a->dim, G = a->group_size;
  for (int64_t r = begin; r < end; ++r) {
    const int64_t o = r / a->inner, i = r % a->inner;
    const float *x = a->x + o * a->x_so + i * a->x_si, *z = a->z ? a->z + o * a->z_so + i * a->z_si : NULL;
    float *y = a->y + r * D;
    for (int64_t d = 0; d < D; ++d) y[d] = (z && !a->norm_before_gate) ? x[d] * silu(z[d]) : x[d];
    for (int64_t g0 = 0; g0 < D; g0 += G) {
      float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
      for (int64_t d = g0; d < g0 + G; ++d) sum += y[d] * y[d];
      const float scale = 1.0f / sqrtf(sum / (float)G + a->eps);
      for (int64_t d = g0; d < g0 + G; ++d) y[d] = y[d] * scale * a->weight[d];
    }
    if (z && a->norm_before_gate)
      for (int64_t d = 0; d < D; ++d) y[d] *= silu(z[d]);
  }
}

void gated_rmsnorm_forward(norm_args *args, int64_t nthreads) {
  const int64_t grain = args->dim >= (1 << 14) ? 1 : (1 << 14) / args->dim;
  parallel_ranges(norm_rows, args, args->outer * args->inner, grain, (int)nthreads);
}
