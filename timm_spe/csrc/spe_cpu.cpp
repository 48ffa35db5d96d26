// Registers SPE's CPU kernels as torch.ops.timm_spe.*: what they do is in spe_cpu.h, the code in max_min.cpp and
// passes.cpp and gate.cpp.
#include "spe_cpu.h"

using namespace timm_spe_cpu;

TORCH_LIBRARY(timm_spe, m) {
  m.def("max_min(Tensor x) -> (Tensor, Tensor)");
  m.def("max_min_with_indices(Tensor x) -> (Tensor, Tensor, Tensor, Tensor)");
  m.def("scale_add_relu_(Tensor(a!) x, Tensor shortcut, Tensor gate) -> ()");
  m.def("channels_last_per_map_sums(Tensor grad, Tensor x, Tensor mean, Tensor i_max, Tensor i_min) -> "
        "(Tensor, Tensor, Tensor, Tensor)");
  m.def("bn_input_grad_(Tensor(a!) out, Tensor grad, Tensor x, Tensor grad_scale, Tensor shift, Tensor x_coef, "
        "Tensor i_max, Tensor v_max, Tensor i_min, Tensor v_min) -> ()");
  m.def("take_at(Tensor x, Tensor index) -> Tensor");
  m.def("scatter_add_at_(Tensor(a!) t, Tensor index, Tensor values) -> ()");
  m.def("spe_gate(Tensor f_max, Tensor f_min, Tensor lam, Tensor w_exc, Tensor b_exc, Tensor w_rew, Tensor b_rew, "
        "bool paper) -> Tensor");
  m.def("mix_weights(Tensor p) -> Tensor");
  m.def("spe_gate_of(Tensor x, Tensor p, Tensor w_exc, Tensor b_exc, Tensor w_rew, Tensor b_rew, bool paper) -> Tensor");
  m.def("spe_add_relu_(Tensor(a!) x, Tensor shortcut, Tensor p, Tensor w_exc, Tensor b_exc, Tensor w_rew, "
        "Tensor b_rew, bool paper) -> ()");
  m.def("block_backward_coefficients(Tensor sum_grad, Tensor sum_grad_xhat, Tensor x_max, Tensor x_min, "
        "Tensor f_max, Tensor f_min, Tensor gate, Tensor mean, Tensor invstd, Tensor bn_weight, Tensor bn_bias, "
        "Tensor lam, Tensor w_exc, Tensor b_exc, Tensor w_rew, Tensor b_rew, bool paper, int count) -> Tensor[]");
}

TORCH_LIBRARY_IMPL(timm_spe, CPU, m) {
  m.impl("max_min", &max_min);
  m.impl("max_min_with_indices", &max_min_with_indices);
  m.impl("scale_add_relu_", &scale_add_relu_);
  m.impl("bn_input_grad_", &bn_input_grad_);
  m.impl("channels_last_per_map_sums", &channels_last_per_map_sums);
  m.impl("take_at", &take_at);
  m.impl("scatter_add_at_", &scatter_add_at_);
  m.impl("spe_gate", &spe_gate);
  m.impl("mix_weights", &mix_weights);
  m.impl("spe_gate_of", &spe_gate_of);
  m.impl("spe_add_relu_", &spe_add_relu_);
  m.impl("block_backward_coefficients", &block_backward_coefficients);
}
