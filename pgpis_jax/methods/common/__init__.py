"""What every method is built from (PCDMs' three stages use all of it; CFLD, FPDM and RePoseDM build on it):

    networks.py       network specs -> modules, warm starts, the configs a run records (NetworkBuilder)
    encoders.py       frozen pretrained encoders as data: network, input batch key, output, feature name
    objective.py      the diffusion objective: prediction type, timestep sampler, noise offset, loss weighting
    latents.py        autoencoder moments and posterior samples as features
    stage.py          the Stage base: frozen networks in the step or from offline features, condition dropout,
                      layout check, per-example draws
    features.py       offline features of any stage's frozen networks (extract_features.py)
    split_sampler.py  sampling a split: resumable, process-sharded writing, best-of-N oracle selection, results
    run.py            a trained run directory opened read-only: rebuild a stage and its parameters for inference
    single_image.py   one source photo and two poses as the inputs of single-image sampling
    hosts.py          sums over processes, per-call config copies

Guidance lives in pgpis_jax.diffusion.guidance (`guided`: condition pytrees per branch and a rule).
"""
