#include "pool.h"

#include "executor.h"

#include <ATen/Parallel.h>
#include <c10/core/InferenceMode.h>
#include <torch/csrc/jit/python/update_graph_executor_opt.h>

#include <algorithm>
#include <utility>

namespace blip3o {

// OpenMP's and MKL's own setters, where this libtorch has them: weak, so that a libtorch without them
// still links, and resolved by the linker rather than dlsym (Node loads addons with RTLD_LOCAL, which
// keeps their libraries' symbols out of dlsym's default scope).
extern "C" void omp_set_num_threads(int) __attribute__((weak));
extern "C" int MKL_Set_Num_Threads_Local(int) __attribute__((weak));  // (mkl_service.h's C name)
extern "C" void openblas_set_num_threads(int) __attribute__((weak));

int defaultThreads() { return int(std::clamp(std::thread::hardware_concurrency(), 1u, 8u)); }

void setComputeThreads(int n) {
  // ATen initialises a thread's count lazily from the last count set by any thread; do that first,
  // so that it cannot later overwrite the count set here.
  at::internal::lazy_init_num_threads();
  at::set_num_threads(n);
  if (openblas_set_num_threads) openblas_set_num_threads(1);
}

namespace {

// This thread's OpenMP threads, without at::set_num_threads's rebuild of the process-wide pthreadpool
// (which would start threads at every call); ATen's kernels and oneDNN read the OpenMP setting. MKL keeps
// the count at::set_num_threads gave it (1, setComputeThreads) unless told per thread (`blas`).
void setOpenMpThreads(int n, bool blas) {
  if (omp_set_num_threads)
    omp_set_num_threads(n);
  else
    at::set_num_threads(n);
  if (MKL_Set_Num_Threads_Local) MKL_Set_Num_Threads_Local(blas ? n : 1);
}

}  // namespace

WorkerPool::WorkerPool(int size) {
  for (int i = 1; i < size; ++i) threads_.emplace_back([this] { loop(); });
}

WorkerPool::~WorkerPool() {
  {
    std::lock_guard<std::mutex> lock(mutex_);
    closed_ = true;
  }
  wake_.notify_all();
  for (auto& t : threads_) t.join();
}

void WorkerPool::run(int count, const std::function<void(int)>& task, bool widen, bool widenBlas) {
  if (count <= 0) return;
  if (count == 1 && widen && !threads_.empty()) {  // the workers idle meanwhile: lend their cores
    struct Restore {
      ~Restore() { setOpenMpThreads(1, false); }
    } restore;
    setOpenMpThreads(size(), widenBlas);
    task(0);
    return;
  }
  if (count == 1 || threads_.empty()) {  // nothing to share: no handoff
    for (int i = 0; i < count; ++i) task(i);
    return;
  }
  std::unique_lock<std::mutex> lock(mutex_);
  task_ = &task;
  count_ = count;
  next_ = 0;
  pending_ = count;
  error_ = nullptr;
  const uint64_t finishedBefore = finishedRuns_.load();
  posted_.fetch_add(1, std::memory_order_release);
  wake_.notify_all();
  work(lock);  // the caller takes its share too
  if (pending_ != 0) {
    lock.unlock();
    spinWhile(finishedRuns_, finishedBefore);
    lock.lock();
  }
  finished_.wait(lock, [this] { return pending_ == 0; });
  task_ = nullptr;
  if (error_) std::rethrow_exception(std::exchange(error_, nullptr));
}

void WorkerPool::work(std::unique_lock<std::mutex>& lock) {
  // Claim tasks until none is left; the other threads claim the rest concurrently.
  while (next_ < count_) {
    const int index = next_++;
    const std::function<void(int)>& task = *task_;
    lock.unlock();
    std::exception_ptr error;
    try {
      task(index);
    } catch (...) {
      error = std::current_exception();
    }
    lock.lock();
    if (error && !error_) error_ = error;
    if (--pending_ == 0) {
      finishedRuns_.fetch_add(1, std::memory_order_release);
      finished_.notify_one();
    }
  }
}

void WorkerPool::loop() {
  setComputeThreads(1);
  c10::InferenceMode inference;
  torch::jit::setGraphExecutorOptimize(graphExecutorOptimize());  // see Executor::loop
  std::unique_lock<std::mutex> lock(mutex_);
  while (true) {
    if (!closed_ && next_ >= count_) {  // nothing to claim: wait for the next run, spinning first
      const uint64_t seen = posted_.load();
      lock.unlock();
      spinWhile(posted_, seen);
      lock.lock();
    }
    wake_.wait(lock, [this] { return closed_ || next_ < count_; });
    if (closed_) return;
    work(lock);
  }
}

void WorkerPool::spinWhile(const std::atomic<uint64_t>& counter, uint64_t seen) {
  constexpr auto kSpinNs = std::chrono::nanoseconds(200000);
  const auto until = std::chrono::steady_clock::now() + kSpinNs;
  while (counter.load(std::memory_order_acquire) == seen && std::chrono::steady_clock::now() < until)
    std::this_thread::yield();
}

bool WidenChoice::next() {
  if (count_[1] <= kWindow) return true;
  if (count_[0] <= kWindow) return false;
  const bool best = median(true) <= median(false);
  if (best != best_) {
    best_ = best;
    interval_ = kMinExplore;
    since_ = 0;
  }
  if (++since_ < interval_) return best;
  since_ = 0;
  interval_ = std::min(interval_ * 2, kMaxExplore);
  return !best;
}

void WidenChoice::record(bool widened, double ms) {
  const int64_t n = count_[widened]++;
  if (n > 0) ms_[widened][(n - 1) % kWindow] = ms;
}

double WidenChoice::median(bool widened) const {
  auto v = ms_[widened];
  std::nth_element(v.begin(), v.begin() + kWindow / 2, v.end());
  return v[kWindow / 2];
}

}  // namespace blip3o
