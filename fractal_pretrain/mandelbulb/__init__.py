"""Mandelbulb-variation recipes (MandelbulbVAR-1k, fractal4AD MultiMandelbulbs): ray-marched 3D fractals."""
