"""TVM compilation of bidiff graphs: bit-serial binary-conv kernels, float-op schedules, build.

Importing this subpackage imports the TVM compiler (``apache-tvm``, the ``[export]`` extra).
"""
