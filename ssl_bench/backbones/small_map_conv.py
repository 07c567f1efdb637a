"""Convolution weight gradients as one batched GEMM where the output map is tiny (speed.small_map_conv).

On CPU, oneDNN computes a convolution's weight gradient image by image (im2col, then one GEMM per
image accumulated into the gradient). When the output map has a handful of pixels, as in the last
ResNet stages on 16-32 px crops, each of those GEMMs is a rank-1 update of the whole weight and the
step becomes memory-bound: on 2 EPYC cores the 3x3, 512-channel convolution on a 1x1 map took 136 ms
for 192 crops, out of 160 ms for its forward and backward. Unfolding the whole batch and doing one
(O, B*L) x (B*L, C*k*k) GEMM gives the same sum in a few ms. Forward and input gradient stay with
``F.conv2d`` and ``aten.convolution_backward``. ``tests/test_speed.py`` checks the gradients.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

# Output maps of at most this many pixels use the batched GEMM (measured best at 1-16 on 2 EPYC cores).
MAX_PIXELS = 4


class _BatchedWeightGradConv(torch.autograd.Function):
    """conv2d (groups 1, no bias) whose weight gradient is one GEMM over the whole batch."""

    @staticmethod
    def forward(ctx, x, weight, stride, padding, dilation):  # type: ignore[override]
        ctx.save_for_backward(x, weight)
        ctx.conf = (stride, padding, dilation)
        return F.conv2d(x, weight, None, stride, padding, dilation)

    @staticmethod
    def backward(ctx, grad):  # type: ignore[override]
        x, weight = ctx.saved_tensors
        stride, padding, dilation = ctx.conf
        grad_x = grad_w = None
        if ctx.needs_input_grad[0]:
            grad_x = torch.ops.aten.convolution_backward(grad, x, weight, None, stride, padding, dilation, False,
                                                         [0, 0], 1, [True, False, False])[0]
        if ctx.needs_input_grad[1]:
            cols = F.unfold(x, weight.shape[-2:], dilation, padding, stride)  # (B, C*kh*kw, L)
            out = weight.shape[0]
            grad_rows = grad.reshape(grad.shape[0], out, -1).transpose(0, 1).reshape(out, -1)  # (O, B*L)
            grad_w = (grad_rows @ cols.transpose(1, 2).reshape(-1, cols.shape[1])).view_as(weight)
        return grad_x, grad_w, None, None, None


class SmallMapConv2d(nn.Conv2d):
    """``nn.Conv2d`` that takes the batched weight-gradient path when its output map is tiny."""

    def _conv_forward(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
        if torch.is_grad_enabled() and weight.requires_grad and self._output_pixels(x) <= MAX_PIXELS:
            y = _BatchedWeightGradConv.apply(x, weight, self.stride, self.padding, self.dilation)
            return y if bias is None else y + bias.view(1, -1, 1, 1)
        return super()._conv_forward(x, weight, bias)

    def _output_pixels(self, x: torch.Tensor) -> int:
        pixels = 1
        for i in (0, 1):
            extent = self.dilation[i] * (self.kernel_size[i] - 1) + 1
            pixels *= (x.shape[-2 + i] + 2 * self.padding[i] - extent) // self.stride[i] + 1
        return pixels


def enable(model: nn.Module) -> int:
    """Switch every eligible Conv2d of ``model`` (groups 1, zero padding given as numbers) in place;
    parameters and state-dict keys are unchanged. Returns how many were switched."""
    switched = 0
    for module in model.modules():
        if (type(module) is nn.Conv2d and module.groups == 1 and module.padding_mode == "zeros"
                and not isinstance(module.padding, str)):
            module.__class__ = SmallMapConv2d
            switched += 1
    return switched
