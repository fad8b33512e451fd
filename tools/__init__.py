"""Scripts for developing tritonsd (demo-model training, the README grid); not installed with the package."""
