// The worker pool behind parallel_for (see pool.h).
//
// One job at a time is posted (a parallel_for call from inside a chunk runs inline, and
// so does a call while another thread's job is posted). Workers spin briefly after a job,
// yielding the core (a spinning worker sharing a core with the caller would otherwise
// take the caller's time), then sleep on a condition variable.
#include "pool.h"

#include "busy_core.h"
#include "tuning.h"

#include <ATen/Parallel.h>
#include <pthread.h>
#include <sched.h>

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <exception>
#include <mutex>
#include <thread>
#include <vector>

namespace twolayer::cpu {

namespace {

constexpr int64_t kChunksPerThread = tuning::kPoolChunksPerThread;
constexpr auto kSpin = std::chrono::microseconds(tuning::kPoolSpinMicroseconds);

// at::parallel_for, noting how long the caller waits for the other threads of the team once
// its own share is done (busy_core.h).
void run_on_openmp(int64_t begin, int64_t end, int64_t grain, ChunkFn run, const void* f) {
  int64_t own_done = 0;
  const int64_t start = busy_core::now_ns();
  at::parallel_for(begin, end, grain, [&](int64_t b, int64_t e) {
    run(f, b, e);
    if (at::get_thread_num() == 0) own_done = busy_core::now_ns();
  });
  if (own_done) busy_core::note_wait(busy_core::now_ns() - own_done, own_done - start);
}

thread_local bool in_region = false;

struct Job {
  ChunkFn run;
  const void* f;
  int64_t begin, end, chunk, chunks;
  int max_workers;
  int64_t posted_ns = 0;
  std::atomic<int64_t> next{0}, done{0};
  std::atomic<int> joined{0};
  std::atomic<bool> failed{false};
  std::exception_ptr error;

  // Claims and runs chunks until none are left.
  void work() {
    for (int64_t c; (c = next.fetch_add(1)) < chunks;) {
      if (!failed.load()) {
        try {
          const int64_t b = begin + c * chunk;
          run(f, b, std::min(end, b + chunk));
        } catch (...) {
          if (!failed.exchange(true)) error = std::current_exception();
        }
      }
      done.fetch_add(1);
    }
  }
};

class Pool {
 public:
  static Pool& get() {
    static Pool* pool = [] {
      pthread_atfork(nullptr, nullptr, [] { Pool::get().after_fork_in_child(); });
      return new Pool;  // never destroyed: workers may outlive static destruction
    }();
    return *pool;
  }

  void run(Job& job, int workers) {
    // One job at a time: a second caller (another Python thread) runs its own job inline
    // rather than wait (the same results: they do not depend on who runs a chunk).
    std::unique_lock<std::mutex> one_job(post_mutex_, std::try_to_lock);
    if (!one_job.owns_lock()) {
      in_region = true;
      job.work();
      in_region = false;
      return;
    }
    grow(workers);
    {
      std::lock_guard<std::mutex> lock(mutex_);
      current_.store(&job);
      generation_.fetch_add(1);
    }
    const bool woken = sleeping_.load() > 0;
    if (woken) wake_.notify_all();
    in_region = true;
    job.work();
    in_region = false;
    // Chunks claimed by workers that are running: wait for those alone.
    const int64_t own_done = busy_core::now_ns();
    while (job.done.load() < job.chunks) std::this_thread::yield();
    const int64_t t = busy_core::now_ns();
    // A worker that never came while the caller did every chunk, or one that kept it
    // waiting for a chunk it had claimed, lost its core (busy_core.h).
    if (job.joined.load() == 0)
      busy_core::note_no_worker(t - job.posted_ns, woken);
    else
      busy_core::note_wait(t - own_done, own_done - job.posted_ns);
    current_.store(nullptr);
    while (active_.load() != 0) std::this_thread::yield();  // none still holds &job
  }

 private:
  void grow(int workers) {
    // Never joined nor destroyed: the workers live as long as the process.
    while (int(threads_.size()) < workers)
      threads_.push_back(new std::thread([this] { worker(); }));
  }

  void worker() {
    pthread_detach(pthread_self());
    in_region = true;
    uint64_t seen = generation_.load();
    for (;;) {
      // Spin a little (yielding the core), then sleep until the next job.
      const auto until = std::chrono::steady_clock::now() + kSpin;
      while (generation_.load() == seen && std::chrono::steady_clock::now() < until) sched_yield();
      if (generation_.load() == seen) {
        std::unique_lock<std::mutex> lock(mutex_);
        sleeping_.fetch_add(1);
        wake_.wait(lock, [&] { return generation_.load() != seen; });
        sleeping_.fetch_sub(1);
      }
      seen = generation_.load();
      active_.fetch_add(1);
      Job* job = current_.load();
      if (job && job->joined.fetch_add(1) < job->max_workers) job->work();
      active_.fetch_sub(1);
    }
  }

  void after_fork_in_child() {
    // The child has no workers (fork copies only the calling thread): start afresh.
    new (&post_mutex_) std::mutex;
    new (&mutex_) std::mutex;
    new (&wake_) std::condition_variable;
    new (&threads_) std::vector<std::thread*>;  // the parent's workers do not exist here
    current_.store(nullptr);
    active_.store(0);
    sleeping_.store(0);
  }

  std::mutex post_mutex_, mutex_;
  std::condition_variable wake_;
  std::vector<std::thread*> threads_;
  std::atomic<Job*> current_{nullptr};
  std::atomic<uint64_t> generation_{0};
  std::atomic<int> active_{0}, sleeping_{0};
};

}  // namespace

void parallel_for_chunks(int64_t begin, int64_t end, int64_t grain, ChunkFn run, const void* f) {
  const bool busy = !in_region && busy_core::adapt();
  if (!in_region && !busy) {
    run_on_openmp(begin, end, grain, run, f);
    return;
  }
  const int64_t n = end - begin;
  if (n <= 0) return;
  const int threads = in_region ? 1 : busy_core::team_threads();
  grain = std::max<int64_t>(grain, 1);
  if (threads <= 1 || n <= grain) {
    run(f, begin, end);
    return;
  }
  Job job;
  job.run = run, job.f = f, job.begin = begin, job.end = end;
  job.chunk = std::max(grain, (n + threads * kChunksPerThread - 1) / (threads * kChunksPerThread));
  job.chunks = (n + job.chunk - 1) / job.chunk;
  job.max_workers = threads - 1;
  if (job.chunks == 1) {
    run(f, begin, end);
    return;
  }
  job.posted_ns = busy_core::now_ns();
  Pool::get().run(job, threads - 1);
  if (job.failed.load()) std::rethrow_exception(job.error);
}

}  // namespace twolayer::cpu
