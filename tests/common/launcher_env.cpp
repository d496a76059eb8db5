#include "common/launcher_env.hpp"

#include <chrono>
#include <cstdio>
#include <cstdlib>
#include <fstream>
#include <stdexcept>
#include <string>
#include <thread>

#include "openep/group.hpp"

namespace openep::test {
namespace {

int env_int(const char* name) {
  const char* v = std::getenv(name);
  if (!v) throw std::runtime_error(std::string("environment variable ") + name + " is not set (start through tools/launch.py)");
  return std::atoi(v);
}

}  // namespace

LauncherEnv read_launcher_env() {
  LauncherEnv e;
  e.rank = env_int("RANK");
  e.world_size = env_int("WORLD_SIZE");
  e.local_rank = env_int("LOCAL_RANK");
  return e;
}

ncclUniqueId exchange_unique_id(int rank, const char* tag) {
  const char* base = std::getenv("OPENEP_UNIQUE_ID_FILE");
  if (!base) throw std::runtime_error("OPENEP_UNIQUE_ID_FILE is not set (start through tools/launch.py)");
  const std::string path = std::string(base) + "." + tag;
  ncclUniqueId id{};
  if (rank == 0) {
    id = Group::make_unique_id();
    const std::string tmp = path + ".tmp";
    {
      std::ofstream f(tmp, std::ios::binary);
      f.write(id.internal, sizeof(id.internal));
      if (!f) throw std::runtime_error("cannot write " + tmp);
    }
    if (std::rename(tmp.c_str(), path.c_str()) != 0) throw std::runtime_error("cannot publish " + path);
    return id;
  }
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::seconds(120);
  while (std::chrono::steady_clock::now() < deadline) {
    std::ifstream f(path, std::ios::binary);
    if (f && f.read(id.internal, sizeof(id.internal)) && f.gcount() == sizeof(id.internal)) return id;
    std::this_thread::sleep_for(std::chrono::milliseconds(20));
  }
  throw std::runtime_error("rank " + std::to_string(rank) + ": timed out waiting for " + path);
}

}  // namespace openep::test
