#include "core/tensor.h"

#include <algorithm>
#include <atomic>
#include <cstdlib>
#include <cstring>
#include <string>

#include "core/half.h"

namespace tl {

namespace {
std::atomic<int> g_device_access{0};
}  // namespace

DeviceAccess::DeviceAccess() { ++g_device_access; }
DeviceAccess::~DeviceAccess() { --g_device_access; }
bool DeviceAccess::open() { return g_device_access.load(std::memory_order_relaxed) > 0; }

void Tensor::check_access() const {
  if (!DeviceAccess::open())
    throw std::logic_error("strict device: host code read or wrote the data of a device tensor " +
                           shape_str(shape_) + " " + std::string(dtype_name(dtype_)) +
                           " (download it through the backend, or do the work in an Ops primitive)");
}

// Host-readable: plain host memory, or strict-device memory inside the strict backend.
static bool host_readable(Device d) { return d == Device::CPU || (d == Device::Strict && DeviceAccess::open()); }

namespace {
std::atomic<bool> poison_fresh{false};

// Sets every byte of [p, p + len) to `byte`; large buffers by all threads (a
// single-threaded memset was 8% of a step).
void fill_bytes(void* p, size_t len, int byte) {
  const size_t chunk = size_t(1) << 20;
  const int64_t chunks = int64_t((len + chunk - 1) / chunk);
#pragma omp parallel for schedule(static) if(chunks >= 4)
  for (int64_t c = 0; c < chunks; ++c)
    std::memset(static_cast<char*>(p) + size_t(c) * chunk, byte, std::min(chunk, len - size_t(c) * chunk));
}
}  // namespace

void Tensor::poison_uninitialized(bool on) { poison_fresh = on; }

Tensor Tensor::uninitialized(Shape shape, DType dtype) {
  Tensor t = allocate(std::move(shape), dtype);
  if (poison_fresh) fill_bytes(t.data_, t.nbytes(), 0xff);
  return t;
}

Tensor Tensor::zeros(Shape shape, DType dtype) {
  Tensor t = allocate(std::move(shape), dtype);
  fill_bytes(t.data_, (t.nbytes() + 63) / 64 * 64, 0);
  return t;
}

Tensor Tensor::allocate(Shape shape, DType dtype) {
  Tensor t;
  size_t bytes = size_t(shape_numel(shape)) * dtype_size(dtype);
  // 64-byte alignment suits AVX-512 loads and BLAS.
  size_t padded = (bytes + 63) / 64 * 64;
  void* p = std::aligned_alloc(64, padded ? padded : 64);
  if (!p) {
    std::string dims;
    for (size_t i = 0; i < shape.size(); ++i) dims += (i ? ", " : "") + std::to_string(shape[i]);
    throw OutOfMemory("out of memory allocating " + std::to_string(double(bytes) / double(1ull << 30)) +
                      " GiB for a [" + dims + "] " + std::string(dtype_name(dtype)) + " tensor");
  }
  t.owner_ = std::shared_ptr<void>(p, std::free);
  t.data_ = p;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  return t;
}

Tensor Tensor::wrap(std::shared_ptr<void> owner, void* data, Shape shape, DType dtype,
                    Device device) {
  Tensor t;
  t.owner_ = std::move(owner);
  t.data_ = data;
  t.shape_ = std::move(shape);
  t.dtype_ = dtype;
  t.device_ = device;
  return t;
}

Tensor Tensor::view(Shape shape) const {
  if (shape_numel(shape) != numel())
    throw std::invalid_argument("view " + shape_str(shape) + " of tensor " + shape_str(shape_));
  Tensor t = *this;
  t.shape_ = std::move(shape);
  return t;
}

Tensor Tensor::slice_rows(int64_t begin, int64_t end) const {
  if (rank() == 0 || begin < 0 || end > shape_[0] || begin > end)
    throw std::out_of_range("slice_rows out of range");
  Tensor t = *this;
  size_t row_bytes = nbytes() / (shape_[0] ? size_t(shape_[0]) : 1);
  t.data_ = static_cast<char*>(data_) + size_t(begin) * row_bytes;
  t.shape_[0] = end - begin;
  return t;
}

namespace {
double load_as_double(const void* p, DType t, int64_t i) {
  switch (t) {
    case DType::F64: return static_cast<const double*>(p)[i];
    case DType::F32: return static_cast<const float*>(p)[i];
    case DType::BF16: return bf16_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::F16: return f16_to_float(static_cast<const uint16_t*>(p)[i]);
    case DType::I64: return double(static_cast<const int64_t*>(p)[i]);
    case DType::U64: return double(static_cast<const uint64_t*>(p)[i]);
    case DType::I32: return static_cast<const int32_t*>(p)[i];
    case DType::U32: return static_cast<const uint32_t*>(p)[i];
    case DType::I16: return static_cast<const int16_t*>(p)[i];
    case DType::U16: return static_cast<const uint16_t*>(p)[i];
    case DType::I8: return static_cast<const int8_t*>(p)[i];
    case DType::U8: return static_cast<const uint8_t*>(p)[i];
    case DType::BOOL: return static_cast<const uint8_t*>(p)[i] ? 1.0 : 0.0;
  }
  return 0;
}

void store_from_double(void* p, DType t, int64_t i, double v) {
  switch (t) {
    case DType::F64: static_cast<double*>(p)[i] = v; break;
    case DType::F32: static_cast<float*>(p)[i] = float(v); break;
    case DType::BF16: static_cast<uint16_t*>(p)[i] = float_to_bf16(float(v)); break;
    case DType::F16: static_cast<uint16_t*>(p)[i] = float_to_f16(float(v)); break;
    case DType::I64: static_cast<int64_t*>(p)[i] = int64_t(v); break;
    case DType::U64: static_cast<uint64_t*>(p)[i] = uint64_t(v); break;
    case DType::I32: static_cast<int32_t*>(p)[i] = int32_t(v); break;
    case DType::U32: static_cast<uint32_t*>(p)[i] = uint32_t(v); break;
    case DType::I16: static_cast<int16_t*>(p)[i] = int16_t(v); break;
    case DType::U16: static_cast<uint16_t*>(p)[i] = uint16_t(v); break;
    case DType::I8: static_cast<int8_t*>(p)[i] = int8_t(v); break;
    case DType::U8: static_cast<uint8_t*>(p)[i] = uint8_t(v); break;
    case DType::BOOL: static_cast<uint8_t*>(p)[i] = v != 0; break;
  }
}
}  // namespace

double Tensor::get(int64_t i) const {
  if (!host_readable(device_)) throw std::logic_error("Tensor::get on a device tensor");
  return load_as_double(data_, dtype_, i);
}

Tensor Tensor::to(DType dtype) const {
  if (!host_readable(device_)) throw std::logic_error("Tensor::to on a device tensor");
  Tensor out = zeros(shape_, dtype);
  if (dtype == dtype_) {
    std::memcpy(out.data_, data_, nbytes());
    return out;
  }
  int64_t n = numel();
  // Int64 values beyond 2^53 would lose bits through double; copy integers exactly.
  if (dtype_ == DType::I64 && dtype == DType::I32) {
    for (int64_t i = 0; i < n; ++i) out.data<int32_t>()[i] = int32_t(data<int64_t>()[i]);
    return out;
  }
  for (int64_t i = 0; i < n; ++i) store_from_double(out.data_, dtype, i, load_as_double(data_, dtype_, i));
  return out;
}

}  // namespace tl
