"""PCDMs (Shen et al., ICLR 2024): stage 1 `prior`, stage 2 `inpaint`, stage 3 `refine`, and `pipeline`, the
three-stage sampler behind sample.py and eval.py."""
