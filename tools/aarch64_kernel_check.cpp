// The portable tuned kernels (csrc/cpu/tuned_portable.cpp: what a CPU without AVX2 or an ARM
// CPU runs) built for aarch64 and run under qemu-aarch64 by tools/cross_aarch64.sh, against an
// oracle written out here in double: the tutorial's forward, L2 loss and backprop.
//
// The kernels take raw strided views and need only two functions of the extension, given here
// without torch: parallel_for_chunks on two threads that claim chunks as our pool's do (a call
// inside a chunk runs inline), and busy_core::team_threads, 2. So the threaded paths run, and
// the results must not depend on it (the kernels' contract). Checked per dtype, shape (edge
// tiles, several K blocks, more rows than a row block, the narrow row-blocked path), bias and
// reduction: the forward (y, and the ReLU output behind its sign mask), the backward, the fused
// step storing every gradient (one weight's as a transpose) and the SGD step updating in place,
// on row-major weights and on weights in nn.Linear's layout.
// Prints one line per failing check and a summary; exits 1 on any failure.
#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstdio>
#include <random>
#include <thread>
#include <vector>

#include "../csrc/cpu/busy_core.h"
#include "../csrc/cpu/cpu_impl.h"
#include "../csrc/cpu/pool.h"

namespace twolayer::cpu {
TWOLAYER_DECLARE_VARIANT(tuned_portable)

namespace {
thread_local bool in_chunk = false;
}

void parallel_for_chunks(int64_t begin, int64_t end, int64_t grain, ChunkFn run, const void* f) {
  if (begin >= end) return;
  if (in_chunk) return run(f, begin, end);
  grain = std::max<int64_t>(grain, 1);
  std::atomic<int64_t> next{begin};
  auto claim = [&] {
    in_chunk = true;
    for (int64_t b; (b = next.fetch_add(grain)) < end;) run(f, b, std::min(end, b + grain));
    in_chunk = false;
  };
  std::thread other(claim);
  claim();
  other.join();
}

namespace busy_core {
int team_threads() { return 2; }
}  // namespace busy_core
}  // namespace twolayer::cpu

namespace {

using namespace twolayer;
using namespace twolayer::cpu;
using Mat = std::vector<double>;  // row-major

Mat matmul(const Mat& a, const Mat& b, int64_t n, int64_t k, int64_t m, bool at, bool bt) {
  // (a or a^T) [n, k] @ (b or b^T) [k, m]
  Mat c(n * m, 0.0);
  for (int64_t i = 0; i < n; ++i)
    for (int64_t p = 0; p < k; ++p) {
      const double av = at ? a[p * n + i] : a[i * k + p];
      for (int64_t j = 0; j < m; ++j) c[i * m + j] += av * (bt ? b[j * k + p] : b[p * m + j]);
    }
  return c;
}

Mat column_sums(const Mat& g, int64_t rows, int64_t cols) {
  Mat s(cols, 0.0);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) s[j] += g[i * cols + j];
  return s;
}

struct Oracle {  // every quantity of one step, in double
  Mat h, y, grad_y, gw1, gw2, gb1, gb2, gx, gt;
  double loss = 0;
};

Oracle oracle(const Dims& d, const Mat& x, const Mat& t, const Mat& w1, const Mat& w2,
              const Mat* b1, const Mat* b2, bool mean) {
  Oracle o;
  o.h = matmul(x, w1, d.N, d.D_in, d.H, false, false);
  for (int64_t i = 0; i < d.N * d.H; ++i)
    o.h[i] = std::max(o.h[i] + (b1 ? (*b1)[i % d.H] : 0), 0.0);
  o.y = matmul(o.h, w2, d.N, d.H, d.D_out, false, false);
  const double n = double(d.N * d.D_out), scale = mean ? 2.0 / n : 2.0;
  o.grad_y.resize(d.N * d.D_out);
  o.gt.resize(d.N * d.D_out);
  for (int64_t i = 0; i < d.N * d.D_out; ++i) {
    o.y[i] += b2 ? (*b2)[i % d.D_out] : 0;
    const double diff = o.y[i] - t[i];
    o.loss += diff * diff;
    o.grad_y[i] = scale * diff;
    o.gt[i] = -o.grad_y[i];
  }
  if (mean) o.loss /= n;
  return o;
}

// The backward of the forward at o.h for grad_y g.
void backprop(const Dims& d, const Mat& x, const Mat& w1, const Mat& w2, const Mat& g, Oracle& o) {
  o.gw2 = matmul(o.h, g, d.H, d.N, d.D_out, true, false);
  o.gb2 = column_sums(g, d.N, d.D_out);
  Mat gh = matmul(g, w2, d.N, d.D_out, d.H, false, true);
  for (int64_t i = 0; i < d.N * d.H; ++i)
    if (o.h[i] <= 0) gh[i] = 0;
  o.gw1 = matmul(x, gh, d.D_in, d.N, d.H, true, false);
  o.gb1 = column_sums(gh, d.N, d.H);
  o.gx = matmul(gh, w1, d.N, d.H, d.D_in, false, true);
}

int failures = 0, checks = 0;
bool single = false;  // the case's dtype is float32: its tolerance

template <typename T>
void expect(const char* what, const char* name, const std::vector<T>& got, const Mat& want,
            const char* where) {
  ++checks;
  double scale = 0, worst = 0;
  for (double v : want) scale = std::max(scale, std::abs(v));
  for (size_t i = 0; i < want.size(); ++i)
    worst = std::max(worst, std::abs(double(got[i]) - want[i]));
  const double tol = (single ? 2e-5 : 1e-12) * std::max(scale, 1.0);
  if (!(worst <= tol) || got.size() != want.size()) {  // NaN fails too
    ++failures;
    std::printf("FAIL %s %s %s: max error %.3g, tolerance %.3g\n", where, what, name, worst, tol);
  }
}

template <typename T>
std::vector<T> as(const Mat& m) {
  return std::vector<T>(m.begin(), m.end());
}

template <typename T>
Mat transposed(const std::vector<T>& m, int64_t rows, int64_t cols) {  // m is [cols, rows]
  Mat out(rows * cols);
  for (int64_t i = 0; i < rows; ++i)
    for (int64_t j = 0; j < cols; ++j) out[i * cols + j] = double(m[j * rows + i]);
  return out;
}

template <typename T>
void check_case(const Dims& d, bool bias, bool mean, std::mt19937_64& rng) {
  single = sizeof(T) == 4;
  char where[160];
  std::snprintf(where, sizeof where, "%s N=%lld D_in=%lld H=%lld D_out=%lld bias=%d %s",
                sizeof(T) == 4 ? "float32" : "float64", (long long)d.N, (long long)d.D_in,
                (long long)d.H, (long long)d.D_out, int(bias), mean ? "mean" : "sum");
  std::normal_distribution<double> normal;
  auto draw = [&](int64_t n, double s) {
    Mat m(n);
    for (auto& v : m) v = T(normal(rng) * s);  // representable in T: the oracle sees T's values
    return m;
  };
  const Mat x = draw(d.N * d.D_in, 1.0), t = draw(d.N * d.D_out, 1.0);
  const Mat w1 = draw(d.D_in * d.H, 1.0 / std::sqrt(double(d.D_in)));
  const Mat w2 = draw(d.H * d.D_out, 1.0 / std::sqrt(double(d.H)));
  const Mat b1v = draw(d.H, 0.5), b2v = draw(d.D_out, 0.5);
  const Mat *b1 = bias ? &b1v : nullptr, *b2 = bias ? &b2v : nullptr;
  Oracle o = oracle(d, x, t, w1, w2, b1, b2, mean);
  backprop(d, x, w1, w2, o.grad_y, o);

  const auto xs = as<T>(x), ts = as<T>(t), w1s = as<T>(w1), w2s = as<T>(w2);
  const auto b1s = as<T>(b1v), b2s = as<T>(b2v);
  const Bias<const T> pb1{bias ? b1s.data() : nullptr, 1}, pb2{bias ? b2s.data() : nullptr, 1};

  // Forward.
  std::vector<T> act(d.N * d.H), y(d.N * d.D_out);
  tuned_portable::forward<T>({d, row_major(xs.data(), d.D_in), row_major(w1s.data(), d.H),
                              row_major(w2s.data(), d.D_out), pb1, pb2, act.data(), y.data()});
  std::vector<T> relu(act.size());
  for (size_t i = 0; i < act.size(); ++i) relu[i] = std::abs(act[i]);  // mask in the sign bit
  expect("forward", "y", y, o.y, where);
  expect("forward", "relu(h)", relu, o.h, where);

  // Backward, for a grad_y of its own, through the forward's act.
  const Mat g = draw(d.N * d.D_out, 1.0);
  Oracle ob = o;
  backprop(d, x, w1, w2, g, ob);
  const auto gs = as<T>(g);
  std::vector<T> bx(d.N * d.D_in), bw1(d.D_in * d.H), bw2(d.H * d.D_out), bb1(d.H), bb2(d.D_out);
  tuned_portable::backward<T>({d,
                               row_major(gs.data(), d.D_out),
                               row_major(xs.data(), d.D_in),
                               row_major(w1s.data(), d.H),
                               row_major(w2s.data(), d.D_out),
                               act.data(),
                               bx.data(),
                               {bw1.data()},
                               {bw2.data()},
                               bb1.data(),
                               bb2.data()});
  expect("backward", "grad_x", bx, ob.gx, where);
  expect("backward", "grad_w1", bw1, ob.gw1, where);
  expect("backward", "grad_w2", bw2, ob.gw2, where);
  expect("backward", "grad_b1", bb1, ob.gb1, where);
  expect("backward", "grad_b2", bb2, ob.gb2, where);

  // The fused loss's step: every gradient stored, w1's as the transpose of a row-major one.
  std::vector<T> sx(d.N * d.D_in), st(d.N * d.D_out), sw1t(d.H * d.D_in), sw2(d.H * d.D_out);
  std::vector<T> sb1(d.H), sb2(d.D_out);
  StepArgs<T> s{d,
                row_major(xs.data(), d.D_in),
                row_major(ts.data(), d.D_out),
                row_major(w1s.data(), d.H),
                row_major(w2s.data(), d.D_out),
                pb1,
                pb2,
                mean,
                sx.data(),
                st.data(),
                {},
                {},
                {},
                {}};
  s.gw1.store = sw1t.data(), s.gw1.transposed = true;
  s.gw2.store = sw2.data();
  if (bias) s.gb1.store = sb1.data(), s.gb2.store = sb2.data();
  const double loss = tuned_portable::step<T>(s);
  expect("fused step", "loss", std::vector<double>{loss}, Mat{o.loss}, where);
  expect("fused step", "grad_x", sx, o.gx, where);
  expect("fused step", "grad_target", st, o.gt, where);
  expect("fused step", "grad_w1 (transposed)", transposed(sw1t, d.D_in, d.H), o.gw1, where);
  expect("fused step", "grad_w2", sw2, o.gw2, where);
  if (bias) {
    expect("fused step", "grad_b1", sb1, o.gb1, where);
    expect("fused step", "grad_b2", sb2, o.gb2, where);
  }

  // The SGD step: every weight updated in place, from the gradients at the entry weights.
  const double lr = 0.05;
  auto w1u = w1s, w2u = w2s, b1u = b1s, b2u = b2s;
  StepArgs<T> u{d,
                row_major(xs.data(), d.D_in),
                row_major(ts.data(), d.D_out),
                row_major(w1u.data(), d.H),
                row_major(w2u.data(), d.D_out),
                {bias ? b1u.data() : nullptr, 1},
                {bias ? b2u.data() : nullptr, 1},
                mean,
                nullptr,
                nullptr,
                {},
                {},
                {},
                {}};
  u.gw1.update = {w1u.data(), d.H, 1}, u.gw1.lr = T(lr);
  u.gw2.update = {w2u.data(), d.D_out, 1}, u.gw2.lr = T(lr);
  if (bias) {
    u.gb1.update = {b1u.data(), 0, 1}, u.gb1.lr = T(lr);
    u.gb2.update = {b2u.data(), 0, 1}, u.gb2.lr = T(lr);
  }
  const double loss_u = tuned_portable::step<T>(u);
  auto minus = [&](const Mat& w, const Mat& gr) {
    Mat r(w.size());
    for (size_t i = 0; i < w.size(); ++i) r[i] = w[i] - lr * gr[i];
    return r;
  };
  expect("sgd step", "loss", std::vector<double>{loss_u}, Mat{o.loss}, where);
  expect("sgd step", "w1", w1u, minus(w1, o.gw1), where);
  expect("sgd step", "w2", w2u, minus(w2, o.gw2), where);
  if (bias) {
    expect("sgd step", "b1", b1u, minus(b1v, o.gb1), where);
    expect("sgd step", "b2", b2u, minus(b2v, o.gb2), where);
  }

  // The same step on weights in nn.Linear's layout (each the transpose of a row-major
  // matrix, as TwoLayerNet holds them): read through transposed views, updated in place.
  std::vector<T> w1l(w1s.size()), w2l(w2s.size());
  for (int64_t i = 0; i < d.D_in; ++i)
    for (int64_t j = 0; j < d.H; ++j) w1l[j * d.D_in + i] = w1s[i * d.H + j];
  for (int64_t i = 0; i < d.H; ++i)
    for (int64_t j = 0; j < d.D_out; ++j) w2l[j * d.H + i] = w2s[i * d.D_out + j];
  StepArgs<T> l = u;
  l.w1 = View<T>{w1l.data(), d.D_in, 1}.t(), l.w2 = View<T>{w2l.data(), d.H, 1}.t();
  l.b1 = pb1, l.b2 = pb2;
  l.gw1.update = {w1l.data(), 1, d.D_in}, l.gw2.update = {w2l.data(), 1, d.H};
  l.gb1 = {}, l.gb2 = {};
  expect("sgd step, nn.Linear layout", "loss", std::vector<double>{tuned_portable::step<T>(l)},
         Mat{o.loss}, where);
  expect("sgd step, nn.Linear layout", "w1", transposed(w1l, d.D_in, d.H), minus(w1, o.gw1), where);
  expect("sgd step, nn.Linear layout", "w2", transposed(w2l, d.H, d.D_out), minus(w2, o.gw2),
         where);
}

}  // namespace

int main() {
  std::mt19937_64 rng(20261202);
  const Dims shapes[] = {
      {1, 1, 1, 1},        // one of everything
      {5, 7, 3, 2},        // under one tile
      {64, 100, 37, 10},   // edge tiles in rows and columns
      {250, 300, 70, 17},  // several row blocks (MC) and K blocks (KC)
      {4100, 24, 20, 5},   // the narrow row-blocked path (N >= 4096, small weights)
  };
  for (const Dims& d : shapes)
    for (bool bias : {true, false})
      for (bool mean : {false, true}) {
        check_case<float>(d, bias, mean, rng);
        check_case<double>(d, bias, mean, rng);
      }
  std::printf(
      "aarch64 kernel check: %d of %d checks passed (tuned-portable: forward, backward, "
      "fused step, SGD step; float32 and float64; 2 threads)\n",
      checks - failures, checks);
  return failures ? 1 : 0;
}
