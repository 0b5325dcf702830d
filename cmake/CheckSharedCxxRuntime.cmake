# cmake -DMODULE=<.so> -DREADELF=<readelf> -DNM=<nm> -P CheckSharedCxxRuntime.cmake
# Fails the build when the module does not load libstdc++.so.6 dynamically or defines std:: symbols
# of its own (a private, uninitialised copy of the C++ runtime: see CMakeLists.txt).
execute_process(COMMAND "${READELF}" -d "${MODULE}" OUTPUT_VARIABLE dyn RESULT_VARIABLE rc)
if(NOT rc EQUAL 0)
  message(FATAL_ERROR "readelf -d ${MODULE} failed (${rc})")
endif()
if(NOT dyn MATCHES "NEEDED[^\n]*libstdc\\+\\+\\.so")
  message(FATAL_ERROR "${MODULE} does not link libstdc++.so dynamically (no NEEDED entry): it would carry a "
                      "private C++ runtime that crashes next to jaxlib's. Dynamic section:\n${dyn}")
endif()
# Symbols only the runtime itself defines (template instantiations in headers are fine; these are
# not): the module defining any of them carries a private copy of libstdc++.
execute_process(COMMAND "${NM}" -D --defined-only "${MODULE}" OUTPUT_VARIABLE syms RESULT_VARIABLE rc)
foreach(sym _ZNSt6locale7classicEv _ZNSt8ios_base4InitC1Ev _ZNSo9_M_insertIlEERSoT_ _ZNSt12__basic_fileIcED1Ev)
  if(syms MATCHES " ${sym}\n")
    message(FATAL_ERROR "${MODULE} defines ${sym}, a symbol of the C++ runtime itself: parts of libstdc++ "
                        "were linked statically into the module")
  endif()
endforeach()
