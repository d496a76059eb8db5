// Virtual-rank tests that manage their own worlds (openep_vrank_tests only; common/vrank_main.cpp).
#pragma once

#include <functional>

namespace openep::test {

// Runs `body` on num_ranks virtual ranks (one host thread each, one GPU), with common/ranks.hpp's functions
// (rank_env, world_group, host_barrier, once_per_world) set up for that world, and returns when every rank has
// returned. The first exception a rank threw is rethrown.
// ranks_per_node > 0: emulated nodes of that many ranks (VirtualFabricOptions::ranks_per_node).
void run_on_virtual_ranks(const std::function<void()>& body, int num_ranks, int ranks_per_node = 0);

}  // namespace openep::test
