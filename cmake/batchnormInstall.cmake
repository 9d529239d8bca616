# Install rules of the C++ package (component "development"): public headers, the shared library
# exported as batchnorm::batchnorm, and a relocatable batchnormConfig.cmake with its version file.
# The destinations are the GNUInstallDirs variables, so the wheel can place everything under its
# package directory (pyproject.toml sets CMAKE_INSTALL_INCLUDEDIR / CMAKE_INSTALL_LIBDIR).
include(CMakePackageConfigHelpers)

set(BATCHNORM_INSTALL_CMAKEDIR "${CMAKE_INSTALL_LIBDIR}/cmake/batchnorm"
    CACHE STRING "Where batchnormConfig.cmake is installed, relative to the prefix")

# cpp/include/batchnorm holds the public headers and nothing else.
install(DIRECTORY "${PROJECT_SOURCE_DIR}/cpp/include/batchnorm"
  DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}"
  COMPONENT development
  FILES_MATCHING PATTERN "*.hpp")

install(TARGETS batchnorm EXPORT batchnormTargets
  ARCHIVE DESTINATION "${CMAKE_INSTALL_LIBDIR}" COMPONENT development
  LIBRARY DESTINATION "${CMAKE_INSTALL_LIBDIR}" COMPONENT development
  RUNTIME DESTINATION "${CMAKE_INSTALL_BINDIR}" COMPONENT development
  INCLUDES DESTINATION "${CMAKE_INSTALL_INCLUDEDIR}")

install(EXPORT batchnormTargets
  NAMESPACE batchnorm::
  DESTINATION "${BATCHNORM_INSTALL_CMAKEDIR}"
  COMPONENT development)

configure_package_config_file(
  "${PROJECT_SOURCE_DIR}/cmake/batchnormConfig.cmake.in"
  "${PROJECT_BINARY_DIR}/batchnormConfig.cmake"
  INSTALL_DESTINATION "${BATCHNORM_INSTALL_CMAKEDIR}")
# 0.x releases may change the API with each minor version.
write_basic_package_version_file(
  "${PROJECT_BINARY_DIR}/batchnormConfigVersion.cmake"
  COMPATIBILITY SameMinorVersion)
install(FILES
  "${PROJECT_BINARY_DIR}/batchnormConfig.cmake"
  "${PROJECT_BINARY_DIR}/batchnormConfigVersion.cmake"
  DESTINATION "${BATCHNORM_INSTALL_CMAKEDIR}"
  COMPONENT development)
