// Pillow's LANCZOS resize of uint8 RGB, bit for bit, and the tile cut + rescale/normalise into float32 frames.
//
// The arithmetic is Pillow's (src/libImaging/Resample.c): per output pixel, coefficients from double-precision
// LANCZOS weights normalised to 1 and rounded to 22-bit fixed point; sums of uint8 x int32 products; `>> 22`, clipped
// to 0..255; a horizontal pass (only over the input rows the vertical pass reads) into a uint8 image, then a
// vertical pass, or the other way round where Pillow 13 does so (see `resize`). Integer sums are exact in any order, so the loops are free to run across many pixels at once:
// - vertical pass: one output row at a time, a vector of int32 sums over the row's contiguous W*3 bytes;
// - horizontal pass: blocks of 16 rows transposed into a [W*3, 16] strip, so each tap is one 16-lane vector op.
// One thread, as Pillow's: the gain is in CPU time, which the engine's decoding shares.
// The weights must be computed exactly as Pillow does: this file is built with -ffp-contract=off (no fused
// multiply-adds) and calls the same libm `sin`.
#include <pybind11/numpy.h>
#include <pybind11/pybind11.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

namespace py = pybind11;

namespace {

constexpr int PRECISION_BITS = 32 - 8 - 2;
constexpr int RB = 16;  // rows per horizontal-pass block: one 512-bit vector of int32 sums per tap and channel

#if defined(__x86_64__) && defined(__GNUC__)
#define VECTOR_CLONES __attribute__((target_clones("arch=x86-64-v4", "avx2", "default")))
#else
#define VECTOR_CLONES
#endif

double sinc(double x) {
    if (x == 0.0) return 1.0;
    x = x * M_PI;
    return sin(x) / x;
}

double lanczos(double x) { return (-3.0 <= x && x < 3.0) ? sinc(x) * sinc(x / 3) : 0.0; }

struct Coeffs {
    int ksize;
    std::vector<int> bounds;  // [out, 2]: first input index, tap count
    std::vector<int32_t> kk;  // [out, ksize] fixed-point weights
};

// Pillow's precompute_coeffs (box = the whole input) + normalize_coeffs_8bpc, statement for statement.
Coeffs precompute(int in_size, int out_size) {
    float in0 = 0.0f, in1 = (float)in_size;
    double scale = (double)(in1 - in0) / out_size, filterscale = scale < 1.0 ? 1.0 : scale;
    double support = 3.0 * filterscale;
    Coeffs c;
    c.ksize = (int)ceil(support) * 2 + 1;
    c.bounds.resize(2 * (size_t)out_size);
    c.kk.assign((size_t)out_size * c.ksize, 0);
    std::vector<double> k(c.ksize);
    for (int xx = 0; xx < out_size; xx++) {
        double center = in0 + (xx + 0.5) * scale, ww = 0.0, ss = 1.0 / filterscale;
        int xmin = (int)(center - support + 0.5);
        if (xmin < 0) xmin = 0;
        int xmax = (int)(center + support + 0.5);
        if (xmax > in_size) xmax = in_size;
        xmax -= xmin;
        for (int x = 0; x < xmax; x++) {
            double w = lanczos((x + xmin - center + 0.5) * ss);
            k[x] = w;
            ww += w;
        }
        for (int x = 0; x < xmax; x++) {
            if (ww != 0.0) k[x] /= ww;
            c.kk[(size_t)xx * c.ksize + x] =
                k[x] < 0 ? (int)(-0.5 + k[x] * (1 << PRECISION_BITS)) : (int)(0.5 + k[x] * (1 << PRECISION_BITS));
        }
        c.bounds[2 * xx] = xmin;
        c.bounds[2 * xx + 1] = xmax;
    }
    return c;
}

inline uint8_t clip8(uint32_t sum) {  // unsigned sums wrap instead of overflowing; the true sum fits int32
    int32_t v = (int32_t)sum >> PRECISION_BITS;
    return (uint8_t)(v < 0 ? 0 : v > 255 ? 255 : v);
}

// 16 lanes (GCC/Clang vector extensions: zmm with AVX-512, two ymm with AVX2, four xmm otherwise)
typedef uint8_t u8x16 __attribute__((vector_size(16)));
typedef uint32_t u32x16 __attribute__((vector_size(64)));
typedef int32_t i32x16 __attribute__((vector_size(64)));

inline void store16(uint8_t* p, u8x16 v) { memcpy(p, &v, sizeof v); }

inline u8x16 clip8(u32x16 sum) {
    i32x16 v = (i32x16)sum >> PRECISION_BITS;
    v = v < 0 ? 0 : v;
    v = v > 255 ? 255 : v;
    return __builtin_convertvector(v, u8x16);
}

// The horizontal pass: in [rows, w, 3] -> out [rows, w2, 3].
VECTOR_CLONES void horizontal(const uint8_t* in, int64_t rows, int w, uint8_t* out, int w2, const Coeffs& c) {
    const int64_t n_in = (int64_t)w * 3, n_out = (int64_t)w2 * 3;
    // [w*3, RB] widened to uint32 as it is transposed (GCC widens uint8 vectors lane by lane), [w2*3, RB]
    std::vector<uint32_t> strip(n_in * RB, 0);
    std::vector<uint8_t> done(n_out * RB);
    for (int64_t r0 = 0; r0 < rows; r0 += RB) {
        const int64_t nr = std::min<int64_t>(RB, rows - r0);
        const uint8_t* src = in + r0 * n_in;
        for (int64_t i = 0; i < n_in; i++)  // each store a whole 64-byte line; the reads walk nr rows in step
            for (int64_t r = 0; r < nr; r++) strip[i * RB + r] = src[r * n_in + i];
        for (int xx = 0; xx < w2; xx++) {
            const int xmin = c.bounds[2 * xx], taps = c.bounds[2 * xx + 1];
            const int32_t* k = &c.kk[(size_t)xx * c.ksize];
            u32x16 acc[3];
            for (int ch = 0; ch < 3; ch++) acc[ch] = u32x16{} + (1u << (PRECISION_BITS - 1));
            for (int t = 0; t < taps; t++) {
                const uint32_t* p = &strip[(int64_t)(xmin + t) * 3 * RB];
                const uint32_t kt = (uint32_t)k[t];
                for (int ch = 0; ch < 3; ch++) {
                    u32x16 v;
                    memcpy(&v, p + ch * RB, sizeof v);
                    acc[ch] += v * kt;
                }
            }
            for (int ch = 0; ch < 3; ch++) store16(&done[((int64_t)xx * 3 + ch) * RB], clip8(acc[ch]));
        }
        for (int64_t r = 0; r < nr; r++) {
            uint8_t* dst = out + (r0 + r) * n_out;
            for (int64_t i = 0; i < n_out; i++) dst[i] = done[i * RB + r];
        }
    }
}


// The vertical pass: in [h, row] -> out [h2, row] (row = w * 3 bytes); the bounds index input rows from `first`.
VECTOR_CLONES void vertical(const uint8_t* in, int64_t row, uint8_t* out, int h2, const Coeffs& c, int first) {
    constexpr int64_t CHUNK = 2048;  // int32 sums kept in L1
    uint32_t acc[CHUNK];
    for (int64_t yy = 0; yy < h2; yy++) {
        const int ymin = c.bounds[2 * yy] - first, taps = c.bounds[2 * yy + 1];
        const int32_t* k = &c.kk[(size_t)yy * c.ksize];
        for (int64_t i0 = 0; i0 < row; i0 += CHUNK) {
            const int64_t n = std::min(CHUNK, row - i0);
            for (int64_t i = 0; i < n; i++) acc[i] = 1u << (PRECISION_BITS - 1);
            for (int t = 0; t < taps; t++) {
                const uint8_t* src = in + (int64_t)(ymin + t) * row + i0;
                const uint32_t kt = (uint32_t)k[t];
                for (int64_t i = 0; i < n; i++) acc[i] += (uint32_t)src[i] * kt;
            }
            uint8_t* dst = out + yy * row + i0;
            for (int64_t i = 0; i < n; i++) dst[i] = clip8(acc[i]);
        }
    }
}


using Pixels = py::array_t<uint8_t, py::array::c_style | py::array::forcecast>;

void check_rgb(const Pixels& image) {
    if (image.ndim() != 3 || image.shape(2) != 3 || image.shape(0) < 1 || image.shape(1) < 1)
        throw std::invalid_argument("expected uint8 [H, W, 3] pixels");
}

// Image.resize((w2, h2), Image.LANCZOS) of an RGB image given as uint8 [h, w, 3]: the uint8 [h2, w2, 3] result.
// vertical_first: Pillow >= 13 runs the vertical pass first when the height shrinks by more than twice as many pixels
// as the width (its ImagingResampleInner); older Pillow always runs the horizontal pass first. The caller says which.
Pixels resize(const Pixels& image, int w2, int h2, bool vertical_first) {
    check_rgb(image);
    if (w2 < 1 || h2 < 1) throw std::invalid_argument("resize: the size must be positive");
    const int h = (int)image.shape(0), w = (int)image.shape(1);
    const uint8_t* in = image.data();
    Pixels out({h2, w2, 3});
    uint8_t* dst = out.mutable_data();
    py::gil_scoped_release released;
    const Coeffs vert = precompute(h, h2);
    if (w2 == w) {  // vertical pass only (or a copy)
        if (h2 == h) memcpy(dst, in, (size_t)h * w * 3);
        else vertical(in, (int64_t)w * 3, dst, h2, vert, 0);
        return out;
    }
    const Coeffs horiz = precompute(w, w2);
    if (h2 != h && vertical_first) {
        std::vector<uint8_t> temp((size_t)h2 * w * 3);
        vertical(in, (int64_t)w * 3, temp.data(), h2, vert, 0);
        horizontal(temp.data(), h2, w, dst, w2, horiz);
        return out;
    }
    if (h2 == h) {  // horizontal pass only
        horizontal(in, h, w, dst, w2, horiz);
        return out;
    }
    // the horizontal pass over the rows the vertical pass reads, then the vertical pass
    const int first = vert.bounds[0], last = vert.bounds[2 * h2 - 2] + vert.bounds[2 * h2 - 1];
    std::vector<uint8_t> temp((size_t)(last - first) * w2 * 3);
    horizontal(in + (int64_t)first * w * 3, last - first, w, temp.data(), w2, horiz);
    vertical(temp.data(), (int64_t)w2 * 3, dst, h2, vert, first);
    return out;
}

// frames[f, c, y, x] = lut[c, tile_f[y, x, c]] for the rows x cols tiles of side m of image [rows*m, cols*m, 3], row
// by row: the rescale + normalise of every tile as one table look-up per value, written straight into `frames`
// (float32 [rows*cols, 3, m, m], e.g. a slice of pixel_values).
void tiles_into(const Pixels& image, py::array_t<float, py::array::c_style | py::array::forcecast> lut,
                py::array_t<float, py::array::c_style> frames, int64_t rows, int64_t cols) {
    check_rgb(image);
    const int64_t m = frames.ndim() == 4 ? frames.shape(3) : 0, w = image.shape(1);
    if (frames.ndim() != 4 || frames.shape(0) != rows * cols || frames.shape(1) != 3 || frames.shape(2) != m ||
        image.shape(0) != rows * m || w != cols * m || lut.size() != 3 * 256)
        throw std::invalid_argument("tiles_into: expected frames float32 [rows*cols, 3, m, m], the image "
                                    "[rows*m, cols*m, 3] and lut [3, 256]");
    const uint8_t* in = image.data();
    const float* table = lut.data();
    float* out = frames.mutable_data();
    py::gil_scoped_release released;
    for (int64_t i = 0; i < rows * cols * m; i++) {  // i = (tile, y)
        const int64_t f = i / m, y = i % m;
        const uint8_t* src = in + (((f / cols) * m + y) * w + (f % cols) * m) * 3;
        for (int ch = 0; ch < 3; ch++) {
            const float* t = table + ch * 256;
            float* dst = out + ((f * 3 + ch) * m + y) * m;
            for (int64_t x = 0; x < m; x++) dst[x] = t[src[x * 3 + ch]];
        }
    }
}

}  // namespace

PYBIND11_MODULE(smolvlm_resample, m) {
    m.def("resize", &resize, "Pillow's LANCZOS resize of uint8 [H, W, 3] to (width, height), bit for bit");
    m.def("tiles_into", &tiles_into, "tiles of uint8 [R*M, C*M, 3] through a [3, 256] table into [R*C, 3, M, M]");
}
