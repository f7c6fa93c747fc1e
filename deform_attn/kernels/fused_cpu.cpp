// Fused CPU kernel for attention with the piecewise-linear position bias (deform_attn.kernels.fused).
//
// softmax(q k^T * scale + bias) v, one (sequence, head) row at a time, blocks of C queries at a
// time, with no (queries x keys) tensor in memory: the FlashAttention recipe, with the whole key
// axis of a block held at once (the keys are few, n / r). Everything a block needs is computed in
// place: the logits, the bias, the masks, the softmax and the product with the values. The
// backward pass recomputes the logits from the saved log-sum-exp. The threads take whole rows,
// or, with fewer than four rows per thread (batch 1, a few heads), spans of a row's blocks: one
// row of n = 4096 ran its forward pass 1.8x faster on 2 threads.
//
// The bias uses the regular query grid: for key j the distance u_i - w_j grows with i, so the
// table's interval of pair (i, j) changes only at the crossings r_jl = first i with
// u_i - w_j > D_l (D_l: kink l in distance units). A block walks each key's crossings inside it
// and evaluates slope * t + intercept over runs of queries that share an interval: no search and
// no gather per pair, and the loops over queries are contiguous and vectorised.
//
// Buffers are laid out (keys, queries) so that the query axis is contiguous; the small matrix
// products are written with GCC/Clang vector extensions (4 rows x 2 vectors of accumulators,
// 512-bit vectors where the CPU has AVX-512).
// No torch headers: the library compiles in seconds and is called through ctypes.

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <limits>
#include <new>
#include <thread>
#include <vector>
#ifdef _OPENMP
#include <omp.h>
#endif
#include <sys/mman.h>

namespace {

// The kernels' scratch memory. A buffer of 1 MiB or more is mapped from the system and unmapped
// when freed. Through malloc it would come from the arena of whichever OpenMP thread first
// resized it, and glibc keeps freed arena memory resident once its mmap threshold has risen past
// the buffer's size (it rises whenever a large tensor is freed): at n = 16384 a training step's
// resident peak then grew by ~40 MB of memory the step no longer used.
template <typename T> struct ReleasingAllocator {
    typedef T value_type;
    static constexpr std::size_t kMapped = std::size_t(1) << 20;
    ReleasingAllocator() = default;
    template <typename U> ReleasingAllocator(const ReleasingAllocator<U>&) {}
    T* allocate(std::size_t count) {
        const std::size_t bytes = count * sizeof(T);
        void* memory = nullptr;
        if (bytes >= kMapped) {
            memory = mmap(nullptr, bytes, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
            if (memory == MAP_FAILED) throw std::bad_alloc();
        } else if (!(memory = std::malloc(bytes ? bytes : 1))) {
            throw std::bad_alloc();
        }
        return static_cast<T*>(memory);
    }
    void deallocate(T* memory, std::size_t count) {
        if (count * sizeof(T) >= kMapped) munmap(memory, count * sizeof(T));
        else std::free(memory);
    }
    template <typename U> bool operator==(const ReleasingAllocator<U>&) const { return true; }
    template <typename U> bool operator!=(const ReleasingAllocator<U>&) const { return false; }
};
template <typename T> using Buffer = std::vector<T, ReleasingAllocator<T>>;

constexpr int64_t kBlock = 32;  // queries per block: a multiple of two vectors of either type

template <typename T> struct Simd;
template <> struct Simd<float> {
    typedef float type __attribute__((vector_size(32)));
    typedef int32_t itype __attribute__((vector_size(32)));
    static constexpr int width = 8;
};
template <> struct Simd<double> {
    typedef double type __attribute__((vector_size(32)));
    typedef int64_t itype __attribute__((vector_size(32)));
    static constexpr int width = 4;
};

template <typename T> using vec = typename Simd<T>::type;

template <typename T> inline vec<T> load(const T* p) {
    vec<T> v;
    std::memcpy(&v, p, sizeof v);
    return v;
}
template <typename T> inline void store(T* p, vec<T> v) { std::memcpy(p, &v, sizeof v); }
template <typename T> inline vec<T> splat(T x) { return vec<T>{} + x; }

// c[0] x^(N-1) + c[1] x^(N-2) + ... + c[N-1] for a float vector, by Horner's rule.
template <size_t N> inline vec<float> polynomial(vec<float> x, const float (&c)[N]) {
    vec<float> p = splat(c[0]);
    for (size_t i = 1; i < N; ++i) p = p * x + c[i];
    return p;
}

// exp(x) for a float vector: 2^k e^r with |r| <= ln2 / 2 and a degree-7 Taylor polynomial
// (relative error ~5e-9 before rounding); 0 below -87.3 (and for -inf).
inline vec<float> exp_vector(vec<float> x) {
    const vec<float> lowest = splat(-87.3f);
    const vec<float> clamped = x < lowest ? lowest : x;
    const vec<float> shifter = splat(12582912.0f);  // 1.5 * 2^23: adding it rounds to an integer
    const vec<float> k = (clamped * 1.44269504f + shifter) - shifter;
    const vec<float> r = (clamped - k * 0.693145752f) - k * 1.42860677e-6f;  // ln 2 in two parts
    const vec<float> p = polynomial(
        r, {1.0f / 5040.0f, 1.0f / 720.0f, 1.0f / 120.0f, 1.0f / 24.0f, 1.0f / 6.0f, 0.5f, 1.0f, 1.0f});
    const Simd<float>::itype exponent = (__builtin_convertvector(k, Simd<float>::itype) + 127) << 23;
    const vec<float> result = p * (vec<float>)exponent;
    return x < lowest ? splat(0.0f) : result;
}

// log(1 + a) for a float vector with a >= 0, without a division: with u = 1 + a = 2^e m and
// m in [sqrt(1/2), sqrt(2)), log u = e log 2 + x q(x), x = m - 1, where q is a degree-8 polynomial
// fitted to log(1 + x) / x on that range (least squares on Chebyshev nodes; absolute error of the
// result ~5e-8, the rounding of 1 + a included).
inline vec<float> log1p_vector(vec<float> a) {
    const vec<float> u = a + 1.0f;
    const Simd<float>::itype bits = (Simd<float>::itype)u;
    Simd<float>::itype exponent = (bits >> 23) - 127;
    vec<float> m = (vec<float>)((bits & 0x007fffff) | 0x3f800000);
    const auto high = m > 1.41421356f;
    m = high ? m * 0.5f : m;
    exponent = high ? exponent + 1 : exponent;
    const vec<float> x = m - 1.0f;
    const vec<float> q = polynomial(
        x, {8.744053150e-02f, -1.437750502e-01f, 1.494913487e-01f, -1.656067529e-01f, 1.995697187e-01f,
            -2.500215415e-01f, 3.333418350e-01f, -4.999998703e-01f, 9.999999743e-01f});
    return __builtin_convertvector(exponent, vec<float>) * 0.693147181f + x * q;
}

// double: the library functions lane by lane (float64 is the reference precision, not a fast path)
inline vec<double> exp_vector(vec<double> x) {
    vec<double> y;
    for (int lane = 0; lane < Simd<double>::width; ++lane) y[lane] = std::exp(x[lane]);
    return y;
}
inline vec<double> log1p_vector(vec<double> a) {
    vec<double> y;
    for (int lane = 0; lane < Simd<double>::width; ++lane) y[lane] = std::log1p(a[lane]);
    return y;
}

template <typename T> inline vec<T> abs_vector(vec<T> x) { return x < T(0) ? -x : x; }

// The block products' vectors: 256 bits, or 512 where the CPU has AVX-512 and the columns are a
// multiple of two such vectors (a block's 32 queries, 32 or 64 channels), for twice the lanes per
// instruction. Other code stays at 256 bits: 16 channels would pad to 32 in 512-bit columns.
template <typename T, int Bytes> struct Lanes {
    typedef T type __attribute__((vector_size(Bytes)));
    static constexpr int width = Bytes / int(sizeof(T));
};
#if defined(__AVX512F__)
constexpr int kWideBytes = 64;
#else
constexpr int kWideBytes = 32;
#endif

// out[a][x] = (accumulate ? out[a][x] : 0) + alpha * sum_l A[a][l] B[l][x] for a < rows,
// x < columns (a multiple of two vectors of V), l < depth; A is read by broadcasts, B by vectors.
template <typename T, typename V>
void multiply_lanes(int64_t rows, int64_t columns, int64_t depth, const T* A, int64_t lda, const T* B, int64_t ldb,
                    T* out, int64_t ldo, T alpha, bool accumulate) {
    typedef typename V::type v;
    constexpr int W = V::width;
    const auto ld = [](const T* p) { v x; std::memcpy(&x, p, sizeof x); return x; };
    const auto st = [](T* p, v x) { std::memcpy(p, &x, sizeof x); };
    int64_t a = 0;
    for (; a + 4 <= rows; a += 4) {
        for (int64_t x = 0; x < columns; x += 2 * W) {
            v acc[4][2] = {};
            for (int64_t l = 0; l < depth; ++l) {
                const v b0 = ld(B + l * ldb + x), b1 = ld(B + l * ldb + x + W);
                for (int row = 0; row < 4; ++row) {
                    const T weight = A[(a + row) * lda + l];
                    acc[row][0] += weight * b0;
                    acc[row][1] += weight * b1;
                }
            }
            for (int row = 0; row < 4; ++row) {
                T* target = out + (a + row) * ldo + x;
                v lo = alpha * acc[row][0], hi = alpha * acc[row][1];
                if (accumulate) lo += ld(target), hi += ld(target + W);
                st(target, lo);
                st(target + W, hi);
            }
        }
    }
    for (; a < rows; ++a) {
        for (int64_t x = 0; x < columns; x += 2 * W) {
            v acc0 = {}, acc1 = {};
            for (int64_t l = 0; l < depth; ++l) {
                const T weight = A[a * lda + l];
                acc0 += weight * ld(B + l * ldb + x);
                acc1 += weight * ld(B + l * ldb + x + W);
            }
            T* target = out + a * ldo + x;
            v lo = alpha * acc0, hi = alpha * acc1;
            if (accumulate) lo += ld(target), hi += ld(target + W);
            st(target, lo);
            st(target + W, hi);
        }
    }
}

template <typename T>
void multiply(int64_t rows, int64_t columns, int64_t depth, const T* A, int64_t lda, const T* B, int64_t ldb, T* out,
              int64_t ldo, T alpha, bool accumulate) {
    typedef Lanes<T, kWideBytes> Wide;
    if (columns % (2 * Wide::width) == 0)
        multiply_lanes<T, Wide>(rows, columns, depth, A, lda, B, ldb, out, ldo, alpha, accumulate);
    else
        multiply_lanes<T, Lanes<T, 32>>(rows, columns, depth, A, lda, B, ldb, out, ldo, alpha, accumulate);
}

// Where element (sequence b, head h, token i, channel c) of a (b, h, len, d) tensor lies: at
// b * batch + h * head + i * token + c * channel elements from its pointer. Any view works; the
// loads take a fast path where the token or the channel stride is 1.
struct Layout {
    int64_t batch, head, token, channel;
};

struct Problem {
    int64_t rows, length, cells, channels, null_keys, kinks, outputs, heads, threads;
    int64_t log_distance, has_bias;
    double step, origin, scale;
    // q, k, v, out, grad_out, grad_q, grad_k, grad_v
    Layout q_layout, k_layout, v_layout, out_layout, grad_out_layout, grad_q_layout, grad_k_layout, grad_v_layout;
    const void *q, *k, *v, *null_k, *null_v;
    const void* query_coordinates;  // (round_up(n, 32),): the queries', then the last one repeated
    const void* key_coordinates;    // (rows, m)
    const double* thresholds;       // (kinks,) the kinks in distance units
    const void *slopes, *intercepts;  // (kinks + 1, outputs)
    const uint8_t* key_padding;       // (rows, m), 1: the key does not exist; or null
    const int64_t* visible_from;      // (rows, m); or null
    void *out, *lse;                  // (rows, n, d) in out_layout, (rows, n); the backward reads lse only
    const void* grad_out;             // (rows, n, d) in grad_out_layout
    void *grad_q, *grad_k, *grad_v;   // in their layouts
    void *grad_null_k, *grad_null_v;  // (rows, e, d) like null_k, null_v
    void *grad_key_coordinates, *grad_slopes, *grad_intercepts;  // (rows, m), (rows, kinks + 1) x 2
};

inline int64_t round_up(int64_t x, int64_t multiple) { return (x + multiple - 1) / multiple * multiple; }

// The first element of row `row` (sequence row / heads, head row % heads) of a tensor in `layout`.
template <typename T> inline T* row_pointer(const void* base, const Layout& layout, int64_t row, int64_t heads) {
    return const_cast<T*>(static_cast<const T*>(base)) + (row / heads) * layout.batch + (row % heads) * layout.head;
}

// Calls work(item, thread index) for item < items on `threads` threads (this one included).
// Compiled with -fopenmp, the library shares the process's OpenMP runtime with PyTorch (the same
// libgomp.so.1 soname), so its threads are PyTorch's: separate std::threads would compete with
// PyTorch's OpenMP workers, which keep spinning for a while after each of its parallel regions.
template <typename Work> void parallel_for(int64_t items, int64_t threads, Work work) {
    threads = std::max<int64_t>(1, std::min(threads, items));
#ifdef _OPENMP
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads)
    for (int64_t item = 0; item < items; ++item) work(item, int64_t(omp_get_thread_num()));
#else
    std::atomic<int64_t> next{0};
    auto worker = [&](int64_t index) {
        for (int64_t item = next.fetch_add(1); item < items; item = next.fetch_add(1)) work(item, index);
    };
    std::vector<std::thread> pool;
    for (int64_t index = 1; index < threads; ++index) pool.emplace_back(worker, index);
    worker(0);
    for (auto& thread : pool) thread.join();
#endif
}

// One row's m keys (or values) in `layout` -> (m, d) rows.
template <typename T> void load_keys(const T* source, const Layout& layout, int64_t m, int64_t d, T* target) {
    if (layout.channel == 1 && layout.token == d) {
        std::memcpy(target, source, sizeof(T) * m * d);
        return;
    }
    for (int64_t j = 0; j < m; ++j)
        for (int64_t c = 0; c < d; ++c) target[j * d + c] = source[j * layout.token + c * layout.channel];
}

// One (sequence, head) row's keys as the blocks use them.
template <typename T> struct RowKeys {
    int64_t total = 0;          // m + null keys
    Buffer<T> keys, values;  // (total, d)
    Buffer<T> keys_t, values_t;  // (d, total)
    const T* coordinates;       // (m,)
    const uint8_t* padding;     // (m,) or null
    const int64_t* visible;     // (m,) or null
    int64_t column;             // this row's column of the table
    Buffer<T> slopes, intercepts;  // (kinks + 1,) that column

    // Fills the buffers for `row`, reusing their memory: one RowKeys per thread serves many rows.
    void prepare(const Problem& p, int64_t row) {
        total = p.cells + p.null_keys;
        const int64_t m = p.cells, e = p.null_keys, d = p.channels;
        keys.resize(total * d);
        values.resize(total * d);
        load_keys(row_pointer<T>(p.k, p.k_layout, row, p.heads), p.k_layout, m, d, keys.data());
        load_keys(row_pointer<T>(p.v, p.v_layout, row, p.heads), p.v_layout, m, d, values.data());
        if (e) {
            std::memcpy(keys.data() + m * d, static_cast<const T*>(p.null_k) + row * e * d, sizeof(T) * e * d);
            std::memcpy(values.data() + m * d, static_cast<const T*>(p.null_v) + row * e * d, sizeof(T) * e * d);
        }
        keys_t.resize(d * total);
        values_t.resize(d * total);
        for (int64_t j = 0; j < total; ++j)
            for (int64_t c = 0; c < d; ++c) {
                keys_t[c * total + j] = keys[j * d + c];
                values_t[c * total + j] = values[j * d + c];
            }
        coordinates = static_cast<const T*>(p.key_coordinates) + row * m;
        padding = p.key_padding ? p.key_padding + row * m : nullptr;
        visible = p.visible_from ? p.visible_from + row * m : nullptr;
        column = (row % p.heads) % p.outputs;
        if (p.has_bias) {
            slopes.resize(p.kinks + 1);
            intercepts.resize(p.kinks + 1);
            for (int64_t l = 0; l <= p.kinks; ++l) {
                slopes[l] = static_cast<const T*>(p.slopes)[l * p.outputs + column];
                intercepts[l] = static_cast<const T*>(p.intercepts)[l * p.outputs + column];
            }
        }
    }
};

// A stretch of queries [first, stop) of a block over which key `key` keeps one interval of the
// table (`interval`), or, with interval == kDense, a stretch whose intervals are listed per query.
struct Run {
    int32_t key, interval, first, stop;
};
constexpr int32_t kDense = -1;
// a key that crosses more kinks than this inside a block gets per-query intervals instead of runs
constexpr int64_t kMostRuns = 4;

// Every key's kink crossings in one row, and how far the row's blocks have passed them.
struct RowCrossings {
    int64_t kinks = 0;
    Buffer<int32_t> crossings;  // (m, kinks): first query past each kink, nondecreasing per key
    Buffer<int64_t> passed;     // (m,): crossings at or before the current block's start

    // crossing = clamp(floor((w + D_l - origin) / step) + 1, 0, n), as kink_crossings (with a
    // product by 1 / step: a quotient within rounding of an integer may land on either side,
    // which moves a pair across a kink where the bias is continuous)
    Buffer<double> shifted;     // (kinks,) D_l - origin

    // Computes the crossings of one row, reusing the buffers (one RowCrossings per thread).
    template <typename T> void prepare(const Problem& p, const T* coordinates) {
        kinks = p.kinks;
        if (!p.has_bias) return;
        crossings.resize(p.cells * kinks);
        passed.assign(p.cells, 0);
        shifted.resize(kinks);
        for (int64_t l = 0; l < kinks; ++l) shifted[l] = p.thresholds[l] - p.origin;
        const double inverse_step = 1.0 / p.step, length = double(p.length);
        const double* shift = shifted.data();
        const int32_t n = int32_t(p.length);
        typedef int32_t int4 __attribute__((vector_size(16)));
        const vec<double> top = splat(length);
        for (int64_t j = 0; j < p.cells; ++j) {
            const double w = coordinates[j];
            int32_t* row = crossings.data() + j * kinks;
            // four kinks at a time: floor(b) + 1 with b = min(x, n) is trunc(b) + 1 for b >= 0 and
            // 0 for b < 0 (b below -1 clamps to -1), so a truncating conversion gives the floor
            int64_t l = 0;
            for (; l + 4 <= kinks; l += 4) {
                vec<double> boundary = (load(shift + l) + w) * inverse_step;
                boundary = boundary > top ? top : boundary;
                boundary = boundary < 0.0 ? splat(-1.0) : boundary;
                int4 crossing = __builtin_convertvector(boundary, int4) + 1;
                crossing = crossing > n ? int4{} + n : crossing;
                std::memcpy(row + l, &crossing, sizeof crossing);
            }
            for (; l < kinks; ++l) {
                const double boundary = std::min(std::max((w + shift[l]) * inverse_step, -1.0), length);
                row[l] = static_cast<int32_t>(std::min(std::max(std::floor(boundary) + 1.0, 0.0), length));
            }
        }
    }

    // Key j's intervals over the block [start, stop): appends its runs to `runs`, or one kDense
    // run with each query's interval in intervals_out[0, stop - start).
    void block(int32_t j, int64_t start, int64_t stop, Buffer<Run>& runs, int32_t* intervals_out) {
        const int32_t* row = crossings.data() + j * kinks;
        int64_t first_kink = passed[j];
        while (first_kink < kinks && row[first_kink] <= start) ++first_kink;  // the interval at `start`
        int64_t last_kink = first_kink;
        while (last_kink < kinks && row[last_kink] < stop) ++last_kink;  // crossed inside the block
        passed[j] = last_kink;
        if (last_kink - first_kink <= kMostRuns) {
            int64_t first = start;
            for (int64_t l = first_kink; l <= last_kink; ++l) {
                const int64_t end = l < last_kink ? row[l] : stop;
                if (end > first) {
                    runs.push_back(Run{j, int32_t(l), int32_t(first), int32_t(end)});
                    first = end;
                }
            }
            return;
        }
        // per query: the interval at `start` plus the crossings at or before the query
        int32_t counts[kBlock] = {};
        for (int64_t l = first_kink; l < last_kink; ++l) ++counts[row[l] - start];
        int32_t interval = int32_t(first_kink);
        for (int64_t i = 0; i < stop - start; ++i) intervals_out[i] = interval += counts[i];
        runs.push_back(Run{j, kDense, int32_t(start), int32_t(stop)});
    }
};

// t = sign(d) log(1 + |d|) (or d) of d = u - w for a vector of query coordinates u.
template <typename T> inline vec<T> distance_input(const Problem& p, vec<T> u, T w) {
    const vec<T> d = u - w;
    if (!p.log_distance) return d;
    const vec<T> log_magnitude = log1p_vector(abs_vector<T>(d));
    return d < T(0) ? -log_magnitude : log_magnitude;
}

// t of d = u_i - w for the queries [start, stop) of the block from query `start`, written to
// t_out[i - start]; with derivative_out, also dt/dd = 1 / (1 + |d|) (1 without the log). Whole
// vectors: u holds at least round_up(n, kBlock) coordinates and the buffers kBlock values.
template <typename T>
void distance_inputs(const Problem& p, const T* u, T w, int64_t start, int64_t stop, T* t_out, T* derivative_out) {
    for (int64_t i = start; i < stop; i += Simd<T>::width) {
        const vec<T> coordinates = load(u + i);
        store(t_out + (i - start), distance_input<T>(p, coordinates, w));
        if (derivative_out)
            store(derivative_out + (i - start),
                  p.log_distance ? T(1) / (abs_vector<T>(coordinates - w) + T(1)) : splat(T(1)));
    }
}

// Logits of the block's queries [start, start + width) against every key of the row:
// scores (total, C) = q k^T * scale + bias, -inf where a key is padded or not yet visible, in
// the first `columns` columns (width rounded up to whole pairs of vectors; the rest is stale).
// Records the block's runs in `runs` (with per-query intervals in intervals_block (m, C) for
// dense keys), each key's t in t_block (m, C) and, unless null, dt/dd in derivative_block (m, C).
template <typename T>
void block_scores(const Problem& p, const RowKeys<T>& row_keys, RowCrossings& crossings, const T* q_t,
                  int64_t start, int64_t width, int64_t columns, T* scores, T* t_block, T* derivative_block,
                  int32_t* intervals_block, Buffer<Run>& runs) {
    const int64_t total = row_keys.total, d = p.channels;
    multiply<T>(total, columns, d, row_keys.keys.data(), d, q_t, kBlock, scores, kBlock, T(p.scale), false);
    const T* u = static_cast<const T*>(p.query_coordinates);
    const T* slopes = row_keys.slopes.data();
    const T* intercepts = row_keys.intercepts.data();
    const T infinity = std::numeric_limits<T>::infinity();
    runs.clear();
    for (int64_t j = 0; j < p.cells; ++j) {
        T* row = scores + j * kBlock;
        if (row_keys.padding && row_keys.padding[j]) {
            std::fill(row, row + columns, -infinity);
            continue;
        }
        if (p.has_bias) {
            const T w = row_keys.coordinates[j];
            const size_t first_run = runs.size();
            int32_t* intervals = intervals_block + j * kBlock;
            crossings.block(int32_t(j), start, start + width, runs, intervals);
            T local_t[kBlock];
            T* t = t_block ? t_block + j * kBlock : local_t;
            if (runs.size() == first_run + 1 && runs.back().interval != kDense) {
                // one interval over the whole block (most keys): t, bias and logit in one pass, the
                // same in the forward and the backward pass, whose recomputed logits must equal the
                // forward's to the last bit; t and dt/dd kept for the backward
                const T slope = slopes[runs.back().interval], intercept = intercepts[runs.back().interval];
                for (int64_t i = 0; i < width; i += Simd<T>::width) {
                    const vec<T> coordinates = load(u + start + i), t_vector = distance_input<T>(p, coordinates, w);
                    store(row + i, load(row + i) + (slope * t_vector + intercept));
                    if (t_block) store(t + i, t_vector);
                    if (derivative_block)
                        store(derivative_block + j * kBlock + i,
                              p.log_distance ? T(1) / (abs_vector<T>(coordinates - w) + T(1)) : splat(T(1)));
                }
            } else {
                distance_inputs<T>(p, u, w, start, start + width, t,
                                   derivative_block ? derivative_block + j * kBlock : nullptr);
                for (size_t index = first_run; index < runs.size(); ++index) {
                    const Run& run = runs[index];
                    if (run.interval == kDense) {
                        for (int64_t i = 0; i < width; ++i) row[i] += slopes[intervals[i]] * t[i] + intercepts[intervals[i]];
                        continue;
                    }
                    const T slope = slopes[run.interval], intercept = intercepts[run.interval];
                    for (int64_t i = run.first - start; i < run.stop - start; ++i) row[i] += slope * t[i] + intercept;
                }
            }
        }
        if (row_keys.visible) {
            const int64_t hidden_until = std::min(row_keys.visible[j], start + width);
            for (int64_t i = 0; i < hidden_until - start; ++i) row[i] = -infinity;
        }
    }
}

// Columns a block of `width` queries computes: whole pairs of vectors, so that a short last block
// (8 queries of n = 40) costs 16 columns instead of 32.
template <typename T> inline int64_t block_columns(int64_t width) { return round_up(width, 2 * Simd<T>::width); }

// Queries [start, start + width) of one row of `source` (in `layout`) -> (d_padded, C),
// transposed and zero-padded.
template <typename T>
void load_columns(const T* source, const Layout& layout, int64_t start, int64_t width, int64_t d, T* target) {
    std::fill(target, target + round_up(d, 2 * Simd<T>::width) * kBlock, T(0));
    if (layout.token == 1) {
        for (int64_t c = 0; c < d; ++c)
            std::memcpy(target + c * kBlock, source + c * layout.channel + start, sizeof(T) * width);
    } else {
        for (int64_t i = 0; i < width; ++i) {
            const T* token = source + (start + i) * layout.token;
            for (int64_t c = 0; c < d; ++c) target[c * kBlock + i] = token[c * layout.channel];
        }
    }
}

// The same queries -> (C, d_padded) rows, zero-padded.
template <typename T>
void load_rows(const T* source, const Layout& layout, int64_t start, int64_t width, int64_t d, int64_t d_padded,
               T* target) {
    std::fill(target, target + kBlock * d_padded, T(0));
    for (int64_t i = 0; i < width; ++i) {
        const T* token = source + (start + i) * layout.token;
        for (int64_t c = 0; c < d; ++c) target[i * d_padded + c] = token[c * layout.channel];
    }
}

// (d, C) columns times a per-query factor -> queries [start, start + width) of one row of
// `target` (in `layout`).
template <typename T>
void store_columns(const T* columns, const T* factor, const Layout& layout, int64_t start, int64_t width, int64_t d,
                   T* target) {
    if (layout.token == 1) {
        for (int64_t c = 0; c < d; ++c)
            for (int64_t i = 0; i < width; ++i)
                target[c * layout.channel + start + i] = columns[c * kBlock + i] * (factor ? factor[i] : T(1));
    } else {
        for (int64_t i = 0; i < width; ++i) {
            T* token = target + (start + i) * layout.token;
            const T scale = factor ? factor[i] : T(1);
            for (int64_t c = 0; c < d; ++c) token[c * layout.channel] = columns[c * kBlock + i] * scale;
        }
    }
}

// Spans of blocks per row that the threads take as items: 1 (whole rows) when there are at
// least four rows per thread; otherwise enough for four items per thread, of at least four
// blocks each. A block's output does not depend on the span it runs in (its runs start from
// the crossings at its first query), so the forward pass's result keeps every bit. In the
// backward pass a row's key, value and table gradients become sums of per-span sums (added in
// span order, whichever thread ran them): where rows are split, the thread count moves their
// last bits, as it does a parallel reduction's in torch.
inline int64_t row_spans(int64_t rows, int64_t blocks, int64_t threads) {
    const int64_t wanted = 4 * std::max<int64_t>(1, threads);
    if (rows >= wanted) return 1;
    return std::max<int64_t>(1, std::min((wanted + rows - 1) / rows, blocks / 4));
}

// Item `item` of rows * spans: its row and its blocks [first, stop).
struct Span {
    int64_t row, first, stop;
};
inline Span span_of(int64_t item, int64_t spans, int64_t blocks) {
    const int64_t span = item % spans;
    return Span{item / spans, span * blocks / spans, (span + 1) * blocks / spans};
}

// The row whose keys and crossings a thread's scratch holds, and the block its last span there
// stopped at. enter() records a span and says whether the row must be prepared: another row, or
// an earlier span of this one (the crossings walk forward only).
struct RowCursor {
    int64_t row = -1, next_block = 0;
    bool enter(const Span& span) {
        const bool fresh = span.row != row || span.first < next_block;
        row = span.row;
        next_block = span.stop;
        return fresh;
    }
};

template <typename T> void forward(const Problem& p) {
    const int64_t n = p.length, d = p.channels, total = p.cells + p.null_keys;
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    const int64_t d_padded = round_up(d, 2 * Simd<T>::width);
    constexpr int W = Simd<T>::width;
    struct Scratch {
        Buffer<T> q_t, scores, out_t;
        Buffer<int32_t> intervals;
        Buffer<Run> runs;
        RowKeys<T> row_keys;
        RowCrossings crossings;
        RowCursor cursor;
    };
    std::vector<Scratch> scratch(std::max<int64_t>(1, p.threads));
    // items are spans of a row's blocks (whole rows unless rows are few): a thread prepares a
    // row's keys and crossings once for consecutive spans of it, then runs its blocks in order
    const int64_t spans = row_spans(p.rows, blocks, p.threads);
    parallel_for(p.rows * spans, p.threads, [&](int64_t item, int64_t thread) {
        Scratch& s = scratch[thread];
        const Span span = span_of(item, spans, blocks);
        const int64_t row = span.row;
        s.q_t.resize(d_padded * kBlock);
        s.scores.resize(total * kBlock);
        s.out_t.resize(d_padded * kBlock);
        if (s.cursor.enter(span)) {
            s.row_keys.prepare(p, row);
            s.crossings.prepare(p, s.row_keys.coordinates);
        }
        const RowKeys<T>& row_keys = s.row_keys;
        RowCrossings& crossings = s.crossings;
        s.intervals.resize(p.cells * kBlock);
        for (int64_t block = span.first; block < span.stop; ++block) {
            const int64_t start = block * kBlock, width = std::min(kBlock, n - start);
            const int64_t columns = block_columns<T>(width);
            load_columns(row_pointer<T>(p.q, p.q_layout, row, p.heads), p.q_layout, start, width, d, s.q_t.data());
            block_scores<T>(p, row_keys, crossings, s.q_t.data(), start, width, columns, s.scores.data(), nullptr,
                            nullptr, s.intervals.data(), s.runs);
            // softmax over the keys, per query (vectors along the queries)
            T maximum[kBlock], sum[kBlock];
            for (int64_t i = 0; i < columns; i += W) {
                vec<T> peak = splat(-std::numeric_limits<T>::infinity());
                for (int64_t j = 0; j < total; ++j) {
                    const vec<T> x = load(s.scores.data() + j * kBlock + i);
                    peak = x > peak ? x : peak;
                }
                // a query that sees no key: weights 0, output 0, log-sum-exp -inf
                const vec<T> shift = peak == -std::numeric_limits<T>::infinity() ? splat(T(0)) : peak;
                vec<T> total_weight = {};
                for (int64_t j = 0; j < total; ++j) {
                    T* x = s.scores.data() + j * kBlock + i;
                    const vec<T> weight = exp_vector(load(x) - shift);
                    store(x, weight);
                    total_weight += weight;
                }
                store(maximum + i, peak);
                store(sum + i, total_weight);
            }
            multiply<T>(d, columns, total, row_keys.values_t.data(), total, s.scores.data(), kBlock, s.out_t.data(),
                        kBlock, T(1), false);
            T* lse = static_cast<T*>(p.lse) + row * n + start;
            T normaliser[kBlock];
            for (int64_t i = 0; i < width; ++i) {
                normaliser[i] = sum[i] > 0 ? T(1) / sum[i] : T(0);
                lse[i] = sum[i] > 0 ? maximum[i] + std::log(sum[i]) : -std::numeric_limits<T>::infinity();
            }
            store_columns(s.out_t.data(), normaliser, p.out_layout, start, width, d,
                          row_pointer<T>(p.out, p.out_layout, row, p.heads));
        }
    });
}

template <typename T> void backward(const Problem& p) {
    const int64_t n = p.length, m = p.cells, e = p.null_keys, d = p.channels, total = m + e;
    const int64_t blocks = (n + kBlock - 1) / kBlock;
    const int64_t d_padded = round_up(d, 2 * Simd<T>::width);
    const int64_t table_rows = p.kinks + 1;
    struct Scratch {
        RowKeys<T> row_keys;
        RowCrossings crossings;
        Buffer<Run> runs;
        Buffer<int32_t> intervals;
        Buffer<T> q_t, q_rows, grad_out_t, grad_out_rows, weights, grad_scores, grad_q_t, t, derivative;
        Buffer<T> grad_keys, grad_values, grad_w, grad_slope, grad_intercept;
        RowCursor cursor;
    };
    std::vector<Scratch> scratch(std::max<int64_t>(1, p.threads));
    // writes a row's gradients of its keys, values, null keys and values, key coordinates and
    // table column
    auto write_row = [&](int64_t row, const T* grad_keys, const T* grad_values, const T* grad_w,
                         const T* grad_slope, const T* grad_intercept) {
        T* grad_k = row_pointer<T>(p.grad_k, p.grad_k_layout, row, p.heads);
        T* grad_v = row_pointer<T>(p.grad_v, p.grad_v_layout, row, p.heads);
        const Layout &k_layout = p.grad_k_layout, &v_layout = p.grad_v_layout;
        for (int64_t j = 0; j < total; ++j)
            for (int64_t c = 0; c < d; ++c) {
                T* k_target = j >= m ? static_cast<T*>(p.grad_null_k) + (row * e + j - m) * d + c
                                     : grad_k + j * k_layout.token + c * k_layout.channel;
                T* v_target = j >= m ? static_cast<T*>(p.grad_null_v) + (row * e + j - m) * d + c
                                     : grad_v + j * v_layout.token + c * v_layout.channel;
                *k_target = grad_keys[j * d_padded + c];
                *v_target = grad_values[j * d_padded + c];
            }
        if (p.has_bias) {
            std::memcpy(static_cast<T*>(p.grad_key_coordinates) + row * m, grad_w, sizeof(T) * m);
            std::memcpy(static_cast<T*>(p.grad_slopes) + row * table_rows, grad_slope, sizeof(T) * table_rows);
            std::memcpy(static_cast<T*>(p.grad_intercepts) + row * table_rows, grad_intercept, sizeof(T) * table_rows);
        }
    };
    // split rows (row_spans): each span's partial sums wait in its slot, then each row adds its
    // spans' in span order
    const int64_t spans = row_spans(p.rows, blocks, p.threads);
    const int64_t keys_size = total * d_padded, slot = 2 * keys_size + m + 2 * table_rows;
    Buffer<T> partials(spans > 1 ? p.rows * spans * slot : 0);
    parallel_for(p.rows * spans, p.threads, [&](int64_t item, int64_t thread) {
        Scratch& s = scratch[thread];
        const Span span = span_of(item, spans, blocks);
        const int64_t row = span.row;
        if (s.cursor.enter(span)) {
            s.row_keys.prepare(p, row);
            s.crossings.prepare(p, s.row_keys.coordinates);
        }
        const RowKeys<T>& row_keys = s.row_keys;
        RowCrossings& crossings = s.crossings;
        Buffer<Run>& runs = s.runs;
        s.intervals.resize(m * kBlock);
        for (auto* buffer : {&s.q_t, &s.grad_out_t, &s.grad_q_t}) buffer->resize(d_padded * kBlock);
        for (auto* buffer : {&s.q_rows, &s.grad_out_rows}) buffer->resize(kBlock * d_padded);
        for (auto* buffer : {&s.weights, &s.grad_scores}) buffer->resize(total * kBlock);
        for (auto* buffer : {&s.t, &s.derivative}) buffer->resize(m * kBlock);
        s.grad_keys.assign(total * d_padded, T(0));
        s.grad_values.assign(total * d_padded, T(0));
        s.grad_w.assign(m, T(0));
        s.grad_slope.assign(table_rows, T(0));
        s.grad_intercept.assign(table_rows, T(0));
        Buffer<int32_t>& intervals = s.intervals;
        Buffer<T>&q_t = s.q_t, &q_rows = s.q_rows, &grad_out_t = s.grad_out_t, &grad_out_rows = s.grad_out_rows;
        Buffer<T>&weights = s.weights, &grad_scores = s.grad_scores, &grad_q_t = s.grad_q_t, &t = s.t;
        Buffer<T>&derivative = s.derivative, &grad_keys = s.grad_keys, &grad_values = s.grad_values;
        Buffer<T>&grad_w = s.grad_w, &grad_slope = s.grad_slope, &grad_intercept = s.grad_intercept;
        const T* lse = static_cast<const T*>(p.lse) + row * n;
        for (int64_t block = span.first; block < span.stop; ++block) {
            const int64_t start = block * kBlock, width = std::min(kBlock, n - start);
            const int64_t columns = block_columns<T>(width);
            const T* q = row_pointer<T>(p.q, p.q_layout, row, p.heads);
            const T* grad_out = row_pointer<T>(p.grad_out, p.grad_out_layout, row, p.heads);
            load_columns(q, p.q_layout, start, width, d, q_t.data());
            load_columns(grad_out, p.grad_out_layout, start, width, d, grad_out_t.data());
            load_rows(q, p.q_layout, start, width, d, d_padded, q_rows.data());
            load_rows(grad_out, p.grad_out_layout, start, width, d, d_padded, grad_out_rows.data());
            block_scores<T>(p, row_keys, crossings, q_t.data(), start, width, columns, weights.data(), t.data(),
                            derivative.data(), intervals.data(), runs);
            // weights = exp(logit - lse); a shift of +inf gives 0 past the block's end and for a
            // query that sees no key (lse -inf)
            T shift[kBlock];
            for (int64_t i = 0; i < kBlock; ++i)
                shift[i] = i < width && lse[start + i] > -std::numeric_limits<T>::infinity()
                               ? lse[start + i] : std::numeric_limits<T>::infinity();
            for (int64_t j = 0; j < total; ++j)
                for (int64_t i = 0; i < columns; i += Simd<T>::width) {
                    T* x = weights.data() + j * kBlock + i;
                    store(x, exp_vector(load(x) - load(shift + i)));
                }
            // d logits = P * (dP - D), dP = dO v^T, D = rowsum(dO * O) = sum_j P_j dP_j, taken in the
            // second form: from the same dP, so that a query whose whole weight sits on one key gets
            // exactly zero logit gradients (a causal query that sees only the null key)
            multiply<T>(total, columns, d, row_keys.values.data(), d, grad_out_t.data(), kBlock, grad_scores.data(),
                        kBlock, T(1), false);
            for (int64_t i = 0; i < columns; i += Simd<T>::width) {
                vec<T> weighted = {};
                for (int64_t j = 0; j < total; ++j)
                    weighted += load(weights.data() + j * kBlock + i) * load(grad_scores.data() + j * kBlock + i);
                for (int64_t j = 0; j < total; ++j) {
                    T* g = grad_scores.data() + j * kBlock + i;
                    store(g, load(weights.data() + j * kBlock + i) * (load(g) - weighted));
                }
            }
            // grad q = scale * dS^T k; grad k += scale * dS q; grad v += P dO
            multiply<T>(d, columns, total, row_keys.keys_t.data(), total, grad_scores.data(), kBlock, grad_q_t.data(),
                        kBlock, T(p.scale), false);
            store_columns(grad_q_t.data(), static_cast<const T*>(nullptr), p.grad_q_layout, start, width, d,
                          row_pointer<T>(p.grad_q, p.grad_q_layout, row, p.heads));
            multiply<T>(total, d_padded, width, grad_scores.data(), kBlock, q_rows.data(), d_padded, grad_keys.data(),
                        d_padded, T(p.scale), true);
            multiply<T>(total, d_padded, width, weights.data(), kBlock, grad_out_rows.data(), d_padded,
                        grad_values.data(), d_padded, T(1), true);
            if (!p.has_bias) continue;
            // the bias's gradients, run by run: d bias / d w = -slope dt/dd, with dt/dd = 1 / (1 + |d|)
            // for the log distance; the table's, sums of g t and of g over each run's interval
            constexpr int W = Simd<T>::width;
            vec<T> lane;
            for (int index = 0; index < W; ++index) lane[index] = T(index);
            const T* slopes = row_keys.slopes.data();
            for (const Run& run : runs) {  // masked vector sums over the run's columns
                const int64_t offset = run.key * kBlock, first = run.first - start, stop = run.stop - start;
                if (run.interval == kDense) {  // per query: scatter into its interval
                    const int32_t* interval = intervals.data() + offset;
                    T total_gd = 0;
                    for (int64_t i = first; i < stop; ++i) {
                        const T g = grad_scores[offset + i];
                        grad_intercept[interval[i]] += g;
                        grad_slope[interval[i]] += g * t[offset + i];
                        total_gd += slopes[interval[i]] * g * derivative[offset + i];
                    }
                    grad_w[run.key] -= total_gd;
                    continue;
                }
                vec<T> sum_g = {}, sum_gt = {}, sum_gd = {};
                for (int64_t i = first / W * W; i < stop; i += W) {
                    const vec<T> column = lane + T(i);
                    const auto inside = (column >= T(first)) & (column < T(stop));
                    const vec<T> g = inside ? load(grad_scores.data() + offset + i) : splat(T(0));
                    sum_g += g;
                    sum_gt += g * load(t.data() + offset + i);
                    sum_gd += g * load(derivative.data() + offset + i);
                }
                T total_g = 0, total_gt = 0, total_gd = 0;
                for (int index = 0; index < W; ++index) {
                    total_g += sum_g[index];
                    total_gt += sum_gt[index];
                    total_gd += sum_gd[index];
                }
                grad_intercept[run.interval] += total_g;
                grad_slope[run.interval] += total_gt;
                grad_w[run.key] -= slopes[run.interval] * total_gd;
            }
        }
        if (spans == 1) {
            write_row(row, grad_keys.data(), grad_values.data(), grad_w.data(), grad_slope.data(),
                      grad_intercept.data());
            return;
        }
        T* target = partials.data() + item * slot;
        std::memcpy(target, grad_keys.data(), sizeof(T) * keys_size);
        std::memcpy(target + keys_size, grad_values.data(), sizeof(T) * keys_size);
        std::memcpy(target + 2 * keys_size, grad_w.data(), sizeof(T) * m);
        std::memcpy(target + 2 * keys_size + m, grad_slope.data(), sizeof(T) * table_rows);
        std::memcpy(target + 2 * keys_size + m + table_rows, grad_intercept.data(), sizeof(T) * table_rows);
    });
    if (spans == 1) return;
    parallel_for(p.rows, p.threads, [&](int64_t row, int64_t) {
        T* sums = partials.data() + row * spans * slot;
        for (int64_t span = 1; span < spans; ++span) {
            const T* next = sums + span * slot;
            for (int64_t i = 0; i < slot; ++i) sums[i] += next[i];
        }
        write_row(row, sums, sums + keys_size, sums + 2 * keys_size, sums + 2 * keys_size + m,
                  sums + 2 * keys_size + m + table_rows);
    });
}

// The offset network's strided depthwise convolution (deform_attn.offsets): for each row r, a
// (sequence, channel) pair with channel c = r % channels,
//     out[r][j] = bias[c] + sum_t weight[c][t] x[r][j * stride + t - left]
// over the taps t whose token lies in [0, n) (the rest is zero padding). A row is a few dozen to
// a few thousand tokens and a few taps, far too little work for one tensor operation per tap:
// here the rows are dealt out in contiguous chunks and the loops are plain.
struct DepthwiseProblem {
    int64_t rows, channels, length, cells, kernel, stride, left, threads;
    const void *x, *weight, *bias;           // (rows, n), (channels, kernel), (channels,)
    void* out;                               // (rows, m)
    const void* grad_out;                    // (rows, m)
    void *grad_x, *grad_weight, *grad_bias;  // (rows, n), (channels, kernel), (channels,); any may be null
};

// chunks of rows: a few per thread, so that an uneven chunk does not hold the others up
inline int64_t depthwise_chunks(const DepthwiseProblem& p) {
    return std::max<int64_t>(1, std::min<int64_t>(p.rows, 4 * std::max<int64_t>(1, p.threads)));
}

// Per tap t, the cells [first, stop) whose token j * stride + t - left lies in [0, n): the same
// for every row, so computed once per call (2 * kernel values).
inline std::vector<int64_t> tap_cells(const DepthwiseProblem& p) {
    std::vector<int64_t> bounds(2 * p.kernel);
    for (int64_t t = 0; t < p.kernel; ++t) {
        const int64_t before = p.left - t;  // cell j reads token j * stride - before
        const int64_t first = before > 0 ? (before + p.stride - 1) / p.stride : 0;
        const int64_t stop = p.length - 1 + before < 0 ? 0 : std::min(p.cells, (p.length - 1 + before) / p.stride + 1);
        bounds[2 * t] = first;
        bounds[2 * t + 1] = std::max(stop, first);
    }
    return bounds;
}

// The cells every tap reads inside the sequence, [first, stop): there no tap needs a bounds test.
inline std::pair<int64_t, int64_t> interior_cells(const std::vector<int64_t>& bounds, int64_t kernel) {
    int64_t first = 0, stop = std::numeric_limits<int64_t>::max();
    for (int64_t t = 0; t < kernel; ++t) {
        first = std::max(first, bounds[2 * t]);
        stop = std::min(stop, bounds[2 * t + 1]);
    }
    return {first, std::max(first, stop)};
}

// One row's convolution: out_row[j] = b + sum_t w[t] x_row[j * stride + t - left] over the taps
// inside the sequence.
template <typename T>
inline void depthwise_row(const DepthwiseProblem& p, const std::vector<int64_t>& bounds,
                          std::pair<int64_t, int64_t> interior, const T* __restrict x_row, const T* __restrict w,
                          T b, T* __restrict out_row) {
    for (int64_t j = 0; j < p.cells; ++j) {
        const T* window = x_row + j * p.stride - p.left;  // token of tap t: window[t]
        T total = b;
        if (j >= interior.first && j < interior.second) {
            for (int64_t t = 0; t < p.kernel; ++t) total += w[t] * window[t];
        } else {
            for (int64_t t = 0; t < p.kernel; ++t)
                if (j >= bounds[2 * t] && j < bounds[2 * t + 1]) total += w[t] * window[t];
        }
        out_row[j] = total;
    }
}

// One row's gradients given the gradient g of its output: the input's row (overwritten), and the
// weight's and bias's sums added to weight_sums (kernel,) and *bias_sum; any may be null.
template <typename T>
inline void depthwise_row_backward(const DepthwiseProblem& p, const std::vector<int64_t>& bounds,
                                   std::pair<int64_t, int64_t> interior, const T* __restrict x_row,
                                   const T* __restrict w, const T* __restrict g, T* __restrict gx,
                                   T* __restrict weight_sums, T* bias_sum) {
    if (bias_sum) {
        T total = 0;
        for (int64_t j = 0; j < p.cells; ++j) total += g[j];
        *bias_sum += total;
    }
    // Cell by cell, each cell adding its window's share to the input's gradient and g_j times its
    // window to the taps' sums, one accumulator per tap: (tap by tap, each dot product over the
    // cells was one chain of dependent additions, 16% of the offset network's backward pass)
    if (gx) std::fill(gx, gx + p.length, T(0));
    if (!gx && !weight_sums) return;
    for (int64_t j = 0; j < p.cells; ++j) {
        const int64_t first_token = j * p.stride - p.left;  // token of tap t: first_token + t
        const T gj = g[j];
        const bool inside = j >= interior.first && j < interior.second;
        for (int64_t t = 0; t < p.kernel; ++t) {
            if (!inside && !(j >= bounds[2 * t] && j < bounds[2 * t + 1])) continue;
            if (gx) gx[first_token + t] += gj * w[t];
            if (weight_sums) weight_sums[t] += gj * x_row[first_token + t];
        }
    }
}

// Cell by cell, the taps summed in a register: inside the interior every tap is in range, and
// the few border cells take the per-tap bounds. (Tap by tap over the cells, each partial sum went
// through memory once per tap: 3x slower on the MNIST-1D model's 4096 rows of 40 tokens.)
template <typename T> void depthwise_forward(const DepthwiseProblem& p) {
    const T* x = static_cast<const T*>(p.x);
    const T* weight = static_cast<const T*>(p.weight);
    const T* bias = static_cast<const T*>(p.bias);
    T* out = static_cast<T*>(p.out);
    const int64_t chunks = depthwise_chunks(p);
    const std::vector<int64_t> bounds = tap_cells(p);
    const auto interior = interior_cells(bounds, p.kernel);
    parallel_for(chunks, p.threads, [&](int64_t chunk, int64_t) {
        for (int64_t row = chunk * p.rows / chunks; row < (chunk + 1) * p.rows / chunks; ++row) {
            const int64_t c = row % p.channels;
            depthwise_row(p, bounds, interior, x + row * p.length, weight + c * p.kernel, bias[c], out + row * p.cells);
        }
    });
}

// Gradients of depthwise_forward. The weight's and bias's are summed per chunk into their own
// buffers, then over the chunks in order: the same result whatever thread ran which chunk.
template <typename T> void depthwise_backward(const DepthwiseProblem& p) {
    const T* x = static_cast<const T*>(p.x);
    const T* weight = static_cast<const T*>(p.weight);
    const T* grad_out = static_cast<const T*>(p.grad_out);
    T* grad_x = static_cast<T*>(p.grad_x);
    const int64_t chunks = depthwise_chunks(p), taps = p.channels * p.kernel;
    std::vector<T> grad_weight(p.grad_weight ? chunks * taps : 0), grad_bias(p.grad_bias ? chunks * p.channels : 0);
    const std::vector<int64_t> bounds = tap_cells(p);
    const auto interior = interior_cells(bounds, p.kernel);
    parallel_for(chunks, p.threads, [&](int64_t chunk, int64_t) {
        for (int64_t row = chunk * p.rows / chunks; row < (chunk + 1) * p.rows / chunks; ++row) {
            const int64_t c = row % p.channels;
            depthwise_row_backward(p, bounds, interior, x + row * p.length, weight + c * p.kernel,
                                   grad_out + row * p.cells, grad_x ? grad_x + row * p.length : nullptr,
                                   p.grad_weight ? grad_weight.data() + chunk * taps + c * p.kernel : nullptr,
                                   p.grad_bias ? grad_bias.data() + chunk * p.channels + c : nullptr);
        }
    });
    if (p.grad_weight) {
        T* target = static_cast<T*>(p.grad_weight);
        std::fill(target, target + taps, T(0));
        for (int64_t chunk = 0; chunk < chunks; ++chunk)
            for (int64_t i = 0; i < taps; ++i) target[i] += grad_weight[chunk * taps + i];
    }
    if (p.grad_bias) {
        T* target = static_cast<T*>(p.grad_bias);
        std::fill(target, target + p.channels, T(0));
        for (int64_t chunk = 0; chunk < chunks; ++chunk)
            for (int64_t c = 0; c < p.channels; ++c) target[c] += grad_bias[chunk * p.channels + c];
    }
}

// The offset network of deform_attn.offsets without a LayerNorm, in one pass per sequence s:
//     offset[s][j] = scale * tanh(sum_c pointwise[c] * GELU(depthwise_c(x[s][c])[j]))
// (without tanh when unbounded), GELU(a) = a Phi(a) with Phi the standard normal CDF. The hidden
// activations, (channels, cells) per sequence, never leave the thread's scratch; the backward
// pass recomputes them from x.
struct OffsetProblem {
    int64_t sequences, channels, length, cells, kernel, stride, left, threads, bounded;
    double scale;
    const void *x, *weight, *bias, *pointwise;  // (s, c, n), (c, kernel), (c,), (c,)
    void* out;                                  // (s, m)
    const void* grad_out;                       // (s, m)
    void *grad_x, *grad_weight, *grad_bias, *grad_pointwise;  // any may be null
};

// Phi(a) and a phi(a) for a vector: GELU(a) = a Phi(a), GELU'(a) = Phi(a) + a phi(a).
// float: Phi(a) = (1 + erf(a / sqrt 2)) / 2, with erf(z) = 2 / sqrt(pi) sum_k (-1)^k z^(2k+1) /
// (k! (2k+1)) for |z| < 1 (twelve terms: truncation below 1e-10), and for |z| >= 1 erfc from
// Numerical Recipes' Chebyshev fit (relative error below 1.2e-7, on values that either scale a
// Phi near 1 or are themselves the small far tail).
inline void normal_parts(vec<float> a, vec<float>& cdf, vec<float>& a_density) {
    const vec<float> z = a * 0.707106781f;
    const vec<float> u = z * z;
    const vec<float> series = polynomial(
        u, {-1.08922376e-9f, 1.31225329e-8f, -1.45038522e-7f, 1.45891690e-6f, -1.32275132e-5f, 1.06837607e-4f,
            -7.57575758e-4f, 4.62962963e-3f, -2.38095238e-2f, 0.1f, -0.333333333f, 1.0f});
    const vec<float> near = (series * z) * 1.12837917f + 1.0f;  // 1 + erf(z)
    const vec<float> magnitude = abs_vector<float>(z);
    const vec<float> t = 1.0f / (magnitude * 0.5f + 1.0f);
    const vec<float> q = polynomial(
        t, {0.17087277f, -0.82215223f, 1.48851587f, -1.13520398f, 0.27886807f, -0.18628806f, 0.09678418f,
            0.37409196f, 1.00002368f, -1.26551223f});
    const vec<float> tail = t * exp_vector(q - u);  // erfc(|z|)
    const vec<float> far = z < 0.0f ? tail : 2.0f - tail;  // 1 + erf(z) = erfc(-z)
    cdf = (magnitude < 1.0f ? near : far) * 0.5f;
    a_density = a * exp_vector(a * a * -0.5f) * 0.398942280f;
}
inline void normal_parts(vec<double> a, vec<double>& cdf, vec<double>& a_density) {
    for (int lane = 0; lane < Simd<double>::width; ++lane) {
        cdf[lane] = 0.5 * std::erfc(-a[lane] * 0.70710678118654752);
        a_density[lane] = a[lane] * std::exp(-0.5 * a[lane] * a[lane]) * 0.39894228040143268;
    }
}

inline DepthwiseProblem offset_convolution(const OffsetProblem& p) {
    DepthwiseProblem conv{};
    conv.rows = p.sequences * p.channels;
    conv.channels = p.channels;
    conv.length = p.length;
    conv.cells = p.cells;
    conv.kernel = p.kernel;
    conv.stride = p.stride;
    conv.left = p.left;
    conv.threads = p.threads;
    return conv;
}

// One sequence's hidden pre-activations (channels, padded) into `hidden` and sum_c w_c GELU(.)
// into `raw` (padded); the padding lanes stay zero. With `slope`, also GELU'(.) per hidden value
// (channels, padded), for the backward pass.
template <typename T>
void offset_hidden(const OffsetProblem& p, const DepthwiseProblem& conv, const std::vector<int64_t>& bounds,
                   std::pair<int64_t, int64_t> interior, int64_t sequence, int64_t padded, T* hidden, T* raw,
                   T* slope = nullptr) {
    constexpr int W = Simd<T>::width;
    const T* x = static_cast<const T*>(p.x);
    const T* weight = static_cast<const T*>(p.weight);
    const T* bias = static_cast<const T*>(p.bias);
    const T* pointwise = static_cast<const T*>(p.pointwise);
    std::fill(raw, raw + padded, T(0));
    for (int64_t c = 0; c < p.channels; ++c) {
        T* pre = hidden + c * padded;
        std::fill(pre + p.cells, pre + padded, T(0));
        depthwise_row(conv, bounds, interior, x + (sequence * p.channels + c) * p.length, weight + c * p.kernel,
                      bias[c], pre);
        const vec<T> w = splat(pointwise[c]);
        for (int64_t j = 0; j < padded; j += W) {
            vec<T> cdf, a_density;
            const vec<T> a = load(pre + j);
            normal_parts(a, cdf, a_density);
            const vec<T> gelu = a * cdf;
            store(raw + j, load(raw + j) + w * gelu);
            if (slope) {  // GELU'(a) = Phi(a) + a phi(a); GELU(a) itself kept over a
                store(slope + c * padded + j, cdf + a_density);
                store(pre + j, gelu);
            }
        }
    }
}

template <typename T> void offsets_forward(const OffsetProblem& p) {
    const DepthwiseProblem conv = offset_convolution(p);
    const std::vector<int64_t> bounds = tap_cells(conv);
    const auto interior = interior_cells(bounds, p.kernel);
    const int64_t padded = round_up(p.cells, Simd<T>::width);
    T* out = static_cast<T*>(p.out);
    const T scale = T(p.scale);
    struct Scratch {
        Buffer<T> hidden, raw;
    };
    std::vector<Scratch> scratch(std::max<int64_t>(1, p.threads));
    parallel_for(p.sequences, p.threads, [&](int64_t sequence, int64_t thread) {
        Scratch& s = scratch[thread];
        s.hidden.resize(p.channels * padded);
        s.raw.resize(padded);
        offset_hidden(p, conv, bounds, interior, sequence, padded, s.hidden.data(), s.raw.data());
        for (int64_t j = 0; j < p.cells; ++j)
            out[sequence * p.cells + j] = (p.bounded ? std::tanh(s.raw[j]) : s.raw[j]) * scale;
    });
}

// Gradients of offsets_forward. The parameters' are summed per chunk of sequences, then over the
// chunks in order: the same on any number of threads.
template <typename T> void offsets_backward(const OffsetProblem& p) {
    constexpr int W = Simd<T>::width;
    const DepthwiseProblem conv = offset_convolution(p);
    const std::vector<int64_t> bounds = tap_cells(conv);
    const auto interior = interior_cells(bounds, p.kernel);
    const int64_t padded = round_up(p.cells, W);
    const T* x = static_cast<const T*>(p.x);
    const T* weight = static_cast<const T*>(p.weight);
    const T* pointwise = static_cast<const T*>(p.pointwise);
    const T* grad_out = static_cast<const T*>(p.grad_out);
    T* grad_x = static_cast<T*>(p.grad_x);
    const T scale = T(p.scale);
    // a fixed number of chunks, whatever the threads: the sums' order must not depend on them
    const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(p.sequences, 16));
    const int64_t taps = p.channels * p.kernel;
    std::vector<T> grad_weight(p.grad_weight ? chunks * taps : 0), grad_bias(p.grad_bias ? chunks * p.channels : 0);
    std::vector<T> grad_pointwise(p.grad_pointwise ? chunks * p.channels : 0);
    struct Scratch {
        Buffer<T> hidden, slope, raw, grad_raw, grad_pre;
    };
    std::vector<Scratch> scratch(std::max<int64_t>(1, p.threads));
    parallel_for(chunks, p.threads, [&](int64_t chunk, int64_t thread) {
        Scratch& s = scratch[thread];
        s.hidden.resize(p.channels * padded);
        s.slope.resize(p.channels * padded);
        s.raw.resize(padded);
        s.grad_raw.assign(padded, T(0));
        s.grad_pre.resize(padded);
        for (int64_t sequence = chunk * p.sequences / chunks; sequence < (chunk + 1) * p.sequences / chunks; ++sequence) {
            // hidden: GELU of each pre-activation; slope: its derivative
            offset_hidden(p, conv, bounds, interior, sequence, padded, s.hidden.data(), s.raw.data(), s.slope.data());
            for (int64_t j = 0; j < p.cells; ++j) {  // d offset / d raw
                const T g = grad_out[sequence * p.cells + j] * scale;
                if (p.bounded) {
                    const T bounded = std::tanh(s.raw[j]);
                    s.grad_raw[j] = g * (T(1) - bounded * bounded);
                } else {
                    s.grad_raw[j] = g;
                }
            }
            for (int64_t c = 0; c < p.channels; ++c) {
                const T* gelu = s.hidden.data() + c * padded;
                const T* slope = s.slope.data() + c * padded;
                const vec<T> w = splat(pointwise[c]);
                vec<T> pointwise_sum = {};
                for (int64_t j = 0; j < padded; j += W) {
                    const vec<T> g = load(s.grad_raw.data() + j);
                    pointwise_sum += g * load(gelu + j);
                    store(s.grad_pre.data() + j, g * w * load(slope + j));
                }
                if (p.grad_pointwise) {
                    T total = 0;
                    for (int lane = 0; lane < W; ++lane) total += pointwise_sum[lane];
                    grad_pointwise[chunk * p.channels + c] += total;
                }
                const int64_t row = sequence * p.channels + c;
                depthwise_row_backward(conv, bounds, interior, x + row * p.length, weight + c * p.kernel,
                                       s.grad_pre.data(), grad_x ? grad_x + row * p.length : nullptr,
                                       p.grad_weight ? grad_weight.data() + chunk * taps + c * p.kernel : nullptr,
                                       p.grad_bias ? grad_bias.data() + chunk * p.channels + c : nullptr);
            }
        }
    });
    auto reduce = [&](const std::vector<T>& sums, void* target_pointer, int64_t size) {
        if (!target_pointer) return;
        T* target = static_cast<T*>(target_pointer);
        std::fill(target, target + size, T(0));
        for (int64_t chunk = 0; chunk < chunks; ++chunk)
            for (int64_t i = 0; i < size; ++i) target[i] += sums[chunk * size + i];
    };
    reduce(grad_weight, p.grad_weight, taps);
    reduce(grad_bias, p.grad_bias, p.channels);
    reduce(grad_pointwise, p.grad_pointwise, p.channels);
}

// Linear sampling of each row's channels at fractional positions (deform_attn.sampling): for a
// sequence r with positions p_j, left token l = floor(p_j) and weight f = p_j - l,
//     out[r][c][j] = (1 - f) x[r][c][l] + f x[r][c][l + 1],
// a token outside [0, n) reading as zero. The backward pass needs only x and the positions, so
// nothing of the (sequence, channel, cell) size is kept between the passes.
struct SampleProblem {
    int64_t rows, channels, length, cells, threads;
    const void *x, *positions;        // (rows, channels, n), (rows, m)
    void* out;                        // (rows, channels, m)
    const void* grad_out;             // (rows, channels, m)
    void *grad_x, *grad_positions;    // (rows, channels, n), (rows, m); either may be null
};

// One row's cells as index and weight arrays, so that the loops over the cells have no branch
// and vectorise (gathers): an outside neighbour reads a token inside with weight zero, as the
// tensor path's clamped gather does.
template <typename T> struct RowSamples {
    Buffer<int32_t> left, right;          // (m,) tokens read, inside [0, n)
    Buffer<T> left_weight, right_weight;  // (m,) 1 - f and f, zero for a neighbour outside
    Buffer<T> left_inside, right_inside;  // (m,) 1 or 0: d out / d p = right_inside x_r - left_inside x_l

    void prepare(const T* positions, int64_t cells, int64_t length) {
        for (auto* buffer : {&left, &right}) buffer->resize(cells);
        for (auto* buffer : {&left_weight, &right_weight, &left_inside, &right_inside}) buffer->resize(cells);
        for (int64_t j = 0; j < cells; ++j) {
            const T position = positions[j], floor = std::floor(position);
            left[j] = right[j] = 0;
            if (std::isnan(position)) {  // NaN in, NaN out, as the tensor path gives
                left_weight[j] = right_weight[j] = left_inside[j] = right_inside[j] = position;
                continue;
            }
            if (!(floor >= T(-1) && floor <= T(length - 1))) {  // both neighbours outside
                left_weight[j] = right_weight[j] = left_inside[j] = right_inside[j] = T(0);
                continue;
            }
            const int64_t token = int64_t(floor);
            const T fraction = position - floor;
            left_inside[j] = token >= 0 ? T(1) : T(0);
            right_inside[j] = token + 1 < length ? T(1) : T(0);
            left[j] = int32_t(token >= 0 ? token : 0);
            right[j] = int32_t(token + 1 < length ? token + 1 : length - 1);
            left_weight[j] = (T(1) - fraction) * left_inside[j];
            right_weight[j] = fraction * right_inside[j];
        }
    }
};

template <typename T> void sample_forward(const SampleProblem& p) {
    const T* x = static_cast<const T*>(p.x);
    const T* positions = static_cast<const T*>(p.positions);
    T* out = static_cast<T*>(p.out);
    std::vector<RowSamples<T>> scratch(std::max<int64_t>(1, p.threads));
    parallel_for(p.rows, p.threads, [&](int64_t row, int64_t thread) {
        RowSamples<T>& s = scratch[thread];
        s.prepare(positions + row * p.cells, p.cells, p.length);
        const int32_t *__restrict left = s.left.data(), *__restrict right = s.right.data();
        const T *__restrict left_weight = s.left_weight.data(), *__restrict right_weight = s.right_weight.data();
        for (int64_t c = 0; c < p.channels; ++c) {
            const T* __restrict x_row = x + (row * p.channels + c) * p.length;
            T* __restrict out_row = out + (row * p.channels + c) * p.cells;
            for (int64_t j = 0; j < p.cells; ++j)
                out_row[j] = x_row[left[j]] * left_weight[j] + x_row[right[j]] * right_weight[j];
        }
    });
}

// Gradients of sample_forward. A position's gradient sums over the channels in order, so it is
// the same on any number of threads.
template <typename T> void sample_backward(const SampleProblem& p) {
    const T* x = static_cast<const T*>(p.x);
    const T* positions = static_cast<const T*>(p.positions);
    const T* grad_out = static_cast<const T*>(p.grad_out);
    T* grad_x = static_cast<T*>(p.grad_x);
    T* grad_positions = static_cast<T*>(p.grad_positions);
    std::vector<RowSamples<T>> scratch(std::max<int64_t>(1, p.threads));
    parallel_for(p.rows, p.threads, [&](int64_t row, int64_t thread) {
        RowSamples<T>& s = scratch[thread];
        s.prepare(positions + row * p.cells, p.cells, p.length);
        const int32_t *__restrict left = s.left.data(), *__restrict right = s.right.data();
        const T *__restrict left_weight = s.left_weight.data(), *__restrict right_weight = s.right_weight.data();
        const T *__restrict left_inside = s.left_inside.data(), *__restrict right_inside = s.right_inside.data();
        T* __restrict grad_p = grad_positions ? grad_positions + row * p.cells : nullptr;
        if (grad_p) std::fill(grad_p, grad_p + p.cells, T(0));
        for (int64_t c = 0; c < p.channels; ++c) {
            const T* __restrict x_row = x + (row * p.channels + c) * p.length;
            const T* __restrict g = grad_out + (row * p.channels + c) * p.cells;
            if (grad_x) {  // a scatter: two cells may share a token, so no vectors here
                T* target = grad_x + (row * p.channels + c) * p.length;
                std::fill(target, target + p.length, T(0));
                for (int64_t j = 0; j < p.cells; ++j) {
                    target[left[j]] += g[j] * left_weight[j];
                    target[right[j]] += g[j] * right_weight[j];
                }
            }
            if (grad_p)
                for (int64_t j = 0; j < p.cells; ++j)
                    grad_p[j] += g[j] * (x_row[right[j]] * right_inside[j] - x_row[left[j]] * left_inside[j]);
        }
    });
}

// The position bias's piecewise-linear table (deform_attn.position_bias): a ReLU MLP of one
// scalar t is slope * t + intercept between consecutive kinks. Layer 0 maps t to the (slope,
// intercept) rows (w0, b0); with the activation pattern A_l of an interval fixed, layer l >= 1
// maps (s, c) to (W_l (s * A_l), W_l (c * A_l) + b_l). A kink of layer l is where one of its
// inputs' pre-activations, affine on an interval of the kinks found so far, crosses zero inside
// that interval. Everything in double, whatever the parameters' dtype.
struct TableProblem {
    int64_t layers;                            // linear layers, >= 1; a ReLU between consecutive ones
    const int64_t* widths;                     // (layers + 1,), widths[0] = 1
    const void* const* weights;                // per layer (widths[l + 1], widths[l]), row-major
    const void* const* biases;                 // per layer (widths[l + 1],)
    int64_t capacity;                          // kinks the output buffers hold
    double *kinks, *slopes, *intercepts;       // (capacity,), (capacity + 1, outputs) x 2
    int64_t count;                             // out: kinks found (written only if <= capacity)
    const double *grad_slopes, *grad_intercepts;  // backward: (count + 1, outputs) each; either may be null
    void* const* grad_weights;                 // backward: per layer, the parameters' dtype
    void* const* grad_biases;
};

// What the backward pass needs of one interval: each layer l >= 1's masked inputs (s * A_l,
// c * A_l) and pattern A_l, concatenated in layer order.
struct TableTrace {
    std::vector<double> masked_s, masked_c;
    std::vector<char> active;
};

template <typename T> struct TableMlp {
    const TableProblem& p;
    // (s, c) of layer `upto`'s outputs at point t, appending to `trace` unless null
    void pieces(double t, int64_t upto, std::vector<double>& s, std::vector<double>& c, TableTrace* trace) const {
        const T* w0 = static_cast<const T*>(p.weights[0]);
        const T* b0 = static_cast<const T*>(p.biases[0]);
        s.assign(p.widths[1], 0.0);
        c.assign(p.widths[1], 0.0);
        for (int64_t u = 0; u < p.widths[1]; ++u) s[u] = double(w0[u]), c[u] = double(b0[u]);
        std::vector<double> in_s, in_c;
        for (int64_t l = 1; l <= upto; ++l) {
            const int64_t in = p.widths[l], out = p.widths[l + 1];
            const T* w = static_cast<const T*>(p.weights[l]);
            const T* b = static_cast<const T*>(p.biases[l]);
            in_s.assign(in, 0.0);
            in_c.assign(in, 0.0);
            for (int64_t u = 0; u < in; ++u) {
                const bool active = s[u] * t + c[u] > 0;
                if (active) in_s[u] = s[u], in_c[u] = c[u];
                if (trace) trace->active.push_back(active);
            }
            if (trace) {
                trace->masked_s.insert(trace->masked_s.end(), in_s.begin(), in_s.end());
                trace->masked_c.insert(trace->masked_c.end(), in_c.begin(), in_c.end());
            }
            s.assign(out, 0.0);
            c.assign(out, 0.0);
            for (int64_t v = 0; v < out; ++v) {
                double slope = 0, intercept = 0;
                for (int64_t u = 0; u < in; ++u) slope += double(w[v * in + u]) * in_s[u], intercept += double(w[v * in + u]) * in_c[u];
                s[v] = slope;
                c[v] = intercept + double(b[v]);
            }
        }
    }
};

// A point strictly inside each of the kinks.size() + 1 intervals.
inline std::vector<double> interval_points(const std::vector<double>& kinks) {
    if (kinks.empty()) return {0.0};
    std::vector<double> points;
    points.reserve(kinks.size() + 1);
    points.push_back(kinks.front() - (1 + std::fabs(kinks.front())));
    for (size_t i = 0; i + 1 < kinks.size(); ++i) points.push_back((kinks[i] + kinks[i + 1]) / 2);
    points.push_back(kinks.back() + (1 + std::fabs(kinks.back())));
    return points;
}

template <typename T> std::vector<double> table_kinks(const TableProblem& p) {
    const TableMlp<T> mlp{p};
    std::vector<double> kinks, found, s, c;
    const double infinity = std::numeric_limits<double>::infinity();
    for (int64_t depth = 1; depth < p.layers; ++depth) {
        const std::vector<double> points = interval_points(kinks);
        found = kinks;
        for (size_t i = 0; i < points.size(); ++i) {
            mlp.pieces(points[i], depth - 1, s, c, nullptr);
            const double lower = i == 0 ? -infinity : kinks[i - 1], upper = i == kinks.size() ? infinity : kinks[i];
            for (size_t u = 0; u < s.size(); ++u) {
                if (s[u] == 0) continue;
                const double crossing = -c[u] / s[u];
                if (crossing > lower && crossing < upper) found.push_back(crossing);
            }
        }
        std::sort(found.begin(), found.end());
        found.erase(std::unique(found.begin(), found.end()), found.end());  // ties merged
        kinks.swap(found);
    }
    return kinks;
}

template <typename T> void table_forward(TableProblem& p) {
    const std::vector<double> kinks = table_kinks<T>(p);
    p.count = int64_t(kinks.size());
    if (p.count > p.capacity) return;
    const TableMlp<T> mlp{p};
    const std::vector<double> points = interval_points(kinks);
    const int64_t outputs = p.widths[p.layers];
    std::vector<double> s, c;
    std::copy(kinks.begin(), kinks.end(), p.kinks);
    for (size_t i = 0; i < points.size(); ++i) {
        mlp.pieces(points[i], p.layers - 1, s, c, nullptr);
        std::copy(s.begin(), s.end(), p.slopes + i * outputs);
        std::copy(c.begin(), c.end(), p.intercepts + i * outputs);
    }
}

// Gradients of the table's slopes and intercepts for the parameters, given the kinks
// (p.kinks[:p.count]): per interval, back through the layers with its pattern fixed, summed over
// the intervals in order.
template <typename T> void table_backward(const TableProblem& p) {
    const std::vector<double> kinks(p.kinks, p.kinks + p.count);
    const std::vector<double> points = interval_points(kinks);
    const TableMlp<T> mlp{p};
    const int64_t outputs = p.widths[p.layers];
    std::vector<std::vector<double>> grad_w(p.layers), grad_b(p.layers);
    for (int64_t l = 0; l < p.layers; ++l) {
        grad_w[l].assign(p.widths[l + 1] * p.widths[l], 0.0);
        grad_b[l].assign(p.widths[l + 1], 0.0);
    }
    std::vector<double> s, c, bar_s, bar_c, next_s, next_c;
    TableTrace trace;
    for (size_t i = 0; i < points.size(); ++i) {
        trace.masked_s.clear();
        trace.masked_c.clear();
        trace.active.clear();
        mlp.pieces(points[i], p.layers - 1, s, c, &trace);
        bar_s.assign(outputs, 0.0);
        bar_c.assign(outputs, 0.0);
        for (int64_t o = 0; o < outputs; ++o) {
            if (p.grad_slopes) bar_s[o] = p.grad_slopes[i * outputs + o];
            if (p.grad_intercepts) bar_c[o] = p.grad_intercepts[i * outputs + o];
        }
        int64_t offset = int64_t(trace.masked_s.size());
        for (int64_t l = p.layers - 1; l >= 1; --l) {
            const int64_t in = p.widths[l], out = p.widths[l + 1];
            const T* w = static_cast<const T*>(p.weights[l]);
            offset -= in;
            const double* in_s = trace.masked_s.data() + offset;
            const double* in_c = trace.masked_c.data() + offset;
            const char* active = trace.active.data() + offset;
            next_s.assign(in, 0.0);
            next_c.assign(in, 0.0);
            for (int64_t v = 0; v < out; ++v) {
                grad_b[l][v] += bar_c[v];
                for (int64_t u = 0; u < in; ++u) {
                    grad_w[l][v * in + u] += bar_s[v] * in_s[u] + bar_c[v] * in_c[u];
                    next_s[u] += double(w[v * in + u]) * bar_s[v];
                    next_c[u] += double(w[v * in + u]) * bar_c[v];
                }
            }
            for (int64_t u = 0; u < in; ++u)  // through the pattern: an input that was off passed nothing on
                if (!active[u]) next_s[u] = next_c[u] = 0;
            bar_s.swap(next_s);
            bar_c.swap(next_c);
        }
        for (int64_t u = 0; u < p.widths[1]; ++u) grad_w[0][u] += bar_s[u], grad_b[0][u] += bar_c[u];
    }
    for (int64_t l = 0; l < p.layers; ++l) {
        T* target_w = static_cast<T*>(p.grad_weights[l]);
        T* target_b = static_cast<T*>(p.grad_biases[l]);
        for (size_t k = 0; k < grad_w[l].size(); ++k) target_w[k] = T(grad_w[l][k]);
        for (size_t k = 0; k < grad_b[l].size(); ++k) target_b[k] = T(grad_b[l][k]);
    }
}

}  // namespace

extern "C" {
int deform_attn_fused_abi() { return 8; }
void deform_attn_fused_forward_f32(const Problem* p) { forward<float>(*p); }
void deform_attn_fused_forward_f64(const Problem* p) { forward<double>(*p); }
void deform_attn_fused_backward_f32(const Problem* p) { backward<float>(*p); }
void deform_attn_fused_backward_f64(const Problem* p) { backward<double>(*p); }
void deform_attn_depthwise_forward_f32(const DepthwiseProblem* p) { depthwise_forward<float>(*p); }
void deform_attn_depthwise_forward_f64(const DepthwiseProblem* p) { depthwise_forward<double>(*p); }
void deform_attn_depthwise_backward_f32(const DepthwiseProblem* p) { depthwise_backward<float>(*p); }
void deform_attn_depthwise_backward_f64(const DepthwiseProblem* p) { depthwise_backward<double>(*p); }
void deform_attn_offsets_forward_f32(const OffsetProblem* p) { offsets_forward<float>(*p); }
void deform_attn_offsets_forward_f64(const OffsetProblem* p) { offsets_forward<double>(*p); }
void deform_attn_offsets_backward_f32(const OffsetProblem* p) { offsets_backward<float>(*p); }
void deform_attn_offsets_backward_f64(const OffsetProblem* p) { offsets_backward<double>(*p); }
void deform_attn_sample_forward_f32(const SampleProblem* p) { sample_forward<float>(*p); }
void deform_attn_sample_forward_f64(const SampleProblem* p) { sample_forward<double>(*p); }
void deform_attn_sample_backward_f32(const SampleProblem* p) { sample_backward<float>(*p); }
void deform_attn_sample_backward_f64(const SampleProblem* p) { sample_backward<double>(*p); }
void deform_attn_table_forward_f32(TableProblem* p) { table_forward<float>(*p); }
void deform_attn_table_forward_f64(TableProblem* p) { table_forward<double>(*p); }
void deform_attn_table_backward_f32(const TableProblem* p) { table_backward<float>(*p); }
void deform_attn_table_backward_f64(const TableProblem* p) { table_backward<double>(*p); }
}
