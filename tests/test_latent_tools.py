"""Latent tools (models/latent_map.py, tasks/judging/latent_maps.py, latent_studies.py) and the added evaluation
metrics, on synthetic latents and tiny untrained models: seconds on CPU."""
import numpy as np
import pytest
import torch

from condgen.models import latent_map as lm

TINY_GAN = {"channels": (8, 16), "latent_dim": 6, "cond_dim": 4}


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny tensors: a second intra-op thread only adds synchronisation (and on a loaded
    machine makes each step many times slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
TINY_CVAE = {"channels": (8, 16), "latent_dim": 4, "cond_dim": 4}


def _synthetic(n=200, d_a=6, d_b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    z_a = torch.randn(n, d_a, generator=g)
    w = torch.randn(d_a, d_b, generator=g)
    return z_a, w, z_a @ w


# -- linear maps --------------------------------------------------------------------------------
def test_least_squares_recovers_a_known_map_exactly():
    z_a, w, z_b = _synthetic()
    w_hat = lm.fit_linear_map(z_a, z_b, ridge=0.0)
    assert w_hat.shape == w.shape
    torch.testing.assert_close(w_hat, w, atol=1e-5, rtol=1e-5)
    # no bias: a map fitted on data with an offset must not absorb it (bias-free by design)
    torch.testing.assert_close(lm.apply_map(z_a, w_hat), z_b, atol=1e-4, rtol=1e-4)


def test_ridge_shrinks_and_underdetermined_fit_is_defined():
    z_a, w, z_b = _synthetic(n=3)  # fewer points than dimensions
    w0 = lm.fit_linear_map(z_a, z_b, ridge=0.0)
    torch.testing.assert_close(z_a @ w0, z_b, atol=1e-4, rtol=1e-4)  # interpolates the support set
    w1 = lm.fit_linear_map(z_a, z_b, ridge=10.0)
    assert w1.norm() < w0.norm()


def test_gradient_variant_is_close_to_the_closed_form():
    z_a, w, z_b = _synthetic()
    w_gd = lm.fit_linear_map_gd(z_a, z_b, steps=600, lr=5e-2, weight_decay=1e-6,
                                generator=torch.Generator().manual_seed(0))
    assert (w_gd - w).abs().max() < 2e-2


# -- interpolation -------------------------------------------------------------------------------
@pytest.mark.parametrize("fn", [lm.lerp, lm.slerp])
def test_interpolation_endpoints_equal_the_inputs(fn):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(8, generator=g), 3 * torch.randn(8, generator=g)
    torch.testing.assert_close(fn(a, b, 0.0), a)
    torch.testing.assert_close(fn(a, b, 1.0), b)
    path = fn(a, b, torch.linspace(0, 1, 5))
    assert path.shape == (5, 8)
    torch.testing.assert_close(path[0], a)
    torch.testing.assert_close(path[-1], b, atol=1e-5, rtol=1e-5)


def test_slerp_keeps_the_norm_of_equal_norm_endpoints():
    a = torch.tensor([1.0, 0.0, 0.0])
    b = torch.tensor([0.0, 1.0, 0.0])
    mid = lm.slerp(a, b, 0.5)
    assert abs(float(mid.norm()) - 1.0) < 1e-6  # lerp would give 0.707
    torch.testing.assert_close(lm.slerp(a, a, 0.3), a)  # parallel: falls back to lerp


# -- attribute directions --------------------------------------------------------------------------
def test_attribute_directions_recover_the_generating_normals():
    g = torch.Generator().manual_seed(2)
    z = torch.randn(2000, 5, generator=g)
    normals = torch.tensor([[1.0, 0.5, 0, 0, 0], [0.8, 0, 1.0, 0, 0]])
    attrs = z @ normals.T + 0.01 * torch.randn(2000, 2, generator=g)
    d = lm.attribute_directions(z, attrs)
    cos = torch.nn.functional.cosine_similarity(d, normals, dim=-1)
    assert (cos > 0.99).all()


@pytest.mark.parametrize("method", ["projection", "gram_schmidt"])
def test_orthogonalised_direction_has_zero_dot_with_the_others(method):
    g = torch.Generator().manual_seed(3)
    dirs = torch.randn(3, 8, generator=g) + 2.0  # strongly correlated directions
    assert abs(float(dirs[0] @ dirs[1])) > 1
    ortho = lm.orthogonalize(dirs, method=method)
    for i in range(3):
        others = ortho if method == "gram_schmidt" else dirs  # projection: orthogonal to the other normals
        for j in range(3):
            if i != j:
                assert abs(float(ortho[i] @ others[j])) < 1e-5
        assert float(ortho[i] @ dirs[i]) > 0  # still points the same way
    cal = lm.calibrate(ortho, dirs)
    torch.testing.assert_close((cal * dirs).sum(-1), torch.ones(3))


def test_edit_moves_along_the_direction():
    z = torch.zeros(2, 4)
    d = torch.tensor([1.0, 0, 0, 0])
    assert torch.equal(lm.edit(z, d, 2.0)[:, 0], torch.tensor([2.0, 2.0]))
    strip = lm.edit(torch.zeros(4), d, torch.tensor([-1.0, 0.0, 1.0]))
    assert strip.shape == (3, 4) and strip[:, 0].tolist() == [-1.0, 0.0, 1.0]


# -- GAN inversion ----------------------------------------------------------------------------------
def test_gan_inversion_lowers_reconstruction_error():
    from condgen.models.gan import CGAN, CGANConfig

    torch.manual_seed(0)
    gan = CGAN(CGANConfig(**TINY_GAN, image_size=16)).eval()  # 16 px: the same code, a third of the work
    for p in gan.parameters():
        p.requires_grad_(False)
    g = torch.Generator().manual_seed(0)
    c = torch.arange(4)
    with torch.no_grad():
        x = gan.generate(torch.randn(4, 6, generator=g), c)
    z0 = torch.randn(4, 6, generator=g)
    with torch.no_grad():
        before = (gan.generate(z0, c) - x).pow(2).flatten(1).mean(-1)
    z, after = lm.invert_generator(gan.generate, x, c, steps=40, lr=0.1, z_init=z0)
    assert z.shape == (4, 6)
    assert (after < before).all() and after.mean() < 0.5 * before.mean()
    # batched == one at a time (per-image losses; Adam is per coordinate)
    z_one, _ = lm.invert_generator(gan.generate, x[:1], c[:1], steps=40, lr=0.1, z_init=z0[:1])
    torch.testing.assert_close(z_one, z[:1], atol=1e-5, rtol=1e-4)


# -- the task layer: support sets, map persistence, CLIP optimisation ----------------------------------------
def _spaces():
    from condgen.models.cvae import CVAE, CVAEConfig
    from condgen.models.gan import CGAN, CGANConfig
    from condgen.tasks.judging.latent_maps import latent_space

    torch.manual_seed(0)
    return (latent_space(CVAE(CVAEConfig(**TINY_CVAE)), name="cvae"),
            latent_space(CGAN(CGANConfig(**TINY_GAN)), name="cgan"))


def test_compare_spaces_rows_and_map_round_trip(tmp_path):
    from condgen.tasks.judging.latent_maps import check_models, load_map, save_map, translate
    from condgen.tasks.judging.latent_studies import compare_spaces

    a, b = _spaces()
    g = torch.Generator().manual_seed(0)
    x = torch.rand(24, 1, 28, 28, generator=g) * 2 - 1
    y = torch.arange(24) % 10
    study = compare_spaces(a, b, x[:16], y[:16], x[16:], y[16:], None, sizes=(4, 16), mode="real",
                           inversion_steps=3, gd_steps=20)
    assert len(study.rows) == 2 * 2 * 2  # directions x sizes x methods
    for r in study.rows:
        for k in ("R", "L", "L_rel", "M", "M_random"):
            assert np.isfinite(r[k]) and r[k] >= 0
    m = study.maps["cvae-to-cgan/lstsq-n16"]
    assert m.W.shape == (4, 6) and m.source["fingerprint"] == a.fingerprint
    save_map(m, tmp_path / "map")
    back = load_map((tmp_path / "map").as_uri())
    torch.testing.assert_close(back.W, m.W)
    assert back.meta() == m.meta()
    z = torch.randn(3, 4)
    torch.testing.assert_close(translate(z, back), z @ m.W)
    check_models(back, a.model, b.model)
    with pytest.raises(ValueError, match="fitted on weights"):
        check_models(back, b.model, a.model)
    gen = compare_spaces(a, b, None, y[:16], None, y[16:], None, sizes=(16,), mode="generated", methods=("lstsq",),
                         both_directions=False)
    assert gen.rows[0]["R"] == 0.0  # the GAN side generated the images: its latents are exact


def test_clip_optimize_raises_the_score_with_a_tiny_image_encoder():
    from condgen.tasks.judging.latent_studies import clip_optimize

    a, _ = _spaces()
    torch.manual_seed(0)
    encoder = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(28 * 28, 8))
    text = torch.randn(8)
    z0 = torch.zeros(2, 4)
    z, history = clip_optimize(a.model, z0, torch.tensor([3, 7]), text, encoder, steps=15, lr=0.5)
    assert z.shape == (2, 4) and not torch.equal(z, z0)
    assert history[-1] > history[0]


def test_interpolation_strip_endpoints_decode_the_endpoints():
    from condgen.tasks.io.images import to_uint8
    from condgen.tasks.judging.latent_studies import interpolation_strip

    a, _ = _spaces()
    z0, z1 = torch.randn(4), torch.randn(4)
    for method in ("lerp", "slerp"):
        strip = interpolation_strip(a, z0, z1, 5, frames=4, method=method)
        assert strip.shape == (4, 28, 28)
        with torch.no_grad():
            ends = to_uint8(a.decode(torch.stack([z0, z1]), torch.tensor([5, 5])))
        assert np.array_equal(strip[0], ends[0]) and np.array_equal(strip[-1], ends[1])


# -- added evaluation metrics ------------------------------------------------------------------------------
def test_knn_precision_recall_and_diversity():
    from condgen.tasks.judging.evaluate import intra_class_diversity, precision_recall

    g = torch.Generator().manual_seed(0)
    real = torch.randn(300, 4, generator=g)
    same = precision_recall(real, real.clone(), k=3)
    assert same["precision"] == 1.0 and same["recall"] == 1.0 and same["coverage"] == 1.0
    far = precision_recall(real, real + 100.0, k=3)
    assert far["precision"] == 0.0 and far["recall"] == 0.0 and far["coverage"] == 0.0
    collapsed = precision_recall(real, real[:1].repeat(300, 1) + 1e-3 * torch.randn(300, 4, generator=g), k=3)
    assert collapsed["precision"] > 0.9 and collapsed["recall"] < 0.1  # mode collapse: faithful, not diverse
    labels = np.repeat([0, 1], 150)
    assert intra_class_diversity(real, labels) > 10 * intra_class_diversity(real * 0.01, labels)


def test_evaluate_model_reports_the_added_metrics():
    from condgen.models.classifier import ClassifierConfig, DigitClassifier
    from condgen.models.cvae import CVAE, CVAEConfig
    from condgen.tasks.judging.evaluate import Judge, evaluate_model

    torch.manual_seed(0)
    judge = Judge(DigitClassifier(ClassifierConfig(channels=(4, 8), feature_dim=16)).eval(), 0.0, "test")
    test = {"x": (np.random.default_rng(0).random((40, 28, 28)) * 255).astype(np.uint8), "y": np.arange(40) % 10}
    res = evaluate_model(CVAE(CVAEConfig(**TINY_CVAE)), judge, test, n_per_class=4)
    m = res.metrics()
    for key in ("eval/cond_accuracy", "eval/fid", "eval/precision", "eval/recall", "eval/coverage",
                "eval/density", "eval/diversity", "eval/diversity_real"):
        assert key in m and np.isfinite(m[key]), key
    assert "eval/clip_score" not in m  # no CLIP handle given


def test_gan_to_gan_maps_invert_the_other_side():
    """Both spaces GANs (cGAN <-> AC-GAN, other latent sizes): ``generated`` draws z from the
    source GAN and inverts the target one; ``real`` inverts both. Maps go both ways."""
    from condgen.models.gan import ACGAN, CGAN, ACGANConfig, CGANConfig
    from condgen.tasks.judging.latent_maps import latent_space
    from condgen.tasks.judging.latent_studies import compare_spaces

    torch.manual_seed(0)
    a = latent_space(CGAN(CGANConfig(**TINY_GAN)), name="cgan")
    b = latent_space(ACGAN(ACGANConfig(**{**TINY_GAN, "latent_dim": 5})), name="acgan")
    assert (a.kind, b.kind) == ("gan", "gan")
    y = torch.arange(20) % 10
    gen = compare_spaces(a, b, None, y[:12], None, y[12:], None, sizes=(12,), mode="generated",
                         methods=("lstsq",), inversion_steps=5)
    fwd = gen.maps["cgan-to-acgan/lstsq-n12"]
    assert fwd.W.shape == (6, 5) and gen.maps["acgan-to-cgan/lstsq-n12"].W.shape == (5, 6)
    for r in gen.rows:
        assert all(np.isfinite(r[k]) and r[k] >= 0 for k in ("R", "L", "L_rel", "M", "M_random"))
    x = torch.rand(20, 1, 28, 28, generator=torch.Generator().manual_seed(1)) * 2 - 1
    real = compare_spaces(a, b, x[:12], y[:12], x[12:], y[12:], None, sizes=(12,), mode="real",
                          methods=("lstsq",), inversion_steps=3, both_directions=False)
    (row,) = real.rows
    assert row["R"] > 0  # a real image is only approximately in the target GAN's range


def test_clip_optimize_with_an_open_clip_model():
    """The real path: an open_clip model (the 1-layer ViT test config, through ClipHandle's
    differentiable image tower and preprocessing) scores a CVAE's decoded image against a
    text embedding from the same handle; optimising z raises that score."""
    from condgen.tasks.clip.handle import new_clip
    from condgen.tasks.judging.latent_studies import clip_optimize

    a, _ = _spaces()
    handle = new_clip("condgen-clip-test", seed=0)
    text = handle.encode_texts(["a handwritten seven"])[0]
    z0 = torch.zeros(2, 4)
    z, history = clip_optimize(a.model, z0, torch.tensor([7, 7]), text, handle, steps=10, lr=0.5)
    assert z.shape == (2, 4) and not torch.equal(z, z0)
    assert history[-1] > history[0]
    assert all(p.grad is None for p in handle.model.parameters())  # only z is optimised
