// NF4 4-bit weights, bit-identical to bitsandbytes' CUDA kernels (blocksize 64, optional
// double quantization of the absmax with nested blocksize 256 and the signed 8-bit dynamic
// map), and the Linear4bit state-dict layout. Spec: /work/shared/docs/formats.md §1.
//
//   quantize:   absmax[b] = max|x| over flat block b (64 elements, fp32)
//               q = nf4_quantize_value(x * (1.0f / absmax[b]))     (reciprocal, then multiply)
//               byte k = q[2k] << 4 | q[2k+1]                        (even element: HIGH nibble)
//   double:     offset = mean(absmax) (torch CPU order); absmax_q = dQuantize<0>((absmax-offset)
//               * (1/nested_absmax[b/256])) over the dynamic map
//   dequantize: w = nf4_code_value(q) * absmax_f32[b] in fp32, one rounding to the out dtype,
//               absmax_f32[b] = dyn[absmax_q[b]] * nested_absmax[b/256], THEN + offset (no FMA)
//
// The scalar helpers are TL_HD so the CUDA backend shares them.
#pragma once
#include <cstdint>
#include <functional>
#include <optional>
#include <string>
#include <vector>

#include "core/half.h"
#include "core/safetensors.h"
#include "core/tensor.h"

namespace tl {

inline constexpr int64_t kNf4BlockSize = 64;
inline constexpr int64_t kNf4NestedBlockSize = 256;

// The 16 NF4 levels (float32; code order == value order). Same numbers as bnb's
// get_4bit_type("nf4"), the CUDA nf4_dequantization_lut and `weight.quant_map`.
TL_HD float nf4_code_value(unsigned q) {
  const float lut[16] = {-1.0f, -0.6961928009986877f, -0.5250730514526367f, -0.39491748809814453f,
                         -0.28444138169288635f, -0.18477343022823334f, -0.09105003625154495f, 0.0f,
                         0.07958029955625534f, 0.16093020141124725f, 0.24611230194568634f,
                         0.33791524171829224f, 0.44070982933044434f, 0.5626170039176941f,
                         0.7229568362236023f, 1.0f};
  return lut[q & 15u];
}

// Threshold i (0..14) separates codes i and i+1: dQuantizeNF4's literals, spelled as in
// csrc/kernels.cu. A `...f` literal is the decimal rounded ONCE to float32 (by GCC, Clang and
// nvcc alike; the shipped libbitsandbytes_cuda*.so SASS holds these bits). At i = 0, 8, 12,
// 14 that is 1 ulp off the float32 midpoint of the two codes (0xbf591cd9, 0x3df64863,
// 0x3f006d03, 0x3f5c89d9 vs ...d8, ...62, ...04, ...da); formats.md §1.2 lists the midpoints,
// which is what bnb's CPU backend compares against.
TL_HD float nf4_threshold(int i) {
  const float t[15] = {-0.8480964004993439f, -0.6106329262256622f, -0.4599952697753906f,
                       -0.33967943489551544f, -0.23460740596055984f, -0.13791173323988914f,
                       -0.045525018125772476f, 0.03979014977812767f, 0.1202552504837513f,
                       0.2035212516784668f, 0.2920137718319893f, 0.3893125355243683f,
                       0.5016634166240692f, 0.6427869200706482f, 0.8614784181118011f};
  return t[i];
}

// dQuantizeNF4: code = number of thresholds strictly below x (a value exactly on a threshold
// takes the LOWER code; 0 → 7). Every test is a strict `>`, so NaN fails all of them → 0;
// that is what an all-zero block (0 * inf) produces.
TL_HD uint8_t nf4_quantize_value(float x) {
  // bnb's tree, literal for literal (constants inline: no local-memory table on the GPU).
  if (x > 0.03979014977812767f) {
    if (x > 0.3893125355243683f) {
      if (x > 0.6427869200706482f) return x > 0.8614784181118011f ? 15 : 14;
      return x > 0.5016634166240692f ? 13 : 12;
    }
    if (x > 0.2035212516784668f) return x > 0.2920137718319893f ? 11 : 10;
    return x > 0.1202552504837513f ? 9 : 8;
  }
  if (x > -0.33967943489551544f) {
    if (x > -0.13791173323988914f) return x > -0.045525018125772476f ? 7 : 6;
    return x > -0.23460740596055984f ? 5 : 4;
  }
  if (x > -0.6106329262256622f) return x > -0.4599952697753906f ? 3 : 2;
  return x > -0.8480964004993439f ? 1 : 0;
}

// dQuantize<0> (csrc/kernels.cu), ported literally: a 7-step binary search over the sorted
// 256-entry map from pivot 127 with strict `>`, then nearest of {pivot-1, pivot, pivot+1}
// using float32 midpoints (m = (a + b) * 0.5f). Ties go to the (even) final pivot.
TL_HD uint8_t quantize_8bit_value(const float* code, float x) {
  int pivot = 127, upper_pivot = 255, lower_pivot = 0;
  float lower = -1.0f, upper = 1.0f;
  float val = code[pivot];
  for (int i = 64; i > 0; i >>= 1) {
    if (x > val) {
      lower_pivot = pivot;
      lower = val;
      pivot += i;
    } else {
      upper_pivot = pivot;
      upper = val;
      pivot -= i;
    }
    val = code[pivot];
  }
  if (upper_pivot == 255) upper = code[upper_pivot];
  if (lower_pivot == 0) lower = code[lower_pivot];
  if (x > val) {
    float midpoint = (upper + val) * 0.5f;
    return uint8_t(x > midpoint ? upper_pivot : pivot);
  }
  float midpoint = (lower + val) * 0.5f;
  return uint8_t(x < midpoint ? lower_pivot : pivot);
}

// absmax_f32 = dyn * nested, rounded, THEN + offset, rounded: PyTorch runs these as two ops
// (dequantize_blockwise, then `absmax += offset`). A fused multiply-add would skip the first
// rounding, so keep the compiler from contracting (volatile on the host, _rn intrinsics on
// the device; CMake builds gnu++20, where GCC's default is -ffp-contract=fast).
TL_HD float nf4_absmax_dq(float dyn_value, float nested_absmax, float offset) {
#if defined(__CUDA_ARCH__)
  return __fadd_rn(__fmul_rn(dyn_value, nested_absmax), offset);
#else
  volatile float product = dyn_value * nested_absmax;
  return product + offset;
#endif
}

// A quantized weight as bitsandbytes stores it.
struct Nf4Tensor {
  Shape shape;                       // the original shape (`shape` in the JSON)
  DType orig_dtype = DType::BF16;    // F32 / BF16 / F16: what dequantize returns by default
  std::vector<uint8_t> packed;       // (n+1)/2 bytes, byte k = q[2k] << 4 | q[2k+1]
  bool double_quant = false;
  std::vector<float> absmax;         // [nblocks], when !double_quant
  std::vector<uint8_t> absmax_q;     // [nblocks], when double_quant: codes into nested_map
  std::vector<float> nested_absmax;  // [ceil(nblocks/256)], when double_quant
  float offset = 0.0f;               // mean(absmax), when double_quant
  std::vector<float> nested_map;     // [256] dynamic map, when double_quant
  // A backend's resident copy of these same bytes (CudaOps: on the GPU), made on first use
  // by the backend that multiplies by it; empty on the CPU. Copies of the tensor share it.
  mutable std::shared_ptr<void> backend_copy;

  int64_t numel() const { return shape_numel(shape); }
  int64_t nblocks() const { return (numel() + kNf4BlockSize - 1) / kNf4BlockSize; }
  // Scale of block b in fp32 (reconstructed when double-quantized).
  float block_absmax(int64_t b) const {
    if (!double_quant) return absmax[size_t(b)];
    return nf4_absmax_dq(nested_map[absmax_q[size_t(b)]], nested_absmax[size_t(b / kNf4NestedBlockSize)],
                         offset);
  }
  std::vector<float> absmax_f32() const;  // block_absmax for every block
};

// create_dynamic_map(signed=True, max_exponent_bits=7, total_bits=8) as torch 2.x builds it
// on the CPU (256 sorted float32 values, code[127] = 0, code[255] = 1).
std::vector<float> nf4_dynamic_map();

// bnb quantize_blockwise (kQuantizeBlockwise<General8bit>, dQuantize<0>): per `blocksize`
// block, absmax = max|x|, q = quantize_8bit_value(code, x * (1/absmax)).
// out_q: n bytes; out_absmax: ceil(n/blocksize) floats.
void quantize_blockwise_8bit(const float* x, int64_t n, const float* code, int64_t blocksize,
                             uint8_t* out_q, float* out_absmax);

// torch's CPU `x.mean()` for a contiguous float32 vector, bit for bit: cascade_sum
// (aten/src/ATen/native/cpu/SumKernel.cpp, 8-lane AVX2 vectors, 4-way ILP, 4 levels) run on
// one thread, then sum / n. bnb on CUDA takes the mean on the GPU, whose order differs: the
// offset can then be 1 ulp apart, which is harmless because it is stored.
float torch_mean_f32(const float* x, int64_t n);

// Quantize a host F32 / BF16 / F16 tensor (any shape, flattened row-major).
Nf4Tensor nf4_quantize(const Tensor& w, bool double_quant);

// Whole tensor, as bnb's dequantize_4bit(..., dtype=out): code * absmax in fp32, one rounding.
Tensor nf4_dequantize(const Nf4Tensor& t, DType out);
inline Tensor nf4_dequantize(const Nf4Tensor& t) { return nf4_dequantize(t, t.orig_dtype); }

// Rows [row_begin, row_end) of dim 0 (row = numel / shape[0] elements; blocks may straddle
// rows) into `out` (row-major, (row_end - row_begin) * row elements). round_to = F32 gives
// code * absmax; BF16 / F16 give the value dequantize_4bit(dtype=round_to) returns, widened
// back to float (what Linear4bit.forward multiplies by).
void nf4_dequantize_rows(const Nf4Tensor& t, int64_t row_begin, int64_t row_end, float* out,
                         DType round_to = DType::F32);
// The same rows in the weight's original dtype (as above with round_to = t.orig_dtype), then
// rounded to bf16 (nearest-even): the operand of a bf16 product, made in one pass.
void nf4_dequantize_rows_bf16(const Nf4Tensor& t, int64_t row_begin, int64_t row_end, uint16_t* out);

// The tensors Linear4bit._save_to_state_dict writes for its weight, in its order:
// <prefix>weight (U8 [(n+1)/2, 1]), <prefix>weight.absmax, .quant_map, [.nested_absmax,
// .nested_quant_map,] .quant_state.bitsandbytes__nf4 (UTF-8 JSON, U8 [len]). `prefix` is the
// module's, e.g. "model.layers.0.self_attn.q_proj." (bias is the caller's).
std::vector<NamedTensor> nf4_state_dict(const std::string& prefix, const Nf4Tensor& t);

// The JSON bytes of `quant_state.bitsandbytes__nf4` (json.dumps default separators).
std::string nf4_quant_state_json(const Nf4Tensor& t);

// Python's repr() of a double ("2.6131999492645264", "1e-05", "1e+16", "3.0").
std::string python_float_repr(double d);

// Inverse of nf4_state_dict. `get(name)` returns the tensor or nullopt; a missing or
// malformed entry throws tl::Error naming the key, and so does a quantization state that
// cannot dequantize to finite weights (an absmax, nested_absmax, nested_quant_map or
// nested_offset that is NaN, infinite or negative): bitsandbytes would compute with it and
// give a NaN loss. Without `read_packed` the packed weight itself is neither read nor returned
// (a check of the state only).
using TensorLookup = std::function<std::optional<Tensor>(const std::string&)>;
Nf4Tensor nf4_from_state_dict(const std::string& prefix, const TensorLookup& get, bool read_packed = true);
Nf4Tensor nf4_from_state_dict(const std::string& prefix, const std::vector<NamedTensor>& tensors);
Nf4Tensor nf4_from_state_dict(const std::string& prefix, const SafetensorsFile& file);
Nf4Tensor nf4_from_state_dict(const std::string& prefix, const Checkpoint& ckpt);
// The checks of nf4_from_state_dict on a checkpoint's pre-quantized weight `prefix`+"weight",
// reading its quantization state and the packed weight's header only.
void check_nf4_state(const std::string& prefix, const Checkpoint& ckpt);

}  // namespace tl
