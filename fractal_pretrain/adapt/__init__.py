"""AD-specific second stage: a residual-feature projector trained on synthetic fractal anomalies (issue 14)."""
