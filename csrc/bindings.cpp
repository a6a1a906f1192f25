// The only file that includes pybind11. Buffers cross as (address, nbytes); every check on dtype,
// contiguity and lifetime is made in memfit/io before a call reaches here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <iterator>
#include <stdexcept>
#include <string>
#include <system_error>
#include <vector>

#include "adam/adam.h"
#include "aio/backend.h"

namespace py = pybind11;
using memfit::aio::Engine;
using memfit::aio::Request;
using memfit::aio::Transfer;

PYBIND11_MODULE(_C, m) {
  m.doc() = "memfit native extension: asynchronous file I/O engine";

  py::register_exception_translator([](std::exception_ptr p) {
    try {
      if (p) std::rethrow_exception(p);
    } catch (const std::system_error& e) {
      py::object error = py::module_::import("builtins").attr("OSError")(e.code().value(), e.what());
      PyErr_SetObject(PyExc_OSError, error.ptr());
    }
  });

  py::class_<Request, std::shared_ptr<Request>>(m, "Request")
      .def("wait", &Request::wait, py::call_guard<py::gil_scoped_release>(),
           "Block until done; returns bytes transferred or -errno.")
      .def("done", &Request::done);

  py::class_<Engine>(m, "Engine")
      .def(py::init<const std::string&, std::size_t, int>(), py::arg("backend"), py::arg("block_size"),
           py::arg("queue_depth"), py::call_guard<py::gil_scoped_release>())
      .def(
          "submit",
          [](Engine& engine, int direct_fd, int buffered_fd, std::uintptr_t address, std::size_t num_bytes,
             std::uint64_t file_offset, bool is_read, bool allow_short) {
            Transfer transfer{direct_fd,   buffered_fd, reinterpret_cast<char*>(address),
                              num_bytes,   file_offset, is_read};
            return engine.submit(transfer, allow_short);
          },
          py::arg("direct_fd"), py::arg("buffered_fd"), py::arg("address"), py::arg("num_bytes"),
          py::arg("file_offset"), py::arg("is_read"), py::arg("allow_short"))
      .def(
          "register_buffer",
          [](Engine& engine, std::uintptr_t address, std::size_t num_bytes) {
            return engine.register_buffer(reinterpret_cast<char*>(address), num_bytes);
          },
          py::arg("address"), py::arg("num_bytes"), py::call_guard<py::gil_scoped_release>(),
          "Pins memory for fixed-buffer transfers; returns an entry >= 0 or -errno.")
      .def("unregister_buffer", &Engine::unregister_buffer, py::arg("entry"), py::call_guard<py::gil_scoped_release>(),
           "Releases an entry of register_buffer; returns 0 or -errno.")
      .def_property_readonly("backend", &Engine::backend_name)
      .def_property_readonly("block_size", &Engine::block_size)
      .def_property_readonly("queue_depth", &Engine::queue_depth);

  m.def("uring_available", &memfit::aio::uring_available);

  // Fused CPU Adam (csrc/adam). memfit/optim/fused_adam.py checks every buffer, dtype code and
  // constant; table points at num_tensors rows of six int64 (adam::TensorBuffers).
  m.def(
      "adam_step",
      [](std::uintptr_t table, std::size_t num_tensors, int grad_dtype, int out_dtype,
         const std::vector<float>& constants, int nonfinite_mode, int num_threads) {
        namespace adam = memfit::adam;
        adam::StepConfig config{static_cast<adam::DType>(grad_dtype), static_cast<adam::DType>(out_dtype), {}};
        adam::Constants& c = config.constants;
        float* fields[] = {&c.grad_scale,      &c.l2,  &c.one_minus_beta1, &c.beta2, &c.one_minus_beta2,
                           &c.inv_sqrt_bias2, &c.eps, &c.neg_step_size,   &c.decay};
        if (constants.size() != std::size(fields)) throw std::invalid_argument("adam_step: expected 9 constants");
        for (std::size_t k = 0; k < constants.size(); ++k) *fields[k] = constants[k];
        return adam::step(reinterpret_cast<const adam::TensorBuffers*>(table), num_tensors, config,
                          static_cast<adam::NonFinite>(nonfinite_mode), num_threads);
      },
      py::arg("table"), py::arg("num_tensors"), py::arg("grad_dtype"), py::arg("out_dtype"), py::arg("constants"),
      py::arg("nonfinite_mode"), py::arg("num_threads"), py::call_guard<py::gil_scoped_release>(),
      "Steps num_tensors tensors; returns True when a scaled gradient element was inf or nan.");
  m.def("adam_supported_isas", [] {
    std::vector<std::string> names;
    for (auto isa : memfit::adam::supported_isas()) names.emplace_back(memfit::adam::isa_name(isa));
    return names;
  });
  m.def("adam_isa", [] { return std::string(memfit::adam::isa_name(memfit::adam::current_isa())); });
  m.def("adam_set_isa", [](const std::string& name) {
    for (auto isa : memfit::adam::supported_isas()) {
      if (name == memfit::adam::isa_name(isa)) {
        memfit::adam::set_isa(isa);
        return true;
      }
    }
    return false;
  });
}
