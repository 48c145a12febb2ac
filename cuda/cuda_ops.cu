// CudaOps plumbing: error checks, device memory, host <-> device transfers.
#include <cstring>

#include "cuda/cuda_util.cuh"
#include "cuda/gemm_lt.h"

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

namespace {
// The current device's default memory pool, its release threshold raised once per device
// (by default a pool trims back to the driver at every synchronisation, which would turn
// each step's temporaries into fresh driver allocations again).
cudaMemPool_t pool() {
  static int configured = -1;
  int dev = 0;
  TL_CUDA_CHECK(cudaGetDevice(&dev));
  cudaMemPool_t p;
  TL_CUDA_CHECK(cudaDeviceGetDefaultMemPool(&p, dev));
  if (configured != dev) {
    uint64_t keep_all = UINT64_MAX;
    TL_CUDA_CHECK(cudaMemPoolSetAttribute(p, cudaMemPoolAttrReleaseThreshold, &keep_all));
    configured = dev;
  }
  return p;
}
}  // namespace

__global__ void add_sum_in_order_kernel(const double* x, int64_t n, double* acc) {
  if (blockIdx.x != 0 || threadIdx.x != 0) return;
  double s = 0;
  for (int64_t i = 0; i < n; ++i) s += x[i];
  *acc += s;
}

void add_sum_in_order(const double* x, int64_t n, double* acc) {
  add_sum_in_order_kernel<<<1, 1>>>(x, n, acc);
  TL_CUDA_LAUNCHED("add_sum_in_order_kernel");
}

std::shared_ptr<void> device_alloc(size_t bytes) {
  void* p = nullptr;
  TL_CUDA_CHECK(cudaMallocFromPoolAsync(&p, bytes ? bytes : 1, pool(), 0));
  // A deleter must not throw; a failing cudaFreeAsync (e.g. at process exit) is ignored.
  return std::shared_ptr<void>(p, [](void* q) { (void)cudaFreeAsync(q, 0); });
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

CudaOps::CudaOps(DType act, CudaMatmul matmul) : act_(act), matmul_(matmul) {
  require(act == DType::F32 || act == DType::F64 || act == DType::BF16, "activation dtype must be F32, F64 or BF16");
  // bf16 activations are only ever multiplied as bf16 (tensor cores, fp32 compute).
  require(act != DType::BF16 || matmul == CudaMatmul::Bf16, "BF16 activations need CudaMatmul::Bf16");
}

CudaOps::~CudaOps() {
  lt_.reset();
  if (blas_) (void)cublasDestroy(blas_);
}

cuda::LtGemm& CudaOps::lt() {
  if (!lt_) lt_ = std::make_unique<cuda::LtGemm>();
  return *lt_;
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

CudaMemory CudaOps::memory() {
  cudaMemPool_t p = cuda::pool();
  uint64_t v[4] = {};
  const cudaMemPoolAttr attrs[4] = {cudaMemPoolAttrUsedMemCurrent, cudaMemPoolAttrUsedMemHigh,
                                    cudaMemPoolAttrReservedMemCurrent, cudaMemPoolAttrReservedMemHigh};
  for (int i = 0; i < 4; ++i) TL_CUDA_CHECK(cudaMemPoolGetAttribute(p, attrs[i], &v[i]));
  size_t free_b = 0, total_b = 0;
  TL_CUDA_CHECK(cudaMemGetInfo(&free_b, &total_b));
  return {v[0], v[1], v[2], v[3], total_b - free_b, total_b};
}

void CudaOps::reset_peak_memory() {
  cudaMemPool_t p = cuda::pool();
  uint64_t zero = 0;  // the only value CUDA accepts: the high-water marks restart from now
  TL_CUDA_CHECK(cudaMemPoolSetAttribute(p, cudaMemPoolAttrUsedMemHigh, &zero));
  TL_CUDA_CHECK(cudaMemPoolSetAttribute(p, cudaMemPoolAttrReservedMemHigh, &zero));
}

Tensor CudaOps::zeros(Shape shape, DType dtype) {
  size_t bytes = size_t(shape_numel(shape)) * dtype_size(dtype);
  std::shared_ptr<void> mem = cuda::device_alloc(bytes);
  TL_CUDA_CHECK(cudaMemsetAsync(mem.get(), 0, bytes, 0));
  void* p = mem.get();
  return Tensor::wrap(std::move(mem), p, std::move(shape), dtype, Device::CUDA);
}

Tensor CudaOps::empty(Shape shape, DType dtype) {
  std::shared_ptr<void> mem = cuda::device_alloc(size_t(shape_numel(shape)) * dtype_size(dtype));
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
