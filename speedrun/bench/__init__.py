"""Benchmarks: the GPU benchmark (gpu-report) and the benchmarks of kernels, training, loader, preparation, audit, artifact, gist."""
