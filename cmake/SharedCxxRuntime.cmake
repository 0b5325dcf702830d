# jax_garden_link_shared_cxx_runtime(target): link `target` against the shared libstdc++ (see the
# comment in CMakeLists.txt for why) and check after each link that the module names it in NEEDED
# and defines no std:: symbols of its own.

function(_jg_print_file_name compiler name out)
  execute_process(COMMAND "${compiler}" -print-file-name=${name}
                  OUTPUT_VARIABLE path OUTPUT_STRIP_TRAILING_WHITESPACE ERROR_QUIET RESULT_VARIABLE rc)
  if(rc EQUAL 0 AND IS_ABSOLUTE "${path}" AND EXISTS "${path}")
    set(${out} "${path}" PARENT_SCOPE)
  else()
    set(${out} "" PARENT_SCOPE)
  endif()
endfunction()

function(jax_garden_link_shared_cxx_runtime target)
  if(NOT CMAKE_SYSTEM_NAME STREQUAL "Linux" OR NOT CMAKE_CXX_COMPILER_ID MATCHES "GNU|Clang")
    return()
  endif()
  _jg_print_file_name("${CMAKE_CXX_COMPILER}" libstdc++.so.6 runtime)
  if(NOT runtime)
    message(STATUS "jax_garden: ${CMAKE_CXX_COMPILER} does not use libstdc++ (no libstdc++.so.6); runtime left to the driver")
    return()
  endif()
  _jg_print_file_name("${CMAKE_CXX_COMPILER}" libstdc++.so link_symlink)
  if(NOT link_symlink)
    message(STATUS "jax_garden: ${CMAKE_CXX_COMPILER} has libstdc++.a but no libstdc++.so to link against: "
                   "its -lstdc++ would link the C++ runtime statically")
  endif()
  get_filename_component(runtime "${runtime}" REALPATH)
  message(STATUS "jax_garden: C++ runtime linked as a shared library: ${runtime}")
  target_link_libraries(${target} PRIVATE "${runtime}")
  if(CMAKE_READELF AND CMAKE_NM)
    add_custom_command(TARGET ${target} POST_BUILD
      COMMAND "${CMAKE_COMMAND}" -DMODULE=$<TARGET_FILE:${target}> -DREADELF=${CMAKE_READELF} -DNM=${CMAKE_NM}
              -P "${CMAKE_CURRENT_FUNCTION_LIST_DIR}/CheckSharedCxxRuntime.cmake"
      VERBATIM)
  endif()
endfunction()
