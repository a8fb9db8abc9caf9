"""Inception-v3 for FID (pgpis_jax.metrics.inception) and the metric weight loader (pgpis_jax.metrics.weights).

References, all fed the same random weights in torchvision's state-dict layout (written with torch.save and
read back through our loader): a torch.nn.functional transcription of torchvision's Inception3 / pytorch-fid's
FIDInception blocks written here, for the whole feature path (F.interpolate + input transform + network) of
both variants; Keras' InceptionV3 application, which equals the pytorch-fid network through Mixed_7b ("mixed9":
same graph, BatchNorm eps 1e-3, average pools that exclude the padding); NumPy window loops for the pools.
"""


import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgpis_jax.errors import UserError
from pgpis_jax.metrics import inception, weights
from pgpis_jax.metrics.inception import InceptionV3, load_inception, load_inception_params, pool_3x3, prepare_input

# torchvision's BasicConv2d blocks in registration order: (name, out, in, kh, kw). AuxLogits (torchvision file
# only) is registered between Mixed_6e and Mixed_7a.
STEM = [("Conv2d_1a_3x3", 32, 3, 3, 3), ("Conv2d_2a_3x3", 32, 32, 3, 3), ("Conv2d_2b_3x3", 64, 32, 3, 3),
        ("Conv2d_3b_1x1", 80, 64, 1, 1), ("Conv2d_4a_3x3", 192, 80, 3, 3)]


def _block_a(name, cin, pool_features):
    return [(f"{name}.branch1x1", 64, cin, 1, 1), (f"{name}.branch5x5_1", 48, cin, 1, 1),
            (f"{name}.branch5x5_2", 64, 48, 5, 5), (f"{name}.branch3x3dbl_1", 64, cin, 1, 1),
            (f"{name}.branch3x3dbl_2", 96, 64, 3, 3), (f"{name}.branch3x3dbl_3", 96, 96, 3, 3),
            (f"{name}.branch_pool", pool_features, cin, 1, 1)]


def _block_c(name, c7):
    return [(f"{name}.branch1x1", 192, 768, 1, 1), (f"{name}.branch7x7_1", c7, 768, 1, 1),
            (f"{name}.branch7x7_2", c7, c7, 1, 7), (f"{name}.branch7x7_3", 192, c7, 7, 1),
            (f"{name}.branch7x7dbl_1", c7, 768, 1, 1), (f"{name}.branch7x7dbl_2", c7, c7, 7, 1),
            (f"{name}.branch7x7dbl_3", c7, c7, 1, 7), (f"{name}.branch7x7dbl_4", c7, c7, 7, 1),
            (f"{name}.branch7x7dbl_5", 192, c7, 1, 7), (f"{name}.branch_pool", 192, 768, 1, 1)]


def _block_e(name, cin):
    return [(f"{name}.branch1x1", 320, cin, 1, 1), (f"{name}.branch3x3_1", 384, cin, 1, 1),
            (f"{name}.branch3x3_2a", 384, 384, 1, 3), (f"{name}.branch3x3_2b", 384, 384, 3, 1),
            (f"{name}.branch3x3dbl_1", 448, cin, 1, 1), (f"{name}.branch3x3dbl_2", 384, 448, 3, 3),
            (f"{name}.branch3x3dbl_3a", 384, 384, 1, 3), (f"{name}.branch3x3dbl_3b", 384, 384, 3, 1),
            (f"{name}.branch_pool", 192, cin, 1, 1)]


BLOCKS_BEFORE_AUX = (STEM + _block_a("Mixed_5b", 192, 32) + _block_a("Mixed_5c", 256, 64)
                     + _block_a("Mixed_5d", 288, 64)
                     + [("Mixed_6a.branch3x3", 384, 288, 3, 3), ("Mixed_6a.branch3x3dbl_1", 64, 288, 1, 1),
                        ("Mixed_6a.branch3x3dbl_2", 96, 64, 3, 3), ("Mixed_6a.branch3x3dbl_3", 96, 96, 3, 3)]
                     + _block_c("Mixed_6b", 128) + _block_c("Mixed_6c", 160) + _block_c("Mixed_6d", 160)
                     + _block_c("Mixed_6e", 192))
BLOCKS_AFTER_AUX = ([("Mixed_7a.branch3x3_1", 192, 768, 1, 1), ("Mixed_7a.branch3x3_2", 320, 192, 3, 3),
                     ("Mixed_7a.branch7x7x3_1", 192, 768, 1, 1), ("Mixed_7a.branch7x7x3_2", 192, 192, 1, 7),
                     ("Mixed_7a.branch7x7x3_3", 192, 192, 7, 1), ("Mixed_7a.branch7x7x3_4", 192, 192, 3, 3)]
                    + _block_e("Mixed_7b", 1280) + _block_e("Mixed_7c", 2048))
BLOCKS = BLOCKS_BEFORE_AUX + BLOCKS_AFTER_AUX
# Convolutions without padding, and their stride; every other one has stride 1 and padding (kh // 2, kw // 2).
VALID_CONV_STRIDES = {"Conv2d_1a_3x3": 2, "Conv2d_2a_3x3": 1, "Conv2d_4a_3x3": 1, "Mixed_6a.branch3x3": 2,
                      "Mixed_6a.branch3x3dbl_3": 2, "Mixed_7a.branch3x3_2": 2, "Mixed_7a.branch7x7x3_4": 2}


def _basic_conv_entries(generator, name, out, cin, kh, kw, with_counter):
    """Conv weights He-scaled, BatchNorm statistics near identity: activations stay O(1) through the net."""
    def uniform(low, high, *shape):
        return low + (high - low) * torch.rand(*shape, generator=generator)

    he_std = (2.0 / (cin * kh * kw)) ** 0.5
    entries = {f"{name}.conv.weight": torch.randn(out, cin, kh, kw, generator=generator) * he_std,
               f"{name}.bn.weight": uniform(0.5, 1.5, out), f"{name}.bn.bias": uniform(-0.1, 0.1, out),
               f"{name}.bn.running_mean": uniform(-0.1, 0.1, out), f"{name}.bn.running_var": uniform(0.5, 1.5, out)}
    if with_counter:
        entries[f"{name}.bn.num_batches_tracked"] = torch.tensor(0)
    return entries


def random_state_dict(variant, seed=0):
    """A random state dict with exactly the keys and shapes of the variant's weight file: torchvision's has
    AuxLogits, a 1000-class fc and num_batches_tracked; pytorch-fid's a 1008-class fc and neither."""
    generator = torch.Generator().manual_seed(seed)
    torchvision = variant == "torchvision"
    state = {}
    for block in BLOCKS_BEFORE_AUX:
        state.update(_basic_conv_entries(generator, *block, with_counter=torchvision))
    if torchvision:
        state.update(_basic_conv_entries(generator, "AuxLogits.conv0", 128, 768, 1, 1, True))
        state.update(_basic_conv_entries(generator, "AuxLogits.conv1", 768, 128, 5, 5, True))
        state["AuxLogits.fc.weight"] = torch.randn(1000, 768, generator=generator) * 0.01
        state["AuxLogits.fc.bias"] = torch.zeros(1000)
    for block in BLOCKS_AFTER_AUX:
        state.update(_basic_conv_entries(generator, *block, with_counter=torchvision))
    classes = 1000 if torchvision else 1008
    state["fc.weight"] = torch.randn(classes, 2048, generator=generator) * 0.01
    state["fc.bias"] = torch.zeros(classes)
    return state


# --- the torch.nn.functional reference -------------------------------------------------------------------

def torch_basic_conv(state, name, x):
    stride = VALID_CONV_STRIDES.get(name, 1)
    weight = state[f"{name}.conv.weight"]
    padding = (0, 0) if name in VALID_CONV_STRIDES else (weight.shape[2] // 2, weight.shape[3] // 2)
    x = F.conv2d(x, weight, stride=stride, padding=padding)
    x = F.batch_norm(x, state[f"{name}.bn.running_mean"], state[f"{name}.bn.running_var"], state[f"{name}.bn.weight"],
                     state[f"{name}.bn.bias"], training=False, eps=0.001)
    return F.relu(x)


def torch_pool(x, kind):
    if kind == "max":
        return F.max_pool2d(x, 3, stride=1, padding=1)
    return F.avg_pool2d(x, 3, stride=1, padding=1, count_include_pad=kind == "include")


def torch_pool3(state, x, variant):
    """pool3 features [N, 2048] of NCHW input, as torchvision's Inception3 (include-pad average pools) or
    pytorch-fid's FIDInceptionA/C/E_1 (exclude-pad) and FIDInceptionE_2 (max pool in Mixed_7c)."""
    pool = "include" if variant == "torchvision" else "exclude"
    pool_7c = "include" if variant == "torchvision" else "max"

    def conv(name, x):
        return torch_basic_conv(state, name, x)

    for name in ("Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3"):
        x = conv(name, x)
    x = F.max_pool2d(x, 3, stride=2)
    x = conv("Conv2d_4a_3x3", conv("Conv2d_3b_1x1", x))
    x = F.max_pool2d(x, 3, stride=2)
    for m in ("Mixed_5b", "Mixed_5c", "Mixed_5d"):
        x = torch.cat([conv(f"{m}.branch1x1", x),
                       conv(f"{m}.branch5x5_2", conv(f"{m}.branch5x5_1", x)),
                       conv(f"{m}.branch3x3dbl_3", conv(f"{m}.branch3x3dbl_2", conv(f"{m}.branch3x3dbl_1", x))),
                       conv(f"{m}.branch_pool", torch_pool(x, pool))], 1)
    x = torch.cat([conv("Mixed_6a.branch3x3", x),
                   conv("Mixed_6a.branch3x3dbl_3", conv("Mixed_6a.branch3x3dbl_2", conv("Mixed_6a.branch3x3dbl_1", x))),
                   F.max_pool2d(x, 3, stride=2)], 1)
    for m in ("Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e"):
        b7 = x
        for i in (1, 2, 3):
            b7 = conv(f"{m}.branch7x7_{i}", b7)
        b7dbl = x
        for i in (1, 2, 3, 4, 5):
            b7dbl = conv(f"{m}.branch7x7dbl_{i}", b7dbl)
        x = torch.cat([conv(f"{m}.branch1x1", x), b7, b7dbl, conv(f"{m}.branch_pool", torch_pool(x, pool))], 1)
    b7x3 = x
    for i in (1, 2, 3, 4):
        b7x3 = conv(f"Mixed_7a.branch7x7x3_{i}", b7x3)
    x = torch.cat([conv("Mixed_7a.branch3x3_2", conv("Mixed_7a.branch3x3_1", x)), b7x3,
                   F.max_pool2d(x, 3, stride=2)], 1)
    for m, kind in (("Mixed_7b", pool), ("Mixed_7c", pool_7c)):
        b3 = conv(f"{m}.branch3x3_1", x)
        b3dbl = conv(f"{m}.branch3x3dbl_2", conv(f"{m}.branch3x3dbl_1", x))
        x = torch.cat([conv(f"{m}.branch1x1", x),
                       conv(f"{m}.branch3x3_2a", b3), conv(f"{m}.branch3x3_2b", b3),
                       conv(f"{m}.branch3x3dbl_3a", b3dbl), conv(f"{m}.branch3x3dbl_3b", b3dbl),
                       conv(f"{m}.branch_pool", torch_pool(x, kind))], 1)
    return F.adaptive_avg_pool2d(x, (1, 1)).flatten(1)


def torch_input(images, input_transform):
    """NHWC [0, 1] images -> the NCHW network input of pytorch-fid (2x - 1) or of the PIDM-lineage wrappers."""
    x = F.interpolate(torch.from_numpy(images).permute(0, 3, 1, 2), size=(299, 299), mode="bilinear",
                      align_corners=False)
    if input_transform == "pytorch_fid":
        return 2 * x - 1
    return torch.stack([x[:, 0] * (0.229 / 0.5) + (0.485 - 0.5) / 0.5,
                        x[:, 1] * (0.224 / 0.5) + (0.456 - 0.5) / 0.5,
                        x[:, 2] * (0.225 / 0.5) + (0.406 - 0.5) / 0.5], 1)


def relative_error(ours, reference):
    return float(np.max(np.abs(np.asarray(ours, np.float64) - reference)) / np.max(np.abs(reference)))


@pytest.fixture(scope="module")
def state_dicts():
    return {variant: random_state_dict(variant, seed=1) for variant in inception.VARIANTS}


@pytest.fixture(scope="module")
def weights_dir(tmp_path_factory, state_dicts):
    """A folder with both weight files (the random state dicts, under the real file names)."""
    directory = tmp_path_factory.mktemp("metric_weights")
    for variant, state in state_dicts.items():
        torch.save(state, directory / inception.WEIGHT_FILES[variant])
    return str(directory)


# --- tests -----------------------------------------------------------------------------------------------

@pytest.mark.parametrize("variant", inception.VARIANTS)
def test_feature_fn_matches_torch_reference(variant, state_dicts, weights_dir):
    """load_inception (file lookup, torch.load, key mapping) + resize + input transform + network vs the
    torch.nn.functional transcription, on non-square images (3 images in batches of 2: the last one padded)."""
    state = state_dicts[variant]
    input_transform = inception.DEFAULT_INPUT_TRANSFORM[variant]
    features_fn = load_inception(variant, weights_dir=weights_dir, batch_size=2)
    images = np.random.default_rng(0).random((3, 96, 80, 3), dtype=np.float32)
    ours = features_fn(images)
    assert ours.dtype == np.float64 and ours.shape == (3, 2048)
    with torch.no_grad():
        reference = torch_pool3(state, torch_input(images, input_transform), variant).numpy()
        other_variant = "pt_inception" if variant == "torchvision" else "torchvision"
        other = torch_pool3(state, torch_input(images[:1], input_transform), other_variant).numpy()
    assert reference.std() > 1e-2 and np.abs(reference[0] - reference[1]).max() > 1e-2 * np.abs(reference).max()
    assert relative_error(ours, reference) < 1e-5
    assert relative_error(other, reference[:1]) > 1e-2  # the pool quirks matter at this tolerance


def test_pytorch_fid_variant_matches_keras_through_mixed_7b(state_dicts, weights_dir):
    """Keras' InceptionV3 (weights=None) given our weights (BatchNorm gamma folded into the conv, as Keras'
    BatchNorm has scale=False): its "mixed9" equals our pt_inception Mixed_7b output, at 139x139 (3x3 there)."""
    import keras
    state = state_dicts["pt_inception"]
    keras.utils.clear_session()
    model = keras.applications.InceptionV3(weights=None, include_top=False, input_shape=(139, 139, 3))

    def creation_index(layer):
        suffix = layer.name.rsplit("_", 1)[-1]
        return int(suffix) if suffix.isdigit() else 0

    convs = sorted((l for l in model.layers if isinstance(l, keras.layers.Conv2D)), key=creation_index)
    norms = sorted((l for l in model.layers if isinstance(l, keras.layers.BatchNormalization)), key=creation_index)
    assert len(convs) == len(norms) == len(BLOCKS) == 94
    for (name, *_), conv, norm in zip(BLOCKS, convs, norms):
        gamma = state[f"{name}.bn.weight"].numpy()
        kernel = state[f"{name}.conv.weight"].numpy().transpose(2, 3, 1, 0) * gamma
        assert conv.kernel.shape == kernel.shape, name
        conv.set_weights([kernel])
        norm.set_weights([state[f"{name}.bn.bias"].numpy(), gamma * state[f"{name}.bn.running_mean"].numpy(),
                          state[f"{name}.bn.running_var"].numpy()])
    x = np.random.default_rng(1).uniform(-1, 1, (2, 139, 139, 3)).astype(np.float32)
    mixed9 = keras.Model(model.input, model.get_layer("mixed9").output)
    reference = np.asarray(mixed9(x, training=False))

    params = load_inception_params("pt_inception", weights_dir)

    def mixed_7b_output(module, method):
        return module.name == "Mixed_7b" and method == "__call__"

    _, state_vars = jax.jit(lambda p, x: InceptionV3(variant="pt_inception").apply(
        {"params": p}, x, capture_intermediates=mixed_7b_output))(params, x)
    ours = state_vars["intermediates"]["Mixed_7b"]["__call__"][0]
    assert reference.shape == ours.shape == (2, 3, 3, 2048)
    assert reference.std() > 1e-2
    assert relative_error(ours, reference) < 1e-5


@pytest.mark.parametrize("pool", inception.POOLS)
def test_pool_3x3_matches_window_loop(pool):
    """3x3 stride-1 pools with one pixel of padding: include-pad average divides by 9, exclude-pad by the
    number of real pixels, max ignores the padding."""
    x = np.random.default_rng(2).normal(size=(2, 4, 5, 3))
    padded = np.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)), constant_values=np.nan)
    expected = np.empty_like(x)
    for i in range(4):
        for j in range(5):
            window = padded[:, i:i + 3, j:j + 3].reshape(2, 9, 3)
            real = ~np.isnan(window)
            if pool == "max":
                expected[:, i, j] = np.nanmax(window, axis=1)
            else:
                total = np.nansum(window, axis=1)
                expected[:, i, j] = total / (9 if pool == "avg_include_pad" else real.sum(axis=1))
    np.testing.assert_allclose(pool_3x3(jnp.asarray(x, jnp.float32), pool), expected, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("size", [(64, 48), (256, 176), (512, 352), (299, 299)])
@pytest.mark.parametrize("input_transform", inception.INPUT_TRANSFORMS)
def test_prepare_input_matches_torch(size, input_transform):
    """Bilinear resize (torch F.interpolate, align_corners=False, no antialias) and the input transforms."""
    images = np.random.default_rng(3).random((2, *size, 3), dtype=np.float32)
    reference = torch_input(images, input_transform).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(prepare_input(images, input_transform), reference, rtol=0, atol=2e-6)


def test_unknown_variant_and_transform_are_user_errors(weights_dir):
    with pytest.raises(UserError, match="unknown Inception variant 'fid'.*pt_inception, torchvision"):
        load_inception("fid", weights_dir=weights_dir)
    with pytest.raises(UserError, match="unknown Inception input transform 'tf'"):
        inception.make_feature_fn(InceptionV3(), {}, "tf")


# --- the weight loader -----------------------------------------------------------------------------------

def test_loaded_params_are_the_file_values(state_dicts, weights_dir):
    """Conv weights transposed to [kh, kw, I, O], BatchNorm entries by name; extras dropped."""
    state = state_dicts["torchvision"]
    params = load_inception_params("torchvision", weights_dir)
    conv = params["Mixed_6b"]["branch7x7_2"]
    np.testing.assert_array_equal(conv["conv"]["kernel"],
                                  state["Mixed_6b.branch7x7_2.conv.weight"].numpy().transpose(2, 3, 1, 0))
    assert conv["conv"]["kernel"].shape == (1, 7, 128, 128)
    for ours, theirs in (("scale", "weight"), ("bias", "bias"), ("running_mean", "running_mean"),
                         ("running_var", "running_var")):
        np.testing.assert_array_equal(conv["bn"][ours], state[f"Mixed_6b.branch7x7_2.bn.{theirs}"].numpy())
    assert "AuxLogits" not in params and "fc" not in params


def _tiny_expected():
    """Expected tree of a two-layer net: torch keys features.0.{weight,bias} (conv 4->2, 3x3), norm.weight."""
    return {"features_0": {"kernel": jax.ShapeDtypeStruct((3, 3, 4, 2), jnp.float32),
                           "bias": jax.ShapeDtypeStruct((2,), jnp.float32)},
            "norm": {"scale": jax.ShapeDtypeStruct((2,), jnp.float32)}}


def _tiny_state():
    return {"features.0.weight": torch.randn(2, 4, 3, 3), "features.0.bias": torch.randn(2),
            "norm.weight": torch.randn(2), "classifier.weight": torch.randn(5, 2)}


def test_load_torch_weights_strict_keys(tmp_path):
    path = str(tmp_path / "tiny.pth")
    state = _tiny_state()
    torch.save(state, path)
    params = weights.load_torch_weights(path, _tiny_expected(), "tiny net", ignored_keys=[r"classifier\..*"])
    np.testing.assert_array_equal(params["features_0"]["kernel"],
                                  state["features.0.weight"].numpy().transpose(2, 3, 1, 0))
    np.testing.assert_array_equal(params["norm"]["scale"], state["norm.weight"].numpy())

    with pytest.raises(UserError, match=r"tiny net \(.*tiny.pth\).*unexpected \(1\): classifier/kernel"):
        weights.load_torch_weights(path, _tiny_expected(), "tiny net")

    missing = {k: v for k, v in state.items() if k != "norm.weight"}
    torch.save(missing, path)
    with pytest.raises(UserError, match=r"tiny.pth.*missing \(1\): norm/scale"):
        weights.load_torch_weights(path, _tiny_expected(), "tiny net", ignored_keys=[r"classifier\..*"])

    torch.save({**state, "features.0.bias": torch.zeros(3)}, path)
    with pytest.raises(UserError, match=r"tiny.pth.*wrong shape \(1\): features_0/bias: \(3,\) \(expected \(2,\)\)"):
        weights.load_torch_weights(path, _tiny_expected(), "tiny net", ignored_keys=[r"classifier\..*"])

    torch.save({**state, "extra.weight": torch.zeros(2)}, path)
    with pytest.raises(UserError, match=r"unexpected \(1\): extra/scale"):
        weights.load_torch_weights(path, _tiny_expected(), "tiny net", ignored_keys=[r"classifier\..*"])

    torch.save([torch.zeros(2)], path)
    with pytest.raises(UserError, match=r"tiny.pth holds a list, not a state dict"):
        weights.load_torch_weights(path, _tiny_expected(), "tiny net")

    (tmp_path / "broken.pth").write_bytes(b"not a pickle")
    with pytest.raises(UserError, match=r"broken.pth cannot be read by torch.load"):
        weights.load_torch_weights(str(tmp_path / "broken.pth"), _tiny_expected(), "tiny net")


def test_wrong_inception_file_is_recognised_by_its_classifier(tmp_path):
    """The ImageNet file put where the FID one is expected: its fc has 1000 rows, not 1008."""
    torch.save({"fc.weight": torch.zeros(1000, 2048)}, tmp_path / inception.WEIGHT_FILES["pt_inception"])
    with pytest.raises(UserError, match=r"'fc.weight' is of shape \(1000, 2048\), expected shape \(1008, 2048\)"):
        load_inception_params("pt_inception", str(tmp_path))


def test_find_weight_file(tmp_path, monkeypatch):
    filename = inception.WEIGHT_FILES["torchvision"]
    monkeypatch.delenv(weights.WEIGHTS_DIR_ENV, raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch_home"))
    with pytest.raises(UserError) as error:
        weights.find_weight_file(filename)
    message = str(error.value)
    for part in (filename, "https://download.pytorch.org/models/inception_v3_google-0cc3c7bd.pth", "--weights_dir",
                 "PGPIS_METRIC_WEIGHTS", str(tmp_path / "torch_home")):
        assert part in message
    fid_url = ("https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/"
               "pt_inception-2015-12-05-6726825d.pth")
    with pytest.raises(UserError, match=f"pt_inception-2015-12-05-6726825d.pth not found.*{fid_url}"):
        load_inception("pt_inception")

    env_dir, flag_dir, hub_dir = tmp_path / "env", tmp_path / "flag", tmp_path / "torch_home" / "hub" / "checkpoints"
    for directory in (env_dir, flag_dir, hub_dir):
        directory.mkdir(parents=True)
    (hub_dir / filename).write_bytes(b"")
    assert weights.find_weight_file(filename) == str(hub_dir / filename)
    monkeypatch.setenv(weights.WEIGHTS_DIR_ENV, str(env_dir))
    (env_dir / filename).write_bytes(b"")
    assert weights.find_weight_file(filename) == str(env_dir / filename)
    with pytest.raises(UserError, match=f"not found \\(looked in {flag_dir}\\)"):
        weights.find_weight_file(filename, weights_dir=str(flag_dir))
    (flag_dir / filename).write_bytes(b"")
    assert weights.find_weight_file(filename, weights_dir=str(flag_dir)) == str(flag_dir / filename)
    with pytest.raises(UserError, match="--weights_dir '.*nowhere' is not a directory"):
        weights.find_weight_file(filename, weights_dir=str(tmp_path / "nowhere"))
    with pytest.raises(ValueError, match="unknown metric weight file 'x.pth'"):
        weights.find_weight_file("x.pth")
