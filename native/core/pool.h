// CPU threading: the worker pool that runs a batch's per-sample module calls concurrently, and the
// thread settings of libtorch and BLAS that the pool and the executor rely on.
#pragma once

#include <array>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <functional>
#include <mutex>
#include <thread>
#include <vector>

namespace blip3o {

// The default number of CPU threads of a model: the machine's cores, at most 8.
int defaultThreads();

// Sets this thread's ATen intra-op threads (MKL follows them), and, for a libtorch built on OpenBLAS,
// OpenBLAS's (process-wide) to 1: OpenBLAS's pool does not follow ATen's, and both busy-wait on the same cores.
void setComputeThreads(int n);

// `size` compute threads for one caller: the caller itself plus size - 1 workers, each with one
// intra-op thread, c10::InferenceMode and the graph executor's re-optimisation off (the settings of
// the executor thread, the caller). Every sample's calls thus run with the same single-thread
// settings, wherever they run, so a sample's bytes depend neither on its batch nor on `size`.
class WorkerPool {
 public:
  explicit WorkerPool(int size);
  ~WorkerPool();
  WorkerPool(const WorkerPool&) = delete;
  WorkerPool& operator=(const WorkerPool&) = delete;

  // Runs task(0) .. task(count - 1) on the caller and the workers, returns when all are done and
  // rethrows the first exception a task threw. One run at a time (the executor thread calls it).
  // `widen`: a lone task runs on the caller with every thread of the pool as intra-op threads (for
  // calls whose bytes do not depend on the thread count; see bindConvolutions in model.cpp): ATen's and
  // oneDNN's, and with `widenBlas` MKL's too (whose GEMMs round differently at other thread counts for
  // many shapes: only for a module checked to give the same bytes).
  void run(int count, const std::function<void(int)>& task, bool widen = false, bool widenBlas = false);
  int size() const { return int(threads_.size()) + 1; }

 private:
  void loop();
  void work(std::unique_lock<std::mutex>& lock);

  // Spins up to kSpinNs for `counter` to leave `seen` before the caller blocks: a DiT step hands work
  // to a worker and back every 2-3 ms, and a futex wake-up costs tens of microseconds each way.
  static void spinWhile(const std::atomic<uint64_t>& counter, uint64_t seen);

  std::mutex mutex_;
  std::condition_variable wake_, finished_;
  std::atomic<uint64_t> posted_{0}, finishedRuns_{0};  // runs posted to the workers, and runs finished
  const std::function<void(int)>* task_ = nullptr;
  int count_ = 0, next_ = 0, pending_ = 0;
  bool closed_ = false;
  std::exception_ptr error_;
  std::vector<std::thread> threads_;
};

// Whether a lone call that may run widened (WorkerPool::run's `widen`) should, learned from the calls'
// own times. Widening pays on idle cores (the bundled decoder's step: 17-19 against 21-22 ms on one
// thread) and loses badly when another process holds a core: OpenMP's threads wait for each other at
// every parallel region (with one core busy elsewhere: 63-77 against 20-21 ms). The bytes are the same
// either way. Each mode runs until it has kWindow times (the first call of each warms its kernels up and
// is not counted); then the mode with the lower median of its last kWindow times runs (a median: one
// stalled call does not switch modes), and the other now and then, to follow a change in load: after
// kMinExplore calls, then at twice the interval while the choice holds (at most kMaxExplore), so that a
// lasting load costs few slow calls. Not thread-safe: one caller (the executor thread).
class WidenChoice {
 public:
  static constexpr int kWindow = 3;
  static constexpr int64_t kMinExplore = 8, kMaxExplore = 128;
  bool next();
  void record(bool widened, double ms);

 private:
  double median(bool widened) const;
  std::array<double, kWindow> ms_[2] = {};
  int64_t count_[2] = {0, 0};  // calls recorded, the warm-up included
  bool best_ = true;
  int64_t interval_ = kMinExplore, since_ = 0;
};

}  // namespace blip3o
