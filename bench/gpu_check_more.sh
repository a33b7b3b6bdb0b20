#!/usr/bin/env bash
# The second prepared H200 call (device tool), after bench/gpu_check.sh and after committing the
# fla configs it brought back (src/qwen35/kernels/fla_configs/: this call's engines then start
# without autotuning fla):
#   1. Qwen3.5-35B-A3B batch-1 decode (random bf16 weights, ~70 GB): the "<= 5 ms/token" goal
#      (5.78 ms before the MoE kernels were rebuilt; call 1's "MoE kernels" step times them), with
#      4 decode steps a round and single steps beside it (the ~1 ms a token the profiler found
#      between kernels is host time, which multi-step decoding spreads over 4 tokens).
#   2. 0.8B decode at batch 1 and 32 with 4 decode steps a scheduling round
#      (--num-scheduler-steps 4, multi-step decoding: the host's per-step work hidden behind the
#      GPU's), a single-step engine on the same weights beside it, round by round.
#   3. 32 mixed requests, ours vs transformers (one static batch of 32: transformers' shortest
#      wall time, so the ratio is a floor), 0.8B; the ">= 5x transformers" goal.
#   4. FP8 MoE decode: Qwen3.5-35B-A3B-FP8 with random e4m3 weights (~35 GB).
#   5. bench/gpu_kernels.py: our other decode kernels against the paths they replaced, at the
#      real shapes (FP8 GEMV vs quantize + scaled GEMM; split-K vs unsplit decode attention at
#      1K-32K; a 2,048-token prefill chunk after 2K-30K cached tokens: our Triton paged kernel vs
#      gather + SDPA (FlashAttention with a bottom-right causal bias); DeltaNet gates in the
#      kernel vs apart).
#   6. (last: what time is left; the fla configs are packed before it) a 9B prompt of 8K / 32K
#      tokens through the engine, time to first token with each chunk path (bench/gpu_prefill.py
#      --engine: the paged Triton kernel vs the gathered context through SDPA, the engine's own
#      start-up choice printed): the prefill a user gets, 2,048 tokens a step, where the 29.5K
#      tok/s of the first session was one unchunked forward; and the chosen path with the
#      prefix cache's state checkpoints 2,048 tokens apart instead of ~256 (each checkpoint
#      splits fla's chunked call: 8 calls a layer a step at 256; --checkpoint-interval). Run
#      with timeout_s=390 to give it its 60 s; at 330 it is cut and the rest comes back.
# (The 9B prefill with its kernels by device time, `python3 bench/gpu_prefill.py --model
#  Qwen3.5-9B --reps 1 --profile`, waits for a call with time to spare: 29.5K tok/s at 32K on
#  2026-12-04.)
# Same wheels (.whl/, carried), same kind as call 1: run(command="bash bench/gpu_check_more.sh",
#   carry=[".whl"], kind="nvidia-h200", timeout_s=390) — or what is left of the device budget after the first call (the device tool cuts a
#   call to it): step 6 is then the one cut. Results under $OUT.
# First H200 session (2026-12-04): 35B-A3B decode 5.8 ms/token, 535 kernels per token.
source bench/gpu_env.sh  # OUT, the wheels, PYTHONPATH, step()
LOG="$OUT/more.log"
B="python3 -m qwen35.cli bench --device cuda"
step 70 "35B-A3B decode, 4 steps a round beside single steps" $B --model Qwen3.5-35B-A3B \
  --workload decode --no-baseline --scheduler-steps 4 --out "$OUT/35b_decode.json"
step 60 "0.8B decode, 4 steps a round" $B --model Qwen3.5-0.8B --workload decode --no-baseline \
  --batches 32 --scheduler-steps 4 --out "$OUT/08b_decode_k4.json"
step 80 "0.8B throughput" $B --model Qwen3.5-0.8B --workload throughput --hf-batch-size 32 \
  --out "$OUT/08b_throughput.json"
step 60 "35B-A3B-FP8 decode" $B --model Qwen3.5-35B-A3B-FP8 --workload decode --no-baseline \
  --out "$OUT/35b_fp8_decode.json"
step 80 "kernels vs what they replaced" python3 bench/gpu_kernels.py --only fp8,int,attention,deltanet \
  --out "$OUT/kernels.json"
# fla's configs again: this call's transformers runs tune fla at their own (not varlen) shapes,
# which the first call's configs do not match; merge into kernels/fla_configs/ as before
pack_fla_configs
step 60 "9B prompt prefill through the engine, chunk paths" python3 bench/gpu_prefill.py \
  --model Qwen3.5-9B --engine --tokens 8192 32768 --reps 2 --checkpoint-interval 2048 \
  --out "$OUT/9b_engine_prefill.json"
# 7. (what time is left after that) the smaller caches on the GPU: fp8 K/V and bf16 DeltaNet
# states against the default caches, batched decode of the 0.8B (Triton kernels widening fp8 tiles
# and bf16 state tiles; CPU-measured 0.96-1.02x there, README "FP8 KV cache")
step 45 "0.8B decode on fp8 K/V and bf16 states" python3 bench/cache_dtypes.py --device cuda \
  --batches 1,32 --prompt 512 --steps 16 --rounds 2
# 8. (what time is left) weight formats side by side: the 9B's batch-1 decode in BF16, FP8 and
# int4 (kernels/triton_int.py, written 2026-12-07 without a GPU: its first timing)
step 60 "9B decode: bf16 / fp8 / int4 weights" python3 bench/decode_formats.py --device cuda \
  --model Qwen3.5-9B --formats bf16,fp8,int4 --rounds 3 --steps 24 --prompt 256
# 9. (what time is left) speculative decoding on the GPU: decode and verify steps now replay from
# CUDA graphs (engine/cuda_graphs.py run_phased, 2026-12-07, never timed): the 0.8B at batch 1,
# k = 1 and 3, oracle drafts at 100/80/60% beside the plain engine, round by round
step 90 "0.8B speculative decoding, graphs" $B --model Qwen3.5-0.8B --workload spec \
  --draft-tokens 1,3 --rounds 2 --out "$OUT/08b_spec.json"
date -u | tee -a "$LOG"
