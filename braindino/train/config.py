"""Training configuration: built-in defaults ← a YAML file (a shipped config's name or a path) ← ``key=value``.

Every key a run reads is declared in ``DEFAULTS`` (unknown keys in a YAML file or an override are an error,
so a typo never silently trains the wrong model). The resolved config is saved in the run directory.
"""

from dataclasses import fields

from omegaconf import DictConfig, OmegaConf

from braindino.augment import IntensityAugmentConfig
from braindino.models import PRESETS
from braindino.train.catalog import resolve_config

DEFAULTS = {
    "objective": "dino",                 # dino (DINO + iBOT + KoLeo) | simclr (NT-Xent, the BrainIAC objective)
    "seed": 0,
    "model": {
        "arch": "vit_small",             # vit_tiny | vit_small | vit_base | vit_large
        "patch_size": 16,
        "depth": None,                   # override the preset's depth (tiny test models)
        "num_register_tokens": 4,
        "drop_path_rate": 0.1,
        "layerscale_init": 1.0e-5,
        "attn": "auto",                  # auto | sdpa | xformers
        "init_from": None,               # timm-format ViT weights (.safetensors / .pth) to start from
        "init_from_normalisation": "imagenet",   # input normalisation those weights expect: imagenet | none
        "grad_checkpointing": False,     # recompute block activations in backward: less memory, ~30% slower
    },
    "dino": {
        "loss_weight": 1.0,
        "n_prototypes": 65536,
        "head_hidden_dim": 2048,
        "head_bottleneck_dim": 256,
        "head_n_layers": 3,
        "head_batchnorm": False,         # BatchNorm on batch statistics after each hidden layer (DINO v1's use_bn)
        "teacher_target": "sinkhorn",    # sinkhorn (Sinkhorn-Knopp, DINOv2) | centering (DINO softmax centring)
        "center_momentum": 0.9,
        "student_temp": 0.1,
        "freeze_last_layer_iters": 1250,
    },
    # Loss weights vs DINOv2 at equal values: our iBOT loss is averaged over the *masked* images (DINOv2: over all
    # global crops) and our KoLeo is averaged over the two global crops (DINOv2: summed). DINOv2's weights w_ibot,
    # w_koleo therefore map to ibot.loss_weight = w_ibot * ibot.mask_sample_probability and
    # koleo.loss_weight = 2 * w_koleo (e.g. DINOv2's 1.0 / 0.1 at probability 0.5 -> 0.5 / 0.2).
    "ibot": {
        "loss_weight": 1.0,              # 0 disables masking and the patch loss
        "separate_head": False,
        "n_prototypes": 65536,
        "mask_ratio_range": [0.1, 0.5],
        "mask_sample_probability": 0.5,
    },
    "koleo": {"loss_weight": 0.1},
    # A contrastive warm start: SimCLR's NT-Xent on the student DINO head's unit bottleneck (the two global crops)
    # alone for `iters` steps, then a linear cross-fade into DINO + iBOT + KoLeo over `fade_iters` steps. It leaves
    # DINO's uniform-target fixed point, but on the demo's store it collapsed the backbone's features (README, study
    # row e5). 0 and 0: off, in every shipped config.
    "contrastive_warmup": {"iters": 0, "fade_iters": 0, "temperature": 0.2},
    "simclr": {"temperature": 0.1, "projection_dim": 128, "hidden_dim": 2048},
    "crops": {
        "global_size": 224,
        "local_size": 96,
        "n_local": 8,
        "global_scale": [0.32, 1.0],
        "local_scale": [0.05, 0.32],
        "flip_p": 0.5,
        "max_rotation_deg": 10.0,
    },
    # probability p_* and range of each intensity augmentation (braindino.augment.IntensityAugmentConfig's defaults)
    "intensity": {f.name: list(f.default) if isinstance(f.default, tuple) else f.default
                  for f in fields(IntensityAugmentConfig)},
    "optim": {
        "global_batch_size": 64,         # images per step summed over all processes
        "iters": 10000,
        "base_lr": 0.004,                # for a global batch of 1024, scaled by lr_scaling
        "lr_scaling": "sqrt",            # sqrt | linear | none
        "min_lr": 1.0e-6,
        "warmup_iters": 1000,
        "weight_decay": 0.04,
        "weight_decay_end": 0.2,
        "layer_decay": 0.9,
        "patch_embed_lr_multiplier": 0.2,
        "clip_grad": 3.0,
        "betas": [0.9, 0.999],
    },
    "teacher": {
        "momentum": 0.992,               # EMA momentum at step 0, cosine to momentum_end
        "momentum_end": 1.0,
        "temp": 0.07,
        "temp_warmup_start": 0.04,
        "temp_warmup_iters": 3000,
    },
    "train": {
        "num_workers": 4,
        "precision": "auto",             # auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32
        "distributed": "ddp",            # ddp | fsdp (FSDP2 fully_shard, for large models)
        "compile": False,                # torch.compile each transformer block (worth it on GPUs, for long runs)
        "log_every": 10,
        "monitor_every": 50,
        "checkpoint_every": 500,
        "keep_last": 3,
        "max_hours": 0.0,                # wall-clock budget of this process: stop with a checkpoint after it (0: none)
        "max_consecutive_nonfinite": 3,
        "fixed_point_patience": 200,     # warn after this many steps in DINO's uniform-target regime (0: never)
        "knn_label": None,               # manifest label column for the online kNN monitor
        "knn_every": 0,                  # 0 disables it
        "knn_slices_per_volume": 8,
        "wandb": False,
        "wandb_project": "braindino",
        "progress": True,
    },
}


CHOICES = {
    "objective": ("dino", "simclr"),
    "model.arch": tuple(PRESETS),
    "model.attn": ("auto", "sdpa", "xformers"),
    "model.init_from_normalisation": ("imagenet", "none"),
    "dino.teacher_target": ("sinkhorn", "centering"),
    "optim.lr_scaling": ("sqrt", "linear", "none"),
    "train.precision": ("auto", "bf16", "fp32"),
    "train.distributed": ("ddp", "fsdp"),
}


def load_config(path=None, overrides=()) -> DictConfig:
    """Merge defaults, the YAML file ``path`` (a file, or a shipped config's name) and ``key=value`` overrides.

    Raises ``ValueError`` (one line) for unknown keys, malformed overrides, values of the wrong type and values
    outside a key's choices; :class:`~braindino.errors.InputError` for a path that is neither a file nor a
    shipped config's name.
    """
    config = OmegaConf.create(DEFAULTS)
    OmegaConf.set_struct(config, True)
    malformed = [item for item in overrides if "=" not in item]
    if malformed:
        raise ValueError(f"overrides must look like key=value, got {malformed}")
    source = resolve_config(path) if path is not None else None
    try:
        layers = [OmegaConf.load(source)] if source is not None else []
        layers.append(OmegaConf.from_dotlist(list(overrides)))
        for layer in layers:
            config = OmegaConf.merge(config, layer)
    except OSError:
        raise
    except Exception as err:   # YAML syntax errors, omegaconf ConfigKeyError / ValidationError
        raise ValueError(f"invalid configuration: {str(err).splitlines()[0]}") from err
    check_types(DEFAULTS, config, "")
    for key, allowed in CHOICES.items():
        if OmegaConf.select(config, key) not in allowed:
            raise ValueError(f"{key} must be one of {allowed}, got {OmegaConf.select(config, key)!r}")
    return config


def check_types(defaults: dict, config: DictConfig, prefix: str) -> None:
    """Every value must have its default's type (ints are accepted for floats); ``None`` defaults take anything."""
    for key, default in defaults.items():
        value, name = config[key], f"{prefix}{key}"
        if isinstance(default, dict):
            check_types(default, value, f"{name}.")
        elif default is not None and value is not None:
            expected = (list if isinstance(default, list) else
                        (int, float) if isinstance(default, float) else type(default))
            actual = list if OmegaConf.is_list(value) else type(value)
            if not issubclass(actual, expected) or (actual is bool) != isinstance(default, bool):
                raise ValueError(f"{name} must be of type {type(default).__name__}, got {value!r}")


def save_config(config: DictConfig, path) -> None:
    from braindino.atomic import atomic_write_text

    atomic_write_text(path, OmegaConf.to_yaml(config, resolve=True))
