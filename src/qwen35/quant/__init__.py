"""Quantized weights: the official block-FP8 releases, weight-only int8 / int4 for CPU decode,
and writing FP8 / BF16 checkpoints (`qwen35 quantize`).

- `formats`: quantize / dequantize in plain PyTorch (the references);
- `matmul`: x @ W^T per format (kernels for decode rows, dequantise + GEMM for prefill);
- `layers`: FP8 / int8 / int4 stand-ins for Linear, Embedding and Experts;
- `packing`: same-input projections packed by format;
- `apply`: which modules are quantized, swapping them in (at load or in memory);
- `fp8_gpu`: block-FP8 GEMMs on CUDA (torch._scaled_mm or a Triton kernel);
- `checkpoint`: writing the official FP8 layout (and back to BF16).
"""
