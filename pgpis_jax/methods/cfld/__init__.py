"""CFLD (Lu et al., CVPR 2024): stage.py (the method: networks, training step, guided sampling), pipeline.py
(sampling a split or one image from a run, the test set of eval.py), formats.py (export / import), demo.py."""
