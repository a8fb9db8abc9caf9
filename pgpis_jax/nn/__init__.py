"""Building blocks shared by every network: attention (kernel choice), normalisation, ResNet blocks,
resampling, torch's default initialisers (initializers.py). NHWC; each layer takes `dtype` (compute) and
`param_dtype`; the layers of the diffusers ports start from torch's default init."""
