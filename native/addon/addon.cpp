// Module entry: runtimeInfo(), load(), and the shutdown paths (environment cleanup hook, process
// 'exit') that stop every model's thread before Node or libtorch are torn down.
#include <napi.h>

#include <algorithm>
#include <memory>
#include <vector>

#include "js.h"
#include "native_model.h"

namespace blip3o {
namespace {

struct AddonData {
  Napi::FunctionReference modelClass;
  std::vector<std::weak_ptr<ModelHandle>> models;  // every handle created here, loading or loaded
  napi_env env = nullptr;

  static void cleanup(void* arg) {
    auto* data = static_cast<AddonData*>(arg);
    for (auto& weak : data->models)
      if (auto handle = weak.lock()) handle->disposeSync();
    data->models.clear();
  }
  ~AddonData() { napi_remove_env_cleanup_hook(env, cleanup, this); }
};

Napi::Value runtimeInfoJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    RuntimeInfo r = runtimeInfo();
    Napi::Object out = Napi::Object::New(env);
    out.Set("libtorch", r.libtorch);
    out.Set("cudaBuilt", r.cudaBuilt);
    out.Set("cudaDevices", r.cudaDevices);
    out.Set("defaultThreads", r.defaultThreads);
    return out;
  });
}

std::string oneOf(const Args& args, const char* key, std::initializer_list<const char*> options, const char* fallback) {
  if (args.get(key).IsUndefined()) return fallback;
  std::string value = args.get(key).IsString() ? args.string(key) : "";
  std::string list;
  for (const char* o : options) {
    if (value == o) return value;
    list += (list.empty() ? "'" : ", '") + std::string(o) + "'";
  }
  throw Error(ErrorCode::InvalidArgument, std::string("load: opts.") + key + " must be one of " + list);
}

Napi::Value loadJs(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    if (!info[0].IsString() || info[0].As<Napi::String>().Utf8Value().empty())
      throw Error(ErrorCode::InvalidArgument, "load: bundleDir must be a non-empty string");
    std::string dir = info[0].As<Napi::String>().Utf8Value();
    LoadOptions options;
    int threads = 0;
    if (!info[1].IsUndefined()) {
      Args opts = Args::of(info[1], "load: opts");
      options.device = oneOf(opts, "device", {"auto", "cpu", "cuda"}, "auto");
      options.dtype = oneOf(opts, "dtype", {"auto", "float32", "bfloat16", "float16"}, "auto");
      if (!opts.get("threads").IsUndefined()) threads = int(opts.integer("threads", 0, 4096));
      if (!opts.get("cudaGraphs").IsUndefined()) options.cudaGraphs = opts.boolean("cudaGraphs");
    }

    auto* data = env.GetInstanceData<AddonData>();
    auto handle = std::make_shared<ModelHandle>(threads);
    options.threads = handle->executor->threads();
    data->models.erase(std::remove_if(data->models.begin(), data->models.end(), [](auto& w) { return w.expired(); }),
                       data->models.end());
    data->models.push_back(handle);

    auto* state = new JobState(env);
    state->keepAlive = handle;  // released on the JS thread when the load settles
    Napi::Promise promise = state->deferred.Promise();
    JobChannel channel = JobChannel::open(env, state, "blip3o.load");
    ModelHandle* h = handle.get();
    h->executor->submit(
        nextJobId(),
        [h, dir, options](const std::function<void()>& check) {
          h->model = Model::load(dir, options, check);
          h->manifest = h->model->manifest().text;
          h->bundleDir = h->model->manifest().bundleDir;
          h->device = h->model->device();
          h->dtype = h->model->dtype();
          h->graphStatus = h->model->graphStatus();
        },
        [channel](const Error* error) {
          if (error) return channel.fail(*error);
          channel.finish([](Napi::Env env, JobState& st) {
            Napi::Object model = env.GetInstanceData<AddonData>()->modelClass.New({});
            NativeModel::Unwrap(model)->attach(std::static_pointer_cast<ModelHandle>(st.keepAlive));
            st.deferred.Resolve(model);
          });
        });
    return promise;
  });
}

Napi::Object init(Napi::Env env, Napi::Object exports) {
  auto* data = new AddonData();
  data->env = env;
  data->modelClass = Napi::Persistent(NativeModel::define(env));
  env.SetInstanceData(data);
  napi_add_env_cleanup_hook(env, AddonData::cleanup, data);
  // process.exit() skips the cleanup hooks and runs libtorch's static destructors under any running
  // job; its 'exit' event still comes first, so stop the models there too.
  Napi::Object process = env.Global().Get("process").As<Napi::Object>();
  process.Get("on").As<Napi::Function>().Call(
      process, {Napi::String::New(env, "exit"),
                Napi::Function::New(env, [data](const Napi::CallbackInfo&) { AddonData::cleanup(data); }, "blip3oExit")});
  exports.Set("runtimeInfo", Napi::Function::New(env, runtimeInfoJs, "runtimeInfo"));
  exports.Set("load", Napi::Function::New(env, loadJs, "load"));
  return exports;
}

}  // namespace
}  // namespace blip3o

static Napi::Object InitBlip3o(Napi::Env env, Napi::Object exports) { return blip3o::init(env, exports); }
NODE_API_MODULE(blip3o, InitBlip3o)
