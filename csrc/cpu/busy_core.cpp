// Busy-core detection and the thread count ATen's regions get meanwhile (busy_core.h).
#include "busy_core.h"

#include "mkl_local.h"
#include "tuning.h"

#include <ATen/Parallel.h>
#include <c10/util/Exception.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include <time.h>
#include <unistd.h>

#include <atomic>
#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <mutex>

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
    if (!v || !*v || std::strcmp(v, "on") == 0) return true;
    TORCH_CHECK_VALUE(std::strcmp(v, "off") == 0, "TWOLAYER_BUSY_CORE must be on or off, got \"", v,
                      "\"");
    return false;
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

// Every CPU's busy time since boot (Linux /proc/stat: user, nice, system, irq, softirq and a
// hypervisor's steal), in seconds; negative where it cannot be read.
double system_busy_s() {
  std::FILE* f = std::fopen("/proc/stat", "r");
  if (!f) return -1;
  unsigned long long v[8] = {};
  const int n = std::fscanf(f, "cpu %llu %llu %llu %llu %llu %llu %llu %llu", &v[0], &v[1], &v[2],
                            &v[3], &v[4], &v[5], &v[6], &v[7]);
  std::fclose(f);
  if (n < 4) return -1;
  static const double ticks_per_s = double(::sysconf(_SC_CLK_TCK));
  return double(v[0] + v[1] + v[2] + v[5] + v[6] + v[7]) / ticks_per_s;
}

// A CPU-time clock (this process's, or this thread's), in nanoseconds.
int64_t cpu_clock_ns(clockid_t clock) {
  timespec ts{};
  ::clock_gettime(clock, &ts);
  return int64_t(ts.tv_sec) * 1000000000 + int64_t(ts.tv_nsec);
}

// This process's CPU time, every thread's, in seconds.
double process_cpu_s() { return 1e-9 * double(cpu_clock_ns(CLOCK_PROCESS_CPUTIME_ID)); }

enum class Others { kLoaded, kIdle, kPending };

// Whether other processes (the machine's busy time less this process's CPU time) used
// tuning::kBusyOthersCores or more over the last kBusyLoadMs or more up to t: a core held by
// another process, not by this process's own threads (OpenMP's and OpenBLAS's spin a while
// after each region, and take a core from our workers as another process would, but only
// for milliseconds). kPending until an interval is measured; kLoaded where /proc/stat cannot
// be read (the signs alone decide).
Others others(int64_t t) {
  static std::mutex m;
  static int64_t since_t = 0, verdict_t = 0;
  static double since_system = 0, since_process = 0;
  static bool loaded = false;
  const int64_t interval = tuning::kBusyLoadMs * kMs;
  std::lock_guard<std::mutex> lock(m);
  if (verdict_t && t - verdict_t < interval) return loaded ? Others::kLoaded : Others::kIdle;
  if (since_t && t - since_t < interval) return Others::kPending;
  const double system = system_busy_s();
  if (system < 0) return Others::kLoaded;
  const double process = process_cpu_s();
  const bool fresh = since_t && t - since_t <= tuning::kBusyLoadStaleMs * kMs;
  if (fresh) {
    const double cores =
        ((system - since_system) - (process - since_process)) / (1e-9 * double(t - since_t));
    loaded = cores >= tuning::kBusyOthersCores;
    verdict_t = t;
  }
  since_t = t, since_system = system, since_process = process;
  return fresh ? (loaded ? Others::kLoaded : Others::kIdle) : Others::kPending;
}

// A sign that a thread of ours lost its core. Signs come on a quiet machine too (a late
// wake-up, or this process's own threads spinning), rarely; kBusySigns of them within
// kBusyWindowMs while other processes use a core mean a core held by another process, and
// while a core counts as busy each sign extends that by kBusyHoldMs unless the other
// processes are measured idle.
void sign() {
  static std::atomic<int64_t> window_start{0};
  static std::atomic<int> signs{0};
  const int64_t t = now_ns();
  if (t < busy_until.load()) {
    if (others(t) != Others::kIdle) busy_until.store(t + tuning::kBusyHoldMs * kMs);
    return;
  }
  if (t - window_start.load() > tuning::kBusyWindowMs * kMs) {
    window_start.store(t);
    signs.store(0);
  }
  if (signs.fetch_add(1) + 1 >= tuning::kBusySigns && others(t) == Others::kLoaded)
    busy_until.store(t + tuning::kBusyHoldMs * kMs);
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

void note_late_call(int64_t late_ns) {
  if (enabled() && late_ns >= tuning::kBusyWaitMicroseconds * 1000) sign();
}

int64_t thread_cpu_ns() { return cpu_clock_ns(CLOCK_THREAD_CPUTIME_ID); }

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

void note_signs(int n) {
  if (enabled())
    for (int i = 0; i < n; ++i) sign();
}

void assume_busy_for(int64_t ms) { busy_until.store(ms > 0 ? now_ns() + ms * kMs : 0); }

}  // namespace twolayer::cpu::busy_core
