// "auto": the CPU variant for a problem, measured on the machine it runs on and remembered
// (FFTW's wisdom, cuDNN's benchmark mode). The key is the training step (which sgd_step, the
// fused loss and two_layer + l2_loss all run: they follow one choice), the dtype, the thread
// count and a shape bucket (each of N, D_in, H, D_out rounded up to a power of two). The first
// time a key is seen, the eligible variants (variants.h: auto_candidates) are timed in a few
// short interleaved rounds, at most tuning::kTuneBudgetMs in all, and the fastest is kept:
// for the process, and in a wisdom file keyed by CPU (model name and exact part), ISA, torch
// version and the build.
//
// The wisdom file: $TWOLAYER_WISDOM, else $XDG_CACHE_HOME/twolayer_ext/wisdom.txt (or
// ~/.cache/...); TWOLAYER_WISDOM=off keeps the picks in memory only. A missing, corrupt,
// read-only or stale file (another CPU, torch or build) never fails a call: its keys are
// measured again, and one warning says why. A pick measured while a core is busy (busy_core.h)
// serves the process until the core is free, is measured again then, and is not written.
#pragma once

#include <c10/core/ScalarType.h>

#include <string>

#include "../checks.h"

namespace twolayer::cpu::tuner {

struct Pick {
  int row;          // the variant table row (variants.h)
  std::string how;  // "measured", "wisdom", "rule" or "trying"
  std::string
      why;  // "measured at N=96: blas 150 us, tuned-avx512 210 us", "wisdom ...", "rule: ..."
  bool trial = false;  // row is a trial: time the call, and hand the time to report_trial
  std::string key;     // a trial's key, for report_trial
};

// The variant auto runs for this float32/float64 problem at the current thread count:
// remembered, read from the wisdom file, or measured now.
//
// A step over the budget's flops is measured on fewer of its rows, and there its candidates
// can rank the other way round from the full size (the weights' packing weighs more on few
// rows; the data's passes stay in cache). A step of tuning::kTuneTrialMinFlops or more then
// tries the candidates at full size in its first whole-step calls (For::WholeStep: sgd_step,
// the fused loss), each doing the call's real work, in tuning::kTuneTrialRounds rounds; the
// fastest becomes the pick, written to the wisdom file then. Until then, other calls run the
// measured pick. Those first calls' results differ from later ones in the last bits (as any two
// variants' do); a pinned variant, or wisdom from an earlier process, has no trials.
enum class For {
  Info,       // cpu_kernel_info / cpu_kernel_choice: with the why
  Call,       // an op's call: no why (building it cost ~4 us a call)
  WholeStep,  // sgd_step or the fused loss: may be handed a trial
};
Pick pick(const Dims& d, c10::ScalarType dtype, For purpose = For::Info);
// How long a trial's call took (us), or -1 where it threw; key: the Pick's.
void report_trial(const std::string& key, const Dims& d, int row, double us);

// What a whole step of this problem took with the variant of table row `row` where auto
// measured it at the current thread count, scaled to d's rows (us); 0 where it has no such
// measurement.
double measured_step_us(const Dims& d, c10::ScalarType dtype, int row);

// Measures the key of this problem now, whatever is remembered, and remembers the result
// (full: at the problem's own N, not the budget's). Returns it as a JSON object.
std::string tune(const Dims& d, c10::ScalarType dtype, bool full);

// The CPU as the wisdom file's identity names it: the model name and the exact part.
std::string cpu_name();

}  // namespace twolayer::cpu::tuner
