"""FPDM (Lee et al., "Fusion Embedding for Pose-Guided Person Image Synthesis with Diffusion Model"):

    fusion.py     stage 1, `fpdm_fusion`: the fine-tuned CLIP ViT-L/14 and the Combiner, trained contrastively
    diffusion.py  stage 2, `fpdm`: the SD 2.1 (768-v) UNet conditioned on the fusion embedding, DINOv2 tokens and pose
    sampling.py   split and single-image sampling with FPDM's three-branch guidance, the test set for eval.py
    formats.py    export / import formats of both stages ("original" Lightning checkpoints, "diffusers")
    demo.py       both stages tiny on synthetic people (`make demo-fpdm`)
"""
