"""bidiff.runtime: what runs on the device. numpy + pillow + a backend; never torch or onnx."""
