"""TVM compilation of bidiff graphs: bit-serial binary-conv kernels, float-op schedules, build.

Importing this subpackage imports the TVM compiler (``apache-tvm``, the ``[export]`` extra).

Modules (one role each):

- :mod:`.binary_conv` — the TE compute of ``BinaryConv2d`` (sign + bit-pack, xor + popcount with
  the zero-padding correction, optional RPReLU + identity-shortcut epilogue) and its hand
  ``s_tir`` schedules; :class:`~.binary_conv.KernelVariant` names them and
  :func:`~.binary_conv.select_variant` is the one place that picks one for a target.
- :mod:`.frontend` — the Relax ONNX frontend extended with ``bidiff::BinaryConv2d`` (and the
  internal fused form made by :func:`~.frontend.fuse_binary_epilogues`).
- :mod:`.float_schedules` — :class:`~.float_schedules.ScheduleFloatOps`, the module pass that
  schedules every float PrimFunc after legalization, and :func:`~.float_schedules.relax_pipeline`.
- :mod:`.build` — :func:`~.build.build_library`: the groups' ONNX graphs -> one ``.so``.
- :mod:`.target` — ``TargetSpec`` -> ``tvm.target.Target``.

Library calling convention (see :mod:`.build`): a Relax VM executable with one function per
timestep group, ``group_<k>(x_t f32[1,3,S,S], cond f32[1,3,S,S], t int64[1,1]) -> eps
f32[1,3,S,S]``; weights are embedded (shared across groups); inputs must be 64-byte aligned.
"""
