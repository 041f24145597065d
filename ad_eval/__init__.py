"""ad_eval: anomaly-detection evaluation of (fractal-)pretrained backbones (see issue 5)."""
