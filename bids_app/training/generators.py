"""The data-generator hook of the demo recipe: which simulator makes a training case.

The recipe's synthesis stage (:func:`bids_app.training.recipe._synth_case`) calls
:func:`generate_case` with the name in the config field ``generator``:

``"classic"``
    :func:`bids_app.synth.generate_subject` with a random site (:func:`bids_app.synth.sample_site`),
    the generator of the v1 demo model (``docs/demo-model.md``, ``docs/synth.md``).
``"randomised"``
    The domain-randomised generator of issue 14 item 1, :mod:`bids_app.synth.randomised`
    (``generate_randomised_subject``: per-label random intensities, resolution, slice thickness,
    bias, noise, deformations, partial volume; after SynthSeg, Billot et al., Medical Image
    Analysis 2023, doi:10.1016/j.media.2023.102789). Its own lesion-load distribution replaces
    the recipe's ``wml_load``/``cl_load`` ranges, which it ignores.
``"toy"``
    Tiny ellipsoid "brains" with spherical lesions, no template or lesion library needed, for
    the tests and the smoke runs of the recipe (never for a model).

A new generator is one more entry of :data:`GENERATORS`: a function
``(seed, index, resolution_mm, wml_load, cl_load, templates_dir, lesion_dir)`` returning
``(channels, labels, info)`` with ``channels`` the two :class:`~bids_app.core.imageio.Image`
(T1w, FLAIR), ``labels`` an Image of classes (0, 1 WML, 2 CL) on the T1w grid and ``info`` a
JSON-serialisable dict (``site``, ``n_wml``, ``n_cl``, anything else worth recording).
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from bids_app.core.imageio import Image


def classic(seed: int, index: int, resolution_mm: float, wml_load: tuple[float, float],
            cl_load: tuple[float, float], templates_dir=None, lesion_dir=None):
    """The v1 generator (``bids_app.synth.generate_subject``), draws exactly as before."""
    from bids_app.synth import generate_subject, sample_site

    rng = np.random.default_rng(seed)
    site = sample_site(int(rng.integers(2**31)), index=index)
    subject = generate_subject(
        int(rng.integers(2**31)), site, resolution_mm, skull_stripped=True,
        wml_load=float(rng.uniform(*wml_load)), cl_load=float(rng.uniform(*cl_load)),
        templates_dir=templates_dir, lesion_dir=lesion_dir)
    info = {"site": subject.site, "t1_contrast": subject.metadata["site"].get("t1_contrast"),
            "n_wml": int(subject.metadata.get("n_wml", 0)), "n_cl": int(subject.metadata.get("n_cl", 0))}
    return [subject.t1w, subject.flair], subject.lesion_dseg, info


def randomised(seed: int, index: int, resolution_mm: float, wml_load: tuple[float, float],
               cl_load: tuple[float, float], templates_dir=None, lesion_dir=None):
    """The domain-randomised generator (:mod:`bids_app.synth.randomised`, issue 14 item 1).

    ``wml_load``/``cl_load`` are not used: the generator draws its own lesion loads.
    """
    try:
        from bids_app.synth.randomised import generate_randomised_subject
    except ImportError as exc:  # the module is written separately (issue 14 item 1)
        raise RuntimeError("generator 'randomised' needs bids_app.synth.randomised "
                           f"(generate_randomised_subject), which cannot be imported: {exc}") from exc
    from bids_app.synth.sources import load_lesion_library, load_templates

    templates = load_templates(resolution_mm, templates_dir)
    library = load_lesion_library(lesion_dir)
    subject = generate_randomised_subject(int(seed), templates, library, resolution_mm=resolution_mm)
    volumes = subject.params.get("volumes", {})
    info = {"site": "randomised", "n_wml": int(volumes.get("n_wml", 0)), "n_cl": int(volumes.get("n_cl", 0)),
            "wml_mm3": float(volumes.get("wml_mm3", 0.0)), "cl_mm3": float(volumes.get("cl_mm3", 0.0))}
    return [subject.t1w, subject.flair], subject.lesion_dseg, info


def toy(seed: int, index: int, resolution_mm: float, wml_load: tuple[float, float],
        cl_load: tuple[float, float], templates_dir=None, lesion_dir=None, shape=(40, 44, 40)):
    """An ellipsoid brain (WM core, GM rim) with 2-6 spherical WML and 0-2 CL; pure numerics.

    Parameters
    ----------
    shape : 3 ints
        Voxels along X, Y, Z; the voxel size is ``resolution_mm``.

    Returns
    -------
    channels : [Image, Image]
        T1w-like (lesions dark) and FLAIR-like (lesions bright), float32, 0 outside the brain.
    labels : Image of uint8
    info : dict
    """
    rng = np.random.default_rng(seed)
    grid = np.stack(np.meshgrid(*[np.linspace(-1, 1, n) for n in shape], indexing="ij"))
    radius = np.sqrt(((grid / 0.85) ** 2).sum(0))
    brain, wm = radius < 1.0, radius < 0.75
    labels = np.zeros(shape, np.uint8)
    n_wml, n_cl = int(rng.integers(2, 7)), int(rng.integers(0, 3))
    centres = np.argwhere(radius < 0.6)
    for _ in range(n_wml):
        c = centres[rng.integers(len(centres))]
        r = rng.uniform(1.5, 3.5)
        labels[((np.indices(shape) - c[:, None, None, None]) ** 2).sum(0) <= r * r] = 1
    rim = np.argwhere((radius > 0.8) & (radius < 0.95))
    for _ in range(n_cl):
        c = rim[rng.integers(len(rim))]
        ball = ((np.indices(shape) - c[:, None, None, None]) ** 2).sum(0) <= 2.0 ** 2
        labels[ball & brain & (labels == 0)] = 2
    labels[~brain] = 0
    t1 = np.where(wm, 1.0, 0.7) + rng.normal(0, 0.05, shape)
    flair = np.where(wm, 1.0, 1.15) + rng.normal(0, 0.05, shape)
    t1[labels > 0] -= rng.uniform(0.2, 0.35)
    flair[labels > 0] += rng.uniform(0.4, 0.7)
    affine = np.diag([resolution_mm] * 3 + [1.0])
    channels = [Image((np.where(brain, v, 0) * 100).astype(np.float32), affine) for v in (t1, flair)]
    return channels, Image(labels, affine), {"site": "toy", "n_wml": n_wml, "n_cl": n_cl}


#: generator name -> function (see the module docstring)
GENERATORS: dict[str, Callable] = {"classic": classic, "randomised": randomised, "toy": toy}


def generate_case(generator: str, seed: int, index: int, resolution_mm: float, wml_load, cl_load,
                  templates_dir=None, lesion_dir=None):
    """Call the generator named ``generator`` (a key of :data:`GENERATORS`).

    Raises
    ------
    ValueError
        Unknown name.
    """
    if generator not in GENERATORS:
        raise ValueError(f"unknown generator {generator!r}; choose one of {', '.join(sorted(GENERATORS))}")
    return GENERATORS[generator](seed, index, resolution_mm, tuple(wml_load), tuple(cl_load),
                                 templates_dir=templates_dir, lesion_dir=lesion_dir)
