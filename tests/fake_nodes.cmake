# Fake-node tests (label fakenode): a multi-node NCCL world on one machine, several processes per GPU when
# needed. tools/launch.py --ranks-per-node M gives every fake node its own NCCL_HOSTID and sends NCCL's
# cross-node traffic through the Socket network over loopback (docs/fake-nodes.md). Exit code 77 = skipped
# (fewer GPUs than --min-gpus), which CTest reports as "Skipped", never as passed.
#
# Included from tests/CMakeLists.txt: include(${CMAKE_CURRENT_SOURCE_DIR}/fake_nodes.cmake)
# Paths below use CMAKE_CURRENT_LIST_DIR (this file's folder, tests/), so the fragment does not depend on
# where it is included from.
add_executable(openep_fake_node_tests
  ${CMAKE_CURRENT_LIST_DIR}/fakenode/fake_node_test.cu
  ${CMAKE_CURRENT_LIST_DIR}/fakenode/fake_node_main.cpp
  ${CMAKE_CURRENT_LIST_DIR}/common/launcher_env.cpp
  ${CMAKE_CURRENT_LIST_DIR}/common/crash_handler.cpp)
target_include_directories(openep_fake_node_tests PRIVATE ${PROJECT_SOURCE_DIR}/tests ${PROJECT_SOURCE_DIR}/src)
target_link_libraries(openep_fake_node_tests PRIVATE openep_core openep_reference GTest::gtest)
openep_test_executable(openep_fake_node_tests)

find_package(Python3 COMPONENTS Interpreter REQUIRED)

# openep_add_fake_node_test(NAME NPROC RANKS_PER_NODE MIN_GPUS): one CTest test = one launcher run of the binary.
# The launcher's --timeout (600 s) bounds the whole world; CTest's TIMEOUT is a little longer so that the
# launcher, not CTest, reports a hang (with every rank's log). RUN_SERIAL: the processes already share GPUs.
function(openep_add_fake_node_test name nproc ranks_per_node min_gpus)
  add_test(NAME ${name}
    COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tools/launch.py
            --nproc ${nproc} --ranks-per-node ${ranks_per_node} --min-gpus ${min_gpus} --timeout 600
            --log-dir ${CMAKE_BINARY_DIR}/fake_node_logs/${name}
            -- $<TARGET_FILE:openep_fake_node_tests>)
  set_tests_properties(${name} PROPERTIES LABELS fakenode SKIP_RETURN_CODE 77 TIMEOUT 660 RUN_SERIAL TRUE)
endfunction()

# 2 nodes x 1 rank and 4 nodes x 1 rank: run on a single GPU (processes of different nodes share it).
openep_add_fake_node_test(fake_node_2x1 2 1 1)
openep_add_fake_node_test(fake_node_4x1 4 1 1)
# 2 nodes x 2 ranks: ranks of one node need distinct GPUs (NVLink inside the node, sockets between nodes).
# On 4 GPUs every rank has its own GPU; on 2 GPUs the two nodes share them (launch.py's rule: rank % GPUs).
openep_add_fake_node_test(fake_node_2x2 4 2 2)

# The same fake-node worlds with NCCL's network between the fake nodes provided by the loopback GIN test plugin
# (tests/gin_loopback/, launch.py --gin-loopback): NCCL_NET=OpenEPLoopback, NCCL_GIN_TYPE=2, so GIN (proxy type)
# exists and FakeNodeGinProbe expects the GIN low-latency Buffer to be CREATED instead of refused.
# fake_node_gin_2x1 and _4x1 pass on one H200 (2026-12-02); exit 77 (skipped) without a GPU.
function(openep_add_fake_node_gin_test name nproc ranks_per_node min_gpus)
  add_test(NAME ${name}
    COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tools/launch.py
            --nproc ${nproc} --ranks-per-node ${ranks_per_node} --min-gpus ${min_gpus} --timeout 600
            --gin-loopback $<TARGET_FILE:openep_gin_loopback>
            --log-dir ${CMAKE_BINARY_DIR}/fake_node_logs/${name}
            -- $<TARGET_FILE:openep_fake_node_tests>)
  set_tests_properties(${name} PROPERTIES LABELS "fakenode;gin_loopback" SKIP_RETURN_CODE 77 TIMEOUT 660
                       RUN_SERIAL TRUE)
endfunction()
openep_add_fake_node_gin_test(fake_node_gin_2x1 2 1 1)
openep_add_fake_node_gin_test(fake_node_gin_4x1 4 1 1)
openep_add_fake_node_gin_test(fake_node_gin_2x2 4 2 2)

# The multi-GPU binary (openep_mgpu_tests) in fake-node worlds: its internode and low-latency suites then run
# across NCCL nodes on one GPU, every case bitwise against the reference.
#  - fake_node_mgpu_internode_{2x1,4x1}: InternodeMgpu.* over the default rail (NCCL send/recv over sockets);
#  - fake_node_gin_mgpu_{2x1,4x1}: under the loopback GIN plugin, InternodeMgpu.* with the GIN rail
#    (OPENEP_TEST_INTERNODE_BACKEND=gin) and LowLatencyMgpu.* over GIN (OPENEP_TEST_LL_NETWORK=1 sets
#    allow_network): fused, hook, zero-copy, graph replays, two operations in flight, the stalled peer's
#    timeout. Left out there, by design: LogFMT (refused on the GIN transport) and shrink mode (NVLink only).
function(openep_add_fake_node_mgpu_test name nproc gin filter)
  set(plugin_args)
  set(env_props)
  set(labels fakenode)
  if(gin)
    set(plugin_args --gin-loopback $<TARGET_FILE:openep_gin_loopback>)
    set(env_props "OPENEP_TEST_INTERNODE_BACKEND=gin;OPENEP_TEST_LL_NETWORK=1")
    set(labels "fakenode;gin_loopback")
  endif()
  add_test(NAME ${name}
    COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tools/launch.py
            --nproc ${nproc} --ranks-per-node 1 --min-gpus 1 --timeout 600 ${plugin_args}
            --log-dir ${CMAKE_BINARY_DIR}/fake_node_logs/${name}
            -- $<TARGET_FILE:openep_mgpu_tests> --gtest_filter=${filter})
  set_tests_properties(${name} PROPERTIES LABELS "${labels}" SKIP_RETURN_CODE 77 TIMEOUT 660 RUN_SERIAL TRUE)
  if(env_props)
    set_tests_properties(${name} PROPERTIES ENVIRONMENT "${env_props}")
  endif()
endfunction()
foreach(n 2 4)
  openep_add_fake_node_mgpu_test(fake_node_mgpu_internode_${n}x1 ${n} OFF "InternodeMgpu.*")
  openep_add_fake_node_mgpu_test(fake_node_gin_mgpu_${n}x1 ${n} ON "InternodeMgpu.*:LowLatencyMgpu.*:-*Logfmt*:*Shrink*")
endforeach()

# A rank killed with SIGKILL, the survivors shrink the Group and carry on (FakeNodeRecovery): alone, 4 fake nodes on
# one GPU, rank 3 dies on purpose (launch.py --expect-killed 3). Passes on one H200 (2026-12-02, 86e625e).
add_test(NAME fake_node_recovery_4x1
  COMMAND ${Python3_EXECUTABLE} ${PROJECT_SOURCE_DIR}/tools/launch.py
          --nproc 4 --ranks-per-node 1 --min-gpus 1 --timeout 600 --expect-killed 3
          --log-dir ${CMAKE_BINARY_DIR}/fake_node_logs/fake_node_recovery_4x1
          -- $<TARGET_FILE:openep_fake_node_tests> --gtest_filter=FakeNodeRecovery.*)
set_tests_properties(fake_node_recovery_4x1 PROPERTIES LABELS fakenode SKIP_RETURN_CODE 77 TIMEOUT 660 RUN_SERIAL TRUE
                     ENVIRONMENT "OPENEP_FAKE_NODE_RECOVERY=1")
