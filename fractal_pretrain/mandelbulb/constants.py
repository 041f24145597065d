"""The Mandelbulb ray marcher's constants, written once (the published shader's, strong_recipes.md section 2.2).

``mandelbulb/reference.py`` reads them here; ``render/kernel_constants.py`` passes each to
``kernels/mandelbulb.cu`` as ``-DMB_<NAME>`` (floats as exact hex-float literals, ``LIGHT`` as
``MB_LIGHT_X/Y/Z``), so the NumPy reference and the kernels cannot drift apart. Floats are float32: the
value both sides compute with.
"""

from __future__ import annotations

import numpy as np

# Distance estimator: up to MAX_ITERATIONS iterations while r = |z| <= BAILOUT; integer powers by
# POWER_BITS square-and-multiply rounds (powers up to 2^POWER_BITS - 1: recipe.POWER_RANGE and TRAP_EXPONENT).
MAX_ITERATIONS = 100
BAILOUT = np.float32(4.0)
POWER_BITS = 5
# Orbit traps: min |z_z|, min |z|_1 / TRAP_L1_DIVISOR, min |z|, each TRAP_START before any iteration (and
# at most that); traps 1 and 2 weigh the colours as trap^TRAP_EXPONENT.
TRAP_START = np.float32(1e20)
TRAP_L1_DIVISOR = np.float32(1.5)
TRAP_EXPONENT = 10
# Sphere tracing: a hit where DE <= THRESHOLD within STEPS steps; a primary ray hits the object when
# L < PRIMARY_LIMIT, a shadow ray escapes when L >= SHADOW_LIMIT (also where early_exit stops each).
PRIMARY_STEPS, PRIMARY_THRESHOLD, PRIMARY_LIMIT = 1000, np.float32(1e-3), np.float32(10.0)
SHADOW_STEPS, SHADOW_THRESHOLD, SHADOW_LIMIT = 10000, np.float32(1e-4), np.float32(10000.0)
# Shading: normal by central differences (+-NORMAL_EPS per axis), a point light at LIGHT, colour times
# (AMBIENT + DIFFUSE max(0, l . n)); the shadow ray starts at hit + n / SHADOW_OFFSET_DIVISOR and adds
# SHADOW_LIGHT where it escapes.
NORMAL_EPS = np.float32(1e-3)
LIGHT = (np.float32(-10.0), np.float32(10.0), np.float32(10.0))
AMBIENT, DIFFUSE, SHADOW_LIGHT = np.float32(0.3), np.float32(0.9), np.float32(0.2)
SHADOW_OFFSET_DIVISOR = np.float32(100000.0)
