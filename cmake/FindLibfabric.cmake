# Finds libfabric. Order:
#   1. LIBFABRIC_INCLUDE_DIR (+ optional LIBFABRIC_LIBRARY) given explicitly;
#   2. LIBFABRIC_ROOT: <root>/usr/include or <root>/include, library searched under <root> then the system;
#   3. pkg-config `libfabric`.
# The library may be found as libfabric.so.1 alone (runtime installed without the -dev symlink),
# which is how the GPU machines ship it.
# Defines the imported target Libfabric::fabric.
set(_lf_hint_inc "")
set(_lf_hint_lib "")
if(LIBFABRIC_ROOT)
  list(APPEND _lf_hint_inc "${LIBFABRIC_ROOT}/usr/include" "${LIBFABRIC_ROOT}/include")
  list(APPEND _lf_hint_lib "${LIBFABRIC_ROOT}/usr/lib/x86_64-linux-gnu" "${LIBFABRIC_ROOT}/usr/lib64"
                           "${LIBFABRIC_ROOT}/usr/lib" "${LIBFABRIC_ROOT}/lib64" "${LIBFABRIC_ROOT}/lib")
endif()

if(NOT LIBFABRIC_INCLUDE_DIR AND NOT LIBFABRIC_ROOT)
  find_package(PkgConfig QUIET)
  if(PkgConfig_FOUND)
    pkg_check_modules(PC_LIBFABRIC QUIET libfabric)
    if(PC_LIBFABRIC_FOUND)
      list(APPEND _lf_hint_inc ${PC_LIBFABRIC_INCLUDE_DIRS})
      list(APPEND _lf_hint_lib ${PC_LIBFABRIC_LIBRARY_DIRS})
    endif()
  endif()
endif()

find_path(LIBFABRIC_INCLUDE_DIR rdma/fabric.h HINTS ${_lf_hint_inc})
if(NOT LIBFABRIC_LIBRARY)
  # Prefer the runtime soname: a root holding only headers must not pull in a static copy.
  find_library(LIBFABRIC_LIBRARY NAMES libfabric.so.1 fabric
               HINTS ${_lf_hint_lib}
               PATHS /lib/x86_64-linux-gnu /usr/lib/x86_64-linux-gnu /usr/lib64 /usr/lib)
endif()

include(FindPackageHandleStandardArgs)
find_package_handle_standard_args(Libfabric REQUIRED_VARS LIBFABRIC_LIBRARY LIBFABRIC_INCLUDE_DIR)

if(Libfabric_FOUND AND NOT TARGET Libfabric::fabric)
  add_library(Libfabric::fabric UNKNOWN IMPORTED)
  set_target_properties(Libfabric::fabric PROPERTIES
    IMPORTED_LOCATION "${LIBFABRIC_LIBRARY}"
    INTERFACE_INCLUDE_DIRECTORIES "${LIBFABRIC_INCLUDE_DIR}")
endif()
