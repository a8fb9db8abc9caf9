"""Building blocks shared by every network: attention (kernel choice), normalisation, ResNet blocks,
resampling. NHWC; each layer takes `dtype` (compute) and `param_dtype`."""
