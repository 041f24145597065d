"""fractal_pretrain: IFS fractal images (NumPy reference, CuPy kernels) for pre-training."""
