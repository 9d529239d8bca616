// The MPI implementation of batchnorm::Communicator: synchronized statistics gathered with
// MPI_Allgather. Header-only, so it compiles against the MPI the application uses (MPI has no
// common ABI) and the core library never links MPI; CMake's batchnorm::mpi target adds MPI.
#pragma once

#include <mpi.h>

#include <climits>
#include <cstddef>
#include <stdexcept>
#include <string>

#include "batchnorm/batchnorm.hpp"

namespace batchnorm {

namespace detail {

inline void check_mpi(int code, const char* call) {
  if (code == MPI_SUCCESS) return;
  char message[MPI_MAX_ERROR_STRING];
  int length = 0;
  MPI_Error_string(code, message, &length);
  throw std::runtime_error(std::string("batchnorm: ") + call +
                           " failed: " + std::string(message, static_cast<std::size_t>(length)));
}

}  // namespace detail

// A Communicator over the processes of the intracommunicator `comm` (which must outlive it).
// Each training forward/backward then runs one MPI_Allgather of a few doubles per feature on
// `comm`, so every process of `comm` must make the same sequence of training calls. Errors are
// reported as exceptions where `comm`'s error handler returns them (MPI's default aborts).
inline Communicator mpi_communicator(MPI_Comm comm) {
  if (comm == MPI_COMM_NULL) {
    throw std::invalid_argument("batchnorm::mpi_communicator: MPI_COMM_NULL cannot synchronize");
  }
  int inter = 0;
  detail::check_mpi(MPI_Comm_test_inter(comm, &inter), "MPI_Comm_test_inter");
  if (inter) {
    throw std::invalid_argument(
        "batchnorm::mpi_communicator: needs an intracommunicator, got an intercommunicator");
  }
  Communicator result;
  detail::check_mpi(MPI_Comm_size(comm, &result.size), "MPI_Comm_size");
  result.allgather = [comm](const double* send, double* receive, std::size_t count) {
    if (count > static_cast<std::size_t>(INT_MAX)) {
      throw std::length_error("batchnorm: " + std::to_string(count) +
                              " values exceed what one MPI_Allgather can send");
    }
    const int n = static_cast<int>(count);
    detail::check_mpi(MPI_Allgather(send, n, MPI_DOUBLE, receive, n, MPI_DOUBLE, comm),
                      "MPI_Allgather");
  };
  return result;
}

}  // namespace batchnorm
