# Locate the installed torch through its Python package instead of find_package(Torch):
# this is lighter, works for CPU and CUDA wheels alike, and always matches the torch that will import us.
execute_process(
  COMMAND "${Python_EXECUTABLE}" -c
    "import torch, torch.utils.cpp_extension as c; print('|'.join(c.include_paths())); print('|'.join(c.library_paths())); print(int(torch._C._GLIBCXX_USE_CXX11_ABI)); print(torch.__version__); print(torch.version.cuda or '')"
  OUTPUT_VARIABLE _opd_torch_out
  RESULT_VARIABLE _opd_torch_rc
  OUTPUT_STRIP_TRAILING_WHITESPACE)
if(NOT _opd_torch_rc EQUAL 0)
  message(FATAL_ERROR "opdcore: could not import torch from ${Python_EXECUTABLE}. "
                      "Install torch first and build with --no-build-isolation.")
endif()
string(REPLACE "\n" ";" _opd_torch_lines "${_opd_torch_out}")
list(GET _opd_torch_lines 0 _opd_inc)
list(GET _opd_torch_lines 1 _opd_lib)
list(GET _opd_torch_lines 2 TORCH_CXX11_ABI)
list(GET _opd_torch_lines 3 TORCH_VERSION)
list(LENGTH _opd_torch_lines _opd_n)
set(TORCH_CUDA_VERSION "")
if(_opd_n GREATER 4)
  list(GET _opd_torch_lines 4 TORCH_CUDA_VERSION)
endif()
string(REPLACE "|" ";" TORCH_INCLUDE_DIRS "${_opd_inc}")
string(REPLACE "|" ";" TORCH_LIBRARY_DIRS "${_opd_lib}")

set(_opd_libs c10 torch torch_cpu torch_python)
if(TORCH_CUDA_VERSION)
  list(APPEND _opd_libs c10_cuda torch_cuda)
endif()
set(TORCH_LIBRARIES "")
foreach(_l ${_opd_libs})
  find_library(_opd_lib_${_l} ${_l} PATHS ${TORCH_LIBRARY_DIRS} NO_DEFAULT_PATH REQUIRED)
  list(APPEND TORCH_LIBRARIES ${_opd_lib_${_l}})
endforeach()
