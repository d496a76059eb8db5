# Locates NCCL (headers with the device API, and libnccl.so.2) for OpenEP.
#
# Search order:
#   1. NCCL_ROOT (cache variable or environment): a folder holding include/nccl.h and lib/.
#   2. The nvidia-nccl-cu13 wheel of the active Python environment (the GPU machines: PyTorch's venv).
#      Its lib/ holds only libnccl.so.2, so we look for that name explicitly.
#   3. The CUDA toolkit (the CPU build machines ship NCCL there).
#
# Defines the imported target OpenEP::nccl and the variables NCCL_INCLUDE_DIR, NCCL_LIBRARY,
# NCCL_LIBRARY_DIR and NCCL_VERSION_CODE (from nccl.h, e.g. 22809).

set(NCCL_ROOT "$ENV{NCCL_ROOT}" CACHE PATH "folder holding include/nccl.h and lib/ (e.g. a wheel's nvidia/nccl)")

if(NOT NCCL_ROOT)
  find_package(Python3 COMPONENTS Interpreter QUIET)
  if(Python3_FOUND)
    execute_process(
      COMMAND ${Python3_EXECUTABLE} -c "import nvidia.nccl as m; print(list(m.__path__)[0])"
      OUTPUT_VARIABLE _openep_nccl_wheel
      OUTPUT_STRIP_TRAILING_WHITESPACE
      ERROR_QUIET
      RESULT_VARIABLE _openep_nccl_rc)
    if(_openep_nccl_rc EQUAL 0 AND EXISTS "${_openep_nccl_wheel}/include/nccl.h")
      set(NCCL_ROOT "${_openep_nccl_wheel}" CACHE PATH "" FORCE)
      message(STATUS "OpenEP: using NCCL from the Python wheel at ${NCCL_ROOT}")
    endif()
  endif()
endif()

set(_openep_nccl_inc_hints "")
set(_openep_nccl_lib_hints "")
if(NCCL_ROOT)
  list(APPEND _openep_nccl_inc_hints "${NCCL_ROOT}/include")
  list(APPEND _openep_nccl_lib_hints "${NCCL_ROOT}/lib" "${NCCL_ROOT}/lib64")
endif()
list(APPEND _openep_nccl_inc_hints ${CUDAToolkit_INCLUDE_DIRS})
list(APPEND _openep_nccl_lib_hints ${CUDAToolkit_LIBRARY_DIR})

find_path(NCCL_INCLUDE_DIR nccl_device.h HINTS ${_openep_nccl_inc_hints} NO_DEFAULT_PATH)
# NAMES_PER_DIR: prefer NCCL_ROOT's libnccl.so.2 over the toolkit's libnccl.so.
find_library(NCCL_LIBRARY NAMES nccl libnccl.so.2 NAMES_PER_DIR HINTS ${_openep_nccl_lib_hints} NO_DEFAULT_PATH)

if(NOT NCCL_INCLUDE_DIR OR NOT NCCL_LIBRARY)
  message(FATAL_ERROR "OpenEP: NCCL with the device API (nccl_device.h) not found. "
                      "Set NCCL_ROOT to a folder with include/nccl.h and lib/libnccl.so.2 "
                      "(include: '${NCCL_INCLUDE_DIR}', library: '${NCCL_LIBRARY}').")
endif()

file(STRINGS "${NCCL_INCLUDE_DIR}/nccl.h" _openep_nccl_ver_line REGEX "^#define NCCL_VERSION_CODE")
string(REGEX MATCH "[0-9]+" NCCL_VERSION_CODE "${_openep_nccl_ver_line}")
get_filename_component(NCCL_LIBRARY_DIR "${NCCL_LIBRARY}" DIRECTORY)
message(STATUS "OpenEP: NCCL ${NCCL_VERSION_CODE}, headers ${NCCL_INCLUDE_DIR}, library ${NCCL_LIBRARY}")

if(NOT TARGET OpenEP::nccl)
  add_library(OpenEP::nccl UNKNOWN IMPORTED)
  set_target_properties(OpenEP::nccl PROPERTIES
    IMPORTED_LOCATION "${NCCL_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${NCCL_INCLUDE_DIR}")
endif()
