"""FID and Inception Score: the FID Inception-v3 against pytorch-fid, the metrics against pytorch-fid's
``calculate_frechet_distance`` and torchmetrics' ``InceptionScore``, statistics files, image folders, errors.

No weights are downloaded: the reference network is built without them and every weight is re-randomised.
"""
import os

import numpy as np
import pytest
from mindspore import Tensor, nn
from PIL import Image

from pangu_draw_ms.evaluation.fid import (
    FeatureStatistics,
    fid_from_images,
    frechet_distance,
    image_files,
    inception_outputs,
    save_statistics,
    statistics_of,
)
from pangu_draw_ms.evaluation.inception import NUM_FEATURES, NUM_LOGITS, FIDInceptionV3, to_inception_input
from pangu_draw_ms.evaluation.inception_score import inception_score, inception_score_from_logits
from pangu_draw_ms.io.checkpoint import save_checkpoint
from pangu_draw_ms.io.inception import FID_WEIGHTS, fid_inception_from_torch, load_fid_inception
from pangu_draw_ms.io.state import StateDictError, cell_state, load_state

from helpers import assert_close, randomize_torch_module


def _import_torchvision():
    """torchvision (made importable beside the CPU torch by conftest); skips the test where it is not installed."""
    return pytest.importorskip("torchvision")


def _pytorch_fid(module: str):
    _import_torchvision()
    return pytest.importorskip(f"pytorch_fid.{module}")


# ---- the network -------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference():
    """pytorch-fid's ``InceptionV3([3], resize_input=True, normalize_input=True)`` with random weights, its
    state dict (pytorch-fid's FIDInceptionV3 names) and its outputs on two 64x80 images.

    pytorch-fid builds its network in ``fid_inception_v3()`` and loads the FID weights there from the
    internet; the loader is replaced by one that hands it the state dict of a torchvision Inception-v3
    with 1008 classes and no auxiliary head - the same entries as the FID network's (the FID blocks add
    none), which its strict ``load_state_dict`` checks. Every weight is randomised, then scaled so that
    activations stay of order one through the 94 layers: convolutions by sqrt(2) (ReLU halves the second
    moment), BatchNorm scales and running variances around 1.
    """
    torch = pytest.importorskip("torch")
    torchvision = _import_torchvision()
    pytorch_fid_inception = _pytorch_fid("inception")
    import torch.nn.functional as F

    # 8-bit pixel values, so that the same images given as uint8 arrays are the same input
    pixels = np.random.default_rng(0).integers(0, 256, (2, 3, 64, 80)).astype(np.float32)
    images = torch.from_numpy(pixels / 255)
    template = torchvision.models.inception_v3(num_classes=NUM_LOGITS, aux_logits=False, weights=None,
                                               init_weights=False)
    randomize_torch_module(template, seed=3)
    with torch.no_grad():  # randomize_torch_module drew 0.1 N(0, 1) for every BatchNorm entry ("bn" is no "norm")
        for module in template.modules():
            if isinstance(module, torch.nn.Conv2d):
                module.weight.mul_(np.sqrt(2.0))
            elif isinstance(module, torch.nn.BatchNorm2d):
                module.weight.add_(1.0)
                module.running_var.abs_().add_(1.0)
    state = {name: value.detach().clone() for name, value in template.state_dict().items()}

    original_loader = pytorch_fid_inception.load_state_dict_from_url
    pytorch_fid_inception.load_state_dict_from_url = lambda url, **kwargs: state
    try:
        network = pytorch_fid_inception.InceptionV3([3], resize_input=True, normalize_input=True).eval()
    finally:
        pytorch_fid_inception.load_state_dict_from_url = original_loader
    with torch.no_grad():
        features = network(images)[0].flatten(1)
        logits_unbiased = features @ state["fc.weight"].T
        logits = F.linear(features, state["fc.weight"], state["fc.bias"])
    return {"images": images.numpy(), "torch_state": state,
            "state": {name: value.numpy() for name, value in state.items()},
            "outputs": (features.numpy(), logits.numpy(), logits_unbiased.numpy())}


@pytest.fixture(scope="module")
def inception(reference):
    cell = FIDInceptionV3()
    load_state(cell, fid_inception_from_torch(reference["state"]))
    return cell


def test_inception_matches_pytorch_fid(reference, inception, ms_mode):
    """Pool features, logits and unbiased logits of two 64x80 images (resized to 299x299 inside) equal
    pytorch-fid's network with the same weights."""
    outputs = inception(Tensor(reference["images"]))
    features, logits, logits_unbiased = (output.asnumpy() for output in outputs)
    assert features.shape == (2, NUM_FEATURES) and logits.shape == logits_unbiased.shape == (2, NUM_LOGITS)
    expected_features, expected_logits, expected_unbiased = reference["outputs"]
    assert np.abs(expected_features).max() > 0.1  # the random network is not dead
    assert_close(features, expected_features, rel=1e-4, what=f"pool features ({ms_mode})")
    assert_close(logits, expected_logits, rel=1e-4, what=f"logits ({ms_mode})")
    assert_close(logits_unbiased, expected_unbiased, rel=1e-4, what=f"unbiased logits ({ms_mode})")


class _InceptionInput(nn.Cell):
    def construct(self, images):
        return to_inception_input(images)


@pytest.mark.parametrize("size", [(64, 80), (320, 400), (299, 299)])
def test_resize_matches_torch_bilinear(size, ms_mode):
    """Up- and down-sizing to 299x299 (and 299 itself) is torch's bilinear, align_corners=False, without
    antialiasing, then [0, 1] -> [-1, 1]: pytorch-fid's input. Both compute the source coordinate
    (i + 0.5) * in / out - 0.5 in float32 and round it differently: the interpolation weights differ by up
    to index x 2^-24 (3e-5 at 400 pixels), far below one 8-bit step (4e-3)."""
    torch = pytest.importorskip("torch")
    import torch.nn.functional as F

    images = np.random.default_rng(1).random((2, 3) + size, dtype=np.float32)
    expected = 2 * F.interpolate(torch.from_numpy(images), size=(299, 299), mode="bilinear",
                                 align_corners=False).numpy() - 1
    np.testing.assert_allclose(_InceptionInput()(Tensor(images)).asnumpy(), expected, atol=1e-4)


def test_loads_pth_and_safetensors_in_either_naming(reference, tmp_path):
    """The .pth (read by torch.load(weights_only=True)) and .safetensors under pytorch-fid's names or ours
    load the same parameters; num_batches_tracked is dropped."""
    torch = pytest.importorskip("torch")
    state = reference["state"]
    expected = fid_inception_from_torch(state)
    assert len(expected) == 472 and not any("num_batches_tracked" in name for name in expected)
    assert expected["Mixed_7c.branch_pool.bn.moving_variance"] is state["Mixed_7c.branch_pool.bn.running_var"]
    torch.save(reference["torch_state"], tmp_path / "pt_inception-2015-12-05-6726825d.pth")
    save_checkpoint(state, str(tmp_path / "torch_names.safetensors"))
    save_checkpoint(expected, str(tmp_path / "our_names.safetensors"))
    from pangu_draw_ms.cli import convert

    # tools/convert.py inception: the .pth into a .safetensors that loads without torch
    assert convert.main(["inception", str(tmp_path / "pt_inception-2015-12-05-6726825d.pth"),
                         "--out", str(tmp_path / "converted")]) == 0
    for name in ("pt_inception-2015-12-05-6726825d.pth", "torch_names.safetensors", "our_names.safetensors",
                 "converted/fid_inception.safetensors"):
        loaded = cell_state(load_fid_inception(str(tmp_path / name)))
        assert loaded.keys() == expected.keys()
        for key, value in expected.items():
            np.testing.assert_array_equal(loaded[key], value, err_msg=f"{name}: {key}")


def test_wrong_network_is_refused(tmp_path):
    """torchvision's ImageNet Inception-v3 (aux head, 1000 classes) and an unrelated network are refused
    with errors that say what is wrong and that the FID weights are expected."""
    torch = pytest.importorskip("torch")
    torchvision = _import_torchvision()
    imagenet = torchvision.models.inception_v3(weights=None, aux_logits=True, init_weights=False)
    state = {name: value.numpy() for name, value in imagenet.state_dict().items()}
    with pytest.raises(StateDictError, match=FID_WEIGHTS) as error:
        fid_inception_from_torch(state)
    assert "unexpected key(s): AuxLogits." in str(error.value)
    assert "fc.weight expected (1008, 2048) got (1000, 2048)" in str(error.value)

    unrelated = {name: value.numpy() for name, value in torch.nn.Linear(4, 2).state_dict().items()}
    with pytest.raises(StateDictError, match=r"2 unexpected key\(s\): bias, weight; 472 missing key\(s\): "):
        fid_inception_from_torch(unrelated)
    save_checkpoint(unrelated, str(tmp_path / "linear.safetensors"))
    with pytest.raises(StateDictError, match="not the FID Inception-v3"):
        load_fid_inception(str(tmp_path / "linear.safetensors"))
    from pangu_draw_ms.cli import convert

    assert convert.main(["inception", str(tmp_path / "linear.safetensors"), "--out", str(tmp_path / "out")]) == 2
    assert not (tmp_path / "out" / "fid_inception.safetensors").exists()


# ---- FID ---------------------------------------------------------------------------------------------

# pytorch-fid 0.3.0 calls scipy's sqrtm with the deprecated disp=False
_PYTORCH_FID_SCIPY = pytest.mark.filterwarnings("ignore:The `disp` argument is deprecated:DeprecationWarning")


def _features(rng, count, dim=64, shift=0.0):
    mixing = rng.standard_normal((dim, dim)) / np.sqrt(dim)
    return rng.standard_normal((count, dim)) @ mixing + shift


@_PYTORCH_FID_SCIPY
def test_frechet_distance_matches_pytorch_fid(rng):
    fid_score = _pytorch_fid("fid_score")
    cases = {
        "full-rank covariances": (_features(rng, 400), _features(rng, 300, shift=0.3)),
        "singular covariances (fewer images than dimensions)": (_features(rng, 12), _features(rng, 20, shift=0.1)),
    }
    for what, (first, second) in cases.items():
        a, b = FeatureStatistics.from_features(first), FeatureStatistics.from_features(second)
        # pytorch-fid: mu = np.mean(act, axis=0), sigma = np.cov(act, rowvar=False)
        np.testing.assert_array_equal(a.mu, np.mean(first, axis=0))
        np.testing.assert_array_equal(a.sigma, np.cov(first, rowvar=False))
        ours = frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
        theirs = fid_score.calculate_frechet_distance(a.mu, a.sigma, b.mu, b.sigma)
        print(f"{what}: ours {ours!r}, pytorch-fid {theirs!r}")
        assert abs(ours - theirs) <= 1e-10 * max(1.0, abs(theirs)), what
    same = FeatureStatistics.from_features(cases["full-rank covariances"][0])
    assert abs(frechet_distance(same.mu, same.sigma, same.mu, same.sigma)) < 1e-8


@_PYTORCH_FID_SCIPY
@pytest.mark.filterwarnings("ignore:Matrix is singular", "ignore:invalid value encountered:RuntimeWarning")
def test_frechet_distance_eps_offset_matches_pytorch_fid(caplog):
    """A product without a finite square root (a nilpotent Jordan block) takes the eps-offset branch."""
    fid_score = _pytorch_fid("fid_score")
    sigma1, sigma2 = np.array([[0.0, 1.0], [0.0, 0.0]]), np.eye(2)
    mu1, mu2 = np.array([0.5, -1.0]), np.zeros(2)
    ours = frechet_distance(mu1, sigma1, mu2, sigma2)
    assert "singular" in caplog.text
    assert abs(ours - fid_score.calculate_frechet_distance(mu1, sigma1, mu2, sigma2)) <= 1e-10


def test_frechet_distance_errors():
    with pytest.raises(ValueError, match="imaginary component"):
        frechet_distance(np.zeros(2), np.eye(2), np.zeros(2), np.diag([-1.0, 1.0]))
    with pytest.raises(ValueError, match=r"different shapes: mu \(64,\) vs \(32,\)"):
        frechet_distance(np.zeros(64), np.eye(64), np.zeros(32), np.eye(32))
    with pytest.raises(ValueError, match="FID needs at least 2 images, got 1"):
        FeatureStatistics.from_features(np.ones((1, 8)))
    with pytest.raises(ValueError, match=r"mu of shape \(D,\) and sigma of shape \(D, D\)"):
        FeatureStatistics(np.zeros(3), np.eye(2))


def test_statistics_npz_round_trip_and_pytorch_fid_format(rng, tmp_path):
    fid_score = _pytorch_fid("fid_score")
    stats = FeatureStatistics.from_features(_features(rng, 30))
    stats.save(tmp_path / "ours.npz")
    loaded = FeatureStatistics.load(tmp_path / "ours.npz")
    np.testing.assert_array_equal(loaded.mu, stats.mu)
    np.testing.assert_array_equal(loaded.sigma, stats.sigma)
    assert loaded.count == 30
    # pytorch-fid reads our file ...
    mu, sigma = fid_score.compute_statistics_of_path(str(tmp_path / "ours.npz"), None, 50, 2048, "cpu")
    np.testing.assert_array_equal(mu, stats.mu)
    np.testing.assert_array_equal(sigma, stats.sigma)
    # ... and we read pytorch-fid's (``--save-stats`` writes np.savez_compressed(path, mu=, sigma=))
    np.savez_compressed(tmp_path / "theirs.npz", mu=stats.mu.astype(np.float32), sigma=stats.sigma)
    theirs = statistics_of(str(tmp_path / "theirs.npz"))
    assert theirs.count is None and theirs.mu.dtype == np.float64
    np.testing.assert_allclose(theirs.mu, stats.mu, rtol=1e-6)

    np.savez(tmp_path / "wrong.npz", mean=stats.mu)
    with pytest.raises(ValueError, match=r"not an FID statistics file: it lacks mu, sigma \(has: mean\)"):
        FeatureStatistics.load(tmp_path / "wrong.npz")
    np.savez(tmp_path / "bad_shape.npz", mu=stats.mu, sigma=stats.sigma[:3])
    with pytest.raises(ValueError, match=r"bad_shape\.npz.*sigma of shape \(D, D\)"):
        FeatureStatistics.load(tmp_path / "bad_shape.npz")
    with pytest.raises(FileNotFoundError, match="missing.npz' does not exist"):
        FeatureStatistics.load(tmp_path / "missing.npz")


def _mean_colour_inception(batch):
    """A stand-in for the Inception cell: each image's mean colour as its 'features' and 'logits'."""
    features = Tensor(batch.asnumpy().mean(axis=(2, 3)))
    return features, features, features


def _write_image(path, colour, size=(12, 10)):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.new("RGB", size, colour).save(path)


def test_image_folder_statistics_and_fid(tmp_path):
    """Folders are read recursively in sorted order, other files skipped, images of several sizes batched
    apart; a folder, the same images as a list, as an array and as saved statistics give the same FID."""
    colours = {"b/2.png": (200, 10, 10), "a/nested/1.jpg": (10, 200, 10), "a/0.webp": (10, 10, 200),
               "c.bmp": (90, 90, 90), "d.jpeg": (30, 60, 90)}
    for name, colour in colours.items():
        _write_image(str(tmp_path / "set" / name), colour, size=(12, 10) if name != "c.bmp" else (20, 16))
    (tmp_path / "set" / "notes.txt").write_text("not an image, skipped")
    files = image_files(tmp_path / "set")
    assert [os.path.relpath(f, tmp_path / "set") for f in files] == sorted(colours)

    features, _ = inception_outputs(str(tmp_path / "set"), _mean_colour_inception, batch_size=2)
    decoded = np.stack([np.asarray(Image.open(f).convert("RGB"), np.float32).mean(axis=(0, 1)) / 255 for f in files])
    np.testing.assert_allclose(features, decoded, atol=1e-6)

    reference = np.random.default_rng(0).random((6, 3, 8, 8), dtype=np.float32)
    from_folder = fid_from_images(str(tmp_path / "set"), reference, _mean_colour_inception, batch_size=4)
    from_list = fid_from_images([Image.open(f) for f in files], reference, _mean_colour_inception)
    save_statistics(reference, tmp_path / "reference.npz", _mean_colour_inception, batch_size=5)
    from_stats = fid_from_images(files, str(tmp_path / "reference.npz"), _mean_colour_inception)
    expected = FeatureStatistics.from_features(decoded), FeatureStatistics.from_features(reference.mean(axis=(2, 3)))
    direct = frechet_distance(expected[0].mu, expected[0].sigma, expected[1].mu, expected[1].sigma)
    for value in (from_folder, from_list, from_stats):
        assert abs(value - direct) < 1e-6  # the stand-in's float32 means, summed in another order


def test_image_errors(tmp_path):
    _write_image(str(tmp_path / "one" / "only.png"), (1, 2, 3))
    with pytest.raises(ValueError, match="FID needs at least 2 images, got 1"):
        fid_from_images(str(tmp_path / "one"), np.zeros((4, 3, 8, 8), np.float32), _mean_colour_inception)
    _write_image(str(tmp_path / "broken" / "good.png"), (1, 2, 3))
    (tmp_path / "broken" / "fake.png").write_bytes(b"this is text, not a PNG")
    with pytest.raises(ValueError, match=r"fake\.png is not a readable image"):
        statistics_of(str(tmp_path / "broken"), _mean_colour_inception)
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "readme.txt").write_text("no images here")
    with pytest.raises(ValueError, match=r"no images \(\.png, \.jpg, \.jpeg, \.webp, \.bmp\) under"):
        image_files(tmp_path / "empty")
    with pytest.raises(NotADirectoryError, match="does not exist or is not a folder"):
        image_files(tmp_path / "nowhere")
    with pytest.raises(ValueError, match=r"must lie in \[0, 1\]; got \[-1, 1\]"):
        statistics_of(np.linspace(-1, 1, 2 * 3 * 8 * 8, dtype=np.float32).reshape(2, 3, 8, 8),
                      _mean_colour_inception)
    with pytest.raises(ValueError, match="need the Inception network"):
        statistics_of(np.zeros((2, 3, 8, 8), np.float32))


def test_inception_outputs_pads_the_last_batch(reference, inception):
    """Three images given as uint8 (H, W, 3) arrays go through the cell in batches of 2, the last one
    padded, and give the outputs of a direct call on the same pixels (the same graph: no recompile)."""
    pixels = np.round(reference["images"] * 255).astype(np.uint8).transpose(0, 2, 3, 1)
    features, logits = inception_outputs([pixels[0], pixels[1], pixels[0]], inception, batch_size=2)
    direct_features, _, direct_logits = (output.asnumpy() for output in inception(Tensor(reference["images"])))
    np.testing.assert_allclose(features, direct_features[[0, 1, 0]], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(logits, direct_logits[[0, 1, 0]], rtol=1e-6, atol=1e-6)


# ---- Inception Score -------------------------------------------------------------------------------------

@pytest.mark.filterwarnings("ignore:Metric `InceptionScore` will save all extracted features")
def test_inception_score_matches_torchmetrics(rng):
    """The same logits, cut into the same splits: torchmetrics' mean, and its sample standard deviation
    = ours (population) x sqrt(splits / (splits - 1)). torchmetrics shuffles with torch.randperm first:
    the permutation is reproduced from the same torch seed and applied to our input."""
    torch = pytest.importorskip("torch")
    _import_torchvision()
    image_metrics = pytest.importorskip("torchmetrics.image.inception")
    logits = rng.standard_normal((50, NUM_LOGITS)) * 3.0
    metric = image_metrics.InceptionScore(feature=torch.nn.Identity(), splits=10)
    metric.update(torch.from_numpy(logits))
    torch.manual_seed(7)
    their_mean, their_std = (float(v) for v in metric.compute())
    torch.manual_seed(7)
    order = torch.randperm(logits.shape[0]).numpy()
    ours = inception_score_from_logits(logits[order], splits=10)
    print(f"IS ours {ours}, torchmetrics ({their_mean}, {their_std})")
    assert abs(ours.mean - their_mean) <= 1e-12 * their_mean
    assert abs(ours.std * np.sqrt(10 / 9) - their_std) <= 1e-9 * their_std


def test_inception_score_known_values():
    """Confident predictions of k distinct classes per split score k; one class everywhere scores 1."""
    one_hot = 40.0 * np.eye(NUM_LOGITS)[np.arange(100)]
    score = inception_score_from_logits(one_hot, splits=10)
    assert abs(score.mean - 10.0) < 1e-6 and score.std < 1e-9
    assert abs(inception_score_from_logits(np.tile(one_hot[:1], (20, 1)), splits=10).mean - 1.0) < 1e-9
    uneven = inception_score_from_logits(one_hot[:25], splits=10)  # splits of 2 or 3 images: i N // splits
    assert abs(uneven.mean - np.mean([2, 3, 2, 3, 2, 3, 2, 3, 2, 3])) < 1e-6


def test_inception_score_errors():
    with pytest.raises(ValueError, match="with 10 splits needs at least 10 images, got 9"):
        inception_score_from_logits(np.zeros((9, NUM_LOGITS)))
    with pytest.raises(ValueError, match=r"logits must be \(N, classes\)"):
        inception_score_from_logits(np.zeros(NUM_LOGITS))
    with pytest.raises(ValueError, match="with 3 splits needs at least 3 images, got 2"):
        inception_score(np.zeros((2, 3, 8, 8), np.float32), _mean_colour_inception, splits=3)

