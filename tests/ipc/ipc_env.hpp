// What tests/ipc/ipc_main.cpp offers the tests of the IPC binary beyond common/ranks.hpp.
#pragma once

#include <string>

namespace openep::test {

// The world's rendezvous directory (the launcher's fresh temporary folder): a test that builds a new Group of
// the survivors gives it a sub-directory of its own.
const std::string& ipc_rendezvous_dir();

}  // namespace openep::test
