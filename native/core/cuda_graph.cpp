#include "cuda_graph.h"

#include "errors.h"

#ifdef BLIP3O_CUDA
#include <ATen/cuda/CUDAGraph.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_runtime_api.h>
#include <torch/cuda.h>
#endif

namespace blip3o {

#ifdef BLIP3O_CUDA

struct CudaGraph::Impl {
  at::cuda::CUDAGraph graph;
  torch::Tensor out;
};

std::unique_ptr<CudaGraph> CudaGraph::capture(const std::function<torch::Tensor()>& call, int warmup) {
  auto impl = std::make_unique<Impl>();
  // Capture needs a stream other than the default one; the inputs were written on the current stream,
  // so wait for them first. A replay then runs on the current stream, in order with the copies.
  torch::cuda::synchronize();
  c10::cuda::CUDAStream side = c10::cuda::getStreamFromPool();
  std::string why;
  {
    c10::cuda::CUDAStreamGuard guard(side);
    bool capturing = false;
    try {
      for (int i = 0; i < warmup; ++i) call();
      side.synchronize();
      // Thread-local: another model's thread may keep running eager work while this one captures.
      impl->graph.capture_begin({0, 0}, cudaStreamCaptureModeThreadLocal);
      capturing = true;
      impl->out = call();
      capturing = false;
      impl->graph.capture_end();
    } catch (const c10::Error& e) {
      why = e.what_without_backtrace();
    } catch (const std::exception& e) {
      why = e.what();
    }
    if (capturing) {  // the call threw inside the capture: end it, so the stream is usable again
      cudaGraph_t partial = nullptr;
      if (cudaStreamEndCapture(side.stream(), &partial) == cudaSuccess && partial) cudaGraphDestroy(partial);
    }
  }
  if (!why.empty()) {
    cudaGetLastError();  // a refused call during capture leaves its (non-sticky) error behind
    throw Error(ErrorCode::Runtime, "CUDA graph capture failed: " + oneLine(why));
  }
  torch::cuda::synchronize();
  return std::unique_ptr<CudaGraph>(new CudaGraph(std::move(impl)));
}

const torch::Tensor& CudaGraph::replay() {
  impl_->graph.replay();
  return impl_->out;
}

#else

struct CudaGraph::Impl {};

std::unique_ptr<CudaGraph> CudaGraph::capture(const std::function<torch::Tensor()>&, int) {
  throw Error(ErrorCode::Runtime, "this build has no CUDA graphs (compiled without BLIP3O_CUDA)");
}

const torch::Tensor& CudaGraph::replay() {
  throw Error(ErrorCode::Runtime, "this build has no CUDA graphs (compiled without BLIP3O_CUDA)");
}

#endif

CudaGraph::CudaGraph(std::unique_ptr<Impl> impl) : impl_(std::move(impl)) {}
CudaGraph::~CudaGraph() = default;

}  // namespace blip3o
