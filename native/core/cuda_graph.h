// A CUDA graph of one module call on fixed input buffers: warmed up, captured once, then replayed
// every step in place of the call (one launch instead of hundreds). Against a CPU-only libtorch it is
// compiled without CUDA code and capture() reports that.
#pragma once

#include <torch/types.h>

#include <functional>
#include <memory>

namespace blip3o {

class CudaGraph {
 public:
  // Runs `call` `warmup` times on a side stream (lazy initialisation, library handles and workspaces
  // happen outside the capture), then captures one more call. `call` must read only buffers that
  // outlive the graph: a replay reads whatever they hold then. Throws Error(Runtime) saying why when
  // the call cannot be captured; the device is left usable for the eager path.
  static std::unique_ptr<CudaGraph> capture(const std::function<torch::Tensor()>& call, int warmup);
  ~CudaGraph();

  // Launches the graph on the current stream; the returned buffer is overwritten by the next replay.
  const torch::Tensor& replay();

 private:
  struct Impl;
  explicit CudaGraph(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace blip3o
