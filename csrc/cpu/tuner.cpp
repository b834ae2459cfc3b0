// The measured choice of "auto" and its wisdom file (see tuner.h).
#include "tuner.h"

#include "busy_core.h"

#include <Python.h>

#include <ATen/CPUGeneratorImpl.h>
#include <ATen/Parallel.h>
#include <ATen/ops/empty.h>
#include <c10/util/Exception.h>
#include <dlfcn.h>
#include <sys/stat.h>
#include <unistd.h>

#if __has_include(<torch/headeronly/version.h>)
#include <torch/headeronly/version.h>
#else
#include <torch/version.h>
#endif

#include <algorithm>
#include <chrono>
#include <cmath>
#include <cstdio>
#include <cstdlib>
#include <cstring>
#include <fstream>
#include <map>
#include <mutex>
#include <sstream>
#include <vector>

#include "tuning.h"
#include "variants.h"

namespace twolayer::cpu::tuner {

namespace {

double step_flops(const Dims& d) {
  return 4.0 * double(d.N) * double(d.D_in) * double(d.H) +
         6.0 * double(d.N) * double(d.H) * double(d.D_out);
}

int64_t pow2_ceil(int64_t v) {
  int64_t p = 1;
  while (p < v) p *= 2;
  return p;
}

std::string key_of(const Dims& d, c10::ScalarType dtype, int threads) {
  char key[128];  // snprintf, not a stream: this runs on every op call
  std::snprintf(key, sizeof key, "step %s t%d %lldx%lldx%lldx%lld",
                dtype == c10::ScalarType::Double ? "float64" : "float32", threads,
                static_cast<long long>(pow2_ceil(d.N)), static_cast<long long>(pow2_ceil(d.D_in)),
                static_cast<long long>(pow2_ceil(d.H)), static_cast<long long>(pow2_ceil(d.D_out)));
  return key;
}

struct Entry {
  int row = -1;
  std::vector<std::pair<int, double>> us;  // (row, median microseconds per step), fastest first
  std::string source;                      // "measured" or "wisdom"
  int64_t rows = 0;                        // the N it was measured at
  double cost_ms = 0;                      // what measuring it cost
  std::vector<int> screened_out;           // candidates dropped by the screen (not remembered)
  // Measured while a core was busy (busy_core.h): timings taken then mislead, so the pick
  // serves this process until the core is free, is measured again then, and never reaches
  // the wisdom file.
  bool busy = false;
  // Trials (tuner.h): the key's first whole-step calls run these candidates in turn at full
  // size and are timed; the entry is final, and written, once they are done.
  std::vector<int> schedule;                    // kTuneTrialRounds rounds of the kept candidates
  size_t handed = 0, reported = 0;              // schedule entries handed to calls, and timed
  std::map<int, std::vector<double>> trial_us;  // per candidate, scaled to trial_dims' flops
  Dims trial_dims{};          // the first trial's problem (N = 0: none yet; a bucket's calls vary)
  double trial_extra_ms = 0;  // the trials' time over the best candidate's
  bool trying() const { return !schedule.empty(); }
};

std::string describe(const Entry& e) {
  std::ostringstream os;
  os << e.source << " at N=" << e.rows << ":";
  for (size_t i = 0; i < e.us.size(); ++i)
    os << (i ? ", " : " ") << variant_at(e.us[i].first).name << " " << std::llround(e.us[i].second)
       << " us";
  for (size_t i = 0; i < e.screened_out.size(); ++i)
    os << (i ? ", " : "; screened out (over the drop ratio): ")
       << variant_at(e.screened_out[i]).name;
  if (e.source == "measured") os << " (measuring took " << std::llround(e.cost_ms) << " ms)";
  if (e.trying())
    os << "; trying the candidates at full size in its first whole-step calls (" << e.reported
       << " of " << e.schedule.size() << " done)";
  if (e.trial_dims.N && !e.trying())
    os << "; tried at full size in its first whole-step calls, which took "
       << std::llround(e.trial_extra_ms) << " ms more than the pick would have";
  if (e.busy) os << "; a core was busy: measured again when it is free";
  return os.str();
}

// ---- the wisdom file ---------------------------------------------------------------------

constexpr const char* kMagic = "twolayer_ext wisdom 1";

// The CPU as /proc/cpuinfo names it: the model name and the exact part (x86: family, model,
// stepping; ARM: implementer, part, variant). A hypervisor may show one model name for several
// generations ("AMD EPYC" for Zen 4 and Zen 5), whose best picks differ.
std::string cpu_model() {
  static const char* const kFields[] = {"model name",      "cpu family", "model",      "stepping",
                                        "CPU implementer", "CPU part",   "CPU variant"};
  std::ifstream f("/proc/cpuinfo");
  std::map<std::string, std::string> seen;
  for (std::string line; std::getline(f, line);) {
    if (line.empty() && !seen.empty()) break;  // the first processor's block is enough
    const auto colon = line.find(':');
    if (colon == std::string::npos) continue;
    std::string name = line.substr(0, colon);
    name.erase(name.find_last_not_of(" \t") + 1);
    const auto start = line.find_first_not_of(" \t", colon + 1);
    if (start != std::string::npos) seen.emplace(name, line.substr(start));
  }
  std::string out;
  for (const char* field : kFields) {
    const auto it = seen.find(field);
    if (it == seen.end()) continue;
    if (!out.empty()) out += ", ";
    out += field == kFields[0] ? it->second : std::string(field) + " " + it->second;
  }
  return out.empty() ? "unknown CPU" : out;
}

// This build of the extension: its file's size and modification time.
std::string build_id() {
  Dl_info info;
  struct stat st;
  if (dladdr(reinterpret_cast<void*>(&build_id), &info) && info.dli_fname &&
      stat(info.dli_fname, &st) == 0)
    return std::to_string(st.st_size) + "-" + std::to_string(st.st_mtime);
  return "unknown";
}

// What a wisdom file must have been measured on to be used here.
const std::string& identity() {
  static const std::string id = [] {
    std::ostringstream os;
    os << cpu_name() << " | " << variant_at(auto_candidates().front()).name << " | torch "
       << TORCH_VERSION << " | build " << build_id();
    return os.str();
  }();
  return id;
}

// "" when the picks stay in memory.
const std::string& wisdom_path() {
  static const std::string path = [] {
    const char* env = std::getenv("TWOLAYER_WISDOM");
    if (env && *env) return std::string(std::strcmp(env, "off") == 0 ? "" : env);
    const char* xdg = std::getenv("XDG_CACHE_HOME");
    const char* home = std::getenv("HOME");
    if (xdg && *xdg) return std::string(xdg) + "/twolayer_ext/wisdom.txt";
    return home && *home ? std::string(home) + "/.cache/twolayer_ext/wisdom.txt" : std::string();
  }();
  return path;
}

std::mutex mutex;
std::map<std::string, Entry> entries;  // guarded by mutex
bool warned = false;
std::string pending_warning;  // guarded by mutex; issued once the mutex is released

void warn_once(const std::string& what) {
  if (warned) return;
  warned = true;
  pending_warning = "twolayer_ext: " + what + "; auto measures its choices again";
}

// A Python UserWarning (the op-call path does not turn c10 warnings into Python ones), else
// c10's. Called without the mutex held: taking the GIL while holding it could deadlock with a
// Python thread waiting for it.
void issue(std::string warning) {
  if (warning.empty()) return;
  if (Py_IsInitialized()) {
    const PyGILState_STATE gil = PyGILState_Ensure();
    if (PyErr_WarnEx(PyExc_UserWarning, warning.c_str(), 1) != 0) PyErr_Clear();
    PyGILState_Release(gil);
  } else {
    TORCH_WARN(warning);
  }
}

// The file's entries, when it was written here: missing is quiet, anything else warns.
void load_wisdom() {
  const std::string& path = wisdom_path();
  if (path.empty()) return;
  std::ifstream f(path);
  if (!f) return;
  std::string magic, id;
  if (!std::getline(f, magic) || magic != kMagic || !std::getline(f, id) ||
      id.rfind("identity ", 0) != 0) {
    warn_once("the wisdom file " + path + " is not one (corrupt or foreign)");
    return;
  }
  if (id.substr(9) != identity()) {
    warn_once("the wisdom file " + path + " was measured elsewhere (" + id.substr(9) +
              "; here: " + identity() + ")");
    return;
  }
  // key \t rows \t name=us,name=us,...  (fastest first)
  for (std::string line; std::getline(f, line);) {
    std::istringstream ls(line);
    std::string key, rows, times;
    Entry e;
    e.source = "wisdom";
    bool ok =
        std::getline(ls, key, '\t') && std::getline(ls, rows, '\t') && std::getline(ls, times);
    try {
      if (ok) e.rows = std::stoll(rows);
      std::istringstream ts(times);
      for (std::string item; ok && std::getline(ts, item, ',');) {
        const auto eq = item.find('=');
        const int row = eq == std::string::npos ? -1 : variant_row(item.substr(0, eq));
        ok = row >= 0 && std::find(auto_candidates().begin(), auto_candidates().end(), row) !=
                             auto_candidates().end();
        if (ok) e.us.emplace_back(row, std::stod(item.substr(eq + 1)));
      }
    } catch (const std::exception&) {
      ok = false;
    }
    if (!ok || e.us.empty()) {
      warn_once("the wisdom file " + path + " has a line it cannot read: \"" + line + "\"");
      entries.clear();
      return;
    }
    e.row = e.us.front().first;
    entries[key] = e;
  }
}

void load_wisdom_once() {  // under mutex
  static bool loaded = false;
  if (!loaded) load_wisdom();
  loaded = true;
}

// Rewrites the file with every entry (written aside, then renamed into place).
void save_wisdom() {
  const std::string& path = wisdom_path();
  if (path.empty()) return;
  const auto slash = path.rfind('/');
  if (slash != std::string::npos && slash > 0) {
    const std::string dir = path.substr(0, slash);
    for (size_t i = 1; i <= dir.size(); ++i)
      if (i == dir.size() || dir[i] == '/') ::mkdir(dir.substr(0, i).c_str(), 0755);
  }
  const std::string tmp = path + ".tmp" + std::to_string(::getpid());
  {
    std::ofstream f(tmp);
    f << kMagic << "\nidentity " << identity() << "\n";
    for (const auto& [key, e] : entries) {
      if (e.busy) continue;
      f << key << "\t" << e.rows << "\t";
      for (size_t i = 0; i < e.us.size(); ++i)
        f << (i ? "," : "") << variant_at(e.us[i].first).name << "=" << e.us[i].second;
      f << "\n";
    }
    if (!f.flush()) {
      std::remove(tmp.c_str());
      warn_once("cannot write the wisdom file " + path);
      return;
    }
  }
  if (std::rename(tmp.c_str(), path.c_str()) != 0) {
    std::remove(tmp.c_str());
    warn_once("cannot write the wisdom file " + path);
  }
}

// ---- measuring ---------------------------------------------------------------------------

template <typename T>
Entry measure(const Dims& full, bool at_full_size) {
  const auto start = std::chrono::steady_clock::now();
  Dims d = full;
  // Above the budget's flops a step is measured on fewer rows (kept row-blocked if it was).
  if (!at_full_size && step_flops(d) > tuning::kTuneMaxFlops) {
    const int64_t rows = int64_t(double(d.N) * tuning::kTuneMaxFlops / step_flops(d));
    d.N = std::max<int64_t>((rows + 15) / 16 * 16, 16);
    if (tuning::row_blocked(full.N, full.D_in, full.H, full.D_out))
      d.N = std::max(d.N, tuning::kRowBlockedMinRows);
  }
  const auto opts = at::TensorOptions().dtype(c10::CppTypeToScalarType<T>::value);
  // A generator of its own: measuring never moves the user's random stream.
  const at::Generator gen = at::detail::createCPUGenerator(/*seed_val=*/0);
  // Uniform with unit variance, times scale, in one pass: the values only need to stay O(1)
  // (timing on overflowed values would mislead), and randn costs 3x as much (44 ms for
  // float64 1024x1024, over half of the budget).
  auto draw = [&](int64_t rows, int64_t cols, double scale) {
    const double half_width = std::sqrt(3.0) * scale;
    return at::empty({rows, cols}, opts).uniform_(-half_width, half_width, gen);
  };
  const at::Tensor x = draw(d.N, d.D_in, 1.0), target = draw(d.N, d.D_out, 1.0);
  // Weights scaled by 1/sqrt(fan_in), so that activations stay O(1) too.
  const at::Tensor w1 = draw(d.D_in, d.H, 1.0 / std::sqrt(double(d.D_in)));
  const at::Tensor w2 = draw(d.H, d.D_out, 1.0 / std::sqrt(double(d.H)));
  at::Tensor g1 = at::empty({d.D_in, d.H}, opts), g2 = at::empty({d.H, d.D_out}, opts);
  auto view = [](const at::Tensor& t) {
    return View<T>{t.data_ptr<T>(), t.stride(0), t.stride(1)};
  };
  GradOut<T> o1, o2;
  o1.store = g1.data_ptr<T>(), o2.store = g2.data_ptr<T>();
  // The fused loss with every weight's gradient: sgd_step's work, without moving the weights.
  const StepArgs<T> s{d,     view(x), view(target), view(w1), view(w2), {nullptr, 0}, {nullptr, 0},
                      false, nullptr, nullptr,      o1,       o2,       {},           {}};
  auto time_us = [&](int row, const StepArgs<T>& args) {
    const auto t0 = std::chrono::steady_clock::now();
    variant_at(row).template kernels<T>().step(args);
    return std::chrono::duration<double, std::micro>(std::chrono::steady_clock::now() - t0).count();
  };
  auto elapsed_ms = [&] {
    return std::chrono::duration<double, std::milli>(std::chrono::steady_clock::now() - start)
        .count();
  };
  std::vector<int> rows = auto_candidates();
  // A screen on the first rows alone drops the far slower candidates before they cost a
  // full-size call. Each candidate is called once before it (first touch, packing buffers,
  // the BLAS's first call on this thread: seen to take 2.5x a warm call at the tutorial's
  // size, which dropped blas there).
  StepArgs<T> screen = s;
  screen.d.N = std::min<int64_t>(d.N, std::max<int64_t>(16, d.N / tuning::kTuneScreenFraction));
  for (int r : rows) time_us(r, screen);
  std::map<int, double> screened;
  double best = INFINITY;
  for (int r : rows) best = std::min(best, screened[r] = time_us(r, screen));
  std::vector<int> kept, dropped;
  for (int r : rows) (screened[r] > tuning::kTuneDropRatio * best ? dropped : kept).push_back(r);
  rows.swap(kept);
  // Then interleaved rounds while the budget lasts (one at least): at full size where the
  // screen says a round fits the budget, else at the screen's size.
  double round_us = 0;
  for (int r : rows) round_us += screened[r] * double(d.N) / double(screen.d.N);
  const bool fits = at_full_size || elapsed_ms() + round_us / 1000 <= tuning::kTuneBudgetMs;
  const StepArgs<T>& timed = fits ? s : screen;
  std::map<int, std::vector<double>> times;
  // Timed at the screen's size: the screen was the first round (a round more would overrun
  // the budget where the warm-up and the screen took it all: large float64, one thread).
  const bool screen_is_round = timed.d.N == screen.d.N;
  if (screen_is_round)
    for (int r : rows) times[r].push_back(screened[r]);
  for (int round = screen_is_round ? 1 : 0; round < tuning::kTuneRounds; ++round) {
    if (round > 0) {
      round_us = 0;
      for (int r : rows) round_us += times[r].back();
      if (rows.size() == 1 ||
          (!at_full_size && elapsed_ms() + round_us / 1000 > tuning::kTuneBudgetMs))
        break;
    }
    for (int r : rows) times[r].push_back(time_us(r, timed));
  }
  Entry e;
  e.source = "measured";
  e.rows = timed.d.N;
  e.screened_out = dropped;
  for (auto& [r, t] : times) {
    std::sort(t.begin(), t.end());
    e.us.emplace_back(r, t[t.size() / 2]);
  }
  std::sort(e.us.begin(), e.us.end(),
            [](const auto& a, const auto& b) { return a.second < b.second; });
  e.row = e.us.front().first;
  e.cost_ms = elapsed_ms();
  return e;
}

// Set while this thread measures, under the mutex: measured_step_us answers 0 then.
thread_local bool measuring = false;

Entry measure_key(const Dims& d, c10::ScalarType dtype, bool full) {
  measuring = true;
  struct Done {
    ~Done() { measuring = false; }
  } done;
  return dtype == c10::ScalarType::Double ? measure<double>(d, full) : measure<float>(d, full);
}

// Starts trials where the measuring ran on fewer rows than a large step has.
void start_trials(Entry& e, const Dims& d) {
  if (e.busy || e.us.size() < 2 || e.rows >= d.N || step_flops(d) < tuning::kTuneTrialMinFlops)
    return;
  for (int round = 0; round < tuning::kTuneTrialRounds; ++round)
    for (const auto& [row, us] : e.us) e.schedule.push_back(row);
}

// A candidate's trial time: its fastest call (its first is cold).
double fastest(const std::vector<double>& t) { return *std::min_element(t.begin(), t.end()); }

// The best trial time so far over every candidate (INFINITY before the first).
double best_trial(const Entry& e) {
  double best = INFINITY;
  for (const auto& [row, t] : e.trial_us) best = std::min(best, fastest(t));
  return best;
}

// The trials are done: the fastest at full size is the pick, remembered and written.
void finish_trials(Entry& e) {
  std::vector<std::pair<int, double>> us;
  for (const auto& [row, t] : e.trial_us) us.emplace_back(row, fastest(t));
  const double best = best_trial(e);
  e.schedule.clear();
  if (us.empty()) {  // every trial ran while a core was busy: measure again when it is free
    e.busy = true;
    return;
  }
  e.trial_extra_ms = 0;
  for (const auto& [row, t] : e.trial_us)
    for (double v : t) e.trial_extra_ms += (v - best) / 1000;
  std::sort(us.begin(), us.end(), [](const auto& a, const auto& b) { return a.second < b.second; });
  e.us = us, e.row = us.front().first, e.rows = e.trial_dims.N;
  save_wisdom();
}

// Remembers a fresh measurement of key (under mutex): written unless a core was busy or
// trials are to follow (then it is written when they end).
std::map<std::string, Entry>::iterator remember(const std::string& key, Entry e, const Dims& d,
                                                bool full) {
  if (!full) start_trials(e, d);  // as a first call goes on
  const auto it = entries.insert_or_assign(key, std::move(e)).first;
  if (!it->second.busy && !it->second.trying()) save_wisdom();
  return it;
}

bool trials_over(const Entry& e) { return e.handed >= e.schedule.size() && e.reported >= e.handed; }

// The next candidate to try, or -1: one already over kTuneTrialDropRatio times the best full-
// size time so far is skipped.
int next_trial(Entry& e) {
  const double best = best_trial(e);
  while (e.handed < e.schedule.size()) {
    const int row = e.schedule[e.handed++];
    const auto t = e.trial_us.find(row);
    if (t == e.trial_us.end() || fastest(t->second) <= tuning::kTuneTrialDropRatio * best)
      return row;
    ++e.reported;  // skipped
  }
  if (trials_over(e)) finish_trials(e);
  return -1;
}

}  // namespace

Pick pick(const Dims& d, c10::ScalarType dtype, For purpose) {
  const std::vector<int>& candidates = auto_candidates();
  if (step_flops(d) < tuning::kTuneMinFlops || candidates.size() == 1)
    return {candidates.front(), "rule",
            purpose != For::Info ? std::string()
                                 : "rule: below " + std::to_string(int64_t(tuning::kTuneMinFlops)) +
                                       " flops per step our tuned kernels, unmeasured"};
  const std::string key = key_of(d, dtype, busy_core::team_threads());
  Pick p;
  std::string warning;
  {
    std::lock_guard<std::mutex> lock(mutex);
    load_wisdom_once();
    auto it = entries.find(key);
    const bool busy = busy_core::busy();  // one answer for this call
    if (busy && (it == entries.end() || it->second.busy)) {
      // A busy core leaves about one thread's worth of ours: one thread's quiet pick, where
      // there is one, is a better guess than timings taken now.
      const auto one = entries.find(key_of(d, dtype, 1));
      if (one != entries.end() && !one->second.busy) it = one;
    }
    if (it == entries.end() || (it->second.busy && !busy)) {
      Entry e = measure_key(d, dtype, false);
      e.busy = busy || busy_core::busy();  // or it became busy while measuring
      it = remember(key, std::move(e), d, false);
    }
    Entry& e = it->second;
    const int trial = purpose == For::WholeStep && !busy && e.trying() ? next_trial(e) : -1;
    p = {trial >= 0 ? trial : e.row, e.trying() ? "trying" : e.source,
         purpose == For::Info ? describe(e) : std::string(), trial >= 0,
         trial >= 0 ? key : std::string()};
    warning.swap(pending_warning);
  }
  issue(std::move(warning));
  return p;
}

void report_trial(const std::string& key, const Dims& d, int row, double us) {
  const bool busy = busy_core::busy();
  std::string warning;
  {
    std::lock_guard<std::mutex> lock(mutex);
    const auto it = entries.find(key);
    if (it == entries.end() || !it->second.trying()) return;
    Entry& e = it->second;
    ++e.reported;
    if (us >= 0 && !busy) {  // timings taken while a core is busy mislead
      if (e.trial_dims.N == 0) e.trial_dims = d;
      e.trial_us[row].push_back(us * step_flops(e.trial_dims) / step_flops(d));
    }
    if (trials_over(e)) finish_trials(e);
    warning.swap(pending_warning);
  }
  issue(std::move(warning));
}

double measured_step_us(const Dims& d, c10::ScalarType dtype, int row) {
  if (measuring) return 0;  // the measuring's own calls (this thread holds the mutex)
  const std::string key = key_of(d, dtype, busy_core::team_threads());
  std::lock_guard<std::mutex> lock(mutex);
  const auto it = entries.find(key);
  if (it == entries.end() || it->second.rows <= 0) return 0;
  for (const auto& [r, us] : it->second.us)
    if (r == row) return us * double(d.N) / double(it->second.rows);
  return 0;
}

std::string tune(const Dims& d, c10::ScalarType dtype, bool full) {
  const std::string key = key_of(d, dtype, busy_core::team_threads());
  Entry e;
  std::string warning;
  {
    std::lock_guard<std::mutex> lock(mutex);
    load_wisdom_once();
    e = measure_key(d, dtype, full);
    e.busy = busy_core::busy();
    e = remember(key, std::move(e), d, full)->second;
    warning.swap(pending_warning);
  }
  issue(std::move(warning));
  std::ostringstream os;
  os << "{\"key\": \"" << key << "\", \"pick\": \"" << variant_at(e.row).name
     << "\", \"rows\": " << e.rows << ", \"cost_ms\": " << e.cost_ms
     << ", \"busy_core\": " << (e.busy ? "true" : "false") << ", \"trials\": " << e.schedule.size()
     << ", \"us\": {";
  for (size_t i = 0; i < e.us.size(); ++i)
    os << (i ? ", " : "") << "\"" << variant_at(e.us[i].first).name << "\": " << e.us[i].second;
  os << "}, \"wisdom\": \"" << wisdom_path() << "\"}";
  return os.str();
}

std::string cpu_name() {
  static const std::string name = cpu_model();
  return name;
}

}  // namespace twolayer::cpu::tuner
