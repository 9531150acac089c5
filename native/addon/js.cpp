#include "js.h"

#include <cmath>

namespace blip3o {

namespace {
constexpr double kMaxSafe = 9007199254740992.0;  // 2^53
}

Napi::Error jsError(Napi::Env env, ErrorCode code, const std::string& message) {
  Napi::Error error = Napi::Error::New(env, message);
  error.Set("code", Napi::String::New(env, codeName(code)));
  return error;
}

Args Args::of(const Napi::Value& value, const std::string& where) {
  if (!value.IsObject() || value.IsArray())
    throw Error(ErrorCode::InvalidArgument, where + " must be an object");
  return Args(value.As<Napi::Object>(), where);
}

void Args::fail(const std::string& field, const std::string& what) const {
  throw Error(ErrorCode::InvalidArgument, where_ + "." + field + " " + what);
}

std::string Args::string(const char* key) const {
  Napi::Value v = get(key);
  if (!v.IsString()) fail(key, "must be a string");
  return v.As<Napi::String>().Utf8Value();
}

bool Args::boolean(const char* key) const {
  Napi::Value v = get(key);
  if (!v.IsBoolean()) fail(key, "must be a boolean");
  return v.As<Napi::Boolean>().Value();
}

double Args::number(const char* key) const {
  Napi::Value v = get(key);
  double d = v.IsNumber() ? v.As<Napi::Number>().DoubleValue() : NAN;
  if (!std::isfinite(d)) fail(key, "must be a finite number");
  return d;
}

static bool readInteger(const Napi::Value& v, int64_t min, int64_t max, int64_t& out) {
  if (!v.IsNumber()) return false;
  double d = v.As<Napi::Number>().DoubleValue();
  if (!std::isfinite(d) || std::floor(d) != d || d < double(min) || d > double(max)) return false;
  out = int64_t(d);
  return true;
}

static std::string range(int64_t min, int64_t max) {
  return "an integer in [" + std::to_string(min) + ", " + std::to_string(max) + "]";
}

int64_t Args::integer(const char* key, int64_t min, int64_t max) const {
  int64_t n;
  if (!readInteger(get(key), min, max, n)) fail(key, "must be " + range(min, max));
  return n;
}

uint64_t Args::seed(const char* key) const {
  int64_t n;
  if (!readInteger(get(key), 0, int64_t(kMaxSafe) - 1, n)) fail(key, "must be an integer in [0, 2^53)");
  return uint64_t(n);
}

std::vector<double> Args::numbers(const char* key) const {
  Napi::Value v = get(key);
  if (!v.IsArray()) fail(key, "must be an array of numbers");
  Napi::Array a = v.As<Napi::Array>();
  std::vector<double> out(a.Length());
  for (uint32_t i = 0; i < a.Length(); ++i) {
    Napi::Value e = a.Get(i);
    double d = e.IsNumber() ? e.As<Napi::Number>().DoubleValue() : NAN;
    if (!std::isfinite(d)) fail(std::string(key) + "[" + std::to_string(i) + "]", "must be a finite number");
    out[i] = d;
  }
  return out;
}

static std::vector<int64_t> integerArray(const Napi::Value& v, int64_t min, int64_t max,
                                         const std::function<void(const std::string&, const std::string&)>& fail,
                                         const std::string& field) {
  if (!v.IsArray()) fail(field, "must be an array of integers");
  Napi::Array a = v.As<Napi::Array>();
  std::vector<int64_t> out(a.Length());
  for (uint32_t i = 0; i < a.Length(); ++i)
    if (!readInteger(a.Get(i), min, max, out[i])) fail(field + "[" + std::to_string(i) + "]", "must be " + range(min, max));
  return out;
}

std::vector<int64_t> Args::integers(const char* key, int64_t min, int64_t max) const {
  return integerArray(get(key), min, max, [this](auto& f, auto& w) { fail(f, w); }, key);
}

std::vector<uint64_t> Args::seeds(const char* key) const {
  std::vector<int64_t> n = integers(key, 0, int64_t(kMaxSafe) - 1);
  return std::vector<uint64_t>(n.begin(), n.end());
}

std::vector<std::vector<int64_t>> Args::integerLists(const char* key, int64_t min, int64_t max) const {
  Napi::Value v = get(key);
  if (!v.IsArray()) fail(key, "must be an array of integer arrays");
  Napi::Array a = v.As<Napi::Array>();
  std::vector<std::vector<int64_t>> out;
  for (uint32_t i = 0; i < a.Length(); ++i)
    out.push_back(integerArray(a.Get(i), min, max, [this](auto& f, auto& w) { fail(f, w); },
                               std::string(key) + "[" + std::to_string(i) + "]"));
  return out;
}

std::vector<float> Args::float32Array(const char* key) const {
  Napi::Value v = get(key);
  if (!v.IsTypedArray() || v.As<Napi::TypedArray>().TypedArrayType() != napi_float32_array)
    fail(key, "must be a Float32Array");
  Napi::Float32Array a = v.As<Napi::Float32Array>();
  return std::vector<float>(a.Data(), a.Data() + a.ElementLength());
}

void deliver(Napi::Env env, Napi::Function, JobState* state, JobMessage* message) {
  std::unique_ptr<JobMessage> owned(message);
  if (env == nullptr || !owned || !state) return;  // the environment is shutting down
  try {
    (*owned)(env, *state);
  } catch (const Napi::Error& e) {
    // A throwing progress/token callback becomes an uncaught exception, like a throwing event
    // listener. While a worker is being terminated nothing can be thrown, and this is a no-op.
    if (!e.IsEmpty()) napi_throw(env, e.Value());
  } catch (const std::exception& e) {
    napi_throw_error(env, codeName(ErrorCode::Runtime), e.what());
  }
}

JobChannel JobChannel::open(Napi::Env env, JobState* state, const char* name) {
  JobChannel channel;
  channel.gate_ = state->gate;
  channel.tsfn_ = JobTsfn::New(env, name, 0, 1, state, [](Napi::Env, void*, JobState* s) {
    {
      std::lock_guard<std::mutex> lock(s->gate->mutex);
      s->gate->open = false;
    }
    delete s;  // outside the lock: this may drop a model handle and join its thread
  });
  return channel;
}

void JobChannel::send(JobMessage message, bool last) const {
  auto* owned = new JobMessage(std::move(message));
  std::lock_guard<std::mutex> lock(gate_->mutex);
  if (!gate_->open || tsfn_.NonBlockingCall(owned) != napi_ok) delete owned;  // nobody is listening
  if (gate_->open && last) tsfn_.Release();
}

void JobChannel::post(JobMessage message) const { send(std::move(message), false); }

void JobChannel::finish(JobMessage message) const { send(std::move(message), true); }

void JobChannel::fail(const Error& error) const {
  ErrorCode code = error.code();
  std::string text = error.what();
  finish([code, text](Napi::Env env, JobState& s) { s.deferred.Reject(jsError(env, code, text).Value()); });
}

}  // namespace blip3o
