// A contiguous, typed n-d array with shared storage. Views (reshape, row slices, mmap'ed
// safetensors entries) share the owner and copy nothing.
#pragma once
#include <memory>
#include <stdexcept>
#include <string>

#include "core/dtype.h"

namespace tl {

// Strict: host memory that counts as device memory (CPU backend's strict-device mode, used
// by tests to prove the trainer never touches device data from the host): its data
// accessors throw unless a DeviceAccess scope (held only inside that backend) is open.
enum class Device : uint8_t { CPU, CUDA, Strict };

// While one is alive, Strict tensors' data may be read and written (the strict backend opens
// one around each of its operations). Process-wide rather than thread-local so the
// backend's OpenMP workers are covered too.
class DeviceAccess {
 public:
  DeviceAccess();
  ~DeviceAccess();
  DeviceAccess(const DeviceAccess&) = delete;
  DeviceAccess& operator=(const DeviceAccess&) = delete;
  static bool open();
};

class Tensor {
 public:
  Tensor() = default;

  // Fresh zero-initialised host memory.
  static Tensor zeros(Shape shape, DType dtype);
  // Fresh host memory with unspecified contents, for an output the next op overwrites
  // whole (torch.empty): skips zeros' memset. Under poison_uninitialized it is filled with
  // all-ones bytes instead (NaN in every float dtype), so that a read before the write
  // shows up in any test's values.
  static Tensor uninitialized(Shape shape, DType dtype);
  static void poison_uninitialized(bool on);
  // Borrow memory kept alive by `owner` (an mmap, a CUDA allocation, ...).
  static Tensor wrap(std::shared_ptr<void> owner, void* data, Shape shape, DType dtype,
                     Device device = Device::CPU);

  bool defined() const { return owner_ != nullptr || data_ != nullptr; }
  DType dtype() const { return dtype_; }
  Device device() const { return device_; }
  const Shape& shape() const { return shape_; }
  int rank() const { return int(shape_.size()); }
  int64_t dim(int i) const { return shape_.at(i < 0 ? i + rank() : i); }
  int64_t numel() const { return shape_numel(shape_); }
  size_t nbytes() const { return size_t(numel()) * dtype_size(dtype_); }

  void* raw() const {
    if (device_ == Device::Strict) check_access();
    return data_;
  }
  template <class T>
  T* data() const {
    if (device_ == Device::Strict) check_access();
    return static_cast<T*>(data_);
  }
  // Whether both view the same first element (never touches the data).
  bool same_data(const Tensor& o) const { return data_ == o.data_; }

  // Same storage, new shape with the same number of elements.
  Tensor view(Shape shape) const;
  // Rows [begin, end) along dimension 0.
  Tensor slice_rows(int64_t begin, int64_t end) const;
  // Host copy converted to `dtype` (float types convert with round-to-nearest-even;
  // integer types convert by value).
  Tensor to(DType dtype) const;
  Tensor clone() const { return to(dtype_); }

  // Element `i` of a float tensor as double (host only; for tests and small reads).
  double get(int64_t i) const;

 private:
  // Host memory, 64-byte aligned, contents as the allocator left them.
  static Tensor allocate(Shape shape, DType dtype);
  // Throws std::logic_error: host code touched a strict-device tensor's data.
  void check_access() const;
  std::shared_ptr<void> owner_;
  void* data_ = nullptr;
  Shape shape_;
  DType dtype_ = DType::F32;
  Device device_ = Device::CPU;
};

// The error type of every input fault torchless reports: one line naming the file, key or
// tensor at fault.
struct Error : std::runtime_error {
  using std::runtime_error::runtime_error;
};

// An allocation the system refused; the message names its size and shape, so the caller can
// say which setting to lower.
struct OutOfMemory : Error {
  using Error::Error;
};

}  // namespace tl
