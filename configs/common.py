"""Pieces every config shares. Configs are data: they import nothing from pgpis_jax."""

import ml_collections


def parse_arg(arg, **defaults):
    """big_vision-style config arguments: "demo" or "res=512,demo" -> ConfigDict.

    Each comma-separated item is `key=value` or a bare `key` (True); keys must be among `defaults`, and
    values are converted to the type of their default.
    """
    parsed = ml_collections.ConfigDict(defaults)
    for item in filter(None, (arg or "").split(",")):
        key, has_value, value = item.partition("=")
        if key not in defaults:
            raise ValueError(f"unknown config argument {key!r}; known: {', '.join(sorted(defaults))}")
        default = defaults[key]
        if not has_value:
            parsed[key] = True
        elif isinstance(default, bool):
            parsed[key] = value.lower() in ("1", "true", "yes")
        else:
            parsed[key] = type(default)(value)
    return parsed


def base_config(method):
    """Fields the trainer and entry points read for every method (pgpis_jax/trainer; docs/training.md).

    Steps count optimizer updates. `batch_size` is the global batch of one update (all hosts, all
    micro-batches). Methods' configs override what they need; the defaults here are plain data parallelism,
    AdamW at a constant learning rate, no EMA, float32.
    """
    config = ml_collections.ConfigDict()
    config.method = method
    config.seed = 42
    config.total_steps = 100_000
    config.log_every_steps = 100
    config.checkpoint_every_steps = 5_000
    config.batch_size = 64
    config.optimizer = optimizer_config()
    config.lr_schedule = lr_schedule_config()
    config.grad = ml_collections.ConfigDict(dict(
        clip_norm=0.0,            # global-norm clipping of the trainable gradients; 0 = off
        accumulation_steps=1,     # micro-batches per update (batch_size / accumulation_steps each)
        max_per_device_batch=0,   # > 0: at most this many rows per device in a micro-batch; the accumulation
                                  # steps are derived from the device count (accumulation_steps stays 1)
    ))
    # Regexes matched against the whole "/"-joined parameter path (e.g. "unet/up_blocks_1/attn2/to_k/kernel").
    # A parameter is trained if it matches a `trainable` pattern and no `frozen` pattern; frozen parameters get
    # no optimizer state and never change. A pattern that matches no parameter is an error.
    config.param_groups = ml_collections.ConfigDict(dict(trainable=(".*",), frozen=()))
    config.ema = ml_collections.ConfigDict(dict(decay=0.0))   # EMA of the trainable parameters; 0 = off
    config.precision = ml_collections.ConfigDict(dict(
        param_dtype="float32",    # stored parameters (and EMA)
        compute_dtype="float32",  # activations / matmuls; "bfloat16" on TPU and recent GPUs
        mu_dtype="float32",       # Adam first moment
    ))
    # Rematerialisation of the methods' blocks: "none", "full" (save nothing), or a jax.checkpoint_policies
    # name such as "dots_with_no_batch_dims_saveable".
    config.remat = "none"
    config.mesh = mesh_config()
    config.distributed = ml_collections.ConfigDict(dict(
        initialize=False,         # call jax.distributed.initialize() (TPU pod slices, multi-node GPU)
        coordinator_address="",   # the remaining fields are passed when set; TPU VMs detect them
        num_processes=0,
        process_id=-1,
    ))
    config.checkpoint = ml_collections.ConfigDict(dict(
        keep=3,                   # newest checkpoints kept in <workdir>/checkpoints
        async_save=True,
        save_on_preemption=True,  # a checkpoint at the current step on SIGTERM / preemption notice
        fallback_to_older=False,  # if the newest checkpoint is unreadable: False = stop with an error,
                                  # True = move it to <workdir>/corrupt_checkpoints and resume from an older one
    ))
    config.logging = ml_collections.ConfigDict(dict(
        sample_every_steps=0,     # sample image grid (TensorBoard + <workdir>/samples/*.png); 0 = off
        num_samples=16,
        tensorboard=True,
    ))
    config.debug = ml_collections.ConfigDict(dict(
        nan_at_step=0,            # > 0: the loss of that update is made NaN (tests the NaN guard)
        step_delay_seconds=0.0,   # host sleep after each step (tests preemption and kills)
    ))
    return config


def optimizer_config(name="adamw", learning_rate=1e-4, weight_decay=0.01, b1=0.9, b2=0.999, eps=1e-8,
                     schedule="constant"):
    """`adamw` (decoupled decay, as torch.optim.AdamW) or `adam` (weight_decay as an L2 term added to the
    gradient, as torch.optim.Adam). `schedule`: constant, linear_warmup or step_decay (see lr_schedule)."""
    return ml_collections.ConfigDict(dict(name=name, learning_rate=learning_rate, weight_decay=weight_decay,
                                          b1=b1, b2=b2, eps=eps, schedule=schedule))


def lr_schedule_config(warmup_steps=0, warmup_start_factor=0.1, decay_boundaries=(), decay_factor=0.1):
    """Parameters of optimizer.schedule. For the update at step s (0-based), with W = warmup_steps:
    lr = base * (f + (1 - f) * (s + 1) / W) while s < W (f = warmup_start_factor), then base; step_decay also
    multiplies by decay_factor ** (number of decay_boundaries <= s). CFLD: W=1000, f=0.1, one boundary."""
    return ml_collections.ConfigDict(dict(warmup_steps=warmup_steps, warmup_start_factor=warmup_start_factor,
                                          decay_boundaries=tuple(decay_boundaries), decay_factor=decay_factor))


def mesh_config(data=-1, fsdp=1):
    """The device mesh (axes `data`, `fsdp`; -1 = all remaining devices) and parameter sharding rules.

    rules: (regex on the "/"-joined parameter path, spec) pairs, first match wins. spec is "replicated",
    "fsdp" (the largest dimension divisible by the fsdp axis, for parameters of at least fsdp_min_size
    elements; else replicated) or a PartitionSpec tuple written as a string, e.g. "(None, 'fsdp')".
    Batches are split over batch_axes.
    """
    return ml_collections.ConfigDict(dict(
        data=data, fsdp=fsdp, rules=((".*", "fsdp"),), fsdp_min_size=2**14, batch_axes=("data", "fsdp")))


def eval_config(metrics="fid,lpips,ssim,psnr", protocol="standard", eval_size="", real_dir="", weights_dir=""):
    """config.eval, read by pgpis_jax.evaluation.evaluate_method_outputs (eval.py --config --workdir):
    metrics, protocol (standard, pcdms, cfld, fpdm, pidm), eval_size ("HxW", "" = the protocol's), real_dir
    (FID real set, "" = the reference images), weights_dir (metric weight files, "" = $PGPIS_METRIC_WEIGHTS)."""
    return ml_collections.ConfigDict(dict(metrics=metrics, protocol=protocol, eval_size=eval_size, real_dir=real_dir,
                                          weights_dir=weights_dir))


def scheduler_config(class_name, **fields):
    """A diffusers-style scheduler config (the content of a scheduler_config.json)."""
    return ml_collections.ConfigDict({"_class_name": class_name, **fields})


# Stable Diffusion 1.x / 2.x noise schedule as their scheduler configs give it.
SD_SCHEDULE = {"num_train_timesteps": 1000, "beta_schedule": "scaled_linear", "beta_start": 0.00085,
               "beta_end": 0.012}
