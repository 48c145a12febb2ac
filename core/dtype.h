// Element types, named as safetensors names them.
#pragma once
#include <cstddef>
#include <cstdint>
#include <optional>
#include <string_view>
#include <vector>

namespace tl {

enum class DType : uint8_t { BOOL, U8, I8, I16, U16, F16, BF16, I32, U32, F32, F64, I64, U64 };

size_t dtype_size(DType t);
std::string_view dtype_name(DType t);                 // "F32", "BF16", ...
std::optional<DType> dtype_from_name(std::string_view name);
bool dtype_is_float(DType t);

// Rank of the dtype in safetensors' writer order (Rust enum order); the writer sorts
// tensors by this, descending, then by name, to lay out the data buffer.
int dtype_safetensors_rank(DType t);

using Shape = std::vector<int64_t>;
int64_t shape_numel(const Shape& s);
std::string shape_str(const Shape& s);  // "[2, 3]"

}  // namespace tl
