"""Latent directions on bundled:shapes (tasks/judging/shapes_directions.py): the pixel measures,
the study on a latent space whose attributes are a known, entangled linear function of z (raw
directions leak, orthogonalised ones do not), and one tiny end-to-end run on a trained CVAE."""
from __future__ import annotations

import colorsys
import json

import numpy as np
import pytest
import torch

from condgen.tasks.data.shapes import COLOURS, ShapeSpec, coverage, render, sample_spec
from condgen.tasks.io.images import from_uint8
from condgen.tasks.judging import shapes_directions as sd
from condgen.tasks.judging.latent_maps import latent_space
from tests.tiny import build_tiny, opt_step_for

pytestmark = pytest.mark.usefixtures("one_torch_thread")  # tests/conftest.py


def _render_rgb(shape: str, cx: float, cy: float, side: float, rgb: tuple[float, float, float]) -> np.ndarray:
    cov = coverage(shape, cx, cy, side, 32)
    return np.rint(cov[:, :, None] * np.asarray(rgb) * 255).astype(np.uint8)


def test_wrap_and_palette_hues():
    assert sd.wrap_degrees(190.0) == pytest.approx(-170.0)
    assert sd.wrap_degrees(-180.0) == pytest.approx(180.0)
    assert sd.PALETTE_HUE["red"] == pytest.approx(0.0)
    assert sd.PALETTE_HUE["magenta"] == pytest.approx(300.0)
    assert sd.label_colour(0) == "red" and sd.label_colour(17) == "cyan"


def test_measures_recover_size_position_and_hue_of_rendered_shapes():
    for i in range(30):
        spec = sample_spec(i, seed=3)
        m = sd.measure_shape(render(spec), spec.colour)
        assert m["side"] == pytest.approx(spec.side, abs=0.02), spec
        assert m["cx"] == pytest.approx(spec.cx, abs=0.01), spec
        assert m["cy"] == pytest.approx(spec.cy, abs=0.015), spec
        assert abs(m["hue"]) < 1.5, spec  # the palette colour itself: offset 0 (rounding only)


@pytest.mark.parametrize("shift", [-25.0, -8.0, 12.0, 30.0])
def test_hue_offset_is_measured_across_the_seam(shift):
    h, s, v = colorsys.rgb_to_hsv(*(np.asarray(COLOURS["red"]) / 255))  # red's hue is 0: the wrap matters
    rgb = colorsys.hsv_to_rgb((h + shift / 360) % 1.0, s, v)
    m = sd.measure_shape(_render_rgb("square", 0.5, 0.5, 0.4, rgb), "red")
    assert m["hue"] == pytest.approx(shift, abs=1.5)
    assert np.isnan(sd.measure_shape(np.zeros((32, 32, 3), np.uint8), "red")["hue"])  # no object


class LinearShapeSpace:
    """A 'GAN' whose decode renders a red square with side, cx, cy and hue offset = a known
    linear function of z: rows of ``B`` are deliberately non-orthogonal (entangled)."""

    kind, name, latent_dim = "gan", "linear", 6

    def __init__(self, class_hue: dict[int, float] | None = None):
        self.class_hue = class_hue or {}  # a per-label hue bias (degrees) the label, not z, sets
        b = torch.zeros(4, 6, dtype=torch.float64)
        b[0, 0] = 1.0
        b[1, 0], b[1, 1] = 0.7, 0.7  # cx shares z0 with side
        b[2, 2], b[2, 1] = 1.0, -0.5  # cy shares z1 with cx
        b[3, 3], b[3, 0] = 1.0, 0.6  # hue shares z0 with side
        self.B = b

    def prior_sample(self, c, generator=None):
        return torch.randn(len(c), self.latent_dim, generator=generator)

    def attributes(self, z):
        a = (z.double() @ self.B.T).numpy()
        side = np.clip(0.36 + 0.04 * a[:, 0], 0.2, 0.5)
        cx = np.clip(0.5 + 0.05 * a[:, 1], side / 2 + 0.03, 1 - side / 2 - 0.03)
        cy = np.clip(0.5 + 0.05 * a[:, 2], side / 2 + 0.03, 1 - side / 2 - 0.03)
        return side, cx, cy, 6.0 * a[:, 3]

    def decode_all(self, z, c):
        h0, s0, v0 = colorsys.rgb_to_hsv(*(np.asarray(COLOURS["red"]) / 255))
        imgs = []
        for side, cx, cy, hue, k in zip(*self.attributes(z), c.tolist()):
            hue = hue + self.class_hue.get(k, 0.0)
            rgb = colorsys.hsv_to_rgb((h0 + hue / 360) % 1.0, s0, v0)
            imgs.append(_render_rgb("square", cx, cy, side, rgb))
        return from_uint8(np.stack(imgs))


def test_study_on_known_linear_latents_orthogonal_directions_do_not_leak():
    space = LinearShapeSpace()
    z, c = sd.study_latents(space, n=600, classes=[1], seed=0)  # class 1: red square
    st = sd.direction_study(space, z, c, n_edit=40, strengths=(-1.0, 0.0, 1.0), seed=0)
    assert st.n_regression == 600 and st.n_edited == 40
    for n in sd.CONTINUOUS:
        assert st.r2[n] > 0.95, st.r2
    idx = {n: i for i, n in enumerate(sd.CONTINUOUS)}
    raw, orth = np.asarray(st.leakage["raw"]), np.asarray(st.leakage["orthogonal"])
    # entangled: moving along side's raw normal moves cx and hue too
    assert abs(raw[idx["side"], idx["cx"]]) > 0.3 and abs(raw[idx["side"], idx["hue"]]) > 0.3
    off = orth[~np.eye(4, dtype=bool)]
    assert np.abs(off).max() < 0.12, orth
    for i, n in enumerate(sd.CONTINUOUS):
        assert st.slopes["orthogonal"][i][i] == pytest.approx(1.0, abs=0.2)  # calibrated: +1 std per unit
        assert st.monotonicity["orthogonal"][n] > 0.9
    summary = st.summary()
    assert summary["orthogonal/mean_abs_leakage"] < summary["raw/mean_abs_leakage"]
    assert summary["orthogonal/mean_abs_offdiag_slope"] < 0.1 < summary["raw/mean_abs_offdiag_slope"]
    assert summary["orthogonal/mean_asked_slope"] == pytest.approx(1.0, abs=0.2)
    # shape and colour class never change on these edits; the table renders every row
    for v in ("raw", "orthogonal"):
        for n in sd.CONTINUOUS:
            assert st.kept[v][n]["shape"] == 1.0 and st.kept[v][n]["colour"] == 1.0
    md = st.markdown()
    assert "| orthogonal | hue |" in md and "**raw**" in md
    assert st.strips["orthogonal/side"].ndim == 3
    assert st.to_json()["summary"]


def test_class_centred_and_the_within_class_fit():
    a = np.array([[1.0, 2.0], [3.0, 4.0], [10.0, 0.0]])
    np.testing.assert_allclose(sd.class_centred(a, torch.tensor([0, 0, 1])), [[-1, -1], [1, 1], [0, 0]])
    # red circle/square/triangle labels with hue biases of +-20 degrees: noise for a pooled fit on z
    space = LinearShapeSpace(class_hue={0: -20.0, 2: 20.0})
    z, c = sd.study_latents(space, n=300, classes=[0, 1, 2], seed=1)
    kw = {"names": ("side", "hue"), "n_edit": 10, "strengths": (-1.0, 0.0, 1.0)}
    assert sd.direction_study(space, z, c, **kw).r2["hue"] > 0.95
    assert sd.direction_study(space, z, c, within_class=False, **kw).r2["hue"] < 0.5


def test_direction_study_refuses_strengths_without_zero():
    space = LinearShapeSpace()
    z, c = sd.study_latents(space, n=20, classes=[1])
    with pytest.raises(ValueError, match="include 0"):
        sd.direction_study(space, z, c, strengths=(-1.0, 1.0))


def test_tiny_cvae_end_to_end():
    specs = [sample_spec(i, seed=1) for i in range(96)]
    x = from_uint8(np.stack([render(s) for s in specs]))
    y = torch.tensor([s.label for s in specs])
    model = build_tiny("cvae", in_channels=3, image_size=32, num_classes=18, latent_dim=4)
    step = opt_step_for(model)
    model.train()
    torch.manual_seed(0)
    for _ in range(120):
        idx = torch.randint(0, len(y), (16,))
        model.train_step({"x": x[idx], "y": y[idx]}, step)
    space = latent_space(model, name="tiny-cvae")
    z, c = sd.study_latents(space, x=x, y=y)
    assert z.shape == (96, 4)
    st = sd.direction_study(space, z, c, names=("side", "cx", "cy"), strengths=(-1.0, 0.0, 1.0), n_edit=16)
    assert st.n_regression >= 60
    assert set(st.leakage) == {"raw", "orthogonal"} and len(st.leakage["raw"]) == 3
    assert all(np.isfinite(row).all() for row in st.slopes["orthogonal"])
    assert st.slopes["orthogonal"][1][1] > 0.1  # the cx edit moves cx the asked way (0.34 when written)
    assert st.measured == ["side", "cx", "cy"] and "hue" not in st.std
    assert 0.0 <= st.others_kept["raw"]["side"] <= 1.0
    assert st.strips["raw/cx"].shape[-1] == 3


def test_shapespec_is_used_as_documented():  # guards the renderer contract this module relies on
    img = render(ShapeSpec("blue", "circle", "large", "centre", 0.5, 0.5, 0.42))
    assert sd.measure_shape(img)["colour"] == "blue"


def test_benchmark_quick_settings_and_a_tiny_run(tmp_path):
    from benchmarks import shapes_directions as bench

    args = bench.parse_args(["--quick"])
    assert args.n == bench.QUICK["n"] and args.n_edit == bench.QUICK["n_edit"] and args.strengths == "-2,-1,0,1,2"
    assert bench.parse_args([]).n == bench.FULL["n"]
    out, js = tmp_path / "strips", tmp_path / "figures.json"
    bench.main(["--n", "300", "--size", "16", "--models", "cvae", "--cvae-epochs", "6", "--cvae-channels", "4,8",
                "--cvae-latent", "4", "--batch-size", "32", "--n-regress", "120", "--n-edit", "8",
                "--strengths=-1,0,1", "--out", str(out), "--json", str(js)])
    figures = json.loads(js.read_text())
    study = figures["results"]["cvae"]["study"]
    assert study["names"] == list(sd.CONTINUOUS) and set(study["slopes"]) == {"raw", "orthogonal"}
    assert len(list(out.glob("cvae-*.png"))) == 8  # 2 variants x 4 directions


def test_an_edit_that_does_not_move_its_own_attribute_has_no_leakage_ratio():
    """A hue direction the model does not have (own slope ~0) divided other slopes by ~0 (a mean leakage of
    82 on a real cGAN run): its row is NaN and the mean leakage is over the rows that have a ratio."""
    from condgen.tasks.judging.latent_studies import AttributeStudy

    nan = float("nan")
    st = AttributeStudy(names=["side", "hue"], measured=["side", "hue"], r2={}, cosine=[], strengths=[],
                        slopes={"raw": [[0.5, 0.1], [0.2, 0.001]]}, leakage={"raw": [[1.0, 0.2], [nan, nan]]},
                        monotonicity={}, curves={})
    assert st.summary()["raw/mean_abs_leakage"] == pytest.approx(0.2)
    st.leakage["raw"][0][1] = nan
    assert np.isnan(st.summary()["raw/mean_abs_leakage"])
    assert sd.MIN_OWN_SLOPE > 0.001
