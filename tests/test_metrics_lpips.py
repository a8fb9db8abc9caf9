"""LPIPS v0.1 against independent references with the same random weights: a torch.nn.functional
transcription of torchvision's AlexNet / VGG16 trunks and of the LPIPS formula, and Keras' VGG16. The weights
travel through torch.save'd files with the real key names (torchvision trunk incl. classifier, lpips heads as a
legacy pickle), so the loading path is tested too."""

import importlib.util
import os
import shutil

import jax
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pgpis_jax.errors import UserError
from pgpis_jax.metrics.lpips import AlexNetFeatures, VGG16Features, load_lpips, load_lpips_params

TRUNK_FILES = {"alex": "alexnet-owt-7be5be79.pth", "vgg": "vgg16-397923af.pth"}
HEAD_FILES = {"alex": "alex.pth", "vgg": "vgg.pth"}
# torchvision alexnet().features convs: index -> (out, in, kernel); stride / padding are in torch_alexnet_taps.
ALEX_CONV_SHAPES = {0: (64, 3, 11), 3: (192, 64, 5), 6: (384, 192, 3), 8: (256, 384, 3), 10: (256, 256, 3)}
# torchvision vgg16().features: the conv indices of each stage and the stage's channels.
VGG_STAGES = (((0, 2), 64), ((5, 7), 128), ((10, 12, 14), 256), ((17, 19, 21), 512), ((24, 26, 28), 512))
TAP_CHANNELS = {"alex": (64, 192, 384, 256, 256), "vgg": (64, 128, 256, 512, 512)}
# The torchvision files also hold the classifier (alexnet classifier.{1,4,6}, vgg16 classifier.{0,3,6}); LPIPS
# ignores them by name, whatever their shape, so small stand-ins keep the files small.
CLASSIFIER_INDICES = {"alex": (1, 4, 6), "vgg": (0, 3, 6)}


def conv_shapes(net):
    """{torch conv index: (out, in, kernel)} of the trunk."""
    if net == "alex":
        return ALEX_CONV_SHAPES
    shapes, channels_in = {}, 3
    for indices, channels in VGG_STAGES:
        for index in indices:
            shapes[index] = (channels, channels_in, 3)
            channels_in = channels
    return shapes


def random_trunk_state(net, seed):
    """He-scaled random conv weights under torchvision's keys, plus classifier entries."""
    generator = torch.Generator().manual_seed(seed)
    state = {}
    for index, (out, inp, kernel) in conv_shapes(net).items():
        std = (2.0 / (inp * kernel * kernel)) ** 0.5
        state[f"features.{index}.weight"] = torch.randn(out, inp, kernel, kernel, generator=generator) * std
        state[f"features.{index}.bias"] = torch.randn(out, generator=generator) * 0.05
    for index in CLASSIFIER_INDICES[net]:
        state[f"classifier.{index}.weight"] = torch.randn(10, 8, generator=generator)
        state[f"classifier.{index}.bias"] = torch.randn(10, generator=generator)
    return state


def random_head_state(net, seed):
    generator = torch.Generator().manual_seed(seed)
    return {f"lin{k}.model.1.weight": torch.rand(1, channels, 1, 1, generator=generator) * 0.5
            for k, channels in enumerate(TAP_CHANNELS[net])}


def save_weights(directory, net, trunk_state, head_state):
    torch.save(trunk_state, os.path.join(directory, TRUNK_FILES[net]))
    # the lpips package ships its heads as legacy (pre-zip) pickles
    torch.save(head_state, os.path.join(directory, HEAD_FILES[net]), _use_new_zipfile_serialization=False)


@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """{net: (directory, trunk state, head state)} with the random weights saved under the real names."""
    directory = str(tmp_path_factory.mktemp("lpips_weights"))
    result = {}
    for seed, net in enumerate(("alex", "vgg")):
        trunk, heads = random_trunk_state(net, seed), random_head_state(net, seed + 10)
        save_weights(directory, net, trunk, heads)
        result[net] = (directory, trunk, heads)
    return result


def torch_alexnet_taps(x, state):
    """torchvision alexnet().features up to relu5: conv11/4 pad2, relu, maxpool3/2, conv5 pad2, relu,
    maxpool3/2, conv3 pad1, relu (x3); x NCHW."""
    def conv(h, index, stride=1, padding=1):
        weight, bias = state[f"features.{index}.weight"], state[f"features.{index}.bias"]
        return F.relu(F.conv2d(h, weight.to(h.dtype), bias.to(h.dtype), stride=stride, padding=padding))

    relu1 = conv(x, 0, stride=4, padding=2)
    relu2 = conv(F.max_pool2d(relu1, 3, 2), 3, padding=2)
    relu3 = conv(F.max_pool2d(relu2, 3, 2), 6)
    relu4 = conv(relu3, 8)
    relu5 = conv(relu4, 10)
    return [relu1, relu2, relu3, relu4, relu5]


def torch_vgg16_taps(x, state):
    """torchvision vgg16().features taps relu1_2 ... relu5_3: 3x3 pad-1 conv + relu, maxpool 2/2 between
    stages; x NCHW."""
    taps, h = [], x
    for stage, (indices, _) in enumerate(VGG_STAGES):
        if stage:
            h = F.max_pool2d(h, 2, 2)
        for index in indices:
            weight, bias = state[f"features.{index}.weight"], state[f"features.{index}.bias"]
            h = F.relu(F.conv2d(h, weight.to(h.dtype), bias.to(h.dtype), padding=1))
        taps.append(h)
    return taps


def torch_lpips(x, y, net, trunk_state, head_state):
    """The LPIPS v0.1 formula in float64 torch: x, y NHWC numpy in [-1, 1] -> [N]."""
    shift = torch.tensor([-0.030, -0.088, -0.188], dtype=torch.float64).view(1, 3, 1, 1)
    scale = torch.tensor([0.458, 0.448, 0.450], dtype=torch.float64).view(1, 3, 1, 1)
    taps_fn = torch_alexnet_taps if net == "alex" else torch_vgg16_taps

    def taps(images):
        images = torch.from_numpy(np.asarray(images, np.float64)).permute(0, 3, 1, 2)
        return taps_fn((images - shift) / scale, trunk_state)

    total = 0
    for k, (tap_x, tap_y) in enumerate(zip(taps(x), taps(y))):
        unit_x = tap_x / (torch.sqrt(torch.sum(tap_x ** 2, dim=1, keepdim=True)) + 1e-10)
        unit_y = tap_y / (torch.sqrt(torch.sum(tap_y ** 2, dim=1, keepdim=True)) + 1e-10)
        head = head_state[f"lin{k}.model.1.weight"].to(torch.float64)
        total = total + F.conv2d((unit_x - unit_y) ** 2, head).mean(dim=(1, 2, 3))
    return total.numpy()


def image_pair(n, h, w, seed):
    """Smooth images in [-1, 1] and a perturbed copy."""
    rng = np.random.default_rng(seed)
    rows, cols = np.meshgrid(np.linspace(0, 1, h), np.linspace(0, 1, w), indexing="ij")
    x = np.stack([np.sin(2 * np.pi * (rng.uniform(1, 4) * rows + rng.uniform(1, 4) * cols) + rng.uniform(0, 6))
                  for _ in range(n * 3)]).reshape(n, 3, h, w).transpose(0, 2, 3, 1)
    x = np.clip(0.8 * x + rng.normal(0, 0.1, x.shape), -1, 1)
    y = np.clip(x + rng.normal(0, 0.3, x.shape), -1, 1)
    return x.astype(np.float32), y.astype(np.float32)


def assert_taps_close(ours, reference):
    assert len(ours) == len(reference) == 5
    for tap, expected in zip(ours, reference):
        expected = np.asarray(expected)
        assert tap.shape == expected.shape
        assert expected.std() > 1e-2, "random trunk should keep activations alive"
        np.testing.assert_allclose(np.asarray(tap), expected, rtol=1e-4, atol=1e-4 * np.abs(expected).max())


def test_alexnet_taps_match_torch(weights):
    directory, trunk, _ = weights["alex"]
    params = load_lpips_params("alex", directory)["net"]
    x, _ = image_pair(2, 80, 64, 0)
    ours = jax.jit(AlexNetFeatures().apply)({"params": params}, x)
    with torch.no_grad():
        reference = torch_alexnet_taps(torch.from_numpy(x).permute(0, 3, 1, 2).double(), trunk)
    assert_taps_close(ours, [tap.permute(0, 2, 3, 1).numpy() for tap in reference])


def test_vgg16_taps_match_keras(weights):
    """tf.keras.applications.VGG16 (weights=None) with the same weights set layer by layer."""
    import keras

    _, trunk, _ = weights["vgg"]
    x, _ = image_pair(2, 48, 64, 1)
    keras.utils.clear_session()
    model = keras.applications.VGG16(weights=None, include_top=False, input_shape=x.shape[1:])
    for stage, (indices, _) in enumerate(VGG_STAGES, start=1):
        for conv, index in enumerate(indices, start=1):
            kernel = trunk[f"features.{index}.weight"].numpy().transpose(2, 3, 1, 0)
            model.get_layer(f"block{stage}_conv{conv}").set_weights([kernel, trunk[f"features.{index}.bias"].numpy()])
    tap_names = [f"block{stage}_conv{len(indices)}" for stage, (indices, _) in enumerate(VGG_STAGES, start=1)]
    taps_model = keras.Model(model.input, [model.get_layer(name).output for name in tap_names])
    reference = [np.asarray(tap) for tap in taps_model(x)]
    params = load_lpips_params("vgg", weights["vgg"][0])["net"]
    assert_taps_close(jax.jit(VGG16Features().apply)({"params": params}, x), reference)


@pytest.mark.parametrize("net, size", [("alex", (64, 64)), ("alex", (96, 80)), ("vgg", (64, 48))])
def test_lpips_matches_torch_reference(weights, net, size):
    directory, trunk, heads = weights[net]
    x, y = image_pair(3, *size, seed=2)
    ours = load_lpips(net, weights_dir=directory)(x, y)
    with torch.no_grad():
        expected = torch_lpips(x, y, net, trunk, heads)
    assert ours.dtype == np.float64 and ours.shape == (3,)
    assert expected.min() > 0.05
    np.testing.assert_allclose(ours, expected, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("net", ["alex", "vgg"])
def test_real_v01_heads_from_the_lpips_wheel(weights, tmp_path, net):
    """The heads shipped in the lpips 0.1.4 wheel (legacy pickles saved from CUDA tensors) load, and give the
    reference distance on the random trunk."""
    spec = importlib.util.find_spec("lpips")
    if spec is None:
        pytest.skip("the lpips wheel is not installed (pip install --no-deps lpips==0.1.4)")
    wheel_file = os.path.join(os.path.dirname(spec.origin), "weights", "v0.1", HEAD_FILES[net])
    directory, trunk, _ = weights[net]
    shutil.copy(os.path.join(directory, TRUNK_FILES[net]), tmp_path)
    shutil.copy(wheel_file, tmp_path)
    heads = torch.load(wheel_file, map_location="cpu", weights_only=True)
    x, y = image_pair(2, 64, 48, seed=5)
    with torch.no_grad():
        expected = torch_lpips(x, y, net, trunk, heads)
    np.testing.assert_allclose(load_lpips(net, weights_dir=str(tmp_path))(x, y), expected, rtol=1e-4, atol=1e-6)


def test_lpips_identical_images_and_symmetry(weights):
    distance = load_lpips("alex", weights_dir=weights["alex"][0])
    x, y = image_pair(2, 64, 64, seed=3)
    # zero up to XLA's fusion-dependent float32 rounding (measured ~1e-17; distances here are ~0.1-1)
    np.testing.assert_allclose(distance(x, x), 0.0, rtol=0, atol=1e-12)
    np.testing.assert_allclose(distance(x, y), distance(y, x), rtol=1e-6)


def damaged_copy(directory, tmp_path, net, trunk_edit=None, head_edit=None):
    """The weights of `net` rewritten into tmp_path with one state dict edited."""
    trunk = torch.load(os.path.join(directory, TRUNK_FILES[net]), weights_only=True)
    heads = torch.load(os.path.join(directory, HEAD_FILES[net]), weights_only=True)
    (trunk_edit or (lambda state: None))(trunk)
    (head_edit or (lambda state: None))(heads)
    save_weights(str(tmp_path), net, trunk, heads)
    return str(tmp_path)


@pytest.mark.parametrize("trunk_edit, head_edit, file, message", [
    (lambda s: s.pop("features.3.bias"), None, TRUNK_FILES["alex"], r"missing \(1\): features_3/bias"),
    (lambda s: s.update({"features.13.weight": torch.zeros(4, 4, 3, 3)}), None, TRUNK_FILES["alex"],
     r"unexpected \(1\): features_13/kernel"),
    (None, lambda s: s.update({"lin2.model.1.weight": torch.zeros(1, 100, 1, 1)}), HEAD_FILES["alex"],
     r"wrong shape \(1\): lin2/model_1/kernel: \(1, 1, 100, 1\) \(expected \(1, 1, 384, 1\)\)"),
    (None, lambda s: s.update({"scaling_layer.shift": torch.zeros(1, 3, 1, 1)}), HEAD_FILES["alex"],
     r"unexpected \(1\): scaling_layer/shift"),
])
def test_strict_keys_name_file_and_key(weights, tmp_path, trunk_edit, head_edit, file, message):
    directory = damaged_copy(weights["alex"][0], tmp_path, "alex", trunk_edit, head_edit)
    with pytest.raises(UserError, match=message) as error:
        load_lpips("alex", weights_dir=directory)
    assert os.path.join(directory, file) in str(error.value)


def test_missing_weight_file_says_where_to_get_it(tmp_path):
    with pytest.raises(UserError, match="alexnet-owt-7be5be79.pth") as error:
        load_lpips("alex", weights_dir=str(tmp_path))
    for hint in ("https://download.pytorch.org/models/alexnet-owt-7be5be79.pth", "--weights_dir",
                 "PGPIS_METRIC_WEIGHTS"):
        assert hint in str(error.value)


def test_bad_arguments(weights):
    with pytest.raises(ValueError, match="net='squeeze'"):
        load_lpips("squeeze", weights_dir=weights["alex"][0])
    distance = load_lpips("alex", weights_dir=weights["alex"][0])
    x, y = image_pair(1, 64, 64, seed=4)
    with pytest.raises(ValueError, match=r"\[N, H, W, 3\]"):
        distance(x, y[:, :, :60])
