"""The numeric engine: real lesion library, placement, contrast, sites, determinism, purity."""

from __future__ import annotations

import dataclasses

import nibabel as nib
import numpy as np
import pytest

from bids_app.errors import UsageError
from bids_app.synth import generate_subject, sample_site
from bids_app.synth.anatomy import reorient, warp_maps
from bids_app.synth.contrast import tissue_image
from bids_app.synth.lesions import paint_fraction


def _site(seed=0, **kw):
    kw.setdefault("orientation", "ras")
    return sample_site(np.random.default_rng(seed), 0, **kw)


def _ras(image):
    """Data and affine of an Image in RAS order."""
    img = nib.as_closest_canonical(nib.Nifti1Image(np.asarray(image.data), image.affine))
    return np.asarray(img.dataobj), img.affine


# ------------------------------------------------------------------------------------ library


def test_library_excludes_patient07_and_keeps_real_components(sources, lesion_dir):
    from bids_app.synth import load_lesion_library

    _, lib = sources
    assert "patient07" not in lib.patients and len(lib.patients) == 27
    assert lib.excluded == ("patient07",)
    assert lib.n_lesions > 1000
    # FSL MNI152 1 mm voxel centres have integer world coordinates
    assert np.array_equal(lib.coords, np.rint(lib.coords))
    assert lib.volumes_mm3.min() >= 3
    full = load_lesion_library(lesion_dir, exclude=())
    assert "patient07" in full.patients and len(full.patients) == 28

    # a library lesion is exactly one 26-connected component of the source mask
    import cc3d

    src = lesion_dir / lib.patient[0] / next(iter(p.name for p in (lesion_dir / lib.patient[0]).glob("GOLD*")))
    img = nib.load(src)
    labels = cc3d.connected_components(np.asarray(img.dataobj) > 0, connectivity=26)
    pts = lib.lesion_coords(0)
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(img.affine), pts)).astype(int)
    values = labels[tuple(ijk.T)]
    assert len(set(values.tolist())) == 1 and values[0] > 0
    assert int((labels == values[0]).sum()) == len(pts)


def test_wml_voxels_come_from_the_library_at_1mm(synth_templateflow_home, lesion_dir, sources):
    """Without deformation, every true WML voxel at 1 mm is a voxel of some real library lesion."""
    from bids_app.synth import load_templates

    _, lib = sources
    tpl1 = load_templates(1.0)
    site = _site(1, t1_contrast="mprage")
    subject = generate_subject(3, site, 1.0, templates=tpl1, library=lib, anatomy_variation=0.0, cl_load=0,
                               skull_stripped=True)
    dseg, affine = _ras(subject.lesion_dseg)
    assert np.allclose(affine, tpl1.affine)
    wml = dseg == 1
    assert wml.sum() > 0
    both = np.concatenate([lib.coords, lib.coords * np.array([-1, 1, 1], np.float32)])
    ijk = np.rint(nib.affines.apply_affine(np.linalg.inv(affine), both)).astype(int)
    union = np.zeros(dseg.shape, bool)
    union[tuple(ijk.T)] = True  # the library voxel centres fall on the 1 mm template grid
    assert (union[wml]).all()
    # and the voxels of the placed lesions are exactly library lesions (patient07 never used)
    placed = subject.metadata["lesions_placed"]
    assert placed and all(p["patient"] != "patient07" for p in placed)
    assert len({p["patient"] for p in placed}) >= 2  # recombined from several donors
    for p in placed:
        assert p["volume_mm3_1mm"] == lib.volumes_mm3[p["library_index"]]


def test_lesions_in_brain_wml_in_wm_cl_touch_gm(sources):
    templates, lib = sources
    subject = generate_subject(7, _site(2), 2.0, templates=templates, library=lib, cl_load=12)
    dseg = subject.lesion_dseg.data
    brain = subject.brain_mask.data > 0
    assert (dseg > 0).any() and not (dseg[~brain] > 0).any()
    wm = subject.tissues["WM"].data
    gm = subject.tissues["GM"].data
    assert wm[dseg == 1].mean() > 0.5
    assert subject.metadata["n_cl"] >= 1
    from bids_app.core.postprocess import label_components

    labels, n = label_components(dseg == 2)
    assert n == subject.metadata["n_cl"]
    for k in range(1, n + 1):
        assert gm[labels == k].max() >= 0.5  # every cortical lesion touches cortex
    kinds = {p.get("type") for p in subject.metadata["lesions_placed"] if p["class"] == "CL"}
    assert kinds <= {"leukocortical", "intracortical"}


def _flair_on_t1(subject, values):
    """Nearest T1-grid values at each FLAIR voxel (no misalignment)."""
    f = subject.flair
    ijk = np.indices(f.data.shape).reshape(3, -1).T
    world = nib.affines.apply_affine(f.affine, ijk)
    vox = np.rint(nib.affines.apply_affine(np.linalg.inv(subject.t1w.affine), world)).astype(int)
    inside = np.all((vox >= 0) & (vox < np.array(values.shape)), axis=1)
    out = np.zeros(len(vox), values.dtype)
    out[inside] = values[tuple(vox[inside].T)]
    return out.reshape(f.data.shape)


@pytest.mark.parametrize("contrast", ["mprage", "mp2rage"])
def test_lesion_contrast(sources, contrast):
    templates, lib = sources
    site = _site(4, t1_contrast=contrast, orientation="mixed")
    subject = generate_subject(21, site, 2.0, templates=templates, library=lib, wml_load=30)
    dseg = subject.lesion_dseg.data
    wm = subject.tissues["WM"].data
    t1 = subject.t1w.data.astype(float)
    normal_wm = (wm > 0.9) & (dseg == 0)
    assert t1[dseg == 1].mean() < t1[normal_wm].mean()  # T1 hypointense
    flair = subject.flair.data.astype(float)
    dseg_f = _flair_on_t1(subject, dseg)
    wm_f = _flair_on_t1(subject, wm)
    assert flair[dseg_f == 1].mean() > 1.1 * flair[(wm_f > 0.9) & (dseg_f == 0)].mean()  # FLAIR hyperintense


def test_sites_differ_and_validate_arguments():
    a = sample_site(np.random.default_rng(1), 0)
    b = sample_site(np.random.default_rng(2), 1)
    assert a.name == "site01" and b.name == "site02"
    assert (a.t1_gm, a.t1_scale, a.flair_snr, a.flair_slice_mm) != (b.t1_gm, b.t1_scale, b.flair_snr, b.flair_slice_mm)
    assert sample_site(3, t1_contrast="mp2rage").t1_contrast == "MP2RAGE"
    m = sample_site(3, t1_contrast="mprage")
    assert m.t1_contrast == "MPRAGE" and m.t1_suffix == "acq-MPRAGE_T1w"
    assert sample_site(3, t1_contrast="mp2rage").manufacturer == "Siemens"
    s = sample_site(5, flair_slice_thickness=(4.0, 5.0))
    assert 4.0 <= s.flair_slice_mm <= 5.0
    avoided = sample_site(5, avoid_scanners=frozenset({f"{s.manufacturer} {s.model}"}))
    assert f"{avoided.manufacturer} {avoided.model}" != f"{s.manufacturer} {s.model}"
    with pytest.raises(UsageError):
        sample_site(0, t1_contrast="flash")
    with pytest.raises(UsageError):
        sample_site(0, flair_slice_thickness=(3.0, 1.0))


def test_determinism_in_memory(sources):
    templates, lib = sources
    site = _site(6, orientation="mixed", misalign_mm=2.0)
    one = generate_subject(99, site, 2.0, templates=templates, library=lib)
    two = generate_subject(np.random.default_rng(99), site, 2.0, templates=templates, library=lib)
    other = generate_subject(100, site, 2.0, templates=templates, library=lib)
    for name in ("t1w", "flair", "lesion_dseg", "brain_mask"):
        assert np.array_equal(getattr(one, name).data, getattr(two, name).data)
        assert np.array_equal(getattr(one, name).affine, getattr(two, name).affine)
    assert not np.array_equal(one.t1w.data, other.t1w.data)
    mis = np.array(one.metadata["flair_misalignment"])
    assert not np.allclose(mis, np.eye(4))
    assert np.abs(mis[:3, 3]).max() < 2.0 + 1e-6 + 200 * np.deg2rad(2.0)


def test_orientation_and_grids(sources):
    templates, lib = sources
    site = sample_site(0, 0, orientation="ras")
    las = dataclasses.replace(site, t1_axcodes="LAS", flair_axcodes="LAS")
    a = generate_subject(5, site, 2.0, templates=templates, library=lib)
    b = generate_subject(5, las, 2.0, templates=templates, library=lib)
    assert nib.aff2axcodes(a.t1w.affine) == ("R", "A", "S")
    assert nib.aff2axcodes(b.t1w.affine) == ("L", "A", "S") and nib.aff2axcodes(b.flair.affine) == ("L", "A", "S")
    assert np.array_equal(b.lesion_dseg.affine, b.t1w.affine)
    # same world content: reorienting back gives the same arrays
    for name in ("t1w", "lesion_dseg", "flair"):
        data_b, aff_b = _ras(getattr(b, name))
        assert np.allclose(aff_b, getattr(a, name).affine)
        assert np.array_equal(data_b, getattr(a, name).data)


def test_unit1_background_and_skull_stripping(sources):
    templates, lib = sources
    site = _site(8, t1_contrast="mp2rage")
    head = generate_subject(12, site, 2.0, templates=templates, library=lib)
    brain = head.brain_mask.data > 0
    corner = head.t1w.data[:10, :10, -10:].astype(float)  # air above/in front of the head
    assert corner.std() > 800 and (corner > 2000).mean() > 0.2 and (corner < 1000).mean() > 0.2
    stripped = generate_subject(12, site, 2.0, templates=templates, library=lib, skull_stripped=True)
    assert not stripped.t1w.data[~brain].any()
    assert stripped.t1w.data[brain].mean() > 0
    mprage = generate_subject(12, _site(8, t1_contrast="mprage"), 2.0, templates=templates, library=lib)
    assert mprage.t1w.data[:10, :10, -10:].mean() < 0.2 * mprage.t1w.data[brain].mean()


def test_pure_functions_do_not_modify_inputs(sources):
    templates, _ = sources
    maps = [templates.gm, templates.wm]
    for m in maps:
        assert not m.flags.writeable  # the shared template arrays are read-only
    pts = np.array([[0.0, 0.0, 0.0], [1.0, 0.0, 0.0]], np.float32)
    pts.flags.writeable = False
    frac = paint_fraction([pts], templates.shape, templates.affine)
    assert frac.sum() > 0
    out = warp_maps(maps, templates.affine, (10, 10, 10), templates.affine)
    assert out[0].shape == (10, 10, 10)
    img = tissue_image(templates.gm, templates.wm, templates.csf, templates.brain, templates.t1w,
                       i_gm=0.6, i_csf=0.2, i_nonbrain=1.0)
    assert img.dtype == np.float32
    data, aff = reorient(templates.wm, templates.affine, "LAS")
    assert nib.aff2axcodes(aff) == ("L", "A", "S") and np.array_equal(data[::-1], templates.wm)
