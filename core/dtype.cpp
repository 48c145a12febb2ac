#include "core/dtype.h"

#include <string>

namespace tl {

namespace {
struct DTypeInfo {
  DType type;
  std::string_view name;
  size_t size;
  int safetensors_rank;  // position in safetensors' Rust `Dtype` enum
};
// Rust enum order: BOOL, F4, F6_E2M3, F6_E3M2, U8, I8, F8_E5M2, F8_E4M3, F8_E8M0, I16, U16,
// F16, BF16, I32, U32, F32, C64, F64, I64, U64. Only the ranks' relative order matters.
constexpr DTypeInfo kInfo[] = {
    {DType::BOOL, "BOOL", 1, 0}, {DType::U8, "U8", 1, 4},     {DType::I8, "I8", 1, 5},
    {DType::I16, "I16", 2, 9},   {DType::U16, "U16", 2, 10},  {DType::F16, "F16", 2, 11},
    {DType::BF16, "BF16", 2, 12}, {DType::I32, "I32", 4, 13}, {DType::U32, "U32", 4, 14},
    {DType::F32, "F32", 4, 15},  {DType::F64, "F64", 8, 17},  {DType::I64, "I64", 8, 18},
    {DType::U64, "U64", 8, 19},
};
const DTypeInfo& info(DType t) { return kInfo[static_cast<int>(t)]; }
}  // namespace

size_t dtype_size(DType t) { return info(t).size; }
std::string_view dtype_name(DType t) { return info(t).name; }
int dtype_safetensors_rank(DType t) { return info(t).safetensors_rank; }
bool dtype_is_float(DType t) {
  return t == DType::F16 || t == DType::BF16 || t == DType::F32 || t == DType::F64;
}

std::optional<DType> dtype_from_name(std::string_view name) {
  for (const auto& i : kInfo)
    if (i.name == name) return i.type;
  return std::nullopt;
}

int64_t shape_numel(const Shape& s) {
  int64_t n = 1;
  for (int64_t d : s) n *= d;
  return n;
}

std::string shape_str(const Shape& s) {
  std::string out = "[";
  for (size_t i = 0; i < s.size(); ++i) {
    if (i) out += ", ";
    out += std::to_string(s[i]);
  }
  return out + "]";
}

}  // namespace tl
