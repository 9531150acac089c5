// The NativeModel JS class: one loaded bundle, its executor thread, and the jobs run on it.
#pragma once

#include <napi.h>

#include <atomic>
#include <memory>

#include "../core/executor.h"
#include "../core/model.h"

namespace blip3o {

// Owned only by JS-thread objects (the NativeModel, a pending load), so it is never destroyed on its
// own worker thread; worker closures use raw pointers into it, valid until disposeSync() joins.
struct ModelHandle {
  explicit ModelHandle(int threads) : executor(std::make_unique<Executor>(threads)) {}
  ~ModelHandle() { disposeSync(); }
  // Cancels every job (BLIP3O_DISPOSED), frees the modules on the worker, joins it. Idempotent.
  void disposeSync();

  std::unique_ptr<Executor> executor;
  std::unique_ptr<Model> model;  // written by the load job, freed on the worker by shutdown
  std::string manifest, bundleDir, device, dtype;  // copied at load, readable after dispose
  std::shared_ptr<const GraphStatus> graphStatus;  // likewise (updated while the model runs)
  bool disposed = false;         // JS thread only
};

uint64_t nextJobId();

class NativeModel : public Napi::ObjectWrap<NativeModel> {
 public:
  static Napi::Function define(Napi::Env env);
  explicit NativeModel(const Napi::CallbackInfo& info);
  ~NativeModel() override;
  void attach(std::shared_ptr<ModelHandle> handle);

 private:
  Napi::Value manifest(const Napi::CallbackInfo& info);
  Napi::Value bundleDir(const Napi::CallbackInfo& info);
  Napi::Value device(const Napi::CallbackInfo& info);
  Napi::Value dtype(const Napi::CallbackInfo& info);
  Napi::Value threads(const Napi::CallbackInfo& info);
  Napi::Value cudaGraphs(const Napi::CallbackInfo& info);
  Napi::Value prepareNegative(const Napi::CallbackInfo& info);
  Napi::Value generate(const Napi::CallbackInfo& info);
  Napi::Value describe(const Napi::CallbackInfo& info);
  Napi::Value cancel(const Napi::CallbackInfo& info);
  Napi::Value dispose(const Napi::CallbackInfo& info);

  Model& live(Napi::Env env, const char* method);  // throws BLIP3O_DISPOSED after dispose
  template <typename Result>
  Napi::Value startJob(Napi::Env env, const char* name, Napi::Value callback,
                       std::function<Result(Model&, const JobHooks&)> work,
                       std::function<Napi::Value(Napi::Env, Result&)> toJs, bool tokenCallback);

  std::shared_ptr<ModelHandle> handle_;
  Napi::Reference<Napi::Promise> disposed_;  // the promise of the first dispose()
};

}  // namespace blip3o
