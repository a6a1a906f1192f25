// The only file that includes pybind11. Buffers cross as (address, nbytes); every check on dtype,
// contiguity and lifetime is made in memfit/io before a call reaches here.
#include <pybind11/pybind11.h>
#include <pybind11/stl.h>

#include <cstdint>
#include <system_error>

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
      .def_property_readonly("backend", &Engine::backend_name)
      .def_property_readonly("block_size", &Engine::block_size)
      .def_property_readonly("queue_depth", &Engine::queue_depth);

  m.def("uring_available", &memfit::aio::uring_available);
}
