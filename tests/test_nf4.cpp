// NF4 codec vs the real bitsandbytes (tests/golden/nf4/, scripts/golden/make_nf4_golden.py).
// `bnb.*` keys are bnb's CPU backend; `ref.*` (present only where it differs) are the CUDA
// kernels' semantics, which nf4_quantize implements. Every comparison here is bitwise.
#include <gtest/gtest.h>

#include <cmath>
#include <cstring>
#include <fstream>
#include <iterator>
#include <random>

#include "core/nf4.h"
#include "core/safetensors.h"
#include "tests/golden_util.h"

namespace tl {
namespace {

const SafetensorsFile& common() {
  static SafetensorsFile f = SafetensorsFile::open(test::golden("nf4/common.safetensors"));
  return f;
}

::testing::AssertionResult same_bytes(const void* a, const void* b, size_t n) {
  for (size_t i = 0; i < n; ++i)
    if (static_cast<const uint8_t*>(a)[i] != static_cast<const uint8_t*>(b)[i])
      return ::testing::AssertionFailure() << "first difference at byte " << i << " of " << n;
  return ::testing::AssertionSuccess();
}

::testing::AssertionResult same_tensor(const Tensor& got, const Tensor& want) {
  if (got.dtype() != want.dtype() || got.shape() != want.shape())
    return ::testing::AssertionFailure() << dtype_name(got.dtype()) << shape_str(got.shape()) << " vs "
                                         << dtype_name(want.dtype()) << shape_str(want.shape());
  return same_bytes(got.raw(), want.raw(), got.nbytes());
}

template <class T>
::testing::AssertionResult same_vec(const std::vector<T>& got, const Tensor& want) {
  if (got.size() * sizeof(T) != want.nbytes())
    return ::testing::AssertionFailure() << got.size() << " elements vs " << want.numel();
  return same_bytes(got.data(), want.raw(), want.nbytes());
}

// One fixture case: input plus bnb's (and, where different, the CUDA-semantics) state.
struct Case {
  SafetensorsFile f;
  explicit Case(const std::string& name) : f(SafetensorsFile::open(test::golden("nf4/" + name + ".safetensors"))) {}
  Tensor input() const { return f.get("input"); }
  // src "ref": the CUDA-semantics value (falls back to bnb's where they agree).
  Tensor get(const std::string& src, const std::string& key) const {
    if (src == "ref" && f.contains("ref." + key)) return f.get("ref." + key);
    return f.get("bnb." + key);
  }
  Nf4Tensor state(const std::string& src, bool dq) const {
    Nf4Tensor t;
    t.shape = input().shape();
    t.orig_dtype = input().dtype();
    Tensor p = get(src, "packed");
    t.packed.assign(p.data<uint8_t>(), p.data<uint8_t>() + p.numel());
    t.double_quant = dq;
    if (!dq) {
      Tensor a = get(src, "absmax");
      t.absmax.assign(a.data<float>(), a.data<float>() + a.numel());
      return t;
    }
    Tensor q = get(src, "dq.absmax"), na = get(src, "dq.nested_absmax");
    t.absmax_q.assign(q.data<uint8_t>(), q.data<uint8_t>() + q.numel());
    t.nested_absmax.assign(na.data<float>(), na.data<float>() + na.numel());
    t.offset = get(src, "dq.offset").data<float>()[0];
    Tensor m = common().get("nested_quant_map");
    t.nested_map.assign(m.data<float>(), m.data<float>() + 256);
    return t;
  }
};

const uint32_t kCodeBits[16] = {0xbf800000, 0xbf3239b1, 0xbf066b30, 0xbeca32a0, 0xbe91a24d, 0xbe3d353f,
                                0xbdba7871, 0x00000000, 0x3da2faff, 0x3e24cae3, 0x3e7c04dd, 0x3ead033a,
                                0x3ee1a4b8, 0x3f1007ab, 0x3f3913b3, 0x3f800000};
// As nvcc compiles dQuantizeNF4's literals (and as the shipped CUDA .so holds them).
const uint32_t kThresholdBits[15] = {0xbf591cd9, 0xbf1c5270, 0xbeeb8480, 0xbeadea76, 0xbe703cec,
                                     0xbe0d38bc, 0xbd3a7871, 0x3d22faff, 0x3df64863, 0x3e5067e0,
                                     0x3e9582d4, 0x3ec753f9, 0x3f006d03, 0x3f248daf, 0x3f5c89d9};

// The rule the tree implements: code = number of thresholds strictly below x (NaN → 0).
uint8_t count_rule(float x) {
  uint8_t c = 0;
  for (int i = 0; i < 15; ++i) c += x > nf4_threshold(i);
  return c;
}

TEST(Nf4, TablesMatchSpecAndBnb) {
  Tensor qmap = common().get("quant_map"), thr = common().get("thresholds");
  Tensor cpu_bounds = common().get("cpu_bounds");
  for (unsigned q = 0; q < 16; ++q) {
    EXPECT_EQ(float_bits(nf4_code_value(q)), kCodeBits[q]) << q;
    EXPECT_EQ(float_bits(qmap.data<float>()[q]), kCodeBits[q]) << q;
  }
  for (int i = 0; i < 15; ++i) {
    EXPECT_EQ(float_bits(nf4_threshold(i)), kThresholdBits[i]) << i;
    EXPECT_EQ(float_bits(thr.data<float>()[i]), kThresholdBits[i]) << i;
    // bnb CPU compares against the float32 midpoints of neighbouring codes; the kernel's
    // literals round to the same float except at i = 0, 8, 12, 14 (1 ulp apart).
    const float mid = (nf4_code_value(unsigned(i)) + nf4_code_value(unsigned(i) + 1)) / 2;
    EXPECT_EQ(float_bits(cpu_bounds.data<float>()[i]), float_bits(mid)) << i;
    const bool off = i == 0 || i == 8 || i == 12 || i == 14;
    EXPECT_EQ(std::abs(int64_t(float_bits(nf4_threshold(i))) - int64_t(float_bits(mid))), off ? 1 : 0) << i;
  }
}

TEST(Nf4, QuantizeValueThresholdEdges) {
  for (int i = 0; i < 15; ++i) {
    float t = nf4_threshold(i);
    EXPECT_EQ(nf4_quantize_value(t), i) << "a value on a threshold goes to the lower code";
    EXPECT_EQ(nf4_quantize_value(std::nextafter(t, 2.0f)), i + 1);
    EXPECT_EQ(nf4_quantize_value(std::nextafter(t, -2.0f)), i);
  }
  for (unsigned q = 0; q < 16; ++q) EXPECT_EQ(nf4_quantize_value(nf4_code_value(q)), q);
  EXPECT_EQ(nf4_quantize_value(0.0f), 7);
  EXPECT_EQ(nf4_quantize_value(-0.0f), 7);
  EXPECT_EQ(nf4_quantize_value(NAN), 0);
  EXPECT_EQ(nf4_quantize_value(INFINITY), 15);
  EXPECT_EQ(nf4_quantize_value(-INFINITY), 0);
  std::mt19937 rng(1);
  std::uniform_real_distribution<float> u(-1.2f, 1.2f);
  for (int k = 0; k < 200000; ++k) {
    float x = u(rng);
    ASSERT_EQ(nf4_quantize_value(x), count_rule(x)) << x;
  }
}

TEST(Nf4, DynamicMapMatchesBnb) {
  std::vector<float> m = nf4_dynamic_map();
  ASSERT_EQ(m.size(), 256u);
  EXPECT_TRUE(same_vec(m, common().get("nested_quant_map")));
  EXPECT_EQ(m[127], 0.0f);
  EXPECT_EQ(m[255], 1.0f);
  EXPECT_EQ(m[0], -0.99296874f);
  for (int k = 1; k < 128; ++k) EXPECT_EQ(m[size_t(127 - k)], -m[size_t(127 + k)]) << k;
}

TEST(Nf4, Quantize8bitNearestTiesToEvenPivot) {
  const std::vector<float> m = nf4_dynamic_map();
  for (int i = 0; i < 256; ++i) EXPECT_EQ(quantize_8bit_value(m.data(), m[size_t(i)]), i);
  for (int i = 0; i + 1 < 256; ++i) {
    float mid = (m[size_t(i)] + m[size_t(i) + 1]) * 0.5f;
    if (mid == m[size_t(i)] || mid == m[size_t(i) + 1]) continue;
    int even = i % 2 == 0 ? i : i + 1;  // dQuantize's final pivot is even; a tie stays there
    EXPECT_EQ(quantize_8bit_value(m.data(), mid), even) << i;
    EXPECT_EQ(quantize_8bit_value(m.data(), std::nextafter(mid, 2.0f)), i + 1) << i;
    EXPECT_EQ(quantize_8bit_value(m.data(), std::nextafter(mid, -2.0f)), i) << i;
  }
  EXPECT_EQ(quantize_8bit_value(m.data(), NAN), 0);
}

TEST(Nf4, TorchMeanMatchesTorchCpu) {
  Tensor sizes = common().get("mean.sizes"), means = common().get("mean.values");
  for (int64_t c = 0; c < sizes.numel(); ++c) {
    const int64_t n = sizes.data<int64_t>()[c];
    std::vector<float> x(static_cast<size_t>(n));
    for (int64_t i = 0; i < n; ++i) {  // ((i * 2654435761) mod 2^32 >> 8) * 2^-24 * 3
      uint32_t h = uint32_t(uint64_t(i) * 2654435761u);
      x[size_t(i)] = float(h >> 8) * (1.0f / 16777216.0f) * 3.0f;
    }
    EXPECT_EQ(float_bits(torch_mean_f32(x.data(), n)), float_bits(means.data<float>()[c])) << "n=" << n;
  }
}

TEST(Nf4, AbsmaxReconstructionIsMultiplyThenAdd) {
  // Find operands where an FMA would differ, then require the two-rounding result.
  std::mt19937 rng(3);
  std::uniform_real_distribution<float> u(-1.0f, 1.0f);
  int fma_differs = 0;
  for (int k = 0; k < 20000; ++k) {
    float a = u(rng), b = u(rng) * 3.0f, c = u(rng) + 2.0f;
    float two_step = float(double(float(double(a) * double(b))) + double(c));  // both exact in double
    ASSERT_EQ(float_bits(nf4_absmax_dq(a, b, c)), float_bits(two_step)) << a << " " << b << " " << c;
    fma_differs += std::fma(a, b, c) != two_step;
  }
  EXPECT_GT(fma_differs, 0) << "the test would not notice a contracted FMA";
}

TEST(Nf4, PythonFloatRepr) {
  EXPECT_EQ(python_float_repr(double(2.6131999492645264f)), "2.6131999492645264");
  EXPECT_EQ(python_float_repr(0.1), "0.1");
  EXPECT_EQ(python_float_repr(3.0), "3.0");
  EXPECT_EQ(python_float_repr(-0.0), "-0.0");
  EXPECT_EQ(python_float_repr(0.0001), "0.0001");
  EXPECT_EQ(python_float_repr(1e-05), "1e-05");
  EXPECT_EQ(python_float_repr(1.5e-07), "1.5e-07");
  EXPECT_EQ(python_float_repr(123.456), "123.456");
  EXPECT_EQ(python_float_repr(1e15), "1000000000000000.0");
  EXPECT_EQ(python_float_repr(1e16), "1e+16");
  EXPECT_EQ(python_float_repr(1.2345e300), "1.2345e+300");
  EXPECT_EQ(python_float_repr(double(0.012299999594688416f)), "0.012299999594688416");
}

// --- per-case golden comparisons ----------------------------------------------------------

class Nf4Golden : public ::testing::TestWithParam<std::string> {};

TEST_P(Nf4Golden, QuantizeMatchesCudaSemantics) {
  Case c(GetParam());
  Nf4Tensor plain = nf4_quantize(c.input(), false);
  EXPECT_TRUE(same_vec(plain.packed, c.get("ref", "packed")));
  EXPECT_TRUE(same_vec(plain.absmax, c.get("ref", "absmax")));
  Nf4Tensor dq = nf4_quantize(c.input(), true);
  EXPECT_EQ(dq.packed, plain.packed);
  EXPECT_EQ(float_bits(dq.offset), float_bits(c.get("ref", "dq.offset").data<float>()[0]));
  EXPECT_TRUE(same_vec(dq.absmax_q, c.get("ref", "dq.absmax")));
  EXPECT_TRUE(same_vec(dq.nested_absmax, c.get("ref", "dq.nested_absmax")));
  EXPECT_TRUE(same_vec(dq.nested_map, common().get("nested_quant_map")));
}

TEST_P(Nf4Golden, DequantizeMatchesBnbBitwise) {
  Case c(GetParam());
  for (const char* src : {"bnb", "ref"})
    for (bool dq : {false, true}) {
      SCOPED_TRACE(std::string(src) + (dq ? " double-quant" : " plain"));
      Tensor want = c.get(src, dq ? "dq.dequant" : "dequant");
      EXPECT_TRUE(same_tensor(nf4_dequantize(c.state(src, dq)), want));
      if (std::string(src) == "ref") {  // end to end: our quantizer, then our dequantizer
        EXPECT_TRUE(same_tensor(nf4_dequantize(nf4_quantize(c.input(), dq)), want));
      }
    }
}

TEST_P(Nf4Golden, RowTileDequantEqualsWhole) {
  Case c(GetParam());
  for (bool dq : {false, true}) {
    Nf4Tensor t = nf4_quantize(c.input(), dq);
    for (DType round_to : {DType::F32, t.orig_dtype}) {
      Tensor whole = nf4_dequantize(t, round_to).to(DType::F32);
      const int64_t rows = t.shape[0], cols = t.numel() / rows;
      for (int64_t tile : {int64_t(1), int64_t(3), int64_t(7), rows}) {
        std::vector<float> out(static_cast<size_t>(t.numel()));
        for (int64_t r = 0; r < rows; r += tile)
          nf4_dequantize_rows(t, r, std::min(rows, r + tile), out.data() + r * cols, round_to);
        ASSERT_TRUE(same_vec(out, whole)) << "tile " << tile;
      }
    }
  }
}

TEST_P(Nf4Golden, StateDictRoundTrip) {
  Case c(GetParam());
  for (bool dq : {false, true}) {
    Nf4Tensor t = nf4_quantize(c.input(), dq);
    std::vector<NamedTensor> sd = nf4_state_dict("m.", t);
    Nf4Tensor back = nf4_from_state_dict("m.", sd);
    EXPECT_EQ(back.shape, t.shape);
    EXPECT_EQ(back.orig_dtype, t.orig_dtype);
    EXPECT_EQ(back.double_quant, dq);
    EXPECT_EQ(back.packed, t.packed);
    EXPECT_EQ(back.absmax_q, t.absmax_q);
    EXPECT_EQ(float_bits(back.offset), float_bits(t.offset));
    EXPECT_TRUE(same_tensor(nf4_dequantize(back), nf4_dequantize(t)));
    std::vector<NamedTensor> again = nf4_state_dict("m.", back);
    ASSERT_EQ(again.size(), sd.size());
    for (size_t i = 0; i < sd.size(); ++i) {
      EXPECT_EQ(again[i].name, sd[i].name);
      EXPECT_TRUE(same_tensor(again[i].tensor, sd[i].tensor)) << sd[i].name;
    }
  }
}

INSTANTIATE_TEST_SUITE_P(Cases, Nf4Golden,
                         ::testing::Values("randn_bf16", "randn_f32", "randn_f16", "zero_blocks", "midpoints",
                                           "outliers", "odd_1d", "odd_zero_tail", "big_bf16", "nested_edge"));

// --- edge cases against the kernel rules directly -----------------------------------------

TEST(Nf4, ZeroBlocksAndOddPadding) {
  // Block 0 all zero, block 1 normal, block 2 = 3 values (odd n = 131) with absmax 0.
  Tensor w = Tensor::zeros({131}, DType::F32);
  for (int i = 64; i < 128; ++i) w.data<float>()[i] = float(i - 96) / 32.0f;
  Nf4Tensor t = nf4_quantize(w, false);
  ASSERT_EQ(t.packed.size(), 66u);
  for (int k = 0; k < 32; ++k) EXPECT_EQ(t.packed[size_t(k)], 0x00) << "0*inf = NaN → code 0";
  EXPECT_EQ(t.packed[32] >> 4, 0) << "x = -1 * absmax → code 0";
  EXPECT_EQ(t.packed[48] >> 4, 7) << "x = 0 → code 7";
  EXPECT_EQ(t.packed[65], 0x00) << "the padding nibble of an all-zero block is NaN → 0 too";
  EXPECT_EQ(t.absmax[0], 0.0f);
  EXPECT_EQ(t.absmax[2], 0.0f);
  w.data<float>()[130] = 2.0f;  // element 130 → code 15 (high); padding 0 * 0.5 → code 7 (low)
  EXPECT_EQ(nf4_quantize(w, false).packed[65], 0xf7);
}

TEST(Nf4, MidpointsGoToLowerCode) {
  // absmax = 4 (a power of two): x * (1/4) lands exactly on each threshold.
  Tensor w = Tensor::zeros({64}, DType::F32);
  w.data<float>()[0] = 4.0f;
  for (int i = 0; i < 15; ++i) w.data<float>()[1 + i] = nf4_threshold(i) * 4.0f;
  Nf4Tensor t = nf4_quantize(w, false);
  auto code = [&](int i) { return (i & 1) ? t.packed[size_t(i / 2)] & 15 : t.packed[size_t(i / 2)] >> 4; };
  EXPECT_EQ(code(0), 15);
  for (int i = 0; i < 15; ++i) EXPECT_EQ(code(1 + i), i) << "threshold " << i;
  EXPECT_EQ(code(20), 7);
}

TEST(Nf4, Linear4bitStateDictMatchesBnbBytes) {
  const std::string path = test::golden("nf4/linear4bit_state.safetensors");
  SafetensorsFile f = SafetensorsFile::open(path);
  Nf4Tensor t = nf4_from_state_dict("proj.", f);
  EXPECT_EQ(t.shape, (Shape{64, 192}));
  EXPECT_EQ(t.orig_dtype, DType::BF16);
  EXPECT_TRUE(t.double_quant);
  std::vector<NamedTensor> sd = nf4_state_dict("proj.", t);
  ASSERT_EQ(sd.size() + 1, f.entries().size()) << "all of bnb's keys but proj.bias";
  for (const NamedTensor& nt : sd) {
    ASSERT_TRUE(f.contains(nt.name)) << nt.name;
    EXPECT_TRUE(same_tensor(nt.tensor, f.get(nt.name))) << nt.name;
  }
  // The whole file, byte for byte, through our safetensors writer.
  sd.push_back({"proj.bias", f.get("proj.bias")});
  std::vector<uint8_t> bytes = serialize_safetensors(sd);
  std::ifstream in(path, std::ios::binary);
  std::vector<uint8_t> file((std::istreambuf_iterator<char>(in)), std::istreambuf_iterator<char>());
  EXPECT_EQ(bytes, file);
  // Quantizing the same bf16 weight ourselves gives the same tensors and JSON bytes.
  Nf4Tensor mine = nf4_quantize(Case("randn_bf16").input(), true);
  for (const NamedTensor& nt : nf4_state_dict("proj.", mine))
    EXPECT_TRUE(same_tensor(nt.tensor, f.get(nt.name))) << nt.name;
  Tensor js = f.get("proj.weight.quant_state.bitsandbytes__nf4");
  EXPECT_EQ(nf4_quant_state_json(mine), std::string(js.data<char>(), size_t(js.numel())));
}

TEST(Nf4, PlainStateDictLayout) {
  Nf4Tensor t = nf4_quantize(Case("odd_1d").input(), false);
  std::vector<NamedTensor> sd = nf4_state_dict("x.", t);
  ASSERT_EQ(sd.size(), 4u);
  EXPECT_EQ(sd[0].name, "x.weight");
  EXPECT_EQ(sd[0].tensor.shape(), (Shape{105, 1}));
  EXPECT_EQ(sd[1].name, "x.weight.absmax");
  EXPECT_EQ(sd[1].tensor.dtype(), DType::F32);
  EXPECT_EQ(sd[2].name, "x.weight.quant_map");
  EXPECT_EQ(sd[3].name, "x.weight.quant_state.bitsandbytes__nf4");
  const Tensor& js = sd[3].tensor;
  EXPECT_EQ(std::string(js.data<char>(), size_t(js.numel())),
            R"({"quant_type": "nf4", "blocksize": 64, "dtype": "float32", "shape": [209]})");
}

TEST(Nf4, FromStateDictErrorsNameTheKey) {
  Nf4Tensor t = nf4_quantize(Case("randn_f16").input(), true);
  for (const char* drop : {"p.weight", "p.weight.absmax", "p.weight.nested_absmax", "p.weight.nested_quant_map",
                           "p.weight.quant_map", "p.weight.quant_state.bitsandbytes__nf4"}) {
    std::vector<NamedTensor> sd = nf4_state_dict("p.", t);
    std::erase_if(sd, [&](const NamedTensor& nt) { return nt.name == drop; });
    try {
      nf4_from_state_dict("p.", sd);
      ADD_FAILURE() << "no error without " << drop;
    } catch (const Error& e) {
      EXPECT_NE(std::string(e.what()).find(std::string("'") + drop + "'"), std::string::npos) << e.what();
    }
  }
  std::vector<NamedTensor> sd = nf4_state_dict("p.", t);
  sd[1].tensor = sd[1].tensor.to(DType::F32);  // absmax F32 although the JSON says nested
  EXPECT_THROW(nf4_from_state_dict("p.", sd), Error);
  sd = nf4_state_dict("p.", t);
  sd.back().name = "p.weight.quant_state.bitsandbytes__fp4";
  EXPECT_THROW(nf4_from_state_dict("p.", sd), Error);
  EXPECT_THROW(nf4_quantize(Tensor::zeros({4}, DType::I32), false), Error);
  Nf4Tensor bad = t;
  bad.absmax_q.pop_back();
  EXPECT_THROW(nf4_dequantize(bad), Error);
}

}  // namespace
}  // namespace tl
