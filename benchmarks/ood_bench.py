"""Out-of-distribution scores measured on the shipped models (the groundwork of the OOD issue).

    IMGCLF_DATASETS=/work/shared/datasets .venv/bin/python benchmarks/ood_bench.py \
        --json docs/benchmarks/ood_cpu.json

For each registry entry (``cifar10``, ``catsdogs``): rebuild the eager network and the exact
train/val/test split from the entry's card (``training.cam.rebuild_from_registry``,
``training.export.card_dataset``), export a *features graph* (the card's test-time augmentation
views batched, the network's logits and its penultimate features -- the input of its last
``nn.Linear`` -- averaged over the views with the TTA's weights) to ONNX and run it with ONNX Runtime
(the service's default backend; ~6x faster than eager PyTorch for EfficientNet on this CPU). The
served probabilities are ``softmax(logits / T)``; they are checked against the entry's own
``model.onnx`` on real test images before anything is measured.

Every method is fitted on a seeded subsample of the TRAINING split, its threshold set at 95 % TPR
on the VALIDATION split, and measured on the held-out TEST split (in-distribution) against each
out-of-distribution set: AUROC, FPR at the validation threshold (and the test TPR it gives), FPR at
the test split's own 95 %-TPR threshold (the literature's convention). Also: bytes each method must
store in a graph, and its CPU cost per image (the scorer exported to ONNX, timed with ONNX Runtime
on a batch of features) as a ratio to the shipped ``model.onnx``'s cost per image.

Sample sizes are options (defaults keep a run under ~10 minutes on 2 shared cores); the JSON
records them. Prints one Markdown table per model; ``--json OUT`` writes all figures.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import numpy as np
import onnxruntime as ort
import torch
import torch.nn.functional as F
from torch import nn

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from service.card import InputSpec  # noqa: E402
from service.preprocess import normalize  # noqa: E402
from training import ood, ood_images  # noqa: E402
from training.cam import rebuild_from_registry  # noqa: E402
from training.data import CIFAR10_CLASSES, load_catsdogs, load_cifar10  # noqa: E402
from training.splits import card_dataset  # noqa: E402

OPSET = 17
TPR = 0.95
NON_ANIMALS = ("airplane", "automobile", "ship", "truck")
# the weights TestTimeAugment gives its views (level 2: mirrored(x) / 2 + mirrored(shifts) / 4)
TTA_WEIGHTS = {0: (1.0,), 1: (0.5, 0.5), 2: (0.25, 0.25, 0.125, 0.125, 0.125, 0.125)}
DEFAULTS = {  # per model: train (fit), val (threshold), test (in-distribution), OOD sizes
    "catsdogs": {"train": 1000, "val": 1000, "test": 1000, "cifar_per_class": 100, "synthetic": 50, "shuffled": 200,
                 "control": 200},
    "cifar10": {"train": 5000, "val": 2000, "test": 2000, "synthetic": 250, "shuffled": 1000, "control": 500},
}


# --- the features graph ---------------------------------------------------------------------------


def last_linear(net: nn.Module) -> nn.Linear:
    linears = [m for m in net.modules() if isinstance(m, nn.Linear)]
    if not linears:
        raise ValueError(f"{type(net).__name__} has no nn.Linear head")
    return linears[-1]


def tta_views(x: torch.Tensor, level: int) -> list[torch.Tensor]:
    """The views :class:`training.graph.TestTimeAugment` evaluates, in the order of TTA_WEIGHTS."""
    if level == 0:
        return [x]
    views = [x, x.flip(3)]
    if level == 2:
        h, w = x.shape[2], x.shape[3]
        padded = F.pad(x, (1, 1, 1, 1), mode="reflect")
        for shifted in (padded[:, :, 0:h, 0:w], padded[:, :, 2:h + 2, 2:w + 2]):
            views += [shifted, shifted.flip(3)]
    return views


class FeaturesGraph(nn.Module):
    """``x -> (logits, features)``: the served (TTA-averaged) logits and the penultimate features
    averaged with the same weights (the head is linear, so ``head(mean features) = mean logits``)."""

    def __init__(self, net: nn.Module, level: int) -> None:
        super().__init__()
        self.net = net
        self.level = level

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        captured: list[torch.Tensor] = []
        hook = last_linear(self.net).register_forward_hook(lambda m, args, out: captured.append(args[0]))
        try:
            views = tta_views(x, self.level)
            logits = self.net(torch.cat(views))
        finally:
            hook.remove()
        n, weights = x.shape[0], TTA_WEIGHTS[self.level]
        feats = torch.flatten(captured[-1], 1)
        avg_logits = sum(w * logits[i * n:(i + 1) * n] for i, w in enumerate(weights))
        avg_feats = sum(w * feats[i * n:(i + 1) * n] for i, w in enumerate(weights))
        return avg_logits, avg_feats


def export_onnx(module: nn.Module, example: tuple[torch.Tensor, ...], path: Path,
                inputs: list[str], outputs: list[str]) -> ort.InferenceSession:
    """``module`` exported to ONNX (opset 17, dynamic batch) and opened with 2 CPU threads."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.onnx.export(module.eval(), example, str(path), opset_version=OPSET, input_names=inputs,
                          output_names=outputs, dynamo=False,
                          dynamic_axes={name: {0: "batch"} for name in inputs + outputs})
    options = ort.SessionOptions()
    options.intra_op_num_threads = torch.get_num_threads()
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def run_images(session: ort.InferenceSession, images: torch.Tensor, spec: InputSpec,
               batch: int) -> list[torch.Tensor]:
    """The session's outputs for uint8 images, preprocessed as the card says, in batches."""
    name = session.get_inputs()[0].name
    parts = [session.run(None, {name: normalize(images[i:i + batch].numpy(), spec)})
             for i in range(0, len(images), batch)]
    return [torch.from_numpy(np.concatenate([p[j] for p in parts])) for j in range(len(parts[0]))]


def seeded_take(n_total: int, n: int, seed: int) -> torch.Tensor:
    return torch.randperm(n_total, generator=torch.Generator().manual_seed(seed))[:n]


def resize(images: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """uint8 images resized bilinearly (antialiased) to ``size``, as the service resizes a photo."""
    if tuple(images.shape[2:]) == tuple(size):
        return images
    out = F.interpolate(images.float(), size=size, mode="bilinear", align_corners=False, antialias=True)
    return out.round().clamp(0, 255).to(torch.uint8)


def picks_for(labels: torch.Tensor, label: int, n: int, seed: int) -> torch.Tensor:
    """A seeded sample of ``n`` positions of ``label`` in ``labels``."""
    where = torch.nonzero(labels == label).flatten()
    return where[seeded_take(len(where), n, seed)]


# --- the image sets -------------------------------------------------------------------------------


def synthetic_sets(n: int, size: tuple[int, int], seed: int) -> dict[str, torch.Tensor]:
    return {"noise": ood_images.uniform_noise(n, size, seed),
            "smooth_noise": ood_images.smooth_noise(n, size, seed + 1),
            "flat_colours": ood_images.flat_colours(n, size, seed + 2),
            "gradients": ood_images.gradients(n, size, seed + 3)}


def image_sets(name: str, card: dict, sizes: dict[str, int], seed: int) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor], dict[str, str]]:
    """(in-distribution splits {train, val, test} with labels under ``*_labels``, OOD sets,
    descriptions of the OOD sets)."""
    data = card_dataset(card)
    size = card.input.size
    ind: dict[str, torch.Tensor] = {}
    for split in ("train", "val", "test"):
        part = getattr(data, split)
        index = seeded_take(len(part), sizes[split], seed)
        ind[split], ind[f"{split}_labels"] = part.images[index], part.labels[index]
    out = synthetic_sets(sizes["synthetic"], size, seed)
    about = {k: f"{sizes['synthetic']} synthetic images ({k.replace('_', ' ')}), seeded" for k in out}
    shuffled = ind["test"][:sizes["shuffled"]]
    out["pixel_shuffled"] = ood_images.pixel_shuffle(shuffled, seed)
    about["pixel_shuffled"] = f"{len(shuffled)} in-distribution test images, pixels shuffled"
    if name == "catsdogs":
        test = load_cifar10().test
        keep = [i for i, c in enumerate(CIFAR10_CLASSES) if c not in ("cat", "dog")]
        picks = {c: picks_for(test.labels, c, sizes["cifar_per_class"], seed + c) for c in keep}
        animals = [c for c in keep if CIFAR10_CLASSES[c] not in NON_ANIMALS]
        non_animals = [c for c in keep if CIFAR10_CLASSES[c] in NON_ANIMALS]
        non_animal_images = resize(test.images[torch.cat([picks[c] for c in non_animals])], size)
        animal_images = resize(test.images[torch.cat([picks[c] for c in animals])], size)
        out["cifar10_non_animals"] = non_animal_images
        out["cifar10_other_animals"] = animal_images
        about["cifar10_non_animals"] = (f"CIFAR-10 test images of {', '.join(NON_ANIMALS)} "
                                        f"({sizes['cifar_per_class']} each), upscaled 32->{size[0]} bilinear")
        about["cifar10_other_animals"] = (f"CIFAR-10 test images of bird, deer, frog, horse "
                                          f"({sizes['cifar_per_class']} each), upscaled 32->{size[0]} bilinear")
        cats_dogs = torch.cat([picks_for(test.labels, c, sizes["control"] // 2, seed + c)
                               for c in (CIFAR10_CLASSES.index("cat"), CIFAR10_CLASSES.index("dog"))])
        out["control_cifar10_cats_dogs"] = resize(test.images[cats_dogs], size)
        about["control_cifar10_cats_dogs"] = (f"CONTROL, semantically in-distribution: CIFAR-10 test cats and dogs "
                                              f"({sizes['control'] // 2} each), upscaled 32->{size[0]}: a high AUROC "
                                              "here means the score flags low-resolution images, not unknown classes")
    else:
        out["patch_shuffled_8px"] = ood_images.patch_shuffle(shuffled, 8, seed)
        about["patch_shuffled_8px"] = f"{len(shuffled)} in-distribution test images, 8x8 tiles shuffled"
        photos = load_catsdogs(size=192).test
        photos = photos.images[seeded_take(len(photos), sizes["control"], seed)]
        out["control_catsdogs_photos"] = resize(photos, size)
        about["control_catsdogs_photos"] = (f"CONTROL, semantically in-distribution: {sizes['control']} held-out "
                                            f"cats-vs-dogs photos downscaled 192->{size[0]}: a high AUROC here "
                                            "means the score flags another photo source, not unknown classes")
    return ind, out, about


# (OOD set, control set): the OOD set against a control of the same image source that is semantically
# in-distribution, both low-resolution CIFAR-10 upscaled: what is left is the unknown classes' own signal
CONTRASTS = (("cifar10_non_animals", "control_cifar10_cats_dogs"), ("cifar10_8_classes", "control_cifar10_cats_dogs"))
UNIONS = {  # sets reported beside the sets they join
    "synthetic_all": ("noise", "smooth_noise", "flat_colours", "gradients"),
    "cifar10_8_classes": ("cifar10_non_animals", "cifar10_other_animals"),
}


# --- the methods ----------------------------------------------------------------------------------


@dataclass
class Method:
    name: str
    about: str
    module: nn.Module  # forward(logits, features) -> score


class LogitScore(nn.Module):
    def __init__(self, kind: str, temperature: float) -> None:
        super().__init__()
        self.kind, self.temperature = kind, float(temperature)

    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        if self.kind == "msp":
            return ood.msp(torch.softmax(logits / self.temperature, dim=1))
        if self.kind == "energy":
            return ood.energy(logits, self.temperature)
        return ood.max_logit(logits)


class FeatureScore(nn.Module):
    def __init__(self, scorer: nn.Module) -> None:
        super().__init__()
        self.scorer = scorer

    def forward(self, logits: torch.Tensor, features: torch.Tensor) -> torch.Tensor:
        return self.scorer(features)


def methods(train_feats: torch.Tensor, train_labels: torch.Tensor, classes: int, temperature: float,
            seed: int) -> list[Method]:
    dim = train_feats.shape[1]
    out = [Method("msp", f"1 - max softmax(logits / T), T = {temperature:.4f} (the served probabilities)",
                  LogitScore("msp", temperature)),
           Method("energy_T1", "-logsumexp(logits)", LogitScore("energy", 1.0)),
           Method("energy_Tcal", "-T logsumexp(logits / T), the calibration T", LogitScore("energy", temperature)),
           Method("max_logit", "-max logit", LogitScore("max_logit", 1.0))]

    def maha(name: str, about: str, **kw: Any) -> None:
        out.append(Method(name, about, FeatureScore(ood.fit_mahalanobis(train_feats, train_labels, classes, **kw))))

    maha("maha_full", f"Mahalanobis, shared covariance, all {dim} dims", components=None)
    maha("maha_full_l2", f"Mahalanobis on L2-normalised features, all {dim} dims", components=None, normalize=True)
    for k in (64, 128, 256):
        if k < dim:
            maha(f"maha_pca{k}", f"Mahalanobis in the top-{k} principal subspace only", components=k, residual=False)
            maha(f"maha_ppca{k}", f"Mahalanobis under the PPCA covariance: top-{k} + isotropic residual",
                 components=k, residual=True)
            maha(f"maha_ppca{k}_l2", f"as maha_ppca{k}, L2-normalised features", components=k, residual=True,
                 normalize=True)
    for bank, k in ((256, 1), (1000, 1), (1000, 5)):
        if bank <= len(train_feats):
            out.append(Method(f"knn{bank}_k{k}", f"{k}-th nearest cosine neighbour among {bank} training features",
                              FeatureScore(ood.fit_knn(train_feats, bank, k, seed))))
    return out


def stored_bytes(module: nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


def median_seconds(fn: Callable[[], Any], repeats: int) -> float:
    fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def evaluate(method: Method, feats: dict[str, tuple[torch.Tensor, torch.Tensor]], ood_names: list[str]) -> dict:
    with torch.no_grad():
        scores = {k: method.module(*v) for k, v in feats.items()}
    threshold = ood.threshold_at_tpr(scores["val"], TPR)
    test_threshold = ood.threshold_at_tpr(scores["test"], TPR)
    per_set = {name: {"auroc": ood.auroc(scores["test"], scores[name]),
                      "fpr_at_val_threshold": ood.fpr_at(scores[name], threshold),
                      "fpr_at_test_95tpr": ood.fpr_at(scores[name], test_threshold),
                      "images": len(scores[name])} for name in ood_names}
    contrasts = {f"{bad}_vs_{good}": {"auroc": ood.auroc(scores[good], scores[bad]),
                                      "fpr_at_95tpr_of_control": ood.fpr_at(scores[bad], ood.threshold_at_tpr(scores[good], TPR))}
                 for bad, good in CONTRASTS if bad in scores and good in scores}
    return {"about": method.about, "threshold": threshold, "contrasts": contrasts, "val_tpr": ood.tpr_at(scores["val"], threshold),
            "test_tpr": ood.tpr_at(scores["test"], threshold), "sets": per_set}


def score_cost(method: Method, logits: torch.Tensor, feats: torch.Tensor, folder: Path,
               repeats: int) -> tuple[float, float]:
    """(ONNX Runtime seconds per image on this batch, max |ONNX - PyTorch| / max |PyTorch|)."""
    session = export_onnx(method.module, (logits, feats), folder / f"{method.name}.onnx",
                          ["logits", "features"], ["ood_score"])
    wanted = {i.name for i in session.get_inputs()}  # a graph drops an input it does not use
    feed = {k: v for k, v in {"logits": logits.numpy(), "features": feats.numpy()}.items() if k in wanted}
    with torch.no_grad():
        reference = method.module(logits, feats).numpy()
    diff = float(np.abs(session.run(None, feed)[0] - reference).max() / max(np.abs(reference).max(), 1e-12))
    return median_seconds(lambda: session.run(None, feed), repeats) / len(feats), diff


# --- one model --------------------------------------------------------------------------------------


def bench_model(name: str, models_dir: Path, sizes: dict[str, int], seed: int, folder: Path,
                log: Callable[[str], None]) -> dict:
    started = time.perf_counter()
    net, card = rebuild_from_registry(models_dir / name)
    spec = card.input
    size = card.input.size
    level = card.tta_level
    temperature = card.temperature
    batch = max(1, min(256, (8 << 20) // (4 * 3 * size[0] * size[1] * len(TTA_WEIGHTS[level]))))
    graph = FeaturesGraph(net, level).eval()
    example = torch.rand(2, 3, *size)
    session = export_onnx(graph, (example,), folder / f"{name}-features.onnx", ["input"], ["logits", "features"])
    shipped_opts = ort.SessionOptions()
    shipped_opts.intra_op_num_threads = torch.get_num_threads()
    shipped = ort.InferenceSession(str(models_dir / name / card.artifact("onnx").file), shipped_opts,
                                   providers=["CPUExecutionProvider"])
    ind, out, about = image_sets(name, card, sizes, seed)
    log(f"{name}: sets built ({time.perf_counter() - started:.0f} s); extracting features")

    # the features graph computes what the entry serves
    parity_images = ind["test"][:32]
    served = run_images(shipped, parity_images, spec, batch)[0]
    logits = run_images(session, parity_images, spec, batch)[0]
    parity = float((torch.softmax(logits / temperature, dim=1) - served).abs().max())
    if parity > 1e-4:
        raise SystemExit(f"{name}: the features graph's probabilities differ from model.onnx's by {parity}")

    feats: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    extract_start, extracted = time.perf_counter(), 0
    for key, images in [("train", ind["train"]), ("val", ind["val"]), ("test", ind["test"]), *out.items()]:
        t0 = time.perf_counter()
        feats[key] = tuple(run_images(session, images, spec, batch))
        extracted += len(images)
        log(f"  {key}: {len(images)} images, {time.perf_counter() - t0:.0f} s")
    extract_s = time.perf_counter() - extract_start
    for key, parts in UNIONS.items():
        if all(p in feats for p in parts):
            feats[key] = (torch.cat([feats[p][0] for p in parts]), torch.cat([feats[p][1] for p in parts]))
    ood_names = [k for k in feats if k not in ("train", "val", "test")]
    about["synthetic_all"] = "the four synthetic sets together"
    if "cifar10_8_classes" in feats:
        about["cifar10_8_classes"] = "the CIFAR-10 test images of the 8 classes that are not cat or dog"

    accuracy = float((feats["test"][0].argmax(1) == ind["test_labels"]).float().mean())
    network_s = median_seconds(lambda: shipped.run(None, {shipped.get_inputs()[0].name:
                                                         normalize(ind["test"][:batch].numpy(), spec)}), 3) / batch
    fitted = methods(feats["train"][1], ind["train_labels"], len(card.classes), temperature, seed)
    results = {}
    cost_logits, cost_feats = feats["test"][0][:256], feats["test"][1][:256]
    for method in fitted:
        result = evaluate(method, feats, ood_names)
        per_image, diff = score_cost(method, cost_logits, cost_feats, folder, 20)
        result.update(stored_bytes=stored_bytes(method.module), onnx_s_per_image=per_image,
                      cost_ratio=per_image / network_s, onnx_max_rel_diff=diff)
        results[method.name] = result
    log(f"{name}: done in {time.perf_counter() - started:.0f} s")
    return {"model": name, "architecture": card.architecture, "version": card.version,
            "feature_dim": int(feats["train"][1].shape[1]), "tta_level": level, "temperature": temperature,
            "sample_sizes": {k: len(ind[k]) for k in ("train", "val", "test")} | {k: len(feats[k][0]) for k in ood_names},
            "sample_seed": seed, "ood_sets": about, "test_accuracy_on_sample": accuracy,
            "parity_max_abs_diff_vs_model_onnx": parity,
            "network_onnx_s_per_image": network_s, "extract_images_per_s": extracted / extract_s,
            "tpr_target": TPR, "methods": results, "seconds": time.perf_counter() - started}


# --- report -----------------------------------------------------------------------------------------


def table(result: dict) -> str:
    sets = list(next(iter(result["methods"].values()))["sets"])
    head = ["method", "bytes", "cost"] + sets
    lines = [f"### {result['model']} ({result['architecture']}, {result['feature_dim']}-d features; "
             f"in-distribution: {result['sample_sizes']['test']} test images)", "",
             "AUROC / FPR at the validation split's 95 %-TPR threshold, per OOD set", "",
             "| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in result["methods"].items():
        cells = [name, f"{m['stored_bytes'] / 1e6:.2f} MB" if m["stored_bytes"] else "0",
                 f"{100 * m['cost_ratio']:.2f} %"]
        cells += [f"{s['auroc']:.3f} / {100 * s['fpr_at_val_threshold']:.1f} %" for s in m["sets"].values()]
        lines.append("| " + " | ".join(cells) + " |")
    contrasts = [(name, key, c) for name, m in result["methods"].items() for key, c in m.get("contrasts", {}).items()]
    if contrasts:
        lines += ["", "Contrasts (AUROC / FPR at the control's own 95 %-TPR threshold, the control as in-distribution)", ""]
        lines += [f"- {name}: {key}: {c['auroc']:.3f} / {100 * c['fpr_at_95tpr_of_control']:.1f} %"
                  for name, key, c in contrasts]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=["cifar10", "catsdogs"])
    parser.add_argument("--models-dir", type=Path, default=REPO / "models")
    parser.add_argument("--scale", type=float, default=1.0, help="multiply every default sample size")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--json", type=Path)
    args = parser.parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    log = lambda text: print(text, file=sys.stderr, flush=True)  # noqa: E731
    results = []
    started = time.perf_counter()
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        for name in args.models:
            sizes = {k: max(1, int(v * args.scale)) for k, v in DEFAULTS[name].items()}
            results.append(bench_model(name, args.models_dir, sizes, args.seed, Path(tmp), log))
            print(table(results[-1]) + "\n", flush=True)
    report = {"command": "python benchmarks/ood_bench.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "seconds": time.perf_counter() - started, "threads": args.threads,
              "load_average_1m_before_after": [load_before, os.getloadavg()[0]],
              "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} cores (shared)",
              "torch": torch.__version__, "onnxruntime": ort.__version__,
              "conventions": "higher score = further from the training data; in-distribution = score <= threshold; "
                             "threshold at 95 % TPR of the validation sample; AUROC and FPR against the test sample",
              "results": results}
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(report, indent=2) + "\n")


if __name__ == "__main__":
    main()
