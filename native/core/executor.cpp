#include "executor.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <c10/util/Exception.h>
#include <torch/csrc/jit/python/update_graph_executor_opt.h>

#include <cstdlib>
#include <optional>
#include <string>

#include "pool.h"

namespace blip3o {

// The executor thread computes with one intra-op thread: on CPU, a model's `threads` are the
// executor thread plus its WorkerPool's workers, which run a batch's samples side by side (each
// sample's arithmetic then never depends on the batch), and one sample ran faster on one thread
// than on two here. setComputeThreads also keeps an OpenBLAS libtorch's own busy-waiting pool off these cores.
Executor::Executor(int threads) : threads_(threads > 0 ? threads : defaultThreads()) {
  thread_ = std::thread([this] {
    setComputeThreads(1);
    loop();
  });
}

Executor::~Executor() {
  shutdown();
  join();
}

void Executor::submit(uint64_t id, Run run, Done done) {
  auto job = std::make_shared<Job>();
  job->id = id;
  job->run = std::move(run);
  job->done = std::move(done);
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (!closed_) {
      queue_.push_back(std::move(job));
      wake_.notify_one();
      return;
    }
  }
  Error error(ErrorCode::Disposed, "the model has been disposed");
  job->done(&error);
}

void Executor::cancel(uint64_t id) {
  std::shared_ptr<Job> queued;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (running_ && running_->id == id) {
      running_->cancelled = int(ErrorCode::Aborted) + 1;
      return;
    }
    for (auto it = queue_.begin(); it != queue_.end(); ++it)
      if ((*it)->id == id) {
        queued = *it;
        queue_.erase(it);
        break;
      }
  }
  if (queued) {
    Error error(ErrorCode::Aborted, "the job was cancelled");
    queued->done(&error);
  }
}

void Executor::shutdown(std::function<void()> last) {
  std::deque<std::shared_ptr<Job>> dropped;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    if (closed_) return;
    closed_ = true;
    last_ = std::move(last);
    dropped.swap(queue_);
    if (running_) running_->cancelled = int(ErrorCode::Disposed) + 1;
    wake_.notify_one();
  }
  Error error(ErrorCode::Disposed, "the model has been disposed");
  for (auto& job : dropped) job->done(&error);
}

void Executor::join() {
  if (thread_.joinable() && thread_.get_id() != std::this_thread::get_id()) thread_.join();
}

bool graphExecutorOptimize() {
  const char* value = std::getenv("BLIP3O_JIT_OPTIMIZE");
  return value != nullptr && std::string(value) == "1";
}

void Executor::loop() {
  c10::InferenceMode inference;  // no autograd bookkeeping for anything run here
  // TorchScript's profiling executor re-optimises a graph after its first runs; on CUDA that changed
  // the bytes of a same-seed image between the first calls and later ones. Running the graphs as
  // exported keeps them identical from the first call (and was no slower on the tiny bundle, CPU or
  // H200). This setting is thread-local: it covers this model's thread only. BLIP3O_JIT_OPTIMIZE=1
  // turns the executor's fusion back on: fewer kernel launches per step, at the cost of that stability.
  torch::jit::setGraphExecutorOptimize(graphExecutorOptimize());
  while (true) {
    std::shared_ptr<Job> job;
    {
      std::unique_lock<std::mutex> lock(mutex_);
      wake_.wait(lock, [this] { return closed_ || !queue_.empty(); });
      if (queue_.empty()) break;  // closed
      job = queue_.front();
      queue_.pop_front();
      running_ = job;
    }
    auto check = [&job] {
      if (int c = job->cancelled.load())
        throw Error(ErrorCode(c - 1), ErrorCode(c - 1) == ErrorCode::Aborted ? "the job was cancelled"
                                                                             : "the model has been disposed");
    };
    std::optional<Error> error;
    try {
      check();
      job->run(check);
    } catch (const Error& e) {
      error = e;
    } catch (const c10::Error& e) {
      error = Error(ErrorCode::Runtime, oneLine(e.what_without_backtrace()));
    } catch (const std::exception& e) {
      error = Error(ErrorCode::Runtime, oneLine(e.what()));
    } catch (...) {
      error = Error(ErrorCode::Runtime, "unknown error in libtorch");
    }
    {
      std::lock_guard<std::mutex> lock(mutex_);
      running_.reset();
    }
    job->done(error ? &*error : nullptr);
  }
  std::function<void()> last;
  {
    std::lock_guard<std::mutex> lock(mutex_);
    last.swap(last_);
  }
  if (last) last();
}

}  // namespace blip3o
