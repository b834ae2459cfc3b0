// Busy-core detection and the thread count ATen's regions get meanwhile (busy_core.h).
#include "busy_core.h"

#include "mkl_local.h"
#include "tuning.h"

#include <ATen/Parallel.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <atomic>
#include <chrono>
#include <cstdlib>
#include <cstring>

namespace twolayer::cpu::busy_core {

int64_t now_ns() {
  return std::chrono::duration_cast<std::chrono::nanoseconds>(
             std::chrono::steady_clock::now().time_since_epoch())
      .count();
}

namespace {

constexpr int64_t kMs = 1000000;

bool enabled() {
  static const bool on = [] {
    const char* v = std::getenv("TWOLAYER_BUSY_CORE");
    return !(v && std::strcmp(v, "off") == 0);
  }();
  return on;
}

// Process-wide (a busy core slows every thread's regions): until when a core counts as busy.
std::atomic<int64_t> busy_until{0};

// This thread's: the thread count ATen's regions had before adapt() lowered it (0: not
// lowered).
thread_local int restore_to = 0;

}  // namespace

namespace {

// A sign that a thread of ours lost its core. Signs come on a quiet machine too (a late
// wake-up), rarely; kBusySigns of them within kBusyWindowMs mean a core held by another
// process, and while a core counts as busy each sign extends that by kBusyHoldMs.
void sign() {
  static std::atomic<int64_t> window_start{0};
  static std::atomic<int> signs{0};
  const int64_t t = now_ns();
  if (t < busy_until.load()) {
    busy_until.store(t + tuning::kBusyHoldMs * kMs);
    return;
  }
  if (t - window_start.load() > tuning::kBusyWindowMs * kMs) {
    window_start.store(t);
    signs.store(0);
  }
  if (signs.fetch_add(1) + 1 >= tuning::kBusySigns) busy_until.store(t + tuning::kBusyHoldMs * kMs);
}

}  // namespace

void note_wait(int64_t wait_ns, int64_t work_ns) {
  // A wait shorter than the caller's own work is uneven shares, not a missing thread.
  if (enabled() && wait_ns >= tuning::kBusyWaitMicroseconds * 1000 && wait_ns >= work_ns) sign();
}

void note_no_worker(int64_t job_ns, bool woken) {
  const int64_t us = woken ? tuning::kBusyWaitMicroseconds : tuning::kBusyNoWorkerMicroseconds;
  if (enabled() && job_ns >= us * 1000) sign();
}

bool busy() { return enabled() && now_ns() < busy_until.load(); }

// This thread's share of torch.set_num_threads: OpenMP's and MKL's thread-local settings, not
// the process-wide count new threads start from.
void set_this_threads_count(int n) {
#ifdef _OPENMP
  omp_set_num_threads(n);
#endif
  if (mkl_set_local()) mkl_set_local()(&n);
}

bool adapt() {
  if (!enabled()) return false;
  const bool now_busy = busy();
  const int n = at::get_num_threads();
  if (restore_to && n != 1) restore_to = 0;  // set by the user since
  if (now_busy && !restore_to && n > 1) {
    restore_to = n;
    set_this_threads_count(1);
  } else if (!now_busy && restore_to) {
    set_this_threads_count(restore_to);
    restore_to = 0;
  }
  return now_busy;
}

int team_threads() { return restore_to ? restore_to : at::get_num_threads(); }

void assume_busy_for(int64_t ms) { busy_until.store(ms > 0 ? now_ns() + ms * kMs : 0); }

}  // namespace twolayer::cpu::busy_core
