// A loaded bundle on one device: its TorchScript modules and the generation and understanding
// pipelines (contract section 3). The libtorch types stay in model.cpp so that including this header
// is cheap. Every method runs on the model's executor thread.
#pragma once

#include <functional>
#include <memory>
#include <mutex>
#include <string>

#include "manifest.h"
#include "requests.h"

namespace blip3o {

struct LoadOptions {
  std::string device = "auto";  // auto | cpu | cuda
  std::string dtype = "auto";   // auto | float32 | bfloat16 | float16
  int threads = 1;              // CPU: how many samples of a batch run at once (one core each; a lone
                                // sample's decoder on all)
  bool cudaGraphs = true;       // CUDA: replay the DiT step and the decode step as CUDA graphs
};

// Whether the DiT loop and the decode loop replay CUDA graphs, in words (`info`). Written on the
// model's executor thread, readable from any thread, and after the model is freed.
class GraphStatus {
 public:
  struct Text { std::string dit, decode; };
  Text get() const {
    std::lock_guard<std::mutex> lock(mutex_);
    return text_;
  }
  void set(std::string Text::*which, std::string value) {
    std::lock_guard<std::mutex> lock(mutex_);
    text_.*which = std::move(value);
  }

 private:
  mutable std::mutex mutex_;
  Text text_;
};

struct RuntimeInfo {
  std::string libtorch;
  bool cudaBuilt = false;
  int cudaDevices = 0;
  int defaultThreads = 1;
};

RuntimeInfo runtimeInfo();

class Model {
 public:
  // Validates the manifest and every file's sha256, resolves device and dtype, loads and casts the
  // modules. Throws Error (Bundle, Device, InvalidArgument, Runtime); `check` may throw to stop it.
  static std::unique_ptr<Model> load(const std::string& bundleDir, const LoadOptions& options,
                                     const std::function<void()>& check = {});
  ~Model();

  const Manifest& manifest() const;
  const std::string& device() const;  // cpu | cuda
  const std::string& dtype() const;   // float32 | bfloat16 | float16
  std::shared_ptr<const GraphStatus> graphStatus() const;

  void prepareNegative(const NegativeRequest& req, const JobHooks& hooks);
  GenerateResult generate(const GenerateRequest& req, const JobHooks& hooks);
  DescribeResult describe(const DescribeRequest& req, const JobHooks& hooks);

 private:
  struct Impl;
  explicit Model(std::unique_ptr<Impl> impl);
  std::unique_ptr<Impl> impl_;
};

}  // namespace blip3o
