// CudaOps plumbing: error checks, device memory, host <-> device transfers.
#include <cstring>

#include "cuda/cuda_util.cuh"

namespace tl {
namespace cuda {

void check(cudaError_t e, const char* call, const char* file, int line) {
  if (e == cudaSuccess) return;
  throw std::runtime_error(std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " +
                           cudaGetErrorName(e) + ": " + cudaGetErrorString(e));
}

void check(cublasStatus_t s, const char* call, const char* file, int line) {
  if (s == CUBLAS_STATUS_SUCCESS) return;
  throw std::runtime_error(std::string(call) + " failed at " + file + ":" + std::to_string(line) + ": " +
                           cublasGetStatusName(s) + ": " + cublasGetStatusString(s));
}

void require(bool ok, const char* what) {
  if (!ok) throw std::invalid_argument(std::string("CudaOps: ") + what);
}

void require_device(const Tensor& t, const char* what) {
  if (t.device() != Device::CUDA)
    throw std::invalid_argument(std::string("CudaOps: ") + what + " must be a device tensor");
}

std::shared_ptr<void> device_alloc(size_t bytes) {
  void* p = nullptr;
  TL_CUDA_CHECK(cudaMalloc(&p, bytes ? bytes : 1));
  // A deleter must not throw; a failing cudaFree (e.g. at process exit) is ignored.
  return std::shared_ptr<void>(p, [](void* q) { (void)cudaFree(q); });
}

DeviceInts device_ints(const Tensor& t, const char* what) {
  require(t.dtype() == DType::I32, what);
  if (t.device() == Device::CUDA) return {t.data<int32_t>(), nullptr};
  DeviceInts d;
  d.keep = device_alloc(t.nbytes());
  TL_CUDA_CHECK(cudaMemcpy(d.keep.get(), t.raw(), t.nbytes(), cudaMemcpyHostToDevice));
  d.ptr = static_cast<const int32_t*>(d.keep.get());
  return d;
}

std::vector<int32_t> host_ints(const Tensor& t, const char* what) {
  require(t.dtype() == DType::I32, what);
  std::vector<int32_t> v(size_t(t.numel()));
  if (v.empty()) return v;
  if (t.device() == Device::CUDA)
    TL_CUDA_CHECK(cudaMemcpy(v.data(), t.raw(), t.nbytes(), cudaMemcpyDeviceToHost));
  else
    std::memcpy(v.data(), t.raw(), t.nbytes());
  return v;
}

}  // namespace cuda

using cuda::require;

CudaOps::CudaOps(DType act) : act_(act) {
  require(act == DType::F32 || act == DType::F64, "activation dtype must be F32 or F64");
}

CudaOps::~CudaOps() {
  if (blas_) (void)cublasDestroy(blas_);
}

bool CudaOps::available() {
  int n = 0;
  cudaError_t e = cudaGetDeviceCount(&n);
  if (e != cudaSuccess) {
    (void)cudaGetLastError();  // clear it so a later, unrelated check does not report it
    return false;
  }
  return n > 0;
}

cublasContext* CudaOps::blas() {
  if (!blas_) {
    TL_CUDA_CHECK(cublasCreate(&blas_));
    // Plain FP32/FP64 arithmetic: no TF32 or reduced-precision shortcuts, so results
    // track the CPU reference.
    TL_CUDA_CHECK(cublasSetMathMode(blas_, CUBLAS_DEFAULT_MATH));
  }
  return blas_;
}

Tensor CudaOps::zeros(Shape shape, DType dtype) {
  size_t bytes = size_t(shape_numel(shape)) * dtype_size(dtype);
  std::shared_ptr<void> mem = cuda::device_alloc(bytes);
  TL_CUDA_CHECK(cudaMemset(mem.get(), 0, bytes));
  void* p = mem.get();
  return Tensor::wrap(std::move(mem), p, std::move(shape), dtype, Device::CUDA);
}

Tensor CudaOps::upload(const Tensor& host, DType dtype) {
  Tensor h = host.to(dtype);  // converts on the host (and rejects device tensors)
  std::shared_ptr<void> mem = cuda::device_alloc(h.nbytes());
  TL_CUDA_CHECK(cudaMemcpy(mem.get(), h.raw(), h.nbytes(), cudaMemcpyHostToDevice));
  void* p = mem.get();
  return Tensor::wrap(std::move(mem), p, h.shape(), dtype, Device::CUDA);
}

Tensor CudaOps::download(const Tensor& t) {
  if (t.device() == Device::CPU) return t.clone();
  Tensor h = Tensor::zeros(t.shape(), t.dtype());
  // Synchronous on the legacy default stream: waits for every queued op first.
  TL_CUDA_CHECK(cudaMemcpy(h.raw(), t.raw(), t.nbytes(), cudaMemcpyDeviceToHost));
  return h;
}

}  // namespace tl
