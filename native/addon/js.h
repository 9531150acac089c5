// Node-API helpers shared by the addon: JS errors with a code, argument readers that name the bad
// field, and the per-job channel that settles promises and forwards callbacks on the JS thread.
#pragma once

#include <napi.h>

#include <cstdint>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <vector>

#include "../core/errors.h"

namespace blip3o {

Napi::Error jsError(Napi::Env env, ErrorCode code, const std::string& message);

// Runs `body`, turning any C++ exception into a JS exception with a code, so none reaches Node.
template <typename Body>
auto guarded(Napi::Env env, Body&& body) -> decltype(body()) {
  try {
    return body();
  } catch (const Napi::Error&) {
    throw;
  } catch (const Error& e) {
    throw jsError(env, e.code(), e.what());
  } catch (const std::exception& e) {
    throw jsError(env, ErrorCode::Runtime, oneLine(e.what()));
  } catch (...) {
    throw jsError(env, ErrorCode::Runtime, "unknown native error");
  }
}

// Readers of request fields; `where` prefixes messages ("generate: req.seeds[1] must be ...").
class Args {
 public:
  Args(Napi::Object obj, std::string where) : obj_(obj), where_(std::move(where)) {}
  static Args of(const Napi::Value& value, const std::string& where);  // value must be an object

  Napi::Value get(const char* key) const { return obj_.Get(key); }
  std::string string(const char* key) const;
  double number(const char* key) const;                                       // finite
  bool boolean(const char* key) const;
  int64_t integer(const char* key, int64_t min, int64_t max) const;           // safe integer in range
  uint64_t seed(const char* key) const;                                       // integer in [0, 2^53)
  std::vector<double> numbers(const char* key) const;                         // finite numbers
  std::vector<int64_t> integers(const char* key, int64_t min, int64_t max) const;
  std::vector<uint64_t> seeds(const char* key) const;
  std::vector<std::vector<int64_t>> integerLists(const char* key, int64_t min, int64_t max) const;
  std::vector<float> float32Array(const char* key) const;

 private:
  [[noreturn]] void fail(const std::string& field, const std::string& what) const;
  Napi::Object obj_;
  std::string where_;
};

// Open while the job's thread-safe function exists. Node deletes a TSFN when the environment is torn
// down, even if a worker still holds it, so workers post only under this lock while it is open.
struct JobGate {
  std::mutex mutex;
  bool open = true;
};

// What a job's promise and callback need on the JS thread; deleted there when the job's channel closes.
struct JobState {
  explicit JobState(Napi::Env env) : deferred(Napi::Promise::Deferred::New(env)) {}
  Napi::Promise::Deferred deferred;
  Napi::FunctionReference callback;   // onProgress / onToken, when given
  Napi::ObjectReference owner;        // keeps the NativeModel alive while the job runs
  std::shared_ptr<void> keepAlive;    // JS-thread-owned C++ state (the model handle during load)
  std::shared_ptr<JobGate> gate = std::make_shared<JobGate>();
};

using JobMessage = std::function<void(Napi::Env, JobState&)>;
void deliver(Napi::Env env, Napi::Function, JobState* state, JobMessage* message);
using JobTsfn = Napi::TypedThreadSafeFunction<JobState, JobMessage, deliver>;

// A thread-safe way from a worker thread to one job's JobState. Calls never block; `finish` sends
// the last message and releases the channel, so an idle process can exit.
class JobChannel {
 public:
  static JobChannel open(Napi::Env env, JobState* state, const char* name);
  void post(JobMessage message) const;
  void finish(JobMessage message) const;
  // Settles the promise with an error (code + message), on the JS thread.
  void fail(const Error& error) const;

 private:
  void send(JobMessage message, bool last) const;
  JobTsfn tsfn_;
  std::shared_ptr<JobGate> gate_;
};

}  // namespace blip3o
