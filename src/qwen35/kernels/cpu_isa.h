// The instruction sets the CPU kernels of this folder choose between at run time (the builds
// target AVX2 + FMA; AVX512 functions carry target attributes and run only where these say so).
// (kernels/__init__.py's Native hashes this header with each source of this folder.)
#pragma once

namespace cpu_isa {

inline bool avx512() {  // F, BW, VL, DQ
  static const bool ok = __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
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
