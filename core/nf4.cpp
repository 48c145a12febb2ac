#include "core/nf4.h"

#include <fmt/format.h>
#include <nlohmann/json.hpp>

#include <algorithm>
#include <array>
#include <bit>
#include <charconv>
#include <cmath>
#include <cstdio>
#include <cstring>

#if defined(__x86_64__)
#include <immintrin.h>
#define TL_NF4_AVX512 1
#endif

#include "core/cpu/cpu_features.h"

namespace tl {

namespace {

// Element i of a host F32 / BF16 / F16 tensor as float (exact for all three).
struct FloatReader {
  const void* p;
  DType t;
  float operator()(int64_t i) const {
    switch (t) {
      case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
      case DType::F16: return f16_to_float(static_cast<const uint16_t*>(p)[i]);
      default: return static_cast<const float*>(p)[i];
    }
  }
};

bool nf4_dtype_ok(DType t) { return t == DType::F32 || t == DType::BF16 || t == DType::F16; }

// Round fp32 to `t` and back (bnb's single conversion of code * absmax to the out dtype).
float round_through(float v, DType t) {
  if (t == DType::BF16) return bf16_to_float(float_to_bf16(v));
  if (t == DType::F16) return f16_to_float(float_to_f16(v));
  return v;
}

// --- torch CPU cascade sum (SumKernel.cpp) -----------------------------------------------
// multi_row_sum<nrows=4>: rows of 4 columns of W lanes; element (r*4 + k)*W + l. Sums run in
// chunks of 2^level_power rows whose partial sums cascade through 4 accumulator levels.
template <int W>
void multi_row_sum4(const float* x, int64_t size, float out[4][W]) {
  auto ceil_log2 = [](int64_t v) -> int64_t { return v <= 2 ? 1 : std::bit_width(uint64_t(v - 1)); };
  const int64_t level_power = std::max<int64_t>(4, ceil_log2(size) / 4);
  const int64_t level_step = int64_t(1) << level_power, level_mask = level_step - 1;
  float acc[4][4][W] = {};
  auto add_row = [&](int64_t r) {
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < W; ++l) acc[0][k][l] += x[(r * 4 + k) * W + l];
  };
  int64_t i = 0;
  while (i + level_step <= size) {
    for (int64_t j = 0; j < level_step; ++j, ++i) add_row(i);
    for (int j = 1; j < 4; ++j) {
      for (int k = 0; k < 4; ++k)
        for (int l = 0; l < W; ++l) {
          acc[j][k][l] += acc[j - 1][k][l];
          acc[j - 1][k][l] = 0.0f;
        }
      if ((i & (level_mask << (j * level_power))) != 0) break;
    }
  }
  for (; i < size; ++i) add_row(i);
  for (int j = 1; j < 4; ++j)
    for (int k = 0; k < 4; ++k)
      for (int l = 0; l < W; ++l) acc[0][k][l] += acc[j][k][l];
  std::memcpy(out, acc[0], sizeof(float) * 4 * W);
}

// row_sum<ilp_factor=4> over `size` W-lane vectors: the 4 ILP partials, leftovers into
// partial 0, then partial0 += partial1, += partial2, += partial3.
template <int W>
void row_sum(const float* x, int64_t size, float out[W]) {
  const int64_t size_ilp = size / 4;
  float ps[4][W];
  multi_row_sum4<W>(x, size_ilp, ps);
  for (int64_t i = size_ilp * 4; i < size; ++i)
    for (int l = 0; l < W; ++l) ps[0][l] += x[i * W + l];
  for (int k = 1; k < 4; ++k)
    for (int l = 0; l < W; ++l) ps[0][l] += ps[k][l];
  std::memcpy(out, ps[0], sizeof(float) * W);
}

}  // namespace

float torch_mean_f32(const float* x, int64_t n) {
  if (n <= 0) return NAN;
  constexpr int W = 8;  // Vectorized<float>::size() of the AVX2 kernel torch dispatches sum to
  float sum;
  if (n >= W) {  // vectorized_inner_sum: lanes, then the scalar tail, then the 8 lanes in order
    float lanes[W];
    row_sum<W>(x, n / W, lanes);
    sum = 0.0f;
    for (int64_t k = n / W * W; k < n; ++k) sum += x[k];
    for (int l = 0; l < W; ++l) sum += lanes[l];
  } else {  // scalar path: the same cascade with one lane
    float one[1];
    row_sum<1>(x, n, one);
    sum = one[0];
  }
  return sum / float(n);  // mean = sum().div_(numel) on the CPU
}

std::vector<float> nf4_dynamic_map() {
  // For i = 0..6: 2^i + 1 points linspace(0.1, 1) (float32), midpoints (a + b) / 2, scaled by
  // float(10^(i-6)), both signs; plus 0 and 1; sorted. torch's CPU linspace computes
  // start + step*k (k < steps/2) and end - step*(steps-1-k) with one rounding (an FMA);
  // the map from a no-FMA linspace differs in 42 entries, so spell the FMA out.
  std::vector<float> v;
  for (int i = 0; i < 7; ++i) {
    const int steps = (1 << i) + 1;
    const float start = 0.1f, end = 1.0f, step = (end - start) / float(steps - 1);
    std::vector<float> b(static_cast<size_t>(steps));
    for (int k = 0; k < steps; ++k)
      b[size_t(k)] = k < steps / 2 ? std::fma(step, float(k), start) : std::fma(-step, float(steps - 1 - k), end);
    const float scale = float(std::pow(10.0, double(i - 6)));
    for (int k = 0; k + 1 < steps; ++k) {
      float mean = (b[size_t(k)] + b[size_t(k) + 1]) / 2.0f;
      v.push_back(scale * mean);
      v.push_back(-scale * mean);
    }
  }
  v.push_back(0.0f);
  v.push_back(1.0f);
  std::sort(v.begin(), v.end());
  return v;
}

void quantize_blockwise_8bit(const float* x, int64_t n, const float* code, int64_t blocksize,
                             uint8_t* out_q, float* out_absmax) {
  const int64_t nb = (n + blocksize - 1) / blocksize;
#pragma omp parallel for schedule(static) if (nb > 256)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t lo = b * blocksize, hi = std::min(n, lo + blocksize);
    float amax = 0.0f;  // the kernel's padding zeros make this the floor anyway
    for (int64_t i = lo; i < hi; ++i) amax = std::fmax(amax, std::fabs(x[i]));
    out_absmax[b] = amax;
    const float inv = 1.0f / amax;
    for (int64_t i = lo; i < hi; ++i) out_q[i] = quantize_8bit_value(code, x[i] * inv);
  }
}

std::vector<float> Nf4Tensor::absmax_f32() const {
  std::vector<float> out(static_cast<size_t>(nblocks()));
  for (int64_t b = 0; b < nblocks(); ++b) out[size_t(b)] = block_absmax(b);
  return out;
}

Nf4Tensor nf4_quantize(const Tensor& w, bool double_quant) {
  if (w.device() != Device::CPU) throw Error("nf4_quantize: tensor is not on the host");
  if (!nf4_dtype_ok(w.dtype()))
    throw Error("nf4_quantize: dtype " + std::string(dtype_name(w.dtype())) + " (want F32, BF16 or F16)");
  Nf4Tensor t;
  t.shape = w.shape();
  t.orig_dtype = w.dtype();
  const int64_t n = w.numel(), nb = t.nblocks();
  const FloatReader rd{w.raw(), w.dtype()};
  t.packed.assign(size_t((n + 1) / 2), 0);
  std::vector<float> absmax(static_cast<size_t>(nb));
#pragma omp parallel for schedule(static) if (nb > 256)
  for (int64_t b = 0; b < nb; ++b) {
    const int64_t lo = b * kNf4BlockSize, hi = std::min(n, lo + kNf4BlockSize);
    float amax = 0.0f;
    for (int64_t i = lo; i < hi; ++i) amax = std::fmax(amax, std::fabs(rd(i)));
    absmax[size_t(b)] = amax;
    // inv = +inf for an all-zero block: 0 * inf = NaN → code 0, like the kernel.
    const float inv = 1.0f / amax;
    // Pairs (lo is even); a lone last element pairs with a padding 0, quantized as 0 * inv.
    for (int64_t i = lo; i < hi; i += 2) {
      uint8_t hi_q = nf4_quantize_value(rd(i) * inv);
      uint8_t lo_q = nf4_quantize_value((i + 1 < n ? rd(i + 1) : 0.0f) * inv);
      t.packed[size_t(i / 2)] = uint8_t(hi_q << 4 | lo_q);
    }
  }
  t.double_quant = double_quant;
  if (!double_quant) {
    t.absmax = std::move(absmax);
    return t;
  }
  // compress_statistics: offset = absmax.mean(); quantize_blockwise(absmax - offset, 256).
  t.offset = torch_mean_f32(absmax.data(), nb);
  for (float& a : absmax) a -= t.offset;
  t.nested_map = nf4_dynamic_map();
  t.absmax_q.resize(size_t(nb));
  t.nested_absmax.resize(size_t((nb + kNf4NestedBlockSize - 1) / kNf4NestedBlockSize));
  quantize_blockwise_8bit(absmax.data(), nb, t.nested_map.data(), kNf4NestedBlockSize, t.absmax_q.data(),
                          t.nested_absmax.data());
  return t;
}

namespace {

// Checks t and the row range; returns the element range [lo, hi) they cover.
std::pair<int64_t, int64_t> dequantize_range(const Nf4Tensor& t, int64_t row_begin, int64_t row_end, DType round_to) {
  const int64_t n = t.numel(), nb = t.nblocks();
  const bool sizes_ok = t.packed.size() == size_t((n + 1) / 2) &&
                        (t.double_quant ? t.absmax_q.size() == size_t(nb) && t.nested_map.size() == 256 &&
                                              t.nested_absmax.size() * kNf4NestedBlockSize >= size_t(nb)
                                        : t.absmax.size() == size_t(nb));
  if (!sizes_ok) throw Error("nf4_dequantize: inconsistent Nf4Tensor for shape " + shape_str(t.shape));
  const int64_t rows = t.shape.empty() ? 1 : t.shape[0];
  const int64_t cols = rows ? n / rows : 0;
  if (row_begin < 0 || row_end > rows || row_begin > row_end)
    throw Error("nf4_dequantize_rows: rows [" + std::to_string(row_begin) + ", " + std::to_string(row_end) +
                ") out of " + shape_str(t.shape));
  if (!nf4_dtype_ok(round_to)) throw Error("nf4_dequantize_rows: round_to must be F32, BF16 or F16");
  return {row_begin * cols, row_end * cols};
}

#if defined(TL_NF4_AVX512)
// GCC 12 warns inside its own intrinsics (_mm512_undefined_epi32 initialises itself), and
// about the ABI of AVX-512 values passed between functions compiled for AVX-512 alone.
#pragma GCC diagnostic push
#pragma GCC diagnostic ignored "-Wmaybe-uninitialized"
#pragma GCC diagnostic ignored "-Wpsabi"
// These helpers are compiled for AVX-512 whatever the build's -march, and run only where
// cpu_features() finds it (dequantize_by_table chooses at run time).
#define TL_AVX512 __attribute__((target("avx512f,avx512bw")))
// 16 (high, low) nibble pairs as 32-bit lanes: lane j holds high_j and low_j as two 16-bit
// words, low word first.
TL_AVX512 inline __m512i nibble_pairs(__m128i h, __m128i l) {
  return _mm512_or_si512(_mm512_cvtepu8_epi32(h), _mm512_slli_epi32(_mm512_cvtepu8_epi32(l), 16));
}
// The 64 codes of one whole block, bytes p[0, 32), as 16-bit table indices in element order
// (element 2j: byte j's high nibble, 2j + 1: its low nibble): two vectors of 32.
TL_AVX512 inline void block_indices(const uint8_t* p, __m512i& first, __m512i& second) {
  const __m256i bytes = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  const __m256i nibble = _mm256_set1_epi8(15);
  const __m256i high = _mm256_and_si256(_mm256_srli_epi16(bytes, 4), nibble);
  const __m256i low = _mm256_and_si256(bytes, nibble);
  first = nibble_pairs(_mm256_castsi256_si128(high), _mm256_castsi256_si128(low));
  second = nibble_pairs(_mm256_extracti128_si256(high, 1), _mm256_extracti128_si256(low, 1));
}

// One whole block's 64 values from its 16-entry table: vpermw / vpermps lookups, exactly the
// scalar loop's values (a lookup copies table entries; nothing is computed).
TL_AVX512 inline void lookup_block(const uint8_t* p, const uint16_t table[16], uint16_t* o) {
  __m512i first, second;
  block_indices(p, first, second);
  const __m512i tab = _mm512_zextsi256_si512(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(table)));
  _mm512_storeu_si512(o, _mm512_permutexvar_epi16(first, tab));
  _mm512_storeu_si512(o + 32, _mm512_permutexvar_epi16(second, tab));
}
TL_AVX512 inline void lookup_block(const uint8_t* p, const float table[16], float* o) {
  __m512i first, second;
  block_indices(p, first, second);
  const __m512 tab = _mm512_loadu_ps(table);
  int k = 0;
  for (__m512i idx : {first, second}) {
    _mm512_storeu_ps(o + k, _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_castsi512_si256(idx)), tab));
    _mm512_storeu_ps(o + k + 16, _mm512_permutexvar_ps(_mm512_cvtepu16_epi32(_mm512_extracti64x4_epi64(idx, 1)), tab));
    k += 32;
  }
}

#pragma GCC diagnostic pop
#endif

// A block's table: table[q] = nf4_code_value(q) · scale rounded through round_to (and to bf16
// for a uint16_t table). The dtype is chosen once per table, not per entry, so that the
// loops over the 16 codes vectorize with float_to_bf16 as written (a per-entry
// round_through switch kept the tables scalar).
const std::array<float, 16>& nf4_codes() {
  static const auto codes = [] {
    std::array<float, 16> c{};
    for (unsigned q = 0; q < 16; ++q) c[q] = nf4_code_value(q);
    return c;
  }();
  return codes;
}
void make_table(float scale, DType round_to, float table[16]) {
  const float* c = nf4_codes().data();
  if (round_to == DType::BF16)
    for (int q = 0; q < 16; ++q) table[q] = bf16_to_float(float_to_bf16(c[q] * scale));
  else
    for (int q = 0; q < 16; ++q) table[q] = round_through(c[q] * scale, round_to);
}
void make_table(float scale, DType round_to, uint16_t table[16]) {
  const float* c = nf4_codes().data();
  if (round_to != DType::F16)  // bf16(round_through(v, F32 or BF16)) = bf16(v)
    for (int q = 0; q < 16; ++q) table[q] = float_to_bf16(c[q] * scale);
  else
    for (int q = 0; q < 16; ++q) table[q] = float_to_bf16(round_through(c[q] * scale, round_to));
}

// Elements [lo, hi) of block b (its part of them) into o[lo, hi) from its table, one lookup
// per element, two per packed byte (even element: the high nibble).
template <class T>
inline void lookup_scalar(const uint8_t* packed, int64_t i, int64_t e, const T table[16], T* o) {
  if (i < e && (i & 1)) {
    o[i] = table[packed[i / 2] & 15u];
    ++i;
  }
  for (; i + 1 < e; i += 2) {
    const uint8_t byte = packed[i / 2];
    o[i] = table[byte >> 4];
    o[i + 1] = table[byte & 15u];
  }
  if (i < e) o[i] = table[packed[i / 2] >> 4];
}

// Blocks [b0, b1) of elements [lo, hi) into out[0, hi − lo): each block's 16 possible values
// (code · absmax rounded through round_to; bf16 of that when T is uint16_t) made once, then
// looked up.
template <class T>
void dequantize_blocks(const Nf4Tensor& t, int64_t b0, int64_t b1, int64_t lo, int64_t hi, T* out, DType round_to) {
  const uint8_t* packed = t.packed.data();
  for (int64_t b = b0; b < b1; ++b) {
    alignas(64) T table[16];
    make_table(t.block_absmax(b), round_to, table);
    lookup_scalar(packed, std::max(lo, b * kNf4BlockSize), std::min(hi, (b + 1) * kNf4BlockSize), table, out - lo);
  }
}

#if defined(TL_NF4_AVX512)
// The same, whole blocks by vector lookups (scalar tables and lookups were 9% of a QLoRA step
// on the larger bench model). Bit for bit the scalar loop's values: a lookup copies entries.
template <class T>
TL_AVX512 void dequantize_blocks_avx512(const Nf4Tensor& t, int64_t b0, int64_t b1, int64_t lo, int64_t hi, T* out,
                                        DType round_to) {
  const uint8_t* packed = t.packed.data();
  for (int64_t b = b0; b < b1; ++b) {
    alignas(64) T table[16];
    make_table(t.block_absmax(b), round_to, table);
    const int64_t i = std::max(lo, b * kNf4BlockSize), e = std::min(hi, (b + 1) * kNf4BlockSize);
    if (e - i == kNf4BlockSize) lookup_block(packed + i / 2, table, out - lo + i);
    else lookup_scalar(packed, i, e, table, out - lo);
  }
}
#endif

// Elements [lo, hi) into out[0, hi − lo), in chunks of blocks over the OpenMP threads, each
// chunk by the AVX-512 lookups where this CPU has them (cpu_features(), read at run time).
template <class T>
void dequantize_by_table(const Nf4Tensor& t, int64_t lo, int64_t hi, T* out, DType round_to) {
  static_assert(kNf4BlockSize == 64, "lookup_block handles blocks of 64");
  const int64_t b0 = lo / kNf4BlockSize, b1 = (hi + kNf4BlockSize - 1) / kNf4BlockSize;
  constexpr int64_t kChunk = 64;  // blocks per call: the dispatch costs nothing per block
  const int64_t chunks = (b1 - b0 + kChunk - 1) / kChunk;
#if defined(TL_NF4_AVX512)
  const bool vector = cpu::cpu_features().avx512bw;
#endif
#pragma omp parallel for schedule(static) if (b1 - b0 > 256)  // small tiles: no fork
  for (int64_t c = 0; c < chunks; ++c) {
    const int64_t cb = b0 + c * kChunk, ce = std::min(b1, cb + kChunk);
#if defined(TL_NF4_AVX512)
    if (vector) {
      dequantize_blocks_avx512(t, cb, ce, lo, hi, out, round_to);
      continue;
    }
#endif
    dequantize_blocks(t, cb, ce, lo, hi, out, round_to);
  }
}

}  // namespace

void nf4_dequantize_rows(const Nf4Tensor& t, int64_t row_begin, int64_t row_end, float* out, DType round_to) {
  const auto [lo, hi] = dequantize_range(t, row_begin, row_end, round_to);
  dequantize_by_table(t, lo, hi, out, round_to);
}

void nf4_dequantize_rows_bf16(const Nf4Tensor& t, int64_t row_begin, int64_t row_end, uint16_t* out) {
  const auto [lo, hi] = dequantize_range(t, row_begin, row_end, t.orig_dtype);
  dequantize_by_table(t, lo, hi, out, t.orig_dtype);
}

Tensor nf4_dequantize(const Nf4Tensor& t, DType out) {
  if (!nf4_dtype_ok(out)) throw Error("nf4_dequantize: out dtype must be F32, BF16 or F16");
  Tensor r = Tensor::zeros(t.shape, out);
  const int64_t n = t.numel();
  if (n == 0) return r;
  std::vector<float> tmp;
  float* dst = out == DType::F32 ? r.data<float>() : (tmp.resize(size_t(n)), tmp.data());
  const int64_t rows = t.shape.empty() ? 1 : t.shape[0];
  nf4_dequantize_rows(t, 0, rows, dst, DType::F32);
  if (out == DType::BF16)
    for (int64_t i = 0; i < n; ++i) r.data<uint16_t>()[i] = float_to_bf16(dst[i]);
  else if (out == DType::F16)
    for (int64_t i = 0; i < n; ++i) r.data<uint16_t>()[i] = float_to_f16(dst[i]);
  return r;
}

// --- state dict ----------------------------------------------------------------------------

namespace {

Tensor vec_tensor(const void* data, size_t bytes, Shape shape, DType dtype) {
  Tensor t = Tensor::zeros(std::move(shape), dtype);
  if (bytes) std::memcpy(t.raw(), data, bytes);
  return t;
}

// str(torch.dtype) with "torch." stripped, as QuantState.as_dict writes it.
const char* torch_dtype_name(DType t) {
  switch (t) {
    case DType::BF16: return "bfloat16";
    case DType::F16: return "float16";
    case DType::F32: return "float32";
    default: throw Error("nf4: unsupported original dtype " + std::string(dtype_name(t)));
  }
}

std::optional<DType> dtype_from_torch_name(const std::string& s) {
  if (s == "bfloat16") return DType::BF16;
  if (s == "float16") return DType::F16;
  if (s == "float32") return DType::F32;
  return std::nullopt;
}

}  // namespace

std::string python_float_repr(double d) {
  // json.dumps writes float.__repr__, except for the non-finite values.
  if (std::isnan(d)) return "NaN";
  if (std::isinf(d)) return d > 0 ? "Infinity" : "-Infinity";
  // Shortest round-trip digits (what repr uses), read off to_chars' scientific form.
  char buf[64];
  auto res = std::to_chars(buf, buf + sizeof buf, d, std::chars_format::scientific);
  std::string sci(buf, res.ptr);
  std::string sign;
  if (sci[0] == '-') sign = "-", sci.erase(0, 1);
  const size_t epos = sci.find('e');
  const int exp = std::stoi(sci.substr(epos + 1));
  std::string digits = sci.substr(0, epos);
  digits.erase(std::remove(digits.begin(), digits.end(), '.'), digits.end());
  // repr switches to exponent form when the decimal exponent is < -4 or >= 16.
  if (exp < -4 || exp >= 16) {
    std::string m = digits.substr(0, 1) + (digits.size() > 1 ? "." + digits.substr(1) : "");
    char e[16];
    std::snprintf(e, sizeof e, "e%c%02d", exp < 0 ? '-' : '+', std::abs(exp));
    return sign + m + e;
  }
  if (exp < 0) return sign + "0." + std::string(size_t(-exp - 1), '0') + digits;
  if (digits.size() <= size_t(exp) + 1) return sign + digits + std::string(size_t(exp) + 1 - digits.size(), '0') + ".0";
  return sign + digits.substr(0, size_t(exp) + 1) + "." + digits.substr(size_t(exp) + 1);
}

std::string nf4_quant_state_json(const Nf4Tensor& t) {
  // json.dumps(dict) with the default ", " / ": " separators, keys in as_dict's order.
  std::string s = R"({"quant_type": "nf4", "blocksize": 64, "dtype": ")";
  s += torch_dtype_name(t.orig_dtype);
  s += R"(", "shape": [)";
  for (size_t i = 0; i < t.shape.size(); ++i) s += (i ? ", " : "") + std::to_string(t.shape[i]);
  s += "]";
  if (t.double_quant)  // nested_offset = offset.item(): the float32 widened to a Python float
    s += R"(, "nested_blocksize": 256, "nested_dtype": "float32", "nested_offset": )" +
         python_float_repr(double(t.offset));
  return s + "}";
}

std::vector<NamedTensor> nf4_state_dict(const std::string& prefix, const Nf4Tensor& t) {
  const std::string w = prefix + "weight";
  const int64_t nb = t.nblocks();
  std::vector<NamedTensor> out;
  out.push_back({w, vec_tensor(t.packed.data(), t.packed.size(), {int64_t(t.packed.size()), 1}, DType::U8)});
  if (t.double_quant)
    out.push_back({w + ".absmax", vec_tensor(t.absmax_q.data(), t.absmax_q.size(), {nb}, DType::U8)});
  else
    out.push_back({w + ".absmax", vec_tensor(t.absmax.data(), t.absmax.size() * 4, {nb}, DType::F32)});
  float qmap[16];
  for (unsigned q = 0; q < 16; ++q) qmap[q] = nf4_code_value(q);
  out.push_back({w + ".quant_map", vec_tensor(qmap, sizeof qmap, {16}, DType::F32)});
  if (t.double_quant) {
    const int64_t nn = int64_t(t.nested_absmax.size());
    out.push_back({w + ".nested_absmax", vec_tensor(t.nested_absmax.data(), size_t(nn) * 4, {nn}, DType::F32)});
    out.push_back({w + ".nested_quant_map", vec_tensor(t.nested_map.data(), 256 * 4, {256}, DType::F32)});
  }
  const std::string js = nf4_quant_state_json(t);
  out.push_back({w + ".quant_state.bitsandbytes__nf4", vec_tensor(js.data(), js.size(), {int64_t(js.size())}, DType::U8)});
  return out;
}

Nf4Tensor nf4_from_state_dict(const std::string& prefix, const TensorLookup& get, bool read_packed) {
  const std::string w = prefix + "weight";
  auto need = [&](const std::string& key, DType dtype, int64_t numel) {
    std::optional<Tensor> t = get(key);
    if (!t) throw Error("nf4: missing tensor '" + key + "'");
    if (t->dtype() != dtype || (numel >= 0 && t->numel() != numel))
      throw Error("nf4: tensor '" + key + "' is " + std::string(dtype_name(t->dtype())) + " " +
                  shape_str(t->shape()) + ", expected " + std::string(dtype_name(dtype)) +
                  (numel >= 0 ? " with " + std::to_string(numel) + " elements" : ""));
    return *t;
  };
  const std::string qs_key = w + ".quant_state.bitsandbytes__nf4";
  if (!get(qs_key) && get(w + ".quant_state.bitsandbytes__fp4"))
    throw Error("nf4: '" + w + "' is FP4-quantized; only NF4 is supported");
  Tensor qs = need(qs_key, DType::U8, -1);
  nlohmann::json j;
  try {
    j = nlohmann::json::parse(std::string(qs.data<char>(), size_t(qs.numel())));
  } catch (const std::exception& e) {
    throw Error("nf4: '" + qs_key + "' is not JSON: " + e.what());
  }
  Nf4Tensor t;
  auto field = [&](const char* k) -> const nlohmann::json& {
    if (!j.contains(k)) throw Error("nf4: '" + qs_key + "' has no \"" + k + "\"");
    return j.at(k);
  };
  try {
    if (field("quant_type") != "nf4") throw Error("nf4: '" + qs_key + "' quant_type is not \"nf4\"");
    if (field("blocksize") != 64) throw Error("nf4: '" + qs_key + "' blocksize is not 64");
    auto dt = dtype_from_torch_name(field("dtype").get<std::string>());
    if (!dt) throw Error("nf4: '" + qs_key + "' has unsupported dtype " + field("dtype").dump());
    t.orig_dtype = *dt;
    t.shape = field("shape").get<Shape>();
    for (int64_t d : t.shape)
      if (d < 0) throw Error("nf4: '" + qs_key + "' has a negative dimension in \"shape\"");
    t.double_quant = j.contains("nested_offset") || get(w + ".nested_absmax").has_value();
    if (t.double_quant) {
      if (field("nested_blocksize") != 256) throw Error("nf4: '" + qs_key + "' nested_blocksize is not 256");
      if (field("nested_dtype") != "float32") throw Error("nf4: '" + qs_key + "' nested_dtype is not float32");
      t.offset = float(field("nested_offset").get<double>());
      if (!std::isfinite(t.offset)) throw Error("nf4: '" + qs_key + "' nested_offset is not finite");
    }
  } catch (const nlohmann::json::exception& e) {
    throw Error("nf4: '" + qs_key + "': " + e.what());
  }
  const int64_t n = t.numel(), nb = t.nblocks();
  if (read_packed) {
    Tensor packed = need(w, DType::U8, (n + 1) / 2);
    t.packed.assign(packed.data<uint8_t>(), packed.data<uint8_t>() + packed.numel());
  }
  // Scales that dequantize to NaN or infinity (a damaged file) would reach every product.
  auto finite_scales = [&](const std::string& key, const float* v, size_t count) {
    for (size_t i = 0; i < count; ++i)
      if (!std::isfinite(v[i]) || v[i] < 0)
        throw Error(fmt::format("nf4: tensor '{}' holds {} at index {}; a block's scale must be finite and ≥ 0", key,
                                v[i], i));
  };
  Tensor qmap = need(w + ".quant_map", DType::F32, 16);
  for (unsigned q = 0; q < 16; ++q)
    if (float_bits(qmap.data<float>()[q]) != float_bits(nf4_code_value(q)))
      throw Error("nf4: '" + w + ".quant_map' is not the NF4 table");
  if (t.double_quant) {
    Tensor a = need(w + ".absmax", DType::U8, nb);
    t.absmax_q.assign(a.data<uint8_t>(), a.data<uint8_t>() + nb);
    const int64_t nn = (nb + kNf4NestedBlockSize - 1) / kNf4NestedBlockSize;
    Tensor na = need(w + ".nested_absmax", DType::F32, nn);
    t.nested_absmax.assign(na.data<float>(), na.data<float>() + nn);
    finite_scales(w + ".nested_absmax", t.nested_absmax.data(), t.nested_absmax.size());
    Tensor nm = need(w + ".nested_quant_map", DType::F32, 256);
    t.nested_map.assign(nm.data<float>(), nm.data<float>() + 256);  // readers use the stored map
    for (size_t i = 0; i < t.nested_map.size(); ++i)
      if (!std::isfinite(t.nested_map[i]))
        throw Error(fmt::format("nf4: tensor '{}' holds {} at index {}; the map must be finite",
                                w + ".nested_quant_map", t.nested_map[i], i));
  } else {
    Tensor a = need(w + ".absmax", DType::F32, nb);
    t.absmax.assign(a.data<float>(), a.data<float>() + nb);
    finite_scales(w + ".absmax", t.absmax.data(), t.absmax.size());
  }
  return t;
}

Nf4Tensor nf4_from_state_dict(const std::string& prefix, const std::vector<NamedTensor>& tensors) {
  return nf4_from_state_dict(prefix, [&](const std::string& k) -> std::optional<Tensor> {
    for (const auto& nt : tensors)
      if (nt.name == k) return nt.tensor;
    return std::nullopt;
  });
}

Nf4Tensor nf4_from_state_dict(const std::string& prefix, const SafetensorsFile& file) {
  return nf4_from_state_dict(prefix, [&](const std::string& k) -> std::optional<Tensor> {
    if (!file.contains(k)) return std::nullopt;
    return file.get(k);
  });
}

Nf4Tensor nf4_from_state_dict(const std::string& prefix, const Checkpoint& ckpt) {
  return nf4_from_state_dict(prefix, [&](const std::string& k) -> std::optional<Tensor> {
    if (!ckpt.contains(k)) return std::nullopt;
    return ckpt.get(k);
  });
}

void check_nf4_state(const std::string& prefix, const Checkpoint& ckpt) try {
  const std::string w = prefix + "weight";
  const Nf4Tensor t = nf4_from_state_dict(
      prefix,
      [&](const std::string& k) -> std::optional<Tensor> {
        if (!ckpt.contains(k)) return std::nullopt;
        return ckpt.get(k);
      },
      /*read_packed=*/false);
  const TensorEntry& e = ckpt.entry(w);
  if (e.dtype != DType::U8 || shape_numel(e.shape) != (t.numel() + 1) / 2)
    throw Error(fmt::format("nf4: tensor '{}' is {} {}, expected U8 with {} elements (two 4-bit codes a byte)", w,
                            dtype_name(e.dtype), shape_str(e.shape), (t.numel() + 1) / 2));
} catch (const Error& e) {
  throw Error(fmt::format("{}: {}", ckpt.dir().string(), e.what()));
}

}  // namespace tl
