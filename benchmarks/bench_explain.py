"""Benchmark of the instance explanations (issue 5): crop + batch vs full volume, and the CAM layer table.

Three parts (each prints its figures; ``--json`` also writes them):

* **timing** (default): time per lesion of :func:`bids_app.core.explain.explain_network_space` in
  crop mode (lesion-centred crops, batched across noise samples and lesions) and in full-volume
  mode (the network on the whole preprocessed volume for every noise sample of every lesion, the
  way the IES reference code does it), on the tiny nnU-Net model and a brain-sized synthetic case
  (96 x 112 x 96 voxels at 2 mm = the FOV of a 1 mm MNI brain). Full mode is timed on a few
  lesions with few noise samples and scaled linearly to ``--samples`` (its cost is linear in the
  number of samples: every sample is one forward and ``G`` backward passes). Uses CUDA when
  ``torch.cuda.is_available()`` unless ``--device cpu``.
* **agreement** (with ``--agreement``): Pearson r between crop and full mode inside each crop.
* **CAM table** (``--cam-table``): share of the CAM mass inside the instance dilated by 2
  voxels, for candidate layers x formulations, with the whole volume in one pass (window-frozen
  or live InstanceNorm statistics).

``--gpu-study`` trains a larger PlainConvUNet (5 stages, 16..256 features, 1 mm, patch 96^3) on
synthetic blobs for ``--train-seconds`` on the GPU, then runs the CAM table, the timing and the
agreement on it (needs only torch, numpy, scipy and dynamic_network_architectures).

Usage::

    python benchmarks/bench_explain.py                       # tiny model (built in a temp dir)
    python benchmarks/bench_explain.py --model TRAINER_DIR --folds 0 --lesions 4
    python benchmarks/bench_explain.py --cam-table --member-weights better.pt
    python benchmarks/bench_explain.py --gpu-study --json out.json
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

try:
    from bids_app.core import explain as E
    from bids_app.core.explain import cam as explain_cam
    from bids_app.core.explain import crops as explain_crops
    from bids_app.core.explain import network as explain_network
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
    from bids_app.core import explain as E
    from bids_app.core.explain import cam as explain_cam
    from bids_app.core.explain import crops as explain_crops
    from bids_app.core.explain import network as explain_network

CAM_LAYERS = ("encoder.stages[-1]", "decoder.stages[0]", "decoder.stages[-2]", "decoder.stages[-1]",
              "decoder.transpconvs[-1]")
CAM_FORMS = ("gradcam", "gradcampp", "gradcampp-elementwise", "hirescam", "layercam")


# ------------------------------------------------------------------------------------------
# data
# ------------------------------------------------------------------------------------------

def synthetic_blobs(rng, shape, n_big=(2, 6), n_small=(0, 4), r_big=(2.0, 4.0), r_small=(1.2, 2.0)):
    """Two-channel blobs like the tiny model's training data (bids_app.testing.tiny_model), any shape."""
    from bids_app.testing.tiny_model import blob_case

    return blob_case(rng, shape, n_big, n_small, r_big, r_small)


def network_case(nets, shape, seed, device, n_big=(8, 14), threshold=0.5, min_size=8, max_lesions=None,
                 max_size=500, max_extent=16):
    """A normalised synthetic volume (network space), the ensemble's lesions and their classes."""
    import torch
    from scipy import ndimage

    rng = np.random.default_rng(seed)
    image, labels = synthetic_blobs(rng, shape, n_big=n_big, n_small=(2, 6))
    pad = [(0, 0)] + [(0, (-s) % 16) for s in shape]
    x = torch.from_numpy(np.pad(image, pad))[None].to(device)
    with torch.no_grad():
        probs = np.mean([torch.softmax(n.to(device)(x), 1)[0].cpu().numpy() for n in nets], axis=0)
    probs = probs[(slice(None), *[slice(0, s) for s in shape])]
    # lesions: argmax class among {1, 2} where its probability reaches the threshold, 18-connected
    # components of at least min_size voxels (scipy only, so that the GPU machine needs no cc3d)
    cls_map = np.where(probs[2] > probs[1], 2, 1) * (np.maximum(probs[1], probs[2]) >= threshold)
    instances = np.zeros(shape, np.int32)
    classes, n = {}, 0
    st = ndimage.generate_binary_structure(3, 2)
    for c in (1, 2):
        lab, k = ndimage.label(cls_map == c, structure=st)
        sizes = np.bincount(lab.ravel())
        for i in range(1, k + 1):
            if sizes[i] >= min_size:
                n += 1
                instances[lab == i] = n
                classes[n] = c
    if max_lesions:  # typical lesions: compact (extent <= max_extent), sizes nearest the median
        sizes = np.bincount(instances.ravel())[1:]
        objs = ndimage.find_objects(instances)
        extent = {k: max(sl.stop - sl.start for sl in objs[k - 1]) for k in classes}
        ok = [k for k in classes if sizes[k - 1] <= max_size and extent[k] <= max_extent] or list(classes)
        med = np.median([sizes[k - 1] for k in ok])
        keep = sorted(ok, key=lambda k: abs(sizes[k - 1] - med))[:max_lesions]
        classes = {k: classes[k] for k in sorted(keep)}
    return image, instances, classes, labels


# ------------------------------------------------------------------------------------------
# timing and agreement
# ------------------------------------------------------------------------------------------

def _sync(device):
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def time_modes(nets, data, lesions, classes, spacing, patch, device, samples, full_samples, full_lesions,
               max_groups, methods=("smoothgrad", "gradcam", "gradcampp")):
    """Seconds per lesion of crop mode (all lesions, ``samples``) and full mode (``full_lesions``
    lesions, ``full_samples`` samples, scaled linearly to ``samples``)."""
    out = {"n_lesions_crop": len(classes), "samples": samples, "max_groups": max_groups, "members": len(nets),
           "lesion_voxels": [int((lesions == k).sum()) for k in classes], "volume": list(lesions.shape)}
    cfg = dict(n_samples=samples, max_groups=max_groups, methods=methods)
    tc: dict = {}
    E.explain_network_space(nets, data, lesions, dict(list(classes.items())[:1]),  # warm-up
                            E.ExplainConfig(mode="crop", **dict(cfg, n_samples=1)), spacing, device, patch_size=patch)
    _sync(device)
    t0 = time.perf_counter()
    crop = E.explain_network_space(nets, data, lesions, classes, E.ExplainConfig(mode="crop", **cfg), spacing, device,
                                   patch_size=patch, timings=tc)
    _sync(device)
    t_crop = time.perf_counter() - t0
    out.update({"crop_total_s": t_crop, "crop_per_lesion_s": t_crop / len(classes), "crop_timings": tc,
                "crop_shapes": sorted({tuple(hi - lo for lo, hi in r.box) for r in crop})})
    sub = dict(list(classes.items())[:full_lesions])
    tf: dict = {}
    t0 = time.perf_counter()
    E.explain_network_space(nets, data, lesions, sub, E.ExplainConfig(mode="full", **dict(cfg, n_samples=full_samples)),
                            spacing, device, patch_size=patch, timings=tf)
    _sync(device)
    t_full = time.perf_counter() - t0
    fixed = tf.get("norm_stats_s", 0.0) + tf.get("margin_s", 0.0)
    per_sample = (tf["smoothgrad_s"]) / (len(sub) * full_samples)
    per_lesion_full = per_sample * samples + tf["cam_s"] / len(sub) + fixed / len(sub)
    out.update({"full_lesions": len(sub), "full_samples": full_samples, "full_total_s": t_full,
                "full_per_sample_s": per_sample, "full_per_lesion_s_scaled": per_lesion_full, "full_timings": tf,
                "speedup": per_lesion_full / out["crop_per_lesion_s"]})
    return out


def agreement(nets, data, lesions, classes, spacing, patch, device, samples=4, max_groups=2):
    cfg = dict(n_samples=samples, max_groups=max_groups, methods=("smoothgrad", "gradcam", "gradcampp"), seed=3)
    crop = E.explain_network_space(nets, data, lesions, classes, E.ExplainConfig(mode="crop", **cfg), spacing, device,
                                   patch_size=patch)
    full = E.explain_network_space(nets, data, lesions, classes, E.ExplainConfig(mode="full", **cfg), spacing, device,
                                   patch_size=patch)
    table = {}
    for name in ("smoothgrad_mean", "smoothgrad_max", "gradcam", "gradcampp"):
        rs = []
        for c, f in zip(crop, full):
            a, b = c.maps[name].ravel(), f.maps[name].ravel()
            rs.append(float(np.corrcoef(a, b)[0, 1]) if a.std() > 0 and b.std() > 0 else float("nan"))
        table[name] = {"min": float(np.nanmin(rs)), "median": float(np.nanmedian(rs)), "n": len(rs)}
    return table


# ------------------------------------------------------------------------------------------
# CAM layer x formulation table
# ------------------------------------------------------------------------------------------

def cam_table(net, data, lesions, classes, patch, device, layers=CAM_LAYERS, forms=CAM_FORMS, dilate=2):
    """Mean / median / min over lesions of the CAM mass share inside the dilated instance."""
    import torch
    import torch.nn.functional as F
    from scipy import ndimage

    (pnet,) = E.prepare_networks([net], device, torch.float32)
    stride = E.total_stride(pnet)
    shape = lesions.shape
    full = [int(np.ceil(s / st) * st) for s, st in zip(shape, stride)]
    box = [(0, f) for f in full]
    x0 = explain_network.extract_box(torch.as_tensor(data, dtype=torch.float32, device=device), box)[None]
    les = np.pad(lesions, [(0, f - s) for f, s in zip(full, shape)])
    names = {}
    for layer in layers:
        try:
            names[layer] = E.canonical_layer_name(pnet, layer)
        except (IndexError, AttributeError):
            continue
    uniq = {}
    for layer, canon in names.items():  # decoder.stages[0] may be decoder.stages[-2]
        uniq.setdefault(canon, layer)
    shares = {(mode, layer, f): [] for mode in ("window", "live") for layer in uniq.values() for f in forms}
    uniform = []
    for lab, cls in classes.items():
        mask = les == lab
        dil = ndimage.binary_dilation(mask, iterations=dilate, structure=np.ones((3, 3, 3)))
        uniform.append(float(dil.mean()))
        c = np.argwhere(mask)
        ctr = (c.min(0) + c.max(0) + 1) // 2
        wbox = []
        for j in range(3):
            p = int(patch[j])
            start = int(min(max(ctr[j] - p // 2, 0), max(full[j] - p, 0)))
            start -= start % stride[j]
            wbox.append((start, start + p))
        stats = explain_crops.record_window_stats([pnet], x0[0], {lab: wbox}, 1 << 26, 1)[0][lab]
        for mode in ("window", "live"):
            if mode == "window":
                explain_network.set_norm_mode(pnet._msx_norms, "frozen", [(m[None], v[None]) for m, v in stats])
            store, handles = explain_cam.layer_outputs(pnet, {k: k for k in uniq.values()})
            try:
                x = x0.clone().requires_grad_(True)
                with torch.enable_grad():
                    out = pnet(x)
                    score = (out[0, int(cls)] * torch.from_numpy(mask).to(out)).sum()
                    keys = list(uniq.values())
                    grads = torch.autograd.grad(score, [store[k] for k in keys])
            finally:
                for h in handles:
                    h.remove()
                explain_network.set_norm_mode(pnet._msx_norms, "live")
            for k, g in zip(keys, grads):
                A = store[k].detach()
                for f in forms:
                    cam = E.cam_from_gradients(A, g, f)
                    cam = F.interpolate(cam[:, None], size=tuple(full), mode="trilinear", align_corners=False)[0, 0]
                    cam = torch.relu(cam).double().cpu().numpy()
                    tot = cam.sum()
                    shares[(mode, k, f)].append(float(cam[dil].sum() / tot) if tot > 0 else float("nan"))
            del store, grads, out
    rows = []
    for (mode, layer, f), v in shares.items():
        v = np.asarray(v, float)
        rows.append({"stats": mode, "layer": layer, "canonical": names[layer], "formulation": f,
                     "mean": float(np.nanmean(v)) if np.isfinite(v).any() else float("nan"),
                     "median": float(np.nanmedian(v)) if np.isfinite(v).any() else float("nan"),
                     "min": float(np.nanmin(v)) if np.isfinite(v).any() else float("nan"),
                     "n_nan": int(np.isnan(v).sum())})
    return {"rows": rows, "uniform_share_mean": float(np.mean(uniform)), "n_lesions": len(classes)}


def print_cam_table(tab, title):
    print(f"\n{title}: share of CAM mass inside the instance dilated by 2 voxels "
          f"({tab['n_lesions']} lesions; a uniform map gives {tab['uniform_share_mean']:.4f})")
    forms = list(dict.fromkeys(r["formulation"] for r in tab["rows"]))
    for mode in ("window", "live"):
        print(f"  InstanceNorm statistics: {mode}; mean (median) per layer")
        print("  " + "layer".ljust(28) + "".join(f.ljust(24) for f in forms))
        for layer in dict.fromkeys(r["layer"] for r in tab["rows"] if r["stats"] == mode):
            cells = []
            for f in forms:
                r = next(r for r in tab["rows"] if r["stats"] == mode and r["layer"] == layer and r["formulation"] == f)
                cells.append(f"{r['mean']:.3f} ({r['median']:.3f})".ljust(24))
            print("  " + f"{layer} [{next(r['canonical'] for r in tab['rows'] if r['layer'] == layer)}]".ljust(28)
                  + "".join(cells))


# ------------------------------------------------------------------------------------------
# models
# ------------------------------------------------------------------------------------------

def tiny_networks(model_dir, folds, member_weights=None):
    """Member networks, network spacing and patch of an nnU-Net trained-model folder."""
    from bids_app.model.ensemble import load_ensemble
    from bids_app.model.resolve import resolve_model

    pred = load_ensemble(resolve_model(str(model_dir)), list(folds), tta=False).predictor
    nets, names = E.member_networks(pred)
    if member_weights:
        import torch

        nets[0].load_state_dict(torch.load(member_weights, map_location="cpu"))
    spacing = tuple(float(s) for s in pred.configuration_manager.spacing)
    patch = tuple(int(p) for p in pred.configuration_manager.patch_size)
    return nets, spacing, patch


def larger_network(n_classes=3, features=(16, 32, 64, 128, 256)):
    """A PlainConvUNet with nnU-Net's building blocks (default: 5 stages, 16..256 features)."""
    import torch
    from dynamic_network_architectures.architectures.unet import PlainConvUNet

    n = len(features)
    return PlainConvUNet(
        input_channels=2, n_stages=n, features_per_stage=list(features), conv_op=torch.nn.Conv3d,
        kernel_sizes=[[3, 3, 3]] * n, strides=[[1, 1, 1]] + [[2, 2, 2]] * (n - 1), n_conv_per_stage=[2] * n,
        num_classes=n_classes, n_conv_per_stage_decoder=[2] * (n - 1), conv_bias=True, norm_op=torch.nn.InstanceNorm3d,
        norm_op_kwargs={"eps": 1e-5, "affine": True}, dropout_op=None, nonlin=torch.nn.LeakyReLU,
        nonlin_kwargs={"inplace": True}, deep_supervision=False)


def train_larger(device, seconds, patch=(96, 96, 96), seed=0, features=(16, 32, 64, 128, 256)):
    import torch

    torch.manual_seed(seed)
    rng = np.random.default_rng(seed)
    net = larger_network(features=features).to(device)
    opt = torch.optim.Adam(net.parameters(), lr=2e-3)
    weights = torch.tensor([1.0, 3.0, 6.0], device=device)
    t0 = time.perf_counter()
    it, losses = 0, []
    while time.perf_counter() - t0 < seconds:
        xs, ys = zip(*(synthetic_blobs(rng, patch, n_big=(3, 8), n_small=(1, 5)) for _ in range(2)))
        x = torch.from_numpy(np.stack(xs)).to(device)
        y = torch.from_numpy(np.stack(ys).astype(np.int64)).to(device)
        loss = torch.nn.functional.cross_entropy(net(x), y, weight=weights)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
        it += 1
    net.eval()
    info = {"iterations": it, "seconds": time.perf_counter() - t0, "final_loss": float(np.mean(losses[-20:]))}
    return net.cpu(), info


def dice_of(nets, image, labels, device):
    import torch

    pad = [(0, 0)] + [(0, (-s) % 16) for s in labels.shape]
    x = torch.from_numpy(np.pad(image, pad))[None].to(device)
    with torch.no_grad():
        p = np.mean([torch.softmax(n.to(device)(x), 1)[0].cpu().numpy() for n in nets], 0)
    p = p[(slice(None), *[slice(0, s) for s in labels.shape])]
    pred = p.argmax(0)
    return {c: float(2 * ((pred == c) & (labels == c)).sum() / max(1, (pred == c).sum() + (labels == c).sum()))
            for c in (1, 2)}


# ------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    import torch

    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--model", type=Path, default=None, help="nnU-Net trainer folder (default: build the tiny model)")
    ap.add_argument("--folds", nargs="+", default=["0"], help="members explained (default: fold 0)")
    ap.add_argument("--member-weights", default=None,
                    help="state dict replacing the first member (e.g. a longer-trained tiny member)")
    ap.add_argument("--shape", type=int, nargs=3, default=(96, 112, 96),
                    help="network-space volume (default 96 112 96)")
    ap.add_argument("--lesions", type=int, default=4, help="lesions explained in crop mode (largest first)")
    ap.add_argument("--samples", type=int, default=50)
    ap.add_argument("--full-samples", type=int, default=2)
    ap.add_argument("--full-lesions", type=int, default=2)
    ap.add_argument("--max-groups", type=int, default=8)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=7)
    ap.add_argument("--agreement", action="store_true", help="also crop-vs-full Pearson r (n = 4)")
    ap.add_argument("--cam-table", action="store_true", help="the CAM layer x formulation table instead of timings")
    ap.add_argument("--gpu-study", action="store_true", help="train a larger net on the GPU, then table + timings")
    ap.add_argument("--train-seconds", type=float, default=150.0)
    ap.add_argument("--study-patch", type=int, default=96, help="gpu-study: training patch side (1 mm)")
    ap.add_argument("--study-features", type=int, nargs="+", default=(16, 32, 64, 128, 256),
                    help="gpu-study: features per stage of the larger net")
    ap.add_argument("--study-steps", nargs="+", default=("table", "agreement", "timing", "tiny"),
                    help="gpu-study: which parts to run")
    ap.add_argument("--study-table-shape", type=int, default=128, help="gpu-study: CAM-table volume side")
    ap.add_argument("--study-timing-shape", type=int, nargs=3, default=(160, 192, 160),
                    help="gpu-study: timing volume (1 mm brain size)")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)

    torch.set_num_threads(args.threads)
    device = torch.device("cuda" if (args.device == "auto" and torch.cuda.is_available()) or args.device == "cuda"
                          else "cpu")
    report = {"device": str(device), "torch": torch.__version__, "python": platform.python_version(),
              "machine": platform.machine(), "threads": torch.get_num_threads()}
    if device.type == "cuda":
        report["gpu"] = torch.cuda.get_device_name(0)
    print(json.dumps(report))

    def dump():
        if args.json:
            args.json.parent.mkdir(parents=True, exist_ok=True)
            args.json.write_text(json.dumps(report, indent=1, default=str))

    if args.gpu_study:
        import traceback

        if device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        sp = args.study_patch
        net, info = train_larger(device, args.train_seconds, patch=(sp, sp, sp), features=tuple(args.study_features))
        info["features"] = list(args.study_features)
        report["training"] = info
        print("trained larger net:", info, flush=True)
        spacing, patch = (1.0, 1.0, 1.0), (sp, sp, sp)
        ts = args.study_table_shape
        image, inst, classes, labels = network_case([net], (ts, ts, ts), args.seed, device, n_big=(10, 16),
                                                    max_lesions=12)
        report["dice"] = dice_of([net], image, labels, device)
        print("dice on a held-out volume:", report["dice"], "lesions:", len(classes), flush=True)
        steps = [
            ("cam_table_larger", lambda: cam_table(net, image, inst, classes, patch, device)),
            ("agreement_larger", lambda: agreement([net], image, inst, dict(list(classes.items())[:6]), spacing, patch,
                                                   device, samples=8, max_groups=4)),
        ]
        steps = [st for st in steps if st[0].split("_")[0].replace("cam", "table") in args.study_steps]
        for key, fn in steps:
            t0 = time.perf_counter()
            try:
                report[key] = fn()
            except Exception:  # keep what the other steps measured
                report[key] = {"error": traceback.format_exc()}
            print(f"{key} ({time.perf_counter() - t0:.1f} s):", flush=True)
            if key == "cam_table_larger" and "rows" in report[key]:
                title = (f"larger PlainConvUNet ({len(args.study_features)} stages, "
                         f"{info['iterations']} steps on {device})")
                print_cam_table(report[key], title)
            else:
                print(json.dumps(report[key], default=str), flush=True)
            dump()
        if "timing" not in args.study_steps:
            return 0
        try:
            image, inst, classes, _ = network_case([net], tuple(args.study_timing_shape), args.seed + 1, device,
                                                   n_big=(10, 16), max_lesions=args.lesions, max_size=4000,
                                                   max_extent=32)
            report["timing_larger"] = time_modes([net], image, inst, classes, spacing, patch, device, args.samples,
                                                 args.full_samples, args.full_lesions, args.max_groups)
        except Exception:
            report["timing_larger"] = {"error": traceback.format_exc()}
        print(f"timing (larger net, {args.study_timing_shape}):", json.dumps(report["timing_larger"], default=str),
              flush=True)
        dump()
        if "tiny" not in args.study_steps:
            return 0
        try:  # the tiny model's architecture (3 stages, 4/8/16 features, patch 32, 2 mm) on a 2 mm brain FOV
            tiny, tinfo = train_larger(device, min(30.0, args.train_seconds), patch=(32, 32, 32), seed=1,
                                       features=(4, 8, 16))
            image, inst, classes, _ = network_case([tiny], (96, 112, 96), args.seed, device, n_big=(10, 16),
                                                   max_lesions=args.lesions)
            report["timing_tiny_arch"] = time_modes([tiny], image, inst, classes, (2.0, 2.0, 2.0), (32, 32, 32),
                                                    device, args.samples, args.full_samples, args.full_lesions,
                                                    args.max_groups)
            report["timing_tiny_arch"]["training"] = tinfo
        except Exception:
            report["timing_tiny_arch"] = {"error": traceback.format_exc()}
        print("timing (tiny architecture, 96x112x96):", json.dumps(report["timing_tiny_arch"], default=str), flush=True)
        dump()
        return 0

    model = args.model
    tmp = None
    if model is None:
        from bids_app.testing.tiny_model import build_tiny_model

        tmp = tempfile.TemporaryDirectory()
        t0 = time.perf_counter()
        model = build_tiny_model(tmp.name, n_members=max(1, len(args.folds)), iterations=60)
        print(f"built the tiny model in {time.perf_counter() - t0:.1f} s", flush=True)
    nets, spacing, patch = tiny_networks(model, args.folds, args.member_weights)
    report.update({"model": str(model), "folds": args.folds, "member_weights": args.member_weights,
                   "network_spacing": spacing, "patch": patch})
    if args.cam_table:
        image, inst, classes, labels = network_case(nets, (64, 72, 64), args.seed, device, n_big=(6, 10),
                                                    min_size=20)
        report["dice"] = dice_of(nets, image, labels, device)
        report["cam_table"] = cam_table(nets[0], image, inst, classes, patch, device)
        print_cam_table(report["cam_table"], f"{model} (dice {report['dice']})")
        dump()
        return 0
    image, inst, classes, _ = network_case(nets, tuple(args.shape), args.seed, device, n_big=(10, 16),
                                           max_lesions=args.lesions)
    report["timing"] = time_modes(nets, image, inst, classes, spacing, patch, device, args.samples,
                                  args.full_samples, args.full_lesions, args.max_groups)
    t = report["timing"]
    print(f"crop+batch: {t['crop_per_lesion_s']:.2f} s/lesion ({t['n_lesions_crop']} lesions, n={t['samples']}, "
          f"G={t['max_groups']}, {t['members']} member(s), crops {t['crop_shapes']})")
    print(f"full volume: {t['full_per_sample_s']:.2f} s/sample -> {t['full_per_lesion_s_scaled']:.1f} s/lesion at "
          f"n={t['samples']} ({t['full_lesions']} lesions x {t['full_samples']} samples timed)")
    print(f"speed-up: {t['speedup']:.1f}x")
    if args.agreement:
        report["agreement"] = agreement(nets, image, inst, dict(list(classes.items())[:4]), spacing, patch, device)
        print("crop vs full:", report["agreement"])
    dump()
    return 0


if __name__ == "__main__":
    sys.exit(main())
