"""Package data: the built-in model (`builtin.safetensors`), produced by `kuas train --recipe builtin`."""
