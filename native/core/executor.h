// One worker thread per loaded model: runs its jobs in submission order, with the libtorch thread
// settings that belong to that model, and cancels them by id.
#pragma once

#include <atomic>
#include <condition_variable>
#include <cstdint>
#include <deque>
#include <functional>
#include <memory>
#include <mutex>
#include <thread>

#include "errors.h"

namespace blip3o {

// Whether inference threads run TorchScript's profiling executor: off unless BLIP3O_JIT_OPTIMIZE=1
// (see Executor::loop for why off).
bool graphExecutorOptimize();

class Executor {
 public:
  // `check` throws Error(Aborted) or Error(Disposed) once the job is cancelled; call it every step.
  using Run = std::function<void(const std::function<void()>& check)>;
  // Called exactly once per job, on the worker thread (or on the thread that cancelled a queued
  // job): nullptr on success, else the error.
  using Done = std::function<void(const Error* error)>;

  explicit Executor(int threads);  // the model's CPU threads (see pool.h); <= 0: defaultThreads()
  ~Executor();                     // shutdown() and join()

  // Queues a job; after shutdown it completes at once with Error(Disposed).
  void submit(uint64_t id, Run run, Done done);
  // A queued job completes at once with Error(Aborted); a running one at its next check.
  void cancel(uint64_t id);
  // Cancels every job with Error(Disposed) and stops the thread after the running job; `last` runs
  // on the worker thread after that job (where the model's tensors should be freed). Idempotent.
  void shutdown(std::function<void()> last = {});
  void join();  // waits for the thread; call after shutdown (not from the worker itself)
  int threads() const { return threads_; }

 private:
  struct Job {
    uint64_t id;
    Run run;
    Done done;
    std::atomic<int> cancelled{0};  // 0, or the ErrorCode + 1 to throw
  };
  void loop();

  std::mutex mutex_;
  std::condition_variable wake_;
  std::deque<std::shared_ptr<Job>> queue_;
  std::shared_ptr<Job> running_;
  std::function<void()> last_;
  bool closed_ = false;
  int threads_;
  std::thread thread_;
};

}  // namespace blip3o
