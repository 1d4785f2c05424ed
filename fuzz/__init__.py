"""Fuzz targets for the surfaces that read bytes from outside: FastAGI, InkML, images, the upload endpoint.

Each target module has a `check_*` function that feeds one input and asserts the surface's
invariants (importable by the property tests without atheris), and a `__main__` that runs it
under atheris (coverage-guided libFuzzer). See fuzz/README.md.
"""
