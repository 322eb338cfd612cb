// The pybind11 module opdcore._C: build information and the packed-sequence buffer class.
// The only translation unit that includes torch/extension.h (it is slow to compile); the operators
// themselves register through TORCH_LIBRARY in csrc/torch/ and are reached as torch.ops.opdcore.*.
#include <torch/extension.h>

#include <omp.h>

namespace py = pybind11;

PYBIND11_MODULE(_C, m) {
  m.doc() = "opdcore native kernels";
  m.def("build_info", [] {
    py::dict d;
    d["version"] = OPDCORE_VERSION;
    d["torch_version_built"] = OPDCORE_TORCH_VERSION;
#ifdef OPDCORE_WITH_CUDA
    d["cuda_compiled"] = true;
#else
    d["cuda_compiled"] = false;
#endif
    d["openmp_max_threads"] = omp_get_max_threads();
    return d;
  });
}
