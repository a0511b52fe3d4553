"""Domain-randomised generator (issue 14 item 1): bids_app.synth.randomised, lesion_load, acquisition.

Fast: subjects on the 2 mm template (``sources`` fixture of conftest.py), pure-numpy checks on
small arrays. See docs/synth.md, "Domain-randomised mode (issue 14)".
"""

from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest
from scipy import ndimage as ndi

from bids_app.synth.acquisition import high_frequency_energy, random_spacing, simulate_resolution
from bids_app.synth.lesion_load import (
    LOCATIONS,
    LoadDistribution,
    classify_library,
    place_wml,
    sample_wml_volume_ml,
)
from bids_app.synth.lesions import paint_fraction
from bids_app.synth.randomised import (
    CHANNELS,
    LABELS,
    PARAM_KEYS,
    RandomisationParams,
    generate_randomised_subject,
    sample_label_intensities,
    soft_lesion_weight,
)

REALISTIC = RandomisationParams(p_realistic=1.0)


@pytest.fixture(scope="module")
def subject(sources):
    templates, library = sources
    return generate_randomised_subject(3, templates, library, return_tissues=True)


# --------------------------------------------------------------------------------------------
# whole subjects (2 mm)
# --------------------------------------------------------------------------------------------


def test_same_seed_same_subject_other_seed_differs(sources, subject):
    templates, library = sources
    again = generate_randomised_subject(np.random.default_rng(3), templates, library, return_tissues=True)
    for ch in CHANNELS:
        np.testing.assert_array_equal(subject.images[ch], again.images[ch])
    np.testing.assert_array_equal(subject.labels, again.labels)
    assert json.dumps(subject.params, sort_keys=True) == json.dumps(again.params, sort_keys=True)
    other = generate_randomised_subject(4, templates, library)
    assert not np.array_equal(subject.images["FLAIR"], other.images["FLAIR"])


def test_images_are_skull_stripped_float32_on_the_template_grid(sources, subject):
    templates, _ = sources
    brain = subject.brain_mask.astype(bool)
    assert brain.sum() > 0.5 * (templates.brain >= 0.5).sum()
    for ch in CHANNELS:
        img = subject.images[ch]
        assert img.dtype == np.float32 and img.shape == templates.shape
        assert np.all(img[~brain] == 0)
        assert np.all(np.isfinite(img)) and img[brain].std() > 0
    assert subject.labels.dtype == np.uint8
    assert set(np.unique(subject.labels)) <= {0, 1, 2}
    assert not np.any(subject.labels[~brain])
    np.testing.assert_allclose(subject.affine, templates.affine)
    assert subject.stack().shape == (2, *templates.shape)
    assert subject.t1w.data is subject.images["T1w"] and subject.lesion_dseg.data is subject.labels


def test_parameter_dict_is_complete_and_json(subject):
    p = subject.params
    assert set(p) == set(PARAM_KEYS)
    json.dumps(p)
    for ch in CHANNELS:
        assert set(p["intensities"][ch]["means"]) == set(LABELS) == set(p["intensities"][ch]["stds"])
        assert p["intensities"][ch]["mode"] in ("realistic", "random")
        assert {"bias_log_sd", "spacing_mm", "slice_axis", "noise_sd", "rician", "gamma", "scale"} <= set(
            p["acquisition"][ch])
    lesions = p["lesions"]
    assert {"target_ml", "volume_ml", "confluent", "location_mix", "placed_per_location", "placed"} <= set(lesions)
    assert set(lesions["placed_per_location"]) == set(LOCATIONS)
    assert all(rec["patient"] != "patient07" for rec in lesions["placed"])  # the held-out real case
    assert p["volumes"]["wml_mm3"] == pytest.approx(float((subject.labels == 1).sum()) * 8.0)
    assert p["randomisation"] == RandomisationParams().to_dict()


@pytest.mark.parametrize("seed", [11, 12])
def test_realistic_draws_have_visible_lesions(sources, seed):
    """Lesion voxels exist; FLAIR lesions brighter than WM, T1w lesions not brighter (noise aside)."""
    templates, library = sources
    s = generate_randomised_subject(seed, templates, library, params=REALISTIC, return_tissues=True)
    lesion = s.labels == 1
    assert lesion.sum() >= 5
    wm = (s.tissues == 3) & ~ndi.binary_dilation(s.labels > 0, iterations=2)
    assert all(s.params["intensities"][ch]["mode"] == "realistic" for ch in CHANNELS)
    flair, t1 = s.images["FLAIR"], s.images["T1w"]
    assert np.median(flair[lesion]) > 1.05 * np.median(flair[wm])
    assert np.median(t1[lesion]) < 1.02 * np.median(t1[wm])


def test_resolution_must_match_the_templates(sources):
    templates, library = sources
    with pytest.raises(ValueError):
        generate_randomised_subject(0, templates, library, resolution_mm=1.0)


# --------------------------------------------------------------------------------------------
# intensity draws
# --------------------------------------------------------------------------------------------


def test_intensity_orderings():
    rng = np.random.default_rng(0)
    for _ in range(300):
        t1 = sample_label_intensities(rng, "T1w", REALISTIC)["means"]
        fl = sample_label_intensities(rng, "FLAIR", REALISTIC)["means"]
        assert t1["CSF_vent"] < t1["GM_cortex"] < t1["WM"] == 1.0
        assert 0.5 <= t1["WML"] <= 1.0                                    # hypo- to isointense
        assert fl["WML"] >= max(1.15, fl["GM_cortex"] + 0.05) and fl["GM_cortex"] > fl["WM"] > fl["CSF_vent"]
        rnd = sample_label_intensities(rng, "FLAIR", RandomisationParams(p_realistic=0.0))
        assert rnd["mode"] == "random"
        m = rnd["means"]
        assert abs(m["WML"] - m["WM"]) >= 0.12 - 1e-9 and abs(m["CL"] - m["GM_cortex"]) >= 0.06 - 1e-9
        assert all(0.0 <= v <= 1.0 for v in m.values())
    modes = [sample_label_intensities(rng, "T1w", RandomisationParams())["mode"] for _ in range(400)]
    assert 0.4 < modes.count("realistic") / 400 < 0.6


# --------------------------------------------------------------------------------------------
# lesion load
# --------------------------------------------------------------------------------------------


def test_load_sampler_quantiles():
    dist = LoadDistribution()
    v = sample_wml_volume_ml(np.random.default_rng(0), dist, size=200_000)
    assert 5.0 <= np.median(v) <= 10.0 and np.median(v) == pytest.approx(dist.quantile(0.5), rel=0.02)
    assert 25.0 <= np.percentile(v, 90) <= 40.0 and np.percentile(v, 90) == pytest.approx(dist.quantile(0.9), rel=0.03)
    assert np.mean(v > 50.0) >= 0.05 and np.mean(v > 50.0) == pytest.approx(dist.exceedance(50.0), abs=0.003)
    assert v.min() >= dist.min_ml and v.max() <= dist.max_ml
    assert isinstance(sample_wml_volume_ml(np.random.default_rng(1)), float)


def test_heavy_loads_reach_50_ml_and_are_confluent(sources):
    templates, library = sources
    for seed in (0, 1):
        draw = place_wml(np.random.default_rng(seed), library, templates, 60.0, min_volume_mm3=20.0)
        assert draw.confluent and draw.volume_ml > 50.0
        frac = paint_fraction([draw.points], templates.shape, templates.affine, 1.0)
        assert (frac >= 0.5).sum() * 8.0 / 1000.0 > 50.0
        # confluent: most of the volume sits in a few large merged components
        labels, n = ndi.label(frac >= 0.5, np.ones((3, 3, 3)))
        sizes = np.sort(np.bincount(labels.ravel())[1:])[::-1]
        assert sizes[:5].sum() > 0.5 * sizes.sum()


def test_light_loads_stay_light_and_locations_are_all_covered(sources):
    templates, library = sources
    classes = classify_library(library, templates)
    for k in range(len(LOCATIONS)):
        assert (classes.eligible & (classes.location == k)).sum() >= 20
    draw = place_wml(np.random.default_rng(2), library, templates, 1.0, min_volume_mm3=20.0)
    assert not draw.confluent and 0.9 <= draw.volume_ml <= 1.3
    seen = set()
    for seed in range(6):
        d = place_wml(np.random.default_rng(seed), library, templates, 8.0, min_volume_mm3=20.0)
        assert d.volume_ml == pytest.approx(8.0, rel=0.2)
        seen |= {loc for loc, n in d.summary()["placed_per_location"].items() if n}
    assert seen == set(LOCATIONS)


# --------------------------------------------------------------------------------------------
# partial volume, heterogeneity, acquisition (small arrays)
# --------------------------------------------------------------------------------------------


def test_partial_volume_makes_border_voxels_intermediate():
    frac = np.zeros((20, 20, 20), np.float32)
    frac[6:14, 6:14, 6:14] = 1.0
    w = soft_lesion_weight(frac, 0.4, (1.0, 1.0, 1.0))
    mask = frac >= 0.5
    border_in = mask & ~ndi.binary_erosion(mask)
    border_out = ndi.binary_dilation(mask) & ~mask
    assert np.all((w[border_in] > 0.5) & (w[border_in] < 0.99))
    assert np.all((w[border_out] > 0.01) & (w[border_out] < 0.5))
    assert np.all(w[ndi.binary_erosion(mask, iterations=2)] > 0.99)
    assert w[0, 0, 0] == 0.0
    image = (1.0 - w) * 1.0 + w * 2.0          # WM 1, lesion 2: borders in between
    assert np.all((image[border_in] > 1.0) & (image[border_in] < 2.0))
    assert np.array_equal(w >= 0.5, mask)      # the label is unchanged


def test_resolution_simulation_removes_high_frequencies_along_the_thick_axis():
    rng = np.random.default_rng(0)
    img = ndi.gaussian_filter(rng.standard_normal((48, 48, 48)).astype(np.float32), 1.0)
    out = simulate_resolution(np.random.default_rng(1), img, (1.0, 1.0, 5.0), 1.0)
    assert out.shape == img.shape and out.dtype == np.float32
    ratio = [high_frequency_energy(out, a) / high_frequency_energy(img, a) for a in range(3)]
    # blurring along z lowers the signal's variance, so every axis loses some; z loses most
    assert ratio[2] < 0.1 and ratio[2] < 0.25 * min(ratio[0], ratio[1])
    same = simulate_resolution(np.random.default_rng(1), img, (1.0, 1.0, 1.0), 1.0)
    np.testing.assert_allclose(same, img, atol=1e-6)
    noisy = simulate_resolution(np.random.default_rng(1), img, (1.0, 1.0, 1.0), 1.0, noise_sd=0.1, rician=False)
    assert np.std(noisy - img) == pytest.approx(0.1, rel=0.05)


def test_random_spacing_draws():
    rng = np.random.default_rng(0)
    p = dataclasses.asdict(RandomisationParams())
    keys = ("p_isotropic", "isotropic_mm", "inplane_mm", "slice_mm", "slice_axis_p")
    draws = [random_spacing(rng, **{k: p[k] for k in keys}) for _ in range(2000)]
    iso = [s for s, axis in draws if axis is None]
    assert 0.3 < len(iso) / 2000 < 0.4
    axial = [s for s, axis in draws if axis == 2]
    assert 0.4 < len(axial) / 2000 < 0.5
    assert all(1.5 <= s[2] <= 6.5 and 0.7 <= s[0] == s[1] <= 1.3 for s in axial)
