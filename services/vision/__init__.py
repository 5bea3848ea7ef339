"""Vision preprocessing service: encoded images → a normalised float32 tensor in Triton's raw
layout, per the preprocessing spec a model ships (preprocess.json)."""
