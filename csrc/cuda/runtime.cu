// CUDA runtime queries for the C++ side: device count (so a missing GPU or driver becomes a clear error)
// and error strings.
#include <cuda_runtime.h>

#include "cuda/launchers.h"

extern "C" int saliq_cuda_device_count(int* count) {
  *count = 0;
  const cudaError_t err = cudaGetDeviceCount(count);
  if (err != cudaSuccess) {
    *count = 0;
    cudaGetLastError();  // clear the sticky error state of this call
  }
  return (int)err;
}

extern "C" const char* saliq_cuda_error_string(int error) { return cudaGetErrorString((cudaError_t)error); }
