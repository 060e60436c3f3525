// One 64-byte SIMD vector of T, shared by the C++ CPU kernels (ttt_decode.cpp, ttt_scan.cpp): a GCC/clang vector
// extension type, AVX-512 with -march=native, else split by the compiler into narrower vectors.
#pragma once

namespace ttt_cpu {

template <typename T>
struct Lanes;
template <>
struct Lanes<float> {
  typedef float type __attribute__((vector_size(64)));
};
template <>
struct Lanes<double> {
  typedef double type __attribute__((vector_size(64)));
};

}  // namespace ttt_cpu
