// The pybind11 module opdcore._C: build information and the packed-sequence buffer class.
// The only translation unit that includes torch/extension.h (it is slow to compile); the operators
// themselves register through TORCH_LIBRARY in csrc/torch/ and are reached as torch.ops.opdcore.*.
#include <pybind11/stl.h>
#include <torch/extension.h>

#include <omp.h>

#include <optional>
#include <string>
#include <vector>

#include "packed_buffer.h"

namespace py = pybind11;

namespace {

// payloads: a dict str -> Tensor (or None), in the caller's key order.
opdcore::NamedTensors named_tensors(const py::object& obj, const char* what) {
  opdcore::NamedTensors out;
  if (obj.is_none()) return out;
  if (!py::isinstance<py::dict>(obj))
    throw py::type_error(std::string(what) + " must be a dict of name -> Tensor, got " +
                         std::string(py::str(py::type::of(obj).attr("__name__"))));
  for (const auto& kv : obj.cast<py::dict>()) {
    if (!py::isinstance<py::str>(kv.first))
      throw py::type_error(std::string(what) + " keys must be str, got " + std::string(py::repr(kv.first)));
    const std::string name = kv.first.cast<std::string>();
    if (!THPVariable_Check(kv.second.ptr()))
      throw py::type_error(std::string(what) + "['" + name + "'] must be a torch.Tensor, got " +
                           std::string(py::str(py::type::of(kv.second).attr("__name__"))));
    out.emplace_back(name, kv.second.cast<at::Tensor>());
  }
  return out;
}

py::dict packed_dict(opdcore::PackedSequences&& p) {
  py::dict d, payloads;
  d["input_ids"] = p.input_ids;
  d["position_ids"] = p.position_ids;
  d["cu_seqlens"] = p.cu_seqlens;
  d["max_seqlen"] = p.max_seqlen;
  d["loss_mask"] = p.loss_mask;
  d["seq_ids"] = p.seq_ids;
  for (auto& kv : p.payloads) payloads[py::str(kv.first)] = kv.second;
  d["payloads"] = payloads;
  return d;
}

}  // namespace

PYBIND11_MODULE(_C, m) {
  m.doc() = "opdcore native kernels";
  m.def("build_info", [] {
    py::dict d;
    d["version"] = OPDCORE_VERSION;
    d["torch_version_built"] = OPDCORE_TORCH_VERSION;
#ifdef OPDCORE_WITH_CUDA
    d["cuda_compiled"] = true;
    d["cutlass_sm90"] = opdcore::cuda::head_topk_sm90_compiled();  // the fused-head kernel of csrc/cutlass
#else
    d["cuda_compiled"] = false;
    d["cutlass_sm90"] = false;
#endif
    d["openmp_max_threads"] = omp_get_max_threads();
    return d;
  });

  // c10 errors keep their Python class (ValueError, TypeError, IndexError) and lose the C++ backtrace.
  py::register_local_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const c10::TypeError& e) {
      PyErr_SetString(PyExc_TypeError, e.what_without_backtrace());
    } catch (const c10::ValueError& e) {
      PyErr_SetString(PyExc_ValueError, e.what_without_backtrace());
    } catch (const c10::IndexError& e) {
      PyErr_SetString(PyExc_IndexError, e.what_without_backtrace());
    } catch (const c10::Error& e) {
      PyErr_SetString(PyExc_RuntimeError, e.what_without_backtrace());
    }
  });

  using opdcore::PackedBuffer;
  py::class_<PackedBuffer>(m, "PackedBuffer", "Variable-length sequences packed into the flat varlen layout")
      .def(py::init<>())
      .def(
          "add",
          [](PackedBuffer& self, const at::Tensor& prompt_ids, const at::Tensor& response_ids,
             const py::object& payloads) {
            return self.add(prompt_ids, response_ids, named_tensors(payloads, "payloads"));
          },
          py::arg("prompt_ids"), py::arg("response_ids"), py::arg("payloads") = py::none(),
          "Append one sequence; returns its index")
      .def(
          "pack",
          [](const PackedBuffer& self, std::optional<std::vector<int64_t>> indices) {
            return packed_dict(self.pack(indices));
          },
          py::arg("indices") = py::none(), "Pack the sequences at indices (default: all) into a dict of tensors")
      .def("split", &PackedBuffer::split, py::arg("max_tokens") = py::none(),
           py::arg("num_micro_batches") = py::none(), "Balanced micro-batches as lists of sequence indices")
      .def("clear", &PackedBuffer::clear)
      .def("__len__", &PackedBuffer::size)
      .def_property_readonly("num_tokens", &PackedBuffer::num_tokens)
      .def_property_readonly("lengths", &PackedBuffer::lengths)
      .def_property_readonly("prompt_lengths", &PackedBuffer::prompt_lengths)
      .def_property_readonly("response_lengths", &PackedBuffer::response_lengths)
      .def_property_readonly("payload_names", &PackedBuffer::payload_names);

  m.def(
      "split_micro_batches",
      [](const std::vector<int64_t>& lengths, std::optional<int64_t> max_tokens,
         std::optional<int64_t> num_micro_batches) {
        return opdcore::split_micro_batches(lengths, max_tokens, num_micro_batches, "lengths");
      },
      py::arg("lengths"), py::arg("max_tokens") = py::none(), py::arg("num_micro_batches") = py::none(),
      "Balanced micro-batches (longest first, least-loaded) as lists of indices into lengths");
}
