#include "native_model.h"

#include "js.h"

namespace blip3o {

void ModelHandle::disposeSync() {
  if (!disposed) {
    disposed = true;
    executor->shutdown([this] { model.reset(); });
  }
  executor->join();
}

uint64_t nextJobId() {
  static std::atomic<uint64_t> next{1};
  return next++;
}

Napi::Function NativeModel::define(Napi::Env env) {
  return DefineClass(env, "NativeModel",
                     {InstanceAccessor<&NativeModel::manifest>("manifest", napi_enumerable),
                      InstanceAccessor<&NativeModel::bundleDir>("bundleDir", napi_enumerable),
                      InstanceAccessor<&NativeModel::device>("device", napi_enumerable),
                      InstanceAccessor<&NativeModel::dtype>("dtype", napi_enumerable),
                      InstanceAccessor<&NativeModel::threads>("threads", napi_enumerable),
                      InstanceAccessor<&NativeModel::cudaGraphs>("cudaGraphs", napi_enumerable),
                      InstanceMethod<&NativeModel::prepareNegative>("prepareNegative"),
                      InstanceMethod<&NativeModel::generate>("generate"),
                      InstanceMethod<&NativeModel::describe>("describe"),
                      InstanceMethod<&NativeModel::cancel>("cancel"),
                      InstanceMethod<&NativeModel::dispose>("dispose")});
}

NativeModel::NativeModel(const Napi::CallbackInfo& info) : Napi::ObjectWrap<NativeModel>(info) {}

// Collected without dispose(): the executor is idle (running jobs hold a reference), so this is quick.
NativeModel::~NativeModel() {
  if (handle_) handle_->disposeSync();
}

void NativeModel::attach(std::shared_ptr<ModelHandle> handle) { handle_ = std::move(handle); }

Model& NativeModel::live(Napi::Env env, const char* method) {
  if (!handle_ || handle_->disposed || !handle_->model)
    throw jsError(env, ErrorCode::Disposed, std::string(method) + ": the model has been disposed");
  return *handle_->model;
}

Napi::Value NativeModel::manifest(const Napi::CallbackInfo& info) {
  return handle_ ? Napi::String::New(info.Env(), handle_->manifest) : info.Env().Undefined();
}
Napi::Value NativeModel::bundleDir(const Napi::CallbackInfo& info) {
  return handle_ ? Napi::String::New(info.Env(), handle_->bundleDir) : info.Env().Undefined();
}
Napi::Value NativeModel::device(const Napi::CallbackInfo& info) {
  return handle_ ? Napi::String::New(info.Env(), handle_->device) : info.Env().Undefined();
}
Napi::Value NativeModel::dtype(const Napi::CallbackInfo& info) {
  return handle_ ? Napi::String::New(info.Env(), handle_->dtype) : info.Env().Undefined();
}
Napi::Value NativeModel::cudaGraphs(const Napi::CallbackInfo& info) {
  if (!handle_ || !handle_->graphStatus) return info.Env().Undefined();
  GraphStatus::Text text = handle_->graphStatus->get();
  Napi::Object out = Napi::Object::New(info.Env());
  out.Set("dit", text.dit);
  out.Set("decode", text.decode);
  return out;
}
Napi::Value NativeModel::threads(const Napi::CallbackInfo& info) {
  return handle_ ? Napi::Number::New(info.Env(), handle_->executor->threads()) : info.Env().Undefined();
}

namespace {

struct Nothing {};
constexpr int64_t kMaxSafeInt = (int64_t(1) << 53) - 1;

// Core validation errors name the field without the request; say which call they belong to.
template <typename Req>
void validateFor(const char* method, const Manifest& manifest, const Req& req) {
  try {
    validate(manifest, req);
  } catch (const Error& e) {
    throw Error(e.code(), std::string(method) + ": req." + e.what());
  }
}

DitSampling readDit(const Args& a) {
  DitSampling dit;
  dit.sigmas = a.numbers("ditSigmas");
  dit.timesteps = a.numbers("ditTimesteps");
  dit.cfg = a.number("ditCfg");
  dit.eta = a.number("ditEta");
  return dit;
}

Napi::Value optionalCallback(const Napi::CallbackInfo& info, size_t index, const char* what) {
  Napi::Value v = info[index];
  if (!v.IsUndefined() && !v.IsNull() && !v.IsFunction())
    throw Error(ErrorCode::InvalidArgument, std::string(what) + " must be a function when given");
  return v;
}

}  // namespace

template <typename Result>
Napi::Value NativeModel::startJob(Napi::Env env, const char* name, Napi::Value callback,
                                  std::function<Result(Model&, const JobHooks&)> work,
                                  std::function<Napi::Value(Napi::Env, Result&)> toJs, bool tokenCallback) {
  Model* model = handle_->model.get();
  auto* state = new JobState(env);
  const bool hasCallback = callback.IsFunction();
  if (hasCallback) state->callback = Napi::Persistent(callback.As<Napi::Function>());
  state->owner = Napi::Persistent(Value());
  Napi::Promise promise = state->deferred.Promise();
  JobChannel channel = JobChannel::open(env, state, name);
  auto result = std::make_shared<Result>();
  const uint64_t id = nextJobId();

  auto run = [=](const std::function<void()>& check) {
    JobHooks hooks;
    hooks.check = check;
    if (hasCallback && !tokenCallback)
      hooks.progress = [channel](const char* stage, int step, int total) {
        std::string s = stage;
        channel.post([s, step, total](Napi::Env env, JobState& st) {
          st.callback.Call({Napi::String::New(env, s), Napi::Number::New(env, step), Napi::Number::New(env, total)});
        });
      };
    if (hasCallback && tokenCallback)
      hooks.token = [channel](int64_t token) {
        channel.post([token](Napi::Env env, JobState& st) { st.callback.Call({Napi::Number::New(env, double(token))}); });
      };
    *result = work(*model, hooks);
  };
  auto done = [channel, result, toJs](const Error* error) {
    if (error)
      channel.fail(*error);
    else
      channel.finish([result, toJs](Napi::Env env, JobState& st) { st.deferred.Resolve(toJs(env, *result)); });
  };
  handle_->executor->submit(id, run, done);

  Napi::Object job = Napi::Object::New(env);
  job.Set("id", Napi::Number::New(env, double(id)));
  job.Set("promise", promise);
  return job;
}

Napi::Value NativeModel::prepareNegative(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    Model& model = live(env, "prepareNegative");
    Args a = Args::of(info[0], "prepareNegative: req");
    auto req = std::make_shared<NegativeRequest>();
    req->ids = a.integers("ids", 0, kMaxSafeInt);
    req->seed = a.seed("seed");
    req->dit = readDit(a);
    validateFor("prepareNegative", model.manifest(), *req);
    return startJob<Nothing>(
        env, "blip3o.prepareNegative", env.Undefined(),
        [req](Model& m, const JobHooks& hooks) {
          m.prepareNegative(*req, hooks);
          return Nothing{};
        },
        [](Napi::Env env, Nothing&) { return env.Undefined(); }, false);
  });
}

Napi::Value NativeModel::generate(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    Model& model = live(env, "generate");
    Args a = Args::of(info[0], "generate: req");
    auto req = std::make_shared<GenerateRequest>();
    req->prompts = a.integerLists("prompts", 0, kMaxSafeInt);
    req->seeds = a.seeds("seeds");
    req->dit = readDit(a);
    req->decoderSigmas = a.numbers("decoderSigmas");
    req->decoderTimesteps = a.numbers("decoderTimesteps");
    req->decoderInitSigma = a.number("decoderInitSigma");
    req->decoderCfg = a.number("decoderCfg");
    Napi::Value onProgress = optionalCallback(info, 1, "generate: onProgress");
    validateFor("generate", model.manifest(), *req);
    return startJob<GenerateResult>(
        env, "blip3o.generate", onProgress,
        [req](Model& m, const JobHooks& hooks) { return m.generate(*req, hooks); },
        [](Napi::Env env, GenerateResult& r) -> Napi::Value {
          Napi::Object out = Napi::Object::New(env);
          // A copy, not an external buffer: runtimes with a V8 sandbox (Electron) refuse those.
          out.Set("pixels", Napi::Buffer<uint8_t>::Copy(env, r.pixels.data(), r.pixels.size()));
          out.Set("count", Napi::Number::New(env, double(r.count)));
          out.Set("width", Napi::Number::New(env, double(r.width)));
          out.Set("height", Napi::Number::New(env, double(r.height)));
          Napi::Object t = Napi::Object::New(env);
          t.Set("conditionMs", r.conditionMs);
          t.Set("ditMs", r.ditMs);
          t.Set("decoderMs", r.decoderMs);
          t.Set("vaeMs", r.vaeMs);
          t.Set("totalMs", r.totalMs);
          t.Set("conditionCallMs", r.conditionCallMs);
          t.Set("ditCallMs", r.ditCallMs);
          t.Set("decoderCallMs", r.decoderCallMs);
          t.Set("vaeCallMs", r.vaeCallMs);
          auto list = [env](const std::vector<double>& v) {
            Napi::Array a = Napi::Array::New(env, v.size());
            for (size_t i = 0; i < v.size(); ++i) a.Set(uint32_t(i), Napi::Number::New(env, v[i]));
            return a;
          };
          t.Set("ditStepMs", list(r.ditStepMs));
          t.Set("decoderStepMs", list(r.decoderStepMs));
          out.Set("timings", t);
          return out;
        },
        false);
  });
}

Napi::Value NativeModel::describe(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&] {
    Model& model = live(env, "describe");
    Args a = Args::of(info[0], "describe: req");
    auto req = std::make_shared<DescribeRequest>();
    req->ids = a.integers("ids", 0, kMaxSafeInt);
    req->pixels = a.float32Array("pixels");
    req->height = a.integer("height", 0, 1 << 16);
    req->width = a.integer("width", 0, 1 << 16);
    req->maxTokens = a.integer("maxTokens", 1, 1 << 24);
    req->temperature = a.number("temperature");
    req->topK = a.integer("topK", 0, kMaxSafeInt);
    req->topP = a.number("topP");
    req->seed = a.seed("seed");
    req->stopIds = a.integers("stopIds", 0, kMaxSafeInt);
    Napi::Value onToken = optionalCallback(info, 1, "describe: onToken");
    validateFor("describe", model.manifest(), *req);
    return startJob<DescribeResult>(
        env, "blip3o.describe", onToken,
        [req](Model& m, const JobHooks& hooks) { return m.describe(*req, hooks); },
        [](Napi::Env env, DescribeResult& r) -> Napi::Value {
          Napi::Object out = Napi::Object::New(env);
          Napi::Array tokens = Napi::Array::New(env, r.tokens.size());
          for (size_t i = 0; i < r.tokens.size(); ++i) tokens.Set(uint32_t(i), Napi::Number::New(env, double(r.tokens[i])));
          out.Set("tokens", tokens);
          out.Set("stopReason", r.stopped ? "stop" : "length");
          out.Set("promptTokens", Napi::Number::New(env, double(r.promptTokens)));
          out.Set("prefillMs", r.prefillMs);
          out.Set("decodeMs", r.decodeMs);
          return out;
        },
        true);
  });
}

Napi::Value NativeModel::cancel(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    double id = info[0].IsNumber() ? info[0].As<Napi::Number>().DoubleValue() : -1;
    if (!(id >= 1 && id <= double(kMaxSafeInt)) || id != double(int64_t(id)))
      throw Error(ErrorCode::InvalidArgument, "cancel: jobId must be a positive integer");
    if (handle_ && !handle_->disposed) handle_->executor->cancel(uint64_t(id));  // unknown ids: nothing to do
    return env.Undefined();
  });
}

Napi::Value NativeModel::dispose(const Napi::CallbackInfo& info) {
  Napi::Env env = info.Env();
  return guarded(env, [&]() -> Napi::Value {
    if (!disposed_.IsEmpty()) return disposed_.Value();
    auto* state = new JobState(env);
    state->owner = Napi::Persistent(Value());
    Napi::Promise promise = state->deferred.Promise();
    disposed_ = Napi::Persistent(promise);
    JobChannel channel = JobChannel::open(env, state, "blip3o.dispose");
    if (!handle_ || handle_->disposed) {
      channel.finish([](Napi::Env env, JobState& st) { st.deferred.Resolve(env.Undefined()); });
      return promise;
    }
    // The worker frees the modules after its last job; the JS thread then joins it (already exiting).
    ModelHandle* h = handle_.get();
    h->disposed = true;
    h->executor->shutdown([h, channel] {
      h->model.reset();
      channel.finish([h](Napi::Env env, JobState& st) {
        h->executor->join();
        st.deferred.Resolve(env.Undefined());
      });
    });
    return promise;
  });
}

}  // namespace blip3o
