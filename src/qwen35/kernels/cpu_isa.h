// The instruction sets the CPU kernels of this folder choose between at run time (the builds
// target AVX2 + FMA; AVX512 functions carry target attributes and run only where these say so).
// (kernels/__init__.py's Native hashes this header with each source of this folder.)
// QWEN35_CPU_ISA=avx2 (read once per process) makes every kernel take its AVX2 path, as on a CPU
// without AVX512 (AMD Zen 3, say): what such a CPU runs can be measured on any x86-64 machine
// (README: "Dtype"; devices.py drops the AVX512 / AMX flags the same way).
#pragma once

#include <cstdlib>
#include <cstring>

namespace cpu_isa {

inline bool avx2_forced() {
  static const bool on = [] {
    const char* v = std::getenv("QWEN35_CPU_ISA");
    return v != nullptr && std::strcmp(v, "avx2") == 0;
  }();
  return on;
}

inline bool avx512f() {
  static const bool ok = !avx2_forced() && __builtin_cpu_supports("avx512f");
  return ok;
}

inline bool avx512() {  // F, BW, VL, DQ
  static const bool ok = avx512f() && __builtin_cpu_supports("avx512bw") &&
                         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
  return ok;
}
inline bool avx512_bf16() {
  static const bool ok = avx512() && __builtin_cpu_supports("avx512bf16");
  return ok;
}
inline bool avx512_bf16_vbmi() {  // the byte-table paths (vpermi2b + vdpbf16ps)
  static const bool ok = avx512_bf16() && __builtin_cpu_supports("avx512vbmi");
  return ok;
}

inline bool avx512_vnni() {  // vpdpbusd: int8 dot products (head_screen_cpu.cpp)
  static const bool ok = avx512() && __builtin_cpu_supports("avx512vnni");
  return ok;
}

}  // namespace cpu_isa
