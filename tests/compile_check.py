"""Shared check: a model's train step under torch.compile equals eager (used by test_resnet and test_cpu_kernels)."""
import copy

import torch
from torch import nn


def assert_compiled_train_step_matches_eager(model: nn.Module, x: torch.Tensor) -> None:
    """aot_eager (dynamo + AOTAutograd, no C++ compiler needed), fullgraph: output, parameter gradients and
    buffers (BN running statistics) equal eager's from the same start."""
    ref = copy.deepcopy(model).train()
    out = torch.compile(model.train(), backend='aot_eager', fullgraph=True)(x)
    out_ref = ref(x)
    torch.testing.assert_close(out, out_ref)
    out.square().mean().backward()
    out_ref.square().mean().backward()
    for (name, p), q in zip(model.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, msg=name)
    for (name, b), c in zip(model.named_buffers(), ref.buffers()):
        torch.testing.assert_close(b, c, msg=name)
