// The parts of <torch/extension.h> the kernels use: tensors, at::empty / empty_like, AT_DISPATCH_*,
// at::parallel_for and pybind11 with torch's tensor caster. torch/extension.h also pulls in the
// whole C++ frontend (nn, optim, data), which is most of a kernel's first build: ~40 s of a
// 2-core machine's compiler time per source file against ~14 s for these.
#pragma once

#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/empty_like.h>
#include <torch/csrc/utils/pybind.h>

// A kernel's binding runs it without the GIL (after its arguments are converted, before its
// result is): `qwen35 serve` steps the engine on one thread and answers HTTP on another, whose
// event loop would otherwise wait for every long kernel (a prefill chunk's attention: up to a
// second at long contexts). No kernel touches a Python object inside.
#define QWEN35_NOGIL pybind11::call_guard<pybind11::gil_scoped_release>()

namespace torch {
using at::empty;
using at::empty_like;
using at::Tensor;
using at::kBFloat16;
using at::kLong;
constexpr auto kFloat32 = at::kFloat;
}  // namespace torch
