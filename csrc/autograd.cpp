// The autograd formulas of the public ops, one per op, registered for the Autograd
// dispatch key in C++: each builds its backward node by hand, as PyTorch's own
// generated VariableType kernels do, so a call costs a few microseconds instead of a
// Python autograd.Function (about 60 us per op here), and torch.compile, opcheck and
// the functorch transforms see an ordinary op with an ordinary autograd kernel.
//
//   two_layer(x, w1, w2, b1, b2)        -> two_layer_fwd; backward: two_layer_bwd
//   l2_loss(pred, target)               -> l2_loss_fwd with its gradient; backward: l2_loss_bwd
//   two_layer_l2_loss(x, target, w...)  -> two_layer_l2_loss_fwd computes every needed
//                                          gradient in the forward; backward: l2_loss_bwd
//                                          scales each by grad_loss
//
// Without autograd (no_grad, inference_mode, nothing requires grad) the same public ops
// run their CompositeExplicitAutograd kernel: the forward op alone, no gradients.
// The kernel ops (forward and backward) run below autograd; a derivative through what they
// return is refused by one node, NoDerivative, with a clear error.
#include <ATen/core/dispatch/Dispatcher.h>
#include <ATen/ops/neg.h>
#include <torch/csrc/autograd/function.h>
#include <torch/csrc/autograd/functions/utils.h>
#include <torch/csrc/autograd/graph_task.h>
#include <torch/csrc/autograd/VariableTypeUtils.h>
#include <torch/csrc/autograd/saved_variable.h>
#include <torch/library.h>

#include <array>
#include <string>

#include "kernels.h"

namespace twolayer {

namespace {

using torch::autograd::Node;
using torch::autograd::SavedVariable;
using torch::autograd::variable_list;

// The op with that name, looked up once.
template <typename Sig>
c10::TypedOperatorHandle<Sig> op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Sig>();
}

// The kernel op `name`, typed by its row in op_table.h.
#define TWOLAYER_OP(var, name) static const auto var = op<sig::name>("twolayer_ext::" #name)

bool needs_grad(const at::Tensor& t) { return t.defined() && t.requires_grad(); }
bool needs_grad(const OptTensor& t) { return t && t->requires_grad(); }

bool has_tangent(const at::Tensor& t) { return t.defined() && t._fw_grad(/*level=*/0).defined(); }
bool has_tangent(const OptTensor& t) { return t && has_tangent(*t); }

// No forward-mode formula: a tangent (torch.func.jvp, jacfwd, hessian, forward_ad duals) is
// refused with NotImplementedError, as torch refuses it for its own ops without one, rather
// than dropped (which would give zero derivatives).
template <typename... Inputs>
void refuse_forward_ad(const char* public_name, const Inputs&... inputs) {
  TORCH_CHECK_NOT_IMPLEMENTED(!(has_tangent(inputs) || ...),
                              "twolayer_ext: forward-mode AD (torch.func.jvp, jacfwd, hessian, "
                              "torch.autograd.forward_ad) through ",
                              public_name,
                              " is not implemented; use reverse mode (backward, torch.func.grad, "
                              "vjp, jacrev), or the torch reference for forward mode");
}

// Calls below autograd: the backend (or Python/fake) kernel of a forward op.
template <typename F>
auto below_autograd(F&& f) {
  at::AutoDispatchBelowADInplaceOrView guard;
  return f();
}

at::Tensor opt_or_undefined(const OptTensor& t) { return t ? *t : at::Tensor(); }
OptTensor defined_or_none(const at::Tensor& t) { return t.defined() ? OptTensor(t) : std::nullopt; }

// A node with these saved tensors, whose inputs' edges are `edges`.
template <typename NodeT>
c10::intrusive_ptr<NodeT> make_node(torch::autograd::edge_list edges) {
  auto node = c10::make_intrusive<NodeT>();
  node->set_next_edges(std::move(edges));
  return node;
}

// ---- no second derivative --------------------------------------------------------------------

// The public op a kernel op serves (op_table.h).
const char* public_op_of(c10::string_view kernel) {
#define TWOLAYER_PUBLIC_OF(name, pub, args, rets, ret, params) \
  if (kernel == #name) return #pub;
  TWOLAYER_KERNEL_OPS(TWOLAYER_PUBLIC_OF)
#undef TWOLAYER_PUBLIC_OF
  return "twolayer_ext";
}

// The one node that refuses a second derivative: the history given to what a kernel op
// returns from inputs that require grad (kernel_op_autograd below), and to the gradients a
// loss's backward returns under create_graph=True. A derivative through it is an error,
// never silently zero.
struct NoDerivative : Node {
  std::string kernel;  // the kernel op, without the namespace
  std::string name() const override { return "NoDerivative"; }
  variable_list apply(variable_list&&) override {
    TORCH_CHECK(false,
                "twolayer_ext: double backward (create_graph=True, then a second "
                "backward) and higher-order derivatives (hessian, torch.func.grad of grad, "
                "jacrev of jacrev) through ",
                public_op_of(kernel), " are not supported: ", kernel,
                " has no derivative formula (the public ops differentiate once); use "
                "the torch reference implementation for higher-order gradients");
  }
};

// ---- two_layer -----------------------------------------------------------------------------

struct TwoLayerBackward : Node {
  SavedVariable x, w1, w2, act;
  std::array<bool, 5> mask{};        // (x, w1, w2, b1, b2)
  std::array<bool, 2> transposed{};  // w1's, w2's gradient in its weight's transposed layout
  std::string name() const override { return "TwoLayerBackward"; }
  void release_variables() override {
    x.reset_data(), w1.reset_data(), w2.reset_data(), act.reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    TWOLAYER_OP(bwd, two_layer_bwd);
    variable_list out(5);
    if (!grads[0].defined()) return out;  // y unused: every gradient is zero (None)
    const at::Tensor xs = x.unpack(), w1s = w1.unpack();
    auto [gx, gw1, gw2, gb1, gb2] = bwd.call(grads[0], defined_or_none(xs), defined_or_none(w1s),
                                             w2.unpack(), act.unpack(), mask, transposed);
    out[0] = opt_or_undefined(gx), out[1] = opt_or_undefined(gw1), out[2] = opt_or_undefined(gw2);
    out[3] = opt_or_undefined(gb1), out[4] = opt_or_undefined(gb2);
    return out;
  }
};

at::Tensor two_layer_autograd(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                              const OptTensor& b1, const OptTensor& b2) {
  TWOLAYER_OP(fwd, two_layer_fwd);
  refuse_forward_ad("two_layer", x, w1, w2, b1, b2);
  auto [y, act] = below_autograd([&] { return fwd.call(x, w1, w2, b1, b2); });
  const std::array<bool, 5> mask{needs_grad(x), needs_grad(w1), needs_grad(w2), needs_grad(b1),
                                 needs_grad(b2)};
  if (!c10::GradMode::is_enabled() || !(mask[0] || mask[1] || mask[2] || mask[3] || mask[4]))
    return y;
  auto node = make_node<TwoLayerBackward>(torch::autograd::collect_next_edges(x, w1, w2, b1, b2));
  node->mask = mask;
  // A weight that is the transpose of a row-major matrix (TwoLayerNet's .t() views of its
  // nn.Linear parameters) gets its gradient in that layout: through the view's backward it
  // reaches the parameter in the parameter's own layout, where AccumulateGrad takes it without
  // a copy (kernels.h).
  node->transposed = {mask[1] && transposed_layout(w1), mask[2] && transposed_layout(w2)};
  // Only what the wanted gradients read: x for grad_w1, w1 for grad_x.
  if (mask[1]) node->x = SavedVariable(x, false);
  if (mask[0]) node->w1 = SavedVariable(w1, false);
  node->w2 = SavedVariable(w2, false);
  node->act = SavedVariable(act, false);
  torch::autograd::set_history(y, node);
  return y;
}

// ---- l2_loss -------------------------------------------------------------------------------

// A CPU tensor whose value can be read here: not a fake, functional, batched or wrapped one
// (torch.compile, opcheck and torch.func trace through the node without values).
bool plain_cpu(const at::Tensor& t) {
  const c10::DispatchKeySet traced({c10::DispatchKey::Python, c10::DispatchKey::PythonTLSSnapshot,
                                    c10::DispatchKey::Functionalize,
                                    c10::DispatchKey::FuncTorchGradWrapper,
                                    c10::DispatchKey::FuncTorchBatched});
  return t.is_cpu() && !t.key_set().has_any(traced);
}

// grad_loss * each gradient saved by a loss's forward (pred's, then -pred's for target).
struct ScaleSavedGrads : Node {
  std::string node_name;
  std::vector<SavedVariable> saved;  // one per input; undefined where no gradient is wanted
  std::string name() const override { return node_name; }
  void release_variables() override {
    for (auto& s : saved) s.reset_data();
  }
  variable_list apply(variable_list&& grads) override {
    TWOLAYER_OP(scale, l2_loss_bwd);
    variable_list out(saved.size());
    if (!grads[0].defined()) return out;
    // loss.backward() seeds 1: the saved gradients are the answer, unscaled. When the graph
    // is freed after this backward they are handed over, not shared, so AccumulateGrad makes
    // them .grad without a copy.
    if (!c10::GradMode::is_enabled() && plain_cpu(grads[0]) && grads[0].numel() == 1 &&
        grads[0].item<double>() == 1.0) {
      const bool hand_over = !torch::autograd::get_current_graph_task_keep_graph();
      for (size_t i = 0; i < saved.size(); ++i) {
        out[i] = saved[i].unpack();
        if (hand_over) saved[i].reset_data();
      }
      return out;
    }
    for (size_t i = 0; i < saved.size(); ++i) {
      const at::Tensor g = saved[i].unpack();
      if (g.defined()) out[i] = scale.call(grads[0], g);
    }
    // create_graph=True: the saved gradients are constants to autograd, so these results
    // would silently have no history; give them one that refuses a second backward.
    if (c10::GradMode::is_enabled()) {
      auto refuse = c10::make_intrusive<NoDerivative>();
      refuse->kernel = "l2_loss_bwd";
      refuse->set_next_edges(torch::autograd::edge_list(next_edges()));
      for (auto& g : out)
        if (g.defined() && !g.requires_grad()) torch::autograd::set_history(g, refuse);
    }
    return out;
  }
};

at::Tensor l2_loss_autograd(const at::Tensor& pred, const at::Tensor& target,
                            c10::string_view reduction) {
  TWOLAYER_OP(fwd, l2_loss_fwd);
  refuse_forward_ad("l2_loss", pred, target);
  const bool need_pred = needs_grad(pred), need_target = needs_grad(target);
  const bool grad = c10::GradMode::is_enabled() && (need_pred || need_target);
  auto [loss, g] = below_autograd([&] { return fwd.call(pred, target, reduction, grad); });
  if (!grad) return loss;
  auto node = make_node<ScaleSavedGrads>(torch::autograd::collect_next_edges(pred, target));
  node->node_name = "L2LossBackward";
  node->saved.resize(2);
  if (need_pred) node->saved[0] = SavedVariable(*g, false);
  if (need_target)
    node->saved[1] = SavedVariable(below_autograd([&] { return at::neg(*g); }), false);
  torch::autograd::set_history(loss, node);
  return loss;
}

// ---- two_layer_l2_loss ---------------------------------------------------------------------

at::Tensor two_layer_l2_loss_autograd(const at::Tensor& x, const at::Tensor& target,
                                      const at::Tensor& w1, const at::Tensor& w2,
                                      const OptTensor& b1, const OptTensor& b2,
                                      c10::string_view reduction, bool linear_layout) {
  TWOLAYER_OP(fwd, two_layer_l2_loss_fwd);
  refuse_forward_ad("two_layer_l2_loss", x, target, w1, w2, b1, b2);
  std::array<bool, 6> mask{needs_grad(x),  needs_grad(target), needs_grad(w1),
                           needs_grad(w2), needs_grad(b1),     needs_grad(b2)};
  if (!c10::GradMode::is_enabled()) mask.fill(false);
  // nn.Linear-layout weights: the kernel takes their transposes, made below autograd (no view
  // nodes), and their gradients are transposed back (free views, in the weights' own layout).
  const auto [kw1, kw2] =
      below_autograd([&] { return linear_layout ? std::pair(w1.t(), w2.t()) : std::pair(w1, w2); });
  // Gradients in their weight's layout (kernels.h), so AccumulateGrad takes them as they are.
  const std::array<bool, 2> transposed{transposed_layout(kw1), transposed_layout(kw2)};
  auto outs = below_autograd(
      [&] { return fwd.call(x, target, kw1, kw2, b1, b2, reduction, mask, transposed); });
  at::Tensor loss = std::get<0>(outs);
  if (!(mask[0] || mask[1] || mask[2] || mask[3] || mask[4] || mask[5])) return loss;
  auto node =
      make_node<ScaleSavedGrads>(torch::autograd::collect_next_edges(x, target, w1, w2, b1, b2));
  node->node_name = "TwoLayerL2LossBackward";
  node->saved.resize(6);
  std::array<OptTensor, 6> grads{std::get<1>(outs), std::get<2>(outs), std::get<3>(outs),
                                 std::get<4>(outs), std::get<5>(outs), std::get<6>(outs)};
  if (linear_layout) {
    at::AutoDispatchBelowADInplaceOrView guard;
    for (size_t i : {2, 3})
      if (grads[i]) grads[i] = grads[i]->t();
  }
  for (size_t i = 0; i < 6; ++i)
    if (grads[i]) node->saved[i] = SavedVariable(*grads[i], false);
  torch::autograd::set_history(loss, node);
  return loss;
}

// ---- without autograd: the forward ops alone -----------------------------------------------

at::Tensor two_layer_plain(const at::Tensor& x, const at::Tensor& w1, const at::Tensor& w2,
                           const OptTensor& b1, const OptTensor& b2) {
  TWOLAYER_OP(fwd, two_layer_fwd);
  return std::get<0>(fwd.call(x, w1, w2, b1, b2));
}

at::Tensor l2_loss_plain(const at::Tensor& pred, const at::Tensor& target,
                         c10::string_view reduction) {
  TWOLAYER_OP(fwd, l2_loss_fwd);
  return std::get<0>(fwd.call(pred, target, reduction, false));
}

at::Tensor two_layer_l2_loss_plain(const at::Tensor& x, const at::Tensor& target,
                                   const at::Tensor& w1, const at::Tensor& w2, const OptTensor& b1,
                                   const OptTensor& b2, c10::string_view reduction,
                                   bool linear_layout) {
  TWOLAYER_OP(fwd, two_layer_l2_loss_fwd);
  const at::Tensor kw1 = linear_layout ? w1.t() : w1, kw2 = linear_layout ? w2.t() : w2;
  return std::get<0>(fwd.call(x, target, kw1, kw2, b1, b2, reduction, {}, {}));
}

// ---- the kernel ops: computed below autograd, never differentiated ----------------------------

// The kernel ops are internal: differentiate through the public ops. Autograd reaches them
// when they are called directly, in a backward under create_graph=True (the backward ops),
// or from an outer torch.func transform differentiating a gradient (grad of grad, jacrev of
// jacrev): they compute below autograd, and what they return from inputs that require grad
// gets a NoDerivative history.
void kernel_op_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                        torch::jit::Stack* stack) {
  const auto n_in = op.schema().arguments().size();
  std::vector<at::Tensor> inputs;
  for (auto it = stack->end() - n_in; it != stack->end(); ++it) {
    if (it->isTensor()) inputs.push_back(it->toTensor());
  }
  const std::string name = op.schema().name();
  for (const auto& t : inputs) refuse_forward_ad(name.c_str(), t);
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    op.redispatchBoxed(keys & c10::after_ADInplaceOrView_keyset, stack);
  }
  if (!c10::GradMode::is_enabled()) return;
  torch::autograd::edge_list edges;
  bool any = false;
  for (const auto& t : inputs) {
    any = any || needs_grad(t);
    edges.push_back(torch::autograd::impl::gradient_edge(t));
  }
  if (!any) return;
  auto node = make_node<NoDerivative>(std::move(edges));
  node->kernel = name.substr(name.find("::") + 2);
  const auto n_out = op.schema().returns().size();
  for (auto it = stack->end() - n_out; it != stack->end(); ++it)
    if (it->isTensor() && it->toTensor().is_floating_point())
      torch::autograd::set_history(it->toTensor(), node);
}

// sgd_step updates its weights as an optimizer does, below autograd (under no_grad from
// Python), through the ADInplaceOrView kernel below.
void sgd_step_autograd(const c10::OperatorHandle& op, c10::DispatchKeySet keys,
                       torch::jit::Stack* stack) {
  at::AutoDispatchBelowAutograd guard;
  op.redispatchBoxed(keys & c10::after_autograd_keyset, stack);
}

// Bumps the version counter of each weight it updated, as every in-place op does (also inside
// inference_mode, for normal tensors), so a graph that saved a weight before the step refuses
// to backpropagate through the new values ("modified by an inplace operation").
at::Tensor sgd_step_inplace(c10::DispatchKeySet keys, const at::Tensor& x, const at::Tensor& target,
                            const at::Tensor& w1, const at::Tensor& w2, const OptTensor& b1,
                            const OptTensor& b2, double lr, c10::string_view reduction,
                            std::array<bool, 4> update) {
  TWOLAYER_OP(step, sgd_step);
  at::Tensor loss;
  {
    at::AutoDispatchBelowADInplaceOrView guard;
    loss = step.redispatch(keys & c10::after_ADInplaceOrView_keyset, x, target, w1, w2, b1, b2, lr,
                           reduction, update);
  }
  const std::array<const at::Tensor*, 4> weights{&w1, &w2, b1 ? &*b1 : nullptr,
                                                 b2 ? &*b2 : nullptr};
  for (size_t i = 0; i < weights.size(); ++i)
    if (weights[i] && update[i]) torch::autograd::increment_version(*weights[i]);
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(twolayer_ext, ADInplaceOrView, m) { m.impl("sgd_step", &sgd_step_inplace); }

TORCH_LIBRARY_IMPL(twolayer_ext, Autograd, m) {
  for (const char* name :
       {"two_layer_fwd", "two_layer_bwd", "l2_loss_fwd", "l2_loss_bwd", "two_layer_l2_loss_fwd"})
    m.impl(name, torch::CppFunction::makeFromBoxedFunction<&kernel_op_autograd>());
  m.impl("sgd_step", torch::CppFunction::makeFromBoxedFunction<&sgd_step_autograd>());
  m.impl("two_layer", &two_layer_autograd);
  m.impl("l2_loss", &l2_loss_autograd);
  m.impl("two_layer_l2_loss", &two_layer_l2_loss_autograd);
}

TORCH_LIBRARY_IMPL(twolayer_ext, CompositeExplicitAutograd, m) {
  m.impl("two_layer", &two_layer_plain);
  m.impl("l2_loss", &l2_loss_plain);
  m.impl("two_layer_l2_loss", &two_layer_l2_loss_plain);
}

}  // namespace twolayer
